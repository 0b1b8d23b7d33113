"""Hugging Face interop with the real transformers library: tiny random Llama, Qwen2 and
Mistral models are built and saved here, imported into fmtrain (model.init_from), trained
on, and exported back (python -m fmtrain.hf export)."""
import importlib
import json
import math
import os
import re
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

from fmtrain.config import ConfigError  # noqa: E402
from fmtrain.config import from_dict as plain_from_dict  # noqa: E402
from fmtrain.input_files import InputFileError  # noqa: E402
from fmtrain.pretrained import load_model, resolve_config  # noqa: E402


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


CASES = {  # id: (arch, keyword arguments of make_hf)
    "llama-tied-gqa": ("llama", dict(tied=True, kv_heads=2)),
    "llama-untied-mha-bias": ("llama", dict(tied=False, kv_heads=4, bias=True)),
    "qwen2-untied-gqa-padded": ("qwen2", dict(tied=False, kv_heads=1, vocab=VOCAB + 16)),
    "qwen2-tied-gqa": ("qwen2", dict(tied=True, kv_heads=2)),
    "mistral-gqa": ("mistral", dict(tied=False, kv_heads=2, sliding_window=None)),
    "llama-rope-llama3": ("llama", dict(rope_parameters=dict(  # Llama 3.1's scaling, at a small original length
        rope_type="llama3", rope_theta=1000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=64))),
}


@pytest.mark.parametrize("case", CASES)
def test_imported_logits_equal_transformers(tmp_path, hf_tokenizer, case):
    arch, kw = CASES[case]
    folder = make_hf(tmp_path / "hf", arch, tokenizer=hf_tokenizer, **kw)
    ids = torch.randint(0, VOCAB, (2, 64), generator=torch.Generator().manual_seed(1))
    ref = hf_logits(folder, ids)
    # sdpa at any length; fma and local where the sequence lies within the fine level's
    # reach (two blocks of 32: the coarse levels and their summaries are not used).
    for attention in ("sdpa", "fma", "local"):
        model = load_model(folder, attention=attention, block_size=32, rank=2).double().eval()
        got = model.logits(ids)
        assert got.shape == ref.shape
        assert rel(got, ref) < REL, (attention, rel(got, ref))
    if "rope_parameters" in kw:  # the scaling matters here: plain RoPE would differ
        plain = load_model(folder, attention="sdpa", rope_scaling={}).double().eval()
        assert rel(plain.logits(ids), ref) > 100 * REL
    # The mapping is what makes them equal: swap two heads of one k/v projection and they differ.
    model = load_model(folder, attention="sdpa").double().eval()
    with torch.no_grad():
        w = model.trunk.blocks[0].attn.wkv.weight
        w[:16], w[16:32] = w[16:32].clone(), w[:16].clone()
    assert rel(model.logits(ids), ref) > 100 * REL


def test_config_is_filled_from_the_checkpoint(tmp_path, hf_tokenizer):
    folder = make_hf(tmp_path / "hf", "qwen2", tied=False, kv_heads=1, tokenizer=hf_tokenizer)
    cfg = from_dict({"run": {"dir": "r"}, "model": {"init_from": str(folder), "attention": "fma",
                                                     "block_size": 16, "summary": "m2m"}})
    m = cfg.model
    assert (m.dim, m.n_layers, m.n_heads, m.n_kv_heads, m.hidden, m.vocab_size) == (64, 2, 4, 1, 96, VOCAB)
    assert (m.tie_embeddings, m.qkv_bias, m.out_bias, m.mlp_bias) == (False, True, False, False)
    assert (m.norm_eps, m.rope_theta, m.kind) == (1e-5, 1000.0, "causal")
    assert (m.attention, m.block_size, m.summary) == ("fma", 16, "m2m")  # the user's choice
    assert cfg.data.tokenizer == str(folder)
    # An explicit value that agrees is fine; one that contradicts names both.
    from_dict({"run": {"dir": "r"}, "model": {"init_from": str(folder), "dim": 64}})
    with pytest.raises(ConfigError, match=r"model.dim=128 contradicts model.init_from=.*hidden_size is 64"):
        from_dict({"run": {"dir": "r"}, "model": {"init_from": str(folder), "dim": 128}})
    with pytest.raises(ConfigError, match=r"model.tie_embeddings=True contradicts.*tie_word_embeddings is False"):
        from_dict({"run": {"dir": "r"}, "model": {"init_from": str(folder), "tie_embeddings": True}})
    # The resolved config round-trips through TOML (a run's saved config.toml), also without the source.
    import tomllib

    from fmtrain.config import to_toml

    llama3 = make_hf(tmp_path / "llama3", "llama", tokenizer=hf_tokenizer, **CASES["llama-rope-llama3"][1])
    resolved = from_dict({"run": {"dir": "r"}, "model": {"init_from": str(llama3)}})
    assert resolved.model.rope_scaling["rope_type"] == "llama3"
    again = tomllib.loads(to_toml(resolved))
    assert from_dict(again) == resolved
    shutil.rmtree(llama3)
    assert from_dict(again) == resolved
    # The RoPE base may be raised (how contexts are extended).
    assert from_dict({"run": {"dir": "r"}, "model": {"init_from": str(folder),
                                                      "rope_theta": 5e5}}).model.rope_theta == 5e5


def test_fma_summaries_start_as_the_mean(tmp_path, hf_tokenizer):
    """Learned m2m summaries start mean-equivalent: beyond the fine level's reach the converted
    model equals the same model with summary='mean'."""
    folder = make_hf(tmp_path / "hf", "llama", tokenizer=hf_tokenizer)
    ids = torch.randint(0, VOCAB, (1, 256), generator=torch.Generator().manual_seed(2))
    m2m = load_model(folder, attention="fma", block_size=16, summary="m2m").double().eval()
    mean = load_model(folder, attention="fma", block_size=16, summary="mean").double().eval()
    assert rel(m2m.logits(ids), mean.logits(ids)) < 1e-12
    sdpa = load_model(folder, attention="sdpa").double().eval()
    assert rel(m2m.logits(ids), sdpa.logits(ids)) > 1e-4  # 16 blocks: the coarse levels are in use


