"""The engine's features for detectors and generators, as test_faults.py checks them for semantic
models: EMA, SIGTERM mid-epoch save, kill -9, resume ending bit-identical to an uninterrupted run,
and --nonfinite skip."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from test_faults import ONE_THREAD, start, wait_for

RUNS = {"instance": "runs/train", "generate": "runs/gen"}


def task_args(task: str, data: dict[str, Path], name: str) -> list[str]:
    """Two short epochs with EMA on, so the average is saved and resumed too."""
    common = [
        "--epochs",
        "2",
        "--batch",
        "2",
        "--seed",
        "3",
        "--ema",
        "--ema-decay",
        "0.9",
        "--no-plots",
        "--name",
        name,
    ]
    if task == "instance":
        # ResNet-18 under the pyramid, not the default ResNet-50: the engine is what is tested, in 2.5x less time
        return ["train", "--task", "instance", "--data", str(data["facades"]), "--img-size", "96", "--limit", "6",
                "--encoder", "resnet18", "--workers", "0", *common]  # fmt: skip
    return ["gen", "train", "--data", str(data["camvid"]), "--model", "pix2pix", "--img-size", "48", "--width", "8",
            "--disc-width", "8", "--limit", "6", *common]  # fmt: skip


@pytest.fixture(scope="module")
def data(shared_data: Path) -> dict[str, Path]:
    return {"facades": shared_data / "facade_coco", "camvid": shared_data / "camvid"}


def run_seglab(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "seglab", *args], cwd=cwd, env=ONE_THREAD, capture_output=True,
                          text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc


def weights(path: Path) -> dict[str, dict[str, torch.Tensor]]:
    """Every network's weights in a last.pt, the EMA's too."""
    ckpt = torch.load(path, weights_only=True)
    out = {name: part["model"] for name, part in ckpt["train"].items()}
    return {**out, "shipped": ckpt["model"], "ema": ckpt["ema"]}


def assert_same(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for net in wa:
        for key, value in wa[net].items():
            assert torch.equal(value, wb[net][key]), (net, key)


# Mask R-CNN's five runs take minutes (-m slow runs them); the generator's go through the same engine
# checkpoint and resume code, as test_faults.py's semantic runs do.
@pytest.mark.parametrize("task", [pytest.param("instance", marks=pytest.mark.slow), "generate"])
def test_stop_kill_and_resume_end_where_an_uninterrupted_run_ends(tmp_path, data, task):
    resume = ["train"] if task == "instance" else ["gen", "train"]
    runs = tmp_path / RUNS[task]
    run_seglab(task_args(task, data, "straight"), tmp_path)
    straight = runs / "straight/weights/last.pt"
    ckpt = torch.load(straight, weights_only=True)
    assert ckpt["ema"] is not None
    shipped, trained = ckpt["model"], next(iter(ckpt["train"].values()))["model"]
    assert any(not torch.equal(shipped[k], trained[k]) for k in shipped if shipped[k].is_floating_point())

    # SIGTERM: saved after the step it lands in, mid-epoch; the resume finishes the run
    proc = start(task_args(task, data, "stopped"), tmp_path)
    wait_for(proc, "run folder")
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == 128 + signal.SIGTERM, out[-2000:]
    last = runs / "stopped/weights/last.pt"
    saved = torch.load(last, weights_only=True)
    assert saved["epoch"] == 0 and saved["batch_in_epoch"] >= 1, (saved["epoch"], saved["batch_in_epoch"])
    resumed = run_seglab([*resume, "--resume", str(last)], tmp_path)
    assert f"batch {saved['batch_in_epoch'] + 1}" in resumed.stdout
    assert_same(straight, last)

    # kill -9 inside epoch 2: the resume replays it from epoch 1's last.pt
    proc = start(task_args(task, data, "killed"), tmp_path)
    wait_for(proc, "epoch 1/2:")
    proc.kill()
    proc.communicate(timeout=60)
    last = runs / "killed/weights/last.pt"
    run_seglab([*resume, "--resume", str(last)], tmp_path)
    assert_same(straight, last)


class NaNOnSecondStep:
    """Wraps a task's step: the second step's first loss is NaN."""

    def __init__(self, step):
        self.step, self.calls = step, 0

    def __call__(self, batch, nets):
        self.calls += 1
        for part, loss, values in self.step(batch, nets):
            yield part, loss * float("nan") if self.calls == 2 else loss, values


@pytest.mark.parametrize("task", ["instance", "generate"])
def test_nonfinite_skip_drops_the_step_for_every_task(tmp_path, data, task):
    from seglab.engine.trainer import Trainer
    from seglab.tasks import get_task

    if task == "instance":
        from seglab.config import load_train_config

        cfg = load_train_config(task="instance", data=str(data["facades"]), img_size=96, limit=6, batch=2,
                                epochs=1, workers=0, out=str(tmp_path), nonfinite="skip", plots=False)  # fmt: skip
    else:
        from seglab.gen.trainer import load_gen_config

        cfg, _ = load_gen_config(data=str(data["camvid"]), img_size=48, width=8, disc_width=8, limit=6, batch=2,
                                 epochs=1, out=str(tmp_path), nonfinite="skip")  # fmt: skip
    trainer = Trainer(cfg, get_task(getattr(cfg, "task", "generate")), progress=False, log=lambda *a: None)
    trainer.task.step = NaNOnSecondStep(trainer.task.step)  # type: ignore[method-assign]
    trainer.fit()
    assert trainer.skipped_steps == 1
    steps = [scheduler.last_epoch for _, scheduler in trainer.parts.values()]
    assert steps == [3 - 1] * len(steps)  # 6 images, batch 2: three steps, one skipped
    for model in trainer.models.values():
        assert all(torch.isfinite(p).all() for p in model.parameters())


def test_every_task_result_speaks_the_same_protocol(tmp_path):
    """A semantic and a detector result: the same members, a JSON dict, atomic files, a one-line repr."""
    import json

    import numpy as np

    from seglab.engine.predictor import Result, SegResult
    from seglab.instance.predictor import Detections, InstanceResult

    image = np.full((20, 30, 3), 90, dtype=np.uint8)
    mask = np.zeros((20, 30), dtype=np.uint8)
    mask[5:15, 10:20] = 1
    classes, colors = ["background", "window"], [(0, 0, 0), (200, 30, 30)]
    found = Detections(
        boxes=np.array([[10, 5, 20, 15]], dtype=np.float32),
        labels=np.array([1]),
        scores=np.array([0.9], dtype=np.float32),
        masks=mask[None].astype(bool),
        names=["window"],
    )
    results = [SegResult(image, mask, classes, colors), InstanceResult(image, found, classes, colors)]
    for result, task in zip(results, ["semantic", "instance"], strict=True):
        assert isinstance(result, Result) and result.task == task
        assert isinstance(json.loads(json.dumps(result.to_json())), dict)
        assert result.plot().shape == (20, 30, 3)
        written = result.save(tmp_path / task, name="a")
        assert written and all(path.is_file() for path in written.values())
        assert not list((tmp_path / task).rglob(".*tmp*"))  # nothing half-written left beside them
        assert "\n" not in repr(result) and "window" in repr(result), repr(result)


def test_resume_auto_starts_the_named_run_then_continues_it(tmp_path):
    import seglab
    from seglab.data.synthetic import make_shapes_dataset

    data = make_shapes_dataset(tmp_path / "d", n_train=8, n_val=4, size=32, seed=1)
    (tmp_path / "runs/auto").mkdir(parents=True)  # exists, holds no last.pt: started in place, not as auto2
    common = dict(data=str(data), model="fcn", img_size=32, batch=4, workers=0, out=str(tmp_path / "runs"),
                  name="auto", resume="auto", plots=False, progress=False)  # fmt: skip
    first = seglab.train(epochs=1, log=lambda *a: None, **common)
    assert first.run_dir == tmp_path / "runs/auto" and len(first.rows) == 1
    messages: list[str] = []
    second = seglab.train(epochs=2, log=messages.append, **common)
    assert second.run_dir == first.run_dir and [r["epoch"] for r in second.rows] == [1, 2]
    assert any("resume: continuing" in m and "from epoch 2/2" in m for m in messages), messages
