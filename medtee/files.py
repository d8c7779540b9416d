"""Writing files so that a reader sees the old content or the new, never half of either; reading files a user
names without blocking on a FIFO or reading a device without end; hashing files; finding the YAML anchors and
aliases that let a small file expand without bound."""

from __future__ import annotations

import hashlib
import os
import stat
import tempfile
from pathlib import Path
from typing import BinaryIO


class NotRegularFile(ValueError):
    """A path names a directory, FIFO, device (or a link to one), or a file over the reader's size limit."""


def not_a_file(path: Path | str) -> str:
    """Why `path` is no regular file, for a message after "KEY=PATH ": it does not exist (a typo, another working
    directory) or it is something else (a directory, FIFO, device, or a link to nothing)."""
    if not os.path.lexists(path):
        return "does not exist"
    return "is not a regular file (a directory, FIFO, device or a broken link)"


def open_regular(path: Path | str) -> tuple[BinaryIO, int]:
    """`path` open for reading, and its size, if it is a regular file (a link to one is followed); opening never
    blocks on a FIFO. FileNotFoundError if absent, NotRegularFile otherwise, OSError if it cannot be opened."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise NotRegularFile("is not a regular file (a directory, FIFO, device or a link to one)")
    return os.fdopen(fd, "rb"), info.st_size


def read_regular(path: Path | str, max_bytes: int) -> bytes:
    """The content of the regular file `path` (see `open_regular`), refused (NotRegularFile) over `max_bytes`."""
    f, size = open_regular(path)
    with f:
        if size > max_bytes:
            raise NotRegularFile(f"has {size} bytes; at most {max_bytes} are allowed")
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:  # it grew while being read
        raise NotRegularFile(f"grew while being read; at most {max_bytes} bytes are allowed")
    return data


def _temporary_sibling(path: Path, data: bytes, mode: int) -> Path:
    """A unique temporary sibling of `path` holding `data` (created with `mode`), fsynced."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return Path(tmp)


def write_atomic(path: Path | str, data: bytes, *, mode: int = 0o644, sync_dir: bool = False) -> None:
    """Write `data` to a unique temporary sibling (created with `mode`), fsync it, then rename it over `path`; with
    `sync_dir`, fsync the directory too, so that the rename itself survives a power loss."""
    path = Path(path)
    tmp = _temporary_sibling(path, data, mode)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if sync_dir:
        fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_new(path: Path | str, data: bytes, *, mode: int = 0o644) -> None:
    """Create `path` holding `data`, atomically: a reader sees no file or all of it (a temporary sibling, fsynced,
    then linked into place). FileExistsError when `path` exists: it is never overwritten."""
    path = Path(path)
    tmp = _temporary_sibling(path, data, mode)
    try:
        os.link(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def sha256_file(path: Path | str) -> str:
    """Hex sha256 of a regular file's content (NotRegularFile for a FIFO, device or directory, whose reading could
    block or never end), read in blocks (hashlib releases the GIL, so threads hash in parallel)."""
    digest = hashlib.sha256()
    f, _ = open_regular(path)
    with f:
        while block := f.read(1 << 24):
            digest.update(block)
    return digest.hexdigest()


def yaml_alias_line(text: str | bytes) -> int | None:
    """The 1-based line of the first YAML anchor or alias in `text` (they let a few hundred bytes expand without
    bound: "billion laughs"), or None. yaml.YAMLError when `text` is not YAML."""
    import yaml

    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None):
            return event.start_mark.line + 1
    return None
