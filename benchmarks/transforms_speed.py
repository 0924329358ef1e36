"""By-hand benchmark: the training augmentation in torchvision.transforms.v2 vs albumentations.

Not a test. Runs the same pipeline with both libraries on the first N pairs of a CamVid-style
pair list and prints images/s (median of the repeats) and the ratio, then writes the numbers
to ``benchmarks/results/transforms_speed.json``.

Pipeline (both libraries): resize so the long side = 480 * s, s ~ U(0.5, 2) (bilinear with
antialiasing / INTER_AREA when shrinking for the image, nearest for the mask); pad to 360x480
(image 0, mask 255); random crop 360x480; horizontal flip p=0.5; colour jitter (brightness,
contrast, saturation 0.2, hue 0.05) on the image; output torch uint8 [3,H,W] and int64 [H,W],
which is what ``SegmentationDataset`` hands on. The albumentations side is seglab's own
``seglab.data.transforms.TrainTransform``; the torchvision side is the equivalent written with
``torchvision.transforms.v2.functional`` below (the candidate that lost).

Modes:
  pre-decoded    arrays decoded once up front; only the augmentation is timed
  decode PIL     each image/mask read with PIL (what seglab.data.io does) + augmentation
  decode native  each library's own decoder: torchvision.io.decode_png / cv2.imread

Both run single-threaded (torch.set_num_threads(1), cv2.setNumThreads(1)), as in a DataLoader
worker, where torch is set to one thread and extra threads would fight the other workers.

    python benchmarks/transforms_speed.py [--root /work/shared/data/camvid] [--n 100] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torchvision
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from seglab.data.transforms import TrainTransform

IMG_SIZE, CROP, SCALE, HFLIP, JITTER, HUE, IGNORE = 480, (360, 480), (0.5, 2.0), 0.5, 0.2, 0.05, 255


def long_side_size(height: int, width: int, long_side: float) -> tuple[int, int]:
    scale = long_side / max(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


def read_pairs(root: Path, n: int) -> list[tuple[Path, Path]]:
    lines = (root / "train.txt").read_text().split("\n")
    pairs = [line.split() for line in lines if line.strip()][:n]
    return [(root / img, root / msk) for img, msk in pairs]


# --- torchvision.transforms.v2 (the candidate that lost; kept here so the run can be repeated) -


class TorchvisionTrainTransform:
    """The same steps as seglab's TrainTransform, in torchvision.transforms.v2 functional ops."""

    def __init__(self) -> None:
        from torchvision import tv_tensors
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms.v2 import functional as F

        self.tv_tensors, self.mode, self.F = tv_tensors, InterpolationMode, F

    def __call__(self, image: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        F, mode = self.F, self.mode
        img, msk = self.tv_tensors.Image(image), self.tv_tensors.Mask(mask)
        s = SCALE[0] + (SCALE[1] - SCALE[0]) * torch.rand(()).item()
        size = list(long_side_size(*img.shape[-2:], IMG_SIZE * s))
        img = F.resize(img, size, interpolation=mode.BILINEAR, antialias=True)
        msk = F.resize(msk, size, interpolation=mode.NEAREST_EXACT)
        pad = [0, 0, max(CROP[1] - size[1], 0), max(CROP[0] - size[0], 0)]
        if any(pad):
            img, msk = F.pad(img, pad, fill=0), F.pad(msk, pad, fill=IGNORE)
        top = int(torch.randint(0, img.shape[-2] - CROP[0] + 1, ()))
        left = int(torch.randint(0, img.shape[-1] - CROP[1] + 1, ()))
        img, msk = F.crop(img, top, left, *CROP), F.crop(msk, top, left, *CROP)
        if torch.rand(()) < HFLIP:
            img, msk = F.horizontal_flip(img), F.horizontal_flip(msk)
        factors = (1 + (2 * torch.rand(3) - 1) * JITTER).tolist()
        hue = float((2 * torch.rand(()) - 1) * HUE)
        for op in torch.randperm(4).tolist():  # random order, as ColorJitter
            if op == 0:
                img = F.adjust_brightness(img, factors[0])
            elif op == 1:
                img = F.adjust_contrast(img, factors[1])
            elif op == 2:
                img = F.adjust_saturation(img, factors[2])
            else:
                img = F.adjust_hue(img, hue)
        return img.as_subclass(torch.Tensor), msk.as_subclass(torch.Tensor).long()


def make_torchvision() -> Callable[[np.ndarray, np.ndarray], tuple[torch.Tensor, torch.Tensor]]:
    transform = TorchvisionTrainTransform()

    def run(image: np.ndarray, mask: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        return transform(torch.from_numpy(image).permute(2, 0, 1), torch.from_numpy(mask))

    return run


def decode_torchvision(img_path: Path, mask_path: Path) -> tuple[np.ndarray, np.ndarray]:
    from torchvision.io import ImageReadMode, decode_png, read_file

    image = decode_png(read_file(str(img_path)), ImageReadMode.RGB)  # [3,H,W]
    mask = decode_png(read_file(str(mask_path)), ImageReadMode.UNCHANGED)[0]
    # back to HWC numpy (a view) so the same `run` serves every mode
    return image.permute(1, 2, 0).numpy(), mask.numpy()


# --- albumentations: seglab's own TrainTransform ------------------------------------------------


def make_albumentations() -> Callable[[np.ndarray, np.ndarray], tuple[torch.Tensor, torch.Tensor]]:
    transform = TrainTransform(IMG_SIZE, CROP, SCALE, HFLIP, JITTER, IGNORE)
    assert transform.hue == HUE

    def run(image: np.ndarray, mask: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        return transform(torch.from_numpy(image).permute(2, 0, 1), torch.from_numpy(mask))

    return run


def decode_cv2(img_path: Path, mask_path: Path) -> tuple[np.ndarray, np.ndarray]:
    import cv2

    image = cv2.cvtColor(cv2.imread(str(img_path), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    mask = cv2.imread(str(mask_path), cv2.IMREAD_UNCHANGED)
    return image, mask


# --- shared ------------------------------------------------------------------------------------


def decode_pil(img_path: Path, mask_path: Path) -> tuple[np.ndarray, np.ndarray]:
    with Image.open(img_path) as im:
        image = np.asarray(im.convert("RGB"))
    with Image.open(mask_path) as im:
        mask = np.asarray(im)
    return image, mask


def time_once(
    run: Callable[[np.ndarray, np.ndarray], tuple[torch.Tensor, torch.Tensor]],
    items: list[tuple[Path, Path]] | list[tuple[np.ndarray, np.ndarray]],
    decode: Callable[[Path, Path], tuple[np.ndarray, np.ndarray]] | None,
) -> float:
    """Images per second over one pass of ``items``."""
    start = time.perf_counter()
    for a, b in items:
        image, mask = decode(a, b) if decode is not None else (a, b)
        out_image, out_mask = run(image, mask)
        assert out_image.shape[-2:] == CROP and out_mask.dtype == torch.int64
    return len(items) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=Path("/work/shared/data/camvid"))
    parser.add_argument("--n", type=int, default=100, help="number of train pairs")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "transforms_speed.json")
    args = parser.parse_args()

    import albumentations
    import cv2

    # PIL-decoded arrays are read-only; torch warns when wrapping them (nothing writes to them)
    warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    torch.manual_seed(0)

    pairs = read_pairs(args.root, args.n)
    decoded = [decode_pil(a, b) for a, b in pairs]
    libraries = {"torchvision": make_torchvision(), "albumentations": make_albumentations()}
    native = {"torchvision": decode_torchvision, "albumentations": decode_cv2}
    modes = ["pre-decoded", "decode PIL", "decode native"]

    results: list[dict] = []
    for mode in modes:
        for library, run in libraries.items():
            items = decoded if mode == "pre-decoded" else pairs
            decode = {"pre-decoded": None, "decode PIL": decode_pil, "decode native": native[library]}[mode]
            time_once(run, items[:10], decode)  # warm-up
            # each repeat is a full pass; the median damps a noisy shared host
            speeds = [time_once(run, items, decode) for _ in range(args.repeats)]
            results.append(
                {
                    "mode": mode,
                    "library": library,
                    "images_per_s": statistics.median(speeds),
                    "repeats": speeds,
                }
            )
            print(f"  {mode:14s} {library:15s} {statistics.median(speeds):8.1f} img/s", file=sys.stderr)

    by = {(r["mode"], r["library"]): r["images_per_s"] for r in results}
    print(f"\n{len(pairs)} CamVid train pairs, median of {args.repeats}, 1 thread")
    print(f"| {'mode':14s} | {'torchvision img/s':>17s} | {'albumentations img/s':>20s} | {'albu / tv':>9s} |")
    print(f"|{'-' * 16}|{'-' * 19}|{'-' * 22}|{'-' * 11}|")
    for mode in modes:
        tv, al = by[(mode, "torchvision")], by[(mode, "albumentations")]
        print(f"| {mode:14s} | {tv:17.1f} | {al:20.1f} | {al / tv:9.2f} |")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "pipeline": {
            "img_size": IMG_SIZE,
            "crop": CROP,
            "scale_range": SCALE,
            "hflip": HFLIP,
            "jitter": JITTER,
            "hue": HUE,
            "ignore_index": IGNORE,
        },
        "data": {"root": str(args.root), "pairs": len(pairs)},
        "repeats": args.repeats,
        "threads": 1,
        "env": {
            "python": platform.python_version(),
            "machine": platform.machine(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "torch": torch.__version__,
            "torchvision": torchvision.__version__,
            "albumentations": albumentations.__version__,
            "opencv": cv2.__version__,
        },
        "results": results,
    }
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
