"""Using a trained generator: images from label maps or noise (``seglab gen sample``; for StyleGAN
also truncation and the style-mixing grid) and new training pairs for a segmenter (``seglab gen augment``).

Rare classes get more than their share in ``augment``: label maps are drawn with a weight that
grows with their rare-class pixels, and each one receives the rare-class regions of other label
maps ("copy-paste" in label space, Ghiasi et al. 2021, but before the image exists), so the
generator paints poles, signs and cyclists in new places and the pair stays consistent.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import cast

import numpy as np
import torch
import yaml
from PIL import Image
from torchvision.utils import make_grid
from tqdm import tqdm

from seglab.data import get_split, read_mask, resolve_dataset
from seglab.engine.inference import resolve_device
from seglab.engine.predictor import list_sources
from seglab.errors import SeglabError
from seglab.files import atomic_path
from seglab.gen.data import read_label_map, resize_labels, to_uint8
from seglab.gen.models import VAE, GenCard, one_hot
from seglab.gen.stylegan import StyleGAN2Generator
from seglab.gen.trainer import load_generator
from seglab.registry import did_you_mean


def colorize(labels: torch.Tensor, card: GenCard) -> torch.Tensor:
    """[H, W] class indices -> float [3, H, W] in [0, 1] in the class colours (ignore: black)."""
    lut = torch.zeros(256, 3)
    lut[: len(card.colors)] = torch.tensor(card.colors, dtype=torch.float32) / 255
    return lut[labels.long().clamp(0, 255)].permute(2, 0, 1)


class Generator:
    """A trained generator, ready to paint: ``Generator("generator.pt")(labels) -> uint8 images``."""

    def __init__(self, weights: str | Path, *, device: str = "auto", seed: int = 0, trust: bool = False) -> None:
        self.model, self.card, ckpt = load_generator(weights, trust=trust)
        self.config = ckpt.get("config", {})
        self.device = resolve_device(device)
        self.model.to(self.device)
        if self.card.conditional:
            self.model.train()  # pix2pix samples with dropout on: its only source of variety (no BatchNorm here)
        self.rng = torch.Generator().manual_seed(seed)

    @property
    def size(self) -> tuple[int, int]:
        return self.card.size[0], self.card.size[1]

    @torch.no_grad()
    def __call__(self, labels: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
        """Label maps ([B, H, W], or a list of [H, W] of any sizes; class indices, resized to the
        generator's size) -> uint8 [B, 3, H, W]."""
        if not self.card.conditional:
            raise SeglabError(f"a {self.card.arch} generator makes images from noise; use .sample(n)")
        labels = torch.stack([resize_labels(lab, self.size) for lab in labels])
        onehot = one_hot(labels, self.card.num_classes, self.card.ignore_index).to(self.device)
        torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=self.rng)))  # dropout, reproducibly
        return to_uint8(self.model(onehot).cpu())

    @torch.no_grad()
    def sample(self, n: int, *, truncation: float = 1.0) -> torch.Tensor:
        """``n`` images from noise (dcgan, vae, stylegan) -> uint8 [n, 3, H, W]. ``truncation``
        (stylegan): psi of w_avg + psi (w - w_avg), 1 = none."""
        if self.card.conditional:
            raise SeglabError(f"a {self.card.arch} generator paints label maps; call it with labels")
        z = torch.randn(n, self.card.z_dim, generator=self.rng).to(self.device)
        if self.card.arch == "stylegan":
            torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=self.rng)))  # its noise inputs
            return to_uint8(self.model(z, psi=truncation).cpu())
        decode = cast(VAE, self.model).decode if self.card.arch == "vae" else self.model
        return to_uint8(decode(z).cpu())

    @torch.no_grad()
    def mixing_grid(
        self, rows: int, cols: int, *, crossover: int | None = None, truncation: float = 1.0
    ) -> torch.Tensor:
        """StyleGAN's style-mixing figure, uint8 [3, H', W']: ``rows`` source images down the left,
        ``cols`` along the top, and in between each row's ws for the layers before ``crossover``
        (the coarse ones: layout, shapes; default half of them) with the column's after (the fine
        ones: colour, texture). Noise inputs are the model's fixed maps, so only the styles differ."""
        g = cast(StyleGAN2Generator, self.model)
        crossover = g.num_ws // 2 if crossover is None else crossover
        z = torch.randn(rows + cols, self.card.z_dim, generator=self.rng).to(self.device)
        ws = g.broadcast(g.truncate(g.mapping(z), truncation))  # [R + C, num_ws, w_dim]
        sources = g.synthesis(ws, noise="const")
        r, c = torch.meshgrid(torch.arange(rows), torch.arange(cols) + rows, indexing="ij")
        mixed = torch.cat([ws[r.flatten(), :crossover], ws[c.flatten(), crossover:]], dim=1)
        inner = g.synthesis(mixed, noise="const").view(rows, cols, 3, *self.size)
        tiles = [torch.full_like(sources[0], -1.0), *sources[rows:]]  # a blank corner, then the columns
        for i in range(rows):
            tiles += [sources[i], *inner[i]]
        return make_grid(to_uint8(torch.stack(tiles).cpu()), nrow=cols + 1, padding=2)


