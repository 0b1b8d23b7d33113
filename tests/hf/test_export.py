"""python -m fmtrain.hf export (fmtrain/hf/): sdpa models as plain Llama, fma models through
remote code and the Auto classes, lm-evaluation-harness on them, padded batches, the SentencePiece
conversion, and refusals that write nothing."""
import json
import math
import os
import re
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tests.hf.conftest import REL, SP_TOKENIZER, fmtrain, fmtrain_model, model_only, rel  # noqa: E402


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
def test_sdpa_export_loads_in_plain_transformers(tmp_path, text_files, hf_tokenizer, case):
    from fmtrain.data.tokenizer import load_tokenizer
    from fmtrain.hf import export

    if case == "sentencepiece-tied":  # the SentencePiece model is converted to a tokenizer.json; Llama 3.1's RoPE
        ckpt = model_only(tmp_path / "ckpt", text_files, SP_TOKENIZER, attention="sdpa", rope_scaling=dict(
            rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
            original_max_position_embeddings=64))
    else:  # q/k/v and MLP biases (no o_proj bias: written as zeros), untied embeddings
        ckpt = model_only(tmp_path / "ckpt", text_files, hf_tokenizer, attention="sdpa", tie_embeddings=False,
                          qkv_bias=True, mlp_bias=True)
    out = export(ckpt, tmp_path / "out")
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "generation_config.json"} <= {p.name for p in out.iterdir()}
    assert "fmtrain" not in (out / "config.json").read_text()
    tok = load_tokenizer(ckpt)
    ids = torch.randint(0, tok.vocab_size, (2, 96), generator=torch.Generator().manual_seed(3))
    torch.save(ids, tmp_path / "ids.pt")
    text = (sorted(text_files.glob("*.txt"))[0].read_text())[:3000] + " é ✓\t\t x  "
    subprocess.run([sys.executable, "-c", PLAIN, out, tmp_path / "ids.pt", text, tmp_path / "got.pt"], check=True,
                   env=dict(os.environ, HF_HUB_OFFLINE="1"))
    got = torch.load(tmp_path / "got.pt")
    assert got["class"] == "LlamaForCausalLM"
    assert rel(got["logits"], fmtrain_model(ckpt).logits(ids)) < REL
    want = tok.sp.encode(text) if case == "sentencepiece-tied" else tok.encode(text)
    assert got["ids"] == want


@pytest.mark.slow
def test_fma_export_loads_through_the_auto_classes_and_generates(tmp_path, text_files):
    import fmtrain.hf.modeling  # noqa: F401  (registers model_type "fmtrain")
    from fmtrain.hf import export

    ckpt = model_only(tmp_path / "ckpt", text_files, SP_TOKENIZER, attention="fma", summary="m2m")
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


