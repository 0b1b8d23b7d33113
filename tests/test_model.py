"""Models: every attention kind x both model kinds, chunked loss, causality, FLOPs, long steps."""
from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from fmtrain.attention.hierarchy import hierarchy
from fmtrain.config import ModelConfig
from fmtrain.model import (IGNORE_INDEX, CausalLM, MaskedLM, attention_scores_per_query, build_model,
                           chunked_cross_entropy, flops_per_token)

ROOT = Path(__file__).resolve().parents[1]
ATTENTIONS = ("fma", "sdpa", "local")
KINDS = ("causal", "mlm")


def small(**kw) -> ModelConfig:
    """A model small enough for float64 checks; 96 tokens at block 16 give fma 2 coarse levels."""
    base = dict(vocab_size=61, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, block_size=16, rank=2,
                loss_chunk=37)
    return ModelConfig(**{**base, **kw})


def build(seed: int = 0, dtype=torch.float64, **kw):
    torch.manual_seed(seed)
    return build_model(small(**kw)).to(dtype)


def batch(n: int = 96, B: int = 2, vocab: int = 61, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (B, n), generator=g)
    targets = torch.randint(0, vocab, (B, n), generator=g)
    targets[0, :5] = IGNORE_INDEX
    return ids, targets


def grads(model) -> dict[str, torch.Tensor]:
    return {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


# --------------------------------------------------------------------------- forward / backward
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("attention", ATTENTIONS)
def test_forward_backward_every_kind(attention, kind):
    model = build(attention=attention, kind=kind, dtype=torch.float32)
    assert isinstance(model, CausalLM if kind == "causal" else MaskedLM)
    ids, targets = batch()
    loss_sum, count = model(ids, targets)
    assert count.item() == targets.numel() - 5
    mean = loss_sum / count
    # Near-uniform predictions at init: the loss is close to log(vocab).
    assert abs(mean.item() - math.log(61)) < 0.3
    mean.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, f"{name} has an all-zero gradient"
    if attention == "fma":  # the learned summaries take part
        assert any("summaries" in name for name, _ in model.named_parameters())


def test_logits_match_loss():
    model = build()
    ids, targets = batch()
    logits = model.logits(ids)
    assert logits.shape == (2, 96, 61)
    expect = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum")
    loss_sum, _ = model(ids, targets)
    torch.testing.assert_close(loss_sum, expect, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_token_logprobs_and_logits_at_are_the_full_logits(dtype):
    """The per-token log-likelihood (in chunks that do not divide the sequence) is the full logits'
    log_softmax at each target; logits_at is the full logits at the chosen positions and tokens."""
    model = build(dtype=dtype).eval()
    ids, _ = batch()
    targets = torch.roll(ids, -1, dims=1)
    full = model.logits(ids)
    want = torch.log_softmax(full.double(), -1).gather(-1, targets[..., None])[..., 0]
    got = model.token_logprobs(ids, targets, chunk=50)
    assert got.shape == (2, 96) and got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12 if dtype == torch.float64 else 1e-5)
    where = torch.zeros_like(ids, dtype=torch.bool)
    where[0, 3] = where[1, 40:] = True
    vocab = torch.tensor([5, 7, 60])
    at = model.logits_at(ids, where, vocab)
    assert at.shape == (57, 3) and at.dtype == full.dtype
    torch.testing.assert_close(at, full[where][:, vocab], rtol=0, atol=1e-12 if dtype == torch.float64 else 1e-5)


def test_bad_inputs_are_named():
    model = build(dtype=torch.float32)
    ids, targets = batch()
    with pytest.raises(ValueError, match="targets .* must have the shape of input_ids"):
        model(ids, targets[:, :10])
    with pytest.raises(ValueError, match="input_ids must be integer"):
        model(ids.float(), targets)


# --------------------------------------------------------------------------- chunked loss
def test_chunked_loss_equals_unchunked_float64():
    """Loss and both gradients equal the plain full-logits cross-entropy to 1e-12 (float64)."""
    g = torch.Generator().manual_seed(0)
    h = torch.randn(3, 50, 16, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(40, 16, dtype=torch.float64, generator=g, requires_grad=True)
    t = torch.randint(0, 40, (3, 50), generator=g)
    t[1, ::3] = IGNORE_INDEX
    upstream = 0.37  # a non-unit incoming gradient must scale the stored ones
    ref = F.cross_entropy((h @ w.t()).flatten(0, 1), t.flatten(), reduction="sum")
    ref_dh, ref_dw = torch.autograd.grad(ref * upstream, (h, w))
    for chunk in (1, 7, 50, 1000):
        loss, count = chunked_cross_entropy(h, w, t, chunk)
        dh, dw = torch.autograd.grad(loss * upstream, (h, w))
        assert count.item() == (t != IGNORE_INDEX).sum().item()
        torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(dh, ref_dh, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(dw, ref_dw, rtol=1e-12, atol=1e-12)


def test_model_loss_independent_of_chunk():
    ids, targets = batch()
    results = []
    for chunk in (5, 37, 10_000):
        model = build(loss_chunk=chunk)
        loss, _ = model(ids, targets)
        loss.backward()
        results.append((loss.detach(), grads(model)))
    for loss, g in results[1:]:
        torch.testing.assert_close(loss, results[0][0], rtol=1e-12, atol=1e-12)
        for k in g:
            torch.testing.assert_close(g[k], results[0][1][k], rtol=1e-10, atol=1e-12)


def test_chunked_loss_without_grad_and_all_ignored():
    h = torch.randn(10, 8)
    w = torch.randn(20, 8)
    t = torch.full((10,), IGNORE_INDEX)
    with torch.no_grad():
        loss, count = chunked_cross_entropy(h, w, t, 3)
    assert loss.item() == 0.0 and count.item() == 0 and not loss.requires_grad


# --------------------------------------------------------------------------- direction
@pytest.mark.parametrize("attention", ATTENTIONS)
def test_causal_output_independent_of_later_tokens(attention):
    model = build(attention=attention, kind="causal")
    ids, _ = batch(n=96, B=1)
    later = ids.clone()
    later[0, 50:] = (later[0, 50:] + 1) % 61
    a, b = model.logits(ids), model.logits(later)
    torch.testing.assert_close(a[:, :50], b[:, :50], rtol=0, atol=1e-12)
    assert (a[:, 50:] - b[:, 50:]).abs().max() > 1e-3  # and the change does reach later positions


@pytest.mark.parametrize("attention", ATTENTIONS)
def test_mlm_sees_both_directions(attention):
    model = build(attention=attention, kind="mlm")
    ids, _ = batch(n=96, B=1)
    # Change a token inside the neighbourhood of position 20 on each side: both move it.
    for pos in (10, 30):
        other = ids.clone()
        other[0, pos] = (other[0, pos] + 1) % 61
        assert (model.logits(ids)[0, 20] - model.logits(other)[0, 20]).abs().max() > 1e-4, pos


def test_fma_mlm_sees_far_tokens_local_does_not():
    """Position 0 sees the last token through coarse summaries with fma, not with local."""
    ids, _ = batch(n=96, B=1)
    other = ids.clone()
    other[0, -1] = (other[0, -1] + 1) % 61
    for attention, sees in (("fma", True), ("local", False)):
        model = build(attention=attention, kind="mlm", n_layers=1)
        diff = (model.logits(ids)[0, 0] - model.logits(other)[0, 0]).abs().max().item()
        assert (diff > 1e-8) == sees, (attention, diff)


@pytest.mark.parametrize("refine", [0, 2])
def test_max_level_caps_the_coarse_levels_as_cap_levels_does(refine):
    """model.max_level (config) and cap_levels (a trained model) give one model: levels above the cap
    gone (the first token no longer reaches the last query), at or above the sequence's levels no change."""
    from fmtrain.model import cap_levels, trained_levels

    ids, _ = batch(n=256, B=1)  # 16 blocks of 16: 3 coarse levels
    assert trained_levels(small(), 256) == hierarchy(256, 16, 2, True).n_levels == 3
    assert trained_levels(small(max_level=2), 256) == 2
    full = build(refine=refine)
    capped = build(refine=refine, max_level=1)
    assert [l.max_level for l in capped.modules() if hasattr(l, "refine")] == [1, 1]
    later = build(refine=refine)
    cap_levels(later, 1)
    assert torch.equal(capped.logits(ids), later.logits(ids))
    other = ids.clone()
    other[0, 0] = (other[0, 0] + 1) % 61
    assert torch.equal(capped.logits(ids)[0, -1], capped.logits(other)[0, -1])  # position 0: beyond reach
    assert not torch.equal(full.logits(ids)[0, -1], full.logits(other)[0, -1])
    cap_levels(later, 3)
    assert torch.equal(later.logits(ids), full.logits(ids))
    with pytest.raises(ValueError, match="keep at least level 1"):
        cap_levels(later, 0)


def test_flat_top_keeps_the_reach_that_max_level_drops():
    """model.flat_top with model.max_level (config) and cap_levels(..., flat_top=True) give one
    model; position 0 reaches the last query again through the flat top level, and a model
    without refinement refuses the flag."""
    from fmtrain.model import cap_levels

    ids, _ = batch(n=256, B=1)  # 3 coarse levels; capped at 1
    flat = build(refine=2, max_level=1, flat_top=True)
    later = build(refine=2)
    cap_levels(later, 1, flat_top=True)
    assert torch.equal(flat.logits(ids), later.logits(ids))
    other = ids.clone()
    other[0, 0] = (other[0, 0] + 1) % 61
    assert not torch.equal(flat.logits(ids)[0, -1], flat.logits(other)[0, -1])  # position 0 is seen again
    cap_levels(later, 1, flat_top=False)
    assert torch.equal(later.logits(ids)[0, -1], later.logits(other)[0, -1])
    with pytest.raises(ValueError, match="flat_top needs a model with adaptive refinement"):
        cap_levels(build(refine=0), 1, flat_top=True)


@pytest.mark.parametrize("attention", ["fma", "sdpa"])
def test_scale_rope_on_a_trained_model_equals_the_configured_scaling(attention):
    from fmtrain.model import scale_rope

    llama3 = {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 64}
    ids, _ = batch(n=256, B=1)
    configured = build(attention=attention, rope_scaling=llama3)
    later = build(attention=attention)
    plain = later.logits(ids)
    scale_rope(later, llama3)
    assert torch.equal(configured.logits(ids), later.logits(ids))
    assert not torch.equal(plain, later.logits(ids))
    scale_rope(later, None)
    assert torch.equal(plain, later.logits(ids))
    with pytest.raises(ValueError, match="is not one of"):
        scale_rope(later, {"rope_type": "yarn", "factor": 4.0})


def test_select_reach_as_configured_or_set_later_and_refused_without_refinement():
    from fmtrain.model import set_select_reach

    ids, _ = batch(n=256, B=1)
    configured = build(refine=2, select_reach=40)
    later = build(refine=2)
    plain = later.logits(ids)
    set_select_reach(later, 40)
    assert torch.equal(configured.logits(ids), later.logits(ids))
    assert not torch.equal(plain, later.logits(ids))
    set_select_reach(later, 256)  # at least the sequence: nothing changes
    assert torch.equal(plain, later.logits(ids))
    with pytest.raises(ValueError, match="needs a distance >= 1 and a model with adaptive refinement"):
        set_select_reach(build(refine=0), 40)


def test_attend_reach_as_configured_or_set_later():
    from fmtrain.model import set_select_reach

    ids, _ = batch(n=256, B=1)
    configured = build(refine=2, select_reach=40, attend_reach=True)
    later = build(refine=2, select_reach=40)
    selection_only = later.logits(ids)
    set_select_reach(later, 40, attend=True)
    assert torch.equal(configured.logits(ids), later.logits(ids))
    assert not torch.equal(selection_only, later.logits(ids))
    set_select_reach(later, 256, attend=True)  # at least the sequence: nothing turns
    set_select_reach(configured, None)
    assert torch.equal(configured.logits(ids), later.logits(ids))
    with pytest.raises(ValueError, match="give a select_reach distance too"):
        set_select_reach(later, None, attend=True)


# --------------------------------------------------------------------------- positions and lengths
def test_global_positions_are_used():
    model = build(attention="sdpa")
    ids, _ = batch(n=32, B=2)
    base = model.logits(ids)
    # RoPE is relative: a shift of every position changes nothing ...
    shifted = torch.arange(32) + 1000
    torch.testing.assert_close(model.logits(ids, shifted), base, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(model.logits(ids, shifted.expand(2, 32)), base, rtol=1e-9, atol=1e-9)
    # ... but spreading them apart does.
    assert (model.logits(ids, torch.arange(32) * 3) - base).abs().max() > 1e-4


@pytest.mark.parametrize("kind", KINDS)
def test_runs_at_other_lengths(kind):
    """m2m summaries do not depend on n: one model runs at any length, partial blocks included."""
    model = build(kind=kind, dtype=torch.float32)
    n_params = model.num_params()
    for n in (16, 96, 257, 1024):
        ids, targets = batch(n=n, B=1)
        loss, count = model(ids, targets)
        assert torch.isfinite(loss) and count.item() > 0
    assert model.num_params() == n_params


def test_conv_summary_refuses_longer_sequences():
    model = build(summary="conv", max_seq_len=128, dtype=torch.float32)
    model(*batch(n=128, B=1))
    with pytest.raises(ValueError, match="max_seq_len"):
        model(*batch(n=512, B=1))


# --------------------------------------------------------------------------- training features
@pytest.mark.parametrize("attention", ATTENTIONS)
def test_activation_checkpointing_same_gradients(attention):
    ids, targets = batch()
    out = []
    for ckpt in (False, True):
        model = build(attention=attention, activation_checkpointing=ckpt)
        model.train()
        loss, _ = model(ids, targets)
        loss.backward()
        out.append((loss.detach(), grads(model)))
    torch.testing.assert_close(out[1][0], out[0][0], rtol=0, atol=1e-12)
    assert out[0][1].keys() == out[1][1].keys()
    for k in out[0][1]:
        torch.testing.assert_close(out[1][1][k], out[0][1][k], rtol=1e-10, atol=1e-12)


def test_tied_embeddings_share_storage():
    tied, untied = build(tie_embeddings=True), build(tie_embeddings=False)
    assert tied.head.weight is tied.trunk.tok_emb.weight
    assert tied.head.weight.data_ptr() == tied.trunk.tok_emb.weight.data_ptr()
    assert untied.head.weight.data_ptr() != untied.trunk.tok_emb.weight.data_ptr()
    assert untied.num_params() - tied.num_params() == 61 * 32
    # One update moves both uses: the shared matrix gets the head's and the embedding's gradient.
    loss, _ = tied(*batch())
    loss.backward()
    assert tied.trunk.tok_emb.weight.grad is tied.head.weight.grad
    assert sum(1 for _ in tied.parameters()) == sum(1 for _ in untied.parameters()) - 1


def test_init_scales_residual_projections():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=512, dim=256, n_layers=8, n_heads=4, attention="sdpa")
    model = build_model(cfg)
    block = model.trunk.blocks[0]
    assert abs(block.attn.wq.weight.std().item() - 0.02) < 0.002
    residual = 0.02 / math.sqrt(2 * 8)
    assert abs(block.attn.wo.weight.std().item() - residual) < 0.1 * residual
    assert abs(block.mlp.w2.weight.std().item() - residual) < 0.1 * residual
    assert torch.equal(block.norm1.weight, torch.ones(256))


# --------------------------------------------------------------------------- FLOPs
def test_flops_sdpa_dense_closed_form():
    """6N (matmul parameters, head included) + 6 L dim (n+1) causal, 12 L dim n bidirectional."""
    n = 4096
    for kind in KINDS:
        cfg = ModelConfig(kind=kind, vocab_size=1000, dim=256, n_layers=3, n_heads=4, n_kv_heads=2,
                          mlp_hidden=700, attention="sdpa")
        kv = 2 * 64
        n_matmul = 3 * (256 * 256 * 2 + 256 * 2 * kv + 3 * 256 * 700) + 256 * 1000
        attn = 6 * 3 * 256 * (n + 1) if kind == "causal" else 12 * 3 * 256 * n
        assert flops_per_token(cfg, n) == pytest.approx(6 * n_matmul + attn, rel=1e-12)
        assert flops_per_token(cfg, n, training=False) == pytest.approx((6 * n_matmul + attn) / 3)


def test_flops_fma_and_local_count_their_scores():
    n, m, p = 8192, 64, 2
    L = hierarchy(n, m, p, True).n_levels
    assert L == 6
    cfg = ModelConfig(vocab_size=256, dim=128, n_heads=4, block_size=m, rank=p, summary="mean")
    assert attention_scores_per_query(cfg, n, causal=True) == 2 * m + 2 * p * L
    assert attention_scores_per_query(cfg, n, causal=False) == 3 * m + 3 * p * L
    local = dataclasses.replace(cfg, attention="local")
    assert attention_scores_per_query(local, n, causal=True) == 2 * m
    full = dataclasses.replace(cfg, attention="sdpa")
    # Attention is the only difference between the three counts.
    f = {c.attention: flops_per_token(c, n) for c in (cfg, local, full)}
    assert f["fma"] - f["local"] == pytest.approx(3 * 4 * 128 * cfg.n_layers * 2 * p * L)
    assert f["sdpa"] > 4 * f["fma"]
    # Learned summaries add their own (small) work.
    m2m = dataclasses.replace(cfg, summary="m2m")
    assert f["fma"] < flops_per_token(m2m, n) < 1.05 * f["fma"]


# --------------------------------------------------------------------------- long sequences
LONG_STEP = """
import json, resource, sys, time, torch
from fmtrain.config import load_config
from fmtrain.model import build_model
cfg = load_config(sys.argv[1], sys.argv[2:])
torch.manual_seed(0)
model = build_model(cfg.model)
n = cfg.data.seq_len
ids = torch.randint(0, cfg.model.vocab_size, (1, n))
t0 = time.time()
loss, count = model(ids, torch.roll(ids, -1, dims=1))
(loss / count).backward()
ok = all(p.grad is not None and bool(torch.isfinite(p.grad).all()) for p in model.parameters())
print(json.dumps({"loss": (loss / count).item(), "count": count.item(), "grads_ok": ok,
                  "seconds": time.time() - t0,
                  "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))
"""


@pytest.mark.slow
@pytest.mark.xdist_group("8-gib")  # one at a time: two such steps beside each other would need 16 GiB
@pytest.mark.parametrize("config", ["tiny-gpt", "tiny-mlm"])
def test_step_at_131072_tokens_under_8_gib(config):
    """One fp32 forward+backward of the tiny model at 131072 tokens, in a fresh process so
    that its peak RSS is this step's alone (activation checkpointing on, as long runs use)."""
    out = subprocess.run(
        [sys.executable, "-c", LONG_STEP, str(ROOT / "configs" / f"{config}.toml"),
         "--data.seq_len=131072", "--model.activation_checkpointing=true"],
        capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["count"] == 131072 and res["grads_ok"]
    assert math.isfinite(res["loss"])
    assert res["peak_rss_gib"] < 8.0, res


# --------------------------------------------------------------------------- decoding
DECODERS = [dict(attention="fma", variant=v, summary=s) for v in ("nlogn", "linear") for s in ("m2m", "mean", "conv")]
DECODERS += [dict(attention="local"), dict(attention="sdpa")]
REFINED = [dict(attention="fma", summary=s, refine=2) for s in ("m2m", "conv")]
REFINED += [dict(attention="fma", summary="m2m", refine=3, level_offset=True, n_kv_heads=2)]


def _decoder_name(kw):
    return "-".join(str(v) for v in kw.values())


def _perturbed(model, seed=5):
    """Learned summaries away from their mean init, so that the kinds differ; level offsets away from 0."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, prm in model.named_parameters():
            if ".summaries." in name or name.endswith(".level_offset"):
                prm.add_(0.2 * torch.randn(prm.shape, generator=g, dtype=prm.dtype))
    return model


@pytest.mark.parametrize("kw", DECODERS, ids=_decoder_name)
def test_model_prefix_consistency(kw):
    """logits(ids[:, :t])[:, -1] == logits(ids)[:, t-1]: appending tokens changes nothing before them."""
    model = _perturbed(build(**kw, block_size=4, max_seq_len=256))
    ids, _ = batch(n=150, B=2)
    full = model.logits(ids)
    for t in (1, 4, 5, 9, 17, 33, 63, 64, 65, 129, 150):
        torch.testing.assert_close(model.logits(ids[:, :t])[:, -1], full[:, t - 1], rtol=0, atol=1e-10,
                                   msg=lambda e: f"t={t}: {e}")


def _decoded_logits(model, ids, n0):
    logits, cache = model.prefill(ids[:, :n0])
    out = [logits]
    for t in range(n0, ids.shape[1] - 1):
        logits, cache = model.decode(ids[:, t], cache)
        out.append(logits)
    assert cache.length == ids.shape[1] - 1
    return torch.stack(out, dim=1)  # (B, n - n0, V): the logits after each prefix


@pytest.mark.parametrize("kw", DECODERS + REFINED, ids=_decoder_name)
def test_cached_decoding_equals_full_forward(kw):
    """prefill + decode give the full forward's logits at every position (float64, 1e-10),
    prompts on and off block and window boundaries, GQA, several coarse levels."""
    model = _perturbed(build(**kw, block_size=4, max_seq_len=512))
    ids, _ = batch(n=300, B=2)
    full = model.logits(ids)
    for n0 in (1, 7, 16, 100):
        torch.testing.assert_close(_decoded_logits(model, ids, n0), full[:, n0 - 1:-1], rtol=0, atol=1e-10,
                                   msg=lambda e: f"prompt {n0}: {e}")


@pytest.mark.slow
@pytest.mark.parametrize("kw", DECODERS[:6] + REFINED[:1], ids=_decoder_name)
def test_cached_decoding_across_nine_levels(kw):
    """Block 4, rank 2, 2100 tokens: 9 coarse levels crossed while decoding."""
    model = _perturbed(build(**kw, block_size=4, n_layers=1, max_seq_len=4096))
    ids, _ = batch(n=2100, B=1)
    full = model.logits(ids)
    torch.testing.assert_close(_decoded_logits(model, ids, 37), full[:, 36:-1], rtol=0, atol=1e-10)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 0.03)])
@pytest.mark.parametrize("attention", ["fma", "sdpa"])
def test_cached_decoding_low_precision(attention, dtype, tol):
    """fp32 within 1e-5 of the full forward's logits (seen: 2.4e-7, accumulation order); bf16
    within 0.03, about 8 units in the last place at logits of size ~1 (seen: 0.004)."""
    model = build(attention=attention, block_size=4, dtype=dtype)
    ids, _ = batch(n=120, B=2)
    full = model.logits(ids)
    got = _decoded_logits(model, ids, 30)
    assert (got - full[:, 29:-1]).abs().max().item() < tol


def test_decoding_refuses_a_masked_lm():
    model = build(kind="mlm")
    with pytest.raises(ValueError, match="causal LM"):
        model.prefill(batch(n=8, B=1)[0])


def test_refined_model_trains_and_generates_with_its_cache():
    """model.refine reaches every layer: the same weights give other logits and their own
    gradients; generation with the decoding cache equals recomputing the context."""
    from fmtrain.generate import generate
    plain, refined = build(), build(refine=2)
    refined.load_state_dict(plain.state_dict())
    ids, targets = batch(n=200)
    assert (plain.logits(ids) - refined.logits(ids)).abs().max() > 1e-4
    loss_sum, count = refined(ids, targets)
    (loss_sum / count).backward()
    assert all(p.grad is not None and p.grad.isfinite().all() for p in refined.parameters() if p.requires_grad)
    cached = generate(refined, ids[:1, :150], 12, temperature=0.0)
    recomputed = generate(refined, ids[:1, :150], 12, use_cache=False, temperature=0.0)
    assert cached.ids == recomputed.ids and len(cached.ids[0]) == 12
    assert 0 < cached.store_bytes < cached.cache_bytes


# --------------------------------------------------------------------------- document masking
# Two packed rows of 96 tokens, block 16: documents shorter than a block, on and off block
# boundaries, and long ones that have coarse levels of their own.
PACKED = ((5, 11, 16, 64), (3, 93))


def packed_batch(lengths=PACKED, vocab: int = 61, seed: int = 2):
    """ids (B, n) and the loader's doc_positions (B, n) of rows packed from documents of ``lengths``."""
    g = torch.Generator().manual_seed(seed)
    n = sum(lengths[0])
    ids = torch.randint(0, vocab, (len(lengths), n), generator=g)
    doc_positions = torch.stack([torch.cat([torch.arange(L) for L in row]) for row in lengths])
    return ids, doc_positions


def each_document_alone(model, ids, lengths=PACKED, positions=None):
    """The logits of each document run alone (at ``positions``' slice of its row; None: from 0), in place."""
    rows = []
    for b, row in enumerate(lengths):
        starts = [sum(row[:i]) for i in range(len(row))]
        rows.append(torch.cat([model.logits(ids[b:b + 1, s:s + L],
                                            None if positions is None else positions[s:s + L])[0]
                               for s, L in zip(starts, row)]))
    return torch.stack(rows)


MASKED = [dict(attention="fma"), dict(attention="local"), dict(attention="sdpa"),
          dict(attention="fma", refine=2), dict(attention="fma", summary="mean", variant="linear")]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("kw", MASKED, ids=_decoder_name)
def test_document_masking_gives_each_document_its_own_logits(kw, kind):
    """With doc_positions (and position_reset), each packed document's logits are the model's on it alone."""
    torch.manual_seed(0)
    model = _perturbed(build_model(small(kind=kind, **kw), position_reset=True).double())
    ids, doc_positions = packed_batch()
    packed = model.logits(ids, doc_positions=doc_positions)
    torch.testing.assert_close(packed, each_document_alone(model, ids), rtol=0, atol=1e-10)
    assert (packed - model.logits(ids)).abs().max() > 1e-4  # without them, attention crosses documents
    loss, count = model(ids, ids, doc_positions=doc_positions)  # the loss takes them too
    expect = F.cross_entropy(packed.flatten(0, 1), ids.flatten(), reduction="sum")
    torch.testing.assert_close(loss, expect, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("attention", ATTENTIONS)
def test_position_reset_chooses_the_rope_positions(attention):
    """position_reset: RoPE positions restart at each document whatever positions are given; without it
    they continue (the given ones). Positions spread apart (x3) tell the two apart: RoPE is relative, so
    contiguous positions that continue give each document what a reset gives, up to rounding."""
    ids, doc_positions = packed_batch()
    spread = torch.arange(96) * 3
    out = {}
    for reset in (True, False):
        torch.manual_seed(0)
        model = _perturbed(build_model(small(attention=attention), position_reset=reset).double())
        out[reset] = model.logits(ids, spread, doc_positions)
        alone = each_document_alone(model, ids, positions=None if reset else spread)
        torch.testing.assert_close(out[reset], alone, rtol=0, atol=1e-10)
        continued = model.logits(ids, None, doc_positions)  # the row's positions 0..n-1 continue across documents
        torch.testing.assert_close(continued, each_document_alone(model, ids), rtol=0, atol=1e-10)
    assert (out[True] - out[False]).abs().max() > 1e-4


@pytest.mark.parametrize("kw", MASKED[:4], ids=_decoder_name)
def test_aligned_rows_move_nothing_and_give_each_document_its_own_logits(kw):
    """data.align_documents: the loader's rows start each document on a block, so the attention's
    layout is the row itself (no token moves), and each document's real tokens get its logits alone."""
    from fmtrain.attention.documents import as_documents, cu_seqlens_from_doc_positions, doc_hierarchy, is_flat
    from fmtrain.data.loader import PackedLoader
    from fmtrain.data.masking import IGNORE_INDEX
    from fmtrain.data.tokens import TokenData

    g = torch.Generator().manual_seed(3)
    docs = [torch.randint(3, 61, (int(L),), generator=g).tolist() for L in torch.randint(1, 40, (24,), generator=g)]
    loader = PackedLoader(TokenData.from_documents(docs, eos_id=2), seq_len=96, batch_size=2, seed=0, dp_rank=0,
                          dp_size=1, eos_id=2, pad_id=1, align_documents=16)
    b = loader.next_batch()
    ids, doc_positions, targets = b["input_ids"], b["doc_positions"], b["targets"]
    docs_of = as_documents(cu_seqlens_from_doc_positions(doc_positions), 2, 96)
    assert len(docs_of) > 4 and is_flat(doc_hierarchy(docs_of, 16, 2, True, None))
    torch.manual_seed(0)
    model = _perturbed(build_model(small(**kw)).double())
    packed = model.logits(ids, doc_positions=doc_positions)
    for s, L in zip(docs_of.starts, docs_of.lengths):
        row, s = divmod(s, 96)
        real = int((ids[row, s:s + L] != 1).sum())           # the padding trails its document
        assert (ids[row, s + real:s + L] == 1).all() and (targets[row, s + real:s + L] == IGNORE_INDEX).all()
        alone = model.logits(ids[row:row + 1, s:s + real], torch.arange(s, s + real))[0]
        torch.testing.assert_close(packed[row, s:s + real], alone, rtol=0, atol=1e-10)


def test_doc_positions_must_match_the_ids():
    model = build(attention="sdpa")
    ids, doc_positions = packed_batch()
    with pytest.raises(ValueError, match=r"doc_positions \(2, 95\) must have the shape of input_ids \(2, 96\)"):
        model.logits(ids, doc_positions=doc_positions[:, 1:])


def test_document_masking_with_activation_checkpointing_same_gradients():
    ids, doc_positions = packed_batch()
    out = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        model = build_model(small(activation_checkpointing=ckpt), position_reset=True).double()
        loss, _ = model(ids, ids, doc_positions=doc_positions)
        loss.backward()
        out.append((loss.detach(), grads(model)))
    torch.testing.assert_close(out[1][0], out[0][0], rtol=0, atol=1e-12)
    for k in out[0][1]:
        torch.testing.assert_close(out[1][1][k], out[0][1][k], rtol=1e-10, atol=1e-12)
