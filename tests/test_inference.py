"""Whole-image, sliding-window and TTA inference agree where they must."""

import torch
from torch import nn

from seglab.engine.inference import Inferencer, normalize


class Pointwise(nn.Module):
    """A 1x1 convolution: each output pixel depends on its input pixel only."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, x):
        return self.conv(x)


def make(model, **kw):
    return Inferencer(model.eval(), [0.5] * 3, [0.25] * 3, torch.device("cpu"), channels_last=False, **kw)


def test_normalize():
    x = torch.tensor([0, 255], dtype=torch.uint8).view(1, 1, 1, 2).expand(1, 3, 1, 2)
    out = normalize(x, [0.5] * 3, [0.25] * 3)
    assert torch.allclose(out[0, :, 0, 0], torch.tensor(-2.0)) and torch.allclose(out[0, :, 0, 1], torch.tensor(2.0))


def test_sliding_window_equals_whole_for_a_pointwise_model():
    images = torch.randint(0, 256, (2, 3, 70, 101), dtype=torch.uint8)
    model = Pointwise()
    whole = make(model).probabilities(images)
    slide = make(model, mode="slide", window=(32, 48), overlap=0.5, window_batch=3).probabilities(images)
    assert slide.shape == whole.shape == (2, 4, 70, 101)
    assert torch.allclose(whole, slide, atol=1e-5)


def test_sliding_window_blends_overlaps():
    """A model whose output depends on the tile's position proves tiles are blended, not overwritten."""

    class TileMean(nn.Module):
        def forward(self, x):
            return x.mean(dim=(1, 2, 3), keepdim=True).expand(-1, 2, *x.shape[-2:]) * torch.tensor([1.0, -1.0]).view(
                1, 2, 1, 1
            )

    images = torch.zeros(1, 3, 40, 40, dtype=torch.uint8)
    images[..., 20:] = 255
    slide = make(TileMean(), mode="slide", window=(40, 24), overlap=0.5).probabilities(images)
    # the middle columns are covered by tiles with different means: neither tile's value alone
    p = slide[0, 0, 0]
    assert p[0] < p[20] < p[39] and len(set(p.round(decimals=4).tolist())) > 2


def test_flip_tta_is_flip_equivariant():
    images = torch.randint(0, 256, (1, 3, 33, 47), dtype=torch.uint8)
    inf = make(nn.Conv2d(3, 5, 3, padding=1), flip=True, scales=(0.75, 1.0, 1.25))
    a = inf.probabilities(images)
    b = inf.probabilities(images.flip(-1)).flip(-1)
    assert a.shape == (1, 5, 33, 47)
    assert torch.allclose(a, b, atol=1e-5)
    assert torch.allclose(a.sum(1), torch.ones(1, 33, 47), atol=1e-5)


def test_streamed_labels_equal_the_whole_image_argmax_for_a_pointwise_model():
    images = torch.randint(0, 256, (1, 3, 97, 131), dtype=torch.uint8)
    model = Pointwise()
    whole = make(model).probabilities(images)[0]
    labels, confidence = make(model, mode="slide", window=(32, 48), overlap=0.5, window_batch=2).stream_labels(images)
    assert labels.shape == (97, 131) and labels.dtype == torch.uint8 and confidence.dtype == torch.float16
    assert torch.equal(labels.long(), whole.argmax(0))
    assert torch.allclose(confidence.float(), whole.max(0).values, atol=2e-3)


def test_streamed_labels_equal_the_in_memory_sliding_window():
    """Any model: streaming by bands blends the same tiles with the same weights as _slide."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(3, 6, 5, padding=2), nn.ReLU(), nn.Conv2d(6, 4, 3, padding=1))
    images = torch.randint(0, 256, (1, 3, 90, 77), dtype=torch.uint8)
    inf = make(model, mode="slide", window=(40, 32), overlap=1 / 3, window_batch=3)
    labels, confidence = inf.stream_labels(images)
    probs = inf.probabilities(images)[0]
    assert torch.equal(labels.long(), probs.argmax(0))
    assert torch.allclose(confidence.float(), probs.max(0).values, atol=2e-3)
