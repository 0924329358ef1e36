"""Dataset layouts, mask decoding and image reading.

On tiny datasets written into tmp_path, and on the real datasets in ../shared/data when present.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image
from pycocotools import mask as mask_utils

from seglab.data.formats import (
    CAMVID_CLASSES,
    CITYSCAPES_CLASSES,
    FORMATS,
    VOC_CLASSES,
    color_palette,
    get_split,
    resolve_dataset,
)
from seglab.data.io import read_image, read_mask
from seglab.data.spec import DatasetSpec, Sample
from seglab.errors import SeglabError

VOC_PALETTE = [v for c in color_palette(256) for v in c]
# pycocotools 2.0.x calls np.array(copy=False) on numpy 2 inside mask.decode: harmless, not ours
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def _rgb(shape: tuple[int, int], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (*shape, 3), dtype=np.uint8)


# ------------------------------------------------------------------------------------------ pairs


def _pairs_dataset(root: Path, write_png, masks: list[np.ndarray]) -> Path:
    lines = []
    for i, m in enumerate(masks):
        write_png(root / "img" / f"{i}.png", _rgb(m.shape, i))
        write_png(root / "lbl" / f"{i}.png", m, "L")
        lines.append(f"img/{i}.png lbl/{i}.png")
    (root / "train.txt").write_text("\n".join(lines[:-1]) + "\n")
    (root / "val.txt").write_text(lines[-1] + "\n")
    return root


def test_pairs_infers_classes_from_largest_label(tmp_path, write_png):
    masks = [np.array([[0, 1], [4, 255]]), np.array([[2, 2], [0, 0]]), np.array([[3, 0], [0, 0]])]
    spec = resolve_dataset(_pairs_dataset(tmp_path / "d", write_png, masks))
    assert spec.format == "pairs"
    assert spec.classes == ["class0", "class1", "class2", "class3", "class4"]  # max 4 (255 = ignore)
    assert spec.ignore_index == 255 and spec.mask_encoding == "index"
    assert spec.colors == color_palette(5)
    assert [len(spec.splits[s]) for s in ("train", "val")] == [2, 1]
    assert any("largest label 4" in n for n in spec.notes)
    np.testing.assert_array_equal(read_mask(spec.splits["train"][0], spec), masks[0])


def test_pairs_accepts_absolute_list_relative_and_segnet_prefixed_paths(tmp_path, write_png):
    root = tmp_path / "d"
    m = np.array([[0, 1], [1, 0]], dtype=np.uint8)
    for name in "abc":
        write_png(root / "train" / f"{name}.png", _rgb((2, 2)))
        write_png(root / "trainlbl" / f"{name}.png", m, "L")
    write_png(root / "lists" / "x" / "d.png", _rgb((2, 2)))
    write_png(root / "lists" / "x" / "d_mask.png", m, "L")
    (root / "lists").mkdir(exist_ok=True)
    (root / "train.txt").write_text(
        f"{root / 'train/a.png'} {root / 'trainlbl/a.png'}\n"  # absolute
        "/SegNet/CamVid/train/b.png /SegNet/CamVid/trainlbl/b.png\n"  # foreign absolute: last two parts
        "\n# a comment\n"
        "train/c.png\ttrainlbl/c.png\n"
    )
    spec = resolve_dataset(root)
    assert [s.image.name for s in spec.splits["train"]] == ["a.png", "b.png", "c.png"]
    assert spec.splits["train"][1].image == root / "train" / "b.png"
    assert spec.splits["train"][1].mask == root / "trainlbl" / "b.png"
    # a list in a sub-folder may name files relative to itself
    (root / "lists" / "val.txt").write_text("x/d.png x/d_mask.png\n")
    (root / "data.yaml").write_text("val: lists/val.txt\n")
    spec = resolve_dataset(root)
    assert spec.splits["val"][0].mask == root / "lists" / "x" / "d_mask.png"


def test_pairs_line_errors_name_list_file_and_line(tmp_path, write_png):
    root = _pairs_dataset(tmp_path / "d", write_png, [np.zeros((2, 2), np.uint8)] * 3)
    (root / "train.txt").write_text("img/0.png lbl/0.png\nimg/1.png\n")
    with pytest.raises(SeglabError, match=r"train\.txt line 2: only one path"):
        resolve_dataset(root)
    (root / "train.txt").write_text("img/0.png lbl/0.png\n\nimg/1.png lbl/nope.png\n")
    with pytest.raises(SeglabError, match=r"train\.txt line 3: mask 'lbl/nope\.png' not found"):
        resolve_dataset(root)
    spec = resolve_dataset(root, strict=False)  # what `data check` uses: the line is a problem, not a crash
    assert len(spec.splits["train"]) == 1 and "line 3" in spec.problems[0]


def test_camvid_metadata_is_recognised_by_structure_and_yaml_overrides_it(tmp_path, write_png):
    root = tmp_path / "my_street_scenes"  # not called camvid: recognised by its layout
    for split in ("train", "val"):
        write_png(root / split / "f1.png", _rgb((3, 4)))
        write_png(root / f"{split}annot" / "f1.png", np.array([[0, 10, 11, 3]] * 3), "L")
        (root / f"{split}.txt").write_text(f"{split}/f1.png {split}annot/f1.png\n")
    spec = resolve_dataset(root)
    assert spec.classes == list(CAMVID_CLASSES) and spec.ignore_index == 11
    assert spec.colors[0] == (128, 128, 128) and spec.colors[10] == (0, 128, 192)
    assert any("CamVid" in n and "data.yaml" in n for n in spec.notes)
    (root / "data.yaml").write_text("classes: [a, b, c, d, e, f, g, h, i, j, k, l]\nignore_index: 255\n")
    spec = resolve_dataset(root)
    assert spec.classes[0] == "a" and spec.num_classes == 12 and spec.ignore_index == 255
    assert not any("CamVid" in n for n in spec.notes)


# ---------------------------------------------------------------------------------------- folders


def test_folders_match_by_stem_with_different_extensions(tiny_dataset, write_png):
    img = tiny_dataset / "images" / "train" / "a.png"
    Image.open(img).save(img.with_suffix(".jpg"))
    img.unlink()
    spec = resolve_dataset(tiny_dataset)
    assert spec.format == "folders"
    assert [(s.image.name, s.mask.name) for s in spec.splits["train"]] == [
        ("a.jpg", "a.png"), ("b.png", "b.png"), ("c.png", "c.png"),
    ]  # fmt: skip
    assert [s.image.name for s in spec.splits["val"]] == ["d.png", "e.png"]
    assert spec.classes == ["class0", "class1", "class2"]


def test_folders_split_first_layout_and_mask_name_suffix(tmp_path, write_png):
    root = tmp_path / "isbi_like"
    for i in range(3):
        write_png(root / "train" / "image" / f"{i}.png", _rgb((4, 4), i)[..., 0])
        write_png(root / "train" / "label" / f"{i}_mask.png", np.full((4, 4), 255 * (i % 2), np.uint8))
    spec = resolve_dataset(root)
    assert [s.mask.name for s in spec.splits["train"]] == ["0_mask.png", "1_mask.png", "2_mask.png"]


def test_folders_unmatched_files_are_errors_naming_them(tiny_dataset, write_png):
    for i in range(7):
        write_png(tiny_dataset / "images" / "train" / f"lonely{i}.png", _rgb((6, 8)))
    write_png(tiny_dataset / "masks" / "val" / "orphan.png", np.zeros((6, 8), np.uint8))
    with pytest.raises(SeglabError) as info:
        resolve_dataset(tiny_dataset)
    msg = str(info.value)
    assert "7 image(s)" in msg and "lonely0.png" in msg and "lonely4.png" in msg and "and 2 more" in msg
    assert "lonely5.png" not in msg
    assert "orphan.png" in msg and "without an image" in msg


# ------------------------------------------------------------------------------------ mask codings


def test_palette_masks_give_indices_not_colours(tmp_path, write_png):
    root = tmp_path / "d"
    write_png(root / "images" / "x.png", _rgb((2, 3)))
    write_png(root / "masks" / "x.png", np.array([[0, 1, 2], [2, 1, 255]]), "P", VOC_PALETTE)
    spec = resolve_dataset(root)
    assert spec.mask_encoding == "index" and spec.num_classes == 3
    np.testing.assert_array_equal(read_mask(spec.splits["train"][0], spec), [[0, 1, 2], [2, 1, 255]])


def test_rgb_masks_palette_detected_or_taken_from_yaml(tmp_path, write_png):
    root = tmp_path / "d"
    red, green, black = (255, 0, 0), (0, 255, 0), (0, 0, 0)
    mask = np.array([[red, green, black], [black, red, (9, 9, 9)]], dtype=np.uint8)
    write_png(root / "images" / "x.png", _rgb((2, 3)))
    write_png(root / "masks" / "x.png", mask, "RGB")
    spec = resolve_dataset(root)
    assert spec.mask_encoding == "rgb"
    assert spec.colors == [(0, 0, 0), (0, 255, 0), (9, 9, 9), (255, 0, 0)]  # sorted unique colours
    assert any("4 distinct colours" in n for n in spec.notes)
    np.testing.assert_array_equal(read_mask(spec.splits["train"][0], spec), [[3, 1, 0], [0, 3, 2]])

    (root / "data.yaml").write_text("classes: [bg, car, road]\ncolors: [[0, 0, 0], [255, 0, 0], [0, 255, 0]]\n")
    spec = resolve_dataset(root)
    assert spec.mask_encoding == "rgb" and spec.classes == ["bg", "car", "road"]
    from collections import Counter

    unknown: Counter = Counter()
    out = read_mask(spec.splits["train"][0], spec, unknown_colors=unknown)
    np.testing.assert_array_equal(out, [[1, 2, 0], [0, 1, 255]])  # (9, 9, 9) is not a class
    assert unknown == {(9, 9, 9): 1}

    (root / "data.yaml").write_text("classes: [bg, car, road]\n")
    with pytest.raises(SeglabError, match="colors"):
        resolve_dataset(root)


def test_binary_masks_become_0_1(tmp_path, write_png):
    root = tmp_path / "d"
    for i in range(2):
        write_png(root / "images" / f"{i}.png", _rgb((2, 2)))
        write_png(root / "masks" / f"{i}.png", np.array([[0, 255], [255, 0]]), "L")
    spec = resolve_dataset(root)
    assert spec.mask_encoding == "binary" and spec.classes == ["background", "foreground"]
    np.testing.assert_array_equal(read_mask(spec.splits["train"][0], spec), [[0, 1], [1, 0]])
    # forced binary thresholds at 128 (anti-aliased or JPEG masks)
    write_png(root / "masks" / "0.png", np.array([[127, 128], [3, 250]]), "L")
    (root / "data.yaml").write_text("mask_encoding: binary\nclasses: [cell, membrane]\n")
    spec = resolve_dataset(root)
    assert spec.classes == ["cell", "membrane"]
    np.testing.assert_array_equal(read_mask(spec.splits["train"][0], spec), [[0, 1], [0, 1]])


def test_voc_layout_palette_pngs_imagesets_and_class_names(tmp_path, write_png):
    root = tmp_path / "VOCdevkit_copy"
    mask = np.array([[0, 15, 15], [255, 1, 20]])
    (root / "JPEGImages").mkdir(parents=True)
    for name in ("a", "b", "c"):
        Image.fromarray(_rgb((2, 3))).save(root / "JPEGImages" / f"{name}.jpg")
        write_png(root / "SegmentationClass" / f"{name}.png", mask, "P", VOC_PALETTE)
    sets = root / "ImageSets" / "Segmentation"
    sets.mkdir(parents=True)
    (sets / "train.txt").write_text("a\nb\n")
    (sets / "val.txt").write_text("c\n")
    spec = resolve_dataset(root)
    assert spec.format == "voc" and spec.classes == list(VOC_CLASSES) and spec.ignore_index == 255
    assert spec.colors[15] == (192, 128, 128)  # VOC 'person'
    assert [s.image.name for s in spec.splits["train"]] == ["a.jpg", "b.jpg"]
    assert [s.image.name for s in spec.splits["val"]] == ["c.jpg"]
    np.testing.assert_array_equal(read_mask(spec.splits["val"][0], spec), mask)

    (root / "class_names.txt").write_text("__ignore__\n_background_\ncat\ndog\n")
    spec = resolve_dataset(root)
    assert spec.classes == ["background", "cat", "dog"]
    assert any("class_names.txt" in n and "__ignore__" in n for n in spec.notes)

    for f in sets.iterdir():
        f.unlink()
    sets.rmdir()
    spec = resolve_dataset(root)
    assert list(spec.splits) == ["train"] and len(spec.splits["train"]) == 3
    assert any("ImageSets" in n for n in spec.notes)


def test_cityscapes_label_ids_map_to_train_ids(tmp_path, write_png):
    root = tmp_path / "cs"
    for split, city in (("train", "aachen"), ("val", "lindau")):
        prefix = f"{city}_000000_000019"
        write_png(root / "leftImg8bit" / split / city / f"{prefix}_leftImg8bit.png", _rgb((2, 3)))
        write_png(root / "gtFine" / split / city / f"{prefix}_gtFine_labelIds.png",
                  np.array([[7, 26, 0], [33, 23, 9]]), "L")  # fmt: skip
    spec = resolve_dataset(root)
    assert spec.format == "cityscapes" and spec.classes == list(CITYSCAPES_CLASSES) and len(spec.classes) == 19
    assert spec.colors[0] == (128, 64, 128) and spec.colors[18] == (119, 11, 32)
    # road 0, car 13, unlabeled -> ignore, bicycle 18, sky 10, parking -> ignore
    np.testing.assert_array_equal(read_mask(spec.splits["val"][0], spec), [[0, 13, 255], [18, 10, 255]])


# ------------------------------------------------------------------------------------------- COCO


def _uncompressed_rle(m: np.ndarray) -> dict:
    """COCO's uncompressed RLE: run lengths over the column-major pixels, starting with zeros."""
    flat = m.flatten(order="F").astype(np.uint8)
    change = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat[0] == 1:
        counts = [0, *counts]
    return {"size": list(m.shape), "counts": counts}


