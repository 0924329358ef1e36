"""Hostile datasets: `data check` is OK only where `train` would run, and no dataset makes reading crash,
print a traceback or allocate without bound. Real PNGs and real COCO JSON files in tmp_path throughout."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from seglab import api
from seglab.data.check import check_dataset
from seglab.data.formats import resolve_dataset, train_val_splits
from seglab.data.io import decode_coco_segmentation, read_mask
from seglab.errors import BadSample, SeglabError
from seglab.instance.data import read_instances

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def run_seglab(*args, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "seglab", *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=300
    )


def folders(root: Path, write_png, masks: dict[str, list[np.ndarray]], yaml: str | None = None) -> Path:
    """images/<split>/<i>.png (RGB) + masks/<split>/<i>.png (L) for the given masks."""
    rng = np.random.default_rng(0)
    for split, split_masks in masks.items():
        for i, mask in enumerate(split_masks):
            write_png(root / "images" / split / f"{i}.png", rng.integers(0, 256, (*mask.shape, 3), dtype=np.uint8))
            write_png(root / "masks" / split / f"{i}.png", mask, "L")
    if yaml is not None:
        (root / "data.yaml").write_text(yaml)
    return root


def labelled(value: int = 1) -> np.ndarray:
    m = np.zeros((8, 8), np.uint8)
    m[2:6, 2:6] = value
    return m


IGNORE = np.full((8, 8), 255, np.uint8)


def coco(root: Path, write_png, images: list[dict], annotations: list[dict], categories: list[dict] | None = None):
    """annotations.json at the root beside real 64x48 PNGs named by ``images``' file_name."""
    for image in images:
        if isinstance(image.get("file_name"), str):
            write_png(root / image["file_name"], np.zeros((48, 64, 3), np.uint8))
    categories = categories if categories is not None else [{"id": 1, "name": "thing"}]
    (root / "annotations.json").write_text(
        json.dumps({"images": images, "annotations": annotations, "categories": categories})
    )
    return root


def image(file_name: str, i: int = 1, height: int = 48, width: int = 64) -> dict:
    return {"id": i, "file_name": file_name, "height": height, "width": width}


def ann(segmentation, i: int = 1, image_id: int = 1, category: int = 1, crowd: int = 0) -> dict:
    return {"id": i, "image_id": image_id, "category_id": category, "segmentation": segmentation, "iscrowd": crowd}


# ----------------------------------------------------------------- 1. data check agrees with train


def test_empty_train_list_is_a_problem_for_check_and_train(tmp_path, write_png):
    root = tmp_path / "pairs"
    for i in range(2):
        write_png(root / "img" / f"{i}.png", np.zeros((8, 8, 3), np.uint8))
        write_png(root / "msk" / f"{i}.png", labelled(), "L")
    (root / "train.txt").write_text("# written by a script that found no images\n\n")
    (root / "val.txt").write_text("img/0.png msk/0.png\nimg/1.png msk/1.png\n")
    report = check_dataset(root)
    assert not report.ok
    message = f"{root / 'train.txt'} lists no 'image_path mask_path' pairs: there is nothing to train on"
    assert any(p.kind == "layout" and message in p.message for p in report.problems), report.format()
    with pytest.raises(SeglabError, match="lists no 'image_path mask_path' pairs"):
        resolve_dataset(root)  # what every trainer reads the dataset with

    (root / "train.txt").write_text("img/0.png msk/0.png\nimg/1.png msk/1.png\n")
    (root / "val.txt").write_text("")  # an empty val list is left out: val is held out from train
    spec = resolve_dataset(root)
    assert list(spec.splits) == ["train"]
    assert any("val.txt lists no 'image_path mask_path' pairs: split 'val' not used" in n for n in spec.notes)


@pytest.mark.parametrize("split", ["train", "val"])
def test_a_split_of_ignore_only_masks_is_refused_by_check_and_train(tmp_path, write_png, split):
    masks = {"train": [labelled(), labelled(2)], "val": [labelled(), labelled(2)]}
    masks[split] = [IGNORE, IGNORE]
    root = folders(tmp_path / "d", write_png, masks, "classes: [bg, a, b]\n")
    report = check_dataset(root)
    assert not report.ok
    (problem,) = report.problems
    expected = f"the {split} split has no labelled pixels: none of its 2 mask(s) ("
    assert problem.kind == "split" and expected in problem.message and "holds a class value 0..2" in problem.message
    assert str(root / "masks" / split / "0.png") in problem.message and "ignore_index 255" in problem.message
    spec = resolve_dataset(root)
    with pytest.raises(SeglabError) as refused:  # the trainers' own call
        train_val_splits(spec, val_fraction=0.1, seed=0)
    assert str(refused.value) == problem.message  # one check, one message


