"""`seglab serve` for detectors: a real server process on 127.0.0.1 serving a Mask R-CNN (and
one a Faster R-CNN), spoken to over HTTP and through its page in headless Chromium.

The detectors have random weights, built through seglab's own checkpoint API in seconds: with
11 classes their scores lie around 0.3-0.5, so every facade image gets dozens of objects with
masks of every shape, which is what the encodings and the drawing need. The module's server has
small limits (1 MB uploads, 1024-pixel sides, a 400 MB memory budget) so that each refusal can be
provoked, and a 200 ms batch window so that concurrent requests share forward passes.
"""

from __future__ import annotations

import base64
import io
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import seglab
from test_serve import Server, assert_refused, multipart, png_bytes, start_server, stop_server
from test_serve_browser import CHROMIUM, CHROMIUM_ARGS, browser_api  # noqa: F401 (browser_api: a fixture)

FACADE = Path(__file__).parents[1] / ".." / "shared" / "data" / "facade_coco" / "train"
CLASSES = [
    "background", "balcony-fence", "car", "facade", "fence", "non-building-infrastructure", "shop", "street",
    "traffic-infrastructure", "vegetation", "window",
]  # fmt: skip
COLORS = [
    (0, 0, 0), (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
    (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212),
]  # fmt: skip


def random_detector(folder: Path, task: str) -> Path:
    """A random-weight Mask R-CNN (``instance``) or Faster R-CNN (``detect``) on EfficientNet-Lite0 at 128 px."""
    import torch

    from seglab.engine.checkpoint import ModelCard, make_payload, save_checkpoint
    from seglab.instance.models import TASK_DETECTORS

    torch.manual_seed(0)
    card = ModelCard(
        arch=TASK_DETECTORS[task],
        encoder="efficientnet_lite0",
        num_classes=len(CLASSES),
        in_channels=3,
        classes=CLASSES,
        colors=COLORS,
        ignore_index=255,
        mean=[0.485, 0.456, 0.406],
        std=[0.229, 0.224, 0.225],
        img_size=128,
        task=task,
    )
    path = folder / f"{card.arch}.pt"
    save_checkpoint(path, make_payload(card.build().eval(), card, config={}, metrics=None))
    return path


def photo_file(folder: Path) -> Path:
    """A facade image (512x512 JPEG) when the shared data is here, else a generated 512x384 PNG."""
    files = sorted(FACADE.glob("*.jpg"))
    if files:
        return files[0]
    yy, xx = np.mgrid[0:384, 0:512]
    path = folder / "generated.png"
    Image.fromarray(np.stack([xx // 2, yy * 255 // 384, (xx * yy) % 256], -1).astype(np.uint8)).save(path)
    return path


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    return random_detector(tmp_path_factory.mktemp("weights"), "instance")


@pytest.fixture(scope="module")
def server(weights, tmp_path_factory) -> Iterator[Server]:
    flags = ["--batch-wait-ms", "200", "--max-upload-mb", "1", "--max-side", "1024", "--memory-budget-mb", "400"]
    running = start_server(weights, tmp_path_factory.mktemp("logs") / "server.log", *flags)
    yield running
    stop_server(running)


@pytest.fixture(scope="module")
def photo_path(tmp_path_factory) -> Path:
    return photo_file(tmp_path_factory.mktemp("photo"))


@pytest.fixture(scope="module")
def photo(photo_path) -> np.ndarray:
    """A 320x240 crop: not square, so a mask's rows and columns cannot be swapped unseen."""
    return np.asarray(Image.open(photo_path).convert("RGB"))[40:280, 100:420].copy()


def decode_mask(rle: dict) -> np.ndarray:
    from pycocotools import mask as mask_utils

    return mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode()}).astype(bool)


def assert_objects_fit(answer: dict, width: int, height: int, conf: float) -> None:
    """Every object scores at least ``conf`` (highest first), its box lies in the image, and its
    mask decodes to the image's size and lies inside its box (torchvision pastes a mask into its
    box grown by 2/28, so a transposed or shifted mask would fall outside)."""
    objects = answer["instances"]
    assert (answer["width"], answer["height"]) == (width, height)
    scores = [o["score"] for o in objects]
    assert scores == sorted(scores, reverse=True) and min(scores) >= conf
    for o in objects:
        x1, y1, x2, y2 = o["box"]
        assert 0 <= x1 <= x2 <= width and 0 <= y1 <= y2 <= height, o["box"]
        assert o["class"] == CLASSES[o["label"]] and 1 <= o["label"] < len(CLASSES)
        mask = decode_mask(o["mask"])
        assert mask.shape == (height, width)
        ys, xs = np.nonzero(mask)
        if len(xs):
            mx, my = (x2 - x1) * 0.04 + 1.5, (y2 - y1) * 0.04 + 1.5
            assert x1 - mx <= xs.min() and xs.max() <= x2 + mx and y1 - my <= ys.min() and ys.max() <= y2 + my
    assert any(decode_mask(o["mask"]).any() for o in objects)


# ---------------------------------------------------------------------------------------------- answers


def test_model_describes_a_detector(server):
    model = server.request("GET", "/model").json()
    assert (model["task"], model["arch"]) == ("instance", "maskrcnn")
    assert [c["name"] for c in model["classes"]] == CLASSES
    assert [tuple(c["color"]) for c in model["classes"]] == COLORS


def test_json_objects_decode_and_match_the_python_api(server, weights, photo):
    reply = server.predict(png_bytes(photo), "?format=json&conf=0.3")
    assert reply.status == 200 and reply.headers["content-type"] == "application/json"
    answer = reply.json()
    assert answer["conf"] == 0.3 and answer["batch_size"] == 1 and answer["inference_ms"] > 0
    assert_objects_fit(answer, 320, 240, 0.3)
    labels = [o["label"] for o in answer["instances"]]
    assert [(c["index"], c["name"], tuple(c["color"])) for c in answer["classes"]] == [
        (i, CLASSES[i], COLORS[i]) for i in range(1, len(CLASSES))
    ]
    assert [c["count"] for c in answer["classes"]] == [labels.count(i) for i in range(1, len(CLASSES))]

    expected = seglab.load(weights, device="cpu").predict(photo, conf=0.3).objects()
    assert len(answer["instances"]) == len(expected) > 5
    for got, want in zip(answer["instances"], expected, strict=True):
        assert (got["class"], got["label"]) == (want["class"], want["label"])
        assert got["score"] == pytest.approx(want["score"], abs=1e-4)
        assert got["box"] == pytest.approx(want["box"], abs=0.05)
        a, b = decode_mask(got["mask"]), decode_mask(want["mask"])
        assert (a == b).mean() > 0.999


def test_conf_keeps_the_objects_scoring_at_least_it_and_bad_values_are_400(server, photo):
    image = png_bytes(photo)
    low = server.predict(image, "?format=json&conf=0.3").json()["instances"]
    high = server.predict(image, "?format=json&conf=0.4").json()["instances"]
    assert 0 < len(high) < len(low) and high == [o for o in low if o["score"] >= 0.4]
    default = server.predict(image, "?format=json").json()
    assert default["conf"] == 0.25 and len(default["instances"]) >= len(low)
    for value in ("abc", "1.5", "-0.1", "nan"):
        assert_refused(server.predict(image, f"?conf={value}"), 400, f"conf={value}", "between 0 and 1")


def test_the_png_answer_is_the_objects_drawn_on_the_image(server, weights, photo):
    reply = server.predict(png_bytes(photo), "?conf=0.3")
    assert reply.status == 200 and reply.headers["content-type"] == "image/png"
    drawn = Image.open(io.BytesIO(reply.body))
    assert (drawn.format, drawn.mode, drawn.size) == ("PNG", "RGB", (320, 240))
    expected = seglab.load(weights, device="cpu").predict(photo, conf=0.3).plot()
    pixels = np.asarray(drawn)
    assert (pixels != photo).any(axis=-1).mean() > 0.2  # masks and boxes cover much of it
    assert (pixels != expected).any(axis=-1).mean() < 0.01
    by_accept = server.request(
        "POST", "/predict?conf=0.3", png_bytes(photo), {"Content-Type": "image/png", "Accept": "application/json"}
    )
    assert by_accept.headers["content-type"] == "application/json" and by_accept.json()["instances"]


def test_concurrent_requests_share_forward_passes(server, photo):
    image = png_bytes(photo)
    alone = server.predict(image, "?format=json&conf=0.3").json()["instances"]
    with ThreadPoolExecutor(4) as pool:
        replies = list(pool.map(lambda _: server.predict(image, "?format=json&conf=0.3"), range(4)))
    assert [r.status for r in replies] == [200] * 4
    assert max(int(r.headers["x-batch-size"]) for r in replies) > 1
    for reply in replies:  # a batch pads nothing for images of one size: the same objects
        objects = reply.json()["instances"]
        assert [o["label"] for o in objects] == [o["label"] for o in alone]
        assert [o["score"] for o in objects] == pytest.approx([o["score"] for o in alone], abs=1e-3)


def test_a_box_detector_answers_boxes_without_masks(tmp_path, photo):
    weights = random_detector(tmp_path, "detect")
    running = start_server(weights, tmp_path / "detect.log")
    try:
        assert running.request("GET", "/model").json()["task"] == "detect"
        answer = running.predict(png_bytes(photo), "?format=json&conf=0.3").json()
        assert answer["instances"] and all("mask" not in o for o in answer["instances"])
        for o in answer["instances"]:
            x1, y1, x2, y2 = o["box"]
            assert 0 <= x1 <= x2 <= 320 and 0 <= y1 <= y2 <= 240 and o["score"] >= 0.3
        drawn = Image.open(io.BytesIO(running.predict(png_bytes(photo), "?conf=0.3").body))
        assert (drawn.format, drawn.size) == ("PNG", (320, 240))
    finally:
        stop_server(running)


# ---------------------------------------------------------------------------------------------- refusals


def test_bad_uploads_get_the_same_refusals(server, photo):
    image = png_bytes(photo)
    assert_refused(server.predict(b"hello", content_type="text/plain"), 415, "text/plain")
    assert_refused(server.predict(b"GIF89a not really"), 415, "not an image")
    assert_refused(server.predict(image[: len(image) // 2]), 400, "corrupt or truncated")
    assert_refused(server.predict(b""), 400, "holds no image")
    body, content_type = multipart("picture", "photo.png", image, "image/png")
    assert_refused(server.predict(body, content_type=content_type), 400, "no field 'file'")
    assert_refused(server.predict(image, "?format=gif"), 400, "format=gif")
    assert_refused(server.predict(png_bytes(np.zeros((20, 1100, 3), np.uint8))), 413, "1100x20", "--max-side")
    noise = np.random.default_rng(0).integers(0, 256, (800, 800, 3), dtype=np.uint8)  # 1.9 MB as PNG
    assert_refused(server.predict(png_bytes(noise)), 413, "--max-upload-mb")
    # 700x700 with the masks of up to 100 objects is about 480 MB: alone more than the 400 MB budget
    flat = png_bytes(np.full((700, 700, 3), 90, np.uint8))
    assert_refused(server.predict(flat), 413, "700x700", "--memory-budget-mb of 400")
    # a form with the image as `file` is answered like the raw body
    body, content_type = multipart("file", "photo.png", image, "image/png")
    assert server.predict(body, "?format=json&conf=0.3", content_type=content_type).json()["instances"]
    assert server.request("GET", "/health").json()["memory_held_mb"] == 0


def test_a_semantic_model_refuses_conf(make_checkpoint):
    from seglab.serve.codec import RequestError
    from seglab.serve.tasks import serve_task

    task = serve_task(seglab.load(make_checkpoint("lraspp"), device="cpu"))
    with pytest.raises(RequestError, match="conf is for detectors") as refused:
        task.conf("0.3")
    assert refused.value.status == 400 and task.conf(None) is None


# ---------------------------------------------------------------------------------------------- the page


CANVAS_PNG = "() => document.getElementById('overlay').toDataURL('image/png')"


def canvas(page) -> np.ndarray:
    data = page.evaluate(CANVAS_PNG).split(",", 1)[1]
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB"))


def counts(page) -> list[tuple[str, int]]:
    rows = page.locator("#counts tbody tr")
    return [(rows.nth(i).locator("td").first.inner_text(), int(rows.nth(i).locator("td.count").inner_text()))
            for i in range(rows.count())]  # fmt: skip


def expected_counts(answer: dict) -> list[tuple[str, int]]:
    found = [c for c in answer["classes"] if c["count"]]
    return [(c["name"], c["count"]) for c in sorted(found, key=lambda c: (-c["count"], c["index"]))]


def decorations(objects: list[dict], shape: tuple[int, int]) -> np.ndarray:
    """Where the page may draw boxes and "class score" labels (a generous margin): (H, W) bool."""
    near = np.zeros(shape, bool)
    for o in objects:
        x1, y1, x2, y2 = (round(v) for v in o["box"])
        for x in (x1, x2):
            near[max(y1 - 3, 0) : y2 + 3, max(x - 3, 0) : x + 3] = True
        for y in (y1, y2):
            near[max(y - 3, 0) : y + 3, max(x1 - 3, 0) : x2 + 3] = True
        label = len(f"{o['class']} {o['score']:.2f}") * 9 + 10
        near[max(y1 - 18, 0) : y1 + 18, max(x1 - 3, 0) : x1 + label] = True
    return near


def test_the_page_draws_masks_boxes_legend_and_counts(browser_api, server, photo_path):  # noqa: F811
    artifacts = Path(os.environ.get("SEGLAB_TEST_ARTIFACTS", "test-artifacts"))
    artifacts.mkdir(parents=True, exist_ok=True)
    content_type = "image/jpeg" if photo_path.suffix == ".jpg" else "image/png"
    answer = server.predict(photo_path.read_bytes(), "?format=json", content_type=content_type).json()
    width, height = answer["width"], answer["height"]
    objects = answer["instances"]
    with browser_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        outside = []  # the page must never reach beyond the server
        page.on("request", lambda r: outside.append(r.url) if not r.url.startswith(server.url) else None)
        page.goto(server.url + "/")
        browser_api.expect(page.locator("#legend li")).to_have_count(len(CLASSES) - 1)  # no background
        assert page.locator("#legend").inner_text().split("\n")[0] == CLASSES[1]
        assert page.locator("#count-section").is_visible() and not page.locator("#area-section").is_visible()

        page.locator("#opacity").fill("100")  # masks opaque: their pixels are exactly the class colours
        page.set_input_files("#file", str(photo_path))
        page.wait_for_selector("body[data-state=done]")
        assert counts(page) == expected_counts(answer)
        assert int(page.locator("#total").inner_text()) == len(objects) > 5
        assert f"{len(objects)} objects scoring 0.25 or more" in page.locator("#status").inner_text()
        page.screenshot(path=str(artifacts / "serve_detector_page.png"), full_page=True)

        drawn = canvas(page)
        assert drawn.shape == (height, width, 3)
        # masks: painted lowest score first, as the page does, in their class colours (away from boxes and labels)
        painted = np.zeros((height, width), np.int64)
        for o in reversed(objects):
            painted[decode_mask(o["mask"])] = o["label"]
        inside = painted > 0
        seen = inside & ~decorations(objects, (height, width))
        assert seen.mean() > 0.05 and len(np.unique(painted[seen])) > 1
        for label in np.unique(painted[seen]):
            here = seen & (painted == label)
            assert (drawn[here] == COLORS[label]).all(axis=-1).mean() > 0.98, CLASSES[label]
        # boxes: the top-scoring object's box is drawn last, so its sides are its class colour
        top = objects[0]
        x1, y1, x2, y2 = (round(v) for v in top["box"])
        edges = drawn[y1 + (y2 - y1) // 4 : y2 - (y2 - y1) // 4][:, [x1, x2 - 1]]  # a 2-px line on each side
        assert (edges == COLORS[top["label"]]).all(axis=-1).mean() > 0.9, (top, edges[:5])

        # half opacity blends the photo into the masks; the boxes stay opaque
        page.locator("#opacity").fill("50")
        blended = canvas(page)
        assert (blended[seen] != drawn[seen]).any(axis=-1).mean() > 0.95
        assert (blended[y1 + (y2 - y1) // 4 : y2 - (y2 - y1) // 4][:, [x1, x2 - 1]] == edges).all()

        # the score slider asks again with ?conf=: fewer objects, counted as the server counts them
        page.evaluate("document.body.dataset.state = ''")
        page.locator("#conf").fill("45")
        page.wait_for_selector("body[data-state=done]")
        strict = server.predict(photo_path.read_bytes(), "?format=json&conf=0.45", content_type=content_type).json()
        assert page.locator("#conf-value").inner_text() == "0.45"
        assert counts(page) == expected_counts(strict)
        assert 0 < int(page.locator("#total").inner_text()) == len(strict["instances"]) < len(objects)
        browser.close()
    assert outside == []
