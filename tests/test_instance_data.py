"""Instance data: COCO polygons/RLE/crowd/empty images, instance-id masks and class maps, the
transforms that move boxes and masks with the image, and the real format samples."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from torchvision import tv_tensors
from torchvision.transforms import v2

from seglab.cli import main
from seglab.data import get_split, resolve_dataset
from seglab.data.io import read_mask
from seglab.instance.data import InstanceDataset, mask_boxes, read_instances, train_transform

H, W = 40, 60


def _square(x: int, y: int, s: int) -> list[float]:
    """A polygon covering pixels x..x+s-1, y..y+s-1 exactly (COCO polygons run along pixel edges)."""
    return [x, y, x + s, y, x + s, y + s, x, y + s]


def _coco_file(path: Path, images: list[dict], annotations: list[dict], categories: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return path


@pytest.fixture
def coco_dir(tmp_path: Path, write_png) -> Path:
    """A Roboflow-style export: train/ valid/ test/ each with images and _annotations.coco.json.

    train: a.png with a polygon square (cat 1), an uncompressed-RLE rectangle (cat 2), a compressed-RLE
    rectangle (cat 1), a crowd region (cat 2) and a box-only annotation (cat 2); b.png with no objects.
    valid and test: one image each with one polygon. Category 0 is Roboflow's unused parent."""
    root = tmp_path / "coco"
    categories = [
        {"id": 0, "name": "things", "supercategory": "none"},
        {"id": 1, "name": "cat", "supercategory": "things"},
        {"id": 2, "name": "dog", "supercategory": "things"},
    ]
    rng = np.random.default_rng(0)
    for split in ("train", "valid", "test"):
        for name in ("a", "b") if split == "train" else ("a",):
            write_png(root / split / f"{name}.png", rng.integers(0, 256, (H, W, 3), dtype=np.uint8))
    rect = np.zeros((H, W), np.uint8)
    rect[20:30, 5:25] = 1  # 10 x 20
    uncompressed = {"size": [H, W], "counts": _uncompressed_counts(rect)}
    rect2 = np.zeros((H, W), np.uint8)
    rect2[2:6, 40:58] = 1  # 4 x 18
    compressed = mask_utils.encode(np.asfortranarray(rect2))
    compressed["counts"] = compressed["counts"].decode()
    crowd = np.zeros((H, W), np.uint8)
    crowd[32:40, 30:60] = 1
    crowd_rle = {"size": [H, W], "counts": _uncompressed_counts(crowd)}

    def ann(i: int, category: int, segmentation, bbox: list[int], crowd: int = 0) -> dict:
        area = bbox[2] * bbox[3]
        return {"id": i, "image_id": 7, "category_id": category, "segmentation": segmentation, "bbox": bbox,
                "area": area, "iscrowd": crowd}  # fmt: skip

    train_anns = [
        ann(1, 1, [_square(10, 5, 8)], [10, 5, 8, 8]),
        ann(2, 2, uncompressed, [5, 20, 20, 10]),
        ann(3, 1, compressed, [40, 2, 18, 4]),
        ann(4, 2, crowd_rle, [30, 32, 30, 8], crowd=1),
        ann(5, 2, [], [30, 10, 6, 4]),
    ]
    images = [
        {"id": 7, "file_name": "a.png", "height": H, "width": W},
        {"id": 8, "file_name": "b.png", "height": H, "width": W},
    ]
    _coco_file(root / "train" / "_annotations.coco.json", images, train_anns, categories)
    for split in ("valid", "test"):
        ann = {
            "id": 1,
            "image_id": 1,
            "category_id": 2,
            "segmentation": [_square(0, 0, 4)],
            "bbox": [0, 0, 4, 4],
            "area": 16,
            "iscrowd": 0,
        }
        _coco_file(
            root / split / "_annotations.coco.json",
            [{"id": 1, "file_name": "a.png", "height": H, "width": W}],
            [ann],
            categories,
        )
    return root


def _uncompressed_counts(mask: np.ndarray) -> list[int]:
    """COCO's uncompressed RLE: run lengths over the column-major pixels, starting with a 0-run."""
    flat = mask.flatten(order="F")
    counts, value, run = [], 0, 0
    for v in flat:
        if v != value:
            counts.append(run)
            value, run = v, 0
        run += 1
    counts.append(run)
    return counts


