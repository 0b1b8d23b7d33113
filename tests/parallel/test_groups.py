"""The DeepSpeed seam at start-up: what a CPU launch builds."""
import os
import socket
import subprocess
import sys


def test_a_cpu_start_builds_no_deepspeed_extension(tmp_path):
    """DeepSpeed JIT-compiles its shared-memory all-reduce at every CPU start unless told no op is
    available; into a fresh extensions folder that took 53 s. fmtrain's CPU start builds nothing."""
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(tmp_path / "ext"), CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    code = ("from fmtrain.parallel.groups import init_world\n"
            "import deepspeed.comm as dist\n"
            "w = init_world()\n"
            "print('world', w.size, w.device.type)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "world 1 cpu" in r.stdout
    built = list((tmp_path / "ext").rglob("*")) if (tmp_path / "ext").exists() else []
    assert not built, built
    assert "built successfully" not in r.stdout + r.stderr


def test_a_plain_process_takes_no_port_so_runs_started_at_once_never_collide():
    """A world of one rendezvouses in process (a HashStore): no TCP port is bound, so two runs started
    at once cannot pick the same free port; DeepSpeed's collectives run on that group."""
    code = ("import os, torch\n"
            "from fmtrain.parallel.groups import init_world\n"
            "import deepspeed.comm as ds\n"
            "import torch.distributed as dist\n"
            "w = init_world()\n"
            "t = torch.ones(3)\n"
            "ds.all_reduce(t)\n"
            "ds.barrier()\n"
            "print('world', w.size, ds.get_world_size(), type(dist.distributed_c10d._get_default_store().underlying_store).__name__,\n"
            "      os.environ.get('MASTER_PORT'), t.tolist())\n")
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_PORT", "MASTER_ADDR", "RANK", "WORLD_SIZE")}
    with socket.socket() as taken:  # a MASTER_PORT inherited from the parent, already in use: not needed
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        for extra in ({}, dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)):
            r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                               env=dict(env, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", **extra))
            assert r.returncode == 0, r.stderr[-3000:]
            assert f"world 1 1 HashStore {extra.get('MASTER_PORT')} [1.0, 1.0, 1.0]" in r.stdout, r.stdout
