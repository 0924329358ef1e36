"""Generation: model shapes, a loss step that learns, sampling, the label-space paste, the
evaluation metrics, and the gen commands end to end on real CamVid pairs."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from seglab.cli import main
from seglab.data import get_split, read_mask, resolve_dataset
from seglab.engine.trainer import Trainer
from seglab.gen.config import GenConfig
from seglab.gen.data import PairDataset, generation_size, read_label_map, to_uint8
from seglab.gen.evaluate import feature_distances, segmentation_scores
from seglab.gen.models import GEN_MODELS, SPADE, GenCard, build_discriminator, init_weights, one_hot
from seglab.gen.sample import Generator, paste_rare
from seglab.gen.task import GenTask

TRAIN = ["--img-size", "64", "--batch", "2", "--limit", "4", "--width", "8", "--disc-width", "8", "--no-amp"]


# ---------------------------------------------------------------- models
@pytest.mark.parametrize("arch", GEN_MODELS)
@pytest.mark.parametrize("size", [(48, 64), (37, 53)])  # odd sizes: padded inside and cropped back
def test_generators_make_images_of_the_card_size(arch: str, size: tuple[int, int]):
    card = GenCard(arch, list(size), num_classes=5, ignore_index=255, width=8, z_dim=16)
    model = card.build()
    init_weights(model)
    disc = build_discriminator(card, width=8)
    if card.conditional:
        labels = one_hot(torch.randint(0, 6, (2, *size)), 5, 255)
        out = model(labels)
        assert disc(torch.cat([labels, out], 1)).shape[:2] == (2, 1)
    elif arch in ("dcgan", "stylegan"):
        out = model(torch.randn(2, 16))
        assert disc(out).shape[:2] == (2, 1)
    else:
        out, mu, logvar = model(torch.rand(2, 3, *size) * 2 - 1)
        assert mu.shape == logvar.shape == (2, 16) and disc is None
    assert out.shape == (2, 3, *size)
    if arch != "stylegan":  # StyleGAN2's output is not squashed (clamped when made uint8)
        assert out.min() >= -1 and out.max() <= 1  # tanh: the range images are trained in


def test_one_hot_gives_ignore_and_unknown_labels_their_own_channel():
    labels = torch.tensor([[[0, 2, 255, 7]]])  # 7 is not a class of 3
    x = one_hot(labels, 3, ignore_index=255)
    assert x.shape == (1, 4, 1, 4)
    assert x.sum(1).eq(1).all()
    assert x[0, :, 0].argmax(0).tolist() == [0, 2, 3, 3]


def test_spade_modulates_by_the_label_map():
    torch.manual_seed(0)
    spade = SPADE(4, 3)
    x = torch.randn(1, 4, 8, 8)
    a = spade(x, one_hot(torch.zeros(1, 8, 8, dtype=torch.long), 2, 255))
    b = spade(x, one_hot(torch.ones(1, 8, 8, dtype=torch.long), 2, 255))
    assert not torch.allclose(a, b)  # same features, other layout: other output


# ---------------------------------------------------------------- a loss step
@pytest.fixture(scope="module")
def camvid(shared_data: Path) -> Path:
    return shared_data / "camvid"


def _trainer(camvid: Path, tmp_path: Path, model: str, **overrides) -> Trainer:
    settings = dict(img_size=64, width=8, disc_width=8, z_dim=16, batch=2, limit=2, epochs=1)
    cfg = GenConfig(data=str(camvid), model=model, out=str(tmp_path), name=model, **{**settings, **overrides})
    return Trainer(cfg, GenTask, progress=False, log=lambda *_: None)


def _step(trainer: Trainer, indices: list[int]) -> dict[str, float]:
    """One training step of the loop on these training pairs; the values it logs."""
    from torch.utils.data import default_collate

    batch = default_collate([trainer.task.train_set[i] for i in indices])
    parts = trainer._step(batch, 0, 0, boundary=True)
    trainer._finish_step()
    assert parts is not None
    return parts


@pytest.mark.parametrize("model", GEN_MODELS)
def test_a_loss_step_updates_every_network(camvid: Path, tmp_path: Path, model: str):
    trainer = _trainer(camvid, tmp_path, model)
    nets = list(trainer.models.values())
    assert len(nets) == (1 if model == "vae" else 2)
    before = [[p.detach().clone() for p in net.parameters()] for net in nets]
    parts = _step(trainer, [0, 1])
    assert parts and all(np.isfinite(v) for v in parts.values())
    for net, old in zip(nets, before, strict=True):
        assert any(not torch.equal(p, q) for p, q in zip(net.parameters(), old, strict=True)), type(net).__name__


def test_pix2pix_learns_to_paint_a_label_map(camvid: Path, tmp_path: Path):
    """A few steps on one CamVid pair bring the painted image much closer to the real one."""
    trainer = _trainer(camvid, tmp_path, "pix2pix", lr=2e-3, hflip=0.0, epochs=100)  # constant lr
    first = _step(trainer, [0, 0])["l1"]
    for _ in range(30):
        last = _step(trainer, [0, 0])["l1"]
    assert last < 0.6 * first


def test_a_signal_stops_after_the_step_and_resume_finishes_the_epoch(camvid: Path, tmp_path: Path):
    import signal

    from seglab.gen.trainer import train_generator

    trainer = _trainer(camvid, tmp_path, "pix2pix", limit=4)  # 2 steps per epoch
    trainer.stop_signal = signal.SIGINT  # as if Ctrl-C came during the first step
    assert trainer.fit()["stopped"] == signal.SIGINT
    last = trainer.run_dir / "weights" / "last.pt"
    state = torch.load(last, weights_only=False)
    assert (state["epoch"], state["batch_in_epoch"]) == (0, 1)
    run = train_generator(resume=str(last), progress=False, log=lambda *_: None)
    assert run["stopped"] is None and [r["epoch"] for r in run["rows"]] == [1]
    assert torch.load(last, weights_only=False)["epoch"] == 1


# ---------------------------------------------------------------- label-space paste
def test_paste_rare_copies_only_rare_pixels():
    base = np.zeros((4, 6), np.uint8)
    donor = np.full((4, 6), 3, np.uint8)
    donor[1, 0] = 5  # the rare class, at the left edge
    rng = np.random.default_rng(0)
    outs = [paste_rare(base, [donor], [5], rng) for _ in range(20)]
    for out in outs:
        assert set(np.unique(out).tolist()) == {0, 5}  # the donor's class 3 never comes along
        assert (out == 5).sum() == 1 and out[1, 0] + out[1, 5] == 5  # as it was, or mirrored
    assert {int(out[1, 5]) for out in outs} == {0, 5}  # both happen


# ---------------------------------------------------------------- evaluation metrics
def test_feature_distance_is_zero_for_the_same_images_and_grows_with_damage(camvid: Path):
    from seglab.gen.evaluate import LiteFeatures

    spec = resolve_dataset(camvid)
    pairs = PairDataset(get_split(spec, "val")[::2][:40], spec, [48, 64])  # every other frame: less alike
    real = torch.stack([pairs[i]["image"] for i in range(len(pairs))])
    a, b = real[:20], real[20:]
    noise = 0.4 * torch.randn(b.shape, generator=torch.Generator().manual_seed(0))
    noisy = to_uint8((b.float() / 127.5 - 1 + noise).clamp(-1, 1))
    feature = LiteFeatures()
    same = feature_distances(a, a, feature)
    other = feature_distances(a, b, feature)  # other real frames of the same streets
    damaged = feature_distances(a, noisy, feature)
    blank = feature_distances(a, torch.full_like(b, 128), feature)
    assert abs(same["fd"]) < 1e-2
    assert other["fd"] < damaged["fd"] < blank["fd"]
    assert other["kid"] < damaged["kid"] < blank["kid"]


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory) -> Path:
    """torch-fidelity's Inception with random weights, saved as a weights file. Building it normally
    downloads the real weights, so the download and the load are switched off for this one build."""
    from unittest import mock

    from torch_fidelity import feature_extractor_inceptionv3 as fe

    torch.manual_seed(0)
    with (
        mock.patch.object(fe, "load_state_dict_from_url", return_value={}),
        mock.patch.object(fe.FeatureExtractorInceptionV3, "load_state_dict", return_value=None),
    ):
        net = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    path = tmp_path_factory.mktemp("inception") / "inception.pth"
    torch.save(net.state_dict(), path)
    return path


def test_inception_fid_uses_a_given_weights_file(camvid: Path, inception_file: Path):
    """The FID/KID path through the Inception network; random weights here, so only the plumbing
    and the statistics are checked (zero for the same images, positive for others)."""
    from seglab.gen.evaluate import inception_network

    net, why_not = inception_network(str(inception_file))
    assert net is not None and why_not is None
    assert "not found" in inception_network(str(inception_file) + ".missing")[1]
    spec = resolve_dataset(camvid)
    pairs = PairDataset(get_split(spec, "val")[:12], spec, [48, 64])
    real = torch.stack([pairs[i]["image"] for i in range(len(pairs))])
    same = feature_distances(real, real, net)
    other = feature_distances(real, torch.full_like(real, 128), net)
    assert abs(same["fd"]) < 1e-2 and other["fd"] > same["fd"]


class WritesAMarker:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "code from the Inception weights ran"))


def test_inception_weights_that_would_run_code_are_refused(tmp_path: Path, inception_file: Path):
    """torch-fidelity loads the file with weights_only=False; seglab makes that load weights-only."""
    from seglab.gen.evaluate import inception_network

    marker = tmp_path / "marker"
    crafted = tmp_path / "inception.pth"
    torch.save({**torch.load(inception_file, weights_only=True), "x": WritesAMarker(marker)}, crafted)
    before = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    net, why_not = inception_network(str(crafted))
    assert net is None and "hold pickled Python objects; they were not loaded" in why_not, why_not
    assert not marker.exists()
    assert os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD") == before, "the switch is put back as it was"


def test_inception_weights_download_or_say_why_not(tmp_path: Path, monkeypatch):
    """Offline (CI, this machine) FID is skipped with a reason; online the weights land in the hub cache."""
    from seglab.gen.evaluate import INCEPTION_FILE, inception_network

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    net, why_not = inception_network(None)
    if net is not None:
        assert (tmp_path / "hub" / "checkpoints" / INCEPTION_FILE).is_file()
    else:
        assert "could not be loaded from the internet" in why_not and "\n" not in why_not


def test_segmentation_scores_compare_generated_with_real(camvid: Path, make_checkpoint):
    spec = resolve_dataset(camvid)
    pairs = PairDataset(get_split(spec, "val")[:4], spec, [48, 64])
    real = torch.stack([pairs[i]["image"] for i in range(4)])
    labels = torch.stack([pairs[i]["labels"] for i in range(4)])
    weights = make_checkpoint("fcn", img_size=64)  # random weights whose prediction depends on the image
    same = segmentation_scores(weights, spec.classes, spec.ignore_index, real, real, labels, batch=2)
    assert same["generated"] == same["real"]  # the generated images are the real ones: same score
    other = segmentation_scores(weights, spec.classes, spec.ignore_index, real, real.flip(-1), labels, batch=2)
    assert other["real"] == same["real"] and other["generated"] != other["real"]
    assert 0 <= other["generated"]["miou"] <= 1


# ---------------------------------------------------------------- commands end to end
@pytest.fixture(scope="module")
def gen_run(camvid: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gen")
    assert main(["gen", "train", "--data", str(camvid), "--epochs", "1", *TRAIN, "--out", str(out), "--name", "p"]) == 0
    return out / "p"


def test_gen_train_writes_the_run_folder(gen_run: Path):
    names = {p.name for p in gen_run.iterdir()}
    assert names >= {"config.yaml", "metrics.csv", "curves.png", "weights", "samples"}
    assert any(n.startswith("events.out.tfevents") for n in names)
    assert {p.name for p in (gen_run / "weights").iterdir()} >= {"last.pt", "generator.pt"}
    grid = Image.open(gen_run / "samples" / "epoch_001.png")
    assert grid.width > 3 * 64  # label map | generated | real
    rows = list(csv.DictReader((gen_run / "metrics.csv").open()))
    assert len(rows) == 1 and float(rows[0]["loss_d"]) > 0 and float(rows[0]["val_l1"]) > 0


def test_gen_train_resumes_where_it_stopped(gen_run: Path, tmp_path: Path):
    import shutil

    run = tmp_path / "p"
    shutil.copytree(gen_run, run)
    assert main(["gen", "train", "--resume", str(run / "weights" / "last.pt"), "--epochs", "2"]) == 0
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert (run / "samples" / "epoch_002.png").is_file()


def test_gen_sample_paints_each_mask(gen_run: Path, camvid: Path, tmp_path: Path):
    masks = tmp_path / "masks"
    masks.mkdir()
    spec = resolve_dataset(camvid)
    for sample in get_split(spec, "val")[:3]:
        Image.open(sample.mask).save(masks / sample.mask.name)
    out = tmp_path / "out"
    assert (
        main(
            [
                "gen",
                "sample",
                "--weights",
                str(gen_run / "weights" / "generator.pt"),
                "--masks",
                str(masks),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    written = sorted(out.iterdir())
    assert [p.name for p in written] == sorted(p.name for p in masks.iterdir())
    assert Image.open(written[0]).size == (64, 48)  # the generator's size, W x H


def test_sampling_is_reproducible_by_seed(gen_run: Path, camvid: Path):
    spec = resolve_dataset(camvid)
    labels = torch.from_numpy(read_mask(get_split(spec, "val")[0], spec))[None]
    a = Generator(gen_run / "weights" / "generator.pt", seed=1)(labels)
    b = Generator(gen_run / "weights" / "generator.pt", seed=1)(labels)
    c = Generator(gen_run / "weights" / "generator.pt", seed=2)(labels)
    assert a.dtype == torch.uint8 and a.shape == (1, 3, 48, 64)
    assert torch.equal(a, b) and not torch.equal(a, c)  # dropout noise, as pix2pix samples


def test_gen_augment_writes_a_dataset_seglab_trains_on(gen_run: Path, camvid: Path, tmp_path: Path):
    out = tmp_path / "synth"
    weights = str(gen_run / "weights" / "generator.pt")
    args = [
        "gen",
        "augment",
        "--weights",
        weights,
        "--out",
        str(out),
        "--n",
        "5",
        "--rare",
        "pole",
        "Pedestrian",
        "--paste",
        "1",
    ]
    assert main(args) == 0
    spec = resolve_dataset(out)
    train, val = get_split(spec, "train"), get_split(spec, "val")
    real = resolve_dataset(camvid)
    assert len(train) == 5 + len(get_split(real, "train")) and len(val) == len(get_split(real, "val"))
    assert spec.classes == real.classes and spec.ignore_index == real.ignore_index
    synthetic = [s for s in train if s.image.parent == out / "images"]
    assert len(synthetic) == 5
    for s in synthetic:
        image, mask = np.asarray(Image.open(s.image)), read_mask(s, spec)
        assert image.shape == (48, 64, 3) and mask.shape == (48, 64)
    assert main(args) == 2  # the folder now holds a dataset: not overwritten


def test_gen_eval_reports_fidelity_and_distances(gen_run: Path, make_checkpoint, tmp_path: Path, capsys):
    seg = make_checkpoint("lraspp", img_size=64)
    out = tmp_path / "eval"
    args = ["gen", "eval", "--weights", str(gen_run / "weights" / "generator.pt"), "--segmenter", str(seg)]
    assert main([*args, "--limit", "8", "--out", str(out)]) == 0
    report = json.loads((out / "metrics.json").read_text())
    assert report["images"] == 8
    assert set(report["segmentation"]) == {"generated", "real"}
    assert report["lite0"]["fd"] > 0 and report["lite0"]["real_train"]["fd"] > 0  # and the real-vs-real floor
    assert "fd" in report["inception"] or "skipped" in report["inception"]
    assert "FD-Lite0" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["gen", "train", "--data", "nowhere", "--epochs", "1"], "nowhere"),
        (["gen", "train", "--model", "pix3pix", "--data", "x"], "did you mean 'pix2pix'"),
        (["gen", "sample", "--weights", "missing.pt", "--masks", ".", "--out", "o"], "missing.pt"),
    ],
)
def test_gen_mistakes_are_one_line(args: list[str], expected: str, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert expected in err and "\n" not in err and "Traceback" not in err


def test_generator_and_segmenter_checkpoints_are_not_confused(gen_run: Path, make_checkpoint, tmp_path: Path, capsys):
    generator = str(gen_run / "weights" / "generator.pt")
    image = str(gen_run / "samples" / "epoch_001.png")
    assert main(["predict", "--weights", generator, "--source", image]) == 2
    assert "seglab gen sample" in capsys.readouterr().err
    seg = str(make_checkpoint("lraspp", img_size=64))
    assert main(["gen", "sample", "--weights", seg, "--masks", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "not a generator" in capsys.readouterr().err
    assert main(["gen", "augment", "--weights", generator, "--out", str(tmp_path / "a"), "--rare", "Polle"]) == 2
    assert "did you mean 'Pole'" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()  # nothing written


def test_generation_size_keeps_the_aspect_ratio(camvid: Path):
    first = get_split(resolve_dataset(camvid), "train")[0]
    assert generation_size(first.image, 240) == [180, 240]  # CamVid is 360x480


def test_read_label_map_accepts_colour_masks(tmp_path: Path):
    colors = [(0, 0, 0), (255, 0, 0), (0, 255, 0)]
    rgb = np.zeros((2, 3, 3), np.uint8)
    rgb[0, 1] = (255, 0, 0)
    rgb[1, 2] = (0, 255, 0)
    rgb[1, 0] = (9, 9, 1)  # not a class colour
    Image.fromarray(rgb).save(tmp_path / "m.png")
    labels = read_label_map(tmp_path / "m.png", 3, 255, colors)
    assert labels.tolist() == [[0, 1, 0], [255, 0, 2]]
