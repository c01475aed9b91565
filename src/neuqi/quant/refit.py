"""Least-squares refit of the grid parameters for codes the solver already chose.

LDLQ picks codes for parameters fixed up front; the parameters were chosen by the
init as if plain rounding followed (diag(H) only).  Once the codes are known the
proxy loss ``tr((W − Ŵ) H (W − Ŵ)ᵀ)`` is *quadratic* in the parameters: with
``ŵ_j = a_g·q_j + c_g`` (``a = s``, ``c = −s·z``) every row is a small
least-squares problem in its ``2·n_groups`` unknowns on the full H.  Rows are
independent (the loss is a sum over rows), so each row's system is solved exactly:

* float zero: ``(a, c)`` jointly — the exact optimum for these codes;
* integer zero: the scales for a fixed integer zero are closed form too; the zero
  is either kept or the float optimum's rounded, whichever leaves the row lower.

:func:`row_losses` scores a row's parameters and codes on the same H, so a caller
can keep, row by row, whatever lowers the loss (a refit never raises it for fixed
codes in the float case; the integer one is checked, not assumed).
"""

from __future__ import annotations

import torch
from torch import Tensor

from neuqi.quant.grid import QuantParams, QuantSpec
from neuqi.quant.init import FLOAT_ZERO_LIMIT

# Relative ridge on the normal equations: a group whose codes are all equal makes
# ``a`` and ``c`` collinear; the ridge picks the smallest such change instead of
# failing.  Small enough not to move a well-posed solution measurably.
RIDGE = 1e-7


def row_losses(W: Tensor, W_hat: Tensor, H: Tensor) -> Tensor:
    """Per-row ``(w − ŵ) H (w − ŵ)ᵀ`` ``[out]`` (float64) for ``W, W_hat: [out, in]``."""
    D = (W - W_hat).double()
    return ((D @ H.double()) * D).sum(1)


def _padded(t: Tensor, n_pad: int, dims: tuple[int, ...]) -> Tensor:
    if not n_pad:
        return t
    pad = []
    for d in reversed(range(t.dim())):
        pad += [0, n_pad if d in dims else 0]
    return torch.nn.functional.pad(t, pad)


def _normal_blocks(codes: Tensor, W: Tensor, H: Tensor, spec: QuantSpec):
    """The blocks of every row's normal equations, float64.

    Returns ``Mqq, Mq1: [out, G, G]``, ``M11: [G, G]``, ``bq, b1: [out, G]`` with
    ``Mqq[o,g,h] = q_gᵀ H_gh q_h``, ``Mq1[o,g,h] = q_gᵀ H_gh 1``, ``M11 = 1ᵀ H_gh 1``,
    ``bq[o,g] = q_gᵀ (H w)_g`` and ``b1[o,g] = 1ᵀ (H w)_g``.  Cost: ``out·in²``
    multiply-adds (one ``[out, in] @ [in, in]`` product in slices), memory
    ``O(out·in)``; a partial last group is padded with zero-weight columns.
    """
    out, n = codes.shape
    gs = spec.group_len(n)
    G = spec.n_groups(n)
    pad = G * gs - n
    Q = _padded(codes.double(), pad, (1,))
    Hp = _padded(H.double(), pad, (0, 1))
    Qg = Q.view(out, G, gs)
    H1 = Hp.view(G * gs, G, gs).sum(-1)  # H @ indicator of each group: [N, G]
    M11 = H1.view(G, gs, G).sum(1)
    Mq1 = torch.einsum("ogs,gsh->ogh", Qg, H1.view(G, gs, G))
    Mqq = torch.empty(out, G, G, dtype=torch.float64, device=codes.device)
    for g in range(G):
        T = Q[:, g * gs : (g + 1) * gs] @ Hp[g * gs : (g + 1) * gs]  # [out, N]
        Mqq[:, g] = (T.view(out, G, gs) * Qg).sum(-1)
    R = (_padded(W.double(), pad, (1,)) @ Hp).view(out, G, gs)
    return Mqq, Mq1, M11, (R * Qg).sum(-1), R.sum(-1)


def _ridge(K: Tensor) -> Tensor:
    d = torch.diagonal(K, dim1=-2, dim2=-1)
    lam = RIDGE * d.mean(-1, keepdim=True).clamp_min(1e-30)
    return K + torch.diag_embed(lam.expand_as(d))


