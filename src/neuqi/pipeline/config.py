"""Quantization options and the run configuration.

``QuantConfig`` is the one place every quantization option is declared: its
fields (with their help texts) become the ``neuqi quantize`` flags, the keyword
arguments of ``neuqi.quantize``, the run name and the ``config`` of
``result.json``. ``RunConfig`` adds what a command-line run also needs (which
model, where to write, what to evaluate).
"""

from __future__ import annotations

import functools
import hashlib
import re
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import torch

from neuqi.quant import INIT_METHODS, QuantSpec
from neuqi.quant.gguf_presets import PRESETS, is_preset, preset, preset_plan
from neuqi.quant.gguf_types import GGUF_INITS, GGUF_TYPES, GGUFType, gguf_type
from neuqi.quant.gptq import check_solver_options

DEFAULT_DAMP = 0.01
DEFAULT_MOE_PRIOR_TOKENS = 4096


def file_digest(path: Path) -> str:
    """First 8 hex digits of the file's sha256, read once per (path, size, mtime):
    the run name is asked for several times a run."""
    st = path.stat()
    return _digest(str(path.resolve()), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=32)
def _digest(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:8]


def option(default, help: str, *flags: str, cli_type: type | None = None):
    """A dataclass field that also describes its command-line flag (``cli_type``: what
    the flag parses to, where the field takes more than one type)."""
    meta = {"help": help, "flags": flags, "cli_type": cli_type}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


# gptq_quantize's argument -> the flag a CLI user knows it by (for its error messages)
CLI_NAMES = {"init": "--init", "algorithm": "--method", "also_inits": "--select", "refit": "--refit",
             "h_power": "--h-power", "init_norm": "--init-norm", "max_clip": "--max-clip",
             "search": "--search", "descent": "--descent", "shrink": "--shrink"}


