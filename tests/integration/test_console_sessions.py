"""The console's sign-in, session and CSRF (issue 17), over HTTP against the real admin app:
the token is posted once; the browser keeps an HttpOnly, SameSite=Strict session cookie that
opens the admin API for reads, and for writes only with the session's CSRF token."""

from __future__ import annotations

import hashlib

import aiohttp

from services.admin.console_routes import ASSETS
from tests.integration.test_admin_api import TOKEN, Admin
from tests.integration.test_admin_api import admin as admin


def url(admin: Admin, path: str) -> str:
    return str(admin.server.make_url(path))


async def signed_in(admin: Admin) -> tuple[aiohttp.ClientSession, str]:
    """A browser that signed in: its cookie jar holds the session; and its CSRF token."""
    browser = aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))
    async with browser.post(url(admin, "/console/sign-in"), data={"token": TOKEN},
                            allow_redirects=False) as r:
        assert r.status == 303 and r.headers["Location"] == "/console"
        cookie = r.headers["Set-Cookie"]
        assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/" in cookie
        assert TOKEN not in cookie
    async with browser.get(url(admin, "/console/session")) as r:
        assert r.status == 200
        csrf: str = (await r.json())["csrf_token"]
    return browser, csrf


async def test_a_signed_in_browser_reads_and_writes_only_with_its_csrf_token(
        admin: Admin) -> None:
    browser, csrf = await signed_in(admin)
    async with browser:
        async with browser.get(url(admin, "/console")) as r:
            page = await r.text()
            assert r.status == 200 and 'src="/console/assets/console.js"' in page
            assert "frame-ancestors 'none'" in r.headers["Content-Security-Policy"]
        async with browser.get(url(admin, "/admin/v1/tenants")) as r:
            assert r.status == 200  # the cookie opens reads
        # A write the page did not make (a forged form, another site): no token, refused.
        async with browser.post(url(admin, "/admin/v1/tenants"), json={"name": "Forged"}) as r:
            assert r.status == 403 and (await r.json())["error"]["code"] == "csrf_token_missing"
        async with browser.post(url(admin, "/admin/v1/tenants"), json={"name": "Forged"},
                                headers={"X-CSRF-Token": "guess"}) as r:
            assert r.status == 403
        async with browser.post(url(admin, "/admin/v1/tenants"), json={"name": "Real"},
                                headers={"X-CSRF-Token": csrf}) as r:
            assert r.status == 201
        # Signing out needs the token too, then ends the session everywhere.
        async with browser.post(url(admin, "/console/sign-out"), allow_redirects=False) as r:
            assert r.status == 403
        async with browser.post(url(admin, "/console/sign-out"), data={"csrf": csrf},
                                allow_redirects=False) as r:
            assert r.status == 303
        async with browser.get(url(admin, "/admin/v1/tenants")) as r:
            assert r.status == 401
        async with browser.get(url(admin, "/console")) as r:
            assert 'action="/console/sign-in"' in await r.text()


async def test_a_wrong_token_cannot_sign_in_and_a_guesser_is_stopped(admin: Admin) -> None:
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as browser:
        for _ in range(10):
            async with browser.post(url(admin, "/console/sign-in"), data={"token": "guess"},
                                    allow_redirects=False) as r:
                assert r.status == 401 and "Set-Cookie" not in r.headers
                assert "not the admin token" in await r.text()
        # Past the tenth wrong token, even the right one waits out the window.
        async with browser.post(url(admin, "/console/sign-in"), data={"token": TOKEN},
                                allow_redirects=False) as r:
            assert r.status == 429 and "Too many wrong tokens" in await r.text()
        async with browser.get(url(admin, "/admin/v1/tenants")) as r:
            assert r.status == 401
        # A made-up cookie is no session.
        browser.cookie_jar.update_cookies({"crosslogic_console": "x" * 43})
        async with browser.get(url(admin, "/admin/v1/tenants")) as r:
            assert r.status == 401


async def test_the_assets_are_served_and_the_vendored_library_is_the_recorded_one(
        admin: Admin) -> None:
    recorded = (ASSETS / "vendor" / "SHA256SUMS").read_text().split("\n")
    for line in filter(None, recorded):
        digest, name = line.split()
        assert hashlib.sha256((ASSETS / "vendor" / name).read_bytes()).hexdigest() == digest
    async with aiohttp.ClientSession() as s:
        for path in ("/console/assets/console.js", "/console/assets/console.css",
                     "/console/assets/vendor/uPlot.iife.min.js"):
            async with s.get(url(admin, path)) as r:
                assert r.status == 200, path
        for path in ("/console/assets/../console_routes.py", "/console/assets/%2e%2e/app.py",
                     "/console/assets/vendor/"):
            async with s.get(url(admin, path)) as r:
                assert r.status in (403, 404), path
