"""Where llm-compressor's 2-bit lead came from: its observer inside our pipeline.

    python bench/init_norm_study.py [--bits 2] [--group 64] [--variants peer3,peer2,...]

Every variant quantizes SmolLM2-135M with our LDLQ (act-order, true-sequential, the
peers protocol's 32 × 512 c4-sample windows) and reports wiki-sample perplexity on 8 ×
2048 windows.  Only the parameter choice, or the order of the Hessians, changes:

- ``peerN[-full][-u]``: llm-compressor 0.14's ``imatrix_mse`` search, re-implemented
  (range shrunk by 5% steps down to 5% of min-max with 0 kept inside, integer zero,
  error ``Σ imp·|w − ŵ|^N``, stop after 5 steps without a gain); ``-full`` takes 100
  steps and no early stop, ``-u`` drops the importance (imp = 1; default imp = diag(H)).
- ``fp-H``: every linear's H from the layer's FP forward (llm-compressor's order)
  instead of after the linears before it were quantized (ours), with NeUQI_int.
- ``normP``: ours, ``--init neuqi_int --init-norm P``.

Writes ``bench/results/init_norm_study.json`` after every run (a run that is there is
not redone).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "results" / "init_norm_study.json"

CHILD = r'''
import json, sys, torch
from neuqi.quant import init as I
from neuqi.pipeline import sequential as S
from neuqi.models.adapters import LLAMA
from neuqi.pipeline.config import RunConfig
from neuqi.pipeline.run import quantize_model
v, bits, group, out_dir, model = sys.argv[1:6]
bits, group = int(bits), int(group)
opts = dict(init="neuqi_int")
if v.startswith("peer"):
    spec = v[4:].split("-")
    norm, full, uniform = float(spec[0]), "full" in spec, "u" in spec
    grid, patience = (100, 0) if full else (20, 5)

    def peer_search(wg, hg, maxq, grid_=None, maxshrink_=None):
        lo, hi = wg.amin(1).clamp_max(0), wg.amax(1).clamp_min(0)
        imp = torch.ones_like(hg) if uniform else hg
        best_e = torch.full_like(lo, float("inf"))
        best_s, best_z, stale = None, None, 0
        for i in range(int(0.95 * grid) + 1):
            p = 1 - i / grid
            rng = (hi - lo) * p
            s = torch.where(rng < 1e-9, torch.ones_like(rng), rng / maxq)
            z = torch.clamp(torch.round(-lo * p / s), 0, maxq)
            q = torch.clamp(torch.round(wg / s[:, None] + z[:, None]), 0, maxq)
            e = ((s[:, None] * (q - z[:, None]) - wg).abs() ** norm * imp).sum(1)
            better = e < best_e
            if best_s is None:
                best_s, best_z = s.clone(), z.clone()
            if better.any():
                best_e = torch.where(better, e, best_e)
                best_s, best_z = torch.where(better, s, best_s), torch.where(better, z, best_z)
                stale = 0
            else:
                stale += 1
                if patience and stale >= patience:
                    break
        return best_s, best_z

    I._init_mse = peer_search
    opts = dict(init="mse")
elif v == "fp-H":
    first = S.group_statistics
    cache = {}

    def fp_statistics(layer, lin, batches, fp_inputs, folds=False):
        if id(layer) not in cache:
            cache.clear()
            heads = [layer.get_submodule(g[0]) for g in LLAMA.layer_groups(layer)]
            cache[id(layer)] = {id(m): first(layer, m, batches, None)[0] for m in heads}
        return cache[id(layer)].pop(id(lin)), None, None

    S.group_statistics = fp_statistics
elif v.startswith("norm"):
    opts = dict(init="neuqi_int", init_norm=float(v[4:]))
else:
    raise SystemExit(f"unknown variant {v}")
cfg = RunConfig(model=model, bits=bits, group_size=group, nsamples=32, seqlen=512,
                eval_sets=["wiki-sample"], eval_windows=8, out_dir=out_dir, overwrite=True, **opts)
run = quantize_model(cfg, quiet=True)
r = json.load(open(f"{run}/result.json"))
print(json.dumps({"wiki-sample": r["eval"]["ppl"]["wiki-sample"]["ppl"],
                  "quantize_seconds": r["timing"]["quantize_seconds"]}))
'''


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bits", type=int, default=2)
    ap.add_argument("--group", type=int, default=64)
    ap.add_argument("--variants", default="peer3,peer2,peer3-u,peer3-full,fp-H,norm3,norm4")
    ap.add_argument("--model", default=str(ROOT / ".cache" / "neuqi" / "models" / "smollm2-135m"))
    ap.add_argument("--runs-dir", default=str(ROOT / "bench" / "results" / "init_norm_runs"))
    args = ap.parse_args()
    results = json.loads(OUT.read_text()) if OUT.exists() else {}
    for v in args.variants.split(","):
        key = f"{args.bits}b{'ch' if args.group == -1 else 'g' + str(args.group)} {v}"
        if key in results:
            print(key, results[key], "(recorded)")
            continue
        proc = subprocess.run([sys.executable, "-c", CHILD, v, str(args.bits), str(args.group),
                               f"{args.runs_dir}/{v}", args.model], capture_output=True, text=True)
        if proc.returncode:
            print(key, "failed:", proc.stderr[-2000:], file=sys.stderr)
            continue
        results[key] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(key, results[key], flush=True)
        OUT.parent.mkdir(parents=True, exist_ok=True)
        OUT.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
