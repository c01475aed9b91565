"""AutoRound: ``iters=0`` with ``enable_neuqi`` (its integer-zero, rounding-only
NeUQI weighted by the activation imatrix) or its default sign-gradient tuning
(``variant="tuned"``, 200 iterations per block), asymmetric."""

from __future__ import annotations

from pathlib import Path

import common

VARIANTS = {
    "neuqi": {"iters": 0, "enable_neuqi": True},
    "rtn-imatrix": {"iters": 0},
    "tuned": {"iters": 200},
}


def run(job: dict, out: Path) -> dict:
    import auto_round
    import torch
    from auto_round import AutoRound
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(job["model"], dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(job["model"])
    windows = torch.load(job["windows"])
    loader = torch.utils.data.DataLoader(
        [{"input_ids": w, "attention_mask": torch.ones_like(w)} for w in windows], batch_size=1)
    names = common.linear_names(model)
    ar = AutoRound(
        model, tokenizer, bits=job["bits"], group_size=job["group_size"], sym=False,
        dataset=loader, nsamples=windows.shape[0], seqlen=windows.shape[1], batch_size=1,
        device_map="cuda" if torch.cuda.is_available() else "cpu", seed=0,
        **VARIANTS[job["variant"]],
    )
    _, seconds = common.timed(ar.quantize)
    modules = dict(model.named_modules())
    dense = {f"{n}.weight": modules[n].weight.detach().float().clone() for n in names}
    common.check_levels(dense, job["bits"], job["group_size"])
    common.save_dense(job["model"], dense, out / "model")
    record = {"version": auto_round.__version__, "quantize_seconds": seconds, "linears": len(dense)}
    try:
        ar.save_quantized(str(out / "native"), format="auto_round")
    except Exception as exc:  # size only; the accuracy figures do not depend on it
        record["native_error"] = f"{type(exc).__name__}: {exc}"[:300]
    return record


if __name__ == "__main__":
    common.main(run, "AutoRound")
