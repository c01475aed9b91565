import os

import pytest
import torch

# Tests run eager: compiling the NeUQI sweep costs ~20 s per process and the
# compiled path is checked against eager in tests/quant/test_init.py.
os.environ.setdefault("NEUQI_COMPILE", "0")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def random_hessian(n: int, tokens: int = 512, seed: int = 0) -> torch.Tensor:
    """A realistic SPD second-moment matrix: correlated inputs, uneven scales."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(n, n, generator=g) * 0.3 + torch.eye(n)
    x = torch.randn(tokens, n, generator=g) @ mix * (torch.rand(n, generator=g) * 2 + 0.1)
    return (x.T @ x / tokens).double()