def _coco_dataset(root: Path, write_png) -> Path:
    h, w = 20, 30
    write_png(root / "train" / "one.jpg.png", _rgb((h, w)))
    write_png(root / "valid" / "two.png", _rgb((h, w)))
    dog = np.zeros((h, w), np.uint8)
    dog[12:18, 20:28] = 1
    rle = mask_utils.encode(np.asfortranarray(dog))
    crowd = np.zeros((h, w), np.uint8)
    crowd[0:5, 20:30] = 1
    categories = [
        {"id": 0, "name": "pets", "supercategory": "none"},  # Roboflow's unused parent
        {"id": 1, "name": "cat", "supercategory": "pets"},
        {"id": 3, "name": "bird", "supercategory": "pets"},  # no annotations, not a parent: kept
        {"id": 7, "name": "dog", "supercategory": "pets"},
    ]

    def ann(i: int, category: int, segmentation, crowd: int = 0) -> dict:
        return {
            "id": i,
            "image_id": 4,
            "category_id": category,
            "iscrowd": crowd,
            "segmentation": segmentation,
        }

    train = {
        "images": [{"id": 4, "file_name": "one.jpg.png", "height": h, "width": w}],
        "annotations": [
            ann(1, 1, [[2, 2, 10, 2, 10, 10, 2, 10]]),  # cat polygon
            ann(2, 7, {"size": [h, w], "counts": rle["counts"].decode()}),  # dog, compressed RLE
            ann(3, 7, _uncompressed_rle(crowd), crowd=1),  # crowd, uncompressed RLE
            ann(4, 7, [[8, 8, 14, 8, 14, 14, 8, 14]]),  # dog polygon over the cat
        ],
        "categories": categories,
    }  # fmt: skip
    valid = {"images": [{"id": 1, "file_name": "two.png", "height": h, "width": w}], "annotations": [],
             "categories": categories}  # fmt: skip
    (root / "train" / "_annotations.coco.json").write_text(json.dumps(train))
    (root / "valid" / "_annotations.coco.json").write_text(json.dumps(valid))
    return root


