"""Refit GGUF block parameters to the codes LDLQ chose, on the lattice the type stores.

:mod:`neuqi.quant.refit` fits free parameters to fixed codes by least squares on the
full H.  A GGUF type cannot store free parameters: block-32 types keep fp16 steps and
offsets, k-quants integer sub-block steps and mins times fp16 super-block factors, and
the symmetric types a fixed zero.  So the refit here is two steps:

1. the least-squares optimum for the codes, unconstrained except for the symmetric
   types' fixed zero (:func:`~neuqi.quant.refit.refit_params`' normal equations, rows
   in chunks to bound memory: a group of 16 gives ``[rows, 2G, 2G]`` systems);
2. the representable point nearest to it in each group's own quadratic metric — the
   2×2 block of the normal matrix for (step, offset), with the offset re-centred for
   the chosen step — searched jointly over a few super-block factors per super-block.

Step 2 ignores the coupling between groups, so the result is a candidate, not a
guaranteed improvement: the caller scores it on the full H and keeps, row by row,
whatever is lower (:func:`neuqi.quant.gptq.gptq_quantize`'s ``refit`` rounds).
Pure tensor math.
"""

from __future__ import annotations

import torch
from torch import Tensor

from neuqi.quant.gguf_types import GGUFType, _fp16, _fp16_step, keep_lower
from neuqi.quant.grid import QuantParams
from neuqi.quant.kquants import D_FACTORS, DMIN_FACTORS, scale_levels
from neuqi.quant.refit import _float_fit, _int_scales, _normal_blocks

# Rows per chunk are chosen so one chunk's normal matrices stay near this many bytes.
CHUNK_BYTES = 256 << 20


