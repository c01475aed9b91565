"""HQQ: calibration-free half-quadratic optimisation of a float zero-point and scale
per group (its default ``optimize=True``, ``axis=1``); channel-wise is one group per row."""

from __future__ import annotations

from pathlib import Path

import common


def run(job: dict, out: Path) -> dict:
    import hqq
    import torch
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(job["model"], dtype=torch.float32)
    modules = dict(model.named_modules())
    group = None if job["group_size"] == -1 else job["group_size"]
    cfg = BaseQuantizeConfig(nbits=job["bits"], group_size=group, axis=1)

    def quantize() -> dict:
        dense = {}
        for name in common.linear_names(model):
            q = HQQLinear(modules[name], quant_config=cfg, compute_dtype=torch.float32,
                          device="cpu", del_orig=False)
            dense[f"{name}.weight"] = q.dequantize().float().reshape(modules[name].weight.shape).clone()
        return dense

    dense, seconds = common.timed(quantize)
    common.check_levels(dense, job["bits"], job["group_size"])
    common.save_dense(job["model"], dense, out / "model")
    return {"version": getattr(hqq, "__version__", "0.2.8.post1"), "quantize_seconds": seconds,
            "linears": len(dense), "calibration": "none"}


if __name__ == "__main__":
    common.main(run, "HQQ")
