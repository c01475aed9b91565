"""Study: can a cheap ranking of the candidate scales replace most exact zero sweeps?

    python bench/neuqi_ranked_search.py [--specs 3:64] [--layer 3] [--rows 64]

Issue 19 wants NeUQI's float-zero search several times cheaper with the same
parameters.  The shipped search (:func:`neuqi.quant.init._init_neuqi`) runs the exact
best-zero sweep at every coarse scale that its lower bounds cannot rule out (~15 of 80
per group of 64), then least-squares (Lloyd) refinement.  This script measures the
alternative: rank the coarse scales by a cheap *upper* estimate of each scale's best
loss (a few zeros evaluated directly, then Lloyd steps on the zero; the same kernel as
:func:`neuqi.quant.init.upper_bounds`), sweep exactly only the ``top`` best ranked,
then refine as the shipped search does.  Min-max's own point is kept as a floor.

Two tables on the real linears of one SmolLM2-135M block (diag(H) from c4-sample):

1. How good the best of ``K`` evenly spaced coarse scales is, each with its exact best
   zero and no refinement: the ceiling of any "rank the grid, refine the best" scheme
   before refinement.
2. Seconds for the 7 linears (one process, compiled kernels warmed first) and each
   group's weighted error over a dense optimum (1000 scales up to 1.25·s₀, exact zero
   each) on the first ``--rows`` rows, shipped search against ranked variants.

Writes ``bench/results/neuqi_ranked_search.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from neuqi.quant import QuantSpec
from neuqi.quant import init as init_mod
from neuqi.quant.init import best_zero, group_loss, lloyd_scale, minmax_scale, to_groups

DENSE_SCALES = 1000
MAX_RATIO = 1.25
# (K ratios from lo to 1.25, zeros per scale, Lloyd steps, exact sweeps, refinement rounds)
RANKED = [
    dict(K=40, lo=0.3, zeros=8, lloyd=2, top=3, rounds=2),
    dict(K=80, lo=0.4, zeros=8, lloyd=2, top=3, rounds=3),
    dict(K=60, lo=0.4, zeros=6, lloyd=2, top=4, rounds=3),
    dict(K=80, lo=0.4, zeros=16, lloyd=2, top=3, rounds=3),
]


def dense_curve(wg: torch.Tensor, hg: torch.Tensor, maxq: int) -> torch.Tensor:
    """``[G, DENSE_SCALES]``: every group's exact best loss at scales ``s₀·1.25·i/N``."""
    s0 = minmax_scale(wg, maxq)
    curve = torch.empty(wg.shape[0], DENSE_SCALES, dtype=torch.float64)
    for i in range(1, DENSE_SCALES + 1):
        s = s0 * (MAX_RATIO * i / DENSE_SCALES)
        _, loss = best_zero(wg / s[:, None], hg, maxq)
        curve[:, i - 1] = loss.double() * s.double() ** 2
    return curve