def test_mistral_sliding_window(tmp_path, hf_tokenizer):
    folder = make_hf(tmp_path / "hf", "mistral", tokenizer=hf_tokenizer, sliding_window=128)
    base = {"run": {"dir": "r"}, "data": {"seq_len": 256}}
    with pytest.raises(ConfigError, match="sliding window of 128 tokens.*sdpa is full attention"):
        from_dict({**base, "model": {"init_from": str(folder), "attention": "sdpa"}})
    with pytest.warns(UserWarning, match="sliding window of 128 tokens.*replaces it"):
        from_dict({**base, "model": {"init_from": str(folder), "attention": "fma"}})
    # Within the window the two attentions agree: no error, no warning.
    cfg = from_dict({"run": {"dir": "r"}, "data": {"seq_len": 128},
                     "model": {"init_from": str(folder), "attention": "sdpa"}})
    assert cfg.model.dim == 64


# --------------------------------------------------------------------------- bad inputs
def test_unsupported_architecture_is_refused(tmp_path):
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=VOCAB))
    gpt2.save_pretrained(tmp_path / "gpt2")
    with pytest.raises(ConfigError, match=r"architecture 'GPT2LMHeadModel' \(model_type 'gpt2'\) is not supported"):
        from_dict({"run": {"dir": "r"}, "model": {"init_from": str(tmp_path / "gpt2")}})


def test_missing_truncated_and_misshapen_weights_name_the_tensor(tmp_path, hf_tokenizer):
    from fmtrain.pretrained import prepare

    def cfg_of(folder):
        return from_dict({"run": {"dir": str(tmp_path / "run")}, "model": {"init_from": str(folder)}})

    # Sharded: one shard missing.
    folder = make_hf(tmp_path / "sharded", tokenizer=hf_tokenizer)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder)
    shutil.rmtree(folder)
    model.save_pretrained(folder, max_shard_size="40KB")
    for f in hf_tokenizer.iterdir():
        shutil.copy2(f, folder / f.name)
    shards = sorted(folder.glob("model-*.safetensors"))
    assert len(shards) > 2
    assert prepare(cfg_of(folder)) is not None  # complete: accepted
    cfg = cfg_of(folder)
    shards[1].unlink()
    with pytest.raises(ConfigError, match=rf"shard {shards[1].name} is missing \(it holds model\.\S+"):
        prepare(cfg)
    # A truncated shard.
    folder = make_hf(tmp_path / "cut", tokenizer=hf_tokenizer)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(InputFileError, match="model.safetensors is truncated"):
        prepare(cfg_of(folder))
    # A config.json that does not fit the tensors.
    folder = make_hf(tmp_path / "shape", tokenizer=hf_tokenizer)
    hf = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(dict(hf, intermediate_size=128)))
    with pytest.raises(ConfigError, match=r"tensor model.layers.0.mlp.gate_proj.weight has shape \[96, 64\], "
                                          r"the config.json implies \[128, 64\]"):
        prepare(cfg_of(folder))
    # A tensor the architecture does not have.
    folder = make_hf(tmp_path / "extra", tokenizer=hf_tokenizer)
    from safetensors.torch import load_file, save_file

    sd = load_file(folder / "model.safetensors")
    save_file({**sd, "model.layers.0.self_attn.q_norm.weight": torch.ones(16)}, folder / "model.safetensors",
              metadata={"format": "pt"})
    with pytest.raises(ConfigError, match="tensor model.layers.0.self_attn.q_norm.weight .* is not part of"):
        prepare(cfg_of(folder))
    assert not (tmp_path / "run").exists()


def set_fields(folder: Path, **fields) -> Path:
    """``folder``'s config.json with ``fields`` replaced (None: written as null)."""
    hf = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**hf, **fields}))
    return folder


CONFIG_FAULTS = {  # id: (fields replaced in config.json, what the error says after "config.json")
    "hidden_size as a string": (dict(hidden_size="64"),
                                r': hidden_size must be a positive integer, found "64" \(a string\)'),
    "hidden_size null": (dict(hidden_size=None), r": hidden_size must be a positive integer, found null"),
    "vocab_size zero": (dict(vocab_size=0), r": vocab_size must be a positive integer, found 0 \(an integer\)"),
    "rope_scaling a string": (dict(rope_scaling="linear"),
                              r': rope_scaling must be a JSON object \(a mapping\), found "linear" \(a string\)'),
    "rope factor a string": (dict(rope_parameters={"rope_type": "linear", "factor": "8"}),
                             r': rope_parameters.factor must be a positive number, found "8" \(a string\)'),
    "llama3 scaling incomplete": (dict(rope_parameters={"rope_type": "llama3", "factor": 8.0}),
                                  r": rope_parameters.low_freq_factor is missing"),
    "bias a string": (dict(attention_bias="false"), r': attention_bias must be true or false, found "false"'),
    "architectures a string": (dict(architectures="LlamaForCausalLM"),
                               r': architectures must be a list of strings, found "LlamaForCausalLM"'),
    "norm eps NaN": (dict(rms_norm_eps=float("nan")), r": rms_norm_eps must be a positive number, found NaN"),
}


def test_config_json_of_the_wrong_shape_names_the_field_and_what_was_found(tmp_path, hf_tokenizer):
    good = make_hf(tmp_path / "good", tokenizer=hf_tokenizer, layers=1)
    for i, (case, (fields, says)) in enumerate(CONFIG_FAULTS.items()):
        folder = set_fields(Path(shutil.copytree(good, tmp_path / f"case{i}")), **fields)
        with pytest.raises(ConfigError, match=re.escape(str(folder / "config.json")) + says):
            from_dict({"run": {"dir": "r"}, "model": {"init_from": str(folder)}})
    (good / "config.json").write_text("null")
    with pytest.raises(ConfigError, match=r"config.json must hold a JSON object \(a mapping\), found null"):
        from_dict({"run": {"dir": "r"}, "model": {"init_from": str(good)}})
    (good / "config.json").write_text('{"architectures": ["LlamaForCausalLM"], "hidden_')
    with pytest.raises(ConfigError, match=rf"config.json in {re.escape(str(good))} is damaged \(not valid JSON: "
                                          r".* at char 40\); download it again"):
        from_dict({"run": {"dir": "r"}, "model": {"init_from": str(good)}})


