"""From uint8 images to class probabilities: the one path val, predict and the API share.

``Inferencer`` normalises, runs the model whole-image or as a sliding window of blended
tiles, averages flip and multi-scale test-time augmentation, and returns softmax
probabilities at the size it was given. Callers resize those to the label resolution.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def resolve_device(name: str) -> torch.device:
    from seglab.errors import SeglabError

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise SeglabError(f"--device {name!r} is not a device; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SeglabError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    return device


AMP_DTYPES = ("auto", "bfloat16", "float16")


def amp_dtype(device: torch.device, name: str = "auto") -> torch.dtype:
    """``auto``: bfloat16 on CPU (2-3x faster convolutions here), float16 on CUDA."""
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.bfloat16
    return {"bfloat16": torch.bfloat16, "float16": torch.float16}[name]


@functools.cache
def cpu_has_bfloat16() -> bool:
    """Whether this CPU computes in bfloat16 itself (AVX-512 BF16, AMX), which oneDNN's bfloat16
    kernels need to be fast. Without it they emulate it: on an AVX2 AMD EPYC, LR-ASPP and U-Net
    trained 10-14x slower under bfloat16 autocast than in float32 (docs/NOTES.md)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def amp_on(device: torch.device, enabled: bool, dtype: str = "auto") -> bool:
    """Whether ``--amp`` autocasts on ``device``: on CUDA, and on a CPU with bfloat16 instructions.
    On a CPU without them ``--amp`` runs in float32, the faster precision there, unless
    ``--amp-dtype`` names a precision, which is then used as asked."""
    return enabled and (device.type != "cpu" or dtype != "auto" or cpu_has_bfloat16())


def autocast(device: torch.device, enabled: bool, dtype: str = "auto") -> contextlib.AbstractContextManager:
    if not amp_on(device, enabled, dtype):
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=amp_dtype(device, dtype))


