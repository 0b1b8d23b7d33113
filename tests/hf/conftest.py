"""What the Hugging Face tests share: tiny random Llama, Qwen2 and Mistral folders made here with the
real transformers library (:func:`make_hf`), a Hugging Face tokenizer (:func:`hf_tokenizer`), the
stdlib corpus as files, fmtrain runs on them and model-only exports without a run."""
import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from fmtrain.config import from_dict as plain_from_dict  # noqa: E402
from fmtrain.init_from import resolve_config  # noqa: E402


def from_dict(data: dict):
    """A config as a run sees it when it starts: model.init_from resolved."""
    return resolve_config(plain_from_dict(data))


VOCAB = 400  # the tokenizer's size; models may pad the embedding beyond it
REL = 1e-6  # float64 logits: relative (Frobenius) difference allowed against transformers


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def stdlib_texts(n: int = 20) -> list[str]:
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:n]
    return [f.read_text(encoding="utf-8", errors="replace") for f in files]


@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory) -> Path:
    """A byte-level BPE of VOCAB tokens trained on stdlib code, saved by transformers
    (tokenizer.json + tokenizer_config.json naming BOS, EOS and PAD)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<|bos|>", "<|eos|>", "<|pad|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(stdlib_texts(), trainer)
    folder = tmp_path_factory.mktemp("hf_tokenizer")
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|eos|>",
                            pad_token="<|pad|>").save_pretrained(folder)
    return folder


def make_hf(folder: Path, arch: str = "llama", *, tied: bool = True, kv_heads: int = 2, vocab: int = VOCAB,
            bias: bool = False, seed: int = 0, tokenizer: Path | None = None, layers: int = 2,
            **extra) -> Path:
    """A tiny random transformers model saved to ``folder``; norms and biases are perturbed away
    from their ones/zeros init, so that a wrong mapping of them shows in the logits."""
    torch.manual_seed(seed)
    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=kv_heads, rms_norm_eps=1e-5,
                  tie_word_embeddings=tied, max_position_embeddings=512, bos_token_id=0, eos_token_id=1,
                  pad_token_id=2, **{"rope_theta": 1000.0, **extra})
    if arch == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(attention_bias=bias, mlp_bias=bias, **common))
    elif arch == "qwen2":
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common))
    elif arch == "mistral":
        model = transformers.MistralForCausalLM(transformers.MistralConfig(**common))
    else:
        raise ValueError(arch)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.2 * torch.randn_like(p))
    model.save_pretrained(folder)
    if tokenizer is not None:
        for f in tokenizer.iterdir():
            shutil.copy2(f, folder / f.name)
    return folder


def hf_logits(folder: Path, ids: torch.Tensor) -> torch.Tensor:
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float64).eval()
    with torch.no_grad():
        return model(ids).logits


# --------------------------------------------------------------------------- training runs
RUN = """
[run]
dir = "{run}"
[model]
init_from = "{init}"
attention = "{attention}"
block_size = 16
rank = 2
loss_chunk = 64
[data]
corpus = ["{corpus}/*.txt"]
cache_dir = "{cache}"
seq_len = {seq_len}
batch_size = 2
val_fraction = 0.1
[train]
steps = 6
lr = 1e-2
min_lr = 1e-3
warmup_steps = 2
log_interval = 1
eval_interval = 0
eval_batches = 2
dtype = "fp32"
[checkpoint]
interval = 3
keep = 2
"""


@pytest.fixture(scope="module")
def text_files(tmp_path_factory) -> Path:
    """The embedded corpus's text (stdlib modules) as files: 40 for training runs (a folder; the
    top-level ``corpus`` fixture is a (folder, cache) pair of 60)."""
    root = tmp_path_factory.mktemp("corpus")
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[20:60]
    for f in files:
        (root / (f.stem + ".txt")).write_text(f.read_text(encoding="utf-8", errors="replace"))
    return root


def run_config(tmp_path: Path, name: str, init: Path, corpus: Path, attention: str = "fma",
               seq_len: int = 128) -> Path:
    cfg = tmp_path / f"{name}.toml"
    cfg.write_text(RUN.format(run=tmp_path / name, init=init, attention=attention, corpus=corpus,
                              cache=tmp_path / "cache", seq_len=seq_len))
    return cfg


def fmtrain(module: str, *args, check: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")
    r = subprocess.run([sys.executable, "-m", module, *map(str, args)], capture_output=True, text=True,
                       timeout=600, env=env)
    if check and r.returncode != 0:
        raise AssertionError(f"{module} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}")
    return r


def losses(run: Path) -> list[float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [m["loss"] for m in rows if "loss" in m]


SP_TOKENIZER = Path(__file__).resolve().parents[2] / "tokenizer" / "stdlib-4k.model"


def model_only(folder: Path, corpus: Path, tokenizer: Path, seed: int = 0, **model) -> Path:
    """A model-only export (what ``python -m fmtrain.export`` writes) of a random fmtrain
    model with perturbed norms, without a training run."""
    from safetensors.torch import save_file

    from fmtrain.checkpoint import META, file_sizes
    from fmtrain.config import save_config
    from fmtrain.data.tokenizer import load_tokenizer, tokenizer_files
    from fmtrain.model import build_model

    tok = load_tokenizer(tokenizer)
    cfg = from_dict({"run": {"dir": str(folder)}, "model": {"vocab_size": tok.vocab_size, "dim": 64, "n_layers": 2,
                                                             "n_heads": 4, "n_kv_heads": 2, "block_size": 16,
                                                             **model},
                     "data": {"corpus": [f"{corpus}/*.txt"], "seq_len": 256, "tokenizer": str(tokenizer)}})
    torch.manual_seed(seed)
    net = build_model(cfg.model)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.2 * torch.randn_like(p))
    folder.mkdir(parents=True)
    save_config(cfg, folder)
    save_file({k: v.clone().contiguous() for k, v in net.state_dict().items()}, folder / "model.safetensors")
    for src, name in tokenizer_files(tok.path):
        shutil.copy2(src, folder / name)
    (folder / META).write_text(json.dumps(dict(step=0, tokens_seen=0, format="model-only", world_size=1, dp_size=1,
                                               sp_size=1, zero_stage=None, files=file_sizes(folder))))
    return folder


def fmtrain_model(ckpt: Path):
    from fmtrain.export import load_config_of, load_model_state
    from fmtrain.model import build_model

    net = build_model(load_config_of(ckpt).model)
    net.load_state_dict(load_model_state(ckpt))
    return net.double().eval()
