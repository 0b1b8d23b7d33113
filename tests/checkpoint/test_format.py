"""The checkpoint folder format as a unit (fmtrain/checkpoint/format.py): meta.json written last
with every file's size and CRC-32, validation that names the damaged file, the newest valid
checkpoint found past damaged ones, pruning, and :func:`resolve`'s validated value, read once."""
import json
import os
import shutil
from pathlib import Path

import pytest

from fmtrain.checkpoint import (META, Checkpoint, CheckpointError, find_checkpoints, latest_valid_by_size, prune,
                                resolve, scan, step_dir, validate, write_meta)
from fmtrain.checkpoint import format as fmt
from fmtrain.config import from_dict
from fmtrain.config.loading import to_toml


def make(folder: Path, step: int = 1, config: str | None = None) -> Path:
    """A complete checkpoint folder of a few files (what the format cares about, no weights)."""
    folder.mkdir(parents=True)
    (folder / "ds").mkdir()
    (folder / "ds" / "state.pt").write_bytes(os.urandom(5000))
    (folder / "rank_00000.pt").write_bytes(os.urandom(300))
    (folder / "config.toml").write_text(config or to_toml(from_dict({"run": {"dir": "r"}})))
    write_meta(folder, step=step, tokens_seen=10 * step, world_size=1, dp_size=1, sp_size=1, zero_stage=0)
    return folder


def test_meta_lists_every_other_file_and_validate_returns_it(tmp_path):
    ckpt = make(tmp_path / "step_00000001")
    meta = validate(ckpt)
    assert set(meta["files"]) == set(meta["crc32"]) == {"ds/state.pt", "rank_00000.pt", "config.toml"}
    assert meta["files"]["ds/state.pt"] == 5000 and meta["step"] == 1
    assert json.loads((ckpt / META).read_text()) == meta
    assert not list(ckpt.glob(".*"))  # written through a temporary name, nothing left


@pytest.mark.parametrize("damage, message", [
    (lambda c: (c / "rank_00000.pt").unlink(), "rank_00000.pt is missing"),
    (lambda c: (c / "ds" / "state.pt").write_bytes(b"short"), "ds/state.pt has 5 bytes, 5000 were written"),
    (lambda c: (c / "ds" / "state.pt").write_bytes(bytes(5000)), r"ds/state.pt is corrupt \(CRC-32"),
    (lambda c: (c / META).unlink(), "no meta.json"),
    (lambda c: (c / META).write_text("{"), "meta.json is unreadable"),
    (lambda c: (c / META).write_text("{}"), "lacks step, tokens_seen"),
])
def test_damage_is_named(tmp_path, damage, message):
    ckpt = make(tmp_path / "step_00000001")
    damage(ckpt)
    with pytest.raises(CheckpointError, match=message):
        validate(ckpt)


def edit_meta(**fields):
    """Damage: meta.json rewritten as valid JSON with ``fields`` replaced (the wrong shape)."""
    def damage(ckpt: Path) -> None:
        meta = json.loads((ckpt / META).read_text())
        meta.update(fields)
        (ckpt / META).write_text(json.dumps(meta))
    return damage


@pytest.mark.parametrize("damage, message", [
    (edit_meta(crc32=[1]), r"crc32 must be a mapping of file names to 8 hex digits, found \[1\] \(a list\)"),
    (edit_meta(files=None), "files must be a mapping of file names to its size in bytes"),
    (edit_meta(files=3), r"files must be a mapping .*found 3 \(an integer\)"),
    (edit_meta(files={"config.toml": "12"}), r"files\['config.toml'\] must be its size in bytes .*\(a string\)"),
    (edit_meta(files={"../../etc/passwd": 1}), "files names '../../etc/passwd', not a file inside the checkpoint"),
    (edit_meta(crc32={"config.toml": 5}), r"crc32\['config.toml'\] must be 8 hex digits"),
    (edit_meta(crc32={"other.pt": "0000abcd"}), "crc32 names 'other.pt', which files does not list"),
    (edit_meta(step="3"), r"step must be a whole number >= 0, found \"3\" \(a string\)"),
    (edit_meta(tokens_seen=1.5), "tokens_seen must be a whole number >= 0"),
    (edit_meta(world_size=0), "world_size must be a whole number >= 1"),
    (edit_meta(zero_stage={"stage": 2}), "zero_stage must be 0 to 3, or null"),
    (edit_meta(sp_size=True), "sp_size must be a whole number >= 1"),
    (lambda c: (c / META).write_text("[1, 2]"), r"holds \[1, 2\] \(a list\), not a mapping of fields"),
    (lambda c: (c / META).write_text("null"), "holds null, not a mapping of fields"),
])
def test_a_meta_json_of_the_wrong_shape_is_damage_named_by_field(tmp_path, damage, message):
    """Valid JSON of the wrong shape once crashed eval, generate and the exports with an AttributeError:
    it is a damaged checkpoint, named with the field and what was found, skipped for the one before it."""
    for step in (1, 2):
        make(step_dir(tmp_path, step), step)
    damage(step_dir(tmp_path, 2))
    with pytest.raises(CheckpointError, match=message):
        validate(step_dir(tmp_path, 2))
    found, failures = scan(tmp_path)
    assert found == step_dir(tmp_path, 1) and len(failures) == 1 and "step_00000002/meta.json" in failures[0]
    with pytest.raises(CheckpointError, match=message):
        resolve(step_dir(tmp_path, 2))


