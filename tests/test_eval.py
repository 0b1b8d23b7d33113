"""python -m fmtrain.eval: its numbers are counts, its options belong to the evaluation run, and it
stops like a command-line tool. (Loss by position and the needle test: tests/e2e/test_hardening.py.)"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import COMMAND_CONFIG, ROOT, write_stdlib_corpus

ENV = dict(os.environ, OMP_NUM_THREADS="1", HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")


def _eval(run, *args, **kw):
    return subprocess.run([sys.executable, "-m", "fmtrain.eval", str(run), *args], capture_output=True, text=True,
                          env=ENV, timeout=300, **kw)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 2-step causal run with held-out documents (a quarter of 20 stdlib modules), batch size 2."""
    tmp = tmp_path_factory.mktemp("eval")
    corpus = write_stdlib_corpus(tmp / "corpus", 20)
    cfg = tmp / "run.toml"
    cfg.write_text(COMMAND_CONFIG.format(run=tmp / "run", kind="causal", summary="m2m", extra="", corpus=corpus,
                                 cache=tmp / "cache", root=ROOT).replace("seq_len = 128", "seq_len = 128\n"
                                                                         "val_fraction = 0.25"))
    r = subprocess.run([sys.executable, "-m", "fmtrain.train", str(cfg)], capture_output=True, text=True, env=ENV,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return tmp / "run"


PLAIN = "the plain evaluation (without --by-position or --needle)"


@pytest.mark.parametrize("args, words", [
    (["--batches", "0"], "--batches 0: give a whole number >= 1 (leave it out: the whole held-out set)"),
    (["--batches", "-3"], "--batches -3: give a whole number >= 1"),
    (["--batch-size", "0"], "--batch-size 0: give a whole number >= 1 (leave it out: the run's data.batch_size)"),
    (["--by-position", "--max-len", "0"], "--max-len 0: give a whole number >= 2 (leave it out: 8 x data.seq_len)"),
    (["--by-position", "--min-doc-len", "0"], "--min-doc-len 0: give a whole number >= 1"),
    (["--needle", "--samples", "0"], "--samples 0: give a whole number >= 1"),
    (["--needle", "--keys", "0"], "--keys 0: give a whole number from 1 to 16"),
    (["--needle", "--keys", "17"], "--keys 17: give a whole number from 1 to 16"),
    (["--needle", "--lengths", "128,32"], "--lengths 128,32: '32' is not a length; give prompt lengths in tokens, "
                                          "each at least 64"),
    (["--needle", "--lengths", "128,x"], "--lengths 128,x: 'x' is not a length"),
    (["--needle", "--lengths", "256,256"], "--lengths 256,256: '256' is given twice"),
    (["--needle", "--depths", "0,nan"], "--depths 0,nan: 'nan' is not a depth; give --depths within [0, 1]"),
    (["--needle", "--depths", "-0.5"], "--depths -0.5: '-0.5' is not a depth"),
    # An option of another evaluation is refused, not ignored.
    (["--max-len", "512"], f"--max-len 512: an option of --by-position, not of {PLAIN}; add --by-position"),
    (["--out", "x"], f"--out x: an option of --by-position and --needle, not of {PLAIN}; add --by-position or "
                     "--needle, or leave it out"),
    (["--needle", "--batches", "3"], f"--batches 3: an option of {PLAIN}, not of --needle; leave it out"),
    (["--by-position", "--keys", "2"], "--keys 2: an option of --needle, not of --by-position; add --needle"),
    (["--by-position", "--needle"], "--by-position and --needle are two evaluations"),
])
def test_numbers_that_are_not_counts_and_options_of_another_mode_are_refused(tmp_path, capsys, args, words):
    """One error: line with the option, the value and what is accepted, before the checkpoint is
    looked for (there is none here). In this process, through the command's own entry point
    (``run_command(main)``, as ``python -m fmtrain.eval`` runs it; the first case also as a command):
    a refusal happens before anything is loaded, so a process each would only add its start-up."""
    from fmtrain.errors import run_command
    from fmtrain.eval import main

    status = run_command(main, [str(tmp_path / "no-run"), *args])
    out, err = capsys.readouterr()
    assert status == 2 and "Traceback" not in err, err
    assert err.startswith("error: ") and err.count("\n") == 1 and words in err, err
    assert not out
    if args == ["--batches", "0"]:
        r = _eval(tmp_path / "no-run", *args)
        assert (r.returncode, r.stderr, r.stdout) == (2, err, ""), r.stderr


@pytest.mark.parametrize("out, mode, words", [
    ("/", "--by-position", "--out '/': names a folder, not a file; give a file name (e.g. --out /result)"),
    ("", "--needle", "--out '': names a folder, not a file"),
    ("{tmp}/results/", "--needle", "--out '{tmp}/results/': names a folder, not a file"),
    ("{tmp}/afile/sub/x", "--needle", "--out {tmp}/afile/sub/x: {tmp}/afile is not a folder, so {tmp}/afile/sub "
                                      "cannot be made; choose another path"),
    ("{tmp}/plots", "--by-position", "--out {tmp}/plots: {tmp}/plots.png is a folder; give another name"),
])
def test_an_out_that_cannot_be_written_is_refused_before_evaluating(tmp_path, out, mode, words):
    """--out / ended in a traceback after the evaluation had run: refused first, in one line (there is
    no run here, so anything later would say so instead)."""
    (tmp_path / "afile").write_text("mine\n")
    (tmp_path / "plots.png").mkdir()
    r = _eval(tmp_path / "no-run", mode, "--out", out.format(tmp=tmp_path))
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr == f"error: {words.format(tmp=tmp_path)}\n" or words.format(tmp=tmp_path) in r.stderr, r.stderr
    assert r.stderr.count("\n") == 1 and not r.stdout
    assert (tmp_path / "afile").read_text() == "mine\n"


def test_an_out_on_a_read_only_file_system_is_refused_before_evaluating(tmp_path, tmpfs):
    ro = tmpfs(tmp_path / "ro", "ro,size=64k")
    for out in (ro / "x", ro / "new" / "x"):
        r = _eval(tmp_path / "no-run", "--needle", "--out", str(out))
        assert r.returncode == 2 and r.stderr == f"error: --out {out}: {ro} is on a read-only file system; choose a " \
                                                 "path where files can be written\n", r.stderr


@pytest.mark.slow
def test_a_full_disk_while_writing_out_is_one_line_and_keeps_the_results_and_the_earlier_file(run, tmp_path, tmpfs):
    disk = tmpfs(tmp_path / "disk", "size=64k")
    (disk / "r.json").write_text('{"earlier": 1}')
    filler = disk / "filler"
    with open(filler, "wb", buffering=0) as fh:  # the disk fills up while the evaluation runs
        try:
            while True:
                fh.write(b"x" * 512)
        except OSError:
            pass
    needle = ["--needle", "--lengths", "64", "--depths", "0", "--samples", "1", "--out", str(disk / "r")]
    r = _eval(run, *needle)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: no space left on device while writing {disk / 'r.json'}; free space or choose "
                      "another --out"], r.stderr
    assert "| length | depth 0 |" in r.stdout  # the results were printed before
    assert sorted(p.name for p in disk.iterdir()) == ["filler", "r.json"]  # no temporary file left
    assert (disk / "r.json").read_text() == '{"earlier": 1}'  # nor the earlier file cut short
    filler.unlink()
    r = _eval(run, *needle)
    assert r.returncode == 0 and json.loads((disk / "r.json").read_text())["rows"][0]["length"] == 64, r.stderr


