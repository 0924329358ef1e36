"""Checking a TorchScript or .pt2 archive without running anything in it.

Both formats are zip archives that torch would happily use to run code: pickles (.pt2 weights,
constants and sample inputs are unpickled with ``weights_only=False``), Python source
(``guards_code`` in a .pt2 is ``exec``-ed; symbolic sizes go through ``sympy.sympify``, an ``eval``),
and graph operations that write or read files (``aten::save``, ``aten::from_file``, callable from
TorchScript code, including a ``__setstate__`` that ``torch.jit.load`` runs). ``verified_archive``
accepts only what seglab's own exports contain and returns a copy of the archive rebuilt in memory
from the checked members, so what torch reads is what was checked.
"""

from __future__ import annotations

import ast
import io
import json
import re
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from seglab.errors import SeglabError, first_line, short

METADATA_KEY = "seglab"  # ONNX metadata_props key; "seglab.json" inside TorchScript / torch.export archives
NOT_SEGLAB = "seglab loads only the files seglab export writes, and never runs code from a model file"

ALLOWED_ARGUMENTS = {  # torch.export's Argument kinds with no code, symbols or objects behind them
    "as_none", "as_tensor", "as_tensors", "as_int", "as_ints", "as_float", "as_floats", "as_string",
    "as_strings", "as_scalar_type", "as_memory_format", "as_layout", "as_device", "as_bool", "as_bools",
    "as_optional_tensors", "as_optional_tensor",
}  # fmt: skip
# The aten ops that reach the file system: those with a file name argument among torch's op schemas.
FILE_OPS = {"save", "from_file"}
# PT2E int8 graphs' rounding (seglab quantize --backend pytorch): tensor arithmetic, no files
QUANTIZE_OPS = {
    f"torch.ops.quantized_decomposed.{op}_per_{scale}.default"
    for op in ("quantize", "dequantize")
    for scale in ("tensor", "channel")
}
# torchvision's own ops that its detectors call (torch.ops.torchvision.*): tensor arithmetic, no files
TORCHVISION_OPS = (["torchvision", "nms"], ["torchvision", "roi_align"])
PT2_MEMBERS = {
    "archive_format", "archive_version", "byteorder", ".data/version", ".data/serialization_id",
    "models/model.json", "data/weights/model_weights_config.json", "data/constants/model_constants_config.json",
    "data/sample_inputs/model.pt", f"extra/{METADATA_KEY}.json",
}  # fmt: skip
PT2_TENSOR = re.compile(r"data/(weights/weight|constants/tensor)_\d+")
TORCHSCRIPT_MEMBERS = {"data.pkl", "constants.pkl", "version", "byteorder", ".data/version", ".data/serialization_id",
                       f"extra/{METADATA_KEY}.json"}  # fmt: skip
TORCHSCRIPT_TENSOR = re.compile(r"(data|constants)/\d+")
TORCHSCRIPT_DROPPED = re.compile(r"code/.*\.debug_pkl|traced_inputs\.pkl|traced_inputs/\d+")  # optional, never needed
MAX_SOURCE_BYTES = 64 << 20  # all TorchScript source together (seglab's models: 0.2 to 0.6 MB)


def verified_archive(path: Path, fmt: str) -> tuple[io.BytesIO, str | None, list | None]:
    """(the archive rebuilt in memory from its checked members, its seglab.json, the .pt2 graph's
    input shape), or one SeglabError saying what seglab's own exports never hold.

    Bounded memory: stored members cannot hold more than the file, and only TorchScript source may
    be compressed (torch deflates it), MAX_SOURCE_BYTES in all. Peak: the rebuilt copy and one member."""
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise SeglabError(f"cannot read {path}: not a valid {fmt} file ({first_line(e, 80)})") from None
    with archive:
        infos = archive.infolist()
        names = [i.filename for i in infos]
        root = names[0].split("/")[0] + "/" if names else ""
        relative = [n[len(root) :] for n in names]

        def refuse(why: str) -> SeglabError:
            return SeglabError(f"{path} {why}; {NOT_SEGLAB}")

        if not names or len(set(names)) != len(names) or not all(n.startswith(root) for n in names):
            raise refuse("is not an archive torch wrote (members repeated or outside one folder)")
        source = sum(i.file_size for i in infos if i.compress_type != zipfile.ZIP_STORED)
        if source > MAX_SOURCE_BYTES or any(
            i.compress_type != zipfile.ZIP_STORED and not (fmt == "torchscript" and n.startswith("code/"))
            for i, n in zip(infos, relative, strict=True)
        ):
            raise refuse("holds compressed data, which torch never writes there")
        if sum(i.file_size for i in infos) > path.stat().st_size + source:
            raise refuse("claims more data than the file holds")
        check = _check_program_member if fmt == "torch-export" else _check_torchscript_member
        read = _ArchiveReader(archive, root, refuse)
        rebuilt = io.BytesIO()
        try:
            with zipfile.ZipFile(rebuilt, "w", zipfile.ZIP_STORED) as out:
                for name in relative:
                    data = check(name, read)
                    if data is not None:
                        out.writestr(root + name, data)
        except (zipfile.BadZipFile, zlib.error, EOFError, OSError, RuntimeError) as e:  # bad CRC, encrypted, ...
            raise SeglabError(f"cannot read {path}: the archive is damaged ({first_line(e, 80)})") from None
        if fmt == "torch-export" and read.input_shape is None:
            raise refuse("holds no torch.export program (models/model.json)")
        if fmt == "torchscript" and "data.pkl" not in relative:
            raise refuse("holds no TorchScript module (data.pkl)")
        metadata = read.text(f"extra/{METADATA_KEY}.json")
    rebuilt.seek(0)
    return rebuilt, metadata, read.input_shape


