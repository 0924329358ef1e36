"""Run folders: where a new run writes, where a resumed one continues, and its metrics.csv.

Every command that writes a folder of results (train, gen train, val, predict, prune) names it
``<out>/<name>``, numbered ``exp``, ``exp2``, ... A resumed run continues in its own folder only
when the checkpoint sits in one (``<run>/weights/last.pt`` beside that run's ``config.yaml``);
a checkpoint found anywhere else starts a new folder, so resuming a downloaded file never writes
over somebody's files.
"""

from __future__ import annotations

import csv
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from seglab.errors import SeglabError
from seglab.files import atomic_path


def check_name(name: str, flag: str = "--name") -> str:
    """A run name is one folder name: no separators, no ``..``, so a run never lands outside --out."""
    if not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name:
        raise SeglabError(f"{flag} {name!r}: a run name is a single folder name (no '/', '..'); use --out for where")
    return name


def next_run_dir(out: str | Path, name: str, exist_ok: bool = False) -> Path:
    """``<out>/<name>``, then ``<name>2``, ``<name>3``, ... unless ``exist_ok``."""
    base = Path(out) / check_name(name)
    if exist_ok or not base.exists():
        return base
    n = 2
    while (Path(out) / f"{name}{n}").exists():
        n += 1
    return Path(out) / f"{name}{n}"


# What a resumed run may change; the rest of its config is its own.
RESUME_OVERRIDES = (
    "epochs", "time", "device", "workers", "out", "name", "trust_weights", "log_interval", "log_seconds",
)  # fmt: skip


def resume_run_dir(
    checkpoint: str | Path, saved: dict[str, Any], *, out: str | Path, name: str, log: Callable[..., Any] = print
) -> tuple[Path, bool]:
    """(the folder a resumed run writes to, whether it is the checkpoint's own run folder).

    The checkpoint's grandparent is its run folder when the file is ``<run>/weights/*.pt`` and
    ``<run>/config.yaml`` is that run's config (``saved``, apart from what a resume may change).
    Otherwise (a file in Downloads/, a folder of someone else's), or when ``out``/``name`` differ
    from the saved ones (``--out``/``--name`` given), the run goes on in a new folder
    ``<out>/<name>``, numbered, and the log says so."""
    path = Path(checkpoint).resolve()
    run = path.parent.parent
    moved = (str(out), name) != (str(saved.get("out")), saved.get("name"))
    if not moved and path.parent.name == "weights" and _same_config(run / "config.yaml", saved):
        return run, True
    new = next_run_dir(out, name)
    why = "as asked (--out/--name)" if moved else f"{checkpoint} is not inside its own run folder"
    log(f"resume: continuing in a new run folder {new}: {why}")
    return new, False


def _same_config(path: Path, saved: dict[str, Any]) -> bool:
    try:
        written = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return False
    if not isinstance(written, dict):
        return False
    keys = (set(written) | set(saved)) - {*RESUME_OVERRIDES, "resume"}
    return all(written.get(k) == _yaml_value(saved.get(k)) for k in keys)


def _yaml_value(value: Any) -> Any:
    """What ``value`` reads back as after a YAML round trip (tuples become lists)."""
    return yaml.safe_load(yaml.safe_dump(value))


def write_csv(path: Path, fields: list[str], rows: list[dict[str, Any]]) -> None:
    """metrics.csv, written whole or not at all (seglab.files.atomic_path)."""
    with atomic_path(path) as tmp, tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def restore_rows(ckpt: dict[str, Any], run_dir: Path, epochs_done: int) -> list[dict[str, Any]]:
    """The metrics rows of the epochs a checkpoint has done: its own copy, or (files from before
    checkpoints carried them) the rows of its run folder's metrics.csv that look like seglab's."""
    rows = ckpt.get("rows")
    if not (isinstance(rows, list) and all(isinstance(r, dict) for r in rows)):
        try:
            with (run_dir / "metrics.csv").open(newline="") as f:
                rows = list(csv.DictReader(f))
        except (OSError, UnicodeDecodeError, csv.Error):
            rows = []
    return [r for r in rows if 0 < _epoch(r) <= epochs_done]


def _epoch(row: dict[str, Any]) -> int:
    """The row's epoch (from 1), or 0 for a row that has none."""
    try:
        return int(row.get("epoch"))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return 0
