"""A run's TensorBoard logs, read back through TensorBoard's own server and HTTP data API
(what a user watching a cluster run through a forwarded port sees): the scalars equal the
run's metrics.jsonl."""
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

import pytest

from tests.conftest import make_config, metrics, train


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str):
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


def test_tensorboard_server_serves_the_runs_scalars(tmp_path, corpus):
    cfg = make_config(tmp_path, corpus)
    train(cfg, "--train.steps=6")
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "tensorboard.main", "--logdir", str(tmp_path / "run" / "tb"),
         "--host", "127.0.0.1", "--port", str(port), "--load_fast", "false", "--reload_interval", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:  # until the server is up and has read the event file
            try:
                tags = get_json(f"{base}/data/plugin/scalars/tags")
                if tags.get(".", {}).get("train/loss"):
                    break
            except (urllib.error.URLError, ConnectionError):
                pass
            assert server.poll() is None, server.stdout.read().decode()[-3000:]
            assert time.monotonic() < deadline, "TensorBoard did not serve the run in 60 s"
            time.sleep(0.5)

        def scalars(tag):
            q = urllib.parse.urlencode({"run": ".", "tag": tag})
            return get_json(f"{base}/data/plugin/scalars/scalars?{q}")  # [[wall_time, step, value], ...]

        rows = metrics(cfg)
        steps = [m for m in rows if "loss" in m]
        loss = scalars("train/loss")
        assert [s for _, s, _ in loss] == [m["step"] for m in steps] == list(range(1, 7))
        assert [v for _, _, v in loss] == pytest.approx([m["loss"] for m in steps], rel=1e-6)  # float32 in TB
        assert [v for _, _, v in scalars("train/lr")] == pytest.approx([m["lr"] for m in steps], rel=1e-6)
        evals = [m for m in rows if "eval_loss" in m]
        bpb = scalars("eval/bpb")
        assert [s for _, s, _ in bpb] == [m["step"] for m in evals] == [0, 6]
        assert [v for _, _, v in bpb] == pytest.approx([m["eval_bpb"] for m in evals], rel=1e-6)
    finally:
        server.terminate()
        server.wait(timeout=30)
