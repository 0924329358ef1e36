"""`seglab prune`: channels really removed, FLOP target met, output contract kept, every architecture,
pruned checkpoints that load and predict, and the command line end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import seglab
from seglab.cli import main
from seglab.deploy.prune import UNPRUNABLE, prune, prune_checkpoint
from seglab.engine.checkpoint import load_model, make_payload, save_checkpoint
from seglab.errors import SeglabError
from seglab.models import MODELS, SegmentationModel

SIZE = (48, 64)  # H, W of the FLOP count; the models pad it to a multiple of their stride


def conv_widths(model: nn.Module) -> dict[str, tuple[int, int]]:
    return {n: (m.in_channels, m.out_channels) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def load(path: Path) -> SegmentationModel:
    model, _, _ = load_model(path)
    assert isinstance(model, SegmentationModel)
    return model


def check_pruned(model: SegmentationModel, flops: float) -> SegmentationModel:
    """Prune ``model`` and check what every pruned model must satisfy; returns the pruned one."""
    before = conv_widths(model)
    result = prune(model, flops=flops, input_size=SIZE, step=0.1)  # coarse steps: a quick test
    pruned = result.model
    after = conv_widths(pruned)

    assert result.flops_removed >= flops
    assert result.params_after < result.params_before == n_params(model)
    assert result.params_after == n_params(pruned)
    assert conv_widths(model) == before, "the model passed in is left as it was"
    assert after.keys() == before.keys(), "layers are narrowed, never removed"
    narrower = [n for n in before if after[n][1] < before[n][1]]
    assert len(narrower) > len(before) // 2, "most convolutions lose output channels"
    first = next(iter(before))
    assert after[first][0] == before[first][0] == model.in_channels, "the image's channels stay"
    for name, (_, out) in before.items():
        if out == model.num_classes:
            assert after[name][1] == out, f"{name} writes the class scores and keeps them"

    x = torch.randn(2, model.in_channels, 37, 53)  # any size, as before pruning
    with torch.no_grad():
        assert pruned.eval()(x).shape == (2, model.num_classes, 37, 53)
    assert pruned.encoder.out_channels == [f.shape[1] for f in pruned.encoder(x)]
    return pruned


def test_prune_removes_real_channels_and_meets_the_flop_target(make_checkpoint):
    model = load(make_checkpoint("lraspp", "efficientnet_lite0"))
    pruned = check_pruned(model, flops=0.3)
    # a depthwise conv keeps groups == channels, so its input and output shrink together
    depthwise = [m for m in pruned.modules() if isinstance(m, nn.Conv2d) and m.groups > 1]
    assert depthwise and all(m.groups == m.in_channels == m.out_channels for m in depthwise)


SUPPORTED = [(arch, None) for arch in sorted(MODELS) if arch not in UNPRUNABLE] + [("lraspp", "efficientnet_lite0")]


@pytest.mark.slow
@pytest.mark.parametrize(("arch", "encoder"), SUPPORTED)
def test_every_supported_architecture_prunes(make_checkpoint, arch, encoder, tmp_path):
    model, card, _ = load_model(make_checkpoint(arch, encoder))
    pruned = check_pruned(model, flops=0.2)
    # the pruned architecture travels as layer widths and is rebuilt from them, for every architecture
    save_checkpoint(tmp_path / "p.pt", make_payload(pruned, card, pruned=True, config={}, metrics=None))
    rebuilt, _, _ = load_model(tmp_path / "p.pt")
    x = torch.randn(1, model.in_channels, 37, 53)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), pruned.eval()(x))


def test_fcn_prunes_its_three_summed_scorers_together(make_checkpoint):
    """FCN's three class scorers are summed: none loses a class, and the convs feeding them shrink."""
    check_pruned(load(make_checkpoint("fcn")), flops=0.1)


def test_segnet_is_refused_with_the_reason(make_checkpoint):
    model = load(make_checkpoint("segnet", "vgg11_bn"))
    with pytest.raises(SeglabError, match=r"segnet cannot be pruned: .*max-pooling indices"):
        prune(model, flops=0.3, input_size=SIZE)


@pytest.mark.parametrize("flops", [0, 1, -0.2, 1.5])
def test_flops_outside_0_1_is_refused(make_checkpoint, flops):
    model = load(make_checkpoint("fcn"))
    with pytest.raises(SeglabError, match="between 0 and 1"):
        prune(model, flops=flops, input_size=SIZE)


