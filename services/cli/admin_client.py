"""A small synchronous client of the admin API for the `crosslogic` command (urllib: a CLI
call is one request or a few, no event loop needed).

Where the API is and its token come from ONE source, so a token never travels to another
platform's API: the first of `--admin-token`, `CROSSLOGIC_ADMIN_TOKEN` (or `ADMIN_API_TOKEN`)
and a running `crosslogic dev`'s `urls.json` that has a token decides.

- A token given by flag or environment goes to `--admin-url` or `CROSSLOGIC_ADMIN_URL`; with
  neither, to http://127.0.0.1:8081 — unless a `crosslogic dev` runs here (that is where its
  admin API listens), which is an error: say which API you mean.
- The dev platform's token goes to the dev platform's URL only; a URL given for another API
  without its token is an error.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_ADMIN_URL = "http://127.0.0.1:8081"
API_PREFIX = "/admin/v1"
TOKEN_HEADER = "X-Admin-Token"


class AdminConfigError(Exception):
    """The CLI does not know where the admin API is, or has no token for it."""


class AdminUnreachable(Exception):
    pass


class AdminApiError(Exception):
    """The API said no; its error body's fields."""

    def __init__(self, status: int, message: str, *, type: str | None = None,
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    @classmethod
    def from_body(cls, status: int, raw: bytes) -> AdminApiError:
        try:
            error = json.loads(raw)["error"]
            return cls(status, str(error["message"]), type=error.get("type"),
                       param=error.get("param"), code=error.get("code"))
        except (ValueError, KeyError, TypeError):
            text = raw.decode(errors="replace").strip()[:200]
            return cls(status, f"HTTP {status}" + (f": {text}" if text else ""))

    def __str__(self) -> str:
        return self.message + (f" (field: {self.param})" if self.param else "")


@dataclass(frozen=True)
class AdminTarget:
    url: str
    token: str = field(repr=False)


def read_dev_admin(state_dir: Path) -> dict[str, str]:
    """`admin_url` and `admin_token` from a running `crosslogic dev`, when it wrote them."""
    from services.cli.dev_urls import read_dev_urls

    dev = read_dev_urls(state_dir)
    if dev is None:
        return {}
    return {k: v for k, v in (("admin_url", dev.admin_url), ("admin_token", dev.admin_token))
            if v}


def _base(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise AdminConfigError(f"the admin URL must be http(s)://host:port, not {url!r}")
    # The API's own prefix is added per request; a URL given with it still works.
    return url.rstrip("/").removesuffix(API_PREFIX)


def resolve_target(url: str | None, token: str | None, environ: Mapping[str, str],
                   state_dir: Path) -> AdminTarget:
    dev = read_dev_admin(state_dir)
    given_url = url or environ.get("CROSSLOGIC_ADMIN_URL") or None
    given_token = (token or environ.get("CROSSLOGIC_ADMIN_TOKEN")
                   or environ.get("ADMIN_API_TOKEN") or None)
    if given_token:
        if given_url:
            return AdminTarget(_base(given_url), given_token)
        if dev.get("admin_url"):
            raise AdminConfigError(
                "an admin token is set (--admin-token, CROSSLOGIC_ADMIN_TOKEN or "
                "ADMIN_API_TOKEN) but no admin URL, and a `crosslogic dev` runs here: set "
                "CROSSLOGIC_ADMIN_URL (or --admin-url) for that token's API, or unset the "
                "token to use the dev platform")
        return AdminTarget(_base(DEFAULT_ADMIN_URL), given_token)
    if dev.get("admin_token") and dev.get("admin_url"):
        dev_url = _base(dev["admin_url"])
        if given_url and _base(given_url) != dev_url:
            raise AdminConfigError(
                f"no admin token for {given_url}: set CROSSLOGIC_ADMIN_TOKEN (or pass "
                f"--admin-token); the running `crosslogic dev`'s token is for {dev_url} only")
        return AdminTarget(dev_url, dev["admin_token"])
    raise AdminConfigError("no admin token: set CROSSLOGIC_ADMIN_TOKEN (or pass "
                           "--admin-token), or run `crosslogic dev` in this folder")


Query = Mapping[str, str | int] | Sequence[tuple[str, str | int]]


class AdminClient:
    def __init__(self, target: AdminTarget, *, timeout: float = 30.0) -> None:
        self.target = target
        self.timeout = timeout

    def __repr__(self) -> str:
        return f"AdminClient({self.target.url!r})"

    def url(self, path: str, query: Query | None = None) -> str:
        url = self.target.url + API_PREFIX + path
        return url + ("?" + urllib.parse.urlencode(query, doseq=True) if query else "")

    def request(self, method: str, path: str, body: Any = None,
                query: Query | None = None) -> Any:
        """The decoded JSON answer (None for 204); AdminApiError for an error answer."""
        headers = {TOKEN_HEADER: self.target.token, "Accept": "application/json"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        url = self.url(path, query)
        req = urllib.request.Request(url, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as response:
                raw = response.read()
        except urllib.error.HTTPError as exc:
            raise AdminApiError.from_body(exc.code, exc.read()) from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise AdminUnreachable(f"cannot reach the admin API at {self.target.url}: "
                                   f"{reason}") from None
        return json.loads(raw) if raw else None

    def get(self, path: str, query: Query | None = None) -> Any:
        return self.request("GET", path, query=query)

    def post(self, path: str, body: Any = None) -> Any:
        return self.request("POST", path, body if body is not None else {})

    def patch(self, path: str, body: Any) -> Any:
        return self.request("PATCH", path, body)

    def put(self, path: str, body: Any) -> Any:
        return self.request("PUT", path, body)

    def delete(self, path: str) -> Any:
        return self.request("DELETE", path)

    def list_all(self, path: str, page_size: int = 200) -> list[Any]:
        """Every row of a paged list, following `next_cursor`."""
        rows: list[Any] = []
        query: dict[str, str | int] = {"limit": page_size}
        while True:
            page = self.get(path, query)
            rows.extend(page["data"])
            if not page.get("next_cursor"):
                return rows
            query["cursor"] = page["next_cursor"]
