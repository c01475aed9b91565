"""How much of a run's perplexity does the clipping of its largest weights cost?

NeUQI's least-squares scale may clip a row's few largest weights to sharpen the grid
for the rest; the layer objective (diag(H)-weighted) approves, the model may not.
This restores, in a dense copy of a quantized run, the weights its grid clipped (beyond
the grid's end by more than ``--steps`` quantization steps) to their FP values and
measures perplexity again.  A control restores as many of the largest-error weights
that were *not* clipped, so "any restored weights help" is told apart from "the
clipped ones matter".

    python bench/clip_restore.py RUN --fp MODEL [--sets wiki-sample,austen-test]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch import Tensor, nn

from neuqi.formats.checkpoint import load_quantized
from neuqi.formats.qlinear import QuantLinear
from neuqi.io_utils import atomic_write_json
from neuqi.models.loading import load_model, load_tokenizer
from neuqi.pipeline.run import evaluate_sets


def clipped_mask(q: QuantLinear, w_fp: Tensor, steps: float) -> tuple[Tensor, Tensor]:
    """(clipped, |error|): weights beyond the grid's end by more than ``steps`` steps.

    Only the outward side counts: an edge code whose weight lies inside the range
    (an error that LDLQ's feedback put there) is not clipping."""
    codes = q.codes()
    deq = q.dequantize()
    g = q.in_features if q.group_size == -1 else min(q.group_size, q.in_features)
    g_idx = torch.arange(q.in_features) // g
    margin = steps * q.scales.float().t()[:, g_idx]
    below = (codes == 0) & (w_fp < deq - margin)
    above = (codes == 2**q.bits - 1) & (w_fp > deq + margin)
    return below | above, (deq - w_fp).abs()


def control_mask(clipped: Tensor, err: Tensor) -> Tensor:
    """As many weights as ``clipped`` holds: the largest errors among the rest."""
    n = int(clipped.sum())
    mask = torch.zeros_like(clipped)
    if n:
        idx = err.masked_fill(clipped, -1).flatten().topk(n).indices
        mask.view(-1)[idx] = True
    return mask


def dense_variants(run: Path, fp: Path, steps: float) -> tuple[dict[str, dict[str, Tensor]], dict]:
    """Dense weights of every quantized linear for each variant, and counts."""
    qmodel = load_quantized(run)
    fp_state = load_model(fp).state_dict()
    variants: dict[str, dict[str, Tensor]] = {"as quantized": {}, "clipped restored": {},
                                              "control restored": {}}
    counts = {"weights": 0, "clipped": 0, "linears_with_clipped": 0}
    for name, mod in qmodel.named_modules():
        if not isinstance(mod, QuantLinear):
            continue
        w_fp = fp_state[f"{name}.weight"].float()
        clipped, err = clipped_mask(mod, w_fp, steps)
        control = control_mask(clipped, err)
        deq = mod.dequantize()
        variants["as quantized"][name] = deq
        variants["clipped restored"][name] = torch.where(clipped, w_fp, deq)
        variants["control restored"][name] = torch.where(control, w_fp, deq)
        counts["weights"] += w_fp.numel()
        counts["clipped"] += int(clipped.sum())
        counts["linears_with_clipped"] += int(bool(clipped.any()))
    return variants, counts


def install(model: nn.Module, weights: dict[str, Tensor]) -> None:
    for name, w in weights.items():
        model.get_submodule(name).weight.data.copy_(w)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path, help="a neuqi run folder (native checkpoint)")
    ap.add_argument("--fp", type=Path, required=True, help="the FP model it was quantized from")
    ap.add_argument("--sets", default="wiki-sample,austen-test")
    ap.add_argument("--eval-windows", type=int, default=4)
    ap.add_argument("--steps", type=float, default=1.0,
                    help="how far (in quantization steps) beyond the grid's end a weight counts as clipped")
    ap.add_argument("--out", type=Path, default=None, help="JSON (default: RUN/clip_restore.json)")
    args = ap.parse_args()

    variants, counts = dense_variants(args.run, args.fp, args.steps)
    model = load_model(args.fp)
    tokenizer = load_tokenizer(args.fp)
    sets = [s for s in args.sets.split(",") if s]
    rows = {}
    for label, weights in variants.items():
        install(model, weights)
        res = evaluate_sets(model, tokenizer, sets, 2048, torch.device("cpu"), args.eval_windows)
        rows[label] = {s: res[s].get("ppl") for s in sets}
        print(label, json.dumps(rows[label]), flush=True)
    frac = counts["clipped"] / max(counts["weights"], 1)
    print(f"\nclipped weights (beyond the grid by > {args.steps} steps): {counts['clipped']} "
          f"of {counts['weights']} ({100 * frac:.4f} %), in {counts['linears_with_clipped']} linears")
    print("| variant | " + " | ".join(f"ppl {s}" for s in sets) + " |")
    print("|---|" + "---|" * len(sets))
    for label, r in rows.items():
        print(f"| {label} | " + " | ".join(f"{r[s]:.2f}" for s in sets) + " |")
    out = args.out or args.run / "clip_restore.json"
    atomic_write_json(out, {"run": str(args.run), "steps": args.steps, "counts": counts,
                            "eval_windows": args.eval_windows, "ppl": rows})


if __name__ == "__main__":
    main()
