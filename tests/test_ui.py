"""The /ui page in a real headless Chromium against a real `bentoml serve`."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import httpx
import pytest

from lcnet_runner.testing import Server

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
if not CHROMIUM and not os.environ.get("CI"):  # CI installs it: there a missing browser fails
    pytest.skip("needs Debian's chromium (apt-get install chromium)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api")
# No sandbox (root in CI), no calls home: this machine has no network.
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run"]  # fmt: skip


@pytest.fixture(scope="module")
def page():
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        yield browser.new_page(viewport={"width": 1100, "height": 760})
        browser.close()


def test_upload_shows_the_api_answer_and_readable_errors(
    server: Server, trained: dict, page, tmp_path: Path
) -> None:
    image = trained["dataset"] / "green" / "1.jpg"
    not_image = tmp_path / "notes.jpg"
    not_image.write_text("this is not an image")
    expected = httpx.post(f"{server.url}/classify", files={"image": image.open("rb")}).json()

    page.goto(f"{server.url}/ui")
    page.wait_for_selector("#model dt:text('architecture')")
    header = page.inner_text("#model")
    assert trained["tag"].split(":")[1] in header and "PPLCNet_x0_25" in header

    page.set_input_files("#files", [str(image), str(not_image)])
    page.wait_for_function(
        "document.querySelectorAll('.card').length === 2 && !document.querySelector('.pending')"
    )
    good = page.locator(".card:not(.error)")
    assert good.locator(".category").first.inner_text() == expected[0]["category"]
    assert good.locator(".latency").inner_text().endswith(" ms")
    bad = page.locator(".card.error")
    assert "notes.jpg" in bad.inner_text()
    assert "not an image format" in bad.locator(".message").inner_text()
    # The screenshot is kept with the test's files (CI artifact); docs/ui.png is one of them.
    page.screenshot(path=str(tmp_path / "ui.png"), full_page=True)
    assert (tmp_path / "ui.png").stat().st_size > 10_000


def test_swagger_try_it_out_uploads_a_file(server: Server, trained: dict, page) -> None:
    """BentoML's Swagger UI at / (fed by /docs.json): "Try it out" on /classify with a file."""
    image = trained["dataset"] / "green" / "1.jpg"
    expected = httpx.post(f"{server.url}/classify", files={"image": image.open("rb")}).json()

    page.goto(f"{server.url}/")
    operation = page.locator(".opblock-post", has=page.locator('[data-path="/classify"]')).first
    operation.locator(".opblock-summary").click()
    operation.locator(".try-out__btn").click()
    operation.locator("input[type=file]").set_input_files(str(image))
    operation.locator(".execute").click()
    response = operation.locator(".live-responses-table .response")
    response.wait_for()
    assert response.locator(".response-col_status").first.inner_text().strip() == "200"
    body = response.locator(".response-col_description pre").first.inner_text()
    assert json.loads(body) == expected
