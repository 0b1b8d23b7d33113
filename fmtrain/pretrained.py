"""Start a run from pretrained weights: ``model.init_from = "PATH"``.

PATH is either

- a Hugging Face folder: ``config.json`` whose ``architectures`` is one of
  :data:`HF_ARCHITECTURES` (Llama, Mistral, Qwen2-style decoders), the weights as
  ``model.safetensors`` or shards with their ``model.safetensors.index.json``, and
  the tokenizer files (``tokenizer.json`` + ``tokenizer_config.json``); or
- an fmtrain checkpoint, checkpoints folder, run folder (its newest valid
  checkpoint) or model-only export (``python -m fmtrain.export``).

Only the weights are taken: the optimizer, the schedule and the data position
start fresh, so a model continues on new data or at a new length in a new
``run.dir``. A run that already has a checkpoint of its own resumes it and does
not read PATH again (resume stays bitwise).

Three steps, each at the point of the run where it belongs:

    resolve_config(cfg)       when the run starts: the architecture fields of [model]
                              (:data:`ARCH_FIELDS`) and data.tokenizer from PATH;
                              an explicit value that contradicts PATH is an error
    init = prepare(cfg)       at the start of training, before anything is written:
                              every tensor is there, with its shape; None when resuming
    init.load(model)          copies the weights into the freshly built model

The attention (``model.attention`` and the multipole fields) is the user's choice.
Learned summaries (``m2m``, ``conv``) are not in a Hugging Face model: they keep
their initialisation, which is the mean (so the converted model starts as the
mean-summary model). Nothing here needs ``transformers``: config.json and the
safetensors headers are read directly.
"""
from __future__ import annotations

import json
import os
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .config import Config, ConfigError, ModelConfig

HF_ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2"}
# [model] fields that describe the weights: filled from the source.
ARCH_FIELDS = ("kind", "vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "mlp_hidden", "tie_embeddings",
               "norm_eps", "rope_theta", "rope_scaling", "qkv_bias", "out_bias", "mlp_bias")
# Of those, the ones an explicit value may change: a new RoPE base or scaling is how contexts are extended.
OVERRIDABLE = {"rope_theta", "rope_scaling"}
# config.json's name of each field, for messages.
_HF_NAMES = dict(kind="architectures", vocab_size="vocab_size", dim="hidden_size", n_layers="num_hidden_layers",
                 n_heads="num_attention_heads", n_kv_heads="num_key_value_heads", mlp_hidden="intermediate_size",
                 tie_embeddings="tie_word_embeddings", norm_eps="rms_norm_eps", rope_theta="rope_theta",
                 rope_scaling="rope_parameters",
                 qkv_bias="attention_bias", out_bias="attention_bias", mlp_bias="mlp_bias")
# Tensors of Hugging Face checkpoints that hold no weights (older Llama exports saved RoPE's table).
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
INDEX = "model.safetensors.index.json"


# --------------------------------------------------------------------------- sources
def is_hf_folder(path: str | os.PathLike) -> bool:
    return (Path(path) / "config.json").is_file()


def read_hf_config(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path) / "config.json"
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"model.init_from: cannot read {path}: {exc}") from None


