"""Choosing the scale and zero-point of every (row, group): min-max, MSE-clip, NeUQI.

NeUQI minimises ``L(s, z) = Σ_j h_j (w_j − s(q_j − z))²`` per group, with ``h`` the
diagonal of ``H = X Xᵀ``.  For a fixed scale the best float zero-point is found
exactly (:func:`best_zero`), which turns the 2-D search into a 1-D search over the
scale.  Everything is batched over all groups of a layer: the only Python loops
are over candidate scales.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
from typing import Literal

import torch
from torch import Tensor

from neuqi.memory import release_freed_memory
from neuqi.quant.grid import QuantParams, QuantSpec, check_finite, check_weight

log = logging.getLogger(__name__)

InitMethod = Literal["minmax", "neuqi", "neuqi_int", "mse"]
INIT_METHODS: tuple[str, ...] = ("minmax", "neuqi", "neuqi_int", "mse")

# Reference grid sizes (NEUQI_NOTES "Scale search").
NEUQI_COARSE = 64
NEUQI_FINE = 2048
# The reference never tries scales above s₀; with uneven importances the optimum
# is sometimes above it (measured: mean excess 0.6-1% over a dense search at 3-4
# bit), so the coarse grid runs on to 1.25·s₀.
NEUQI_MAX_RATIO = 1.25
# Under a clip bound the alternation of exact scale and exact zero ends more often
# on a constraint's edge; more rounds (cheap: one sweep each) bring it back near
# the constrained optimum.
CLIP_REFINE_ROUNDS = 6
# Events handled per chunk of groups in the sweep: small chunks stay in CPU cache
# (measured 3.5x faster than 4M on 2 cores); a GPU wants large launches.
_CHUNK_ELEMENTS = {"cpu": 1 << 18, "cuda": 1 << 24}
# The chunks' freed temporaries fragment glibc's heap (see neuqi.memory): one
# linear of Qwen2.5-0.5B's MLP grew the RSS by ~0.8 GB.  Trimming every this many
# chunks on the CPU keeps it near one chunk's working set.
_TRIM_EVERY = 32


def _trim(i: int, device: torch.device) -> None:
    if device.type == "cpu" and i % _TRIM_EVERY == _TRIM_EVERY - 1:
        release_freed_memory()


# ----------------------------------------------------------------------------- groups
def to_groups(
    w: Tensor, spec: QuantSpec, h_diag: Tensor | None
) -> tuple[Tensor, Tensor, int]:
    """Reshape ``w: [out, in]`` to ``[out·n_groups, g]`` rows, one group per row.

    A partial last group is padded by repeating its first element with weight 0,
    so padding changes neither the group's range nor its objective.  Returns
    ``(wg, hg, n_groups)``; ``hg`` has uniform weights where a group's ``h`` sums
    to zero (a dead group must still be quantized sensibly).
    """
    out, n_in = w.shape
    g = spec.group_len(n_in)
    n_groups = spec.n_groups(n_in)
    pad = n_groups * g - n_in
    h = torch.ones(n_in, device=w.device) if h_diag is None else h_diag.float().to(w.device)
    h = h.clamp_min(0)
    valid = torch.ones(n_in, device=w.device)
    wf = w.float()
    if pad:
        first = wf[:, (n_groups - 1) * g : (n_groups - 1) * g + 1].expand(out, pad)
        wf = torch.cat([wf, first], dim=1)
        h = torch.cat([h, h.new_zeros(pad)])
        valid = torch.cat([valid, valid.new_zeros(pad)])
    wg = wf.reshape(out * n_groups, g)
    hg = h.reshape(n_groups, g).expand(out, n_groups, g).reshape(out * n_groups, g)
    vg = valid.reshape(n_groups, g).expand(out, n_groups, g).reshape(out * n_groups, g)
    dead = hg.sum(dim=1, keepdim=True) <= 0
    hg = torch.where(dead, vg, hg)
    return wg, hg, n_groups


def group_loss(wg: Tensor, hg: Tensor, scale: Tensor, zero: Tensor, maxq: int) -> Tensor:
    """``Σ_j h_j (w_j − ŵ_j)²`` per group row for per-row ``scale, zero: [G]``."""
    s = scale[:, None]
    q = torch.clamp(torch.round(wg / s + zero[:, None]), 0, maxq)
    return (hg * (wg - s * (q - zero[:, None])) ** 2).sum(dim=1)


def minmax_scale(wg: Tensor, maxq: int) -> Tensor:
    """``s₀ = (max − min) / maxq`` per group; 1 where the range is below 1e-9."""
    rng = wg.amax(dim=1) - wg.amin(dim=1)
    return torch.where(rng < 1e-9, torch.ones_like(rng), rng / maxq)


# -------------------------------------------------------------------- best zero-point
_COMPILED: dict[str, object] = {}


# One compiled call at a time: :func:`warm_up` compiles in a background thread, and a
# caller that reaches a kernel first waits for it rather than compiling it twice.
_COMPILE_LOCK = threading.RLock()


def _compiled(fn):
    """``fn`` compiled once per process by ``torch.compile`` when possible.

    Fusing the sweeps' elementwise passes is ~4x faster on CPU (measured on 55k
    groups of 64); ``NEUQI_COMPILE=0`` or a failing compiler falls back to eager.
    """
    if os.environ.get("NEUQI_COMPILE", "1") == "0":
        return fn
    if fn.__name__ not in _COMPILED:
        try:
            _COMPILED[fn.__name__] = torch.compile(fn, dynamic=True)
        except Exception as exc:  # pragma: no cover - depends on the toolchain
            log.warning("torch.compile unavailable (%s); using eager sweeps", exc)
            _COMPILED[fn.__name__] = fn
    return _COMPILED[fn.__name__]


def _own_rows(x: Tensor, double: bool) -> Tensor:
    """``x`` as a tensor of its own (``detach``: no copy, no view to guard on), its one
    row twice if ``double``."""
    if double and x.dim() and x.shape[0] == 1:
        return torch.cat([x, x])
    return x.detach() if x._base is not None else x


def _run_sweep(fn, *args):
    """``fn(*args)``, compiled (:func:`_compiled`) unless compilation is off or fails.

    The compiled kernel specialises, and would compile again, on a dimension of size 1
    and on how a view relates to its base (a layer's last, shorter chunk).  So it gets
    no views (:func:`_own_rows`), and a chunk of one group runs as two, the results cut
    back.  The first argument is the chunk of groups; when it has one row, so has every
    other batched argument, and no shared one does (bits ≥ 2)."""
    # Grad mode off whoever calls: it is thread-local and part of what a compiled kernel
    # guards on, so the warm-up thread (grad on) and the run (under no_grad) would
    # otherwise each compile every kernel once.  The searches never need gradients.
    with _COMPILE_LOCK, torch.no_grad():
        compiled = _compiled(fn)
        if compiled is fn:
            return fn(*args)
        single = isinstance(args[0], Tensor) and args[0].shape[0] == 1
        args = tuple(_own_rows(a, single) if isinstance(a, Tensor) else a for a in args)
        try:
            out = compiled(*args)
        except Exception as exc:  # pragma: no cover - depends on the toolchain
            log.warning("compiled sweep failed (%s); falling back to eager", exc)
            _COMPILED[fn.__name__] = fn
            out = fn(*args)
    if not single:
        return out
    return out[:1] if isinstance(out, Tensor) else tuple(o[:1] for o in out)


def _sweep_windows(u: Tensor, h: Tensor, maxq: int) -> tuple[Tensor, Tensor]:
    """Where :func:`_zero_sweep` must look: ``(start, windows)``, each ``[G]``.

    The sweep's bracket ``[−ū, maxq − ū]`` holds every minimiser.  A shorter
    interval holds one too: with ``a = −min u`` and ``b = maxq − max u``, any ``z ≤ b − 1``
    can move to ``z + 1`` and any ``z ≥ a + 1`` to ``z − 1`` without a higher loss (an
    element's rounding error repeats with period 1 while it clamps at neither end, and
    a clamped element only comes nearer the grid).  So a minimiser lies in
    ``[min(a, b) − 1, max(a, b) + 1]``, of width ``|range/s − maxq| + 2``, and in the
    bracket.  Near the min-max scale that is 2–4 unit windows whatever the bit width,
    where the bracket is ``maxq`` of them.  ``windows`` counts whole unit windows.
    """
    ud, hd = u.double(), h.double()
    u_bar = (hd * ud).sum(1) / hd.sum(1)
    a, b = -ud.amin(1), maxq - ud.amax(1)
    start = torch.maximum(-u_bar, torch.minimum(a, b) - 1)
    end = torch.minimum(maxq - u_bar, torch.maximum(a, b) + 1)
    windows = torch.ceil(end - start).clamp(1, maxq).long()
    return start, windows


def _chunked(
    u: Tensor, h: Tensor, maxq: int, z_range: tuple[Tensor, Tensor] | None = None, fit: bool = False,
    around: Tensor | None = None, bins: int | None = None,
) -> tuple[Tensor, ...]:
    """Run the sweep over chunks of groups sized to the device (bounded memory).

    Without a zero range the groups are split by how many unit windows their
    sweep needs (:func:`_sweep_windows`): one or two sizes for a candidate scale
    shared by a layer's groups, each run with windows of that size only.
    ``fit``: run :func:`_fit_sweep_chunk` instead of the best-zero sweep; with
    ``around: [G]`` (zeros), over the ``FIT_AROUND_WINDOWS`` unit windows centred there only;
    with ``bins``, :func:`_fit_binned_chunk` with that many bins per window."""
    G, n = u.shape
    budget = _CHUNK_ELEMENTS.get(u.device.type, 1 << 20)
    outs = [torch.empty(G, dtype=u.dtype, device=u.device) for _ in range(3 if fit else 2)]
    sizes = [maxq]
    if around is not None:
        start, sizes = around.double() - FIT_AROUND_WINDOWS / 2, [FIT_AROUND_WINDOWS]
    elif z_range is None:
        start, windows = _sweep_windows(u, h, maxq)
        counts = torch.bincount(windows, minlength=maxq + 1).tolist()
        sizes = [w for w, c in enumerate(counts) if c]
        # One size for all unless splitting saves a quarter of the events (a
        # split gathers its groups into new tensors).
        if sum(w * c for w, c in enumerate(counts)) > 0.75 * G * sizes[-1]:
            sizes = sizes[-1:]
    i = 0
    for size in sizes:
        idx = None if len(sizes) == 1 else torch.nonzero(windows == size, as_tuple=True)[0]
        n_sel = G if idx is None else idx.numel()
        # At least two windows (a wider sweep is as exact): a size-1 dimension would
        # make the compiled kernel specialise and compile again.
        m = torch.arange(max(size, min(2, maxq)), device=u.device, dtype=torch.float64)
        chunk = max(1, budget // (n * size))
        for lo in range(0, n_sel, chunk):
            part = slice(lo, lo + chunk) if idx is None else idx[lo : lo + chunk]
            if fit and bins:
                res = _run_sweep(_fit_binned_chunk, u[part], h[part], maxq, start[part], m, bins)
            elif fit:
                res = _run_sweep(_fit_sweep_chunk, u[part], h[part], maxq, start[part], m)
            elif z_range is None:
                res = _run_sweep(_best_zero_chunk, u[part], h[part], maxq, start[part], m)
            else:
                res = _run_sweep(_best_zero_in_range_chunk, u[part], h[part], maxq, m,
                                 z_range[0][part], z_range[1][part])
            for out, r in zip(outs, res, strict=True):
                out[part] = r
            _trim(i, u.device)
            i += 1
    return tuple(outs)


def best_zero(
    u: Tensor, h: Tensor, maxq: int, z_range: tuple[Tensor, Tensor] | None = None
) -> tuple[Tensor, Tensor]:
    """Exact ``argmin_z Σ_j h_j (u_j + z − clamp(round(u_j + z), 0, maxq))²``.

    ``u, h: [G, n]`` (``u = w / s``; ``h ≥ 0``, not all zero per row).  Returns
    ``(z, loss)``, both ``[G]``, with the loss in units of ``s²``.  ``z_range``
    (``(z_lo, z_hi)``, each ``[G]``, non-empty) restricts the zero to an interval.

    As ``z`` grows, code ``q_j`` steps from ``k`` to ``k+1`` at ``z = k + ½ − u_j``;
    between breakpoints every ``q_j`` is fixed and ``L(z) = A z² + 2Bz + C`` with
    ``A = Σh``, ``B = Σh(u − q)``, ``C = Σh(u − q)²``.  Every kink is concave (B drops),
    so the minimum is a stationary point ``z* = Σh(q − u)/Σh``; as ``0 ≤ q ≤ maxq``
    it lies in ``[−ū, maxq − ū]`` (``ū`` the h-weighted mean of u).  That bracket is
    ``maxq`` unit windows, and inside every unit window the breakpoints come in the
    same order (by ``frac(½ − u_j − a)``), so one sort of ``n`` offsets per group
    orders all events; prefix sums of the changes of B and C give every piece and
    the lowest clamped stationary point wins.  Only the few windows of
    :func:`_sweep_windows` are visited (a minimiser is proved to lie there), so a
    sweep near the min-max scale costs O(n log n + 3n) at any bit width; far from
    it, up to O(n·maxq).  Exact.

    Restricted to an interval, each piece clamps its stationary point into the
    interval too; outside the bracket ``L`` is monotone (every piece's stationary
    point lies inside it), so an interval that misses the bracket has its best at
    the end nearer to it, and the interval's ends are tried as candidates.
    """
    return _chunked(u, h, maxq, z_range)


def _best_zero_chunk(u: Tensor, h: Tensor, maxq: int, start: Tensor, m: Tensor) -> tuple[Tensor, Tensor]:
    """The sweep of :func:`best_zero` on one chunk of groups, over the unit windows
    ``start + m`` (``start: [G]``, ``m = 0..W−1``; see :func:`_sweep_windows`)."""
    return _zero_sweep(u, h, maxq, start, m, None, None)


def _best_zero_in_range_chunk(
    u: Tensor, h: Tensor, maxq: int, m: Tensor, z_lo: Tensor, z_hi: Tensor
) -> tuple[Tensor, Tensor]:
    """The sweep of :func:`best_zero` with the zero restricted to ``[z_lo, z_hi]``
    (over the whole bracket: ``m = 0..maxq−1``)."""
    return _zero_sweep(u, h, maxq, None, m, z_lo, z_hi)


def _zero_sweep(
    u: Tensor, h: Tensor, maxq: int, start: Tensor | None, m: Tensor,
    z_lo: Tensor | None, z_hi: Tensor | None,
) -> tuple[Tensor, Tensor]:
    # float64: the prefix sums of B and C cancel badly in float32.
    ud = u.double()
    hd = h.double()
    G = ud.shape[0]
    windows = m.shape[0]
    a_sum = hd.sum(dim=1, keepdim=True)  # A = Σh, [G, 1]
    # The bracket's start −ū, or the caller's (a shorter window set's) start.
    lo_z = -(hd * ud).sum(dim=1, keepdim=True) / a_sum if start is None else start.double()[:, None]

    # Offset of every element's breakpoint inside a unit window, and its code there.
    r = 0.5 - ud - lo_z
    t = r - torch.floor(r)  # in [0, 1)
    k0 = -torch.floor(r)  # code index of the first breakpoint at or after a
    t, order = torch.sort(t, dim=1)
    hs = torch.gather(hd, 1, order)
    us = torch.gather(ud, 1, order)
    k0 = torch.gather(k0, 1, order)

    m = m[None, :, None]
    k = k0[:, None, :] + m  # [G, windows, n]
    valid = (k >= 0) & (k <= maxq - 1)
    d_b = torch.where(valid, -hs[:, None, :], 0.0).reshape(G, -1)
    d_c = torch.where(valid, hs[:, None, :] * (2 * k + 1 - 2 * us[:, None, :]), 0.0)
    pos = (lo_z[:, :, None] + m + t[:, None, :]).reshape(G, -1)

    # State just left of a: q_j = number of breakpoints strictly below a.
    q0 = torch.clamp(k0, 0, maxq)
    e0 = us - q0
    b0 = (hs * e0).sum(dim=1, keepdim=True)
    c0 = (hs * e0 * e0).sum(dim=1, keepdim=True)
    b = torch.cat([b0, b0 + torch.cumsum(d_b, dim=1)], dim=1)  # [G, M+1]
    c = torch.cat([c0, c0 + torch.cumsum(d_c.reshape(G, -1), dim=1)], dim=1)
    lo = torch.cat([lo_z, pos], dim=1)
    hi = torch.cat([pos, lo_z + windows], dim=1)
    if z_lo is not None and z_hi is not None:
        zl, zh = z_lo.double()[:, None], z_hi.double()[:, None]
        lo, hi = torch.maximum(lo, zl), torch.minimum(hi, zh)
        z = torch.minimum(torch.maximum(-b / a_sum, lo), hi)
        loss = torch.where(lo <= hi, a_sum * z * z + 2 * b * z + c, torch.inf)
        # The interval's ends: its best where it misses the bracket.
        z = torch.cat([z, zl, zh], dim=1)
        ends = torch.cat([zl, zh], dim=1)
        q_ends = torch.clamp(torch.round(ud[:, None, :] + ends[:, :, None]), 0, maxq)
        loss_ends = (hd[:, None, :] * (ud[:, None, :] + ends[:, :, None] - q_ends) ** 2).sum(dim=2)
        loss = torch.cat([loss, loss_ends], dim=1)
    else:
        z = torch.clamp(-b / a_sum, lo, hi)
        loss = a_sum * z * z + 2 * b * z + c
    best = loss.argmin(dim=1, keepdim=True)
    z_best = torch.gather(z, 1, best)
    # Re-evaluate directly: the prefix-sum value may carry rounding error.
    q = torch.clamp(torch.round(ud + z_best), 0, maxq)
    exact = (hd * (ud + z_best - q) ** 2).sum(dim=1)
    return z_best.squeeze(1).to(u.dtype), exact.to(u.dtype)


# ---------------------------------------------------------- code patterns, each fitted
def _fit_sweep_chunk(
    u: Tensor, h: Tensor, maxq: int, start: Tensor, m: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """The zero sweep of :func:`best_zero` (same events, same windows), scoring every
    piece's code pattern by its own least-squares grid instead of by this scale.

    Between two events every code ``q_j`` is fixed; the best grid for those codes is
    the weighted regression ``u ≈ a·q + b`` (``a`` a new scale in units of this one),
    whose residual ``Σh(u − ū)² − cov(u, q)²/var(q)`` (all h-weighted) follows from
    prefix sums of ``Σhq``, ``Σhq²`` and ``Σhuq``, one more than the zero sweep keeps.
    Returns ``(a, b, residual)`` of the best pattern with ``a > 0`` (residual inf
    where no piece has two distinct codes), each ``[G]``, the residual in units of s².
    """
    # float32 throughout (half the memory traffic of float64, twice the SIMD width):
    # codes and weights are centred first, so the prefix sums hold small numbers and
    # the variance and covariance cancel little.  A residual that is a little off can
    # only pick a slightly worse pattern: the caller re-rounds every pick and scores it
    # exactly.
    hf, us, n_h, u_bar, t, k0 = _fit_offsets(u, h, start)
    _, order = torch.sort(t, dim=1)
    hs = torch.gather(hf, 1, order)
    us = torch.gather(us, 1, order)
    k0 = torch.gather(k0, 1, order)
    st = _FitSums(hs, us, k0, n_h, u_bar, maxq)
    steps = st.steps(m)
    # The first piece's sums ([G, 1]) and every later piece's ([G, M]) are scored apart:
    # concatenating them would copy each [G, M] prefix sum once more.
    G = hs.shape[0]
    rest = [f + torch.cumsum(d.reshape(G, -1), dim=1) for f, d in zip(st.first, steps, strict=True)]
    return st.best(rest, u.dtype)


def _fit_binned_chunk(
    u: Tensor, h: Tensor, maxq: int, start: Tensor, m: Tensor, bins: int
) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`_fit_sweep_chunk` without the sort: each unit window's events are summed
    into ``bins`` equal bins of the zero (a scatter-add, O(n)), and the patterns scored
    are those at the bins' ends (``bins`` per window instead of ``n``).

    Events inside one bin are taken together, so the few patterns between them are
    skipped; every pattern scored is still a real one (the codes at a zero), fitted
    and, by the caller, re-rounded and scored exactly.  The sort was ~40 % of a sweep
    of 576 weights on CPU; at ``bins = n/2`` this kernel is 1.9–2.3x faster than the
    sorted one on SmolLM2's block-3 linears (channel-wise, 2026-12-07).
    """
    hf, us, n_h, u_bar, t, k0 = _fit_offsets(u, h, start)
    st = _FitSums(hf, us, k0, n_h, u_bar, maxq)
    G, W = hf.shape[0], m.shape[0]
    steps = torch.stack(st.steps(m), dim=-1)  # [G, W, n, 3]
    b = torch.clamp((t * bins).long(), max=bins - 1)  # the bin of each event in its window
    idx = (m.long()[None, :, None] * bins + b[:, None, :]).reshape(G, -1, 1).expand(-1, -1, 3)
    sums = torch.zeros(G, W * bins, 3, dtype=steps.dtype, device=steps.device)
    sums = sums.scatter_add(1, idx, steps.reshape(G, -1, 3)).cumsum(1)
    rest = [f + sums[..., i] for i, f in enumerate(st.first)]
    return st.best(rest, u.dtype)


def _fit_offsets(u: Tensor, h: Tensor, start: Tensor) -> tuple[Tensor, ...]:
    """``(h, u − ū, Σh, ū, t, k0)`` for the pattern sweeps, float32, each ``[G, n]`` or
    ``[G, 1]``: each weight's event offset ``t ∈ [0, 1)`` in a unit window of the zero
    from ``start: [G]``, and its code ``k0`` at that window's start.  Weights are
    centred so that the prefix sums hold small numbers."""
    uf, hf = u.float(), h.float()
    n_h = hf.sum(1, keepdim=True)
    u_bar = (hf * uf).sum(1, keepdim=True) / n_h
    r = 0.5 - uf - start.float()[:, None]
    return hf, uf - u_bar, n_h, u_bar, r - torch.floor(r), -torch.floor(r)


class _FitSums:
    """The sums both pattern-sweep kernels start from (``hs, us, k0: [G, n]``, in
    any order of the weights): centred codes, the first piece's ``Σhq, Σhq², Σhuq``."""

    def __init__(self, hs: Tensor, us: Tensor, k0: Tensor, n_h: Tensor, u_bar: Tensor, maxq: int) -> None:
        self.hs, self.us, self.k0 = hs, us, k0
        self.n_h, self.u_bar, self.maxq = n_h, u_bar, maxq
        self.c = maxq / 2  # codes centred too
        q0 = torch.clamp(k0, 0, maxq) - self.c
        self.s_u = (hs * us).sum(1, keepdim=True)  # 0 up to rounding
        self.ss_u = (hs * us * us).sum(1, keepdim=True) - self.s_u * self.s_u / n_h
        self.first = ((hs * q0).sum(1, keepdim=True), (hs * q0 * q0).sum(1, keepdim=True),
                      (hs * q0 * us).sum(1, keepdim=True))

    def steps(self, m: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """How each event changes ``Σhq, Σhq², Σhuq`` in the windows ``m``, each
        ``[G, windows, n]``: its code goes from ``k`` to ``k + 1`` (none past the ends)."""
        k = self.k0[:, None, :] + m.float()[None, :, None]  # the code each event leaves
        hv = torch.where((k >= 0) & (k <= self.maxq - 1), self.hs[:, None, :], 0.0)
        return hv, hv * (2 * (k - self.c) + 1), hv * self.us[:, None, :]

    def _fit(self, s_q: Tensor, s_qq: Tensor, s_uq: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(a, b, residual)`` of the best piece among those the sums describe."""
        n_h = self.n_h
        var = n_h * s_qq - s_q * s_q  # n_h² times the weighted variance of q
        cov = n_h * s_uq - s_q * self.s_u
        a = cov / var.clamp_min(1e-30)
        res = self.ss_u - cov * a / n_h
        # One code for all leaves var at float32 noise (~1e-7 of n_h²·c²): not a fit.
        res = torch.where((var > 1e-5 * n_h * n_h) & (a > 0), res, torch.inf)
        best = res.argmin(dim=1, keepdim=True)
        a_best = a.gather(1, best)
        b_best = self.u_bar - a_best * self.c + (self.s_u - a_best * s_q.gather(1, best)) / n_h
        return a_best.squeeze(1), b_best.squeeze(1), res.gather(1, best).squeeze(1)

    def best(self, rest: list[Tensor], dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
        """``(a, b, residual)`` of the best of the first piece and the later pieces
        ``rest`` (prefix sums, each ``[G, M]``), in ``dtype``."""
        (a0, b0, r0), (a1, b1, r1) = self._fit(*self.first), self._fit(*rest)
        later = r1 < r0
        out = (torch.where(later, a1, a0), torch.where(later, b1, b0), torch.where(later, r1, r0))
        return tuple(x.to(dtype) for x in out)


# Unit windows of the zero that a pattern sweep around a known point covers
# (``fitted_patterns(..., around=z)``): ``[z − 1, z + 1)``, a unit each side of the point.
FIT_AROUND_WINDOWS = 2


def fitted_patterns(
    wg: Tensor, hg: Tensor, s: Tensor, maxq: int, around: Tensor | None = None, bins: int | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """The best least-squares grid over the code patterns the zero sweep at scale
    ``s: [G]`` passes through (:func:`_fit_sweep_chunk`).

    Returns ``(scale, zero, loss)``, each ``[G]``: the grid of the best pattern and its
    loss with every weight rounded to that grid, which is at most the regression's
    residual (re-rounding only moves weights to nearer codes).  Where no pattern
    fits, the input scale with zero 0 and an infinite loss.  Costs about one
    :func:`best_zero` sweep, yet each piece gets its own scale and zero, so a few
    scales reach what the exact zero at every scale of a fine grid reaches.
    ``around: [G]``: sweep only the zeros within a unit of these
    (``FIT_AROUND_WINDOWS``), not every window that can hold the best zero at ``s``
    (:func:`_sweep_windows`: ``|range/s − maxq| + 2`` of them, ~5 at 3 bits and ~8 at
    4 bits near a channel-wise row's best scale).  ``bins``: score only the patterns at
    that many evenly spaced zeros per unit window (:func:`_fit_binned_chunk`, no sort).
    """
    a, b, res = _chunked(wg / s[:, None], hg, maxq, fit=True, around=around, bins=bins)
    ok = torch.isfinite(res) & (a > 0)
    scale = torch.where(ok, s * a, s)
    zero = torch.where(ok, -b / torch.where(ok, a, 1.0), 0.0)
    loss = torch.where(ok, group_loss(wg, hg, scale, zero, maxq), torch.inf)
    return scale, zero, loss


# ------------------------------------------------------------- cheap direct evaluations
# The upper-bound pass pays on long rows (channel-wise: 4-bit 8.3-8.8 s against
# 9.3-10.0 s for SmolLM2's block 3); on groups of 64 the sparse first pass finds good
# losses as fast and the pass costs ~10% (5.2 s against 4.4-4.6 s).
UB_MIN_LEN = 256
# Zero-points tried per candidate scale by the upper-bound pass (evenly over the
# placements of the grid on the group's range, then two Lloyd steps).
UB_ZEROS = 12
UB_LLOYD = 2


def _upper_bound_chunk(
    wg: Tensor, hg: Tensor, s: Tensor, z_lo: Tensor, z_hi: Tensor, maxq: int, n_zeros: int, lloyd: int
) -> tuple[Tensor, Tensor]:
    """A good (not always best) zero for every candidate scale, by direct evaluation.

    ``s, z_lo, z_hi: [G, K]``.  ``n_zeros`` evenly spaced zeros in ``[z_lo, z_hi]``,
    then ``lloyd`` steps ``z ← Σh(q − u)/Σh`` from the best (each the exact optimum
    for the current codes, so never worse).  Costs ``n_zeros + 2·lloyd`` passes over
    the group; the exact sweep (:func:`best_zero`) costs ~300.  Returns ``(z, loss)``.
    """
    u = wg[:, None, :] * (1.0 / s)[:, :, None]  # one division per scale, not per weight
    h = hg[:, None, :]
    best_l = torch.full_like(s, torch.inf)
    best_z = z_lo

    def keep_better(z: Tensor) -> None:
        nonlocal best_l, best_z
        e = u + z[:, :, None] - torch.clamp(torch.round(u + z[:, :, None]), 0, maxq)
        loss = (h * e * e).sum(-1)
        better = loss < best_l
        best_l, best_z = torch.where(better, loss, best_l), torch.where(better, z, best_z)

    for i in range(n_zeros):
        keep_better(z_lo + (z_hi - z_lo) * (i / max(n_zeros - 1, 1)))
    h_sum = h.sum(-1)
    for _ in range(lloyd):
        q = torch.clamp(torch.round(u + best_z[:, :, None]), 0, maxq)
        keep_better(torch.minimum(torch.maximum((h * (q - u)).sum(-1) / h_sum, z_lo), z_hi))
    return best_z, best_l * s * s


def _lloyd_scale_chunk(wg: Tensor, hg: Tensor, s: Tensor, z: Tensor, maxq: int) -> Tensor:
    """The least-squares scale of the grid ``ŵ = s·q + b`` for the codes at ``(s, z)``.

    ``s, z: [G]``.  With the codes fixed, ``(s, b)`` is a weighted linear regression
    of ``w`` on ``q``; returns its slope, or ``s`` where every code is equal.  The
    caller pairs it with the exact best zero for that scale, so the step costs one
    sweep and can only lower the loss.
    """
    q = torch.clamp(torch.round(wg / s[:, None] + z[:, None]), 0, maxq)
    n = hg.sum(1)
    mq, mw = (hg * q).sum(1) / n, (hg * wg).sum(1) / n
    dq = q - mq[:, None]
    var = (hg * dq * dq).sum(1)
    slope = (hg * dq * (wg - mw[:, None])).sum(1) / var.clamp_min(1e-30)
    return torch.where((var > 1e-12 * n) & (slope > 0) & torch.isfinite(slope), slope, s)


def _limit_zero(z_lo: Tensor, z_hi: Tensor, maxq: int, limit: float | None) -> tuple[Tensor, Tensor]:
    """The zero interval ``[z_lo, z_hi]`` intersected with ``[−limit, maxq + limit]``
    (kept non-empty); unchanged when ``limit`` is None."""
    if limit is None:
        return z_lo, z_hi
    z_lo = z_lo.clamp(-limit, maxq + limit)
    return z_lo, torch.maximum(z_hi.clamp(-limit, maxq + limit), z_lo)


def _chunk_rows(per_row: int, device: torch.device) -> int:
    return max(1, _CHUNK_ELEMENTS.get(device.type, 1 << 20) // max(per_row, 1))


def upper_bounds(
    wg: Tensor, hg: Tensor, s0: Tensor, ratios: Tensor, maxq: int, max_clip: float | None = None,
    n_zeros: int = UB_ZEROS, lloyd: int = UB_LLOYD, zero_limit: float | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """The best ``(scale, zero, loss)`` per group over the scales ``s₀ · ratios``
    (``ratios: [K]``), each with the zero of :func:`_upper_bound_chunk`.

    The zeros tried place the grid anywhere between its low end on the group's
    minimum and its high end on the maximum, widened by half a step each way (at
    ``s ≈ s₀`` those two placements coincide, yet the best zero is free within a
    step).  Under ``max_clip`` (and ``zero_limit``) they stay inside the allowed interval.  The result is
    a feasible loss, so it can serve as the exact search's first incumbent.
    """
    G, n = wg.shape
    chunk = _chunk_rows(n * ratios.numel(), wg.device)
    w_min, w_max = wg.amin(1, keepdim=True), wg.amax(1, keepdim=True)
    out_s, out_z, out_l = [], [], []
    for i, start in enumerate(range(0, G, chunk)):
        part = slice(start, start + chunk)
        s = s0[part, None] * ratios[None, :]
        lo, hi = -w_min[part] / s, maxq - w_max[part] / s
        if max_clip is None:
            z_lo, z_hi = torch.minimum(lo, hi) - 0.5, torch.maximum(lo, hi) + 0.5
        else:
            z_lo = lo - max_clip
            z_hi = torch.maximum(hi + max_clip, z_lo)
        z_lo, z_hi = _limit_zero(z_lo, z_hi, maxq, zero_limit)
        z, loss = _run_sweep(_upper_bound_chunk, wg[part], hg[part], s, z_lo, z_hi, maxq,
                             n_zeros, lloyd)
        best = loss.argmin(1, keepdim=True)
        out_s.append(s.gather(1, best).squeeze(1))
        out_z.append(z.gather(1, best).squeeze(1))
        out_l.append(loss.gather(1, best).squeeze(1))
        _trim(i, wg.device)
    return torch.cat(out_s), torch.cat(out_z), torch.cat(out_l)


def lloyd_scale(wg: Tensor, hg: Tensor, s: Tensor, z: Tensor, maxq: int) -> Tensor:
    """:func:`_lloyd_scale_chunk` over chunks of groups; ``s, z: [G]``."""
    G, n = wg.shape
    chunk = _chunk_rows(n, wg.device)
    return torch.cat([
        _run_sweep(_lloyd_scale_chunk, wg[i : i + chunk], hg[i : i + chunk], s[i : i + chunk],
                   z[i : i + chunk], maxq)
        for i in range(0, G, chunk)
    ])


# ----------------------------------------------------------------------- init methods
def _init_minmax(wg: Tensor, maxq: int, clip: float) -> tuple[Tensor, Tensor]:
    """Min-max over the group's own range (shrunk by ``clip`` about its midpoint).

    The zero-point is rounded and kept in ``0..maxq`` so it packs into ``bits``.
    """
    lo, hi = wg.amin(dim=1), wg.amax(dim=1)
    if clip != 1.0:
        mid = (lo + hi) / 2
        lo, hi = mid + (lo - mid) * clip, mid + (hi - mid) * clip
    rng = hi - lo
    scale = torch.where(rng < 1e-9, torch.ones_like(rng), rng / maxq)
    zero = torch.clamp(torch.round(-lo / scale), 0, maxq)
    return scale, zero


def _init_mse(
    wg: Tensor, hg: Tensor, maxq: int, grid: int = 100, maxshrink: float = 0.8
) -> tuple[Tensor, Tensor]:
    """GPTQ's clipping search: shrink the range toward 0, integer zero, keep the best."""
    lo, hi = wg.amin(dim=1).clamp_max(0), wg.amax(dim=1).clamp_min(0)
    best_s, best_z = _init_minmax(wg, maxq, 1.0)
    best_l = group_loss(wg, hg, best_s, best_z, maxq)
    for i in range(1, int(maxshrink * grid) + 1):
        p = 1 - i / grid
        rng = (hi - lo) * p
        s = torch.where(rng < 1e-9, torch.ones_like(rng), rng / maxq)
        z = torch.clamp(torch.round(-lo * p / s), 0, maxq)
        loss = group_loss(wg, hg, s, z, maxq)
        better = loss < best_l
        best_s = torch.where(better, s, best_s)
        best_z = torch.where(better, z, best_z)
        best_l = torch.where(better, loss, best_l)
    return best_s, best_z


def _pair_bound_terms(wg: Tensor, hg: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Spans and weights of the (k-th smallest, k-th largest) pairs of every group,
    and the group's values and weights sorted by value (for :func:`_rounding_bound`).

    Whatever the zero-point, the two de-quantized values of a pair with span ``d``
    differ by ``m·s`` for an integer ``m`` in ``0..maxq``, so their errors differ by
    ``d − m·s``; the cheapest way to split that difference costs
    ``hp = h_a h_b / (h_a + h_b)`` times its square.  Disjoint pairs add up, so
    ``Σ_k hp_k · min_m (d_k − m·s)²`` (:func:`_pair_bound`) is a lower bound on the
    loss at scale ``s``: it prunes scales too small (the clipped outer pairs) and,
    as the spans spread over the range, scales too large (their rounding error).
    """
    ws, order = torch.sort(wg, dim=1)
    hs = torch.gather(hg, 1, order)
    half = wg.shape[1] // 2
    lo_w, hi_w = ws[:, :half], ws.flip(1)[:, :half]
    lo_h, hi_h = hs[:, :half], hs.flip(1)[:, :half]
    hp = lo_h * hi_h / (lo_h + hi_h).clamp_min(1e-30)
    return hi_w - lo_w, hp, ws, hs


def _pair_bound(spans: Tensor, hp: Tensor, s: Tensor, maxq: int) -> Tensor:
    """Lower bound of every group's loss at scale ``s: [G]`` (see :func:`_pair_bound_terms`)."""
    sc = s[:, None]
    m = torch.clamp(torch.round(spans / sc), 0, maxq)
    return (hp * (spans - m * sc) ** 2).sum(dim=1)


# Bins of the fractional parts in :func:`_rounding_bound`: finer is tighter (each
# element's distance is under-estimated by up to two bins) but costs B² per group.
_ROUND_BINS = 64


@functools.lru_cache(maxsize=8)
def _bin_distances(bins: int, device: torch.device) -> Tensor:
    """``D[b, c]``: the least squared distance to an integer of ``x + y`` over ``x``
    in fractional bin ``b`` and ``y`` in bin ``c`` (each bin widened by 1e-4 so that
    float error in the binning cannot break the bound).  Cached: the search asks for
    the same table at every candidate scale; callers must not modify it."""
    k = torch.arange(2 * bins - 1, device=device, dtype=torch.float64)
    lo, hi = k / bins - 1e-4, (k + 2) / bins + 1e-4
    holds_int = torch.floor(hi) >= torch.ceil(lo)
    d = torch.minimum((lo - torch.round(lo)).abs(), (hi - torch.round(hi)).abs())
    d = torch.where(holds_int, 0.0, d)
    idx = torch.arange(bins, device=device)
    return (d[idx[:, None] + idx[None, :]] ** 2).float()


def _rounding_bound(
    ws: Tensor, hs: Tensor, spans: Tensor, hp: Tensor, s: Tensor, maxq: int, bins: int = _ROUND_BINS
) -> Tensor:
    """A lower bound of every group's loss at scale ``s`` that sees rounding error.

    The pair bound under-counts rounding (a pair can split its error), so on long
    groups (channel-wise rows) it prunes few scales.  Here the group is split in
    two disjoint parts whose bounds add up: the outer pairs that must clip at
    ``s`` (span above ``maxq·s``) keep their pair term ``hp (d − maxq·s)²``; every
    other element costs at least its distance to the nearest integer code, which
    depends on the zero only through ``frac(z)``.  Binning ``frac(w/s)`` by weight
    bounds that distance per bin for ``frac(z)`` in each bin; the least over the
    bins of ``frac(z)`` bounds every zero-point.  O(n + bins²) per group.
    ``ws, hs``: values sorted per group and their weights.
    """
    G, n = ws.shape
    sc = s[:, None]
    k_clip = (spans > maxq * sc).sum(dim=1, keepdim=True)  # spans decrease with k
    clip = (hp * torch.relu(spans - maxq * sc) ** 2).sum(dim=1)
    j = torch.arange(n, device=ws.device)[None, :]
    inner = (j >= k_clip) & (j < n - k_clip)
    u = ws / sc
    b = torch.clamp(((u - torch.floor(u)) * bins).long(), 0, bins - 1)
    mass = torch.zeros(G, bins, device=ws.device, dtype=torch.float32)
    mass.scatter_add_(1, b, torch.where(inner, hs, 0.0).float())
    rounding = (mass @ _bin_distances(bins, ws.device)).amin(dim=1).to(s.dtype)
    return clip + rounding * s * s


def _coarse_order(top: int, skip: int, stride: int = 8) -> list[int]:
    """Candidate indices ``top..1`` but ``skip``: every ``stride``-th first, so each group
    holds a good loss early and the bound prunes most of the rest."""
    first = [i for i in range(top, 0, -stride) if i != skip]
    return first + [i for i in range(top, 0, -1) if i != skip and i not in set(first)]


# The pattern search (:func:`_init_neuqi_patterns`).  One zero sweep passes through
# the patterns of a band of scales about ``1/maxq`` wide (relative), so its starting
# scales are spaced ``PATTERN_STEP / maxq`` apart, from a floor that depends on the
# bits (the best scale of a group lies lower the fewer the codes: on SmolLM2's block 3
# and heavy-tailed random groups its 1st percentile is ~0.3 s₀ at 2 bits, ~0.5 at 3,
# ~0.6 at 4) up to ``PATTERN_TOP·s₀``.  It was the default on 2- and 3-bit groups
# shorter than ``UB_MIN_LEN`` until the multi-start search, which reaches the same
# optimality with three sweeps (``search="patterns"`` still selects it).  At 4 bits it
# needs 15+ sweeps and was slower than the grid search, with a worse worst group (1.43
# against 1.06 of the dense optimum at g64); on channel-wise rows its mean was 1.00096
# at 3 bits against 1.00006.
PATTERN_STEP = 0.6
PATTERN_FLOOR = {3: 0.3, 7: 0.5, 15: 0.6}
PATTERN_TOP = 1.15
PATTERN_ROUNDS = 1
# Heavy-tailed groups want scales that clip their outliers, often below the floor:
# sweeps also start at the range without the ``k`` smallest and ``k`` largest
# weights.  On SmolLM2's 2-bit g64 linears and heavy-tailed random groups this took
# the worst group from 1.014-1.056 to ≤ 1.002 of the dense optimum.  Two bits clip
# deeper: with ``k = 6`` too the worst 2-bit g64 group of block 3 went from 1.0109 to
# 1.0058 for one more sweep; at 3 bits it changed nothing (by ``maxq``).
PATTERN_INNER = {3: (1, 2, 4, 6), 7: (1, 2, 4)}


# One more start below the floor, by ``maxq``: on heavy-tailed random groups (Student-t,
# ν = 4) one 3-bit g64 group in 2048 had its best scale at 0.42·s₀ and ended 1.082 of
# the dense optimum; a start at 0.4 brought the worst to 1.010 (bench/init_quality.py),
# for one sweep more, and left SmolLM2's block 3 as it was.
PATTERN_DEEP = {7: 0.4}


def pattern_ratios(maxq: int) -> tuple[float, ...]:
    """Starting scales of the pattern search, as fractions of s₀ (``maxq`` 3, 7 or 15)."""
    lo = PATTERN_FLOOR[maxq]
    n = max(2, round((PATTERN_TOP - lo) * maxq / PATTERN_STEP) + 1)
    deep = (PATTERN_DEEP[maxq],) if maxq in PATTERN_DEEP else ()
    return deep + tuple(lo + (PATTERN_TOP - lo) * i / (n - 1) for i in range(n))


# The multi-start search (:func:`_init_neuqi_multistart`): ``MULTI_RATIOS`` scales evenly
# in ``[MULTI_LOW, MULTI_HIGH]·s₀``, each scored with ``MULTI_ZEROS`` zeros and
# ``MULTI_ZERO_STEPS`` Lloyd steps of the zero, then ``MULTI_STEPS`` joint Lloyd steps of
# (scale, zero); the two best local results at least ``MULTI_SEP`` apart (relative
# scale) each get a pattern sweep.  On SmolLM2's block 3 (bench/neuqi_search_speed.py)
# 12 zeros left the worst 2-bit g64 group 1.011 of the dense optimum, 16 left it at
# 1.0000; 17 ratios or 6 zeros let 3-bit groups end in the wrong one of two valleys
# of nearly equal depth (worst 1.03–1.18).  Long rows (channel-wise) keep the grid
# search (or, with ``search="banded"``, the grid search around these points only): there
# the best scale is a lucky one among many nearly equal, which the pattern sweeps miss
# (mean 1.0009–1.0033 of the dense optimum with them).
MULTI_RATIOS = 33
MULTI_LOW, MULTI_HIGH = 0.25, 1.25
MULTI_ZEROS = 16
MULTI_ZERO_STEPS = 2
MULTI_STEPS = 2
MULTI_SEP = 0.05
# Where the multi-start search is the default: 2-4 bits, any group length.
MULTI_DEFAULT_MAXQ = (3, 7, 15)
# Long rows (``UB_MIN_LEN`` or more: channel-wise, g256+) sweep each valley's floor:
# pattern sweeps at both valleys' points times ``1 + f`` for ``f`` in ``(0,) +
# MULTI_FLANKS``, then one more at the best scale, each over the two unit windows of the
# zero about its point (``FIT_AROUND_WINDOWS``, the zero moved with the scale by
# :func:`aligned_zero`) instead of the ~5 (3-bit) to ~8 (4-bit) that can hold the best
# zero.  There the best scale is a lucky one among many nearly equal (each weight's
# rounding error changes with the scale), which two sweeps at the valleys' points miss:
# on SmolLM2's block 3 at 4-bit channel-wise they left the mean 1.00021 of the dense
# optimum and the worst row 1.021 (a first valley whose direct-evaluation zero was poor,
# and a second whose floor lay 3 % from its point).  With the flanks the mean is 1.00007
# and the worst 1.0033, against 1.00021 and 1.0051 for the exact grid search, 5.9x
# faster than it (3-bit, blocks 3 and 12: mean 1.000013 and 1.000040 against 1.000055
# and 1.000070, worst 1.0015 and 1.0092 against 1.0017 and 1.0017; the two-window
# sweeps changed no figure beyond the sixth digit of a mean and took the block from 2.0-2.4 s
# to 1.3-1.4 s).  On groups of 64 six flanks would double the search's cost, and at 2-3
# bits two sweeps already reach the dense optimum there (4 bits: ``MULTI_SHORT_FLANKS``).
MULTI_FLANKS = (-0.03, 0.03)
# Those six sweeps on long rows score the patterns at ``LONG_ROW_BINS·n`` evenly spaced
# zeros per unit window (:func:`_fit_binned_chunk`, no sort) instead of all ``n``; the
# last sweep, at the best scale, is exact and recovers what the bins skip.  On SmolLM2's
# blocks 3 and 12 at 2/3/4-bit channel-wise (bench/neuqi_search_speed.py, 2026-12-07) the
# block's search took 1.33–1.82 s against 2.01–2.48 s, every worst row unchanged (block 3:
# 1.0004 / 1.0015 / 1.0033, block 12: 1.0002 / 1.0092 / 1.0085) and no mean moved by more
# than 7e-6.  A quarter of ``n`` saved another 0–10 % for means
# up to 9e-6 worse; a bin per weight saved a quarter of the time, not a third.
LONG_ROW_BINS = 0.5
# Short groups at 4 bits add two-window sweeps at ``1 + f`` times both valleys' points
# after their two sweeps, on the groups whose second valley's point is within
# ``MULTI_TIE`` of the first's loss (:func:`_near_ties`: 5 % of the groups of
# SmolLM2's blocks 3 and 12).  The two sweeps left one group of block 3 at 4-bit g64
# 1.44 % above the dense optimum (issue #19 asks for at most 1 %): its valleys nearly
# tie (0.2 %).  With the gated flanks the worst group of block 3 is 1.0084 and of
# block 12 1.0065, at the search's cost (1.35 s against 1.37 s on block 3).  Flanks on
# every group reach 1.0000 on both, but made the whole 4-bit g64 run's search 49 %
# slower (bench/quantize_speed.py, 2026-12-07) for the same perplexity.  At 2 and 3
# bits the worst group is already within 1.0011 of the optimum.
MULTI_SHORT_FLANKS: dict[int, tuple[float, ...]] = {15: (-0.02, 0.02)}
MULTI_TIE = 1.05

NEUQI_SEARCHES = ("multistart", "banded", "patterns", "grid")


def _init_neuqi(
    wg: Tensor, hg: Tensor, maxq: int, search: str | None = None,
    max_clip: float | None = None, zero_limit: float | None = None,
) -> tuple[Tensor, Tensor]:
    """NeUQI's float-zero search: ``(scale, zero)`` per group row of ``wg, hg: [G, n]``.

    ``search`` None (default): :func:`_init_neuqi_multistart` at 2 to 4 bits (with flank
    sweeps on rows of ``UB_MIN_LEN`` or more); the bounded exact grid search over the
    whole range (:func:`_init_neuqi_grid`) at other bit widths, and whenever the zero is
    constrained (``max_clip``, ``zero_limit``), which the fitted grids of the other
    searches do not respect.  ``"multistart"``, ``"banded"`` (:func:`_init_neuqi_banded`),
    ``"patterns"`` (:func:`_init_neuqi_patterns`, the default on short groups before the
    multi-start search) and ``"grid"`` (the default on long rows until 2026-12-07) force
    one search where the zero is free.
    """
    if search is not None and search not in NEUQI_SEARCHES:
        raise ValueError(f"search must be one of {NEUQI_SEARCHES}, got {search!r}")
    if max_clip is not None or zero_limit is not None or search == "grid":
        return _init_neuqi_grid(wg, hg, maxq, max_clip=max_clip, zero_limit=zero_limit)
    if search == "patterns":
        return _init_neuqi_patterns(wg, hg, maxq)
    if search == "banded":
        return _init_neuqi_banded(wg, hg, maxq)
    if search == "multistart" or maxq in MULTI_DEFAULT_MAXQ:
        return _init_neuqi_multistart(wg, hg, maxq)
    return _init_neuqi_grid(wg, hg, maxq)


def _init_neuqi_banded(wg: Tensor, hg: Tensor, maxq: int) -> tuple[Tensor, Tensor]:
    """The grid search (:func:`_init_neuqi_grid`) on the two valleys the multi-start
    points find (:func:`_multistart_points`), not on the whole range of scales.

    On long rows the best scale is a lucky one among many nearly equal (each weight's
    rounding error changes with the scale), which the pattern sweeps miss but the
    exact zero sweep at each scale of a fine grid, refined by least-squares steps,
    finds.  The multi-start points locate the valleys cheaply (SmolLM2's block 3 at
    3-bit g64: 0.43 s for all 33 starts, against ~0.17 s for one sorted sweep), so
    only ``2·band + 1`` grid scales around each of the two are swept (pruned by the
    grid search's bounds), against 80 over the whole range.  The best
    point is the incumbent, after min-max's.  On SmolLM2 (bench/quantize_speed.py,
    2026-12-06) its whole 3-bit channel-wise runs were 1.6x faster than the grid's, with
    wiki-sample perplexity 48.70 and 45.32 on two calibration seeds against the grid's
    46.15 and 46.18 (4-bit: 26.50 against 26.58, one seed): worse on one seed, better on
    the other, so it stays opt-in (``search="banded"``, ``--search banded``).
    """
    s1, z1, s2, _ = _multistart_points(wg, hg, maxq)
    return _init_neuqi_grid(wg, hg, maxq, centres=(s1, s2), incumbent=(s1, z1))


def _multistart_chunk(
    wg: Tensor, hg: Tensor, s: Tensor, maxq: int, n_zeros: int, zero_steps: int, steps: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Every start scale ``s: [G, K]`` carried to a local optimum by direct evaluation.

    A good zero for each scale (:func:`_upper_bound_chunk` over the placements of the
    grid on the group's range), then ``steps`` joint Lloyd steps: the weighted
    least-squares grid ``w ≈ a·q + b`` for the current codes becomes the new
    ``(scale, zero) = (a, −b/a)``, re-rounded.  Each step costs a few passes over the
    group and no sort; returns the best ``(scale, zero, loss)`` each start reached,
    each ``[G, K]``.
    """
    lo, hi = -wg.amin(1, keepdim=True) / s, maxq - wg.amax(1, keepdim=True) / s
    z, loss = _upper_bound_chunk(wg, hg, s, torch.minimum(lo, hi) - 0.5, torch.maximum(lo, hi) + 0.5,
                                 maxq, n_zeros, zero_steps)
    w3, h3 = wg[:, None, :], hg[:, None, :]
    h_sum = hg.sum(1, keepdim=True)
    w_bar = (hg * wg).sum(1, keepdim=True) / h_sum
    best_s, best_z, best_l = s, z, loss
    q = torch.clamp(torch.round(w3 * (1.0 / s)[:, :, None] + z[:, :, None]), 0, maxq)
    for _ in range(steps):
        q_bar = (h3 * q).sum(-1) / h_sum
        dq = q - q_bar[:, :, None]
        var = (h3 * dq * dq).sum(-1)
        a = (h3 * dq * w3).sum(-1) / var.clamp_min(1e-30)
        ok = (var > 1e-12 * h_sum) & (a > 0) & torch.isfinite(a)
        s = torch.where(ok, a, s)
        z = torch.where(ok, q_bar - w_bar / torch.where(ok, a, 1.0), z)
        q = torch.clamp(torch.round(w3 * (1.0 / s)[:, :, None] + z[:, :, None]), 0, maxq)  # the new codes
        e = w3 - s[:, :, None] * (q - z[:, :, None])
        loss = (h3 * e * e).sum(-1)
        better = loss < best_l
        best_s = torch.where(better, s, best_s)
        best_z = torch.where(better, z, best_z)
        best_l = torch.where(better, loss, best_l)
    return best_s, best_z, best_l


def aligned_zero(w_bar: Tensor, s: Tensor, z: Tensor, s_new: Tensor) -> Tensor:
    """The zero that keeps the group's h-weighted mean weight ``w_bar`` on the same
    (fractional) code when the scale moves from ``s`` to ``s_new`` (all ``[G]``): where a
    pattern sweep at ``s_new`` around a point found at ``s`` should look."""
    return z + w_bar / s - w_bar / s_new


def _multistart_points(wg: Tensor, hg: Tensor, maxq: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """:func:`_multistart_chunk` from ``MULTI_RATIOS`` start scales, over chunks of groups.

    Returns ``(s1, z1, s2, z2)``, each ``[G]``: the best point reached, and the best one
    at least ``MULTI_SEP`` away from ``s1`` in scale (a second valley; where every start
    ended near ``s1``, ``0.85·s1`` with the zero aligned to ``z1``)."""
    G, n = wg.shape
    s0 = minmax_scale(wg, maxq)
    ratios = torch.linspace(MULTI_LOW, MULTI_HIGH, MULTI_RATIOS, device=wg.device, dtype=wg.dtype)
    chunk = _chunk_rows(n * MULTI_RATIOS, wg.device) * DIRECT_CHUNK_SCALE
    outs = [torch.empty(G, device=wg.device, dtype=wg.dtype) for _ in range(4)]
    for c, start in enumerate(range(0, G, chunk)):
        part = slice(start, start + chunk)
        s, z, loss = _run_sweep(_multistart_chunk, wg[part], hg[part], s0[part, None] * ratios, maxq,
                                MULTI_ZEROS, MULTI_ZERO_STEPS, MULTI_STEPS)
        i = loss.argmin(1, keepdim=True)
        s1, z1 = s.gather(1, i), z.gather(1, i)
        far = (s / s1 - 1).abs() > MULTI_SEP
        j = torch.where(far, loss, torch.inf).argmin(1, keepdim=True)
        some = far.any(1, keepdim=True)
        s2 = torch.where(some, s.gather(1, j), 0.85 * s1)
        w_bar = _mean_weight(wg[part], hg[part])[:, None]
        z2 = torch.where(some, z.gather(1, j), aligned_zero(w_bar, s1, z1, 0.85 * s1))
        for out, x in zip(outs, (s1, z1, s2, z2), strict=True):
            out[part] = x.squeeze(1)
        _trim(c, wg.device)
    return tuple(outs)


def _init_neuqi_multistart(wg: Tensor, hg: Tensor, maxq: int) -> tuple[Tensor, Tensor]:
    """Local optima from many start scales, then pattern sweeps at the best two.

    The loss over the scale has a few valleys (typically: clip the tails, or cover
    them), each rough at the scale of one rounding step.  Cheap direct evaluations
    carry ``MULTI_RATIOS`` starts into their valleys (:func:`_multistart_points`);
    a pattern sweep (:func:`fitted_patterns`) at the second valley's best point
    explores that valley's floor, and a second at the best scale so far (the first
    valley's, unless the first sweep beat it) refines it.  Two sorted sweeps in all,
    where the pattern search needs 14.  Rows of ``UB_MIN_LEN`` or more take seven:
    both valleys' points and their flanks (``MULTI_FLANKS``), then the best scale;
    short groups at 4 bits add four at the flanks of both valleys' points where
    the valleys nearly tie (``MULTI_SHORT_FLANKS``).  Min-max's own point is the
    starting incumbent, so no group ends worse.

    No exact best-zero sweep follows.  The last pattern sweep's best is already at
    least as good as the exact zero at the sweep's own scale (each pattern gets its own
    least-squares grid); an exact sweep at the fitted scale it moved to (the search's
    last step until 2026-12-06) lowered 1498 of 4992 groups of SmolLM2's block 3 at
    4-bit g64 by at most 0.025 %, and none by more than float noise at 2 and 3 bits,
    for about a fifth of the search's time.
    """
    best = _Best.minmax(wg, hg, maxq)
    s1, z1, s2, z2 = _multistart_points(wg, hg, maxq)
    l1 = group_loss(wg, hg, s1, z1, maxq)
    best.take(s1, z1, l1)  # scored as the caller will score it
    # Short groups: the second valley's point, then the best; both around their point's
    # zero (``FIT_AROUND_WINDOWS``), as on long rows.  Sweeping every window that can
    # hold the best zero instead left the same parameters to float noise on SmolLM2's
    # block 3 (2/3/4-bit g64, 3-bit g128: every mean and worst ratio to the dense optimum
    # equal to the printed digits); the two-window sweeps took 10-33 % less time there and
    # 24 % less on a 4096 x 4096 layer at 3-bit g128 (2026-12-07, eighth session).
    if wg.shape[1] < UB_MIN_LEN:
        best.take(*fitted_patterns(wg, hg, s2, maxq, around=z2))
        best.take(*fitted_patterns(wg, hg, best.s, maxq, around=best.z))
        if flanks := MULTI_SHORT_FLANKS.get(maxq, ()):  # where the valleys nearly tie
            ties = _near_ties(wg, hg, maxq, l1, (s2, z2), MULTI_TIE)
            _flank_sweeps(best, wg, hg, maxq, _mean_weight(wg, hg), ((s1, z1), (s2, z2)), flanks, ties)
        return best.s, best.z
    # Long rows: each valley's floor (MULTI_FLANKS), every sweep around its point's zero.
    # (Gating the second valley's sweeps on near ties, as short 4-bit groups do, saves
    # little here: on SmolLM2's block 3 at 3 bits 81 % of rows are within 5 %, and at
    # 2 % the worst row went from 1.0015 to 1.0064.)
    # The six are binned (LONG_ROW_BINS); the last, at the best scale, is exact.
    bins = max(2, round(wg.shape[1] * LONG_ROW_BINS))
    _flank_sweeps(best, wg, hg, maxq, _mean_weight(wg, hg), ((s2, z2), (s1, z1)), (0.0, *MULTI_FLANKS),
                  bins=bins)
    best.take(*fitted_patterns(wg, hg, best.s, maxq, around=best.z))
    return best.s, best.z


def _mean_weight(wg: Tensor, hg: Tensor) -> Tensor:
    """Each group's h-weighted mean weight ``[G]`` (what :func:`aligned_zero` keeps on its code)."""
    return (hg * wg).sum(1) / hg.sum(1)


def _near_ties(wg: Tensor, hg: Tensor, maxq: int, l1: Tensor, second: tuple[Tensor, Tensor],
               tie: float) -> Tensor:
    """Indices of the groups whose second valley's point ``second = (s2, z2)`` is within
    ``tie`` of the first's loss ``l1`` (``[G]``): one host sync."""
    return torch.nonzero(group_loss(wg, hg, *second, maxq) <= tie * l1).squeeze(1)


def _flank_sweeps(
    best: _Best, wg: Tensor, hg: Tensor, maxq: int, w_bar: Tensor,
    points: tuple[tuple[Tensor, Tensor], ...], factors: tuple[float, ...], rows: Tensor | None = None,
    bins: int | None = None,
) -> None:
    """Two-window pattern sweeps at ``1 + f`` times each point ``(s, z)`` (each ``[G]``)
    for ``f`` in ``factors``, the zero moved with the scale (:func:`aligned_zero`), on the
    groups ``rows`` only (None: all), binned with ``bins`` (:func:`fitted_patterns`);
    updates ``best``."""
    if rows is not None:
        if rows.numel() == 0:
            return
        sub = _Best(best.s[rows], best.z[rows], best.loss[rows])
        _flank_sweeps(sub, wg[rows], hg[rows], maxq, w_bar[rows],
                      tuple((s[rows], z[rows]) for s, z in points), factors, bins=bins)
        best.s, best.z, best.loss = (x.index_copy(0, rows, y) for x, y in
                                     ((best.s, sub.s), (best.z, sub.z), (best.loss, sub.loss)))
        return
    for centre, zero in points:
        for f in factors:
            s = centre * (1 + f)
            around = aligned_zero(w_bar, centre, zero, s)
            best.take(*fitted_patterns(wg, hg, s, maxq, around=around, bins=bins))


class _Best:
    """The best ``(scale, zero, loss)`` per group so far; :meth:`take` keeps the
    better of it and a new point, group by group (each ``[G]``)."""

    def __init__(self, s: Tensor, z: Tensor, loss: Tensor) -> None:
        self.s, self.z, self.loss = s, z, loss

    @classmethod
    def minmax(cls, wg: Tensor, hg: Tensor, maxq: int) -> _Best:
        """Min-max's own point, so that no group ends worse than min-max."""
        s, z = minmax_scale(wg, maxq), _init_minmax(wg, maxq, 1.0)[1]
        return cls(s, z, group_loss(wg, hg, s, z, maxq))

    def take(self, s: Tensor, z: Tensor, loss: Tensor) -> None:
        better = loss < self.loss
        self.s = torch.where(better, s, self.s)
        self.z = torch.where(better, z, self.z)
        self.loss = torch.where(better, loss, self.loss)


def _init_neuqi_patterns(
    wg: Tensor, hg: Tensor, maxq: int, ratios: tuple[float, ...] | None = None,
    rounds: int = PATTERN_ROUNDS,
) -> tuple[Tensor, Tensor]:
    """The best grid over the code patterns that a few zero sweeps pass through.

    For fixed codes the best grid is a least-squares fit, and the weighted error at
    the fitted grid, re-rounded, is at most that fit's residual.  So the optimum of
    ``L(s, z)`` is the least residual over the code patterns any ``(s, z)`` produces.
    A zero sweep at one scale passes through ~``3n`` patterns;
    :func:`fitted_patterns` scores all of them by their own fit for about the cost
    of the exact best-zero sweep at that scale.  Sweeps at ``ratios·s₀`` (default
    :func:`pattern_ratios`) and at the inner ranges of ``PATTERN_INNER``, then
    ``rounds`` more at the best scale so far, then the exact best zero for the final
    scale.  Min-max's own point is the starting
    incumbent, so no group ends worse.  On SmolLM2's block 3 at 3-bit g64 the mean
    error is *below* a dense search of 1000 scales with the exact zero at each
    (``bench/neuqi_search_speed.py``).
    """
    ratios = pattern_ratios(maxq) if ratios is None else ratios
    s0 = minmax_scale(wg, maxq)
    ws = torch.sort(wg, dim=1).values
    n = wg.shape[1]
    starts = [s0 * r for r in ratios]
    inner_ks = PATTERN_INNER.get(maxq, PATTERN_INNER[7])
    starts += [torch.where(inner > 1e-9, inner, s0) for k in inner_ks if 2 * k + 1 < n
               for inner in [(ws[:, n - 1 - k] - ws[:, k]) / maxq]]
    best = _Best.minmax(wg, hg, maxq)
    for s in starts:
        best.take(*fitted_patterns(wg, hg, s, maxq))
    for _ in range(rounds):
        best.take(*fitted_patterns(wg, hg, best.s, maxq))
    z, loss = best_zero(wg / best.s[:, None], hg, maxq)
    best.take(best.s, z, loss * best.s * best.s)
    return best.s, best.z


def _init_neuqi_grid(
    wg: Tensor,
    hg: Tensor,
    maxq: int,
    coarse: int = NEUQI_COARSE,
    fine: int = NEUQI_FINE,
    max_ratio: float = NEUQI_MAX_RATIO,
    refine: str = "lloyd",
    rounds: int | None = None,
    max_clip: float | None = None,
    upper_bound: bool | None = None,
    zero_limit: float | None = None,
    centres: tuple[Tensor, ...] | None = None,
    incumbent: tuple[Tensor, Tensor] | None = None,
    band: int = 2,
) -> tuple[Tensor, Tensor]:
    """Coarse scale grid (multiples of s₀) with the exact best float zero per scale,
    then refinement around the best.

    Coarse candidates are ``s₀·i/coarse`` up to ``max_ratio·s₀``.  A group skips a
    candidate only when a lower bound of its loss there already exceeds its best,
    so the result is as good as trying every candidate.  What makes the skipping
    pay is a good best from the start: a sparse pass over the grid comes before the
    rest, and ``upper_bound`` (default: on rows of ``UB_MIN_LEN`` or more) first
    evaluates every candidate directly with a few zeros each (:func:`upper_bounds`,
    ~1/20 of one exact sweep per candidate).  On groups of 64 the pair bound alone
    skips about half of the candidates; the binned rounding bound, used on every
    group length, skips ~85%.

    Refinement (``rounds`` steps, each never worse):

    - ``"lloyd"`` (default): the least-squares scale for the current codes
      (:func:`lloyd_scale`) with the exact best zero for it: one sweep per step.
    - ``"sweep"``: the exact best scale for the current zero (:func:`_scale_sweep_chunk`)
      with the exact best zero for it; on SmolLM2's block 3 a little nearer the dense
      optimum at 4-bit channel-wise (mean ratio 1.00011 vs 1.00021), equal elsewhere,
      and the whole search 1.2-1.8x slower with it (bench/neuqi_search_speed.py).
    - ``"grid"``: the reference's fine stage (``±(fine/coarse)/2`` steps of ``s₀/fine``).

    ``centres`` (``[G]`` scales each) replaces the coarse grid by the candidates within
    ``band`` steps of ``s₀/coarse`` of each centre (:func:`_init_neuqi_banded`), and
    ``incumbent`` (``(scale, zero)``) is a point the result must beat.

    ``max_clip`` (steps) keeps every weight within that many steps beyond the grid's
    ends: the zero is confined to ``[−c − min/s, maxq + c − max/s]`` and scales
    below ``range/(maxq + 2c)`` (where that interval is empty) are not tried.  The
    weighted objective happily clips a row's rare large weights to sharpen the grid
    for the rest; on Qwen2.5-Coder-0.5B those weights cost more perplexity than the
    objective credits (bench/clip_restore.py).  The bounds stay valid: a constraint
    only raises the loss.  ``zero_limit`` confines the zero to
    ``[−zero_limit, maxq + zero_limit]`` (see ``FLOAT_ZERO_LIMIT``).
    """
    if refine not in ("lloyd", "sweep", "grid"):
        raise ValueError(f"refine must be 'lloyd', 'sweep' or 'grid', got {refine!r}")
    if upper_bound is None:
        upper_bound = wg.shape[1] >= UB_MIN_LEN
    s0 = minmax_scale(wg, maxq)
    spans, hp, ws, hs = _pair_bound_terms(wg, hg)
    w_min, w_max = ws[:, 0], ws[:, -1]

    def zero_range(idx: Tensor | None, s: Tensor) -> tuple[Tensor, Tensor] | None:
        if max_clip is None and zero_limit is None:
            return None
        if max_clip is None:
            z_lo, z_hi = torch.full_like(s, -torch.inf), torch.full_like(s, torch.inf)
        else:
            lo, hi = (w_min, w_max) if idx is None else (w_min[idx], w_max[idx])
            z_lo = -max_clip - lo / s
            z_hi = torch.maximum(maxq + max_clip - hi / s, z_lo)  # float guard at s_min
        return _limit_zero(z_lo, z_hi, maxq, zero_limit)

    best_s = s0.clone()
    if upper_bound or centres is not None:  # min-max's point: never worse than min-max
        best_z = _init_minmax(wg, maxq, 1.0)[1]
        if max_clip is not None or zero_limit is not None:
            best_z = torch.clamp(best_z, *zero_range(None, s0))
        best_l = group_loss(wg, hg, s0, best_z, maxq)
    else:
        best_z, best_l = best_zero(wg / s0[:, None], hg, maxq, zero_range(None, s0))
        best_l = best_l * s0 * s0
    # The least scale whose zero interval is not empty, as a fraction of s₀.
    min_ratio = 0.0 if max_clip is None else maxq / (maxq + 2 * max_clip)

    def least_scale(z: Tensor) -> Tensor:
        """Least scale at which zero ``z`` keeps every weight within the bound."""
        return torch.maximum(clip_scale_floor(w_min, w_max, z, maxq, float(max_clip or 0.0)),
                             min_ratio * s0)

    def accept(idx: Tensor, s: Tensor, z: Tensor, loss: Tensor) -> None:
        better = loss < best_l[idx]
        sel = idx[better]
        best_s[sel] = s[better]
        best_z[sel] = z[better]
        best_l[sel] = loss[better]

    def consider(s: Tensor, todo: Tensor | None = None) -> None:
        # A small margin guards the bounds against float error.
        lb = _pair_bound(spans, hp, s, maxq)
        keep = lb * (1 - 1e-6) < best_l
        if todo is not None:
            keep &= todo
        idx = torch.nonzero(keep, as_tuple=True)[0]
        if idx.numel():
            lb = _rounding_bound(ws[idx], hs[idx], spans[idx], hp[idx], s[idx], maxq)
            idx = idx[lb * (1 - 1e-5) < best_l[idx]]
        if idx.numel() == 0:
            return
        si = s[idx]
        z, loss = best_zero(wg[idx] / si[:, None], hg[idx], maxq, zero_range(idx, si))
        accept(idx, si, z, loss * si * si)

    top = round(coarse * max_ratio)
    if max_clip is None:
        # s0 itself is done unless the upper-bound pass replaced its sweep.
        ratios = [i / coarse for i in _coarse_order(top, skip=-1 if upper_bound else coarse)]
    else:
        # The same spacing over the feasible ratios only: the bounds prune little
        # there (no scale is too small), so every candidate costs a sweep.
        n = max(4, round(coarse * (max_ratio - min_ratio)))
        ratios = [min_ratio] + [min_ratio + (max_ratio - min_ratio) * i / n
                                for i in _coarse_order(n, skip=-1)]
    if incumbent is not None:
        accept(torch.arange(wg.shape[0], device=wg.device), *incumbent, group_loss(wg, hg, *incumbent, maxq))
    if centres is not None:  # only the candidates within ``band`` grid steps of each centre
        for k in sorted(range(-band, band + 1), key=abs):
            for c in centres:
                s = c + s0 * (k / coarse)
                consider(torch.where(s > 0, s, c))
    else:
        if upper_bound:
            r = torch.tensor(ratios, dtype=wg.dtype, device=wg.device)
            ub_s, ub_z, ub_l = upper_bounds(wg, hg, s0, r, maxq, max_clip, zero_limit=zero_limit)
            accept(torch.arange(wg.shape[0], device=wg.device), ub_s, ub_z, ub_l)
        for ratio in ratios:
            consider(s0 * ratio)
    if rounds is None:
        rounds = CLIP_REFINE_ROUNDS if max_clip is not None else 3
    if refine == "grid":
        centre = best_s.clone()
        half = (fine // coarse) // 2
        for k in range(-half, half + 1):
            if k == 0:
                continue
            s = centre + s0 * (k / fine)
            s = torch.where(s > max(min_ratio, 0.0) * s0, s, centre)  # only feasible scales
            consider(s)
        return best_s, best_z
    for _ in range(rounds):
        if refine == "lloyd":
            s_new = lloyd_scale(wg, hg, best_s, best_z, maxq)
            if max_clip is not None:
                s_new = torch.maximum(s_new, min_ratio * s0)
        else:
            floor = None if max_clip is None else least_scale(best_z)[:, None]
            s_new, _ = _chunked_scale_sweep(wg, hg, maxq, best_z[:, None], floor)
        ok = torch.isfinite(s_new) & (s_new > 0)
        moved = ok & ((s_new - best_s).abs() > 1e-7 * best_s)
        consider(torch.where(ok, s_new, best_s), moved)
    return best_s, best_z


def _chunked_scale_sweep(
    wg: Tensor, hg: Tensor, maxq: int, zeros: Tensor | None = None, s_floor: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """:func:`_scale_sweep_chunk` over chunks of groups; returns ``(scale, zero)``."""
    G, n = wg.shape
    n_zeros = maxq + 1 if zeros is None else zeros.shape[1]
    budget = _CHUNK_ELEMENTS.get(wg.device.type, 1 << 20)
    chunk = max(1, budget // (n * maxq * n_zeros))
    scales, zero_pts = [], []
    for j, i in enumerate(range(0, G, chunk)):
        zi = None if zeros is None else zeros[i : i + chunk]
        fi = None if s_floor is None else s_floor[i : i + chunk]
        s, z, _ = _run_sweep(_scale_sweep_chunk, wg[i : i + chunk], hg[i : i + chunk], maxq, zi, fi)
        scales.append(s)
        zero_pts.append(z)
        _trim(j, wg.device)
    return torch.cat(scales), torch.cat(zero_pts)


def integer_zero_sweep(wg: Tensor, hg: Tensor, maxq: int, zeros: tuple[int, ...]) -> tuple[Tensor, Tensor]:
    """The exact best scale for each of a few integer zeros shared by every group.

    :func:`_integer_zero_sweep_chunk` over chunks of groups; ``wg, hg: [G, n]``.
    Returns ``(scale, loss)``, each ``[G, len(zeros)]`` (scale NaN, loss inf where no
    positive scale exists: an all-zero group).
    """
    G, n = wg.shape
    events = n * max(max(maxq - z, z) for z in zeros)
    chunk = max(1, _CHUNK_ELEMENTS.get(wg.device.type, 1 << 20) // (events * len(zeros)))
    scales, losses = [], []
    for j, i in enumerate(range(0, G, chunk)):
        s, loss = _run_sweep(_integer_zero_sweep_chunk, wg[i : i + chunk], hg[i : i + chunk], maxq, zeros)
        scales.append(s)
        losses.append(loss)
        _trim(j, wg.device)
    return torch.cat(scales), torch.cat(losses)


def _integer_zero_sweep_chunk(
    wg: Tensor, hg: Tensor, maxq: int, zeros: tuple[int, ...]
) -> tuple[Tensor, Tensor]:
    """:func:`_scale_sweep_chunk` for integer zeros, with half its events and one sort.

    With an integer zero ``z`` every code starts at ``z`` (``c = 0``) as ``s → ∞``, and
    weight ``w_j`` moves its ``|c|`` from ``i`` to ``i + 1`` at ``r = 1/s = (i + ½)/|w_j|``
    for ``i`` below the levels on its side of the zero (``maxq − z`` above, ``z`` below):
    ``P`` gains ``h_j|w_j|``, ``Q`` gains ``h_j(2i + 1)``.  So the breakpoints are the
    same for every zero, only which of them count differs: one sort serves all zeros
    (a breakpoint that does not count for a zero splits a piece in two, harmlessly).
    The general sweep's ``n·maxq`` events per zero, half of them never valid, become
    ``n·max(maxq − z, z)`` for all.  Returns ``(scale, loss)``, ``[G, Z]``.
    """
    w = wg.double()
    h = hg.double()
    G = w.shape[0]
    L = max(max(maxq - z, z) for z in zeros)
    i = torch.arange(L, device=w.device, dtype=torch.float64)
    a = w.abs()[:, :, None]
    r, order = torch.sort(((i + 0.5) / a).reshape(G, -1), dim=1)  # |w| = 0: inf, never reached
    zero = torch.zeros(G, 1, dtype=torch.float64, device=w.device)
    r_lo = torch.cat([zero, r], dim=1)  # piece k spans r in [r_lo, r_hi]
    r_hi = torch.cat([r, torch.full_like(zero, torch.inf)], dim=1)
    s_lo = 1.0 / r_hi
    s_hi = torch.where(r_lo > 0, 1.0 / r_lo, torch.inf)
    w2 = (h * w * w).sum(dim=1, keepdim=True)
    scales, losses = [], []
    for z in zeros:
        levels = torch.where(w > 0, float(maxq - z), float(z))[:, :, None]
        valid = i < levels
        d_p = torch.where(valid, (h * w.abs())[:, :, None], 0.0).reshape(G, -1)
        d_q = torch.where(valid, h[:, :, None] * (2 * i + 1), 0.0).reshape(G, -1)
        p = torch.cat([zero, torch.cumsum(torch.gather(d_p, 1, order), dim=1)], dim=1)
        q = torch.cat([zero, torch.cumsum(torch.gather(d_q, 1, order), dim=1)], dim=1)
        s_star = torch.where(q > 0, p / q.clamp_min(1e-300), s_hi)
        s_star = torch.minimum(torch.maximum(s_star, s_lo), s_hi)
        s_star = torch.where(torch.isfinite(s_star) & (s_star > 0), s_star, torch.nan)
        loss = torch.where(torch.isnan(s_star), torch.inf, w2 - 2 * s_star * p + s_star * s_star * q)
        best = loss.argmin(dim=1, keepdim=True)
        scales.append(s_star.gather(1, best))
        losses.append(loss.gather(1, best))
    return torch.cat(scales, dim=1).to(wg.dtype), torch.cat(losses, dim=1).to(wg.dtype)


def _scale_sweep_chunk(
    wg: Tensor, hg: Tensor, maxq: int, zeros: Tensor | None = None, s_floor: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Exact ``min over every scale s > 0`` for each candidate zero-point, best kept.

    ``zeros: [G, Z]`` candidate zero-points per group (any floats); None means
    every integer in ``0..maxq``.  With z fixed, write ``r = 1/s``: code
    ``q_j = clamp(round(w_j r + z))`` changes by ±1 at ``r = (k + ½ − z)/w_j``;
    between those breakpoints every ``c_j = q_j − z`` is fixed and
    ``L(s) = Σhw² − 2sP + s²Q`` with ``P = Σh w c``, ``Q = Σh c²``, a convex
    quadratic in s minimised at ``P/Q`` (clamped to the piece).  One sorted sweep
    per (group, z) visits every piece.  ``s_floor: [G, Z]`` restricts each search to
    scales at or above it (the pieces are clamped to it, those below it dropped).
    Returns ``(scale, zero, loss)``.
    """
    w = wg.double()
    h = hg.double()
    G = w.shape[0]
    if zeros is None:
        zeros = torch.arange(maxq + 1, device=w.device, dtype=torch.float64).expand(G, -1)
    zeros = zeros.double()
    Z = zeros.shape[1]
    z = zeros[:, :, None, None]
    k = torch.arange(maxq, device=w.device, dtype=torch.float64)[None, None, None, :]
    wj = w[:, None, :, None]
    hj = h[:, None, :, None]
    r = (k + 0.5 - z) / wj  # [G, Z, n, maxq]
    valid = (r > 0) & torch.isfinite(r)
    # c = q − z changes from c_old to c_new at the breakpoint; at s → ∞ every
    # q_j = clamp(round(z)), so c starts at clamp(round(z)) − z for all elements.
    pos = wj > 0
    c_old = torch.where(pos, k - z, k + 1 - z)
    c_new = torch.where(pos, k + 1 - z, k - z)
    q_inf = torch.clamp(torch.round(zeros), 0, maxq)[:, :, None]  # [G, Z, 1]
    valid = valid & torch.where(pos, k >= q_inf[..., None], k < q_inf[..., None])
    d_p = torch.where(valid, hj * wj * (c_new - c_old), 0.0).reshape(G, Z, -1)
    d_q = torch.where(valid, hj * (c_new * c_new - c_old * c_old), 0.0).reshape(G, Z, -1)
    r = torch.where(valid, r, torch.inf).reshape(G, Z, -1)
    r, order = torch.sort(r, dim=2)
    zero = torch.zeros(G, Z, 1, dtype=torch.float64, device=w.device)
    c0 = q_inf - zeros[:, :, None]  # [G, Z, 1]
    p0 = (h * w).sum(dim=1)[:, None, None] * c0
    q0 = h.sum(dim=1)[:, None, None] * c0 * c0
    p = torch.cat([p0, p0 + torch.cumsum(torch.gather(d_p, 2, order), dim=2)], dim=2)
    q = torch.cat([q0, q0 + torch.cumsum(torch.gather(d_q, 2, order), dim=2)], dim=2)
    inf = torch.full_like(zero, torch.inf)
    r_lo = torch.cat([zero, r], dim=2)  # piece i spans r in [r_lo, r_hi]
    r_hi = torch.cat([r, inf], dim=2)
    s_lo = 1.0 / r_hi  # 0 where r_hi = inf
    s_hi = torch.where(r_lo > 0, 1.0 / r_lo, torch.inf)
    if s_floor is not None:
        s_lo = torch.maximum(s_lo, s_floor.double()[:, :, None])
    s_star = torch.where(q > 0, p / q.clamp_min(1e-300), s_hi)
    s_star = torch.minimum(torch.maximum(s_star, s_lo), s_hi)
    s_star = torch.where(torch.isfinite(s_star) & (s_star > 0) & (s_lo <= s_hi), s_star, torch.nan)
    w2 = (h * w * w).sum(dim=1)[:, None, None]
    loss = w2 - 2 * s_star * p + s_star * s_star * q
    loss = torch.where(torch.isnan(s_star), torch.inf, loss).reshape(G, -1)
    best = loss.argmin(dim=1)
    scale = s_star.reshape(G, -1).gather(1, best[:, None]).squeeze(1)
    zero_pt = zeros.gather(1, torch.div(best, p.shape[2], rounding_mode="floor")[:, None]).squeeze(1)
    return scale.to(wg.dtype), zero_pt.to(wg.dtype), loss.gather(1, best[:, None]).squeeze(1)


def _bracket_sweep_chunk(
    wg: Tensor, hg: Tensor, maxq: int, zeros: Tensor, s_lo: Tensor, s_hi: Tensor, events: int
) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`_scale_sweep_chunk` restricted to ``s ∈ [s_lo, s_hi]`` (each ``[G, Z]``,
    ``0 < s_lo ≤ s_hi``): exact over that bracket, with the codes at ``s_hi`` computed
    directly and only the breakpoints inside the bracket visited.  A weight crosses
    at most ``events`` code boundaries there (the caller's bound), against ``maxq``
    over every scale, so a narrow bracket costs a few events per weight at any bit
    width.  Returns ``(scale, zero, loss)``.
    """
    w = wg.double()[:, None, :, None]  # [G, 1, n, 1]
    h = hg.double()[:, None, :, None]
    z = zeros.double()[:, :, None, None]  # [G, Z, 1, 1]
    r1 = (1.0 / s_hi.double())[:, :, None, None]
    r2 = (1.0 / s_lo.double())[:, :, None, None]
    v1 = w * r1 + z  # each weight's unclamped code at the bracket's widest scale
    pos = w > 0
    # Its code there, a tie rounded the way the weight is about to move, so that the
    # boundaries k + ½ (0 ≤ k < maxq) crossed as r grows from r1 are exactly those
    # past v1: upward for w > 0, downward for w < 0.  Weights often sit on a boundary
    # at a coarse ratio (a checkpoint's weights lie on its own grid).
    start = torch.where(pos, torch.floor(v1 + 0.5), torch.ceil(v1 - 0.5))
    c1 = torch.clamp(start, 0, maxq) - z  # [G, Z, n, 1]
    e = torch.arange(events, device=w.device, dtype=torch.float64)
    k = torch.where(pos, start.clamp_min(0) + e, torch.clamp(start - 1, max=maxq - 1) - e)  # [G, Z, n, E]
    # r ≥ r1 exactly; rounding can put it a hair below, which must not drop the event
    r = torch.maximum((k + 0.5 - z) / w, r1)
    valid = (w != 0) & (k >= 0) & (k <= maxq - 1) & (r <= r2)
    c_old = torch.where(pos, k - z, k + 1 - z)
    c_new = torch.where(pos, k + 1 - z, k - z)
    G, Z = zeros.shape
    d_p = torch.where(valid, h * w * (c_new - c_old), 0.0).reshape(G, Z, -1)
    d_q = torch.where(valid, h * (c_new * c_new - c_old * c_old), 0.0).reshape(G, Z, -1)
    r = torch.where(valid, r, torch.inf).reshape(G, Z, -1)
    r, order = torch.sort(r, dim=2)
    p0 = (h * w * c1).sum(dim=2)  # [G, Z, 1]
    q0 = (h * c1 * c1).sum(dim=2)
    p = torch.cat([p0, p0 + torch.cumsum(torch.gather(d_p, 2, order), dim=2)], dim=2)
    q = torch.cat([q0, q0 + torch.cumsum(torch.gather(d_q, 2, order), dim=2)], dim=2)
    lo_r = torch.cat([r1[..., 0], r], dim=2)  # piece i spans r in [lo_r, hi_r]
    hi_r = torch.minimum(torch.cat([r, r2[..., 0]], dim=2), r2[..., 0])
    piece_lo, piece_hi = 1.0 / hi_r, 1.0 / lo_r
    s_star = torch.where(q > 0, p / q.clamp_min(1e-300), piece_hi)
    s_star = torch.minimum(torch.maximum(s_star, piece_lo), piece_hi)
    ok = torch.isfinite(s_star) & (s_star > 0) & (lo_r <= hi_r)
    w2 = (h * w * w).sum(dim=2)  # [G, 1, 1]
    loss = torch.where(ok, w2 - 2 * s_star * p + s_star * s_star * q, torch.inf).reshape(G, -1)
    best = loss.argmin(dim=1)
    scale = s_star.reshape(G, -1).gather(1, best[:, None]).squeeze(1)
    zero_pt = zeros.gather(1, torch.div(best, p.shape[2], rounding_mode="floor")[:, None]).squeeze(1)
    return scale.to(wg.dtype), zero_pt.to(wg.dtype), loss.gather(1, best[:, None]).squeeze(1)


# Float zero-points are stored in float16 (native checkpoint, HQQ export): beyond
# |z| = 128 its spacing exceeds 1/16 of a step, at 2048 whole steps are lost and
# past 65504 it overflows.  A group whose best zero lies outside
# [−limit, maxq + limit] (values crowded far from 0) is searched again within it.
FLOAT_ZERO_LIMIT = 128.0
# Unbracketed search (``bracket=None``): the integer zeros ranked best by the coarse
# grid whose exact sweep over every scale is run.
NEUQI_INT_ZEROS = 3
# At most this many integer zeros (those nearest min-max's) enter the coarse ranking.
NEUQI_INT_MAX_ZEROS = 16
# Bracketed search (the default): the coarse grid's lowest valleys (local minima over
# zero and scale), each swept exactly within NEUQI_INT_BRACKET grid points of it.
# At 4-bit g64 on SmolLM2's block 3, 4 valleys leave 3 groups in 56k more than 0.5%
# above the sweep over every scale (worst 1.9%), 3 valleys 5 groups above 1% (worst
# 27%); bracketing only the lowest grid point of each of the 3 best zeros left 16
# groups above 1% (worst 45%).  At 3 bits 2 valleys suffice (worst 0.09%).
NEUQI_INT_VALLEYS = {7: 2}  # maxq → valleys; 4 for any other maxq
NEUQI_INT_BRACKET = 2
# Up to this many breakpoints per weight (zeros × maxq: 2 bits has 4 × 3) the exact
# sweep over every scale for every zero costs no more than the coarse grid (SmolLM2
# block 3 at 2-bit g64: 3.1–3.7 s against 3.2–5.1 s in two runs), and it is exhaustive.
NEUQI_INT_EXHAUSTIVE_EVENTS = 12
# Coarse ratios past NEUQI_MAX_RATIO that the bracketed search also scores: on that
# block at 2-bit g64 one group in 3500 has its best integer-zero grid beyond 1.25·s₀
# (up to 2.74·s₀), and such groups lost up to 5x when the search stopped at 1.25·s₀.
NEUQI_INT_TAIL = tuple(1.25 + i / 32 for i in range(1, 25)) + tuple(2.0 + i / 8 for i in range(1, 9))


# The direct-evaluation kernels (the multi-start points, the L_p losses; the
# integer-zero coarse grid takes ``INT_GRID_CHUNK_SCALE``) reduce each candidate over
# its group without storing ``[G, K, (Z,) n]``, so they take chunks this many times the
# common size.  On SmolLM2's block 3 (CPU) that made the
# integer-zero search 8-12% faster at 3b/4b g64 and 3b channel-wise, and NeUQI_int
# with ``init_norm`` 3 1.5x faster at 3b g64; the float-zero searches' sweeps store
# per-event tensors and ran slower with larger chunks, so they keep the common size.
DIRECT_CHUNK_SCALE = 4
# The integer-zero coarse grid (:func:`_int_zero_ranks_chunk`: losses, valleys) takes
# chunks four times larger again: its Python work per chunk (the valleys, the top few)
# was a fifth of NeUQI_int's search on SmolLM2's block 3.  There the search took 1.6-1.7 s
# against 2.2-2.4 s at 3-bit g64, 3.1-3.3 s against 4.0-4.2 s at 4-bit g64 and 1.6-1.8 s
# against 1.9-2.0 s at 3-bit channel-wise, to the same parameters (2026-12-08); 32 and 64
# were no faster.  A chunk's [g, K, Z] losses are then 4 MB at 4-bit g64 on the CPU.
INT_GRID_CHUNK_SCALE = 16


def _int_zero_losses_chunk(wg: Tensor, hg: Tensor, s: Tensor, z: Tensor, maxq: int) -> Tensor:
    """The loss at every scale ``s: [G, K]`` for every zero ``z: [G, Z]`` → ``[G, K, Z]``.

    One call for all zeros: the compiled kernel reduces over the group without
    storing ``[G, K, Z, n]``, and one call per zero cost as much in call overhead
    as in arithmetic (SmolLM2 block 3, 4-bit g64).  Multiplying by ``1/s`` instead of
    dividing by ``s`` per weight made it 1.3x faster there (CPU)."""
    u = wg[:, None, None, :] * (1.0 / s)[:, :, None, None]
    v = u + z[:, None, :, None]
    e = v - torch.clamp(torch.round(v), 0, maxq)
    return (hg[:, None, None, :] * e * e).sum(-1) * (s * s)[:, :, None]


def _candidate_int_zeros(wg: Tensor, s0: Tensor, maxq: int) -> Tensor:
    """The integer zeros an integer-zero search tries, ``[G, Z]``: all of ``0..maxq``,
    or the ``NEUQI_INT_MAX_ZEROS`` nearest min-max's zero when there are more."""
    G = wg.shape[0]
    n_zeros = min(maxq + 1, NEUQI_INT_MAX_ZEROS)
    if n_zeros == maxq + 1:
        # materialised: a broadcast [G, Z] has stride 0 except where G is 1, and the
        # compiled kernel that takes it would compile again for a single group
        return torch.arange(maxq + 1, device=wg.device, dtype=wg.dtype).repeat(G, 1)
    centre = torch.clamp(torch.round(-wg.amin(1) / s0) - n_zeros // 2, 0, maxq + 1 - n_zeros)
    return centre[:, None] + torch.arange(n_zeros, device=wg.device, dtype=wg.dtype)


def _init_neuqi_int(
    wg: Tensor, hg: Tensor, maxq: int, coarse: int = NEUQI_COARSE,
    max_ratio: float = NEUQI_MAX_RATIO, keep: int | None = NEUQI_INT_ZEROS,
    bracket: int | None = NEUQI_INT_BRACKET, max_clip: float | None = None,
) -> tuple[Tensor, Tensor]:
    """NeUQI_int: best integer zero with the best scale for it
    (:func:`fixed_zero_search` over the integer zeros near min-max's).

    The reference searches a grid of 2048 scales in ``(0, s₀]`` for every integer
    zero.  Min-max is kept for a group where it is strictly better.  ``max_clip``
    (≥ ½) keeps every weight within that many steps beyond the grid's ends: each
    zero's scales start at the least that allows it (:func:`clip_scale_floor`).
    """
    s0 = minmax_scale(wg, maxq)
    zeros = _candidate_int_zeros(wg, s0, maxq)
    if zeros.shape[1] * maxq <= NEUQI_INT_EXHAUSTIVE_EVENTS:
        keep, bracket = None, None
    floor = None if max_clip is None else clip_scale_floor(
        wg.amin(1, keepdim=True), wg.amax(1, keepdim=True), zeros, maxq, max_clip)
    scale, zero = fixed_zero_search(wg, hg, maxq, zeros, s0, keep, bracket, coarse, max_ratio, floor)
    ok = torch.isfinite(scale) & (scale > 0)
    mm_s, mm_z = _init_minmax(wg, maxq, 1.0)
    scale = torch.where(ok, scale, mm_s)
    zero = torch.where(ok, zero, mm_z)
    better = group_loss(wg, hg, scale, zero, maxq) <= group_loss(wg, hg, mm_s, mm_z, maxq)
    return torch.where(better, scale, mm_s), torch.where(better, zero, mm_z)


def clip_scale_floor(w_min: Tensor, w_max: Tensor, z: Tensor, maxq: int, max_clip: float) -> Tensor:
    """The least scale at which zero ``z`` keeps a group's weights within ``max_clip``
    steps beyond the grid's ends: its minimum ``w_min`` no lower than ``−max_clip`` in
    codes, its maximum ``w_max`` no higher than ``maxq + max_clip`` (broadcast shapes;
    huge where ``z`` leaves no room).  Used by the float and the integer-zero searches."""
    need_lo = torch.where(w_min < 0, -w_min / (z + max_clip).clamp_min(1e-12), 0.0)
    need_hi = torch.where(w_max > 0, w_max / (maxq + max_clip - z).clamp_min(1e-12), 0.0)
    return torch.maximum(need_lo, need_hi)


def fixed_zero_search(
    wg: Tensor, hg: Tensor, maxq: int, zeros: Tensor, s0: Tensor, keep: int | None = None,
    bracket: int | None = NEUQI_INT_BRACKET, coarse: int = NEUQI_COARSE, max_ratio: float = NEUQI_MAX_RATIO,
    s_floor: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """The best ``(scale, zero)`` per group over candidate zero-points ``zeros: [G, Z]``
    held fixed (integer zeros, or a symmetric type's), each with its best scale.

    Every zero is first scored on the coarse grid ``s₀·i/coarse`` up to ``max_ratio``
    (direct evaluation, one pass over the group per point).  With ``bracket`` None,
    the ``keep`` best zeros (all when None) get the exact sweep over every scale
    (:func:`_scale_sweep_chunk`, ``n·maxq`` events per zero).  Otherwise the grid
    also has the sparse tail ``NEUQI_INT_TAIL``, and the lowest few local minima over
    (zero, scale) (``NEUQI_INT_VALLEYS``) each get the exact sweep within ``bracket`` grid
    points (:func:`_bracket_sweep_chunk`, a few events per weight): at 4 bits a
    zero's loss has several valleys of nearly equal depth, and the grid's lowest
    point is often in the wrong one.  ``s0: [G]`` is the scale the ratios multiply.
    ``s_floor: [G, Z]`` (optional) is each zero's least allowed scale.
    Returns ``(scale, zero)``, ``[G]``.
    """
    G, n = wg.shape
    Z = zeros.shape[1]
    keep = Z if keep is None else min(keep, Z)
    if bracket is None and keep == Z:
        return _chunked_scale_sweep(wg, hg, maxq, zeros.contiguous(), s_floor)
    ratios = torch.arange(1, round(coarse * max_ratio) + 1, device=wg.device, dtype=wg.dtype) / coarse
    if bracket is not None:  # the sparse tail: a fixed zero's best grid is sometimes wider
        ratios = torch.cat([ratios, torch.tensor(NEUQI_INT_TAIL, device=wg.device, dtype=wg.dtype)])
    K = ratios.numel()
    chunk = _chunk_rows(n * K, wg.device) * INT_GRID_CHUNK_SCALE
    # Each chunk's [g, K, Z] losses are reduced to what the next step needs while
    # they are in cache: the best zeros (unbracketed) or the lowest valleys.
    picks = min(keep, Z) if bracket is None else min(NEUQI_INT_VALLEYS.get(maxq, 4), K * Z)
    top = torch.empty(G, picks, device=wg.device, dtype=torch.long)
    for c, start in enumerate(range(0, G, chunk)):
        part = slice(start, start + chunk)
        floor = None if s_floor is None else s_floor[part]
        ranked = _run_sweep(_int_zero_ranks_chunk, wg[part], hg[part], s0[part, None] * ratios[None, :],
                            zeros[part], maxq, floor, bracket is not None)
        top[part] = ranked.topk(picks, dim=1, largest=False).indices
        _trim(c, wg.device)
    if bracket is None:
        return _chunked_scale_sweep(wg, hg, maxq, zeros.gather(1, top).contiguous(),
                                    None if s_floor is None else s_floor.gather(1, top).contiguous())
    i, zi = torch.div(top, Z, rounding_mode="floor"), top % Z
    lo = torch.where(i >= bracket, ratios[(i - bracket).clamp_min(0)], ratios[0] / 2)
    hi = torch.where(i + bracket < K, ratios[(i + bracket).clamp_max(K - 1)], ratios[-1] * 1.25)
    s_lo, s_hi = s0[:, None] * lo, s0[:, None] * hi
    if s_floor is not None:
        s_lo = torch.maximum(s_lo, s_floor.gather(1, zi))
        s_hi = torch.maximum(s_hi, s_lo)
    return _chunked_bracket_sweep(wg, hg, maxq, zeros.gather(1, zi).contiguous(), s_lo, s_hi)


def _int_zero_ranks_chunk(
    wg: Tensor, hg: Tensor, s: Tensor, zeros: Tensor, maxq: int, s_floor: Tensor | None, valleys: bool
) -> Tensor:
    """What :func:`fixed_zero_search` ranks, from the losses at every scale ``s: [g, K]``
    for every zero ``zeros: [g, Z]`` (:func:`_int_zero_losses_chunk`) in one compiled
    call: with ``valleys`` each local minimum over the scale (:func:`_valleys`, ``[g, K·Z]``),
    else each zero's least loss (``[g, Z]``).  Scales below a zero's ``s_floor: [g, Z]``
    (its grid would clip too far) do not count."""
    losses = _int_zero_losses_chunk(wg, hg, s, zeros, maxq)
    if s_floor is not None:
        losses = torch.where(s[:, :, None] < s_floor[:, None, :], torch.inf, losses)
    return _valleys(losses) if valleys else losses.amin(1)


def _valleys(losses: Tensor) -> Tensor:
    """``losses: [g, K, Z]`` (K scales, Z zeros) → ``[g, K·Z]``: each loss where it is a
    local minimum over the scale (no higher than either neighbour), inf elsewhere."""
    inf = torch.full_like(losses[:, :1], torch.inf)
    padded = torch.cat([inf, losses, inf], dim=1)
    valley = (losses <= padded[:, :-2]) & (losses <= padded[:, 2:])
    return torch.where(valley, losses, torch.inf).reshape(losses.shape[0], -1)


def _chunked_bracket_sweep(
    wg: Tensor, hg: Tensor, maxq: int, zeros: Tensor, s_lo: Tensor, s_hi: Tensor
) -> tuple[Tensor, Tensor]:
    """:func:`_bracket_sweep_chunk` over chunks of groups; returns ``(scale, zero)``.

    The events per weight are bounded per chunk by ``max |w|·(1/s_lo − 1/s_hi)``:
    one host sync per chunk, not per candidate."""
    G, n = wg.shape
    Z = zeros.shape[1]
    span = wg.abs().amax(1, keepdim=True) * (1 / s_lo - 1 / s_hi)  # [G, Z] boundaries crossed
    budget = _CHUNK_ELEMENTS.get(wg.device.type, 1 << 20)
    chunk = max(1, budget // (n * Z * 3))  # sized for the typical 2–3 events per weight
    scales, zero_pts = [], []
    for j, i in enumerate(range(0, G, chunk)):
        part = slice(i, i + chunk)
        events = min(maxq, int(span[part].amax().ceil()) + 1)
        s, z, _ = _run_sweep(_bracket_sweep_chunk, wg[part], hg[part], maxq, zeros[part], s_lo[part],
                             s_hi[part], events)
        scales.append(s)
        zero_pts.append(z)
        _trim(j, wg.device)
    return torch.cat(scales), torch.cat(zero_pts)


# The L_p search (``norm`` ≠ 2): scale ratios tried first (s₀·i/32 up to 1.25·s₀) with
# every integer zero, then steps of s₀/512 within ±1/32 around the best two pairs with
# their zeros and both neighbours.
LP_COARSE = 32
LP_FINE = 512
LP_KEEP = 2
# Float zero (``neuqi``): reweighted rounds of the exact squared-error search.
LP_IRLS_ROUNDS = 1
# Errors below this fraction of a step keep this much of their weight in a reweighted
# round (an exact fit would otherwise get weight 0 and be free to move).
LP_IRLS_FLOOR = 0.1


def check_max_clip(max_clip: float | None, init: str, norm: float) -> str | None:
    """Why a clip bound of ``max_clip`` steps cannot apply (None when it can).  With an
    integer zero it must be at least ½: min-max's point, the search's fallback, lies
    within half a step of the grid."""
    if max_clip is None:
        return None
    if init == "neuqi" and max_clip >= 0:
        return None
    if init == "neuqi_int" and max_clip >= 0.5 and norm == 2.0:
        return None
    return (f"max_clip applies to init 'neuqi' (>= 0) or 'neuqi_int' (>= 0.5, squared error), "
            f"got {max_clip!r} with init {init!r}" + (f" and norm {norm:g}" if norm != 2.0 else ""))


def check_search(search: str | None, init: str, norm: float, max_clip: float | None) -> str | None:
    """Why ``search`` cannot apply (None when it can): it picks among the float-zero
    searches of the squared error, and a clip bound needs the grid search."""
    if search is None:
        return None
    if search not in NEUQI_SEARCHES:
        return f"search must be one of {NEUQI_SEARCHES}, got {search!r}"
    if init != "neuqi" or norm != 2.0:
        return f"search {search!r} applies to init 'neuqi' with the squared error (norm 2)"
    if max_clip is not None and search != "grid":
        return "a clip bound takes the grid search"
    return None


def check_init_norm(norm: float, init: str) -> str | None:
    """Why ``norm`` cannot go with ``init`` (None when it can): the L_p objective is
    NeUQI's or NeUQI_int's search with another exponent."""
    if not 1.0 <= norm <= 8.0:
        return f"the init norm must be in [1, 8], got {norm!r}"
    if norm != 2.0 and init not in ("neuqi", "neuqi_int"):
        return f"an init norm other than 2 needs init 'neuqi' or 'neuqi_int', got {init!r}"
    return None


def _lp_losses_chunk(wg: Tensor, hg: Tensor, s: Tensor, z: Tensor, maxq: int, norm: float) -> Tensor:
    """``Σ_j h_j |w_j − ŵ_j|^norm`` for every candidate ``(s, z)``, both ``[G, K]`` → ``[G, K]``."""
    u = wg[:, None, :] * (1.0 / s)[:, :, None]  # one division per scale, not per weight
    v = u + z[:, :, None]
    e = (v - torch.clamp(torch.round(v), 0, maxq)).abs()
    ep = e * e * e if norm == 3.0 else e.pow(norm)  # a cube by products: no exp/log
    return (hg[:, None, :] * ep).sum(-1) * s.pow(norm)


def lp_losses(wg: Tensor, hg: Tensor, s: Tensor, z: Tensor, maxq: int, norm: float) -> Tensor:
    """:func:`_lp_losses_chunk` over chunks of groups; ``s, z: [G, K]``."""
    G, n = wg.shape
    chunk = _chunk_rows(n * s.shape[1], wg.device) * DIRECT_CHUNK_SCALE
    out = []
    for i, start in enumerate(range(0, G, chunk)):
        part = slice(start, start + chunk)
        out.append(_run_sweep(_lp_losses_chunk, wg[part], hg[part], s[part], z[part], maxq, norm))
        _trim(i, wg.device)
    return torch.cat(out)


def _init_int_lp(
    wg: Tensor, hg: Tensor, maxq: int, norm: float,
    coarse: int = LP_COARSE, fine: int = LP_FINE, max_ratio: float = NEUQI_MAX_RATIO,
    keep: int = LP_KEEP,
) -> tuple[Tensor, Tensor]:
    """Integer zero and scale minimising ``Σ_j h_j |w_j − ŵ_j|^norm`` per group.

    Why another exponent: with LDLQ's error feedback after it, a small rounding
    error is largely made up by the later columns, a large (clipping) one is not;
    norm 3 weighs large errors more.  On SmolLM2 at 2-bit g64 it took wiki-sample
    perplexity from 272 (norm 2) to 187 (docs/results/param-choice-smollm2-135m.md).
    No exact zero exists here, so the search is a grid: every integer zero at
    ``s₀·i/coarse`` up to ``max_ratio·s₀``, then ``s₀/fine`` steps within
    ``±s₀/coarse`` of the ``keep`` best pairs, each with its zero and both
    neighbours.  Min-max is kept where it is better.
    """
    G = wg.shape[0]
    s0 = minmax_scale(wg, maxq)
    zeros = _candidate_int_zeros(wg, s0, maxq)
    n_zeros = zeros.shape[1]
    ratios = torch.arange(1, round(coarse * max_ratio) + 1, device=wg.device, dtype=wg.dtype) / coarse
    K = ratios.numel()
    s = (s0[:, None] * ratios[None, :]).repeat_interleave(n_zeros, dim=1)  # [G, K·Z]
    z = zeros.repeat(1, K)
    top = lp_losses(wg, hg, s, z, maxq, norm).topk(keep, dim=1, largest=False).indices
    half = fine // coarse
    steps = torch.arange(-half, half + 1, device=wg.device, dtype=wg.dtype) / fine
    around = torch.tensor([-1.0, 0.0, 1.0], device=wg.device, dtype=wg.dtype)
    # [G, keep·steps·3]: every kept pair's neighbourhood
    s = (s.gather(1, top)[:, :, None] + s0[:, None, None] * steps[None, None, :])
    s = s.clamp_min(s0[:, None, None] / fine)[..., None].expand(-1, -1, -1, 3).reshape(G, -1)
    z = torch.clamp(z.gather(1, top)[:, :, None, None] + around, 0, maxq)
    z = z.expand(-1, -1, steps.numel(), -1).reshape(G, -1)
    mm_s, mm_z = _init_minmax(wg, maxq, 1.0)  # a candidate too: never worse than min-max
    s, z = torch.cat([mm_s[:, None], s], dim=1), torch.cat([mm_z[:, None], z], dim=1)
    best = lp_losses(wg, hg, s, z, maxq, norm).argmin(1, keepdim=True)
    return s.gather(1, best).squeeze(1), z.gather(1, best).squeeze(1)


def _init_float_lp(
    wg: Tensor, hg: Tensor, maxq: int, norm: float, rounds: int = LP_IRLS_ROUNDS, **neuqi_kw
) -> tuple[Tensor, Tensor]:
    """Float zero and scale for ``Σ_j h_j |w_j − ŵ_j|^norm``, by reweighting.

    For the codes of a grid, ``|e|^norm = (|e|^(norm−2)) · e²``: the exact squared-error
    search (:func:`_init_neuqi`) runs again with weights ``h_j · |e_j/s|^(norm−2)`` from
    the last grid's errors (iteratively reweighted least squares), floored at
    ``LP_IRLS_FLOOR``.  Each group keeps the grid with the lowest ``|e|^norm`` loss, the
    squared-error grid included, so a round never makes a group worse.
    """
    def lp(s: Tensor, z: Tensor) -> tuple[Tensor, Tensor]:
        e = (wg - s[:, None] * (torch.clamp(torch.round(wg / s[:, None] + z[:, None]), 0, maxq)
                                - z[:, None])).abs()
        return (hg * e.pow(norm)).sum(1), e / s[:, None]

    s, z = _init_neuqi(wg, hg, maxq, **neuqi_kw)
    best_l, e = lp(s, z)
    best_s, best_z = s, z
    for _ in range(rounds):
        s, z = _init_neuqi(wg, hg * e.clamp_min(LP_IRLS_FLOOR).pow(norm - 2), maxq, **neuqi_kw)
        loss, e = lp(s, z)
        better = loss < best_l
        best_s, best_z = torch.where(better, s, best_s), torch.where(better, z, best_z)
        best_l = torch.where(better, loss, best_l)
    return best_s, best_z


def dense_scale_search(
    w: Tensor, spec: QuantSpec, h_diag: Tensor | None, n_scales: int = 1000, max_ratio: float = 1.25
) -> Tensor:
    """Reference optimum for benchmarks and tests: ``n_scales`` scales evenly in
    ``(0, max_ratio·s₀]``, each with its exact best float zero.  Returns the best
    weighted error per group ``[out·n_groups]`` (float64).  Slow by design."""
    wg, hg, _ = to_groups(w, spec, h_diag)
    s0 = minmax_scale(wg, spec.maxq)
    best = torch.full((wg.shape[0],), float("inf"), dtype=torch.float64, device=w.device)
    for i in range(1, n_scales + 1):
        s = s0 * (max_ratio * i / n_scales)
        _, loss = best_zero(wg / s[:, None], hg, spec.maxq)
        best = torch.minimum(best, loss.double() * s.double() ** 2)
    return best


def init_params(
    w: Tensor,
    spec: QuantSpec,
    method: InitMethod = "neuqi",
    h_diag: Tensor | None = None,
    *,
    clip: float = 1.0,
    grid: int | None = None,
    max_clip: float | None = None,
    norm: float = 2.0,
    search: str | None = None,
) -> QuantParams:
    """Scale and zero-point per (row, group) of ``w: [out, in]``.

    ``h_diag: [in]`` weights the objective ``Σ_j h_j (w_j − ŵ_j)²`` (None: uniform).
    ``clip`` shrinks the min-max range (MagR's recipe); ``grid`` overrides the number
    of shrink steps of ``mse``.  ``max_clip`` (NeUQI only) bounds how many steps
    beyond the grid's ends any weight may lie (None: no bound, the paper's method).
    ``norm`` (``neuqi``, ``neuqi_int``) replaces the squared error by ``|w − ŵ|^norm``
    (:func:`_init_float_lp`, :func:`_init_int_lp`).  ``search`` (``neuqi`` with the
    squared error, no ``max_clip``) forces one of ``NEUQI_SEARCHES`` (None: by row length).
    Returns ``QuantParams(scale, zero)`` with shapes ``[out, n_groups]``.
    """
    check_weight(w)
    if method not in INIT_METHODS:
        raise ValueError(f"unknown init method {method!r}; choose one of {INIT_METHODS}")
    if h_diag is not None:
        if h_diag.shape != (w.shape[1],):
            raise ValueError(
                f"h_diag must have shape [in]={w.shape[1]}, got {tuple(h_diag.shape)}"
            )
        check_finite("h_diag", h_diag)
    if (why := check_max_clip(max_clip, method, norm)) is not None:
        raise ValueError(why)
    if (why := check_init_norm(norm, method)) is not None:
        raise ValueError(why)
    if (why := check_search(search, method, norm, max_clip)) is not None:
        raise ValueError(why)
    out = w.shape[0]
    wg, hg, n_groups = to_groups(w, spec, h_diag)
    rows = slice_rows(wg)
    parts = [_group_params(wg[i : i + rows], hg[i : i + rows], spec.maxq, method, clip, grid,
                           max_clip, norm, search)
             for i in range(0, max(wg.shape[0], 1), rows)]
    scale, zero = (torch.cat(x) if len(parts) > 1 else x[0] for x in zip(*parts, strict=True))
    return QuantParams(scale.reshape(out, n_groups), zero.reshape(out, n_groups))


# Weights per call of a search on the CPU: a layer's groups go through the whole search
# in slices of this many weights (the GGUF searches: slices of rows), so that its
# full-size temporaries ([G, n], [G, K, n]) stay below glibc's mmap threshold (32 MB)
# and in cache.  Whole, a 4096 x 4096 layer at 3-bit g128 spent a fifth of its search's
# CPU time in the kernel, mapping and faulting in fresh pages (~800k minor faults); in
# slices of 2^19 weights the search took ~20 % less wall time (8.7-9.3 s against
# 7.0-7.6 s), to the same parameters bit for bit.  A 2048 x 1536 layer's GGUF search:
# Q4_1 ~20 % less, Q2_K 7 %, Q3_K 5 % (2026-12-07, ninth session).  A GPU wants the
# largest launches: no slicing there.
_OUTER_ELEMENTS = {"cpu": 1 << 19}


def slice_rows(wg: Tensor) -> int:
    """Rows per slice of ``wg: [rows, n]`` (groups, or a layer's rows for the GGUF
    searches) so that a slice holds ``_OUTER_ELEMENTS`` weights (all rows off the CPU)."""
    G, n = wg.shape
    limit = _OUTER_ELEMENTS.get(wg.device.type)
    return max(G, 1) if limit is None else max(1, limit // max(n, 1))


def _group_params(
    wg: Tensor, hg: Tensor, maxq: int, method: str, clip: float, grid: int | None,
    max_clip: float | None, norm: float, search: str | None,
) -> tuple[Tensor, Tensor]:
    """:func:`init_params`'s ``(scale, zero)`` for the group rows ``wg, hg: [G, n]``, each ``[G]``."""
    if method == "minmax":
        scale, zero = _init_minmax(wg, maxq, clip)
    elif method == "mse":
        scale, zero = _init_mse(wg, hg, maxq, grid=grid or 100)
    elif method == "neuqi":
        if norm != 2.0:
            scale, zero = _init_float_lp(wg, hg, maxq, norm, max_clip=max_clip)
        else:
            scale, zero = _init_neuqi(wg, hg, maxq, search=search, max_clip=max_clip)
        far = torch.nonzero((zero < -FLOAT_ZERO_LIMIT) | (zero > maxq + FLOAT_ZERO_LIMIT),
                            as_tuple=True)[0]
        if far.numel():  # rare: near-constant groups far from 0; search them again bounded
            scale[far], zero[far] = _init_neuqi(wg[far], hg[far], maxq, max_clip=max_clip,
                                                zero_limit=FLOAT_ZERO_LIMIT)
    elif norm != 2.0:
        scale, zero = _init_int_lp(wg, hg, maxq, norm)
    else:
        scale, zero = _init_neuqi_int(wg, hg, maxq, max_clip=max_clip)
    return scale, zero


def warm_up(
    n_in: int, spec: QuantSpec, method: InitMethod = "neuqi", *, max_clip: float | None = None,
    norm: float = 2.0, search: str | None = None, device: torch.device | str = "cpu",
) -> threading.Thread | None:
    """Compile the search a run will use, in a background thread, while the caller works.

    ``torch.compile``'s start-up in a fresh process (tracing, then the inductor cache or
    the compiler) otherwise falls inside the first linear's search: ~3.4 s of a 3-bit g64
    SmolLM2 run even with a warm cache.  Started before the model's first forward passes,
    it runs beside them.  The kernels take dynamic shapes, so a few random groups of the
    run's length (``spec.group_size``, or ``n_in`` channel-wise) compile what the real
    groups reuse; :func:`_run_sweep` lets one compiled call run at a time, so a search
    that reaches a kernel first waits rather than compiling it twice.  The random data
    come from a generator of their own: the caller's random state is untouched.

    Returns the thread (join it to wait), or None where nothing would be compiled
    (``NEUQI_COMPILE=0``, ``minmax`` or ``mse``)."""
    if os.environ.get("NEUQI_COMPILE", "1") == "0" or method not in ("neuqi", "neuqi_int"):
        return None
    n = spec.group_size if spec.group_size > 0 else n_in
    gen = torch.Generator().manual_seed(0)
    # 6 groups: a count no other dimension of the kernels has (zeros 4, 8, 16; valleys
    # 2, 4), which the compiler would otherwise assume equal to it, and compile again.
    w = torch.randn(6, n, generator=gen).to(device)
    h = (torch.rand(n, generator=gen) + 0.1).to(device)

    def compile_searches() -> None:
        try:
            init_params(w, spec, method, h, max_clip=max_clip, norm=norm, search=search)
            if method == "neuqi_int" and norm == 2.0:
                # The bracketed sweep's event count differs from chunk to chunk: the
                # kernel specialises on the first and compiles a general one for the
                # next, so both are compiled here.
                wg, hg, _ = to_groups(w, spec, h)
                m = NEUQI_INT_VALLEYS.get(spec.maxq, 4)
                zeros = torch.zeros(wg.shape[0], m, device=wg.device, dtype=wg.dtype)
                s_hi = minmax_scale(wg, spec.maxq)[:, None].expand(-1, m).contiguous()
                for events in (2, 3):
                    _run_sweep(_bracket_sweep_chunk, wg, hg, spec.maxq, zeros, 0.9 * s_hi, s_hi, events)
        except Exception as exc:  # the run then compiles (or falls back) as it goes
            log.debug("search warm-up failed: %s", exc)

    thread = threading.Thread(target=compile_searches, name="neuqi-compile-warm-up", daemon=True)
    thread.start()
    return thread
