"""GGUF block types as parameter constraints: representable, near the dense optimum, never
worse than llama.cpp's own min-max choice."""

from __future__ import annotations

import pytest
import torch

from neuqi.quant.gguf_types import (
    BLOCK32_TYPES,
    GGUF_TYPES,
    KQUANT_TYPES,
    block_fields,
    gguf_params,
    gguf_type,
    type_for_row,
)
from neuqi.quant.grid import dequantize, quantize
from neuqi.quant.init import to_groups


def _heavy(out: int, n_in: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)  # StudentT samples from the global generator
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, n_in, generator=g) * torch.rand(out, 1, generator=g)
    w += 0.3 * torch.distributions.StudentT(2.5).sample((out, n_in))  # heavy tails
    h = torch.rand(n_in, generator=g) ** 3 + 1e-3
    return w, h


def test_unknown_type_and_row_length_errors() -> None:
    with pytest.raises(ValueError, match="choose one of Q4_0"):
        gguf_type("Q3_0")
    assert gguf_type("q5_1").name == "Q5_1"
    with pytest.raises(ValueError, match="multiple of 32"):
        gguf_params(torch.randn(4, 40), GGUF_TYPES["Q4_0"])
    with pytest.raises(ValueError, match="init"):
        gguf_params(torch.randn(4, 64), GGUF_TYPES["Q4_0"], init="mse")


@pytest.mark.parametrize("name", BLOCK32_TYPES)
def test_params_are_representable_and_beat_minmax(name: str) -> None:
    t = GGUF_TYPES[name]
    w, h = _heavy(48, 256)
    ours = gguf_params(w, t, "neuqi", h)
    ref = gguf_params(w, t, "minmax", h)
    for p in (ours, ref):
        d, m, _flip = block_fields(p, t)  # raises if not storable
        assert torch.equal(d.half().float(), d)
        assert m is None or torch.equal(m.half().float(), m)
    wg, hg, _ = to_groups(w, t.spec, h)
    from neuqi.quant.init import group_loss

    def loss(p):
        return group_loss(wg, hg, p.scale.reshape(-1), p.zero.reshape(-1), t.maxq)

    lo, lr = loss(ours), loss(ref)
    assert bool((lo <= lr * (1 + 1e-6)).all()), "NeUQI must never lose to min-max on a block"
    assert float(lo.sum()) < 0.97 * float(lr.sum())  # and clearly better in total


def _dense_best(wg: torch.Tensor, hg: torch.Tensor, t) -> torch.Tensor:
    """Best loss over a dense set of representable (fp16 step, fp16 offset) per block."""
    from neuqi.quant.init import best_zero, group_loss

    rng = (wg.amax(1) - wg.amin(1)).clamp_min(1e-8)
    best = torch.full((wg.shape[0],), float("inf"))
    for f in torch.linspace(0.3, 1.3, 2500):
        d = (rng * f / t.maxq).half().float()
        if t.asymmetric:
            z, _ = best_zero(wg / d[:, None], hg, t.maxq)
            m0 = (-d * z).half()
            for k in (-2, -1, 0, 1, 2):  # fp16 offsets around the exact best one
                m = m0.float() if k == 0 else torch.nextafter(
                    m0, torch.full_like(m0, float("inf") if k > 0 else float("-inf"))).float()
                if abs(k) == 2:
                    m = torch.nextafter(m.half(), torch.full_like(m0, float("inf") if k > 0 else float(
                        "-inf"))).float()
                best = torch.minimum(best, group_loss(wg, hg, d, -m / d, t.maxq))
        else:
            for z in (t.centre, t.centre - 1):
                best = torch.minimum(best, group_loss(wg, hg, d, torch.full_like(d, float(z)), t.maxq))
    return best


