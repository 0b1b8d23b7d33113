"""The documents point at what is there: every repository path and result file they name exists."""
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


def test_every_path_the_docs_name_exists():
    missing = []
    for doc in DOCS:
        text = (ROOT / doc).read_text()
        named = PATH.findall(text) + [f"bench/results/{stem}{ext}" for stem, ext in RESULT.findall(text)]
        for p in named:
            missing += [(doc, p) for q in expand(p) if not glob.glob(str(ROOT / q))]
    assert not missing, missing


def test_checkpoint_folders_the_docs_name_are_named_as_fmtrain_names_them():
    from fmtrain.checkpoint import step_dir

    for doc in DOCS:
        for name in re.findall(r"\bstep_\d+\b", (ROOT / doc).read_text()):
            assert name == step_dir(Path(), int(name[5:])).name, (doc, name)
