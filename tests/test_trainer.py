"""Training options that change what the loop does: EMA, accumulation, class weights, schedules."""

from __future__ import annotations

import math

import pytest
import torch

import seglab
from seglab.data.synthetic import make_shapes_dataset


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return make_shapes_dataset(tmp_path_factory.mktemp("shapes"), n_train=12, n_val=4, size=40, seed=5)


def quiet_train(tmp_path, shapes, messages=None, **kw):
    log = messages.append if messages is not None else (lambda *a: None)
    base = dict(data=str(shapes), model="fcn", epochs=1, batch=4, img_size=40, workers=0, out=str(tmp_path))
    return seglab.train(progress=False, log=log, **{**base, **kw})


def test_ema_weights_are_saved_and_differ_from_the_raw_weights(tmp_path, shapes):
    run = quiet_train(tmp_path, shapes, ema=True, ema_decay=0.5, epochs=2)
    last = torch.load(run.last, weights_only=False)
    best = torch.load(run.best, weights_only=False)
    key = next(k for k in last["model"] if k.endswith("weight") and last["model"][k].ndim == 4)
    assert not torch.equal(last["model"][key], last["train"]["model"]["model"][key])  # EMA != raw
    assert last["ema"] is not None
    # the evaluated and shipped weights are the EMA ones
    ema_state = {k.removeprefix("module."): v for k, v in last["ema"].items() if k.startswith("module.")}
    assert torch.equal(last["model"][key], ema_state[key])
    assert set(best["model"]) == set(last["model"])


def test_gradient_accumulation_steps_the_optimiser_less_often(tmp_path, shapes):
    # 12 images, batch 2 -> 6 batches; accumulate 4 -> ceil(6 / 4) = 2 optimiser steps per epoch
    run = quiet_train(tmp_path, shapes, batch=2, accumulate=4, epochs=2, name="acc")
    last = torch.load(run.last, weights_only=False)
    assert last["train"]["model"]["scheduler"]["last_epoch"] == 2 * math.ceil(6 / 4)
    assert last["config"]["accumulate"] == 4


def test_class_weights_sgd_cosine_and_compound_loss(tmp_path, shapes):
    messages: list[str] = []
    run = quiet_train(
        tmp_path,
        shapes,
        messages,
        class_weights="median",
        optimizer="sgd",
        scheduler="cosine",
        loss="ce+dice",
        lr=0.05,
        name="cw",
    )
    assert any("median class weights" in m and "background" in m for m in messages)
    last = torch.load(run.last, weights_only=False)
    assert "momentum_buffer" in next(iter(last["train"]["model"]["optimizer"]["state"].values()))  # SGD with momentum
    assert math.isfinite(float(run.rows[-1]["train_loss"]))


def test_holdout_is_logged_when_there_is_no_val_split(tmp_path, shapes):
    import shutil

    no_val = tmp_path / "noval"
    shutil.copytree(shapes, no_val)
    shutil.rmtree(no_val / "images" / "val")
    shutil.rmtree(no_val / "masks" / "val")
    messages: list[str] = []
    run = quiet_train(tmp_path, no_val, messages, val_fraction=0.25, name="holdout")
    assert any("holding out" in m and "seed" in m for m in messages), messages
    assert run.best.is_file()


def test_run_folders_increment(tmp_path, shapes):
    first = quiet_train(tmp_path, shapes, name="same")
    second = quiet_train(tmp_path, shapes, name="same")
    assert (first.run_dir.name, second.run_dir.name) == ("same", "same2")


def test_amp_dtype_is_checked_and_used(tmp_path, shapes):
    messages: list[str] = []
    quiet_train(tmp_path, shapes, messages, amp=True, amp_dtype="bfloat16", name="bf16")
    assert any("amp bfloat16" in m for m in messages), messages
    with pytest.raises(seglab.SeglabError, match="--amp-dtype 'half'"):
        quiet_train(tmp_path, shapes, amp=True, amp_dtype="half", name="bad")
