"""Training runs that start from a Hugging Face folder or an fmtrain run (model.init_from): they
train, resume bitwise, run under ZeRO 3 on two ranks, and refuse bad inputs writing nothing."""
import importlib
import json
import os
import shutil

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tests.hf.conftest import VOCAB, fmtrain, fmtrain_model, losses, make_hf, rel, run_config  # noqa: E402


def test_bad_inputs_to_a_run_write_nothing(tmp_path, hf_tokenizer, text_files):
    small = make_hf(tmp_path / "small", vocab=300, tokenizer=hf_tokenizer)  # tokenizer larger than the embedding
    r = fmtrain("fmtrain.train", run_config(tmp_path, "run", small, text_files), check=False)
    assert r.returncode == 2, r.stderr
    assert f"has {VOCAB} tokens but the model's embedding has model.vocab_size=300" in r.stderr
    unknown = tmp_path / "unknown"
    shutil.copytree(make_hf(tmp_path / "hf", tokenizer=hf_tokenizer), unknown)
    hf = json.loads((unknown / "config.json").read_text())
    (unknown / "config.json").write_text(json.dumps(dict(hf, architectures=["FalconForCausalLM"])))
    r = fmtrain("fmtrain.train", run_config(tmp_path, "run", unknown, text_files), check=False)
    assert r.returncode == 2 and "architecture 'FalconForCausalLM'" in r.stderr, r.stderr
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()


@pytest.mark.slow
def test_continued_pretraining_from_hf_trains_and_resumes_bitwise(tmp_path, hf_tokenizer, text_files):
    hf = make_hf(tmp_path / "hf", "qwen2", tied=False, tokenizer=hf_tokenizer)
    straight = run_config(tmp_path, "straight", hf, text_files)
    r = fmtrain("fmtrain.train", straight)
    assert f"weights from {hf}" in r.stdout and "summary tensors at their mean initialisation" in r.stdout
    ls = losses(tmp_path / "straight")
    assert len(ls) == 6 and ls[-1] < ls[0] - 0.3, ls
    split = run_config(tmp_path, "split", hf, text_files)
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
    importlib.import_module("fmtrain.hf.modeling")  # registers model_type "fmtrain"
    fmtrain("fmtrain.hf", "export", tmp_path / "split", tmp_path / "exported")
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "exported", dtype=torch.float64).eval()
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "exported")
    ids = torch.tensor([tok("def main(argv):\n    return 0\n" * 8, add_special_tokens=False)["input_ids"]])
    assert ids.shape[1] > 64  # beyond the fine level's reach
    with torch.no_grad():
        assert rel(model(ids).logits, fmtrain_model(ckpt).logits(ids)) < 1e-12


@pytest.mark.slow
def test_init_from_hf_under_zero3_on_two_ranks(tmp_path, hf_tokenizer, text_files):
    """Every rank reads the weights before DeepSpeed partitions them (ZeRO 3, 2 gloo ranks): the
    first loss is the imported model's, as on one process without partitioning."""
    hf = make_hf(tmp_path / "hf", "llama", tied=True, tokenizer=hf_tokenizer)
    zero3 = run_config(tmp_path, "zero3", hf, text_files)
    fmtrain("torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "fmtrain.train", zero3,
            "--parallel.zero_stage=3", "--train.steps=2")
    single = run_config(tmp_path, "single", hf, text_files)
    fmtrain("fmtrain.train", single, "--train.steps=1", "--data.batch_size=4")  # the same 4 sequences
    first = losses(tmp_path / "zero3")
    assert len(first) == 2 and losses(tmp_path / "single")[0] == pytest.approx(first[0], rel=1e-5)
    assert first[0] < 7.0  # not a diverged start (ln 400 = 6.0 for a uniform guess)


@pytest.mark.slow
def test_init_from_an_fmtrain_run_takes_the_weights_only(tmp_path, hf_tokenizer, text_files):
    hf = make_hf(tmp_path / "hf", "llama", tokenizer=hf_tokenizer)
    first = run_config(tmp_path, "first", hf, text_files, attention="sdpa")
    fmtrain("fmtrain.train", first)
    # Continuing the run itself on other data is refused, with the way to do it.
    other = tmp_path / "other"
    other.mkdir()
    for f in sorted(text_files.glob("*.txt"))[::2]:
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


def test_a_field_given_at_its_default_value_still_contradicts_the_weights(tmp_path, text_files):
    """model.init_from fills the fields a config leaves out and refuses given ones that contradict the
    weights. A field written in the file at its default value (model.dim = 768, the checkpoint's is
    64) is given, so it is refused, not silently replaced (load_config keeps which fields were given)."""
    from fmtrain.config import ConfigError, load_config
    from fmtrain.init_from import resolve_config
    from tests.hf.conftest import SP_TOKENIZER, model_only

    ckpt = model_only(tmp_path / "ckpt", text_files, SP_TOKENIZER, attention="fma")
    cfg_file = tmp_path / "run.toml"
    cfg_file.write_text(f'[run]\ndir = "{tmp_path / "run"}"\n[model]\ninit_from = "{ckpt}"\ndim = 768\n'
                        f'[data]\ncorpus = ["{text_files}/*.txt"]\nseq_len = 256\n')
    with pytest.raises(ConfigError, match="model.dim"):
        resolve_config(load_config(cfg_file))
    cfg_file.write_text(cfg_file.read_text().replace("dim = 768\n", ""))  # left out: filled from the weights
    assert resolve_config(load_config(cfg_file)).model.dim == 64
