"""Exported files from strangers, and interrupted exports (issue 14).

- A .pt2 or TorchScript file that would run code (pickles, guard code, __setstate__, file ops) is
  refused before torch reads it, and the code never runs.
- Metadata that lies (the crafted-file catalogue) is one line, never a traceback or a silent accept.
- A fixed-shape export predicts and evaluates images of any size (letterboxed).
- SIGINT / SIGTERM during ``seglab export`` / ``quantize``: one line, exit 130 / 143, nothing left.
"""

from __future__ import annotations

import json
import os
import pathlib
import pickle
import random
import signal
import subprocess
import sys
import time
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import seglab
from conftest import CAMVID_CLASSES, CAMVID_COLORS, random_checkpoint
from seglab.deploy.export import SUFFIX, export
from seglab.errors import SeglabError
from test_hostile import in_process_error, one_line_error
from test_hostile import seglab as seglab_cli

NEVER_RUNS_CODE = "never runs code from a model file"


def load_error(path: Path, *fragments: str) -> str:
    """seglab.load(path) refuses the file with one line naming it."""
    with pytest.raises(SeglabError) as caught:
        seglab.load(path, device="cpu")
    message = str(caught.value)
    assert "\n" not in message and path.name in message, message
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    return message


def checkpoint(path: Path, crop: list[int]) -> Path:
    """A 64-px FCN (ResNet-18) with random weights, at module scope so that its exports are shared by
    the tests here. (Random MobileNetV3 encoders give one class everywhere, which would make agreement
    figures meaningless.)"""
    return random_checkpoint(path, "fcn", "resnet18", img_size=64, crop=crop)


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> dict[str, Path]:
    """The checkpoint ("pt", a square 64x64 training crop like the issue's 128x128 CamVid model) and
    its default (fixed-shape, 1x3x64x64) exports, by format."""
    root = tmp_path_factory.mktemp("exports")
    files = {"pt": checkpoint(root / "best.pt", [64, 64])}
    for fmt in ("onnx", "torchscript", "torch-export"):
        files[fmt] = export(files["pt"], format=fmt, out=root / f"best{SUFFIX[fmt]}", check_images=1, log=print).path
    return files


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("image") / "street.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (45, 70, 3), dtype=np.uint8)).save(path)
    return path


def rewrite_zip(source: Path, target: Path, change: Callable[[dict[str, bytes]], None]) -> Path:
    """Copy a zip archive, letting ``change`` edit its members (names relative to the root folder)."""
    with zipfile.ZipFile(source) as archive:
        root = archive.namelist()[0].split("/")[0]
        members = {n.split("/", 1)[1]: archive.read(n) for n in archive.namelist()}
    change(members)
    with zipfile.ZipFile(target, "w", zipfile.ZIP_STORED) as archive:
        for name, data in members.items():
            archive.writestr(f"{root}/{name}", data)
    return target


