"""Coordinate descent on the codes: lower the layer's proxy loss after the solver.

LDLQ (and GPTQ) choose every code once, greedily, in processing order: a column's
code sees the error of the columns before it but never the columns after.  With the
grid fixed, the proxy loss of a row, ``(w − ŵ) H (w − ŵ)ᵀ``, is a quadratic in each
single weight ``ŵ_j`` whose minimiser is ``ŵ_j + r_j / H_jj`` with the residual
``r = (w − ŵ) H``; on a one-dimensional grid the nearest grid point to that
minimiser is the best grid point.  Sweeping the columns and moving each code there
never raises the loss, and repeated sweeps settle the choices the greedy pass made
too early (QuantEase, arXiv 2309.01885, does this from scratch; here it starts from
LDLQ's codes and keeps the grid, so every format's parameters stay as they were).

Rows are independent and handled together; columns go in blocks whose own
interactions are updated one column at a time and whose effect on the rest of the
residual is one matrix product per block (as the solvers do).  Pure tensor math.
"""

from __future__ import annotations

import torch
from torch import Tensor

from neuqi.quant.grid import QuantParams, QuantSpec


def _offsets(params: QuantParams, spec: QuantSpec, n: int) -> tuple[Tensor, Tensor]:
    """Per-column step and offset ``[out, n]`` with ``ŵ = step·q + offset``."""
    S, Z = params.expand(spec, n)
    if params.offset is not None:
        return S.float(), params.offset[:, spec.group_index(n, S.device)].float()
    return S.float(), (-S * Z).float()


def descend_codes(
    W: Tensor, codes: Tensor, params: QuantParams, spec: QuantSpec, H: Tensor,
    passes: int, block: int = 128, diag: Tensor | None = None,
) -> Tensor:
    """Codes ``[out, in]`` (float) after ``passes`` coordinate-descent sweeps.

    ``W, codes: [out, in]``, ``H: [in, in]`` the loss's second-moment matrix;
    ``diag: [in]`` (optional) replaces its diagonal, so the solver's damped H is used
    without an ``in × in`` copy of it.  Columns are visited by decreasing ``H_jj``
    (act-order); a column with ``H_jj ≤ 0`` carries no loss and is left alone.  The
    loss never rises: each move is the exact minimiser of the row's loss in that
    coordinate over the grid.
    """
    n = W.shape[1]
    S, O = _offsets(params, spec, n)
    Q = codes.float().clone()
    What = S * Q + O
    Hf = H.float()  # no copy when H is float32
    # The loss's matrix is Hf + diag(shift): the shift only where ``diag`` replaces it.
    shift = torch.zeros(n, device=W.device) if diag is None else diag.float() - torch.diagonal(Hf)
    E = W.float() - What
    R = E @ Hf + E * shift  # residual r = (w − ŵ) H, [out, in]
    h = torch.diagonal(Hf) + shift
    order = torch.argsort(h, descending=True, stable=True)
    order = order[h[order] > 0]
    cols = order.tolist()  # one host copy per call: the loop indexes with ints
    inv_h = (1.0 / h.clamp_min(torch.finfo(h.dtype).tiny)).tolist()
    for _ in range(passes):
        for i1 in range(0, len(cols), block):
            idx = order[i1 : i1 + block]
            Rb = R[:, idx].clone()
            Hb = Hf[idx[:, None], idx]
            Hb.diagonal().add_(shift[idx])  # Hb is a gathered copy
            D = torch.empty_like(Rb)
            for k, j in enumerate(cols[i1 : i1 + block]):
                target = What[:, j] + Rb[:, k] * inv_h[j]
                q = torch.clamp(torch.round((target - O[:, j]) / S[:, j]), 0, spec.maxq)
                new = S[:, j] * q + O[:, j]
                d = new - What[:, j]
                Q[:, j] = q
                What[:, j] = new
                D[:, k] = d
                Rb -= d[:, None] * Hb[k][None, :]
            R -= D @ Hf[idx, :]
            R[:, idx] -= D * shift[idx]
    return Q