def test_fma_export_carries_refinement_past_the_training_length(tmp_path, text_files):
    """refine, max_level, flat_top, select_reach and attend_reach are [model] fields: the export runs them as
    fmtrain does (logits and greedy decoding through transformers' remote-code path)."""
    import fmtrain.hf.modeling  # noqa: F401
    from fmtrain.hf import export

    fields = dict(refine=2, max_level=1, flat_top=True, select_reach=40, attend_reach=True)
    ckpt = model_only(tmp_path / "ckpt", text_files, SP_TOKENIZER, attention="fma", summary="m2m", **fields)
    out = export(ckpt, tmp_path / "out")
    cfg = json.loads((out / "config.json").read_text())
    assert {k: cfg["fmtrain"][k] for k in fields} == fields
    model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float64).eval()
    net = fmtrain_model(ckpt)
    layer = next(m for m in net.modules() if hasattr(m, "select_reach"))
    assert (layer.refine, layer.max_level, layer.flat_top, layer.select_reach, layer.attend_reach) == (2, 1, True, 40, True)
    ids = torch.randint(0, 4096, (1, 200), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert rel(model(ids).logits, net.logits(ids)) < 1e-12
    prompt, seq = ids[:, :60], ids[0, :60].tolist()
    for _ in range(12):
        seq.append(int(net.logits(torch.tensor([seq]))[0, -1].argmax()))
    got = model.generate(prompt, max_new_tokens=12, do_sample=False, eos_token_id=None)
    assert got[0, 60:].tolist() == seq[60:]


def test_export_refusals_write_nothing(tmp_path, text_files):
    from fmtrain.hf import ExportError, export

    mlm = model_only(tmp_path / "mlm", text_files, SP_TOKENIZER, kind="mlm")
    with pytest.raises(ExportError, match="masked LMs are not exported"):
        export(mlm, tmp_path / "out")
    causal = model_only(tmp_path / "causal", text_files, SP_TOKENIZER)
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


def test_export_writes_weights_with_the_umask_mode_and_records_the_absolute_source(tmp_path, text_files, monkeypatch):
    """The weights file gets the mode every other file gets (not safetensors' 0600), and its source
    metadata is the checkpoint's absolute path, though the command was given a relative one."""
    from safetensors import safe_open

    from fmtrain.hf import export

    model_only(tmp_path / "ckpt", text_files, SP_TOKENIZER, attention="fma")
    monkeypatch.chdir(tmp_path)
    out = export("ckpt", "out")  # as typed on a command line, relative to the working directory
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "out").iterdir()}
    assert modes["model.safetensors"] == modes["config.json"] == 0o666 & ~_umask(), modes
    with safe_open(tmp_path / out / "model.safetensors", "pt") as f:
        assert f.metadata()["source"] == str((tmp_path / "ckpt").resolve())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


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


