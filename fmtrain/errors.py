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
import re
import shutil
import signal
import sys
from pathlib import Path
from typing import Callable

EXIT_USAGE = 2  # a problem with what the user gave (config, data, checkpoint, world size)
EXIT_DIVERGED = 3  # training stopped being finite; the last finite checkpoint is kept
EXIT_INTERRUPTED = 130  # 128 + SIGINT: what a shell reports for a command stopped by Ctrl-C
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE: what a shell reports for `yes | head`


class UserError(Exception):
    """A problem the user can fix; the message names the file or field and the fix."""


class DataError(UserError):
    """The corpus, tokenizer or token cache cannot be used; the message says which and why."""


class Diverged(Exception):
    """The loss or the gradient norm stopped being finite (exit status 3, no checkpoint written);
    the message names the step and what to change."""


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
        # numpy's tofile reports a short write as bare counts, without the errno that says why.
        if isinstance(exc, OSError) and exc.errno is None and re.fullmatch(r"\d+ requested and \d+ written", text):
            return True
        exc = exc.__cause__ or exc.__context__
    return where is not None and isinstance(first, (OSError, RuntimeError)) and disk_full(where)


def read_only(exc: BaseException) -> bool:
    """Whether ``exc`` (or what caused it) is a write to a read-only file system (safetensors says it in words)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if (isinstance(exc, OSError) and exc.errno == errno.EROFS) or "read-only file system" in str(exc).lower():
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def disk_full(where: str | os.PathLike) -> bool:
    """Whether the file system holding ``where`` (or its nearest existing parent) is (nearly) full."""
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


def write_problem(exc: BaseException, writing: str | os.PathLike, out: str | os.PathLike,
                  where: str | os.PathLike | None = None, option: str = "OUT") -> str | None:
    """A failed write of ``writing`` (a file of the output ``out``, which the user named as ``option``)
    in words with the fix, or None when ``exc`` is no write failure (a bug, or a problem already in words).

    safetensors reports I/O failures as a plain Exception holding the OS's words, so those are read;
    ``where`` (the folder being written) is looked at for free space before it is cleaned up.
    """
    if isinstance(exc, UserError):
        return None
    if no_space(exc, where):
        return f"no space left on device while writing {writing}; free space or choose another {option}"
    if read_only(exc):
        return f"{out} is on a read-only file system; remount it read-write or choose another {option}"
    if isinstance(exc, PermissionError):
        return f"cannot write {writing}: permission denied; choose an {option} this user can write"
    if isinstance(exc, OSError):
        return f"cannot write {writing}: {exc.strerror or exc}; choose another {option}"
    return None


def output_file_problem(given: str, option: str, suffixes: tuple[str, ...] = ()) -> str | None:
    """Why the output ``given`` as ``option`` (the files ``given`` with each of ``suffixes``, or ``given``
    itself) could not be written, looked at before any work is done: it has no name, a file to write is
    a folder, the folder they go in is a file or cannot be made or written (a read-only file system,
    permissions); None when they can be (a full disk shows only when they are written)."""
    name = Path(given).name
    if name in ("", ".", "..") or given.endswith(os.sep):
        example = os.path.join(given, "result") if given else "result"
        return f"{option} {given!r}: names a folder, not a file; give a file name (e.g. {option} {example})"
    path = Path(os.path.abspath(given))
    for target in [path.with_suffix(s) for s in suffixes] or [path]:
        if target.is_dir():
            return f"{option} {given}: {target} is a folder; give another name"
    folder = path.parent
    while not folder.exists() and not folder.is_symlink() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        return f"{option} {given}: {folder} is not a folder, so {path.parent} cannot be made; choose another path"
    try:
        rdonly = bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
    except OSError:
        rdonly = False
    if rdonly:
        return f"{option} {given}: {folder} is on a read-only file system; choose a path where files can be written"
    if not os.access(folder, os.W_OK | os.X_OK):
        return f"{option} {given}: cannot write in {folder} (permission denied); choose a path this user can write"
    return None


def write_file(path: str | os.PathLike, data: bytes, option: str) -> None:
    """Write ``data`` to ``path`` (given as ``option``; its folder made) whole or not at all: through a
    temporary file beside it, so that a failure (a full disk) leaves an earlier file there as it was.
    A failure is a :class:`UserError` naming the problem and the fix."""
    from .leftovers import temp_name

    path = Path(path)
    tmp = path.with_name(temp_name(f".{path.name}.tmp-"))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except OSError as exc:
        problem = write_problem(exc, path, path, where=path.parent, option=option)
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        raise UserError(problem) from None


def run_main(main: Callable[..., int], *args, outcome: Callable[[str], int] | None = None, **kwargs) -> int:
    """Call ``main``; a :class:`UserError` (or a full disk) becomes one ``error:`` line and exit 2,
    :class:`Diverged` one line and exit 3. ``outcome``: the exit status of ``"error"`` and
    ``"diverged"`` instead (the trainer's, which may write them to a status file:
    :func:`fmtrain.signals.exit_status`)."""
    status = outcome or {"error": EXIT_USAGE, "diverged": EXIT_DIVERGED}.__getitem__
    try:
        return main(*args, **kwargs)
    except Diverged as exc:
        report(str(exc))
        return status("diverged")
    except (UserError, OSError) as exc:
        user = as_user_error(exc)
        if user is None:
            raise
        report(str(user))
        return status("error")


def _quiet_stdout() -> None:
    """Point stdout at /dev/null: what is still buffered for a closed pipe goes nowhere at exit
    (instead of an 'Exception ignored ... BrokenPipeError' message)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):  # no file descriptor (stdout replaced): nothing to flush to
        pass


def run_command(main, *args, **kwargs) -> int:
    """:func:`run_main` for a command that prints as it goes, stopped the way command-line
    tools stop: Ctrl-C keeps and flushes what was printed and exits ``EXIT_INTERRUPTED`` (130); a reader
    that closes the pipe (``| head``) ends it quietly with ``EXIT_BROKEN_PIPE`` (141). No traceback."""
    try:
        status = run_main(main, *args, **kwargs)
        sys.stdout.flush()  # here, not at exit: a reader gone before the end is seen as a broken pipe
        return status
    except KeyboardInterrupt:
        try:
            previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C while flushing: quiet too
        except ValueError:  # not the main thread: signals go elsewhere anyway
            previous = None
        try:
            sys.stdout.flush()
        except BrokenPipeError:
            _quiet_stdout()
        finally:
            if previous is not None:
                signal.signal(signal.SIGINT, previous)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        _quiet_stdout()
        return EXIT_BROKEN_PIPE
