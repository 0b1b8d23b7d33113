"""The Llama-style layout and fmtrain's, both ways: which ``config.json`` fields are which
``[model]`` fields, and which Hugging Face tensors make which fmtrain tensor.

    hf_model_fields(config_json, where)   config.json -> [model]'s architecture fields (:data:`ARCH_FIELDS`)
    fmtrain_model_fields(model_cfg)       the same fields of an fmtrain config
    expected_hf_tensors(m)                every tensor a Llama-style checkpoint of ``m`` holds, with its shape
    hf_to_fmtrain(get, m)                 Hugging Face tensors -> fmtrain state dict (k/v and gate/up fused)
    fmtrain_to_hf(sd, m)                  the inverse (what ``python -m fmtrain.hf export`` writes)

No files are read here (:mod:`.importing` reads a folder) and nothing needs ``transformers``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..config import ConfigError, ModelConfig
from ..input_files import JsonFields

HF_ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2"}
# [model] fields that describe the weights: filled from the source.
ARCH_FIELDS = ("kind", "vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "mlp_hidden", "tie_embeddings",
               "norm_eps", "rope_theta", "rope_scaling", "qkv_bias", "out_bias", "mlp_bias")
# Of those, the ones an explicit value may change: a new RoPE base or scaling is how contexts are extended.
OVERRIDABLE = {"rope_theta", "rope_scaling"}
# config.json's name of each field, for messages.
CONFIG_NAMES = dict(kind="architectures", vocab_size="vocab_size", dim="hidden_size", n_layers="num_hidden_layers",
                    n_heads="num_attention_heads", n_kv_heads="num_key_value_heads", mlp_hidden="intermediate_size",
                    tie_embeddings="tie_word_embeddings", norm_eps="rms_norm_eps", rope_theta="rope_theta",
                    rope_scaling="rope_parameters",
                    qkv_bias="attention_bias", out_bias="attention_bias", mlp_bias="mlp_bias")
# Tensors of Hugging Face checkpoints that hold no weights (older Llama exports saved RoPE's table).
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


# --------------------------------------------------------------------------- config.json
def hf_model_fields(hf: dict[str, Any], where: str) -> tuple[dict[str, Any], int | None]:
    """([model] field values, sliding window or None) of a Hugging Face ``config.json``; every
    field read is checked (InputFileError naming the field and what was found)."""
    f = JsonFields(hf, Path(where) / "config.json")
    family = _hf_family(f, where)
    dim, heads, layers, vocab, hidden = (f.integer(k) for k in (
        "hidden_size", "num_attention_heads", "num_hidden_layers", "vocab_size", "intermediate_size"))
    kv = f.integer("num_key_value_heads", heads)
    head_dim = f.integer("head_dim", dim // heads)
    if head_dim * heads != dim:
        raise ConfigError(
            f"model.init_from={where!r}: head_dim={head_dim} x num_attention_heads={heads} is not "
            f"hidden_size={dim}; fmtrain's attention needs head_dim = hidden_size / num_attention_heads")
    if (act := f.string("hidden_act", "silu")) != "silu":
        raise ConfigError(f"model.init_from={where!r}: hidden_act={act!r}; fmtrain's MLP is SwiGLU (silu)")
    scaling, theta = _hf_rope(f, where)
    if family == "qwen2":  # Qwen2: q/k/v biases, none on o_proj or the MLP
        qkv_bias, out_bias, mlp_bias = True, False, False
    else:
        qkv_bias = out_bias = f.boolean("attention_bias", False)
        mlp_bias = f.boolean("mlp_bias", False)
    use_window = family != "qwen2" or f.boolean("use_sliding_window", False)  # Qwen2 names it, then may not use it
    window = f.integer("sliding_window", None, min=0) if use_window else None
    fields = dict(kind="causal", vocab_size=vocab, dim=dim, n_layers=layers, n_heads=heads, n_kv_heads=kv,
                  mlp_hidden=hidden, tie_embeddings=f.boolean("tie_word_embeddings", False),
                  norm_eps=float(f.number("rms_norm_eps", 1e-6)), rope_theta=theta, rope_scaling=scaling,
                  qkv_bias=qkv_bias, out_bias=out_bias, mlp_bias=mlp_bias)
    return fields, (window or None)


def _hf_family(f: JsonFields, where: str) -> str:
    archs = f.strings("architectures")
    arch = archs[0] if archs else None
    if arch not in HF_ARCHITECTURES:
        raise ConfigError(
            f"model.init_from={where!r}: architecture {arch!r} (model_type {f.data.get('model_type')!r}) is not "
            f"supported; fmtrain imports the decoder architectures {', '.join(HF_ARCHITECTURES)}")
    return HF_ARCHITECTURES[arch]


_SCALING_KEYS = {"llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
                 "linear": ("factor",), "default": ()}


def _rope_fields(f: JsonFields) -> JsonFields:
    """transformers 4's rope_scaling and 5's rope_parameters as one (5's wins), each key named by its source."""
    merged, names = {}, {}
    for field in ("rope_scaling", "rope_parameters"):
        for key, value in f.mapping(field).data.items():
            merged[key], names[key] = value, f"{field}.{key}"
    return JsonFields(merged, f.path, names=names, prefix="rope_parameters.")


def _hf_rope(f: JsonFields, where: str) -> tuple[dict[str, Any], float]:
    """(model.rope_scaling, model.rope_theta) of a config.json."""
    rope = _rope_fields(f)
    rope_type = rope.string("rope_type", None) or rope.string("type", None) or "default"
    if rope_type not in _SCALING_KEYS:
        raise ConfigError(
            f"model.init_from={where!r}: RoPE scaling {rope_type!r} is not supported; fmtrain has plain RoPE "
            "(rope_type 'default') and the 'llama3' and 'linear' scalings")
    scaling = {"rope_type": rope_type} if rope_type != "default" else {}
    for key in _SCALING_KEYS[rope_type]:
        scaling[key] = rope.integer(key) if key == "original_max_position_embeddings" else rope.number(key)
    partial = rope.number("partial_rotary_factor", None) or f.number("partial_rotary_factor", 1.0)
    if float(partial) != 1.0:
        raise ConfigError(f"model.init_from={where!r}: partial rotary embeddings are not supported")
    theta = float(rope.number("rope_theta", None) or f.number("rope_theta", 10000.0))
    return scaling, theta


def fmtrain_model_fields(m: ModelConfig) -> dict[str, Any]:
    """The same fields of an fmtrain ``[model]`` (an fmtrain checkpoint as the source of ``init_from``)."""
    return {f: (m.kv_heads if f == "n_kv_heads" else m.hidden if f == "mlp_hidden" else getattr(m, f))
            for f in ARCH_FIELDS}


# --------------------------------------------------------------------------- tensors
def expected_hf_tensors(m: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor a Llama-style checkpoint of ``m`` holds."""
    D, V, F, hd = m.dim, m.vocab_size, m.hidden, m.head_dim
    q, kv = m.n_heads * hd, m.kv_heads * hd
    out = {"model.embed_tokens.weight": (V, D), "model.norm.weight": (D,)}
    for i in range(m.n_layers):
        p = f"model.layers.{i}."
        out |= {p + "input_layernorm.weight": (D,), p + "post_attention_layernorm.weight": (D,),
                p + "self_attn.q_proj.weight": (q, D), p + "self_attn.k_proj.weight": (kv, D),
                p + "self_attn.v_proj.weight": (kv, D), p + "self_attn.o_proj.weight": (D, q),
                p + "mlp.gate_proj.weight": (F, D), p + "mlp.up_proj.weight": (F, D),
                p + "mlp.down_proj.weight": (D, F)}
        if m.qkv_bias:
            out |= {p + "self_attn.q_proj.bias": (q,), p + "self_attn.k_proj.bias": (kv,),
                    p + "self_attn.v_proj.bias": (kv,)}
        if m.out_bias:
            out[p + "self_attn.o_proj.bias"] = (D,)
        if m.mlp_bias:
            out |= {p + "mlp.gate_proj.bias": (F,), p + "mlp.up_proj.bias": (F,), p + "mlp.down_proj.bias": (D,)}
    if not m.tie_embeddings:
        out["lm_head.weight"] = (V, D)
    return out


def hf_recipes(m: ModelConfig) -> dict[str, list[str]]:
    """fmtrain tensor -> the Llama-style tensors it is made of, concatenated along rows
    (k/v into ``wkv``, gate/up into ``w13``)."""
    out = {"trunk.tok_emb.weight": ["model.embed_tokens.weight"], "trunk.norm.weight": ["model.norm.weight"],
           "head.weight": ["model.embed_tokens.weight" if m.tie_embeddings else "lm_head.weight"]}
    for i in range(m.n_layers):
        p, q = f"model.layers.{i}.", f"trunk.blocks.{i}."
        a, mlp = p + "self_attn.", p + "mlp."
        out[q + "norm1.weight"] = [p + "input_layernorm.weight"]
        out[q + "norm2.weight"] = [p + "post_attention_layernorm.weight"]
        for kind in ("weight",) + (("bias",) if m.qkv_bias else ()):
            out[q + f"attn.wq.{kind}"] = [a + f"q_proj.{kind}"]
            out[q + f"attn.wkv.{kind}"] = [a + f"k_proj.{kind}", a + f"v_proj.{kind}"]
        out[q + "attn.wo.weight"] = [a + "o_proj.weight"]
        if m.out_bias:
            out[q + "attn.wo.bias"] = [a + "o_proj.bias"]
        for kind in ("weight",) + (("bias",) if m.mlp_bias else ()):
            out[q + f"mlp.w13.{kind}"] = [mlp + f"gate_proj.{kind}", mlp + f"up_proj.{kind}"]
            out[q + f"mlp.w2.{kind}"] = [mlp + f"down_proj.{kind}"]
    return out


def hf_to_fmtrain(get, m: ModelConfig, lazy: bool = False) -> dict:
    """fmtrain state dict from Llama-style tensors (``get(name)``). ``lazy``: each value is a
    function that forms the tensor, so that weights are converted one at a time."""
    def form(names):
        return get(names[0]) if len(names) == 1 else torch.cat([get(n) for n in names])

    recipes = hf_recipes(m)
    if lazy:
        return {k: (lambda names=names: form(names)) for k, names in recipes.items()}
    return {k: form(names) for k, names in recipes.items()}


def fmtrain_to_hf(sd: dict[str, torch.Tensor], m: ModelConfig) -> dict[str, torch.Tensor]:
    """The inverse of :func:`hf_to_fmtrain` (summaries are dropped: the caller checks there are none to keep)."""
    kv = m.kv_heads * m.head_dim
    out = {"model.embed_tokens.weight": sd["trunk.tok_emb.weight"], "model.norm.weight": sd["trunk.norm.weight"]}
    if not m.tie_embeddings:
        out["lm_head.weight"] = sd["head.weight"]
    for i in range(m.n_layers):
        p, q = f"model.layers.{i}.", f"trunk.blocks.{i}."
        a, mlp = p + "self_attn.", p + "mlp."
        out[p + "input_layernorm.weight"] = sd[q + "norm1.weight"]
        out[p + "post_attention_layernorm.weight"] = sd[q + "norm2.weight"]
        for kind in ("weight",) + (("bias",) if m.qkv_bias else ()):
            out[a + f"q_proj.{kind}"] = sd[q + f"attn.wq.{kind}"]
            out[a + f"k_proj.{kind}"], out[a + f"v_proj.{kind}"] = sd[q + f"attn.wkv.{kind}"].split(kv)
        out[a + "o_proj.weight"] = sd[q + "attn.wo.weight"]
        if m.out_bias:
            out[a + "o_proj.bias"] = sd[q + "attn.wo.bias"]
        for kind in ("weight",) + (("bias",) if m.mlp_bias else ()):
            out[mlp + f"gate_proj.{kind}"], out[mlp + f"up_proj.{kind}"] = sd[q + f"mlp.w13.{kind}"].split(m.hidden)
            out[mlp + f"down_proj.{kind}"] = sd[q + f"mlp.w2.{kind}"]
    return {k: v.contiguous() for k, v in out.items()}


__all__ = ["HF_ARCHITECTURES", "ARCH_FIELDS", "OVERRIDABLE", "CONFIG_NAMES", "IGNORED_SUFFIXES", "hf_model_fields",
           "fmtrain_model_fields", "expected_hf_tensors", "hf_recipes", "hf_to_fmtrain", "fmtrain_to_hf"]
