"""Atomic writes: a killed process leaves the old file (or directory) or the new one, never half
of one."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

# mkstemp creates 0600 files; outputs should get the permissions any other new file gets.
_UMASK = os.umask(0)
os.umask(_UMASK)
MODE = 0o666 & ~_UMASK


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, MODE)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return path


def write_text(path: str | os.PathLike, text: str) -> Path:
    return write_bytes(path, text.encode())


def write_json(path: str | os.PathLike, obj) -> Path:
    return write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def write_csv(path: str | os.PathLike, rows: list[dict]) -> Path:
    """Rows with the union of their keys as columns, in first-seen order."""
    columns = list(dict.fromkeys(k for row in rows for k in row))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return write_text(path, buf.getvalue())


@contextlib.contextmanager
def replacing(path: str | os.PathLike) -> Iterator[Path]:
    """A scratch path beside `path` to write a file or a whole directory to; when the block ends
    without error, it takes `path`'s place by renames (the old one is removed only then), so a
    killed writer leaves the old one, the new one or, between the two renames of a directory,
    none; never a mix. An error leaves the old one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    new, old = scratch / "new", scratch / "old"
    try:
        yield new
        if path.is_dir() and not path.is_symlink():
            path.rename(old)
        os.replace(new, path)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
