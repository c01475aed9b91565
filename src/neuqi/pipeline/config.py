"""The run configuration: it serialises to JSON and *is* the run's identity (its name)."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from neuqi.quant import ALGORITHMS, INIT_METHODS, QuantSpec
from neuqi.quant.gguf_types import GGUF_INITS, GGUFType, gguf_type


@dataclass
class RunConfig:
    model: str
    bits: int = 3
    group_size: int = 128
    method: str = "ldlq"  # rtn | gptq | ldlq
    init: str = "neuqi"  # minmax | mse | neuqi | neuqi_int
    magr: bool = False
    magr_alpha: float | None = None
    max_clip: float | None = None  # NeUQI: steps a weight may lie beyond the grid (None: any)
    act_order: bool = True
    damp: float = 0.01
    calib: str = "c4-sample"
    nsamples: int = 128
    seqlen: int = 2048
    batch_size: int = 1
    dtype: str = "auto"  # auto: bfloat16 on CUDA, float32 on CPU
    device: str = "auto"
    seed: int = 0
    out_dir: str = "runs"
    model_name: str | None = None
    eval_sets: list[str] = field(default_factory=list)
    eval_seqlen: int = 2048
    eval_windows: int | None = None
    low_memory: bool = False  # read one layer at a time from safetensors shards
    gguf: str | None = None  # a llama.cpp block type: it fixes bits, blocks and what params store

    def __post_init__(self) -> None:
        if self.gguf is not None:
            t = gguf_type(self.gguf)
            self.gguf, self.bits, self.group_size = t.name, t.bits, t.block
            if self.init not in GGUF_INITS:
                raise ValueError(f"--gguf {t.name} takes --init {' or '.join(GGUF_INITS)}, got {self.init!r}")
            if self.max_clip is not None:
                raise ValueError("--max-clip is not available with --gguf")
        QuantSpec(self.bits, self.group_size)  # validates bits and group size
        if self.method not in ALGORITHMS:
            raise ValueError(f"--method must be one of {ALGORITHMS}, got {self.method!r}")
        if self.init not in INIT_METHODS:
            raise ValueError(f"--init must be one of {INIT_METHODS}, got {self.init!r}")
        if self.max_clip is not None and (self.init != "neuqi" or not self.max_clip >= 0):
            raise ValueError(f"--max-clip needs --init neuqi and a value >= 0, got {self.max_clip!r}")
        if self.nsamples < 1 or self.seqlen < 2 or self.batch_size < 1:
            raise ValueError("--nsamples, --seqlen and --batch-size must be positive")
        if self.model_name is None:
            self.model_name = short_model_name(self.model)

    @property
    def spec(self) -> QuantSpec:
        return QuantSpec(self.bits, self.group_size)

    @property
    def gguf_type(self) -> GGUFType | None:
        return None if self.gguf is None else gguf_type(self.gguf)

    @property
    def zero_point(self) -> str:
        if self.gguf is not None:
            return "offset"
        return "float" if self.init == "neuqi" else "int"

    @property
    def run_name(self) -> str:
        calib = Path(self.calib).stem if ("/" in self.calib or "." in self.calib) else self.calib
        group = "ch" if self.group_size == -1 else f"g{self.group_size}"
        parts = [
            self.model_name,
            calib,
            f"n{self.nsamples}",
            f"L{self.seqlen}",
            self.method.upper(),
        ]
        parts += [self.gguf] if self.gguf is not None else [f"{self.bits}bit", group]
        if self.act_order and self.method != "rtn":
            parts.append("Hsort")
        parts.append(self.init)
        if self.max_clip is not None:
            parts.append(f"clip{self.max_clip:g}")
        if self.magr:
            parts.append("magr")
        return ".".join(parts)

    def torch_device(self) -> torch.device:
        return resolve_device(self.device)

    def torch_dtype(self) -> torch.dtype:
        return resolve_dtype(self.dtype, self.torch_device())

    def to_dict(self) -> dict:
        d = asdict(self)
        d["run_name"] = self.run_name
        return d


def short_model_name(model: str) -> str:
    """``SmolLM2-135M-Instruct.Q4_1.gguf`` → ``smollm2-135m-instruct``; folders by name."""
    p = Path(model)
    name = p.name if p.suffix != ".gguf" else p.stem.split(".")[0]
    return re.sub(r"[^a-z0-9._-]+", "-", name.lower()).strip("-") or "model"


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device} requested but CUDA is not available here")
    return dev


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if dtype not in table:
        raise ValueError(f"--dtype must be one of auto, {', '.join(table)}; got {dtype!r}")
    return table[dtype]