def test_only_255_masks_are_not_called_binary(tmp_path, write_png):
    root = folders(tmp_path / "d", write_png, {"train": [IGNORE] * 3, "val": [IGNORE] * 2})
    spec = resolve_dataset(root)
    assert spec.mask_encoding == "index" and spec.ignore_index == 255
    assert any("the 3 masks read hold only the value 255: not read as binary" in n for n in spec.notes)
    report = check_dataset(root)
    text = report.format()
    assert not report.ok and "index masks, 1 classes" in text and "ignore (255): 192 px = 100.00%" in text
    assert "the train split has no labelled pixels" in report.problems[0].message
    assert "the val split has no labelled pixels" in report.problems[0].message

    # the masks probed (8 of 10) are all 255 but another holds 0: binary after all, from every mask
    root = folders(tmp_path / "e", write_png, {"train": [IGNORE] * 9 + [labelled(255)]})
    spec = resolve_dataset(root)
    assert spec.mask_encoding == "binary" and spec.classes == ["background", "foreground"]


def test_check_and_train_refuse_in_the_same_words(tmp_path, write_png):
    root = folders(tmp_path / "d", write_png, {"train": [labelled()] * 2, "val": [IGNORE] * 2}, "classes: [bg, a]\n")
    check = run_seglab("data", "check", root, cwd=tmp_path)
    assert check.returncode == 2 and "Traceback" not in check.stderr, check.stderr
    (line,) = [line for line in check.stdout.splitlines() if "the val split has no labelled pixels" in line]
    with pytest.raises(SeglabError) as refused:  # `seglab train` prints this line and exits 2
        api.train(data=str(root), model="fcn", epochs=1, workers=0, out=str(tmp_path / "runs"), progress=False)
    assert line == f"  - {refused.value}"
    assert not (tmp_path / "runs").exists()  # refused before anything was trained or written


# ----------------------------------------------------------------- 2. COCO sizes are checked before masks are drawn

