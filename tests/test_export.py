"""Export (ONNX, TorchScript, torch.export), running exports, and int8 quantisation.

Every export is checked against eager PyTorch by ``seglab export`` itself; these tests check that
check, and that what comes out runs at other sizes, carries its metadata, and gives ``val`` and
``predict`` the same answers as the checkpoint.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import seglab
from seglab.deploy import export as export_module
from seglab.deploy.export import export
from seglab.deploy.runtime import load_exported, read_metadata
from seglab.engine.checkpoint import load_model
from seglab.engine.inference import normalize
from seglab.errors import SeglabError
from seglab.models import MODELS

ARCHITECTURES = [(name, None) for name in sorted(MODELS)] + [("lraspp", "efficientnet_lite0")]


def seglab_cli(*args, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "seglab", *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=600
    )


def assert_user_error(proc: subprocess.CompletedProcess, *words: str) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("seglab: error:"), proc.stderr
    for word in words:
        assert word in lines[0], lines[0]


def eager_logits(weights: Path, x: torch.Tensor) -> torch.Tensor:
    model, card, _ = load_model(weights)
    with torch.no_grad():
        return model(normalize(x, card.mean, card.std))


@pytest.mark.parametrize(("arch", "encoder"), ARCHITECTURES)
def test_onnx_export_of_every_architecture_matches_pytorch_at_any_size(make_checkpoint, tmp_path, arch, encoder):
    weights = make_checkpoint(arch, encoder)
    result = export(weights, format="onnx", out=tmp_path / "m.onnx", dynamic=True, check_images=2, log=lambda m: None)
    assert result.parity.passed and result.parity.agreement > 0.999
    module, card, meta = load_exported(result.path, torch.device("cpu"))
    assert card.classes[0] == "Sky" and card.colors[3] == (128, 64, 128) and meta["dynamic"]
    # a size and batch the export never saw, not a multiple of the output stride
    x = torch.randint(0, 256, (3, 3, 37, 50), dtype=torch.uint8)
    got = module(normalize(x, card.mean, card.std))
    expected = eager_logits(weights, x)
    assert got.shape == expected.shape == (3, 11, 37, 50)
    assert (got - expected).abs().max() < 1e-3


@pytest.mark.parametrize("fmt", ["torchscript", "torch-export"])
def test_pytorch_formats_carry_metadata_and_match(make_checkpoint, tmp_path, fmt):
    weights = make_checkpoint("unet")
    suffix = {"torchscript": ".torchscript", "torch-export": ".pt2"}[fmt]
    result = export(weights, format=fmt, out=tmp_path / f"m{suffix}", check_images=2, log=lambda m: None)
    assert result.parity.passed and result.parity.max_abs_diff < 1e-4
    meta = read_metadata(result.path)
    assert meta["format"] == fmt and meta["card"]["arch"] == "unet" and meta["input_shape"] == [1, 3, 48, 64]
    model = seglab.load(result.path)
    image = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    assert (model.predict(image).mask == seglab.load(weights).predict(image).mask).all()


def test_torchscript_dynamic_runs_at_other_sizes(make_checkpoint, tmp_path):
    weights = make_checkpoint("deeplabv3plus")
    path = export(weights, format="torchscript", out=tmp_path / "m.torchscript", dynamic=True, log=lambda m: None).path
    module, card, _ = load_exported(path, torch.device("cpu"))
    x = torch.randint(0, 256, (2, 3, 70, 41), dtype=torch.uint8)
    assert (module(normalize(x, card.mean, card.std)) - eager_logits(weights, x)).abs().max() < 1e-4


def test_half_onnx_export_runs_in_float16(make_checkpoint, tmp_path):
    weights = make_checkpoint("fcn")
    result = export(weights, format="onnx", out=tmp_path / "h.onnx", half=True, check_images=2, log=lambda m: None)
    assert result.parity.passed and result.parity.agreement >= 0.99
    module, _, meta = load_exported(result.path, torch.device("cpu"))
    assert meta["half"] and module.input_dtype == np.float16  # type: ignore[attr-defined]
    full = export(weights, format="onnx", out=tmp_path / "f.onnx", check_images=1, log=lambda m: None)
    assert result.size_mb < 0.6 * full.size_mb


def test_parity_on_real_camvid_images(make_checkpoint, tmp_path, shared_data):
    weights = make_checkpoint("lraspp", "efficientnet_lite0", img_size=480)
    result = export(
        weights, format="onnx", out=tmp_path / "m.onnx", data=shared_data / "camvid", check_images=4, log=print
    )
    assert result.parity.source == "camvid images" and result.parity.images == 4
    assert result.parity.passed and result.parity.max_abs_diff < 1e-3
    report = json.loads((tmp_path / "m.onnx.parity.json").read_text())
    assert report["agreement"] == result.parity.agreement


def test_a_failed_parity_check_writes_nothing(make_checkpoint, tmp_path, monkeypatch):
    weights = make_checkpoint("fcn")
    monkeypatch.setitem(export_module.TOLERANCE, "float32", (-1.0, 1.0))  # no difference is small enough
    with pytest.raises(SeglabError, match="does not reproduce the model"):
        export(weights, format="onnx", out=tmp_path / "out" / "m.onnx", check_images=1, log=lambda m: None)
    assert list((tmp_path / "out").iterdir()) == []


def test_val_and_predict_on_onnx_match_the_checkpoint(make_checkpoint, tmp_path, shared_data):
    camvid = shared_data / "camvid"
    weights = make_checkpoint("fcn", img_size=240)
    onnx_path = tmp_path / "m.onnx"
    assert seglab_cli("export", "--weights", weights, "--format", "onnx", "--dynamic", "--out", onnx_path,
                      "--data", camvid, cwd=tmp_path).returncode == 0  # fmt: skip
    scores = {}
    for name, w in (("pt", weights), ("onnx", onnx_path)):
        proc = seglab_cli("val", "--weights", w, "--data", camvid, "--limit", "6", "--out", tmp_path / name,
                          "--workers", "0", cwd=tmp_path)  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        scores[name] = json.loads((tmp_path / name / "metrics.json").read_text())
    assert abs(scores["pt"]["miou"] - scores["onnx"]["miou"]) < 1e-4
    assert abs(scores["pt"]["pixel_accuracy"] - scores["onnx"]["pixel_accuracy"]) < 1e-4

    image = sorted((camvid / "val").glob("*.png"))[0]
    for name, w in (("pt", weights), ("onnx", onnx_path)):
        proc = seglab_cli(
            "predict", "--weights", w, "--source", image, "--out", tmp_path / f"pred_{name}", cwd=tmp_path
        )
        assert proc.returncode == 0, proc.stderr
    from PIL import Image

    masks = [np.asarray(Image.open(tmp_path / f"pred_{n}" / "masks" / f"{image.stem}.png")) for n in ("pt", "onnx")]
    assert (masks[0] == masks[1]).mean() > 0.999


def test_fixed_size_onnx_letterboxes_other_sizes_and_batches(make_checkpoint, tmp_path):
    weights = make_checkpoint("fcn")
    path = export(weights, format="onnx", out=tmp_path / "m.onnx", log=lambda m: None).path  # 1x3x48x64 only
    model, reference = seglab.load(path), seglab.load(weights)
    image = np.random.default_rng(0).integers(0, 256, (30, 64, 3), dtype=np.uint8)  # padded to 48x64 inside
    # both pad it to 64x64 in the end; ONNX Runtime and torch may break a near-tie differently
    assert (model.predict(image).mask == reference.predict(image).mask).mean() > 0.999
    batch = [np.random.default_rng(i).integers(0, 256, (48, 64, 3), dtype=np.uint8) for i in range(3)]
    one_at_a_time = [model.predict(x).mask for x in batch]  # a fixed batch of 1 is fed one image at a time
    assert all((r.mask == m).all() for r, m in zip(model.predict(batch, batch=3), one_at_a_time, strict=True))


def test_export_and_load_errors_are_one_line(make_checkpoint, tmp_path):
    weights = make_checkpoint("fcn")
    assert_user_error(seglab_cli("export", "--weights", tmp_path / "nope.pt", "--format", "onnx", cwd=tmp_path),
                      "nope.pt")  # fmt: skip
    assert_user_error(seglab_cli("export", "--weights", weights, "--format", "coreml", cwd=tmp_path), "--format")
    assert_user_error(
        seglab_cli("export", "--weights", weights, "--format", "onnx", "--out", tmp_path / "m.pt", cwd=tmp_path),
        "--out",
        ".onnx",
    )
    assert_user_error(
        seglab_cli("export", "--weights", weights, "--format", "torch-export", "--dynamic", cwd=tmp_path), "--dynamic"
    )
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"\x08\x07not a protobuf at all" * 10)
    assert_user_error(seglab_cli("predict", "--weights", broken, "--source", broken, cwd=tmp_path), "broken.onnx")
    plain = tmp_path / "plain.onnx"  # a valid ONNX model that seglab did not write
    torch.onnx.export(torch.nn.Conv2d(3, 2, 1), (torch.zeros(1, 3, 8, 8),), str(plain), dynamo=False)
    assert_user_error(seglab_cli("val", "--weights", plain, cwd=tmp_path), "plain.onnx", "seglab export")
    onnx_path = export(weights, format="onnx", out=tmp_path / "m.onnx", log=lambda m: None).path
    assert_user_error(seglab_cli("val", "--weights", onnx_path, "--amp", cwd=tmp_path), "--amp")


# ---------------------------------------------------------------------------------------------- quantise


def test_int8_quantisation_keeps_shape_arithmetic_in_float(make_checkpoint, tmp_path, shared_data):
    """The Lite encoder pads by an amount it computes from the input size at run time; the
    quantiser must leave that arithmetic alone, or features stop lining up (2.6 mIoU lost)."""
    import onnx

    from seglab.deploy.quantize import _shape_arithmetic, quantize

    weights = make_checkpoint("lraspp", "efficientnet_lite0", img_size=96)
    float_onnx = export(weights, format="onnx", out=tmp_path / "f.onnx", dynamic=True, log=lambda m: None).path
    result = quantize(float_onnx, data=shared_data / "camvid", calib=4, limit=3, out=tmp_path / "q.onnx", log=print)
    meta = read_metadata(result.int8_model)
    assert meta["quantized"]["weights"] == "int8 per channel" and meta["card"]["classes"][0] == "Sky"
    assert result.int8_model.stat().st_size < 0.4 * float_onnx.stat().st_size

    shape_nodes = set(_shape_arithmetic(onnx.load(str(float_onnx)).graph))
    assert any("Ceil" in n or "Div" in n for n in shape_nodes)  # the padding arithmetic is there
    graph = onnx.load(str(result.int8_model)).graph
    sizes = {out for n in graph.node if n.name in shape_nodes for out in n.output}
    assert not [n.name for n in graph.node if n.op_type == "QuantizeLinear" and n.input[0] in sizes]
    assert sum(n.op_type == "QuantizeLinear" for n in graph.node) > 20  # and the convolutions are int8

    # the int8 model runs at a size that is not a multiple of the stride, at the float model's size
    x = torch.randn(2, 3, 50, 70)
    f, q = (load_exported(p, torch.device("cpu"))[0] for p in (float_onnx, result.int8_model))
    assert f(x).shape == q(x).shape == (2, 11, 50, 70)

    report = json.loads((tmp_path / "q_report" / "report.json").read_text())
    assert [r["name"] for r in report["rows"]] == ["float32 (ONNX Runtime)", "int8 (ONNX Runtime)"]
    assert all(r["latency_ms"] > 0 and r["throughput"] > 0 and r["miou"] is not None for r in report["rows"])
    assert "| int8 (ONNX Runtime) |" in (tmp_path / "q_report" / "report.md").read_text()


def test_quantize_errors_are_one_line(make_checkpoint, tmp_path):
    weights = make_checkpoint("fcn")
    assert_user_error(seglab_cli("quantize", "--weights", weights, "--calib", "0", cwd=tmp_path), "--calib")
    assert_user_error(seglab_cli("quantize", "--weights", weights, "--out", tmp_path / "q.pt", cwd=tmp_path), ".onnx")
    assert_user_error(seglab_cli("quantize", "--weights", weights, cwd=tmp_path), "--data")  # no data to calibrate on
    assert not list(tmp_path.glob("*.int8.onnx"))