def test_coco_polygons_rle_crowd_and_empty_images(tmp_path, write_png):
    spec = resolve_dataset(_coco_dataset(tmp_path / "roboflow", write_png))
    assert spec.format == "coco" and spec.mask_encoding == "coco"
    assert spec.classes == ["background", "cat", "bird", "dog"]
    assert any("category 0 'pets' dropped" in n for n in spec.notes)
    (one,) = spec.splits["train"]
    assert one.size == (20, 30) and one.mask is None
    assert [a["category_id"] for a in one.annotations] == [1, 3, 3, 3]  # remapped to class indices
    m = read_mask(one, spec)
    assert m.shape == (20, 30) and m.dtype == np.uint8
    assert m[5, 5] == 1  # cat polygon
    assert m[14, 22] == 3 and m[17, 27] == 3 and m[11, 22] == 0  # dog, compressed RLE: exact extent
    assert m[2, 25] == 255 and m[4, 29] == 255 and m[5, 25] == 0  # crowd (uncompressed RLE) -> ignore
    assert m[9, 9] == 3  # the later dog polygon is drawn over the cat
    assert m[19, 0] == 0
    assert set(np.unique(m).tolist()) == {0, 1, 3, 255}
    (two,) = spec.splits["val"]  # 'valid/' is the val split; an image without annotations
    np.testing.assert_array_equal(read_mask(two, spec), np.zeros((20, 30), np.uint8))


