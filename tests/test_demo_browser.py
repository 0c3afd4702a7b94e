"""The demo as a running server: what it serves over HTTP, and an end-to-end run in headless Chromium.

The browser test drives Debian's chromium (``apt-get install chromium``) through Playwright's Python package
and is skipped when either is absent. Set ``GCLIP_DEMO_SCREENSHOT=docs/demo.png`` to keep its screenshot.
"""

from __future__ import annotations

import os
import shutil
import socket
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gclip.demo import DemoService, DemoSettings, Limits
from gclip.demo.service import EXAMPLES_DIR

pytest.importorskip("gradio")
httpx = pytest.importorskip("httpx")
ui = pytest.importorskip("gclip.demo.ui")

pytestmark = pytest.mark.browser

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
UPLOAD_LIMIT = 300_000


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny_model, tiny_checkpoint, tmp_path_factory):
    old = {k: os.environ.get(k) for k in ("GRADIO_TEMP_DIR", "GRADIO_EXAMPLES_CACHE")}
    service = DemoService(
        tiny_model,
        Limits(max_upload_bytes=UPLOAD_LIMIT),
        workdir=tmp_path_factory.mktemp("demo"),
        defaults=DemoSettings(short_side=224, crop=224),
    )
    demo = ui.launch(service, port=free_port(), block=False, quiet=True)
    yield demo.local_url.rstrip("/"), service, tiny_checkpoint
    demo.close()
    for key, value in old.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def test_only_the_apps_own_files_are_served(server):
    base, service, checkpoint = server
    outcome = service.segment(EXAMPLES_DIR / "horse.jpg", "horse, wall", "gclip", DemoSettings(64, 64))
    served = [outcome.label_png, outcome.overlay_png, EXAMPLES_DIR / "horse.jpg"]
    for path in served:
        r = httpx.get(f"{base}/gradio_api/file={path}")
        assert r.status_code == 200 and r.content == Path(path).read_bytes()
    refused = [
        "/etc/passwd",
        "%2Fetc%2Fpasswd",
        "../../../../../../etc/passwd",
        f"{service.downloads}/../../../../../../etc/passwd",
        str(checkpoint),
        ui.__file__,
        "http://127.0.0.1:1/anything",
    ]
    for target in refused:
        for route in ("/gradio_api/file=", "/file=", "/gradio_api/file/"):
            r = httpx.get(f"{base}{route}{target}")
            assert r.status_code in (403, 404), (route, target, r.status_code)
            assert b"root:" not in r.content


def test_uploads_above_the_limit_are_refused(server):
    base, service, _ = server
    big = httpx.post(f"{base}/gradio_api/upload", files={"files": ("big.jpg", b"0" * (UPLOAD_LIMIT + 1))})
    assert big.status_code == 413 and "maximum allowed size" in big.text
    small = httpx.post(f"{base}/gradio_api/upload", files={"files": ("small.jpg", b"0" * 1000)})
    assert small.status_code == 200
    assert Path(small.json()[0]).resolve().is_relative_to(service.workdir.resolve())


def test_browser_upload_segment_and_screenshot(server, tmp_path):
    if not Path(CHROMIUM).is_file() or shutil.which(CHROMIUM) is None:
        pytest.skip(f"{CHROMIUM} is not installed (apt-get install chromium)")
    playwright = pytest.importorskip("playwright.sync_api")
    base, _, _ = server
    shot = Path(os.environ.get("GCLIP_DEMO_SCREENSHOT") or tmp_path / "demo.png")
    start = time.perf_counter()
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch_persistent_context(
            str(tmp_path / "profile"),
            executable_path=CHROMIUM,
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": 1280, "height": 860},
        )
        try:
            page = browser.new_page()
            page.set_default_timeout(45_000)
            page.goto(base)
            page.locator("input[type=file]").first.set_input_files(str(EXAMPLES_DIR / "street_bus.jpg"))
            page.locator("#vocabulary textarea, #vocabulary input").first.fill("bus, road, building, tree, sky")
            page.locator("img").first.wait_for()  # the uploaded photo's preview
            page.locator("#segment").click()
            page.locator("#comparison .legend-item").first.wait_for()
            page.locator("#result .legend-item").first.wait_for()
            status = page.locator("#status").inner_text()
            legend = page.locator("#result .legend-item").all_inner_texts()
            page.wait_for_timeout(300)  # let the overlay images finish painting
            shot.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    assert "gclip" in status and "clearclip" in status and "512x512 px" in status
    names = {item.rsplit(" (", 1)[0] for item in legend}
    assert names and names <= {"bus", "road", "building", "tree", "sky"}
    with Image.open(shot) as img:
        assert img.width == 1280 and np.asarray(img.convert("L")).std() > 10
    assert time.perf_counter() - start < 60
