"""Checkpoints from strangers (README, Troubleshooting): a .pt file is data, never code.

Every command and API that reads weights gets a checkpoint with one extra pickled object whose
``__reduce__`` writes a marker file when unpickled. The marker must never appear; the command exits
2 with one line that names the file and the opt-in for files the user made (``--trust-weights``).
With the opt-in the same file does run its code: proof that the payload is live and the test can fail.
"""

from __future__ import annotations

import io
import pathlib
import re
import shutil
import socket
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import seglab
from seglab.cli import main
from seglab.engine.checkpoint import load_checkpoint
from seglab.errors import SeglabError
from test_hostile import folders_dataset, one_line_error
from test_hostile import seglab as seglab_cli


class Payload:
    """Unpickling this writes ``marker``: what a malicious checkpoint would do with os.system."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.write_text, (pathlib.Path(self.marker), "code from a checkpoint ran"))


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """One epoch of a small FCN: runs/train/exp with best.pt and last.pt, and its data."""
    root = tmp_path_factory.mktemp("run")
    data = folders_dataset(root / "data", n=4)
    assert seglab_cli("train", "--data", data, "--model", "fcn", "--epochs", "1", "--batch", "2",
                      "--img-size", "40", "--workers", "0", cwd=root).returncode == 0  # fmt: skip
    return root


def poisoned(source: Path, dest: Path, marker: Path) -> Path:
    """``source``'s checkpoint plus one pickled object that writes ``marker`` when loaded."""
    ckpt = torch.load(source, weights_only=True)
    ckpt["notes"] = Payload(marker)
    dest.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ckpt, dest)
    return dest


@pytest.fixture
def marker(tmp_path) -> Path:
    return tmp_path / "MARKER"


