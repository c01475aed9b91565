"""Perplexity table on SmolLM2-135M: FP vs RTN, GPTQ-minmax, MagR, NeUQI_int, NeUQI.

    python bench/ppl_table.py [--nsamples 32 --seqlen 512 --eval-windows 8]

Every quantized run is a normal ``neuqi quantize`` run (saved under --out-dir and
reused when it already exists, so an interrupted bench resumes).  Writes
``bench/results/ppl_table.{json,md}``.  One torch process at a time: timings are
wall-clock on this machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import pickle
import subprocess
import sys
import time
from pathlib import Path

from neuqi.data.cache import cache_dir
from neuqi.data.fetch import TEXT_VERSION, fetch_model
from neuqi.eval.run import evaluate_model
from neuqi.io_utils import atomic_write_json
from neuqi.models.loading import load_model, load_tokenizer
from neuqi.pipeline.config import RunConfig, resolve_device, resolve_dtype
from neuqi.pipeline.run import evaluate_sets, read_result


def quantize_standalone(cfg: RunConfig) -> Path:
    """``quantize_model(cfg)`` in a fresh Python process, as ``neuqi quantize`` runs it.

    A run inside a long-lived benchmark process would record that process's memory
    (the FP reference, earlier runs' allocator leftovers: ~2.6 GB for SmolLM2) in its
    peak RSS; the peers' runners are fresh processes, so ours must be too.  A run a
    killed benchmark left half done continues where it stopped (``--resume``); its
    ``quantize_seconds`` then adds the layers' time recorded before the interruption."""
    cfg = dataclasses.replace(cfg, resume=True)
    child = ("import pickle, sys; from neuqi.pipeline.run import quantize_model; "
             "print(quantize_model(pickle.loads(sys.stdin.buffer.read()), quiet=True))")
    proc = subprocess.run([sys.executable, "-c", child], input=pickle.dumps(cfg),
                          stdout=subprocess.PIPE, check=False)
    if proc.returncode:
        raise RuntimeError(f"quantizing {cfg.run_name} failed (exit {proc.returncode}; its log is "
                           f"under {cfg.out_dir})")
    return Path(proc.stdout.decode().strip().splitlines()[-1])


# label -> the RunConfig fields that make the method
METHODS: dict[str, dict] = {
    "RTN": {"method": "rtn", "init": "minmax"},
    "GPTQ-minmax (LDLQ+Hsort)": {"method": "ldlq", "init": "minmax"},
    "MagR+LDLQ": {"method": "ldlq", "init": "minmax", "magr": True},
    "NeUQI_int+LDLQ": {"method": "ldlq", "init": "neuqi_int"},
    "NeUQI+LDLQ": {"method": "ldlq", "init": "neuqi"},
    # The exact grid search everywhere (the channel-wise default until 2026-12-07).
    "NeUQI+LDLQ grid": {"method": "ldlq", "init": "neuqi", "search": "grid"},
    # Beyond the paper (issue 18): per-row choice among inits and least-squares refits.
    "MSE+LDLQ": {"method": "ldlq", "init": "mse"},
    "NeUQI_int+LDLQ refit": {"method": "ldlq", "init": "neuqi_int", "refit": 4},
    "NeUQI_int+LDLQ select+refit": {"method": "ldlq", "init": "neuqi_int", "select": "minmax,mse",
                                    "refit": 4},
    "NeUQI+LDLQ refit": {"method": "ldlq", "init": "neuqi", "refit": 4},
    # |w − ŵ|^3 in the init: LDLQ's feedback makes up small errors, not clipped ones.
    "NeUQI_int+LDLQ norm3": {"method": "ldlq", "init": "neuqi_int", "init_norm": 3.0},
    "NeUQI+LDLQ norm3": {"method": "ldlq", "init": "neuqi", "init_norm": 3.0},
    "NeUQI_int+LDLQ norm3 refit": {"method": "ldlq", "init": "neuqi_int", "init_norm": 3.0, "refit": 4},
    "NeUQI_int+LDLQ norm2.5": {"method": "ldlq", "init": "neuqi_int", "init_norm": 2.5},
    "NeUQI_int+LDLQ hpow0": {"method": "ldlq", "init": "neuqi_int", "h_power": 0.0},
    "NeUQI_int+LDLQ hpow0.5": {"method": "ldlq", "init": "neuqi_int", "h_power": 0.5},
    "MSE+LDLQ hpow0": {"method": "ldlq", "init": "mse", "h_power": 0.0},
    # No weight more than one step beyond the grid (bench/clip_restore.py: why).
    "NeUQI+LDLQ clip1": {"method": "ldlq", "init": "neuqi", "max_clip": 1.0},
    "NeUQI_int+LDLQ clip1": {"method": "ldlq", "init": "neuqi_int", "max_clip": 1.0},
    "NeUQI_int+LDLQ clip0.5": {"method": "ldlq", "init": "neuqi_int", "max_clip": 0.5},
    # Each linear matches the FP model's output (GPTAQ's asymmetric calibration).
    "NeUQI+LDLQ fptarget1": {"method": "ldlq", "init": "neuqi", "fp_target": 1.0},
    "NeUQI+LDLQ fptarget": {"method": "ldlq", "init": "neuqi", "fp_target": 0.25},
    "NeUQI_int+LDLQ fptarget": {"method": "ldlq", "init": "neuqi_int", "fp_target": 0.25},
    "NeUQI_int+LDLQ norm3 fptarget": {"method": "ldlq", "init": "neuqi_int", "init_norm": 3.0,
                                      "fp_target": 0.25},
    "NeUQI+LDLQ fptarget0.5": {"method": "ldlq", "init": "neuqi", "fp_target": 0.5},
    "NeUQI_int+LDLQ clip1 fptarget": {"method": "ldlq", "init": "neuqi_int", "max_clip": 1.0,
                                      "fp_target": 0.25},
    "GPTQ-minmax fptarget": {"method": "ldlq", "init": "minmax", "fp_target": 0.25},
    # Stronger damping (a regulariser on 16k calibration tokens) and coordinate descent
    # on the codes after every solve.
    "NeUQI+LDLQ fptarget damp0.1": {"method": "ldlq", "init": "neuqi", "fp_target": 0.25, "damp": 0.1},
    "NeUQI+LDLQ fptarget damp0.1 cd3": {"method": "ldlq", "init": "neuqi", "fp_target": 0.25, "damp": 0.1,
                                        "descent": 3},
    "NeUQI_int+LDLQ fptarget damp0.1": {"method": "ldlq", "init": "neuqi_int", "fp_target": 0.25,
                                        "damp": 0.1},
    "NeUQI_int+LDLQ fptarget damp0.1 cd3": {"method": "ldlq", "init": "neuqi_int", "fp_target": 0.25,
                                            "damp": 0.1, "descent": 3},
    "NeUQI_int+LDLQ norm3 fptarget damp0.1": {"method": "ldlq", "init": "neuqi_int", "init_norm": 3.0,
                                              "fp_target": 0.25, "damp": 0.1},
    "NeUQI_int+LDLQ norm3 fptarget damp0.1 cd3": {"method": "ldlq", "init": "neuqi_int", "init_norm": 3.0,
                                                  "fp_target": 0.25, "damp": 0.1, "descent": 3},
    "NeUQI_int+LDLQ clip1 fptarget damp0.1": {"method": "ldlq", "init": "neuqi_int", "max_clip": 1.0,
                                              "fp_target": 0.25, "damp": 0.1},
    "NeUQI_int+LDLQ clip1 fptarget damp0.1 cd3": {"method": "ldlq", "init": "neuqi_int", "max_clip": 1.0,
                                                  "fp_target": 0.25, "damp": 0.1, "descent": 3},
}
_CORE = ["GPTQ-minmax (LDLQ+Hsort)", "NeUQI+LDLQ", "NeUQI_int+LDLQ", "RTN"]
# (bits, group size, label) in the order they run: the comparisons that matter
# most first, so a bench cut short still has them.
JOBS = (
    [(3, 64, m) for m in [*_CORE, "MagR+LDLQ"]]
    + [(2, 64, m) for m in _CORE]
    + [(3, -1, m) for m in _CORE]
    + [(3, 128, m) for m in ("GPTQ-minmax (LDLQ+Hsort)", "NeUQI+LDLQ")]
    + [(2, 64, "MagR+LDLQ"), (3, -1, "MagR+LDLQ")]
)
SETS = ["wiki-sample", "brown", "austen-test"]


def stale_sets(ppl: dict) -> list[str]:
    """Sets missing from an eval record or measured on an older build of the corpus."""
    return [s for s in SETS if ppl.get(s, {}).get("corpus_build") != TEXT_VERSION]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help="default: the cached SmolLM2-135M")
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--eval-windows", type=int, default=8)
    ap.add_argument("--out-dir", default="bench/results/runs")
    ap.add_argument("--results", default="bench/results")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    model = args.model or str(fetch_model(cache_dir()))
    device = resolve_device("auto")
    out = Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    fp_path = out / "fp_ppl.json"
    fp = json.loads(fp_path.read_text()) if fp_path.exists() else {}
    if missing := stale_sets(fp):
        fp.update(evaluate_sets(load_model(model, resolve_dtype("auto", device)), load_tokenizer(model),
                                missing, 2048, device, args.eval_windows))
        atomic_write_json(fp_path, fp)
    rows.append({"label": "FP", "bits": 16, "group": "-", "ppl": {k: v["ppl"] for k, v in fp.items()}})
    _write(rows, out, args)
    for bits, group, label in JOBS:
        cfg = RunConfig(model=model, bits=bits, group_size=group, **METHODS[label],
                        nsamples=args.nsamples, seqlen=args.seqlen, out_dir=args.out_dir,
                        eval_sets=SETS, eval_windows=args.eval_windows)
        run_dir = Path(args.out_dir) / cfg.run_name
        t0 = time.time()
        if not (run_dir / "result.json").exists():
            quantize_standalone(cfg)
        if missing := stale_sets(read_result(run_dir).get("eval", {}).get("ppl", {})):
            evaluate_model(str(run_dir), missing, max_windows=args.eval_windows, quiet=True)
        res = read_result(run_dir)
        rows.append({
            "label": label, "bits": bits, "group": "ch" if group == -1 else f"g{group}",
            "run": cfg.run_name,
            "ppl": {k: v.get("ppl") for k, v in res["eval"]["ppl"].items()},
            "quantize_seconds": res["timing"]["quantize_seconds"],
            "init_seconds": res["timing"]["init_seconds"],
            "peak_rss_mb": res["memory"]["peak_rss_mb"],
            "checkpoint_mb": res["checkpoint_bytes"] / 2**20,
        })
        print(f"{label:28s} {bits}bit {rows[-1]['group']:5s} "
              + " ".join(f"{k}={v:.3f}" for k, v in rows[-1]["ppl"].items())
              + f"  ({time.time() - t0:.0f}s)", flush=True)
        _write(rows, out, args)


def _write(rows: list[dict], out: Path, args) -> None:
    (out / "ppl_table.json").write_text(json.dumps({"settings": vars(args), "rows": rows}, indent=2))
    lines = [
        f"SmolLM2-135M, calibration c4-sample {args.nsamples}×{args.seqlen} tokens, perplexity on the "
        f"first {args.eval_windows} windows of 2048 tokens (`python bench/ppl_table.py`).",
        "",
        "| method | bits | group | " + " | ".join(SETS) + " | quantize s | init s | peak RSS MB | ckpt MB |",
        "|---|---|---|" + "---|" * len(SETS) + "---|---|---|---|",
    ]
    for r in rows:
        ppl = " | ".join(f"{r['ppl'].get(s, float('nan')):.2f}" for s in SETS)
        extra = (f"{r['quantize_seconds']:.0f} | {r['init_seconds']:.0f} | {r['peak_rss_mb']:.0f} | "
                 f"{r['checkpoint_mb']:.0f}") if "run" in r else "- | - | - | -"
        lines.append(f"| {r['label']} | {r['bits']} | {r['group']} | {ppl} | {extra} |")
    (out / "ppl_table.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
