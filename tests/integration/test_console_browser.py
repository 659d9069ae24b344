"""The operator console in a real browser (issue 17): Debian's headless Chromium, driven by
Playwright, against a running platform (PostgreSQL, Redis, NATS; relay, monitor,
orchestrator with the local cloud, gateway, admin service). An operator signs in, watches a
node appear and go active live, sees a completion's `usage.recorded` arrive, creates a key
(shown once), revokes it and sees the gateway refuse it, settles a held meter export (sent to
a Stripe double once); a wrong token cannot sign in.

Screenshots of every page, at 1280x800 and at a phone's width, go to
`.state/console-screenshots/` (CONSOLE_SCREENSHOTS to put them elsewhere).

Chromium comes from Debian (`apt-get install chromium`; `.ci/run` installs it).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import openai
import pytest
from playwright.async_api import Browser, Page, ViewportSize, async_playwright, expect

from services.admin.app import create_admin_app
from services.admin.settings import AdminSettings
from services.billing.app import create_billing_app
from services.billing.settings import BillingSettings
from services.infra.natsauth.identities import Role
from services.infra.settings import Secret
from tests.doubles.stripe_server import StripeServer, running_stripe
from tests.helpers import eventually
from tests.integration.fleet_fixtures import MODEL, Fleet
from tests.integration.fleet_fixtures import fleet as fleet
from tests.integration.test_admin_api import TOKEN
from tests.integration.test_billing_admin import held_export
from tests.integration.test_monitor_basics import serve

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
SHOTS = Path(os.environ.get("CONSOLE_SCREENSHOTS", ".state/console-screenshots"))
WAIT_MS = 90_000
"""A node's launch on a busy two-core machine: processes start, register, heartbeat."""
VIEWPORTS: dict[str, ViewportSize] = {"desktop": {"width": 1280, "height": 800},
                                      "phone": {"width": 390, "height": 844}}