def test_a_file_that_is_a_git_lfs_pointer_is_named_as_one(tmp_path):
    ckpt = make(tmp_path / "step_00000001")
    (ckpt / "ds" / "state.pt").write_text("version https://git-lfs.github.com/spec/v1\noid sha256:00\nsize 5000\n")
    with pytest.raises(CheckpointError, match=rf"^state.pt in {ckpt}/ds is a Git LFS pointer, not the training "
                                              rf"state .*: run `git lfs pull` in {ckpt}/ds \(ds/state.pt has 67 "
                                              r"bytes, 5000 were written\)$"):
        validate(ckpt)


def test_a_flipped_block_passes_the_size_check_only(tmp_path):
    ckpt = make(tmp_path / "step_00000001")
    (ckpt / "ds" / "state.pt").write_bytes(bytes(5000))
    assert validate(ckpt, checksums=False)["step"] == 1
    assert latest_valid_by_size(tmp_path) == ckpt


def test_scan_finds_the_newest_valid_and_says_why_newer_ones_were_skipped(tmp_path):
    for step in (3, 6, 9):
        make(step_dir(tmp_path, step), step)
    (tmp_path / ".step_00000012.partial").mkdir()  # a save that never finished
    (tmp_path / "notes").mkdir()
    assert find_checkpoints(tmp_path) == [step_dir(tmp_path, s) for s in (3, 6, 9)]
    (step_dir(tmp_path, 9) / "rank_00000.pt").write_bytes(b"")
    found, failures = scan(tmp_path)
    assert found == step_dir(tmp_path, 6) and len(failures) == 1 and "step_00000009" in failures[0]


def test_prune_counts_only_valid_checkpoints_and_never_touches_newer_ones(tmp_path):
    for step in (1, 2, 3, 4, 5):
        make(step_dir(tmp_path, step), step)
    (step_dir(tmp_path, 2) / "rank_00000.pt").unlink()  # damaged: not counted (nor deleted: resume names it)
    (tmp_path / ".step_00000004.partial").mkdir()
    prune(tmp_path, step_dir(tmp_path, 4), keep=2)
    # Kept: the newest (4), one valid before it (3), and step 5 (newer than the one just written).
    assert [p.name for p in find_checkpoints(tmp_path)] == ["step_00000002", "step_00000003", "step_00000004",
                                                             "step_00000005"]
    assert not (tmp_path / ".step_00000004.partial").exists()
    prune(tmp_path, step_dir(tmp_path, 5), keep=1)
    assert [p.name for p in find_checkpoints(tmp_path)] == ["step_00000002", "step_00000005"]


def test_resolve_takes_a_checkpoint_a_checkpoints_folder_or_a_run(tmp_path):
    run = tmp_path / "run"
    for step in (2, 4):
        make(step_dir(run / "checkpoints", step), step)
    for given in (step_dir(run / "checkpoints", 4), run / "checkpoints", run):
        ckpt = resolve(given)
        assert isinstance(ckpt, Checkpoint) and ckpt.path == step_dir(run / "checkpoints", 4)
        assert ckpt.meta["step"] == 4 and os.fspath(ckpt) == str(ckpt.path) and (ckpt / META).is_file()
    assert resolve(ckpt) is ckpt  # a Checkpoint is validated already
    with pytest.raises(CheckpointError, match="no valid checkpoint at"):
        resolve(tmp_path / "empty")
    (step_dir(run / "checkpoints", 4) / "rank_00000.pt").unlink()
    (step_dir(run / "checkpoints", 2) / "rank_00000.pt").unlink()
    with pytest.raises(CheckpointError, match="can be loaded:\n  - .*step_00000004.*\n  - .*step_00000002"):
        resolve(run)


