"""The attention layers: MultipoleAttention (its RoPE, summaries and lengths), FullAttention, make_attention."""
import dataclasses

import pytest
import torch

from fmtrain.attention import MultipoleAttention
from fmtrain.attention.rope import apply_rope, rope_angles


def layer(**kw):
    torch.manual_seed(0)
    base = dict(dim=32, n_heads=4, n_kv_heads=2, block_size=8, rank=2)
    base.update(kw)
    return MultipoleAttention(**base).double()


@pytest.mark.parametrize("summary", ["m2m", "mean", "conv"])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("variant", ["nlogn", "linear"])
def test_layer_matches_its_dense_reference_and_trains_summaries(summary, causal, variant):
    att = layer(summary=summary, causal=causal, variant=variant, max_seq_len=200)
    x = torch.randn(2, 200, 32, dtype=torch.float64)
    y = att(x)
    att_ref = layer(summary=summary, causal=causal, variant=variant, max_seq_len=200, impl="dense")
    att_ref.load_state_dict(att.state_dict())
    y_ref = att_ref(x)
    assert y.shape == x.shape and (y - y_ref).abs().max() < 1e-12
    y.square().sum().backward()
    y_ref.square().sum().backward()
    for (name, p), p_ref in zip(att.named_parameters(), att_ref.parameters()):
        assert p.grad is not None and p.grad.abs().sum() > 0, name
        assert (p.grad - p_ref.grad).abs().max() < 1e-10, name


def test_m2m_layer_runs_at_lengths_it_was_not_built_for():
    att = layer(summary="m2m")
    for n in (10, 300, 2000):
        assert att(torch.randn(1, n, 32, dtype=torch.float64)).shape == (1, n, 32)


def test_causal_layer_ignores_later_tokens():
    att = layer(summary="m2m", causal=True)
    with torch.no_grad():
        att.summaries.leaf.normal_()
        x = torch.randn(1, 300, 32, dtype=torch.float64)
        y = att(x)
        x2 = x.clone()
        x2[:, 123:] = torch.randn(1, 177, 32, dtype=torch.float64)
        assert torch.equal(att(x2)[:, :123], y[:, :123])


def test_positions_are_used_and_only_relative_ones_matter():
    """Given global positions, a shift of all of them changes nothing (RoPE is relative);
    a gap between positions changes the output."""
    att = layer(summary="mean", causal=True)
    x = torch.randn(1, 64, 32, dtype=torch.float64)
    base = att(x)
    shifted = att(x, positions=torch.arange(64) + 1000)
    gap = att(x, positions=torch.cat([torch.arange(32), torch.arange(32) + 500]))
    assert (shifted - base).abs().max() < 1e-9
    assert (gap - base)[:, 32:].abs().max() > 1e-3
    assert (gap - base)[:, :32].abs().max() < 1e-9  # causal: the first half never sees the gap


def test_rope_preserves_norms_and_takes_per_sample_positions():
    x = torch.randn(2, 3, 10, 8, dtype=torch.float64)
    pos = torch.stack([torch.arange(10), torch.arange(10) + 7])
    cos, sin = rope_angles(pos, 8)
    y = apply_rope(x, cos, sin)
    assert torch.allclose(y.norm(dim=-1), x.norm(dim=-1))
    c1, s1 = rope_angles(pos[1], 8)
    assert torch.allclose(y[1], apply_rope(x[1:2], c1, s1)[0])


@pytest.mark.parametrize("kw,msg", [
    (dict(dim=30), "divisible by n_heads"),
    (dict(n_kv_heads=3), "multiple of n_kv_heads"),
    (dict(summary="conv"), "max_seq_len"),
])
def test_layer_argument_errors(kw, msg):
    with pytest.raises(ValueError, match=msg):
        layer(**kw)


@pytest.mark.parametrize("kw", [dict(level_offset=True), dict(summary_rope="window"),
                                dict(level_offset=True, summary_rope="window", summary="mean")])