def _solve(K: Tensor, b: Tensor, x0: Tensor) -> Tensor:
    """Batched ``K x = b`` for PSD ``K: [out, m, m]``, ridged toward ``x0: [out, m]``.

    Solving for the step from ``x0`` keeps the directions the codes cannot see (a
    group whose codes are all equal has no scale to fit) at their current values
    instead of at 0.  Rows whose factorisation fails get NaN.
    """
    rhs = b - (K @ x0[..., None])[..., 0]
    L, info = torch.linalg.cholesky_ex(_ridge(K))
    x = x0 + torch.cholesky_solve(rhs[..., None], L)[..., 0]
    return torch.where((info == 0)[:, None], x, torch.full_like(x, float("nan")))


def _int_scales(Mqq, Mq1, M11, bq, b1, z: Tensor, s0: Tensor) -> tuple[Tensor, Tensor]:
    """Best scales for the fixed zeros ``z: [out, G]`` and the loss change they give.

    With ``ŵ = s_g (q − z_g)``: ``K[g,h] = (q_g − z_g)ᵀ H_gh (q_h − z_h)`` and
    ``b_g = (q_g − z_g)ᵀ (H w)_g``; the loss is ``wᵀHw − bᵀK⁻¹b`` at the optimum.
    """
    zg, zh = z[:, :, None], z[:, None, :]
    K = Mqq - zh * Mq1 - zg * Mq1.transpose(1, 2) + zg * zh * M11
    b = bq - z * b1
    s = _solve(K, b, s0)
    # wᵀHw − 2bᵀs + sᵀKs, less the constant wᵀHw (exact for any s, not only the optimum)
    return s, ((K @ s[..., None])[..., 0] * s).sum(1) - 2 * (b * s).sum(1)


def _float_fit(Mqq, Mq1, M11, bq, b1, a0: Tensor, c0: Tensor) -> tuple[Tensor, Tensor]:
    """Each row's joint least-squares ``(a, c)`` ``[out, G]`` for ``ŵ = a_g q + c_g``
    from :func:`_normal_blocks`' blocks, ridged toward the current ``(a0, c0)``."""
    out, G = bq.shape
    K = torch.cat([torch.cat([Mqq, Mq1], 2),
                   torch.cat([Mq1.transpose(1, 2), M11.expand(out, G, G)], 2)], 1)
    x = _solve(K, torch.cat([bq, b1], 1), torch.cat([a0, c0], 1))
    return x[:, :G], x[:, G:]


def refit_params(
    codes: Tensor, W: Tensor, H: Tensor, spec: QuantSpec, params: QuantParams, int_zero: bool
) -> QuantParams:
    """Parameters minimising each row's ``(w − ŵ) H (w − ŵ)ᵀ`` for fixed ``codes``.

    ``codes, W: [out, in]`` in storage order, ``H: [in, in]``, ``params`` the current
    ones (``[out, G]``): a row whose refit is ill-posed (a non-positive or non-finite
    scale) keeps them.  ``int_zero`` keeps zeros whole numbers in ``0..maxq``.
    """
    Mqq, Mq1, M11, bq, b1 = _normal_blocks(codes, W, H, spec)
    old_s, old_z = params.scale.double(), params.zero.double()
    a, c = _float_fit(Mqq, Mq1, M11, bq, b1, old_s, -old_s * old_z)
    if int_zero:
        z_fit = torch.clamp(torch.round(-c / a.clamp_min(1e-30)), 0, spec.maxq)
        z_fit = torch.where(torch.isfinite(z_fit), z_fit, old_z)
        s_keep, gain_keep = _int_scales(Mqq, Mq1, M11, bq, b1, old_z, old_s)
        s_fit, gain_fit = _int_scales(Mqq, Mq1, M11, bq, b1, z_fit, old_s)
        use_fit = (gain_fit < gain_keep) | ~torch.isfinite(gain_keep)
        a = torch.where(use_fit[:, None], s_fit, s_keep)
        zero = torch.where(use_fit[:, None], z_fit, old_z)
    else:
        zero = -c / a
    # a zero beyond the float-zero limit would not survive float16 storage
    in_range = (zero >= -FLOAT_ZERO_LIMIT) & (zero <= spec.maxq + FLOAT_ZERO_LIMIT)
    ok = (torch.isfinite(a) & (a > 0) & in_range).all(1, keepdim=True)
    scale = torch.where(ok, a, old_s)
    zero = torch.where(ok, zero, old_z)
    return QuantParams(scale.to(params.scale.dtype), zero.to(params.zero.dtype))