class WritesMarker:
    """Unpickling this writes a file: what a hostile pickle does, harmlessly."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.write_text, (self.marker, "pwned"))


# ---------------------------------------------------------------------------------- 1. no code from files


def pickled_weight(marker: Path) -> Callable[[dict[str, bytes]], None]:
    def change(members: dict[str, bytes]) -> None:
        config = json.loads(members["data/weights/model_weights_config.json"])
        entry = next(iter(config["config"].values()))
        entry["use_pickle"] = True  # torch.export.load then torch.load()s it with weights_only=False
        members["data/weights/model_weights_config.json"] = json.dumps(config).encode()
        members[f"data/weights/{entry['path_name']}"] = pickle.dumps(WritesMarker(marker))

    return change


def pickled_sample_inputs(marker: Path) -> Callable[[dict[str, bytes]], None]:
    def change(members: dict[str, bytes]) -> None:  # torch falls back to weights_only=False for these
        members["data/sample_inputs/model.pt"] = pickle.dumps(WritesMarker(marker))

    return change


def guard_code(marker: Path) -> Callable[[dict[str, bytes]], None]:
    def change(members: dict[str, bytes]) -> None:  # exec-ed by torch.export's .module(), run on each call
        program = json.loads(members["models/model.json"])
        program["guards_code"] = [f"__import__('pathlib').Path({str(marker)!r}).write_text('pwned') > 0"]
        members["models/model.json"] = json.dumps(program).encode()

    return change


def file_op_node(marker: Path) -> Callable[[dict[str, bytes]], None]:
    def change(members: dict[str, bytes]) -> None:  # a graph node calling an aten op that writes files
        program = json.loads(members["models/model.json"])
        node = program["graph_module"]["graph"]["nodes"][-1]
        node["target"] = "torch.ops.aten.save.default"
        members["models/model.json"] = json.dumps(program).encode()

    return change


@pytest.mark.parametrize(
    ("attack", "why"),
    [
        (pickled_weight, "as a pickled object"),
        (pickled_sample_inputs, "not plain tensor data"),
        (guard_code, "guard code"),
        (file_op_node, "aten.save"),
    ],
)
def test_pt2_that_would_run_code_is_refused_and_runs_nothing(
    exports, image, tmp_path, capsys, monkeypatch, attack, why
):
    monkeypatch.chdir(tmp_path)  # for the in-process commands: nothing may land in the working folder
    marker = tmp_path / "marker"
    evil = rewrite_zip(exports["torch-export"], tmp_path / "evil.pt2", attack(marker))
    load_error(evil, NEVER_RUNS_CODE, why)  # refused by the archive check meant for it, not by a later failure
    if attack is pickled_weight:  # through a real CLI process too, where the model also runs
        one_line_error(seglab_cli("predict", "--weights", evil, "--source", image, cwd=tmp_path), "evil.pt2", why)
    if attack in (pickled_weight, guard_code):
        assert why in in_process_error(capsys, "val", "--weights", evil, "--data", tmp_path)
        assert why in in_process_error(capsys, "predict", "--weights", evil, "--source", image)
    assert not marker.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["evil.pt2"], "nothing lands in the working folder"


def test_unmodified_pt2_and_torchscript_still_load_and_predict(exports, image):
    expected = seglab.load(exports["pt"], device="cpu").predict(image).mask
    for fmt in ("torch-export", "torchscript"):
        model = seglab.load(exports[fmt], device="cpu")
        assert model.backend == fmt
        assert (model.predict(image).mask == expected).mean() > 0.999


def scripted_with_setstate(marker: Path, meta: str, path: Path) -> Path:
    """A TorchScript module whose __setstate__ (run by torch.jit.load) writes a file with aten::save."""

    class Evil(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("w", torch.ones(1))
            self.target = str(marker)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.zeros(x.shape[0], 11, x.shape[2], x.shape[3]) * self.w

        @torch.jit.export
        def __getstate__(self) -> tuple[torch.Tensor, bool, str]:
            return (self.w, self.training, self.target)

        @torch.jit.export
        def __setstate__(self, state: tuple[torch.Tensor, bool, str]) -> None:
            self.w, self.training, self.target = state[0], state[1], state[2]
            torch.ops.aten.save(state[0], state[2])

    with warnings.catch_warnings():  # TorchScript's deprecation notices
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.save(torch.jit.script(Evil()), str(path), _extra_files={"seglab.json": meta})
    return path


def torchscript_forward_writes(marker: Path) -> Callable[[dict[str, bytes]], None]:
    def change(members: dict[str, bytes]) -> None:  # the traced forward, edited to write a file
        name = next(n for n in members if n.endswith("seglab/models/fcn.py"))
        anchor = "    encoder = self.encoder\n"
        line = f"    torch.save(x, {str(marker)!r})\n"
        members[name] = members[name].decode().replace(anchor, anchor + line, 1).encode()

    return change


def test_torchscript_that_would_touch_files_is_refused(exports, image, tmp_path):
    """TorchScript runs no Python (its unpickler knows only torch's types), but its code may call any
    op, aten::save and aten::from_file included, and torch.jit.load runs __setstate__."""
    meta = zipfile.ZipFile(exports["torchscript"]).read(
        next(n for n in zipfile.ZipFile(exports["torchscript"]).namelist() if n.endswith("extra/seglab.json"))
    )
    marker = tmp_path / "marker"
    on_load = scripted_with_setstate(marker, meta.decode(), tmp_path / "on_load.torchscript")
    load_error(on_load, "__getstate__", NEVER_RUNS_CODE)
    one_line_error(seglab_cli("predict", "--weights", on_load, "--source", image, cwd=tmp_path), "on_load.torchscript")
    on_use = rewrite_zip(exports["torchscript"], tmp_path / "on_use.torchscript", torchscript_forward_writes(marker))
    load_error(on_use, "torch.save", NEVER_RUNS_CODE)
    assert not marker.exists()


def test_pt2_archive_tricks_are_refused(exports, tmp_path):
    def add(name: str, data: bytes) -> Callable[[dict[str, bytes]], None]:
        return lambda members: members.update({name: data})

    compiled = rewrite_zip(exports["torch-export"], tmp_path / "aoti.pt2", add("data/aotinductor/model/m.so", b"ELF"))
    load_error(compiled, "data/aotinductor/model/m.so", NEVER_RUNS_CODE)
    unlisted = rewrite_zip(exports["torch-export"], tmp_path / "unlisted.pt2", add("data/weights/weight_9999", b"0"))
    load_error(unlisted, "does not list")
    bomb = tmp_path / "bomb.pt2"  # a compressed member that expands: torch writes none
    with zipfile.ZipFile(exports["torch-export"]) as source, zipfile.ZipFile(bomb, "w") as target:
        for info in source.infolist():
            compress = zipfile.ZIP_DEFLATED if info.filename.endswith("model.json") else zipfile.ZIP_STORED
            target.writestr(info.filename, source.read(info), compress_type=compress)
    load_error(bomb, "compressed")
    damaged = tmp_path / "damaged.pt2"  # one flipped byte in a weight: its CRC no longer matches
    data = bytearray(exports["torch-export"].read_bytes())
    data[len(data) // 2] ^= 0xFF
    damaged.write_bytes(bytes(data))
    load_error(damaged, "the archive is damaged")


# ---------------------------------------------------------------------------------- 2. metadata is checked


def onnx_meta(exports) -> dict:
    import onnx

    props = {p.key: p.value for p in onnx.load(str(exports["onnx"])).metadata_props}
    return json.loads(props["seglab"])


def with_metadata(source: Path, target: Path, text: str | None) -> Path:
    import onnx

    proto = onnx.load(str(source))
    del proto.metadata_props[:]
    if text is not None:
        entry = proto.metadata_props.add()
        entry.key, entry.value = "seglab", text
    onnx.save(proto, str(target))
    return target


def card_change(**values) -> Callable[[dict], None]:
    def change(meta: dict) -> None:
        for key, value in values.items():
            if value is DELETE:
                del meta["card"][key]
            else:
                meta["card"][key] = value

    return change


DELETE = object()
CLASSES_300 = {"num_classes": 300, "classes": [f"c{i}" for i in range(300)], "colors": [[0, 0, 0]] * 300}
CLASSES_12 = {"num_classes": 12, "classes": [*CAMVID_CLASSES, "Extra"], "colors": [*CAMVID_COLORS, (1, 2, 3)]}
GREY = {"in_channels": 1, "mean": [0.5], "std": [0.25]}
# (id, the metadata text or a change to the real metadata, a fragment of the one-line message)
METADATA_CASES = [
    ("invalid-json", "{not json", "not valid JSON"),
    ("json-list", "[1, 2, 3]", "a list, not a mapping"),
    ("json-string", '"seglab"', "a str, not a mapping"),
    ("deeply-nested", "[" * 100000 + "]" * 100000, "not valid JSON"),
    ("empty", "", "carries no seglab metadata"),
    ("no-card", lambda m: m.pop("card"), "model card is a NoneType"),
    ("card-list", lambda m: m.update(card=[1, 2]), "model card is a list"),
    ("card-missing-key", card_change(classes=DELETE), "missing classes"),
    ("card-extra-key", card_change(evil=1), "unknown key(s) evil"),
    ("colour-out-of-range", card_change(colors=[[300, 0, 0]] + [list(c) for c in CAMVID_COLORS[1:]]), "colors"),
    ("colour-negative", card_change(colors=[[-1, 0, 0]] + [list(c) for c in CAMVID_COLORS[1:]]), "colors"),
    ("in-channels-7", card_change(in_channels=7), "in_channels"),
    ("300-classes", card_change(**CLASSES_300), "num_classes=300"),
    ("img-size-200000", card_change(img_size=200000), "img_size"),
    ("img-size-negative", card_change(img_size=-5), "img_size"),
    ("std-zero", card_change(std=[0, 0, 0]), "std"),
    ("mean-nan", card_change(mean=[float("nan"), 0.4, 0.4]), "mean"),
    ("num-classes-disagrees-with-graph", card_change(**CLASSES_12), "num_classes=12"),
    ("short-classes", card_change(classes=CAMVID_CLASSES[:5]), "says classes="),
    ("short-colors", card_change(colors=[list(c) for c in CAMVID_COLORS[:5]]), "colors"),
    ("short-mean", card_change(mean=[0.5]), "mean"),
    ("grey-card-rgb-shape", card_change(**GREY), "expected [batch, 1, height, width]"),
    ("grey-card-rgb-graph", lambda m: (card_change(**GREY)(m), m.update(input_shape=[1, 1, 64, 64])), "3-channel"),
    ("crop-size-zero", card_change(crop_size=[0, 5]), "crop_size"),
    ("task-detect", card_change(task="detect"), "semantic"),
    ("format-wrong", lambda m: m.update(format="torchscript"), "format"),
    ("half-not-bool", lambda m: m.update(half="yes"), "half"),
    ("dynamic-not-bool", lambda m: m.update(dynamic=1), "dynamic"),
    ("input-shape-string", lambda m: m.update(input_shape="1x3x64x64"), "input_shape"),
    ("input-shape-disagrees", lambda m: m.update(input_shape=[1, 3, 96, 128]), "the graph takes"),
    ("input-shape-huge", lambda m: m.update(input_shape=[1, 3, 200000, 200000]), "not a size seglab exports"),
    ("half-disagrees", lambda m: m.update(half=True), "half=True"),
    ("metrics-not-dict", lambda m: m.update(metrics="all good"), "metrics"),
    ("data-not-str", lambda m: m.update(data=[1, 2]), "says data="),
]


@pytest.mark.parametrize(("text", "fragment"), [c[1:] for c in METADATA_CASES], ids=[c[0] for c in METADATA_CASES])
def test_crafted_onnx_metadata_is_one_line(exports, tmp_path, text, fragment):
    if callable(text):
        meta = onnx_meta(exports)
        text(meta)
        text = json.dumps(meta)
    crafted = with_metadata(exports["onnx"], tmp_path / "crafted.onnx", text)
    load_error(crafted, fragment)


def test_crafted_metadata_through_predict_and_val(exports, image, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # for the in-process command: nothing may land in the working folder
    meta = onnx_meta(exports)
    card_change(**CLASSES_12)(meta)
    disagrees = with_metadata(exports["onnx"], tmp_path / "disagrees.onnx", json.dumps(meta))
    one_line_error(seglab_cli("predict", "--weights", disagrees, "--source", image, cwd=tmp_path), "num_classes=12")
    broken = with_metadata(exports["onnx"], tmp_path / "broken.onnx", "{not json")
    assert "not valid JSON" in in_process_error(capsys, "val", "--weights", broken, "--data", tmp_path)


def graph(path: Path, inputs: list, outputs: list, nodes: list, meta: dict) -> Path:
    """A small ONNX graph that is not seglab's, carrying real seglab metadata."""
    import onnx
    from onnx import helper

    weight = onnx.numpy_helper.from_array(np.zeros((5, 3, 1, 1), np.float32), "w")
    model = helper.make_model(
        helper.make_graph(nodes, "g", inputs, outputs, [weight]), opset_imports=[helper.make_opsetid("", 18)]
    )
    entry = model.metadata_props.add()
    entry.key, entry.value = "seglab", json.dumps(meta)
    onnx.save(model, str(path))
    return path


def test_crafted_onnx_graphs_are_checked_against_the_card(exports, tmp_path):
    from onnx import TensorProto, helper

    meta = onnx_meta(exports)
    dynamic = {**meta, "dynamic": True, "input_shape": ["batch", 3, "height", "width"]}
    image, logits = ["b", 3, "h", "w"], ["b", "k", "h", "w"]  # output channels not declared
    conv = helper.make_node("Conv", ["x", "w"], ["y"])
    cases = {
        "two-inputs": (
            [helper.make_tensor_value_info(n, TensorProto.FLOAT, image) for n in ("x", "z")],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, logits)],
            [helper.make_node("Add", ["x", "z"], ["y"])],
            dynamic,
            "2 inputs",
        ),
        "int-input": (
            [helper.make_tensor_value_info("x", TensorProto.INT64, image)],
            [helper.make_tensor_value_info("y", TensorProto.INT64, image)],
            [helper.make_node("Identity", ["x"], ["y"])],
            dynamic,
            "not float images",
        ),
        "huge-fixed-input": (
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 100000, 100000])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 5, 100000, 100000])],
            [conv],
            {**meta, "input_shape": [1, 3, 100000, 100000]},
            "not a size seglab exports",
        ),
        "output-of-5-classes": (  # declared dynamic; ONNX Runtime infers the 5 (else the warm-up pass tells)
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, image)],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, logits)],
            [conv],
            dynamic,
            "gives 5 classes; its model card says num_classes=11",
        ),
    }
    for name, (inputs, outputs, nodes, case_meta, fragment) in cases.items():
        load_error(graph(tmp_path / f"{name}.onnx", inputs, outputs, nodes, case_meta), fragment)


