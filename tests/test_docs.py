"""The documents point at what is there: every repository path and result file they name (README.md,
slurm/README.md, the config fields' help) exists, named as fmtrain names it."""
import glob
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = ("README.md", "slurm/README.md")
PATH = re.compile(r"(?<![\w/.-])((?:bench|configs|fmtrain|tests|slurm|launch|tokenizer)/[\w./{},*-]*[\w*}])")
# Result files named by their stem alone (`recall-cpu-4k-rank4.*`, `long_context-cpu.{md,json,png}`).
RESULT = re.compile(r"`((?:attention|recall|long_context|quality|sweep|train|threads|data|sp|generate|gpu_check|"
                    r"roofline)-[\w.-]*?)(\.\*|\.json|\.md|\.png|\.\{[a-z,]+\})`")


def expand(p: str) -> list[str]:
    """Shell-style braces: ``a{1,2}b`` -> ``a1b``, ``a2b``."""
    m = re.search(r"\{([^{}]*)\}", p)
    if not m:
        return [p]
    return [x for alt in m.group(1).split(",") for x in expand(p[:m.start()] + alt + p[m.end():])]


def missing_paths(where: str, text: str) -> list[tuple[str, str]]:
    """The repository paths and result files ``text`` names that do not exist, with ``where``."""
    named = PATH.findall(text) + [f"bench/results/{stem}{ext}" for stem, ext in RESULT.findall(text)]
    return [(where, p) for p in named for q in expand(p) if not glob.glob(str(ROOT / q))]


def test_every_path_the_docs_name_exists():
    missing = []
    for doc in DOCS:
        missing += missing_paths(doc, (ROOT / doc).read_text())
    assert not missing, missing


def test_every_path_the_config_help_names_exists():
    """The fields' help (fmtrain/config/schema.py, what python -m fmtrain.train --help lists) cites
    result files and modules too; read as --help prints it, each help string joined."""
    from fmtrain.config import describe

    text = describe()
    assert "bench/results/" in text  # the check reads the help that cites files
    assert not missing_paths("fmtrain/config/schema.py (--help)", text)


def test_checkpoint_folders_the_docs_name_are_named_as_fmtrain_names_them():
    from fmtrain.checkpoint import step_dir

    for doc in DOCS:
        for name in re.findall(r"\bstep_\d+\b", (ROOT / doc).read_text()):
            assert name == step_dir(Path(), int(name[5:])).name, (doc, name)
