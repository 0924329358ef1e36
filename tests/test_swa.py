"""``--swa``: stochastic weight averaging with torch.optim.swa_utils, in the one training loop."""

from __future__ import annotations

import csv
import os
import subprocess
import sys

import pytest
import torch

import seglab
from seglab.data.synthetic import make_shapes_dataset
from seglab.errors import SeglabError

ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}  # bit-exact comparisons (see test_faults.py)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return make_shapes_dataset(tmp_path_factory.mktemp("shapes"), n_train=12, n_val=4, size=40, seed=5)


def quiet_train(tmp_path, shapes, **kw):
    base = dict(data=str(shapes), model="fcn", epochs=4, batch=4, img_size=40, workers=0, out=str(tmp_path))
    return seglab.train(progress=False, log=lambda *a: None, **{**base, **kw})


def conv_weight(state: dict) -> str:
    return next(k for k, v in state.items() if k.endswith("weight") and v.ndim == 4)


def test_the_average_of_the_last_epochs_is_validated_shipped_and_exported(tmp_path, shapes):
    run = quiet_train(tmp_path, shapes, swa=True, swa_start=3, swa_lr=2e-4, save_period=1, name="swa")
    third = torch.load(run.run_dir / "weights" / "epoch3.pt", weights_only=True)
    last = torch.load(run.last, weights_only=True)
    raw3, raw4, shipped = third["train"]["model"]["model"], last["train"]["model"]["model"], last["model"]
    key = conv_weight(shipped)
    # an equal average of the weights after epochs 3 and 4, and what best.pt and last.pt ship
    assert torch.allclose(shipped[key], (raw3[key] + raw4[key]) / 2, atol=1e-6)
    assert int(last["swa"]["model"]["n_averaged"]) == 2

    # BatchNorm statistics recomputed for the average: neither the raw model's nor the reset ones
    stat = next(k for k in shipped if k.endswith("running_mean"))
    assert not torch.equal(shipped[stat], raw4[stat]) and shipped[stat].abs().sum() > 0

    # the rate: the run's schedule for epochs 1-2, then annealed to --swa-lr within epoch 3 and held
    rates = [float(r["lr"]) for r in csv.DictReader((run.run_dir / "metrics.csv").open())]
    assert rates[0] > 2e-4 and rates[2] == pytest.approx(2e-4) and rates[3] == pytest.approx(2e-4)

    # the average exports like any model, and the export reproduces it
    from seglab.deploy.export import export

    result = export(run.last, format="onnx", out=tmp_path / "swa.onnx", data=str(shapes), log=lambda m: None)
    assert result.parity.passed


def test_before_swa_start_nothing_is_averaged(tmp_path, shapes):
    run = quiet_train(tmp_path, shapes, swa=True, epochs=2, swa_start=5, name="early")
    last = torch.load(run.last, weights_only=True)
    key = conv_weight(last["model"])
    assert torch.equal(last["model"][key], last["train"]["model"]["model"][key])  # the raw weights ship
    assert int(last["swa"]["model"]["n_averaged"]) == 0 and last["swa"]["schedulers"] == []


def test_a_run_stopped_inside_swa_resumes_exactly(tmp_path, shapes):
    args = ["--data", shapes, "--model", "fcn", "--batch", "4", "--img-size", "40", "--workers", "0",
            "--swa", "--swa-start", "2", "--out", tmp_path / "runs"]  # fmt: skip

    def train(*extra):
        cmd = [sys.executable, "-m", "seglab", "train", *map(str, args), *map(str, extra)]
        proc = subprocess.run(cmd, cwd=tmp_path, env=ONE_THREAD, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]

    train("--epochs", "4", "--name", "straight")
    train("--epochs", "3", "--name", "cut")  # stops after two epochs of averaging, then goes on
    train("--resume", tmp_path / "runs" / "cut" / "weights" / "last.pt", "--epochs", "4")
    a = torch.load(tmp_path / "runs/straight/weights/last.pt", weights_only=True)
    b = torch.load(tmp_path / "runs/cut/weights/last.pt", weights_only=True)
    assert int(b["swa"]["model"]["n_averaged"]) == 3
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert a["swa"]["schedulers"] == b["swa"]["schedulers"]


def test_swa_and_ema_are_refused_together_and_bad_values_named(tmp_path, shapes):
    with pytest.raises(SeglabError, match="--ema and --swa are two ways to average the weights"):
        quiet_train(tmp_path, shapes, swa=True, ema=True)
    with pytest.raises(SeglabError, match="--swa-start is an epoch"):
        quiet_train(tmp_path, shapes, swa=True, swa_start=0)
    with pytest.raises(SeglabError, match="--swa-lr must be positive"):
        quiet_train(tmp_path, shapes, swa=True, swa_lr=-1.0)


def test_two_ranks_ship_one_average(tmp_path, shapes):
    """Under torchrun every rank averages the same weights; rank 0's BatchNorm statistics are sent to
    the others before validation, so the 2-rank val score is what one process scores the file at."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "seglab",
           "train", "--data", shapes, "--model", "fcn", "--epochs", "3", "--batch", "2", "--img-size", "40",
           "--workers", "0", "--swa", "--swa-start", "2", "--name", "ddp"]  # fmt: skip
    proc = subprocess.run([str(c) for c in cmd], cwd=tmp_path, env=ONE_THREAD, capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run = tmp_path / "runs/train/ddp"
    last = torch.load(run / "weights/last.pt", weights_only=True)
    assert int(last["swa"]["model"]["n_averaged"]) == 2
    logged = float(list(csv.DictReader((run / "metrics.csv").open()))[-1]["val_miou"])
    cfg = last["config"]
    single = seglab.load(run / "weights/last.pt").evaluate(
        cfg["data"], limit=cfg["limit"], val_fraction=cfg["val_fraction"], seed=cfg["seed"], workers=0, progress=False
    )
    assert abs(single.metrics["miou"] - logged) <= 1e-5
