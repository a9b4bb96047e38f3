"""A store's shard files side by side in one stretch of address space, mapped without file descriptors.

`np.load(path, mmap_mode="r")` keeps one file descriptor per array for the life of the map (Python's
`mmap.mmap` duplicates the descriptor it is given; `trackfd=False` exists only from Python 3.13), so a
reader of a many-shard store runs into the descriptor limit (`ulimit -n`, often 1024) in every DataLoader
worker, and a batch that touches m shards costs m numpy calls. Here:

- every file gets a fixed slot in one reserved stretch of virtual address space (PROT_NONE: no memory, no
  commit charge) and is mapped into its slot on first use with libc's mmap (PROT_READ, MAP_SHARED,
  MAP_FIXED: the page cache's own pages, read-only); its descriptor is closed at once (POSIX mappings
  outlive their descriptors), so no descriptor is held whatever the number of files;
- a slot's size is a multiple of one row's bytes, so all files read as one (slots * rows per slot, row)
  array and a gather over any number of files is one `np.take`;
- at most `capacity` files stay mapped: the least recently read is unmapped first (its slot is reserved
  PROT_NONE again). Files a read touches stay mapped until that read is done.
POSIX only (Linux, macOS). The reservation counts against `ulimit -v` like mapping every file would.
"""
from __future__ import annotations

import ctypes
import math
import mmap
import os
import threading
import weakref
from pathlib import Path
from typing import Sequence

import numpy as np

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
PROT_NONE, MAP_FIXED = 0, 0x10  # the same on Linux and macOS; Python 3.11's mmap module lacks both
MAP_FAILED = ctypes.c_void_p(-1).value


def _mmap(addr: int | None, length: int, prot: int, flags: int, fd: int) -> int:
    out = _libc.mmap(addr, length, prot, flags, fd, 0)
    if out in (None, MAP_FAILED):
        err = ctypes.get_errno()
        raise OSError(err, f"mmap: {os.strerror(err)}")
    return out


def npy_header(path: str | Path) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, dtype, byte offset of the data) of a .npy file; ValueError when it is not a C-order .npy
    array of plain numbers."""
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran_order, dtype = read(f)
        if fortran_order or dtype.hasobject:
            raise ValueError("not a C-order array of plain numbers")
        return shape, dtype, f.tell()


class MappedFiles:
    """.npy files of one dtype and header size, file k holding `rows[k]` rows of `row_elems` elements, read as rows
    (`take`). A file is checked when it is mapped: ValueError naming it when it does not hold exactly that."""

    def __init__(self, paths: Sequence[str | Path], rows: Sequence[int], row_elems: int, capacity: int):
        if capacity < 1:
            raise ValueError(f"capacity={capacity} must be at least 1")
        self.paths, self.rows, self.row_elems, self.capacity = [Path(p) for p in paths], list(rows), row_elems, capacity
        _, self.dtype, self.offset = npy_header(self.paths[0])  # every file must have this header size
        row_bytes = row_elems * self.dtype.itemsize
        unit = math.lcm(mmap.PAGESIZE, row_bytes)  # slots start on pages and on row boundaries
        self.slot_bytes = unit * -(-(self.offset + max(self.rows) * row_bytes) // unit)
        self.slot_rows = self.slot_bytes // row_bytes
        count = len(self.paths)
        self.base = _mmap(None, count * self.slot_bytes, PROT_NONE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1)
        buffer = (ctypes.c_char * (count * self.slot_bytes)).from_address(self.base)
        weakref.finalize(buffer, _libc.munmap, self.base, count * self.slot_bytes)  # with the last view of it
        # Row r of file k is row k * slot_rows + r of this read-only (total_rows, row_elems) view.
        total_rows = (count * self.slot_bytes - self.offset) // row_bytes
        self.array = np.frombuffer(buffer, self.dtype, total_rows * row_elems, self.offset).reshape(total_rows, -1)
        self.array.flags.writeable = False
        self.is_mapped = np.zeros(count, dtype=bool)  # (count,)
        self.num_mapped = 0
        self.last_read = np.zeros(count, dtype=np.int64)  # (count,) the read that last touched each file
        self.reads = 0
        self.lock = threading.Lock()  # a read's files must stay mapped until its take is done

    def _map(self, k: int) -> None:
        path = self.paths[k]
        shape, dtype, offset = npy_header(path)
        nbytes = int(np.prod(shape)) * dtype.itemsize
        if dtype != self.dtype or offset != self.offset or nbytes != self.rows[k] * self.row_elems * dtype.itemsize:
            raise ValueError(f"{path}: {dtype} {shape} with a {offset}-byte header; expected {self.rows[k]} rows of "
                             f"{self.row_elems} {self.dtype} after a {self.offset}-byte header")
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_size < offset + nbytes:
                raise ValueError(f"{path}: shorter than its header says (truncated)")
            _mmap(self.base + k * self.slot_bytes, offset + nbytes, mmap.PROT_READ, mmap.MAP_SHARED | MAP_FIXED,
                  f.fileno())
        self.is_mapped[k] = True
        self.num_mapped += 1

    def _unmap(self, k: int) -> None:
        _mmap(self.base + k * self.slot_bytes, self.slot_bytes, PROT_NONE,
              mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_FIXED, -1)
        self.is_mapped[k] = False
        self.num_mapped -= 1

    def take(self, files: np.ndarray, rows: np.ndarray, out: np.ndarray) -> np.ndarray:
        """out[i, j] = row rows[i, j] of file files[i]: files (n,) int64, rows (n, P) int64, out (n, P, row_elems)
        preallocated. Unchecked, for speed: every file must lie in [0, len(paths)) and each row in [0, rows[file])
        (TrajectoryStore.read checks its indices); another row reads unmapped memory."""
        with self.lock:
            self.reads += 1
            self.last_read[files] = self.reads
            if not self.is_mapped[files].all():
                for k in np.unique(files[~self.is_mapped[files]]).tolist():
                    self._map(k)
            if self.num_mapped > self.capacity:  # unmap the least recently read files, never one this read needs
                idle = np.flatnonzero(self.is_mapped & (self.last_read < self.reads))
                for k in idle[np.argsort(self.last_read[idle], kind="stable")][:self.num_mapped - self.capacity]:
                    self._unmap(int(k))
            flat = (files * self.slot_rows)[:, None] + rows  # (n, P) rows of self.array
            # mode="clip" is unbuffered (mode="raise" copies through a buffer); the caller checked every row.
            return self.array.take(flat, axis=0, out=out, mode="clip")  # (n, P, row_elems)