def test_coco_splits_classes_and_every_annotation_kind(coco_dir: Path):
    spec = resolve_dataset(coco_dir, task="instance")
    assert spec.classes == ["background", "cat", "dog"]  # the unused parent category is dropped
    assert set(spec.splits) == {"train", "val", "test"}
    a, b = get_split(spec, "train")
    assert a.coco_id == 7
    inst = read_instances(a, spec)
    assert inst.labels.tolist() == [1, 2, 1, 2, 2]
    assert inst.crowd.tolist() == [False, False, False, True, False]
    assert inst.masks.sum((1, 2)).tolist() == [64, 200, 72, 240, 24]  # polygon, both RLEs, crowd, box-only
    assert inst.masks[0, 5:13, 10:18].all()  # the polygon square covers exactly its pixels
    assert inst.boxes.tolist()[:3] == [[10, 5, 18, 13], [5, 20, 25, 30], [40, 2, 58, 6]]
    assert inst.masks[4, 10:14, 30:36].all()  # no segmentation: the box is its mask
    empty = read_instances(b, spec)
    assert len(empty) == 0 and empty.masks.shape == (0, H, W) and empty.boxes.shape == (0, 4)


def test_dataset_drops_crowd_for_training_and_keeps_it_for_scoring(coco_dir: Path):
    spec = resolve_dataset(coco_dir, task="instance")
    samples = get_split(spec, "train")
    _, train_target = InstanceDataset(samples, spec)[0]
    _, eval_target = InstanceDataset(samples, spec, keep_crowd=True)[0]
    assert train_target["iscrowd"].tolist() == [0, 0, 0, 0]
    assert eval_target["iscrowd"].tolist() == [0, 0, 0, 1, 0]
    image, target = InstanceDataset(samples, spec)[1]  # the empty image
    assert image.shape == (3, H, W) and image.dtype == torch.uint8
    assert target["boxes"].shape == (0, 4) and target["masks"].shape == (0, H, W) and target["labels"].shape == (0,)


def test_empty_image_trains_with_a_transform(coco_dir: Path):
    spec = resolve_dataset(coco_dir, task="instance")
    ds = InstanceDataset(get_split(spec, "train"), spec, train_transform(32, (0.5, 1.5), 0.5, 0.2))
    image, target = ds[1]
    assert image.shape == (3, 32, 32) and target["boxes"].shape == (0, 4) and target["masks"].shape == (0, 32, 32)


@pytest.fixture
def instance_masks(tmp_path: Path, write_png) -> Path:
    """images/ + masks/ with 16-bit instance-id PNGs: ids 3 and 300 in x.png, none in y.png."""
    root = tmp_path / "inst"
    ids = np.zeros((H, W), np.uint16)
    ids[5:15, 5:20] = 3
    ids[20:35, 30:50] = 300  # ids above 255: 16-bit masks
    for name, m in (("x", ids), ("y", np.zeros((H, W), np.uint16))):
        write_png(root / "images" / f"{name}.png", np.full((H, W, 3), 90, np.uint8))
        write_png(root / "masks" / f"{name}.png", m, "I;16")
    return root


def test_instance_id_masks_without_a_class_map(instance_masks: Path):
    spec = resolve_dataset(instance_masks, task="instance")
    assert spec.mask_encoding == "instance" and spec.classes == ["background", "object"]
    samples = {s.image.stem: s for s in spec.splits["train"]}
    inst = read_instances(samples["x"], spec)
    assert inst.labels.tolist() == [1, 1]
    assert inst.boxes.tolist() == [[5, 5, 20, 15], [30, 20, 50, 35]]
    assert inst.area.tolist() == [150, 300]
    assert len(read_instances(samples["y"], spec)) == 0