class _ArchiveReader:
    """Reads members of one archive by their name under its root folder, keeping parsed JSON."""

    def __init__(self, archive: zipfile.ZipFile, root: str, refuse: Callable[[str], SeglabError]) -> None:
        self.archive, self.root, self.refuse = archive, root, refuse
        self.cache: dict[str, Any] = {}
        self.input_shape: list | None = None  # a .pt2 graph's, once models/model.json is checked

    def bytes(self, name: str) -> bytes:
        return self.archive.read(self.root + name)

    def text(self, name: str) -> str | None:
        try:
            return self.bytes(name).decode()
        except KeyError:
            return None
        except UnicodeDecodeError:
            raise self.refuse(f"holds {name} that is not text") from None

    def json(self, name: str) -> Any:
        if name not in self.cache:
            try:
                self.cache[name] = json.loads(self.bytes(name))
            except KeyError:
                raise self.refuse(f"holds no {name}") from None
            except (ValueError, RecursionError):
                raise self.refuse(f"holds {name} that is not valid JSON") from None
        return self.cache[name]


def _check_program_member(name: str, read: _ArchiveReader) -> bytes | None:
    """A member of a .pt2 archive, checked; torch.export's own layout, as seglab export writes it."""
    if name == "models/model.json":
        read.input_shape = _check_program(read.json(name), read)
    elif name in ("data/weights/model_weights_config.json", "data/constants/model_constants_config.json"):
        _payload_files(name, read)
    elif name == "data/sample_inputs/model.pt":
        _check_plain_pickle(name, read)
    elif PT2_TENSOR.fullmatch(name):
        kind = "weights" if name.startswith("data/weights/") else "constants"
        if name.rsplit("/", 1)[1] not in _payload_files(f"data/{kind}/model_{kind}_config.json", read):
            raise read.refuse(f"holds {name}, which its {kind} config does not list")
    elif name not in PT2_MEMBERS:
        raise read.refuse(f"holds {name}, which torch.export writes only for compiled or pickled programs")
    return read.bytes(name)


def _payload_files(name: str, read: _ArchiveReader) -> set[str]:
    """The tensor files a weights or constants config lists. Each must be raw tensor bytes: torch
    unpickles a "use_pickle" entry, and custom or opaque objects, with weights_only=False."""
    if f"{name}#files" in read.cache:
        return read.cache[f"{name}#files"]
    config = read.json(name)
    entries = config.get("config") if isinstance(config, dict) else None
    if not isinstance(entries, dict):
        raise read.refuse(f"holds {name} that is not a torch.export payload config")
    prefix = "weight_" if "/weights/" in name else "tensor_"
    files = set()
    for fqn, meta in entries.items():
        path_name = meta.get("path_name") if isinstance(meta, dict) else None
        if not isinstance(path_name, str) or not re.fullmatch(prefix + r"\d+", path_name) or meta.get("use_pickle"):
            raise read.refuse(f"holds {short(fqn)} as a pickled object, not tensor data ({name})")
        files.add(path_name)
    read.cache[f"{name}#files"] = files
    return files


def _check_plain_pickle(name: str, read: _ArchiveReader) -> None:
    """torch.export's sample inputs are a torch.save file that torch loads with weights_only=True
    first and weights_only=False if that fails: it must load with weights_only=True, from an
    uncompressed archive (no nested zip bomb)."""
    data = read.bytes(name)
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as inner:
            infos = inner.infolist()
        if any(i.compress_type != zipfile.ZIP_STORED for i in infos) or sum(i.file_size for i in infos) > len(data):
            raise ValueError("compressed or oversized")
        torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
    except Exception:
        raise read.refuse(f"holds {name} that is not plain tensor data (it could run code when loaded)") from None


