"""neuqi: near-optimal uniform quantization of Hugging Face causal language models."""

from __future__ import annotations

from pathlib import Path

__version__ = "0.1.0"


__all__ = ["QuantConfig", "load", "quantize"]


def __getattr__(name: str):
    # The API pulls in the pipeline (transformers, rich); import it when first used.
    if name == "quantize":
        from neuqi.api import quantize

        return quantize
    if name == "QuantConfig":
        from neuqi.pipeline.config import QuantConfig

        return QuantConfig
    raise AttributeError(f"module 'neuqi' has no attribute {name!r}")


def load(path: str | Path, dtype=None, device: str = "cpu"):
    """Open a native neuqi checkpoint as a transformers model with ``QuantLinear`` layers."""
    import torch

    from neuqi.formats.checkpoint import load_quantized

    return load_quantized(path, dtype=dtype or torch.float32, device=device)


def _register_with_transformers() -> None:
    try:
        import transformers  # noqa: F401
    except ImportError:  # neuqi.quant works with torch alone
        return
    from neuqi.formats import hf_quantizer  # noqa: F401  (registers "neuqi")


_register_with_transformers()
