"""The console in a real browser (Debian's headless Chromium, driven by Playwright) against a real
`qubax serve`: an operator signs in, makes and manages a key, generates in the playground, reads the
overview and the usage, downloads the CSV and signs out. Each page is saved as a screenshot under
`.screenshots/console/` (not committed) for a person to look at."""

import csv
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest

from tests.postgres import free_port
from tests.test_admin import TOKEN
from tests.test_readme import wait_for_health

pytestmark = pytest.mark.slow
CHROMIUM = shutil.which("chromium")
QUBAX = Path(sys.executable).parent / "qubax"
SCREENSHOTS = Path(__file__).parent.parent / ".screenshots" / "console"


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[str, dict[str, str]]]:
    """`qubax serve` with the console on, and no upstream: the playground runs under test keys."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("QUBAX_")}
    env |= {"QUBAX_DATA_DIR": str(tmp_path / "data"), "QUBAX_ADMIN_TOKEN": TOKEN}
    subprocess.run(
        [str(QUBAX), "keys", "create", "--test", "--name", "playground"], env=env, check=True, capture_output=True
    )
    port = free_port()
    log = (tmp_path / "serve.log").open("wb")
    process = subprocess.Popen([str(QUBAX), "serve", "--port", str(port)], env=env, stdout=log, stderr=log)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_health(url, process, 30)
        yield url, env
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(10)
        log.close()


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt-get install chromium; scripts/test does)")
def test_an_operator_s_round_in_the_console(server: tuple[str, dict[str, str]], tmp_path: Path) -> None:
    from playwright.sync_api import expect, sync_playwright

    url, _ = server
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900}, accept_downloads=True)
            errors: list[str] = []  # what the page's policy blocked, and script failures
            page.on("console", lambda message: errors.append(message.text) if "Refused" in message.text else None)
            page.on("pageerror", lambda error: errors.append(str(error)))

            page.goto(f"{url}/console")
            expect(page).to_have_url(f"{url}/console/sign-in")
            page.screenshot(path=SCREENSHOTS / "sign-in.png", full_page=True)
            page.get_by_label("Admin token").fill("not the token")
            page.get_by_role("button", name="Sign in").click()
            expect(page.get_by_role("alert")).to_have_text("Sign-in failed.")
            page.get_by_label("Admin token").fill(TOKEN)
            page.get_by_role("button", name="Sign in").click()
            expect(page).to_have_url(f"{url}/console")
            cookie = next(c for c in page.context.cookies() if c["name"] == "qubax_console")
            assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"

            # A key: made (its secret shown once), given a budget, revoked.
            page.get_by_role("link", name="Keys", exact=True).click()
            page.get_by_label("Name").fill("mobile app")
            page.get_by_label("Live").check()
            page.get_by_role("button", name="Create key").click()
            secret = page.locator("#new-secret").inner_text()
            assert secret.startswith("qbx_live_")
            page.screenshot(path=SCREENSHOTS / "key-created.png", full_page=True)
            page.get_by_role("link", name="Keys", exact=True).click()
            assert secret not in page.content()
            page.get_by_role("link", name="mobile app").click()
            page.get_by_label("Monthly budget (USD)").fill("25")
            page.get_by_role("button", name="Save limits").click()
            expect(page.get_by_label("Monthly budget (USD)")).to_have_value("25.00")
            page.screenshot(path=SCREENSHOTS / "key.png", full_page=True)
            page.get_by_text("Revoke this key…").click()
            page.get_by_role("button", name="Revoke mobile app").click()
            expect(page.locator("tr", has_text="mobile app")).to_contain_text("revoked")
            expect(page.locator("tr", has_text="mobile app")).to_contain_text("$0.00 of $25.00")
            page.screenshot(path=SCREENSHOTS / "keys.png", full_page=True)
            assert httpx.get(f"{url}/v1/models", headers={"authorization": f"Bearer {secret}"}).status_code == 401

            # The playground, under the test key it offers first.
            page.get_by_role("link", name="Playground", exact=True).click()
            expect(page.get_by_label("Key", exact=True)).to_contain_text("playground (test")
            page.get_by_label("Model", exact=True).select_option("flux-1.1-pro")
            page.get_by_label("Prompt", exact=True).fill("a lighthouse at dusk")
            page.get_by_label("Images", exact=True).fill("2")
            page.get_by_role("button", name="Generate").click()
            images = page.locator("#live .images img")  # shown by the page's script as they arrive
            expect(images).to_have_count(2)
            expect(page.locator("#live [data-summary]")).to_contain_text("Made by test in")
            assert all(image.evaluate("i => i.complete && i.naturalWidth > 0") for image in images.all())
            page.screenshot(path=SCREENSHOTS / "playground.png", full_page=True)

            # The overview's chart has today's images.
            page.get_by_role("link", name="Overview", exact=True).click()
            today = datetime.now(UTC).strftime("%b %d")
            expect(page.locator("#images-chart rect title")).to_have_text([f"{today}, flux-1.1-pro: 2"])
            expect(page.locator('[data-figure="today-images"]')).to_have_text("2")
            page.screenshot(path=SCREENSHOTS / "overview.png", full_page=True)
            page.set_viewport_size({"width": 390, "height": 844})  # a phone
            page.screenshot(path=SCREENSHOTS / "overview-phone.png", full_page=True)
            assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth + 1")
            page.set_viewport_size({"width": 1280, "height": 900})

            # Usage: the CSV matches the admin API.
            page.get_by_role("link", name="Usage", exact=True).click()
            page.screenshot(path=SCREENSHOTS / "usage.png", full_page=True)
            with page.expect_download() as download:
                page.get_by_role("link", name="Download CSV").click()
            saved = tmp_path / "usage.csv"
            download.value.save_as(saved)
            table = list(csv.DictReader(saved.open()))
            admin = httpx.get(
                f"{url}/admin/usage", params={"group_by": "day,key,model"}, headers={"authorization": f"Bearer {TOKEN}"}
            ).json()["data"]
            assert [(r["key_id"], r["model"], int(r["images"])) for r in table] == [
                (r["key_id"], r["model"], r["images"]) for r in admin
            ]
            assert [int(r["images"]) for r in table] == [2]

            page.get_by_role("link", name="Jobs", exact=True).click()
            page.screenshot(path=SCREENSHOTS / "jobs.png", full_page=True)

            page.get_by_role("button", name="Sign out").click()
            expect(page).to_have_url(f"{url}/console/sign-in")
            page.goto(f"{url}/console/keys")
            expect(page).to_have_url(f"{url}/console/sign-in")
            assert errors == []  # nothing the policy blocked, no script failed
        finally:
            browser.close()
