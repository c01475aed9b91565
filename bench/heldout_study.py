"""Does a lower proxy loss hold on tokens the quantizer never saw?  (issues 17, 18)

    python bench/heldout_study.py [--block 3] [--configs 3:64,2:64,Q3_K] [--variants ...]
        [--linears down_proj] [--nsamples 32]

H_train from ``--nsamples`` × 512 windows of the first half of c4-sample, H_test from
64 × 512 of the second half (FP inputs, SmolLM2-135M).  Every variant is fitted on
H_train; the table gives its relative proxy loss ``tr(ΔW H ΔWᵀ)/tr(W H Wᵀ)`` on both,
averaged over the chosen linears of the block.  A config is ``BITS:GROUP`` (our grid)
or a GGUF type name (``Q3_K``: linears whose rows the type cannot take are skipped).
Writes ``bench/results/heldout_study.{json,md}`` as it goes; a rerun skips the
(block, nsamples, config, variant) entries already there.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from neuqi.data.cache import cache_dir
from neuqi.data.corpora import load_text, sample_windows, tokenize
from neuqi.io_utils import atomic_write_json, atomic_write_text
from neuqi.models.adapters import adapter_for
from neuqi.models.loading import load_model, load_tokenizer
from neuqi.pipeline.sequential import block_hessians
from neuqi.quant import QuantSpec, dequantize, gptq, gptq_quantize
from neuqi.quant.gguf_types import GGUF_TYPES, gguf_type

# name -> gptq_quantize keywords; "init" is the float-zero NeUQI unless given (GGUF
# configs take "neuqi" whatever the variant says, and skip select)
VARIANTS: dict[str, dict] = {
    "NeUQI_int": {"init": "neuqi_int"},
    "NeUQI_int refit4": {"init": "neuqi_int", "refit": 4},
    "NeUQI_int select": {"init": "neuqi_int", "also_inits": ("minmax", "mse")},
    "NeUQI_int select+refit4": {"init": "neuqi_int", "also_inits": ("minmax", "mse"), "refit": 4},
    "mse": {"init": "mse"},
    "NeUQI": {"init": "neuqi"},
    "NeUQI RTN": {"init": "neuqi", "algorithm": "rtn"},
    "NeUQI refit4": {"init": "neuqi", "refit": 4},
    "NeUQI damp0.03": {"init": "neuqi", "damp": 0.03},
    "NeUQI damp0.1": {"init": "neuqi", "damp": 0.1},
    "NeUQI damp0.3": {"init": "neuqi", "damp": 0.3},
    "NeUQI cd3": {"init": "neuqi", "descent": 3},
    "NeUQI damp0.1 cd3": {"init": "neuqi", "damp": 0.1, "descent": 3},
    "NeUQI damp0.1 cd3 refit2": {"init": "neuqi", "damp": 0.1, "descent": 3, "refit": 2},
    "NeUQI_int damp0.1": {"init": "neuqi_int", "damp": 0.1},
    # the solver's H shrunk toward its diagonal, (1 − a)·H + a·diag(H) (gptq_quantize's shrink)
    "NeUQI shrink0.1": {"init": "neuqi", "shrink": 0.1},
    "NeUQI shrink0.2": {"init": "neuqi", "shrink": 0.2},
    "NeUQI shrink0.4": {"init": "neuqi", "shrink": 0.4},
    "NeUQI shrink0.6": {"init": "neuqi", "shrink": 0.6},
    "NeUQI damp0.1 shrink0.2": {"init": "neuqi", "damp": 0.1, "shrink": 0.2},
    "NeUQI_int damp0.1 cd3": {"init": "neuqi_int", "damp": 0.1, "descent": 3},
    # AWQ's equivalence: input column j scaled by diag(H)_j^(a/2) (geometric mean 1) before
    # quantizing, H by its inverse, undone after; for down_proj the previous linear (up_proj)
    # would absorb it exactly, so the file could store it
    "NeUQI awq0.25": {"init": "neuqi", "awq": 0.25},
    "NeUQI awq0.5": {"init": "neuqi", "awq": 0.5},
    "NeUQI RTN awq0.25": {"init": "neuqi", "algorithm": "rtn", "awq": 0.25},
    # LDLQ whose codes stay within floor/ceil of the unfed value, as AutoRound bounds rounding
    "NeUQI bounded": {"init": "neuqi", "bounded": True},
    "NeUQI bounded shrink0.4": {"init": "neuqi", "bounded": True, "shrink": 0.4},
}
DEFAULT_VARIANTS = ("NeUQI_int,NeUQI_int refit4,NeUQI_int select,NeUQI_int select+refit4,mse,NeUQI,"
                    "NeUQI refit4")
OUT = Path("bench/results/heldout_study")


def bounded_solve(Wt, F, St, Zt, maxq, algorithm, block):
    """LDLQ (``gptq._solve``'s loop) with each code kept to floor/ceil of ``Wt/St + Zt``."""
    n = Wt.shape[0]
    Q, E = torch.empty_like(Wt), torch.zeros_like(Wt)
    lo = torch.floor(Wt / St + Zt)
    for i1 in range(0, n, block):
        i2 = min(i1 + block, n)
        X = Wt[i1:i2] + F[:i1, i1:i2].t() @ E[:i1]
        for i in range(i2 - i1):
            k = i1 + i
            x = X[i] + (F[i1:k, k] @ E[i1:k] if i else 0.0)
            q = torch.clamp(torch.clamp(torch.round(x / St[k] + Zt[k]), lo[k], lo[k] + 1), 0, maxq)
            Q[k], E[k] = q, Wt[k] - St[k] * (q - Zt[k])
    return Q


def quantize_variant(w: torch.Tensor, H: torch.Tensor, spec: QuantSpec, kw: dict) -> torch.Tensor:
    """The de-quantized ``w`` of one variant (``awq`` and ``bounded`` handled here)."""
    kw = dict(kw)
    a, bounded = kw.pop("awq", None), kw.pop("bounded", False)
    s = torch.ones(w.shape[1])
    if a is not None:
        s = torch.diagonal(H).double().clamp_min(1e-12) ** (a / 2)
        s = (s / s.log().mean().exp()).float()
    saved = gptq._solve
    gptq._solve = bounded_solve if bounded else saved
    try:
        r = gptq_quantize(w * s[None, :], H / s[:, None] / s[None, :], spec, **kw)
    finally:
        gptq._solve = saved
    return dequantize(r.codes, r.params, spec) / s[None, :]


def rel(D: torch.Tensor, w: torch.Tensor, H: torch.Tensor) -> float:
    H = H.double()
    return float(torch.einsum("oi,ij,oj->", D, H, D) / torch.einsum("oi,ij,oj->", w.double(), H, w.double()))


def markdown(rows: dict) -> str:
    out = ["| block | calibration | config | variant | linears | train | test |",
           "|---|---|---|---|---|---|---|"]
    for r in rows.values():
        out.append(f"| {r['block']} | {r['nsamples']} × 512 | {r['config']} | {r['variant']} "
                   f"| {r['linears']} | {r['train']:.5f} | {r['test']:.5f} |")
    return "\n".join(out) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--block", type=int, default=3)
    ap.add_argument("--configs", default="3:64,2:64")
    ap.add_argument("--variants", default=DEFAULT_VARIANTS)
    ap.add_argument("--linears", default="", help="comma list of name endings (default: all 7)")
    ap.add_argument("--nsamples", type=int, default=32)
    args = ap.parse_args()
    variants = [v.strip() for v in args.variants.split(",")]
    if bad := [v for v in variants if v not in VARIANTS]:
        raise SystemExit(f"unknown variant(s) {bad}; choose from {list(VARIANTS)}")
    OUT.parent.mkdir(parents=True, exist_ok=True)
    json_path = OUT.with_suffix(".json")
    rows = json.loads(json_path.read_text()) if json_path.exists() else {}
    path = cache_dir() / "models" / "smollm2-135m"
    model, tok = load_model(path), load_tokenizer(path)
    text = load_text("c4-sample")
    half = len(text) // 2
    adapter = adapter_for(model.config.model_type)
    first, second = tokenize(text[:half], tok), tokenize(text[half:], tok)
    train = block_hessians(model, adapter, sample_windows(first, args.nsamples, 512, seed=0), args.block)
    test = block_hessians(model, adapter, sample_windows(second, 64, 512, seed=1), args.block)
    wanted = [s.strip() for s in args.linears.split(",") if s.strip()]
    pairs = [(n, w, Ha, Hb) for (n, w, Ha), (_, _, Hb) in zip(train, test, strict=True)
             if not wanted or any(n.endswith(x) for x in wanted)]
    for c in args.configs.split(","):
        t = gguf_type(c) if c.upper() in GGUF_TYPES else None
        spec = t.spec if t else QuantSpec(*(int(x) for x in c.split(":")))
        for v in variants:
            key = f"{args.block}/{args.nsamples}/{c}/{v}"
            if key in rows:
                continue
            kw = dict(VARIANTS[v])
            if t is not None:
                kw.update(init="neuqi", gguf=t)
                kw.pop("also_inits", None)
            used = [(n, w, Ha, Hb) for n, w, Ha, Hb in pairs if t is None or t.fits(w.shape[1])]
            tr = te = 0.0
            for _, w, Ha, Hb in used:
                D = (w - quantize_variant(w, Ha, spec, kw)).double()
                tr += rel(D, w, Ha) / len(used)
                te += rel(D, w, Hb) / len(used)
            rows[key] = {"block": args.block, "nsamples": args.nsamples, "config": c, "variant": v,
                         "linears": ",".join(n.rsplit(".", 1)[-1] for n, *_ in used), "train": tr, "test": te}
            atomic_write_json(json_path, rows)
            atomic_write_text(OUT.with_suffix(".md"), markdown(rows))
            print(f"{key}: train {tr:.5f} test {te:.5f}", flush=True)


if __name__ == "__main__":
    main()
