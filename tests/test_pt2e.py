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