def test_crafted_metadata_in_torchscript_and_pt2(exports, tmp_path):
    def meta_edit(change: Callable[[dict], None]) -> Callable[[dict[str, bytes]], None]:
        def edit(members: dict[str, bytes]) -> None:
            meta = json.loads(members["extra/seglab.json"])
            change(meta)
            members["extra/seglab.json"] = json.dumps(meta).encode()

        return edit

    for fmt, suffix in (("torchscript", ".torchscript"), ("torch-export", ".pt2")):
        short = rewrite_zip(exports[fmt], tmp_path / f"short{suffix}", meta_edit(card_change(colors=[[0, 0, 0]])))
        load_error(short, "colors")
        more = rewrite_zip(exports[fmt], tmp_path / f"more{suffix}", meta_edit(card_change(**CLASSES_12)))
        load_error(more, "num_classes=12")  # the warm-up pass gives 11 channels
    shape = rewrite_zip(
        exports["torch-export"], tmp_path / "shape.pt2", meta_edit(lambda m: m.update(input_shape=[1, 3, 96, 128]))
    )
    load_error(shape, "the graph takes [1, 3, 64, 64]")


# ------------------------------------------------------------------------------- 3. fixed shapes letterbox

# Odd sizes, none square but one. At the model's img_size of 64 their short sides stay above 32, so
# the checkpoint pads them to 64x64 inside (its minimum of two strides of 32), as the letterbox does.
ODD_SIZES = [(45, 70), (70, 45), (50, 63), (64, 64), (61, 47)]