LFS_POINTER = ("version https://git-lfs.github.com/spec/v1\n"
               "oid sha256:4d7a214614ab2935c943f9e0ff69d22eadbb8f32b1258daaa5e2ca24d17e2393\nsize 226480\n")
NOT_WEIGHTS = {  # id: (the file's bytes, what the error says after "model.safetensors in FOLDER")
    "lfs pointer": (LFS_POINTER.encode(),
                    r" is a Git LFS pointer, not the weights .*: run `git lfs pull` in {folder}$"),
    "html page": (b"\n<!DOCTYPE html>\n<html><head><title>Sign in</title></head><body></body></html>\n",
                  r" is an HTML page, not the weights .*: download it again$"),
    "json error": (b'{"error":"Repository not found"}',
                   r" is not a safetensors file \(header length \d+ > file size 32\); download it again$"),
    "header not json": (b"\x10\x00\x00\x00\x00\x00\x00\x00" + b"\xff" * 40,
                        r" is not a safetensors file \(its 16-byte header is not JSON: .*\); download it again$"),
    "entry not a tensor": (b"\x18\x00\x00\x00\x00\x00\x00\x00" + b'{"model.norm.weight": 1}',
                           r" is damaged: its header's entry 'model.norm.weight' is not a tensor"),
}


@pytest.mark.parametrize("case", NOT_WEIGHTS)
def test_weights_that_are_not_safetensors_say_what_they_are(tmp_path, hf_tokenizer, case):
    from fmtrain.pretrained import prepare

    folder = make_hf(tmp_path / "hf", tokenizer=hf_tokenizer, layers=1)
    cfg = from_dict({"run": {"dir": str(tmp_path / "run")}, "model": {"init_from": str(folder)}})
    content, says = NOT_WEIGHTS[case]
    (folder / "model.safetensors").write_bytes(content)
    with pytest.raises(InputFileError, match=rf"^model.safetensors in {re.escape(str(folder))}"
                                             + says.format(folder=re.escape(str(folder)))):
        prepare(cfg)
    assert not (tmp_path / "run").exists()


def test_every_opening_of_the_weights_is_checked(tmp_path, hf_tokenizer):
    """The shards of an index, and a file that changed after prepare() checked it."""
    from fmtrain.pretrained import load_hf_state, prepare

    model = transformers.AutoModelForCausalLM.from_pretrained(make_hf(tmp_path / "hf", layers=1))
    folder = tmp_path / "sharded"
    model.save_pretrained(folder, max_shard_size="40KB")
    for f in hf_tokenizer.iterdir():
        shutil.copy2(f, folder / f.name)
    cfg = from_dict({"run": {"dir": str(tmp_path / "run")}, "model": {"init_from": str(folder)}})
    init = prepare(cfg)
    shard = sorted(folder.glob("model-*.safetensors"))[1]
    shard.write_text(LFS_POINTER)
    with pytest.raises(InputFileError, match=rf"^{shard.name} in .* is a Git LFS pointer"):
        load_hf_state(folder, cfg.model, init.files)
    with pytest.raises(InputFileError, match=rf"^{shard.name} in .* is a Git LFS pointer"):
        prepare(cfg)
    index = folder / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": {"model.norm.weight": None}}))
    with pytest.raises(InputFileError, match=r"index.json: weight_map.model.norm.weight must be a string, found null"):
        prepare(cfg)


