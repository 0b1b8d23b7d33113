"""Smoke test of the quality benchmark and the recall probe (``--quick``, into a tmp folder).

They train real (tiny) models, so the numbers only have to be there and finite;
what they say is in bench/results/ and the README's Quality section.
"""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def run_bench(script: str, tmp_path: Path, *extra: str, plot: bool = True) -> dict:
    out = tmp_path / "results"
    cmd = [sys.executable, str(ROOT / "bench" / script), "--quick", "--out", str(out), *extra]
    # Generous timeout: the script takes 1-2 minutes on a quiet 2-core machine, but CI machines are shared.
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        output, _ = proc.communicate(timeout=900)
    finally:
        if proc.poll() is None:  # SIGTERM: the script stops the trainer it runs, then exits
            proc.terminate()
            proc.communicate()
    assert proc.returncode == 0, output[-5000:]
    stem = out / f"{Path(script).stem}-quick"
    assert not plot or stem.with_suffix(".png").stat().st_size > 0
    assert stem.with_suffix(".md").read_text().startswith("| ")
    return json.loads(stem.with_suffix(".json").read_text())


@pytest.mark.slow
def test_quality_quick(tmp_path):
    result = run_bench("quality.py", tmp_path, "--work-dir", str(tmp_path / "runs"), "--jobs", "2")
    rows = {(r["kind"], r["variant"]) for r in result["rows"]}
    variants = ("fma-m2m", "fma-mean", "fma-linear", "sdpa", "local")
    assert rows == {(k, v) for k in ("causal", "mlm") for v in variants}
    for r in result["rows"]:
        for key in ("eval_bpb", "eval_loss", "tokens_per_s", "peak_memory_gib"):
            assert math.isfinite(r[key]) and r[key] > 0, (r["kind"], r["variant"], key, r[key])
        assert r["curve"][0]["step"] == 0 and r["curve"][-1]["step"] == r["steps"]
    # Every variant saw the same number of tokens.
    assert len({r["train_tokens"] for r in result["rows"]}) == 1
    assert set(result["floors"]) == {"causal", "mlm"}
    assert "sdpa" in result["table"]


@pytest.mark.slow
def test_recall_quick(tmp_path):
    result = run_bench("recall.py", tmp_path)
    assert set(result["rows"]) == {"fma-m2m", "fma-mean", "sdpa", "local"}
    for name, row in result["rows"].items():
        assert row["pooled"], name
        for b, cell in row["pooled"].items():
            assert 0.0 <= cell["accuracy"] <= 1.0 and cell["count"] > 0, (name, b, cell)
        assert all(math.isfinite(e["loss"]) for e in row["train_log"]), name
    # Buckets reach beyond the fine level (2 * block_size) out to the evaluation length.
    assert max(int(b) for b in result["rows"]["fma-m2m"]["pooled"]) >= 1024
    assert result["floor"]["reach"] == 64 and "met" in result["floor"]


