"""The GGUF refit: what it proposes is what the type stores, and inside the solver it
never leaves a row worse and lowers the loss of a well-posed layer."""

import pytest
import torch

from neuqi.quant import dequantize, gptq_quantize, quantize
from neuqi.quant.gguf_refit import gguf_refit
from neuqi.quant.gguf_types import GGUF_TYPES, _fp16, gguf_params, gguf_type
from neuqi.quant.kquants import kquant_fields
from neuqi.quant.refit import row_losses

from ..conftest import random_hessian
from .test_refit import correlated_layer


def check_representable(p, t):
    if t.is_kquant:
        kquant_fields(p, t)  # raises unless steps and mins factor as the type stores them
        return
    assert torch.equal(p.scale, _fp16(p.scale)) and (p.scale > 0).all()
    if t.asymmetric:
        assert torch.equal(p.offset, _fp16(p.offset))
    else:
        z = -p.offset / p.scale
        assert ((z == t.centre) | (z == t.centre - 1)).all()


@pytest.mark.parametrize("name", list(GGUF_TYPES))
def test_the_refit_proposes_parameters_the_type_stores(name):
    t = gguf_type(name)
    torch.manual_seed(0)
    n = 2 * t.row_block
    w, H = torch.randn(6, n) * 0.05, random_hessian(n, seed=4)
    p = gguf_params(w, t, "neuqi", torch.diagonal(H).float())
    fit = gguf_refit(quantize(w, p, t.spec), w, H, t, p)
    check_representable(fit, t)
    if not t.asymmetric:
        assert torch.equal(fit.zero, p.zero)  # the symmetric types keep their zeros


@pytest.mark.parametrize("name", ["Q2_K", "Q3_K", "Q4_K", "Q4_0", "Q4_1"])
def test_refit_rounds_lower_the_loss_row_by_row_and_stay_storable(name):
    t = gguf_type(name)
    w, H = correlated_layer(out=32, n=512)
    a = gptq_quantize(w, H, t.spec, gguf=t)
    b = gptq_quantize(w, H, t.spec, gguf=t, refit=3)
    check_representable(b.params, t)
    la = row_losses(w, dequantize(a.codes, a.params, t.spec), H)
    lb = row_losses(w, dequantize(b.codes, b.params, t.spec), H)
    assert (lb <= la * (1 + 1e-6)).all()
    assert lb.sum() < 0.99 * la.sum()


def test_gguf_takes_refit_but_not_select():
    t = gguf_type("Q4_1")
    w, H = torch.randn(4, 64), random_hessian(64)
    with pytest.raises(ValueError, match="not available with GGUF"):
        gptq_quantize(w, H, t.spec, gguf=t, also_inits=("minmax",))
