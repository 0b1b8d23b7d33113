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

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .config import Config, ConfigError, ModelConfig
from .errors import UserError
from .input_files import InputFileError, JsonFields, open_safetensors, read_json, safetensors_header

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
    """The JSON object of ``path``/config.json; InputFileError when it is something else."""
    file = Path(path) / "config.json"
    return JsonFields(read_json(file, "model's config"), file).data


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


def _fmtrain_source(path: Path):
    """(checkpoint folder, its Config) of an fmtrain checkpoint, run or model-only export."""
    from .checkpoint import CheckpointError, resolve

    try:
        ckpt = resolve(path)
        return ckpt, ckpt.config
    except (CheckpointError, ConfigError) as exc:
        raise ConfigError(f"model.init_from={str(path)!r} is neither a Hugging Face folder (no config.json) "
                          f"nor a usable fmtrain checkpoint: {exc}") from None


def fmtrain_model_fields(m: ModelConfig) -> dict[str, Any]:
    return {f: (m.kv_heads if f == "n_kv_heads" else m.hidden if f == "mlp_hidden" else getattr(m, f))
            for f in ARCH_FIELDS}


def _tokenizer_of(folder: Path) -> str | None:
    """``folder`` if it holds a tokenizer, else None; InputFileError when its tokenizer.json is damaged."""
    from .data.hf_tokenizer import hf_tokenizer_spec

    if hf_tokenizer_spec(folder / "tokenizer.json") is not None or (folder / "tokenizer.model").is_file():
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
    except UserError as exc:  # ConfigError, or an InputFileError of config.json
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
        errors += _fill_tokenizer(cfg, folder, src)
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


def _fill_tokenizer(cfg: Config, folder: Path, src: str) -> list[str]:
    """data.tokenizer from the source's folder; the problems."""
    try:
        tok = _tokenizer_of(folder)
    except InputFileError as exc:
        return [str(exc)]
    if tok is None:
        return [f"model.init_from={src!r} has no tokenizer (tokenizer.json or tokenizer.model); "
                "set data.tokenizer to the tokenizer the weights were trained with"]
    cfg.data.tokenizer = tok
    return []


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


def hf_weight_files(folder: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it, from the index or the single file."""
    index = folder / INDEX
    if index.is_file():
        weight_map = _weight_map(index)
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
        for name in safetensors_header(f):
            out[name] = f
    return out


def _weight_map(index: Path) -> dict[str, str]:
    """Tensor name -> shard file name, from a ``model.safetensors.index.json``."""
    weight_map = JsonFields(read_json(index, "index of the weights"), index).mapping("weight_map")
    if not weight_map.data:
        raise InputFileError(f"{index}: weight_map is missing or empty; download the index again")
    for name in weight_map.data:
        weight_map.string(name)  # a shard's file name
    return weight_map.data


def check_hf_weights(folder: Path, m: ModelConfig) -> dict[str, Path]:
    """Every expected tensor is in a present, complete shard with the right shape; else ConfigError
    naming the tensor (InputFileError for a file that is no safetensors). Returns name -> file."""
    files = hf_weight_files(folder)
    headers = {f: safetensors_header(f) for f in sorted(set(files.values()))}
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
    folder = Path(folder)
    files = files or check_hf_weights(folder, m)
    handles: dict[Path, Any] = {}

    def get(name: str) -> torch.Tensor:
        f = files[name]
        if f not in handles:
            handles[f] = open_safetensors(f)
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
    resumes its own checkpoint. Raises ConfigError (InputFileError for a damaged or missing-by-LFS
    file) before anything is written."""
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
    except InputFileError:  # a damaged file: its own message says which and what to do
        raise
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