@pytest.mark.parametrize("causal", [True, False])
def test_level_offsets_and_window_rope_match_dense_and_train(kw, causal):
    att = layer(causal=causal, **kw)
    x = torch.randn(2, 200, 32, dtype=torch.float64)
    y = att(x)
    att_ref = layer(causal=causal, impl="dense", **kw)
    att_ref.load_state_dict(att.state_dict())
    y_ref = att_ref(x)
    assert (y - y_ref).abs().max() < 1e-12
    y.square().sum().backward()
    y_ref.square().sum().backward()
    for (name, p), p_ref in zip(att.named_parameters(), att_ref.parameters()):
        assert p.grad is not None and p.grad.abs().sum() > 0, name
        assert (p.grad - p_ref.grad).abs().max() < 1e-10, name
    if kw.get("level_offset"):
        assert att.level_offset.shape == (4, 32)
    if kw.get("summary_rope") == "window":  # the summaries really differ from summarising rotated keys
        plain = layer(causal=causal, **{**kw, "summary_rope": "keys"})
        plain.load_state_dict(att.state_dict())
        assert (plain(x) - y).abs().max() > 1e-3


def test_decoding_refuses_what_the_cache_does_not_take():
    att = layer(summary_rope="window")
    with pytest.raises(ValueError, match="whole sequences"):
        att.prefill(torch.randn(1, 40, 32, dtype=torch.float64))


def test_make_attention_builds_the_layer_a_spec_names():
    from fmtrain.attention import AttentionSpec, FullAttention, make_attention

    spec = AttentionSpec(kind="fma", dim=32, n_heads=4, n_kv_heads=2, block_size=16, rank=4, refine=2,
                         level_offset=True, summary="conv", max_seq_len=128)
    fma_layer = make_attention(spec)
    assert isinstance(fma_layer, MultipoleAttention) and fma_layer.max_level is None
    assert (fma_layer.block_size, fma_layer.rank, fma_layer.refine, fma_layer.n_kv_heads) == (16, 4, 2, 2)
    assert fma_layer.level_offset is not None
    local = make_attention(dataclasses.replace(spec, kind="local"))
    assert local.max_level == 0 and local.refine == 0 and local.level_offset is None
    full = make_attention(dataclasses.replace(spec, kind="sdpa", causal=False))
    assert isinstance(full, FullAttention) and not full.causal
    # One parameter layout whatever the kind: checkpoints line up.
    assert {k for k in full.state_dict()} <= {k for k in fma_layer.state_dict()}
    with pytest.raises(ValueError, match="'flash' is not one of"):
        make_attention(dataclasses.replace(spec, kind="flash"))


# Packed rows of 48 tokens, block 16: documents shorter than a block, ending on and off block
# boundaries, one a whole row; as FlashAttention's cu_seqlens over the flattened batch of 2 rows.
PACKED_LENGTHS = ((5, 11, 16, 3, 13), (48,))
PACKED_CU_SEQLENS = torch.tensor([0, 5, 16, 32, 35, 48, 96])


def alone_per_document(att, x, lengths):
    """Each document of each packed row run through ``att`` on its own, put back in place: (B, n, dim)."""
    rows = []
    for row, row_lengths in zip(x, lengths):
        parts = row.split(list(row_lengths))  # (L, dim) each
        rows.append(torch.cat([att(part[None])[0] for part in parts]))
    return torch.stack(rows)


@pytest.mark.parametrize("causal", [True, False])
def test_sdpa_with_documents_is_each_document_alone(causal, rng):
    from fmtrain.attention import FullAttention

    torch.manual_seed(0)
    att = FullAttention(32, 4, 2, causal=causal).double()
    x = torch.randn(2, 48, 32, dtype=torch.float64, generator=rng)
    packed = att(x, None, PACKED_CU_SEQLENS)  # RoPE at the row's positions: relative, so as alone
    torch.testing.assert_close(packed, alone_per_document(att, x, PACKED_LENGTHS), rtol=0, atol=1e-10)
    assert (packed - att(x)).abs().max() > 1e-3  # without documents, attention crosses them


def test_document_mask_is_block_diagonal_and_causal_within():
    from fmtrain.attention.layers import document_mask

    mask = document_mask([0, 2, 3, 6], 2, 3, causal=True, device="cpu")[:, 0]  # (B, n, n)
    expect = torch.tensor([[[1, 0, 0], [1, 1, 0], [0, 0, 1]], [[1, 0, 0], [1, 1, 0], [1, 1, 1]]], dtype=torch.bool)
    assert torch.equal(mask, expect)
    both = document_mask([0, 2, 3, 6], 2, 3, causal=False, device="cpu")[:, 0]
    assert torch.equal(both[0], torch.tensor([[1, 1, 0], [1, 1, 0], [0, 0, 1]], dtype=torch.bool))