def test_the_python_api_refuses_counts_that_are_none():
    """evaluate(max_batches=0) scored nothing and reported loss 0, perplexity 1; needle_test(samples=0)
    divided by zero; loss_by_position(max_len=1) ran the model on nothing."""
    from fmtrain.by_position import loss_by_position
    from fmtrain.eval import evaluate
    from fmtrain.needle import needle_test

    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match=f"max_batches={bad!r}: give a whole number >= 1"):
            evaluate(None, [], None, None, max_batches=bad)
    with pytest.raises(ValueError, match="samples=0: give a whole number >= 1"):
        needle_test(None, None, [], [128], [0.5], 0)
    with pytest.raises(ValueError, match=r"depths=\[0.5, 2.0\]: give depths within \[0, 1\]"):
        needle_test(None, None, [], [128], [0.5, 2.0], 1)
    with pytest.raises(ValueError, match="max_len=1: give a whole number >= 2"):
        loss_by_position(None, [], 1)


@pytest.mark.slow
def test_batch_size_and_batches_are_what_is_evaluated(run):
    """--batch-size 1 is used, not the config's 2: one batch scores one sequence of 128 tokens."""
    r = _eval(run, "--batches", "1", "--batch-size", "1")
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(r.stdout)
    assert result["eval_tokens"] == 128 and result["eval_loss"] > 0 and result["eval_ppl"] > 1, result
    assert "on 1 held-out batches (1 sequences of 128 tokens)" in r.stderr
    r = _eval(run, "--batches", "2")
    assert r.returncode == 0 and json.loads(r.stdout)["eval_tokens"] == 2 * 2 * 128, r.stderr[-3000:]


