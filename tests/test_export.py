"""The model-only export (python -m fmtrain.export) and the writing side of the Hugging Face export
(python -m fmtrain.hf export): a folder of the user's is never overwritten unasked, and a full disk,
a read-only file system or a kill ends in one line and leaves nothing behind.

The source is a model-only folder of a random model (what the export itself writes), made here
without a training run. The full-disk and read-only tests mount a tmpfs (root only; skipped elsewhere).
"""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fmtrain.checkpoint import META, validate, write_meta
from fmtrain.leftovers import owner_tag
from fmtrain.export import ExportError, export, load_model_state, load_trained
from tests.conftest import kill_when
from tests.conftest import ENV, assert_one_error_line, snapshot

SP_TOKENIZER = Path(__file__).resolve().parents[1] / "tokenizer" / "stdlib-4k.model"


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    """A model-only folder: a random 2-layer model over stdlib-4k (weights ~1.4 MB), its config,
    tokenizer and meta.json."""
    from safetensors.torch import save_file

    from fmtrain.config import from_dict, save_config
    from fmtrain.data.tokenizer import tokenizer_files
    from fmtrain.model import build_model

    folder = tmp_path_factory.mktemp("src") / "model"
    folder.mkdir()
    cfg = from_dict({"run": {"dir": str(folder)},
                     "model": {"vocab_size": 4096, "dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2,
                               "block_size": 16},
                     "data": {"corpus": [str(folder / "*.txt")], "seq_len": 256, "tokenizer": str(SP_TOKENIZER)}})
    torch.manual_seed(0)
    save_config(cfg, folder)
    save_file({k: v.clone().contiguous() for k, v in build_model(cfg.model).state_dict().items()},
              folder / "model.safetensors")
    for path, name in tokenizer_files(SP_TOKENIZER):
        shutil.copy2(path, folder / name)
    write_meta(folder, step=0, tokens_seen=0, format="model-only", world_size=1, dp_size=1, sp_size=1,
               zero_stage=None)
    return folder


def export_cli(*args, module: str = "fmtrain.export") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], capture_output=True, text=True,
                          timeout=300, env=ENV)


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".partial-" in p.name)


@pytest.fixture
def small_disk(tmp_path, tmpfs):
    """256 KB: less than the weights (~1.4 MB)."""
    return tmpfs(tmp_path / "disk", "size=256k")


@pytest.fixture
def read_only(tmp_path, tmpfs):
    return tmpfs(tmp_path / "ro", "ro,size=1m")


def dead_pid() -> int:
    """The PID of a process of this host that has ended (and been reaped)."""
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