def ranked_search(wg, hg, maxq: int, K: int, lo: float, zeros: int, lloyd: int, top: int,
                  rounds: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank ``K`` scales by the cheap estimate, sweep the ``top`` best exactly, refine."""
    G, n = wg.shape
    s0 = minmax_scale(wg, maxq)
    ratios = torch.linspace(lo, MAX_RATIO, K, dtype=wg.dtype)
    chunk = init_mod._chunk_rows(n * K, wg.device)
    w_min, w_max = wg.amin(1, keepdim=True), wg.amax(1, keepdim=True)
    picks = []
    for start in range(0, G, chunk):
        part = slice(start, start + chunk)
        s = s0[part, None] * ratios[None, :]
        a, b = -w_min[part] / s, maxq - w_max[part] / s
        z_lo, z_hi = torch.minimum(a, b) - 0.5, torch.maximum(a, b) + 0.5
        _, est = init_mod._run_sweep(init_mod._upper_bound_chunk, wg[part], hg[part], s, z_lo, z_hi,
                                     maxq, zeros, lloyd)
        picks.append(s.gather(1, est.topk(top, dim=1, largest=False).indices))
    picked = torch.cat(picks)
    best_s = s0
    best_z = init_mod._init_minmax(wg, maxq, 1.0)[1]
    best_l = group_loss(wg, hg, best_s, best_z, maxq)

    def consider(s: torch.Tensor) -> None:
        nonlocal best_s, best_z, best_l
        z, loss = best_zero(wg / s[:, None], hg, maxq)
        loss = loss * s * s
        better = loss < best_l
        best_s = torch.where(better, s, best_s)
        best_z = torch.where(better, z, best_z)
        best_l = torch.where(better, loss, best_l)

    for j in range(top):
        consider(picked[:, j])
    for _ in range(rounds):
        s_new = lloyd_scale(wg, hg, best_s, best_z, maxq)
        consider(torch.where(torch.isfinite(s_new) & (s_new > 0), s_new, best_s))
    return best_s, best_z


def measure(fn, spec: QuantSpec, layers, groups, head, opt: torch.Tensor) -> dict:
    """Seconds of ``fn`` over every linear's groups (compiled once first, off the clock)
    and each head group's loss over the dense optimum ``opt``."""
    fn(*to_groups(layers[0][1][:8], spec, layers[0][2])[:2], spec.maxq)
    t0 = time.perf_counter()
    params = [fn(wg, hg, spec.maxq) for wg, hg in groups]
    secs = time.perf_counter() - t0
    losses = [group_loss(wg, hg, s[: wg.shape[0]], z[: wg.shape[0]], spec.maxq).double()
              for (wg, hg), (s, z) in zip(head, params, strict=True)]
    r = torch.cat(losses) / opt.clamp_min(1e-30)
    return {"seconds": secs, "mean": float(r.mean()), "worst": float(r.max())}


def main() -> None:
    from layer_bench import block_layers  # a sibling bench script

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layer", type=int, default=3)
    ap.add_argument("--specs", default="3:64", help="bits:group,...")
    ap.add_argument("--rows", type=int, default=64, help="rows per linear for the optimality ratio")
    args = ap.parse_args()
    layers = [(n, w.float(), torch.diagonal(H).float()) for n, w, H in block_layers(args.layer)]
    out = Path(__file__).parent / "results" / "neuqi_ranked_search.json"
    results = []
    for b, g in (c.split(":") for c in args.specs.split(",")):
        spec = QuantSpec(int(b), int(g))
        name = f"{spec.bits}b{'ch' if spec.group_size == -1 else 'g' + str(spec.group_size)}"
        groups = [to_groups(w, spec, h)[:2] for _, w, h in layers]
        head = [to_groups(w[: args.rows], spec, h)[:2] for _, w, h in layers]
        curve = torch.cat([dense_curve(wg, hg, spec.maxq) for wg, hg in head])
        opt = curve.min(1).values
        row: dict = {"spec": name, "grid_only": {}, "searches": {}}
        for k in (16, 24, 32, 48, 64, 80):
            idx = torch.linspace(0.35 / MAX_RATIO * DENSE_SCALES, DENSE_SCALES - 1, k).round().long()
            r = curve[:, idx].min(1).values / opt
            row["grid_only"][k] = {"mean": float(r.mean()), "worst": float(r.max())}
            print(f"{name} best of {k:2d} exact grid scales: mean {r.mean():.6f} worst {r.max():.4f}")

        searches = [("shipped (bounds + exact sweeps + Lloyd)", init_mod._init_neuqi)]
        searches += [("ranked " + " ".join(f"{k}={v}" for k, v in cfg.items()),
                      lambda wg, hg, maxq, cfg=cfg: ranked_search(wg, hg, maxq, **cfg)) for cfg in RANKED]
        for label, fn in searches:
            row["searches"][label] = r = measure(fn, spec, layers, groups, head, opt)
            print(f"{name} {label:44s} {r['seconds']:6.2f} s  mean {r['mean']:.6f}  worst {r['worst']:.4f}",
                  flush=True)
        results.append(row)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"layer": args.layer, "rows_for_ratio": args.rows,
                                   "threads": torch.get_num_threads(), "torch": torch.__version__,
                                   "results": results}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
