"""llm-compressor: ``GPTQModifier`` through ``oneshot`` with its ``minmax`` or
``imatrix_mse`` observer, asymmetric int weights, static act-order (groups fixed
before the columns are reordered, as in our LDLQ+Hsort)."""

from __future__ import annotations

from pathlib import Path

import common


def run(job: dict, out: Path) -> dict:
    import llmcompressor
    import torch
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from llmcompressor import oneshot
    from llmcompressor.modifiers.gptq import GPTQModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(job["model"], dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(job["model"])
    windows = torch.load(job["windows"])
    loader = [{"input_ids": w[None], "attention_mask": torch.ones_like(w)[None]} for w in windows]
    channel = job["group_size"] == -1
    weights = QuantizationArgs(
        num_bits=job["bits"], type="int", symmetric=False,
        strategy="channel" if channel else "group",
        group_size=None if channel else job["group_size"],
        observer=job["variant"], actorder="static",
    )
    recipe = GPTQModifier(
        config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=weights)},
        ignore=["lm_head"], dampening_frac=job.get("damp", 0.01), actorder="static",
    )
    _, seconds = common.timed(lambda: oneshot(
        model=model, dataset=torch.utils.data.DataLoader(loader, batch_size=None),
        recipe=recipe, num_calibration_samples=len(loader), max_seq_length=windows.shape[1],
        shuffle_calibration_samples=False,
    ))
    dense = {}
    with torch.no_grad():
        for name, mod in model.named_modules():
            if hasattr(mod, "weight_scale"):
                dense[f"{name}.weight"] = fake_quantize(
                    mod.weight, mod.weight_scale, mod.weight_zero_point,
                    mod.quantization_scheme.weights,
                ).detach().clone()
    if not dense:
        raise RuntimeError("llm-compressor left no quantized linear in the model")
    common.check_levels(dense, job["bits"], job["group_size"])
    common.save_dense(job["model"], dense, out / "model")
    model.save_pretrained(out / "native", save_compressed=True)
    tokenizer.save_pretrained(out / "native")
    return {"version": llmcompressor.__version__, "quantize_seconds": seconds, "linears": len(dense)}


if __name__ == "__main__":
    common.main(run, "llm-compressor")
