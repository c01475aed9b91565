"""llama.cpp's k-quants as parameter constraints: NeUQI under two-level scales.

A k-quant row is cut into super-blocks of 256 weights, each into sub-blocks of 16 or
32 (the solvers' groups).  What a sub-block ``j`` can store (ggml-common.h):

* asymmetric ``Q2_K``, ``Q4_K``, ``Q5_K``: ``ŵ = d·k_j·q − dmin·m_j`` with ``d, dmin``
  fp16 per super-block and ``k_j, m_j ∈ 0..K`` (``K = 15`` for Q2_K, 63 otherwise):
  a step ``d·k_j`` and a float offset ``−dmin·m_j`` on two shared integer lattices;
* symmetric ``Q3_K``, ``Q6_K``: ``ŵ = d·k_j·(q − c)`` with a *signed* integer ``k_j``
  (−32..31, −128..127); a negative one flips the codes, so in our ``s·(q − z)`` form
  the zero is ``c`` (``|k| ≤ K⁺``) or ``c − 1`` (``|k| ≤ K⁺ + 1``).

The choice is joint: every candidate super-block factor ``d`` (multiples of the
largest sub-block step that NeUQI wants) gives each sub-block its two nearest steps
on the lattice, each with its best offset (codes and the weighted-mean offset in
turn, from NeUQI's own zero) rounded both ways on the ``dmin`` lattice — or, for
the symmetric types, with both zeros — and the candidate with the lowest
diag(H)-weighted error over the super-block wins.  Then least squares on the
super-block moves ``d`` (and ``dmin``) to the codes, and the sub-blocks are chosen
again; a step is kept only where it lowers the error.  The llama.cpp-style min-max
choice is kept wherever it is better.

Parameters come back in offset form (``scale = d·k``, ``offset``) exactly as ggml
decodes them; :func:`kquant_fields` recovers the stored integers for the writer.
Pure tensor math.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from neuqi.quant import gguf_types
from neuqi.quant import init as init_math  # not `init`: the searches take an `init` argument
from neuqi.quant.gguf_types import GGUFType, _fp16, _fp16_step, keep_lower
from neuqi.quant.grid import QuantParams
from neuqi.quant.init import _init_neuqi_grid, _multistart_points, _run_sweep, integer_zero_sweep, to_groups

# Candidate super-block steps, as multiples of (largest wanted sub-block step)/K: above
# 1 the largest sub-block keeps its step and the small ones get a coarser lattice.
D_FACTORS = (1.0, 1.03, 1.07, 1.12, 1.18, 1.26, 1.36, 1.5, 1.7)
DMIN_FACTORS = (1.0, 1.08, 1.2)
LS_ROUNDS = 2
LOCAL = 2  # sub-block integers tried around the chosen ones (asymmetric types)
# Alternations of codes and offset per candidate step: on heavy-tailed 96 x 1536 rows
# as good as the exact restricted zero sweep (Q4_K 0.6616 vs 0.6623 of min-max's error,
# Q5_K 0.6964 vs 0.6979) and 2-2.5x faster for the whole search (Q5_K 1.6 s vs 4.1 s).
OFFSET_ITERS = 4


# Asymmetric types whose wanted ``(s, z)`` comes from the grid search only around the
# multi-start search's best valley (its ``band`` grid steps either side) instead of the
# grid search over every scale up to 1.5·s₀.  Q2_K, on the ffn_down rows of SmolLM2-135M
# (blocks 3, 20) and Qwen2.5-Coder-0.5B (3, 18), bench/kquant_search.py, 2026-12-07: the
# chosen parameters' diag(H)-weighted error moved by −0.05 % to +0.008 % and the whole
# search took 12.1 s against 34.6 s.  Around both valleys (``search="banded"``): 16.4 s,
# no better; the multi-start points alone: 8.8 s, but +0.02 % to +0.08 %.  Q4_K stays on
# the grid: with the banded target Qwen's block 18 (outlier-dominated) lost 0.8 %.
VALLEY_TARGET_MAXQ = (3,)


# The candidate scores below run compiled (:func:`neuqi.quant.init._run_sweep`): eager,
# each is ~7 passes over ``[G, n]`` and they were 60 % of a Q2_K search once its target
# came from the multi-start search; fused they are one pass.
def _offset_loss(wg: Tensor, hg: Tensor, scale: Tensor, offset: Tensor, maxq: int) -> Tensor:
    """:func:`neuqi.quant.gguf_types._offset_loss`, compiled."""
    return _run_sweep(gguf_types._offset_loss, wg, hg, scale, offset, maxq)


def group_loss(wg: Tensor, hg: Tensor, scale: Tensor, zero: Tensor, maxq: int) -> Tensor:
    """:func:`neuqi.quant.init.group_loss`, compiled."""
    return _run_sweep(init_math.group_loss, wg, hg, scale, zero, maxq)


def scale_levels(t: GGUFType) -> tuple[int, int]:
    """Largest ``|k|`` for zero ``c`` and for zero ``c − 1`` (asymmetric: ``(K, K)``)."""
    if t.asymmetric:
        k = (1 << t.scale_bits) - 1
        return k, k
    k = (1 << (t.scale_bits - 1)) - 1
    return k, k + 1


def _per_group(x: Tensor, subs: int) -> Tensor:
    """``[B]`` per super-block → ``[B·subs]`` per sub-block."""
    return x.repeat_interleave(subs)


def _super_sum(x: Tensor, subs: int) -> Tensor:
    return x.view(-1, subs).sum(dim=1)


class _Best:
    """Per super-block best so far: loss ``[B]`` and the sub-block parameters ``[G]``."""

    def __init__(self, B: int, subs: int, device: torch.device) -> None:
        self.subs = subs
        self.loss = torch.full((B,), float("inf"), device=device)
        self.loss_g = torch.full((B * subs,), float("inf"), device=device)
        self.scale = torch.ones(B * subs, device=device)
        self.offset = torch.zeros(B * subs, device=device)

    def offer(self, loss_g: Tensor, scale: Tensor, offset: Tensor) -> None:
        loss = _super_sum(loss_g, self.subs)
        better = loss < self.loss
        self.loss = torch.where(better, loss, self.loss)
        g = _per_group(better, self.subs)
        self.loss_g = torch.where(g, loss_g, self.loss_g)
        self.scale = torch.where(g, scale, self.scale)
        self.offset = torch.where(g, offset, self.offset)


def _lattice(target: Tensor, step: Tensor, lo: int, hi: int) -> tuple[Tensor, Tensor]:
    """The two lattice points ``step·k`` (``k ∈ lo..hi``) around ``target``."""
    step = step.clamp_min(torch.finfo(torch.float32).tiny)
    k = torch.floor(target / step).clamp(lo, hi)
    return k, (k + 1).clamp(lo, hi)


# ------------------------------------------------------------------ asymmetric types
def _fit_offset(wg: Tensor, hg: Tensor, scale: Tensor, offset: Tensor, reach: Tensor, maxq: int) -> Tensor:
    """:func:`_fit_offset_chunk`, compiled."""
    return _run_sweep(_fit_offset_chunk, wg, hg, scale, offset, reach, maxq, OFFSET_ITERS)


def _fit_offset_chunk(wg: Tensor, hg: Tensor, scale: Tensor, offset: Tensor, reach: Tensor, maxq: int,
                      iters: int) -> Tensor:
    """Alternate codes and the weighted-mean offset for a fixed step (each step never
    raises the loss), the offset kept in ``[−reach, 0]``.  ``[G]`` in, ``[G]`` out."""
    hsum = hg.sum(dim=1).clamp_min(1e-30)
    for _ in range(iters):
        q = torch.clamp(torch.round((wg - offset[:, None]) / scale[:, None]), 0, maxq)
        offset = ((hg * (wg - scale[:, None] * q)).sum(dim=1) / hsum).clamp_max(0).maximum(-reach)
    return offset


def _asym_pick(wg, hg, s, d, dmin_cands, t, m0) -> tuple[Tensor, Tensor, Tensor]:
    """Each sub-block's best ``(step, offset)`` on the lattices of ``d`` and each dmin.

    ``d: [G]`` and every ``dmin: [G]`` (per sub-block copies of the super-block's).
    Steps: the two multiples of ``d`` around the wanted ``s``; offsets: the best offset
    for the step (:func:`_fit_offset` from NeUQI's min ``m0``, within what ``dmin·0..K``
    reaches), rounded both ways on the dmin lattice.  Returns ``(loss, scale, offset)`` for the best dmin of
    each super-block (the caller compares super-blocks).
    """
    maxq, (K, _) = t.maxq, scale_levels(t)
    reach = torch.stack(dmin_cands).amax(dim=0) * K  # the largest storable min
    best = _Best(wg.shape[0] // t.subs, t.subs, wg.device)
    picks = [(d * k, -_fit_offset(wg, hg, d * k, -m0, reach, maxq)) for k in _lattice(s, d, 1, K)]
    for dmin in dmin_cands:
        kept = (torch.full_like(s, float("inf")), torch.ones_like(s), torch.zeros_like(s))
        for scale, m in picks:
            for mn in _lattice(m, dmin, 0, K):
                off = -(dmin * mn)
                kept = keep_lower(kept, (_offset_loss(wg, hg, scale, off, maxq), scale, off))
        best.offer(*kept)
    return best.loss_g, best.scale, best.offset


def _asym(wg: Tensor, hg: Tensor, t: GGUFType, init: str) -> tuple[Tensor, Tensor]:
    maxq, subs, (K, _) = t.maxq, t.subs, scale_levels(t)
    lo = wg.amin(dim=1).clamp_max(0)
    mm_s = ((wg.amax(dim=1) - lo) / maxq).clamp_min(torch.finfo(torch.float16).tiny)
    mm = _minmax_asym(wg, hg, t, mm_s, -lo)
    if init == "minmax":
        return mm.scale, mm.offset
    if maxq in VALLEY_TARGET_MAXQ:
        s1, z1, _, _ = _multistart_points(wg, hg, maxq)
        s, z = _init_neuqi_grid(wg, hg, maxq, centres=(s1,), incumbent=(s1, z1))
    else:
        s, z = _init_neuqi_grid(wg, hg, maxq, max_ratio=1.5, refine="sweep", rounds=2)
    m = (s * z).clamp_min(0)
    s_max = s.view(-1, subs).amax(dim=1)
    m_max = m.view(-1, subs).amax(dim=1)
    dmins = [_per_group(_fp16(m_max * g / K), subs) for g in DMIN_FACTORS]
    best = mm
    for f in D_FACTORS:
        d = _per_group(_fp16_step(s_max * f / K), subs)
        best.offer(*_asym_pick(wg, hg, s, d, dmins, t, m))
    for _ in range(LS_ROUNDS):  # least squares on the super-block, then choose again
        d, dmin = _ls_asym(wg, hg, best.scale, best.offset, t)
        best.offer(*_asym_pick(wg, hg, s, d, [dmin], t, m))
        _local_asym(wg, hg, best, t)
    return best.scale, best.offset


def _local_asym(wg: Tensor, hg: Tensor, best: _Best, t: GGUFType) -> None:
    """Each sub-block's best integers within ±LOCAL of its current ``(k, m)`` for the
    super-block's current ``(d, dmin)``: the picks above only try the lattice steps
    around NeUQI's unconstrained step, and with the offset on a lattice too the best
    pair can lie a step or two away."""
    maxq, (K, _) = t.maxq, scale_levels(t)
    d, dmin = _factors(best.scale, best.offset, t)
    k0 = torch.round(best.scale / d)
    m0 = torch.where(dmin > 0, torch.round(-best.offset / dmin.clamp_min(1e-30)), torch.zeros_like(d))
    kept = (_offset_loss(wg, hg, best.scale, best.offset, maxq), best.scale, best.offset)
    for dk in range(-LOCAL, LOCAL + 1):
        scale = d * (k0 + dk).clamp(1, K)
        for dm in range(-LOCAL, LOCAL + 1):
            off = -(dmin * (m0 + dm).clamp(0, K))
            kept = keep_lower(kept, (_offset_loss(wg, hg, scale, off, maxq), scale, off))
    best.offer(*kept)


def _minmax_asym(wg, hg, t, s: Tensor, m: Tensor) -> _Best:
    """llama.cpp-style: ``d, dmin`` from the largest sub-block step and min, rounded."""
    subs, (K, _) = t.subs, scale_levels(t)
    d = _per_group(_fp16_step(s.view(-1, subs).amax(dim=1) / K), subs)
    dmin = _per_group(_fp16(m.view(-1, subs).amax(dim=1) / K), subs)
    scale = d * torch.round(s / d).clamp(1, K)
    mn = torch.where(dmin > 0, torch.round(m / dmin.clamp_min(1e-30)), torch.zeros_like(m))
    off = -(dmin * mn.clamp(0, K))
    best = _Best(wg.shape[0] // subs, subs, wg.device)
    best.offer(_offset_loss(wg, hg, scale, off, t.maxq), scale, off)
    return best


def _ls_asym(wg, hg, scale, offset, t) -> tuple[Tensor, Tensor]:
    """Least-squares ``(d, dmin)`` per super-block for the codes of the current
    parameters, keeping their integers: ``ŵ = d·(k q) − dmin·m``."""
    subs = t.subs
    d0, dmin0 = _factors(scale, offset, t)
    k = torch.round(scale / d0)
    mn = torch.where(dmin0 > 0, torch.round(-offset / dmin0.clamp_min(1e-30)), torch.zeros_like(scale))
    q = torch.clamp(torch.round((wg - offset[:, None]) / scale[:, None]), 0, t.maxq)
    a = k[:, None] * q  # ŵ = d·a − dmin·b
    b = mn[:, None].expand_as(a)

    def ssum(x: Tensor) -> Tensor:
        return _super_sum((hg * x).sum(dim=1), subs).double()

    aa, ab, bb, wa, wb = ssum(a * a), ssum(a * b), ssum(b * b), ssum(wg * a), ssum(wg * b)
    det = aa * bb - ab * ab
    ok = det > 1e-12 * aa * bb.clamp_min(1e-30)
    d = torch.where(ok, (wa * bb - wb * ab) / torch.where(ok, det, 1.0), wa / aa.clamp_min(1e-30))
    dmin = torch.where(ok, (wa * ab - wb * aa) / torch.where(ok, det, 1.0), 0.0)
    neg = dmin < 0  # mins are stored ≥ 0: fall back to the step alone
    d = torch.where(neg, wa / aa.clamp_min(1e-30), d)
    dmin = dmin.clamp_min(0)
    bad = ~torch.isfinite(d) | (d <= 0) | ~torch.isfinite(dmin)
    d = torch.where(bad, d0.view(-1, subs)[:, 0].double(), d)
    dmin = torch.where(bad, dmin0.view(-1, subs)[:, 0].double(), dmin)
    return _per_group(_fp16_step(d.float()), subs), _per_group(_fp16(dmin.float()), subs)


# ------------------------------------------------------------------- symmetric types
def _sym_pick(wg, hg, targets, d, t) -> tuple[Tensor, Tensor, Tensor]:
    """Each sub-block's best ``(step, zero)`` on the lattice of ``d: [G]``.

    ``targets``: the wanted step per zero (``c``, ``c − 1``); for each the two lattice
    steps around it.  Returns ``(loss, scale, zero)``.
    """
    c = t.centre
    kept = (torch.full_like(d, float("inf")), torch.ones_like(d), torch.full_like(d, float(c)))
    for zero, k_max, s in zip((c, c - 1), scale_levels(t), targets, strict=True):
        z = torch.full_like(d, float(zero))
        for k in _lattice(s, d, 1, k_max):
            kept = keep_lower(kept, (group_loss(wg, hg, d * k, z, t.maxq), d * k, z))
    return kept


def _sym(wg: Tensor, hg: Tensor, t: GGUFType, init: str) -> tuple[Tensor, Tensor]:
    maxq, c, subs = t.maxq, t.centre, t.subs
    k_pos, _ = scale_levels(t)
    # llama.cpp-style: the weight of largest magnitude on the long end of the grid.
    idx = wg.abs().argmax(dim=1, keepdim=True)
    big = torch.gather(wg, 1, idx).squeeze(1)
    mm_s = _fp16_step(big.abs() / c)
    mm_targets = [torch.where(big > 0, mm_s * c / (c - 1), mm_s), mm_s]  # zero c: top at (c−1)s
    best = _Best(wg.shape[0] // subs, subs, wg.device)
    d = _per_group(_fp16_step(mm_s.view(-1, subs).amax(dim=1) / k_pos), subs)
    loss, scale, zero = _sym_pick(wg, hg, mm_targets, d, t)
    best.offer(loss, scale, -scale * zero)
    if init == "minmax":
        return best.scale, best.offset
    swept, _ = integer_zero_sweep(wg, hg, maxq, (c, c - 1))
    targets = [torch.where(torch.isfinite(s) & (s > 0), s, mm_s) for s in swept.unbind(1)]
    want = torch.where(group_loss(wg, hg, targets[0], torch.full_like(mm_s, float(c)), maxq)
                       <= group_loss(wg, hg, targets[1], torch.full_like(mm_s, c - 1.0), maxq),
                       targets[0], targets[1])
    s_max = want.view(-1, subs).amax(dim=1)
    for f in D_FACTORS:
        d = _per_group(_fp16_step(s_max * f / k_pos), subs)
        loss, scale, zero = _sym_pick(wg, hg, targets, d, t)
        best.offer(loss, scale, -scale * zero)
    for _ in range(LS_ROUNDS):
        d = _ls_sym(wg, hg, best.scale, best.offset, t)
        loss, scale, zero = _sym_pick(wg, hg, targets, d, t)
        best.offer(loss, scale, -scale * zero)
    return best.scale, best.offset


def _ls_sym(wg, hg, scale, offset, t) -> Tensor:
    """Least-squares ``d`` per super-block for the current codes and integers."""
    subs = t.subs
    d0, _ = _factors(scale, offset, t)
    k = torch.round(scale / d0)
    z = torch.round(-offset / scale)
    c = torch.clamp(torch.round(wg / scale[:, None] + z[:, None]), 0, t.maxq) - z[:, None]
    a = k[:, None] * c
    num = _super_sum((hg * wg * a).sum(dim=1), subs).double()
    den = _super_sum((hg * a * a).sum(dim=1), subs).double()
    d = num / den.clamp_min(1e-30)
    d = torch.where(torch.isfinite(d) & (d > 0), d, d0.view(-1, subs)[:, 0].double())
    return _per_group(_fp16_step(d.float()), subs)


# ------------------------------------------------------------------------ the fields
def _factors(scale: Tensor, offset: Tensor, t: GGUFType) -> tuple[Tensor, Tensor]:
    """Per sub-block copies ``[G]`` of a super-block factorisation ``(d, dmin)``."""
    f = kquant_fields(QuantParams(scale[None], (-offset / scale)[None], offset[None]), t)
    return _per_group(f.d.reshape(-1), t.subs), _per_group(f.dmin.reshape(-1), t.subs)


@dataclass
class KQuantFields:
    """What a k-quant super-block stores, as float tensors of exact values.

    ``d, dmin: [out, n_super]`` fp16 values (``dmin`` zero for symmetric types);
    ``k: [out, n_groups]`` the signed integer sub-block scales (ggml's ``sc``, before
    Q3_K's +32 bias); ``m: [out, n_groups]`` the integer mins (0 when symmetric);
    ``flip: [out, n_groups]`` where codes are stored as ``maxq − q`` (negative ``k``).
    """

    d: Tensor
    dmin: Tensor
    k: Tensor
    m: Tensor
    flip: Tensor


def _factor_out(vals: Tensor, limit_for: Tensor, top: int, what: str, t: GGUFType) -> tuple[Tensor, Tensor]:
    """``vals: [R, subs] ≥ 0`` written as ``f·n`` with fp16 ``f`` and integers
    ``n ≤ limit_for``: tries ``n = 1..top`` for the largest value of each row."""
    vmax = vals.amax(dim=1)
    f = torch.zeros_like(vmax)
    found = vmax == 0
    for n in range(1, top + 1):
        cand = vmax / n
        ints = torch.round(vals / cand[:, None].clamp_min(1e-38))
        ok = (_fp16(cand) == cand) & ((cand[:, None] * ints) == vals).all(dim=1)
        ok &= (ints <= limit_for).all(dim=1)
        take = ok & ~found
        f = torch.where(take, cand, f)
        found |= take
        if bool(found.all()):
            break
    if not bool(found.all()):
        raise ValueError(f"{what} are not fp16 × integer lattices: not a {t.name} run; "
                         f"quantize with --gguf {t.name}")
    ints = torch.where(f[:, None] > 0, torch.round(vals / f[:, None].clamp_min(1e-38)), 0.0)
    return f, ints


def kquant_fields(params: QuantParams, t: GGUFType) -> KQuantFields:
    """The stored integers and fp16 factors of k-quant params ``[out, n_groups]``.

    Any factorisation that reproduces the steps and offsets exactly is as good as the
    one the search used (the file decodes to the same values); raises if there is
    none, i.e. the params were not chosen for ``t``.
    """
    if params.offset is None:
        raise ValueError(f"these parameters were not chosen for a GGUF type; quantize with --gguf {t.name}")
    scale, offset = params.scale.float(), params.offset.float()
    out, n_groups = scale.shape
    if n_groups % t.subs:
        raise ValueError(f"{n_groups} groups per row is not whole {t.name} super-blocks")
    if bool((scale <= 0).any()) or not bool(torch.isfinite(scale).all() & torch.isfinite(offset).all()):
        raise ValueError(f"steps must be positive and finite: not a {t.name} run")
    S = t.subs
    s = scale.reshape(-1, S)
    k_c, k_c1 = scale_levels(t)
    if t.asymmetric:
        m_vals = -offset.reshape(-1, S)
        if bool((m_vals < 0).any()):
            raise ValueError(f"{t.name} offsets must be ≤ 0: not a {t.name} run")
        d, k = _factor_out(s, torch.tensor(float(k_c)), k_c, "steps", t)
        dmin, m = _factor_out(m_vals, torch.tensor(float(k_c)), k_c, "mins", t)
        flip = torch.zeros_like(k, dtype=torch.bool)
    else:
        z = (-offset / scale).reshape(-1, S)
        c = float(t.centre)
        if not bool(((z == c) | (z == c - 1)).all()):
            raise ValueError(f"zero-points are not {t.centre}/{t.centre - 1}: not a {t.name} run")
        flip = z == c - 1
        limit = torch.where(flip, float(k_c1), float(k_c))
        d, k = _factor_out(s, limit, k_c1, "steps", t)
        k = torch.where(flip, -k, k)
        dmin, m = torch.zeros_like(d), torch.zeros_like(k)
    n_super = n_groups // S
    return KQuantFields(d.reshape(out, n_super), dmin.reshape(out, n_super),
                        k.reshape(out, n_groups), m.reshape(out, n_groups), flip.reshape(out, n_groups))


def kquant_params(w: Tensor, t: GGUFType, init: str = "neuqi", h_diag: Tensor | None = None) -> QuantParams:
    """Representable k-quant parameters for ``w: [out, in]`` (``in`` a multiple of 256).

    Returns ``QuantParams(scale, zero, offset)`` ``[out, in/t.block]`` in offset form.
    """
    out = w.shape[0]
    wg, hg, n_groups = to_groups(w, t.spec, h_diag)
    scale, offset = (_asym if t.asymmetric else _sym)(wg, hg, t, init)
    shape = (out, n_groups)
    return QuantParams(scale.reshape(shape), (-offset / scale).reshape(shape), offset.reshape(shape))
