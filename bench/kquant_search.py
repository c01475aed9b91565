"""Seconds and error of the k-quant parameter search on real ``ffn_down`` rows, per type.

    python bench/kquant_search.py [--types Q2_K,Q3_K,Q4_K,Q5_K,Q6_K] [--threads 1]
        [--label NAME] [--out bench/results/kquant_search.json]

What :func:`neuqi.quant.kquants.kquant_params` costs and what it finds on the
``down_proj`` rows (row length 1536 / 4864, whole super-blocks) of SmolLM2-135M's
blocks 3 and 20 (all 576 rows) and Qwen2.5-Coder-0.5B's blocks 3 and 18 (the first 448
rows), each with the diag(H) of 8 × 512 tokens of c4-sample through the FP model.
The error is each linear's diag(H)-weighted rounding error divided by that of the
llama.cpp-style min-max parameters of the same type (``init="minmax"``).  Seconds are
the sum over the four linears, after one small call that compiles the kernels.

To compare code versions, run the script once per version (``PYTHONPATH=<old src>``
for the old one) with a ``--label`` each: rows accumulate in the JSON by label, and
the markdown table beside it shows every label side by side.  One process at a time.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from neuqi.data.cache import cache_dir
from neuqi.quant.gguf_types import gguf_type
from neuqi.quant.grid import fake_quantize, weighted_error
from neuqi.quant.kquants import kquant_params

CASES = (("smollm2-135m", (3, 20), 576), ("qwen2.5-coder-0.5b", (3, 18), 448))


Row = tuple[str, torch.Tensor, torch.Tensor]


def down_rows(model: str, blocks: tuple[int, ...], rows: int, store: Path) -> list[Row]:
    """``(name, W[:rows], diag H)`` of each block's ``down_proj``, cached in ``store``."""
    path = store / f"{model}.{'-'.join(map(str, blocks))}.pt"
    if path.exists():
        return torch.load(path)
    from neuqi.data.corpora import load_text, sample_windows, tokenize
    from neuqi.models.adapters import adapter_for
    from neuqi.models.loading import load_model, load_tokenizer
    from neuqi.pipeline.sequential import block_hessians

    folder = cache_dir() / "models" / model
    m, tok = load_model(folder), load_tokenizer(folder)
    windows = sample_windows(tokenize(load_text("c4-sample")[:400_000], tok), 8, 512)
    out = []
    for b in blocks:
        for name, w, H in block_hessians(m, adapter_for(m.config.model_type), windows, b):
            if name.endswith("down_proj"):
                out.append((f"{model} {b}", w[:rows].clone(), torch.diagonal(H).float().clone()))
    store.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(out, tmp)
    tmp.replace(path)
    return out


def error(w: torch.Tensor, h: torch.Tensor, t, params) -> float:
    """The linear's diag(H)-weighted rounding error with ``params`` (NeUQI's objective)."""
    return float(weighted_error(w, fake_quantize(w, params, t.spec), h).double().sum())


def markdown(rows: dict) -> str:
    labels = sorted({r["label"] for r in rows.values()})
    names = next(iter(rows.values()))["names"]
    out = ["| type | code | seconds | " + " | ".join(f"{n} error / min-max" for n in names) + " |",
           "|---|---|---|" + "---|" * len(names)]
    for tn in sorted({r["type"] for r in rows.values()}):
        for lab in labels:
            r = rows.get(f"{tn}|{lab}")
            if r is not None:
                out.append(f"| {tn} | {lab} | {r['seconds']:.2f} | "
                           + " | ".join(f"{x:.6f}" for x in r["ratios"]) + " |")
    return "\n".join(out) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--types", default="Q2_K,Q3_K,Q4_K,Q5_K,Q6_K")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--label", default="current")
    ap.add_argument("--out", type=Path, default=Path("bench/results/kquant_search.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    store = args.out.parent / "kquant_rows"
    cases = [c for model, blocks, n in CASES for c in down_rows(model, blocks, n, store)]
    rows = json.loads(args.out.read_text()) if args.out.exists() else {}
    for tn in args.types.split(","):
        t = gguf_type(tn.strip())
        kquant_params(cases[0][1][:8], t, "neuqi", cases[0][2])  # compile before timing
        seconds, ratios = 0.0, []
        for _, w, h in cases:
            t0 = time.perf_counter()
            p = kquant_params(w, t, "neuqi", h)
            seconds += time.perf_counter() - t0
            mm = kquant_params(w, t, "minmax", h)
            ratios.append(error(w, h, t, p) / error(w, h, t, mm))
        rows[f"{t.name}|{args.label}"] = {"type": t.name, "label": args.label, "seconds": seconds,
                                          "ratios": ratios, "names": [c[0] for c in cases],
                                          "threads": args.threads}
        print(f"{t.name} {args.label}: {seconds:.2f} s, " + ", ".join(f"{r:.6f}" for r in ratios), flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(rows, indent=1))
        tmp.replace(args.out)
        args.out.with_suffix(".md").write_text(markdown(rows))


if __name__ == "__main__":
    main()