@pytest.mark.slow
def test_recall_refined_variant_saves_its_weights_and_the_needle_at_start_control_reuses_them(tmp_path):
    models = str(tmp_path / "models")
    first = run_bench("recall.py", tmp_path, "--variants", "fma-m2m-refine2", "--models", models)
    weights = tmp_path / "models" / "fma-m2m-refine2.pt"
    stamp = (weights.read_bytes(), weights.stat().st_mtime_ns)
    # The control on the same weights (not retrained: the file is untouched), read past the training length
    # at once: levels capped at the trained ones, a flat top, Llama 3's RoPE scaling.
    control = run_bench("recall.py", tmp_path, "--variants", "fma-m2m-refine2", "--models", models,
                        "--needle-at", "start", "--eval-max-level", "2", "--eval-flat-top",
                        "--eval-rope-scaling", "llama3:4")
    assert (weights.read_bytes(), weights.stat().st_mtime_ns) == stamp
    assert control["rows"]["fma-m2m-refine2"]["train_log"] == first["rows"]["fma-m2m-refine2"]["train_log"]
    args = control["meta"]["args"]
    assert (args["needle_at"], args["eval_rope_scaling"], args["eval_flat_top"]) == ("start", "llama3:4", True)
    # The needle at the start: every distance out to the end of the longest sequence is asked for.
    # (accuracies of this 20-step model are near chance, so they need not differ from the first run's)
    assert max(int(b) for b in control["rows"]["fma-m2m-refine2"]["pooled"]) >= 2048
    # Chain-free training (rows of documents, masked): its own weights, trained on other batches; weights
    # saved before --train existed (no "train" in their setup) are the chained ones.
    docs = run_bench("recall.py", tmp_path, "--variants", "fma-m2m-refine2", "--models", models, "--train", "documents")
    assert docs["meta"]["args"]["train"] == "documents"
    assert docs["rows"]["fma-m2m-refine2"]["train_log"] != first["rows"]["fma-m2m-refine2"]["train_log"]
    assert torch.load(tmp_path / "models" / "fma-m2m-refine2.pt")["setup"]["train"] == "documents"
    # The selection probe on those weights: the needle's window's rank by each rule, at every level it has.
    probe = run_bench("selection.py", tmp_path, "--variants", "fma-m2m-refine2", "--models", models, "--train",
                      "documents", plot=False)
    assert probe["meta"]["variant"] == "fma-m2m-refine2" and probe["meta"]["length"] == 1024
    assert probe["rows"] and "16" not in probe["rows"]  # distance 16 lies in the near field: no window
    for d, per_layer in probe["rows"].items():
        assert sorted(per_layer) == ["layer 1", "layer 2"], d  # every layer of the two-layer model
        for layer, row in per_layer.items():
            levels = [k.split()[0] for k in row if k.endswith("windows")]
            assert levels, (d, layer)
            for lv in levels:
                for rule in ("summary", "box", "exact"):
                    assert 0 <= row[f"{lv} {rule}"] < row[f"{lv} windows"], (d, layer, lv, rule)
            assert 0 <= row["opened"] <= 1, (d, layer)  # the share of heads whose selection opened the needle


