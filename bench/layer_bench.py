"""Layer-level benchmark: output error and seconds per algorithm × init × bits × grouping.

    python bench/layer_bench.py [--layer 3] [--skip-big] [--skip-real]

Real layers (one decoder block of SmolLM2-135M, H from 16 × 512 tokens of
c4-sample): relative output error ``tr(ΔHΔᵀ)/tr(WHWᵀ) = ‖(W−Ŵ)X‖²/‖WX‖²`` summed over
the block's 7 linears, and the seconds it took.  Then a 4096×4096 layer
(random weights, random SPD H) at 3-bit g128: init seconds for each method next
to the LDLQ solve seconds, each the best of ``--repeat``, on CPU and on CUDA when present.  Writes
``bench/results/layer_bench.json``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

import torch

from neuqi.quant import QuantSpec, gptq_quantize, init_params

ALGOS = ("rtn", "gptq", "ldlq")
INITS = ("minmax", "neuqi_int", "neuqi")
SPECS = [QuantSpec(b, g) for b in (2, 3, 4) for g in (64, 128, -1)]


def block_layers(index: int, model_name: str = "smollm2-135m"):
    """(name, W, H) for the 7 linears of decoder block ``index`` with real H."""
    from neuqi.data.cache import cache_dir
    from neuqi.data.corpora import load_text, sample_windows, tokenize
    from neuqi.models.adapters import adapter_for
    from neuqi.models.loading import load_model, load_tokenizer
    from neuqi.pipeline.sequential import block_hessians

    path = cache_dir() / "models" / model_name
    model, tok = load_model(path), load_tokenizer(path)
    windows = sample_windows(tokenize(load_text("c4-sample")[:400_000], tok), 16, 512)
    return block_hessians(model, adapter_for(model.config.model_type), windows, index)


def rel_error(w, H, res, spec):
    from neuqi.quant import dequantize

    d = (w - dequantize(res.codes, res.params, spec)).double()
    num = torch.einsum("oi,ij,oj->", d, H, d)
    den = torch.einsum("oi,ij,oj->", w.double(), H, w.double())
    return float(num / den)


def real_layer_table(index: int) -> list[dict]:
    layers = block_layers(index)
    rows = []
    combos = [(a, i, False) for a, i in itertools.product(ALGOS, INITS)]
    combos += [("ldlq", "minmax", True), ("ldlq", "neuqi", True)]
    print(f"{'algo':5s} {'init':10s} {'magr':5s} " + " ".join(
        f"{s.bits}b{'ch' if s.group_size == -1 else 'g' + str(s.group_size):>5s}" for s in SPECS))
    for algo, init, magr in combos:
        cells = []
        for spec in SPECS:
            t0 = time.perf_counter()
            err = 0.0
            for _, w, H in layers:
                res = gptq_quantize(w, H, spec, init=init, algorithm=algo, magr=magr)
                err += rel_error(w, H, res, spec) / len(layers)
            secs = time.perf_counter() - t0
            cells.append(f"{err:.4f}")
            rows.append({"algo": algo, "init": init, "magr": magr, "bits": spec.bits,
                         "group_size": spec.group_size, "rel_output_error": err, "seconds": secs})
        print(f"{algo:5s} {init:10s} {magr!s:5s} " + " ".join(f"{c:>7s}" for c in cells), flush=True)
    return rows


def big_layer_timing(device: torch.device, repeat: int = 3) -> dict:
    """Seconds of each init and of the LDLQ / GPTQ solves on a 4096² layer, each the
    best of ``repeat`` (one run moved the solve by a third on a noisy day)."""
    torch.manual_seed(0)
    n = 4096
    w = (torch.randn(n, n) * 0.02).to(device)
    x = torch.randn(2 * n, n, device=device) * (torch.rand(n, device=device) + 0.1)
    H = (x.T @ x / x.shape[0]).double()
    spec = QuantSpec(3, 128)
    h = torch.diagonal(H).float()
    out = {"device": str(device)}
    init_params(w[:64], spec, "neuqi", h)  # compile / warm-up
    init_params(w[:64], spec, "neuqi_int", h)
    out["repeat"] = repeat
    for m in ("minmax", "mse", "neuqi_int", "neuqi"):
        secs = []
        for _ in range(repeat):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            init_params(w, spec, m, h)
            if device.type == "cuda":
                torch.cuda.synchronize()
            secs.append(time.perf_counter() - t0)
        out[f"init_{m}_s"] = min(secs)
    for algo in ("ldlq", "gptq"):
        runs = (gptq_quantize(w, H, spec, init="minmax", algorithm=algo) for _ in range(repeat))
        out[f"{algo}_solve_s"] = min(r.stats["seconds_solve"] for r in runs)
    print(json.dumps(out, indent=1), flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layer", type=int, default=3)
    ap.add_argument("--skip-big", action="store_true")
    ap.add_argument("--skip-real", action="store_true")
    ap.add_argument("--repeat", type=int, default=3, help="4096² layer: best of this many runs each")
    args = ap.parse_args()
    result = {"real": [] if args.skip_real else real_layer_table(args.layer), "big": []}
    if not args.skip_big:
        devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
        result["big"] = [big_layer_timing(d, args.repeat) for d in devices]
    out = Path("bench/results")
    out.mkdir(parents=True, exist_ok=True)
    (out / "layer_bench.json").write_text(json.dumps(result, indent=2))
    print("written bench/results/layer_bench.json")


if __name__ == "__main__":
    main()
