"""The trainer with sequence parallelism, through its command line, against runs
without it: same data, so the same losses, gradient norms and parameters.

fp32 on CPU; the runs differ only in summation order (the SP ranks add the
gradients of their slices, collectives reorder sums), so losses and gradient
norms agree to 1e-5 relative and parameters to 1e-6 absolute after 3 steps at
lr 1e-2. AdamW runs with ``eps=1``: its update is then about ``lr * g``, linear
in the gradient, so a gradient off by a constant factor (the usual SP bug)
moves the parameters differently (with the default eps AdamW hides it), and
near-zero gradient entries cannot flip a whole ``lr`` step on rounding noise.
A constant factor also shows directly in the gradient norms.
"""
import random

import pytest
import torch

from fmtrain.checkpoint import latest_valid
from fmtrain.export import load_model_state

from tests.conftest import make_config, metrics, train

STEPS = ("--train.steps=3", "--checkpoint.interval=3", "--train.eval_batches=1", "--train.eps=1.0")


def _run(tmp_path, corpus, name, kind, nproc, *overrides):
    cfg = make_config(tmp_path, corpus, kind=kind, name=name)
    r = train(cfg, *STEPS, *overrides, nproc=nproc)
    sp = next((o.split("=")[1] for o in overrides if o.startswith("--parallel.sequence=")), "1")
    assert f"x sp {sp}," in r.stdout  # the layout really ran
    rows = [m for m in metrics(cfg) if "loss" in m]
    params = load_model_state(latest_valid(tmp_path / name / "checkpoints"))
    return [m["loss"] for m in rows], [m["grad_norm"] for m in rows], params


def _same(a, b):
    la, ga, pa = a
    lb, gb, pb = b
    assert la == pytest.approx(lb, rel=1e-5), (la, lb)
    assert ga == pytest.approx(gb, rel=1e-5), (ga, gb)
    assert pa.keys() == pb.keys()
    for key in pa:
        assert torch.allclose(pa[key].float(), pb[key].float(), rtol=0, atol=1e-6), key


@pytest.mark.parametrize("kind", ["causal", pytest.param("mlm", marks=pytest.mark.slow)])
def test_sp2_equals_one_rank(tmp_path, corpus, kind):
    one = _run(tmp_path, corpus, "one", kind, 1, "--parallel.zero_stage=1")
    sp = _run(tmp_path, corpus, "sp", kind, 2, "--parallel.zero_stage=1", "--parallel.sequence=2")
    _same(one, sp)


def test_sp2_refined_with_level_offsets_equals_one_rank(tmp_path, corpus):
    """Adaptive refinement's path (keys all-gathered, the far field of the rank's queries),
    level offsets with it: the same losses, gradient norms and parameters as one rank."""
    model = ("--model.refine=2", "--model.level_offset=true", "--parallel.zero_stage=1")
    one = _run(tmp_path, corpus, "one", "causal", 1, *model)
    sp = _run(tmp_path, corpus, "sp", "causal", 2, *model, "--parallel.sequence=2")
    _same(one, sp)


def test_sp2_document_masking_equals_one_rank(tmp_path, corpus):
    """Short documents (the stdlib modules cut at lines into pieces of 1 to 8 lines), so that
    every row holds several and they cross the ranks' boundary: their bounds gathered from the
    slices, the windows' summaries summed from both ranks. The same losses, gradient norms and
    parameters as one rank with the same masking, and not those of no masking."""
    short = tmp_path / "short"
    short.mkdir()
    rng = random.Random(0)
    for f in sorted(corpus[0].glob("*.txt")):
        lines = f.read_text().splitlines(keepends=True)
        i = 0
        while i < len(lines):
            j = i + rng.randint(1, 8)
            (short / f"{f.stem}-{i}.txt").write_text("".join(lines[i:j]))
            i = j
    short_corpus = (short, tmp_path / "cache")
    masking = ("--data.document_masking=true", "--data.position_reset=true", "--parallel.zero_stage=1")
    one = _run(tmp_path, short_corpus, "one", "causal", 1, *masking)
    sp = _run(tmp_path, short_corpus, "sp", "causal", 2, *masking, "--parallel.sequence=2")
    _same(one, sp)
    # The masking is real: the rows these runs read hold documents that start past a row's first
    # token, and some of them inside the second rank's slice (a document across the ranks).
    from fmtrain.config import load_config
    from fmtrain.data import loaders_for
    from fmtrain.parallel import World

    cfg = load_config(tmp_path / "sp" / "config.toml", [])
    world = World(rank=0, local_rank=0, size=1, sp_size=1, device=torch.device("cpu"), backend="gloo")
    rows = torch.cat([loaders_for(cfg, world, eval_max_batches=1, progress=False).train.next_batch()["doc_positions"]
                      for _ in range(3)])
    starts = rows[:, 1:] == 0  # (rows, n - 1): a document starts at token j + 1
    assert starts.any(1).all() and starts[:, 64:].any(), rows


@pytest.mark.slow
@pytest.mark.parametrize("zero", [2, 3])  # ZeRO 1 takes ZeRO 2's optimizer class and files in DeepSpeed
def test_sp2_x_dp2_equals_dp2(tmp_path, corpus, zero):
    dp = _run(tmp_path, corpus, "dp", "causal", 2, f"--parallel.zero_stage={zero}")
    spdp = _run(tmp_path, corpus, "spdp", "causal", 4, f"--parallel.zero_stage={zero}", "--parallel.sequence=2")
    _same(dp, spdp)


@pytest.mark.slow
def test_sp_resume_is_exact(tmp_path, corpus):
    sp = ("--parallel.sequence=2", "--parallel.zero_stage=2")
    straight = make_config(tmp_path, corpus, kind="causal", name="straight")
    r = train(straight, "--train.steps=4", *sp, nproc=2)
    assert "FutureWarning" not in r.stderr, r.stderr[-3000:]  # DeepSpeed's ZeRO 2 call torch deprecates
    split = make_config(tmp_path, corpus, kind="causal", name="split")
    train(split, "--train.steps=4", "--train.stop_at_step=2", *sp, nproc=2)
    train(split, "--train.steps=4", *sp, nproc=2)
    assert [m["loss"] for m in metrics(split) if "loss" in m] == [m["loss"] for m in metrics(straight) if "loss" in m]
