"""Seconds and optimality of NeUQI's parameter search, one variant per change, side by side.

    python bench/neuqi_search_speed.py [--model smollm2-135m] [--layer 3] [--repeat 1]
        [--specs 3:64,2:64,3:-1,4:-1,4:64] [--rows 64] [--variants all]

NeUQI (float zero), each variant adding one change to the one before:

- ``before``: the search of commit 9152b71: exact best zero at every candidate scale
  the pair bound cannot rule out (the binned rounding bound only on groups of 256+),
  then two rounds of exact best scale / exact best zero.
- ``+rounding bound``: the binned rounding bound on every group length.
- ``+upper bounds``: every candidate scale first evaluated directly with a few zeros
  (:func:`neuqi.quant.init.upper_bounds`); the best of those seeds the exact search.
- ``+lloyd``: the refinement's exact scale sweep replaced by the least-squares scale
  for the current codes (three rounds).
- ``+UB on long rows``: as ``+lloyd``, with the upper bounds only on rows of 256 or
  more (``UB_MIN_LEN``; on groups of 64 they cost more than they save).
- ``+windows``: as ``+UB on long rows``, with every exact zero sweep over the few unit
  windows that hold a minimiser (:func:`neuqi.quant.init._sweep_windows`) instead of
  all ``maxq`` of the bracket.  Every earlier variant sweeps the whole bracket.  This
  is the bounded grid search (``search="grid"``), the default until the pattern search.
- ``patterns``: the pattern search (:func:`neuqi.quant.init._init_neuqi_patterns`) on
  every configuration: a few zero sweeps, each scoring every code pattern it passes
  through by that pattern's own least-squares grid, then the exact best zero for the
  final scale.
- ``multistart``: the multi-start search (:func:`neuqi.quant.init._init_neuqi_multistart`)
  on every configuration: 33 start scales carried into their valleys by direct
  evaluation and Lloyd steps, then pattern sweeps at the second valley's point and at
  the best scale (rows of 256 or more: at both valleys' points and ±3 % of each, then
  at the best scale).
- ``banded``: the grid search of ``+windows`` on the scales within two grid steps of
  the multi-start search's two best valleys only
  (:func:`neuqi.quant.init._init_neuqi_banded`).
- ``default``: the search as it ships: ``multistart`` at 2 to 4 bits, ``+windows``
  elsewhere (until 2026-12-07 also on 2- to 4-bit rows of 256 or more).

NeUQI_int: the exact scale sweep over every scale for every integer zero (``all zeros``,
the search of 9152b71), for the 3 zeros the coarse grid ranks best (``top-3``, the search
until the bracketed one), and the default (``valleys``): the exact sweep only within two
grid points of the coarse grid's lowest valleys over (zero, scale).  Each group's loss
is compared with ``all zeros``'.  At 2 bits ``_init_neuqi_int`` takes the exhaustive
search whatever it is asked, so the three rows run the same search there.

Real layers: the 7 linears of one decoder block with their diag(H) from c4-sample.
Time is the whole block; optimality is each group's weighted error divided by a dense
optimum (1000 scales up to 1.25·s₀, exact best zero each) on the first ``--rows`` rows of
every linear.  The variants run one after the other in one process.  Writes
``bench/results/neuqi_search_speed[.<model>].json``.
"""

from __future__ import annotations

import argparse
import json
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from neuqi.quant import QuantSpec
from neuqi.quant import init as init_mod
from neuqi.quant.init import dense_scale_search, group_loss, to_groups

NEUQI_VARIANTS = ("before", "+rounding bound", "+upper bounds", "+lloyd", "+UB on long rows", "+windows",
                  "patterns", "multistart", "banded", "default")
OLD_ROUND_BOUND_MIN_LEN = 256  # 9152b71 used the binned bound on long groups only


@contextmanager
def variant(name: str):
    """Patch ``init_mod`` so that ``_init_neuqi`` runs as ``name``."""
    saved_bound, saved_init = init_mod._rounding_bound, init_mod._init_neuqi
    saved_grid = init_mod._init_neuqi_grid
    saved_windows = init_mod._sweep_windows
    original = init_mod._rounding_bound

    def whole_bracket(u, h, maxq):
        ud, hd = u.double(), h.double()
        start = -(hd * ud).sum(1) / hd.sum(1)
        return start, torch.full_like(start, maxq, dtype=torch.long)

    def long_rows_only(ws, hs, spans, hp, s, maxq, *a):
        if ws.shape[1] < OLD_ROUND_BOUND_MIN_LEN:
            return torch.zeros_like(s)
        return original(ws, hs, spans, hp, s, maxq, *a)

    opts = {
        "before": dict(upper_bound=False, refine="sweep", rounds=2),
        "+rounding bound": dict(upper_bound=False, refine="sweep", rounds=2),
        "+upper bounds": dict(upper_bound=True, refine="sweep", rounds=2),
        "+lloyd": dict(upper_bound=True),
        "+UB on long rows": {},
        "+windows": {},
        "patterns": {},
        "multistart": {},
        "banded": {},
        "default": {},
    }[name]
    if name == "before":
        init_mod._rounding_bound = long_rows_only
    if name not in ("+windows", "patterns", "multistart", "banded", "default"):
        init_mod._sweep_windows = whole_bracket
    if name == "patterns":
        init_mod._init_neuqi = init_mod._init_neuqi_patterns
    elif name == "multistart":
        init_mod._init_neuqi = init_mod._init_neuqi_multistart
    elif name == "banded":
        init_mod._init_neuqi = init_mod._init_neuqi_banded
    elif name != "default":
        init_mod._init_neuqi = lambda wg, hg, maxq: saved_grid(wg, hg, maxq, **opts)
    try:
        yield
    finally:
        init_mod._rounding_bound, init_mod._init_neuqi = saved_bound, saved_init
        init_mod._sweep_windows = saved_windows


