"""Does the refit's lower proxy loss hold on tokens it never saw?  (issue 18)

    python bench/refit_heldout.py [--block 3]

H_train from 32 × 512 windows of the first half of c4-sample, H_test from 32 × 512 of
the second half (FP inputs, SmolLM2-135M).  Every variant is fitted on H_train; the
table gives its relative proxy loss ``tr(ΔW H ΔWᵀ)/tr(W H Wᵀ)`` on both, averaged over
the block's 7 linears.  Prints the table; nothing is cached.
"""

from __future__ import annotations

import argparse

import torch

from neuqi.data.cache import cache_dir
from neuqi.data.corpora import load_text, sample_windows, tokenize
from neuqi.models.adapters import adapter_for
from neuqi.models.loading import load_model, load_tokenizer
from neuqi.pipeline.sequential import block_hessians
from neuqi.quant import QuantSpec, dequantize, gptq_quantize

VARIANTS = {
    "NeUQI_int": ("neuqi_int", {}),
    "NeUQI_int refit4": ("neuqi_int", {"refit": 4}),
    "NeUQI_int select": ("neuqi_int", {"also_inits": ("minmax", "mse")}),
    "NeUQI_int select+refit4": ("neuqi_int", {"also_inits": ("minmax", "mse"), "refit": 4}),
    "mse": ("mse", {}),
    "NeUQI": ("neuqi", {}),
    "NeUQI refit4": ("neuqi", {"refit": 4}),
}


def rel(D: torch.Tensor, w: torch.Tensor, H: torch.Tensor) -> float:
    H = H.double()
    return float(torch.einsum("oi,ij,oj->", D, H, D) / torch.einsum("oi,ij,oj->", w.double(), H, w.double()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--block", type=int, default=3)
    ap.add_argument("--configs", default="3:64,2:64")
    args = ap.parse_args()
    path = cache_dir() / "models" / "smollm2-135m"
    model, tok = load_model(path), load_tokenizer(path)
    ids = tokenize(load_text("c4-sample")[:800_000], tok)
    half = ids.numel() // 2
    adapter = adapter_for(model.config.model_type)
    train = block_hessians(model, adapter, sample_windows(ids[:half], 32, 512, seed=0), args.block)
    test = block_hessians(model, adapter, sample_windows(ids[half:], 32, 512, seed=1), args.block)
    print(f"{'config':8s} {'set':6s} " + " ".join(f"{k:>24s}" for k in VARIANTS))
    for c in args.configs.split(","):
        bits, group = (int(x) for x in c.split(":"))
        spec = QuantSpec(bits, group)
        sums = {k: [0.0, 0.0] for k in VARIANTS}
        for (_, w, Ha), (_, _, Hb) in zip(train, test, strict=True):
            for k, (init, kw) in VARIANTS.items():
                r = gptq_quantize(w, Ha, spec, init=init, **kw)
                D = (w - dequantize(r.codes, r.params, spec)).double()
                sums[k][0] += rel(D, w, Ha) / len(train)
                sums[k][1] += rel(D, w, Hb) / len(train)
        tag = f"{bits}b {'ch' if group == -1 else f'g{group}'}"
        for i, name in enumerate(("train", "test")):
            print(f"{tag:8s} {name:6s} " + " ".join(f"{v[i]:24.5f}" for v in sums.values()), flush=True)


if __name__ == "__main__":
    main()
