"""Atomic writes of files and whole directories: readers see the old one or the complete new one, never a part."""
from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO


@contextmanager
def atomic_directory(directory: str | Path) -> Iterator[Path]:
    """Yield an empty temporary directory beside `directory`; when the block ends without error, fsync its
    files and rename it to `directory` (replacing what was there). On error it is removed and `directory`
    is left as it was."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    try:
        yield tmp
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        old = None
        if directory.exists():
            old = directory.parent / f".{directory.name}.old-{os.getpid()}"
            directory.rename(old)
        tmp.rename(directory)
        if old is not None:
            shutil.rmtree(old) if old.is_dir() else old.unlink()
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


@contextmanager
def atomic_file(path: str | Path) -> Iterator[BinaryIO]:
    """Yield a binary file open on a temporary name beside `path`; when the block ends without error, fsync it
    and rename it onto `path`. On error it is removed and `path` is left as it was (streamed writes too)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_atomic(path: str | Path, write) -> Path:
    """Write through `write(file)` into a temporary file beside `path`, fsync, then rename onto `path`."""
    with atomic_file(path) as f:
        write(f)
    return Path(path)


def write_npz_atomic(path: str | Path, **arrays) -> Path:
    """np.savez `arrays` to `path` atomically (readers see the old file or the whole new one)."""
    import numpy as np

    return write_atomic(path, lambda f: np.savez(f, **arrays))


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write `text` (UTF-8) to `path` atomically."""
    return write_atomic(path, lambda f: f.write(text.encode()))
