"""GPTQModel: GPTQ with act-order (``desc_act``), asymmetric, its default damping;
the saved checkpoint is read back with its torch kernel and de-quantized."""

from __future__ import annotations

import os
from pathlib import Path

import common


def run(job: dict, out: Path) -> dict:
    import gptqmodel
    import torch
    from gptqmodel import BACKEND, GPTQModel, QuantizeConfig

    # GPTQModel 7.7.0 sizes its CPU pool at (cores + 1) // 2 but asks 2 loader workers of
    # it, which fails on a 2-core machine ("Virtual pool 'model_loader:cpu' requests 2
    # workers but parent 'cpu' only has 1"); give its pool the 2 workers it asks for.
    workaround = None
    if ((os.cpu_count() or 1) + 1) // 2 < 2:
        gptqmodel._default_cpu_workers = lambda: 2
        workaround = "CPU pool raised to 2 workers (GPTQModel 7.7.0 fails on <= 2 cores otherwise)"
    torch.manual_seed(0)
    windows = torch.load(job["windows"])
    calibration = [{"input_ids": w.tolist(), "attention_mask": [1] * w.numel()} for w in windows]
    cfg = QuantizeConfig(bits=job["bits"], group_size=job["group_size"], desc_act=True, sym=False)
    quantizer = GPTQModel.load(job["model"], cfg, device="cpu")
    _, seconds = common.timed(lambda: quantizer.quantize(calibration, batch_size=1, calibration_sort=None))
    quantizer.save(str(out / "native"))
    loaded = GPTQModel.load(str(out / "native"), device="cpu", backend=BACKEND.GPTQ_TORCH)
    dense, by_group = {}, {}
    for name, mod in loaded.model.named_modules():
        if hasattr(mod, "dequantize_weight") and hasattr(mod, "qweight"):
            w = mod.dequantize_weight().T.detach().float().cpu().clone()
            dense[f"{name}.weight"] = w
            # act-order: column j belongs to group g_idx[j]; gather each group's columns
            by_group[name] = w[:, torch.argsort(mod.g_idx.cpu(), stable=True)]
    if not dense:
        raise RuntimeError("GPTQModel's checkpoint holds no quantized linear")
    common.check_levels(by_group, job["bits"], job["group_size"])
    common.save_dense(job["model"], dense, out / "model")
    return {"version": gptqmodel.__version__, "quantize_seconds": seconds, "linears": len(dense),
            "torch": torch.__version__, "workaround": workaround}


if __name__ == "__main__":
    common.main(run, "GPTQModel")