def hf_model_fields(hf: dict[str, Any], where: str) -> tuple[dict[str, Any], int | None]:
    """([model] field values, sliding window or None) of a Hugging Face ``config.json``."""
    archs = hf.get("architectures") or []
    arch = archs[0] if archs else None
    if arch not in HF_ARCHITECTURES:
        raise ConfigError(
            f"model.init_from={where!r}: architecture {arch!r} (model_type {hf.get('model_type')!r}) is not "
            f"supported; fmtrain imports the decoder architectures {', '.join(HF_ARCHITECTURES)}")
    family = HF_ARCHITECTURES[arch]
    try:
        dim, heads, layers = int(hf["hidden_size"]), int(hf["num_attention_heads"]), int(hf["num_hidden_layers"])
        vocab, hidden = int(hf["vocab_size"]), int(hf["intermediate_size"])
    except KeyError as exc:
        raise ConfigError(f"model.init_from={where!r}: config.json has no {exc.args[0]!r}") from None
    kv = int(hf.get("num_key_value_heads") or heads)
    head_dim = hf.get("head_dim") or dim // heads
    if head_dim * heads != dim:
        raise ConfigError(
            f"model.init_from={where!r}: head_dim={head_dim} x num_attention_heads={heads} is not "
            f"hidden_size={dim}; fmtrain's attention needs head_dim = hidden_size / num_attention_heads")
    if hf.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"model.init_from={where!r}: hidden_act={hf['hidden_act']!r}; fmtrain's MLP is SwiGLU (silu)")
    rope = dict(hf.get("rope_scaling") or {}, **(hf.get("rope_parameters") or {}))  # transformers 4 / 5 names
    rope_type = rope.get("rope_type") or rope.get("type") or "default"
    scaling_keys = {"llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
                    "linear": ("factor",), "default": ()}
    if rope_type not in scaling_keys:
        raise ConfigError(
            f"model.init_from={where!r}: RoPE scaling {rope_type!r} is not supported; fmtrain has plain RoPE "
            "(rope_type 'default') and the 'llama3' and 'linear' scalings")
    scaling = {"rope_type": rope_type, **{k: rope[k] for k in scaling_keys[rope_type]}} if rope_type != "default" \
        else {}
    if float(rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))) != 1.0:
        raise ConfigError(f"model.init_from={where!r}: partial rotary embeddings are not supported")
    theta = float(rope.get("rope_theta") or hf.get("rope_theta") or 10000.0)
    if family == "qwen2":  # Qwen2: q/k/v biases, none on o_proj or the MLP
        qkv_bias, out_bias, mlp_bias = True, False, False
    else:
        qkv_bias = out_bias = bool(hf.get("attention_bias", False))
        mlp_bias = bool(hf.get("mlp_bias", False))
    if family == "qwen2":
        window = hf.get("sliding_window") if hf.get("use_sliding_window") else None
    else:
        window = hf.get("sliding_window")
    fields = dict(kind="causal", vocab_size=vocab, dim=dim, n_layers=layers, n_heads=heads, n_kv_heads=kv,
                  mlp_hidden=hidden, tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
                  norm_eps=float(hf.get("rms_norm_eps", 1e-6)), rope_theta=theta, rope_scaling=scaling,
                  qkv_bias=qkv_bias, out_bias=out_bias, mlp_bias=mlp_bias)
    return fields, (int(window) if window else None)


def _fmtrain_source(path: Path):
    """(checkpoint folder, its Config) of an fmtrain checkpoint, run or model-only export."""
    from .checkpoint import CheckpointError, resolve
    from .export import load_config_of

    try:
        ckpt = resolve(path)
        return ckpt, load_config_of(ckpt)
    except (CheckpointError, ConfigError) as exc:
        raise ConfigError(f"model.init_from={str(path)!r} is neither a Hugging Face folder (no config.json) "
                          f"nor a usable fmtrain checkpoint: {exc}") from None


def fmtrain_model_fields(m: ModelConfig) -> dict[str, Any]:
    return {f: (m.kv_heads if f == "n_kv_heads" else m.hidden if f == "mlp_hidden" else getattr(m, f))
            for f in ARCH_FIELDS}


def _tokenizer_of(folder: Path) -> str | None:
    from .data.hf_tokenizer import is_hf_tokenizer_file

    if is_hf_tokenizer_file(folder / "tokenizer.json") or (folder / "tokenizer.model").is_file():
        return str(folder)
    return None


# --------------------------------------------------------------------------- config
def resolve_config(cfg: Config) -> Config:
    """``cfg`` with [model]'s architecture fields and data.tokenizer filled from ``model.init_from``,
    validated again; ConfigError naming every problem. A config without init_from is returned as is."""
    if not cfg.model.init_from:
        return cfg
    from .config.schema import _format, check_config

    given = getattr(cfg, "_given", None)
    if given is None:  # built without from_dict: the fields that differ from their defaults
        given = {sec: {k for k, v in vals.items() if v != getattr(type(getattr(cfg, sec))(), k)}
                 for sec, vals in cfg.to_dict().items()}
    errors = fill_config(cfg, given)
    if errors:
        raise ConfigError(_format(errors))
    check_config(cfg)
    cfg._given = {sec: set(vals) for sec, vals in cfg.to_dict().items()}  # everything is explicit now
    return cfg


