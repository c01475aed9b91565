"""GPTQ and LDLQ: round columns one by one, feeding the error back through H.

Both minimise the proxy loss ``tr((W − Ŵ) H (W − Ŵ)ᵀ)`` greedily, column by column,
with the quantization parameters fixed up front (NEUQI_NOTES "Where init happens"):

* GPTQ takes the upper Cholesky factor of ``H⁻¹`` and pushes each column's
  error onto the columns not yet quantized (lazy block updates, one matmul per block).
* LDLQ writes ``H = U D Uᵀ`` with ``U`` unit upper triangular (Cholesky of the
  flipped matrix) and quantizes ``ŵ_k = Q(w_k + Σ_{j<k} U_{jk} (w_j − ŵ_j))``.

The two give the same codes in exact arithmetic (QuIP, Thm. 6); a test checks it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from neuqi.quant.descent import descend_codes
from neuqi.quant.gguf_refit import gguf_refit
from neuqi.quant.gguf_types import GGUFType, gguf_params
from neuqi.quant.grid import QuantParams, QuantSpec, check_finite, check_weight, dequantize
from neuqi.quant.init import InitMethod, check_init_norm, check_max_clip, check_search, init_params
from neuqi.quant.magr import magr_preprocess
from neuqi.quant.refit import refit_params, row_losses

Algorithm = Literal["gptq", "ldlq", "rtn"]
ALGORITHMS: tuple[str, ...] = ("gptq", "ldlq", "rtn")


@dataclass
class GPTQResult:
    """What a solver returns. ``codes: [out, in]`` uint8 in storage (original) order."""

    codes: Tensor
    params: QuantParams
    perm: Tensor | None  # processing order of the columns (act-order), None if natural
    g_idx: Tensor  # group of every input column, [in]
    stats: dict = field(default_factory=dict)


def damp_hessian(H: Tensor, damp: float, dtype: torch.dtype = torch.float64) -> Tensor:
    """``H + damp · mean(diag H) · I`` in ``dtype``; dead inputs (diag 0) get 1."""
    Hd = H.to(dtype, copy=True)  # one copy, whatever H's dtype
    torch.diagonal(Hd).copy_(_damped_diag64(H, damp))
    return Hd


def shrink_hessian(H: Tensor, shrink: float) -> Tensor:
    """``(1 − shrink)·H + shrink·diag(H)``: the correlations between inputs shrunk toward
    none, each input's own weight (the diagonal) kept.

    A calibration sample estimates the diagonal far better than the correlations, and
    the error feedback trusts the correlations: on SmolLM2's 1536-wide ``down_proj`` at
    Q2_K/Q3_K, LDLQ fitted to 16k tokens is worse on other tokens than no feedback at
    all.  Damping (``damp``) adds the same constant to every input, which barely touches
    the inputs with large activations; shrinking scales every correlation alike.  There,
    on a held-out split, it beat damping at 32 × 512 calibration tokens and equalled it at
    128 × 512; end to end (Q2_K) the two gave the same file quality."""
    if not shrink:
        return H
    Hs = H * (1.0 - shrink)
    torch.diagonal(Hs).copy_(torch.diagonal(H))
    return Hs


# Shrink amounts tried by :func:`choose_shrink` on half the calibration tokens, in
# increasing order; the search climbs from SHRINK_START toward the lower held-out loss.
SHRINK_GRID: tuple[float, ...] = (0.0, 0.3, 0.5, 0.7, 0.8, 0.9, 0.95, 0.98)
SHRINK_START = 4
# rows of W that :func:`choose_shrink`'s trial solves use (evenly spaced; all if fewer)
SHRINK_ROWS: int | None = 512


def choose_shrink(
    W: Tensor, params: QuantParams, spec: QuantSpec, H_fit: Tensor, H_score: Tensor, *,
    damp: float, algorithm: str = "ldlq", act_order: bool = True, block_size: int = 128,
    max_rows: int | None = SHRINK_ROWS, factor_dtype: torch.dtype = torch.float32,
    start: float | None = None,
) -> tuple[float, dict[float, float]]:
    """The ``shrink`` for H estimated from all calibration tokens, chosen on held-out ones.

    ``W: [out, in]`` is solved with the fixed ``params`` against ``H_fit`` (half the
    calibration windows) shrunk by each candidate, and each solution is scored on
    ``H_score: [in, in]`` (the other half): ``tr((W − Ŵ) H_score (W − Ŵ)ᵀ)``, the
    output error on tokens the solve did not see.  The loss over :data:`SHRINK_GRID`
    is one valley in practice, so the search climbs from ``start`` (the grid value
    nearest it; :data:`SHRINK_START` when None) to the neighbour that lowers it (3–6
    factorisations, not 8).  The pipeline starts each linear where the same linear of
    the previous layer ended, which usually leaves three.

    The trials are cheaper than the final solve.  Rows are independent given H, so
    ``max_rows`` evenly spaced rows (all when None or fewer) estimate the loss, the
    same rows for every candidate; and the trial factorisations run in
    ``factor_dtype`` (a shrunk, damped H is well conditioned).  The final solve stays
    in float64 on every row.

    The amount found for half the tokens is too much for all of them: the noise in
    the estimated correlations falls as 1/tokens, and if the best amount is
    ``noise / (noise + signal)`` then halving the noise maps ``a`` to ``a / (2 − a)``
    (0.9 → 0.82).  On Qwen2.5-Coder-1.5B's block-2 ``down_proj`` at Q3_K (16 × 512
    tokens, 8960 inputs) this picks 0.82; the best on 64 × 512 other tokens was 0.8.

    Returns ``(shrink for the full H, {candidate: held-out loss})``; the grid value
    chosen is the candidate of lowest loss.
    """
    out, n = W.shape
    rows = (torch.linspace(0, out - 1, max_rows, device=W.device).round().long()
            if max_rows is not None and out > max_rows else None)
    perm = (torch.argsort(torch.diagonal(H_fit), descending=True, stable=True) if act_order
            else torch.arange(n, device=W.device))
    # shrinking keeps the diagonal, so one order serves all candidates; the score is a
    # trace, the same in any order, so it is taken in the processing order too
    Hp = H_fit[perm[:, None], perm]
    Hs = H_score.float()[perm[:, None], perm]
    S, Z = params.expand(spec, n)
    W = W.float()
    if rows is not None:
        W, S, Z = W[rows], S[rows], Z[rows]
    Wt, St, Zt = W.t()[perm].contiguous(), S.t()[perm].contiguous(), Z.t()[perm].contiguous()
    del S, Z
    losses: dict[float, float] = {}

    def loss(i: int) -> float:
        a = SHRINK_GRID[i]
        if a not in losses:
            F, _ = _factor(shrink_hessian(Hp, a), damp, algorithm, dtype=factor_dtype)
            codes = _solve(Wt, F, St, Zt, spec.maxq, algorithm, block_size)
            D = Wt - St * (codes - Zt)  # [in, rows], processing order
            losses[a] = float(((Hs @ D) * D).sum())
        return losses[a]

    i = (SHRINK_START if start is None
         else min(range(len(SHRINK_GRID)), key=lambda j: abs(SHRINK_GRID[j] - start)))
    while True:  # climb to the neighbour with the lower held-out loss
        nbrs = [j for j in (i - 1, i + 1) if 0 <= j < len(SHRINK_GRID)]
        j = min(nbrs, key=loss)
        if loss(j) >= loss(i):
            break
        i = j
    a = SHRINK_GRID[i]
    return a / (2.0 - a), losses


def damped_diagonal(H: Tensor, damp: float) -> Tensor:
    """The diagonal of :func:`damp_hessian` (float32) without the n×n copy."""
    return _damped_diag64(H, damp).float()


def _damped_diag64(H: Tensor, damp: float) -> Tensor:
    diag = torch.diagonal(H).double().clone()
    diag[diag <= 0] = 1.0
    diag += damp * diag.mean()
    return diag


def with_damping(fn, H: Tensor, damp: float, max_tries: int = 8,
                 dtype: torch.dtype = torch.float64) -> tuple[Tensor, float]:
    """``fn(H damped)``, raising the damping tenfold until it gives a finite result.

    Returns ``(fn's result, damp_used)``.  ``fn`` factors (it may raise
    ``LinAlgError``); every caller that factors a damped H goes through here, so a
    near-singular H is steadied the same way everywhere.
    """
    d = damp
    for _ in range(max_tries):
        try:
            F = fn(damp_hessian(H, d, dtype))
            if torch.isfinite(F).all():
                return F, d
        except torch.linalg.LinAlgError:
            pass
        d = d * 10 if d > 0 else 1e-6
    raise ValueError(
        f"H could not be factorised even with damping {d / 10:g}; the calibration "
        f"activations may be degenerate (try more samples or a larger --damp)"
    )


def _factor(H: Tensor, damp: float, algorithm: str, max_tries: int = 8,
            dtype: torch.dtype = torch.float64) -> tuple[Tensor, float]:
    """Damp and factor H (:func:`with_damping`) in ``dtype``.

    Returns ``(F, damp_used)``: for GPTQ the upper Cholesky factor of ``H⁻¹``; for LDLQ
    the unit upper triangular ``U`` of ``H = U D Uᵀ``.
    """
    # Every n×n float64 intermediate is dropped as soon as the next exists: at
    # n = 4864 (a 0.5B model's down_proj) each is 190 MB, and holding all five
    # made this the largest transient of a layer (+0.9 GB).
    def factor(Hd: Tensor) -> Tensor:
        if algorithm == "gptq":
            F = torch.linalg.cholesky(Hd)
            F = torch.cholesky_inverse(F)
            return torch.linalg.cholesky(F, upper=True)
        # Cholesky of the flipped matrix gives an upper factor R with H = R Rᵀ.
        F = torch.linalg.cholesky(Hd.flip(0, 1)).flip(0, 1)
        F /= torch.diagonal(F).clone()[None, :]
        return F

    F, d = with_damping(factor, H, damp, max_tries, dtype)
    return F.float(), d


def _quant_col(w: Tensor, s: Tensor, z: Tensor, maxq: int) -> tuple[Tensor, Tensor]:
    q = torch.clamp(torch.round(w / s + z), 0, maxq)
    return q, s * (q - z)


def _solve(
    Wt: Tensor, F: Tensor, St: Tensor, Zt: Tensor, maxq: int, algorithm: str, block: int
) -> Tensor:
    """Greedy column solve in processing order; returns the codes, ``[in, out]``.

    Everything is held transposed, ``Wt, St, Zt: [in, out]``: the loop visits one
    input column at a time, and as a row of the transposed matrix each is contiguous
    (1.3–1.6x faster on SmolLM2's shapes, CPU).  The feedback products sum in another
    order than the untransposed loop did, so a rare code can round the other way."""
    n = Wt.shape[0]
    Q = torch.empty_like(Wt)
    if algorithm == "gptq":
        W = Wt.clone()
        for i1 in range(0, n, block):
            i2 = min(i1 + block, n)
            W1 = W[i1:i2].clone()
            E1 = torch.zeros_like(W1)
            F1 = F[i1:i2, i1:i2]
            for i in range(i2 - i1):
                w = W1[i]
                q, wq = _quant_col(w, St[i1 + i], Zt[i1 + i], maxq)
                Q[i1 + i] = q
                err = (w - wq) / F1[i, i]
                W1[i:] -= F1[i, i:][:, None] * err[None, :]
                E1[i] = err
            W[i2:] -= F[i1:i2, i2:].t() @ E1
        return Q
    # LDLQ: ŵ_k = Q(w_k + Σ_{j<k} U_jk e_j), e_j = w_j − ŵ_j
    E = torch.zeros_like(Wt)
    for i1 in range(0, n, block):
        i2 = min(i1 + block, n)
        X = Wt[i1:i2] + F[:i1, i1:i2].t() @ E[:i1]  # feedback from earlier blocks
        for i in range(i2 - i1):
            k = i1 + i
            x = X[i]
            if i:
                x = x + F[i1:k, k] @ E[i1:k]
            q, wq = _quant_col(x, St[k], Zt[k], maxq)
            Q[k] = q
            E[k] = Wt[k] - wq
    return Q


def quant_losses(W: Tensor, W_hat: Tensor, H: Tensor) -> dict[str, float]:
    """``tr((W − Ŵ) H (W − Ŵ)ᵀ)`` and its diagonal-only version."""
    D = (W.double() - W_hat.double()).to(H.device)
    Hd = H.double()
    full = float(torch.einsum("oi,ij,oj->", D, Hd, D))
    diag = float((D * D * torch.diagonal(Hd)[None, :]).sum())
    return {"quant_loss": full, "diag_loss": diag}


def check_hessian(H: Tensor, n_in: int) -> None:
    if H.dim() != 2 or H.shape[0] != H.shape[1]:
        raise ValueError(f"H must be square [in, in], got shape {tuple(H.shape)}")
    if H.shape[0] != n_in:
        raise ValueError(f"H is {H.shape[0]}x{H.shape[0]} but the weight has {n_in} inputs")
    check_finite("H", H)


def check_solver_options(
    *, init: str, algorithm: str, gguf: bool, also_inits: tuple[str, ...] | list[str], refit: int,
    h_power: float, init_norm: float, max_clip: float | None, search: str | None = None,
    names: dict[str, str] | None = None, descent: int = 0, shrink: float | str = 0.0,
) -> None:
    """Refuse option combinations :func:`gptq_quantize` cannot honour (one source of
    truth for the API and the CLI). ``names`` words the options as the caller's user
    knows them (e.g. ``{"also_inits": "--select"}``); by default the arguments' names."""
    n = {k: k for k in ("init", "algorithm", "also_inits", "refit", "h_power", "init_norm", "max_clip",
                        "search", "descent", "shrink")}
    n |= names or {}
    if algorithm not in ALGORITHMS:
        raise ValueError(f"unknown {n['algorithm']} {algorithm!r}; choose one of {ALGORITHMS}")
    if gguf and max_clip is not None:
        raise ValueError(f"{n['max_clip']} is not available with GGUF types")
    if (why := check_max_clip(max_clip, init, init_norm)) is not None:
        raise ValueError(f"{n['max_clip']}: {why}")
    if (also_inits or refit) and algorithm == "rtn":
        raise ValueError(f"{n['also_inits']} and {n['refit']} need a solver ({n['algorithm']} gptq or ldlq)")
    if also_inits and gguf:
        raise ValueError(f"{n['also_inits']} is not available with GGUF types (its candidates are not "
                         f"representable); {n['refit']} is")
    if refit < 0:
        raise ValueError(f"{n['refit']} must be >= 0 rounds, got {refit!r}")
    if descent < 0:
        raise ValueError(f"{n['descent']} must be >= 0 sweeps, got {descent!r}")
    if descent and algorithm == "rtn":
        raise ValueError(f"{n['descent']} needs a solver ({n['algorithm']} gptq or ldlq)")
    if shrink != "auto" and not (isinstance(shrink, int | float) and 0.0 <= shrink < 1.0):
        raise ValueError(f"{n['shrink']} must be 'auto' or in [0, 1), got {shrink!r}")
    if shrink and algorithm == "rtn":
        raise ValueError(f"{n['shrink']} needs a solver ({n['algorithm']} gptq or ldlq)")
    if not 0 <= h_power <= 4:
        raise ValueError(f"{n['h_power']} must be in [0, 4], got {h_power!r}")
    if (why := check_init_norm(init_norm, init)) is not None:
        raise ValueError(f"{n['init_norm']}: {why}")
    if gguf and init_norm != 2.0:
        raise ValueError(f"{n['init_norm']} is not available with GGUF types")
    if search is not None and gguf:
        raise ValueError(f"{n['search']} is not available with GGUF types")
    if (why := check_search(search, init, init_norm, max_clip)) is not None:
        raise ValueError(f"{n['search']}: {why}")
    if mixed := [m for m in also_inits if (m == "neuqi") != (init == "neuqi")]:
        raise ValueError(f"{n['also_inits']} {mixed} would mix float and integer zero-points with "
                         f"{n['init']} {init!r}; candidates must share the init's kind of zero")


def gptq_quantize(
    w: Tensor,
    H: Tensor,
    spec: QuantSpec,
    init: InitMethod = "neuqi",
    algorithm: Algorithm = "ldlq",
    act_order: bool = True,
    damp: float = 0.01,
    magr: bool = False,
    block_size: int = 128,
    *,
    magr_alpha: float | None = None,
    magr_iters: int = 150,
    clip: float | None = None,
    max_clip: float | None = None,
    param_dtype: torch.dtype | None = None,
    gguf: GGUFType | None = None,
    also_inits: tuple[str, ...] = (),
    refit: int = 0,
    refit_tol: float = 1e-3,
    h_power: float = 1.0,
    init_norm: float = 2.0,
    search: str | None = None,
    descent: int = 0,
    shrink: float | Literal["auto"] = 0.0,
    folds: tuple[Tensor, Tensor] | None = None,
    shrink_start: float | None = None,
) -> GPTQResult:
    """Quantize ``w: [out, in]`` against the second-moment matrix ``H: [in, in]``.

    ``algorithm="rtn"`` rounds to nearest with the chosen init (no error feedback).
    Parameters come from ``init`` on the whole matrix (after MagR when ``magr``),
    weighted by the diagonal of the damped H.  With ``act_order`` columns are
    processed by decreasing ``diag(H)`` but keep their original group.
    ``param_dtype`` (e.g. float16) rounds scales and zeros to their storage type
    *before* solving, so the codes are chosen for the parameters that are saved.
    ``gguf`` (a llama.cpp block type) chooses the parameters the type can store
    (:func:`~neuqi.quant.gguf_types.gguf_params`, init ``neuqi`` or ``minmax``) and the
    solver rounds on exactly that grid, so its codes are the file's codes.
    ``h_power`` tempers the init's weights to ``diag(H)^p`` (1: the paper's; 0:
    unweighted, as a weight-only observer).  It tests whether the error feedback,
    which moves error onto low-importance columns, wants their grid weighed more;
    on SmolLM2 at 2-bit g64 it did not (docs/results/param-choice-smollm2-135m.md).
    ``init_norm`` makes the init (``neuqi``, ``neuqi_int``) minimise ``|w − ŵ|^p``
    instead of the square: with 3 the clipped errors that the solver cannot make up
    weigh more, which won end to end at 2 bits (same page).  ``search`` forces one of
    NeUQI's scale searches (``init="neuqi"``; None: chosen by row length).

    Beyond the paper (both measured against the proxy loss the solver leaves, row by
    row, on the undamped H — the layer's output error; the damping only steadies the
    solve.  Rows are independent, so the choice is exact):

    * ``also_inits`` — further inits (e.g. ``("minmax", "mse")``) each solved too;
      every row keeps the parameters whose solve left it the lowest loss.
    * ``refit`` — up to this many rounds of: refit the parameters to the codes by
      least squares on the full H (:func:`~neuqi.quant.refit.refit_params`), solve
      again with them, keep per row the best of (old, refit with old codes, refit
      with new codes).  Stops early when a round gains less than ``refit_tol`` of
      the loss.  Integer-zero inits keep integer zeros; a GGUF type's refit lands
      on what the type stores (:func:`~neuqi.quant.gguf_refit.gguf_refit`).
    * ``descent`` — this many coordinate-descent sweeps over the codes after every
      solve (:func:`~neuqi.quant.descent.descend_codes`), on the damped H the solver
      used; the grid stays as chosen, so any format can take it.
    * ``shrink`` — MagR, the solver, the descent and the refit see H with its
      off-diagonal part scaled by ``1 − shrink`` (:func:`shrink_hessian`); the init's
      weights (the diagonal) and the reported losses are the calibration H's own.
      ``"auto"`` chooses it per linear on held-out tokens (:func:`choose_shrink`):
      ``folds`` are the H of two halves of the calibration windows, the solve fitted
      to the first is scored on the second; MagR then sees H unshrunk.
      ``shrink_start`` is where that search starts (a grid value; the stats' ``shrink_fold``
      is the one chosen).
    """
    check_weight(w)
    check_hessian(H, w.shape[1])
    if gguf is not None:
        gguf.check_row_length(w.shape[1])
        if spec != gguf.spec:
            raise ValueError(f"{gguf.name} quantizes {gguf.bits}-bit blocks of {gguf.block}, "
                             f"not {spec.bits}-bit groups of {spec.group_size}")
    check_solver_options(init=init, algorithm=algorithm, gguf=gguf is not None, also_inits=also_inits,
                         refit=refit, h_power=h_power, init_norm=init_norm, max_clip=max_clip,
                         search=search, descent=descent, shrink=shrink)
    if shrink == "auto" and folds is None:
        raise ValueError("shrink='auto' chooses the shrink on held-out tokens: give folds=(H_fit, H_score), "
                         "the H of two halves of the calibration windows")
    t0 = time.perf_counter()
    device = w.device
    W = w.float().clone()
    H_calib = H.to(device)
    H = shrink_hessian(H_calib, 0.0 if shrink == "auto" else shrink)
    dead = torch.diagonal(H) <= 0
    W[:, dead] = 0.0  # inputs that are always zero carry no information
    if magr:
        alpha = magr_alpha if magr_alpha is not None else (1e-3 if spec.group_size == -1 else 1e-4)
        W = magr_preprocess(W, H, spec.group_size, alpha=alpha, iters=magr_iters)
    t_magr = time.perf_counter()
    # The init weighs each input by its damped importance, but an input that is
    # always zero carries none: its damping floor (1 + damp·mean) would outweigh
    # live inputs of small activations and pull the group's grid through its zeroed
    # weights.  The solver keeps the damped H.
    h_diag = torch.where(dead, 0.0, damped_diagonal(H, damp) ** h_power)
    if clip is None:
        clip = magr_clip(spec) if (magr and init == "minmax") else 1.0
    if gguf is not None:
        params = gguf_params(W, gguf, init, h_diag)
    else:
        params = init_params(W, spec, init, h_diag, clip=clip, max_clip=max_clip, norm=init_norm,
                             search=search)
    if param_dtype is not None and gguf is None:
        params = round_params(params, param_dtype)
    t_init = time.perf_counter()
    extra: dict = {}
    if shrink == "auto":
        shrink, heldout = choose_shrink(W, params, spec, folds[0].to(device), folds[1].to(device), damp=damp,
                                        algorithm=algorithm, act_order=act_order, block_size=block_size,
                                        start=shrink_start)
        H = shrink_hessian(H_calib, shrink)
        extra.update(shrink=shrink, shrink_fold=min(heldout, key=heldout.get),
                     shrink_heldout={f"{a:g}": v for a, v in heldout.items()},
                     seconds_shrink=time.perf_counter() - t_init)

    n = W.shape[1]
    g_idx = spec.group_index(n, device)
    damp_used = damp
    if algorithm == "rtn":
        S, Z = params.expand(spec, n)
        codes = torch.clamp(torch.round(W / S + Z), 0, spec.maxq)
        perm = None
    else:
        perm = torch.argsort(torch.diagonal(H), descending=True, stable=True) if act_order else None
        idx = perm if perm is not None else torch.arange(n, device=device)
        # one gather, and the permuted copy lives only through the factorisation
        F, damp_used = _factor(H[idx[:, None], idx], damp, algorithm)
        # descent runs on the damped H the solver used: H with its damped diagonal
        h_damped = damped_diagonal(H, damp_used) if descent else None

        def solve(p: QuantParams) -> Tensor:
            S, Z = p.expand(spec, n)
            codes = torch.empty_like(W)
            codes[:, idx] = _solve(W.t()[idx], F, S.t()[idx], Z.t()[idx], spec.maxq, algorithm,
                                   block_size).t()
            if descent:
                codes = descend_codes(W, codes, p, spec, H, descent, diag=h_damped)
            return codes

        codes = solve(params)
        if also_inits or refit:
            def prepare(p: QuantParams) -> QuantParams:
                return round_params(p, param_dtype) if param_dtype is not None else p

            H64 = H.double()
            if gguf is not None:
                def refit_fn(c: Tensor, p: QuantParams) -> QuantParams:
                    return gguf_refit(c, W, H64, gguf, p)
            else:
                def refit_fn(c: Tensor, p: QuantParams) -> QuantParams:
                    return prepare(refit_params(c, W, H64, spec, p, init != "neuqi"))

            params, codes, improved = _improve(
                W, H64, spec, params, codes, solve,
                [prepare(init_params(W, spec, m, h_diag)) for m in also_inits],
                refit, refit_tol, refit_fn)
            extra.update(improved)
    t_solve = time.perf_counter()
    codes = codes.to(torch.uint8)
    W_hat = dequantize(codes, params, spec)
    stats = quant_losses(w, W_hat, H_calib)
    stats.update(
        damp=damp_used,
        seconds_magr=t_magr - t0,
        seconds_init=t_init - t_magr,
        seconds_solve=t_solve - t_init,
        seconds=time.perf_counter() - t0,
        **extra,
    )
    return GPTQResult(codes=codes, params=params, perm=perm, g_idx=g_idx, stats=stats)


def _improve(W, H, spec, params, codes, solve, candidates, rounds, tol, refit_fn):
    """Per-row selection among candidate inits, then refit rounds (see gptq_quantize).

    ``refit_fn(codes, params)`` proposes parameters for the codes.  Returns
    ``(params, codes, stats)``; the loss of every row only ever falls.
    """
    def losses(c: Tensor, p: QuantParams) -> Tensor:
        return row_losses(W, dequantize(c, p, spec), H)

    def pick(take: Tensor, a: QuantParams, b: QuantParams) -> QuantParams:
        t = take[:, None]
        off = None if a.offset is None else torch.where(t, b.offset, a.offset)
        return QuantParams(torch.where(t, b.scale, a.scale), torch.where(t, b.zero, a.zero), off)

    loss = losses(codes, params)
    stats = {"proxy_loss_first": float(loss.sum())}
    for p in candidates:
        c = solve(p)
        new = losses(c, p)
        take = new < loss
        params, codes = pick(take, params, p), torch.where(take[:, None], c, codes)
        loss = torch.minimum(loss, new)
    stats["proxy_loss_selected"] = float(loss.sum())
    done = 0
    for _ in range(rounds):
        p = refit_fn(codes, params)
        fit = losses(codes, p)
        c = solve(p)
        new = losses(c, p)
        take_new = new < torch.minimum(fit, loss)
        take_p = take_new | (fit < loss)
        params = pick(take_p, params, p)
        codes = torch.where(take_new[:, None], c, codes)
        before = float(loss.sum())
        loss = torch.minimum(loss, torch.minimum(fit, new))
        done += 1
        if before - float(loss.sum()) <= tol * before:
            break
    stats.update(proxy_loss_refit=float(loss.sum()), refit_rounds=done)
    return params, codes, stats


def round_params(params: QuantParams, dtype: torch.dtype) -> QuantParams:
    """Parameters as they will be stored; scales kept above the type's smallest normal."""
    tiny = torch.finfo(dtype).tiny
    scale = params.scale.clamp_min(tiny).to(dtype).float()
    return QuantParams(scale, params.zero.to(dtype).float())


def magr_clip(spec: QuantSpec) -> float:
    """Min-max clipping factor used with "MagR only" (NEUQI_NOTES)."""
    if spec.group_size != -1:
        return 0.95
    return 0.8 if spec.bits <= 2 else 0.9
