"""The page at / of `seglab serve`, used as a person would, in headless Chromium.

Skipped when Playwright or Chromium is missing, except under CI (the CI variable set), where
it must run. A screenshot goes to $SEGLAB_TEST_ARTIFACTS (default: test-artifacts/).
"""

from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

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
CAMVID_VAL = Path(__file__).parents[1] / ".." / "shared" / "data" / "camvid" / "val"


@pytest.fixture
def browser_api():
    """Playwright's sync API, or a skip (a failure under CI, which must run this test)."""
    try:
        from playwright import sync_api
    except ImportError:
        sync_api = None
    missing = "playwright is not installed" if sync_api is None else None
    if missing is None and not Path(CHROMIUM).is_file():
        missing = f"chromium is not at {CHROMIUM}"
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"{missing}; CI must run the browser test")
        pytest.skip(missing)
    return sync_api


@pytest.fixture
def images(tmp_path) -> list[Path]:
    """Two CamVid val images when the shared data is here, else two generated street-like ones."""
    files = sorted(CAMVID_VAL.glob("*.png"))[:2]
    if len(files) == 2:
        return files
    yy, xx = np.mgrid[0:360, 0:480]
    made = []
    for i in range(2):
        path = tmp_path / f"image{i}.png"
        array = np.stack([xx * 255 // 480, yy * 255 // 360, (xx + i * 90) % 256], -1).astype(np.uint8)
        Image.fromarray(array).save(path)
        made.append(path)
    return made


@pytest.fixture
def server_url(make_checkpoint, tmp_path):
    """A real `seglab serve` process until the test ends. A random FCN (img_size 128, quick too),
    because random LR-ASPPs paint the whole image one class and the overlay should show several."""
    port = free_port()
    log = tmp_path / "serve.log"
    weights = make_checkpoint("fcn", img_size=128, seed=1)
    with log.open("w") as out:
        command = [sys.executable, "-m", "seglab", "serve", "--weights", str(weights), "--port", str(port)]
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_ready(url, process, log)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=15)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_ready(url: str, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"seglab serve exited with {process.returncode}:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5) as reply:
                if json.load(reply)["model_loaded"]:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    pytest.fail(f"seglab serve did not become ready:\n{log.read_text()}")


CANVAS_SUMMARY = """() => {
    const canvas = document.getElementById("overlay");
    const data = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
    const colours = new Set();
    let samples = 0, opaque = 0, sum = 0;
    for (let i = 0; i < data.length; i += 4 * 97) {
        samples++;
        colours.add((data[i] << 16) | (data[i + 1] << 8) | data[i + 2]);
        if (data[i + 3] > 0) opaque++;
        sum += data[i] + 3 * data[i + 1] + 7 * data[i + 2];
    }
    return {width: canvas.width, height: canvas.height, colours: colours.size, opaque, samples, sum};
}"""

DROP_FILE = """async ([name, b64]) => {
    const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
    const transfer = new DataTransfer();
    transfer.items.add(new File([bytes], name, {type: "image/png"}));
    const drop = new DragEvent("drop", {dataTransfer: transfer, bubbles: true, cancelable: true});
    document.getElementById("drop").dispatchEvent(drop);
}"""


def areas(page) -> list[tuple[str, float]]:
    rows = page.locator("#areas tbody tr")
    return [(rows.nth(i).locator("td").first.inner_text(), float(rows.nth(i).locator("td.pct").inner_text()))
            for i in range(rows.count())]  # fmt: skip


def test_upload_drop_and_opacity_in_the_page(browser_api, server_url, images):
    artifacts = Path(os.environ.get("SEGLAB_TEST_ARTIFACTS", "test-artifacts"))
    artifacts.mkdir(parents=True, exist_ok=True)
    with browser_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1200, "height": 820})
        outside = []  # the page must never reach beyond the server
        page.on("request", lambda r: outside.append(r.url) if not r.url.startswith(server_url) else None)
        page.goto(server_url + "/")
        browser_api.expect(page.locator("#legend li")).to_have_count(11)

        # choose a file: the overlay is drawn, every class gets an area row, the areas sum to 100 %
        page.set_input_files("#file", str(images[0]))
        page.wait_for_selector("body[data-state=done]")
        drawn = page.evaluate(CANVAS_SUMMARY)
        width, height = Image.open(images[0]).size
        assert (drawn["width"], drawn["height"]) == (width, height)
        assert drawn["opaque"] == drawn["samples"] and drawn["colours"] > 50  # the photo shows through
        rows = areas(page)
        assert len(rows) == 11 and sum(pct for _, pct in rows) == pytest.approx(100, abs=0.6)
        assert [pct for _, pct in rows] == sorted((pct for _, pct in rows), reverse=True)
        page.screenshot(path=str(artifacts / "serve_page.png"), full_page=True)

        # the opacity slider redraws the same answer
        page.locator("#opacity").fill("100")
        opaque_mask = page.evaluate(CANVAS_SUMMARY)
        assert opaque_mask["sum"] != drawn["sum"] and 1 < opaque_mask["colours"] <= 11  # only class colours
        assert page.locator("#opacity-value").inner_text() == "100%"

        # drag and drop another image
        page.evaluate("document.body.dataset.state = ''")
        page.evaluate(DROP_FILE, [images[1].name, base64.b64encode(images[1].read_bytes()).decode()])
        page.wait_for_selector("body[data-state=done]")
        assert images[1].name in page.locator("#status").inner_text()

        # the server's refusal is shown to the user as text
        page.set_input_files("#file", files=[{"name": "notes.txt", "mimeType": "text/plain", "buffer": b"hello"}])
        page.wait_for_selector("body[data-state=error]")
        assert "415" in page.locator("#error").inner_text() and page.locator("#error").is_visible()
        browser.close()
    assert outside == []
