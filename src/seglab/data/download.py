"""Downloading and unpacking dataset archives, with the standard library only.

``download_file(url, dest, sha256=...)`` streams ``url`` into ``dest.part`` and renames it to
``dest`` once it is whole and its SHA-256 digest matches. A transfer that breaks off is resumed
with an HTTP ``Range`` request (in the same call while it keeps making progress, or in a later
call from the ``.part`` left behind); a server that ignores ``Range`` answers 200 with the whole
file, and the download simply starts over.

``safe_extract(archive, dest)`` unpacks a zip or tar(.gz/.bz2/.xz) archive after checking every
member first: an absolute name, a name that climbs out of ``dest`` (``../evil``), a symlink or
hard link whose target lands outside ``dest`` (following the archive's own links), or a device
file makes it raise :class:`SeglabError` naming the member, before anything is written.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import posixpath
import re
import stat
import tarfile
import urllib.error
import urllib.request
import zipfile
import zlib
from pathlib import Path

from tqdm import tqdm

from seglab.errors import SeglabError

CHUNK = 1 << 20  # bytes read per loop; also the progress bar's step
USER_AGENT = "seglab (https://github.com/seglab; urllib)"  # some servers refuse urllib's default agent

__all__ = ["DownloadError", "download_file", "file_sha256", "safe_extract"]


class DownloadError(SeglabError):
    """The file could not be fetched: no connection, a timeout, an HTTP error, or a transfer cut short.

    ``reason`` is the bare cause, ``status`` the HTTP status (None when no answer came) and
    ``partial`` the ``.part`` file kept for a later resume (None unless the transfer broke off),
    so a caller that knows how the file can be placed by hand can say so.
    """

    def __init__(
        self, message: str, url: str, *, reason: str = "", status: int | None = None, partial: Path | None = None
    ) -> None:
        super().__init__(message)
        self.url, self.reason, self.status, self.partial = url, reason or message, status, partial


# --------------------------------------------------------------------------- download


def file_sha256(path: Path) -> str:
    """The SHA-256 hex digest of the file at ``path``, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def _content_range(value: str | None) -> tuple[int | None, int | None]:
    """(first byte, total size) from ``Content-Range: bytes 100-199/1000`` or ``bytes */1000``."""
    m = re.fullmatch(r"\s*bytes\s+(?:(\d+)-\d+|\*)/(\d+|\*)\s*", value or "")
    if not m:
        return None, None
    return (int(m[1]) if m[1] else None), (int(m[2]) if m[2] != "*" else None)


def _verify(path: Path, url: str, sha256: str | None) -> None:
    if sha256 is None:
        return
    actual = file_sha256(path)
    if actual != sha256.lower():
        path.unlink(missing_ok=True)
        raise SeglabError(
            f"checksum mismatch for {url}: expected sha256 {sha256.lower()}, got {actual}; the file was deleted. "
            "Run again to download it afresh; if this keeps happening, the file at that URL has changed"
        )


def _attempt(url: str, part: Path, *, timeout: float, progress: bool) -> tuple[bool, int]:
    """One HTTP request that appends to ``part`` (resuming from its size). (finished, bytes written).

    Raises DownloadError when the server cannot be reached or answers with an HTTP error;
    returns finished=False when the transfer broke off (the caller may resume it).
    """
    start = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity"}
    if start:
        headers["Range"] = f"bytes={start}-"
    request = urllib.request.Request(url, headers=headers)
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and start:  # the range starts at or past the end: is .part already whole?
            _, total = _content_range(e.headers.get("Content-Range"))
            e.close()
            if total == start:
                return True, 0
            part.unlink()  # larger than the file (or size unknown): start over
            return False, 0
        reason = f"HTTP {e.code} {e.reason}"
        raise DownloadError(f"could not download {url}: {reason}", url, reason=reason, status=e.code) from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
        reason = str(getattr(e, "reason", None) or e) or type(e).__name__
        raise DownloadError(f"could not download {url}: {reason}", url, reason=reason) from None

    with response:
        length = response.headers.get("Content-Length")
        remaining = int(length) if length and length.isdigit() else None
        if response.status == 206:
            first, total = _content_range(response.headers.get("Content-Range"))
            if first != start:  # a range we did not ask for: drop the partial file, ask for everything
                part.unlink()
                return False, 0
            mode = "ab"
        else:  # 200: the whole file, also when the server ignored our Range header
            start, total, mode = 0, remaining, "wb"
        written = 0
        with (
            open(part, mode) as f,
            tqdm(
                total=total, initial=start, unit="B", unit_scale=True, unit_divisor=1024,
                desc=part.name.removesuffix(".part"), disable=not progress, leave=False,
            ) as bar,
        ):  # fmt: skip
            try:
                while block := response.read(CHUNK):
                    f.write(block)
                    written += len(block)
                    bar.update(len(block))
            except (OSError, http.client.HTTPException):  # reset, timeout, IncompleteRead: resume later
                return False, written
    # http.client returns b"" rather than raising when the server closes early, so count the bytes.
    return remaining is None or written >= remaining, written


