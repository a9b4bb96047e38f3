"""One writer per directory: an exclusive lock that the kernel drops when its holder dies.

`ard fit` locks its run directory (trainer.default_root_dir) and a precompute its store (data.path) before any
expensive work, so that a second process started on the same directory stops at once with one line naming the
first (pid, host, command line, since when) instead of interleaving checkpoints, logs or shards with it.

The lock is `fcntl.flock` on `<dir>/.ard.lock` (LOCK_NAME; the store's directory check ignores that name). The
kernel releases a flock when the last descriptor of its holder closes, however the process ends, so the file left
behind by a killed run blocks nothing: the next run locks it and writes its own details into it. The holder
deletes the file when it is done. Only the global-rank-0 process of a multi-process job takes the lock: the other
ranks belong to the same run.
"""
from __future__ import annotations

import fcntl
import json
import os
import shlex
import socket
import sys
import time
from pathlib import Path

from ard.checks import check_writable

LOCK_NAME = ".ard.lock"
# Set by launchers for the processes of one job: Lightning's DDP relaunch (LOCAL_RANK, NODE_RANK), torchrun (RANK),
# SLURM (SLURM_PROCID), LSF (JSM_NAMESPACE_RANK).
RANK_VARIABLES = ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK")


def is_global_rank_zero() -> bool:
    """Whether this process is its job's global rank 0, from the launchers' environment (known before a Trainer
    exists): every rank variable that is set is 0."""
    return all(os.environ.get(name, "0").strip() == "0" for name in RANK_VARIABLES)


class DirectoryLock:
    """The exclusive writer lock of `directory` (created when missing, removed again on release if still empty).

    `acquire` raises a one-line ValueError naming the live holder; `release` deletes the lock file. A process
    that opened the file just before its holder deleted it would lock a file no longer in the directory, so
    `acquire` keeps a lock only when the path still names the file it locked."""

    def __init__(self, directory: str | Path, what: str):
        """
        Args:
            directory: the directory to lock.
            what: the setting that names it (e.g. "trainer.default_root_dir"), for the error message.
        """
        self.directory = Path(directory)
        self.what = what
        self.path = self.directory / LOCK_NAME
        self._fd: int | None = None
        self._made: list[Path] = []  # directories that acquire created, deepest first

    def acquire(self) -> DirectoryLock:
        """Take the lock (making the directory when missing) and write this process's pid, host, command line and
        time into the lock file; a one-line ValueError when a live process holds it or the directory is unusable."""
        if self.directory.exists() and not self.directory.is_dir():
            raise ValueError(f"{self.what}={self.directory}: output path exists and is not a directory")
        check_writable(self.directory, self.what)  # one line when it cannot be created or written
        self._made = [p for p in (self.directory, *self.directory.parents) if not p.exists()]
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            while self._fd is None:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    holder = _read_holder(fd)
                    os.close(fd)
                    raise ValueError(self._held_message(holder)) from None
                if _names(self.path, fd):
                    self._fd = fd
                else:  # its holder deleted it between our open and our flock: lock the file there now
                    os.close(fd)
            holder = {"pid": os.getpid(), "host": socket.gethostname(), "command": shlex.join(sys.orig_argv),
                      "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, json.dumps(holder).encode(), 0)
        except OSError as e:
            self.release()
            raise ValueError(f"{self.what}={self.directory}: cannot lock it for writing ({self.path}: "
                             f"{e.strerror or type(e).__name__})") from None
        except ValueError:
            self._remove_made()
            raise
        return self

    def release(self) -> None:
        """Delete the lock file (while still holding it), unlock, and remove the directories acquire created if
        they are empty. Does nothing when the lock is not held."""
        if self._fd is not None:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
            os.close(self._fd)
            self._fd = None
        self._remove_made()

    def _remove_made(self) -> None:
        for directory in self._made:
            try:
                directory.rmdir()
            except OSError:  # not empty (the run wrote there) or already gone
                break
        self._made = []

    def _held_message(self, holder: dict | None) -> str:
        where = f"{self.what}={self.directory}: another process is writing there"
        if holder is None:
            return f"{where} (its lock {self.path} holds no details yet); wait for it to end or stop it"
        command = str(holder.get("command", "?")).replace("\n", " ")
        return (f"{where}: pid {holder.get('pid')} on {holder.get('host')}, running `{command}` since "
                f"{holder.get('since')} (lock {self.path}); wait for it to end or stop it")


def _names(path: Path, fd: int) -> bool:
    """Whether `path` is the file open as `fd` (same device and inode)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)


def _read_holder(fd: int) -> dict | None:
    """The holder's details from the lock file (None while it has not written them yet)."""
    try:
        holder = json.loads(os.pread(fd, 1 << 16, 0) or b"null")
    except ValueError:
        return None
    return holder if isinstance(holder, dict) else None
