"""What ``--shrink auto``'s choice costs, and whether its cheaper trials choose the same.

    python bench/shrink_choice_speed.py [--model smollm2-135m] [--blocks 2,15] [--type Q3_K]
        [--nsamples 16] [--variants ref,f32,f32-r512,f32-r256] [--linears down_proj]

For every linear of the chosen FP blocks (calibration windows of c4-sample, as the
pipeline draws them, split into even and odd folds as ``--shrink auto`` splits them) it
runs :func:`~neuqi.quant.gptq.choose_shrink` once per variant on the same parameters
(the GGUF type's NeUQI parameters, or NeUQI's for a ``BITS:GROUP`` spec) and records
its seconds, the shrink it chose and the held-out loss of every candidate it tried.
``ref`` is the trial solve on every row with float64 factorisations; ``f32`` factors
in float32; ``-rN`` solves and scores only N evenly spaced rows.  One process, one
variant after the other; run it alone on the CPU.  Writes
``bench/results/shrink_choice_speed.{json,md}`` as it goes; a rerun skips the rows there.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from neuqi.data.cache import cache_dir
from neuqi.data.corpora import load_text, sample_windows, tokenize
from neuqi.io_utils import atomic_write_json, atomic_write_text
from neuqi.models.adapters import adapter_for
from neuqi.models.loading import load_model, load_tokenizer
from neuqi.pipeline.sequential import capture_layer_inputs, decoder_layers, group_statistics, layer_outputs
from neuqi.quant import QuantSpec
from neuqi.quant.gguf_types import GGUF_TYPES, gguf_params, gguf_type
from neuqi.quant.gptq import choose_shrink, damped_diagonal
from neuqi.quant.init import init_params

VARIANTS: dict[str, dict] = {
    "ref": {"max_rows": None, "factor_dtype": torch.float64},
    "f64-r512": {"max_rows": 512, "factor_dtype": torch.float64},
    "f32": {"max_rows": None, "factor_dtype": torch.float32},
    "f32-r512": {"max_rows": 512, "factor_dtype": torch.float32},
    "f32-r256": {"max_rows": 256, "factor_dtype": torch.float32},
}
OUT = Path("bench/results/shrink_choice_speed")
DAMP = 0.01


def block_folds(model, adapter, windows, blocks: list[int]):
    """``(block, name, W, (H_even, H_odd))`` for every linear of the FP ``blocks``."""
    batches = capture_layer_inputs(model, adapter, windows, 4, torch.device("cpu"))
    layers = decoder_layers(model, adapter)
    for i, layer in enumerate(layers[: max(blocks) + 1]):
        batches = [b.at_layer(i) for b in batches]
        if i in blocks:
            for group in adapter.layer_groups(layer):
                first = layer.get_submodule(group[0])
                _, _, folds = group_statistics(layer, first, batches, None, folds=True)
                for n in group:
                    yield i, n, layer.get_submodule(n).weight.detach().float().clone(), folds
        batches = layer_outputs(layer, batches)


def markdown(rows: dict, variants: list[str]) -> str:
    head = "| block | linear | shape | " + " | ".join(f"{v} s | {v} shrink" for v in variants) + " |"
    out = [head, "|" + "---|" * (3 + 2 * len(variants))]
    for r in rows.values():
        cells = []
        for v in variants:
            x = r["variants"].get(v)
            cells += [f"{x['seconds']:.2f}", f"{x['shrink']:.3f}"] if x else ["", ""]
        out.append(f"| {r['block']} | {r['linear']} | {r['shape']} | " + " | ".join(cells) + " |")
    tot = {v: sum(r["variants"][v]["seconds"] for r in rows.values() if v in r["variants"]) for v in variants}
    same = {v: sum(r["variants"][v]["shrink"] == r["variants"]["ref"]["shrink"] for r in rows.values()
                   if v in r["variants"] and "ref" in r["variants"]) for v in variants}
    out += ["", "| variant | total s | same choice as ref |", "|---|---|---|"]
    out += [f"| {v} | {tot[v]:.1f} | {same[v]} of {len(rows)} |" for v in variants]
    return "\n".join(out) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--blocks", default="2,15")
    ap.add_argument("--type", default="Q3_K", help="a GGUF type name or BITS:GROUP")
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--variants", default="ref,f32,f32-r512,f32-r256")
    ap.add_argument("--linears", default="", help="comma list of name endings (default: all)")
    args = ap.parse_args()
    variants = [v.strip() for v in args.variants.split(",")]
    if bad := [v for v in variants if v not in VARIANTS]:
        raise SystemExit(f"unknown variant(s) {bad}; choose from {list(VARIANTS)}")
    torch.manual_seed(0)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    json_path = OUT.with_suffix(".json")
    rows = json.loads(json_path.read_text()) if json_path.exists() else {}
    t = gguf_type(args.type) if args.type.upper() in GGUF_TYPES else None
    spec = t.spec if t else QuantSpec(*(int(x) for x in args.type.split(":")))
    path = cache_dir() / "models" / args.model
    model, tok = load_model(path), load_tokenizer(path)
    adapter = adapter_for(model.config.model_type)
    windows = sample_windows(tokenize(load_text("c4-sample"), tok), args.nsamples, 512, seed=0)
    wanted = [s.strip() for s in args.linears.split(",") if s.strip()]
    blocks = [int(b) for b in args.blocks.split(",")]
    with torch.no_grad():
        for block, name, W, (H_fit, H_score) in block_folds(model, adapter, windows, blocks):
            if (wanted and not any(name.endswith(x) for x in wanted)) or (t and not t.fits(W.shape[1])):
                continue
            key = f"{args.model}/{args.type}/{args.nsamples}/{block}/{name}"
            row = rows.setdefault(key, {"block": block, "linear": name.rsplit(".", 1)[-1],
                                        "shape": "×".join(map(str, W.shape)), "variants": {}})
            H = (H_fit + H_score) / 2  # the folds' windows are equal in number here
            h_diag = damped_diagonal(H, DAMP)
            params = gguf_params(W, t, "neuqi", h_diag) if t else init_params(W, spec, "neuqi", h_diag)
            for v in variants:
                if v in row["variants"]:
                    continue
                t0 = time.perf_counter()
                a, losses = choose_shrink(W, params, spec, H_fit, H_score, damp=DAMP, **VARIANTS[v])
                row["variants"][v] = {"seconds": time.perf_counter() - t0, "shrink": a,
                                      "losses": {f"{c:g}": x for c, x in losses.items()}}
                print(f"{key} {v}: {row['variants'][v]['seconds']:.2f} s, shrink {a:.3f}", flush=True)
                atomic_write_json(json_path, rows)
                atomic_write_text(OUT.with_suffix(".md"), markdown(rows, variants))


if __name__ == "__main__":
    main()
