"""StyleGAN2 (``seglab gen train --model stylegan``): shapes, modulation, style mixing, truncation,
a loss step, exact resume, and train + sample (truncation, mixing grid) end to end on CamVid pairs."""

from __future__ import annotations

import csv
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from seglab.cli import main
from seglab.engine.checkpoint import load_checkpoint
from seglab.engine.trainer import Trainer
from seglab.gen.config import GenConfig
from seglab.gen.models import GenCard, build_discriminator
from seglab.gen.stylegan import StyleGAN2Generator, minibatch_stddev, modulated_conv2d
from seglab.gen.task import GenTask
from seglab.gen.trainer import train_generator

TINY = dict(img_size=32, width=8, disc_width=8, z_dim=16, batch=2, limit=4)  # CamVid at 24x32, 2 steps an epoch


def generator(size: tuple[int, int] = (24, 32), seed: int = 0) -> StyleGAN2Generator:
    torch.manual_seed(seed)
    g = StyleGAN2Generator(16, size, width=8).eval()
    g.w_avg.copy_(torch.randn(16))  # a mean w that is not zero, as after training
    return g


# ---------------------------------------------------------------- networks
@pytest.mark.parametrize(
    ("size", "const", "num_ws"),
    [((48, 64), (3, 4), 10), ((37, 53), (3, 4), 10), ((64, 64), (4, 4), 10), ((16, 16), (4, 4), 6)],
)
def test_shapes_and_a_constant_of_the_images_aspect(size, const, num_ws):
    card = GenCard("stylegan", list(size), width=8, z_dim=16)
    g, d = card.build(), build_discriminator(card, width=8)
    assert isinstance(g, StyleGAN2Generator) and g.num_ws == num_ws
    assert tuple(g.const.shape[-2:]) == const  # CamVid's 3:4 starts from 3x4, not a padded square
    out = g(torch.randn(3, 16))
    assert out.shape == (3, 3, *size)
    assert d(out).shape == (3, 1)
    assert "w_avg" in g.state_dict()  # saved with the model


def test_demodulation_keeps_the_activations_scale_whatever_the_styles():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 64, 16, 16, generator=g)
    weight = torch.randn(32, 64, 3, 3, generator=g)
    styles = torch.rand(4, 64, generator=g) * torch.tensor([0.01, 1.0, 10.0, 100.0])[:, None]
    out = modulated_conv2d(x, weight, styles)
    assert torch.allclose(out.std(dim=(1, 2, 3)), torch.ones(4), atol=0.15)  # unit in, unit out
    assert torch.allclose(modulated_conv2d(x, weight, 3 * styles), out, atol=1e-4)  # a style's scale cancels
    plain = modulated_conv2d(x, weight, styles, demodulate=False)
    assert plain[3].std() > 100 * plain[0].std()  # without demodulation it would not
    # the grouped convolution is each sample's own convolution with its own weights
    w1 = weight * styles[1][None, :, None, None]
    w1 = w1 / w1.square().sum(dim=(1, 2, 3), keepdim=True).sqrt()
    assert torch.allclose(out[1:2], F.conv2d(x[1:2], w1, padding=1), atol=1e-4)


def test_style_mixing_uses_both_ws():
    g = generator()
    z, z2 = torch.randn(2, 16), torch.randn(2, 16)
    with torch.no_grad():
        single, other = g(z, noise="const"), g(z2, noise="const")
        mixed = g(z, (z2, 4), noise="const")
        assert not torch.allclose(mixed, single) and not torch.allclose(mixed, other)
        assert torch.equal(g(z, (z.clone(), 4), noise="const"), single)  # the same w twice: no mixing
        # layers 0..3 take z's w, layers 4.. z2's
        ws = torch.cat([g.broadcast(g.mapping(z))[:, :4], g.broadcast(g.mapping(z2))[:, 4:]], dim=1)
        assert torch.allclose(g.synthesis(ws, noise="const"), mixed, atol=1e-5)


def test_truncation_zero_gives_the_mean_image_for_any_z():
    g = generator()
    z = torch.randn(4, 16)
    with torch.no_grad():
        mean_image = g.synthesis(g.broadcast(g.w_avg[None]), noise="const")[0]
        for noise in ("const", "none"):  # noise fixed or off: the image is a function of w alone
            images = g(z, psi=0.0, noise=noise)
            assert torch.allclose(images, images[:1].expand_as(images), atol=1e-5), noise
        assert torch.allclose(g(z, psi=0.0, noise="const"), mean_image.expand(4, -1, -1, -1), atol=1e-5)
        half = g(z, psi=0.5, noise="const")
        assert not torch.allclose(half[0], half[1])  # psi > 0: z matters again
        assert torch.equal(g(z, psi=1.0, noise="const"), g(z, noise="const"))


def test_minibatch_stddev_sees_a_batch_of_copies():
    x = torch.randn(1, 8, 4, 4).expand(4, -1, -1, -1)
    assert minibatch_stddev(x)[:, -1].max() < 1e-3
    assert minibatch_stddev(torch.randn(4, 8, 4, 4))[:, -1].min() > 0.5
    assert minibatch_stddev(torch.randn(6, 8, 4, 4)).shape == (6, 9, 4, 4)  # groups of 2 when 4 does not divide


# ---------------------------------------------------------------- training
@pytest.fixture(scope="module")
def camvid(shared_data: Path) -> Path:
    return shared_data / "camvid"


