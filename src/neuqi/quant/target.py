"""The FP model's output as the target: weights that absorb the earlier layers' error.

The solvers minimise ``E‖W x − Ŵ x‖²`` over the inputs ``x`` that the quantized model
gives a linear, so the error of the layers before it is never corrected, only carried.
Asking instead for the FP model's output from the quantized model's input,
``E‖W x_fp − Ŵ x_q‖²`` (GPTAQ's asymmetric calibration, arXiv 2504.02692), is the same
quadratic with another centre::

    E‖W x_fp − Ŵ x_q‖² = tr((Ŵ − W_t) H (Ŵ − W_t)ᵀ) + const,   W_t H = W C,

with ``H = E[x_q x_qᵀ]`` and ``C = E[x_fp x_qᵀ]``.  So any solver and any parameter
search run unchanged on the target ``W_t`` in place of ``W``.  Pure tensor math.
"""

from __future__ import annotations

import torch
from torch import Tensor

from neuqi.quant.gptq import with_damping


def fp_target_weight(W: Tensor, H: Tensor, C: Tensor, damp: float, alpha: float = 1.0) -> Tensor:
    """``W_t = W + α W (C − H) H_d⁻¹``: the weights whose output on the quantized inputs
    best matches ``W``'s on the inputs ``x_q + α (x_fp − x_q)`` (``α = 1``: the FP
    model's).  ``W: [out, in]``, ``H, C: [in, in]``.

    ``H_d`` is ``H`` damped as the solver damps it (:func:`with_damping`: more where it
    cannot be factorised at ``damp``).  Written as a
    correction of ``W`` so that it vanishes where the two inputs agree (``C = H``: the
    first layer's first linears), and the damping then adds ``λ‖Ŵ − W‖²`` to the
    objective: it pulls the target toward ``W``, never toward 0.  ``α < 1`` shrinks the
    correction, which a few thousand calibration tokens estimate noisily in the
    directions where ``x_q`` varies little (GPTAQ scales it by 0.25).  Float32 out.
    """
    L, _ = with_damping(torch.linalg.cholesky, H, damp)
    # (W (C − H) H_d⁻¹)ᵀ = H_d⁻¹ (C − H)ᵀ Wᵀ, H_d symmetric
    rhs = (C.double() - H.double()).t() @ W.double().t()
    return (W.double() + alpha * torch.cholesky_solve(rhs, L).t()).float()
