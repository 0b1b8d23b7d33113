"""Config: TOML loading, dotted overrides, validation messages, save/load round trip."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from fmtrain.config import (CONFIG_FILE, Config, ConfigError, ModelConfig, apply_overrides, describe, from_dict,
                            load_config, parse_args, save_config, to_toml)
from fmtrain.config.loading import tomllib

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "configs").glob("*.toml"))

BASE = """
[run]
dir = "runs/test"

[model]
dim = 64
n_layers = 2
n_heads = 4
vocab_size = 256
block_size = 16

[data]
seq_len = 256
"""


def write(tmp_path: Path, text: str = BASE, name: str = "c.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def error_of(fn, *args) -> str:
    with pytest.raises(ConfigError) as info:
        fn(*args)
    return str(info.value)


# --------------------------------------------------------------------------- loading
@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_load(path):
    cfg = load_config(path)
    assert cfg.run.dir == f"runs/{path.stem}"
    assert cfg.data.seq_len % cfg.model.block_size == 0
    if cfg.data.tokenizer:  # a shipped tokenizer must have the model's vocabulary size
        settings = json.loads((ROOT / cfg.data.tokenizer).with_suffix(".json").read_text())
        assert settings["vocab_size"] == cfg.model.vocab_size


def test_shipped_configs_and_their_tokenizers_are_found_from_any_directory(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    cfg = load_config("configs/tiny-gpt.toml")  # not in tmp_path: fmtrain's own, said on stderr
    assert "using fmtrain's own" in capsys.readouterr().err
    assert cfg.data.tokenizer == str(ROOT / "tokenizer" / "stdlib-4k.model")
    assert cfg.run.dir == "runs/tiny-gpt"  # outputs stay where the user runs
    # A user's config finds a tokenizer beside it; one in the working directory comes first.
    (tmp_path / "exp").mkdir()
    (tmp_path / "exp" / "tok.model").write_bytes(b"x")
    (tmp_path / "exp" / "run.toml").write_text('[run]\ndir = "r"\n[data]\ntokenizer = "tok.model"\n')
    assert load_config(tmp_path / "exp" / "run.toml").data.tokenizer == str(tmp_path / "exp" / "tok.model")
    (tmp_path / "tok.model").write_bytes(b"x")
    assert load_config(tmp_path / "exp" / "run.toml").data.tokenizer == "tok.model"
    # Found nowhere: left as written, for the trainer's error, which names where it looked.
    (tmp_path / "exp" / "run.toml").write_text('[run]\ndir = "r"\n[data]\ntokenizer = "missing.model"\n')
    assert load_config(tmp_path / "exp" / "run.toml").data.tokenizer == "missing.model"
    assert "Configs in" in error_of(load_config, "configs/nothing.toml")


def test_the_four_configs_exist():
    assert {p.name for p in CONFIGS} >= {"tiny-gpt.toml", "tiny-mlm.toml", "gpt-125m-128k.toml",
                                         "mlm-125m-128k.toml"}
    assert load_config(ROOT / "configs/tiny-mlm.toml").model.kind == "mlm"
    big = load_config(ROOT / "configs/gpt-125m-128k.toml")
    assert (big.data.seq_len, big.train.dtype, big.parallel.zero_stage) == (131072, "bf16", 2)


def test_load_reads_values_and_keeps_defaults(tmp_path):
    cfg = load_config(write(tmp_path))
    assert (cfg.model.dim, cfg.model.n_heads, cfg.data.seq_len) == (64, 4, 256)
    assert cfg.train.betas == [0.9, 0.95] and cfg.model.n_kv_heads is None
    assert cfg.name == "test"
    assert cfg.checkpoint_dir == Path("runs/test/checkpoints")


def test_int_is_accepted_for_float_and_string_for_string_list(tmp_path):
    cfg = load_config(write(tmp_path, BASE + '\n[train]\nlr = 1\n'), ["--data.corpus=stdlib"])
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    cfg = load_config(write(tmp_path, BASE.replace("[data]", '[data]\ncorpus = "a/*.txt"')))
    assert cfg.data.corpus == ["a/*.txt"]


# --------------------------------------------------------------------------- overrides
def test_overrides_parse_to_field_types(tmp_path):
    cfg = load_config(write(tmp_path), [
        "--train.steps=7", "--train.lr=2e-3", "--model.tie_embeddings=false", "--model.attention=sdpa",
        "--model.n_kv_heads=2", "--train.betas=0.8,0.99", "--data.corpus=a.txt,b/*.jsonl",
        "--train.max_minutes", "1.5",  # space-separated form
        "--parallel.deepspeed.zero_optimization.overlap_comm=true",
        "--parallel.deepspeed.wall_clock_breakdown=false",
    ])
    assert cfg.train.steps == 7 and cfg.train.lr == 2e-3
    assert cfg.model.tie_embeddings is False and cfg.model.attention == "sdpa"
    assert cfg.model.n_kv_heads == 2 and cfg.train.betas == [0.8, 0.99]
    assert cfg.data.corpus == ["a.txt", "b/*.jsonl"] and cfg.train.max_minutes == 1.5
    assert cfg.parallel.deepspeed == {"zero_optimization": {"overlap_comm": True},
                                      "wall_clock_breakdown": False}


def test_optional_override_to_none(tmp_path):
    path = write(tmp_path, BASE.replace("n_heads = 4", "n_heads = 4\nn_kv_heads = 2"))
    assert load_config(path).model.n_kv_heads == 2
    assert load_config(path, ["--model.n_kv_heads=none"]).model.n_kv_heads is None


def test_override_does_not_mutate_input():
    data = {"run": {"dir": "r"}, "parallel": {"deepspeed": {"a": {"b": 1}}}}
    apply_overrides(data, ["--run.dir=x", "--parallel.deepspeed.a.c=2"])
    assert data == {"run": {"dir": "r"}, "parallel": {"deepspeed": {"a": {"b": 1}}}}


@pytest.mark.parametrize("arg, expect", [
    ("--train.stpes=5", "unknown field train.stpes in --train.stpes=5. Did you mean 'steps'?"),
    ("--trian.steps=5", "unknown section in --trian.steps=5. Did you mean 'train'?"),
    ("--train.steps=five", "train.steps: expected an integer, got 'five'"),
    ("--train.lr=fast", "train.lr: expected a number, got 'fast'"),
    ("--model.tie_embeddings=maybe", "model.tie_embeddings: expected true or false, got 'maybe'"),
    ("--train.steps", "--train.steps has no value: write --train.steps=VALUE"),
    ("train.steps=5", "overrides look like --section.field=value"),
    ("--train.steps.x=1", "train.steps is a int, not a table"),
])
def test_bad_overrides_say_what_to_write(tmp_path, arg, expect):
    assert expect in error_of(load_config, write(tmp_path), [arg])


# --------------------------------------------------------------------------- validation
@pytest.mark.parametrize("extra, expect", [
    ("[modle]\ndim = 3", "unknown section [modle]. Did you mean 'model'?"),
    ("[train]\nstep = 3", "unknown field train.step. Did you mean 'steps'?"),
    ("[train]\nsteps = \"100\"", "train.steps: expected int, got str '100' (write it without quotes: 100)"),
    ("[train]\nsteps = 1.5", "train.steps: expected int, got float 1.5"),
    ("[train]\nbetas = 0.9", "train.betas: expected a list of float"),
    ("[train]\nsteps = 0", "train.steps=0 is below its minimum 1"),
    ("[parallel]\nzero_stage = 4", "parallel.zero_stage=4 is above its maximum 3"),
    ("[train]\ndtype = \"bfloat16\"",
     "train.dtype='bfloat16' is not one of 'auto', 'fp32', 'bf16'. Did you mean 'bf16'?"),
    ("[train]\nlr = 1e-3\nmin_lr = 1e-2", "train.min_lr=0.01 is above train.lr=0.001"),
    ("[train]\nbetas = [0.9, 1.5]", "train.betas=[0.9, 1.5] must be two numbers in [0, 1)"),
    ("[parallel]\nsequence = 3", "data.seq_len=256 is not divisible by parallel.sequence=3"),
    ("[parallel]\nsequence = 32",
     "each rank holds data.seq_len/sequence = 8 tokens, which must be model.block_size=16 times a "
     "power of two; make data.seq_len 32 * 16 * 2**j, e.g. 512"),
    ("[parallel.deepspeed]\ntrain_batch_size = 8", "parallel.deepspeed.train_batch_size is generated"),
    ("[parallel.deepspeed.zero_optimization]\nstage = 3", "set parallel.zero_stage instead"),
])
def test_invalid_values_name_field_and_fix(tmp_path, extra, expect):
    assert expect in error_of(load_config, write(tmp_path, BASE + "\n" + extra))


@pytest.mark.parametrize("model, expect", [
    ({"dim": 100, "n_heads": 3}, "model.n_heads=3 does not divide model.dim=100; choose n_heads among "
                                 "[1, 2, 4, 5, 10, 20, 25, 50]"),
    ({"dim": 36, "n_heads": 4}, "head dim model.dim/model.n_heads = 9 is odd"),
    ({"n_heads": 4, "n_kv_heads": 3}, "model.n_kv_heads=3 does not divide model.n_heads=4"),
    ({"block_size": 16, "rank": 3}, "model.rank=3 does not divide model.block_size=16"),
    ({"summary": "conv"}, "model.summary='conv' needs model.max_seq_len"),
    ({"summary": "conv", "max_seq_len": 128}, "model.max_seq_len=128 is shorter than data.seq_len=256"),
])
def test_inconsistent_model_fields(model, expect):
    data = {"run": {"dir": "r"}, "model": {"dim": 64, "n_heads": 4, **model}, "data": {"seq_len": 256}}
    assert expect in error_of(from_dict, data)


def test_sequence_parallel_slices_are_power_of_two_blocks():
    data = {"run": {"dir": "r"}, "model": {"block_size": 16}, "data": {"seq_len": 768},
            "parallel": {"sequence": 2}}
    assert "384 tokens, which must be model.block_size=16 times a power of two" in error_of(from_dict, data)
    data["data"]["seq_len"] = 1024
    assert from_dict(data).parallel.sequence == 2


def test_mlm_needs_mask_prob_and_sdpa_no_sequence_parallel():
    msg = error_of(from_dict, {"run": {"dir": "r"}, "model": {"kind": "mlm"}, "data": {"mask_prob": 0.0}})
    assert "data.mask_prob=0.0: a masked LM needs 0 < mask_prob < 1" in msg
    msg = error_of(from_dict, {"run": {"dir": "r"}, "model": {"attention": "sdpa"},
                               "parallel": {"sequence": 2}})
    assert "use --parallel.sequence=1 for the sdpa baseline" in msg


def test_level_offsets_and_window_rope_are_single_device_without_refinement():
    for model in ({"level_offset": True}, {"summary_rope": "window"}):
        data = {"run": {"dir": "r"}, "model": {"block_size": 16, **model}, "data": {"seq_len": 1024},
                "parallel": {"sequence": 2}}
        assert "have no sequence-parallel path yet without refinement; use parallel.sequence=1" in \
            error_of(from_dict, data)
        data["model"]["refine"] = 2  # refinement's path gathers the keys: both work there
        assert from_dict(data).model.refine == 2
        data["model"]["refine"], data["parallel"]["sequence"] = 0, 1
        assert from_dict(data).model.level_offset == model.get("level_offset", False)
    assert "model.summary_rope" in error_of(from_dict, {"run": {"dir": "r"}, "model": {"summary_rope": "mid"}})


def test_document_masking_and_position_reset():
    base = {"run": {"dir": "r"}, "model": {"block_size": 16}, "data": {"seq_len": 1024}}
    assert (from_dict(base).data.document_masking, from_dict(base).data.position_reset) == (False, False)
    msg = error_of(from_dict, {**base, "data": {"position_reset": True}})
    assert len(msg.splitlines()) == 1, msg
    assert "data.position_reset" in msg and "set data.document_masking=true, or data.position_reset=false" in msg
    both = {**base, "data": {"seq_len": 1024, "document_masking": True, "position_reset": True}}
    assert from_dict(both).data.position_reset
    assert from_dict({**both, "parallel": {"sequence": 2}}).parallel.sequence == 2  # nlogn, m2m: runs
    msg = error_of(from_dict, {**both, "parallel": {"sequence": 2},
                               "model": {"block_size": 16, "variant": "linear", "refine": 0}})
    assert len(msg.splitlines()) == 1, msg
    assert "document masking with parallel.sequence > 1 runs the nlogn variant with m2m or mean summaries " \
           "(refined or not); model.variant='linear' has no such path yet" in msg and "set parallel.sequence=1" in msg
    refined_sp = from_dict({**both, "parallel": {"sequence": 2}, "model": {"block_size": 16, "refine": 2}})
    assert refined_sp.model.refine == 2 and refined_sp.parallel.sequence == 2
    refined = from_dict({**both, "model": {"block_size": 16, "refine": 2}})  # fma masks refined attention too
    assert refined.model.refine == 2 and refined.data.document_masking


def test_align_documents():
    masked = {"run": {"dir": "r"}, "model": {"block_size": 16}, "data": {"seq_len": 1024, "document_masking": True}}
    assert not from_dict(masked).data.align_documents
    aligned = {**masked, "data": {**masked["data"], "align_documents": True}}
    assert from_dict(aligned).data.align_documents
    for change, says in (({"data": {"seq_len": 1024, "align_documents": True}}, "set data.document_masking=true"),
                         ({"model": {"block_size": 16, "kind": "mlm"}}, "bidirectional model (model.kind='mlm')"),
                         ({"data": {**aligned["data"], "seq_len": 1000}},
                          "model.block_size=16, which must divide data.seq_len=1000")):
        msg = error_of(from_dict, {**aligned, **change})
        assert len(msg.splitlines()) == 1 and says in msg and "data.align_documents=false" in msg, msg


def test_corpus_list():
    msg = error_of(from_dict, {"run": {"dir": "r"}, "data": {"corpus": ["stdlib", "x.txt"]}})
    assert "data.corpus=['stdlib', 'x.txt']: 'stdlib' cannot be combined with other sources" in msg
    assert "data.corpus is empty" in error_of(from_dict, {"run": {"dir": "r"}, "data": {"corpus": []}})


def test_all_errors_are_reported_at_once():
    msg = error_of(from_dict, {"model": {"dim": 100, "n_heads": 3}, "train": {"lr": 0.1, "min_lr": 0.2}})
    assert msg.startswith("invalid config:\n")
    assert "run.dir is required" in msg and "does not divide model.dim" in msg and "min_lr=0.2" in msg


def test_missing_file_and_bad_toml(tmp_path):
    assert "does not exist" in error_of(load_config, tmp_path / "nope.toml")
    bad = write(tmp_path, "[run\ndir = 1")
    assert f"{bad} is not valid TOML" in error_of(load_config, bad)


def test_check_world():
    cfg = from_dict({"run": {"dir": "r"}, "parallel": {"sequence": 4}})
    cfg.check_world(8)
    msg = error_of(cfg.check_world, 6)
    assert "parallel.sequence=4 does not divide the world size 6" in msg and "--parallel.sequence=2" in msg


# --------------------------------------------------------------------------- save / load
def test_save_load_round_trip(tmp_path):
    cfg = load_config(write(tmp_path), [
        "--run.name=ünïcode \"quoted\" \\ name", "--model.n_kv_heads=2", "--model.summary=conv",
        "--model.max_seq_len=4096", "--train.lr=1.25e-05", "--train.min_lr=1e-7", "--train.max_minutes=0.5",
        "--data.corpus=x.txt,more/*.jsonl", "--parallel.deepspeed.zero_optimization.overlap_comm=true",
        "--parallel.deepspeed.comms_logger={enabled = true, verbose = false, prof_ops = ['a', 'b']}",
    ])
    path = save_config(cfg, tmp_path / "run")
    assert path == tmp_path / "run" / CONFIG_FILE
    back = load_config(path)
    assert back == cfg
    assert back.train.lr == 1.25e-05 and back.run.name == 'ünïcode "quoted" \\ name'
    assert back.parallel.deepspeed["comms_logger"]["prof_ops"] == ["a", "b"]
    assert save_config(back, tmp_path / "again").read_text() == path.read_text()
    assert not list((tmp_path / "run").glob("*.tmp"))  # the atomic write left nothing behind


def test_round_trip_of_defaults_keeps_none():
    cfg = from_dict({"run": {"dir": "r"}})
    assert cfg.model.n_kv_heads is None and cfg.train.max_minutes is None
    assert from_dict(tomllib.loads(to_toml(cfg))) == cfg


def test_a_comment_goes_above_its_field_and_the_config_reads_back_equal():
    cfg = from_dict({"run": {"dir": "r"}})
    text = to_toml(cfg, {"data.tokenizer": "where it is\nand a second line"})
    assert "[data]" in text and "# where it is\n# and a second line\ntokenizer = \"\"\n" in text
    assert from_dict(tomllib.loads(text)) == cfg
    with pytest.raises(ValueError, match=r"comments for fields the config does not write: \['data.tokeniser'\]"):
        to_toml(cfg, {"data.tokeniser": "typo"})


# --------------------------------------------------------------------------- command line
def test_parse_args(tmp_path, capsys):
    cfg = parse_args([str(write(tmp_path)), "--train.steps=3"])
    assert isinstance(cfg, Config) and cfg.train.steps == 3
    with pytest.raises(SystemExit) as info:
        parse_args([str(write(tmp_path)), "--train.stesp=3"])
    assert info.value.code == 2 and "Did you mean 'steps'?" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        parse_args(["--train.steps=3"])
    assert info.value.code == 2 and "first argument must be a TOML config file" in capsys.readouterr().err


def test_help_lists_every_field_with_its_doc(capsys):
    with pytest.raises(SystemExit) as info:
        parse_args(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for sec in dataclasses.fields(Config):
        for f in dataclasses.fields(getattr(Config(), sec.name)):
            assert f.metadata["help"], f"{sec.name}.{f.name} has no help text"
            assert f"--{sec.name}.{f.name}  (" in out
    assert describe() in out


def test_model_choices_follow_the_attention_package():
    from fmtrain.attention import IMPLS, SUMMARY_KINDS, VARIANTS
    choices = {f.name: f.metadata["choices"] for f in dataclasses.fields(ModelConfig)}
    assert set(choices["impl"]) == set(IMPLS)
    assert set(choices["variant"]) == set(VARIANTS)
    assert set(choices["summary"]) == set(SUMMARY_KINDS)


def test_max_level_caps_multipole_attention_only():
    base = {"run": {"dir": "r"}, "data": {"seq_len": 1024}}
    assert from_dict({**base, "model": {"max_level": 3}}).model.max_level == 3
    assert from_dict(base).model.max_level is None
    msg = error_of(from_dict, {**base, "model": {"max_level": 3, "attention": "sdpa"}})
    assert "model.max_level=3 caps multipole attention's coarse levels; model.attention='sdpa' has none" in msg
    assert "model.max_level" in error_of(from_dict, {**base, "model": {"max_level": 0}})


def test_select_reach_needs_refinement():
    base = {"run": {"dir": "r"}, "data": {"seq_len": 1024}}
    assert from_dict({**base, "model": {"refine": 2, "select_reach": 1024}}).model.select_reach == 1024
    msg = error_of(from_dict, {**base, "model": {"select_reach": 1024}})
    assert "model.select_reach=1024 changes adaptive refinement's selection" in msg
    assert "model.select_reach" in error_of(from_dict, {**base, "model": {"refine": 2, "select_reach": 0}})
    assert from_dict({**base, "model": {"refine": 2, "select_reach": 1024, "attend_reach": True}}).model.attend_reach
    msg = error_of(from_dict, {**base, "model": {"refine": 2, "attend_reach": True}})
    assert "model.attend_reach=true reads the far field as at model.select_reach, which is not set" in msg


def test_flat_top_needs_refinement():
    base = {"run": {"dir": "r"}, "data": {"seq_len": 1024}}
    assert from_dict({**base, "model": {"max_level": 3, "refine": 2, "flat_top": True}}).model.flat_top
    msg = error_of(from_dict, {**base, "model": {"max_level": 3, "flat_top": True}})
    assert "model.flat_top=true" in msg and "model.refine > 0" in msg


def test_refine_needs_nlogn_multipole_attention():
    base = {"run": {"dir": "r"}, "data": {"seq_len": 1024}}
    assert from_dict({**base, "model": {"refine": 4}}).model.refine == 4
    msg = error_of(from_dict, {**base, "model": {"refine": 4, "attention": "local"}})
    assert "model.refine=4 refines multipole attention; it needs model.attention='fma'" in msg
    msg = error_of(from_dict, {**base, "model": {"refine": 4, "variant": "linear"}})
    assert "model.refine > 0 needs model.variant='nlogn'" in msg
    sp = from_dict({**base, "model": {"refine": 4, "block_size": 16}, "parallel": {"sequence": 2}})
    assert (sp.model.refine, sp.parallel.sequence) == (4, 2)
    assert "model.refine" in error_of(from_dict, {**base, "model": {"refine": -1}})