def test_coco_annotations_folder_layout(tmp_path, write_png):
    root = _coco_dataset(tmp_path / "src", write_png)
    dst = tmp_path / "cocoish"
    (dst / "annotations").mkdir(parents=True)
    (dst / "train2017").mkdir()
    (root / "train" / "one.jpg.png").rename(dst / "train2017" / "one.jpg.png")
    (root / "train" / "_annotations.coco.json").rename(dst / "annotations" / "instances_train2017.json")
    spec = resolve_dataset(dst)
    assert spec.splits["train"][0].image == dst / "train2017" / "one.jpg.png"


# --------------------------------------------------------------------------------------- data.yaml


def test_yaml_overrides_and_is_validated(tiny_dataset, tmp_path):
    (tiny_dataset / "data.yaml").write_text(
        "classes: [sky, road, car]\ncolors: [[1, 2, 3], [4, 5, 6], [7, 8, 9]]\nignore_index: 200\n"
    )
    spec = resolve_dataset(tiny_dataset)
    assert spec.classes == ["sky", "road", "car"] and spec.colors[2] == (7, 8, 9) and spec.ignore_index == 200
    assert any("data.yaml" in n for n in spec.notes)

    elsewhere = tmp_path / "configs" / "tiny.yaml"  # path: is relative to the YAML file
    elsewhere.parent.mkdir()
    elsewhere.write_text("path: ../tiny\nclasses: [a, b, c]\n")
    spec = resolve_dataset(elsewhere)
    assert spec.root == tiny_dataset and spec.classes == ["a", "b", "c"]

    cases = [
        ("clases: [a, b, c]\n", r"unknown key 'clases' \(did you mean 'classes'\?\)"),
        ("ignore_index: void\n", r"'ignore_index' must be int"),
        ("format: foldrs\n", r"unknown format 'foldrs' \(did you mean 'folders'\?\)"),
        ("mask_encoding: rgbb\n", r"unknown mask_encoding 'rgbb' \(did you mean 'rgb'\?\)"),
        ("classes: [a, b]\ncolors: [[0, 0, 0]]\n", r"1 colors for 2 classes"),
        ("classes: [a, b]\ncolors: [[0, 0, 0], [0, 0, 300]]\n", r"colors\[1\]"),
        (
            "classes: [a, b, c]\nignore_index: 1\n",
            r"ignore_index 1 is also a class index \('b'\); use a value of at least 3",
        ),
        ("ignore_index: 1\n", r"the masks hold the value 255, which ignore_index 1 makes a class \(the 256th\)"),
    ]
    for text, pattern in cases:
        (tiny_dataset / "data.yaml").write_text(text)
        with pytest.raises(SeglabError, match=pattern):
            resolve_dataset(tiny_dataset)


