"""Check an export twice: its tensors read back by the engine-free reference reader
must equal our codes/scales/zeros bit for bit, and the model its consumer library
loads must give our quantized model's logits."""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

import numpy as np
import torch

from neuqi.formats.export import reference
from neuqi.formats.export.source import DTYPES, ExportSource, read_source

log = logging.getLogger(__name__)
LOGIT_TOL = 1e-4  # max |Δlogit| / std(logits); fp32 compute on both sides


def detect_format(folder: Path) -> str:
    cfg = json.loads((folder / "config.json").read_text())
    method = (cfg.get("quantization_config") or {}).get("quant_method")
    if method == "gptq":
        return "gptq"
    if method == "compressed-tensors":
        return "compressed-tensors"
    if (folder / "qmodel.pt").exists():
        return "hqq"
    raise ValueError(f"{folder} is not a gptq, compressed-tensors or hqq export (quant_method={method!r})")


def check_tensors(fmt: str, folder: Path, src: ExportSource, dtype: torch.dtype) -> dict:
    """Bit-for-bit comparison of the exported fields with ours."""
    got = reference.READERS[fmt](folder)
    if set(got) != set(src.linears):
        missing = sorted(set(src.linears) - set(got))[:3]
        raise AssertionError(f"{fmt} export lacks quantized linears {missing}")
    # GPTQ and HQQ store fp16 scales whatever the model dtype; compressed-tensors the model's.
    scale_dtype = dtype if fmt == "compressed-tensors" else torch.float16
    for name, lin in src.linears.items():
        codes, scales, zeros = got[name]
        if not np.array_equal(codes, lin.codes.numpy().astype(np.int64)):
            raise AssertionError(f"{name}: exported codes differ from ours")
        ours_scale = lin.scale.to(scale_dtype).float().numpy()
        if not np.array_equal(np.asarray(scales, dtype=np.float32), ours_scale):
            raise AssertionError(f"{name}: exported scales differ from ours")
        ours_zero = lin.zero.to(torch.float16).float().numpy() if fmt == "hqq" else lin.zero.numpy()
        if not np.array_equal(np.asarray(zeros, dtype=np.float32), ours_zero):
            raise AssertionError(f"{name}: exported zero-points differ from ours")
    return {"linears": len(got), "bit_exact": True}


def load_with_engine(fmt: str, folder: Path):
    """The model as its consumer library loads it (fp32 compute on CPU)."""
    if fmt == "compressed-tensors":
        from transformers import AutoModelForCausalLM, CompressedTensorsConfig

        # dequantize=True: the compressed-tensors decompressor unpacks every layer at load.
        # (transformers 5.23's run-compressed path expects unpacked zero-points and cannot
        # read the packed ones that compressed-tensors itself writes and vLLM reads.)
        qc = json.loads((folder / "config.json").read_text())["quantization_config"]
        cfg = CompressedTensorsConfig.from_dict({**qc, "dequantize": True})
        with warnings.catch_warnings():  # "config from the model will be used": intended
            warnings.simplefilter("ignore", UserWarning)
            return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, quantization_config=cfg)
    if fmt == "hqq":
        from hqq.models.hf.base import AutoHQQHFModel

        return AutoHQQHFModel.from_quantized(str(folder), compute_dtype=torch.float32, device="cpu")
    if fmt == "gptq":
        try:
            from gptqmodel import BACKEND, GPTQModel
        except ImportError as exc:
            raise ModuleNotFoundError("gptqmodel is not installed") from exc
        return GPTQModel.load(str(folder), device="cpu", backend=BACKEND.TORCH, dtype=torch.float32).model
    raise ValueError(fmt)