def refused(code: int, capsys, marker: Path, path: Path) -> str:
    """Exit 2, one line naming the file and the opt-in, and no code run."""
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("seglab: error:"), err
    assert str(path) in err[0] and "pickled Python objects" in err[0] and "--trust-weights" in err[0], err[0]
    assert not marker.exists(), "the checkpoint's code ran"
    return err[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


COMMANDS = {
    "val": lambda w, run, out: ["val", "--weights", w, "--out", out],
    "predict": lambda w, run, out: ["predict", "--weights", w, "--source", run / "data/images/val/0.png", "--out", out],
    "export": lambda w, run, out: ["export", "--weights", w, "--format", "onnx", "--out", out / "m.onnx"],
    "quantize": lambda w, run, out: ["quantize", "--weights", w, "--out", out / "m.int8.onnx"],
    "prune": lambda w, run, out: ["prune", "--weights", w, "--epochs", "0", "--out", out],
    "serve": lambda w, run, out: ["serve", "--weights", w, "--port", str(free_port())],
    "gen sample": lambda w, run, out: ["gen", "sample", "--weights", w, "--n", "1", "--out", out],
}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_refuses_a_checkpoint_that_runs_code(run, tmp_path, marker, capsys, monkeypatch, command):
    monkeypatch.chdir(tmp_path)
    evil = poisoned(run / "runs/train/exp/weights/best.pt", tmp_path / "downloads" / "best.pt", marker)
    code = main([str(a) for a in COMMANDS[command](evil, run, tmp_path / "out")])
    refused(code, capsys, marker, evil)
    assert not any(p.is_file() for p in (tmp_path / "out").rglob("*")), "nothing is written"


def test_resume_refuses_a_checkpoint_that_runs_code(run, tmp_path, marker, capsys, monkeypatch):
    """--resume does not fall back to a good last.prev.pt either: the file is not damaged, it is refused."""
    monkeypatch.chdir(tmp_path)
    weights = tmp_path / "runs/train/exp/weights"
    evil = poisoned(run / "runs/train/exp/weights/last.pt", weights / "last.pt", marker)
    shutil.copy(run / "runs/train/exp/weights/last.pt", weights / "last.prev.pt")  # a fallback would train on
    refused(main(["train", "--resume", str(evil)]), capsys, marker, evil)
    refused(main(["gen", "train", "--resume", str(evil)]), capsys, marker, evil)


def test_python_api_refuses_it_and_trust_runs_it(run, tmp_path, marker):
    evil = poisoned(run / "runs/train/exp/weights/best.pt", tmp_path / "best.pt", marker)
    with pytest.raises(SeglabError, match=r"pickled Python objects .*trust=True"):
        seglab.load(evil)
    assert not marker.exists()
    seglab.load(evil, trust=True)  # the explicit opt-in, for files the user made: the payload is live
    assert marker.exists()


def test_a_real_subprocess_and_the_cli_opt_in(run, tmp_path, marker, capsys):
    evil = poisoned(run / "runs/train/exp/weights/best.pt", tmp_path / "best.pt", marker)
    image = run / "data/images/val/0.png"
    one_line_error(seglab_cli("predict", "--weights", evil, "--source", image, cwd=tmp_path), "--trust-weights")
    assert not marker.exists()
    code = main(["predict", "--weights", str(evil), "--source", str(image), "--trust-weights", "--out", str(tmp_path)])
    assert code == 0 and marker.exists(), capsys.readouterr().err


def test_an_old_pruned_checkpoint_with_a_pickled_module_needs_the_opt_in(run, tmp_path):
    """Pruned checkpoints used to pickle their module; now they store layer widths as data."""
    ckpt = torch.load(run / "runs/train/exp/weights/best.pt", weights_only=True)
    model = seglab.load(run / "runs/train/exp/weights/best.pt").model
    old = tmp_path / "old_pruned.pt"
    torch.save({**ckpt, "module": model.cpu()}, old)
    with pytest.raises(SeglabError, match=r"pickled Python objects \(seglab\.models"):
        seglab.load(old)
    assert seglab.load(old, trust=True).predict(np.zeros((40, 40, 3), np.uint8)).mask.shape == (40, 40)


# ---------------------------------------------------------------------------------------------- what it claims


def rewritten(run: Path, tmp_path: Path, change) -> Path:
    ckpt = torch.load(run / "runs/train/exp/weights/best.pt", weights_only=True)
    change(ckpt)
    path = tmp_path / "claims.pt"
    torch.save(ckpt, path)
    return path


CLAIMS = {
    "card with an extra key": (lambda c: c["card"].update(extra=1), "unknown key(s) extra"),
    "card that is a list": (lambda c: c.update(card=[1, 2]), "no model card"),
    "card without classes": (lambda c: c["card"].pop("classes"), "missing classes"),
    "colours past 255": (lambda c: c["card"].update(colors=[[0, 0, 300]] * 3), "from 0 to 255"),
    "std of zero": (lambda c: c["card"].update(std=[0.0, 0.0, 0.0]), "positive number(s)"),
    "img_size 200000": (lambda c: c["card"].update(img_size=200000), "img_size=200000"),
    "model: None": (lambda c: c.update(model=None), "'model' entry is not a mapping"),
    "weights of another shape": (
        lambda c: c["model"].update({k: torch.zeros(1) for k in list(c["model"])[:1]}),
        "do not match the model",
    ),
    "pruned widths that are not layers": (lambda c: c.update(layers={"nowhere": [1, 2, 1]}), "not a layer"),
    "pruned widths that are not numbers": (lambda c: c.update(layers="wide"), "not a mapping of layer widths"),
    "pruned widths wider than the model": (  # 65536 x 65536 x 3 x 3 floats would be 154 GB
        lambda c: c.update(layers={"encoder.stages.0.0": [65536, 65536, 1]}),
        "a pruned layer has at most [3, 64, 1]",
    ),
}


@pytest.mark.parametrize("case", sorted(CLAIMS))
def test_what_a_checkpoint_claims_is_checked(run, tmp_path, capsys, monkeypatch, case):
    monkeypatch.chdir(tmp_path)
    change, fragment = CLAIMS[case]
    path = rewritten(run, tmp_path, change)
    with pytest.raises(SeglabError) as e:
        seglab.load(path)
    assert fragment in str(e.value) and "\n" not in str(e.value)
    assert main(["val", "--weights", str(path), "--out", str(tmp_path / "val")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and fragment in err[0], err


def test_archives_torch_save_never_writes_are_refused_before_reading(run, tmp_path):
    source = run / "runs/train/exp/weights/best.pt"
    compressed = tmp_path / "compressed.pt"
    with zipfile.ZipFile(source) as src, zipfile.ZipFile(compressed, "w", zipfile.ZIP_DEFLATED) as dst:
        for item in src.infolist():  # the same records, deflated: a zip bomb would look like this
            dst.writestr(item.filename, src.read(item))
    with pytest.raises(SeglabError, match=r"not one torch\.save writes"):
        load_checkpoint(compressed)
    big = tmp_path / "big_pickle.pt"
    torch.save({"card": {}, "model": {}, "blob": "x" * (300 << 20)}, big)  # 300 MB of pickled data
    with pytest.raises(SeglabError, match="MB of pickled data"):
        load_checkpoint(big)
    legacy = tmp_path / "legacy.pt"
    buffer = io.BytesIO()
    torch.save(torch.load(source, weights_only=True), buffer, _use_new_zipfile_serialization=False)
    legacy.write_bytes(buffer.getvalue())
    with pytest.raises(SeglabError, match=re.escape(f"cannot read checkpoint {legacy}")):
        load_checkpoint(legacy)


def test_a_checkpoint_that_is_an_image_or_empty_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name, content in [("empty.pt", b""), ("image.pt", None), ("text.pt", b"not a checkpoint")]:
        path = tmp_path / name
        if content is None:
            Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(path, format="PNG")
        else:
            path.write_bytes(content)
        assert main(["val", "--weights", str(path)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"cannot read checkpoint {path}" in err[0], err