@pytest.mark.slow
def test_max_level_caps_the_levels_trained_keeps_the_trained_ones_and_bad_values_are_refused(run):
    """Trained at 128 tokens in blocks of 16 (2 coarse levels): 'trained' and 2 change nothing at 128,
    1 drops a level."""
    loss = {flag: _eval(run, "--batches", "1", *flag) for flag in ((), ("--max-level", "trained"),
                                                                   ("--max-level", "2"), ("--max-level", "1"))}
    assert all(r.returncode == 0 for r in loss.values()), [r.stderr[-2000:] for r in loss.values()]
    loss = {k: json.loads(r.stdout)["eval_loss"] for k, r in loss.items()}
    assert loss[()] == loss[("--max-level", "trained")] == loss[("--max-level", "2")] != loss[("--max-level", "1")]
    for bad in ("0", "two"):
        r = _eval(run, "--max-level", bad)
        assert r.returncode == 2 and "give a whole number >= 1, or 'trained' (the levels of data.seq_len = 128: 2)" \
            in r.stderr and "Traceback" not in r.stderr, r.stderr
    scaled = {f: _eval(run, "--batches", "1", "--rope-scaling", f) for f in ("llama3:1", "linear:4")}
    assert all(r.returncode == 0 for r in scaled.values()), [r.stderr[-2000:] for r in scaled.values()]
    scaled = {k: json.loads(r.stdout)["eval_loss"] for k, r in scaled.items()}
    # factor 1 is plain RoPE (to rounding); 4 interpolates positions (this 2-step model is near uniform, so
    # every change to it is small: --max-level 1 moves its loss by 3e-5)
    assert abs(scaled["llama3:1"] - loss[()]) < 1e-7 and scaled["linear:4"] != loss[()], (scaled, loss)
    r = _eval(run, "--rope-scaling", "llama3")
    assert r.returncode == 2 and "--rope-scaling 'llama3': give llama3:F or linear:F" in r.stderr, r.stderr


@pytest.mark.slow
def test_a_batch_larger_than_the_held_out_set_is_capped_and_a_needle_longer_than_it_refused(run):
    """--batch-size 1000000 claimed a million sequences and died of memory; --lengths 100000000 died
    of a MemoryError while the held-out text was tiled to fill it."""
    from fmtrain.checkpoint import resolve
    from fmtrain.data import loaders_for

    ckpt = resolve(run)
    val = loaders_for(ckpt.config, tokenizer=str(ckpt / "tokenizer.model"), batch_size=1).val
    held, tokens = val.n_sequences, val.stream.length
    r = _eval(run, "--batch-size", "1000000")
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"note: --batch-size 1000000 is more than the {held} sequences the held-out set has; batches of " \
           f"{held}" in r.stderr
    assert f"on 1 held-out batches ({held} sequences of 128 tokens)" in r.stderr
    assert json.loads(r.stdout)["eval_tokens"] == tokens - 1  # every held-out target once
    r = _eval(run, "--needle", "--lengths", "128,100000000")
    assert r.returncode == 2 and "Traceback" not in r.stderr and r.stderr.count("\n") == 1, r.stderr
    assert "--lengths 128,100000000: 100000000 is longer than the " in r.stderr
    assert "tokens of the held-out documents, which a prompt's haystack is taken from (it would repeat them)" \
           in r.stderr


def test_default_needle_lengths_beyond_the_held_out_text_are_dropped_and_given_ones_refused(capsys):
    from fmtrain.errors import UserError
    from fmtrain.eval import _lengths_within

    assert _lengths_within([128, 512], 600, True, 1) == [128, 512]
    assert _lengths_within([128, 512], 300, False, 1) == [128]
    assert "note: no prompts of 512 tokens (the default --lengths)" in capsys.readouterr().err
    with pytest.raises(UserError, match="--lengths 128,512: 512 is longer than the 300 tokens of the held-out "
                                        "documents of at least 9 tokens"):
        _lengths_within([128, 512], 300, True, 9)
    with pytest.raises(UserError, match=r"the default --lengths \(128,512\) are longer than the 100 tokens"):
        _lengths_within([128, 512], 100, False, 1)


