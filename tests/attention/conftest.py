import os
import zlib

import pytest
import torch

from fmtrain.attention import fma

# float64 against the dense reference: two exact algorithms differ by summation order only
# (~1e-15 seen); see test_fma.py.
TOL64 = 1e-12


@pytest.fixture
def rng(request):
    """A generator per test with a fixed seed derived from the test's id (a failure names it;
    FMTRAIN_TEST_SEED=N runs the tests with seed N instead)."""
    seed = int(os.environ.get("FMTRAIN_TEST_SEED") or zlib.crc32(request.node.nodeid.encode()) % (2**31))
    request.node.rng_seed = seed
    return torch.Generator().manual_seed(seed)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    seed = getattr(item, "rng_seed", None)
    if report.failed and seed is not None:
        report.sections.append(("rng seed", f"seed {seed}; rerun with FMTRAIN_TEST_SEED={seed}"))


def randn(g, *shape, dtype=torch.float64, requires_grad=False):
    return torch.randn(*shape, generator=g, dtype=dtype).requires_grad_(requires_grad)


def qkv(g, B, H, Hkv, n, d, dtype=torch.float64):
    """Random queries (B, H, n, d) and keys, values (B, Hkv, n, d) that take gradients."""
    return (randn(g, B, H, n, d, dtype=dtype, requires_grad=True),
            randn(g, B, Hkv, n, d, dtype=dtype, requires_grad=True),
            randn(g, B, Hkv, n, d, dtype=dtype, requires_grad=True))


def outputs_and_grads(q, k, v, g, extra=(), **kw):
    """``fma(q, k, v, **kw)`` and the gradients of q, k, v (and ``extra``) for a random output gradient."""
    out = fma(q, k, v, **kw)
    gout = torch.randn(out.shape, generator=g, dtype=out.dtype)
    grads = torch.autograd.grad(out, (q, k, v, *extra), gout)
    return out, grads