# ---------------------------------------------------------------------- a folder of the user's
def test_a_folder_with_files_is_refused_without_force_and_left_as_it_was(src, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("my notes\n")
    (out / "config.toml").write_text("# mine\n")
    before = snapshot(out)
    r = export_cli(src, out)
    assert_one_error_line(r, f"{out} exists and is not empty", "--force", "replaces config.toml", "keeps notes.txt")
    assert snapshot(out) == before and leftovers(tmp_path) == []
    # A file where the folder should be is refused even with --force.
    (tmp_path / "file").write_text("x")
    assert_one_error_line(export_cli(src, tmp_path / "file", "--force"), "exists and is not a folder")
    assert (tmp_path / "file").read_text() == "x"


def test_an_empty_folder_is_filled_without_force(src, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    r = export_cli(src, out)
    assert r.returncode == 0, r.stderr
    assert set(json.loads((out / META).read_text())["files"]) == {p.name for p in out.iterdir()} - {META}
    validate(out)
    assert leftovers(tmp_path) == []


def test_force_replaces_the_exports_files_and_keeps_the_users(src, tmp_path):
    out = tmp_path / "out"
    (out / "plots").mkdir(parents=True)
    (out / "plots" / "loss.png").write_bytes(b"\x89PNG")
    (out / "notes.txt").write_text("my notes\n")
    (out / "config.toml").write_text("# mine\n")
    r = export_cli(src, out, "--force")
    assert r.returncode == 0, r.stderr
    assert (out / "notes.txt").read_text() == "my notes\n" and (out / "plots" / "loss.png").read_bytes() == b"\x89PNG"
    assert (out / "config.toml").read_bytes() == (src / "config.toml").read_bytes()
    listed = set(json.loads((out / META).read_text())["files"])
    assert listed == {"model.safetensors", "config.toml", "tokenizer.model", "sentencepiece_settings.json"}
    # The user's own files are not part of the export: editing them leaves it loadable.
    (out / "notes.txt").write_text("edited later\n")
    (out / "plots" / "loss.png").unlink()
    validate(out)
    model, _ = load_trained(out)
    want = load_model_state(src)
    assert all(torch.equal(v, want[k]) for k, v in model.state_dict().items())
    assert leftovers(tmp_path) == [] and leftovers(out) == []

    # Again over it: a file an earlier export listed and this one does not write goes (it would be
    # taken for this export's tokenizer); an unlisted file of the same kind is the user's and stays.
    (out / "tokenizer.json").write_text("{}")
    meta = json.loads((out / META).read_text())
    meta["files"]["tokenizer.json"] = 2
    (out / META).write_text(json.dumps(meta))
    (out / "special_tokens_map.json").write_text("{}")
    assert export_cli(src, out, "--force").returncode == 0
    assert not (out / "tokenizer.json").exists() and (out / "special_tokens_map.json").read_text() == "{}"
    assert (out / "notes.txt").read_text() == "edited later\n"
    validate(out)


def test_the_checkpoint_itself_or_a_folder_around_it_is_refused(src, tmp_path):
    before = snapshot(src)
    assert_one_error_line(export_cli(src, src, "--force"), f"{src} is the checkpoint {src}",
                          "export to a folder outside it")
    with pytest.raises(ExportError, match="holds the checkpoint"):  # a run folder holding it, say
        export(src, src.parent, force=True)
    with pytest.raises(ExportError, match="is inside the checkpoint"):  # pruned with it
        export(src, src / "exported")
    assert snapshot(src) == before


# ---------------------------------------------------------------------- a full disk, a read-only file system
@pytest.mark.slow
def test_a_full_disk_is_one_line_and_leaves_nothing(src, tmp_path, small_disk):
    out = small_disk / "a" / "b" / "out"  # a and b are made for it, and taken back
    r = export_cli(src, out)
    assert_one_error_line(r, f"no space left on device while writing {out}/model.safetensors; free space or "
                             "choose another OUT")
    assert list(small_disk.iterdir()) == []
    # The mount point itself, empty: the files are written beside it and copied in. The folder is
    # the user's: it stays, empty; the partial folder beside it goes.
    r = export_cli(src, small_disk)
    assert_one_error_line(r, f"no space left on device while writing {small_disk}/model.safetensors")
    assert list(small_disk.iterdir()) == [] and leftovers(tmp_path) == []
    # With --force into a folder of the user's: their file is kept as it was.
    (small_disk / "notes.txt").write_text("my notes\n")
    assert_one_error_line(export_cli(src, small_disk, "--force"), "no space left on device")
    assert snapshot(small_disk) == {"notes.txt": b"my notes\n"} and leftovers(tmp_path) == []


def test_a_read_only_target_is_one_line_and_leaves_nothing(src, tmp_path, read_only):
    for out in (read_only / "out", read_only):
        r = export_cli(src, out)
        assert_one_error_line(r, f"{out} is on a read-only file system", "choose another OUT")
        assert list(read_only.iterdir()) == [] and leftovers(tmp_path) == []


def test_a_place_that_cannot_hold_a_folder_is_one_line(src, tmp_path):
    r = export_cli(src, "/proc/no/such")
    assert_one_error_line(r, "cannot write /proc/no/such", "choose another OUT")
    (tmp_path / "afile").write_text("mine\n")  # a parent that is a file
    r = export_cli(src, tmp_path / "afile" / "sub" / "x")
    assert_one_error_line(r, f"cannot write {tmp_path}/afile/sub/x: Not a directory; choose another OUT")
    assert (tmp_path / "afile").read_text() == "mine\n"


# ---------------------------------------------------------------------- a killed export
STUCK = """
import sys, time
import fmtrain.export as e

def stuck(folder, **info):  # the weights, config and tokenizer are written: stop here until killed
    time.sleep(300)

e.write_meta = stuck
e.main(sys.argv[1:])
"""


def test_a_killed_export_leaves_a_partial_folder_that_the_next_one_removes(src, tmp_path):
    out = tmp_path / "out"
    pid = kill_when([sys.executable, "-c", STUCK, str(src), str(out)],
                    lambda: list(tmp_path.glob(".out.partial-*/config.toml")), env=ENV)
    partial = tmp_path / f".out.partial-{owner_tag()}-{pid}"
    assert leftovers(tmp_path) == [partial.name] and not out.exists()
    # Beside it: the folder of a live export here (its work: left alone, said nothing of), one of
    # another host (its owner cannot be checked from here: left, and said where), and one named
    # before owners were recorded (the same).
    live = subprocess.Popen(["sleep", "300"])
    try:
        running = tmp_path / f".out.partial-{owner_tag()}-{live.pid}"
        elsewhere = tmp_path / f".out.partial-node-7.cluster-{dead_pid()}"
        unrecorded = tmp_path / f".out.partial-{dead_pid()}"
        for folder in (running, elsewhere, unrecorded):
            folder.mkdir()
        r = export_cli(src, out)
        assert r.returncode == 0, r.stderr
        assert f"removed {partial}, left by an export that was killed (pid {pid} is gone)" in r.stderr
        assert not partial.exists() and running.is_dir() and elsewhere.is_dir() and unrecorded.is_dir()
        assert str(running) not in r.stderr
        assert f"warning: {elsewhere} is left by an export that was killed, or in use by pid " in r.stderr
        assert "on node-7.cluster" in r.stderr and f"warning: {unrecorded} is left by" in r.stderr
        validate(out)
    finally:
        live.kill()
        live.wait()


def test_a_killed_export_to_another_name_is_removed_by_the_next_export_beside_it(src, tmp_path):
    """An export to b killed, then one to c in the same folder: b's partial folder was neither removed
    nor mentioned. Any .NAME.partial-OWNER of a dead owner here goes; others' are said where they are."""
    pid = kill_when([sys.executable, "-c", STUCK, str(src), str(tmp_path / "b")],
                    lambda: list(tmp_path.glob(".b.partial-*/config.toml")), env=ENV)
    partial = tmp_path / f".b.partial-{owner_tag()}-{pid}"
    assert partial.is_dir()
    elsewhere = tmp_path / f".d.partial-node-7.cluster-{dead_pid()}"
    elsewhere.mkdir()
    mine = [tmp_path / ".notes.txt", tmp_path / ".step_00000003.partial"]  # not an export's: left alone
    mine[0].write_text("mine\n")
    mine[1].mkdir()
    r = export_cli(src, tmp_path / "c")
    assert r.returncode == 0, r.stderr
    assert f"removed {partial}, left by an export that was killed (pid {pid} is gone)" in r.stderr
    assert f"warning: {elsewhere} is left by an export that was killed, or in use by pid " in r.stderr
    assert not partial.exists() and elsewhere.is_dir() and all(p.exists() for p in mine)
    assert not (tmp_path / "b").exists()
    validate(tmp_path / "c")


# The weights are written, then the export waits: Ctrl-C comes while its partial folder is there.
# A sitecustomize, so that the commands themselves run (python -m ..., their own __main__).
SLOW_SAVE = """
import time
import safetensors.torch as st

_save = st.save_file

def save_file(*args, **kwargs):
    _save(*args, **kwargs)
    time.sleep(300)

st.save_file = save_file
"""


@pytest.mark.parametrize("command", [["fmtrain.export"], ["fmtrain.hf", "export"]], ids=lambda c: c[0])
def test_ctrl_c_during_an_export_is_exit_130_and_leaves_nothing(src, tmp_path, command):
    """Ctrl-C printed a KeyboardInterrupt traceback: it stops as generate does (exit 130), and the partial
    folder goes as on any other failure."""
    import os
    import signal
    import time

    if command[0] == "fmtrain.hf":
        pytest.importorskip("transformers")
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SLOW_SAVE)
    env = dict(ENV, PYTHONPATH=os.pathsep.join(p for p in (str(site), ENV.get("PYTHONPATH")) if p))
    work = tmp_path / "work"
    work.mkdir()
    proc = subprocess.Popen([sys.executable, "-m", *command, str(src), str(work / "out")], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not list(work.glob(".out.partial-*/model.safetensors")):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.1)
        proc.send_signal(signal.SIGINT)
        err = proc.communicate(timeout=120)[1]
    finally:
        proc.kill()
    assert proc.returncode == 130, (proc.returncode, err)
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert list(work.iterdir()) == []  # no partial folder, no OUT


# ---------------------------------------------------------------------- the Hugging Face export
@pytest.mark.slow
def test_hf_export_on_a_full_disk_or_read_only_is_one_line_and_leaves_nothing(src, tmp_path, small_disk, read_only):
    pytest.importorskip("transformers")
    stale = small_disk / f".out.partial-{owner_tag()}-{dead_pid()}"  # a killed export's, on this host
    stale.mkdir()
    r = export_cli("export", src, small_disk / "out", module="fmtrain.hf")
    assert_one_error_line(r, f"no space left on device while writing {small_disk}/out/model.safetensors")
    assert f"removed {stale}" in r.stderr
    assert list(small_disk.iterdir()) == []
    r = export_cli("export", src, read_only / "out", module="fmtrain.hf")
    assert_one_error_line(r, f"{read_only / 'out'} is on a read-only file system")
    assert list(read_only.iterdir()) == [] and leftovers(tmp_path) == []
    # Refused without --force, naming what it would keep, and nothing of the user's touched.
    (small_disk / "notes.txt").write_text("x")
    r = export_cli("export", src, small_disk, module="fmtrain.hf")
    assert_one_error_line(r, "exists and is not empty (notes.txt); give a new or empty folder", "--force",
                          "keeps notes.txt")
    assert snapshot(small_disk) == {"notes.txt": b"x"}



# ---------------------------------------------------------------------- a damaged source
def test_a_meta_json_of_the_wrong_shape_is_skipped_or_refused_by_both_commands(src, tmp_path):
    """Valid JSON of the wrong shape in meta.json ("crc32": [1], "files": null, a number for the files)
    once ended generate and export in an AttributeError: the newest such checkpoint is skipped for the
    one before it, and one named directly is refused in one line naming the field."""
    ckpts = tmp_path / "run" / "checkpoints"
    good, bad = ckpts / "step_00000001", ckpts / "step_00000002"
    shutil.copytree(src, good)
    shutil.copytree(src, bad)
    meta = json.loads((bad / META).read_text())
    for field, value, words in (("crc32", [1], "crc32 must be a mapping of file names to 8 hex digits, found [1]"),
                                ("files", None, "files must be a mapping of file names to its size in bytes"),
                                ("files", 7, "found 7 (an integer)")):
        (bad / META).write_text(json.dumps(dict(meta, **{field: value})))
        r = export_cli(bad, tmp_path / "refused")
        assert_one_error_line(r, f"{bad}/meta.json is damaged", words)
        assert not (tmp_path / "refused").exists()
    r = export_cli(tmp_path / "run", tmp_path / "out")
    assert r.returncode == 0, r.stderr
    assert f"skipping checkpoint: {bad}/meta.json is damaged" in r.stderr and "Traceback" not in r.stderr
    assert validate(tmp_path / "out")["source"] == str(good)
    gen = [sys.executable, "-m", "fmtrain.generate", "--prompt", "def f(", "--max-new-tokens", "3"]
    r = subprocess.run(gen + [str(tmp_path / "run")], capture_output=True, text=True, timeout=300, env=ENV)
    assert r.returncode == 0 and r.stdout.startswith("def f("), r.stderr
    assert f"skipping checkpoint: {bad}/meta.json is damaged" in r.stderr
    r = subprocess.run(gen + [str(bad)], capture_output=True, text=True, timeout=300, env=ENV)
    assert_one_error_line(r, f"{bad}/meta.json is damaged", "found 7 (an integer)")
    # Such a meta.json in OUT (an earlier export's, damaged) is no reason to fail an export with --force.
    r = export_cli(good, bad, "--force")
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert validate(bad)["source"] == str(good)


LFS = "version https://git-lfs.github.com/spec/v1\noid sha256:{}\nsize 1116848\n".format("ab" * 32)


def test_a_git_lfs_pointer_or_an_html_page_in_a_model_folder_is_named_with_the_fix(src, tmp_path):
    """A clone made without git-lfs once said "has 72 bytes, 1116848 were written": the size check
    looks at what the file is before it says so."""
    lfs, html = tmp_path / "lfs", tmp_path / "html"
    shutil.copytree(src, lfs)
    shutil.copytree(src, html)
    (lfs / "model.safetensors").write_text(LFS)
    (html / "tokenizer.model").write_text("<!DOCTYPE html>\n<html><body>404 Not Found</body></html>\n")
    r = export_cli(lfs, tmp_path / "out")
    assert_one_error_line(r, f"model.safetensors in {lfs} is a Git LFS pointer, not the weights (a clone made "
                             f"without git-lfs): run `git lfs pull` in {lfs} (model.safetensors has {len(LFS)} bytes")
    r = export_cli(html, tmp_path / "out")
    assert_one_error_line(r, f"tokenizer.model in {html} is an HTML page, not the tokenizer (a failed download): "
                             "download it again")
    r = subprocess.run([sys.executable, "-m", "fmtrain.generate", str(lfs), "--prompt", "a"], capture_output=True,
                       text=True, timeout=300, env=ENV)
    assert_one_error_line(r, "is a Git LFS pointer, not the weights", f"run `git lfs pull` in {lfs}")
    assert not (tmp_path / "out").exists()