def run_block(layers, spec: QuantSpec, fn, repeat: int) -> tuple[float, list]:
    best, out = float("inf"), []
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = [fn(*to_groups(w, spec, h)[:2], spec.maxq) for _, w, h in layers]
        best = min(best, time.perf_counter() - t0)
    return best, out


def ratios(layers, spec: QuantSpec, params: list, dense: list, rows: int) -> dict:
    r = []
    for (_, w, h), (s, z), opt in zip(layers, params, dense, strict=True):
        wg, hg, n_groups = to_groups(w, spec, h)
        k = rows * n_groups
        loss = group_loss(wg[:k], hg[:k], s[:k], z[:k], spec.maxq).double()
        r.append(loss / opt.clamp_min(1e-30))
    r = torch.cat(r)
    return {"mean": float(r.mean()), "worst": float(r.max())}


def main() -> None:
    from layer_bench import block_layers  # a sibling bench script

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m", help="a model under the neuqi cache")
    ap.add_argument("--layer", type=int, default=3)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--specs", default="3:64,2:64,3:-1,4:-1,4:64", help="bits:group,...")
    ap.add_argument("--rows", type=int, default=64, help="rows per linear for the optimality ratio")
    ap.add_argument("--variants", default="all",
                    help=f"NeUQI variants to run, comma-separated, 'all' ({', '.join(NEUQI_VARIANTS)}), "
                         "or '' for the NeUQI_int rows alone")
    ap.add_argument("--no-int", action="store_true", help="skip the NeUQI_int rows")
    ap.add_argument("--out", default=None,
                    help="results JSON (default: bench/results/neuqi_search_speed[.MODEL].json)")
    args = ap.parse_args()
    specs = [QuantSpec(int(b), int(g)) for b, g in (c.split(":") for c in args.specs.split(","))]
    variants = NEUQI_VARIANTS if args.variants == "all" else tuple(v for v in args.variants.split(",") if v)
    if unknown := set(variants) - set(NEUQI_VARIANTS):
        ap.error(f"unknown variants {sorted(unknown)}; choose from {', '.join(NEUQI_VARIANTS)}")
    torch.manual_seed(0)
    layers = [(n, w.float(), torch.diagonal(H).float()) for n, w, H in block_layers(args.layer, args.model)]
    suffix = "" if args.model == "smollm2-135m" else f".{args.model}"
    out = Path(__file__).parent / "results" / f"neuqi_search_speed{suffix}.json"
    out = Path(args.out) if args.out else out
    rows = []
    for spec in specs:
        name = f"{spec.bits}b{'ch' if spec.group_size == -1 else 'g' + str(spec.group_size)}"
        dense = [dense_scale_search(w[: args.rows], spec, h) for _, w, h in layers] if variants else []
        row = {"spec": name, "neuqi": {}, "neuqi_int": {}}
        for v in variants:
            with variant(v):
                run_block(layers[:1], spec, init_mod._init_neuqi, 1)  # compile outside the clock
                secs, params = run_block(layers, spec, init_mod._init_neuqi, args.repeat)
            row["neuqi"][v] = {"seconds": secs, **ratios(layers, spec, params, dense, args.rows)}
            print(f"{name:5s} neuqi {v:16s} {secs:7.2f} s  mean {row['neuqi'][v]['mean']:.6f}  "
                  f"worst {row['neuqi'][v]['worst']:.4f}", flush=True)
        if not args.no_int:
            int_params = {}
            for v, keep, bracket in (("all zeros", 1 << 30, None), ("top-3", init_mod.NEUQI_INT_ZEROS, None),
                                     ("valleys", init_mod.NEUQI_INT_ZEROS, init_mod.NEUQI_INT_BRACKET)):
                fn = lambda wg, hg, maxq, keep=keep, bracket=bracket: init_mod._init_neuqi_int(  # noqa: E731
                    wg, hg, maxq, keep=keep, bracket=bracket)
                run_block(layers[:1], spec, fn, 1)
                secs, int_params[v] = run_block(layers, spec, fn, args.repeat)
                row["neuqi_int"][v] = {"seconds": secs}
            for v in ("top-3", "valleys"):
                r = []
                for (_, w, h), a, b in zip(layers, int_params["all zeros"], int_params[v], strict=True):
                    wg, hg, _ = to_groups(w, spec, h)
                    la, lb = (group_loss(wg, hg, s, z, spec.maxq).double() for s, z in (a, b))
                    r.append(lb / la.clamp_min(1e-30))
                r = torch.cat(r)
                row["neuqi_int"][v].update(mean=float(r.mean()), worst=float(r.max()))
            for v, d in row["neuqi_int"].items():
                ratio = f"  mean {d['mean']:.7f}  worst {d['worst']:.5f}" if "mean" in d else ""
                print(f"{name:5s} neuqi_int {v:9s} {d['seconds']:7.2f} s{ratio}", flush=True)
        rows.append(row)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"model": args.model, "layer": args.layer, "rows_for_ratio": args.rows,
                                   "threads": torch.get_num_threads(), "torch": torch.__version__,
                                   "results": rows}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