def test_recall_refuses_a_flat_top_without_a_cap_an_attend_reach_without_a_reach_and_a_bad_rope_scaling(capsys):
    from bench import recall

    for argv, msg in ((["--eval-flat-top"], "--eval-flat-top flattens the top level --eval-max-level keeps"),
                      (["--eval-rope-scaling", "llama3:x"], "give llama3:F or linear:F"),
                      (["--eval-attend-reach"], "--eval-attend-reach reads the far field as at --eval-select-reach")):
        with pytest.raises(SystemExit):
            recall.parse_args(argv)
        assert msg in capsys.readouterr().err
    assert recall.rope_scaling(recall.parse_args(["--eval-rope-scaling", "llama3:4", "--train-len", "4096"])) == {
        "rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 4096}


def test_needle_at_start_puts_every_needle_first():
    from bench import recall

    ids, targets, dist = recall.passkey_batch(torch.Generator().manual_seed(0), 4, 300, 16, needle_max=1)
    assert (ids[:, 0] == recall.MARKER).all()
    pos = torch.arange(300).expand(4, -1)
    assert ((pos - dist)[targets >= 0] == 1).all()  # every query's distance is from position 1, the value


@pytest.mark.slow
def test_long_context_quick_buckets_every_position_once_and_reuses_runs(tmp_path):
    arms = "local,fma-m2m+model.level_offset=true"
    work = str(tmp_path / "runs")
    result = run_bench("long_context.py", tmp_path, "--arms", arms, "--work-dir", work, "--jobs", "2")
    assert [r["arm"] for r in result["rows"]] == arms.split(",")
    for r in result["rows"]:
        # Every document read to eval_len tokens: positions 1..eval_len-1, each in one bucket.
        assert sum(r["counts"]) == r["n_docs"] * (r["eval_len"] - 1), r["arm"]
        assert all(math.isfinite(s) and s > 0 for s, c in zip(r["sums"], r["counts"]) if c)
        assert all(s == 0 for s, c in zip(r["sums"], r["counts"]) if not c)
        assert math.isfinite(r["trainer_eval_loss"])
    done = {r["arm"]: Path(r["run_dir"]) / "long_context_run.json" for r in result["rows"]}
    stamps = {arm: (p.read_text(), p.stat().st_mtime_ns) for arm, p in done.items()}
    # Reuses the runs, with the folder spelled relative to the bench's working directory this time.
    again = run_bench("long_context.py", tmp_path, "--arms", arms, "--work-dir", os.path.relpath(work, ROOT),
                      "--jobs", "2")
    assert {arm: (p.read_text(), p.stat().st_mtime_ns) for arm, p in done.items()} == stamps  # not retrained
    for first, second in zip(result["rows"], again["rows"]):
        # Same weights, same documents. Not bitwise: evaluation sets torch's thread count from the
        # machine's load (fmtrain.attention.cpu), and a matmul summed over another split of threads
        # differs in float32's last bits (CI saw 2e-11 relative); a retrained model differs by far more.
        assert second["sums"] == pytest.approx(first["sums"], rel=1e-7, abs=0), first["arm"]
        assert second["counts"] == first["counts"], first["arm"]
    # The same study put together from the rows written, the run folders gone: nothing trained.
    saved = tmp_path / "first.json"
    saved.write_text((tmp_path / "results" / "long_context-quick.json").read_text())
    gone = tmp_path / "gone"
    joined = run_bench("long_context.py", tmp_path, "--arms", arms, "--work-dir", str(gone), "--rows-from", str(saved))
    assert not gone.exists()
    assert [(r["arm"], r["sums"]) for r in joined["rows"]] == [(r["arm"], r["sums"]) for r in again["rows"]]


def test_long_context_rows_from_refuses_rows_of_another_study(tmp_path):
    from bench import long_context as lc

    args = lc.parse_args(["--quick", "--arms", "local"])
    saved = tmp_path / "s.json"
    saved.write_text(json.dumps(dict(meta=dict(args=dict(vars(args), steps=99)), rows=[dict(arm="local")])))
    args.rows_from = [str(saved)]
    with pytest.raises(SystemExit, match=r"not the same study \(steps: 99 there, 4 here\)"):
        lc.earlier_rows(args)
    saved.write_text(json.dumps(dict(meta=dict(args=vars(args)), rows=[dict(arm="local", sums=[1.0])])))
    assert lc.earlier_rows(args) == {"local": dict(arm="local", sums=[1.0])}


@pytest.mark.slow
def test_sweep_quick_picks_each_variants_best_lr_and_adds_seeds(tmp_path):
    result = run_bench("sweep.py", tmp_path, "--variants", "fma-m2m,local", "--work-dir", str(tmp_path / "runs"),
                       "--jobs", "2")
    s = result["summary"]
    for v in ("fma-m2m", "local"):
        sweep = s[v]["lr_sweep"]
        assert s[v]["best_lr"] == float(min(sweep, key=sweep.get))
        assert s[v]["seeds"] == [0, 1] and len(s[v]["bpb"]) == 2 and math.isfinite(s[v]["std"])
    assert len(result["rows"]) == 2 * 2 + 2  # two lrs per variant, then one more seed each


def test_multikey_needles_are_where_their_queries_point():
    from bench import recall

    g = torch.Generator().manual_seed(0)
    ids, targets, dist = recall.multikey_batch(g, 3, 400, 24, keys=4)
    for b in range(3):
        assert (ids[b] == recall.MARKER).sum() == 4  # four needles, distinct keys
        keys = ids[b][(ids[b] == recall.MARKER).nonzero().flatten() + 1]
        assert len(set(keys.tolist())) == 4
        queries = (targets[b] >= 0).nonzero().flatten().tolist()
        assert len(queries) >= 12
        for p in queries:  # query token, key; the needle (marker, key, value) `dist` back
            v = p - int(dist[b, p])
            assert ids[b, p - 1] == recall.QUERY and ids[b, v - 2] == recall.MARKER
            assert ids[b, v - 1] == ids[b, p] and ids[b, v] == targets[b, p]
    assert recall.train_length(recall.parse_args(["--train-len", "4096", "--curriculum", "512,1024",
                                                  "--steps", "30"]), 29) == 4096


@pytest.mark.parametrize("keys", [1, 4])
def test_single_query_sequences_ask_once_at_the_end_for_the_value_distance_back(keys):
    from bench import recall

    g = torch.Generator().manual_seed(0)
    for d in (2, 37, 290):
        ids, targets, dist = recall.single_query_batch(g, 5, 300, d, keys=keys)
        assert ((targets >= 0).sum(1) == 1).all() and (targets[:, -1] >= 0).all()  # one query, the last token
        assert (dist[:, -1] == d).all()
        v = 299 - d  # the value the query asks for
        assert (targets[:, -1] == ids[:, v]).all()
        assert (ids == recall.MARKER).sum(1).tolist() == [keys] * 5
        if keys == 1:
            assert (ids[:, v - 1] == recall.MARKER).all() and (ids[:, -1] == recall.QUERY).all()
        else:  # marker, key, value; the query token then the same key; the other needles' keys differ
            assert (ids[:, v - 2] == recall.MARKER).all() and (ids[:, v - 1] == ids[:, -1]).all()
            assert (ids[:, -2] == recall.QUERY).all()
            for b in range(5):
                keys_b = ids[b][(ids[b] == recall.MARKER).nonzero().flatten() + 1].tolist()
                assert len(set(keys_b)) == keys
    with pytest.raises(ValueError, match="does not fit"):
        recall.single_query_batch(g, 1, 300, 299)
    args = recall.parse_args(["--single-distances", "16,300,5000"])
    assert recall.eval_distances(args, 4096) == [16, 300] and args.eval == "single"


@pytest.mark.parametrize("keys,prefix", [(1, "uniform"), (4, "uniform"), (1, "log")])
def test_document_rows_end_each_document_in_its_one_query_and_masking_isolates_it(keys, prefix):
    from bench import recall
    from fmtrain.model import build_model

    g = torch.Generator().manual_seed(keys)
    ids, targets, dist, doc_positions = recall.document_batch(g, 6, 1024, keys, prefix)
    assert ids.shape == targets.shape == dist.shape == doc_positions.shape == (6, 1024)
    queries = 0
    for b in range(6):
        starts = (doc_positions[b] == 0).nonzero().flatten().tolist() + [1024]
        assert starts[0] == 0 and (doc_positions[b, 1:] - doc_positions[b, :-1])[doc_positions[b, 1:] > 0].eq(1).all()
        for lo, hi in zip(starts, starts[1:]):
            asked = (targets[b, lo:hi] >= 0).nonzero().flatten().tolist()
            assert asked in ([], [hi - lo - 1]), (b, lo, hi)  # at most one query, the document's last token
            if asked:
                queries += 1
                v = hi - 1 - int(dist[b, hi - 1])  # its value, inside the same document
                assert v >= lo and ids[b, v] == targets[b, hi - 1]
                assert (ids[b, lo:hi] == recall.MARKER).sum() == keys
            else:  # only a remainder too short for a needle goes without a query
                assert hi == 1024 and hi - lo < 3 * keys + 5
    assert queries >= (20 if prefix == "log" else 8)  # about 5 and 2 documents a row
    # Masked to its document, a query's prediction is its document's alone (at the same RoPE positions:
    # refinement's key boxes are not invariant to a shift of every position): no query sees another.
    args = recall.parse_args(["--variants", "fma-m2m-refine2", "--dim", "32", "--heads", "2", "--block-size", "16"])
    torch.manual_seed(0)
    model = build_model(recall.model_config(args, "fma-m2m-refine2")).double().eval()
    row = ids[:1]
    with torch.no_grad():
        packed = model.logits(row, doc_positions=doc_positions[:1])
        starts = (doc_positions[0] == 0).nonzero().flatten().tolist() + [1024]
        for lo, hi in zip(starts, starts[1:]):
            alone = model.logits(row[:, lo:hi], positions=torch.arange(lo, hi))
            torch.testing.assert_close(packed[:, lo:hi], alone, rtol=1e-10, atol=1e-10)


def test_long_context_seed_summary_pairs_each_arm_with_local_at_the_same_seeds():
    from bench import long_context as lc

    def row(arm, losses):  # one token per bucket, so a bucket's mean is its loss
        n = len(lc.EDGES) - 1
        return dict(arm=arm, sums=losses + [0.0] * (n - 2), counts=[1, 1] + [0] * (n - 2), doc_counts=[1] * n)

    rows = [row("local", [5.0, 4.0]), row("fma-m2m", [4.9, 3.5]),
            row("local+train.seed=1", [5.4, 4.4]), row("fma-m2m+train.seed=1", [5.1, 3.9]),
            row("local+train.seed=2", [6.0, 6.0]), row("sdpa", [7.0, 7.0])]  # seed 2 has no fma run
    s = lc.seed_summary(rows, lc.buckets(rows), default_seed=0)
    assert set(s) == {"local", "fma-m2m"}  # sdpa ran at one seed only
    assert s["local"]["seeds"] == [0, 1, 2] and s["local"]["mean"] == pytest.approx([5.4667, 4.8], abs=1e-4)
    f = s["fma-m2m"]
    assert f["vs_base_seeds"] == [0, 1]  # paired: local's seed 2 is left out
    assert f["vs_base_mean"] == pytest.approx([-0.2, -0.5])
    assert f["vs_base_std"] == pytest.approx([0.1414, 0.0], abs=1e-4)
    assert f["below_base_beyond_spread"] == [True, True]
    assert "fma-m2m - local" in lc.seed_table(s, lc.buckets(rows), seq_len=2048)
    other = lc.seed_summary(rows, lc.buckets(rows), default_seed=0, baseline="fma-m2m")["local"]
    assert other["vs_base_mean"] == pytest.approx([0.2, 0.5])  # the same pairs, the other way round
    assert "local - fma-m2m" in lc.seed_table({"local": other}, lc.buckets(rows), seq_len=2048)
    assert lc.seed_of("fma-m2m+model.weighted=false+train.seed=3", 0) == ("fma-m2m+model.weighted=false", 3)


def test_long_context_past_training_reads_multipole_arms_as_eval_does():
    from bench import long_context as lc
    from fmtrain.config import load_config

    cfg = load_config(ROOT / "configs" / "tiny-gpt.toml", ["--data.seq_len=2048"])
    from fmtrain.model import trained_levels

    levels = lc.past_training_options(cfg)
    assert levels[0] == trained_levels(cfg.model, 2048) > 1  # the levels a 2048-token sequence has
    assert levels[1:] == (False, None, None, False)  # plain multipole: the trained levels only
    refined = load_config(ROOT / "configs" / "tiny-gpt.toml", ["--data.seq_len=2048", "--model.refine=4"])
    assert lc.past_training_options(refined) == (levels[0], True, None, 2048, True)
    assert lc.past_training_options(load_config(ROOT / "configs" / "tiny-gpt.toml", ["--model.attention=local"])) is None
    row = dict(arm="fma-m2m+model.refine=4", sums=[1.0] + [0.0] * (len(lc.EDGES) - 2),
               counts=[1] + [0] * (len(lc.EDGES) - 2), doc_counts=[1] * (len(lc.EDGES) - 1), trainer_eval_loss=1.0,
               length_options=dict(max_level=levels[0], flat_top=True, select_reach=2048, attend_reach=True))
    assert f"coarse levels 1..{levels[0]} only" in lc.table([row], lc.buckets([row]), 2048)
    assert "clamped at 2,048 tokens" in lc.table([row], lc.buckets([row]), 2048)
