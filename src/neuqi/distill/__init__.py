"""Light distillation of a quantized model's float parameters against its FP teacher."""

from neuqi.distill.trainer import DistillConfig, distill_run

__all__ = ["DistillConfig", "distill_run"]
