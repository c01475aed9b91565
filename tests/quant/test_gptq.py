import pytest
import torch

from neuqi.quant import QuantSpec, dequantize, gptq_quantize, quant_losses

from ..conftest import random_hessian


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("init", ["minmax", "neuqi"])
def test_gptq_and_ldlq_give_the_same_codes(act_order, init):
    w = torch.randn(64, 96) * 0.02
    H = random_hessian(96)
    spec = QuantSpec(3, 32)
    a = gptq_quantize(w, H, spec, init=init, algorithm="gptq", act_order=act_order, block_size=32)
    b = gptq_quantize(w, H, spec, init=init, algorithm="ldlq", act_order=act_order, block_size=16)
    agree = (a.codes == b.codes).float().mean()
    assert agree > 0.999, f"only {agree:.4f} of codes agree"
    assert torch.allclose(a.params.scale, b.params.scale)


def test_error_feedback_beats_round_to_nearest_on_the_proxy_loss():
    w = torch.randn(48, 64)
    H = random_hessian(64)
    spec = QuantSpec(3, -1)
    rtn = gptq_quantize(w, H, spec, init="minmax", algorithm="rtn")
    ldlq = gptq_quantize(w, H, spec, init="minmax", algorithm="ldlq")
    assert ldlq.stats["quant_loss"] < rtn.stats["quant_loss"] * 0.9


def test_ldlq_is_the_greedy_optimum_on_a_tiny_problem():
    """One row, 3 columns: compare the solver's proxy loss with brute force over
    all code vectors reachable by any greedy order — LDLQ must match the best
    sequential (column-by-column, feedback-corrected) choice exactly."""
    torch.manual_seed(1)
    w = torch.randn(1, 3)
    H = random_hessian(3, seed=3)
    spec = QuantSpec(2, -1)
    res = gptq_quantize(w, H, spec, init="minmax", algorithm="ldlq", act_order=False, damp=0.0)
    s, z = res.params.scale[0, 0], res.params.zero[0, 0]
    # sequential reference written directly from the proxy loss
    Hd = H.double()
    chosen = []
    for k in range(3):
        best, best_q = None, None
        for q in range(4):
            trial = [*chosen, q]
            e = w[0, : k + 1].double() - s.double() * (torch.tensor(trial).double() - z.double())
            # minimise the loss over the remaining columns left free (Schur complement)
            Hkk = Hd[: k + 1, : k + 1]
            if k < 2:
                Hkr, Hrr = Hd[: k + 1, k + 1 :], Hd[k + 1 :, k + 1 :]
                Hkk = Hkk - Hkr @ torch.linalg.solve(Hrr, Hkr.T)
            loss = e @ Hkk @ e
            if best is None or loss < best:
                best, best_q = loss, q
        chosen.append(best_q)
    assert res.codes[0].tolist() == chosen


def test_losses_are_reported_and_consistent():
    w = torch.randn(16, 32)
    H = random_hessian(32)
    res = gptq_quantize(w, H, QuantSpec(4, 16), init="neuqi")
    w_hat = dequantize(res.codes, res.params, QuantSpec(4, 16))
    assert res.stats["quant_loss"] == pytest.approx(quant_losses(w, w_hat, H)["quant_loss"])
    assert res.perm is not None and sorted(res.perm.tolist()) == list(range(32))


def test_dead_inputs_and_singular_h_are_handled():
    w = torch.randn(8, 16)
    x = torch.randn(4, 16)
    x[:, 3] = 0  # a dead input; only 4 tokens so H is singular too
    H = (x.T @ x).double()
    res = gptq_quantize(w, H, QuantSpec(3, 8), init="neuqi", damp=0.0)
    assert torch.isfinite(res.params.scale).all()
    assert res.stats["damp"] > 0  # damping had to be raised


@pytest.mark.parametrize(
    "H,msg",
    [
        (torch.eye(5), "inputs"),
        (torch.ones(4, 3), "square"),
        (torch.full((4, 4), float("nan")), "NaN"),
    ],
)
def test_bad_hessians_raise(H, msg):
    with pytest.raises(ValueError, match=msg):
        gptq_quantize(torch.randn(2, 4), H, QuantSpec(3, -1))


def test_magr_then_ldlq_runs_and_shrinks_the_range():
    w = torch.randn(16, 32)
    H = random_hessian(32)
    res = gptq_quantize(w, H, QuantSpec(2, -1), init="minmax", magr=True, magr_alpha=1e-2)
    plain = gptq_quantize(w, H, QuantSpec(2, -1), init="minmax")
    assert res.params.scale.mean() < plain.params.scale.mean()


