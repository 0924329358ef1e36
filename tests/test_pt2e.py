"""``seglab quantize --backend pytorch``: PT2E int8, saved as .pt2, loaded compiled by every command."""

from __future__ import annotations

import json
import zipfile

import numpy as np
import pytest
from PIL import Image

import seglab
from seglab.deploy.archive import QUANTIZE_OPS
from seglab.deploy.export import export
from seglab.deploy.pt2e import CompiledInt8
from seglab.deploy.quantize import quantize
from seglab.deploy.runtime import read_metadata
from test_export import assert_user_error, seglab_cli

pytest.importorskip("torchao", reason="the int8 extra (torchao) is not installed")


def graph_ops(path) -> set[str]:
    with zipfile.ZipFile(path) as archive:
        name = next(n for n in archive.namelist() if n.endswith("models/model.json"))
        program = json.loads(archive.read(name))
    return {node["target"] for node in program["graph_module"]["graph"]["nodes"]}


def test_pt2e_int8_is_checked_saved_small_and_runs_compiled(make_checkpoint, tmp_path, shared_data):
    weights = make_checkpoint("lraspp", "efficientnet_lite0", img_size=96)
    out = tmp_path / "m.int8.pt2"
    result = quantize(weights, backend="pytorch", data=shared_data / "camvid", calib=4, out=out, report=False)
    assert result.int8_model == out and not list(tmp_path.glob(".m.int8.pt2*"))  # no temporary left

    meta = read_metadata(out)
    assert meta["quantized"]["backend"] == "pytorch" and meta["input_shape"] == [1, 3, 72, 96]
    ops = graph_ops(out)
    assert QUANTIZE_OPS & ops and "torch.ops.aten.conv2d.default" in ops  # int8 around the convolutions
    assert out.stat().st_size < 0.6 * weights.stat().st_size  # int8 weights, and no float copies beside them

    model = seglab.load(out, device="cpu")
    assert isinstance(model.model.module, CompiledInt8)
    image = np.asarray(Image.open(next((shared_data / "camvid" / "val").glob("*.png"))).resize((96, 72)))
    int8, ref = model.predict(image), seglab.load(weights, device="cpu").predict(image)
    assert int8.mask.shape == image.shape[:2]
    assert (int8.mask == ref.mask).mean() > 0.8  # what the quantiser checks on the parity images


def test_pt2e_errors_are_one_line(make_checkpoint, tmp_path, shared_data):
    weights = make_checkpoint("fcn")
    camvid = shared_data / "camvid"
    assert_user_error(
        seglab_cli("quantize", "--weights", weights, "--backend", "pytorch", "--method", "entropy", cwd=tmp_path),
        "--method",
        "ONNX Runtime",
    )
    assert_user_error(
        seglab_cli(
            "quantize", "--weights", weights, "--backend", "pytorch", "--out", tmp_path / "q.onnx", cwd=tmp_path
        ),
        ".pt2",
    )
    onnx_file = export(weights, format="onnx", out=tmp_path / "m.onnx", log=lambda m: None).path
    assert_user_error(
        seglab_cli("quantize", "--weights", onnx_file, "--backend", "pytorch", "--data", camvid, cwd=tmp_path),
        "checkpoint",
    )
    assert not list(tmp_path.glob("*.pt2"))


@pytest.fixture
def small_camvid(tmp_path, shared_data):
    """CamVid's layout with its first 12 train and 4 val images (the folders linked, the lists cut)."""
    root = tmp_path / "camvid_small"
    root.mkdir()
    for folder in ("train", "trainannot", "val", "valannot"):
        (root / folder).symlink_to(shared_data / "camvid" / folder)
    for split, count in (("train", 12), ("val", 4)):
        lines = (shared_data / "camvid" / f"{split}.txt").read_text().splitlines()[:count]
        (root / f"{split}.txt").write_text("\n".join(lines) + "\n")
    return root


