"""Export SmolLM2 runs to every format, verify them, and compare sizes on disk.

    python bench/export_sizes.py [--int-run RUN] [--float-run RUN]

Defaults: the 3-bit g64 NeUQI_int and NeUQI runs of bench/ppl_table.py. Writes
bench/results/export_sizes.{json,md}; exports go to bench/results/exports/.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from neuqi.data.cache import cache_dir
from neuqi.data.fetch import fetch_model
from neuqi.formats.export import export_run
from neuqi.io_utils import atomic_write_json, atomic_write_text

RUNS = "bench/results/runs/smollm2-135m.c4-sample.n32.L512.LDLQ.3bit.g64.Hsort."


def size_mb(folder: Path) -> float:
    weights = [p for p in folder.rglob("*") if p.is_file() and p.suffix in (".safetensors", ".pt")]
    return sum(p.stat().st_size for p in weights) / 2**20


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--int-run", default=RUNS + "neuqi_int")
    ap.add_argument("--float-run", default=RUNS + "neuqi")
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()
    out = Path(args.out)
    fp = fetch_model(cache_dir())
    # FP16 reference size: the FP32 folder halved (every tensor is floating point)
    rows = [{"format": "FP16 (dense)", "run": "-", "size_mb": size_mb(fp) / 2, "verify": "-"}]
    for run in (args.int_run, args.float_run):
        rows.append({"format": "neuqi native", "run": Path(run).name, "size_mb": size_mb(Path(run)),
                     "verify": "-"})
    jobs = [("compressed-tensors", args.int_run), ("gptq", args.int_run), ("hqq", args.int_run),
            ("hqq", args.float_run)]
    for fmt, run in jobs:
        dest = out / "exports" / f"{Path(run).name}.{fmt}"
        t0 = time.perf_counter()
        res = export_run(run, fmt, dest)
        eng = res["engine"]
        if "skipped" in eng:
            check = f"bit-exact; engine skipped ({eng['skipped'].split(';')[0]})"
        else:
            check = (f"bit-exact; logits max|Δ|/std {eng['max_rel_logit_diff']:.1e}, "
                     f"top-1 {eng['top1_agreement']:.3f}")
        rows.append({"format": fmt, "run": Path(run).name, "size_mb": size_mb(dest), "verify": check,
                     "seconds": time.perf_counter() - t0, "result": res})
        print(rows[-1]["format"], rows[-1]["run"], f"{rows[-1]['size_mb']:.1f} MB", check, flush=True)
    atomic_write_json(out / "export_sizes.json", rows)
    lines = ["SmolLM2-135M, 3-bit g64 (`python bench/export_sizes.py`); sizes of the weight files, "
             "embeddings and LM head stay fp16 in the exports.", "",
             "| format | run | size MB | check |", "|---|---|---|---|"]
    lines += [f"| {r['format']} | `{r['run']}` | {r['size_mb']:.1f} | {r['verify']} |" for r in rows]
    atomic_write_text(out / "export_sizes.md", "\n".join(lines) + "\n")
    print(json.dumps([{k: v for k, v in r.items() if k != "result"} for r in rows], indent=1))


if __name__ == "__main__":
    main()
