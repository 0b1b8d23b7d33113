"""model.init_from a Hugging Face folder (fmtrain/init_from.py, fmtrain/hf/importing.py, fmtrain/hf/names.py,
fmtrain/input_files.py): logits equal transformers' in float64, the config filled from the folder, and
every bad input named."""
import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from fmtrain.config import ConfigError  # noqa: E402
from fmtrain.input_files import InputFileError  # noqa: E402
from fmtrain.init_from import load_model  # noqa: E402
from tests.hf.conftest import REL, VOCAB, fmtrain, from_dict, hf_logits, make_hf, rel, run_config  # noqa: E402


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
    from fmtrain.init_from import prepare

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
    from fmtrain.init_from import prepare

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
    from fmtrain.hf.importing import load_hf_state
    from fmtrain.init_from import prepare

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


def test_bad_weights_and_tokenizer_files_end_a_run_in_one_line(tmp_path, hf_tokenizer, text_files):
    """Through the command: one ``error:`` line, exit status 2, no traceback, nothing written."""
    lfs = make_hf(tmp_path / "lfs", tokenizer=hf_tokenizer, layers=1)
    (lfs / "model.safetensors").write_text(LFS_POINTER)
    cut = make_hf(tmp_path / "cut", tokenizer=hf_tokenizer, layers=1)
    text = (cut / "tokenizer.json").read_text()
    (cut / "tokenizer.json").write_text(text[:len(text) // 2])
    # Valid JSON of the wrong shape, and a tokenizer without tokens (found by default in the folder).
    wrong = make_hf(tmp_path / "wrong", tokenizer=hf_tokenizer, layers=1)
    (wrong / "tokenizer.json").write_text("[]")
    empty = make_hf(tmp_path / "empty", tokenizer=hf_tokenizer, layers=1)
    spec = json.loads((empty / "tokenizer.json").read_text())
    spec["model"]["vocab"], spec["model"]["merges"], spec["added_tokens"] = {}, [], []
    (empty / "tokenizer.json").write_text(json.dumps(spec))
    for folder, says in [(lfs, f"model.safetensors in {lfs} is a Git LFS pointer, not the weights"),
                         (cut, f"tokenizer.json in {cut} is damaged (not valid JSON: "),
                         (wrong, f"tokenizer.json in {wrong} is damaged or not a Hugging Face tokenizer: it holds []"),
                         (empty, f"tokenizer.json in {empty} is damaged: it holds no tokens")]:
        r = fmtrain("fmtrain.train", run_config(tmp_path, "run", folder, text_files), check=False)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and says in r.stderr and "Traceback" not in r.stderr, r.stderr
        assert len([line for line in lines if line.startswith("error:")]) == 1, r.stderr
        assert not (tmp_path / "run").exists()
