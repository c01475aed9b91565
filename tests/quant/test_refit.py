"""The least-squares refit and per-row selection against brute force and each other."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from neuqi.quant import QuantParams, QuantSpec, dequantize, gptq_quantize, init_params, quantize
from neuqi.quant.refit import refit_params, row_losses

from ..conftest import random_hessian


def correlated_layer(out=96, n=512, rank=64, outliers=8, seed=0):
    """The issue's layer: inputs of rank 64 plus noise, 8 outlier input channels."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(4096, rank, generator=g) @ torch.randn(rank, n, generator=g)
    X += 0.3 * torch.randn(4096, n, generator=g)
    X[:, :outliers] *= 10
    return torch.randn(out, n, generator=g) * 0.05, X.T @ X / X.shape[0]


def lstsq_reference(codes, w, H, spec):
    """Each row's best ``ŵ = a_g q + c_g`` by explicit least squares on ``H^{1/2}``."""
    n = w.shape[1]
    G = spec.n_groups(n)
    g_idx = spec.group_index(n)
    L = torch.linalg.cholesky(H.double())  # H = L Lᵀ, so (w−ŵ) H (w−ŵ)ᵀ = ‖Lᵀ(w−ŵ)‖²
    out = []
    for r in range(w.shape[0]):
        A = torch.zeros(n, 2 * G, dtype=torch.float64)
        A[torch.arange(n), g_idx] = codes[r].double()
        A[torch.arange(n), G + g_idx] = 1.0
        x = torch.linalg.lstsq(L.T @ A, (L.T @ w[r].double())[:, None],
                             driver="gelsd").solution[:, 0]  # rank-deficient: one code per group
        out.append(row_losses(w[r : r + 1], (A @ x).float()[None], H))
    return torch.cat(out)


@settings(max_examples=12, deadline=None)
@given(n=st.integers(5, 40), group=st.sampled_from([4, 7, 16, -1]), bits=st.sampled_from([2, 3, 4]),
       seed=st.integers(0, 1000))
def test_float_refit_is_the_least_squares_optimum(n, group, bits, seed):
    torch.manual_seed(seed)
    w = torch.randn(6, n)
    H = random_hessian(n, seed=seed) + 1e-3 * torch.eye(n)
    spec = QuantSpec(bits, group)
    p = init_params(w, spec, "minmax")
    codes = quantize(w, p, spec)
    fit = refit_params(codes, w, H, spec, p, int_zero=False)
    got = row_losses(w, dequantize(codes, fit, spec), H)
    before = row_losses(w, dequantize(codes, p, spec), H)
    ref = lstsq_reference(codes, w, H, spec)
    assert (got <= before * (1 + 1e-6) + 1e-9).all()
    assert (got >= ref * (1 - 1e-4) - 1e-9).all()  # nothing beats the optimum
    # every row reaches it, but for a row whose fit is ill-posed (a scale <= 0):
    # that row keeps its old parameters
    kept = (fit.scale == p.scale).all(1)
    assert torch.allclose(got[~kept], ref[~kept], rtol=1e-3, atol=1e-8)


def test_float_refit_reaches_the_optimum_on_every_row_of_a_well_posed_layer():
    """The property test above lets a row with an ill-posed group keep its parameters; how
    many rows that hits depends on the drawn shapes (hypothesis found 3 of 6 at 2-bit,
    groups of 4).  Here no group is ill-posed, so every row must be refitted."""
    torch.manual_seed(0)
    w = torch.randn(16, 64)
    H = random_hessian(64, seed=0) + 1e-3 * torch.eye(64)
    spec = QuantSpec(3, 16)
    p = init_params(w, spec, "minmax")
    codes = quantize(w, p, spec)
    fit = refit_params(codes, w, H, spec, p, int_zero=False)
    assert not (fit.scale == p.scale).all(1).any()
    got = row_losses(w, dequantize(codes, fit, spec), H)
    assert torch.allclose(got, lstsq_reference(codes, w, H, spec), rtol=1e-3, atol=1e-8)


def test_integer_refit_keeps_whole_zeros_and_never_loses():
    w, H = correlated_layer(out=32, n=256)
    spec = QuantSpec(3, 64)
    p = init_params(w, spec, "neuqi_int", torch.diagonal(H))
    codes = quantize(w, p, spec)
    fit = refit_params(codes, w, H, spec, p, int_zero=True)
    assert torch.equal(fit.zero, fit.zero.round())
    assert fit.zero.min() >= 0 and fit.zero.max() <= spec.maxq
    assert (fit.scale > 0).all()
    before = row_losses(w, dequantize(codes, p, spec), H)
    after = row_losses(w, dequantize(codes, fit, spec), H)
    assert (after <= before * (1 + 1e-9)).all()
    assert after.sum() < 0.95 * before.sum()  # the correlated layer leaves a lot to gain


@pytest.mark.parametrize("spec", [QuantSpec(3, 128), QuantSpec(2, 128), QuantSpec(3, 64),
                                  QuantSpec(4, -1)])
