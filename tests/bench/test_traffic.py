"""bench/traffic.py: the bytes one forward+backward requests, counted under Triton's interpreter."""
import pytest

kernels = pytest.importorskip("fmtrain.attention.kernels")
if not kernels.triton_available():
    pytest.skip("triton does not import here", allow_module_level=True)


def test_fusing_the_summaries_token_gradients_into_dkv_moves_fewer_bytes():
    """The fused path (the default) against the separate one, the same call: the dk/dv kernel's
    epilogue replaces the summary kernels' token pass and autograd's sums of two gradients per k
    and v, so the counted bytes fall, by at least the two (B, Hkv, n, d) gradients written and
    read again (the summaries' share written, then read with the core's and the sum written)."""
    import torch

    from bench import traffic

    n, m, d = 192, 16, 16
    sep, fused = (traffic.count(path, n, m, d, 1, torch.float32) for path in ("separate", "fused"))
    full = n * d * 4  # one (1, 1, n, d) fp32 tensor
    assert "aten.add.Tensor" in sep["torch_ops"] and "aten.add.Tensor" not in fused["torch_ops"], fused["torch_ops"]
    assert sep["torch_ops"]["aten.add.Tensor"] >= 2 * 3 * full  # two sums, each reading two and writing one
    assert sep["total_bytes"] - fused["total_bytes"] >= 2 * 2 * full, (sep["total_bytes"], fused["total_bytes"])
    # the forward's kernels are the same; the dk/dv kernel reads a little more (the level-1 gradients, the map)
    assert sep["kernels"]["_fwd_kernel"] == fused["kernels"]["_fwd_kernel"]
    assert fused["kernels"]["_dkv_kernel"]["stored"] == sep["kernels"]["_dkv_kernel"]["stored"]
    assert fused["kernels"]["_up_bwd_kernel"]["stored"] < sep["kernels"]["_up_bwd_kernel"]["stored"]
