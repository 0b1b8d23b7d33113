import os
import zlib

import pytest
import torch


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
