"""By-hand benchmark: seglab's CPU fast path against the inference runtimes a user could put the
same network in: ONNX Runtime, OpenVINO and TorchInductor, on each model, in one run.

Not a test. Each model (the three architectures of infer_speed.py, untrained, and with
``--weights`` a trained checkpoint) runs the network alone on the same normalised CamVid-sized
input (360x480), batch 1 and batch 8, every side in interleaved rounds so the machine's noise
falls on all of them alike:

  eager fp32    the model in eager float32, contiguous: the baseline of the ratios
  seglab        ``seglab.load(..., amp=True)``'s network: channels-last, BatchNorm folded, bfloat16
                autocast where the CPU has bfloat16 instructions (float32 otherwise)
  onnxruntime   the model exported by seglab's ONNX exporter (fixed shape per batch size), run by
                ONNX Runtime with every graph optimisation: what ``seglab predict model.onnx`` runs
  openvino      the same ONNX file compiled by OpenVINO for the CPU (static shape, latency hint);
                ``pip install openvino`` where this script runs: it is not a seglab dependency
  inductor      ``torch.compile`` of the eager model (TorchInductor, freezing on: the CPU inference
                setting PyTorch recommends); its compile time is reported separately

    pip install openvino                           # only for the openvino rows
    python benchmarks/infer_runtimes.py [--weights runs/.../best.pt] [--rounds 10]

Prints a table and writes benchmarks/results/infer_runtimes.json.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from common import write_result
from infer_speed import untrained

import seglab
from seglab.data import resolve_dataset
from seglab.deploy.export import onnx_export
from seglab.deploy.report import _forward
from seglab.deploy.runtime import ort_session

ROOT = Path(__file__).resolve().parents[1]
SIZE = (360, 480)
BATCHES = (1, 8)
Run = Callable[[torch.Tensor], object]


def onnx_file(model: torch.nn.Module, batch: int, folder: Path, name: str) -> Path:
    path = folder / f"{name}_b{batch}.onnx"
    x = torch.randn(batch, 3, *SIZE)
    onnx_export(model, x, path, "{}", opset=17, names=(["images"], ["logits"]), axes={}, doc="benchmark")
    return path


def runtimes(model: torch.nn.Module, fast, folder: Path, name: str) -> tuple[dict[str, dict[int, Run]], dict]:
    """Every side's callable per batch size, and what preparing each cost (seconds)."""
    eager = model.eval().to(memory_format=torch.contiguous_format)
    sides: dict[str, dict[int, Run]] = {s: {} for s in ("eager fp32", "seglab", "onnxruntime", "openvino", "inductor")}
    cost: dict[str, float] = {}
    files = {b: onnx_file(eager, b, folder, name) for b in BATCHES}
    for b in BATCHES:
        sides["eager fp32"][b] = eager
        sides["seglab"][b] = lambda x: _forward(fast, x)
        session = ort_session(files[b])
        sides["onnxruntime"][b] = lambda x, s=session: s.run(None, {"images": x.numpy()})[0]
    try:
        import openvino as ov

        core = ov.Core()
        for b in BATCHES:
            compiled = core.compile_model(str(files[b]), "CPU", {"PERFORMANCE_HINT": "LATENCY"})
            request = compiled.create_infer_request()
            sides["openvino"][b] = lambda x, r=request: r.infer({0: x.numpy()})
    except ImportError:
        print("openvino is not installed here (pip install openvino): no openvino rows", flush=True)
        del sides["openvino"]
    import torch._inductor.config as inductor_config

    inductor_config.freezing = True
    compiled_model = torch.compile(eager)
    for b in BATCHES:
        start = time.perf_counter()
        with torch.inference_mode():
            compiled_model(torch.randn(b, 3, *SIZE))
        cost[f"inductor compile, batch {b}"] = time.perf_counter() - start
        sides["inductor"][b] = compiled_model
    return sides, cost


def time_sides(sides: dict[str, dict[int, Run]], rounds: int) -> dict[str, dict[int, float]]:
    """Median seconds per call of each side at each batch size, the sides interleaved round by round."""
    timings: dict[str, dict[int, list[float]]] = {s: {b: [] for b in BATCHES} for s in sides}
    with torch.inference_mode():
        for b in BATCHES:
            x = torch.randn(b, 3, *SIZE)
            for run in sides.values():  # warm-up
                run[b](x)
                run[b](x)
            for _ in range(rounds):
                for side, run in sides.items():
                    start = time.perf_counter()
                    run[b](x)
                    timings[side][b].append(time.perf_counter() - start)
    return {s: {b: statistics.median(v) for b, v in t.items()} for s, t in timings.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "camvid"))
    parser.add_argument("--weights", default=None, help="a trained CamVid checkpoint to add as a row")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "infer_runtimes.json"))
    args = parser.parse_args()
    spec = resolve_dataset(args.data)
    models = []
    archs = (("lraspp", "mobilenet_v3_large"), ("unet", "resnet18"), ("deeplabv3plus", "mobilenet_v3_large"))
    for arch, encoder in archs:
        model, fast = untrained(arch, encoder, spec)
        models.append((f"{arch} {encoder}", model, fast))
    if args.weights:
        slow, fast = seglab.load(args.weights, device="cpu"), seglab.load(args.weights, device="cpu", amp=True)
        models.append((f"{slow.card.arch} {slow.card.encoder} (trained)", slow.model, fast))
    rows, costs = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, model, fast in models:
            sides, cost = runtimes(model, fast, Path(tmp), name.split()[0])
            costs[name] = cost
            times = time_sides(sides, args.rounds)
            for side, t in times.items():
                rows.append({"model": name, "side": side, "latency_ms": 1000 * t[1], "images_per_s": 8 / t[8]})
                print(f"{name}: {side}: batch 1 {1000 * t[1]:.1f} ms, batch 8 {8 / t[8]:.1f} img/s", flush=True)
            torch._dynamo.reset()
    print("\n| model | side | batch 1 ms | batch 8 img/s | b1 vs eager | b8 vs eager |\n|---|---|---|---|---|---|")
    for r in rows:
        base = next(b for b in rows if b["model"] == r["model"] and b["side"] == "eager fp32")
        r["latency_speedup"] = base["latency_ms"] / r["latency_ms"]
        r["throughput_speedup"] = r["images_per_s"] / base["images_per_s"]
        print(
            f"| {r['model']} | {r['side']} | {r['latency_ms']:.1f} | {r['images_per_s']:.1f} | "
            f"{r['latency_speedup']:.2f}x | {r['throughput_speedup']:.2f}x |"
        )
    for name, cost in costs.items():
        print(f"{name}: " + ", ".join(f"{k} {v:.1f} s" for k, v in cost.items()))
    versions = {"onnxruntime": __import__("onnxruntime").__version__}
    with contextlib.suppress(ImportError):
        versions["openvino"] = __import__("openvino").__version__
    write_result(args.out, rows=rows, prepare_s=costs, runtimes=versions, rounds=args.rounds, size=SIZE)
    print(f"\nwritten {args.out}")


if __name__ == "__main__":
    main()
