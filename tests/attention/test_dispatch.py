"""What one forward+backward of the Triton path dispatches, counted on the CPU (issue #26's
"no host work in the hot path"): after a warm-up call no tensor is made from host data (each
would be a host-to-device copy and a stream synchronisation on a GPU), no padded copy of the
keys and values is made (the kernels mask the rows outside the sequence), the kernel launches are
1 + 3 for the core whatever the number of levels (forward; dq, whose prologue forms the softmax
row term; dk/dv, which also adds the summaries' share of the tokens' gradients; the summaries'
transposed pass, with no partial buffers or index_add_) and 2 + 2 for the summaries of every level
(:mod:`fmtrain.attention.kernels.summaries`), and the PyTorch ops around them do not grow with the
levels at all.

Ops are counted with a ``TorchDispatchMode``; the kernels under ``TRITON_INTERPRET=1`` (the
interpreter's own copies of the kernels' arguments are not counted: on a GPU there are none).
"""
import collections

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fmtrain.attention import build_summaries, fma
from fmtrain.attention.hierarchy import hierarchy

kernels = pytest.importorskip("fmtrain.attention.kernels")
if not kernels.triton_available():
    pytest.skip("triton does not import here", allow_module_level=True)

# Ops that make a tensor from host data or read one back (a synchronisation).
FROM_HOST = ("aten.lift_fresh", "aten.arange", "aten.scalar_tensor", "aten.full.", "aten.linspace",
             "aten._local_scalar_dense", "aten.index_put")
# Ops that only describe memory (no kernel on a GPU).
METADATA = ("view", "permute", "transpose", "unsqueeze", "squeeze", "expand", "slice", "select.int",
            "alias", "detach", "aten.t.", "as_strided", "split", "unbind")
KERNELS = ("_fwd_kernel", "_dq_kernel", "_dkv_kernel", "_dsum_kernel", "_up_kernel", "_top_kernel",
           "_top_bwd_kernel", "_up_bwd_kernel")
M, P = 16, 2


class Dispatches(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops, self.launches, self.launching = collections.Counter(), collections.Counter(), False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.launching:
            self.ops[str(func)] += 1
        return func(*args, **(kwargs or {}))


class Launch:
    """``kernel[grid](...)`` that counts the launch and hides the interpreter's copies."""

    def __init__(self, kernel, name, seen: Dispatches):
        self.kernel, self.name, self.seen = kernel, name, seen

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def run(*args, **kwargs):
            self.seen.launches[self.name] += 1
            self.seen.launching = True
            try:
                return launch(*args, **kwargs)
            finally:
                self.seen.launching = False
        return run


def count(monkeypatch, n: int, summary: str) -> Dispatches:
    """One warm-up, then the counted forward+backward of fma."""
    from fmtrain.attention.kernels import function, summaries

    g = torch.Generator().manual_seed(n)
    q, k, v = (torch.randn(1, 2, n, 16, generator=g, requires_grad=True) for _ in range(3))
    s = build_summaries(summary, n_kv_heads=2, head_dim=16, block_size=M, rank=P, max_seq_len=n)

    def call():
        fma(q, k, v, block_size=M, rank=P, summaries=s, impl="triton").sum().backward()

    call()
    seen = Dispatches()
    with monkeypatch.context() as patch:
        for name in KERNELS:
            module = function if hasattr(function, name) else summaries
            patch.setattr(module, name, Launch(getattr(module, name), name, seen))
        with seen:
            call()
    return seen


def compute_ops(c: collections.Counter) -> collections.Counter:
    return collections.Counter({op: k for op, k in c.items() if not any(m in op for m in METADATA)})


@pytest.mark.parametrize("summary", ["mean", "m2m"])
def test_no_host_tensors_and_launches_and_ops_flat_in_the_levels(monkeypatch, summary):
    short, long = 8 * M, 32 * M  # 3 and 5 levels (fine level included)
    assert hierarchy(long, M, P, True).n_levels - hierarchy(short, M, P, True).n_levels == 2
    a, b = count(monkeypatch, short, summary), count(monkeypatch, long, summary)
    for seen in (a, b):
        host = {op: k for op, k in seen.ops.items() if any(h in op for h in FROM_HOST)}
        assert not host, f"tensors made from host data after warm-up: {host}"
        assert seen.launches == dict.fromkeys(KERNELS, 1)
        # The kernels read the sequence's keys in place (rows outside masked): no padded copy.
        assert not [op for op in seen.ops if "pad" in op], seen.ops
    grown = compute_ops(b.ops) - compute_ops(a.ops)
    assert compute_ops(a.ops) == compute_ops(b.ops), f"ops that grow with the levels: {grown}"
    # What remains around the kernels, forward and backward: the buffers they write,
    # the sum of the G query heads' summary gradients, the .grad accumulations; m2m's two map
    # gradients add a buffer and a sum each. The summaries' token gradients reach k and v inside the
    # dk/dv kernel (SummarizedAttention): no second gradient per tensor, no sum of the two.
    assert not [op for op in b.ops if op.startswith("aten.add.")], compute_ops(b.ops)
    assert sum(compute_ops(b.ops).values()) <= {"mean": 20, "m2m": 26}[summary], compute_ops(b.ops)


def test_separate_summary_gradients_add_only_their_two_sums(monkeypatch):
    """``FMTRAIN_SUMMARY_GRADS=separate`` (kept for timing side by side): the summary kernels' own
    token gradients, which autograd adds to the core's, k's and v's: the same launches, no host-made
    tensor, and the fused path's ops plus two buffers and those two sums."""
    from fmtrain.attention.kernels.function import SUMMARY_GRADS_ENV

    monkeypatch.setenv(SUMMARY_GRADS_ENV, "separate")
    b = count(monkeypatch, 32 * M, "mean")
    assert b.launches == dict.fromkeys(KERNELS, 1)
    assert not [op for op in b.ops if any(h in op for h in FROM_HOST)], b.ops
    assert b.ops["aten.add.Tensor"] == 2 and sum(compute_ops(b.ops).values()) <= 24, compute_ops(b.ops)