def test_a_loss_step_updates_both_networks_and_the_mean_w(camvid: Path, tmp_path: Path):
    from torch.utils.data import default_collate

    cfg = GenConfig(data=str(camvid), model="stylegan", out=str(tmp_path), epochs=1, **TINY)
    assert (cfg.lr, cfg.beta1) == (2e-3, 0.0)  # StyleGAN2's Adam unless given
    trainer = Trainer(cfg, GenTask, progress=False, log=lambda *_: None)
    g, d = trainer.models["generator"], trainer.models["discriminator"]
    before = [[p.detach().clone() for p in net.parameters()] for net in (g, d)]
    batch = default_collate([trainer.task.train_set[i] for i in (0, 1)])
    logged = []
    for _ in range(2):
        logged.append(trainer._step(batch, 0, 0, boundary=True))
        trainer._finish_step()
    for net, old in zip((g, d), before, strict=True):
        assert all(not torch.equal(p, q) for p, q in zip(net.parameters(), old, strict=True)), type(net).__name__
    assert g.w_avg.abs().sum() > 0
    assert logged[0]["r1"] > 0 and logged[1]["r1"] == 0  # lazy R1: the first of every 16 steps
    assert all(np.isfinite(v) for step in logged for v in step.values())


def test_resume_is_exact(camvid: Path, tmp_path: Path):
    """A run stopped after its first step (as by Ctrl-C) and resumed ends with the weights, mean w
    and R1 timing of the run that was never stopped (the approach of test_gen's resume test)."""
    import signal

    quiet = dict(progress=False, log=lambda *_: None)
    common = dict(data=str(camvid), model="stylegan", out=str(tmp_path), epochs=2, **TINY)
    train_generator(name="straight", **common, **quiet)
    stopped = Trainer(GenConfig(name="resumed", **common), GenTask, **quiet)
    stopped.stop_signal = signal.SIGINT
    assert stopped.fit()["stopped"] == signal.SIGINT
    assert load_checkpoint(tmp_path / "resumed" / "weights" / "last.pt")["task_state"] == {"d_steps": 1}
    train_generator(resume=str(tmp_path / "resumed" / "weights" / "last.pt"), **quiet)
    a = load_checkpoint(tmp_path / "straight" / "weights" / "last.pt")
    b = load_checkpoint(tmp_path / "resumed" / "weights" / "last.pt")
    assert a["task_state"] == b["task_state"] == {"d_steps": 4}
    for net in ("generator", "discriminator"):
        sa, sb = a["train"][net]["model"], b["train"][net]["model"]
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa), net
    assert torch.equal(a["model"]["w_avg"], b["model"]["w_avg"]) and a["model"]["w_avg"].abs().sum() > 0


# ---------------------------------------------------------------- commands end to end
def test_gen_train_and_sample_end_to_end(camvid: Path, tmp_path: Path, capsys):
    args = ["--img-size", "32", "--width", "8", "--disc-width", "8", "--z-dim", "16", "--batch", "2"]
    train = ["gen", "train", "--model", "stylegan", "--data", str(camvid), "--epochs", "1", "--limit", "4", *args]
    assert main([*train, "--amp", "--out", str(tmp_path), "--name", "sg"]) == 0
    run = tmp_path / "sg"
    assert (run / "samples" / "epoch_001.png").is_file()
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    assert len(rows) == 1 and float(rows[0]["loss_d"]) > 0 and float(rows[0]["r1"]) > 0
    weights = str(run / "weights" / "generator.pt")

    def sample(out: str, *more: str) -> int:
        return main(["gen", "sample", "--weights", weights, "--out", str(tmp_path / out), *more])

    assert sample("a", "--n", "3", "--truncation", "0.5", "--seed", "1") == 0
    assert sample("b", "--n", "3", "--truncation", "0.5", "--seed", "1") == 0
    assert sample("c", "--n", "3", "--truncation", "0.5", "--seed", "2") == 0
    a, b, c = ([np.asarray(Image.open(p)) for p in sorted((tmp_path / x).iterdir())] for x in "abc")
    assert len(a) == 3 and a[0].shape == (24, 32, 3)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))  # --seed: the same images
    assert not np.array_equal(a[0], c[0])

    assert sample("grid", "--mixing-grid", "2", "3", "--crossover", "4") == 0
    grid = np.asarray(Image.open(tmp_path / "grid" / "mixing_grid.png"))
    assert grid.shape == (3 * (24 + 2) + 2, 4 * (32 + 2) + 2, 3)  # a header row and column of sources
    assert grid[2:26, 2:34].max() == 0  # the blank corner
    capsys.readouterr()

    # mistakes: one line naming the flag, exit status 2
    dcgan = tmp_path / "dcgan.pt"
    card = GenCard("dcgan", [24, 32], width=8, z_dim=16)
    torch.save({"format_version": 1, "card": asdict(card), "model": card.build().state_dict()}, dcgan)
    for more, expected in [
        (["--truncation", "1.5"], "--truncation 1.5: use 0 (the mean image) to 1"),
        (["--mixing-grid", "2", "0"], "--mixing-grid 2 0"),
        (["--mixing-grid", "2", "2", "--crossover", "8"], "has 8 style layers; use 1 to 7"),
        (["--crossover", "3"], "--crossover goes with --mixing-grid"),
    ]:
        assert sample("bad", *more) == 2
        err = capsys.readouterr().err.strip()
        assert expected in err and "\n" not in err and "Traceback" not in err, err
    for flag in (["--mixing-grid", "2", "2"], ["--truncation", "0.7"]):
        assert main(["gen", "sample", "--weights", str(dcgan), "--out", str(tmp_path / "bad"), *flag]) == 2
        err = capsys.readouterr().err.strip()
        assert f"{flag[0]}: {dcgan} is a dcgan generator; only stylegan has styles" in err and "\n" not in err
    assert not (tmp_path / "bad").exists()  # nothing written
