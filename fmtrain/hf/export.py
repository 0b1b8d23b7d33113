"""Export an fmtrain run to a Hugging Face folder: ``python -m fmtrain.hf export RUN_OR_CHECKPOINT OUT``.

OUT gets ``config.json``, ``model.safetensors``, ``generation_config.json`` and the
tokenizer files:

- ``sdpa`` models become a standard ``LlamaForCausalLM`` (biases fmtrain's model has
  on q/k/v only, as Qwen2's, go with zero o_proj biases), which plain transformers
  loads with no fmtrain installed;
- ``fma`` and ``local`` models become ``model_type = "fmtrain"``
  (:mod:`fmtrain.hf.modeling`), which ``AutoModelForCausalLM.from_pretrained(OUT)``
  loads after ``import fmtrain.hf``, and any tool loads with ``trust_remote_code=True``
  (``lm_eval --model_args pretrained=OUT,trust_remote_code=True``): the folder carries an
  ``auto_map`` and a small ``modeling_fmtrain.py`` that imports fmtrain's implementation (fmtrain
  must be installed where it runs; the file says so when it is not);
- masked LMs are refused: transformers has no encoder class with fmtrain's
  architecture (RoPE, SwiGLU, RMSNorm) to hand them to.

The tokenizer: a Hugging Face tokenizer (``tokenizer.json``) is copied; a
SentencePiece model is converted to a ``tokenizer.json`` (:mod:`fmtrain.hf.sentencepiece`),
and the conversion is checked to encode a sample of text exactly as SentencePiece
does, else the export stops. OUT is written under a temporary name and moved in when
complete (:func:`fmtrain.export.write_folder`): a failed export (a full disk, a read-only
file system) leaves nothing, and says why in one line.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from ..checkpoint import CheckpointError, resolve
from ..export import ExportError, check_target, current_umask, load_model_state, write_folder
from ..config import Config
from ..data.tokenizer import Tokenizer, load_tokenizer, tokenizer_files
from .names import fmtrain_to_hf
from .remote import AUTO_MAP, REMOTE_CODE, REMOTE_FILE

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def hf_architecture(cfg: Config) -> str:
    """The transformers class an fmtrain model is exported as."""
    m = cfg.model
    if m.kind != "causal":
        raise ExportError(f"model.kind={m.kind!r}: masked LMs are not exported (transformers has no encoder with "
                          "fmtrain's architecture); export a causal LM, or use python -m fmtrain.export")
    # sdpa: Llama, whatever the biases (Llama's attention_bias puts them on q, k, v and o: the ones
    # fmtrain's model lacks are written as zeros). Not Qwen2 for q/k/v biases: transformers loads
    # model_type "qwen2" folders with Qwen2's own tokenizer class, whatever tokenizer.json says.
    return "FmtrainForCausalLM" if m.attention != "sdpa" else "LlamaForCausalLM"


def _hf_config(cfg: Config, arch: str, tok: Tokenizer, dtype: torch.dtype):
    import transformers

    m = cfg.model
    special = dict(bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
    dtype_name = str(dtype).removeprefix("torch.")
    if arch == "FmtrainForCausalLM":
        from .modeling import FmtrainConfig

        fields = {k: v for k, v in cfg.to_dict()["model"].items() if k != "init_from" and v is not None}
        return FmtrainConfig(fmtrain=fields, max_position_embeddings=cfg.data.seq_len, architectures=[arch],
                             dtype=dtype_name, auto_map=dict(AUTO_MAP), **special)
    common = dict(vocab_size=m.vocab_size, hidden_size=m.dim, intermediate_size=m.hidden,
                  num_hidden_layers=m.n_layers, num_attention_heads=m.n_heads, num_key_value_heads=m.kv_heads,
                  rms_norm_eps=m.norm_eps, tie_word_embeddings=m.tie_embeddings,
                  max_position_embeddings=cfg.data.seq_len,
                  rope_parameters={"rope_type": "default", "rope_theta": m.rope_theta, **m.rope_scaling},
                  hidden_act="silu", architectures=[arch], dtype=dtype_name, **special)
    return transformers.LlamaConfig(head_dim=m.head_dim, attention_bias=m.qkv_bias or m.out_bias,
                                    mlp_bias=m.mlp_bias, **common)


def _weights(cfg: Config, arch: str, sd: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    if arch == "FmtrainForCausalLM":
        out = {f"model.{k}": v for k, v in sd.items() if not (cfg.model.tie_embeddings and k == "head.weight")}
    else:
        summaries = [k for k in sd if ".summaries." in k]
        if summaries:  # sdpa has none; guard against a config that does not match its weights
            raise ExportError(f"{summaries[0]}: an sdpa model has no summaries; the checkpoint does not match "
                              "its config")
        out = fmtrain_to_hf(sd, cfg.model)
        m = cfg.model
        if m.qkv_bias != m.out_bias:  # Llama's attention_bias is all four: the missing ones are zeros
            for i in range(m.n_layers):
                a = f"model.layers.{i}.self_attn."
                for name, rows in (("q", m.dim), ("k", m.kv_heads * m.head_dim), ("v", m.kv_heads * m.head_dim),
                                   ("o", m.dim)):
                    out.setdefault(f"{a}{name}_proj.bias", torch.zeros(rows))
    # Tied and fused tensors share storage, which safetensors refuses: each its own copy.
    return {k: v.detach().to(dtype).clone().contiguous() for k, v in out.items()}


def _tokenizer(ckpt: Path, cfg: Config) -> Tokenizer:
    try:
        return load_tokenizer(ckpt / "tokenizer.model", vocab_size=cfg.model.vocab_size)
    except (ValueError, OSError) as exc:
        raise ExportError(f"{ckpt}: its tokenizer cannot be loaded: {exc}") from None


def _write_tokenizer(tok: Tokenizer, folder: Path, seq_len: int, sample: str) -> None:
    from ..data.hf_tokenizer import HFTokenizer

    if isinstance(tok, HFTokenizer):
        for src, name in tokenizer_files(tok.path):
            shutil.copy2(src, folder / name)
        return
    from .sentencepiece import convert, first_difference, special_tokens_config

    converted = convert(tok)
    got = [e.ids for e in converted.encode_batch(sample, add_special_tokens=False)]
    want = tok.sp.encode(sample)  # whole texts (fmtrain's encode_batch cuts long ones at newlines)
    bad = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), None)
    if bad is not None:  # where and how, so that the user can tell a near-tie (unigram) from a real bug
        raise ExportError("the SentencePiece tokenizer could not be converted exactly to a tokenizer.json: "
                          f"sample {bad} ({sample[bad][:40]!r}...) encodes differently "
                          f"{first_difference(tok, converted, sample[bad], got[bad])}")
    converted.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(special_tokens_config(tok, seq_len), indent=2) + "\n")


def _sample_texts(cfg: Config) -> list[str]:
    """Text to check a tokenizer conversion on: the run's corpus (some documents) and fixed strings."""
    fixed = ["def f(x):\n\treturn  x ** 2  # 12345\n", "  leading and trailing  ", "\n\n\nx", "é ✓ 中文 🙂",
             "a\u00a0b", "", "x = '<s>' + '</s>' <pad><mask><unk> <|endoftext|>"]  # control strings are text
    if any(c.startswith("hf:") for c in cfg.data.corpus):  # a hub dataset: no download for this
        return fixed
    try:
        from ..data import corpus_of

        docs = []
        for i, (_, text) in enumerate(corpus_of(cfg).documents()):  # the run's text_field too
            docs.append(text[:20000])
            if i >= 30:
                break
    except Exception:  # the corpus may not be at hand where the export runs
        docs = []
    return fixed + docs