@pytest.mark.parametrize("name", ["Q4_0", "Q4_1", "Q5_1"])
def test_near_dense_search_of_the_representable_set(name: str) -> None:
    from neuqi.quant.init import group_loss

    t = GGUF_TYPES[name]
    w, h = _heavy(16, 128, seed=3)
    p = gguf_params(w, t, "neuqi", h)
    wg, hg, _ = to_groups(w, t.spec, h)
    ours = group_loss(wg, hg, p.scale.reshape(-1), p.zero.reshape(-1), t.maxq)
    dense = _dense_best(wg, hg, t)
    ratio = ours / dense
    # NeUQI's scale search is not exhaustive: at 5 bits one block in 64 sits 7 % above
    # the dense optimum (Q4 types: ≤ 0.2 %); the mean is what the claim is about.
    assert float(ratio.mean()) <= 1.003
    assert float(ratio.max()) <= (1.1 if t.bits == 5 else 1.01)


def test_offset_form_dequantizes_to_stored_values() -> None:
    t = GGUF_TYPES["Q4_1"]
    w, h = _heavy(8, 64, seed=5)
    p = gguf_params(w, t, "neuqi", h)
    q = quantize(w, p, t.spec)
    d, m, _ = block_fields(p, t)
    expect = q.float().reshape(8, 2, 32) * d[..., None] + m[..., None]
    assert torch.equal(dequantize(q, p, t.spec), expect.reshape(8, 64))


def _group_losses(w, h, p, t) -> torch.Tensor:
    wg, hg, _ = to_groups(w, t.spec, h)
    # offset form, as the file decodes it
    s, m = p.scale.reshape(-1, 1), p.offset.reshape(-1, 1)
    q = torch.clamp(torch.round((wg - m) / s), 0, t.maxq)
    return (hg * (wg - (s * q + m)) ** 2).sum(dim=1)


@pytest.mark.parametrize("name", KQUANT_TYPES)
def test_kquant_params_are_storable_and_beat_minmax(name: str) -> None:
    from neuqi.quant.kquants import kquant_fields

    t = GGUF_TYPES[name]
    w, h = _heavy(24, 512)
    ours, ref = gguf_params(w, t, "neuqi", h), gguf_params(w, t, "minmax", h)
    for p in (ours, ref):
        f = kquant_fields(p, t)  # raises unless fp16 factors times in-range integers
        dk = f.d.repeat_interleave(t.subs, dim=1) * f.k.abs()
        assert torch.equal(dk, p.scale)
        assert torch.equal(f.d.half().float(), f.d) and torch.equal(f.dmin.half().float(), f.dmin)
    per_super = [_group_losses(w, h, p, t).view(-1, t.subs).sum(1) for p in (ours, ref)]
    assert bool((per_super[0] <= per_super[1] * (1 + 1e-6)).all()), "never worse per super-block"
    assert float(per_super[0].sum()) < 0.9 * float(per_super[1].sum())


def _dense_kquant(w, h, t, n_d: int = 400, n_dmin: int = 24) -> float:
    """Best loss of one super-block over a dense grid of fp16 ``d`` (and ``dmin``), every
    sub-block taking its best integers for each: the representable set, searched."""
    from neuqi.quant.kquants import scale_levels

    wg, hg, _ = to_groups(w, t.spec, h)  # [subs, block]
    k_pos, k_neg = scale_levels(t)
    if t.asymmetric:
        span = float((wg.amax(1) - wg.amin(1).clamp_max(0)).max())
        mins = float((-wg.amin(1)).clamp_min(0).max())
        ks = torch.arange(1, k_pos + 1).float()
        ms = torch.arange(0, k_pos + 1).float()
        best = float("inf")
        for d in (torch.linspace(0.2, 1.6, n_d) * span / t.maxq / k_pos).half().float().unique():
            steps = d * ks  # [K]
            for dmin in (torch.linspace(0.0, 1.6, n_dmin) * mins / k_pos).half().float().unique():
                offs = -dmin * ms  # [M]
                s, m = steps[:, None, None, None], offs[None, :, None, None]
                q = torch.clamp(torch.round((wg - m) / s), 0, t.maxq)  # [K, M, subs, block]
                err = (hg * (wg - (s * q + m)) ** 2).sum(-1)  # [K, M, subs]
                best = min(best, float(err.flatten(0, 1).amin(0).sum()))
        return best
    c = t.centre
    amax = float(wg.abs().max())
    ks = torch.cat([torch.arange(1, k_pos + 1), -torch.arange(1, k_neg + 1)]).float()
    best = float("inf")
    for d in (torch.linspace(0.02, 1.5, n_d * 4) * amax / c / k_pos).half().float().unique():
        s = (d * ks)[:, None, None]  # signed sub-block steps [K, 1, 1]
        q = torch.clamp(torch.round(wg / s + c), 0, t.maxq)
        err = (hg * (wg - s * (q - c)) ** 2).sum(-1)  # [K, subs]
        best = min(best, float(err.amin(0).sum()))
    return best


