"""Temporary names that say who writes them, and the leftovers of writers that were killed.

A folder or file written under a temporary name and renamed when complete is left behind when its
writer is killed (SIGKILL, OOM). Its name records the owner (host and PID) so that the next run can
tell a dead owner's leftover from the work of a live one, here or on another host of a shared file
system, and remove only the former. Used by the exports and the token cache.
"""
from __future__ import annotations

import os
import re
import shutil
import socket
import sys
from pathlib import Path

_PID_INIT_NS = 0xEFFFFFFC  # the kernel's initial PID namespace (PROC_PID_INIT_INO)


def owner_tag() -> str:
    """This host as temporary names record it: its name, plus its PID namespace when that is not the
    host's own (a container that shares the host's name, as ``docker --network=host`` does, numbers its
    processes apart: its PIDs say nothing about the host's, nor the host's about its)."""
    host = re.sub(r"[^A-Za-z0-9._-]", "_", socket.gethostname()) or "localhost"
    try:
        ns = int(os.readlink("/proc/self/ns/pid").split("[")[1].rstrip("]"))
    except (OSError, IndexError, ValueError):
        return host
    return host if ns == _PID_INIT_NS else f"{host}.pidns{ns}"


def temp_name(prefix: str) -> str:
    """``prefix`` followed by this process's owner: ``HOST-PID`` (see :func:`remove_stale`)."""
    return f"{prefix}{owner_tag()}-{os.getpid()}"


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` of this host (this PID namespace) exists; when in doubt, yes."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OSError, OverflowError):  # another user's process (EPERM), or a number that is no PID
        return True
    return True


def remove_stale(folder: str | os.PathLike, name: re.Pattern, what: str, *, warn: bool = True) -> list[Path]:
    """Remove the entries of ``folder`` whose names ``name`` matches (its group ``owner``: what
    :func:`temp_name` appended) that a process of this host left when it died; returns them.
    ``what`` names the writer in messages ("an export").

    Entries of a live process are its work in progress: left alone. Entries of another host (or
    named before owners were recorded) are left too, since this host cannot tell whether their owner
    lives: with ``warn``, a warning on stderr says where they are.
    """
    try:
        entries = sorted(Path(folder).iterdir())
    except OSError:  # no folder yet: nothing left over
        return []
    here, removed = owner_tag(), []
    for path in entries:
        m = name.fullmatch(path.name)
        if m is None:
            continue
        tag, _, pid = m.group("owner").rpartition("-")
        if tag == here and pid.isdigit():
            if int(pid) == os.getpid() or pid_alive(int(pid)):
                continue
            try:
                shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
            except OSError as exc:
                print(f"warning: cannot remove {path}, left by {what} that was killed ({exc}); delete it",
                      file=sys.stderr, flush=True)
                continue
            print(f"removed {path}, left by {what} that was killed (pid {pid} is gone)", file=sys.stderr,
                  flush=True)
            removed.append(path)
        elif warn:
            owner = f"pid {pid} on {tag}" if tag and pid.isdigit() else "an owner that was not recorded"
            print(f"warning: {path} is left by {what} that was killed, or in use by {owner} (which this host "
                  "cannot check); delete it if nothing writes it", file=sys.stderr, flush=True)
    return removed


__all__ = ["owner_tag", "temp_name", "pid_alive", "remove_stale"]