def test_bad_weights_and_tokenizer_files_end_a_run_in_one_line(tmp_path, hf_tokenizer, corpus):
    """Through the command: one ``error:`` line, exit status 2, no traceback, nothing written."""
    lfs = make_hf(tmp_path / "lfs", tokenizer=hf_tokenizer, layers=1)
    (lfs / "model.safetensors").write_text(LFS_POINTER)
    cut = make_hf(tmp_path / "cut", tokenizer=hf_tokenizer, layers=1)
    text = (cut / "tokenizer.json").read_text()
    (cut / "tokenizer.json").write_text(text[:len(text) // 2])
    for folder, says in [(lfs, f"model.safetensors in {lfs} is a Git LFS pointer, not the weights"),
                         (cut, f"tokenizer.json in {cut} is damaged (not valid JSON: ")]:
        r = fmtrain("fmtrain.train", run_config(tmp_path, "run", folder, corpus), check=False)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and says in r.stderr and "Traceback" not in r.stderr, r.stderr
        assert len([line for line in lines if line.startswith("error:")]) == 1, r.stderr
        assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------- the tokenizer
def test_hf_tokenizer_in_the_data_pipeline(tmp_path, hf_tokenizer):
    from fmtrain.data.hf_tokenizer import HFTokenizer
    from fmtrain.data.tokenizer import load_tokenizer, tokenizer_files
    from fmtrain.data.tokens import TokenData, cached_tokens

    tok = load_tokenizer(hf_tokenizer)  # a folder holding tokenizer.json
    assert isinstance(tok, HFTokenizer) and tok.vocab_size == VOCAB
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.mask_id) == (0, 1, 2, None)
    text = "def f(x):\n\treturn  x ** 2  # 12345 é ✓\n"
    ids = tok.encode(text)
    assert tok.decode(ids) == text and tok.bos_id not in ids
    assert int(tok.token_bytes[ids].sum()) == len(text.encode("utf-8"))  # bits per byte count every byte
    assert int(tok.token_bytes[[tok.bos_id, tok.eos_id]].sum()) == 0
    # The embedding may be larger (padded), not smaller.
    load_tokenizer(hf_tokenizer / "tokenizer.json", vocab_size=VOCAB + 16)
    with pytest.raises(ValueError, match=f"has {VOCAB} tokens but the model's embedding has vocab_size=300"):
        load_tokenizer(hf_tokenizer, vocab_size=300)
    with pytest.raises(ValueError, match="no mask_token"):
        load_tokenizer(hf_tokenizer, need_mask=True)
    # A checkpoint keeps tokenizer.json and its config; loading its "tokenizer.model" finds them.
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    for src, name in tokenizer_files(tok.path):
        shutil.copy2(src, ckpt / name)
    assert sorted(p.name for p in ckpt.iterdir()) == ["tokenizer.json", "tokenizer_config.json"]
    again = load_tokenizer(ckpt / "tokenizer.model")
    assert again.encode(text) == ids and again.eos_id == tok.eos_id
    # The token cache: documents back to back, each ending in EOS.
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    docs = stdlib_texts(4)
    for i, d in enumerate(docs):
        (corpus / f"{i}.txt").write_text(d)
    _, data = cached_tokens(str(corpus / "*.txt"), tok, tmp_path / "cache", progress=False)
    both = [data["train"].document(d) for d in range(data["train"].n_docs)] + \
        [data["validation"].document(d) for d in range(data["validation"].n_docs)]
    assert sorted(tok.decode(d[:-1].tolist()) for d in both) == sorted(docs)
    assert all(int(d[-1]) == tok.eos_id for d in both)
    assert isinstance(data["train"], TokenData)


def test_tokenizer_config_of_the_wrong_shape_names_the_field(tmp_path, hf_tokenizer):
    from fmtrain.data.tokenizer import load_tokenizer

    folder = Path(shutil.copytree(hf_tokenizer, tmp_path / "tok"))
    (folder / "tokenizer_config.json").write_text('{"eos_token": 5}')
    with pytest.raises(InputFileError, match=r"tokenizer_config.json: eos_token must be a token .* found 5 \(an int"):
        load_tokenizer(folder)
    (folder / "tokenizer_config.json").write_text("null")
    with pytest.raises(InputFileError, match=r"tokenizer_config.json must hold a JSON object .*, found null"):
        load_tokenizer(folder)


def prepend_tokenizer(folder: Path) -> Path:
    """A SentencePiece-style BPE laid out as Llama 2's legacy tokenizer.json: a normalizer that
    prepends "\u2581" to every input and turns spaces into "\u2581", no pre-tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="always")  # no merge across a space
    trainer = trainers.BpeTrainer(vocab_size=VOCAB + 256, show_progress=False,
                                  special_tokens=["<unk>"] + [f"<0x{b:02X}>" for b in range(256)])
    tok.train_from_iterator(stdlib_texts(), trainer)
    spec = json.loads(tok.to_str())
    spec["pre_tokenizer"] = None
    spec["normalizer"] = {"type": "Sequence", "normalizers": [
        {"type": "Prepend", "prepend": "\u2581"}, {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}]}
    folder.mkdir()
    (folder / "tokenizer.json").write_text(json.dumps(spec))
    return folder / "tokenizer.json"


class Recorder:
    """A ``tokenizers.Tokenizer`` that records the lengths of the texts of each encoding call."""

    def __init__(self, hf):
        self.hf, self.calls = hf, []

    def encode_batch_fast(self, texts, **kwargs):
        self.calls.append([len(t) for t in texts])
        return self.hf.encode_batch_fast(texts, **kwargs)


@pytest.mark.parametrize("layout", ["byte-level", "prepend-normalizer"])
def test_long_documents_are_encoded_in_pieces_to_the_same_ids(tmp_path, hf_tokenizer, monkeypatch, layout):
    from fmtrain.data import hf_tokenizer as H

    path = hf_tokenizer / "tokenizer.json" if layout == "byte-level" else prepend_tokenizer(tmp_path / "tok")
    tok = H.HFTokenizer(path)
    code = "".join(stdlib_texts(8))  # lines, indentation, single spaces
    docs = [code, code.replace("\n", " "), "a short one", ""]
    whole = [e.ids for e in tok.hf.encode_batch(docs, add_special_tokens=False)]
    monkeypatch.setattr(H, "_PIECE_CHARS", 1000)
    monkeypatch.setattr(H, "_BATCH_CHARS", 20_000)
    tok.hf = Recorder(tok.hf)
    assert tok.encode_batch(docs) == whole
    lengths = [n for call in tok.hf.calls for n in call]
    assert len(lengths) > 2 * len(code) // 2000 and max(lengths) <= 2000
    assert max(sum(call) for call in tok.hf.calls) <= 20_000
    assert tok.drop_space == (layout == "prepend-normalizer")
    if tok.drop_space:  # the normalizer's "\u2581" would double the space at every cut
        tok.drop_space = False
        assert tok.encode(code) != whole[0]


def test_a_long_document_is_encoded_in_bounded_pieces_at_the_real_sizes(hf_tokenizer):
    from fmtrain.data import hf_tokenizer as H

    tok = H.HFTokenizer(hf_tokenizer / "tokenizer.json")
    text = "".join(stdlib_texts(40)).replace("\n", " ")[:5 * H._PIECE_CHARS]  # one line
    whole = tok.hf.encode(text, add_special_tokens=False).ids
    tok.hf = Recorder(tok.hf)
    assert tok.encode(text) == whole
    lengths = [n for call in tok.hf.calls for n in call]
    assert len(lengths) >= 3 and sum(lengths) == len(text) and max(lengths) <= 2 * H._PIECE_CHARS


MEASURE_MEMORY = """
import json, sys, sysconfig
from pathlib import Path
from fmtrain.data import hf_tokenizer as H

tok = H.HFTokenizer(sys.argv[1])
H._PIECE_CHARS, H._BATCH_CHARS = 1 << 13, 1 << 16  # the real ones at a smaller scale
files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
text = " ".join(f.read_text(encoding="utf-8", errors="replace") for f in files).replace("\\n", " ")[:2_000_000]
def peak_mb():  # not ru_maxrss, which keeps the peak of the parent (pytest) across exec
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
start = peak_mb()
ids = tok.encode(text)
bounded = peak_mb() - start
same = tok.hf.encode(text, add_special_tokens=False).ids == ids
print(json.dumps({"bounded": bounded, "whole": peak_mb() - start, "same": same, "chars": len(text)}))
"""


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads the peak memory from /proc (Linux)")
def test_encoding_a_long_one_line_document_takes_bounded_memory(hf_tokenizer):
    """The peak memory of encoding a 2M-character line in pieces, against encoding it whole
    (which takes about 200 bytes per character inside ``tokenizers``)."""
    r = subprocess.run([sys.executable, "-c", MEASURE_MEMORY, str(hf_tokenizer / "tokenizer.json")],
                       capture_output=True, text=True, timeout=300, env=dict(os.environ, RAYON_NUM_THREADS="2"))
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["same"] and got["chars"] == 2_000_000
    assert got["whole"] > 150, got  # what is bounded: the whole line takes this much
    assert got["bounded"] < got["whole"] / 3, got


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
def corpus(tmp_path_factory) -> Path:
    """The embedded corpus's text (stdlib modules) as files: 40 for training runs."""
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


def test_bad_inputs_to_a_run_write_nothing(tmp_path, hf_tokenizer, corpus):
    small = make_hf(tmp_path / "small", vocab=300, tokenizer=hf_tokenizer)  # tokenizer larger than the embedding
    r = fmtrain("fmtrain.train", run_config(tmp_path, "run", small, corpus), check=False)
    assert r.returncode == 2, r.stderr
    assert f"has {VOCAB} tokens but the model's embedding has vocab_size=300" in r.stderr
    unknown = tmp_path / "unknown"
    shutil.copytree(make_hf(tmp_path / "hf", tokenizer=hf_tokenizer), unknown)
    hf = json.loads((unknown / "config.json").read_text())
    (unknown / "config.json").write_text(json.dumps(dict(hf, architectures=["FalconForCausalLM"])))
    r = fmtrain("fmtrain.train", run_config(tmp_path, "run", unknown, corpus), check=False)
    assert r.returncode == 2 and "architecture 'FalconForCausalLM'" in r.stderr, r.stderr
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()


@pytest.mark.slow
def test_continued_pretraining_from_hf_trains_and_resumes_bitwise(tmp_path, hf_tokenizer, corpus):
    hf = make_hf(tmp_path / "hf", "qwen2", tied=False, tokenizer=hf_tokenizer)
    straight = run_config(tmp_path, "straight", hf, corpus)
    r = fmtrain("fmtrain.train", straight)
    assert f"weights from {hf}" in r.stdout and "summary tensors at their mean initialisation" in r.stdout
    ls = losses(tmp_path / "straight")
    assert len(ls) == 6 and ls[-1] < ls[0] - 0.3, ls
    split = run_config(tmp_path, "split", hf, corpus)
    fmtrain("fmtrain.train", split, "--train.stop_at_step=3")
    r = fmtrain("fmtrain.train", split)
    assert "resumed from" in r.stdout and "weights from" not in r.stdout
    assert losses(tmp_path / "split") == ls  # bitwise
    # The checkpoint holds what eval, generate and a resume need.
    ckpt = tmp_path / "split" / "checkpoints" / "step_00000006"
    assert {"tokenizer.json", "tokenizer_config.json", "config.toml"} <= {p.name for p in ckpt.iterdir()}
    saved = (ckpt / "config.toml").read_text()
    assert "dim = 64" in saved and "qkv_bias = true" in saved and f'init_from = "{hf}"' in saved
    shutil.rmtree(hf)  # eval and generate of the checkpoint do not need the source any more
    ev = fmtrain("fmtrain.eval", tmp_path / "split", "--batches", "1")
    assert json.loads(ev.stdout[ev.stdout.index("{"):])["eval_bpb"] > 0
    gen = fmtrain("fmtrain.generate", tmp_path / "split", "--prompt", "def ", "--tokens", "8",
                  "--temperature", "0")
    assert gen.stdout.startswith("def ")
    # Exported (fma: model_type "fmtrain") and loaded through the Auto classes: fmtrain's logits.
    importlib.import_module("fmtrain.hf")  # registers model_type "fmtrain"
    fmtrain("fmtrain.hf", "export", tmp_path / "split", tmp_path / "exported")
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "exported", dtype=torch.float64).eval()
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "exported")
    ids = torch.tensor([tok("def main(argv):\n    return 0\n" * 8, add_special_tokens=False)["input_ids"]])
    assert ids.shape[1] > 64  # beyond the fine level's reach
    with torch.no_grad():
        assert rel(model(ids).logits, fmtrain_model(ckpt).logits(ids)) < 1e-12