def test_class_map_names_each_object_and_converts_to_semantic(instance_masks: Path):
    (instance_masks / "classes.json").write_text(json.dumps({"x.png": {"3": "cell", "300": "debris"}, "y.png": {}}))
    (instance_masks / "data.yaml").write_text("class_map: classes.json\nmask_encoding: instance\n")
    spec = resolve_dataset(instance_masks, task="instance")
    assert spec.classes == ["background", "cell", "debris"]
    x = next(s for s in spec.splits["train"] if s.image.stem == "x")
    assert read_instances(x, spec).labels.tolist() == [1, 2]
    # the same dataset trains a semantic model: instance ids become class indices
    semantic = resolve_dataset(instance_masks)
    mask = read_mask(x, semantic)
    assert mask[10, 10] == 1 and mask[25, 40] == 2 and mask[0, 0] == 0


def test_bad_class_map_is_one_line(instance_masks: Path, capsys):
    (instance_masks / "data.yaml").write_text("class_map: missing.json\n")
    assert main(["train", "--task", "instance", "--data", str(instance_masks), "--epochs", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "missing.json" in err and "class_map" in err


# ---------------------------------------------------------------------------------------------- transforms


def _painted(objects: list[tuple[int, int, int, int]], size=(H, W)):
    """An image where object i is a rectangle painted in colour 40 * (i + 1), with its mask and box."""
    image = np.zeros((*size, 3), np.uint8)
    masks = np.zeros((len(objects), *size), np.uint8)
    for i, (x1, y1, x2, y2) in enumerate(objects):
        image[y1:y2, x1:x2] = 40 * (i + 1)
        masks[i, y1:y2, x1:x2] = 1
    target = {
        "boxes": tv_tensors.BoundingBoxes(torch.tensor(objects, dtype=torch.float32), format="XYXY", canvas_size=size),
        "masks": tv_tensors.Mask(torch.from_numpy(masks)),
        "labels": torch.arange(1, len(objects) + 1),
        "iscrowd": torch.zeros(len(objects), dtype=torch.int64),
        "area": torch.from_numpy(masks.sum((1, 2)).astype(np.float32)),
    }
    return tv_tensors.Image(torch.from_numpy(image).permute(2, 0, 1)), target


@pytest.mark.parametrize("seed", range(8))
def test_train_transform_moves_boxes_masks_and_pixels_together(seed: int):
    image, target = _painted([(4, 4, 20, 14), (30, 10, 56, 36), (10, 25, 18, 38)])
    torch.manual_seed(seed)
    out_image, out = train_transform(48, (0.5, 1.5), 0.5, 0.0)(image, target)
    assert out_image.shape == (3, 48, 48)
    for box, mask, label in zip(out["boxes"], out["masks"], out["labels"], strict=True):
        m = mask.bool()
        assert m.sum() >= 2
        # the pixels inside each object's mask (away from its blurred edge) carry that object's colour
        inner = m.clone()
        inner[1:] &= m[:-1]
        inner[:-1] &= m[1:]
        inner[:, 1:] &= m[:, :-1]
        inner[:, :-1] &= m[:, 1:]
        if inner.any():
            assert (out_image[0][inner].float() - 40 * label).abs().le(20).float().mean() >= 0.8
        # rectangles stay rectangles: the moved box is the moved mask's tight box (within a pixel)
        tight = torch.from_numpy(mask_boxes(mask[None].numpy())[0])
        assert (box - tight).abs().max() <= 1.0
    assert len(out["labels"]) == len(out["iscrowd"]) == len(out["area"]) == len(out["masks"])


def test_flip_mirrors_boxes_and_masks():
    image, target = _painted([(4, 4, 20, 14)])
    _, out = v2.RandomHorizontalFlip(1.0)(image, target)
    assert out["boxes"].tolist() == [[W - 20, 4, W - 4, 14]]
    assert mask_boxes(out["masks"].numpy()).tolist() == [[W - 20, 4, W - 4, 14]]


def test_crop_clips_objects_it_cuts_and_drops_those_it_leaves_out():
    image, target = _painted([(2, 2, 10, 10), (20, 2, 40, 12), (50, 30, 58, 38)])
    crop = v2.Compose([v2.RandomCrop((20, 30)), v2.ClampBoundingBoxes(), v2.SanitizeBoundingBoxes(min_size=2)])

    class Fixed(v2.RandomCrop):  # the crop at top=0, left=15: object 1 cut, 0 and 2 outside
        def make_params(self, flat_inputs):
            return dict(needs_crop=True, top=0, left=15, height=20, width=30, needs_pad=False, padding=[0, 0, 0, 0])

    crop.transforms[0] = Fixed((20, 30))
    _, out = crop(image, target)
    assert out["labels"].tolist() == [2]
    assert out["boxes"].tolist() == [[5, 2, 25, 12]]
    assert out["masks"].shape == (1, 20, 30)


def test_dataset_augmentation_depends_on_seed_and_index(coco_dir: Path):
    spec = resolve_dataset(coco_dir, task="instance")
    ds = InstanceDataset(get_split(spec, "train"), spec, train_transform(32, (0.5, 1.5), 0.5, 0.2))
    ds.set_epoch(3)
    first = ds[0]
    torch.manual_seed(123)  # the global generator must not matter
    again = ds[0]
    assert torch.equal(first[0], again[0]) and torch.equal(first[1]["boxes"], again[1]["boxes"])
    ds.set_epoch(4)
    assert not torch.equal(first[0], ds[0][0])


# ---------------------------------------------------------------------------------------------- real samples


def test_nuclei_instance_mask(shared_data: Path, tmp_path: Path):
    """The DSB 2018 nuclei image: a uint16 TIFF and its instance-id mask with 125 nuclei."""
    root = shared_data / "nuclei_instances"
    (tmp_path / "list.txt").write_text("img2d.tif mask2d.tif\n")
    (tmp_path / "data.yaml").write_text(
        f"path: {root}\nformat: pairs\ntrain: {tmp_path / 'list.txt'}\nclasses: [background, nucleus]\n"
    )
    spec = resolve_dataset(tmp_path / "data.yaml", task="instance")
    assert spec.classes == ["background", "nucleus"]
    image, target = InstanceDataset(spec.splits["train"], spec)[0]
    assert image.shape == (3, 512, 512) and image.dtype == torch.uint8
    assert len(target["labels"]) == 125 and set(target["labels"].tolist()) == {1}
    masks = target["masks"].bool()
    assert masks.sum(0).max() == 1  # an instance-id mask cannot overlap
    assert torch.equal(target["boxes"], torch.from_numpy(mask_boxes(masks.numpy())))


def test_voc_coco_sample_matches_its_voc_instance_masks(shared_data: Path):
    """The same three VOC images annotated twice: COCO polygons and VOC SegmentationObject PNGs
    must describe the same objects (count, class and place)."""
    from PIL import Image

    coco = resolve_dataset(shared_data / "voc_coco_sample" / "data_dataset_coco", task="instance")
    voc_root = shared_data / "voc_coco_sample" / "data_dataset_voc"
    names = (voc_root / "class_names.txt").read_text().splitlines()  # "potted plant" has a space
    assert len(coco.splits["train"]) == 3
    for sample in coco.splits["train"]:
        inst = read_instances(sample, coco)
        objects = np.asarray(Image.open(voc_root / "SegmentationObject" / f"{sample.image.stem}.png"))
        classes = np.asarray(Image.open(voc_root / "SegmentationClass" / f"{sample.image.stem}.png"))
        ids = [i for i in np.unique(objects) if i not in (0, 255)]
        assert len(inst) == len(ids)
        for i in ids:  # each VOC object is best matched by a COCO object of the same class
            voc_mask = objects == i
            ious = [(m.astype(bool) & voc_mask).sum() / (m.astype(bool) | voc_mask).sum() for m in inst.masks]
            best = int(np.argmax(ious))
            assert ious[best] > 0.8
            voc_class = names[np.bincount(classes[voc_mask]).argmax()]
            assert coco.classes[inst.labels[best]] == voc_class


def test_data_check_reads_instance_masks_and_points_at_the_encoding(instance_masks: Path, capsys):
    assert main(["data", "check", str(instance_masks)]) == 2  # 16-bit ids read as class indices: wrong
    assert "mask_encoding: instance" in capsys.readouterr().out
    (instance_masks / "data.yaml").write_text("mask_encoding: instance\n")
    assert main(["data", "check", str(instance_masks)]) == 0
