"""Memory of quantizing one mixture-of-experts layer as the number of experts grows.

    python bench/moe_memory.py [--experts 8,32,128] [--hidden 512] [--intermediate 256]
        [--top-k 8] [--tokens 4096] [--init minmax]

Each (count, phase) runs in a fresh process: a one-layer Qwen3-MoE (random weights)
is built and the calibration inputs are captured. Then one phase runs, and its working
memory is measured: the RSS high-water mark during the phase minus the RSS before it.
The phases are:

* ``forward``: the layer's own forward over the calibration batches (transformers' code,
  what any tool pays to propagate the inputs);
* ``experts``: ``quantize_experts`` alone (every expert, one at a time), with the packed
  codes it keeps;
* ``layer``: the pipeline's whole ``quantize_layers`` (attention, experts, forward).

Each phase runs twice: under glibc's default allocator settings (what a user sees) and
with ``MALLOC_MMAP_THRESHOLD_=131072``, which fixes glibc's mmap threshold so that every
large temporary is mapped on its own and unmapped when freed. The default lets the
threshold grow, so large temporaries come from the heap, where the small results kept
between them pin pages: that RSS is the allocator's, not live tensors. The fixed row
shows what the live tensors need.

The experts' own weights grow with E. The working memory should not, beyond the packed
codes it keeps (E × 3 × hidden × intermediate × bits / 8 bytes) and one routing mask per
expert. Writes ``bench/results/moe_memory.json`` as it goes; runs already there are kept.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

OUT = Path(__file__).parent / "results" / "moe_memory.json"
PHASES = ("forward", "experts", "layer")
MALLOC = {"default": {}, "fixed": {"MALLOC_MMAP_THRESHOLD_": "131072"}}

CHILD = """
import json, sys, torch
from transformers import AutoConfig, AutoModelForCausalLM
from neuqi.memory import process_memory_kb, release_freed_memory, reset_peak_memory
from neuqi.models.adapters import adapter_for
from neuqi.pipeline.config import QuantConfig
from neuqi.pipeline.moe import quantize_experts
from neuqi.pipeline.sequential import capture_layer_inputs, decoder_layers, layer_outputs, quantize_layers
a = json.loads(sys.argv[1])
cfg = AutoConfig.for_model("qwen3_moe", vocab_size=1024, hidden_size=a["hidden"],
    intermediate_size=a["hidden"], moe_intermediate_size=a["intermediate"], num_experts=a["experts"],
    num_experts_per_tok=a["top_k"],
    num_hidden_layers=1, num_attention_heads=8, num_key_value_heads=4, head_dim=a["hidden"] // 8,
    max_position_embeddings=512)
torch.manual_seed(0)
model = AutoModelForCausalLM.from_config(cfg).eval()
adapter = adapter_for("qwen3_moe")
windows = torch.randint(0, 1024, (a["tokens"] // 256, 256))
batches = capture_layer_inputs(model, adapter, windows, 4, torch.device("cpu"))
opts = QuantConfig(bits=3, group_size=128, init=a["init"], method="ldlq")
release_freed_memory()
reset_peak_memory(torch.device("cpu"))
before = process_memory_kb()
layer = decoder_layers(model, adapter)[0]
if a["phase"] == "forward":
    out = layer_outputs(layer, [b.at_layer(0) for b in batches])
    records = {}
elif a["phase"] == "experts":
    records, _ = quantize_experts(layer, adapter.layer_experts(layer), adapter.experts,
                                  [b.at_layer(0) for b in batches], opts, "model.layers.0.mlp.experts")
else:
    records, _ = quantize_layers(model, adapter, batches, opts, torch.device("cpu"))
after = process_memory_kb()
packed = sum(r.qweight.numel() * 4 + (r.params.scale.numel() + r.params.zero.numel()) * 2
             for r in records.values())
print(json.dumps({"rss_before_mb": before["VmRSS"] / 1024, "peak_mb": after["VmHWM"] / 1024,
                  "working_mb": (after["VmHWM"] - before["VmRSS"]) / 1024, "records_mb": packed / 2**20,
                  "expert_weights_mb": sum(p.numel() * 4 for n, p in model.named_parameters()
                                           if ".experts." in n) / 2**20}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--experts", default="8,32,128")
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--intermediate", type=int, default=256)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--init", default="minmax")
    args = ap.parse_args()
    results = json.loads(OUT.read_text()) if OUT.exists() else {}
    print("| malloc | experts | expert weights | forward working | experts working | packed codes kept "
          "| experts working − codes | whole layer working |")
    print("|---|---|---|---|---|---|---|---|")
    for malloc, env in MALLOC.items():
        for e in [int(x) for x in args.experts.split(",")]:
            row = {}
            for phase in PHASES:
                spec = {"experts": e, "hidden": args.hidden, "intermediate": args.intermediate,
                        "top_k": args.top_k, "tokens": args.tokens, "init": args.init, "phase": phase,
                        "malloc": malloc}
                key = json.dumps(spec, sort_keys=True)
                if key not in results:
                    out = subprocess.run([sys.executable, "-c", CHILD, json.dumps(spec)], check=True,
                                         capture_output=True, text=True, env={**os.environ, **env}).stdout
                    results[key] = {**spec, **json.loads(out.strip().splitlines()[-1])}
                    OUT.parent.mkdir(parents=True, exist_ok=True)
                    OUT.write_text(json.dumps(results, indent=2) + "\n")
                row[phase] = results[key]
            ex = row["experts"]
            print(f"| {malloc} | {e} | {ex['expert_weights_mb']:.0f} MB "
                  f"| {row['forward']['working_mb']:.0f} MB "
                  f"| {ex['working_mb']:.0f} MB | {ex['records_mb']:.1f} MB "
                  f"| {ex['working_mb'] - ex['records_mb']:.0f} MB | {row['layer']['working_mb']:.0f} MB |")

if __name__ == "__main__":
    main()