def test_pruned_checkpoint_loads_and_predicts(make_checkpoint, tmp_path):
    path = make_checkpoint("lraspp", "efficientnet_lite0")
    model, card, _ = load_model(path)
    assert isinstance(model, SegmentationModel)
    pruned = prune(model, flops=0.3, input_size=SIZE, step=0.1).model
    saved = tmp_path / "pruned.pt"
    save_checkpoint(saved, make_payload(pruned, card, pruned=True, config={}, metrics=None))
    stored = torch.load(saved, weights_only=True)  # plain data: layer widths, no pickled module
    assert "module" not in stored
    assert {name: tuple(stored["layers"][name][:2]) for name in conv_widths(pruned)} == conv_widths(pruned)

    loaded = seglab.load(saved, device="cpu")
    assert conv_widths(loaded.model) == conv_widths(pruned)
    image = np.random.default_rng(0).integers(0, 256, (40, 56, 3), dtype=np.uint8)
    result = loaded.predict(image)
    assert result.mask.shape == (40, 56)
    x = torch.randn(1, 3, 40, 56)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x), pruned.eval()(x))


def test_prune_only_without_fine_tune(make_checkpoint, tiny_dataset, tmp_path):
    """--epochs 0: the pruned model is saved as it is, with its card and the original's config."""
    original = make_checkpoint("fcn")
    best = prune_checkpoint(
        original, flops=0.05, epochs=0, data=str(tiny_dataset), out=tmp_path / "p", report=False, log=print
    )
    assert best == tmp_path / "p" / "weights" / "best.pt"
    assert n_params(load(best)) < n_params(load(original))
    assert seglab.load(best, device="cpu").classes == seglab.load(original, device="cpu").classes


# ---------------------------------------------------------------------------------------------- CLI


@pytest.fixture
def trained_tiny(tiny_dataset, tmp_path) -> Path:
    """A 1-epoch FCN on the 3-class tiny dataset: a checkpoint whose config names its data."""
    run = seglab.train(
        data=str(tiny_dataset),
        model="fcn",
        encoder="resnet18",
        epochs=1,
        batch=2,
        img_size=32,
        workers=0,
        plots=False,
        out=str(tmp_path / "runs" / "train"),
        name="tiny",
        progress=False,
        log=lambda *a, **k: None,
    )
    return run.best


def test_prune_command_end_to_end(trained_tiny, tmp_path):
    flags = ["--weights", trained_tiny, "--flops", "0.3", "--epochs", "1", "--workers", "0", "--limit", "1"]
    proc = subprocess.run(
        [sys.executable, "-m", "seglab", "prune", *flags],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "GFLOPs at 32x32 (" in proc.stdout  # before -> after, at the training crop
    run_dir = tmp_path / "runs" / "prune" / "tiny"
    best = run_dir / "weights" / "best.pt"
    report = json.loads((run_dir / "report.json").read_text())
    assert [row["name"] for row in report["rows"]] == ["float", "pruned"]
    assert report["rows"][1]["gflops"] < 0.7 * report["rows"][0]["gflops"]
    assert (run_dir / "report.md").is_file()
    pruned, original = load(best), load(trained_tiny)
    assert n_params(pruned) < n_params(original)
    assert seglab.load(best, device="cpu").predict(np.zeros((6, 8, 3), dtype=np.uint8)).mask.shape == (6, 8)


@pytest.mark.parametrize(
    ("flags", "fragment"),
    [
        (["--flops", "1.5"], "--flops 1.5"),
        (["--flops", "0"], "--flops 0"),
        (["--epochs", "-1"], "--epochs -1"),
        (["--lr", "0"], "--lr 0"),
        (["--flops", "lots"], "--flops"),
    ],
)
def test_bad_flags_are_one_line_exit_2(make_checkpoint, capsys, flags, fragment):
    assert main(["prune", "--weights", str(make_checkpoint("fcn")), *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("seglab: error:") and fragment in err[0], err


def test_missing_weights_and_segnet_are_one_line_exit_2(make_checkpoint, tmp_path, capsys):
    assert main(["prune", "--weights", str(tmp_path / "nope.pt")]) == 2
    assert "weights file not found" in capsys.readouterr().err
    segnet = make_checkpoint("segnet", "vgg11_bn")
    assert main(["prune", "--weights", str(segnet), "--data", str(tmp_path), "--out", str(tmp_path / "p")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "segnet cannot be pruned" in err[0], err


def test_the_fine_tune_runs_its_epochs_not_the_training_runs_time_budget(make_checkpoint):
    from seglab.deploy.prune import finetune_config
    from seglab.engine.checkpoint import card_from_dict

    ckpt = torch.load(make_checkpoint("fcn"), weights_only=True)
    ckpt["config"] = {"data": "camvid", "time": 10.0, "epochs": 40, "resume": "runs/train/exp/weights/last.pt"}
    cfg = finetune_config(ckpt, card_from_dict(ckpt["card"], "best.pt"), epochs=3)
    assert cfg.time is None and cfg.epochs == 3 and cfg.resume is None