PEAK_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from seglab.data.check import check_dataset
    def peak():  # VmHWM: getrusage's ru_maxrss would start at the size of the pytest process that ran us
        return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
    before = peak()
    report = check_dataset(sys.argv[1])
    grown = peak() - before
    print(json.dumps({"grown_kib": grown, "problems": [p.message for p in report.problems]}))
    """
)


def test_coco_declared_sizes_cannot_allocate_gigabytes_or_crash(tmp_path, write_png):
    rle = mask_utils.encode(np.asfortranarray(np.ones((48, 64), np.uint8)))
    root = coco(
        tmp_path / "bomb",
        write_png,
        [image("big.png", 1, 60000, 60000), image("rle.png", 2), image("far.png", 3), image("ok.png", 4)],
        [
            ann([[1, 1, 30, 1, 30, 30]], 1, image_id=1),
            ann({"size": [60000, 60000], "counts": rle["counts"].decode()}, 2, image_id=2),  # its own size
            ann([[0, 0, 1e9, 0, 1e9, 1e9]], 3, image_id=3),  # pycocotools segfaults on this
            ann([[1, 1, 30, 1, 30, 30]], 4, image_id=4),
        ],
    )
    proc = subprocess.run(
        [sys.executable, "-c", PEAK_SCRIPT, str(root)], capture_output=True, text=True, timeout=300, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-2000:]  # not killed by a segfault or the OOM killer
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["grown_kib"] < 200 * 1024, result  # the 60000x60000 mask alone would be 3.4 GiB
    problems = "\n".join(result["problems"])
    assert (
        f"{root / 'annotations.json'}: image big.png is declared 60000x60000 (width x height) but "
        f"{root / 'big.png'} is 64x48; fix its width and height in the annotation file"
    ) in problems
    assert "COCO annotation 2 has an RLE of size [60000, 60000] for an image of size [48, 64]" in problems
    assert "COCO annotation 3: a polygon point lies far outside its 64x48 image" in problems
    assert "ok.png" not in problems and "annotation 4" not in problems
    with pytest.raises(SeglabError, match=r"big\.png is declared 60000x60000"):
        resolve_dataset(root)  # train: one line, before any mask


def test_coco_pixel_cap_without_a_readable_header(tmp_path, write_png):
    root = coco(tmp_path / "c", write_png, [image("x.png", 1, 40000, 40000)], [])
    (root / "x.png").write_bytes(b"not an image")  # no header to compare with: the cap still holds
    report = check_dataset(root)
    messages = [p.message for p in report.problems]
    assert any("image x.png declares 40000x40000 pixels, more than 1,073,741,824" in m for m in messages), messages


@pytest.mark.parametrize(
    ("segmentation", "expected"),
    [
        ({"size": [48, 64], "counts": [0, 10_000_000]}, "an RLE with counts covering 10,000,000 pixels for a 64x48"),
        ({"size": [48, 64], "counts": [1, -5, 3]}, "an RLE with malformed counts"),
        ({"size": [48, 64], "counts": ""}, "an RLE with counts covering 0 pixels"),  # pycocotools: garbage
        ({"size": [48, 64], "counts": "1\x7f"}, "an RLE with malformed counts"),
        ({"size": [48, 64], "counts": 5}, "an RLE with malformed counts"),
        ({"size": "ab", "counts": "PP"}, "has an RLE of size ab for an image of size [48, 64]"),
        ([[0, 0, "x", 0, 10, 10]], "a polygon must be a list of numbers"),
        ([5, 6], "a polygon must be a list of numbers"),
        ([[0, 0, float("inf"), 0, 10, 10]], "far outside its 64x48 image (or is not finite)"),
        ([[0, 0, 64, 48] * 100], "a polygon's outline is 12,800 pixels long, more than 100 times"),
    ],
)
def test_hostile_coco_segmentations_are_one_line_errors(segmentation, expected):
    with pytest.raises(BadSample, match=r"^COCO annotation 7") as e:
        decode_coco_segmentation(segmentation, (48, 64), 7)
    assert expected in str(e.value)


def test_good_coco_segmentations_still_decode():
    mask = np.zeros((48, 64), np.uint8)
    mask[5:20, 10:40] = 1
    rle = mask_utils.encode(np.asfortranarray(mask))
    np.testing.assert_array_equal(decode_coco_segmentation({"size": [48, 64], "counts": rle["counts"]}, (48, 64)), mask)
    counts = rle["counts"].decode()
    np.testing.assert_array_equal(decode_coco_segmentation({"size": [48, 64], "counts": counts}, (48, 64)), mask)
    poly = decode_coco_segmentation([[-3, -3, 70, -3, 70, 50, -3, 50]], (48, 64))  # a little outside: fine
    assert poly is not None and poly.all()


def test_a_bad_annotation_names_its_image_and_is_skipped_in_training(tmp_path, write_png):
    root = coco(tmp_path / "c", write_png, [image("a.png")], [ann([[0, 0, "x", 0, 10, 10]])])
    spec = resolve_dataset(root)
    with pytest.raises(BadSample, match=re.escape(f"the annotations of {root / 'a.png'}: COCO annotation 1: a poly")):
        read_mask(spec.splits["train"][0], spec)


# ----------------------------------------------------------------- 3. more categories than 8-bit masks hold


def test_300_categories_get_advice_that_can_be_followed(tmp_path, write_png):
    categories = [{"id": i, "name": f"c{i}"} for i in range(1, 301)]
    square = [[10, 10, 30, 10, 30, 30, 10, 30]]
    root = coco(tmp_path / "c", write_png, [image("a.png")], [ann(square, category=300)], categories)
    with pytest.raises(SeglabError) as e:
        resolve_dataset(root)
    assert str(e.value) == (
        f"{root}: 300 COCO categories + background = 301 classes, but semantic masks are 8-bit and hold at most "
        "255 classes (0..254) plus the ignore value 255; train with --task instance or --task detect, which have "
        "no such limit, or merge or drop categories until at most 254 remain besides background"
    )
    with pytest.raises(SeglabError, match="301 classes, but semantic masks are 8-bit"):
        check_dataset(root)
    spec = resolve_dataset(root, task="instance")  # the advice works: every category is a class
    assert spec.num_classes == 301 and spec.classes[300] == "c300" and spec.ignore_index == 301
    objects = read_instances(spec.splits["train"][0], spec)
    assert objects.labels.tolist() == [300] and objects.masks[0, 20, 20] == 1


def test_instance_class_maps_negative_ids_and_too_many_classes(tmp_path, write_png):
    ids = np.zeros((8, 8), np.uint8)
    ids[1:3, 1:3], ids[4:6, 4:6] = 1, 2
    root = folders(tmp_path / "d", write_png, {"train": [ids, ids]})
    (root / "data.yaml").write_text("mask_encoding: instance\nclass_map: map.json\n")
    (root / "map.json").write_text(json.dumps({"0.png": {"1": "cat", "-1": "dog"}, "1.png": {"1": "cat"}}))
    with pytest.raises(SeglabError, match=r"lists negative instance ids \(0.png: -1\)"):
        resolve_dataset(root)  # -1 would have relabelled the largest id

    many = {"0.png": {str(i): f"c{i}" for i in range(1, 400)}, "1.png": {"1": "c1"}}
    (root / "map.json").write_text(json.dumps(many))
    with pytest.raises(SeglabError, match="400 classes, but semantic masks are 8-bit"):
        check_dataset(root)  # was a numpy broadcasting traceback
    spec = resolve_dataset(root, task="instance")
    assert spec.num_classes == 400 and read_instances(spec.splits["train"][0], spec).labels.tolist() == [1, 2]


# ----------------------------------------------------------------- 4. malformed files are one-line errors


@pytest.mark.parametrize(
    ("images", "annotations", "categories", "expected"),
    [
        ({"a": 1}, [], None, "'images' is a dict, not a list"),
        ([{"id": 1}], [], None, "images[0] has file_name=None, expected str"),
        ([{"id": 1, "file_name": "a.png"}], [], None, "images[0] has height=None, expected int"),
        ([image("a.png", height="abc")], [], None, "images[0] has height='abc', expected int"),
        ([image("a.png", height=-48)], [], None, "images[0] (a.png) is 64x-48; width and height must be positive"),
        ([{**image("a.png"), "file_name": 5}], [], None, "images[0] has file_name=5, expected str"),
        ([image("a.png")], [], [{"id": 1}], "categories[0] has name=None, expected str or int"),
        ([image("a.png")], [], ["thing"], "categories[0] has a str, expected object"),
        ([image("a.png")], [], [{"id": "1", "name": "x"}], "categories[0] has id='1', expected int"),
        ([image("a.png")], [{"id": 1, "image_id": 1}], None, "annotations[0] has category_id=None, expected int"),
        ([image("a.png")], [{"id": 1, "category_id": 1}], None, "annotations[0] has image_id=None, expected int"),
        ([image("a.png")], [ann([], category=[1])], None, "annotations[0] has category_id=[1], expected int or str"),
    ],
)
def test_malformed_coco_files_name_the_entry(tmp_path, write_png, images, annotations, categories, expected):
    root = tmp_path / "c"
    root.mkdir()
    write_png(root / "a.png", np.zeros((48, 64, 3), np.uint8))
    content = {"images": images, "annotations": annotations, "categories": categories or [{"id": 1, "name": "x"}]}
    (root / "annotations.json").write_text(json.dumps(content))
    with pytest.raises(SeglabError) as e:
        check_dataset(root)
    assert str(e.value).startswith(f"{root / 'annotations.json'}: ") and expected in str(e.value)


def test_unknown_category_ids_are_listed_briefly(tmp_path, write_png):
    annotations = [ann([], i, category=1000 + i) for i in range(100)] + [ann([[1, 1, 9, 1, 9, 9]], 100)]
    root = coco(tmp_path / "c", write_png, [image("a.png"), image("b.png", 2)], annotations)
    report = check_dataset(root)
    (layout,) = [p.message for p in report.problems if p.kind == "layout"]
    assert "annotations with unknown category ids: 1000 (1), 1001 (1)" in layout and "and 95 more" in layout


def test_non_utf8_voc_lists_are_one_line_errors(tmp_path, write_png):
    root = tmp_path / "voc"
    write_png(root / "JPEGImages" / "a.png", np.zeros((8, 8, 3), np.uint8))
    write_png(root / "SegmentationClass" / "a.png", labelled(), "L")
    sets = root / "ImageSets" / "Segmentation"
    sets.mkdir(parents=True)
    (sets / "train.txt").write_bytes(b"a\n\xff\xfe\n")
    with pytest.raises(SeglabError, match=re.escape(f"image set {sets / 'train.txt'} is not UTF-8 text; save it as")):
        check_dataset(root)
    (sets / "train.txt").write_text("a\n")
    (root / "class_names.txt").write_bytes(b"\xff\xfe")
    with pytest.raises(SeglabError, match=r"class names file .*class_names\.txt is not UTF-8 text"):
        check_dataset(root)
