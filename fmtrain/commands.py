"""fmtrain's commands, and what ``python -m`` says for a module that is not one.

``python -m fmtrain.X`` imports the package ``fmtrain`` before it runs ``X``; a module without
a command line would then define its functions and exit 0 without a word (``python -m
fmtrain.hf.export`` typed for ``python -m fmtrain.hf export``, ``python -m fmtrain.needle`` for
``python -m fmtrain.eval RUN --needle``). ``fmtrain/__init__.py`` calls :func:`refuse` while
Python is still locating the module: for anything but a command it prints one ``error:`` line
naming what to run instead and exits 2, before anything heavy (torch) is imported.
"""
from __future__ import annotations

import sys

# The modules that run as commands (each has a ``__main__`` block or ``__main__.py``).
# fmtrain.checkpoint's __main__.py is the old export command: it says itself where that went.
COMMANDS = ("fmtrain.train", "fmtrain.eval", "fmtrain.generate", "fmtrain.export", "fmtrain.hf",
            "fmtrain.data.tokenizer", "fmtrain.data.tokens", "fmtrain.checkpoint")

LIST = ("python -m fmtrain.train CONFIG.toml, python -m fmtrain.eval RUN, python -m fmtrain.generate RUN, "
        "python -m fmtrain.export RUN OUT, python -m fmtrain.hf export RUN OUT, "
        "python -m fmtrain.data.tokenizer train|info, python -m fmtrain.data.tokens (each takes --help)")

# Modules a user may plausibly run for what a sibling command does: that command.
INSTEAD = {
    "fmtrain.hf.export": "python -m fmtrain.hf export RUN_OR_CHECKPOINT OUT",
    "fmtrain.hf.sentencepiece": "python -m fmtrain.hf export RUN_OR_CHECKPOINT OUT (it converts the tokenizer)",
    "fmtrain.by_position": "python -m fmtrain.eval RUN --by-position",
    "fmtrain.needle": "python -m fmtrain.eval RUN --needle",
    "fmtrain.model": "python -m fmtrain.train CONFIG.toml to train a model, python -m fmtrain.generate RUN to "
                     "run one",
    "fmtrain.init_from": "python -m fmtrain.train CONFIG.toml --model.init_from=PATH",
    "fmtrain.hf.importing": "python -m fmtrain.train CONFIG.toml --model.init_from=HF_FOLDER",
    "fmtrain.resume": "python -m fmtrain.train CONFIG.toml (a run with checkpoints resumes from its newest)",
    "fmtrain.data.corpus": "python -m fmtrain.data.tokens --cache-dir DIR --tokenizer MODEL [corpus options] to "
                           "tokenise a corpus, python -m fmtrain.data.tokenizer train to train a tokenizer on one",
    "fmtrain.data.loader": "python -m fmtrain.data.tokens --cache-dir DIR --tokenizer MODEL [corpus options]",
    "fmtrain.config": "python -m fmtrain.train --help (every field, with its doc)",
    "fmtrain.config.schema": "python -m fmtrain.train --help (every field, with its doc)",
    "fmtrain.config.loading": "python -m fmtrain.train --help (every field, with its doc)",
}


def module_run(orig_argv: list[str]) -> str | None:
    """The module of ``python [options] -m MODULE ...``, or None (a script, ``-c``)."""
    args = iter(orig_argv[1:])
    for arg in args:
        if not arg.startswith("-") or arg in ("-", "--"):
            return None
        if arg.startswith("--"):  # --check-hash-based-pycs MODE: the only long option with a value
            if arg == "--check-hash-based-pycs":
                next(args, None)
            continue
        for i, flag in enumerate(arg[1:], 1):  # combined short flags: -um fmtrain.train, -mfmtrain.train
            rest = arg[i + 1:]
            if flag == "c":
                return None
            if flag == "m":
                return rest or next(args, None)
            if flag in "WX":  # takes a value: the rest of this argument or the next one
                if not rest:
                    next(args, None)
                break
    return None


def refuse(orig_argv: list[str]) -> None:
    """Exit 2 with one ``error:`` line when ``orig_argv`` runs an fmtrain module that is no command."""
    name = module_run(orig_argv)
    if name is None or not (name == "fmtrain" or name.startswith("fmtrain.")):
        return
    base = name.removesuffix(".__main__")
    if base in COMMANDS:
        return
    if base in INSTEAD:
        message = f"python -m {name} is not a command; run {INSTEAD[base]}"
    else:
        message = f"python -m {name} is not a command ({base} is part of the library); fmtrain's commands: {LIST}"
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


__all__ = ["COMMANDS", "INSTEAD", "module_run", "refuse"]
