"""The L_p init (``--init-norm``): NeUQI_int's search with ``|w − ŵ|^p`` in place of
the squared error, checked against a dense brute-force grid."""

import pytest
import torch

from neuqi.quant import QuantSpec, gptq_quantize, init_params
from neuqi.quant import init as init_mod
from neuqi.quant.grid import fake_quantize


def lp_error(w, w_hat, h, spec, p):
    """``Σ_j h_j |w_j − ŵ_j|^p`` per (row, group) → ``[out·n_groups]`` (float64)."""
    wg, hg, _ = init_mod.to_groups(w, spec, h)
    qg, _, _ = init_mod.to_groups(w_hat, spec, h)
    return (hg.double() * (wg.double() - qg.double()).abs() ** p).sum(1)


def dense_int_lp(w, h, spec, p, n_scales=2000):
    """Brute force: ``n_scales`` scales in ``(0, 1.25·s₀]`` × every integer zero."""
    wg, hg, _ = init_mod.to_groups(w, spec, h)
    s0 = init_mod.minmax_scale(wg, spec.maxq)
    ratios = torch.arange(1, n_scales + 1, dtype=wg.dtype) * (1.25 / n_scales)
    best = torch.full((wg.shape[0],), float("inf"), dtype=torch.float64)
    for z in range(spec.maxq + 1):
        s = s0[:, None] * ratios[None, :]
        zz = torch.full_like(s, float(z))
        best = torch.minimum(best, init_mod.lp_losses(wg, hg, s, zz, spec.maxq, p).double().amin(1))
    return best


@pytest.mark.parametrize("bits,group,p", [(2, 64, 3.0), (3, 32, 3.0), (3, -1, 2.5), (4, 64, 4.0)])
def test_lp_init_is_near_the_dense_grid_and_never_worse_than_minmax(bits, group, p):
    torch.manual_seed(bits * 10 + p)
    spec = QuantSpec(bits, group)
    w = torch.distributions.StudentT(4.0).sample((32, 128)) * 0.02
    h = torch.rand(128) ** 2 + 0.01
    params = init_params(w, spec, "neuqi_int", h, norm=p)
    assert torch.equal(params.zero, params.zero.round())
    assert params.zero.min() >= 0 and params.zero.max() <= spec.maxq
    ours = lp_error(w, fake_quantize(w, params, spec), h, spec, p)
    dense = dense_int_lp(w, h, spec, p)
    ratio = ours / dense
    assert ratio.mean() < 1.003, ratio.mean()
    mm = lp_error(w, fake_quantize(w, init_params(w, spec, "minmax", h), spec), h, spec, p)
    assert (ours <= mm * (1 + 1e-6)).all()


def test_norm_three_clips_less_than_norm_two():
    """What the exponent is for: outliers stay nearer the grid (smaller worst error)."""
    torch.manual_seed(0)
    spec = QuantSpec(2, 64)
    w = torch.distributions.StudentT(3.0).sample((64, 256)) * 0.02
    h = torch.rand(256) + 0.1
    worst = {}
    for p in (2.0, 3.0):
        params = init_params(w, spec, "neuqi_int", h, norm=p)
        worst[p] = (w - fake_quantize(w, params, spec)).abs().amax(1).mean()
    assert worst[3.0] < worst[2.0]


def test_norm_two_is_the_paper_search():
    torch.manual_seed(1)
    spec = QuantSpec(3, 64)
    w = torch.randn(8, 128)
    h = torch.rand(128) + 0.1
    a = init_params(w, spec, "neuqi_int", h)
    b = init_params(w, spec, "neuqi_int", h, norm=2.0)
    assert torch.equal(a.scale, b.scale) and torch.equal(a.zero, b.zero)


@pytest.mark.parametrize("init,norm", [("mse", 3.0), ("minmax", 3.0), ("neuqi_int", 0.5),
                                       ("neuqi", 9.0)])
def test_bad_norms_are_refused(init, norm):
    w = torch.randn(4, 64)
    with pytest.raises(ValueError, match="norm"):
        init_params(w, QuantSpec(3, 64), init, torch.ones(64), norm=norm)
    with pytest.raises(ValueError, match="norm"):
        gptq_quantize(w, torch.eye(64), QuantSpec(3, 64), init=init, init_norm=norm)


def test_config_names_and_checks_the_norm():
    from neuqi.pipeline.config import QuantConfig

    assert "norm3" in QuantConfig(init="neuqi_int", init_norm=3.0).name_parts()
    assert "norm2.5" in QuantConfig(init="neuqi_int", init_norm=2.5).name_parts()
    assert not any(p.startswith("norm") for p in QuantConfig(init="neuqi_int").name_parts())
    with pytest.raises(ValueError, match="--init-norm"):
        QuantConfig(init="minmax", init_norm=3.0)
    with pytest.raises(ValueError, match="--init-norm"):
        QuantConfig(gguf="Q4_1", init="neuqi", init_norm=3.0)


def test_float_lp_init_lowers_the_lp_loss_and_never_raises_it():
    """The reweighted rounds keep, per group, the best grid under |e|^p, the
    squared-error grid included."""
    torch.manual_seed(2)
    spec = QuantSpec(2, 64)
    w = torch.distributions.StudentT(3.0).sample((48, 256)) * 0.02
    h = torch.rand(256) + 0.1
    l2 = init_params(w, spec, "neuqi", h)
    l3 = init_params(w, spec, "neuqi", h, norm=3.0)
    a = lp_error(w, fake_quantize(w, l2, spec), h, spec, 3.0)
    b = lp_error(w, fake_quantize(w, l3, spec), h, spec, 3.0)
    assert (b <= a * (1 + 1e-6)).all()
    assert b.sum() < 0.98 * a.sum()
