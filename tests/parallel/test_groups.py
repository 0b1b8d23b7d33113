"""The DeepSpeed seam at start-up: what a CPU launch builds."""
import os
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
