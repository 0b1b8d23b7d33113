"""The run configuration's schema: typed sections whose fields document themselves, and
the checks of a built config.

One TOML file describes one run; every table is a section below and every key a
field. Fields carry their help, allowed values and bounds through :func:`option`,
which is what ``python -m fmtrain.train --help`` lists. Every problem is reported
at once, each with what to change: unknown names (with a did-you-mean), out-of-range
values and inconsistent combinations. Checks that need the runtime (the world
size) are in :meth:`Config.check_world`. Reading and writing configs (TOML, dotted
overrides, the command line) is :mod:`.loading`.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# The attention options' allowed values and rules are the attention package's own.
from ..attention import IMPLS, SUMMARY_KINDS, SUMMARY_ROPES, VARIANTS
from ..attention.hierarchy import sizes_error
from ..attention.sequence_parallel import layout_ok as sp_layout_ok
from ..engine import deepspeed_key_errors
from ..errors import UserError


CONFIG_FILE = "config.toml"


class ConfigError(UserError, ValueError):
    """A configuration problem; the message says what to change."""


def option(default: Any = dataclasses.MISSING, help: str = "", *, choices: tuple | None = None,
           min: float | None = None, max: float | None = None, factory: Any = None):
    """A documented field: ``help`` is shown by ``--help``; ``choices``/``min``/``max``
    are checked on load (bounds inclusive)."""
    meta = {"help": help, "choices": choices, "min": min, "max": max}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


# --------------------------------------------------------------------------- sections
@dataclass
class RunConfig:
    dir: str = option("", "Run directory: resolved config, checkpoints, tb/ and metrics.jsonl go here. "
                          "Required; e.g. 'runs/tiny-gpt'. A restart with the same dir resumes.")
    name: str = option("", "Run name in logs; default: the last component of run.dir.")


@dataclass
class ModelConfig:
    kind: str = option("causal", "'causal' (GPT-style next-token LM) or 'mlm' (BERT-style masked LM).",
                       choices=("causal", "mlm"))
    vocab_size: int = option(32768, "Vocabulary size; the tokenizer is trained/checked against it.", min=2)
    dim: int = option(768, "Model width.", min=1)
    n_layers: int = option(12, "Number of transformer blocks.", min=1)
    n_heads: int = option(12, "Query heads; must divide model.dim.", min=1)
    n_kv_heads: int | None = option(None, "Key/value heads (grouped-query attention); must divide "
                                          "model.n_heads. Default: model.n_heads.", min=1)
    mlp_hidden: int | None = option(None, "SwiGLU hidden width. Default: 8/3 * dim rounded up to "
                                          "model.mlp_multiple.", min=1)
    mlp_multiple: int = option(64, "The default mlp_hidden is rounded up to a multiple of this.", min=1)
    tie_embeddings: bool = option(True, "Share the input embedding and output projection weights.")
    qkv_bias: bool = option(False, "Biases on the query/key/value projections (Qwen2 has them).")
    out_bias: bool = option(False, "A bias on the attention output projection.")
    mlp_bias: bool = option(False, "Biases on the SwiGLU projections.")
    init_from: str = option("", "Start from these weights: a Hugging Face folder (config.json, "
                                "*.safetensors; Llama, Mistral, Qwen2) or an fmtrain checkpoint, run or "
                                "model-only export (weights only: fresh optimizer, schedule and data "
                                "position). The architecture fields of [model] and data.tokenizer are "
                                "filled from it; the attention fields stay yours.")
    attention: str = option("fma", "'fma' (multipole attention), 'sdpa' (full attention, baseline) or "
                                   "'local' (fine level of fma only, baseline).",
                            choices=("fma", "sdpa", "local"))
    block_size: int = option(64, "Multipole fine block size m (fma, local).", min=1)
    rank: int = option(2, "Multipole summaries per coarse window p; must divide block_size. 2 is the "
                          "cheapest, and in the passkey probe it finds no single token past the fine "
                          "level without model.refine; 8 found every one to the training length for "
                          "1.4-1.6x the attention time (bench/results/recall-cpu-4k-single-rank8.md, "
                          "README's Adaptive refinement).", min=1)
    variant: str = option("nlogn", "Multipole variant: 'nlogn' or 'linear' (queries summarised too).",
                          choices=VARIANTS)
    summary: str = option("m2m", "How coarse key/value summaries are formed: 'm2m' (learned, any "
                                 "length), 'conv' (the paper's, tied to max_seq_len) or 'mean'.",
                          choices=SUMMARY_KINDS)
    weighted: bool = option(False, "Add log(tokens behind a summary) to its attention score (the paper's "
                                   "scale_attn). Off by default: the prior puts ~n tokens' worth of "
                                   "mass on blurred summaries, which cost held-out loss at every "
                                   "position and halved long-range recall on CPU studies "
                                   "(bench/results/long_context-cpu.md).")
    level_offset: bool = option(False, "Learn a score offset per head and coarse level, added to the "
                                       "summaries' log-weights (starts at 0: the fixed prior); fma only.")
    summary_rope: str = option("keys", "RoPE of the coarse summaries: 'keys' (summarise rotated keys) or "
                                       "'window' (summarise un-rotated keys, rotate each summary at its "
                                       "sub-window's mean position).", choices=SUMMARY_ROPES)
    refine: int = option(0, "Adaptive refinement (fma): per query, open the K far fine blocks whose "
                            "keys could score highest (a bound per window) and attend to them token by token (descending the "
                            "hierarchy: O(K log n) to choose them). 0: plain multipole attention. Costs about "
                            "K * (block_size + rank * levels) more keys per query. Decoding keeps a store of the "
                            "context's keys (README, Generation); sequence parallelism all-gathers the keys and "
                            "values (ring attention's traffic; README, Adaptive refinement).", min=0)
    max_level: int | None = option(None, "Keep the coarse levels 1..max_level only (fma): keys beyond their "
                                         "reach are not seen. For a model run past its training length: "
                                         "levels it never trained on (a sequence of n tokens has about "
                                         "log2(n / block_size) - 1) give it inputs it has not seen, and its "
                                         "recall collapses; capped at the trained ones it holds within their "
                                         "reach (README, Adaptive refinement). None: every level.", min=1)
    flat_top: bool = option(False, "With model.max_level below a sequence's levels (fma, model.refine > 0): "
                                   "the top kept level's interaction lists hold every earlier window of that "
                                   "level instead of dropping what lies beyond its reach, so the model keeps "
                                   "the levels it trained and refinement can still open any block. Costs "
                                   "n / (block_size * 2**(max_level-1)) summaries a query at the top level. "
                                   "No effect where max_level cuts no level.")
    select_reach: int | None = option(None, "Adaptive refinement (model.refine > 0): its selection scores windows "
                                            "farther than this many tokens from the query as if they were this "
                                            "far (rotated back by RoPE); the attention keeps the real positions. "
                                            "Past the training length, far windows' scores drift with distances "
                                            "the model never saw and win the selection; set it to the training "
                                            "length (data.seq_len: nothing changes within it). None: real "
                                            "distances (README, Adaptive refinement).", min=1)
    attend_reach: bool = option(False, "With model.select_reach: the far field's attention too reads what lies "
                                       "farther than it as if it were that far (ReRoPE-like): an opened block's "
                                       "tokens with the query rotated back as far as the block lies beyond, "
                                       "summaries likewise; the fine neighbours keep real positions. Past the "
                                       "training length, far tokens are then scored at distances the model "
                                       "trained (README, Adaptive refinement). False: real positions.")
    impl: str = option("auto", "Multipole implementation: 'auto' (Triton on GPU, else torch), 'torch' "
                               "(blocked PyTorch), 'triton' or 'dense' (reference, tests only).",
                       choices=IMPLS)
    rope_theta: float = option(10000.0, "RoPE base; raise it (e.g. 500000) for very long contexts.",
                               min=1.0)
    rope_scaling: dict[str, Any] = option(help="RoPE frequency scaling as in transformers' rope_parameters: "
                                               "{rope_type = 'llama3', factor = 8.0, low_freq_factor = 1.0, "
                                               "high_freq_factor = 4.0, original_max_position_embeddings = "
                                               "8192} (Llama 3.1) or {rope_type = 'linear', factor = F}; "
                                               "empty: plain RoPE.", factory=dict)
    max_seq_len: int | None = option(None, "Longest sequence summary='conv' is built for (its "
                                           "parameters grow with it); unused otherwise.", min=1)
    norm_eps: float = option(1e-5, "RMSNorm epsilon.", min=0.0)
    init_std: float = option(0.02, "Std of the normal weight init; residual projections get "
                                   "init_std / sqrt(2 * n_layers).", min=0.0)
    activation_checkpointing: bool = option(False, "Recompute each block in the backward "
                                                   "(memory for long sequences, ~1/3 more compute).")
    loss_chunk: int = option(4096, "Tokens per chunk of the output projection + loss; seq_len x vocab "
                                   "logits are never formed at once.", min=1)

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def hidden(self) -> int:
        """SwiGLU hidden width."""
        if self.mlp_hidden:
            return self.mlp_hidden
        want = 8 * self.dim // 3
        return -(-want // self.mlp_multiple) * self.mlp_multiple


@dataclass
class DataConfig:
    corpus: list[str] = option(help="Training text: 'stdlib' (this Python's standard library "
                                    "sources, always available offline), paths or globs of "
                                    ".txt/.jsonl/.parquet files, or 'hf:NAME' Hugging Face datasets.",
                               factory=lambda: ["stdlib"])
    text_field: str = option("text", "Field holding the text in .jsonl/.parquet/hub records.")
    max_missing_text: float = option(0.1, "Largest share of .jsonl/.parquet/hub records allowed to hold no "
                                          "text (null, no data.text_field, empty or only whitespace): they are counted (and skipped); "
                                          "a larger share refuses the corpus.", min=0.0, max=1.0)
    tokenizer: str = option("", "A SentencePiece model (.model) or a Hugging Face tokenizer.json (or "
                                "a folder holding one); a relative path missing from the working "
                                "directory is looked for beside the config file, then in the fmtrain "
                                "project (its shipped tokenizer/). Default: trained on the corpus with "
                                "model.vocab_size pieces and cached in data.cache_dir.")
    cache_dir: str = option(".cache/fmtrain", "Tokenizers and pre-tokenised shards are cached here "
                                              "(shared between runs).")
    seq_len: int = option(2048, "Tokens per sequence (global: sequence parallelism splits it).", min=2)
    batch_size: int = option(1, "Sequences per data-parallel rank per micro-step.", min=1)
    val_fraction: float = option(0.03, "Fraction of the corpus held out for evaluation (stdlib: whole "
                                       "package directories).", min=0.0, max=0.5)
    mask_prob: float = option(0.15, "MLM: fraction of tokens selected for prediction (BERT's 80/10/10 "
                                    "corruption).", min=0.0, max=1.0)
    document_masking: bool = option(False, "Attention stays within each packed document: each document's output "
                                           "equals the model run on it alone (fma's cu_seqlens; sdpa with a "
                                           "block-diagonal mask). The targets still run across documents (the "
                                           "target at an EOS is the next document's first token). Off: attention "
                                           "crosses document boundaries. With parallel.sequence > 1: the nlogn "
                                           "variant with m2m or mean summaries, refined or not.")
    position_reset: bool = option(False, "RoPE positions restart at 0 at each packed document (needs "
                                         "data.document_masking). Off by default, as in Llama 3, torchtitan and "
                                         "Megatron (reset_position_ids=False): RoPE is relative, so within a "
                                         "masked document only rounding tells the two apart.")
    align_documents: bool = option(False, "Training rows start every document on a block (model.block_size): each "
                                          "document is followed by padding (no loss) to a whole block, so document "
                                          "masking moves no token in attention (needs data.document_masking, the "
                                          "causal objective and data.seq_len a multiple of model.block_size). Costs "
                                          "about block_size/2 tokens of padding per document; the target at a padded "
                                          "EOS is dropped. Held-out rows are not aligned.")


@dataclass
class TrainConfig:
    steps: int = option(1000, "Optimizer steps in the run.", min=1)
    seed: int = option(0, "Seed of every RNG (model init, data order, masking).", min=0)
    lr: float = option(3e-4, "Peak learning rate (AdamW).", min=0.0)
    min_lr: float = option(3e-5, "Learning rate at the end of the cosine decay.", min=0.0)
    warmup_steps: int = option(100, "Linear warmup steps.", min=0)
    weight_decay: float = option(0.1, "AdamW weight decay (not applied to norms and biases).", min=0.0)
    betas: list[float] = option(help="AdamW betas [beta1, beta2].", factory=lambda: [0.9, 0.95])
    eps: float = option(1e-8, "AdamW epsilon.", min=0.0)
    grad_clip: float = option(1.0, "Clip the global gradient norm to this (0: no clipping).", min=0.0)
    grad_accum: int = option(1, "Micro-steps per optimizer step.", min=1)
    dtype: str = option("auto", "'fp32', 'bf16', or 'auto' (bf16 on GPU, fp32 on CPU).",
                        choices=("auto", "fp32", "bf16"))
    log_interval: int = option(10, "Steps between metric lines.", min=1)
    eval_interval: int = option(200, "Steps between evaluations (0: only at the end).", min=0)
    eval_batches: int = option(8, "Batches per evaluation.", min=1)
    max_minutes: float | None = option(None, "Stop (with a checkpoint) after this many minutes of "
                                             "training.", min=0.0)
    stop_at_step: int | None = option(None, "Stop (with a checkpoint) after this step, as a preemption "
                                            "would; a restart with the same run.dir resumes. For staged "
                                            "runs and resume tests.", min=1)


@dataclass
class CheckpointConfig:
    interval: int = option(1000, "Steps between checkpoints (a final one is always written).", min=1)
    keep: int = option(3, "Newest checkpoints kept; older ones are deleted.", min=1)
    dir: str = option("", "Checkpoint directory. Default: <run.dir>/checkpoints.")
    resplit: bool = option(False, "Resume a checkpoint written by a different number of data-parallel "
                                  "ranks: converted once to DeepSpeed's universal format, the data "
                                  "position re-split over the new ranks.")
    allow_changes: list[str] = option(help="Fields that may differ from the checkpoint's config on resume "
                                           "although the saved state was made with the old value (e.g. "
                                           "--checkpoint.allow_changes=train.lr,train.warmup_steps): applied "
                                           "from the resumed step on. Others are refused, each named "
                                           "(fmtrain/resume.py).", factory=list)


@dataclass
class ParallelConfig:
    zero_stage: int = option(0, "DeepSpeed ZeRO stage: 0 (plain data parallel), 1 (optimizer states), "
                                "2 (+ gradients) or 3 (+ parameters) partitioned.", min=0, max=3)
    sequence: int = option(1, "Sequence-parallel group size: ranks that split one sequence; must "
                              "divide the world size.", min=1)
    backend: str = option("auto", "torch.distributed backend: 'auto' (nccl on GPU, gloo on CPU), "
                                  "'gloo' or 'nccl'.", choices=("auto", "gloo", "nccl"))
    deepspeed: dict[str, Any] = option(help="Extra DeepSpeed config keys, merged into the generated "
                                            "JSON (e.g. [parallel.deepspeed.zero_optimization] "
                                            "overlap_comm = true).", factory=dict)


# Fields of earlier versions: named as such (not "unknown") when a config still sets them.
REMOVED_FIELDS = {
    "data.num_workers": "it was never used (the loader reads memory-mapped tokens in the training "
                        "process; data loading is ~1% of a step, see the data share of the step lines)",
}

# Keys of the DeepSpeed JSON that fmtrain derives from its own fields.
_DERIVED_DS_KEYS = {
    "train_batch_size": "data.batch_size and train.grad_accum",
    "train_micro_batch_size_per_gpu": "data.batch_size",
    "gradient_accumulation_steps": "train.grad_accum",
    "gradient_clipping": "train.grad_clip",
    "optimizer": "the [train] section (lr, betas, eps, weight_decay)",
    "scheduler": "train.lr, train.min_lr and train.warmup_steps",
    "bf16": "train.dtype",
    "fp16": "train.dtype (fmtrain supports fp32 and bf16)",
}


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    @property
    def name(self) -> str:
        return self.run.name or Path(self.run.dir).name

    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.checkpoint.dir) if self.checkpoint.dir else Path(self.run.dir) / "checkpoints"

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)

    def check_world(self, world_size: int) -> None:
        """Checks that need the number of processes; raises :class:`ConfigError`."""
        sp = self.parallel.sequence
        if world_size % sp:
            raise ConfigError(
                f"parallel.sequence={sp} does not divide the world size {world_size}: sequence-parallel "
                f"groups must tile the ranks. Use a divisor of {world_size} (e.g. "
                f"--parallel.sequence={math.gcd(sp, world_size)}) or launch a multiple of {sp} processes.")


# Section name -> dataclass (annotations are strings under `from __future__ import annotations`).
SECTIONS: dict[str, type] = typing.get_type_hints(Config)


def _did_you_mean(name: str, options) -> str:
    close = difflib.get_close_matches(name, list(options), n=1, cutoff=0.6)
    return f" Did you mean {close[0]!r}?" if close else ""


def check_config(cfg: Config) -> None:
    """Every check of :func:`from_dict` on a built config; raises :class:`ConfigError`."""
    errors = _range_errors(cfg) or _consistency_errors(cfg)
    if errors:
        raise ConfigError(format_errors(errors))


def format_errors(errors: list[str]) -> str:
    if len(errors) == 1:
        return "invalid config: " + errors[0]
    return "invalid config:\n" + "\n".join(f"  - {e}" for e in errors)


def _range_errors(cfg: Config) -> list[str]:
    errors = []
    for sec_name in SECTIONS:
        sec = getattr(cfg, sec_name)
        for f in dataclasses.fields(sec):
            value, meta = getattr(sec, f.name), f.metadata
            where = f"{sec_name}.{f.name}"
            if value is None or isinstance(value, (dict, bool)):
                continue
            if meta.get("choices") and value not in meta["choices"]:
                errors.append(f"{where}={value!r} is not one of {', '.join(map(repr, meta['choices']))}."
                              f"{_did_you_mean(str(value), meta['choices'])}")
            values = value if isinstance(value, list) else [value]
            for v in values:
                if not isinstance(v, (int, float)):
                    continue
                if isinstance(v, float) and not math.isfinite(v):
                    errors.append(f"{where}={v} must be a finite number")
                elif meta.get("min") is not None and v < meta["min"]:
                    errors.append(f"{where}={v} is below its minimum {meta['min']}")
                elif meta.get("max") is not None and v > meta["max"]:
                    errors.append(f"{where}={v} is above its maximum {meta['max']}")
    return errors


def _consistency_errors(cfg: Config) -> list[str]:
    """Combinations of fields that cannot work together, each with the fix."""
    e = []
    r, m, d, t, p = cfg.run, cfg.model, cfg.data, cfg.train, cfg.parallel
    if not r.dir:
        e.append('run.dir is required: set [run] dir = "runs/NAME" in the config, or --run.dir=runs/NAME')
    if m.dim % m.n_heads:
        e.append(f"model.n_heads={m.n_heads} does not divide model.dim={m.dim}; "
                 f"choose n_heads among {_divisors(m.dim, 64)} or change dim")
    elif m.head_dim % 2:
        e.append(f"head dim model.dim/model.n_heads = {m.head_dim} is odd; RoPE needs an even head dim")
    if m.n_heads % m.kv_heads:
        e.append(f"model.n_kv_heads={m.kv_heads} does not divide model.n_heads={m.n_heads}; "
                 f"choose among {_divisors(m.n_heads, m.n_heads)}")
    if m.rope_scaling:
        from ..attention.rope import ROPE_SCALINGS

        need = {"llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
                "linear": ("factor",)}.get(m.rope_scaling.get("rope_type"))
        if need is None:
            e.append(f"model.rope_scaling.rope_type={m.rope_scaling.get('rope_type')!r} is not one of "
                     f"{', '.join(map(repr, ROPE_SCALINGS))}")
        elif missing := [k for k in need if not isinstance(m.rope_scaling.get(k), (int, float))]:
            e.append(f"model.rope_scaling of rope_type {m.rope_scaling['rope_type']!r} needs the numbers "
                     f"{', '.join(missing)}")
    if m.attention in ("fma", "local") and sizes_error(m.block_size, m.rank) is not None:
        e.append(f"model.rank={m.rank} does not divide model.block_size={m.block_size} (each block "
                 "is split into rank sub-windows); e.g. block_size=64, rank=2")
    if m.attention == "fma" and m.summary == "conv":
        if m.max_seq_len is None:
            e.append(f"model.summary='conv' needs model.max_seq_len (its parameters grow with it): "
                     f"set it to at least data.seq_len={d.seq_len}, or use summary='m2m'")
        elif m.max_seq_len < d.seq_len:
            e.append(f"model.max_seq_len={m.max_seq_len} is shorter than data.seq_len={d.seq_len}; "
                     "conv summaries only run up to max_seq_len: raise it, or use summary='m2m'")
    if d.seq_len % p.sequence:
        e.append(f"data.seq_len={d.seq_len} is not divisible by parallel.sequence={p.sequence}; "
                 "each sequence-parallel rank takes an equal slice")
    elif p.sequence > 1 and m.attention in ("fma", "local") and not sp_layout_ok(d.seq_len // p.sequence,
                                                                                  m.block_size):
        e.append(f"with parallel.sequence={p.sequence} each rank holds data.seq_len/sequence = "
                 f"{d.seq_len // p.sequence} tokens, which must be model.block_size={m.block_size} times a "
                 f"power of two; make data.seq_len {p.sequence} * {m.block_size} * 2**j, e.g. "
                 f"{p.sequence * m.block_size * (1 << max(0, (d.seq_len // p.sequence // m.block_size).bit_length() - 1))}")
    if p.sequence > 1 and m.attention == "fma" and not m.refine and (m.level_offset or m.summary_rope != "keys"):
        e.append("model.level_offset and model.summary_rope='window' have no sequence-parallel path yet without "
                 "refinement; use parallel.sequence=1 with them (or model.refine > 0, whose path gathers the keys)")
    if m.max_level is not None and m.attention != "fma":
        e.append(f"model.max_level={m.max_level} caps multipole attention's coarse levels; model.attention="
                 f"{m.attention!r} has none: remove it")
    if m.flat_top and (m.attention != "fma" or not m.refine):
        e.append("model.flat_top=true widens the top level's lists for adaptive refinement's far field; it needs "
                 f"model.attention='fma' and model.refine > 0 (got {m.attention!r}, refine={m.refine}): set "
                 "model.flat_top=false, or model.refine")
    if m.select_reach is not None and (m.attention != "fma" or not m.refine):
        e.append(f"model.select_reach={m.select_reach} changes adaptive refinement's selection; it needs "
                 f"model.attention='fma' and model.refine > 0 (got {m.attention!r}, refine={m.refine}): remove it, "
                 "or set model.refine")
    if m.attend_reach and m.select_reach is None:
        e.append("model.attend_reach=true reads the far field as at model.select_reach, which is not set: set "
                 "model.select_reach (e.g. data.seq_len), or model.attend_reach=false")
    if m.refine and m.attention != "fma":
        e.append(f"model.refine={m.refine} refines multipole attention; it needs model.attention='fma' "
                 f"(got {m.attention!r}): set model.refine=0")
    elif m.refine and m.variant != "nlogn":
        e.append("model.refine > 0 needs model.variant='nlogn' (the linear variant shares one query per window "
                 "on coarse levels); set model.refine=0 or model.variant='nlogn'")
    if d.position_reset and not d.document_masking:
        e.append("data.position_reset restarts positions at each packed document, which only means something "
                 "when attention stays within documents: set data.document_masking=true, or "
                 "data.position_reset=false")
    if d.align_documents:
        if not d.document_masking:
            e.append("data.align_documents pads documents to start on blocks so that document masking moves no "
                     "token; without data.document_masking it only adds padding: set data.document_masking=true, "
                     "or data.align_documents=false")
        if m.kind != "causal":
            e.append(f"data.align_documents pads each document, which a bidirectional model (model.kind="
                     f"{m.kind!r}) would attend to: set data.align_documents=false (masking is exact without it)")
        if d.seq_len % m.block_size:
            e.append(f"data.align_documents starts documents on blocks of model.block_size={m.block_size}, which "
                     f"must divide data.seq_len={d.seq_len}: set data.seq_len to a multiple of it, or "
                     "data.align_documents=false")
    if d.document_masking and p.sequence > 1 and m.attention == "fma":
        unsupported = [what for what, on in (
            ("model.variant='linear'", m.variant != "nlogn"), ("model.summary='conv'", m.summary == "conv"),
            ("model.summary_rope='window'", m.summary_rope != "keys")) if on]
        if unsupported:
            e.append(f"document masking with parallel.sequence > 1 runs the nlogn variant with m2m or mean summaries "
                     f"(refined or not); "
                     f"{', '.join(unsupported)} has no such path yet: change it, or set parallel.sequence=1, or "
                     "data.document_masking=false")
    if p.sequence > 1 and m.attention == "sdpa":
        e.append("parallel.sequence > 1 is implemented for attention='fma' and 'local' only; "
                 "use --parallel.sequence=1 for the sdpa baseline")
    special = [c for c in d.corpus if c == "stdlib" or c.startswith("hf:")]
    if not d.corpus:
        e.append('data.corpus is empty; give "stdlib", "hf:NAME", or paths/globs of text files')
    elif special and len(d.corpus) > 1:
        e.append(f"data.corpus={d.corpus}: {special[0]!r} cannot be combined with other sources; "
                 "give it alone, or only files, folders and globs")
    if m.kind == "mlm" and not 0.0 < d.mask_prob < 1.0:
        e.append(f"data.mask_prob={d.mask_prob}: a masked LM needs 0 < mask_prob < 1 (BERT uses 0.15)")
    if t.min_lr > t.lr:
        e.append(f"train.min_lr={t.min_lr} is above train.lr={t.lr}; the cosine decays from lr to min_lr")
    if len(t.betas) != 2 or not all(0.0 <= b < 1.0 for b in t.betas):
        e.append(f"train.betas={t.betas} must be two numbers in [0, 1), e.g. [0.9, 0.95]")
    for key in p.deepspeed:
        if key in _DERIVED_DS_KEYS:
            e.append(f"parallel.deepspeed.{key} is generated by fmtrain from {_DERIVED_DS_KEYS[key]}; "
                     "set those fields instead")
    zero = p.deepspeed.get("zero_optimization")
    if isinstance(zero, dict) and "stage" in zero:
        e.append("parallel.deepspeed.zero_optimization.stage duplicates parallel.zero_stage; "
                 "set parallel.zero_stage instead")
    elif p.deepspeed:
        e += deepspeed_key_errors(p.deepspeed, _DERIVED_DS_KEYS)
    known = {f"{sec}.{f.name}" for sec, cls in SECTIONS.items() for f in dataclasses.fields(cls)}
    for name in cfg.checkpoint.allow_changes:
        if name not in known:
            e.append(f"checkpoint.allow_changes: {name!r} is not a field.{_did_you_mean(name, known)}")
    return e


def _divisors(n: int, limit: int) -> list[int]:
    return [k for k in range(1, min(n, limit) + 1) if n % k == 0]


__all__ = ["Config", "RunConfig", "ModelConfig", "DataConfig", "TrainConfig", "CheckpointConfig",
           "ParallelConfig", "ConfigError", "CONFIG_FILE", "SECTIONS", "REMOVED_FIELDS", "option", "check_config",
           "format_errors", "deepspeed_key_errors"]
