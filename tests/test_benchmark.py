"""``seglab benchmark``: every format exported, checked, timed and scored in one run, on CamVid images."""

from __future__ import annotations

import json

import pytest

from test_export import assert_user_error, seglab_cli

FORMATS = ["pytorch", "pytorch-amp", "onnx", "torchscript", "torch-export", "onnx-int8", "pytorch-int8"]
FILES = {"onnx": "model.onnx", "torchscript": "model.torchscript", "torch-export": "model.pt2",
         "onnx-int8": "model.int8.onnx", "pytorch-int8": "model.int8.pt2"}  # fmt: skip


@pytest.mark.parametrize(
    "formats",
    [
        # PT2E int8 (a minute of quantising and compiling) is tested by test_pt2e.py
        pytest.param(FORMATS[:-1], id="without-pytorch-int8"),
        pytest.param(FORMATS, marks=pytest.mark.slow, id="every-format"),
    ],
)
def test_every_format_is_exported_checked_timed_and_scored(make_checkpoint, tmp_path, shared_data, formats):
    weights = make_checkpoint("lraspp", img_size=64)
    out, table = tmp_path / "bench", tmp_path / "table.json"
    every = [] if formats == FORMATS else ["--formats", *formats]  # the default is every format
    proc = seglab_cli(
        "benchmark", "--weights", weights, "--data", shared_data / "camvid", "--limit", 4, "--rounds", 2,
        "--calib", 4, "--out", out, "--json", table, *every, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((out / "benchmark.json").read_text())["rows"]
    assert json.loads(table.read_text())["rows"] == rows
    assert [r["format"] for r in rows] == formats
    assert all(r["error"] is None and r["latency_ms"] > 0 and r["throughput"] > 0 for r in rows)
    for fmt in formats:
        assert fmt not in FILES or (out / FILES[fmt]).is_file(), fmt

    # each float export was checked against eager PyTorch, and scores what PyTorch scores
    by = {r["format"]: r for r in rows}
    for fmt in ("onnx", "torchscript", "torch-export"):
        assert "argmax" in by[fmt]["parity"] and by[fmt]["miou"] == pytest.approx(by["pytorch"]["miou"], abs=0.05)
    assert by["onnx-int8"]["size_mb"] < 0.4 * by["onnx"]["size_mb"]
    if "pytorch-int8" in by:
        assert by["pytorch-int8"]["size_mb"] < 0.7 * by["torch-export"]["size_mb"]

    # one fastest row, the one with the lowest batch-1 latency, marked in the printed table
    fastest = [r for r in rows if r["fastest"]]
    assert len(fastest) == 1 and fastest[0]["latency_ms"] == min(r["latency_ms"] for r in rows)
    assert f"| {fastest[0]['format']} * |" in proc.stdout
    assert (out / "benchmark.md").read_text() in proc.stdout


def test_benchmark_refuses_bad_input_in_one_line_and_writes_nothing(make_checkpoint, tmp_path, shared_data):
    weights = make_checkpoint("fcn", img_size=64)
    camvid = shared_data / "camvid"
    assert_user_error(seglab_cli("benchmark", "--weights", tmp_path / "no.pt", cwd=tmp_path), "no.pt", "not found")
    assert_user_error(
        seglab_cli("benchmark", "--weights", weights, "--formats", "onnx", "tflite", cwd=tmp_path),
        "tflite",
        "onnx-int8",
    )
    assert_user_error(seglab_cli("benchmark", "--weights", weights, "--rounds", 0, cwd=tmp_path), "--rounds")
    assert_user_error(seglab_cli("benchmark", "--weights", weights, cwd=tmp_path), "--data")  # trained on nothing known
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    assert_user_error(seglab_cli("benchmark", "--weights", weights, "--out", full, cwd=tmp_path), "not an empty folder")
    assert [p.name for p in full.iterdir()] == ["keep.txt"]
    onnx = weights.with_suffix(".onnx")
    onnx.write_bytes(b"not a model")
    assert_user_error(seglab_cli("benchmark", "--weights", onnx, "--data", camvid, cwd=tmp_path), "is an export")
    assert not (tmp_path / "runs").exists()