def _chunk_rows(G: int, asymmetric: bool) -> int:
    m = 2 * G if asymmetric else G
    return max(1, CHUNK_BYTES // (8 * m * m * 3))


def _targets(codes: Tensor, W: Tensor, H: Tensor, t: GGUFType, params: QuantParams):
    """Least-squares targets and their per-group metric for fixed codes, float64.

    Asymmetric: ``(a, c, Kaa, Kac, Kcc)`` with ``ŵ = a·q + c``; symmetric:
    ``(a, Kss)`` with ``ŵ = a·(q − z)`` for the current zeros.  All ``[out, G]``.
    """
    Mqq, Mq1, M11, bq, b1 = _normal_blocks(codes, W, H, t.spec)
    out, G = bq.shape
    s0 = params.scale.double()
    diag = torch.diagonal
    if t.asymmetric:
        a, c = _float_fit(Mqq, Mq1, M11, bq, b1, s0, params.offset.double())
        kcc = diag(M11).expand(out, G)
        return a, c, diag(Mqq, dim1=1, dim2=2), diag(Mq1, dim1=1, dim2=2), kcc
    z = params.zero.double()
    a, _ = _int_scales(Mqq, Mq1, M11, bq, b1, z, s0)
    kss = diag(Mqq, dim1=1, dim2=2) - 2 * z * diag(Mq1, dim1=1, dim2=2) + z * z * diag(M11)
    return a, kss


def _project_block32(tg: tuple[Tensor, ...], t: GGUFType, params: QuantParams) -> tuple[Tensor, Tensor]:
    """fp16 step (and offset, re-centred for the rounded step)."""
    if not t.asymmetric:
        a = _fp16_step(tg[0].float())
        return a, -a * params.zero.float()
    a_t, c_t, _kaa, kac, kcc = tg
    a = _fp16_step(a_t.float())
    c = c_t - kac / kcc.clamp_min(1e-30) * (a.double() - a_t)
    return a, _fp16(c.float())


def _project_kquant(tg: tuple[Tensor, ...], t: GGUFType, params: QuantParams) -> tuple[Tensor, Tensor]:
    """Integer sub-block steps (and mins) times fp16 super-block factors, chosen per
    super-block to minimise the sum of the groups' quadratic distances to the targets."""
    S = t.subs
    out, G = params.scale.shape
    R = out * G // S

    def sb(x: Tensor) -> Tensor:
        return x.reshape(R, S)

    if t.asymmetric:
        a_t, c_t, kaa, kac, kcc = (sb(x) for x in tg)
        limit = torch.full_like(a_t, float(scale_levels(t)[0]))
    else:
        a_t, kss = (sb(x) for x in tg)
        z = sb(params.zero.double())
        k_c, k_c1 = scale_levels(t)
        limit = torch.where(z == t.centre, float(k_c), float(k_c1)).double()
    a_t = a_t.clamp_min(0)
    d0 = (a_t / limit).amax(1, keepdim=True)
    # per super-block: (loss [R, 1], steps [R, S], offsets [R, S])
    best = (torch.full((R, 1), float("inf"), dtype=torch.float64, device=a_t.device),
            sb(params.scale.double()), sb(params.offset.double()))
    K = float(scale_levels(t)[0])
    for f in D_FACTORS:
        d = _fp16_step((d0 * f).float()).double()
        k_lo = torch.floor(a_t / d).clamp(1, None)
        ks = [torch.minimum(k_lo, limit), torch.minimum(k_lo + 1, limit)]
        if not t.asymmetric:
            errs = [kss * (d * k - a_t) ** 2 for k in ks]
            a = d * torch.where(errs[1] < errs[0], ks[1], ks[0])
            best = keep_lower(best, (torch.minimum(*errs).sum(1, keepdim=True), a, -a * z))
            continue
        # the offset each step wants, and the super-block min factor for those offsets
        c_want = [c_t - kac / kcc.clamp_min(1e-30) * (d * k - a_t) for k in ks]
        m0 = torch.maximum(*[(-c).clamp_min(0) for c in c_want]).amax(1, keepdim=True) / K
        for g in DMIN_FACTORS:
            dmin = _fp16_step((m0 * g).float()).double()
            # per group: (loss, step, offset), the best of both steps and both mins
            grp = (torch.full_like(a_t, float("inf")), a_t, c_t)
            for k, cw in zip(ks, c_want, strict=True):
                a = d * k
                m_lo = torch.floor(-cw / dmin).clamp(0, K)
                for m in (m_lo, (m_lo + 1).clamp(0, K)):
                    c = -dmin * m
                    da, dc = a - a_t, c - c_t
                    grp = keep_lower(grp, (kaa * da * da + 2 * kac * da * dc + kcc * dc * dc, a, c))
            best = keep_lower(best, (grp[0].sum(1, keepdim=True), grp[1], grp[2]))
    _, best_a, best_c = best
    return best_a.float().reshape(out, G), best_c.float().reshape(out, G)


def gguf_refit(codes: Tensor, W: Tensor, H: Tensor, t: GGUFType, params: QuantParams) -> QuantParams:
    """Representable parameters of ``t`` refitted to ``codes``: a candidate for the
    caller to score.  ``codes, W: [out, in]``, ``H: [in, in]``, ``params`` the current
    offset-form parameters ``[out, n_groups]`` (they give the symmetric types' zeros
    and fill rows whose least squares is ill-posed)."""
    if params.offset is None:
        raise ValueError(f"these parameters were not chosen for a GGUF type; quantize with --gguf {t.name}")
    G = params.scale.shape[1]
    step = _chunk_rows(G, t.asymmetric)
    project = _project_kquant if t.is_kquant else _project_block32
    scales, offsets = [], []
    for r0 in range(0, codes.shape[0], step):
        sl = slice(r0, r0 + step)
        p = QuantParams(params.scale[sl], params.zero[sl], params.offset[sl])
        tg = _targets(codes[sl], W[sl], H, t, p)
        ok = torch.stack([torch.isfinite(x).all(1) for x in tg]).all(0)[:, None]
        a, c = project(tuple(torch.nan_to_num(x) for x in tg), t, p)
        good = ok & (a > 0).all(1, keepdim=True) & torch.isfinite(c).all(1, keepdim=True)
        scales.append(torch.where(good, a, p.scale.float()))
        offsets.append(torch.where(good, c, p.offset.float()))
    scale, offset = torch.cat(scales), torch.cat(offsets)
    return QuantParams(scale, -offset / scale, offset)