@pytest.mark.slow
def test_a_pipe_closed_before_the_result_ends_eval_quietly(run):
    """The reader is gone before the JSON is written: exit 141, nothing on stderr but eval's own lines
    (no traceback, no 'Exception ignored ... BrokenPipeError' at exit)."""
    proc = subprocess.Popen([sys.executable, "-m", "fmtrain.eval", str(run), "--batches", "1"], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.stdout.close()
    try:
        err = proc.communicate(timeout=300)[1]
    finally:
        proc.kill()
    assert proc.returncode == 141, (proc.returncode, err[-3000:])
    assert "Traceback" not in err and "Exception ignored" not in err and "BrokenPipe" not in err, err[-3000:]
    assert "evaluating" in err


def test_ctrl_c_and_a_closed_pipe_are_exit_statuses_not_tracebacks(capsys):
    """The wrapper both commands run under (python -m fmtrain.generate / fmtrain.eval), in process;
    the real signal and pipe are in tests/test_generate.py."""
    import signal

    from fmtrain.errors import run_command

    def interrupted(argv=None):
        print("partial")
        raise KeyboardInterrupt

    before = signal.getsignal(signal.SIGINT)
    assert run_command(interrupted) == 130
    assert capsys.readouterr().out == "partial\n"  # kept and flushed
    assert signal.getsignal(signal.SIGINT) is before  # the handler is given back


# ---------------------------------------------------------------------- the held-out documents
def test_held_out_documents_are_those_the_trainer_held_out(tmp_path):
    """--by-position and --needle read the corpus with the run's data.text_field, val_fraction and
    max_missing_text, as the loaders do (they once read it with the defaults: another split, or none)."""
    from fmtrain.by_position import held_out_documents
    from fmtrain.config import from_dict
    from fmtrain.data import loaders_for
    from fmtrain.data.tokens import TokenData

    path = tmp_path / "code.jsonl"
    rows = [{"content": None} if i % 8 == 0 else {"content": f"def f{i}(x):\n    return x * {i}\n" * (1 + i % 5)}
            for i in range(48)]  # 6 of 48 without text: more than the default 0.1 allows
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = from_dict({"run": {"dir": str(tmp_path / "run")}, "model": {"vocab_size": 4096},
                     "data": {"corpus": [str(path)], "text_field": "content", "val_fraction": 0.5,
                              "max_missing_text": 0.2, "tokenizer": str(ROOT / "tokenizer" / "stdlib-4k.model"),
                              "cache_dir": str(tmp_path / "cache"), "seq_len": 64}})
    docs = held_out_documents(cfg, 1)
    val = TokenData.open(loaders_for(cfg).cache, "validation")  # what the trainer holds out
    assert 10 < len(docs) == val.n_docs < 42
    assert sorted(d.tolist() for d in docs) == sorted(val.document(i).tolist() for i in range(val.n_docs))


@pytest.mark.slow
def test_by_position_and_needle_use_the_runs_val_fraction(run):
    """The run holds out a quarter of its documents (data.val_fraction = 0.25, not the default 0.03)."""
    from fmtrain.checkpoint import resolve
    from fmtrain.data import loaders_for
    from fmtrain.data.tokens import TokenData

    ckpt = resolve(run)
    assert ckpt.config.data.val_fraction == 0.25
    val = TokenData.open(loaders_for(ckpt.config, tokenizer=str(ckpt / "tokenizer.model")).cache, "validation")
    r = _eval(run, "--by-position", "--max-len", "256")
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"{val.n_docs} held-out documents" in r.stderr and val.n_docs >= 3
    r = _eval(run, "--needle", "--lengths", "64", "--depths", "0", "--samples", "1")
    assert r.returncode == 0 and "| 64 |" in r.stdout, r.stderr[-3000:]


def test_evaluate_masks_documents_when_the_run_does():
    """evaluate(document_masking=True) gives the model the batches' doc_positions, as training does; off, none."""
    import torch

    from fmtrain.config import ModelConfig
    from fmtrain.eval import evaluate
    from fmtrain.model import build_model
    from fmtrain.parallel import World

    torch.manual_seed(0)
    model = build_model(ModelConfig(vocab_size=61, dim=32, n_layers=2, n_heads=4, block_size=16, rank=2),
                        position_reset=True).double()
    g = torch.Generator().manual_seed(0)
    ids, targets = torch.randint(0, 61, (2, 64), generator=g), torch.randint(0, 61, (2, 64), generator=g)
    doc_positions = torch.cat([torch.arange(20), torch.arange(44)]).expand(2, 64)  # two documents a row
    batch = dict(input_ids=ids, targets=targets, positions=torch.arange(64).expand(2, 64), doc_positions=doc_positions)
    world = World(rank=0, local_rank=0, size=1, sp_size=1, device=torch.device("cpu"), backend="none")
    masked = evaluate(model, [batch], world, torch.ones(61), document_masking=True)["eval_loss"]
    plain = evaluate(model, [batch], world, torch.ones(61))["eval_loss"]
    with torch.no_grad():
        for docs, got in ((doc_positions, masked), (None, plain)):
            loss, count = model(ids, targets, batch["positions"], docs)
            assert got == pytest.approx((loss / count).item(), rel=1e-12)
    assert abs(masked - plain) > 1e-6, (masked, plain)


def test_flat_top_flag_needs_a_refined_model_and_a_cap():
    """--flat-top is checked against the run's config before anything is loaded."""
    from fmtrain.config.loading import from_dict
    from fmtrain.errors import UserError
    from fmtrain.eval import max_level_of

    base = {"run": {"dir": "r"}, "data": {"seq_len": 1024}}
    refined = from_dict({**base, "model": {"refine": 2, "block_size": 32}})
    assert max_level_of("trained", refined, flat_top=True) == 4  # 32 blocks: levels 1-4
    with pytest.raises(UserError, match="give --max-level N or --max-level trained with it"):
        max_level_of(None, refined, flat_top=True)
    capped = from_dict({**base, "model": {"refine": 2, "max_level": 3}})
    assert max_level_of(None, capped, flat_top=True) is None  # the run's own cap, flattened
    with pytest.raises(UserError, match="--flat-top: widens the top level for adaptive refinement; this model has "
                                        "attention='fma', model.refine=0"):
        max_level_of("2", from_dict(base), flat_top=True)


def test_past_training_fills_the_length_options_not_given():
    """--past-training: the trained levels; for refined models a flat top and the trained reach too; what
    is given beside it stays; other attention refuses it."""
    from argparse import Namespace

    from fmtrain.config.loading import from_dict
    from fmtrain.errors import UserError
    from fmtrain.eval import attend_reach_of, max_level_of, past_training, select_reach_of

    def resolved(model, **given):
        args = Namespace(**{"past_training": True, "max_level": None, "flat_top": False, "select_reach": None,
                            "attend_reach": False, **given})
        cfg = from_dict({"run": {"dir": "r"}, "data": {"seq_len": 1024}, "model": model})
        past_training(args, cfg)
        reach = select_reach_of(args.select_reach, cfg)
        return max_level_of(args.max_level, cfg, args.flat_top), args.flat_top, reach, \
            attend_reach_of(args.attend_reach, reach, cfg)

    assert resolved({"refine": 2, "block_size": 32}) == (4, True, 1024, True)  # 32 blocks: levels 1-4
    assert resolved({"refine": 2, "block_size": 32}, max_level="3", select_reach="300") == (3, True, 300, True)
    assert resolved({"block_size": 32}) == (4, False, None, False)  # plain fma: no flat top, no reach
    with pytest.raises(UserError, match="--past-training: sets multipole attention's length options; this model's "
                                        "attention is 'sdpa'"):
        resolved({"attention": "sdpa"})


def test_select_reach_flag_needs_a_refined_model():
    from fmtrain.config.loading import from_dict
    from fmtrain.errors import UserError
    from fmtrain.eval import select_reach_of

    base = {"run": {"dir": "r"}, "data": {"seq_len": 1024}}
    refined = from_dict({**base, "model": {"refine": 2}})
    assert select_reach_of("trained", refined) == 1024 and select_reach_of("300", refined) == 300
    with pytest.raises(UserError, match="give a distance in tokens >= 1, or 'trained' \\(data.seq_len = 1024\\)"):
        select_reach_of("0", refined)
    with pytest.raises(UserError, match="changes adaptive refinement's selection; this model has"):
        select_reach_of("trained", from_dict(base))


def test_attend_reach_flag_needs_a_reach():
    from fmtrain.config.loading import from_dict
    from fmtrain.errors import UserError
    from fmtrain.eval import attend_reach_of

    base = {"run": {"dir": "r"}, "data": {"seq_len": 1024}}
    refined = from_dict({**base, "model": {"refine": 2}})
    assert attend_reach_of(True, 1024, refined) and not attend_reach_of(False, None, refined)
    assert attend_reach_of(True, None, from_dict({**base, "model": {"refine": 2, "select_reach": 512}}))
    with pytest.raises(UserError, match="--attend-reach reads the far field as at --select-reach, which is not given"):
        attend_reach_of(True, None, refined)