def fill_config(cfg: Config, given: dict[str, set[str]]) -> list[str]:
    """Fill ``cfg.model``'s architecture fields (and ``data.tokenizer``) from ``model.init_from``.

    ``given``: the keys the user set, per section. Returns the problems (strings,
    each with its fix); ``cfg`` is changed in place. A config that already names
    every architecture field (a run's saved config) is left alone when the source
    has gone: eval and generate of the run's checkpoints do not need it.
    """
    src = cfg.model.init_from
    path = Path(src)
    model_given, data_given = given.get("model", set()), given.get("data", set())
    if not path.exists():
        if all(f in model_given or f == "n_kv_heads" for f in ARCH_FIELDS):
            return []
        return [f"model.init_from={src!r} does not exist; give a Hugging Face folder (config.json, *.safetensors) "
                "or an fmtrain checkpoint or run folder"]
    try:
        if is_hf_folder(path):
            fields, window = hf_model_fields(read_hf_config(path), src)
            names, folder = _HF_NAMES, path
        else:
            ckpt, src_cfg = _fmtrain_source(path)
            fields, window = fmtrain_model_fields(src_cfg.model), None
            names, folder = {f: f"model.{f}" for f in ARCH_FIELDS}, ckpt
    except ConfigError as exc:
        return [str(exc)]
    errors = []
    for name, value in fields.items():
        if name in model_given:
            mine = getattr(cfg.model, name)
            if name == "n_kv_heads":
                mine = cfg.model.kv_heads
            if mine != value and name not in OVERRIDABLE:
                errors.append(f"model.{name}={mine!r} contradicts model.init_from={src!r}, whose "
                              f"{names[name]} is {value!r}; remove model.{name} (it is taken from the weights)")
            continue
        setattr(cfg.model, name, value)
    if "tokenizer" not in data_given:
        tok = _tokenizer_of(folder)
        if tok is None:
            errors.append(f"model.init_from={src!r} has no tokenizer (tokenizer.json or tokenizer.model); "
                          "set data.tokenizer to the tokenizer the weights were trained with")
        else:
            cfg.data.tokenizer = tok
    if window is not None and window < cfg.data.seq_len:
        if cfg.model.attention == "sdpa":
            errors.append(
                f"model.init_from={src!r} attends within a sliding window of {window} tokens, shorter than "
                f"data.seq_len={cfg.data.seq_len}; fmtrain's sdpa is full attention and would change the "
                f"model: use data.seq_len <= {window}, or attention='fma' / 'local'")
        else:
            warnings.warn(f"model.init_from={src!r} was trained with a sliding window of {window} tokens; "
                          f"model.attention={cfg.model.attention!r} replaces it (not reproduced)", stacklevel=3)
    return errors


# --------------------------------------------------------------------------- Hugging Face weights
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


