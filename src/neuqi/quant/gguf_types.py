"""GGUF block types as parameter constraints: what llama.cpp can store, chosen by NeUQI.

Every llama.cpp block type is a uniform quantizer over blocks of 32 weights whose
parameters must themselves be representable:

* asymmetric ``Q4_1``/``Q5_1``: ``ŵ = d·q + m`` with ``d, m`` fp16 and ``q ∈ 0..maxq`` —
  NeUQI's ``s·(q − z)`` with ``m = −s·z``, a *float* offset per block;
* symmetric ``Q4_0``/``Q5_0``/``Q8_0``: ``ŵ = d·(q − c)`` with ``d`` fp16 of either
  sign and ``c = 2^(bits−1)`` fixed.  With ``s = |d|`` and codes 0..maxq that is a fixed
  zero ``z ∈ {c, c − 1}`` (the sign of ``d`` picks which end of the grid is longer).

So a type is a group size of 32 plus a rule for the parameters.  The k-quants
(``Q2_K`` … ``Q6_K``, :mod:`neuqi.quant.kquants`) group 16 or 32 weights into
super-blocks of 256 whose sub-block steps and mins are small integers times fp16
super-block factors; the solvers see their sub-blocks as groups.  The parameters
are returned in *offset form* — ``scale`` and ``offset`` per (row, block), with
``ŵ = scale·q + offset`` bit-exactly what llama.cpp's dequantizer computes — and a
``zero = −offset/scale`` for the solvers' rounding.

Pure tensor math: no file I/O (the writer lives in ``neuqi.formats.export.gguf``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from neuqi.quant.grid import QuantParams, QuantSpec, check_weight
from neuqi.quant.init import _init_neuqi_grid, best_zero, fixed_zero_search, group_loss, slice_rows, to_groups

GGUF_BLOCK = 32


@dataclass(frozen=True)
class GGUFType:
    """One llama.cpp block type: ``bits`` per code over blocks of ``block`` weights.

    ``asymmetric``: a free fp16 offset per block; otherwise the grid is centred at
    ``2^(bits−1)`` and only the (signed) fp16 step is free.
    """

    name: str
    bits: int
    asymmetric: bool
    block: int = GGUF_BLOCK
    super_block: int = 0  # k-quants: 256 weights share the fp16 factors d (and dmin)
    scale_bits: int = 0  # k-quants: bits of each sub-block's integer step (and min)

    @property
    def is_kquant(self) -> bool:
        return self.super_block > 0

    @property
    def row_block(self) -> int:
        """What a row length must be a multiple of."""
        return self.super_block or self.block

    @property
    def subs(self) -> int:
        """Sub-blocks (groups) per super-block; 1 for the block-32 types."""
        return self.super_block // self.block if self.is_kquant else 1

    @property
    def maxq(self) -> int:
        return (1 << self.bits) - 1

    @property
    def centre(self) -> int:
        return 1 << (self.bits - 1)

    @property
    def spec(self) -> QuantSpec:
        return QuantSpec(self.bits, self.block)

    def fits(self, n_in: int) -> bool:
        return n_in > 0 and n_in % self.row_block == 0

    def check_row_length(self, n_in: int, what: str = "weight") -> None:
        if not self.fits(n_in):
            raise ValueError(
                f"{what} has {n_in} inputs per row; {self.name} needs a multiple of {self.row_block}"
            )


GGUF_TYPES: dict[str, GGUFType] = {
    t.name: t
    for t in (
        GGUFType("Q4_0", 4, asymmetric=False),
        GGUFType("Q4_1", 4, asymmetric=True),
        GGUFType("Q5_0", 5, asymmetric=False),
        GGUFType("Q5_1", 5, asymmetric=True),
        GGUFType("Q8_0", 8, asymmetric=False),
        # ggml-common.h: Q2_K 16×16 (4-bit scale and min), Q3_K 16×16 (6-bit signed
        # scale), Q4_K/Q5_K 8×32 (6-bit scale and min), Q6_K 16×16 (int8 scale).
        GGUFType("Q2_K", 2, asymmetric=True, block=16, super_block=256, scale_bits=4),
        GGUFType("Q3_K", 3, asymmetric=False, block=16, super_block=256, scale_bits=6),
        GGUFType("Q4_K", 4, asymmetric=True, block=32, super_block=256, scale_bits=6),
        GGUFType("Q5_K", 5, asymmetric=True, block=32, super_block=256, scale_bits=6),
        GGUFType("Q6_K", 6, asymmetric=False, block=16, super_block=256, scale_bits=8),
    )
}
BLOCK32_TYPES: tuple[str, ...] = tuple(n for n, t in GGUF_TYPES.items() if not t.is_kquant)
KQUANT_TYPES: tuple[str, ...] = tuple(n for n, t in GGUF_TYPES.items() if t.is_kquant)
# Where a row length is not a multiple of 256, llama-quantize (llama-quant.cpp of
# llama-cpp-python 0.3.36) falls back to these block-32 types (older llama.cpp took the
# non-uniform IQ4_NL for Q2_K/Q3_K; Q4_0 has its size).
KQUANT_FALLBACK: dict[str, str] = {"Q2_K": "Q4_0", "Q3_K": "Q4_0", "Q4_K": "Q5_0",
                                   "Q5_K": "Q5_1", "Q6_K": "Q8_0"}


def type_for_row(t: GGUFType, n_in: int) -> GGUFType:
    """``t``, or its block-32 fallback where a row of ``n_in`` inputs cannot take it."""
    if t.fits(n_in):
        return t
    fb = GGUF_TYPES[KQUANT_FALLBACK[t.name]] if t.is_kquant else t
    fb.check_row_length(n_in)
    return fb
GGUF_INITS: tuple[str, ...] = ("neuqi", "minmax")


def gguf_type(name: str) -> GGUFType:
    """The type named ``name`` (case-insensitive); a clear error lists the valid ones."""
    key = name.strip().upper()
    if key not in GGUF_TYPES:
        raise ValueError(f"unknown GGUF type {name!r}; choose one of {', '.join(GGUF_TYPES)}")
    return GGUF_TYPES[key]


def _fp16(t: Tensor) -> Tensor:
    """Round to fp16 and back, staying finite (saturate at the largest fp16)."""
    big = torch.finfo(torch.float16).max
    return t.clamp(-big, big).to(torch.float16).float()


def _fp16_step(s: Tensor) -> Tensor:
    """A positive fp16 step (≥ the smallest normal) nearest to ``s``."""
    return _fp16(s.clamp_min(torch.finfo(torch.float16).tiny))


def _neighbours16(s: Tensor, signed: bool = False) -> list[Tensor]:
    """``s`` (fp16-valued) and its fp16 neighbours below and above.

    Steps (``signed=False``) stay positive; offsets (``signed=True``) may cross zero.
    """
    h = s.to(torch.float16)
    inf = torch.tensor(float("inf"), dtype=torch.float16, device=s.device)
    down = torch.nextafter(h, -inf if signed else torch.zeros_like(h)).float()
    up = torch.nextafter(h, inf).float()
    ok_down = torch.isfinite(down) if signed else down > 0
    return [s, torch.where(ok_down, down, s), torch.where(torch.isfinite(up), up, s)]


def keep_lower(best: tuple[Tensor, ...], cand: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    """Elementwise ``cand`` where its loss (the first entry) is below ``best``'s: the
    step of every search here that keeps, per group, the best candidate so far."""
    better = cand[0] < best[0]
    return tuple(torch.where(better, c, b) for c, b in zip(cand, best, strict=True))


def _offset_loss(wg: Tensor, hg: Tensor, scale: Tensor, offset: Tensor, maxq: int) -> Tensor:
    """``Σ h (w − (s·q + m))²`` per block row with RTN codes, in offset form."""
    s, m = scale[:, None], offset[:, None]
    q = torch.clamp(torch.round((wg - m) / s), 0, maxq)
    return (hg * (wg - (s * q + m)) ** 2).sum(dim=1)


def _asymmetric(wg: Tensor, hg: Tensor, t: GGUFType, init: str) -> tuple[Tensor, Tensor]:
    maxq = t.maxq
    if init == "minmax":  # llama.cpp's reference: the block's own min and max
        lo, hi = wg.amin(dim=1), wg.amax(dim=1)
        d = _fp16_step((hi - lo) / maxq)
        return d, _fp16(lo)
    # Scales up to 1.5x min-max: on heavy-tailed 32-weight blocks the best grid is
    # sometimes wider than the block's range (measured on Q5_1: 1.25x missed 17 %).
    # The exact-scale refinement: on 32-weight blocks it lands a little nearer the
    # dense optimum than the least-squares one (Q5_1 mean ratio 1.0028 vs 1.0031).
    s, _ = _init_neuqi_grid(wg, hg, maxq, max_ratio=1.5, refine="sweep", rounds=2)
    best_d = best_m = best_l = None
    # The step as stored (and its fp16 neighbours), each with its exact best offset
    # rounded to fp16: the stored parameters are chosen, not just rounded.
    # The exact best offset lies between fp16 values: try the nearest and its neighbours.
    for d in _neighbours16(_fp16_step(s)):
        z, _ = best_zero(wg / d[:, None], hg, maxq)
        for m in _neighbours16(_fp16(-d * z), signed=True):
            loss = _offset_loss(wg, hg, d, m, maxq)
            if best_l is None:
                best_d, best_m, best_l = d, m, loss
            else:
                better = loss < best_l
                best_d = torch.where(better, d, best_d)
                best_m = torch.where(better, m, best_m)
                best_l = torch.where(better, loss, best_l)
    # Never worse than llama.cpp's own min-max choice.
    mm_d, mm_m = _asymmetric(wg, hg, t, "minmax")
    better = _offset_loss(wg, hg, mm_d, mm_m, maxq) < best_l
    return torch.where(better, mm_d, best_d), torch.where(better, mm_m, best_m)


# The exact best step walks every code boundary of every candidate zero: n·maxq
# events per group.  At 8 bits (Q8_0) that is ~23 s per 576 x 1536 linear here, and
# the grid's error is already ~1/16 of a 4-bit one: Q8_0 takes the cheap search
# below (~175x faster).  Measured on heavy-tailed blocks with cubic diag(H) weights
# (tests/quant/test_gguf_types.py checks it is never worse than min-max):
# mean error 0.90 of min-max's, where the exact step reaches 0.64 — at 8 bits the
# loss is jagged in the step and its best lies at resonances a local search misses.
EXACT_SWEEP_MAXQ = 31
LLOYD_ITERS = 6
LLOYD_RATIOS = tuple(0.9 ** i for i in range(1, 25))  # down to 0.08 of min-max


def _fixed_zero_lloyd(
    wg: Tensor, hg: Tensor, s0: Tensor, zeros: Tensor, maxq: int, iters: int = LLOYD_ITERS
) -> tuple[Tensor, Tensor]:
    """Best ``(step, zero)`` over the candidate ``zeros: [G, Z]``: for each zero the best
    of a geometric grid of steps below ``s0: [G]`` (the weighted objective often clips
    a block's rare large weights), then alternating codes and the least-squares step
    ``Σh·w·(q−z) / Σh·(q−z)²`` (each step never raises the loss)."""
    best = None
    for j in range(zeros.shape[1]):
        z = zeros[:, j]
        s, loss = s0, group_loss(wg, hg, s0, z, maxq)
        for r in LLOYD_RATIOS:
            cand = s0 * r
            cl = group_loss(wg, hg, cand, z, maxq)
            s, loss = torch.where(cl < loss, cand, s), torch.minimum(cl, loss)
        for _ in range(iters):
            c = torch.clamp(torch.round(wg / s[:, None] + z[:, None]), 0, maxq) - z[:, None]
            num, den = (hg * wg * c).sum(dim=1), (hg * c * c).sum(dim=1)
            new = num / den.clamp_min(1e-30)
            s = torch.where((den > 0) & (new > 0) & torch.isfinite(new), new, s)
        cand = (group_loss(wg, hg, s, z, maxq), s, z)
        best = cand if best is None else keep_lower(best, cand)
    return best[1], best[2]


def _symmetric(wg: Tensor, hg: Tensor, t: GGUFType, init: str) -> tuple[Tensor, Tensor]:
    """Step ``s > 0`` and fixed zero ``z ∈ {c, c−1}`` per block."""
    maxq, c = t.maxq, t.centre
    G = wg.shape[0]
    # llama.cpp's reference: the weight of largest magnitude lands on the long end.
    idx = wg.abs().argmax(dim=1, keepdim=True)
    big = torch.gather(wg, 1, idx).squeeze(1)
    if t.bits == 8:  # Q8_0: d = amax/127, codes −127..127 (centre 128)
        mm_s, mm_z = _fp16_step(big.abs() / (c - 1)), torch.full_like(big, float(c))
    else:  # Q4_0/Q5_0: d = max/−c
        mm_s = _fp16_step(big.abs() / c)
        mm_z = torch.where(big > 0, torch.full_like(big, c - 1.0), torch.full_like(big, float(c)))
    if init == "minmax":
        return mm_s, mm_z
    zeros = torch.tensor([float(c), c - 1.0], device=wg.device).expand(G, 2).contiguous()
    if maxq > EXACT_SWEEP_MAXQ:
        s, z = _fixed_zero_lloyd(wg, hg, mm_s, zeros, maxq)
    else:
        s, z = fixed_zero_search(wg, hg, maxq, zeros, mm_s)
    ok = torch.isfinite(s) & (s > 0)
    s = torch.where(ok, s, mm_s)
    z = torch.where(ok, z, mm_z)
    best_s, best_l = None, None
    for cand in _neighbours16(_fp16_step(s)):
        loss = group_loss(wg, hg, cand, z, maxq)
        if best_l is None:
            best_s, best_l = cand, loss
        else:
            better = loss < best_l
            best_s, best_l = torch.where(better, cand, best_s), torch.where(better, loss, best_l)
    better = group_loss(wg, hg, mm_s, mm_z, maxq) < best_l
    return torch.where(better, mm_s, best_s), torch.where(better, mm_z, z)


def gguf_params(
    w: Tensor, t: GGUFType, init: str = "neuqi", h_diag: Tensor | None = None
) -> QuantParams:
    """Representable parameters of type ``t`` for ``w: [out, in]`` (``in`` a multiple of 32).

    ``init="neuqi"`` minimises ``Σ h (w − ŵ)²`` per block over what the type stores:
    for asymmetric types NeUQI's (scale, float zero), then the exact best offset for
    the fp16 step (and its fp16 neighbours), rounded to fp16; for symmetric types the
    exact best step for each of the two zeros, rounded to fp16 (and neighbours).
    Min-max (llama.cpp's reference choice) is kept where it is better.
    ``init="minmax"`` is llama.cpp's reference choice itself.  Returns
    ``QuantParams(scale, zero, offset)`` ``[out, n_blocks]`` with
    ``scale·q + offset`` exactly the stored block's values.
    """
    check_weight(w)
    if init not in GGUF_INITS:
        raise ValueError(f"GGUF types take init {GGUF_INITS}, got {init!r}")
    t.check_row_length(w.shape[1])
    rows = slice_rows(w)  # rows are independent; slices keep temporaries small (slice_rows)
    if rows >= w.shape[0]:
        return _rows_params(w, t, init, h_diag)
    parts = [_rows_params(w[a : a + rows], t, init, h_diag) for a in range(0, w.shape[0], rows)]
    return QuantParams(*(torch.cat([getattr(p, f) for p in parts]) for f in ("scale", "zero", "offset")))


def _rows_params(w: Tensor, t: GGUFType, init: str, h_diag: Tensor | None) -> QuantParams:
    """:func:`gguf_params` for the (checked) rows ``w: [rows, in]``."""
    if t.is_kquant:
        from neuqi.quant.kquants import kquant_params

        return kquant_params(w, t, init, h_diag)
    out = w.shape[0]
    wg, hg, n_blocks = to_groups(w, t.spec, h_diag)
    if t.asymmetric:
        scale, offset = _asymmetric(wg, hg, t, init)
    else:
        scale, z = _symmetric(wg, hg, t, init)
        offset = -scale * z  # exact: z is a small integer, scale an fp16 value
    zero = -offset / scale
    shape = (out, n_blocks)
    return QuantParams(scale.reshape(shape), zero.reshape(shape), offset.reshape(shape))


def block_fields(params: QuantParams, t: GGUFType) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """What a block stores: ``(d, m, flip)`` as fp16-valued float tensors ``[out, n_blocks]``.

    For asymmetric types ``flip`` is None; for symmetric ones ``m`` is None and ``flip``
    marks blocks whose codes are stored
    as ``maxq − q`` under a negative ``d`` (zero ``c − 1``).  Raises if the params are
    not representable in ``t`` (a run quantized for another type).
    """
    if params.offset is None:
        raise ValueError(f"these parameters were not chosen for a GGUF type; quantize with --gguf {t.name}")
    if t.is_kquant:
        raise ValueError(f"{t.name} stores super-block fields: use neuqi.quant.kquants.kquant_fields")
    d = params.scale.float()
    if not torch.equal(_fp16(d), d) or bool((d <= 0).any()):
        raise ValueError(f"scales are not positive fp16 values: not a {t.name} run")
    if t.asymmetric:
        m = params.offset.float()
        if not torch.equal(_fp16(m), m):
            raise ValueError(f"offsets are not fp16 values: not a {t.name} run")
        return d, m, None
    z = -params.offset.float() / d
    c = float(t.centre)
    if not bool(((z == c) | (z == c - 1)).all()):
        raise ValueError(f"zero-points are not {t.centre}/{t.centre - 1}: not a {t.name} run")
    flip = z == c - 1
    return torch.where(flip, -d, d), None, flip