def save_png(array: np.ndarray, path: Path) -> None:
    with atomic_path(path) as tmp:
        Image.fromarray(array).save(tmp, format="PNG")


def sample_folder(
    weights: str | Path, masks: str | Path | None, out: str | Path, *, n: int = 16, batch: int = 8,
    device: str = "auto", seed: int = 0, progress: bool = True, trust: bool = False,
    truncation: float | None = None, mixing_grid: Sequence[int] | None = None, crossover: int | None = None,
) -> list[Path]:  # fmt: skip
    """Paint every label map in ``masks`` (pix2pix, spade), or ``n`` images from noise (dcgan, vae,
    stylegan), into ``out`` as PNGs at the generator's size; or, with ``mixing_grid`` (rows,
    columns; stylegan), one ``mixing_grid.png``. Returns the written files."""
    gen = Generator(weights, device=device, seed=seed, trust=trust)
    check_stylegan_options(gen, weights, truncation, mixing_grid, crossover)
    psi = 1.0 if truncation is None else truncation
    out = Path(out)
    written: list[Path] = []
    if mixing_grid is not None:
        grid = gen.mixing_grid(mixing_grid[0], mixing_grid[1], crossover=crossover, truncation=psi)
        written.append(out / "mixing_grid.png")
        save_png(grid.permute(1, 2, 0).numpy(), written[-1])
        return written
    if not gen.card.conditional:
        if masks:
            raise SeglabError(f"--masks: {weights} is an unconditional {gen.card.arch}; drop --masks, use --n")
        for start in range(0, n, batch):
            for i, image in enumerate(gen.sample(min(batch, n - start), truncation=psi), start=start):
                written.append(out / f"sample_{i:05d}.png")
                save_png(image.permute(1, 2, 0).numpy(), written[-1])
        return written
    if masks is None:
        raise SeglabError(f"--masks is required: {weights} is a {gen.card.arch} generator that paints label maps")
    paths = list_sources(masks, "--masks")
    card = gen.card
    for start in tqdm(range(0, len(paths), batch), desc="sample", disable=None if progress else True):
        chunk = paths[start : start + batch]
        labels = [torch.from_numpy(read_label_map(p, card.num_classes, card.ignore_index, card.colors)) for p in chunk]
        images = gen(labels)
        for path, image in zip(chunk, images, strict=True):
            written.append(out / f"{path.stem}.png")
            save_png(image.permute(1, 2, 0).numpy(), written[-1])
    return written


def check_stylegan_options(
    gen: Generator,
    weights: str | Path,
    truncation: float | None,
    mixing_grid: Sequence[int] | None,
    crossover: int | None,
) -> None:
    """Refuse --truncation, --mixing-grid and --crossover where they cannot apply, in one line each."""
    card = gen.card
    given = [f for f, v in (("--truncation", truncation), ("--mixing-grid", mixing_grid)) if v is not None]
    if given and card.arch != "stylegan":
        raise SeglabError(
            f"{given[0]}: {weights} is a {card.arch} generator; only stylegan has styles; drop {given[0]}"
        )
    if truncation is not None and not 0 <= truncation <= 1:
        raise SeglabError(f"--truncation {truncation}: use 0 (the mean image) to 1 (no truncation)")
    if mixing_grid is not None and (len(mixing_grid) != 2 or min(mixing_grid) < 1):
        raise SeglabError(f"--mixing-grid {' '.join(map(str, mixing_grid))}: give ROWS COLS, 1 or more each")
    if crossover is not None:
        if mixing_grid is None:
            raise SeglabError("--crossover goes with --mixing-grid ROWS COLS; add it, or drop --crossover")
        num_ws = cast(StyleGAN2Generator, gen.model).num_ws
        if not 1 <= crossover < num_ws:
            raise SeglabError(
                f"--crossover {crossover}: this generator has {num_ws} style layers; use 1 to {num_ws - 1}"
            )


# ---------------------------------------------------------------- augment
def class_ids(names: Sequence[str], classes: Sequence[str], flag: str = "--rare") -> list[int]:
    lower = [c.lower() for c in classes]
    ids = []
    for name in names:
        if name.lower() not in lower:
            raise SeglabError(
                f"{flag} {name!r}{did_you_mean(name, list(classes))}: the classes are {', '.join(classes)}"
            )
        ids.append(lower.index(name.lower()))
    return ids


def paste_rare(
    base: np.ndarray, donors: Sequence[np.ndarray], rare: Sequence[int], rng: np.random.Generator
) -> np.ndarray:
    """``base`` with the rare-class pixels of each donor written over it (each donor flipped
    left-right at random), so rare objects appear in new places of a plausible layout."""
    out = base.copy()
    for donor in donors:
        if rng.random() < 0.5:
            donor = donor[:, ::-1]
        where = np.isin(donor, rare)
        out[where] = donor[where]
    return out


