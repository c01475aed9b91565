"""Memory of quantizing one mixture-of-experts layer as the number of experts grows.

    python bench/moe_memory.py [--experts 8,32,128] [--hidden 512] [--intermediate 256]
        [--top-k 8] [--tokens 4096] [--init minmax]

Each count runs in a fresh process: a one-layer Qwen3-MoE (random weights) is built,
the calibration inputs are captured, then the layer is quantized through the
pipeline's own ``quantize_layers``. Reported: the RSS before quantizing (model +
inputs), and the high-water mark during it minus that RSS (the working memory). The
experts' own weights grow with E; the working memory should not, beyond the packed
codes it keeps (E × 3 × hidden × intermediate × bits / 8 bytes) and one routing mask
per expert. Writes ``bench/results/moe_memory.json``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

OUT = Path(__file__).parent / "results" / "moe_memory.json"

CHILD = """
import json, sys, torch
from transformers import AutoConfig, AutoModelForCausalLM
from neuqi.memory import process_memory_kb, release_freed_memory, reset_peak_memory
from neuqi.models.adapters import adapter_for
from neuqi.pipeline.config import QuantConfig
from neuqi.pipeline.sequential import capture_layer_inputs, quantize_layers
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
records, _ = quantize_layers(model, adapter, batches, opts, torch.device("cpu"))
after = process_memory_kb()
packed = sum(r.qweight.numel() * 4 + r.params.scale.numel() * 4 for r in records.values())
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
    for e in [int(x) for x in args.experts.split(",")]:
        spec = {"experts": e, "hidden": args.hidden, "intermediate": args.intermediate, "top_k": args.top_k,
                "tokens": args.tokens, "init": args.init}
        key = json.dumps(spec, sort_keys=True)
        if key not in results:
            out = subprocess.run([sys.executable, "-c", CHILD, json.dumps(spec)], check=True,
                                 capture_output=True, text=True).stdout
            results[key] = {**spec, **json.loads(out.strip().splitlines()[-1])}
            OUT.parent.mkdir(parents=True, exist_ok=True)
            OUT.write_text(json.dumps(results, indent=2) + "\n")
        r = results[key]
        print(f"E={e:4d}: expert weights {r['expert_weights_mb']:7.1f} MB, "
              f"RSS before {r['rss_before_mb']:7.1f} MB, working {r['working_mb']:6.1f} MB "
              f"(packed records {r['records_mb']:.1f} MB)")


if __name__ == "__main__":
    main()