def test_dead_inputs_carry_no_weight_in_the_init():
    """Half the inputs of every group are always zero; the live ones have small
    activations.  The dead inputs must not steer the grid: with their damping floor
    as importance (the old weighting) the off-centre live weights pay for a grid
    stretched through the dead zeroed weights."""
    from neuqi.quant import fake_quantize, init_params
    from neuqi.quant.gptq import damped_diagonal

    torch.manual_seed(0)
    n, spec = 64, QuantSpec(3, 64)
    X = torch.randn(2048, n) * 0.03
    X[:, ::2] = 0
    H = X.T @ X / X.shape[0]
    dead = torch.diagonal(H) <= 0
    W = 0.5 + 0.1 * torch.randn(16, n)
    h = damped_diagonal(H, 0.01)

    def live_error(w_hat):
        return (h[~dead] * (W[:, ~dead] - w_hat[:, ~dead]) ** 2).sum()

    res = gptq_quantize(W, H, spec, algorithm="rtn", init="neuqi")
    ours = live_error(dequantize(res.codes, res.params, spec))
    alone = init_params(W[:, ~dead], QuantSpec(3, 32), "neuqi", h[~dead])
    best = (h[~dead] * (W[:, ~dead] - fake_quantize(W[:, ~dead], alone, QuantSpec(3, 32))) ** 2).sum()
    W0 = W.clone()
    W0[:, dead] = 0
    old = init_params(W0, spec, "neuqi", h)  # dead inputs weighted by their damping floor
    old_err = live_error(fake_quantize(W0, old, spec))
    assert ours <= best * 1.01
    assert old_err > ours * 1.5



def test_shrink_keeps_the_diagonal_and_scales_the_correlations():
    from neuqi.quant.gptq import shrink_hessian

    H = random_hessian(24)
    S = shrink_hessian(H, 0.3)
    assert torch.equal(torch.diagonal(S), torch.diagonal(H))
    off = ~torch.eye(24, dtype=torch.bool)
    assert torch.allclose(S[off], 0.7 * H[off])
    assert torch.linalg.eigvalsh(S.double()).min() > 0  # a mix of two PSD matrices
    assert shrink_hessian(H, 0.0) is H


def test_shrink_moves_ldlq_toward_round_to_nearest_and_reports_the_calibration_loss():
    """The solver sees the shrunk H, the reported loss is the calibration H's: with the
    correlations all but gone the feedback has nothing to act on and the codes are
    round-to-nearest's; no shrink is the default run; shrink needs a solver, below 1."""
    w = torch.randn(32, 64) * 0.02
    H = random_hessian(64)
    spec = QuantSpec(3, 32)
    rtn = gptq_quantize(w, H, spec, init="neuqi", algorithm="rtn")
    plain = gptq_quantize(w, H, spec, init="neuqi")
    assert torch.equal(gptq_quantize(w, H, spec, init="neuqi", shrink=0.0).codes, plain.codes)
    mid = gptq_quantize(w, H, spec, init="neuqi", shrink=0.5)
    near = gptq_quantize(w, H, spec, init="neuqi", shrink=1 - 1e-7, damp=1e-6)
    rtn_near = gptq_quantize(w, H, spec, init="neuqi", algorithm="rtn", damp=1e-6)
    assert torch.equal(near.params.scale, rtn_near.params.scale)  # the init sees the same diagonal
    assert (near.codes == rtn_near.codes).float().mean() > 0.999
    w_hat = dequantize(mid.codes, mid.params, spec)
    assert mid.stats["quant_loss"] == pytest.approx(quant_losses(w, w_hat, H)["quant_loss"])
    assert plain.stats["quant_loss"] < mid.stats["quant_loss"] < rtn.stats["quant_loss"]
    for bad, msg in ((1.0, "in \\[0, 1\\)"), (-0.1, "in \\[0, 1\\)")):
        with pytest.raises(ValueError, match=msg):
            gptq_quantize(w, H, spec, shrink=bad)
    with pytest.raises(ValueError, match="needs a solver"):
        gptq_quantize(w, H, spec, algorithm="rtn", shrink=0.5)


def _correlated_tokens(k: int, n: int, seed: int) -> torch.Tensor:
    """``[k, n]`` inputs with correlated features and per-input magnitudes spread over
    e^±2 (as a down_proj's are); the same mixing for every seed."""
    mix = torch.Generator().manual_seed(0)
    A = torch.randn(n, n, generator=mix) / n**0.5 + 0.3 * torch.eye(n)
    scale = torch.exp(torch.randn(n, generator=mix))
    return (torch.randn(k, n, generator=torch.Generator().manual_seed(seed)) @ A.t()) * scale


