"""The /ui page in a real headless Chromium against a real `bentoml serve`."""

from __future__ import annotations

import io
import json
import os
import shutil
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import CLASS_NAMES
from PIL import Image

from lcnet_runner.artifact import load_folder, write_labels_file
from lcnet_runner.testing import Server
from train.export import revise, save_to_store

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
if not CHROMIUM and not os.environ.get("CI"):  # CI installs it: there a missing browser fails
    pytest.skip("needs Debian's chromium (apt-get install chromium)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api")
# No sandbox (root in CI), no calls home: this machine has no network.
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run"]  # fmt: skip
TOKEN = "ui-token"
ALL_ANSWERED = "document.querySelector('.card') && !document.querySelector('.pending')"


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser):
    """A page of its own per test: its scripts, routes and viewport leak into no other."""
    page = browser.new_page(viewport={"width": 1100, "height": 760})
    yield page
    page.close()


@pytest.fixture(scope="module")
def own_server(trained: dict):
    """One worker that holds at most 8 images (then 503) and reloads on request, serving the
    trained model stored under a name of its own; and the version it started on."""
    first = save_to_store(trained["export_dir"], "uipage", load_folder(trained["export_dir"]).info)
    env = {"LCNET_MODEL": "uipage", "LCNET_WORKERS": "1", "LCNET_MAX_QUEUED_IMAGES": "8",
           "LCNET_RELOAD": "request", "LCNET_ADMIN_TOKEN": TOKEN}  # fmt: skip
    server = Server(".", env).wait_ready()
    yield server, first
    server.stop()


def images(trained: dict, count: int) -> list[str]:
    return [str(trained["dataset"] / "green" / f"{i}.jpg") for i in range(count)]


def test_upload_shows_the_api_answer_and_readable_errors(
    server: Server, trained: dict, page, tmp_path: Path
) -> None:
    image = trained["dataset"] / "green" / "1.jpg"
    not_image = tmp_path / "notes.jpg"
    not_image.write_text("this is not an image")
    expected = httpx.post(f"{server.url}/classify", files={"image": image.open("rb")}).json()
    failed = []  # what the console says of failed loads, the browser's own (favicon) included
    page.on("console", lambda m: m.type == "error" and failed.append(m.text.split(" ")[-3]))

    page.goto(f"{server.url}/ui")
    page.wait_for_selector("#model dt:text('architecture')")
    header = page.inner_text("#model")
    assert trained["tag"].split(":")[1] in header and "PPLCNet_x0_25" in header

    page.set_input_files("#files", [str(image), str(not_image)])
    page.wait_for_function(
        "document.querySelectorAll('.card').length === 2 && !document.querySelector('.pending')"
    )
    # in the order chosen (they were shown last one first)
    assert page.locator(".card .name").all_inner_texts() == ["1.jpg", "notes.jpg"]
    good = page.locator(".card:not(.error)")
    assert good.locator(".category").first.inner_text() == expected[0]["category"]
    assert good.locator(".latency").inner_text().endswith(" ms")
    bad = page.locator(".card.error")
    assert "notes.jpg" in bad.inner_text()
    assert "not an image format" in bad.locator(".message").inner_text()
    # The not-image alone was refused: no /favicon.ico 404 in the server's log at each visit.
    assert failed == ["400"]
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


def test_previews_let_go_of_their_files(server: Server, trained: dict, page, tmp_path) -> None:
    """Each preview's object URL is revoked once shown (or found not to be an image): a page
    used for hundreds of images held every file in memory until it closed, clear or not."""
    not_image = tmp_path / "notes.jpg"
    not_image.write_text("this is not an image")
    page.add_init_script("""
        window.made = [];
        const create = URL.createObjectURL;
        URL.createObjectURL = (blob) => { const url = create(blob); made.push(url); return url; };
    """)
    page.goto(f"{server.url}/ui")
    page.set_input_files("#files", [*images(trained, 3), str(not_image)])
    page.wait_for_function(ALL_ANSWERED)
    alive = page.evaluate("""Promise.all(made.map(
        (url) => fetch(url).then(() => url, () => null))).then((urls) => urls.filter(Boolean))""")
    assert page.evaluate("made.length") == 4 and alive == []
    assert page.locator(".card img").count() == 3  # the pictures stay on screen