def download_file(
    url: str,
    dest: str | Path,
    *,
    sha256: str | None = None,
    progress: bool = True,
    timeout: float = 30,
    retries: int = 3,
) -> Path:
    """Download ``url`` to ``dest`` (resumable, verified) and return ``dest``.

    Bytes go to ``dest`` + ``.part`` first; a ``.part`` left by an earlier, interrupted call is
    continued with an HTTP Range request. A transfer that breaks off after making progress is
    resumed at once, up to ``retries`` times in one call; after that the ``.part`` is kept and
    the DownloadError says to run again. When ``sha256`` is given the finished file is
    checked; on a mismatch it is deleted and SeglabError names the URL, the expected and the
    actual digest. An existing ``dest`` is checked the same way and reused. ``timeout`` is per
    socket operation, in seconds. Raises :class:`DownloadError` (a SeglabError) when the server
    cannot be reached or answers with an HTTP error.
    """
    dest = Path(dest)
    if dest.is_file():
        _verify(dest, url, sha256)  # deletes and raises on a mismatch
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    resumes = stalls = 0
    while True:
        finished, written = _attempt(url, part, timeout=timeout, progress=progress)
        if finished:
            break
        # Broke off: resume while tries make progress; allow one more try after one that made none
        # (the partial file was dropped because the server answered a different range).
        resumes, stalls = (resumes + 1, 0) if written else (resumes, stalls + 1)
        if resumes > retries or stalls > 1:
            size = part.stat().st_size if part.exists() else 0
            reason = f"the transfer was interrupted after {size} bytes"
            raise DownloadError(
                f"the download of {url} was interrupted after {size} bytes; run again to resume it "
                f"(the partial file is {part})",
                url,
                reason=reason,
                partial=part,
            )
    _verify(part, url, sha256)
    os.replace(part, dest)
    return dest


# --------------------------------------------------------------------------- extraction


def _member_path(name: str) -> str:
    """The member's name as a normalised relative POSIX path; raises ValueError when it is unsafe."""
    unified = name.replace("\\", "/")
    if unified.startswith("/") or re.match(r"[A-Za-z]:", unified):
        raise ValueError("an absolute path")
    norm = posixpath.normpath(unified)
    if norm == ".." or norm.startswith("../"):
        raise ValueError("a path outside the target folder")
    return norm


def _walk(path: str, links: dict[str, str]) -> list[str] | None:
    """Resolve ``path`` (relative to the target folder) through the archive's own symlinks.

    The components of the resolved path, or None when it climbs above the target folder, is
    absolute, or loops. Following the links matters: ``a -> .`` and ``b -> a/..`` each look
    harmless on their own, but ``b`` resolves to the folder's parent.
    """
    path = path.replace("\\", "/")
    if path.startswith("/") or re.match(r"[A-Za-z]:", path):
        return None
    stack: list[str] = []
    todo = path.split("/")
    hops = 0
    while todo:
        part = todo.pop(0)
        if part in ("", "."):
            continue
        if part == "..":
            if not stack:
                return None
            stack.pop()
            continue
        stack.append(part)
        target = links.get("/".join(stack))
        if target is not None:
            hops += 1
            if hops > 64 or target.startswith("/") or re.match(r"[A-Za-z]:", target):
                return None
            stack.pop()  # a link's target is relative to the folder holding the link
            todo = target.replace("\\", "/").split("/") + todo
    return stack