@pytest.mark.slow
def test_init_from_hf_under_zero3_on_two_ranks(tmp_path, hf_tokenizer, corpus):
    """Every rank reads the weights before DeepSpeed partitions them (ZeRO 3, 2 gloo ranks): the
    first loss is the imported model's, as on one process without partitioning."""
    hf = make_hf(tmp_path / "hf", "llama", tied=True, tokenizer=hf_tokenizer)
    zero3 = run_config(tmp_path, "zero3", hf, corpus)
    fmtrain("torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "fmtrain.train", zero3,
            "--parallel.zero_stage=3", "--train.steps=2")
    single = run_config(tmp_path, "single", hf, corpus)
    fmtrain("fmtrain.train", single, "--train.steps=1", "--data.batch_size=4")  # the same 4 sequences
    first = losses(tmp_path / "zero3")
    assert len(first) == 2 and losses(tmp_path / "single")[0] == pytest.approx(first[0], rel=1e-5)
    assert first[0] < 7.0  # not a diverged start (ln 400 = 6.0 for a uniform guess)


@pytest.mark.slow
def test_init_from_an_fmtrain_run_takes_the_weights_only(tmp_path, hf_tokenizer, corpus):
    hf = make_hf(tmp_path / "hf", "llama", tokenizer=hf_tokenizer)
    first = run_config(tmp_path, "first", hf, corpus, attention="sdpa")
    fmtrain("fmtrain.train", first)
    # Continuing the run itself on other data is refused, with the way to do it.
    other = tmp_path / "other"
    other.mkdir()
    for f in sorted(corpus.glob("*.txt"))[::2]:
        shutil.copy2(f, other / f.name)
    r = fmtrain("fmtrain.train", first, f"--data.corpus={other}/*.txt", "--train.steps=8", check=False)
    assert r.returncode == 2 and "start a new run.dir with model.init_from" in r.stderr, r.stderr[-2000:]
    assert "checkpoint.resplit" not in r.stderr
    # A new run from it: another corpus (half the files), another length, another attention.
    cont = run_config(tmp_path, "cont", tmp_path / "first", other, attention="fma", seq_len=256)
    r = fmtrain("fmtrain.train", cont, "--train.steps=2")
    assert f"weights from {tmp_path / 'first'}" in r.stdout and "resumed" not in r.stdout
    rows = [json.loads(line) for line in (tmp_path / "cont" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in rows if "loss" in m] == [1, 2]  # a fresh schedule and data position
    # It starts where the first run ended, far below a random model.
    first_eval = [m for m in rows if "eval_loss" in m][0]["eval_loss"]
    assert first_eval < losses(tmp_path / "first")[0] - 0.3
    saved = (tmp_path / "cont" / "config.toml").read_text()
    assert 'attention = "fma"' in saved and "dim = 64" in saved


# --------------------------------------------------------------------------- export
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


PLAIN = """
import sys, torch
sys.modules["fmtrain"] = None  # plain transformers: any import of fmtrain fails
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float64).eval()
ids = torch.load(sys.argv[2])
with torch.no_grad():
    logits = model(ids).logits
tok = AutoTokenizer.from_pretrained(sys.argv[1])
ids = tok(sys.argv[3], add_special_tokens=False)["input_ids"]
torch.save({"logits": logits, "class": type(model).__name__, "ids": ids}, sys.argv[4])
"""


@pytest.mark.slow
@pytest.mark.parametrize("case", ["sentencepiece-tied", "hf-tokenizer-untied-biases"])
def test_sdpa_export_loads_in_plain_transformers(tmp_path, corpus, hf_tokenizer, case):
    from fmtrain.data.tokenizer import load_tokenizer
    from fmtrain.hf import export

    if case == "sentencepiece-tied":  # the SentencePiece model is converted to a tokenizer.json; Llama 3.1's RoPE
        ckpt = model_only(tmp_path / "ckpt", corpus, SP_TOKENIZER, attention="sdpa", rope_scaling=dict(
            rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
            original_max_position_embeddings=64))
    else:  # q/k/v and MLP biases (no o_proj bias: written as zeros), untied embeddings
        ckpt = model_only(tmp_path / "ckpt", corpus, hf_tokenizer, attention="sdpa", tie_embeddings=False,
                          qkv_bias=True, mlp_bias=True)
    out = export(ckpt, tmp_path / "out")
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "generation_config.json"} <= {p.name for p in out.iterdir()}
    assert "fmtrain" not in (out / "config.json").read_text()
    tok = load_tokenizer(ckpt)
    ids = torch.randint(0, tok.vocab_size, (2, 96), generator=torch.Generator().manual_seed(3))
    torch.save(ids, tmp_path / "ids.pt")
    text = (sorted(corpus.glob("*.txt"))[0].read_text())[:3000] + " é ✓\t\t x  "
    subprocess.run([sys.executable, "-c", PLAIN, out, tmp_path / "ids.pt", text, tmp_path / "got.pt"], check=True,
                   env=dict(os.environ, HF_HUB_OFFLINE="1"))
    got = torch.load(tmp_path / "got.pt")
    assert got["class"] == "LlamaForCausalLM"
    assert rel(got["logits"], fmtrain_model(ckpt).logits(ids)) < REL
    want = tok.sp.encode(text) if case == "sentencepiece-tied" else tok.encode(text)
    assert got["ids"] == want


