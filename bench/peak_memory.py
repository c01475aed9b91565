"""Peak RSS of standalone ``neuqi quantize`` runs, and the phase it happens in.

    python bench/peak_memory.py [--repeat 2] [--method rtn --init minmax --bits 3 --group-size -1]

Each repeat is a fresh Python process (as a user's run is) that samples its own RSS
every 0.1 s; the samples are split by the run's log lines into model loading, the
layer loop and checkpoint writing, so a peak can be traced to its phase.  Repeats
show whether the peak is stable: allocator fragmentation makes it vary from run to
run.  Writes ``bench/results/peak_memory[.MODEL].json``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path

from neuqi.data.cache import cache_dir
from neuqi.data.fetch import fetch_model
from neuqi.io_utils import atomic_write_json

CHILD = r"""
import json, sys, threading, time
from neuqi.memory import process_memory_kb
from neuqi.pipeline.config import RunConfig
from neuqi.pipeline.run import quantize_model
samples = []
def sample():
    while True:
        m = process_memory_kb()
        samples.append((time.time(), m.get("VmRSS", 0) / 1024, m.get("RssAnon", 0) / 1024))
        time.sleep(0.1)
threading.Thread(target=sample, daemon=True).start()
cfg = RunConfig(**json.loads(sys.argv[1]))
t0 = time.perf_counter()
run = quantize_model(cfg, quiet=True)
print(json.dumps({"run": str(run), "seconds": time.perf_counter() - t0, "samples": samples}))
"""


def phases(run_dir: Path, samples: list[tuple[float, float, float]]) -> dict[str, float]:
    """Max RSS before the first layer, during the layer loop, and after it; and the
    anonymous part of RSS at its peak (the rest is file-backed: mmapped weights)."""
    times = []
    for line in (run_dir / "quantize.log").read_text().splitlines():
        if " layer " in line and " done in " in line:
            ts = datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").replace(tzinfo=UTC)
            times.append(ts.timestamp())
    first, last = times[0], times[-1]

    def peak(lo: float, hi: float) -> float:
        return max((r for t, r, _ in samples if lo <= t < hi), default=0.0)

    top = max(samples, key=lambda x: x[1], default=(0.0, 0.0, 0.0))
    return {"load_and_first_layer": peak(0, first), "layers": peak(first, last),
            "checkpoint": peak(last, float("inf")), "anon_at_peak": top[2]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="default: the cached SmolLM2-135M")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--method", default="rtn")
    ap.add_argument("--init", default="minmax")
    ap.add_argument("--bits", type=int, default=3)
    ap.add_argument("--group-size", type=int, default=-1)
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    args = ap.parse_args()
    model = args.model or str(fetch_model(cache_dir()))
    rows = []
    head = ("run", "peak RSS MB", "load MB", "layers MB", "checkpoint MB", "anon@peak MB", "s")
    print(" ".join(f"{h:>13s}" for h in head))
    for i in range(args.repeat):
        with tempfile.TemporaryDirectory() as out:
            cfg = {"model": model, "bits": args.bits, "group_size": args.group_size, "method": args.method,
                   "init": args.init, "nsamples": args.nsamples, "seqlen": args.seqlen, "out_dir": out,
                   "device": "cpu"}
            proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(cfg)], capture_output=True,
                                  text=True, check=True)
            rec = json.loads(proc.stdout.strip().splitlines()[-1])
            run_dir = Path(rec["run"])
            recorded = json.loads((run_dir / "result.json").read_text())["memory"]["peak_rss_mb"]
            row = {"repeat": i, "peak_rss_mb": recorded, "seconds": rec["seconds"],
                   **{f"{k}_mb": v for k, v in phases(run_dir, rec["samples"]).items()}}
        rows.append(row)
        cells = [i, row["peak_rss_mb"], row["load_and_first_layer_mb"], row["layers_mb"],
                 row["checkpoint_mb"], row["anon_at_peak_mb"], row["seconds"]]
        print(" ".join(f"{c:13.0f}" for c in cells), flush=True)
    name = Path(model).name
    out = Path(__file__).parent / "results" / ("peak_memory.json" if args.model is None
                                               else f"peak_memory.{name}.json")
    atomic_write_json(out, {"settings": vars(args), "model": name, "rows": rows})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