def _check_members(archive: Path, entries: list[tuple[str, str, str | None]]) -> None:
    """entries: (name, kind, link target) with kind in file, dir, symlink, hardlink, other."""
    links: dict[str, str] = {}
    names = []
    for name, kind, target in entries:
        try:
            norm = _member_path(name)
        except ValueError as e:
            raise SeglabError(f"{archive}: refusing to extract member '{name}': {e}; nothing was extracted") from None
        names.append(norm)
        if kind == "symlink" and target is not None:
            links[norm] = target
    for (name, kind, target), norm in zip(entries, names, strict=True):
        problem = None
        if kind == "other":
            problem = "not a regular file, folder or link (a device or pipe)"
        elif kind == "symlink":
            parent = posixpath.dirname(norm)
            if _walk(parent, links) is None or _walk(posixpath.join(parent, target or ""), links) is None:
                problem = f"a symlink to '{target}', outside the target folder"
        elif kind == "hardlink":  # tar hard-link targets are relative to the archive's root
            if _walk(posixpath.dirname(norm), links) is None or _walk(target or "", links) is None:
                problem = f"a hard link to '{target}', outside the target folder"
        elif _walk(norm, links) is None:
            problem = "a path that leads outside the target folder through a symlink in the archive"
        if problem:
            raise SeglabError(f"{archive}: refusing to extract member '{name}': {problem}; nothing was extracted")


def _tar_kind(m: tarfile.TarInfo) -> str:
    if m.issym():
        return "symlink"
    if m.islnk():
        return "hardlink"
    if m.isdir():
        return "dir"
    return "file" if m.isfile() else "other"


def _extract_tar(archive: Path, dest: Path) -> list[str]:
    with tarfile.open(archive) as tf:
        members = tf.getmembers()
        _check_members(archive, [(m.name, _tar_kind(m), m.linkname or None) for m in members])
        dest.mkdir(parents=True, exist_ok=True)
        if hasattr(tarfile, "data_filter"):  # Python 3.12, and 3.10.12 / 3.11.4 on: a second line of defence
            try:
                tf.extractall(dest, members=members, filter="data")
            except tarfile.FilterError as e:
                raise SeglabError(f"{archive}: refusing to extract: {e}") from None
        else:
            tf.extractall(dest, members=members)  # every member was checked above
    return [m.name for m in members]


def _extract_zip(archive: Path, dest: Path) -> list[str]:
    with zipfile.ZipFile(archive) as zf:
        infos = zf.infolist()
        entries: list[tuple[str, str, str | None]] = []
        for info in infos:
            if stat.S_ISLNK(info.external_attr >> 16):  # zipfile writes these as small text files,
                target = zf.read(info).decode("utf-8", "replace")  # but an unpacker that honours them
                entries.append((info.filename, "symlink", target))  # would follow them: check anyway
            else:
                entries.append((info.filename, "dir" if info.is_dir() else "file", None))
        _check_members(archive, entries)
        dest.mkdir(parents=True, exist_ok=True)
        zf.extractall(dest)
    return [i.filename for i in infos]


def safe_extract(archive: str | Path, dest: str | Path) -> list[str]:
    """Unpack a zip or tar(.gz/.bz2/.xz) ``archive`` into ``dest``; return the member names.

    Every member is checked before anything is written: an absolute name, a name whose resolved
    path leaves ``dest``, a symlink or hard link pointing outside ``dest`` (links inside the
    archive are followed), or a device file raises SeglabError naming the member, and nothing is
    extracted. A corrupt or truncated archive raises SeglabError naming the file.
    """
    archive, dest = Path(archive), Path(dest)
    if not archive.is_file():
        raise SeglabError(f"archive not found: {archive}")
    name = archive.name.lower()
    # The name decides first: a tar whose last member is a zip can look like a zip to is_zipfile().
    if name.endswith(".zip"):
        kind = "zip"
    elif name.endswith((".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")):
        kind = "tar"
    else:
        kind = "zip" if zipfile.is_zipfile(archive) else "tar" if tarfile.is_tarfile(archive) else ""
    if not kind:
        raise SeglabError(f"{archive} is not a zip or tar archive; delete it and run again")
    try:
        return _extract_zip(archive, dest) if kind == "zip" else _extract_tar(archive, dest)
    except (tarfile.TarError, zipfile.BadZipFile, zlib.error, EOFError) as e:
        raise SeglabError(
            f"cannot unpack {archive} (corrupt or truncated download?): {e}; delete it and run again"
        ) from None
