"""Seconds of NeUQI's scale search with the rounding-aware pair bound vs the clip-only one.

    python bench/neuqi_search_speed.py [--layer 3] [--repeat 1]

The search skips a candidate scale for a group when a lower bound of the group's loss
there exceeds its best so far; the skipped candidates could not have won, so both
bounds give the same parameters (checked here on every layer) and only the time
differs.  The clip-only bound ``Σ hp (d − maxq·s)₊²`` (the bound before this bench was
written, candidates visited from large to small) prunes only scales that are too small;
the rounding-aware one ``Σ hp · min_m (d − m·s)²`` with a sparse first pass also prunes
scales that are too large, which channel-wise rows (optimum far below min-max) are full
of.  Real layers: the 7 linears of one decoder block of SmolLM2-135M with their
diag(H) from c4-sample.  Both variants run side by side in one process, one at a time.
Writes ``bench/results/neuqi_search_speed.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from neuqi.quant import QuantSpec, fake_quantize, group_weighted_error, init_params
from neuqi.quant import init as init_mod

SPECS = [QuantSpec(3, -1), QuantSpec(4, -1), QuantSpec(3, 64), QuantSpec(2, 64)]


def clip_only_bound(spans, hp, s, maxq):
    return (hp * torch.relu(spans - maxq * s[:, None]) ** 2).sum(dim=1)


def descending(top: int, skip: int, stride: int = 8) -> list[int]:
    return [i for i in range(top, 0, -1) if i != skip]


def timed_search(layers, spec: QuantSpec, variant: str, repeat: int) -> tuple[float, list]:
    saved = init_mod._pair_bound, init_mod._coarse_order
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
        init_mod._pair_bound, init_mod._coarse_order = saved


def main() -> None:
    from layer_bench import block_layers  # a sibling bench script

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layer", type=int, default=3)
    ap.add_argument("--repeat", type=int, default=1)
    args = ap.parse_args()
    torch.manual_seed(0)
    layers = [(n, w.float(), H.float()) for n, w, H in block_layers(args.layer)]
    init_params(layers[0][1][:8], SPECS[0], "neuqi", torch.diagonal(layers[0][2]))  # compile once
    rows = []
    print(f"{'spec':6s} {'clip-only s':>12s} {'pair s':>8s} {'speed-up':>9s} {'max rel. err diff':>18s}")
    for spec in SPECS:
        old_s, old_p = timed_search(layers, spec, "clip-only", args.repeat)
        new_s, new_p = timed_search(layers, spec, "pair", args.repeat)
        diff = 0.0
        for (_, w, H), a, b in zip(layers, old_p, new_p, strict=True):
            h = torch.diagonal(H)
            ea = group_weighted_error(w, fake_quantize(w, a, spec), spec, h).double()
            eb = group_weighted_error(w, fake_quantize(w, b, spec), spec, h).double()
            diff = max(diff, float(((eb - ea) / ea.clamp_min(1e-30)).abs().max()))
        name = f"{spec.bits}b{'ch' if spec.group_size == -1 else 'g' + str(spec.group_size)}"
        print(f"{name:6s} {old_s:12.2f} {new_s:8.2f} {old_s / new_s:8.2f}x {diff:18.2e}", flush=True)
        rows.append({"bits": spec.bits, "group_size": spec.group_size, "clip_only_seconds": old_s,
                     "pair_seconds": new_s, "speedup": old_s / new_s, "max_rel_error_diff": diff})
    out = Path(__file__).parent / "results" / "neuqi_search_speed.json"
    out.write_text(json.dumps({"layer": args.layer, "threads": torch.get_num_threads(),
                               "torch": torch.__version__, "rows": rows}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