def test_uploads_go_four_at_a_time_and_clear_stops_the_rest(
    server: Server, trained: dict, page
) -> None:
    """Dropping many images sends 4 at a time, not all at once (past the server's 503 bound,
    with a latency that counted the wait for a connection); "clear results" stops those not
    yet sent."""
    in_flight, most, sent = set(), [0], []

    def started(request) -> None:
        if request.url.endswith("/classify"):
            sent.append(request)
            in_flight.add(request)
            most[0] = max(most[0], len(in_flight))

    page.on("request", started)
    page.on("requestfinished", lambda request: in_flight.discard(request))
    page.on("requestfailed", lambda request: in_flight.discard(request))
    page.goto(f"{server.url}/ui")
    page.set_input_files("#files", images(trained, 16))
    page.wait_for_function(ALL_ANSWERED)
    assert page.locator(".card:not(.error)").count() == 16 and most[0] == 4
    assert page.inner_text("#status") == "16 images: 16 classified"

    # 40 files chosen and "clear results" clicked in one go (a click after set_input_files
    # came after the fast tiny model had answered most of them).
    sent.clear()
    jpeg = list(Path(images(trained, 1)[0]).read_bytes())
    page.evaluate(
        """(bytes) => {
            const chosen = new DataTransfer();
            const jpeg = new Uint8Array(bytes);
            for (let i = 0; i < 40; i++) chosen.items.add(new File([jpeg], `${i}.jpg`));
            const input = document.getElementById("files");
            input.files = chosen.files;
            input.dispatchEvent(new Event("change"));
            document.getElementById("clear").click();
        }""",
        jpeg,
    )
    page.wait_for_timeout(2000)
    assert len(sent) <= 4 and page.locator(".card").count() == 0
    assert page.inner_text("#status") == ""


