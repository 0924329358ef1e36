"""Writing files so that none is ever half-written, whatever stops the writer.

A file is written under a hidden temporary name beside its target, ``.<name>.seglab-<pid>-<random><suffix>``
(the suffix kept, so loaders recognise the format while it is checked), renamed into place when it is
whole, and removed on every other way out. A writer killed outright (SIGKILL, power loss) cannot remove
its own: the next writer of the same file removes those whose process is gone.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


UMASK = _umask()  # read once: os.umask can only be read by setting it


def temporary(out: Path, *, directory: bool = False) -> Path:
    """A new hidden temporary file (or folder) beside ``out``, named after it and this process, with
    the permissions of any file the user makes (mkstemp's are 0600: weights nobody else could read)."""
    prefix = f".{out.name}.seglab-{os.getpid()}-"
    if directory:
        path = Path(tempfile.mkdtemp(prefix=prefix, dir=out.parent))
        path.chmod(0o777 & ~UMASK)
        return path
    fd, name = tempfile.mkstemp(prefix=prefix, suffix=out.suffix, dir=out.parent)
    os.fchmod(fd, 0o666 & ~UMASK)
    os.close(fd)
    return Path(name)


def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def remove_stale_temporaries(out: Path) -> None:
    """Remove the temporaries of ``out`` that a process which no longer exists left behind."""
    for path in out.parent.glob(f".{glob.escape(out.name)}.seglab-*"):
        pid = path.name[len(out.name) + len(".seglab-") + 1 :].split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            remove(path)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


@contextlib.contextmanager
def atomic_path(out: str | Path) -> Iterator[Path]:
    """A temporary path to write ``out`` to; renamed to ``out`` when the block ends normally, removed
    when it raises (a full disk, an interrupt). ``out`` appears whole or not at all."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out)
    tmp = temporary(out)
    try:
        yield tmp
        os.replace(tmp, out)
    finally:
        remove(tmp)
