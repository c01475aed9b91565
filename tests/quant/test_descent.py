"""Coordinate descent on the codes against brute force: it never raises the loss and
stops where no single code can move to any grid point and lower it."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from neuqi.quant import QuantSpec, dequantize, gptq_quantize, init_params, quantize
from neuqi.quant.descent import descend_codes
from neuqi.quant.gguf_types import gguf_params, gguf_type
from neuqi.quant.gptq import damp_hessian, damped_diagonal
from neuqi.quant.refit import row_losses

from ..conftest import random_hessian


@settings(max_examples=15, deadline=None)
@given(n=st.integers(4, 48), group=st.sampled_from([4, 8, -1]), bits=st.sampled_from([2, 3, 4]),
       seed=st.integers(0, 1000), passes=st.integers(1, 3))
def test_descent_never_raises_any_rows_loss(n, group, bits, seed, passes):
    torch.manual_seed(seed)
    w = torch.randn(5, n)
    H = random_hessian(n, seed=seed)
    spec = QuantSpec(bits, group)
    p = init_params(w, spec, "minmax")
    codes = quantize(w, p, spec)
    q = descend_codes(w, codes, p, spec, H, passes)
    assert torch.equal(q, q.round()) and q.min() >= 0 and q.max() <= spec.maxq
    before = row_losses(w, dequantize(codes, p, spec), H)
    after = row_losses(w, dequantize(q, p, spec), H)
    assert (after <= before * (1 + 1e-5) + 1e-9).all()


def single_move_gains(w, codes, params, spec, H):
    """Brute force: the largest loss decrease any one code can reach by moving to any
    grid point, per row."""
    base = row_losses(w, dequantize(codes, params, spec), H)
    best = torch.zeros_like(base)
    for j in range(w.shape[1]):
        for v in range(spec.maxq + 1):
            c = codes.clone()
            c[:, j] = v
            best = torch.maximum(best, base - row_losses(w, dequantize(c, params, spec), H))
    return best, base


def test_descent_reaches_a_point_no_single_move_improves():
    torch.manual_seed(0)
    w, H = torch.randn(4, 24), random_hessian(24, seed=1)
    spec = QuantSpec(3, 8)
    p = init_params(w, spec, "minmax")
    start = quantize(w, p, spec)
    gain0, base0 = single_move_gains(w, start, p, spec, H)
    assert (gain0 > 1e-6 * base0).any()  # rounding to nearest leaves moves worth making
    q = descend_codes(w, start, p, spec, H, passes=30)
    gain, base = single_move_gains(w, q, p, spec, H)
    assert (gain <= 1e-5 * base).all()


def test_descent_after_ldlq_lowers_the_loss_and_skips_dead_inputs():
    torch.manual_seed(0)
    n = 64
    w, H = torch.randn(16, n), random_hessian(n, seed=2)
    H[5, :] = H[:, 5] = 0.0  # an input that is always zero
    spec = QuantSpec(2, 16)
    a = gptq_quantize(w, H, spec, init="neuqi_int")
    b = gptq_quantize(w, H, spec, init="neuqi_int", descent=2)
    assert torch.equal(a.params.scale, b.params.scale)  # the grid stays as chosen
    assert b.stats["quant_loss"] < a.stats["quant_loss"]
    assert torch.equal(a.codes[:, 5], b.codes[:, 5])


def test_a_replaced_diagonal_descends_as_the_damped_copy_does():
    """``diag=`` (the solver's damped diagonal, no ``in × in`` copy) gives the codes
    that the dense damped H gives."""
    torch.manual_seed(4)
    n = 300  # more than one block of columns
    w, H = torch.randn(12, n), random_hessian(n, seed=4).float()
    spec = QuantSpec(3, 32)
    p = init_params(w, spec, "minmax")
    codes = quantize(w, p, spec)
    dense = descend_codes(w, codes, p, spec, damp_hessian(H, 0.1), 2)
    lean = descend_codes(w, codes, p, spec, H, 2, diag=damped_diagonal(H, 0.1))
    assert not torch.equal(dense, codes)  # the sweeps moved codes, so the check can fail
    assert (dense != lean).float().mean() < 1e-3  # float32 ties at most


@pytest.mark.parametrize("name", ["Q4_1", "Q4_0", "Q2_K", "Q3_K"])
def test_descent_keeps_gguf_codes_on_the_types_grid(name):
    t = gguf_type(name)
    torch.manual_seed(0)
    n = t.row_block
    w, H = torch.randn(8, n), random_hessian(n, seed=3)
    p = gguf_params(w, t, "neuqi", torch.diagonal(H).float())
    codes = quantize(w, p, t.spec)
    q = descend_codes(w, codes, p, t.spec, H, 2)
    assert q.min() >= 0 and q.max() <= t.maxq
    before = row_losses(w, dequantize(codes, p, t.spec), H)
    assert (row_losses(w, dequantize(q, p, t.spec), H) <= before * (1 + 1e-5)).all()


def test_bad_descent_options_are_refused():
    w, H = torch.randn(4, 32), random_hessian(32)
    with pytest.raises(ValueError, match=">= 0 sweeps"):
        gptq_quantize(w, H, QuantSpec(3, 16), descent=-1)
    with pytest.raises(ValueError, match="needs a solver"):
        gptq_quantize(w, H, QuantSpec(3, 16), init="minmax", algorithm="rtn", descent=1)
