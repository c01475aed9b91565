"""Issue 18's layer-by-layer study: the proxy loss each parameter choice leaves inside LDLQ.

    python bench/refit_study.py [--blocks 0,3,15,29] [--configs 2:64,3:64,3:-1,4:-1]

For every linear of the chosen SmolLM2-135M blocks (H from 16 × 512 tokens of
c4-sample, FP inputs), LDLQ with act-order runs with each init and variant below,
and the table gives the relative proxy loss ``tr(ΔW H ΔWᵀ)/tr(W H Wᵀ)`` it leaves
(= the relative output error on the calibration tokens).  ``mse`` is GPTQ's
shrink-the-range grid with an integer zero weighted by diag(H): the method
llm-compressor calls imatrix_mse.  Writes ``bench/results/refit_study.{json,md}``
as it goes; a rerun skips the (block, config) pairs already there.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from layer_bench import block_layers  # a sibling bench script, not a package

from neuqi.io_utils import atomic_write_json, atomic_write_text
from neuqi.quant import QuantSpec, gptq_quantize

VARIANTS: dict[str, tuple[str, dict]] = {
    "minmax": ("minmax", {}),
    "mse": ("mse", {}),
    "NeUQI_int": ("neuqi_int", {}),
    "NeUQI_int refit4": ("neuqi_int", {"refit": 4}),
    "NeUQI_int select+refit4": ("neuqi_int", {"also_inits": ("minmax", "mse"), "refit": 4}),
    "NeUQI": ("neuqi", {}),
    "NeUQI refit4": ("neuqi", {"refit": 4}),
}


def markdown(rows: list[dict]) -> str:
    names = list(VARIANTS)
    out = ["| block | config | linear | " + " | ".join(names) + " |",
           "|---|---|---|" + "---|" * len(names)]
    for r in rows:
        best_int = min(r["loss"][n] for n in names if n != "NeUQI" and not n.startswith("NeUQI "))
        cells = [f"**{r['loss'][n]:.5f}**" if r["loss"][n] == best_int else f"{r['loss'][n]:.5f}"
                 for n in names]
        out.append(f"| {r['block']} | {r['config']} | {r['linear']} | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--blocks", default="0,3,15,29")
    ap.add_argument("--configs", default="2:64,3:64,3:-1,4:-1")
    ap.add_argument("--out", default="bench/results/refit_study")
    args = ap.parse_args()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    path = out.with_suffix(".json")
    rows = json.loads(path.read_text())["rows"] if path.exists() else []
    done = {(r["block"], r["config"]) for r in rows}
    configs = [tuple(int(x) for x in c.split(":")) for c in args.configs.split(",")]
    for block in [int(b) for b in args.blocks.split(",")]:
        layers = None
        for bits, group in configs:
            tag = f"{bits}b {'ch' if group == -1 else f'g{group}'}"
            if (block, tag) in done:
                continue
            layers = layers or block_layers(block)
            spec = QuantSpec(bits, group)
            for name, w, H in layers:
                den = float(torch.einsum("oi,ij,oj->", w.double(), H.double(), w.double()))
                loss, secs = {}, {}
                for label, (init, kw) in VARIANTS.items():
                    t0 = time.perf_counter()
                    r = gptq_quantize(w, H, spec, init=init, **kw)
                    secs[label] = time.perf_counter() - t0
                    loss[label] = r.stats["quant_loss"] / den
                rows.append({"block": block, "config": tag, "linear": name, "loss": loss,
                             "seconds": secs})
                print(f"{block:3d} {tag:7s} {name:18s} " + " ".join(
                    f"{v:.5f}" for v in loss.values()), flush=True)
            atomic_write_json(path, {"variants": list(VARIANTS), "rows": rows})
            atomic_write_text(out.with_suffix(".md"), markdown(rows))


if __name__ == "__main__":
    main()
