"""Seconds of NeUQI's scale search under its three lower bounds: clip-only, pair, pair + binned rounding.

    python bench/neuqi_search_speed.py [--model smollm2-135m] [--layer 3] [--repeat 1]
        [--specs 3:-1,4:-1,3:64,2:64] [--variants clip-only,pair,pair+rounding]

The search skips a candidate scale for a group when a lower bound of the group's loss
there exceeds its best so far; the skipped candidates could not have won, so both
bounds give the same parameters (checked here on every layer) and only the time
differs.  The clip-only bound ``Σ hp (d − maxq·s)₊²`` (the bound before this bench was
written, candidates visited from large to small) prunes only scales that are too small;
the rounding-aware one ``Σ hp · min_m (d − m·s)²`` with a sparse first pass also prunes
scales that are too large, which channel-wise rows (optimum far below min-max) are full
of.  The pair bound still lets a pair split its rounding error, so on long rows it
sees about a quarter of it; the binned rounding bound (``_rounding_bound``, used on
groups of 256 and more) counts every element's distance to the nearest code.
Real layers: the 7 linears of one decoder block with their diag(H) from c4-sample.
The variants run side by side in one process, one at a time.  Writes
``bench/results/neuqi_search_speed[.<model>].json``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from neuqi.quant import QuantSpec, fake_quantize, group_weighted_error, init_params
from neuqi.quant import init as init_mod

VARIANTS = ("clip-only", "pair", "pair+rounding")


def clip_only_bound(spans, hp, s, maxq):
    return (hp * torch.relu(spans - maxq * s[:, None]) ** 2).sum(dim=1)


def descending(top: int, skip: int, stride: int = 8) -> list[int]:
    return [i for i in range(top, 0, -1) if i != skip]


def no_bound(ws, hs, spans, hp, s, maxq):
    return torch.zeros_like(s)


def timed_search(layers, spec: QuantSpec, variant: str, repeat: int) -> tuple[float, list]:
    saved = init_mod._pair_bound, init_mod._coarse_order, init_mod._rounding_bound
    if variant != "pair+rounding":
        init_mod._rounding_bound = no_bound
    if variant == "clip-only":
        init_mod._pair_bound, init_mod._coarse_order = clip_only_bound, descending
    try:
        best, params = float("inf"), []
        for _ in range(repeat):
            t0 = time.perf_counter()
            params = [init_params(w, spec, "neuqi", torch.diagonal(H)) for _, w, H in layers]
            best = min(best, time.perf_counter() - t0)
        return best, params
    finally:
        init_mod._pair_bound, init_mod._coarse_order, init_mod._rounding_bound = saved


def main() -> None:
    from layer_bench import block_layers  # a sibling bench script

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m", help="a model under the neuqi cache")
    ap.add_argument("--layer", type=int, default=3)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--specs", default="3:-1,4:-1,3:64,2:64", help="bits:group,...")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    args = ap.parse_args()
    specs = [QuantSpec(int(b), int(g)) for b, g in (c.split(":") for c in args.specs.split(","))]
    variants = args.variants.split(",")
    torch.manual_seed(0)
    layers = [(n, w.float(), H.float()) for n, w, H in block_layers(args.layer, args.model)]
    init_params(layers[0][1][:8], specs[0], "neuqi", torch.diagonal(layers[0][2]))  # compile once
    rows = []
    print(f"{'spec':6s} " + " ".join(f"{v + ' s':>15s}" for v in variants)
          + f" {'speed-up':>9s} {'max rel. err diff':>18s}")
    for spec in specs:
        secs, params = {}, {}
        for v in variants:
            secs[v], params[v] = timed_search(layers, spec, v, args.repeat)
        diff = 0.0
        for i, (_, w, H) in enumerate(layers):
            h = torch.diagonal(H)
            errs = [group_weighted_error(w, fake_quantize(w, params[v][i], spec), spec, h).double()
                    for v in variants]
            for e in errs[1:]:
                diff = max(diff, float(((e - errs[0]) / errs[0].clamp_min(1e-30)).abs().max()))
        name = f"{spec.bits}b{'ch' if spec.group_size == -1 else 'g' + str(spec.group_size)}"
        speedup = secs[variants[0]] / secs[variants[-1]]
        print(f"{name:6s} " + " ".join(f"{secs[v]:15.2f}" for v in variants)
              + f" {speedup:8.2f}x {diff:18.2e}", flush=True)
        rows.append({"bits": spec.bits, "group_size": spec.group_size, "seconds": secs,
                     "speedup_first_to_last": speedup, "max_rel_error_diff": diff})
    suffix = "" if args.model == "smollm2-135m" else f".{args.model}"
    out = Path(__file__).parent / "results" / f"neuqi_search_speed{suffix}.json"
    out.write_text(json.dumps({"model": args.model, "layer": args.layer, "variants": variants,
                               "threads": torch.get_num_threads(), "torch": torch.__version__,
                               "rows": rows}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