# What an export may write: with --force these are replaced in OUT, everything else there is kept.
HF_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
            "tokenizer_config.json", "special_tokens_map.json", REMOTE_FILE)


def export(src: str | os.PathLike, out: str | os.PathLike, *, dtype: str = "fp32", force: bool = False) -> Path:
    """Write the Hugging Face folder ``out`` for the checkpoint (or run's newest checkpoint) ``src``.
    ``out`` is new or empty; with ``force`` it may hold other files: the export's own names
    (:data:`HF_FILES`) are replaced and the rest (a README, a model card) kept."""
    from . import require_extra

    require_extra()  # transformers, with model_type "fmtrain" registered; or one error naming the install
    try:
        ckpt = resolve(src)
    except CheckpointError as exc:
        raise ExportError(str(exc)) from None
    out = Path(out)
    check_target(out, HF_FILES, force=force, source=ckpt.path)
    if dtype not in DTYPES:
        raise ExportError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    cfg = ckpt.config
    arch = hf_architecture(cfg)
    tok = _tokenizer(ckpt, cfg)
    sd = load_model_state(ckpt)
    weights = _weights(cfg, arch, sd, DTYPES[dtype])
    config = _hf_config(cfg, arch, tok, DTYPES[dtype])

    def write(tmp: Path, name) -> None:  # name(file): its path in tmp, and what a failure names
        from safetensors.torch import save_file
        from transformers import GenerationConfig

        name("config.json")
        config.save_pretrained(tmp)
        if arch == "FmtrainForCausalLM":
            name(REMOTE_FILE).write_text(REMOTE_CODE)
        name("generation_config.json")
        GenerationConfig(bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id).save_pretrained(tmp)
        save_file(weights, name("model.safetensors"), metadata={"format": "pt", "source": str(ckpt.path.resolve())})
        os.chmod(tmp / "model.safetensors", 0o666 & ~current_umask())  # safetensors creates it 0600
        name("tokenizer.json")
        _write_tokenizer(tok, tmp, cfg.data.seq_len, _sample_texts(cfg))

    # config.json last: a folder caught half-way (moving into an existing OUT) does not load. An
    # earlier fma export's modelling file would be taken for part of an sdpa export: it goes.
    stale = [REMOTE_FILE] if arch != "FmtrainForCausalLM" and (out / REMOTE_FILE).is_file() else []
    return write_folder(out, write, last="config.json", remove=stale)


__all__ = ["export", "ExportError", "hf_architecture"]