def read_safetensors_header(path: Path) -> dict[str, dict]:
    """The tensors of a safetensors file (name -> dtype, shape, data_offsets), its size checked."""
    try:
        with open(path, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
    except (OSError, struct.error, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path} is not a readable safetensors file: {exc}") from None
    header.pop("__metadata__", None)
    end = 8 + n + max((t["data_offsets"][1] for t in header.values()), default=0)
    size = path.stat().st_size
    if size < end:
        raise ConfigError(f"{path} is truncated ({size} of {end} bytes): its tensors "
                          f"{', '.join(sorted(header)[:3])}... are incomplete; download it again")
    return header


def hf_weight_files(folder: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it, from the index or the single file."""
    index = folder / INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, json.JSONDecodeError, KeyError) as exc:
            raise ConfigError(f"{index} is unreadable: {exc}") from None
        missing = sorted({f for f in weight_map.values() if not (folder / f).is_file()})
        if missing:
            names = [k for k, f in weight_map.items() if f == missing[0]]
            raise ConfigError(f"model.init_from={str(folder)!r}: shard {missing[0]} is missing (it holds "
                              f"{names[0]}{f' and {len(names) - 1} more tensors' if len(names) > 1 else ''}); "
                              f"{len(missing)} of {len(set(weight_map.values()))} shards are absent")
        return {k: folder / f for k, f in weight_map.items()}
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        other = [p.name for p in folder.glob("*.bin")] + [p.name for p in folder.glob("*.pth")]
        hint = f" (found {', '.join(other)}: convert them to safetensors first)" if other else ""
        raise ConfigError(f"model.init_from={str(folder)!r} holds no *.safetensors weights{hint}")
    out = {}
    for f in files:
        for name in read_safetensors_header(f):
            out[name] = f
    return out


def check_hf_weights(folder: Path, m: ModelConfig) -> dict[str, Path]:
    """Every expected tensor is in a present, complete shard with the right shape; else ConfigError
    naming the tensor. Returns name -> file."""
    files = hf_weight_files(folder)
    headers = {f: read_safetensors_header(f) for f in sorted(set(files.values()))}
    expected = expected_hf_tensors(m)
    for name, shape in expected.items():
        if name not in files:
            raise ConfigError(f"model.init_from={str(folder)!r}: tensor {name} is missing "
                              f"(expected shape {list(shape)}; a partial download or a different architecture)")
        info = headers[files[name]].get(name)
        if info is None:
            raise ConfigError(f"model.init_from={str(folder)!r}: tensor {name} is listed in {INDEX} for "
                              f"{files[name].name}, which does not hold it (a partial shard)")
        if tuple(info["shape"]) != shape:
            raise ConfigError(f"model.init_from={str(folder)!r}: tensor {name} has shape {info['shape']}, the "
                              f"config.json implies {list(shape)}")
    optional = {"lm_head.weight"} if m.tie_embeddings else set()
    extra = sorted(k for k in files if k not in expected and k not in optional and not k.endswith(_IGNORED_SUFFIXES))
    if extra:
        raise ConfigError(f"model.init_from={str(folder)!r}: tensor {extra[0]} (and {len(extra) - 1} more) is not "
                          "part of a Llama-style model of this config; fmtrain would drop it")
    return files


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


def load_hf_state(folder: str | os.PathLike, m: ModelConfig, files: dict[str, Path] | None = None,
                  dtype: torch.dtype = torch.float32, lazy: bool = False) -> dict:
    """fmtrain state dict (``dtype``) of a Hugging Face folder (checked by :func:`check_hf_weights`);
    ``lazy``: values are functions reading their tensor when called (see :func:`load_weights`)."""
    from safetensors import safe_open

    folder = Path(folder)
    files = files or check_hf_weights(folder, m)
    handles: dict[Path, Any] = {}

    def get(name: str) -> torch.Tensor:
        f = files[name]
        if f not in handles:
            handles[f] = safe_open(str(f), framework="pt")
        return handles[f].get_tensor(name).to(dtype)

    return hf_to_fmtrain(get, m, lazy=lazy)


# --------------------------------------------------------------------------- the run's start
@dataclass
class Init:
    """A checked source of initial weights (:func:`prepare`)."""

    source: str
    kind: str  # "hf" or "fmtrain"
    files: dict[str, Path] | None = None  # hf: tensor -> shard
    checkpoint: Path | None = None  # fmtrain: the checkpoint folder

    def state_dict(self, m: ModelConfig) -> dict[str, torch.Tensor]:
        if self.kind == "hf":  # read and converted one tensor at a time: no second copy of the model
            return load_hf_state(self.source, m, self.files, lazy=True)
        from .export import load_model_state

        return load_model_state(self.checkpoint)

    @torch.no_grad()
    def load(self, model: torch.nn.Module) -> str:
        """Copy the weights into ``model`` (fresh from ``build_model``); returns a line for the log."""
        return load_weights(model, self.state_dict(model.cfg), self.source)


@torch.no_grad()
def load_weights(model: torch.nn.Module, sd: dict, source: str) -> str:
    """Copy ``sd`` (tensors, or functions returning them) into ``model`` in place: every tensor but
    the multipole summaries must be there with its shape; summaries of another shape or absent
    keep their (mean-equivalent) initialisation."""
    own = model.state_dict()  # shares storage with the parameters
    kept = []
    for name, t in own.items():
        is_summary = ".summaries." in name
        if name not in sd:
            if is_summary:
                kept.append(name)
                continue
            raise ConfigError(f"model.init_from={source!r}: tensor {name} is missing from the weights")
        value = sd[name]() if callable(sd[name]) else sd[name]
        if tuple(value.shape) != tuple(t.shape):
            if is_summary:
                kept.append(name)
                continue
            raise ConfigError(f"model.init_from={source!r}: tensor {name} has shape {list(value.shape)}, "
                              f"the model needs {list(t.shape)}")
        t.copy_(value)
    dropped = sorted(set(sd) - set(own))
    note = f"weights from {source}"
    if kept:
        note += f" ({len(kept)} summary tensors at their mean initialisation)"
    if dropped:
        note += f" ({len(dropped)} tensors not used by model.attention={model.cfg.attention!r}, e.g. {dropped[0]})"
    return note


def prepare(cfg: Config) -> Init | None:
    """The checked weights of ``model.init_from`` for a fresh run; None without it or when the run
    resumes its own checkpoint. Raises ConfigError before anything is written."""
    if not cfg.model.init_from:
        return None
    from .checkpoint import latest_valid

    with warnings.catch_warnings():  # the resume reports damaged checkpoints itself
        warnings.simplefilter("ignore")
        if latest_valid(cfg.checkpoint_dir) is not None:
            return None
    path = Path(cfg.model.init_from)
    if not path.exists():
        raise ConfigError(f"model.init_from={str(path)!r} does not exist")
    check_tokenizer(cfg)
    if is_hf_folder(path):
        return Init(str(path), "hf", files=check_hf_weights(path, cfg.model))
    ckpt, _ = _fmtrain_source(path)
    return Init(str(path), "fmtrain", checkpoint=ckpt)


def check_tokenizer(cfg: Config) -> None:
    """The run's tokenizer fits the embedding (ConfigError otherwise)."""
    from .data.tokenizer import load_tokenizer

    if not cfg.data.tokenizer:
        return
    try:
        load_tokenizer(cfg.data.tokenizer, vocab_size=cfg.model.vocab_size, need_mask=cfg.model.kind == "mlm")
    except (ValueError, OSError) as exc:
        raise ConfigError(f"data.tokenizer does not fit model.init_from={cfg.model.init_from!r}: {exc}") from None


def load_model(path: str | os.PathLike, *, seq_len: int = 2048, **model_fields):
    """An fmtrain model with the weights of ``path`` (a Hugging Face folder or an fmtrain checkpoint),
    ``model_fields`` the rest of [model] (e.g. ``attention="fma", block_size=64``); in fp32, on the CPU.

        model = load_model("Llama-3.2-1B", attention="fma")
    """
    from .config import from_dict
    from .model import build_model

    cfg = resolve_config(from_dict({"run": {"dir": "."}, "model": {"init_from": str(path), **model_fields},
                                    "data": {"seq_len": seq_len, "tokenizer": "(not needed)"}}))
    files = check_hf_weights(Path(path), cfg.model) if is_hf_folder(path) else None
    init = Init(str(path), "hf", files=files) if files else Init(str(path), "fmtrain",
                                                                  checkpoint=_fmtrain_source(Path(path))[0])
    model = build_model(cfg.model)
    init.load(model)
    return model


__all__ = ["load_model", "HF_ARCHITECTURES", "ARCH_FIELDS", "resolve_config", "fill_config", "prepare", "Init", "load_weights",
           "hf_model_fields", "expected_hf_tensors", "check_hf_weights", "hf_recipes", "hf_to_fmtrain",
           "fmtrain_to_hf", "load_hf_state", "is_hf_folder", "read_hf_config", "fmtrain_model_fields"]
