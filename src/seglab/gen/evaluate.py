"""How good are generated images? The protocol of the label-map-to-image literature (pix2pix, SPADE):

1. **Faithfulness**: segment the generated images with a trained seglab model and score the
   prediction against the label maps they were painted from (mIoU, pixel accuracy). The same
   segmenter on the real images at the same size is the ceiling, reported beside it.
2. **Realism**: the distance between the feature statistics of real and generated images.
   FID and KID (torchmetrics, torch-fidelity's Inception network) when the Inception weights are
   at hand; they download on a machine with internet, and without them the report says so. The
   ImageNet EfficientNet-Lite0 that seglab installs offline gives the same two distances on its
   own features ("FD-Lite0", "KD-Lite0") everywhere: comparable between runs of seglab, not with
   published FIDs.

FID is biased upwards with few images (the feature covariance is estimated from N samples);
compare models at the same N. KID is unbiased and comes with its spread over subsets.
"""

from __future__ import annotations

import pickle
import socket
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from seglab.data import get_split, resolve_dataset
from seglab.engine.checkpoint import weights_only_loads
from seglab.errors import SeglabError
from seglab.gen.data import PairDataset
from seglab.gen.sample import Generator
from seglab.metrics import ConfusionMatrix

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"  # torch-fidelity's download, in the hub cache


class LiteFeatures(nn.Module):
    """uint8 images [N, 3, H, W] -> the ImageNet EfficientNet-Lite0's pooled last-stage features [N, 320]."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self) -> None:
        super().__init__()
        from seglab.models.encoders import build_encoder

        self.encoder = build_encoder("efficientnet_lite0", weights="imagenet").eval()
        self.register_buffer("mean", torch.tensor(self.encoder.mean).view(1, 3, 1, 1) * 255)
        self.register_buffer("std", torch.tensor(self.encoder.std).view(1, 3, 1, 1) * 255)
        self.num_features = self.encoder.out_channels[-1]

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = (images.float() - self.mean) / self.std
        return F.adaptive_avg_pool2d(self.encoder(x)[-1], 1).flatten(1).double()

    def train(self, mode: bool = True) -> LiteFeatures:  # torchmetrics may call .train(); stay in eval
        return super().train(False)


def feature_distances(real: torch.Tensor, fake: torch.Tensor, feature: nn.Module) -> dict[str, float]:
    """FD and KID (mean and std over subsets) between two sets of uint8 images [N, 3, H, W], on the
    features ``feature`` maps them to ([N, D])."""
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    subset = max(2, min(100, len(real) // 2, len(fake) // 2))  # subsets that differ, so the spread means something
    fid = FrechetInceptionDistance(feature=feature)
    kid = KernelInceptionDistance(feature=feature, subset_size=subset, subsets=50)
    for metric in (fid, kid):
        for start in range(0, len(real), 32):
            metric.update(real[start : start + 32], real=True)
        for start in range(0, len(fake), 32):
            metric.update(fake[start : start + 32], real=False)
    with torch.random.fork_rng():  # KID draws its subsets from torch's generator: the same ones every run
        torch.manual_seed(0)
        kid_mean, kid_std = kid.compute()
    return {"fd": float(fid.compute()), "kid": float(kid_mean), "kid_std": float(kid_std)}


def inception_network(weights_path: str | None = None) -> tuple[nn.Module | None, str | None]:
    """FID's Inception network (torch-fidelity's port of the TensorFlow original) and None, or None
    and why it cannot be had (one line). Without ``weights_path`` the weights come from the torch hub
    cache, downloaded there on first use."""
    if weights_path and not Path(weights_path).is_file():
        return None, f"--inception-weights {weights_path} not found"
    try:
        from torchmetrics.image.fid import NoTrainInceptionV3
    except ModuleNotFoundError:
        return None, "torch-fidelity is not installed (pip install torch-fidelity)"
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(15)
    where = weights_path or "the internet"
    try:
        with weights_only_loads():  # torch-fidelity asks torch.load for weights_only=False: a file is data only
            net = NoTrainInceptionV3(
                name="inception-v3-compat", features_list=["2048"], feature_extractor_weights_path=weights_path
            )
    except pickle.UnpicklingError:
        return None, f"FID's Inception weights from {where} hold pickled Python objects; they were not loaded"
    except Exception as e:  # offline: URLError or a timeout; behind a proxy page: a file that is not weights
        return (
            None,
            f"FID's Inception weights could not be loaded from {where} ({type(e).__name__}); pass --inception-weights",
        )
    finally:
        socket.setdefaulttimeout(previous)
    net.num_features = 2048  # type: ignore[assignment]
    return net, None


def evaluate_generator(
    weights: str | Path,
    *,
    segmenter: str | Path | None = None,
    data: str | None = None,
    split: str = "val",
    limit: int | None = None,
    batch: int = 8,
    device: str = "auto",
    seed: int = 0,
    inception_weights: str | None = None,
    data_cache: str | None = None,
    progress: bool = True,
    trust: bool = False,
    log=print,
) -> dict[str, Any]:
    """Score a generator on a split's label maps and images; returns the report as a dict."""
    gen = Generator(weights, device=device, seed=seed, trust=trust)
    card = gen.card
    data = data or gen.config.get("data")
    if not data:
        raise SeglabError(f"{weights} does not say which data it was trained on; pass --data")
    spec = resolve_dataset(data, cache_dir=data_cache, progress=progress)
    samples = get_split(spec, split, val_fraction=gen.config.get("val_fraction", 0.1), seed=gen.config.get("seed", 0))
    if limit:
        samples = samples[:limit]
    if len(samples) < 2:
        raise SeglabError(f"--data {data}: the {split} split needs at least 2 images to compare feature statistics")
    pairs = PairDataset(samples, spec, card.size)
    pairs.preload(progress)
    real = torch.stack([pairs[i]["image"] for i in range(len(pairs))])
    labels = torch.stack([pairs[i]["labels"] for i in range(len(pairs))])
    if card.conditional:
        fake = torch.cat([gen(labels[s : s + batch]) for s in range(0, len(labels), batch)])
    else:
        fake = torch.cat([gen.sample(min(batch, len(real) - s)) for s in range(0, len(real), batch)])
    h, w = card.size
    report: dict[str, Any] = {
        "generator": str(weights),
        "arch": card.arch,
        "data": str(data),
        "split": split,
        "images": len(real),
        "size": [h, w],
    }

    if segmenter is not None:
        if not card.conditional:
            raise SeglabError(f"--segmenter scores label-map fidelity; {weights} is an unconditional {card.arch}")
        report["segmentation"] = segmentation_scores(
            segmenter, card.classes, spec.ignore_index, real, fake, labels, batch, trust
        )

    # the floor: as many real training images against the same real images
    reference = None
    if split != "train":
        train = get_split(
            spec, "train", val_fraction=gen.config.get("val_fraction", 0.1), seed=gen.config.get("seed", 0)
        )
        picks = torch.linspace(0, len(train) - 1, min(len(train), len(real))).round().long().unique().tolist()
        other = PairDataset([train[i] for i in picks], spec, card.size)
        reference = torch.stack([other[i]["image"] for i in range(len(other))]) if len(other) >= 2 else None

    def distances(feature: nn.Module) -> dict[str, Any]:
        out: dict[str, Any] = feature_distances(real, fake, feature)
        if reference is not None:
            out["real_train"] = feature_distances(real, reference, feature)
        return out

    report["lite0"] = distances(LiteFeatures())
    inception, why_not = inception_network(inception_weights)
    if inception is not None:
        report["inception"] = distances(inception)
    else:
        report["inception"] = {"skipped": why_not}
        log(f"gen eval: FID/KID (Inception) skipped: {why_not}")
    return report


