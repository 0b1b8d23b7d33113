"""The benchmarks. Each is a script, run from the checkout as ``python bench/NAME.py``.

How they import (the one rule; no script touches ``sys.path``):

- one another by plain name (``from _results import ...``, ``from _harness import ...``,
  ``import quality``): a script run as ``python bench/NAME.py`` has bench/ first on
  ``sys.path``, as Python puts a script's folder there;
- ``fmtrain`` from this checkout, whatever is installed and without installing it: every
  benchmark imports ``_results`` first, which puts the checkout's root next on ``sys.path``.

Importing this package (the tests: ``from bench import recall``; or ``python -m bench.NAME``
from the checkout's root) gives the same: bench/ is put first on ``sys.path`` here, and
``bench.NAME`` is the very module the scripts import as ``NAME``, not a second copy of it.
"""
import importlib
import sys
from pathlib import Path

_HERE = Path(__file__).resolve().parent
if str(_HERE) not in sys.path:
    sys.path.insert(0, str(_HERE))


def __getattr__(name: str):
    """``from bench import recall``: bench/recall.py, imported as the scripts import it (``recall``)."""
    if name.isidentifier() and not name.startswith("__") and (_HERE / f"{name}.py").is_file():
        return importlib.import_module(name)
    raise AttributeError(f"module 'bench' has no attribute {name!r}")