@pytest.mark.slow
def test_converted_unigram_reads_control_strings_as_text_and_differs_only_at_ties(tmp_path):
    """A unigram model (fmtrain trains them too): control and byte strings in text ('<s>', '<0x41>')
    are text, as in SentencePiece, and where a document still encodes differently the two are
    equally good up to SentencePiece's float32 rounding (ties: a run of spaces split into the same
    pieces in another order). The export's check names the place and both tokenisations."""
    from fmtrain.data.corpus import Corpus
    from fmtrain.data.tokenizer import train_tokenizer
    from fmtrain.hf import ExportError
    from fmtrain.hf.export import _write_tokenizer
    from fmtrain.hf.sentencepiece import convert, first_difference

    docs = [text for _, text in Corpus.parse(["stdlib"]).documents()]
    tok = train_tokenizer([d[:20000] for d in docs[:30]], tmp_path / "uni", vocab_size=1000, model_type="unigram",
                          num_threads=1)
    converted = convert(tok)
    controls = "x = '<s>' + '</s>'<pad> <mask><unk> <0x41><0x0A>\n" * 3
    assert converted.encode(controls, add_special_tokens=False).ids == tok.sp.encode(controls)
    assert first_difference(tok, converted, controls) is None
    texts = [d[:50000] for d in docs]  # whole documents' sums reach 1e7, where float32 steps by 1
    got = [e.ids for e in converted.encode_batch(texts, add_special_tokens=False)]
    want = tok.sp.encode(texts)
    score = lambda ids: sum(tok.sp.get_score(i) for i in ids)  # noqa: E731  (the segmentation's log-probability)
    differ = [i for i, (a, b) in enumerate(zip(got, want)) if a != b]
    for i in differ:
        ours, theirs = score(got[i]), score(want[i])
        # tokenizers' Viterbi (float64) is optimal; SentencePiece's (float32) within its rounding.
        assert -1e-9 * abs(theirs) <= ours - theirs <= 4 * 2.0 ** -23 * abs(theirs), (i, ours, theirs)
    assert differ, "no ties left: say so in the README's Export section (which strings can differ for unigram)"
    i = differ[0]
    where = first_difference(tok, converted, texts[i])
    assert re.fullmatch(r"at char \d+: Hugging Face \[.+\] vs SentencePiece \[.+\] \(near .+\)", where, re.S), where
    (tmp_path / "out").mkdir()
    with pytest.raises(ExportError, match=rf"sample 1 .* encodes differently {re.escape(where)}"):
        _write_tokenizer(tok, tmp_path / "out", 256, ["def f(x):\n", texts[i]])


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
def test_lm_eval_cli_reads_an_fma_export_through_remote_code(tmp_path, text_files):
    """What a researcher runs: the lm_eval CLI on an fma export with trust_remote_code=True, a
    rolling-loglikelihood task over held-out text and a multiple-choice task, both local files. Its
    bits per byte and every choice's log-likelihood equal fmtrain's own model on the same tokens."""
    from fmtrain.data.tokenizer import load_tokenizer
    from fmtrain.hf import export

    ckpt = model_only(tmp_path / "ckpt", text_files, SP_TOKENIZER, attention="fma", summary="m2m")
    out = export(ckpt, tmp_path / "out")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["auto_map"]["AutoModelForCausalLM"] == "modeling_fmtrain.FmtrainForCausalLM"
    texts = [f.read_text()[:1500] for f in sorted(text_files.glob("*.txt"))[:4]]
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
def test_fma_export_remote_code_without_fmtrain_names_the_package(tmp_path, text_files):
    from fmtrain.hf import export

    out = export(model_only(tmp_path / "ckpt", text_files, SP_TOKENIZER, attention="fma"), tmp_path / "out")
    code = ("import sys; sys.modules['fmtrain'] = None\n"
            "from transformers import AutoModelForCausalLM\n"
            f"AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env=dict(os.environ, HF_HUB_OFFLINE="1"), timeout=300)
    assert r.returncode != 0
    assert "this model is an fmtrain export" in r.stderr and 'pip install -e ".[hf]"' in r.stderr, r.stderr[-2000:]


REMOTE = """
import os, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
if os.environ.get("TOKENIZER_FIRST"):  # its remote config imports fmtrain.hf, which registers fmtrain's classes
    AutoTokenizer.from_pretrained(sys.argv[1], trust_remote_code=True)
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True, dtype=torch.float64).eval()
with torch.no_grad():
    logits = model(torch.load(sys.argv[2])).logits
torch.save({"logits": logits, "module": type(model).__module__}, sys.argv[3])
if len(sys.argv) > 4:
    model.save_pretrained(sys.argv[4])
"""


@pytest.mark.slow
@pytest.mark.parametrize("tokenizer_first", [False, True])
def test_fma_export_loaded_through_remote_code_saves_and_loads_again(tmp_path, text_files, tokenizer_first):
    """A user's round trip: load the export with trust_remote_code=True, save_pretrained to a new
    folder, load that (a new process) with trust_remote_code=True: the same logits. The remote
    classes are defined in the folder's own file, so save_pretrained copies that file. With the
    tokenizer loaded first, transformers hands out fmtrain's own registered classes instead, and
    their save_pretrained writes the same file (it once wrote none, and the folder did not load)."""
    from fmtrain.hf import export

    out = export(model_only(tmp_path / "ckpt", text_files, SP_TOKENIZER, attention="fma", summary="m2m"), tmp_path / "out")
    ids = torch.randint(0, 4096, (2, 80), generator=torch.Generator().manual_seed(9))
    torch.save(ids, tmp_path / "ids.pt")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"))  # no shared cache
    for src, got, saved in (("out", "first.pt", "saved"), ("saved", "second.pt", None)):
        args = [tmp_path / src, tmp_path / "ids.pt", tmp_path / got] + ([tmp_path / saved] if saved else [])
        first_env = dict(env, TOKENIZER_FIRST="1") if tokenizer_first and saved else env
        r = subprocess.run([sys.executable, "-c", REMOTE, *map(str, args)], capture_output=True, text=True,
                           env=first_env, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
    saved = tmp_path / "saved"
    assert (saved / "modeling_fmtrain.py").read_text() == (out / "modeling_fmtrain.py").read_text()
    cfg = json.loads((saved / "config.json").read_text())
    assert cfg["auto_map"] == json.loads((out / "config.json").read_text())["auto_map"]
    first, second = torch.load(tmp_path / "first.pt"), torch.load(tmp_path / "second.pt")
    assert first["module"] == "fmtrain.hf.modeling" if tokenizer_first else first["module"].endswith("modeling_fmtrain")
    assert second["module"].endswith("modeling_fmtrain")
    assert torch.equal(first["logits"], second["logits"])
    assert rel(first["logits"], fmtrain_model(tmp_path / "ckpt").logits(ids)) < 1e-12


@pytest.mark.slow
def test_padded_batch_rows_equal_each_row_alone(tmp_path, text_files):
    """A left-padded batch (generate()'s and lm-eval's padding) and a right-padded one: each row's
    logits, its share of the labels= loss (the mean over all the batch's real next tokens, as
    transformers averages) and its greedy continuation, with and without the decoding cache, equal
    the row run alone."""
    import fmtrain.hf.modeling  # noqa: F401
    from fmtrain.hf import export

    ckpt = model_only(tmp_path / "ckpt", text_files, SP_TOKENIZER, attention="fma", summary="m2m")
    out = export(ckpt, tmp_path / "out")
    model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float64).eval()
    with torch.no_grad():  # sharp predictions: a random model's near-uniform logits score like zero logits
        model.get_input_embeddings().weight.mul_(30)  # (tied: the head's weight too)
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
        # labels=: transformers' mean over every counted token of the batch, each row's tokens as alone.
        nll = [torch.nn.functional.cross_entropy(a[:-1], r[1:], reduction="sum") for a, r in zip(alone, rows)]
        want = (sum(nll) / sum(len(r) - 1 for r in rows)).item()
        uniform = math.log(model.config.vocab_size)
        # Sharp enough that a pad position (zero logits: log V) scored as a token would show.
        assert abs(want - uniform) > 1, (want, uniform)
        for r, row_nll in zip(rows, nll):  # a row alone: its own mean
            assert abs(model(r[None], labels=r[None]).loss.item() - row_nll.item() / (len(r) - 1)) < 1e-9 * want
        for ids, m in ((left, mask), (right, mask.flip(1))):
            # Labels at padded positions ignored whatever they hold: -100 (the usual) or the pad ids themselves.
            for labels in (ids.masked_fill(m == 0, -100), ids):
                loss = model(ids, attention_mask=m, labels=labels).loss
                assert loss.dtype == torch.float64  # a float64 model's loss is not rounded to float32
                assert abs(loss.item() - want) < 1e-9 * want, (loss.item(), want)
    for use_cache in (True, False):
        batch = model.generate(left, attention_mask=mask, max_new_tokens=12, do_sample=False, eos_token_id=None,
                               pad_token_id=pad, use_cache=use_cache)
        for b, r in enumerate(rows):
            one = model.generate(r[None], max_new_tokens=12, do_sample=False, eos_token_id=None, use_cache=use_cache)
            assert batch[b, n:].tolist() == one[0, len(r):].tolist(), (use_cache, b)
    with pytest.raises(ValueError, match="padding between its tokens"):
        model(left, attention_mask=torch.tensor([[1, 0] * (n // 2)] * 3))


@pytest.mark.slow
def test_refined_fma_export_carries_refine_and_generates_with_its_cache(tmp_path, text_files):
    import fmtrain.hf.modeling  # noqa: F401
    from fmtrain.hf import export

    ckpt = model_only(tmp_path / "ckpt", text_files, SP_TOKENIZER, attention="fma", summary="m2m", refine=2)
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
    got = model.generate(ids[:, :60], max_new_tokens=5, do_sample=False, eos_token_id=None)  # the refined cache
    assert got[0, 60:].tolist() == seq[60:]