def test_qat_trains_in_the_trainer_and_writes_an_int8_graph(make_checkpoint, small_camvid, tmp_path, monkeypatch):
    import torch

    from seglab.engine.checkpoint import load_checkpoint, load_model
    from seglab.errors import SeglabError

    monkeypatch.chdir(tmp_path)  # the run folder goes under runs/qat/
    weights = make_checkpoint("lraspp", "efficientnet_lite0", img_size=96)
    out = tmp_path / "m.qat.pt2"
    quantize(weights, qat=True, backend="pytorch", epochs=1, lr=1e-3, data=small_camvid, out=out, report=False)

    meta = read_metadata(out)
    assert "quantisation-aware training" in meta["quantized"]["calibration"] and meta["input_shape"] == [1, 3, 72, 96]
    assert QUANTIZE_OPS & graph_ops(out)

    (run,) = (tmp_path / "runs" / "qat").iterdir()
    rows = (run / "metrics.csv").read_text().splitlines()
    assert len(rows) == 2 and rows[1].startswith("1,")  # one epoch trained and validated by the trainer
    trained = load_checkpoint(run / "weights" / "best.pt")
    assert trained["qat"] and any("activation_post_process" in k for k in trained["model"])  # fake quantisation
    before = load_checkpoint(weights)["model"]["encoder.stages.0.conv_stem.weight"]
    assert not torch.equal(trained["model"]["graph.encoder.stages.0.conv_stem.weight"], before)  # it learned
    with pytest.raises(SeglabError, match="quantisation-aware training"):
        load_model(run / "weights" / "best.pt")  # a fake-quantised graph, not a model

    model = seglab.load(out, device="cpu")
    image = np.asarray(Image.open(next((small_camvid / "val").glob("*.png"))).resize((96, 72)))
    assert model.predict(image).mask.shape == image.shape[:2]


def test_qat_errors_are_one_line(make_checkpoint, tmp_path):
    weights = make_checkpoint("fcn")
    onnxruntime = seglab_cli("quantize", "--weights", weights, "--qat", "--backend", "onnxruntime", cwd=tmp_path)
    assert_user_error(onnxruntime, "--backend pytorch")
    assert_user_error(seglab_cli("quantize", "--weights", weights, "--qat", "--epochs", "0", cwd=tmp_path), "--epochs")
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow  # three exports of the graph and two trainer runs: about three minutes
def test_a_stopped_qat_continues_from_its_last_pt(make_checkpoint, small_camvid, tmp_path):
    import os
    import re
    import signal
    import subprocess
    import sys

    import torch

    weights = make_checkpoint("lraspp", "efficientnet_lite0", img_size=96)
    out = tmp_path / "m.qat.pt2"
    args = ["quantize", "--weights", str(weights), "--qat", "--epochs", "2", "--lr", "1e-3", "--data",
            str(small_camvid), "--out", str(out), "--no-report"]  # fmt: skip
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "seglab", *args], cwd=tmp_path, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
    assert proc.stdout is not None
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if "run folder" in line:
            proc.send_signal(signal.SIGTERM)  # saved after the step it lands in
            break
    output = "".join(seen) + proc.communicate(timeout=600)[0]
    assert proc.returncode == 128 + signal.SIGTERM, output[-3000:]
    assert not out.exists() and "nothing written" in output
    # the stop line names the command that continues it: quantize with the same weights, not train
    hint = re.search(r"continue with: seglab (quantize --weights \S+ --qat --resume (\S+last\.pt))", output)
    assert hint is not None, output[-3000:]
    last_pt = tmp_path / hint.group(2)
    last = torch.load(last_pt, weights_only=True)
    assert last["qat"] and (last["epoch"], last["batch_in_epoch"]) < (2, 0)

    resumed = subprocess.run([sys.executable, "-m", "seglab", *hint.group(1).split(), "--out", str(out),
                              "--no-report"], cwd=tmp_path, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "resume: continuing" in resumed.stdout
    rows = (last_pt.parents[1] / "metrics.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["1", "2"]  # the run's own 2 epochs, each once
    assert QUANTIZE_OPS & graph_ops(out) and "2 epoch" in read_metadata(out)["quantized"]["calibration"]

    # --resume is QAT's, and only a QAT run's last.pt is taken
    assert_user_error(seglab_cli("quantize", "--weights", weights, "--resume", last_pt, cwd=tmp_path), "--qat")
    assert_user_error(seglab_cli("quantize", "--weights", weights, "--qat", "--resume", weights, cwd=tmp_path),
                      weights.name)  # fmt: skip