def smooth_image(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Colour blobs, smooth like a photo (noise would make two resamplings of it different images)."""
    low = rng.integers(0, 256, (4, 6, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(low).resize((w, h), Image.Resampling.BICUBIC))


def argmax_agreement(a: list, b: list) -> float:
    return float(np.mean(np.concatenate([(x.mask == y.mask).ravel() for x, y in zip(a, b, strict=True)])))


@pytest.mark.parametrize("fmt", ["onnx", "torchscript", "torch-export"])
def test_fixed_shape_exports_predict_images_of_any_size(exports, fmt):
    rng = np.random.default_rng(1)
    images = [smooth_image(rng, *size) for size in ODD_SIZES]
    checkpoint_model, exported = seglab.load(exports["pt"], device="cpu"), seglab.load(exports[fmt], device="cpu")
    expected, got = checkpoint_model.predict(images), exported.predict(images)
    assert [r.mask.shape for r in got] == ODD_SIZES
    assert len(np.unique(np.concatenate([r.mask.ravel() for r in expected]))) > 2  # not a constant answer
    padded = argmax_agreement(got, expected)
    # --img-size 96: larger than the file's 64x64, so ONNX and .pt2 scale the image down to fit: the
    # checkpoint's answer at the size that fits (64) is what they should give (TorchScript: at 96)
    scaled = exported.predict(images, img_size=96)
    reference = checkpoint_model.predict(images, img_size=96 if fmt == "torchscript" else 64)
    larger = argmax_agreement(scaled, reference)
    print(f"{fmt}: argmax agreement with the checkpoint {100 * padded:.2f}% padded, {100 * larger:.2f}% scaled")
    assert padded > 0.999
    assert larger > (0.999 if fmt == "torchscript" else 0.98)


@pytest.mark.slow
def test_fixed_shape_onnx_through_predict_and_val_on_camvid(exports, image, tmp_path, shared_data):
    """The issue's case: a square training crop, exported fixed-shape, on CamVid's 4:3 images."""
    camvid = shared_data / "camvid"
    source = tmp_path / "source"
    source.mkdir()
    for path in sorted((camvid / "val").glob("*.png"))[:2]:
        (source / path.name).symlink_to(path)
    (source / image.name).symlink_to(image)
    masks = {}
    for name in ("pt", "onnx"):
        proc = seglab_cli("predict", "--weights", exports[name], "--source", source, "--out", tmp_path / name,
                          cwd=tmp_path)  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        masks[name] = {p.name: np.asarray(Image.open(p)) for p in sorted((tmp_path / name / "masks").glob("*.png"))}
    assert masks["pt"].keys() == masks["onnx"].keys() and len(masks["pt"]) == 3
    for name, mask in masks["onnx"].items():
        assert mask.shape == masks["pt"][name].shape
        # CamVid's 48x64 (and the 41x64 image) pad to 64x64, as the checkpoint pads inside: the same masks
        assert (mask == masks["pt"][name]).mean() > 0.999, name
    scores = {}
    for name in ("pt", "onnx"):
        proc = seglab_cli("val", "--weights", exports[name], "--data", camvid, "--limit", "4", "--workers", "0",
                          "--out", tmp_path / f"val_{name}", cwd=tmp_path)  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        scores[name] = json.loads((tmp_path / f"val_{name}" / "metrics.json").read_text())["miou"]
    assert abs(scores["pt"] - scores["onnx"]) < 1e-4


def test_wrong_channel_count_is_still_one_line(exports):
    module = seglab.load(exports["onnx"], device="cpu").model
    with pytest.raises(SeglabError, match="takes 3-channel images") as caught:
        module(torch.zeros(1, 1, 64, 64))
    assert "\n" not in str(caught.value)


# ------------------------------------------------------------------------------ 4. interrupts leave nothing


def run_and_signal(args: list, folder: Path, signum: int, delay: float) -> tuple[subprocess.CompletedProcess, set]:
    """Start ``seglab *args`` in ``folder``, wait for the first file it creates there (its temporary
    file: the export or quantisation proper has begun), then ``delay`` seconds more, and send
    ``signum``. Returns the finished process and what it left in ``folder``."""
    before = set(folder.iterdir())
    proc = subprocess.Popen(
        [sys.executable, "-m", "seglab", *map(str, args)], cwd=folder, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while set(folder.iterdir()) == before and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(delay)
    if proc.poll() is None:
        proc.send_signal(signum)
    stdout, stderr = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr), set(folder.iterdir()) - before


def interrupt_exports(exports: dict[str, Path], tmp_path: Path, runs: list[tuple[signal.Signals, float]]) -> None:
    """Export under each (signal, delay): one line and 128 + signal, or a finished export; nothing else left."""
    interrupted = []
    for i, (signum, delay) in enumerate(runs):
        folder = tmp_path / f"run{i}"
        folder.mkdir()
        out = folder / "m.onnx"
        proc, left = run_and_signal(["export", "--weights", exports["pt"], "--format", "onnx", "--out", out], folder,
                                    signum, delay)  # fmt: skip
        print(f"{signum.name} after {delay:.2f} s: exit {proc.returncode}, {proc.stderr.strip()!r}")
        if out.exists():  # the signal came after the file was complete (os.replace is atomic): a finished export
            assert {p.name for p in left} == {"m.onnx", "m.onnx.parity.json"}, left
            seglab.load(out, device="cpu")
            continue
        assert left == set(), (signum, delay, proc.stderr)  # no temporary file, no half-written one
        assert proc.returncode == 128 + signum, (signum, delay, proc.returncode, proc.stderr)
        assert proc.stderr.strip().splitlines() == ["seglab: interrupted"], proc.stderr
        interrupted.append(signum)
    assert signal.SIGINT in interrupted and signal.SIGTERM in interrupted, runs


def test_interrupted_export_ends_in_one_line_and_leaves_nothing(exports, tmp_path):
    """SIGINT the moment the export proper starts (into torch.onnx's C++), SIGTERM at a seeded delay
    (into the export or the parity check)."""
    interrupt_exports(exports, tmp_path, [(signal.SIGINT, 0.0), (signal.SIGTERM, random.Random(14).uniform(0, 1.5))])


@pytest.mark.slow
def test_many_interrupts_during_export(exports, tmp_path):
    """Both signals at once and at ten seeded delays up to 1.5 s (into the parity check, or past the end)."""
    rng = random.Random(15)
    runs = [(signal.SIGINT, 0.0), (signal.SIGTERM, 0.0)]
    runs += [(rng.choice([signal.SIGINT, signal.SIGTERM]), rng.uniform(0.0, 1.5)) for _ in range(10)]
    interrupt_exports(exports, tmp_path, runs)


def test_stale_temporaries_of_dead_processes_are_removed(exports, tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale_file = tmp_path / f".m.onnx.seglab-{dead.pid}-x1y2.onnx"
    stale_dir = tmp_path / f".m.onnx.seglab-{dead.pid}-q7"  # what seglab quantize writes in
    live = tmp_path / f".m.onnx.seglab-{os.getpid()}-live.onnx"  # a process still writing: left alone
    unrelated = tmp_path / ".m.onnx.backup"
    stale_file.touch()
    stale_dir.mkdir()
    (stale_dir / "int8.onnx").write_bytes(b"half")
    live.touch()
    unrelated.touch()
    export(exports["pt"], format="onnx", out=tmp_path / "m.onnx", check_images=1, log=print)
    assert not stale_file.exists() and not stale_dir.exists()
    assert live.exists() and unrelated.exists() and (tmp_path / "m.onnx").is_file()


def test_interrupted_quantize_leaves_nothing(exports, tmp_path, shared_data):
    """SIGTERM as calibration starts (its default action would leave the temporary folder behind)."""
    float_onnx = tmp_path / "f.onnx"
    float_onnx.write_bytes(exports["onnx"].read_bytes())
    proc, left = run_and_signal(["quantize", "--weights", float_onnx, "--data", shared_data / "camvid",
                                 "--calib", "64", "--no-report", "--out", tmp_path / "q.onnx"],
                                tmp_path, signal.SIGTERM, 0.0)  # fmt: skip
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr
    assert proc.stderr.strip().splitlines() == ["seglab: interrupted"], proc.stderr
    assert left == set()


def test_deferred_signals_raise_at_the_next_check():
    from seglab.engine.stopping import DeferredSignals, Interrupted

    before = signal.getsignal(signal.SIGTERM)
    with DeferredSignals() as signals:
        signals.check()
        os.kill(os.getpid(), signal.SIGTERM)  # recorded, not acted on: the process is still here
        time.sleep(0.05)
        with pytest.raises(Interrupted) as caught:
            signals.check()
    assert caught.value.signum == signal.SIGTERM and isinstance(caught.value, KeyboardInterrupt)
    assert signal.getsignal(signal.SIGTERM) == before