def test_yaml_format_forces_a_layout(tiny_dataset):
    (tiny_dataset / "data.yaml").write_text("format: voc\n")
    with pytest.raises(SeglabError):  # forced: no silent fallback to the folders layout
        resolve_dataset(tiny_dataset)
    (tiny_dataset / "data.yaml").write_text("format: folders\ntrain: images/val\n")
    spec = resolve_dataset(tiny_dataset)
    assert [s.image.name for s in spec.splits["train"]] == ["d.png", "e.png"]


def test_registry_lists_every_layout():
    expected = ["pairs", "voc", "cityscapes", "labelme", "cvat", "coco", "yolo", "folders"]  # most generic last
    assert list(FORMATS) == expected
    with pytest.raises(SeglabError, match="did you mean 'coco'"):
        FORMATS.get_or_raise("cocoo")


# ------------------------------------------------------------------------------------------ splits


def _flat_dataset(root: Path, write_png, n: int = 20) -> Path:
    for i in range(n):
        write_png(root / "images" / f"{i:02d}.png", _rgb((2, 2), i))
        write_png(root / "masks" / f"{i:02d}.png", np.full((2, 2), i % 3, np.uint8), "L")
    return root


def test_holdout_is_deterministic_and_disjoint(tmp_path, write_png):
    spec = resolve_dataset(_flat_dataset(tmp_path / "d", write_png))
    assert list(spec.splits) == ["train"]
    val = get_split(spec, "val")
    train = get_split(spec, "train")
    names = lambda samples: [s.image.name for s in samples]  # noqa: E731
    assert len(val) == 2 and len(train) == 18
    assert not set(names(val)) & set(names(train))
    assert sorted(names(val) + names(train)) == [f"{i:02d}.png" for i in range(20)]
    again = resolve_dataset(tmp_path / "d")
    assert names(get_split(again, "val")) == names(val) and names(get_split(again, "train")) == names(train)
    assert names(get_split(spec, "val", seed=1)) != names(val)
    assert len(get_split(spec, "val", val_fraction=0.25)) == 5
    assert f"no val split in {spec.root}: holding out 10% of train (2 images, seed 0)" in spec.notes
    assert spec.notes.count(f"no val split in {spec.root}: holding out 10% of train (2 images, seed 0)") == 1