@dataclass
class QuantConfig:
    """How to quantize: grid, parameter init, solver and calibration (defaults: the paper's)."""

    bits: int = option(3, "2, 3, 4 or 8")
    group_size: int = option(128, "weights per scale/zero group along the input; -1 = channel-wise")
    method: str = option("ldlq", "rtn | gptq | ldlq")
    init: str = option("neuqi", "minmax | mse | neuqi (float zero) | neuqi_int (integer zero)")
    magr: bool = option(False, "MagR preprocessing of the weights before quantizing")
    magr_alpha: float | None = option(
        None, "MagR's alpha (default: 1e-3 channel-wise, 1e-4 grouped)", "--alpha", "--magr-alpha")
    max_clip: float | None = option(
        None, "NeUQI (>= 0), NeUQI_int (>= 0.5): steps any weight may lie beyond the grid's ends "
              "(default: no bound)")
    select: str = option(
        "", "further inits tried inside the solver, comma list (e.g. minmax,mse): every row keeps "
            "the init whose solve leaves it the lowest proxy loss (same kind of zero as --init)")
    refit: int = option(
        0, "rounds of least-squares refit of the scales/zeros to the solver's codes on the full H, "
           "solving again each round (0: the paper's fixed parameters)")
    h_power: float = option(
        1.0, "the init weighs input j by diag(H)_j ** POWER (1: the paper's; 0: unweighted)")
    init_norm: float = option(
        2.0, "neuqi, neuqi_int: the init minimises Σ diag(H)·|w − ŵ|^NORM (2: the paper's squared error; "
             "3 weighs the large, clipped errors that LDLQ's feedback cannot make up)")
    descent: int = option(
        0, "coordinate-descent sweeps over the codes after every solve: each code moves to the "
           "grid point that minimises its row's output error given all the others (0: off)")
    search: str = option(
        "auto", "NeUQI's scale search (--init neuqi): auto (multi-start at 2-4 bits, with flank "
                "sweeps on rows of 256+; the exact grid elsewhere) | multistart | banded (the grid "
                "around the multi-start valleys) | patterns | grid (the exact grid everywhere)")
    fp_target: float = option(
        0.0, "ALPHA in (0, 1]: each linear matches W's output on x_q + ALPHA (x_fp - x_q) from the "
             "quantized model's input x_q, so the earlier layers' error is corrected, not only "
             "carried (1: the FP model's own output; GPTAQ's asymmetric calibration uses 0.25); "
             "one more FP pass per layer. 0: off")
    act_order: bool = option(True, "process columns in decreasing diag(H) order")
    damp: float = option(DEFAULT_DAMP, "Hessian damping, as a fraction of its mean diagonal")
    shrink: float | str = option(
        0.0, "A in [0, 1): the solver sees H's correlations between inputs scaled by 1 - A, its "
             "diagonal kept (a regulariser for H estimated from few tokens; 0: off); auto: chosen "
             "per linear by solving on half the calibration windows and scoring on the other half",
        cli_type=str)
    gguf: str | None = option(
        None, f"quantize for a llama.cpp type ({' | '.join(GGUF_TYPES)}): it sets the bits and "
              "blocks, and the params are the ones the type stores; or for one of llama-quantize's "
              f"mixes ({' | '.join(PRESETS)}), which raise some linears' types by role and layer")
    gguf_tensor: str = option(
        "", "with --gguf: other types for some linears, comma list of NAME=TYPE where NAME ends "
            "the module's name (e.g. mlp.down_proj=Q2_K); rows a k-quant cannot take fall back "
            "to a block-32 type of at least its bits")
    moe_prior_tokens: int = option(
        DEFAULT_MOE_PRIOR_TOKENS,
        "mixture-of-experts: each expert's H is its routed tokens' H plus the layer's (all tokens "
        "through the expert) weighted as this many tokens; 0 = routed tokens only")
    calib: str = option("c4-sample", "calibration text: c4-sample | wiki-extra | c4 | FILE")
    nsamples: int = option(128, "calibration windows")
    seqlen: int = option(2048, "tokens per calibration window")
    batch_size: int = option(1, "calibration windows per forward pass")
    seed: int = option(0, "seed of the calibration window sampler")

    def __post_init__(self) -> None:
        if self.gguf is not None:
            if is_preset(self.gguf):  # a llama.cpp mix: its base type sets bits and block
                self.gguf = preset(self.gguf).name
            elif self.gguf.strip().upper() not in GGUF_TYPES:
                raise ValueError(f"unknown GGUF type {self.gguf!r}; choose a type ({', '.join(GGUF_TYPES)}) "
                                 f"or a mix ({', '.join(PRESETS)})")
            t = self.gguf_type
            if not self.is_gguf_mix:
                self.gguf = t.name
            self.bits, self.group_size = t.bits, t.block
            if self.init not in GGUF_INITS:
                raise ValueError(f"--gguf {t.name} takes --init {' or '.join(GGUF_INITS)}, got {self.init!r}")
        if self.gguf_tensor and self.gguf is None:
            raise ValueError("--gguf-tensor overrides the type of --gguf: give --gguf TYPE too")
        if isinstance(self.shrink, str):
            if self.shrink.strip().lower() == "auto":
                self.shrink = "auto"
            else:
                try:
                    self.shrink = float(self.shrink)
                except ValueError:
                    raise ValueError(f"--shrink takes A in [0, 1) or auto, got {self.shrink!r}") from None
        self.gguf_tensor = ",".join(f"{n}={t.name}" for n, t in self.tensor_types().items())
        QuantSpec(self.bits, self.group_size)  # validates bits and group size
        if self.init not in INIT_METHODS:
            raise ValueError(f"--init must be one of {INIT_METHODS}, got {self.init!r}")
        if bad := [m for m in self.also_inits if m not in INIT_METHODS]:
            raise ValueError(f"--select {bad}: choose from {INIT_METHODS}")
        check_solver_options(init=self.init, algorithm=self.method, gguf=self.gguf is not None,
                             also_inits=self.also_inits, refit=self.refit, h_power=self.h_power,
                             init_norm=self.init_norm, max_clip=self.max_clip,
                             search=self.neuqi_search, names=CLI_NAMES, descent=self.descent,
                             shrink=self.shrink)
        self.select = ",".join(self.also_inits)  # as the run name says it: no repeats, no main init
        if self.nsamples < 1 or self.seqlen < 2 or self.batch_size < 1:
            raise ValueError("--nsamples, --seqlen and --batch-size must be positive")
        if self.shrink == "auto" and self.nsamples < 2:
            raise ValueError("--shrink auto holds out half the calibration windows: "
                             "give --nsamples 2 or more")
        if self.moe_prior_tokens < 0:
            raise ValueError(f"--moe-prior-tokens must be >= 0, got {self.moe_prior_tokens!r}")
        if not 0.0 <= self.fp_target <= 1.0:
            raise ValueError(f"--fp-target takes ALPHA in [0, 1] (0: off), got {self.fp_target!r}")
        if not self.damp > 0:
            raise ValueError(f"--damp must be positive, got {self.damp!r}")

    @classmethod
    def option_names(cls) -> list[str]:
        return [f.name for f in fields(QuantConfig)]

    def quant_options(self) -> QuantConfig:
        """Only the quantization options (a ``RunConfig`` drops its run fields)."""
        return QuantConfig(**{n: getattr(self, n) for n in QuantConfig.option_names()})

    @property
    def spec(self) -> QuantSpec:
        return QuantSpec(self.bits, self.group_size)

    @property
    def neuqi_search(self) -> str | None:
        """``--search`` as the solver takes it (None: by row length)."""
        return None if self.search == "auto" else self.search

    @property
    def also_inits(self) -> tuple[str, ...]:
        """The ``--select`` inits, in order, without repeats or the main init."""
        names = [m.strip() for m in self.select.split(",") if m.strip()]
        return tuple(m for i, m in enumerate(names) if m != self.init and m not in names[:i])

    @property
    def gguf_type(self) -> GGUFType | None:
        """The type of ``--gguf`` (of a mix: its base type, that of the linears it does not raise)."""
        if self.gguf is None:
            return None
        return gguf_type(preset(self.gguf).base if is_preset(self.gguf) else self.gguf)

    @property
    def is_gguf_mix(self) -> bool:
        return self.gguf is not None and is_preset(self.gguf)

    def resolve_gguf_mix(self, linears: dict[str, int], model_config) -> QuantConfig:
        """These options with a ``--gguf`` mix spelled out for one model: the mix's base
        type, and every linear it raises (or that ``--gguf-tensor`` names, which wins)
        as an explicit override. ``linears``: HF name -> in_features. Unchanged when
        ``--gguf`` is not a mix."""
        if not self.is_gguf_mix:
            return self
        c = model_config
        plan = preset_plan(
            self.gguf, linears, int(c.num_hidden_layers), int(c.num_attention_heads),
            int(getattr(c, "num_key_value_heads", None) or c.num_attention_heads), int(c.hidden_size),
            bool(getattr(c, "tie_word_embeddings", False)), str(getattr(c, "model_type", "")))
        base = self.gguf_type
        types = {}
        for name, t in plan.linears.items():
            want = self.tensor_override(name) or t
            if want is not base:
                types[name] = want
        return replace(self, gguf=base.name, gguf_tensor=",".join(f"{n}={t.name}" for n, t in types.items()))

    def tensor_types(self) -> dict[str, GGUFType]:
        """``--gguf-tensor`` as ``{name suffix: type}`` (clear errors for bad entries)."""
        out: dict[str, GGUFType] = {}
        for item in filter(None, (x.strip() for x in self.gguf_tensor.split(","))):
            name, sep, ty = item.partition("=")
            if not sep or not name.strip():
                raise ValueError(f"--gguf-tensor takes NAME=TYPE entries, got {item!r}")
            out[name.strip()] = gguf_type(ty)
        return out

    def requested_gguf_type(self, name: str) -> GGUFType | None:
        """The GGUF type asked of linear ``name``: its ``--gguf-tensor`` override (the
        longest matching name suffix) or ``--gguf``."""
        if self.gguf is None:
            return None
        return self.tensor_override(name) or self.gguf_type

    def tensor_override(self, name: str) -> GGUFType | None:
        """The ``--gguf-tensor`` type of linear ``name`` (the longest matching name suffix)."""
        types = self.tensor_types()
        matches = [k for k in types if name == k or name.endswith("." + k)]
        return types[max(matches, key=len)] if matches else None

    @property
    def zero_point(self) -> str:
        if self.gguf is not None:
            return "offset"
        return "float" if self.init == "neuqi" else "int"

    def name_parts(self) -> list[str]:
        """What the run name says about these options (after the model's name)."""
        calib = self.calib
        if "/" in calib or "." in calib:  # a file: its stem and what it holds
            path = Path(calib)
            calib = f"{path.stem}-{file_digest(path) if path.is_file() else 'missing'}"
        group = "ch" if self.group_size == -1 else f"g{self.group_size}"
        parts = [calib, f"n{self.nsamples}", f"L{self.seqlen}", self.method.upper()]
        parts += [self.gguf] if self.gguf is not None else [f"{self.bits}bit", group]
        parts += [f"{n}-{t.name}" for n, t in self.tensor_types().items()]
        if self.act_order and self.method != "rtn":
            parts.append("Hsort")
        parts.append(self.init)
        if self.max_clip is not None:
            parts.append(f"clip{self.max_clip:g}")
        if self.also_inits:
            parts.append("sel-" + "-".join(self.also_inits))
        if self.refit:
            parts.append(f"refit{self.refit}")
        if self.descent:
            parts.append(f"cd{self.descent}")
        if self.init_norm != 2.0:
            parts.append(f"norm{self.init_norm:g}")
        if self.h_power != 1.0:
            parts.append(f"hpow{self.h_power:g}")
        if self.search != "auto":
            parts.append(f"search-{self.search}")
        if self.fp_target:
            parts.append(f"fptarget{self.fp_target:g}")
        if self.magr:
            parts.append("magr" if self.magr_alpha is None else f"magr{self.magr_alpha:g}")
        # Settings that change the result, named only when not the default so that
        # default runs keep their short names.
        if self.damp != DEFAULT_DAMP:
            parts.append(f"damp{self.damp:g}")
        if self.shrink:
            parts.append(f"shrink{self.shrink}" if self.shrink == "auto" else f"shrink{self.shrink:g}")
        if self.seed != 0:
            parts.append(f"seed{self.seed}")
        if self.moe_prior_tokens != DEFAULT_MOE_PRIOR_TOKENS:
            parts.append(f"moeprior{self.moe_prior_tokens}")
        return parts


@dataclass(kw_only=True)
class RunConfig(QuantConfig):
    """A ``neuqi quantize`` run: the options, the model, and where the run goes."""

    model: str
    dtype: str = "auto"  # auto: bfloat16 on CUDA, float32 on CPU
    device: str = "auto"
    out_dir: str = "runs"
    model_name: str | None = None
    eval_sets: list[str] = field(default_factory=list)
    eval_seqlen: int = 2048
    eval_windows: int | None = None
    low_memory: bool = False  # read one layer at a time from safetensors shards
    overwrite: bool = False  # replace an existing run of the same name (or drop a saved state)
    save_state: bool = True  # save each finished layer, so an interrupted run can resume
    resume: bool = False  # continue an interrupted run from its saved state

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.model_name is None:
            self.model_name = short_model_name(self.model)

    @property
    def run_name(self) -> str:
        parts = [self.model_name or "model", *self.name_parts()]
        dtype = self.torch_dtype()
        if dtype != torch.float32:  # "auto" is bfloat16 on CUDA: a different result
            parts.append({torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, str(dtype)))
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