def _pick(weights: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` indices drawn by weight, without replacement while they last."""
    p = weights / weights.sum()
    picks: list[int] = []
    while len(picks) < n:
        take = min(n - len(picks), len(p))
        picks += rng.choice(len(p), size=take, replace=False, p=p).tolist()
    return np.asarray(picks)


def augment(
    weights: str | Path,
    out: str | Path,
    *,
    data: str | None = None,
    n: int | None = None,
    rare: Sequence[str] = (),
    paste: int = 0,
    with_real: bool = True,
    batch: int = 8,
    device: str = "auto",
    seed: int = 0,
    data_cache: str | None = None,
    progress: bool = True,
    trust: bool = False,
    log=print,
) -> Path:
    """Write ``n`` generated pairs (``images/``, ``masks/``) and a ``data.yaml`` that ``seglab train`` reads.

    Label maps come from the train split of ``data`` (default: the generator's own training data).
    The dataset's train list holds the synthetic pairs and, ``with_real``, the real training pairs
    (by absolute path, nothing is copied); its val list is the real val split, so a segmenter
    trained on it is scored on real images only. Returns the data.yaml path.
    """
    gen = Generator(weights, device=device, seed=seed, trust=trust)
    card = gen.card
    if not card.conditional:
        raise SeglabError(f"{weights} is an unconditional {card.arch}: its images have no label maps to train on")
    data = data or gen.config.get("data")
    if not data:
        raise SeglabError(f"{weights} does not say which data it was trained on; pass --data")
    spec = resolve_dataset(data, cache_dir=data_cache, progress=progress)
    if spec.classes != card.classes:
        raise SeglabError(f"--data {data}: its classes differ from the generator's ({', '.join(card.classes)})")
    val_fraction, split_seed = gen.config.get("val_fraction", 0.1), gen.config.get("seed", 0)
    train = get_split(spec, "train", val_fraction=val_fraction, seed=split_seed)
    val = get_split(spec, "val", val_fraction=val_fraction, seed=split_seed)
    n = len(train) if n is None else n
    if n < 1:
        raise SeglabError("--n must be at least 1")
    out = Path(out)
    if (out / "data.yaml").exists():
        raise SeglabError(f"--out {out} already holds a generated dataset; choose another --out")
    rare_ids = class_ids(rare, card.classes)
    if paste and not rare_ids:
        raise SeglabError("--paste copies rare-class regions between label maps; name them with --rare")

    labels = [  # the masks only: the images are not needed
        resize_labels(torch.from_numpy(read_mask(s, spec)), card.size).numpy()
        for s in tqdm(train, desc="reading masks", disable=None if progress else True)
    ]
    rng = np.random.default_rng(seed)
    share = np.array([np.isin(lab, rare_ids).mean() for lab in labels]) if rare_ids else np.zeros(len(labels))
    # a map with the average rare-class share is drawn 21x as often as one without rare pixels
    weights_ = 1.0 + 20.0 * share / max(share.mean(), 1e-9) if rare_ids else np.ones(len(labels))
    chosen = _pick(weights_, n, rng)
    donors_by = _pick(np.maximum(share, 1e-6), n * paste, rng).reshape(n, paste) if paste else np.zeros((n, 0), int)

    lines = []
    for start in tqdm(range(0, n, batch), desc="augment", disable=None if progress else True):
        maps = []
        for k in range(start, min(start + batch, n)):
            base = labels[chosen[k]]
            maps.append(paste_rare(base, [labels[d] for d in donors_by[k]], rare_ids, rng) if paste else base)
        images = gen(torch.from_numpy(np.stack(maps)))
        for k, (lab, image) in enumerate(zip(maps, images, strict=True), start=start):
            name = f"synth_{k:05d}_{train[chosen[k]].image.stem}"
            save_png(image.permute(1, 2, 0).numpy(), out / "images" / f"{name}.png")
            save_png(lab.astype(np.uint8), out / "masks" / f"{name}.png")
            lines.append(f"images/{name}.png masks/{name}.png")
    (out / "synthetic.txt").write_text("\n".join(lines) + "\n")
    real = [f"{s.image.resolve()} {s.mask.resolve()}" for s in train if s.mask is not None]
    (out / "train.txt").write_text("\n".join(lines + (real if with_real else [])) + "\n")
    (out / "val.txt").write_text("\n".join(f"{s.image.resolve()} {s.mask.resolve()}" for s in val if s.mask) + "\n")
    meta = {
        "path": ".",
        "format": "pairs",
        "train": "train.txt",
        "val": "val.txt",
        "classes": list(card.classes),
        "colors": [list(c) for c in card.colors],
        "ignore_index": card.ignore_index,
        "mask_encoding": "index",
    }
    header = (
        f"# {n} pairs painted by {Path(weights).resolve()} ({card.arch}) from label maps of {data}"
        + (f"; rare classes {', '.join(rare)}, {paste} pasted donor(s) per map" if rare else "")
        + (
            f"\n# train.txt: the synthetic pairs and the {len(real)} real ones"
            if with_real
            else "\n# train.txt: synthetic only"
        )
        + "\n"
    )
    (out / "data.yaml").write_text(header + yaml.safe_dump(meta, sort_keys=False))
    log(f"gen augment: {n} pairs in {out / 'images'} and {out / 'masks'}; train with: seglab train --data {out}")
    return out / "data.yaml"
