"""LabelMe, CVAT and YOLO-seg read directly, and ``seglab data convert`` between them, PNG masks and COCO.

The fixtures are written by hand in each tool's documented format: LabelMe 5 JSON, "CVAT for images
1.1" XML (its mask RLE counts over the mask's box, background first) and Ultralytics YOLO-seg txt
with an Ultralytics data.yaml.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

import seglab
from seglab.data import resolve_dataset
from seglab.data.check import check_dataset
from seglab.data.convert import convert_dataset
from seglab.data.io import read_mask
from seglab.data.synthetic import make_shapes_dataset
from seglab.instance.data import read_instances

W, H = 40, 32  # every fixture image


def _image(path: Path, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (H, W, 3), dtype=np.uint8)).save(path)
    return path


def _labelme_file(path: Path, shapes: list[dict], image: str | None = None) -> None:
    content = {
        "version": "5.4.1", "flags": {}, "shapes": shapes, "imagePath": image or f"{path.stem}.png",
        "imageData": None, "imageHeight": H, "imageWidth": W,
    }  # fmt: skip
    path.write_text(json.dumps(content))


def _shape(label: str, points: list, kind: str = "polygon", group: int | None = None) -> dict:
    return {"label": label, "points": points, "group_id": group, "description": "", "shape_type": kind, "flags": {}}


@pytest.fixture
def labelme(tmp_path: Path) -> Path:
    """train/a: a cat polygon, a dog rectangle, a cat circle in two shapes of one group, a line;
    val/b: one dog rectangle."""
    root = tmp_path / "labelme"
    _image(root / "train" / "a.png")
    _labelme_file(
        root / "train" / "a.json",
        [
            _shape("cat", [[2, 2], [12, 2], [12, 12], [2, 12]]),
            _shape("dog", [[20, 4], [30, 14]], "rectangle"),
            _shape("cat", [[8, 24], [8, 28]], "circle", group=1),
            _shape("cat", [[30, 20], [38, 20], [38, 30], [30, 30]], group=1),
            _shape("cat", [[0, 31], [39, 31]], "line"),
        ],
    )
    _image(root / "val" / "b.png", 1)
    _labelme_file(root / "val" / "b.json", [_shape("dog", [[0, 0], [40, 32]], "rectangle")])
    return root


CVAT_XML = """<?xml version="1.0" encoding="utf-8"?>
<annotations>
  <version>1.1</version>
  <meta>
    <task>
      <id>1</id><name>demo</name><size>2</size><mode>annotation</mode>
      <labels>
        <label><name>car</name><color>#fa3253</color><type>any</type><attributes></attributes></label>
        <label><name>road</name><color>#33ddff</color><type>any</type><attributes></attributes></label>
      </labels>
    </task>
  </meta>
  <image id="0" name="a.png" subset="Train" width="40" height="32">
    <polygon label="road" source="manual" occluded="0" z_order="0"
             points="0.00,20.00;40.00,20.00;40.00,32.00;0.00,32.00"/>
    <box label="car" source="manual" occluded="0" xtl="4.00" ytl="14.00" xbr="14.00" ybr="24.00" z_order="1"/>
    <mask label="car" source="manual" occluded="0" rle="{rle}" left="30" top="2" width="4" height="3" z_order="0"/>
    <polyline label="road" source="manual" occluded="0" points="20.00,5.00;28.00,5.00" z_order="0"/>
    <points label="car" source="manual" occluded="0" points="1.00,1.00" z_order="0"/>
  </image>
  <image id="1" name="b.png" subset="Validation" width="40" height="32">
    <box label="car" source="manual" occluded="0" xtl="0.00" ytl="0.00" xbr="20.00" ybr="16.00" z_order="0"/>
  </image>
