"""`seglab serve` as users meet it: a real server process on 127.0.0.1, spoken to over HTTP.

Two servers start once for the module: ``server`` with the default limits (and a 50 ms batch
window, so concurrent requests visibly share forward passes) and ``strict``, whose limits are
tiny so each refusal (413, 415, 400, 503, 504) can be provoked on purpose.
"""

from __future__ import annotations

import http.client
import io
import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import seglab
from seglab.cli import main as seglab_main

CAMVID_VAL = Path(__file__).parents[1] / ".." / "shared" / "data" / "camvid" / "val"


# ---------------------------------------------------------------------------------------------- helpers


@dataclass
class Reply:
    status: int
    headers: dict[str, str]  # names in lower case
    body: bytes

    def json(self) -> dict:
        return json.loads(self.body)


@dataclass
class Server:
    url: str  # http://127.0.0.1:PORT
    port: int
    process: subprocess.Popen
    log: Path

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None) -> Reply:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            response = conn.getresponse()
            return Reply(response.status, {k.lower(): v for k, v in response.getheaders()}, response.read())
        finally:
            conn.close()

    def predict(self, image: bytes, query: str = "", content_type: str = "image/png") -> Reply:
        return self.request("POST", f"/predict{query}", image, {"Content-Type": content_type})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(weights: Path, log: Path, *flags: str) -> Server:
    """`python -m seglab serve` on a free port, returned once /health says the model is loaded."""
    port = free_port()
    with log.open("w") as out:
        command = [sys.executable, "-m", "seglab", "serve", "--weights", str(weights), "--port", str(port), *flags]
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    server = Server(f"http://127.0.0.1:{port}", port, process, log)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"seglab serve exited with {process.returncode}:\n{log.read_text()}")
        try:
            if server.request("GET", "/health").json()["model_loaded"]:
                return server
        except OSError:
            pass
        time.sleep(0.2)
    stop_server(server)
    pytest.fail(f"seglab serve did not become ready in 120 s:\n{log.read_text()}")


def stop_server(server: Server) -> None:
    server.process.terminate()
    try:
        server.process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        server.process.kill()
        server.process.wait()


def random_weights(folder: Path, arch: str, encoder: str, img_size: int) -> Path:
    """A random-weight checkpoint with 11 classes, like conftest's `make_checkpoint`, built here
    because a module-scoped server outlives that function-scoped fixture."""
    import torch

    from seglab.engine.checkpoint import ModelCard, make_payload, save_checkpoint

    torch.manual_seed(0)
    card = ModelCard(
        arch=arch,
        encoder=encoder,
        num_classes=11,
        in_channels=3,
        classes=[f"class{i}" for i in range(11)],
        colors=[(23 * i % 256, 71 * i % 256, 131 * i % 256) for i in range(11)],
        ignore_index=11,
        mean=[0.485, 0.456, 0.406],
        std=[0.229, 0.224, 0.225],
        img_size=img_size,
        crop_size=[img_size * 3 // 4, img_size],
    )
    path = folder / f"{arch}-{encoder}-{img_size}.pt"
    save_checkpoint(path, make_payload(card.build().eval(), card, config={}, metrics=None))
    return path


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def multipart(field: str, filename: str, data: bytes, content_type: str) -> tuple[bytes, str]:
    """A multipart/form-data body with one file field, as browsers and `curl -F` send it."""
    boundary = "seglab-test-boundary"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="{filename}"\r\n'
        f"Content-Type: {content_type}\r\n\r\n"
    )
    body = head.encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def decode_rle(rle: dict) -> np.ndarray:
    """The documented decoding of the JSON answer's run lengths."""
    return np.repeat(np.array(rle["values"], np.uint8), rle["counts"]).reshape(rle["size"])


def assert_refused(reply: Reply, status: int, *fragments: str) -> None:
    """The status, and a JSON message that says what went wrong."""
    assert reply.status == status, (reply.status, reply.body[:300])
    assert reply.headers["content-type"] == "application/json"
    detail = reply.json()["detail"]
    for fragment in fragments:
        assert fragment in detail, (fragment, detail)


# ---------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    """FCN: even with random weights its masks hold several classes, so the encodings are exercised."""
    return random_weights(tmp_path_factory.mktemp("weights"), "fcn", "resnet18", img_size=64)


@pytest.fixture(scope="module")
def server(weights, tmp_path_factory) -> Iterator[Server]:
    running = start_server(weights, tmp_path_factory.mktemp("logs") / "server.log", "--batch-wait-ms", "50")
    yield running
    stop_server(running)