# As the alert tests do with promtool: .ci/run installs it, a machine without it skips.
pytestmark = pytest.mark.skipif(
    shutil.which(CHROMIUM) is None,
    reason=f"{CHROMIUM} is not installed (Debian: apt-get install chromium)")


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as pw:
        chromium = await pw.chromium.launch(executable_path=CHROMIUM, args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
            "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        try:
            yield chromium
        finally:
            await chromium.close()


@pytest.fixture
async def stripe_server() -> AsyncIterator[StripeServer]:
    async with running_stripe() as server:
        yield server


async def start_admin(f: Fleet, stripe: StripeServer | None = None) -> str:
    linked: dict[str, Any] = {} if stripe is None else dict(
        stripe_secret_key=Secret(stripe.api_key), stripe_api_base=stripe.url,
        stripe_timeout=5.0)
    settings = AdminSettings(**f.core(Role.ADMIN_API), admin_token=Secret(TOKEN),
                             event_stream_keepalive=1.0, **linked)
    url, runner = await serve(create_admin_app(settings))
    f.runners.append(("admin", runner))
    return url


def _shots_dir() -> Path:
    SHOTS.mkdir(parents=True, exist_ok=True)
    return SHOTS


async def start_billing(f: Fleet, stripe: StripeServer) -> None:
    """Billing records the gateway's usage in the log (what the events page tails), and its
    pusher leader settles held exports."""
    _, runner = await serve(create_billing_app(BillingSettings(
        **f.core(Role.BILLING), stripe_secret_key=Secret(stripe.api_key),
        stripe_api_base=stripe.url, stripe_timeout=5.0, billing_leader_retry=0.2)))
    f.runners.append(("billing", runner))


async def shoot(page: Page, name: str) -> None:
    shots = _shots_dir()
    await page.evaluate("document.getElementById('toast')?.classList.remove('show')")
    for label, size in VIEWPORTS.items():
        await page.set_viewport_size(size)
        await page.screenshot(path=str(shots / f"{name}-{label}.png"), full_page=True)
    await page.set_viewport_size(VIEWPORTS["desktop"])


async def show(page: Page, name: str) -> None:
    await page.goto(page.url.split("#")[0] + f"#{name}")
    await expect(page.locator(f"main[data-ready={name}]")).to_be_attached(timeout=WAIT_MS)


@pytest.mark.timeout(300)
async def test_an_operator_runs_the_platform_from_the_console(
        fleet: Fleet, browser: Browser, stripe_server: StripeServer) -> None:
    f = fleet
    await f.start_cloud()
    await f.start_control_plane()
    await start_billing(f, stripe_server)
    admin_url = await start_admin(f, stripe_server)
    page = await browser.new_page(viewport=VIEWPORTS["desktop"])
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))

    # A wrong token cannot sign in; the right one can, and is never in a URL.
    await page.goto(f"{admin_url}/console")
    await shoot(page, "sign-in")
    await page.fill("#token", "not-the-token")
    await page.click("button[type=submit]")
    await expect(page.get_by_role("alert")).to_contain_text("not the admin token")
    await page.fill("#token", TOKEN)
    await page.click("button[type=submit]")
    await expect(page.locator("main[data-ready=fleet]")).to_be_attached(timeout=WAIT_MS)
    assert TOKEN not in page.url
    cookies = await page.context.cookies()
    assert [(c["name"], c["httpOnly"], c["sameSite"]) for c in cookies] == [
        ("crosslogic_console", True, "Strict")]

    # The fleet, live: a deployment's node appears, then goes active, on the open page.
    await f.deploy(min_nodes=1, max_nodes=1)
    await expect(page.locator("tr[data-node]")).to_have_count(1, timeout=WAIT_MS)
    await expect(page.locator("tr[data-node][data-status=active]")).to_have_count(
        1, timeout=WAIT_MS)
    await f.routable(1, timeout=WAIT_MS / 1000)
    await shoot(page, "fleet")

    # A completion's usage.recorded arrives on the events page, live.
    await show(page, "events")
    await page.fill("input[name=type]", "usage.*")
    await page.fill("input[name=since]", "1m")
    await page.click("form.filters button")
    await f.complete()
    usage = page.locator('li[data-type="usage.recorded"]')
    await expect(usage).to_have_count(1, timeout=WAIT_MS)
    await usage.locator("summary").click()
    await expect(usage.locator("pre")).to_contain_text('"prompt_tokens"')
    await shoot(page, "events")

    # A key, created and shown once, works; revoked, the gateway refuses it.
    await show(page, "tenants")
    await page.click('tr[data-tenant] a:text("Acme")')
    environment = page.locator("section.environment").first
    await environment.locator("input[placeholder=\"new key's name\"]").fill("from-console")
    await environment.locator("button:text('Create key')").click()
    secret = page.locator("[data-testid=new-key]")
    await expect(secret).to_be_visible()
    key = (await secret.text_content() or "").strip()
    assert key
    await shoot(page, "tenants-new-key")
    await page.click("dialog.modal button:text('Close')")
    await expect(page.locator("[data-testid=new-key]")).to_have_count(0)
    async with openai.AsyncOpenAI(base_url=f"{f.gateway_url}/v1", api_key=key,
                                  max_retries=0) as client:
        await client.chat.completions.create(model=MODEL, max_tokens=2,
                                             messages=[{"role": "user", "content": "hi"}])
        row = page.locator("tr[data-key]", has_text="from-console")
        await row.locator("button:text('Revoke')").click()
        await expect(row).to_have_attribute("data-status", "revoked")

        async def refused() -> bool:
            try:
                await client.chat.completions.create(
                    model=MODEL, max_tokens=2, messages=[{"role": "user", "content": "hi"}])
            except openai.AuthenticationError:
                return True
            return False

        await eventually(refused, timeout=30, what="the gateway refusing the revoked key")
    await shoot(page, "tenants")

    # Usage as charts; a held meter export, settled (sent to Stripe once); notifications.
    tenant = await f.pool.fetchval("SELECT id FROM tenants WHERE name = 'Acme'")
    ident = await held_export(f.pool, stripe_server, tenant, value=1234)
    await show(page, "usage")
    await expect(page.locator("[data-testid=chart-tokens] canvas")).to_have_count(
        1, timeout=WAIT_MS)
    held = page.locator(f'tr[data-export="{ident}"]')
    await expect(held).to_have_attribute("data-status", "held")
    await shoot(page, "usage")
    await held.locator("button:text('Resend')").click()
    await expect(held).to_have_count(0)  # exported: it needs no eye any more
    assert stripe_server.state.meter_events[ident]["payload"]["value"] == "1234"
    await show(page, "notifications")
    await shoot(page, "notifications")
    assert not errors, errors


async def test_the_console_refuses_what_its_session_does_not_allow(
        fleet: Fleet, browser: Browser) -> None:
    """The page's own script cannot be made to write without the token: a fetch from the
    console's origin that leaves out X-CSRF-Token is refused, as a forged form would be."""
    admin_url = await start_admin(fleet)
    page = await browser.new_page()
    await page.goto(f"{admin_url}/console")
    await page.fill("#token", TOKEN)
    await page.click("button[type=submit]")
    await expect(page.locator("main[data-ready=fleet]")).to_be_attached(timeout=WAIT_MS)
    status: Any = await page.evaluate("""async () => (await fetch('/admin/v1/tenants', {
        method: 'POST', headers: {'Content-Type': 'application/json'},
        body: JSON.stringify({name: 'forged'})})).status""")
    assert status == 403
    token_readable = await page.evaluate("document.cookie")
    assert "crosslogic_console" not in token_readable  # HttpOnly: no script reads it