def normalize(images: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """uint8 [B,C,H,W] -> float [B,C,H,W], (x/255 - mean) / std."""
    m = torch.tensor(mean, device=images.device).view(1, -1, 1, 1) * 255
    s = torch.tensor(std, device=images.device).view(1, -1, 1, 1) * 255
    return (images.float() - m) / s


def _window_starts(size: int, window: int, stride: int) -> list[int]:
    if size <= window:
        return [0]
    starts = list(range(0, size - window, stride))
    return [*starts, size - window]


def _gaussian_weight(h: int, w: int, device: torch.device) -> Tensor:
    """A window weight highest in the centre (nnU-Net's blending), never zero at the edges."""

    def axis(n: int) -> Tensor:
        x = torch.arange(n, device=device, dtype=torch.float32) - (n - 1) / 2
        return torch.exp(-0.5 * (x / (n / 4)) ** 2)

    weight = axis(h)[:, None] * axis(w)[None, :]
    return (weight / weight.max()).clamp_min(0.1)


@dataclass
class Inferencer:
    model: nn.Module
    mean: Sequence[float]
    std: Sequence[float]
    device: torch.device
    amp: bool = False
    amp_dtype: str = "auto"  # auto, bfloat16 or float16
    channels_last: bool = True
    mode: str = "whole"  # whole or slide
    window: tuple[int, int] = (512, 512)  # slide: tile size (h, w)
    overlap: float = 1 / 3  # slide: fraction of a tile shared with its neighbour
    window_batch: int = 4  # slide: tiles per forward pass
    flip: bool = False  # TTA: also run on the mirrored image
    scales: Sequence[float] = (1.0,)  # TTA: multi-scale factors

    @torch.inference_mode()
    def probabilities(self, images: Tensor) -> Tensor:
        """uint8 [B,C,H,W] -> softmax probabilities float32 [B,K,H,W]."""
        x = normalize(images.to(self.device), self.mean, self.std)
        return self._tta(x, self._slide if self.mode == "slide" else self._whole)

    @torch.inference_mode()
    def logits(self, images: Tensor) -> Tensor:
        """uint8 [B,C,H,W] -> the model's scores [B,K,H,W] (autocast dtype), whole image, no TTA:
        the cheapest way to labels (their argmax) when no probabilities are needed."""
        return self._run(normalize(images.to(self.device), self.mean, self.std), cast=False)

    def _tta(self, x: Tensor, forward) -> Tensor:
        """Average ``forward``'s probabilities over the flips and scales asked for."""
        _, _, h, w = x.shape
        total: Tensor | None = None
        runs = 0
        for scale in self.scales:
            # An explicit size (not scale_factor) keeps the resampling grid mirror-symmetric.
            size = (max(1, round(h * scale)), max(1, round(w * scale)))
            xs = x if scale == 1.0 else F.interpolate(x, size=size, mode="bilinear", align_corners=False)
            for flipped in (False, True) if self.flip else (False,):
                p = forward(xs.flip(-1) if flipped else xs)
                if flipped:
                    p = p.flip(-1)
                if p.shape[-2:] != (h, w):
                    p = F.interpolate(p, size=(h, w), mode="bilinear", align_corners=False)
                total = p if total is None else total + p
                runs += 1
        assert total is not None
        return total / runs

    def _run(self, x: Tensor, cast: bool = True) -> Tensor:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(self.device, self.amp, self.amp_dtype):
            out = self.model(x)
        return out.float() if cast else out

    def _whole(self, x: Tensor) -> Tensor:
        return self._run(x).softmax(1)

    def _tiles(self, h: int, w: int) -> tuple[int, int, list[int], list[int]]:
        """Window size and the start rows and columns of the tiles covering an h x w image."""
        wh, ww = min(self.window[0], h), min(self.window[1], w)
        rows = _window_starts(h, wh, max(1, int(wh * (1 - self.overlap))))
        cols = _window_starts(w, ww, max(1, int(ww * (1 - self.overlap))))
        return wh, ww, rows, cols

    def _slide(self, x: Tensor) -> Tensor:
        """Blend the probabilities of overlapping tiles; holds [B,K,H,W] (see stream_labels)."""
        b, _, h, w = x.shape
        wh, ww, rows, cols = self._tiles(h, w)
        weight = _gaussian_weight(wh, ww, x.device)
        tiles = [(y, x0) for y in rows for x0 in cols]
        out: Tensor | None = None
        norm = torch.zeros(1, 1, h, w, device=x.device)
        for group in _chunks(tiles, max(1, self.window_batch // b)):
            crops = torch.cat([x[:, :, y : y + wh, x0 : x0 + ww] for y, x0 in group])
            probs = self._whole(crops)  # [len(group) * B, K, wh, ww]
            if out is None:
                out = torch.zeros(b, probs.shape[1], h, w, device=x.device)
            for i, (y, x0) in enumerate(group):
                out[:, :, y : y + wh, x0 : x0 + ww] += probs[i * b : (i + 1) * b] * weight
                norm[:, :, y : y + wh, x0 : x0 + ww] += weight
        assert out is not None
        return out / norm

    @torch.inference_mode()
    def stream_labels(self, image: Tensor) -> tuple[Tensor, Tensor]:
        """Sliding-window labels for one image of any size: uint8 [1,C,H,W] (on the CPU) ->
        (labels uint8 [H,W], confidence float16 [H,W]).

        Tiles go one row of tiles at a time. Blended probabilities are kept only for the rows the
        current row of tiles covers (K x window height x W floats); rows no later tile reaches are
        turned into labels at once. Each tile is normalised on its own. So memory is the image,
        3 bytes a pixel for the result and one band, not 4K bytes a pixel for K classes (17 GB
        for a 20000x20000 image and 11 classes). Flip and scale TTA apply to each tile.
        """
        _, _, h, w = image.shape
        wh, ww, rows, cols = self._tiles(h, w)
        weight = _gaussian_weight(wh, ww, self.device)
        labels: Tensor | None = None  # [H, W], allocated once the number of classes is known
        confidence = torch.empty(h, w, dtype=torch.float16)
        band: Tensor | None = None  # [K, wh, W] blended probabilities of rows base .. base + wh
        norm = torch.zeros(wh, w, device=self.device)
        base = 0

        def emit(n: int) -> None:  # rows base .. base + n are final
            assert band is not None and labels is not None
            conf, lab = (band[:, :n] / norm[:n]).max(0)
            labels[base : base + n], confidence[base : base + n] = lab.cpu().to(labels.dtype), conf.half().cpu()

        for y in rows:
            if band is not None and y > base:
                shift = y - base
                emit(shift)
                band = torch.cat([band[:, shift:], band.new_zeros(band.shape[0], shift, w)], 1)
                norm = torch.cat([norm[shift:], norm.new_zeros(shift, w)])
                base = y
            for group in _chunks(cols, self.window_batch):
                crops = torch.cat([image[:, :, y : y + wh, x0 : x0 + ww] for x0 in group]).to(self.device)
                probs = self._tta(normalize(crops, self.mean, self.std), self._whole)  # [n,K,wh,ww]
                if band is None:
                    band = torch.zeros(probs.shape[1], wh, w, device=self.device)
                    labels = torch.empty(h, w, dtype=label_dtype(probs.shape[1]))
                for tile, x0 in zip(probs, group, strict=True):
                    band[:, :, x0 : x0 + ww] += tile * weight
                    norm[:, x0 : x0 + ww] += weight
        emit(h - base)
        assert labels is not None
        return labels, confidence


def _chunks(items: list, size: int) -> Iterator[list]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def label_dtype(num_classes: int) -> torch.dtype:
    """Class indices fit a byte up to 256 classes; more need 16 bits (stored as int32: torch has no uint16 ops)."""
    return torch.uint8 if num_classes <= 256 else torch.int32


BAND_BYTES = 64 << 20  # float scores held at a time while resizing them to a large image


def resized_labels(scores: Tensor, size: tuple[int, int], *, confidence: bool = False) -> tuple[Tensor, Tensor | None]:
    """The argmax (and its score) of ``scores`` [K, h, w] resized bilinearly to ``size`` (H, W):
    labels [H, W] (uint8, int32 past 256 classes) and, with ``confidence``, float16 scores [H, W].

    Bilinear resizing is separable, so it is done a band of output rows at a time: rows by
    interpolating between the two source rows each output row falls between (the same weights as
    ``F.interpolate(..., align_corners=False)``), then columns by ``F.interpolate``. Memory is K x
    band x W floats (BAND_BYTES), not the K x H x W that resizing the whole map takes (39 GB for 11
    classes at 30000 x 30000)."""
    k, h, w = scores.shape
    height, width = size
    labels = torch.empty(height, width, dtype=label_dtype(k))
    best = torch.empty(height, width, dtype=torch.float16) if confidence else None
    rows = max(1, BAND_BYTES // (4 * k * width))
    scale = h / height
    for top in range(0, height, rows):
        r = torch.arange(top, min(top + rows, height), dtype=torch.float64, device=scores.device)
        src = ((r + 0.5) * scale - 0.5).clamp(min=0)
        i0 = src.floor().long().clamp(max=h - 1)
        i1 = (i0 + 1).clamp(max=h - 1)
        lam = (src - i0).float()[None, :, None]  # [1, n, 1]
        band = scores[:, i0].float() * (1 - lam) + scores[:, i1].float() * lam  # [K, n, w]
        if w != width:
            band = F.interpolate(band[None], size=(len(r), width), mode="bilinear", align_corners=False)[0]
        conf, lab = band.max(0)
        labels[top : top + len(r)] = lab.cpu().to(labels.dtype)
        if best is not None:
            best[top : top + len(r)] = conf.cpu().half()
    return labels, best


def resize_to(probs: Tensor, size: tuple[int, int]) -> Tensor:
    """Resize probabilities [B,K,h,w] to a label resolution (h', w')."""
    if tuple(probs.shape[-2:]) == tuple(size):
        return probs
    return F.interpolate(probs, size=size, mode="bilinear", align_corners=False)
