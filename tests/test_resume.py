"""fmtrain/resume.py as a unit: what a resume may change, on pairs of configs (the checkpoint's
and the new one), without a run. (Resumes themselves run in tests/e2e/.)"""
from pathlib import Path

import pytest

from fmtrain.checkpoint import Checkpoint
from fmtrain.config import ConfigError, from_dict
from fmtrain.resume import differences, reconcile


def config(**sections):
    base = {"run": {"dir": "r"}, "train": {"steps": 10, "lr": 1e-2, "min_lr": 1e-3, "warmup_steps": 2}}
    return from_dict({**base, **{k: {**base.get(k, {}), **v} for k, v in sections.items()}})


def saved(cfg) -> Checkpoint:
    """A checkpoint whose config is ``cfg`` (its files are not read)."""
    return Checkpoint(Path("r/checkpoints/step_00000004"), {"step": 4}, _config=cfg)


def test_the_same_config_resumes_without_a_note():
    assert reconcile(saved(config()), config()).notes == []


def test_fields_that_steer_the_run_change_and_are_noted():
    r = reconcile(saved(config()), config(train={"steps": 20, "log_interval": 5}, checkpoint={"keep": 4}))
    assert r.notes == ["checkpoint.keep: 3 -> 4", "train.log_interval: 10 -> 5",
                       "train.steps: 10 -> 20 (the cosine schedule now ends there)"] and r.applied == []


def test_what_the_state_was_made_with_is_refused_unless_allowed():
    new = config(train={"lr": 2e-2})
    with pytest.raises(ConfigError, match=r"train.lr: 0.01 -> 0.02: the checkpoint's state was made with the old "
                                          r"value .* add --checkpoint.allow_changes=train.lr"):
        reconcile(saved(config()), new)
    r = reconcile(saved(config()), config(train={"lr": 2e-2}, checkpoint={"allow_changes": ["train.lr"]}))
    assert r.applied == ["train.lr"] and "train.lr: 0.01 -> 0.02 (allowed, applied from this step on)" in r.notes


def test_what_cannot_change_is_refused_with_every_field_named():
    new = config(model={"dim": 1536}, data={"seq_len": 4096})
    with pytest.raises(ConfigError) as e:
        reconcile(saved(config()), new)
    text = str(e.value)
    assert "model.dim: 768 -> 1536: model.dim changes the model's shape" in text
    assert "data.seq_len: 2048 -> 4096: data.seq_len changes the data stream" in text
    assert "r/checkpoints/step_00000004/config.toml" in text


def test_batch_size_follows_resplit():
    with pytest.raises(ConfigError, match="set --checkpoint.resplit=true"):
        reconcile(saved(config()), config(data={"batch_size": 16}))
    r = reconcile(saved(config()), config(data={"batch_size": 16}, checkpoint={"resplit": True}))
    assert r.applied == ["data.batch_size"]


def test_derived_fields_compare_by_value_and_one_file_named_two_ways_is_no_change(tmp_path):
    tok = tmp_path / "tok.model"
    tok.write_bytes(b"x")
    (tmp_path / "link.model").symlink_to(tok)
    old = config(model={"n_heads": 4}, data={"tokenizer": str(tok)})
    new = config(model={"n_heads": 4, "n_kv_heads": 4}, data={"tokenizer": str(tmp_path / "link.model")})
    assert differences(old, new) == []
