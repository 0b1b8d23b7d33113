"""fmtrain: long-context language-model pretraining with Fast Multipole Attention."""
import sys as _sys

__version__ = "0.1.0"

# `python -m fmtrain.X` imports this package first, with sys.argv[0] == "-m" while X is located: a
# module that is no command would otherwise exit 0 without a word. fmtrain.commands says what to run.
if _sys.argv[:1] == ["-m"] and hasattr(_sys, "orig_argv"):
    from .commands import refuse as _refuse

    _refuse(_sys.orig_argv)
