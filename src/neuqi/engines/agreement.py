"""Does llama.cpp run our file as we do?  Our model's log-probs on llama.cpp's own tokens.

``llama-perplexity --kl-divergence-base`` saves the tokens it evaluated and the
log-softmax at every scored position; here the same model, loaded by neuqi (a native
run, or the FP float folder), is run on exactly those chunks — llama.cpp's protocol:
each chunk of ``ctx`` tokens starts with BOS, positions ``ctx//2 … ctx−2`` are scored —
and the two are compared: perplexity, per-token NLL, KL and top-1 agreement.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from neuqi.engines.llamacpp import KLBase


@torch.no_grad()
def engine_agreement(model, base: KLBase, bos_id: int | None, chunks: int | None = None) -> dict:
    """Compare ``model``'s log-probs with llama.cpp's on ``base``'s chunks.

    Returns ``ppl_ours``/``ppl_engine`` (llama.cpp's protocol, the same positions),
    ``nll_abs_mean``/``nll_abs_max`` (|Δ NLL| of the target token per position),
    ``kl_mean`` (KL(engine ‖ ours), mean over positions) and ``top1_agree`` (fraction).
    """
    device = next(model.parameters()).device
    n = base.tokens.shape[0] if chunks is None else min(chunks, base.tokens.shape[0])
    first = base.first
    nll_ours, nll_eng, dabs, kls, agree = [], [], [], [], []
    for c in range(n):
        ids = torch.from_numpy(base.tokens[c].astype(np.int64)).clone()
        if bos_id is not None:
            ids[0] = bos_id
        logits = model(ids[None].to(device)).logits[0, first : base.ctx - 1].float()
        ours = torch.log_softmax(logits, dim=-1).cpu()[:, : base.vocab]
        eng = torch.from_numpy(base.logprobs(c))
        target = ids[first + 1 : base.ctx]
        lo = -ours.gather(1, target[:, None]).squeeze(1)
        le = -eng.gather(1, target[:, None]).squeeze(1)
        nll_ours.append(lo)
        nll_eng.append(le)
        dabs.append((lo - le).abs())
        pe = eng.exp()
        kls.append((pe * (eng - ours)).sum(dim=1))
        agree.append(ours.argmax(1) == eng.argmax(1))
    lo, le, d = torch.cat(nll_ours), torch.cat(nll_eng), torch.cat(dabs)
    return {
        "chunks": n, "ctx": base.ctx, "tokens_scored": int(lo.numel()),
        "ppl_ours": math.exp(float(lo.double().mean())), "ppl_engine": math.exp(float(le.double().mean())),
        "nll_abs_mean": float(d.mean()), "nll_abs_max": float(d.max()),
        "kl_mean": float(torch.cat(kls).mean()), "top1_agree": float(torch.cat(agree).float().mean()),
    }
