"""Detector builders: every backbone trains and predicts; COCO weights load through torch's hub cache
(filled here with a file laid out as torchvision's, since this machine cannot download)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from seglab.engine.checkpoint import ModelCard
from seglab.instance.models import DetectorSpec, build_detector, mixed_precision


def _target(n: int = 3, size: int = 96) -> dict[str, torch.Tensor]:
    boxes = torch.tensor([[10, 10, 40, 30], [50, 20, 90, 70], [5, 60, 30, 90]], dtype=torch.float32)[:n]
    masks = torch.zeros(n, size, size, dtype=torch.uint8)
    for i, (x1, y1, x2, y2) in enumerate(boxes.int().tolist()):
        masks[i, y1:y2, x1:x2] = 1
    return {"boxes": boxes, "labels": torch.tensor([1, 2, 1])[:n], "masks": masks}


@pytest.mark.parametrize(
    ("arch", "backbone"),
    [("maskrcnn", "efficientnet_lite0"), ("maskrcnn", "mobilenet_v3_large"), ("fasterrcnn", "resnet18")],
)
def test_train_step_and_prediction(arch: str, backbone: str):
    torch.manual_seed(0)
    model = build_detector(DetectorSpec(arch, backbone, num_classes=3, img_size=96))
    images = [torch.rand(3, 96, 96), torch.rand(3, 80, 96)]
    targets = [
        _target(),
        {k: v[:0] for k, v in _target().items()} | {"masks": torch.zeros(0, 80, 96, dtype=torch.uint8)},
    ]
    losses = model(images, targets)  # the second image has no objects
    assert ("loss_mask" in losses) == (arch == "maskrcnn")
    sum(losses.values()).backward()
    assert all(torch.isfinite(v) for v in losses.values())
    model.eval()
    with torch.no_grad():
        out = model(images)
    assert out[1]["boxes"].shape[1] == 4
    if arch == "maskrcnn":
        assert out[1]["masks"].shape[-2:] == (80, 96)  # predictions come back at each image's own size


def test_mixed_precision_keeps_losses_finite_and_weights_named_alike():
    torch.manual_seed(0)
    model = build_detector(DetectorSpec("maskrcnn", "efficientnet_lite0", num_classes=3, img_size=96))
    keys = list(model.state_dict())
    mixed_precision(model, "cpu", torch.bfloat16)
    assert list(model.state_dict()) == keys
    losses = model([torch.rand(3, 96, 96)], [_target()])
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in losses.values())


def test_a_checkpoint_card_rebuilds_the_same_layers():
    spec = DetectorSpec("maskrcnn", "mobilenet_v3_large", num_classes=4, weights="imagenet", img_size=96)
    trained = build_detector(spec, download=False)  # pretrained layout: frozen BatchNorm
    card = ModelCard(
        arch="maskrcnn", encoder="mobilenet_v3_large", num_classes=4, in_channels=3, classes=list("abcd"),
        colors=[(0, 0, 0)] * 4, ignore_index=255, mean=[0.5] * 3, std=[0.5] * 3, img_size=96, task="instance",
        weights="imagenet",
    )  # fmt: skip
    rebuilt = card.build()
    rebuilt.load_state_dict(trained.state_dict())  # strict: the same parameter names and shapes


def test_coco_weights_load_from_the_hub_cache(tmp_path: Path, monkeypatch):
    from torchvision.models import detection as D

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    url = D.FasterRCNN_MobileNet_V3_Large_FPN_Weights.COCO_V1.url
    torch.manual_seed(1)
    reference = D.fasterrcnn_mobilenet_v3_large_fpn(weights=None, weights_backbone=None, num_classes=91)
    cached = tmp_path / "hub" / "checkpoints" / Path(url).name
    cached.parent.mkdir(parents=True)
    torch.save(reference.state_dict(), cached)

    model = build_detector(DetectorSpec("fasterrcnn", "mobilenet_v3_large", num_classes=5, weights="coco", img_size=96))
    ours = model.state_dict()
    for name, value in reference.state_dict().items():
        if name.startswith(("backbone", "rpn")) and "num_batches_tracked" not in name:
            assert torch.equal(ours[name], value), name
    assert model.roi_heads.box_predictor.cls_score.out_features == 5  # new head for our classes