</annotations>
"""
CVAT_MASK = np.array([[0, 1, 1, 0], [1, 1, 1, 1], [0, 0, 1, 0]], dtype=np.uint8)  # at left 30, top 2


def _cvat_rle(mask: np.ndarray) -> str:
    """CVAT's mask RLE: run lengths over the box row by row, background first."""
    flat, runs, value, n = mask.ravel(), [], 0, 0
    for v in flat:
        if v == value:
            n += 1
        else:
            runs.append(n)
            value, n = v, 1
    return ", ".join(map(str, [*runs, n]))


@pytest.fixture
def cvat(tmp_path: Path) -> Path:
    root = tmp_path / "cvat"
    _image(root / "images" / "a.png")
    _image(root / "images" / "b.png", 1)
    (root / "annotations.xml").write_text(CVAT_XML.replace("{rle}", _cvat_rle(CVAT_MASK)))
    return root


@pytest.fixture
def yolo(tmp_path: Path) -> Path:
    """An Ultralytics dataset: a triangle and a box (a detection line) in train, a square in val, an
    image without a label file."""
    root = tmp_path / "yolo"
    _image(root / "images" / "train" / "a.png")
    _image(root / "images" / "train" / "empty.png", 2)
    _image(root / "images" / "val" / "b.png", 1)
    (root / "labels" / "train").mkdir(parents=True)
    (root / "labels" / "val").mkdir(parents=True)
    (root / "labels" / "train" / "a.txt").write_text("1 0.1 0.1 0.5 0.1 0.1 0.6\n0 0.75 0.5 0.25 0.5\n")
    (root / "labels" / "val" / "b.txt").write_text("0 0 0 0.5 0 0.5 0.5 0 0.5\n")
    data = {"path": str(root), "train": "images/train", "val": "images/val", "nc": 2, "names": {0: "person", 1: "bike"}}
    (root / "data.yaml").write_text(yaml.safe_dump(data))
    return root


# --------------------------------------------------------------------------- reading directly


def test_labelme_is_read_directly_for_both_tasks(labelme: Path):
    spec = resolve_dataset(labelme)
    assert spec.format == "labelme" and spec.mask_encoding == "coco"
    assert spec.classes == ["background", "cat", "dog"] and set(spec.splits) == {"train", "val"}
    (a,) = spec.splits["train"]
    mask = read_mask(a, spec)
    assert (mask[3:12, 3:12] == 1).all() and (mask[5:14, 21:30] == 2).all()  # polygon, rectangle
    assert mask[26, 8] == 1 and mask[25, 34] == 1  # circle and polygon of one group
    assert mask[31, 20] == 0  # the line holds no area
    objects = read_instances(a, resolve_dataset(labelme, task="instance"))
    assert sorted(objects.labels.tolist()) == [1, 1, 2]  # the group is one object
    assert any("1 line" in n for n in spec.notes)


def test_cvat_is_read_directly_with_its_masks_boxes_and_polylines(cvat: Path):
    spec = resolve_dataset(cvat)
    assert spec.format == "cvat" and spec.classes == ["background", "car", "road"]
    assert [len(spec.splits[s]) for s in ("train", "val")] == [1, 1]  # from the subset attribute
    mask = read_mask(spec.splits["train"][0], spec)
    assert np.array_equal(mask[2:5, 30:34], CVAT_MASK * 1)  # the RLE mask, where CVAT put it
    assert (mask[15:24, 5:14] == 1).all()  # the box, drawn over the road (higher z_order)
    assert (mask[25:32, :] == 2).all()  # the road polygon
    assert (mask[4:6, 21:28] == 2).all() and mask[8, 24] == 0  # a 3-pixel-wide polyline
    objects = read_instances(spec.splits["train"][0], resolve_dataset(cvat, task="instance"))
    assert sorted(objects.labels.tolist()) == [1, 1, 2, 2]  # box, mask, polygon, polyline; no points


def test_yolo_seg_is_read_directly_with_ultralytics_names(yolo: Path):
    spec = resolve_dataset(yolo)
    assert spec.format == "yolo" and spec.classes == ["background", "person", "bike"]
    a, empty = spec.splits["train"]
    mask = read_mask(a, spec)
    assert mask[5, 6] == 2  # YOLO class 1 is seglab's class 2
    assert (mask[9:23, 26:34] == 1).all()  # the detection line's box: centre 30,16 size 10x16
    assert not read_mask(empty, spec).any() and empty.annotations == []
    assert (read_mask(spec.splits["val"][0], spec)[1:15, 1:19] == 1).all()


