"""Segmentation losses: pure functions, thin ``nn.Module`` wrappers, one registry.

Every loss takes ``logits`` float ``[B, C, H, W]`` (possibly bfloat16/float16 under
autocast; everything is computed in float32) and ``target`` int64 ``[B, H, W]`` whose
pixels equal to ``ignore_index`` are not scored, and returns a scalar. A batch in which
every pixel is ignored gives a loss of exactly 0 that still backpropagates (zero grads),
never NaN.

>>> loss_fn = build_loss("ce+dice", num_classes=4, ignore_index=255)
>>> loss = loss_fn(logits, target)
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from seglab.errors import SeglabError
from seglab.registry import Registry, did_you_mean

LOSSES: Registry[type[nn.Module]] = Registry("loss")

CLASS_WEIGHT_METHODS = ("inverse", "median", "enet")

WeightsLike = Sequence[float] | np.ndarray | Tensor


# --------------------------------------------------------------------------- pure functions


def _valid_and_safe(target: Tensor, ignore_index: int) -> tuple[Tensor, Tensor]:
    """Return (valid mask [B,H,W] bool, target with ignored pixels replaced by class 0)."""
    valid = target != ignore_index
    return valid, torch.where(valid, target, torch.zeros_like(target))


def cross_entropy_loss(logits: Tensor, target: Tensor, *, ignore_index: int, weight: Tensor | None = None) -> Tensor:
    """Mean cross-entropy over non-ignored pixels (weighted mean when ``weight`` is given).

    ``sum_i w[y_i] * -log softmax(x_i)[y_i] / sum_i w[y_i]`` over non-ignored pixels ``i``:
    the same value as ``F.cross_entropy(..., weight, ignore_index)``, but 0 instead of NaN
    when no pixel is left to score.
    """
    logits = logits.float()
    weight = None if weight is None else weight.to(logits.device)
    per_pixel = F.cross_entropy(logits, target, weight=weight, ignore_index=ignore_index, reduction="none")
    valid, safe = _valid_and_safe(target, ignore_index)
    denom = valid.sum().clamp_min(1) if weight is None else (weight[safe] * valid).sum().clamp_min(1e-12)
    return per_pixel.sum() / denom


def dice_loss(
    logits: Tensor,
    target: Tensor,
    *,
    ignore_index: int,
    smooth: float = 1.0,
    weight: Tensor | None = None,
) -> Tensor:
    """Multi-class soft Dice loss over the whole batch.

    With ``p[i, c] = softmax(logits)[i, c]``, ``g[i, c] = 1 if target[i] == c else 0`` and the
    sums running over the non-ignored pixels ``i`` of every image in the batch::

        D_c  = (2 * sum_i p[i, c] * g[i, c] + smooth) / (sum_i p[i, c] + sum_i g[i, c] + smooth)
        loss = 1 - sum_c w_c * D_c / sum_c w_c          (w_c = 1 without ``weight``)

    Ignored pixels add to neither the numerator nor the denominator. A class absent from
    the target that the network also does not predict has ``D_c = smooth / (sum_i p + smooth)``
    close to 1, so it neither rewards nor punishes; one it wrongly predicts is pushed down.
    """
    logits = logits.float()
    num_classes = logits.shape[1]
    valid, safe = _valid_and_safe(target, ignore_index)
    mask = valid.unsqueeze(1).to(logits.dtype)  # [B,1,H,W]
    probs = logits.softmax(dim=1) * mask  # [B,C,H,W]
    onehot = F.one_hot(safe, num_classes).permute(0, 3, 1, 2).to(logits.dtype) * mask
    dims = (0, 2, 3)
    intersection = (probs * onehot).sum(dims)  # [C]
    denominator = probs.sum(dims) + onehot.sum(dims)  # [C]
    dice = (2 * intersection + smooth) / (denominator + smooth).clamp_min(1e-12)
    if weight is None:
        return 1 - dice.mean()
    weight = weight.to(logits.device)
    return 1 - (weight * dice).sum() / weight.sum().clamp_min(1e-12)


def focal_loss(
    logits: Tensor,
    target: Tensor,
    *,
    ignore_index: int,
    gamma: float = 2.0,
    alpha: Tensor | None = None,
) -> Tensor:
    """Multi-class focal loss (Lin et al. 2017), mean over non-ignored pixels.

    ``FL_i = -alpha[y_i] * (1 - p_i) ** gamma * log p_i`` with ``p_i = softmax(x_i)[y_i]``
    (``alpha`` = 1 when not given), averaged over the non-ignored pixels: a plain mean, as in
    RetinaNet, so with ``gamma = 0`` and no ``alpha`` it equals cross-entropy.
    """
    logits = logits.float()
    valid, safe = _valid_and_safe(target, ignore_index)
    logp = logits.log_softmax(dim=1).gather(1, safe.unsqueeze(1)).squeeze(1)  # [B,H,W]
    p = logp.exp()
    per_pixel = -((1 - p).clamp_min(0) ** gamma) * logp
    if alpha is not None:
        per_pixel = per_pixel * alpha.to(logits.device)[safe]
    per_pixel = per_pixel * valid
    return per_pixel.sum() / valid.sum().clamp_min(1)


def ohem_cross_entropy_loss(
    logits: Tensor,
    target: Tensor,
    *,
    ignore_index: int,
    thresh: float = 0.7,
    min_kept: int | float = 100_000,
    weight: Tensor | None = None,
) -> Tensor:
    """Cross-entropy over the hard pixels only (online hard example mining, PSPNet/mmseg).

    A non-ignored pixel is *hard* when the softmax probability of its true class is below
    ``thresh``. If fewer than ``k`` pixels are hard, the threshold is raised to the k-th
    smallest true-class probability, so that at least ``k`` pixels (the k hardest) are
    kept: ``threshold = max(thresh, sorted_p[k - 1])``, keep ``p <= threshold`` when the
    threshold was raised and ``p < thresh`` otherwise. ``k = min_kept`` when it is an int,
    ``ceil(min_kept * n_valid)`` when it is a float in (0, 1]; never more than ``n_valid``.
    The loss is the (weighted) mean cross-entropy over the kept pixels.

    Note: with the PSPNet default ``min_kept = 100_000`` per batch, small batches
    (e.g. 8 images of 96x96) keep every pixel, i.e. this is plain cross-entropy there.
    """
    logits = logits.float()
    valid, safe = _valid_and_safe(target, ignore_index)
    with torch.no_grad():
        p_true = logits.softmax(dim=1).gather(1, safe.unsqueeze(1)).squeeze(1)  # [B,H,W]
        valid_p = p_true[valid]
        n_valid = valid_p.numel()
        fraction = isinstance(min_kept, float) and min_kept <= 1
        k = int(np.ceil(min_kept * n_valid)) if fraction else int(min_kept)
        k = max(0, min(k, n_valid))
        keep = valid & (p_true < thresh)
        if k > 0:
            kth = torch.kthvalue(valid_p, k).values
            if kth >= thresh:  # fewer than k hard pixels: keep the k hardest (ties included)
                keep = valid & (p_true <= kth)
    kept_target = torch.where(keep, target, torch.full_like(target, ignore_index))
    return cross_entropy_loss(logits, kept_target, ignore_index=ignore_index, weight=weight)


# --------------------------------------------------------------------------- modules


def _weights_tensor(class_weights: WeightsLike | None, num_classes: int) -> Tensor | None:
    if class_weights is None:
        return None
    if isinstance(class_weights, Tensor):
        w = class_weights.detach().float()
    else:
        w = torch.as_tensor(np.asarray(class_weights, dtype=np.float32))
    if w.shape != (num_classes,):
        raise SeglabError(
            f"class weights have shape {tuple(w.shape)} but the dataset has {num_classes} classes; "
            f"give one weight per class"
        )
    if not torch.isfinite(w).all() or (w < 0).any():
        raise SeglabError(f"class weights must be finite and >= 0, got {w.tolist()}")
    return w


class _Loss(nn.Module):
    """Holds what every loss shares; class weights live in a non-persistent buffer so that
    ``.to(device)`` moves them but checkpoints do not carry them."""

    weight: Tensor | None

    def __init__(self, *, num_classes: int, ignore_index: int, class_weights: WeightsLike | None = None):
        super().__init__()
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.register_buffer("weight", _weights_tensor(class_weights, num_classes), persistent=False)


@LOSSES.register("ce")
class CrossEntropyLoss(_Loss):
    """Cross-entropy with ignore index and optional class weights."""

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        return cross_entropy_loss(logits, target, ignore_index=self.ignore_index, weight=self.weight)


@LOSSES.register("dice")
class DiceLoss(_Loss):
    """Soft multi-class Dice (see :func:`dice_loss`); class weights weight the class mean."""

    def __init__(self, *, smooth: float = 1.0, **kwargs: Any):
        super().__init__(**kwargs)
        self.smooth = smooth

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        return dice_loss(logits, target, ignore_index=self.ignore_index, smooth=self.smooth, weight=self.weight)


@LOSSES.register("focal")
class FocalLoss(_Loss):
    """Focal loss (see :func:`focal_loss`); class weights act as the per-class ``alpha``."""

    def __init__(self, *, gamma: float = 2.0, **kwargs: Any):
        super().__init__(**kwargs)
        self.gamma = gamma

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        return focal_loss(logits, target, ignore_index=self.ignore_index, gamma=self.gamma, alpha=self.weight)


@LOSSES.register("ce+dice")
class CEDiceLoss(_Loss):
    """``ce_weight * CE + dice_weight * Dice``; class weights go to both terms."""

    def __init__(self, *, ce_weight: float = 1.0, dice_weight: float = 1.0, smooth: float = 1.0, **kwargs: Any):
        super().__init__(**kwargs)
        self.ce_weight = ce_weight
        self.dice_weight = dice_weight
        self.smooth = smooth

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        ce = cross_entropy_loss(logits, target, ignore_index=self.ignore_index, weight=self.weight)
        dice = dice_loss(logits, target, ignore_index=self.ignore_index, smooth=self.smooth, weight=self.weight)
        return self.ce_weight * ce + self.dice_weight * dice


@LOSSES.register("ohem")
class OhemCrossEntropyLoss(_Loss):
    """Cross-entropy over the hardest pixels (see :func:`ohem_cross_entropy_loss`)."""

    def __init__(self, *, thresh: float = 0.7, min_kept: int | float = 100_000, **kwargs: Any):
        super().__init__(**kwargs)
        if not 0 < thresh <= 1:
            raise SeglabError(f"ohem thresh must be in (0, 1], got {thresh}")
        self.thresh = thresh
        self.min_kept = min_kept

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        return ohem_cross_entropy_loss(
            logits,
            target,
            ignore_index=self.ignore_index,
            thresh=self.thresh,
            min_kept=self.min_kept,
            weight=self.weight,
        )


def build_loss(
    name: str,
    *,
    num_classes: int,
    ignore_index: int,
    class_weights: WeightsLike | None = None,
    **options: Any,
) -> nn.Module:
    """Build a registered loss: ``module(logits [B,C,H,W], target [B,H,W] int64) -> scalar``.

    ``options`` are the loss's own settings, e.g. ``ce_weight``/``dice_weight`` for
    ``ce+dice``, ``gamma`` for ``focal``, ``thresh``/``min_kept`` for ``ohem``, ``smooth``
    for ``dice``; an unknown one is refused with the valid ones listed.
    """
    cls = LOSSES.get_or_raise(name, flag="--loss")
    allowed = _loss_options(cls)
    for key in options:
        if key not in allowed:
            raise SeglabError(
                f"loss '{name}' has no option '{key}'{did_you_mean(key, allowed)}; "
                f"its options are: {', '.join(sorted(allowed)) or 'none'}"
            )
    return cls(num_classes=num_classes, ignore_index=ignore_index, class_weights=class_weights, **options)


def _loss_options(cls: type[nn.Module]) -> set[str]:
    """Keyword arguments a loss class accepts beyond the shared three."""
    names: set[str] = set()
    for klass in cls.__mro__:
        if klass in (_Loss, nn.Module, object):
            break
        params = inspect.signature(klass.__init__).parameters  # type: ignore[misc]
        names |= {n for n, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY}
    return names


# --------------------------------------------------------------------------- class weights


def class_weights_from_counts(
    counts: Sequence[int] | np.ndarray,
    method: str,
    image_counts: Sequence[int] | np.ndarray | None = None,
) -> np.ndarray:
    """Per-class loss weights from per-class pixel counts (float64 array, one per class).

    With ``n_c`` the pixels of class c, ``N = sum_c n_c`` and P the classes with ``n_c > 0``:

    - ``inverse``: ``w_c = (N / n_c)``, rescaled so that the mean over P is 1.
    - ``median`` (median-frequency balancing, Eigen & Fergus 2015 / SegNet):
      ``freq_c = n_c / image_counts_c`` where ``image_counts_c`` is the total pixel count of
      the images in which c appears; ``w_c = median_{P}(freq) / freq_c``. Without
      ``image_counts`` every class is taken to appear in every image (``freq_c = n_c / N``).
    - ``enet`` (Paszke et al. 2016): ``w_c = 1 / ln(1.02 + n_c / N)``.

    A class with no pixels gets weight 0 (never NaN or inf): it cannot be learnt anyway.
    """
    if method not in CLASS_WEIGHT_METHODS:
        raise SeglabError(
            f"unknown class-weight method '{method}'{did_you_mean(method, CLASS_WEIGHT_METHODS)}; "
            f"choose one of: {', '.join(CLASS_WEIGHT_METHODS)}"
        )
    n = np.asarray(counts, dtype=np.float64)
    if n.ndim != 1 or (n < 0).any() or not np.isfinite(n).all():
        raise ValueError(f"counts must be a 1-D array of non-negative numbers, got {n.tolist()}")
    present = n > 0
    if not present.any():
        raise SeglabError("cannot compute class weights: the training masks hold no labelled pixel")
    total = n.sum()
    weights = np.zeros_like(n)
    if method == "inverse":
        weights[present] = total / n[present]
        weights[present] /= weights[present].mean()
    elif method == "median":
        if image_counts is None:
            denom = np.full_like(n, total)
        else:
            denom = np.asarray(image_counts, dtype=np.float64)
            if denom.shape != n.shape:
                raise ValueError(f"image_counts has shape {denom.shape}, counts has {n.shape}")
            if (denom[present] < n[present]).any():
                raise ValueError("image_counts_c must be >= counts_c (pixels of the images holding c)")
        freq = n[present] / denom[present]
        weights[present] = np.median(freq) / freq
    else:  # enet
        weights[present] = 1.0 / np.log(1.02 + n[present] / total)
    return weights
