"""python -m on every fmtrain module: a command runs, anything else says which command to run
(one error: line, exit 2), never exit 0 without a word (fmtrain/commands.py)."""
import os
import re
import subprocess
import sys
from pathlib import Path

from fmtrain.commands import COMMANDS, INSTEAD, module_run

PKG = Path(__file__).resolve().parents[1] / "fmtrain"
MAIN = re.compile(r'^if __name__ == "__main__":', re.M)


def modules() -> dict[str, Path]:
    """Every module and package of fmtrain, by the name python -m takes."""
    out = {}
    for path in sorted(PKG.rglob("*.py")):
        parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def test_the_commands_are_the_modules_with_a_command_line():
    found = modules()
    runnable = {name.removesuffix(".__main__") for name, path in found.items()
                if name.endswith(".__main__") or MAIN.search(path.read_text())}
    assert runnable == set(COMMANDS)  # a new command goes into fmtrain.commands.COMMANDS
    assert set(INSTEAD) <= set(found) - set(COMMANDS)  # each hint is for a module that exists


def test_every_module_that_is_no_command_says_which_to_run():
    names = [n for n in modules() if n.removesuffix(".__main__") not in COMMANDS]
    assert {"fmtrain", "fmtrain.hf.export", "fmtrain.by_position", "fmtrain.needle", "fmtrain.model",
            "fmtrain.init_from", "fmtrain.resume", "fmtrain.data.corpus"} <= set(names)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(PKG.parent), os.environ.get("PYTHONPATH", "")]))
    # All at once: each exits from fmtrain/__init__.py, before anything heavy is imported.
    procs = {n: subprocess.Popen([sys.executable, "-m", n], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 text=True, env=env) for n in names}
    for name, p in procs.items():
        out, err = p.communicate(timeout=300)
        assert (p.returncode, out) == (2, ""), (name, p.returncode, out, err)
        assert len(err.splitlines()) == 1 and err.startswith(f"error: python -m {name} is not a command"), err
        if name in INSTEAD:  # a sibling command does what the user was after
            assert err.rstrip().endswith(f"run {INSTEAD[name]}"), err
        else:
            assert "python -m fmtrain.train CONFIG.toml" in err, err
    r = subprocess.run([sys.executable, "-m", "fmtrain.checkpoint", "export", "RUN", "OUT"], capture_output=True,
                       text=True, env=env, timeout=300)  # the command the README gave once: where it went
    assert r.returncode == 2 and "python -m fmtrain.export RUN OUT" in r.stderr, r.stderr


def test_the_module_python_runs_is_read_from_its_command_line():
    py = "python3"
    assert module_run([py, "-m", "fmtrain.needle", "RUN"]) == "fmtrain.needle"
    assert module_run([py, "-u", "-X", "dev", "-W", "ignore", "-m", "fmtrain.model"]) == "fmtrain.model"
    assert module_run([py, "-um", "fmtrain.train"]) == "fmtrain.train"
    assert module_run([py, "-mfmtrain.eval"]) == "fmtrain.eval"
    assert module_run([py, "-Xdev", "-m", "x"]) == "x"
    assert module_run([py, "-c", "import fmtrain", "-m", "fmtrain.model"]) is None
    assert module_run([py, "script.py", "-m", "fmtrain.model"]) is None