def library_decoded_moe(folder: Path, src: ExportSource):
    """A MoE export as the compressed-tensors library decodes it.

    transformers 5.23 cannot load asymmetric compressed-tensors experts (its converter
    drops the zero-points of per-expert tensors before decompressing), so each
    quantized matrix of the file is decompressed by the library's own
    ``PackedQuantizationCompressor`` and put into our model skeleton (experts fused
    back from the hub names); the file's dense tensors replace ours."""
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationConfig
    from safetensors.torch import load_file

    from neuqi.formats.checkpoint import load_quantized
    from neuqi.formats.qlinear import QuantExperts, QuantLinear
    from neuqi.models.adapters import adapter_for

    raw = json.loads((folder / "config.json").read_text())["quantization_config"]
    scheme = QuantizationConfig.model_validate(raw).config_groups["group_0"]
    stored = load_file(folder / "model.safetensors")
    fields = ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape")

    def decoded(name: str) -> torch.Tensor:
        local = {f: stored.pop(f"{name}.{f}") for f in fields}
        return PackedQuantizationCompressor.decompress(local, scheme)["weight"].float()

    model = load_quantized(src.run_dir, dtype=torch.float32)
    layout = adapter_for(src.config["model_type"]).experts
    hub_names = dict(layout.hub_renames)
    with torch.no_grad():
        for name, mod in model.named_modules():
            if isinstance(mod, QuantLinear):
                mod.cache, mod._dense = True, decoded(name)
            elif isinstance(mod, QuantExperts):
                module, _, param = name.rpartition(".")
                base = f"{module[: -len(layout.path) - 1]}.{layout.hub_path}"
                if param == layout.down:
                    mod._dense = torch.stack([decoded(f"{base}.{e}.{layout.hub_down}")
                                              for e in range(mod.n_experts)])
                else:
                    mod._dense = torch.stack([torch.cat([decoded(f"{base}.{e}.{layout.hub_gate}"),
                                                         decoded(f"{base}.{e}.{layout.hub_up}")])
                                              for e in range(mod.n_experts)])
        state = model.state_dict()
        for key, value in stored.items():
            for ours, hub in hub_names.items():
                key = key.replace(f".{hub}.", f".{ours}.")
            state[key].copy_(value.float())
    return model


def our_model(src: ExportSource, dtype: torch.dtype, round_weights: bool = False):
    """Our quantized model with its dense tensors rounded to the export dtype (so the
    only differences left are the engine's); ``round_weights`` also rounds the
    de-quantized weights, for formats whose loader de-quantizes in that dtype."""
    from neuqi.formats.checkpoint import load_quantized
    from neuqi.formats.qlinear import QuantExperts, QuantLinear

    model = load_quantized(src.run_dir, dtype=torch.float32)
    with torch.no_grad():
        for _, p in model.named_parameters():
            p.copy_(p.to(dtype).float())
        for mod in model.modules():
            if round_weights and isinstance(mod, QuantLinear):
                mod.cache, mod._dense = True, mod.dequantize().to(dtype).float()
            elif round_weights and isinstance(mod, QuantExperts):
                mod._dense = mod.dequantize().to(dtype).float()
    return model


@torch.no_grad()
def compare_logits(engine_model, ours, vocab: int, tokens: int = 256, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (2, tokens // 2), generator=g)
    a = engine_model(input_ids=ids).logits.float()
    b = ours(input_ids=ids).logits.float()
    rel = float((a - b).abs().max() / b.std())
    agree = float((a.argmax(-1) == b.argmax(-1)).float().mean())
    return {"tokens": tokens, "max_rel_logit_diff": rel, "top1_agreement": agree, "tolerance": LOGIT_TOL,
            "ok": rel <= LOGIT_TOL}


def verify(export_dir: Path | str, run_dir: Path | str, dtype: str | None = None,
           src: ExportSource | None = None) -> dict:
    """Both checks; ``result["ok"]`` is False when either fails (engine check skipped
    with a reason when the consumer library is not installed)."""
    export_dir = Path(export_dir)
    fmt = detect_format(export_dir)
    src = src or read_source(run_dir)  # the exporter passes the source it already read
    cfg = json.loads((export_dir / "config.json").read_text())
    dt = DTYPES[dtype or str(cfg.get("dtype") or cfg.get("torch_dtype") or "float16")]
    res: dict = {"format": fmt, "export": str(export_dir), "run": str(run_dir)}
    try:
        res["tensors"] = check_tensors(fmt, export_dir, src, dt)
    except AssertionError as exc:
        res["tensors"] = {"bit_exact": False, "error": str(exc)}
    try:
        engine = (library_decoded_moe(export_dir, src) if src.moe and fmt == "compressed-tensors"
                  else load_with_engine(fmt, export_dir))
    except ModuleNotFoundError as exc:
        res["engine"] = {"skipped": f"{exc}; install 'neuqi[export]' to check with the consumer library"}
    else:
        res["engine"] = compare_logits(engine, our_model(src, dt, fmt == "compressed-tensors"),
                                       src.config["vocab_size"])
    res["ok"] = res["tensors"].get("bit_exact", False) and res["engine"].get("ok", True)
    return res
