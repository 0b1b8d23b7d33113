"""One way to fail: a problem the user can fix is one ``error:`` line, exit status 2, no traceback.

    from fmtrain.errors import UserError, run_main

    def main(argv=None) -> int:
        ...
        raise UserError("data.corpus: no files match 'data/*.txt'; give paths that exist")

    if __name__ == "__main__":
        sys.exit(run_main(main))

The exception classes of the project's layers (``ConfigError``, ``CheckpointError``,
``CorpusError``, ...) derive from :class:`UserError`, so every command catches them
all in one place. Under torchrun every rank hits the same problem (they read the
same config, data and checkpoints), so only global rank 0 prints it: the message
appears once, not once per rank. Under ``launch/run.sh`` the trainer then exits 0
with the outcome ``error`` in the status file (fmtrain/signals.py), so torchrun
adds no failure dump and restarts nothing; under a plain ``torchrun`` the workers
exit 2 and torchrun prints its own summary after the line. A full disk is one of
these problems too (not a bug): :func:`as_user_error` says so in words.

A problem seen by one rank only (a node-local file) is printed by no one if that
rank is not 0; such checks should agree across ranks first (see
``fmtrain.runlock.lock_run`` and ``fmtrain.checkpoint.find_resume``).
"""
from __future__ import annotations

import errno
import os
import sys
from typing import Callable

EXIT_USAGE = 2  # a problem with what the user gave (config, data, checkpoint, world size)


class UserError(Exception):
    """A problem the user can fix; the message names the file or field and the fix."""


def is_rank_zero() -> bool:
    """Whether this process is global rank 0 (or the only process); readable before any init."""
    for name in ("RANK", "SLURM_PROCID"):
        if os.environ.get(name, "") != "":
            return os.environ[name] == "0"
    return True


def report(message: str) -> None:
    """Print ``error: message`` on stderr, once per job (rank 0)."""
    if is_rank_zero():
        print(f"error: {message}", file=sys.stderr, flush=True)


NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def no_space(exc: BaseException, where: str | os.PathLike | None = None) -> bool:
    """Whether ``exc`` (or what caused it) is a full disk or an exhausted quota.

    ``torch.save`` reports a failed write as a RuntimeError without an errno or words
    ("unexpected pos 376384 vs 376276"), so the text is read, and when ``where`` is given
    its file system's free space is looked at (before anything is cleaned up).
    """
    seen, first = set(), exc
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in NO_SPACE:
            return True
        text = str(exc).lower()
        if "no space left" in text or "quota exceeded" in text:
            return True
        exc = exc.__cause__ or exc.__context__
    return where is not None and isinstance(first, (OSError, RuntimeError)) and disk_full(where)


def disk_full(where: str | os.PathLike) -> bool:
    """Whether the file system holding ``where`` (or its nearest existing parent) is (nearly) full."""
    import shutil
    from pathlib import Path

    path = Path(where)
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        usage = shutil.disk_usage(path)
    except OSError:
        return False
    return usage.free < min(1 << 20, usage.total // 16)


def as_user_error(exc: BaseException) -> UserError | None:
    """``exc`` as a problem the user can fix, or None (a bug: let its traceback show).

    A full disk anywhere (logs, config, an export) is one: it is said in words.
    """
    if isinstance(exc, UserError):
        return exc
    if isinstance(exc, OSError) and no_space(exc):
        where = f" writing {exc.filename}" if exc.filename else ""
        return UserError(f"no space left on device{where} ({exc}); free space there and run again")
    return None


def run_main(main: Callable[..., int], *args, **kwargs) -> int:
    """Call ``main``; a :class:`UserError` (or a full disk) becomes one ``error:`` line and exit 2."""
    try:
        return main(*args, **kwargs)
    except (UserError, OSError) as exc:
        user = as_user_error(exc)
        if user is None:
            raise
        report(str(user))
        return EXIT_USAGE
