"""By-hand reliability check: two torchrun agents (``--nnodes 2``, one process each, c10d
rendezvous on 127.0.0.1) train a one-epoch VAE, N times; prints each run's result and the count of
failures. It found the SIGABRT at exit that CI hit once (docs/NOTES.md, 2026-12-03): 1 failure in 12
before ``engine.distributed.cleanup`` collected DistributedDataParallel's cycle, 0 in 30 after.

    python benchmarks/torchrun_exit_stress.py [--runs 30]     # about 10 s a run
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

from seglab.data.synthetic import make_shapes_dataset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=30)
    args = parser.parse_args()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    failures = 0
    with tempfile.TemporaryDirectory() as tmp:
        shapes = make_shapes_dataset(Path(tmp) / "shapes", n_train=8, n_val=6, size=40, seed=3)
        train = ["gen", "train", "--data", str(shapes), "--model", "vae", "--img-size", "32", "--width", "8",
                 "--z-dim", "8", "--epochs", "1", "--batch", "2", "--workers", "0", "--seed", "1"]  # fmt: skip
        for i in range(args.runs):
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            agent = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
                     "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", f"run{i}",
                     "-m", "seglab", *train, "--name", f"run{i}"]  # fmt: skip
            nodes = [subprocess.Popen(agent, cwd=tmp, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True) for _ in range(2)]  # fmt: skip
            outputs = [node.communicate(timeout=600)[0] for node in nodes]
            codes = [node.returncode for node in nodes]
            if any(codes):
                failures += 1
                aborted = any("SIGABRT" in out or "terminate called" in out for out in outputs)
                print(f"run {i}: FAILED, exit codes {codes}{' (SIGABRT)' if aborted else ''}", flush=True)
            else:
                print(f"run {i}: ok", flush=True)
    print(f"{failures} of {args.runs} runs failed")


if __name__ == "__main__":
    main()
