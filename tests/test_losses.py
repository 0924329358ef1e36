"""Losses against values worked out by hand or by torch itself."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from seglab.errors import SeglabError
from seglab.losses import (
    CLASS_WEIGHT_METHODS,
    LOSSES,
    build_loss,
    class_weights_from_counts,
    cross_entropy_loss,
    dice_loss,
    focal_loss,
    ohem_cross_entropy_loss,
)

IGNORE = 255


def random_batch(seed: int = 0, num_classes: int = 4, ignore_frac: float = 0.2):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, num_classes, 5, 6, generator=g)
    target = torch.randint(0, num_classes, (2, 5, 6), generator=g)
    target[torch.rand(2, 5, 6, generator=g) < ignore_frac] = IGNORE
    return logits, target


def two_class_logits(p_true: list[float]) -> torch.Tensor:
    """[1, 2, 1, N] logits whose softmax gives class 0 the probabilities ``p_true``."""
    p = torch.tensor(p_true, dtype=torch.float64)
    return torch.stack([p.log(), (1 - p).log()]).float().reshape(1, 2, 1, len(p_true))


def test_ce_hand_computed_and_equal_to_torch():
    # 1x2x1x2: pixel 0 logits (2, 0), pixel 1 logits (0, 1); both of class 0
    logits = torch.tensor([[[[2.0, 0.0]], [[0.0, 1.0]]]])
    target = torch.tensor([[[0, 0]]])
    expected = (math.log(1 + math.exp(-2)) + math.log(1 + math.exp(1))) / 2  # 0.720095
    loss = build_loss("ce", num_classes=2, ignore_index=IGNORE)(logits, target)
    assert loss.item() == pytest.approx(expected, abs=1e-6)

    logits, target = random_batch()
    ours = build_loss("ce", num_classes=4, ignore_index=IGNORE)(logits, target)
    torch.testing.assert_close(ours, F.cross_entropy(logits, target, ignore_index=IGNORE))
    w = torch.tensor([0.5, 2.0, 1.0, 3.0])
    ours_w = build_loss("ce", num_classes=4, ignore_index=IGNORE, class_weights=w)(logits, target)
    torch.testing.assert_close(ours_w, F.cross_entropy(logits, target, weight=w, ignore_index=IGNORE))


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_ignored_pixels_change_nothing(name):
    loss_fn = build_loss(name, num_classes=4, ignore_index=IGNORE)
    logits, target = random_batch(seed=1, ignore_frac=0.3)
    garbage = logits.clone()
    ignored = (target == IGNORE).unsqueeze(1).expand_as(logits)
    garbage[ignored] = torch.randn(int(ignored.sum())) * 1e4
    torch.testing.assert_close(loss_fn(garbage, target), loss_fn(logits, target))


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_every_loss_backprops_finite_grads(name):
    loss_fn = build_loss(name, num_classes=4, ignore_index=IGNORE, class_weights=[1.0, 2.0, 0.5, 1.0])
    logits, target = random_batch(seed=2)
    logits.requires_grad_(True)
    loss = loss_fn(logits, target)
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0

    # bfloat16 logits (autocast) are computed in float32
    bf = logits.detach().bfloat16().requires_grad_(True)
    loss_bf = loss_fn(bf, target)
    assert loss_bf.dtype == torch.float32 and torch.isfinite(loss_bf)
    loss_bf.backward()
    assert torch.isfinite(bf.grad.float()).all()

    # every pixel ignored: 0, not NaN, and still differentiable
    z = logits.detach().clone().requires_grad_(True)
    loss_z = loss_fn(z, torch.full_like(target, IGNORE))
    assert loss_z.item() == 0.0
    loss_z.backward()
    assert torch.isfinite(z.grad).all()


def test_dice_hand_computed():
    # pixel 0: p = (0.8, 0.2), class 0; pixel 1: p = (0.5, 0.5), class 1; pixel 2 ignored
    logits = torch.tensor([[[[math.log(0.8), 0.0, 50.0]], [[math.log(0.2), 0.0, -50.0]]]])
    target = torch.tensor([[[0, 1, IGNORE]]])
    # class 0: inter 0.8, sum p 1.3, sum g 1; class 1: inter 0.5, sum p 0.7, sum g 1
    expected0 = 1 - (1.6 / 2.3 + 1.0 / 1.7) / 2
    assert dice_loss(logits, target, ignore_index=IGNORE, smooth=0.0).item() == pytest.approx(expected0, abs=1e-6)
    expected1 = 1 - (2.6 / 3.3 + 2.0 / 2.7) / 2
    assert dice_loss(logits, target, ignore_index=IGNORE, smooth=1.0).item() == pytest.approx(expected1, abs=1e-6)


def test_dice_perfect_prediction_is_zero_even_with_an_absent_class():
    target = torch.tensor([[[0, 1, 1], [0, 0, IGNORE]]])  # class 2 absent from target and prediction
    logits = F.one_hot(torch.where(target == IGNORE, 2, target), 3).permute(0, 3, 1, 2).float() * 30 - 15
    assert dice_loss(logits, target, ignore_index=IGNORE, smooth=1.0).item() < 1e-4
    wrong = -logits
    assert dice_loss(wrong, target, ignore_index=IGNORE, smooth=1.0).item() > 0.6


def test_focal_gamma_zero_is_ce_and_gamma_two_matches_formula():
    logits, target = random_batch(seed=3)
    ce = F.cross_entropy(logits, target, ignore_index=IGNORE)
    torch.testing.assert_close(focal_loss(logits, target, ignore_index=IGNORE, gamma=0.0), ce)

    valid = target != IGNORE
    p = logits.softmax(1).gather(1, target.clamp(max=3).unsqueeze(1)).squeeze(1)[valid]
    expected = (-((1 - p) ** 2) * p.log()).mean()
    torch.testing.assert_close(focal_loss(logits, target, ignore_index=IGNORE, gamma=2.0), expected)
    assert build_loss("focal", num_classes=4, ignore_index=IGNORE)(logits, target) < ce

    alpha = torch.tensor([1.0, 0.0, 0.0, 0.0])  # only class-0 pixels count, divided by all valid
    n0 = int((target == 0).sum())
    only0 = focal_loss(logits, target, ignore_index=IGNORE, gamma=0.0, alpha=alpha)
    ce_sum0 = F.cross_entropy(logits, torch.where(target == 0, 0, IGNORE), ignore_index=IGNORE) * n0
    torch.testing.assert_close(only0, ce_sum0 / int(valid.sum()))


def test_ohem_keeps_the_hardest_pixels():
    logits = two_class_logits([0.99, 0.95, 0.6, 0.3])
    target = torch.zeros(1, 1, 4, dtype=torch.long)
    # two pixels are below 0.7: they are kept, the easy ones dropped
    loss = ohem_cross_entropy_loss(logits, target, ignore_index=IGNORE, thresh=0.7, min_kept=1)
    assert loss.item() == pytest.approx(-(math.log(0.6) + math.log(0.3)) / 2, abs=1e-5)
    # at least 3 kept: the third hardest (0.95) joins
    expected3 = -(math.log(0.95) + math.log(0.6) + math.log(0.3)) / 3
    loss3 = ohem_cross_entropy_loss(logits, target, ignore_index=IGNORE, thresh=0.7, min_kept=3)
    assert loss3.item() == pytest.approx(expected3, abs=1e-5)
    loss_frac = ohem_cross_entropy_loss(logits, target, ignore_index=IGNORE, thresh=0.7, min_kept=0.75)
    assert loss_frac.item() == pytest.approx(expected3, abs=1e-5)
    # min_kept larger than the image: plain cross-entropy
    everything = ohem_cross_entropy_loss(logits, target, ignore_index=IGNORE, min_kept=100_000)
    torch.testing.assert_close(everything, cross_entropy_loss(logits, target, ignore_index=IGNORE))
    # ignored pixels are never kept, however hard
    target_ign = torch.tensor([[[0, 0, 0, IGNORE]]])
    loss_ign = ohem_cross_entropy_loss(logits, target_ign, ignore_index=IGNORE, thresh=0.7, min_kept=1)
    assert loss_ign.item() == pytest.approx(-math.log(0.6), abs=1e-5)


def test_ce_plus_dice_is_the_weighted_sum():
    logits, target = random_batch(seed=4)
    ce = F.cross_entropy(logits, target, ignore_index=IGNORE)
    dice = dice_loss(logits, target, ignore_index=IGNORE)
    combo = build_loss("ce+dice", num_classes=4, ignore_index=IGNORE)(logits, target)
    torch.testing.assert_close(combo, ce + dice)
    combo2 = build_loss("ce+dice", num_classes=4, ignore_index=IGNORE, ce_weight=0.5, dice_weight=2.0)
    torch.testing.assert_close(combo2(logits, target), 0.5 * ce + 2.0 * dice)


def test_build_loss_refuses_bad_input():
    with pytest.raises(SeglabError, match="did you mean 'dice'"):
        build_loss("dise", num_classes=3, ignore_index=IGNORE)
    with pytest.raises(SeglabError, match="did you mean 'gamma'"):
        build_loss("focal", num_classes=3, ignore_index=IGNORE, gama=1.0)
    with pytest.raises(SeglabError, match="3 classes"):
        build_loss("ce", num_classes=3, ignore_index=IGNORE, class_weights=[1.0, 2.0])


def test_class_weights_hand_computed():
    counts = [60, 30, 10, 0]
    image_counts = [100, 60, 50, 0]  # pixels of the images in which each class appears
    # median frequency: freq = 0.6, 0.5, 0.2; median 0.5 -> 0.5/0.6, 1, 2.5; absent class 0
    median = class_weights_from_counts(counts, "median", image_counts=image_counts)
    np.testing.assert_allclose(median, [0.5 / 0.6, 1.0, 2.5, 0.0])
    # without image counts every class is taken to appear everywhere: freq = 0.6, 0.3, 0.1
    np.testing.assert_allclose(class_weights_from_counts(counts, "median"), [0.3 / 0.6, 1.0, 3.0, 0.0])
    # inverse: 1/f = 5/3, 10/3, 10 with mean 5 -> 1/3, 2/3, 2
    np.testing.assert_allclose(class_weights_from_counts(counts, "inverse"), [1 / 3, 2 / 3, 2.0, 0.0])
    enet = class_weights_from_counts(counts, "enet")
    np.testing.assert_allclose(enet, [1 / math.log(1.62), 1 / math.log(1.32), 1 / math.log(1.12), 0.0])
    for method in CLASS_WEIGHT_METHODS:
        assert np.isfinite(class_weights_from_counts(counts, method)).all()
    with pytest.raises(SeglabError, match="did you mean 'median'"):
        class_weights_from_counts(counts, "medain")
    with pytest.raises(SeglabError, match="no labelled pixel"):
        class_weights_from_counts([0, 0], "inverse")