def test_existing_val_split_is_used_as_is(tiny_dataset):
    spec = resolve_dataset(tiny_dataset)
    assert len(get_split(spec, "train")) == 3 and len(get_split(spec, "valid")) == 2
    assert not any("holding out" in n for n in spec.notes)


def test_unknown_split_lists_available(tmp_path, write_png):
    spec = resolve_dataset(_flat_dataset(tmp_path / "d", write_png, 4))
    with pytest.raises(SeglabError, match=r"no split 'test'.*available: train, val \(held out from train\)"):
        get_split(spec, "test")


# -------------------------------------------------------------------------------- resolve errors


def test_missing_empty_and_unknown_layouts(tmp_path):
    with pytest.raises(SeglabError, match="dataset not found"):
        resolve_dataset(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SeglabError, match="is empty"):
        resolve_dataset(tmp_path / "empty")
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "notes.md").write_text("hello")
    with pytest.raises(SeglabError) as info:
        resolve_dataset(tmp_path / "odd")
    msg = str(info.value)
    assert "unknown dataset layout" in msg and str(tmp_path / "odd") in msg
    for name in FORMATS:
        assert f"{name}: " in msg  # which layouts were tried ...
    assert "train.txt" in msg and "JPEGImages" in msg and "leftImg8bit" in msg  # ... and what they expect


# ------------------------------------------------------------------------------------------ read_image


def test_read_image_converts_modes(tmp_path, write_png):
    rgb = _rgb((3, 4))
    out = read_image(write_png(tmp_path / "rgb.png", rgb))
    assert out.dtype == np.uint8 and out.shape == (3, 4, 3)
    np.testing.assert_array_equal(out, rgb)

    grey = rgb[..., 0]
    np.testing.assert_array_equal(read_image(write_png(tmp_path / "l.png", grey)), np.repeat(grey[..., None], 3, 2))
    assert read_image(tmp_path / "l.png", channels=1).shape == (3, 4, 1)
    luma = read_image(tmp_path / "rgb.png", channels=1)[..., 0]
    np.testing.assert_array_equal(luma, np.asarray(Image.fromarray(rgb).convert("L")))

    rgba = np.dstack([rgb, np.full((3, 4), 7, np.uint8)])
    np.testing.assert_array_equal(read_image(write_png(tmp_path / "rgba.png", rgba)), rgb)  # alpha dropped

    pal = read_image(write_png(tmp_path / "p.png", np.array([[0, 1], [15, 1]]), "P", VOC_PALETTE))
    np.testing.assert_array_equal(pal[1, 0], (192, 128, 128))  # palette colour, not the index

    wide = read_image(write_png(tmp_path / "i16.png", np.array([[0, 1000], [2000, 4000]]), "I;16"))
    np.testing.assert_array_equal(wide[..., 0], [[0, 64], [128, 255]])  # scaled by the value range
    small = read_image(write_png(tmp_path / "i16s.png", np.array([[0, 5], [15, 200]]), "I;16"))
    np.testing.assert_array_equal(small[..., 0], [[0, 5], [15, 200]])  # already 8-bit values: kept