@pytest.mark.slow
def test_fma_export_loads_through_the_auto_classes_and_generates(tmp_path, corpus):
    import fmtrain.hf  # noqa: F401  (registers model_type "fmtrain")
    from fmtrain.hf import export

    ckpt = model_only(tmp_path / "ckpt", corpus, SP_TOKENIZER, attention="fma", summary="m2m")
    net = fmtrain_model(ckpt)
    with torch.no_grad():  # trained-looking summaries: exported as they are
        for s in net.modules():
            if hasattr(s, "leaf"):
                s.leaf.add_(0.05 * torch.randn_like(s.leaf))
    out = export(ckpt, tmp_path / "out")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "fmtrain" and cfg["architectures"] == ["FmtrainForCausalLM"]
    model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float64).eval()
    assert type(model).__name__ == "FmtrainForCausalLM"
    net = fmtrain_model(ckpt)
    ids = torch.randint(0, 4096, (1, 200), generator=torch.Generator().manual_seed(4))  # 13 blocks: coarse levels
    with torch.no_grad():
        assert rel(model(ids).logits, net.logits(ids)) < 1e-12
    # Greedy generate() equals a greedy loop over fmtrain's logits (fmtrain.generate's oracle path).
    # Through fmtrain's multipole cache (use_cache, the default) and recomputing every step.
    prompt = ids[:, :40]
    seq = prompt[0].tolist()
    for _ in range(30):  # 40 + 30 tokens: past the fine level's reach (2 blocks of 16), coarse levels in use
        seq.append(int(net.logits(torch.tensor([seq]))[0, -1].argmax()))
    decode, steps = model.model.decode, []
    model.model.decode = lambda *a: steps.append(1) or decode(*a)  # count the cache's steps
    for use_cache in (True, False):
        got = model.generate(prompt, max_new_tokens=30, do_sample=False, eos_token_id=None, use_cache=use_cache)
        assert got[0, 40:].tolist() == seq[40:], use_cache
        assert len(steps) == 29  # prefill gives the first token, 29 decode steps the rest; none without cache


