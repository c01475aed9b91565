"""The FP-output target (``--fp-target``): the closed form against least squares."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from neuqi.quant.gptq import damp_hessian
from neuqi.quant.target import fp_target_weight


def _inputs(seed: int, n_in: int = 24, tokens: int = 200, drift: float = 0.3):
    g = torch.Generator().manual_seed(seed)
    x_fp = torch.randn(tokens, n_in, generator=g, dtype=torch.float64)
    x_q = x_fp + drift * torch.randn(tokens, n_in, generator=g, dtype=torch.float64)  # earlier layers' error
    W = torch.randn(16, n_in, generator=g, dtype=torch.float64)
    return W, x_fp, x_q


def test_the_target_is_the_weight_itself_where_the_two_inputs_agree():
    W, x, _ = _inputs(0)
    H = x.t() @ x / x.shape[0]
    assert torch.allclose(fp_target_weight(W.float(), H, H, 0.01), W.float(), atol=1e-6)


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10_000), damp=st.sampled_from([1e-3, 0.01, 0.1]),
       drift=st.floats(0.05, 1.0), alpha=st.sampled_from([1.0, 0.25]))
def test_the_target_minimises_the_fp_output_error_plus_the_damping_term(seed, damp, drift, alpha):
    """``W_t = argmin_V Σ_t ‖W x̃_t − V x_q,t‖²/T + λ‖V − W‖²`` with ``x̃ = x_q + α(x_fp − x_q)``
    (λ: the solver's damping), solved independently by least squares on the stacked system."""
    W, x_fp, x_q = _inputs(seed, drift=drift)
    T, n = x_q.shape
    x_mix = x_q + alpha * (x_fp - x_q)  # the inputs on which W's output is matched
    H = x_q.t() @ x_q / T
    lam = float(damp_hessian(H, damp).diagonal()[0] - H.diagonal()[0])
    A = torch.cat([x_q / T**0.5, lam**0.5 * torch.eye(n, dtype=torch.float64)])
    B = torch.cat([x_mix @ W.t() / T**0.5, lam**0.5 * W.t()])
    expected = torch.linalg.lstsq(A, B).solution.t()
    got = fp_target_weight(W.float(), H, x_fp.t() @ x_q / T, damp, alpha)
    assert torch.allclose(got.double(), expected, atol=1e-4, rtol=1e-4)
    # and it does better on those outputs than the weight itself
    err = lambda V: ((x_mix @ W.t() - x_q @ V.t()) ** 2).mean()  # noqa: E731
    assert err(got.double()) < err(W)


def test_a_singular_h_is_damped_further_as_the_solver_does():
    """A rank-deficient H that the asked damping cannot factor: the target raises the
    damping tenfold (as the solver's factorisation does) instead of failing."""
    torch.manual_seed(0)
    x = torch.randn(8, 16).double()  # 8 tokens, 16 inputs: rank 8
    H = x.T @ x / 8
    W = torch.randn(4, 16)
    with pytest.raises(torch.linalg.LinAlgError):
        torch.linalg.cholesky(H)
    Wt = fp_target_weight(W, H, H + 0.01 * torch.eye(16, dtype=torch.float64), damp=0.0, alpha=0.5)
    assert torch.isfinite(Wt).all() and not torch.equal(Wt, W)