def test_neuqi_family_inside_ldlq_never_loses_to_minmax_on_the_correlated_layer(spec):
    """The issue's symptom: plain NeUQI_int inside LDLQ can leave a higher proxy loss
    than min-max (3-bit g128).  With min-max and mse as candidates and the refit it
    may not, and the refit alone lowers the loss of its own init."""
    w, H = correlated_layer()
    minmax = gptq_quantize(w, H, spec, init="minmax").stats["quant_loss"]
    for init in ("neuqi_int", "neuqi"):
        plain = gptq_quantize(w, H, spec, init=init).stats["quant_loss"]
        refit = gptq_quantize(w, H, spec, init=init, refit=4).stats["quant_loss"]
        assert refit < plain
    best = gptq_quantize(w, H, spec, init="neuqi_int", also_inits=("minmax", "mse"), refit=4)
    assert best.stats["quant_loss"] < minmax
    assert torch.equal(best.params.zero, best.params.zero.round())


@pytest.mark.parametrize("spec", [QuantSpec(3, 128), QuantSpec(2, 128), QuantSpec(3, 64),
                                  QuantSpec(4, -1)])
def test_with_descent_the_neuqi_family_leaves_less_than_minmax_on_the_correlated_layer(spec):
    """Without refit or selection, three sweeps of coordinate descent after the solve
    are enough: on this layer (inputs of rank 64 plus 8 outlier channels) LDLQ's
    one-pass rounding is far from the best codes for any grid, and NeUQI's grids,
    once the codes are improved, leave less than min-max's, descended or not
    (measured 0.00046-0.00047 against 0.00076-0.00098 at 3b g128)."""
    w, H = correlated_layer()
    minmax = min(gptq_quantize(w, H, spec, init="minmax", descent=d).stats["quant_loss"] for d in (0, 3))
    for init in ("neuqi", "neuqi_int"):
        assert gptq_quantize(w, H, spec, init=init, descent=3).stats["quant_loss"] < minmax, init


def test_selection_keeps_each_rows_best_candidate():
    w, H = correlated_layer(out=48, n=256, seed=2)
    spec = QuantSpec(2, 64)
    runs = {m: gptq_quantize(w, H, spec, init=m) for m in ("neuqi_int", "minmax", "mse")}
    sel = gptq_quantize(w, H, spec, init="neuqi_int", also_inits=("minmax", "mse"))
    Hd = H.double()

    def rows(r):
        return row_losses(w, dequantize(r.codes, r.params, spec), Hd)

    per_row = torch.stack([rows(r) for r in runs.values()]).amin(0)
    assert torch.allclose(rows(sel), per_row, rtol=1e-6)
    assert sel.stats["proxy_loss_selected"] <= sel.stats["proxy_loss_first"]


def test_refit_respects_storage_dtype_and_partial_groups():
    w, H = correlated_layer(out=16, n=200, seed=3)  # 200 = 3 groups of 64 + 8
    spec = QuantSpec(3, 64)
    r = gptq_quantize(w, H, spec, init="neuqi", refit=3, param_dtype=torch.float16)
    assert torch.equal(r.params.scale, r.params.scale.half().float())
    assert torch.equal(r.params.zero, r.params.zero.half().float())
    assert r.stats["proxy_loss_refit"] < r.stats["proxy_loss_first"]


def test_bad_refit_options_are_refused():
    w, H = torch.randn(4, 32), random_hessian(32)
    spec = QuantSpec(3, 16)
    with pytest.raises(ValueError, match="mix float and integer"):
        gptq_quantize(w, H, spec, init="neuqi_int", also_inits=("neuqi",))
    with pytest.raises(ValueError, match="need a solver"):
        gptq_quantize(w, H, spec, init="minmax", algorithm="rtn", refit=2)
    with pytest.raises(ValueError, match=">= 0"):
        gptq_quantize(w, H, spec, refit=-1)


def test_refit_keeps_old_parameters_where_the_fit_is_ill_posed():
    """A row whose codes are all equal has no scale to fit: it keeps its parameters."""
    w = torch.zeros(2, 16)
    w[1] = torch.linspace(-1, 1, 16)
    spec = QuantSpec(2, -1)
    p = QuantParams(torch.tensor([[1.0], [2 / 3]]), torch.tensor([[1.0], [1.5]]))
    codes = quantize(w, p, spec)
    fit = refit_params(codes, w, torch.eye(16), spec, p, int_zero=False)
    assert torch.isfinite(fit.scale).all() and (fit.scale > 0).all()


@pytest.mark.parametrize("init", ["neuqi_int", "mse", "neuqi"])
def test_h_power_tempers_the_init_weights(init):
    """``h_power=0`` is the unweighted init; 1 the diag(H)-weighted one (the default)."""
    w, H = correlated_layer(out=8, n=128, seed=4)
    spec = QuantSpec(3, 64)
    flat = gptq_quantize(w, H, spec, init=init, algorithm="rtn", h_power=0.0)
    assert torch.allclose(flat.params.scale, init_params(w, spec, init).scale)
    paper = gptq_quantize(w, H, spec, init=init, algorithm="rtn")
    again = gptq_quantize(w, H, spec, init=init, algorithm="rtn", h_power=1.0)
    assert torch.equal(paper.params.scale, again.params.scale)
    assert not torch.allclose(flat.params.scale, paper.params.scale)
    with pytest.raises(ValueError, match="h_power"):
        gptq_quantize(w, H, spec, init=init, h_power=-0.5)