def segmentation_scores(
    segmenter: str | Path,
    classes: list[str],
    ignore_index: int,
    real: torch.Tensor,
    fake: torch.Tensor,
    labels: torch.Tensor,
    batch: int,
    trust: bool = False,
) -> dict[str, Any]:
    """mIoU and pixel accuracy of ``segmenter`` on the generated images and on the real ones."""
    from seglab.api import SegModel, load

    model = load(segmenter, trust=trust)
    if not isinstance(model, SegModel) or list(model.classes) != list(classes):
        raise SeglabError(
            f"--segmenter {segmenter}: it must be a semantic model of the same classes ({', '.join(classes)})"
        )
    scores = {}
    for name, images in (("generated", fake), ("real", real)):
        cm = ConfusionMatrix(len(classes), ignore_index)
        arrays = [im.permute(1, 2, 0).numpy() for im in images]
        for result, target in zip(model.iter_predict(arrays, batch=batch), labels, strict=True):
            cm.update(torch.from_numpy(result.mask), target)
        scores[name] = cm.compute(classes)
    return scores


def format_report(report: dict[str, Any]) -> str:
    """The report as a few lines of text."""
    lines = [
        f"{report['arch']} on {report['images']} {report['split']} images at {report['size'][0]}x{report['size'][1]}"
    ]
    seg = report.get("segmentation")
    if seg:
        g, r = seg["generated"], seg["real"]
        lines.append(
            f"segmenter on generated images: mIoU {100 * g['miou']:.2f}, "
            f"pixel accuracy {100 * g['pixel_accuracy']:.2f} "
            f"(on the real images: {100 * r['miou']:.2f}, {100 * r['pixel_accuracy']:.2f})"
        )
        per_class = ", ".join(
            f"{name} {100 * c['iou']:.1f}" if c["iou"] is not None else f"{name} -"
            for name, c in g["per_class"].items()
        )
        lines.append(f"  IoU per class (generated): {per_class}")
    for name, fd, kid in (("lite0", "FD-Lite0", "KD-Lite0"), ("inception", "FID", "KID")):
        d = report[name]
        if "skipped" in d:
            lines.append(f"FID/KID (Inception): skipped, {d['skipped']}")
            continue
        line = f"{fd} {d['fd']:.2f}, {kid} {d['kid']:.4g} +- {d['kid_std']:.2g}"
        if "real_train" in d:
            ref = d["real_train"]
            line += f" (real training images: FD {ref['fd']:.2f}, KID {ref['kid']:.4g})"
        lines.append(line)
    return "\n".join(lines)
