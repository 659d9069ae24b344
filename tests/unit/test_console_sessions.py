"""Console sessions (issue 17): what a session allows. Pure."""

from __future__ import annotations

from services.admin.console_sessions import Session


def test_a_session_reads_freely_and_writes_only_with_its_csrf_token() -> None:
    session = Session("id", "csrf-token")
    for method in ("GET", "HEAD", "OPTIONS"):
        assert session.allows(method, None)
    for method in ("POST", "PUT", "PATCH", "DELETE"):
        assert not session.allows(method, None)
        assert not session.allows(method, "")
        assert not session.allows(method, "csrf-token-but-longer")
        assert not session.allows(method, "\udcff")  # not even valid UTF-8: refused, no crash
        assert session.allows(method, "csrf-token")


def test_a_session_never_shows_its_secrets() -> None:
    assert "csrf" not in repr(Session("secret-id", "csrf-secret"))
    assert "secret" not in repr(Session("secret-id", "csrf-secret"))
