"""Multi-process training with torchrun on this machine's CPU (gloo), against one process."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from seglab.data.synthetic import make_shapes_dataset

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def run(cmd: list, cwd: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    return make_shapes_dataset(tmp_path_factory.mktemp("shapes"), n_train=16, n_val=8, size=48, seed=2)


def last_row(run_dir: Path) -> dict:
    return list(csv.DictReader((run_dir / "metrics.csv").open()))[-1]


def test_two_processes_match_one(tmp_path, shapes):
    """Same data, seed and effective batch (1 x 4 against 2 x 2): the same samples and augmentation
    reach each optimiser step; only BatchNorm sees 2 images per rank instead of 4, so metrics agree
    within a tolerance: 6 mIoU points and 4 pixel-accuracy points after 10 epochs."""
    common = [
        "train",
        "--data",
        shapes,
        "--model",
        "fcn",
        "--epochs",
        "10",
        "--img-size",
        "48",
        "--workers",
        "0",
        "--seed",
        "1",
        "--lr",
        "0.003",
    ]
    one = run([sys.executable, "-m", "seglab", *common, "--batch", "4", "--name", "one"], tmp_path)
    two = run([*TORCHRUN, "-m", "seglab", *common, "--batch", "2", "--name", "two"], tmp_path)
    assert "effective batch 4 = batch 4 x 1 process(es)" in one.stdout
    assert "effective batch 4 = batch 2 x 2 process(es)" in two.stdout
    assert two.stdout.count("epoch 10/10:") == 1  # only rank 0 speaks
    a, b = last_row(tmp_path / "runs/train/one"), last_row(tmp_path / "runs/train/two")
    assert abs(float(a["val_miou"]) - float(b["val_miou"])) <= 0.06, (a, b)
    assert abs(float(a["val_pixel_accuracy"]) - float(b["val_pixel_accuracy"])) <= 0.04, (a, b)
    assert not (tmp_path / "runs/train/two2").exists()  # rank 1 made no run folder of its own


def test_val_on_two_ranks_equals_one_rank_exactly(tmp_path, shapes):
    run(
        [
            sys.executable,
            "-m",
            "seglab",
            "train",
            "--data",
            shapes,
            "--model",
            "fcn",
            "--epochs",
            "2",
            "--batch",
            "4",
            "--img-size",
            "48",
            "--workers",
            "0",
            "--name",
            "w",
        ],
        tmp_path,
    )
    weights = tmp_path / "runs/train/w/weights/best.pt"

    def val_metrics(extra: list[str], name: str, ranks: int) -> dict:
        launcher = TORCHRUN if ranks == 2 else [sys.executable]
        run(
            [*launcher, "-m", "seglab", "val", "--weights", weights, "--workers", "0", *extra, "--name", name], tmp_path
        )
        return json.loads((tmp_path / "runs/val" / name / "metrics.json").read_text())

    # 8 images in batches of 3: uneven batches per rank (3 + 1 each)
    one, two = val_metrics(["--batch", "3"], "one", 1), val_metrics(["--batch", "3"], "two", 2)
    assert one == two and one["num_pixels"] > 0
    # 7 images on 2 ranks: a padding sampler would score one image twice
    one, two = val_metrics(["--limit", "7"], "one7", 1), val_metrics(["--limit", "7"], "two7", 2)
    assert (
        one == two
        and one["num_pixels"] < json.loads((tmp_path / "runs/val/one/metrics.json").read_text())["num_pixels"]
    )


def test_cleanup_frees_the_group_that_ddp_holds_in_a_cycle(tmp_path):
    """destroy_process_group alone leaves gloo's worker threads to interpreter exit, where one still
    holding a tensor aborts the rank (SIGABRT after "done"); cleanup frees DDP, and the group, now.
    In a fresh interpreter, as a torchrun rank is: earlier tests change what DDP builds."""
    script = f"""
import gc, weakref
import torch, torch.distributed as dist
from seglab.engine.distributed import cleanup
dist.init_process_group("gloo", store=dist.FileStore({str(tmp_path / "store")!r}, 1), rank=0, world_size=1)
gc.disable()  # no collection of its own between the checks
model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(2, 2))
model(torch.randn(3, 2)).sum().backward()
alive = weakref.ref(model)
del model
assert alive() is not None, "DistributedDataParallel is no longer in a cycle: this test checks nothing"
cleanup()
assert not dist.is_initialized()
assert alive() is None, "cleanup left DistributedDataParallel (and its group's threads) alive"
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
