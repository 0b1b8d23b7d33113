import pytest
import torch


@pytest.fixture
def rng():
    """A fresh generator per test, seeded from the test's own randomness source."""
    g = torch.Generator().manual_seed(torch.seed() % (2**31))
    return g


def randn(g, *shape, dtype=torch.float64, requires_grad=False):
    return torch.randn(*shape, generator=g, dtype=dtype).requires_grad_(requires_grad)
