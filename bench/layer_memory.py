"""RSS through the quantization of one decoder layer, step by step.

    python bench/layer_memory.py [--model qwen2.5-coder-0.5b] [--layer 3] [--init neuqi_int]

Runs the pipeline's own steps (group H, then each linear) on one layer of the FP
model, with the calibration windows a run would use, and prints VmRSS and the
high-water mark after each step: the peak of a layer is traced to the linear (and
so to the shapes) that causes it.  Run it in a fresh process, alone on the CPU.
"""

from __future__ import annotations

import argparse

import torch

from neuqi.data.corpora import load_text, sample_windows, tokenize
from neuqi.memory import process_memory_kb, release_freed_memory, reset_peak_memory
from neuqi.models.adapters import adapter_for
from neuqi.models.loading import load_model, load_tokenizer
from neuqi.pipeline.config import QuantConfig
from neuqi.pipeline.sequential import (
    capture_layer_inputs,
    decoder_layers,
    group_hessian,
    layer_outputs,
    quantize_linear,
)


def status_mb() -> dict[str, int]:
    return {key: kb // 1024 for key, kb in process_memory_kb().items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="qwen2.5-coder-0.5b")
    ap.add_argument("--layer", type=int, default=3)
    ap.add_argument("--init", default="neuqi_int")
    ap.add_argument("--bits", type=int, default=3)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    args = ap.parse_args()
    model, tokenizer = load_model(args.model, torch.float32), load_tokenizer(args.model)
    adapter = adapter_for(model.config.model_type)
    windows = sample_windows(tokenize(load_text("c4-sample"), tokenizer), args.nsamples, args.seqlen, 0)
    batches = [b.at_layer(args.layer)
               for b in capture_layer_inputs(model, adapter, windows, 1, torch.device("cpu"))]
    layer = decoder_layers(model, adapter)[args.layer]
    opts = QuantConfig(bits=args.bits, group_size=args.group_size, init=args.init)
    release_freed_memory()
    reset_peak_memory(torch.device("cpu"))
    print(f"{'step':28s} {'RSS MB':>8s} {'peak MB':>8s}")
    print(f"{'start':28s} {status_mb()['VmRSS']:8d} {status_mb()['VmHWM']:8d}")
    for group in adapter.groups:
        linears = [layer.get_submodule(name) for name in group]
        H = group_hessian(layer, linears[0], batches)
        mem = status_mb()
        print(f"{'H ' + group[0]:28s} {mem['VmRSS']:8d} {mem['VmHWM']:8d}")
        for name, lin in zip(group, linears, strict=True):
            quantize_linear(lin, H, opts)
            mem = status_mb()
            print(f"{'quantize ' + name:28s} {mem['VmRSS']:8d} {mem['VmHWM']:8d}", flush=True)
        del H
    batches = layer_outputs(layer, batches)
    mem = status_mb()
    print(f"{'layer outputs':28s} {mem['VmRSS']:8d} {mem['VmHWM']:8d}")


if __name__ == "__main__":
    main()