@pytest.mark.parametrize("name", ["Q2_K", "Q3_K", "Q4_K"])
def test_kquant_near_dense_search_of_the_representable_set(name: str) -> None:
    t = GGUF_TYPES[name]
    ratios = []
    # Q4_K's dense set (63 × 64 integer pairs per sub-block) costs ~40 s a seed on 2
    # cores: one seed, the one that measured worst.
    for seed in (1,) if name == "Q4_K" else range(3):
        w, h = _heavy(1, 256, seed=seed)
        ours = float(_group_losses(w, h, gguf_params(w, t, "neuqi", h), t).sum())
        ratios.append(ours / _dense_kquant(w, h, t))
    print(name, [f"{r:.4f}" for r in ratios])
    # Measured 2026-12-04: Q2_K 1.031 / 1.036 / 1.000, Q4_K 1.014 / 1.016 / 1.004,
    # Q3_K 1.003 / 1.000 / 1.003: the joint (d, dmin) choice is a search, not exhaustive.
    assert max(ratios) <= (1.045 if t.asymmetric else 1.01)


def test_kquant_row_fallback() -> None:
    assert type_for_row(GGUF_TYPES["Q3_K"], 512).name == "Q3_K"
    assert type_for_row(GGUF_TYPES["Q3_K"], 576).name == "Q4_0"
    assert type_for_row(GGUF_TYPES["Q4_K"], 896).name == "Q5_0"
    assert type_for_row(GGUF_TYPES["Q6_K"], 576).name == "Q8_0"
    with pytest.raises(ValueError, match="multiple of 32"):
        type_for_row(GGUF_TYPES["Q2_K"], 100)
    with pytest.raises(ValueError, match="multiple of 256"):
        gguf_params(torch.randn(2, 288), GGUF_TYPES["Q4_K"])


@pytest.mark.parametrize("name", ["Q4_1", "Q5_0", "Q2_K", "Q3_K"])
def test_a_layer_searched_in_slices_of_rows_gets_the_same_parameters(monkeypatch, name: str) -> None:
    """On the CPU gguf_params runs a big layer's rows in slices (init.slice_rows): a
    row's stored fields must not depend on its slice, the last partial one included."""
    from neuqi.quant import gguf_types
    from neuqi.quant import init as init_mod

    monkeypatch.setenv("NEUQI_COMPILE", "0")
    t = gguf_type(name)
    w, h = _heavy(7, 512, seed=2)
    whole = gguf_params(w, t, "neuqi", h)
    monkeypatch.setattr(init_mod, "_OUTER_ELEMENTS", {"cpu": 512 * 2})  # 2 rows a slice
    rows = []
    rows_params = gguf_types._rows_params
    monkeypatch.setattr(gguf_types, "_rows_params",
                        lambda x, *a: rows.append(x.shape[0]) or rows_params(x, *a))
    sliced = gguf_params(w, t, "neuqi", h)
    assert rows == [2, 2, 2, 1]
    for f in ("scale", "zero", "offset"):
        torch.testing.assert_close(getattr(sliced, f), getattr(whole, f), rtol=0, atol=0)
    assert sliced.scale.shape == whole.scale.shape == (7, 512 // t.spec.group_size)
