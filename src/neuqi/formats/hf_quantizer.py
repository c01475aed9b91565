"""Lets ``AutoModelForCausalLM.from_pretrained(path)`` open neuqi checkpoints.

Registered with transformers when ``neuqi`` is imported: the quantizer swaps the
listed linears for ``QuantLinear`` before the packed tensors are loaded.
"""

from __future__ import annotations

from transformers.quantizers.auto import register_quantization_config, register_quantizer
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from neuqi.formats.qlinear import replace_experts, replace_linears


@register_quantization_config("neuqi")
class NeuqiConfig(QuantizationConfigMixin):
    def __init__(
        self,
        bits: int = 3,
        group_size: int = 128,
        zero_point: str = "float",
        act_order: bool = True,
        format_version: int = 1,
        modules: list[str] | None = None,
        gguf_type: str | None = None,
        gguf_types: dict[str, str] | None = None,
        experts: list[str] | None = None,
        gguf_mix: str | None = None,
        **kwargs,
    ) -> None:
        self.quant_method = "neuqi"
        self.bits = bits
        self.group_size = group_size
        self.zero_point = zero_point
        self.act_order = act_order
        self.format_version = format_version
        self.modules = list(modules or [])
        self.gguf_type = gguf_type
        self.gguf_types = dict(gguf_types or {})  # GGUF runs: each linear's own type
        self.experts = list(experts or [])  # MoE: fused 3-D expert weights
        self.gguf_mix = gguf_mix  # GGUF runs quantized for a llama.cpp mix (Q4_K_M, ...)

    def as_dict(self) -> dict:
        gguf = {"gguf_type": self.gguf_type, "gguf_types": self.gguf_types} if self.gguf_type else {}
        gguf |= {"gguf_mix": self.gguf_mix} if self.gguf_mix else {}
        gguf |= {"experts": self.experts} if self.experts else {}
        return gguf | {
            "quant_method": "neuqi",
            "bits": self.bits,
            "group_size": self.group_size,
            "zero_point": self.zero_point,
            "act_order": self.act_order,
            "format_version": self.format_version,
            "modules": self.modules,
        }

    to_dict = as_dict


@register_quantizer("neuqi")
class NeuqiHfQuantizer(HfQuantizer):
    requires_calibration = True

    def _process_model_before_weight_loading(self, model, **kwargs):
        qc = self.quantization_config.as_dict()
        dtype = kwargs.get("dtype") or next(model.parameters()).dtype
        replace_linears(model, qc["modules"], qc, dtype)
        replace_experts(model, qc.get("experts", []), qc, dtype)

    def _process_model_after_weight_loading(self, model, **kwargs):
        return model

    @property
    def is_trainable(self) -> bool:
        return False

    def is_serializable(self, *args, **kwargs) -> bool:
        return True