# --------------------------------------------------------------------------- converting


def _agreement(source: Path, converted: Path) -> float:
    """The share of the source's labelled pixels that the converted dataset labels with the same class name."""
    s0, s1 = resolve_dataset(source), resolve_dataset(converted)
    same = total = 0
    for split, samples in s0.splits.items():
        by_stem = {s.image.stem: s for s in s1.splits[split]}
        for sample in samples:
            m0, m1 = read_mask(sample, s0), read_mask(by_stem[sample.image.stem], s1)
            labelled = m0 != s0.ignore_index
            names0 = np.asarray(s0.classes + ["?"] * 256)[np.minimum(m0, s0.num_classes)]
            names1 = np.asarray(s1.classes + ["?"] * 256)[np.minimum(m1, s1.num_classes)]
            same += int((names0 == names1)[labelled].sum())
            total += int(labelled.sum())
    return same / total


@pytest.mark.parametrize("target", ["png", "coco", "yolo"])
@pytest.mark.parametrize("source", ["labelme", "cvat", "yolo"])
def test_each_format_converts_to_each_target(source: str, target: str, request, tmp_path: Path):
    root = request.getfixturevalue(source)
    out = tmp_path / "out"
    result = convert_dataset(root, target, out)
    back = resolve_dataset(out)
    assert back.format == {"png": "folders", "coco": "coco", "yolo": "yolo"}[target]
    assert result.images == sum(map(len, back.splits.values())) == sum(map(len, resolve_dataset(root).splits.values()))
    assert _agreement(root, out) >= 0.99
    assert not list(tmp_path.glob(".out.seglab-*"))  # the temporary folder was renamed


def test_yolo_output_is_what_ultralytics_reads(labelme: Path, tmp_path: Path):
    out = tmp_path / "y"
    convert_dataset(labelme, "yolo", out)
    data = yaml.safe_load((out / "data.yaml").read_text())
    assert data == {
        "path": str(out.resolve()),
        "train": "images/train",
        "val": "images/val",
        "names": {0: "cat", 1: "dog"},
    }
    lines = (out / "labels" / "train" / "a.txt").read_text().splitlines()
    assert len(lines) == 4  # polygon, rectangle, and the group's two polygons (one line each)
    values = [float(v) for line in lines for v in line.split()[1:]]
    assert all(0 <= v <= 1 for v in values) and {line.split()[0] for line in lines} == {"0", "1"}


def test_round_trip_png_coco_yolo_png_is_exact_on_small_masks(tiny_dataset: Path, tmp_path: Path):
    for src, out, to in [(tiny_dataset, "coco", "coco"), ("coco", "yolo", "yolo"), ("yolo", "png", "png")]:
        convert_dataset(tmp_path / src if src != tiny_dataset else src, to, tmp_path / out)
    assert _agreement(tiny_dataset, tmp_path / "png") == 1.0


def test_round_trip_on_camvid_agrees_within_rasterisation(shared_data: Path, tmp_path: Path):
    """28 CamVid images: PNG -> COCO -> YOLO-seg -> PNG. Measured: 99.93% of labelled pixels agree
    (the rest: holes of unlabelled pixels, which polygons fill)."""
    camvid = shared_data / "camvid"
    for split, n in (("train", 20), ("val", 8)):
        lines = (camvid / f"{split}.txt").read_text().splitlines()[:n]
        (tmp_path / f"{split}.txt").write_text("\n".join(" ".join(str(camvid / p) for p in ln.split()) for ln in lines))
    yaml_path = tmp_path / "camvid.yaml"
    yaml_path.write_text(
        yaml.safe_dump(
            {
                "path": str(camvid),
                "format": "pairs",
                "train": str(tmp_path / "train.txt"),
                "val": str(tmp_path / "val.txt"),
            }
        )
    )
    convert_dataset(yaml_path, "coco", tmp_path / "coco")
    convert_dataset(tmp_path / "coco", "yolo", tmp_path / "yolo")
    convert_dataset(tmp_path / "yolo", "png", tmp_path / "png")
    assert _agreement(yaml_path, tmp_path / "png") >= 0.995


