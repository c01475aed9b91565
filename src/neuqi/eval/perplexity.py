"""Perplexity (literature protocol) and divergence of a quantized model from its FP model.

The text is tokenized once and cut into non-overlapping ``seqlen`` windows;
``ppl = exp(total NLL / (windows · (seqlen − 1)))``.
"""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@torch.no_grad()
def window_logits(model: nn.Module, window: Tensor, device: torch.device) -> Tensor:
    return model(window[None].to(device), use_cache=False).logits[0].float()


@torch.no_grad()
def perplexity(model: nn.Module, windows: Tensor, device: torch.device, progress=None) -> dict:
    """``windows: [W, seqlen]`` token ids → ``{"ppl", "nll", "tokens", "windows"}``."""
    model.to(device).eval()
    nll, tokens = 0.0, 0
    t0 = time.perf_counter()
    for w in windows:
        logits = window_logits(model, w, device)
        target = w[1:].to(device)
        nll += float(F.cross_entropy(logits[:-1], target, reduction="sum"))
        tokens += target.numel()
        if progress is not None:
            progress()
    return {
        "ppl": math.exp(nll / tokens),
        "nll": nll / tokens,
        "tokens": tokens,
        "windows": int(windows.shape[0]),
        "seqlen": int(windows.shape[1]),
        "seconds": time.perf_counter() - t0,
    }


@torch.no_grad()
def divergence(
    model: nn.Module, reference: nn.Module, windows: Tensor, device: torch.device, progress=None
) -> dict:
    """Mean full-vocabulary ``KL(P_ref ‖ P_model)`` per token and top-1 agreement."""
    model.to(device).eval()
    reference.to(device).eval()
    kl, agree, tokens = 0.0, 0, 0
    for w in windows:
        lp = F.log_softmax(window_logits(model, w, device), dim=-1)
        lr = F.log_softmax(window_logits(reference, w, device), dim=-1)
        kl += float((lr.exp() * (lr - lp)).sum())
        agree += int((lp.argmax(-1) == lr.argmax(-1)).sum())
        tokens += w.numel()
        if progress is not None:
            progress()
    return {"kl": kl / tokens, "top1_agreement": agree / tokens, "tokens": tokens}