def test_one_config_reader_drops_removed_fields(tmp_path):
    text = to_toml(from_dict({"run": {"dir": "r"}, "train": {"steps": 7}})).replace("[data]\n", "[data]\nnum_workers = 4\n")
    ckpt = resolve(make(tmp_path / "step_00000001", config=text))
    assert ckpt.config.train.steps == 7  # the field removed since is dropped, not refused
    from fmtrain.export import load_config_of
    assert load_config_of(ckpt) is ckpt.config


ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def model_only(tmp_path_factory) -> Path:
    """A tiny real checkpoint every command takes: a model-only export (fmtrain's model in
    model.safetensors, config.toml, the SentencePiece tokenizer, meta.json with CRC-32s) of a
    random 2-layer model whose corpus is 12 stdlib modules."""
    import torch
    from safetensors.torch import save_file

    from fmtrain.config import save_config
    from fmtrain.data.tokenizer import load_tokenizer, tokenizer_files
    from fmtrain.model import build_model
    from tests.conftest import write_stdlib_corpus

    tmp = tmp_path_factory.mktemp("model_only")
    corpus = write_stdlib_corpus(tmp / "corpus", 12)
    tok = load_tokenizer(ROOT / "tokenizer" / "stdlib-4k.model")
    cfg = from_dict({"run": {"dir": str(tmp / "run")},
                     "model": {"vocab_size": tok.vocab_size, "dim": 32, "n_layers": 2, "n_heads": 2, "block_size": 16},
                     "data": {"corpus": [f"{corpus}/*.txt"], "cache_dir": str(tmp / "cache"), "seq_len": 64,
                              "batch_size": 2, "val_fraction": 0.25, "tokenizer": str(tok.path)}})
    torch.manual_seed(0)
    folder = tmp / "ckpt"
    folder.mkdir()
    save_config(cfg, folder)
    save_file({k: v.clone().contiguous() for k, v in build_model(cfg.model).state_dict().items()},
              folder / "model.safetensors")
    for src, name in tokenizer_files(tok.path):
        shutil.copy2(src, folder / name)
    write_meta(folder, step=0, tokens_seen=0, format="model-only", world_size=1, dp_size=1, sp_size=1, zero_stage=None)
    return folder


def _export(ckpt: Path, tmp: Path) -> None:
    from fmtrain.export import main

    assert main([str(ckpt), str(tmp / "out")]) == 0


def _hf_export(ckpt: Path, tmp: Path) -> None:
    pytest.importorskip("transformers")
    from fmtrain.hf.__main__ import main

    assert main(["export", str(ckpt), str(tmp / "hf")]) == 0


def _generate(ckpt: Path, tmp: Path) -> None:
    from fmtrain.generate import main

    assert main([str(ckpt), "--prompt", "def ", "--max-new-tokens", "2", "--greedy"]) == 0


def _eval(ckpt: Path, tmp: Path) -> None:
    from fmtrain.eval import main

    assert main([str(ckpt), "--batches", "1"]) == 0


def _init_from(ckpt: Path, tmp: Path) -> None:
    """A run's start with model.init_from: the config filled, the weights checked, then loaded."""
    from fmtrain.init_from import prepare, resolve_config
    from fmtrain.model import build_model

    cfg = resolve_config(from_dict({"run": {"dir": str(tmp / "run")}, "model": {"init_from": str(ckpt)},
                                    "data": {"seq_len": 64}}))
    prepare(cfg).load(build_model(cfg.model))


def _load_model(ckpt: Path, tmp: Path) -> None:
    from fmtrain.init_from import load_model

    load_model(ckpt)


COMMANDS = {"export": _export, "hf-export": _hf_export, "generate": _generate, "eval": _eval,
            "init_from": _init_from, "load_model": _load_model}


@pytest.mark.parametrize("command", COMMANDS)
def test_a_checkpoint_is_hashed_once_per_command(model_only, tmp_path, monkeypatch, command):
    """Every command that loads a checkpoint takes the validated value on: python -m fmtrain.export,
    python -m fmtrain.hf export, generate and eval (their main()), and model.init_from (resolve,
    prepare, load; and load_model) CRC-hash each of its files once."""
    hashed = []
    real = fmt.crc32
    monkeypatch.setattr(fmt, "crc32", lambda path: hashed.append(Path(path)) or real(path))
    monkeypatch.chdir(tmp_path)
    COMMANDS[command](model_only, tmp_path)
    source = sorted(p.name for p in hashed if p.parent == model_only)  # not the files an export writes
    assert source == sorted(json.loads((model_only / META).read_text())["crc32"])