def test_export_refusals_write_nothing(tmp_path, corpus):
    from fmtrain.hf import ExportError, export

    mlm = model_only(tmp_path / "mlm", corpus, SP_TOKENIZER, kind="mlm")
    with pytest.raises(ExportError, match="masked LMs are not exported"):
        export(mlm, tmp_path / "out")
    causal = model_only(tmp_path / "causal", corpus, SP_TOKENIZER)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    with pytest.raises(ExportError, match="exists and is not empty.*--force.*keeps x"):
        export(causal, tmp_path / "full")
    assert [p.name for p in (tmp_path / "full").iterdir()] == ["x"]
    export(causal, tmp_path / "full", force=True)  # the user's file stays beside the export's
    assert {"x", "config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in (tmp_path / "full").iterdir()}
    (causal / "tokenizer.model").write_bytes(b"not a model")  # a damaged checkpoint
    with pytest.raises(ExportError, match="tokenizer.model has 11 bytes"):
        export(causal, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))
    # The command line: exit status 2 and the message.
    r = fmtrain("fmtrain.hf", "export", mlm, tmp_path / "out", check=False)
    assert r.returncode == 2 and "masked LMs are not exported" in r.stderr, r.stderr


@pytest.mark.slow
def test_converted_sentencepiece_encodes_the_whole_corpus_and_control_strings_as_text(tmp_path):
    """Every document of the embedded corpus, and text holding the control pieces literally
    (the stdlib has '<s>' in lib2to3), encodes as SentencePiece encodes it: through the converted
    tokenizers object and through transformers reading the exported files."""
    from transformers import AutoTokenizer

    from fmtrain.data.corpus import Corpus
    from fmtrain.data.tokenizer import load_tokenizer
    from fmtrain.hf.sentencepiece import convert, special_tokens_config

    tok = load_tokenizer(SP_TOKENIZER)
    converted = convert(tok)
    docs = [text for _, text in Corpus.parse(["stdlib"]).documents()]
    assert len(docs) > 100 and any("<s>" in d for d in docs)  # the stdlib grouped by directory
    controls = "x = '<s>' + '</s>'<pad> <mask><unk>\n"
    docs.append(controls * 3)
    got = [e.ids for e in converted.encode_batch(docs, add_special_tokens=False)]
    want = tok.sp.encode(docs)
    differ = [i for i, (a, b) in enumerate(zip(got, want)) if a != b]
    assert not differ, f"{len(differ)} of {len(docs)} documents encode differently, first {differ[:5]}"
    converted.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(special_tokens_config(tok, 1024)))
    hf = AutoTokenizer.from_pretrained(tmp_path)
    lib2to3 = next(d for d in docs if "<s>" in d)
    for text in (controls, lib2to3):
        assert hf(text, add_special_tokens=False)["input_ids"] == tok.sp.encode(text)
    assert hf.decode(hf(controls)["input_ids"]) == controls
    assert hf.eos_token == "</s>" and hf.eos_token_id == tok.eos_id


LM_EVAL_TASKS = {
    "fmtrain_docs.yaml": """task: fmtrain_docs
dataset_path: json
dataset_kwargs:
  data_files: {{test: {docs}}}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: bits_per_byte
    aggregation: bits_per_byte
    higher_is_better: false
""",
    "fmtrain_choice.yaml": """task: fmtrain_choice
dataset_path: json
dataset_kwargs:
  data_files: {{test: {choice}}}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: choices
doc_to_target: answer
metric_list:
  - metric: acc
""",
}


