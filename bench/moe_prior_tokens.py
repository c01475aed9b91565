"""Which H an expert routed n tokens should be quantized with: its own, the layer's, or a blend.

    python bench/moe_prior_tokens.py [--model smollm2-135m] [--layer 5] [--experts 16] [--top-k 2]
        [--counts 8,16,32,64,128,256,1024] [--seeds 3] [--bits 3] [--group-size 64]

No real mixture-of-experts model is in the registries, so the experts are simulated on
real data: the inputs are a real model's MLP inputs (``--layer``, 64 × 512 tokens of
c4-sample for calibration, 16 × 512 of wiki-sample held out) and each expert is that
layer's real ``up_proj``; a router of ``--experts`` random directions sends every token to
its ``--top-k`` best, so an expert's tokens are a region of the input space, as in a
trained MoE. For each expert and each count ``n``, the expert is quantized (NeUQI +
LDLQ) with

* ``routed``: H from ``n`` of its own calibration tokens;
* ``layer``: H from all calibration tokens of the layer;
* ``mix M``: ``(n·H_routed + M·H_layer) / (n + M)``, the layer's H as a prior worth
  ``M`` tokens (what neuqi does, ``M = --moe-prior-tokens``),

and scored by its relative output error ``‖(W − Ŵ) x‖² / ‖W x‖²`` on the held-out tokens
routed to it. Writes ``bench/results/moe_prior_tokens.json`` as it goes (resumable) and
prints the table.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from neuqi.data.corpora import load_text, sample_windows, tokenize
from neuqi.models.loading import load_model, load_tokenizer
from neuqi.quant import QuantSpec, dequantize, gptq_quantize

OUT = Path(__file__).parent / "results" / "moe_prior_tokens.json"


@torch.no_grad()
def mlp_inputs(model, tok, layer: int, text: str, n: int, seqlen: int) -> torch.Tensor:
    """``[n·seqlen, hidden]``: what ``model.layers[layer].mlp`` receives."""
    ids = sample_windows(tokenize(load_text(text, split="train"), tok), n, seqlen, seed=0)
    seen = []
    handle = model.model.layers[layer].mlp.register_forward_pre_hook(
        lambda _m, args: seen.append(args[0].reshape(-1, args[0].shape[-1])))
    try:
        for i in range(0, n, 4):
            model(ids[i : i + 4], use_cache=False)
    finally:
        handle.remove()
    return torch.cat(seen).float()


def second_moment(x: torch.Tensor) -> torch.Tensor:
    return (x.T @ x).double() / len(x)


def quantized_error(w: torch.Tensor, H: torch.Tensor, x_eval: torch.Tensor, spec: QuantSpec) -> float:
    res = gptq_quantize(w, H, spec, init="neuqi", algorithm="ldlq")
    w_hat = dequantize(res.codes, res.params, spec)
    return float(((x_eval @ (w - w_hat).T) ** 2).sum() / ((x_eval @ w.T) ** 2).sum())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--layer", type=int, default=5)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--counts", default="8,16,32,64,128,256,1024,all")
    ap.add_argument("--mix", default="128,1024,4096", help="prior weights M of the mix policy")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--bits", type=int, default=3)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--rows", type=int, default=384, help="rows of up_proj per expert (speed)")
    args = ap.parse_args()
    torch.manual_seed(0)
    model, tok = load_model(args.model), load_tokenizer(args.model)
    x_cal = mlp_inputs(model, tok, args.layer, "c4-sample", 64, 512)
    x_eval = mlp_inputs(model, tok, args.layer, "wiki-sample", 16, 512)
    w_full = model.model.layers[args.layer].mlp.up_proj.weight.detach().float()
    spec = QuantSpec(args.bits, args.group_size)
    key = f"{args.model}.L{args.layer}.E{args.experts}k{args.top_k}.{args.bits}b.g{args.group_size}"
    results = json.loads(OUT.read_text()) if OUT.exists() else {}
    rows = results.setdefault(key, {})
    mixes = [int(m) for m in args.mix.split(",") if m]
    for seed in range(args.seeds):
        g = torch.Generator().manual_seed(seed)
        router = torch.randn(x_cal.shape[1], args.experts, generator=g)
        top_cal = (x_cal @ router).topk(args.top_k, dim=-1).indices
        top_eval = (x_eval @ router).topk(args.top_k, dim=-1).indices
        e = int(torch.randint(args.experts, (1,), generator=g))  # one expert per seed
        mine = x_cal[(top_cal == e).any(-1)]
        held = x_eval[(top_eval == e).any(-1)]
        w = w_full[torch.randperm(w_full.shape[0], generator=g)[: args.rows]]
        H_layer = second_moment(x_cal)
        counts = [len(mine) if c == "all" else int(c) for c in args.counts.split(",")]
        plan = [("layer", len(x_cal))] + [(p, c) for c in counts if c <= len(mine)
                                          for p in ["routed", *(f"mix{m}" for m in mixes)]]
        for policy, n in plan:
            name = f"seed{seed}.{policy}.{n}"
            if name in rows:
                continue
            if policy == "layer":
                H = H_layer
            else:
                gen = torch.Generator().manual_seed(1000 * seed + n)  # the same n tokens for each policy
                H = second_moment(mine[torch.randperm(len(mine), generator=gen)[:n]])
                if policy.startswith("mix"):
                    m = int(policy[3:])
                    H = (n * H + m * H_layer) / (n + m)
            rows[name] = {"seed": seed, "policy": policy, "tokens": n, "expert_tokens": len(mine),
                          "eval_tokens": len(held), "rel_err": quantized_error(w, H, held, spec)}
            print(name, rows[name])
            OUT.parent.mkdir(parents=True, exist_ok=True)
            OUT.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\n{key}: relative output error on held-out routed tokens, mean over {args.seeds} experts")
    policies = ["routed", *(f"mix{m}" for m in mixes)]
    layer = [r["rel_err"] for r in rows.values() if r["policy"] == "layer"]
    print(f"H from all {len(x_cal)} tokens of the layer: {sum(layer) / len(layer):.5f}")
    print("| routed tokens | " + " | ".join(policies) + " |\n" + "|---" * (len(policies) + 1) + "|")
    for c in args.counts.split(","):
        cells = []
        for p in policies:
            vals = [r["rel_err"] for r in rows.values() if r["policy"] == p
                    and (r["tokens"] == r["expert_tokens"] if c == "all" else r["tokens"] == int(c))]
            cells.append(f"{sum(vals) / len(vals):.5f}" if vals else "")
        print(f"| {c} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
