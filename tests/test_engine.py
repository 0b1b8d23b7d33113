"""fmtrain/engine.py's pure functions as units: the DeepSpeed JSON generated from a config, the
learning-rate factor the scheduler applies, and the check of [parallel.deepspeed]'s keys.
(The engine itself, steps, save and resume run in tests/e2e/.)"""
from types import SimpleNamespace

import pytest
import torch

from fmtrain.config import from_dict
from fmtrain.engine import deepspeed_config, deepspeed_key_errors, lr_factor


def config(**sections):
    return from_dict({"run": {"dir": "r"}, **sections})


def test_deepspeed_config_derives_the_batch_and_merges_the_users_sections():
    cfg = config(data={"batch_size": 3}, train={"grad_accum": 2, "grad_clip": 0.5}, parallel={
        "zero_stage": 2, "deepspeed": {"zero_optimization": {"overlap_comm": True}, "wall_clock_breakdown": True}})
    ds = deepspeed_config(cfg, SimpleNamespace(size=4), torch.bfloat16)
    assert ds["train_micro_batch_size_per_gpu"] == 3 and ds["gradient_accumulation_steps"] == 2
    assert ds["train_batch_size"] == 3 * 2 * 4 and ds["gradient_clipping"] == 0.5
    assert ds["zero_optimization"] == {"stage": 2, "overlap_comm": True}  # merged into, not replaced
    assert ds["bf16"] == {"enabled": True} and ds["wall_clock_breakdown"] is True
    assert deepspeed_config(cfg, SimpleNamespace(size=1), torch.float32)["bf16"] == {"enabled": False}


def test_lr_factor_warms_up_then_decays_to_min_lr():
    cfg = config(train={"steps": 10, "warmup_steps": 2, "lr": 1e-2, "min_lr": 1e-3})
    assert lr_factor(cfg, 0) == pytest.approx(0.5) and lr_factor(cfg, 1) == pytest.approx(1.0)
    assert lr_factor(cfg, 2) == pytest.approx(1.0)  # the cosine starts at the peak
    assert lr_factor(cfg, 6) == pytest.approx((1e-3 + 9e-3 * 0.5) / 1e-2)  # half way
    assert lr_factor(cfg, 10) == pytest.approx(0.1) and lr_factor(cfg, 50) == pytest.approx(0.1)  # the floor
    assert lr_factor(config(train={"lr": 0.0, "min_lr": 0.0}), 5) == 0.0


def test_deepspeed_key_errors_name_unknown_keys_and_bad_values():
    derived = {"train_batch_size": "data.batch_size x train.grad_accum x world size"}
    assert deepspeed_key_errors({"wall_clock_breakdown": True, "zero_optimization": {"overlap_comm": True}},
                                derived) == []
    errors = deepspeed_key_errors({"train_batch_sizes": 8, "zero_optimization": {"overlap_com": True}}, derived)
    assert errors[0] == ("parallel.deepspeed.train_batch_sizes is not a DeepSpeed config key. Did you mean "
                         "'train_batch_size' (set by data.batch_size x train.grad_accum x world size)?")
    assert errors[1].startswith("parallel.deepspeed.zero_optimization.overlap_com is not a DeepSpeed "
                                "zero_optimization key. Did you mean 'overlap_comm'?")
    bad = deepspeed_key_errors({"zero_optimization": {"overlap_comm": "often"}}, derived)
    assert len(bad) == 1 and bad[0].startswith("parallel.deepspeed.zero_optimization: DeepSpeed refuses it")
