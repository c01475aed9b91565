"""Whole ``neuqi quantize`` runs side by side: seconds of NeUQI / NeUQI_int + LDLQ
against min-max LDLQ on the same model and calibration, and their perplexity.

    python bench/quantize_speed.py [--model smollm2-135m] [--configs 3:64,2:64,3:-1,4:-1]
        [--inits minmax,neuqi,neuqi_int] [--nsamples 16] [--seqlen 512]
        [--before SRC] [--eval-windows 4] [--seeds 0,1,2]

An init may carry more ``neuqi quantize`` flags after ``+``: ``neuqi+search=banded``
runs ``--init neuqi --search banded``.  ``--seeds`` repeats every run with other
calibration windows (``--seed``): the spread of their perplexities is the run-to-run
noise against which a change of parameters is judged.

Every run is its own ``neuqi quantize`` process, one after the other (two torch
processes on 2 cores slow each other several-fold).  ``quantize_seconds`` is the
run's own figure from its ``result.json`` (calibration forwards, H, init, solve), and
``init_seconds`` the part of it spent choosing the parameters, ``solve_seconds`` the
LDLQ solves and ``capture_seconds`` the calibration forwards; ``wall_seconds`` is the
whole process (start-up, loading and the evaluation included).
``--before SRC`` also runs the NeUQI inits from another checkout's ``src`` folder
(e.g. a ``git worktree`` of the previous commit) so that before and after share a
machine and a session.  The defaults are ``make demo``'s calibration (16 × 512
tokens of c4-sample).  Results go to ``bench/results/quantize_speed[.<model>].json``
after every run, and a run already there is skipped, so an interrupted bench
resumes where it stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def git_commit(src: Path) -> str:
    try:
        return subprocess.run(["git", "-C", str(src), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def init_flags(init: str) -> list[str]:
    """``neuqi+search=banded`` -> ``--init neuqi --search banded``."""
    name, *extra = init.split("+")
    flags = ["--init", name]
    for kv in extra:
        key, _, value = kv.partition("=")
        flags += [f"--{key.replace('_', '-')}"] + ([value] if value else [])
    return flags


def run_one(model: Path, bits: int, group: int, init: str, args, src: Path | None, seed: int = 0) -> dict:
    """One ``neuqi quantize`` process; returns its timing and perplexities."""
    env = dict(os.environ)
    if src is not None:
        env["PYTHONPATH"] = str(src) + os.pathsep + env.get("PYTHONPATH", "")
    with tempfile.TemporaryDirectory(prefix="neuqi-speed-") as out:
        cmd = [sys.executable, "-m", "neuqi.cli", "quantize", str(model), "--bits", str(bits),
               "--group-size", str(group), *init_flags(init), "--seed", str(seed), "--method", "ldlq",
               "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen),
               "--calib", args.calib, "--out-dir", out, "--eval", args.eval,
               "--eval-windows", str(args.eval_windows), "--quiet"]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
        (run_dir,) = [p for p in Path(out).iterdir() if p.is_dir()]
        res = json.loads((run_dir / "result.json").read_text())
    return {"quantize_seconds": res["timing"]["quantize_seconds"],
            "init_seconds": res["timing"].get("init_seconds"),
            "solve_seconds": res["timing"].get("solve_seconds"),
            "capture_seconds": res["timing"].get("capture_seconds"),
            "wall_seconds": wall,
            "ppl": {k: v["ppl"] for k, v in res["eval"].get("ppl", {}).items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m", help="a model under the neuqi cache")
    ap.add_argument("--configs", default="3:64,2:64,3:-1,4:-1", help="bits:group,...")
    ap.add_argument("--inits", default="minmax,neuqi,neuqi_int")
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--calib", default="c4-sample")
    ap.add_argument("--eval", default="wiki-sample")
    ap.add_argument("--eval-windows", type=int, default=4)
    ap.add_argument("--before", type=Path, help="src folder of another checkout to compare")
    ap.add_argument("--seeds", default="0", help="calibration seeds, comma list")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()

    from neuqi.data.cache import cache_dir
    from neuqi.io_utils import atomic_write_json

    model = cache_dir() / "models" / args.model
    out = args.out or HERE / "results" / f"quantize_speed.{args.model}.json"
    data = json.loads(out.read_text()) if out.exists() else {"runs": {}}
    data["setup"] = {
        "model": args.model, "calibration": f"{args.nsamples} x {args.seqlen} {args.calib}",
        "eval": f"{args.eval}, {args.eval_windows} windows of 2048", "machine": platform.machine(),
        "cpus": os.cpu_count(), "commit": git_commit(HERE),
        "before_commit": git_commit(args.before) if args.before else None,
    }
    variants = [("after", None)] + ([("before", args.before)] if args.before else [])
    for cfg in args.configs.split(","):
        bits, group = (int(x) for x in cfg.split(":"))
        for init in args.inits.split(","):
            for name, src in variants:
                for seed in (int(x) for x in args.seeds.split(",")):
                    if name == "before" and init == "minmax":
                        continue  # min-max did not change; one baseline per config
                    key = f"{name}/{bits}:{group}/{init}" + (f"/seed{seed}" if seed else "")
                    if key in data["runs"]:
                        continue
                    print(f"running {key} ...", flush=True)
                    data["runs"][key] = run_one(model, bits, group, init, args, src, seed)
                    atomic_write_json(out, data)  # makes the folder: bench/results/ is not in git
                    print(f"  {data['runs'][key]}", flush=True)
    print_table(data)


def print_table(data: dict) -> None:
    runs = data["runs"]
    print(f"\n{data['setup']}\n")
    print("| config | init | variant | seed | quantize s | init s | solve s | × min-max | wall s | ppl |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for key, r in runs.items():
        variant, cfg, init, *seed = key.split("/")
        base = runs.get("/".join(["after", cfg, "minmax", *seed])) or runs.get(f"after/{cfg}/minmax")
        ratio = f"{r['quantize_seconds'] / base['quantize_seconds']:.2f}" if base else "-"
        ppl = ", ".join(f"{v:.2f}" for v in r["ppl"].values())
        init_s, solve_s, wall = ("-" if r.get(k) is None else f"{r[k]:.0f}"
                                 for k in ("init_seconds", "solve_seconds", "wall_seconds"))
        print(f"| {cfg} | {init} | {variant} | {seed[0][4:] if seed else 0} | {r['quantize_seconds']:.0f} | "
              f"{init_s} | {solve_s} | "
              f"{ratio} | {wall} | {ppl} |")


if __name__ == "__main__":
    main()
