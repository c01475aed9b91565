"""Zero-shot accuracy on the offline lm-eval tasks for FP and quantized SmolLM2 runs.

    python bench/zeroshot_table.py [--limit 60] [--runs RUN ...]

Default runs: the bench/ppl_table.py runs at 3-bit g64 and 2-bit g64 (GPTQ-minmax and
NeUQI), which must exist. Results merge into each run's result.json (FP into
bench/results/fp_eval.json); writes bench/results/zeroshot_table.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from neuqi.data.cache import cache_dir
from neuqi.data.fetch import fetch_model
from neuqi.data.tasks import OFFLINE_TASKS
from neuqi.eval.run import evaluate_model
from neuqi.io_utils import atomic_write_json, atomic_write_text
from neuqi.report import method_label

RUNS = [
    "smollm2-135m.c4-sample.n32.L512.LDLQ.3bit.g64.Hsort.minmax",
    "smollm2-135m.c4-sample.n32.L512.LDLQ.3bit.g64.Hsort.neuqi",
    "smollm2-135m.c4-sample.n32.L512.LDLQ.2bit.g64.Hsort.minmax",
    "smollm2-135m.c4-sample.n32.L512.LDLQ.2bit.g64.Hsort.neuqi",
]
SHORT = {t: t.removeprefix("bigbench_") for t in OFFLINE_TASKS}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--limit", type=int, default=60, help="examples per task (CPU-sized)")
    ap.add_argument("--runs", nargs="*", default=None)
    ap.add_argument("--runs-dir", default="bench/results/runs")
    ap.add_argument("--results", default="bench/results")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    out = Path(args.results)
    fp_model = str(fetch_model(cache_dir()))
    targets = [("FP", fp_model, out / "fp_eval.json")]
    targets += [(None, str(Path(args.runs_dir) / r), Path(args.runs_dir) / r / "result.json")
                for r in (args.runs or RUNS)]
    rows = []
    for label, path, record in targets:
        done = json.loads(record.read_text()).get("eval", {}).get("zeroshot", {}) if record.exists() else {}
        stale = done.get("limit") != args.limit
        missing = [t for t in OFFLINE_TASKS if stale or t not in done.get("tasks", {})]
        if missing:
            evaluate_model(path, [], tasks=missing, limit=args.limit, batch_size=16, quiet=True,
                           record=record if label == "FP" else None)
        rec = json.loads(record.read_text())
        zs = rec["eval"]["zeroshot"]
        cfg = rec.get("config", {})
        gs = cfg.get("group_size")
        group = "-" if label else ("ch" if gs == -1 else f"g{gs}")
        rows.append({"label": label or method_label(cfg), "bits": cfg.get("bits", 16), "group": group,
                     "tasks": zs["tasks"], "mean_acc": zs.get("mean_acc")})
        print(rows[-1]["label"], rows[-1]["bits"], rows[-1]["group"], f"mean acc {rows[-1]['mean_acc']:.4f}",
              flush=True)
        _write(rows, out, args.limit)


def _write(rows: list[dict], out: Path, limit: int) -> None:
    atomic_write_json(out / "zeroshot_table.json", {"limit": limit, "rows": rows})
    head = ["method", "bits", "group", *SHORT.values(), "lambada ppl", "mean acc"]
    lines = [
        f"SmolLM2-135M, offline lm-eval tasks, first {limit} examples each, acc "
        "(`python bench/zeroshot_table.py`).", "",
        "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        accs = [f"{r['tasks'].get(t, {}).get('acc', float('nan')):.3f}" for t in SHORT]
        ppl = r["tasks"].get("austen_lambada", {}).get("perplexity", float("nan"))
        lines.append(f"| {r['label']} | {r['bits']} | {r['group']} | " + " | ".join(accs)
                     + f" | {ppl:.1f} | {r['mean_acc']:.4f} |")
    atomic_write_text(out / "zeroshot_table.md", "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