def test_training_runs_on_converted_data(tmp_path: Path):
    shapes = make_shapes_dataset(tmp_path / "shapes", n_train=8, n_val=4, size=40, seed=3)
    convert_dataset(shapes, "yolo", tmp_path / "yolo")
    run = seglab.train(
        data=str(tmp_path / "yolo"), model="fcn", epochs=1, batch=4, img_size=40, workers=0,
        out=str(tmp_path / "runs"), progress=False, log=lambda *a: None,
    )  # fmt: skip
    row = run.rows[-1]
    assert np.isfinite(row["train_loss"]) and 0 <= row["val_miou"] <= 1


# --------------------------------------------------------------------------- data check --task instance


def test_data_check_instance_counts_objects_and_names_degenerate_polygons(tmp_path: Path):
    root = tmp_path / "coco"
    for name in ("a.png", "b.png"):
        _image(root / "images" / name)
    content = {
        "images": [{"id": i, "file_name": n, "height": H, "width": W} for i, n in ((1, "a.png"), (2, "b.png"))],
        "categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}],
        "annotations": [
            {"id": 10, "image_id": 1, "category_id": 1, "segmentation": [[2, 2, 12, 2, 12, 12, 2, 12]], "iscrowd": 0},
            {"id": 11, "image_id": 1, "category_id": 2, "segmentation": [[0, 0, 39, 0, 39, 31, 0, 31]], "iscrowd": 0},
            {"id": 12, "image_id": 1, "category_id": 1, "segmentation": [[1, 1, 5, 5]], "iscrowd": 0},
            {"id": 13, "image_id": 1, "category_id": 1, "segmentation": [[1, 1, 5, 5, 9, 9]], "iscrowd": 0},
            {"id": 14, "image_id": 1, "category_id": 2, "segmentation": [[30, 2, 45, 2, 30, 10]], "iscrowd": 0},
        ],
    }  # fmt: skip
    (root / "annotations").mkdir()
    (root / "annotations" / "instances_train.json").write_text(json.dumps(content))
    val = {**content, "images": content["images"][:1], "annotations": content["annotations"][:1]}
    (root / "annotations" / "instances_val.json").write_text(json.dumps(val))
    report = check_dataset(root, task="instance")
    assert report.ok, report.format()
    text = report.format()
    # the 2-point polygon draws nothing; the flat one draws a few pixels, as training reads it
    assert report.per_class.tolist()[1:] == [3, 2] and report.per_image == [4, 0, 1]
    assert "1 of 3 images have none (b.png)" in text
    assert "small 4" in text and "medium 1" in text  # squares, the flat polygon, a clipped triangle; the box
    # the box histogram: the 40x32 box alone in 32-64 px, the four others below 32
    assert sum(report.boxes) == 5 and report.boxes[3] == 1 and sum(report.boxes[:3]) == 4
    assert "box sizes (the square root of width x height):" in text and "32-64 px         1  " in text
    assert "degenerate polygons: 3" in text  # in train; val's one square is fine
    for fragment in ("annotation 12 (cat): a polygon of 2 point(s)", "annotation 13 (cat): a polygon with no area",
                     "annotation 14 (dog): a polygon reaching outside"):  # fmt: skip
        assert fragment in text


def test_data_check_instance_on_the_cli(yolo: Path):
    proc = _seglab("data", "check", "--task", "instance", str(yolo))
    assert proc.returncode == 0, proc.stderr
    assert "objects per class (3 objects)" in proc.stdout and "1 of 3 images have none (empty.png)" in proc.stdout


