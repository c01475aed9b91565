"""How close each parameter init gets to the optimum of NeUQI's objective.

    python bench/init_quality.py [--real]

For every group: weighted error ``Σ h (w − ŵ)²`` of minmax / mse / neuqi_int /
neuqi divided by a dense optimum (1000 scales from 0 to 1.25× min-max, exact
best float zero for each).  Random heavy-tailed weights (Student-t, ν=4) with
uneven importances, and with ``--real`` the layers of SmolLM2-135M's block 3
with their real diag(H) from c4-sample (q_proj, o_proj, down_proj).  Prints a table, writes
``bench/results/init_quality.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from neuqi.quant import QuantSpec, fake_quantize, group_weighted_error, init_params
from neuqi.quant.init import dense_scale_search

METHODS = ("minmax", "mse", "neuqi_int", "neuqi")
REAL_LINEARS = ("self_attn.q_proj", "self_attn.o_proj", "mlp.down_proj")
SPECS = [QuantSpec(2, 64), QuantSpec(3, 64), QuantSpec(4, 64), QuantSpec(3, -1), QuantSpec(4, -1)]


def ratios(w, h, spec):
    opt = dense_scale_search(w, spec, h)
    out = {}
    for m in METHODS:
        t0 = time.perf_counter()
        p = init_params(w, spec, m, h)
        secs = time.perf_counter() - t0
        err = group_weighted_error(w, fake_quantize(w, p, spec), spec, h).flatten().double()
        r = err / opt.clamp_min(1e-30)
        out[m] = {"mean": float(r.mean()), "worst": float(r.max()), "seconds": secs}
    return out


def real_weights():
    from neuqi.data.cache import cache_dir
    from neuqi.data.corpora import load_text, sample_windows, tokenize
    from neuqi.models.adapters import adapter_for
    from neuqi.models.loading import load_model, load_tokenizer
    from neuqi.pipeline.sequential import block_hessians

    path = cache_dir() / "models" / "smollm2-135m"
    model, tok = load_model(path), load_tokenizer(path)
    windows = sample_windows(tokenize(load_text("c4-sample")[:400_000], tok), 16, 512)
    for name, w, H in block_hessians(model, adapter_for(model.config.model_type), windows, 3):
        if name in REAL_LINEARS:
            yield f"layer3.{name}", w, torch.diagonal(H).float()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--real", action="store_true", help="also SmolLM2-135M block 3 with real diag(H)")
    args = ap.parse_args()
    torch.manual_seed(0)
    cases = [("random t4 256x512", torch.distributions.StudentT(4.0).sample((256, 512)) * 0.02,
              torch.rand(512) ** 3 + 1e-3)]
    if args.real:
        cases += list(real_weights())
    results = []
    print(f"{'case':28s} {'spec':8s} " + " ".join(f"{m:>18s}" for m in METHODS))
    for name, w, h in cases:
        for spec in SPECS:
            r = ratios(w, h, spec)
            tag = f"{spec.bits}b {'ch' if spec.group_size == -1 else 'g' + str(spec.group_size)}"
            print(f"{name:28s} {tag:8s} " + " ".join(
                f"{r[m]['mean']:8.4f}/{r[m]['worst']:8.3f}" for m in METHODS), flush=True)
            results.append({"case": name, "bits": spec.bits, "group_size": spec.group_size, **r})
    out = Path("bench/results")
    out.mkdir(parents=True, exist_ok=True)
    (out / "init_quality.json").write_text(json.dumps(results, indent=2))
    print("cells: mean / worst ratio of weighted error to the dense optimum; written "
          "bench/results/init_quality.json")


if __name__ == "__main__":
    main()
