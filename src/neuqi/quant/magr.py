"""MagR: shrink each row's (or group's) largest magnitude before quantizing.

Solves ``min_{W'} ½ tr((W' − W) H (W' − W)ᵀ) + α Σ_rows ‖w'‖_∞`` by proximal
gradient with ``H`` normalised to unit largest eigenvalue (so a unit step is safe).
A smaller ∞-norm means a narrower quantization range for the same layer output.
"""

from __future__ import annotations

import torch
from torch import Tensor


def project_l1_ball(x: Tensor, radius: float | Tensor) -> Tensor:
    """Euclidean projection of every row of ``x: [R, n]`` onto ``{‖v‖₁ ≤ radius}``."""
    v = x.abs()
    inside = v.sum(dim=1, keepdim=True) <= radius
    mu, _ = torch.sort(v, dim=1, descending=True)
    cs = torch.cumsum(mu, dim=1) - radius
    j = torch.arange(1, x.shape[1] + 1, device=x.device, dtype=x.dtype)
    cond = mu - cs / j > 0
    rho = cond.to(torch.int64).cumsum(dim=1).argmax(dim=1, keepdim=True)  # last True
    theta = torch.gather(cs, 1, rho) / (rho + 1).to(x.dtype)
    proj = torch.sign(x) * torch.clamp(v - theta, min=0)
    return torch.where(inside, x, proj)


def prox_linf(x: Tensor, alpha: float) -> Tensor:
    """``prox_{α‖·‖∞}(x) = x − Proj_{‖·‖₁ ≤ α}(x)`` row by row (Moreau decomposition)."""
    return x - project_l1_ball(x, alpha)


def _rows_to_groups(w: Tensor, group_size: int) -> tuple[Tensor, int]:
    out, n = w.shape
    if group_size == -1 or group_size >= n:
        return w, 0
    pad = (-n) % group_size
    if pad:
        w = torch.cat([w, w.new_zeros(out, pad)], dim=1)
    return w.reshape(-1, group_size), pad


def _groups_to_rows(wg: Tensor, out: int, n: int) -> Tensor:
    return wg.reshape(out, -1)[:, :n]


def magr_preprocess(
    w: Tensor, H: Tensor, group_size: int = -1, alpha: float = 1e-3, iters: int = 150
) -> Tensor:
    """MagR-preprocessed weights ``[out, in]`` (same shape and dtype as ``w``).

    ``group_size=-1`` penalises each row's ∞-norm, otherwise each group's.
    """
    if alpha < 0:
        raise ValueError(f"MagR alpha must be non-negative, got {alpha}")
    out, n = w.shape
    W0 = w.float()
    Hf = H.double().to(w.device)
    lam = torch.linalg.eigvalsh(Hf).max()
    if lam <= 0:
        return w.clone()
    Hn = (Hf / lam).float()
    Wp = W0.clone()
    for _ in range(iters):
        Y = Wp - (Wp - W0) @ Hn
        Yg, _ = _rows_to_groups(Y, group_size)
        Wp = _groups_to_rows(prox_linf(Yg, alpha), out, n)
    return Wp.to(w.dtype)


def magr_objective(w_new: Tensor, w: Tensor, H: Tensor, group_size: int, alpha: float) -> Tensor:
    """``½ tr((W' − W) Hn (W' − W)ᵀ) + α Σ ‖·‖∞`` with the same normalisation of H."""
    Hf = H.double()
    Hn = Hf / torch.linalg.eigvalsh(Hf).max()
    D = (w_new - w).double()
    quad = 0.5 * torch.einsum("oi,ij,oj->", D, Hn, D)
    g, _ = _rows_to_groups(w_new.double(), group_size)
    return quad + alpha * g.abs().amax(dim=1).sum()