def test_read_image_float_tiff_via_tifffile(tmp_path):
    a = np.zeros((2, 3, 3), np.float32)
    a[0, 0] = (1.0, 0.5, 0.0)
    tifffile.imwrite(tmp_path / "f.tif", a, photometric="rgb")
    out = read_image(tmp_path / "f.tif")
    assert out.shape == (2, 3, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out[0, 0], (255, 128, 0))


def test_read_image_and_mask_errors_name_the_file(tmp_path, write_png):
    good = write_png(tmp_path / "good.png", _rgb((64, 64)))
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size * 2 // 3])
    text = tmp_path / "text.png"
    text.write_text("not a png at all")
    cases = [
        (tmp_path / "missing.png", "file not found"),
        (empty, "empty"),
        (truncated, "truncated"),
        (text, "not an image"),
    ]
    for path, reason in cases:
        with pytest.raises(SeglabError, match=rf"cannot read image {path}: .*{reason}"):
            read_image(path)
        spec = DatasetSpec(root=tmp_path, format="folders", classes=["a", "b"], colors=color_palette(2),
                           ignore_index=255, mask_encoding="index")  # fmt: skip
        with pytest.raises(SeglabError, match=rf"cannot read mask {path}: .*{reason}"):
            read_mask(Sample(image=good, mask=path), spec)


def test_index_mask_that_is_colour_says_to_use_rgb(tmp_path, write_png):
    path = write_png(tmp_path / "m.png", np.array([[[255, 0, 0], [0, 0, 0]]], np.uint8))
    spec = DatasetSpec(root=tmp_path, format="pairs", classes=["a", "b"], colors=color_palette(2),
                       ignore_index=255, mask_encoding="index")  # fmt: skip
    with pytest.raises(SeglabError, match="mask_encoding: rgb"):
        read_mask(Sample(image=path, mask=path), spec)


# ---------------------------------------------------------------------------------------- real data


def test_real_camvid(shared_data):
    spec = resolve_dataset(shared_data / "camvid")
    assert spec.format == "pairs" and spec.mask_encoding == "index"
    assert (len(spec.splits["train"]), len(spec.splits["val"])) == (367, 101)
    assert spec.classes == list(CAMVID_CLASSES) and spec.num_classes == 11 and spec.ignore_index == 11
    m = read_mask(spec.splits["val"][0], spec)
    assert m.shape == (360, 480) and m.max() <= 11
    assert read_image(spec.splits["val"][0].image).shape == (360, 480, 3)


def test_real_isbi_binary_with_held_out_val(shared_data):
    spec = resolve_dataset(shared_data / "isbi2012_membrane")
    assert spec.format == "folders" and spec.mask_encoding == "binary"
    assert spec.classes == ["background", "foreground"] and list(spec.splits) == ["train"]
    val, train = get_split(spec, "val"), get_split(spec, "train")
    assert (len(train), len(val)) == (27, 3)
    assert set(np.unique(read_mask(val[0], spec)).tolist()) == {0, 1}


def test_real_voc_and_coco_versions_agree(shared_data):
    voc = resolve_dataset(shared_data / "voc_coco_sample" / "data_dataset_voc")
    coco = resolve_dataset(shared_data / "voc_coco_sample" / "data_dataset_coco")
    assert voc.format == "voc" and coco.format == "coco"
    assert voc.num_classes == coco.num_classes == 21
    assert voc.classes[0] == coco.classes[0] == "background" and voc.classes[20] == "tv/monitor"
    by_name = {s.image.name: s for s in coco.splits["train"]}
    assert len(voc.splits["train"]) == len(by_name) == 3
    for sample in voc.splits["train"]:
        a, b = read_mask(sample, voc), read_mask(by_name[sample.image.name], coco)
        labelled = a != 255  # VOC's 255 border is not in the COCO polygons
        assert a.shape == b.shape and (a[labelled] == b[labelled]).mean() > 0.99


def test_real_facade_coco(shared_data):
    spec = resolve_dataset(shared_data / "facade_coco")
    assert spec.format == "coco" and spec.num_classes == 11 and spec.classes[0] == "background"
    assert spec.classes.count("facade") == 1 and "window" in spec.classes
    assert len(spec.splits["train"]) == 407
    assert any("dropped" in n for n in spec.notes)
    sample = spec.splits["train"][0]
    assert {a["category_id"] for a in sample.annotations} <= set(range(1, 11))
    m = read_mask(sample, spec)
    assert m.shape == sample.size == (512, 512) and m.max() <= 10
