"""One trainer per run directory: an exclusive lock on ``<run.dir>/.lock``.

Two trainers on one ``run.dir`` would interleave their checkpoints and metrics.
The lock is ``flock(2)`` on an open file: the kernel releases it when the process
dies, however it dies, so a SIGKILLed or OOM-killed run never blocks its own
restart (no stale lock files to delete). Under torchrun only global rank 0 holds
it (one lock per run, not per rank), and every rank learns whether it got it.
The file records who holds it (pid, host, start time) for the message a second
trainer gets. flock works across nodes on NFSv4 and on Lustre/GPFS mounted with
flock support; where a file system ignores it, the lock is only per node.
"""
from __future__ import annotations

import fcntl
import os
import socket
import time
from pathlib import Path

from .errors import UserError

LOCK_FILE = ".lock"


class RunDirInUse(UserError):
    """Another trainer holds the run directory."""


class RunLock:
    def __init__(self, directory: str | os.PathLike):
        self.path = Path(directory) / LOCK_FILE
        self.fd: int | None = None
        self.created: list[Path] = []  # the folders acquire() made, innermost first
        self.made_file = False  # whether acquire() created the lock file (a failed start removes it)
        self.found: set[str] = set()  # what the folder held before: a failed run that added nothing leaves no lock

    def acquire(self) -> None:
        """Take the lock now or raise RunDirInUse naming the holder (never waits)."""
        while True:
            fd = self._open()
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 512, 0).decode(errors="replace").strip() or "another process"
                os.close(fd)
                raise RunDirInUse(
                    f"{self.path.parent} is in use by another trainer ({holder}): two trainers on one run.dir "
                    "would interleave their checkpoints and metrics. Wait for it to finish, stop it (kill -TERM "
                    "its pid: it checkpoints and exits), or give this run another run.dir") from None
            # A failed start removes the lock file it made: a lock taken on that file after it was
            # opened here but removed there is on a file no other trainer will see. Open it again.
            try:
                if os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        self.found = self._listing() - {self.path.name}
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since "
                      f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode(), 0)
        self.fd = fd

    def _open(self) -> int:
        """The lock file's descriptor, noting whether this call made it and the folders above it."""
        try:
            missing = [p for p in (self.path.parent, *self.path.parent.parents) if not p.exists()]
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.created = missing or self.created
            try:  # not inherited by children (O_CLOEXEC)
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
                self.made_file = True
            except FileExistsError:
                fd = os.open(self.path, os.O_RDWR)
                self.made_file = False
            return fd
        except OSError as exc:
            raise UserError(f"cannot write the run directory {self.path.parent} ({exc}); give a run.dir "
                            "(and checkpoint.dir) this user can write") from None

    def release(self, failed_start: bool = False) -> None:
        """Unlock. ``failed_start``: the run failed; if it added nothing to the folder, take back the
        lock file this lock made (also in a run.dir that existed before) and the folders it made. A
        run that wrote something keeps its lock file beside it, as a run that ends does."""
        if self.fd is None:
            return
        if failed_start and self.made_file and self._listing() - {self.path.name} <= self.found:
            self.path.unlink(missing_ok=True)  # while still locked: see acquire()
        os.close(self.fd)  # closing releases the flock
        self.fd = None
        if failed_start:
            for folder in self.created:
                try:
                    folder.rmdir()  # only if empty: anything the run wrote stays
                except OSError:
                    break

    def _listing(self) -> set[str]:
        try:
            return {p.name for p in self.path.parent.iterdir()}
        except OSError:
            return set()


def lock_run(directories: list[Path], world) -> list[RunLock]:
    """Rank 0 locks each directory; all ranks raise (RunDirInUse if a lock is held elsewhere)."""
    locks: list[RunLock] = []
    error: UserError | None = None
    if world.is_main:
        try:
            for d in directories:
                lock = RunLock(d)
                lock.acquire()
                locks.append(lock)
        except UserError as exc:
            error = exc
            for lock in locks:
                lock.release()
            locks = []
    if world.any(error is not None):
        raise error or RunDirInUse("the run directory is in use by another trainer (rank 0 says which)")
    return locks
