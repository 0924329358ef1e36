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


# ---------------------------------------------------------------------------- --time


def test_a_time_budget_counts_epochs_and_validations_into_what_is_left():
    from seglab.engine.schedule import TimeBudget

    budget = TimeBudget(minutes=100 / 60)  # 100 s, none used
    budget.train_s, budget.val_s = [10.0], [5.0]
    # validating every epoch: n more epochs cost 10 n + 5 (n + 1) <= 100 -> n = 6
    assert budget.epochs(1, val_interval=1) == 7
    # every third epoch, and the last: 8 more cost 80 + 5 x 3 (epochs 3, 6, 9); 9 more cost 90 + 20
    assert budget.epochs(1, val_interval=3) == 9
    budget.used_s = 96.0  # 4 s left: not even the epoch just trained can be validated in time
    assert budget.epochs(4, val_interval=1) == 4
    assert not budget.over()
    budget.used_s = 100.0
    assert budget.over()


def test_the_minutes_after_the_whole_epochs_go_to_a_last_part_epoch():
    from seglab.engine.schedule import Plan, TimeBudget

    budget = TimeBudget(minutes=100 / 60)
    budget.train_s, budget.val_s = [20.0], [5.0]
    plan = Plan(steps_per_epoch=10, epochs=30)
    # after epoch 1: 3 more whole epochs cost 60 + 5 x 4 = 80 s; the 20 s spare, less its validation,
    # hold 0.75 of an epoch: a fifth epoch of 7 steps, and the schedule ends at step 47
    budget.fit(plan, 1, val_interval=1)
    assert (plan.epochs, plan.last_epoch_steps, plan.total) == (5, 7, 47)
    assert plan.describe() == "5 epochs, the last one 7 of its 10 steps"
    budget.used_s = 12.0  # 8 s spare: less than a quarter of an epoch after its validation, so whole epochs only
    budget.fit(plan, 1, val_interval=1)
    assert (plan.epochs, plan.last_epoch_steps, plan.total) == (4, 0, 40)


def test_a_part_epoch_stops_after_its_steps_and_is_validated(tmp_path, shapes):
    from seglab.config import load_train_config
    from seglab.engine.trainer import Trainer
    from seglab.tasks import get_task

    base = dict(data=str(shapes), model="fcn", epochs=2, batch=2, img_size=40, workers=0, out=str(tmp_path))
    cfg = load_train_config(None, **base, val_interval=5)
    trainer = Trainer(cfg, get_task(cfg.task), progress=False, log=lambda _: None)
    trainer.plan.last_epoch_steps = 2  # of 6: what a budget's fit sets
    out = trainer.fit()
    assert len(out["rows"]) == 2 and out["rows"][-1]["val_miou"] != ""
    last = torch.load(out["run_dir"] / "weights" / "last.pt", weights_only=True)
    assert last["train"]["model"]["scheduler"]["last_epoch"] == 6 + 2
    assert last["planned_last_steps"] == 2


def test_the_schedule_follows_the_plan_as_the_budget_changes_it():
    from seglab.config import TrainConfig
    from seglab.engine.schedule import Plan, build_scheduler

    plan = Plan(steps_per_epoch=10, epochs=5)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = build_scheduler(optimizer, TrainConfig(scheduler="poly", warmup_epochs=0, poly_power=1.0), plan)
    for _ in range(25):
        optimizer.step()
        scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1 - 25 / 50)
    plan.epochs = 10  # the budget holds twice the epochs: the same step is now a quarter of the way
    optimizer.step()
    scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1 - 26 / 100)
    plan.epochs = 3  # and a third of them: the run ends at step 30, the rate with it
    for _ in range(4):
        optimizer.step()
        scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.0)
    assert all(v is None for v in scheduler.state_dict()["lr_lambdas"])  # nothing but plain data saved


def test_training_for_minutes_fits_the_epochs_validates_the_last_and_resumes_with_what_is_left(tmp_path, shapes):
    messages: list[str] = []
    minutes = 0.15
    run = quiet_train(tmp_path, shapes, messages, epochs=400, time=minutes, name="timed")
    last = torch.load(run.last, weights_only=False)
    rows = run.rows
    assert 1 <= len(rows) < 400 and last["planned_epochs"] == len(rows)  # fitted to the time, not --epochs
    assert rows[-1]["val_miou"] != ""  # the last epoch validates, whatever --val-interval says
    spent = last["time_budget"]["used_s"]
    longest = max(float(r["epoch_time_s"]) for r in rows)
    assert spent <= 60 * minutes + longest  # it never starts an epoch it expects to end past the budget
    assert any(f"{len(rows)} epochs in" in m and "of --time 0.15 min" in m for m in messages)

    # more minutes for the finished run: it goes on from where it stopped, the minutes used counted
    messages.clear()
    # (4x: room after a first validation slowed by a busy machine)
    more = quiet_train(tmp_path, shapes, messages, resume=str(run.last), time=4 * minutes)
    again = torch.load(more.last, weights_only=False)
    assert len(more.rows) > len(rows), "\n".join(messages)
    assert again["time_budget"]["used_s"] > spent
    assert any(m.startswith("resume: continuing") for m in messages)


def test_a_spent_budget_cuts_the_epoch_short_and_validates_it(tmp_path, shapes):
    from seglab.config import load_train_config
    from seglab.engine.trainer import Trainer
    from seglab.tasks import get_task

    messages: list[str] = []
    base = dict(data=str(shapes), model="fcn", epochs=5, batch=2, img_size=40, workers=0, out=str(tmp_path))
    cfg = load_train_config(None, **base, time=1.0, val_interval=3)
    trainer = Trainer(cfg, get_task(cfg.task), progress=False, log=messages.append)
    assert trainer.budget is not None
    trainer.budget.used_s = 60.0  # the minute is already spent when training starts
    out = trainer.fit()
    assert len(out["rows"]) == 1 and out["rows"][0]["val_miou"] != ""  # one step, then validated
    assert "train: --time 1 min spent at epoch 1, step 1" in messages
    last = torch.load(out["run_dir"] / "weights" / "last.pt", weights_only=False)
    assert last["train"]["model"]["scheduler"]["last_epoch"] == 1  # 1 of the epoch's 6 steps


def test_time_must_be_positive(tmp_path, shapes):
    from seglab.errors import SeglabError

    with pytest.raises(SeglabError, match="--time is minutes of training and must be more than 0"):
        quiet_train(tmp_path, shapes, time=0)