def _h(X: torch.Tensor) -> torch.Tensor:
    return (X.t() @ X / X.shape[0]).double()


def test_choose_shrink_finds_the_grid_minimum_and_shrinks_only_an_h_from_too_few_tokens():
    """Fitted to fewer tokens than inputs, the solve is better on other tokens with the
    correlations shrunk; fitted to many, unshrunk is best.  The climb lands on the grid's
    minimum of the held-out loss (checked against every candidate) from any start, each
    loss is the public solver's own on the held-out H, and the amount is mapped to the
    full H."""
    from neuqi.quant.gptq import SHRINK_GRID, choose_shrink, damped_diagonal
    from neuqi.quant.init import init_params

    n, spec = 96, QuantSpec(3, 32)
    w = torch.randn(48, n, generator=torch.Generator().manual_seed(3)) * 0.02
    H_score = _h(_correlated_tokens(20000, n, seed=1))
    chosen = {}
    for k in (48, 20000):
        H_fit = _h(_correlated_tokens(k, n, seed=2))
        params = init_params(w, spec, "neuqi", damped_diagonal(H_fit, 0.01))
        a, losses = choose_shrink(w, params, spec, H_fit, H_score, damp=0.01)
        every = {}
        for s in SHRINK_GRID:
            res = gptq_quantize(w, H_fit, spec, init="neuqi", shrink=s)
            every[s] = quant_losses(w, dequantize(res.codes, res.params, spec), H_score)["quant_loss"]
        for s, loss in losses.items():
            assert loss == pytest.approx(every[s], rel=1e-4)
        best = min(every, key=every.get)
        assert a == pytest.approx(best / (2 - best))
        for start in (0.0, 0.98):  # the valley is found from either end of the grid
            assert choose_shrink(w, params, spec, H_fit, H_score, damp=0.01, start=start)[0] == a
        chosen[k] = best
    assert chosen[48] >= 0.3 and chosen[20000] == 0.0


def test_choose_shrink_on_a_subset_of_rows_scores_exactly_those_rows():
    """Rows are independent given H, so the trial on ``max_rows`` evenly spaced rows
    gives each candidate the full solve's held-out loss summed over those rows."""
    from neuqi.quant.gptq import choose_shrink, damped_diagonal
    from neuqi.quant.init import init_params

    n, spec = 96, QuantSpec(3, 32)
    w = torch.randn(48, n, generator=torch.Generator().manual_seed(5)) * 0.02
    H_fit, H_score = _h(_correlated_tokens(64, n, seed=6)), _h(_correlated_tokens(4000, n, seed=7))
    params = init_params(w, spec, "neuqi", damped_diagonal(H_fit, 0.01))
    rows = torch.linspace(0, 47, 16).round().long()
    _, losses = choose_shrink(w, params, spec, H_fit, H_score, damp=0.01, max_rows=16)
    assert len(losses) >= 3
    for s, loss in losses.items():
        res = gptq_quantize(w, H_fit, spec, init="neuqi", shrink=s)
        D = (w - dequantize(res.codes, res.params, spec))[rows].double()
        assert loss == pytest.approx(float(((D @ H_score) * D).sum()), rel=1e-4)


def test_shrink_auto_uses_the_folds_and_reports_its_choice():
    n, spec = 96, QuantSpec(3, 32)
    w = torch.randn(48, n, generator=torch.Generator().manual_seed(3)) * 0.02
    X = _correlated_tokens(96, n, seed=4)
    folds = (_h(X[:48]).float(), _h(X[48:]).float())
    H = (folds[0].double() + folds[1].double()) / 2
    res = gptq_quantize(w, H, spec, init="neuqi", shrink="auto", folds=folds)
    a = res.stats["shrink"]
    assert 0 < a < 1 and set(res.stats["shrink_heldout"]) >= {"0.7", "0.8", "0.9"}
    assert torch.equal(res.codes, gptq_quantize(w, H, spec, init="neuqi", shrink=a).codes)
    with pytest.raises(ValueError, match="folds"):
        gptq_quantize(w, H, spec, shrink="auto")
    with pytest.raises(ValueError, match="needs a solver"):
        gptq_quantize(w, H, spec, algorithm="rtn", shrink="auto", folds=folds)
    with pytest.raises(ValueError, match="'auto' or in"):
        gptq_quantize(w, H, spec, shrink="half", folds=folds)