def busy(server: Server, seconds: float) -> threading.Thread:
    """A thread that keeps the server's one worker at its bound of 8 images for ``seconds``:
    /classify_batch with 8 large PNGs, back to back, on one connection. Each decodes in ~60 ms,
    so a request holds the worker's 8 for ~0.5 s and the moment between two is rarely met (with
    photo-sized JPEGs the page's requests slipped in between, on a busy machine). Returns once
    the worker refuses a request as busy."""
    ramp = np.linspace(0, 255, 2000, dtype=np.uint8)
    pixels = np.stack([np.tile(ramp, (2000, 1)), np.tile(ramp[:, None], (1, 2000)),
                       np.full((2000, 2000), 90, np.uint8)], axis=-1)  # fmt: skip
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    files = [("images", (f"{i}.png", buffer.getvalue(), "image/png")) for i in range(8)]

    def load() -> None:
        with httpx.Client(base_url=server.url, timeout=30) as client:
            until = time.monotonic() + seconds
            while time.monotonic() < until:
                client.post("/classify_batch", files=files)

    thread = threading.Thread(target=load, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    probe = {"image": ("probe.png", buffer.getvalue(), "image/png")}
    while httpx.post(f"{server.url}/classify", files=probe, timeout=30).status_code != 503:
        assert time.monotonic() < deadline, "the worker never became busy"
    return thread


def test_a_busy_server_is_asked_again_after_retry_after(own_server, trained: dict, page) -> None:
    """A 503 (the worker holds LCNET_MAX_QUEUED_IMAGES) is sent again after its Retry-After,
    a few times, rather than shown as the image's failure."""
    server, _ = own_server
    statuses = []
    page.on("response", lambda r: r.url.endswith("/classify") and statuses.append(r.status))
    page.goto(f"{server.url}/ui")
    page.wait_for_selector("#model dt:text('architecture')")
    load = busy(server, 2.0)
    page.set_input_files("#files", images(trained, 4))
    page.wait_for_function(ALL_ANSWERED, timeout=30_000)
    load.join(timeout=30)
    assert 503 in statuses, statuses  # or this test tested nothing
    assert page.locator(".card.error").count() == 0
    assert page.inner_text("#status") == "4 images: 4 classified"


def test_each_card_names_its_version_and_the_header_follows_a_reload(
    own_server, trained: dict, page
) -> None:
    """Every answer carries X-Model-Version: each card shows it, and the header, which showed
    the version the page was opened on for as long as it stayed open, follows a reload."""
    server, _ = own_server
    page.goto(f"{server.url}/ui")
    page.wait_for_selector("#model dt:text('architecture')")
    before = httpx.get(f"{server.url}/model").json()["tag"]
    page.set_input_files("#files", images(trained, 1))
    page.wait_for_function(ALL_ANSWERED)
    assert page.inner_text(".card .version") == before.split(":")[1]

    newer = revise(before, lambda folder: write_labels_file(
        folder / "labels.txt", [f"new {name}" for name in CLASS_NAMES]))  # fmt: skip
    reload = httpx.post(f"{server.url}/admin/reload", json={"tag": newer},
                        headers={"Authorization": f"Bearer {TOKEN}"})  # fmt: skip
    assert reload.status_code == 202, reload.text
    deadline = time.monotonic() + 60
    while httpx.get(f"{server.url}/model").json()["tag"] != newer:
        assert time.monotonic() < deadline, "the server did not swap in 60 s"
        time.sleep(0.2)

    page.set_input_files("#files", images(trained, 1))
    page.wait_for_function("document.querySelectorAll('.card').length === 2 && " + ALL_ANSWERED)
    assert page.locator(".card .version").all_inner_texts() == [
        newer.split(":")[1],
        before.split(":")[1],
    ]
    assert page.locator(".card .category").first.inner_text().startswith("new ")
    page.wait_for_function(
        f"document.getElementById('model').innerText.includes('{newer.split(':')[1]}')"
    )


def test_the_header_fills_in_once_the_server_answers(server: Server, trained: dict, page) -> None:
    """Opened while /model failed (the server restarting), the header said "unavailable" until
    the page was loaded again; the first answer with a version now fills it in."""
    page.route("**/model", lambda route: route.fulfill(status=503, body="starting"))
    page.goto(f"{server.url}/ui")
    page.wait_for_selector("#model dd:text('unavailable (HTTP 503)')")
    page.unroute("**/model")
    page.set_input_files("#files", images(trained, 1))
    page.wait_for_selector("#model dt:text('architecture')")
    assert trained["tag"].split(":")[1] in page.inner_text("#model")


def contrast(*colours: str) -> float:
    """WCAG's contrast ratio of two CSS ``rgb(r, g, b)`` colours."""

    def luminance(colour: str) -> float:
        channels = [int(c) / 255 for c in colour[colour.index("(") + 1 : -1].split(",")[:3]]
        linear = [c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4 for c in channels]
        return 0.2126 * linear[0] + 0.7152 * linear[1] + 0.0722 * linear[2]

    dark, light = sorted(luminance(c) + 0.05 for c in colours)
    return light / dark


def test_the_keyboard_reaches_the_file_picker(server: Server, trained: dict, page) -> None:
    """The file input (display: none) could not be reached by Tab: without a mouse there was no
    way to choose a file. Now the first Tab reaches it, the drop zone shows the focus, Enter
    opens the picker; results are announced as one status line, not card by card."""
    # Listened for first: playwright asks Chromium to hand it file choosers without awaiting the
    # answer, and under load an Enter that came first opened (and lost) the native dialog.
    choosers = []

    def chosen(chooser) -> None:
        choosers.append(chooser)

    page.on("filechooser", chosen)
    page.goto(f"{server.url}/ui")
    page.wait_for_selector("#model dt:text('architecture')")
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.id") == "files"
    outline = page.eval_on_selector("#drop", "e => getComputedStyle(e).outlineStyle")
    assert outline != "none"
    # WCAG 1.4.11: a control's boundary at 3:1 against its background (it was 2.5:1)
    border = page.eval_on_selector("#drop", "e => getComputedStyle(e).borderTopColor")
    assert contrast(border, "rgb(255, 255, 255)") >= 3
    page.keyboard.press("Enter")
    for _ in range(100):
        if choosers:
            break
        page.wait_for_timeout(100)
    page.remove_listener("filechooser", chosen)
    assert len(choosers) == 1, "Enter on the focused picker opened no file chooser"
    choosers[0].set_files(images(trained, 2))
    page.wait_for_function(ALL_ANSWERED)
    assert page.get_by_role("status").inner_text() == "2 images: 2 classified"
    assert page.get_attribute("#results", "aria-live") is None
    assert page.get_attribute(".card .bar", "aria-hidden") == "true"  # its score is text


def test_a_phone_sized_screen_and_a_long_file_name(
    server: Server, trained: dict, page, tmp_path: Path
) -> None:
    """At 375 px nothing scrolls sideways, each fact of the header keeps its name and value on
    one line, and a file name cut short on its card can be read whole."""
    long_name = tmp_path / ("a-photo-with-a-very-long-name-" * 6 + ".jpg")
    shutil.copy(images(trained, 1)[0], long_name)
    page.set_viewport_size({"width": 375, "height": 740})
    page.goto(f"{server.url}/ui")
    page.wait_for_selector("#model dt:text('architecture')")
    page.set_input_files("#files", [str(long_name)])
    page.wait_for_function(ALL_ANSWERED)
    assert page.evaluate("document.documentElement.scrollWidth") <= 375
    split = page.evaluate("""[...document.querySelectorAll('#model dt')].filter(
        (dt) => dt.getBoundingClientRect().top !== dt.nextElementSibling.getBoundingClientRect().top
    ).map((dt) => dt.textContent)""")
    assert split == []
    assert page.get_attribute(".card .name", "title") == long_name.name


def drop_paths(page, selector: str, paths: list[Path]) -> None:
    """Drop files or folders from disk on ``selector`` as a user's drag does (Chromium's own
    drag events: a folder arrives as the unreadable File a real drop gives)."""
    box = page.locator(selector).bounding_box()
    x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    data = {"items": [], "files": [str(path) for path in paths], "dragOperationsMask": 1}
    cdp = page.context.new_cdp_session(page)
    for kind in ("dragEnter", "dragOver", "drop"):
        cdp.send("Input.dispatchDragEvent", {"type": kind, "x": x, "y": y, "data": data})
    cdp.detach()


def test_a_file_that_cannot_be_read_is_not_blamed_on_the_server(
    server: Server, trained: dict, page, tmp_path: Path
) -> None:
    """A dropped folder, or a file deleted after it was chosen and before it was sent: fetch
    fails as when the server is gone, and the card said "the server could not be reached"."""
    folder = tmp_path / "holiday photos"
    folder.mkdir()
    shutil.copy(images(trained, 1)[0], folder / "1.jpg")
    page.goto(f"{server.url}/ui")
    page.wait_for_selector("#model dt:text('architecture')")
    drop_paths(page, "#drop", [folder])
    page.wait_for_function(ALL_ANSWERED)
    message = page.locator(".card.error .message").inner_text()
    assert message.startswith("Could not read holiday photos (NotFoundError): a folder"), message

    # Deleted while its card waits to send it again: the first try meets a busy server (503,
    # a network edge played here), the retry's body is a file that is no longer there.
    doomed = tmp_path / "deleted.jpg"
    shutil.copy(images(trained, 1)[0], doomed)
    busy_once = []

    def first_busy(route) -> None:
        if busy_once:
            return route.continue_()
        busy_once.append(route.request.url)
        route.fulfill(status=503, headers={"Retry-After": "1"}, json={"error": "busy"})

    page.route("**/classify", first_busy)
    page.set_input_files("#files", [str(doomed)])
    page.wait_for_selector(".card .latency:text-matches('server busy')")
    doomed.unlink()
    page.wait_for_function(ALL_ANSWERED)
    cards = page.locator(".card.error .message").all_inner_texts()
    assert cards[0].startswith("Could not read deleted.jpg (NotFoundError): "), cards
    assert not any("server" in card for card in cards), cards
    assert page.inner_text("#status") == "2 images: 0 classified, 2 not classified"