def _check_program(program: Any, read: _ArchiveReader) -> list:
    """The serialised graph: no Python to run (guards_code is exec-ed by torch), no symbolic sizes
    (sympify evaluates them), only aten ops that stay inside tensors; returns its input shape."""
    try:
        graph = program["graph_module"]["graph"]
        if program.get("guards_code") or program.get("range_constraints"):
            raise read.refuse("holds guard code or symbolic sizes (Python that torch evaluates)")
        if any(graph.get(k) for k in ("sym_int_values", "sym_bool_values", "sym_float_values", "custom_obj_values")):
            raise read.refuse("holds symbolic values or custom objects (seglab's .pt2 files are fixed-shape tensors)")
        for node in graph["nodes"]:
            target = node["target"]
            op = str(target).removeprefix("torch.ops.aten.").split(".")[0]
            if target == "_operator.getitem" or target in QUANTIZE_OPS:
                continue
            if not str(target).startswith("torch.ops.aten.") or op in FILE_OPS:
                raise read.refuse(f"calls {short(target)}, which seglab's models never do (only aten tensor ops)")
        _check_arguments(program, read)
        specs = program["graph_module"]["signature"]["input_specs"]
        inputs = [spec["user_input"]["arg"] for spec in specs if "user_input" in spec]
        if len(inputs) != 1 or "as_tensor" not in inputs[0]:
            raise read.refuse("takes other inputs than one image tensor")
        return [size["as_int"] for size in graph["tensor_values"][inputs[0]["as_tensor"]["name"]]["sizes"]]
    except (KeyError, TypeError, AttributeError):
        raise read.refuse("holds a models/model.json that is not a torch.export program") from None


def _check_arguments(value: Any, read: _ArchiveReader) -> None:
    """Every argument in the program is a tensor, a number, a string or a flag, nothing else."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            for key, inner in item.items():
                if key.startswith("as_") and key not in ALLOWED_ARGUMENTS:
                    raise read.refuse(f"holds a {key} argument (symbols, objects or code)")
                if key == "as_int" and not isinstance(inner, int):
                    raise read.refuse("holds a size that is not a number")
                stack.append(inner)
        elif isinstance(item, list):
            stack.extend(item)


def _check_torchscript_member(name: str, read: _ArchiveReader) -> bytes | None:
    """A member of a TorchScript archive; returns what torch is given (None: left out)."""
    if TORCHSCRIPT_DROPPED.fullmatch(name):
        return None
    if name.startswith("code/") and name.endswith(".py"):
        data = read.bytes(name)
        _check_torchscript_code(name, data, read)
        return data
    if name not in TORCHSCRIPT_MEMBERS and not TORCHSCRIPT_TENSOR.fullmatch(name):
        raise read.refuse(f"holds {name}, which torch.jit.trace does not write")
    # data.pkl / constants.pkl: torch's C++ unpickler resolves only torch's own types and the
    # classes compiled from code/ (it cannot import Python), so the code is what needs checking.
    return read.bytes(name)


def _check_torchscript_code(name: str, data: bytes, read: _ArchiveReader) -> None:
    """TorchScript source runs no Python, but it may call any registered op, and torch.jit.load
    runs a module's ``__setstate__``: a traced seglab model's classes have only ``forward`` methods,
    and all its code calls aten and prim ops (and a detector's torchvision nms and roi_align), none
    of which touch a file. Module-level functions (what torchvision scripts inside a traced
    detector: its mask pasting loop, batched NMS) run only when a forward calls them."""
    try:
        tree = ast.parse(data.decode(), filename=name)
    except (SyntaxError, UnicodeDecodeError, ValueError, RecursionError):
        raise read.refuse(f"holds {name} that is not TorchScript source") from None
    # functions a forward may call: module-level ones and classes' forward methods, nothing else
    allowed = {id(f) for f in tree.body if isinstance(f, ast.FunctionDef)} | {
        id(f)
        for c in tree.body
        if isinstance(c, ast.ClassDef)
        for f in c.body
        if isinstance(f, ast.FunctionDef) and re.fullmatch(r"forward\d*", f.name)
    }
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and id(node) not in allowed:
            why = "code that torch.jit.load or a call would run (traced models have only forward)"
            raise read.refuse(f"defines {node.name} in {name}, {why}")
        if isinstance(node, ast.Attribute):
            chain = _dotted(node)
            if chain[:2] == ["torch", "ops"]:
                chain = chain[1:]
            # tracing writes torch.<op> and ops.aten.<op> / ops.prim.<op> (ops.torchvision.<op> in a detector)
            known = len(chain) > 2 and (chain[1] in ("aten", "prim") or chain[1:3] in TORCHVISION_OPS)
            other_ops = chain[:1] == ["ops"] and len(chain) > 2 and not known
            torch_other = chain[:1] == ["torch"] and len(chain) > 2
            if other_ops or torch_other or (chain[:1] in (["ops"], ["torch"]) and chain[-1] in FILE_OPS):
                raise read.refuse(f"calls {'.'.join(chain)} in {name}, which seglab's models never do")


def _dotted(node: ast.Attribute) -> list[str]:
    """["torch", "ops", "aten", "save"] for the expression torch.ops.aten.save."""
    parts: list[str] = []
    inner: ast.expr = node
    while isinstance(inner, ast.Attribute):
        parts.append(inner.attr)
        inner = inner.value
    return ([inner.id] if isinstance(inner, ast.Name) else []) + parts[::-1]