@pytest.mark.slow
def test_lm_eval_cli_reads_an_fma_export_through_remote_code(tmp_path, corpus):
    """What a researcher runs: the lm_eval CLI on an fma export with trust_remote_code=True, a
    rolling-loglikelihood task over held-out text and a multiple-choice task, both local files. Its
    bits per byte and every choice's log-likelihood equal fmtrain's own model on the same tokens."""
    from fmtrain.data.tokenizer import load_tokenizer
    from fmtrain.hf import export

    ckpt = model_only(tmp_path / "ckpt", corpus, SP_TOKENIZER, attention="fma", summary="m2m")
    out = export(ckpt, tmp_path / "out")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["auto_map"]["AutoModelForCausalLM"] == "modeling_fmtrain.FmtrainForCausalLM"
    modes = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()}
    assert modes["model.safetensors"] == modes["config.json"], modes  # not safetensors' 0600
    from safetensors import safe_open

    with safe_open(out / "model.safetensors", "pt") as f:
        assert f.metadata()["source"] == str(ckpt.resolve())
    texts = [f.read_text()[:1500] for f in sorted(corpus.glob("*.txt"))[:4]]
    rng = torch.Generator().manual_seed(5)
    words = "def class return import lambda yield while assert".split()
    questions = [dict(question=f"Which keyword comes {i}?", answer=int(torch.randint(0, 3, (1,), generator=rng)),
                      choices=[words[int(j)] for j in torch.randperm(len(words), generator=rng)[:3]])
                 for i in range(6)]
    data = tmp_path / "tasks"
    data.mkdir()
    for name, rows in (("docs", [dict(text=t) for t in texts]), ("choice", questions)):
        (data / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for name, yaml in LM_EVAL_TASKS.items():
        (data / name).write_text(yaml.format(docs=data / "docs.jsonl", choice=data / "choice.jsonl"))
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args",
           f"pretrained={out},trust_remote_code=True,dtype=float64,max_length=4096", "--tasks",
           "fmtrain_docs,fmtrain_choice", "--include_path", str(data), "--device", "cpu", "--batch_size", "1",
           "--output_path", str(tmp_path / "results"), "--log_samples"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    results = json.loads(next((tmp_path / "results").rglob("results_*.json")).read_text())["results"]
    samples = [json.loads(line) for f in (tmp_path / "results").rglob("samples_fmtrain_choice_*.jsonl")
               for line in f.read_text().splitlines()]

    net, sp = fmtrain_model(ckpt), load_tokenizer(SP_TOKENIZER).sp

    def loglik(context: list[int], continuation: list[int]) -> float:
        ids = torch.tensor([context + continuation])
        logp = torch.log_softmax(net.logits(ids[:, :-1])[0], -1)
        n = len(continuation)
        return logp[-n:].gather(-1, ids[0, -n:, None]).sum().item()

    bos = sp.piece_to_id("<s>")  # lm-eval's prefix for a rolling loglikelihood: the tokenizer's BOS
    nll = -sum(loglik([bos], sp.encode(t)) for t in texts)
    bpb = nll / math.log(2) / sum(len(t.encode()) for t in texts)
    assert abs(results["fmtrain_docs"]["bits_per_byte,none"] - bpb) < 1e-6, (results["fmtrain_docs"], bpb)
    assert len(samples) == len(questions)
    for s in samples:  # lm-eval's context/continuation split: the continuation's tokens after the context's
        q = s["doc"]
        for choice, (got, _) in zip(q["choices"], s["filtered_resps"]):
            whole, ctx = sp.encode(q["question"] + " " + choice), sp.encode(q["question"])
            assert abs(float(got) - loglik(ctx, whole[len(ctx):])) < 1e-6, (q, choice)
    assert 0 <= results["fmtrain_choice"]["acc,none"] <= 1


@pytest.mark.slow
def test_fma_export_remote_code_without_fmtrain_names_the_package(tmp_path, corpus):
    from fmtrain.hf import export

    out = export(model_only(tmp_path / "ckpt", corpus, SP_TOKENIZER, attention="fma"), tmp_path / "out")
    code = ("import sys; sys.modules['fmtrain'] = None\n"
            "from transformers import AutoModelForCausalLM\n"
            f"AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env=dict(os.environ, HF_HUB_OFFLINE="1"), timeout=300)
    assert r.returncode != 0
    assert "this model is an fmtrain export" in r.stderr and 'pip install -e ".[hf]"' in r.stderr, r.stderr[-2000:]


@pytest.mark.slow
def test_padded_batch_rows_equal_each_row_alone(tmp_path, corpus):
    """A left-padded batch (generate()'s and lm-eval's padding) and a right-padded one: each row's
    logits, its share of the labels= loss and its greedy continuation, with and without the
    decoding cache, equal the row run alone."""
    import fmtrain.hf  # noqa: F401
    from fmtrain.hf import export

    out = export(model_only(tmp_path / "ckpt", corpus, SP_TOKENIZER, attention="fma", summary="m2m"), tmp_path / "out")
    model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float64).eval()
    g = torch.Generator().manual_seed(6)
    rows = [torch.randint(5, 4000, (n,), generator=g) for n in (70, 38, 55)]  # past the fine reach: coarse levels
    n, pad = max(len(r) for r in rows), 0
    left = torch.stack([torch.cat([torch.full((n - len(r),), pad), r]) for r in rows])
    mask = torch.stack([torch.cat([torch.zeros(n - len(r)), torch.ones(len(r))]) for r in rows]).long()
    right = torch.stack([torch.cat([r, torch.full((n - len(r),), pad)]) for r in rows])
    with torch.no_grad():
        alone = [model(r[None]).logits[0] for r in rows]
        got = model(left, attention_mask=mask).logits
        for b, r in enumerate(rows):
            assert torch.equal(got[b, n - len(r):], alone[b]) and not got[b, :n - len(r)].any()
        got = model(right, attention_mask=mask.flip(1)).logits
        for b, r in enumerate(rows):
            assert torch.equal(got[b, :len(r)], alone[b])
        labels = left.masked_fill(mask == 0, -100)
        loss = model(left, attention_mask=mask, labels=labels).loss
        nll = sum(torch.nn.functional.cross_entropy(a[:-1], r[1:], reduction="sum") for a, r in zip(alone, rows))
        want = nll.item() / sum(len(r) - 1 for r in rows)
        assert abs(loss.item() - want) < 1e-4 * want  # the labels= loss is computed in float32
    for use_cache in (True, False):
        batch = model.generate(left, attention_mask=mask, max_new_tokens=12, do_sample=False, eos_token_id=None,
                               pad_token_id=pad, use_cache=use_cache)
        for b, r in enumerate(rows):
            one = model.generate(r[None], max_new_tokens=12, do_sample=False, eos_token_id=None, use_cache=use_cache)
            assert batch[b, n:].tolist() == one[0, len(r):].tolist(), (use_cache, b)
    with pytest.raises(ValueError, match="padding between its tokens"):
        model(left, attention_mask=torch.tensor([[1, 0] * (n // 2)] * 3))


@pytest.mark.slow
def test_refined_fma_export_carries_refine_and_generates_by_recomputing(tmp_path, corpus):
    import fmtrain.hf  # noqa: F401
    from fmtrain.hf import export

    ckpt = model_only(tmp_path / "ckpt", corpus, SP_TOKENIZER, attention="fma", summary="m2m", refine=2)
    out = export(ckpt, tmp_path / "out")
    assert json.loads((out / "config.json").read_text())["fmtrain"]["refine"] == 2
    model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float64).eval()
    net = fmtrain_model(ckpt)
    ids = torch.randint(0, 4096, (1, 200), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        assert rel(model(ids).logits, net.logits(ids)) < 1e-12
    seq = ids[0, :60].tolist()
    for _ in range(5):
        seq.append(int(net.logits(torch.tensor([seq]))[0, -1].argmax()))
    got = model.generate(ids[:, :60], max_new_tokens=5, do_sample=False, eos_token_id=None)  # use_cache: recomputes
    assert got[0, 60:].tolist() == seq[60:]