@pytest.fixture(scope="module")
def strict(tmp_path_factory) -> Iterator[Server]:
    """Tiny limits; every answer that reaches the model times out (--timeout 0.001), and a
    512-pixel model keeps the single worker busy long enough for a one-place queue to fill."""
    slow_weights = random_weights(tmp_path_factory.mktemp("slow"), "lraspp", "mobilenet_v3_large", img_size=512)
    flags = ["--max-upload-mb", "1", "--max-side", "512", "--queue-size", "1", "--max-batch", "1", "--timeout", "0.001"]
    running = start_server(slow_weights, tmp_path_factory.mktemp("logs") / "strict.log", *flags)
    yield running
    stop_server(running)


@pytest.fixture(scope="module")
def photo() -> bytes:
    """A CamVid val image (480x360) when the shared data is here, else a generated one."""
    files = sorted(CAMVID_VAL.glob("*.png"))
    if files:
        return files[0].read_bytes()
    yy, xx = np.mgrid[0:360, 0:480]
    return png_bytes(np.stack([xx * 255 // 480, yy * 255 // 360, (xx + yy) % 256], -1).astype(np.uint8))


# ---------------------------------------------------------------------------------------------- endpoints


def test_health_says_the_model_is_loaded_and_the_queue_is_empty(server):
    health = server.request("GET", "/health").json()
    assert health["status"] == "ok" and health["model_loaded"] is True
    assert health["queue_depth"] == 0 and health["queue_size"] == 64


def test_model_describes_classes_colours_and_preprocessing(server):
    info = server.request("GET", "/model").json()
    assert (info["arch"], info["encoder"], info["backend"]) == ("fcn", "resnet18", "pytorch")
    assert info["img_size"] == 64 and info["in_channels"] == 3
    assert info["mean"] == [0.485, 0.456, 0.406] and info["std"] == [0.229, 0.224, 0.225]
    assert [c["index"] for c in info["classes"]] == list(range(11))
    assert info["classes"][1] == {"index": 1, "name": "class1", "color": [23, 71, 131]}


def test_the_png_mask_the_json_mask_and_the_python_api_agree_exactly(server, weights, photo):
    body, content_type = multipart("file", "street.png", photo, "image/png")
    png = server.request("POST", "/predict", body, {"Content-Type": content_type})
    assert png.status == 200 and png.headers["content-type"] == "image/png"
    mask_image = Image.open(io.BytesIO(png.body))
    image = np.asarray(Image.open(io.BytesIO(photo)).convert("RGB"))
    assert mask_image.mode == "P" and mask_image.size == (image.shape[1], image.shape[0])
    info = server.request("GET", "/model").json()
    palette = mask_image.getpalette()
    assert palette is not None and palette[: 3 * 11] == [v for c in info["classes"] for v in c["color"]]

    answer = server.predict(photo, "?format=json").json()  # the raw body this time
    rle_mask = decode_rle(answer["rle"])
    api_mask = seglab.load(weights).predict(image).mask
    assert len(np.unique(api_mask)) > 1 and len(answer["rle"]["counts"]) > 10  # a mask worth encoding
    np.testing.assert_array_equal(np.asarray(mask_image), api_mask)
    np.testing.assert_array_equal(rle_mask, api_mask)

    assert (answer["width"], answer["height"]) == (image.shape[1], image.shape[0])
    assert answer["inference_ms"] > 0 and answer["batch_size"] >= 1
    counts = np.bincount(api_mask.ravel(), minlength=11)
    assert [c["pixels"] for c in answer["classes"]] == counts.tolist()
    assert sum(c["fraction"] for c in answer["classes"]) == pytest.approx(1.0)
    assert [c["name"] for c in answer["classes"]] == [c["name"] for c in info["classes"]]


def test_an_onnx_export_serves_the_same_masks(weights, photo, tmp_path):
    from seglab.deploy.export import export

    onnx_path = export(weights, format="onnx", out=tmp_path / "m.onnx", dynamic=True, log=lambda m: None).path
    onnx_server = start_server(onnx_path, tmp_path / "serve.log")
    try:
        assert onnx_server.request("GET", "/model").json()["backend"] == "onnxruntime"
        png = onnx_server.predict(photo)
        assert png.status == 200
        image = np.asarray(Image.open(io.BytesIO(photo)).convert("RGB"))
        np.testing.assert_array_equal(
            np.asarray(Image.open(io.BytesIO(png.body))), seglab.load(onnx_path).predict(image).mask
        )
    finally:
        stop_server(onnx_server)


def test_json_by_accept_header_and_octet_stream_bodies(server, photo):
    reply = server.request(
        "POST", "/predict", photo, {"Content-Type": "application/octet-stream", "Accept": "application/json"}
    )
    assert reply.status == 200 and reply.headers["content-type"] == "application/json"
    assert reply.json()["width"] == Image.open(io.BytesIO(photo)).width
    assert_refused(server.predict(photo, "?format=xml"), 400, "format=json")


def test_greyscale_and_rgba_uploads_are_converted(server):
    for array in (np.full((30, 40), 99, np.uint8), np.full((30, 40, 4), 99, np.uint8)):
        reply = server.predict(png_bytes(array), "?format=json")
        assert reply.status == 200 and (reply.json()["width"], reply.json()["height"]) == (40, 30)


def test_concurrent_requests_share_forward_passes(server, photo):
    with ThreadPoolExecutor(16) as pool:
        replies = list(pool.map(lambda _: server.predict(photo), range(16)))
    assert all(r.status == 200 for r in replies)
    sizes = [int(r.headers["x-batch-size"]) for r in replies]
    assert max(sizes) > 1, sizes
    assert server.request("GET", "/health").json()["largest_batch"] > 1


def test_the_worker_gives_same_size_images_one_forward_pass(weights):
    from seglab.serve.batcher import Batcher

    model = seglab.load(weights)
    batcher = Batcher(model, max_batch=8, batch_wait_s=0, queue_size=8)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, shape, dtype=np.uint8) for shape in [(30, 40, 3), (20, 50, 3), (30, 40, 3)]]
    futures = [batcher.submit(image) for image in images]  # all waiting before the worker starts
    batcher.start()
    try:
        predictions = [f.result(timeout=60) for f in futures]
    finally:
        batcher.stop()
    assert [p.batch_size for p in predictions] == [2, 1, 2]
    assert (batcher.stats.batches, batcher.stats.images, batcher.stats.largest_batch) == (2, 3, 2)
    for image, prediction in zip(images, predictions, strict=True):
        np.testing.assert_array_equal(prediction.mask, model.predict(image).mask)


def test_200_requests_from_20_clients_all_succeed(server, photo):
    def client(n: int) -> list[tuple[int, float]]:
        out = []
        for _ in range(n):
            start = time.perf_counter()
            status = server.predict(photo).status
            out.append((status, time.perf_counter() - start))
        return out

    start = time.perf_counter()
    with ThreadPoolExecutor(20) as pool:
        results = [r for chunk in pool.map(client, [10] * 20) for r in chunk]
    elapsed = time.perf_counter() - start
    assert [status for status, _ in results] == [200] * 200
    p50, p90, p99 = np.percentile([1000 * t for _, t in results], [50, 90, 99])
    print(f"\nserve load: 200 requests, 20 clients: p50 {p50:.0f} ms, p90 {p90:.0f} ms, p99 {p99:.0f} ms, "
          f"{200 / elapsed:.1f} req/s")  # fmt: skip


def test_the_server_listens_on_127_0_0_1_by_default(server):
    listening = Path("/proc/net/tcp")
    if not listening.is_file():
        pytest.skip("needs Linux's /proc/net/tcp")
    rows = [line.split() for line in listening.read_text().splitlines()[1:]]
    ours = [
        local
        for local, state in ((r[1], r[3]) for r in rows)
        if state == "0A" and local.endswith(f":{server.port:04X}")
    ]
    assert ours == [f"0100007F:{server.port:04X}"]  # 127.0.0.1, little-endian hex, and nothing else
    assert f"http://127.0.0.1:{server.port}/" in server.log.read_text()


def test_the_page_is_self_contained(server):
    reply = server.request("GET", "/")
    page = reply.body.decode()
    assert reply.status == 200 and reply.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in reply.headers["content-security-policy"]
    for element in ('id="file"', 'id="overlay"', 'id="legend"', 'id="areas"', 'id="opacity"', 'id="error"'):
        assert element in page
    assert "http://" not in page and "https://" not in page and "src=" not in page
    assert server.request("GET", "/docs").status == 404  # FastAPI's docs page would load a CDN


# ---------------------------------------------------------------------------------------------- limits


def raw_upload(server: Server, headers: bytes, chunks: Iterator[bytes]) -> tuple[bytes, bool]:
    """POST /predict byte by byte as a client that sends everything before reading the answer;
    the reply (b"" when the connection was reset) and whether the server stopped the sending."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as s:
        host = f"Host: 127.0.0.1:{server.port}\r\n".encode()  # the server answers its own name only
        s.sendall(b"POST /predict HTTP/1.1\r\n" + host + b"Content-Type: image/png\r\n" + headers + b"\r\n")
        cut_off = False
        try:
            for chunk in chunks:
                s.sendall(chunk)
        except (BrokenPipeError, ConnectionResetError):
            cut_off = True
        try:
            return s.makefile("rb").read(), cut_off
        except ConnectionResetError:
            return b"", cut_off


def chunked(megabytes: float) -> Iterator[bytes]:
    piece = b"\0" * 65536
    for _ in range(int(megabytes * 16)):
        yield b"%x\r\n%s\r\n" % (len(piece), piece)
    yield b"0\r\n\r\n"


def test_an_upload_over_the_limit_is_refused_from_its_content_length(strict):
    # a client that asks first (as curl does for large bodies) is answered before it sends a byte
    reply, _ = raw_upload(strict, b"Content-Length: 1500000\r\nExpect: 100-continue\r\n", iter([]))
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413"), head
    assert "--max-upload-mb" in json.loads(body)["detail"]
    # one that sends the body regardless still gets the answer, not a reset connection
    reply, _ = raw_upload(strict, b"Content-Length: 1500000\r\n", iter([b"\0" * 1_500_000]))
    assert reply.startswith(b"HTTP/1.1 413"), reply[:200]


def test_a_chunked_upload_is_cut_off_at_the_limit(strict):
    reply, _ = raw_upload(strict, b"Transfer-Encoding: chunked\r\n", chunked(1.5))
    assert reply.startswith(b"HTTP/1.1 413"), reply[:200]
    _, cut_off = raw_upload(strict, b"Transfer-Encoding: chunked\r\n", chunked(200))
    assert cut_off  # the server closed the connection long before 200 MB
    assert strict.request("GET", "/health").status == 200


def test_data_that_is_not_an_image_is_415(strict):
    assert_refused(strict.predict(b"hello", content_type="text/plain"), 415, "image/*")
    assert_refused(strict.predict(b"hello, not an image"), 415, "not an image")
    body, content_type = multipart("file", "notes.txt", b"just text", "application/octet-stream")
    assert_refused(strict.request("POST", "/predict", body, {"Content-Type": content_type}), 415, "not an image")


def test_truncated_and_missing_images_are_400(strict, photo):
    assert_refused(strict.predict(photo[: len(photo) // 2]), 400, "truncated")
    assert_refused(strict.predict(b""), 400, "no image")
    body, content_type = multipart("image", "street.png", photo, "image/png")
    assert_refused(strict.request("POST", "/predict", body, {"Content-Type": content_type}), 400, "field 'file'")


def test_an_image_over_the_side_limit_is_413(strict):
    assert_refused(strict.predict(png_bytes(np.zeros((10, 600, 3), np.uint8))), 413, "600x10", "512")


def test_a_full_queue_is_503_with_retry_after_and_a_late_result_is_504(strict):
    small = png_bytes(np.zeros((48, 64, 3), np.uint8))  # cheap to send; the 512-pixel model is not cheap
    with ThreadPoolExecutor(24) as pool:
        replies = list(pool.map(lambda _: strict.predict(small), range(24)))
    statuses = {r.status for r in replies}
    assert statuses <= {503, 504} and 503 in statuses and 504 in statuses, [r.status for r in replies]
    busy = next(r for r in replies if r.status == 503)
    assert_refused(busy, 503, "busy")
    assert busy.headers["retry-after"] == "1"
    assert_refused(next(r for r in replies if r.status == 504), 504, "--timeout")


# ---------------------------------------------------------------------------------------------- the command


def test_a_bad_flag_is_one_line_and_exit_2(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "seglab", "serve", "--weights", "w.pt", "--port", "70000"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == "seglab: error: serve: --port 70000: use a port between 1 and 65535"


@pytest.mark.parametrize(
    ("flags", "fragment"),
    [
        (["--max-batch", "0"], "--max-batch 0: use 1 or more"),
        (["--queue-size", "0"], "--queue-size 0"),
        (["--timeout", "0"], "--timeout 0"),
        (["--max-upload-mb", "-1"], "--max-upload-mb -1"),
        (["--host", "no.such.host.invalid"], "--host no.such.host.invalid"),
        (["--memory-budget-mb", "5"], "--memory-budget-mb 5: use at least 20 (twice --max-upload-mb"),
        (["--body-timeout", "0"], "--body-timeout 0: use a number of seconds above 0"),
        (["--allowed-hosts", "a b"], "--allowed-hosts a b: list host names or host:port"),
    ],
)
def test_bad_values_are_refused_before_loading(weights, capsys, flags, fragment):
    assert seglab_main(["serve", "--weights", str(weights), *flags]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"seglab: error: serve: {fragment}" in err, err


def test_missing_weights_and_a_busy_port_are_one_line(weights, capsys):
    assert seglab_main(["serve", "--weights", "nowhere.pt"]) == 2
    assert "--weights nowhere.pt: file not found" in capsys.readouterr().err
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert seglab_main(["serve", "--weights", str(weights), "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"cannot listen on 127.0.0.1:{port}" in err and "--port" in err
