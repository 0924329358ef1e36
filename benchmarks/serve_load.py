"""By-hand load test of `seglab serve`: latency percentiles and throughput under concurrent clients.

Not a test. Starts `python -m seglab serve` on a free port of 127.0.0.1 with ``--weights`` (default:
a random-weight LR-ASPP with CamVid's classes at img_size 480, the recipe's size: the speed of a
model does not depend on what its weights learnt), then ``--clients`` threads, each on its own
keep-alive connection, send ``--requests`` POST /predict in all, cycling through real CamVid val
images (480x360 PNGs) when ``--data`` holds them, else generated ones. A request counts as
answered when its whole PNG mask (or JSON with ``--format json``) has arrived.

    python benchmarks/serve_load.py [--weights W] [--requests 200] [--clients 20] [--amp]

Prints a table (p50/p90/p99/max latency, requests/s, the mean batch the server formed) and writes
benchmarks/results/serve_load.json.
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from common import write_result
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
CAMVID_CLASSES = [
    "Sky", "Building", "Pole", "Road", "Pavement", "Tree", "SignSymbol", "Fence", "Car", "Pedestrian", "Bicyclist",
]  # fmt: skip


def main() -> None:
    args = parse_args()
    images = load_images(Path(args.data), limit=args.clients)
    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(args.weights) if args.weights else random_weights(Path(tmp) / "random.pt")
        flags = ["--max-batch", str(args.max_batch), "--batch-wait-ms", str(args.batch_wait_ms)]
        flags += ["--amp"] if args.amp else []
        port, server = start_server(weights, flags)
        try:
            run_load(port, images, args.clients, args.format)  # warm-up: every client once, untimed
            before = get_json(port, "/health")
            latencies, elapsed = run_load(port, images, args.requests, args.format, clients=args.clients)
            after = get_json(port, "/health")
        finally:
            server.terminate()
            server.wait(timeout=30)
    report(args, weights, images, latencies, elapsed, before, after)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--weights", help="a seglab checkpoint (default: a random-weight LR-ASPP at img_size 480)")
    p.add_argument("--data", default=str(ROOT / ".." / "shared" / "data" / "camvid" / "val"), help="PNG folder")
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--clients", type=int, default=20)
    p.add_argument("--format", choices=["png", "json"], default="png")
    p.add_argument("--amp", action="store_true", help="serve with the CPU fast path")
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--batch-wait-ms", type=float, default=5)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "serve_load.json"))
    return p.parse_args()


def load_images(folder: Path, limit: int) -> list[bytes]:
    """Up to ``limit`` CamVid val PNGs as bytes; generated 480x360 noise if there are none."""
    files = sorted(folder.glob("*.png"))[:limit]
    if files:
        return [f.read_bytes() for f in files]
    print(f"serve_load: no PNGs in {folder}; sending generated 480x360 images")
    rng = np.random.default_rng(0)
    made = []
    for _ in range(limit):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (360, 480, 3), dtype=np.uint8)).save(buffer, format="PNG")
        made.append(buffer.getvalue())
    return made


def random_weights(path: Path) -> Path:
    import torch

    from seglab.engine.checkpoint import ModelCard, make_payload, save_checkpoint

    torch.manual_seed(0)
    card = ModelCard(
        arch="lraspp",
        encoder="mobilenet_v3_large",
        num_classes=11,
        in_channels=3,
        classes=CAMVID_CLASSES,
        colors=[(37 * i % 256, 91 * i % 256, 151 * i % 256) for i in range(11)],
        ignore_index=11,
        mean=[0.485, 0.456, 0.406],
        std=[0.229, 0.224, 0.225],
        img_size=480,
        crop_size=[360, 480],
    )
    save_checkpoint(path, make_payload(card.build().eval(), card, config={}, metrics=None))
    return path


def start_server(weights: Path, flags: list[str]) -> tuple[int, subprocess.Popen]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, "-m", "seglab", "serve", "--weights", str(weights), "--port", str(port), *flags]
    server = subprocess.Popen(command)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if server.poll() is not None:
            sys.exit(f"serve_load: the server exited with {server.returncode}")
        try:
            if get_json(port, "/health")["model_loaded"]:
                return port, server
        except OSError:
            time.sleep(0.3)
    server.kill()
    sys.exit("serve_load: the server did not start in 180 s")


def get_json(port: int, path: str) -> dict:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path)
        return json.loads(conn.getresponse().read())
    finally:
        conn.close()


def run_load(
    port: int, images: list[bytes], requests: int, response_format: str, clients: int | None = None
) -> tuple[list[float], float]:
    """Send ``requests`` POST /predict from ``clients`` threads (default: one per request);
    the latency of each in seconds and the wall time of the whole."""
    clients = clients or requests
    next_index = iter(range(requests))
    lock = threading.Lock()

    def client(_: int) -> list[float]:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        times = []
        while True:
            with lock:
                i = next(next_index, None)
            if i is None:
                conn.close()
                return times
            start = time.perf_counter()
            conn.request("POST", f"/predict?format={response_format}", images[i % len(images)],
                         {"Content-Type": "image/png"})  # fmt: skip
            response = conn.getresponse()
            response.read()
            if response.status != 200:
                raise RuntimeError(f"request {i}: HTTP {response.status}")
            times.append(time.perf_counter() - start)

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        latencies = [t for chunk in pool.map(client, range(clients)) for t in chunk]
    return latencies, time.perf_counter() - start


def report(
    args: argparse.Namespace,
    weights: Path,
    images: list[bytes],
    latencies: list[float],
    elapsed: float,
    before: dict,
    after: dict,
) -> None:
    """The table on stdout and the JSON result; batch figures are for the timed requests only."""
    ms = 1000 * np.array(latencies)
    p50, p90, p99 = np.percentile(ms, [50, 90, 99])
    batches = after["batches"] - before["batches"]
    mean_batch = (after["images"] - before["images"]) / max(batches, 1)
    rate = len(latencies) / elapsed
    print(f"\n{len(latencies)} requests from {args.clients} clients, {len(images)} distinct images, "
          f"format {args.format}, weights {'random LR-ASPP 480' if not args.weights else weights}\n")  # fmt: skip
    print("| p50 ms | p90 ms | p99 ms | max ms | requests/s | mean batch | largest batch |")
    print("|---|---|---|---|---|---|---|")
    print(f"| {p50:.0f} | {p90:.0f} | {p99:.0f} | {ms.max():.0f} | {rate:.1f} | {mean_batch:.2f} | "
          f"{after['largest_batch']} |")  # fmt: skip
    write_result(
        args.out,
        weights=str(weights) if args.weights else "random lraspp mobilenet_v3_large, img_size 480",
        requests=len(latencies),
        clients=args.clients,
        format=args.format,
        amp=args.amp,
        max_batch=args.max_batch,
        batch_wait_ms=args.batch_wait_ms,
        latency_ms={"p50": p50, "p90": p90, "p99": p99, "max": float(ms.max()), "mean": float(ms.mean())},
        requests_per_s=rate,
        mean_batch=mean_batch,
        largest_batch=after["largest_batch"],
    )
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