# --------------------------------------------------------------------------- bad input: one line, exit 2


def _seglab(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "seglab", *args], capture_output=True, text=True, timeout=120)


def _break_labelme(root: Path, what: str) -> None:
    path = root / "train" / "a.json"
    content = json.loads(path.read_text())
    if what == "json":
        path.write_text(path.read_text()[:-20])
        return
    if what == "outside":
        content["shapes"][0]["points"][1] = [90, 2]
    if what == "number":
        content["shapes"][0]["points"][1] = ["x", 2]
    if what == "image":
        content["imagePath"] = "gone.png"
        (root / "train" / "a.png").unlink()
    if what == "label":
        (root / "data.yaml").write_text("classes: [background, cat]\n")
    path.write_text(json.dumps(content))


BAD_INPUTS = [
    ("labelme", "json", ["a.json", "not valid JSON"]),
    ("labelme", "outside", ["a.json: shape 0 (polygon 'cat')", "point (90, 2) lies outside the 40x32 image"]),
    ("labelme", "number", ["a.json: shape 0", "not a number"]),
    ("labelme", "image", ["a.json: image gone.png not found"]),
    ("labelme", "label", ["a.json: shape 1 (rectangle 'dog'): label not in data.yaml's classes"]),
    ("cvat", "xml", ["annotations.xml: not valid XML"]),
    ("cvat", "label", ["image a.png <box>", "label not among the task's labels"]),
    ("cvat", "rle", ["<mask>", "its rle covers"]),
    ("yolo", "number", ["a.txt: line 1", "not a number"]),
    ("yolo", "class", ["a.txt: line 2: class 5 is not one of the 2 classes"]),
]


@pytest.mark.parametrize(("layout", "what", "fragments"), BAD_INPUTS, ids=[f"{a}-{b}" for a, b, _ in BAD_INPUTS])
def test_bad_input_is_one_line_naming_the_file(layout: str, what: str, fragments: list[str], request, tmp_path: Path):
    root = request.getfixturevalue(layout)
    if layout == "labelme":
        _break_labelme(root, what)
    elif layout == "cvat":
        xml = root / "annotations.xml"
        text = xml.read_text()
        broken = {"xml": text[:-30], "label": text.replace('<box label="car"', '<box label="bus"', 1),
                  "rle": text.replace('rle="', 'rle="7, ', 1)}  # fmt: skip
        xml.write_text(broken[what])
    else:
        label = root / "labels" / "train" / "a.txt"
        label.write_text(
            {"number": "1 0.1 0.1 zero 0.1 0.1 0.6\n", "class": "1 0.1 0.1 0.5 0.1 0.1 0.6\n5 0.5 0.5 0.1 0.1\n"}[what]
        )
    proc = _seglab("data", "convert", str(root), "--to", "coco", "--out", str(tmp_path / "out"))
    _assert_user_error(proc, *fragments)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("args", "fragment"),
    [(["--to", "voc"], "--to voc"), (["--to", "coco", "--out", "FULL"], "is not an empty folder")],
)
def test_bad_flags_are_one_line(args: list[str], fragment: str, labelme: Path, tmp_path: Path):
    full = tmp_path / "full"
    full.mkdir()
    (full / "x").write_text("")
    args = [str(full) if a == "FULL" else a for a in args]
    out = [] if "--out" in args else ["--out", str(tmp_path / "new")]
    _assert_user_error(_seglab("data", "convert", str(labelme), *args, *out), fragment)


def _assert_user_error(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("seglab: error:") and "Traceback" not in proc.stderr, proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def test_a_shard_set_is_refused_in_one_line(tiny_dataset: Path, tmp_path: Path):
    from seglab.data.shards import pack_dataset

    pack_dataset(tiny_dataset, tmp_path / "shards")
    proc = _seglab("data", "convert", str(tmp_path / "shards"), "--to", "coco", "--out", str(tmp_path / "out"))
    _assert_user_error(proc, "is a shard set; convert the dataset it was packed from")
    assert not (tmp_path / "out").exists()
