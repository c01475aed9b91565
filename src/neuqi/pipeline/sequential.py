"""Sequential calibration ("seq" mode): one decoder layer at a time.

Inputs of layer 0, and what the model passes every layer besides (masks, rotary
embeddings, which can differ from layer to layer), are captured once; for each
layer every group of linears that shares an input ({q,k,v} → {o} → {gate,up} →
{down}) gets one ``H = mean(x xᵀ)``, computed with the earlier groups of the
layer already quantized; the layer's quantized output becomes the next layer's
input.  Only the layer being processed sits on the work device.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from neuqi.formats.checkpoint import QuantizedLinear
from neuqi.formats.packing import unpack_weight
from neuqi.memory import release_freed_memory
from neuqi.models.adapters import Adapter, decoder_layers
from neuqi.pipeline.config import QuantConfig
from neuqi.pipeline.replay import SettledReplay
from neuqi.pipeline.resume import ResumeState
from neuqi.quant import dequantize, gptq_quantize
from neuqi.quant.gguf_types import GGUFType, type_for_row
from neuqi.quant.grid import QuantSpec
from neuqi.quant.target import fp_target_weight

log = logging.getLogger(__name__)


class _StopForward(Exception):
    """Raised from a hook once it has what it needs; the rest of the forward is skipped."""


@dataclass
class Batch:
    hidden: Tensor  # [b, seqlen, hidden] on the work device
    kwargs: dict  # what the model passes the current decoder layer (masks, rotary embeddings)
    # What the model's own forward passes each decoder layer, by index: models with
    # per-layer attention (Gemma 3's sliding/full layers, Qwen's sliding windows)
    # give layers different masks and rotary embeddings.
    layer_kwargs: list[dict] | None = None

    def at_layer(self, i: int) -> Batch:
        """This batch as decoder layer ``i`` receives it."""
        if self.layer_kwargs is None:
            return self
        return Batch(self.hidden, self.layer_kwargs[i], self.layer_kwargs)


def _layer_kwargs(kwargs: dict) -> dict:
    kw = {k: v for k, v in kwargs.items() if k not in ("hidden_states", "past_key_values")}
    kw["use_cache"] = False
    return kw


@torch.no_grad()
def capture_layer_inputs(
    model: nn.Module, adapter: Adapter, windows: Tensor, batch_size: int, device: torch.device,
    home: torch.device | str = "cpu",
) -> list[Batch]:
    """Run the model's own forward on every calibration batch with every decoder
    layer stood in for by a recorder: layer 0's hidden states and the keyword
    arguments (masks, rotary embeddings) of every layer, exactly as the model
    builds them.

    The recorders return their input unchanged, so no layer computes anything and
    the layers' weights may stay wherever they are; the forward stops at the last
    one.  Only the embeddings and the rotary module visit ``device`` and go back
    to ``home``, where the model lives.
    """
    layers = decoder_layers(model, adapter)
    moved = [model.get_submodule(adapter.embed)]
    if adapter.rotary:
        moved.append(model.get_submodule(adapter.rotary))
    for m in moved:
        m.to(device)
    caught: list[Batch] = []
    current: list[dict] = []

    def recorder(i: int):
        def forward(*args, **kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            kw = _layer_kwargs(kwargs)
            if i == 0:
                caught.append(Batch(hidden.detach(), kw, current))
            current.append(kw)
            if i == len(layers) - 1:
                raise _StopForward
            return hidden
        return forward

    for i, layer in enumerate(layers):
        layer.forward = recorder(i)  # instance attribute: shadows the class's forward
    try:
        for i in range(0, windows.shape[0], batch_size):
            current = []
            n = len(caught)
            with contextlib.suppress(_StopForward):
                model(windows[i : i + batch_size].to(device), use_cache=False)
            if len(caught) != n + 1 or len(current) != len(layers):
                raise RuntimeError(
                    f"the model's forward called {len(current)} of its {len(layers)} decoder "
                    f"layers; neuqi's adapter for {type(model).__name__} does not match it")
    finally:
        for layer in layers:
            del layer.forward
        for m in moved:
            m.to(home)
    return caught


class HessianAccumulator:
    """``H = Σ x xᵀ / tokens`` over the inputs a linear sees (float64 accumulation);
    with :meth:`add_pair` the cross moment ``C = Σ a bᵀ / tokens`` of two inputs seen
    token by token (``--fp-target``'s ``E[x_fp x_qᵀ]``).

    With ``folds`` the odd calibration windows are also summed apart, so that
    :meth:`folds` gives the H of the even and of the odd half (``--shrink auto`` scores
    on the half its solve did not see); :meth:`mean` is still the H of all of them."""

    def __init__(self, n: int, device: torch.device, folds: bool = False) -> None:
        self.H = torch.zeros(n, n, dtype=torch.float64, device=device)
        self.tokens = 0
        self.odd = torch.zeros_like(self.H) if folds else None
        self.odd_tokens = 0
        self.windows = 0

    def add(self, x: Tensor) -> None:
        """``x: [..., tokens, in]``: every leading index is one calibration window."""
        if self.odd is None:
            self.add_pair(x, x)
            return
        for window in x.reshape(-1, *x.shape[-2:]).unbind(0):
            xf = window.float()
            xx = (xf.t() @ xf).double()
            self.H += xx
            self.tokens += xf.shape[0]
            if self.windows % 2:
                self.odd += xx
                self.odd_tokens += xf.shape[0]
            self.windows += 1

    def add_pair(self, a: Tensor, b: Tensor) -> None:
        if self.odd is not None:
            raise RuntimeError("a cross moment is accumulated without folds")
        a = a.reshape(-1, a.shape[-1]).float()
        b = b.reshape(-1, b.shape[-1]).float()
        self.H += (a.t() @ b).double()
        self.tokens += b.shape[0]

    def mean(self) -> Tensor:
        if self.tokens == 0:
            raise RuntimeError("no calibration tokens reached this layer")
        return self.H / self.tokens

    def folds(self) -> tuple[Tensor, Tensor]:
        """The float32 H of the even and of the odd windows."""
        if self.odd is None:
            raise RuntimeError("this accumulator was not asked to keep folds")
        if self.windows < 2:
            raise ValueError("--shrink auto holds out half the calibration windows: it needs at least "
                             "2 windows (--nsamples)")
        even = (self.H - self.odd) / (self.tokens - self.odd_tokens)
        return even.float(), (self.odd / self.odd_tokens).float()


@torch.no_grad()
def forward_until(layer: nn.Module, module: nn.Module, batches: list[Batch],
                  record: Callable[[tuple, dict], None]) -> None:
    """Forward each batch through ``layer`` only as far as ``module``, handing the
    ``(args, kwargs)`` it would have been called with to ``record``."""

    def hook(_module, args, kwargs):
        record(args, kwargs)
        raise _StopForward

    handle = module.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for b in batches:
            with contextlib.suppress(_StopForward):
                layer(b.hidden, **b.kwargs)
    finally:
        handle.remove()


@torch.no_grad()
def group_hessian(layer: nn.Module, first_linear: nn.Linear, batches: list[Batch]) -> Tensor:
    """Forward the batches through ``layer`` only as far as ``first_linear``'s input."""
    return group_statistics(layer, first_linear, batches, None)[0]


@torch.no_grad()
def group_statistics(
    layer: nn.Module, first_linear: nn.Linear, batches: list[Batch], fp_inputs: list[Tensor] | None,
    folds: bool = False,
) -> tuple[Tensor, Tensor | None, tuple[Tensor, Tensor] | None]:
    """``(H, C, folds)`` of a group's input: H of the input; given the FP model's inputs
    to the same linear batch by batch (``fp_inputs``), ``C = E[x_fp x_qᵀ]``; with
    ``folds``, the H of the even and of the odd windows (:class:`HessianAccumulator`)."""
    device = batches[0].hidden.device
    acc = HessianAccumulator(first_linear.in_features, device, folds=folds)
    cross = None if fp_inputs is None else HessianAccumulator(first_linear.in_features, device)
    fp = iter(fp_inputs or ())

    def record(args, kwargs) -> None:
        acc.add(args[0])
        if cross is not None:
            cross.add_pair(next(fp), args[0])

    forward_until(layer, first_linear, batches, record)
    return acc.mean(), None if cross is None else cross.mean(), acc.folds() if folds else None


@torch.no_grad()
def fp_layer_pass(layer: nn.Module, firsts: list[nn.Module], batches: list[Batch]
                  ) -> tuple[list[list[Tensor]], list[Batch]]:
    """The FP layer (not yet quantized) on the FP model's own hidden states: the input
    of every linear in ``firsts``, batch by batch, and the layer's outputs."""
    seen: list[list[Tensor]] = [[] for _ in firsts]

    def keep(k: int):
        def hook(_module, args):
            seen[k].append(args[0].detach().float().clone())
        return hook

    handles = [m.register_forward_pre_hook(keep(k)) for k, m in enumerate(firsts)]
    try:
        out = layer_outputs(layer, batches)
    finally:
        for h in handles:
            h.remove()
    return seen, out


@torch.no_grad()
def layer_outputs(layer: nn.Module, batches: list[Batch]) -> list[Batch]:
    out = []
    for b in batches:
        h = layer(b.hidden, **b.kwargs)
        h = h[0] if isinstance(h, tuple) else h
        out.append(Batch(h, b.kwargs, b.layer_kwargs))
    return out


def linear_format(
    in_features: int, opts: QuantConfig, name: str
) -> tuple[QuantSpec, GGUFType | None, GGUFType | None]:
    """``(spec, GGUF type, requested GGUF type)`` of linear ``name``: ``--gguf-tensor``
    picks the type, rows a type cannot take fall back."""
    want = opts.requested_gguf_type(name)
    gguf = None if want is None else type_for_row(want, in_features)
    return (opts.spec if gguf is None else gguf.spec), gguf, want


def quantize_linear(
    lin: nn.Linear, H: Tensor, opts: QuantConfig, name: str = "", cross: Tensor | None = None,
    folds: tuple[Tensor, Tensor] | None = None, shrink_start: float | None = None,
) -> tuple[QuantizedLinear, dict]:
    """Quantize one linear in place (its weight becomes the de-quantized one).

    ``name`` picks the linear's GGUF type (``--gguf-tensor``, the row-length fallback);
    ``cross`` (``--fp-target``) is ``E[x_fp x_qᵀ]`` of its input; ``folds``
    (``--shrink auto``) the H of two halves of the calibration windows, and
    ``shrink_start`` where the search for the shrink starts.
    """
    return quantize_weight(lin.weight.data, lin.bias, H, opts, name, cross=cross, folds=folds,
                           shrink_start=shrink_start)


def quantize_weight(
    weight: Tensor, bias: Tensor | None, H: Tensor, opts: QuantConfig, name: str = "",
    expert_of: str | None = None, cross: Tensor | None = None, folds: tuple[Tensor, Tensor] | None = None,
    shrink_start: float | None = None,
) -> tuple[QuantizedLinear, dict]:
    """Quantize ``weight: [out, in]`` (a linear's, or one expert's slice of a fused
    3-D parameter) in place and return its record and stats.  Given ``cross``, the
    solver's target is :func:`fp_target_weight`, not the weight itself."""
    spec, gguf, want = linear_format(weight.shape[1], opts, name)
    if gguf is not want:
        log.info("%s: rows of %d do not fit %s; quantized as %s", name, weight.shape[1], want.name, gguf.name)
    target = weight.float()
    if cross is not None:
        target = fp_target_weight(target, H, cross, opts.damp, opts.fp_target)
    res = gptq_quantize(
        target,
        H,
        spec,
        init=opts.init,  # type: ignore[arg-type]
        algorithm=opts.method,  # type: ignore[arg-type]
        act_order=opts.act_order,
        damp=opts.damp,
        magr=opts.magr,
        magr_alpha=opts.magr_alpha,
        max_clip=opts.max_clip,
        param_dtype=torch.float16,
        gguf=gguf,
        also_inits=opts.also_inits,
        refit=opts.refit,
        descent=opts.descent,
        shrink=opts.shrink,
        folds=folds,
        shrink_start=shrink_start,
        h_power=opts.h_power,
        init_norm=opts.init_norm,
        search=opts.neuqi_search,
    )
    w_hat = dequantize(res.codes, res.params, spec)
    weight.copy_(w_hat.to(weight.dtype))
    bias = bias.detach().cpu().clone() if bias is not None else None
    record = QuantizedLinear.from_codes(res.codes, res.params.to("cpu"), spec.bits, bias,
                                        gguf_type=None if gguf is None else gguf.name, expert_of=expert_of)
    if gguf is not None:
        res.stats["gguf_type"] = gguf.name
        if gguf is not want:
            res.stats["gguf_fallback_from"] = want.name
    return record, res.stats


@torch.no_grad()
def restore_layer(layer: nn.Module, prefix: str, records: dict[str, QuantizedLinear],
                  opts: QuantConfig) -> None:
    """Give a layer finished by an earlier, interrupted run its de-quantized weights."""
    for full, q in records.items():
        if not full.startswith(prefix):
            continue
        spec, _, _ = linear_format(q.in_features, opts, full)
        w = dequantize(unpack_weight(q.qweight, q.bits, q.in_features), q.params, spec)
        if q.expert_of is None:
            target = layer.get_submodule(full[len(prefix):]).weight.data
        else:  # one expert's slice of a fused 3-D parameter
            module, _, param = q.expert_of[len(prefix):].rpartition(".")
            target = getattr(layer.get_submodule(module), param).data[int(full.rsplit(".", 1)[1])]
        target.copy_(w.to(target.dtype))


@torch.no_grad()
def quantize_layers(
    model: nn.Module,
    adapter: Adapter,
    batches: list[Batch],
    opts: QuantConfig,
    device: torch.device,
    on_layer: Callable[[int, int, dict], None] | None = None,
    before_layer: Callable[[int, nn.Module], None] | None = None,
    after_layer: Callable[[int, nn.Module], None] | None = None,
    home: torch.device | str = "cpu",
    resume: ResumeState | None = None,
) -> tuple[dict[str, QuantizedLinear], list[dict]]:
    """Quantize every decoder layer in order; returns the records and per-linear stats.

    Each layer visits ``device`` and goes back to ``home``, where the model lives.
    ``before_layer`` / ``after_layer`` let a caller read a layer from disk just in
    time and release it afterwards (see ``neuqi.models.lazy``). ``resume`` saves
    each finished layer, and its layers already done are restored, not redone.
    """
    layers = decoder_layers(model, adapter)
    records: dict[str, QuantizedLinear] = {}
    stats: list[dict] = []
    # --fp-target: the FP model's own hidden states, carried beside the quantized ones
    # (layer 0's inputs are the same in both models)
    fp_batches = batches if opts.fp_target else None
    shrink_starts: dict[str, float] = {}  # --shrink auto: each linear's last choice, by its name in a layer
    has_experts = any(adapter.layer_experts(layer) is not None for layer in layers)
    if fp_batches is not None and has_experts:
        raise ValueError("--fp-target applies to dense decoder layers; this model's layers have "
                         "experts: drop --fp-target")
    if opts.shrink == "auto" and has_experts:
        raise ValueError("--shrink auto holds out calibration windows per linear, which a routed "
                         "expert's few tokens cannot spare; this model's layers have experts: "
                         "give --shrink A in [0, 1)")
    start = 0 if resume is None else resume.layers_done
    if start:
        records.update(resume.records)
        stats += resume.stats
        for i in range(start):
            if before_layer is not None:
                before_layer(i, layers[i])
            if fp_batches is not None:  # the FP states are not saved: the FP layer recomputes them
                fp_batches = layer_outputs(layers[i].to(device), [b.at_layer(i) for b in fp_batches])
                layers[i].to(home)
            restore_layer(layers[i], f"{adapter.layers}.{i}.", records, opts)
            if after_layer is not None:
                after_layer(i, layers[i])
        saved = resume.hidden(len(batches))
        batches = [Batch(h.to(b.hidden.device), b.kwargs, b.layer_kwargs)
                   for h, b in zip(saved, batches, strict=True)]
    for i, layer in enumerate(layers):
        if i < start:
            continue
        t0 = time.perf_counter()
        batches = [b.at_layer(i) for b in batches]
        if before_layer is not None:
            before_layer(i, layer)
        layer.to(device)
        names = adapter.layer_groups(layer)
        groups = [[layer.get_submodule(name) for name in group] for group in names]
        experts = adapter.layer_experts(layer)
        fp_inputs: list[list[Tensor] | None] = [None] * len(groups)
        if fp_batches is not None:
            fp_inputs, fp_batches = fp_layer_pass(layer, [g[0] for g in groups],
                                                  [b.at_layer(i) for b in fp_batches])
        # the attention, once its linears are quantized, is replayed in the later passes
        replay = SettledReplay(layer, [lin for linears in groups for lin in linears], experts)
        with replay.active():
            for k, (group, linears) in enumerate(zip(names, groups, strict=True)):
                H, C, folds = group_statistics(layer, linears[0], batches, fp_inputs[k],
                                               folds=opts.shrink == "auto")
                fp_inputs[k] = None  # freed as soon as C holds what it needs
                for name, lin in zip(group, linears, strict=True):
                    full = f"{adapter.layers}.{i}.{name}"
                    record, st = quantize_linear(lin, H, opts, full, cross=C, folds=folds,
                                                 shrink_start=shrink_starts.get(name))
                    if "shrink_fold" in st:  # the next layer's same linear starts there
                        shrink_starts[name] = st["shrink_fold"]
                    records[full] = record
                    st.update(name=full, shape=list(lin.weight.shape))
                    stats.append(st)
                replay.done(linears)
                del H, C, folds
            if experts is not None:
                from neuqi.pipeline.moe import quantize_experts

                ex_records, ex_stats = quantize_experts(layer, experts, adapter.experts, batches, opts,
                                                        f"{adapter.layers}.{i}.{adapter.experts.path}")
                records.update(ex_records)
                stats += ex_stats
                replay.done([experts])
            replay.last_pass()
            batches = layer_outputs(layer, batches)
        layer.to(home)
        if after_layer is not None:
            after_layer(i, layer)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        release_freed_memory()
        prefix = f"{adapter.layers}.{i}."
        layer_stats = [s for s in stats if s["name"].startswith(prefix)]
        seconds = time.perf_counter() - t0
        if resume is not None:
            resume.save_layer(i, len(layers), {k: v for k, v in records.items() if k.startswith(prefix)},
                              layer_stats, [b.hidden for b in batches], seconds)
        summary = {
            "layer": i,
            "seconds": seconds,
            "quant_loss": sum(s["quant_loss"] for s in layer_stats),
        }
        log.debug("layer %d: %.2fs, loss %.4g", i, summary["seconds"], summary["quant_loss"])
        if on_layer is not None:
            on_layer(i, len(layers), summary)
    return records, stats


@torch.no_grad()
def block_hessians(
    model: nn.Module, adapter: Adapter, windows: Tensor, index: int, batch_size: int = 4,
    device: torch.device | str = "cpu",
) -> list[tuple[str, Tensor, Tensor]]:
    """``(name, W, H)`` for every linear of FP decoder block ``index`` (benchmarks, tests).

    The calibration windows run through the FP blocks before it; each linear gets
    the H of its input group, as the pipeline would compute it.
    """
    device = torch.device(device)
    batches = capture_layer_inputs(model, adapter, windows, batch_size, device)
    layers = decoder_layers(model, adapter)
    for i, layer in enumerate(layers[:index]):
        batches = layer_outputs(layer.to(device), [b.at_layer(i) for b in batches])
        layer.to("cpu")
    batches = [b.at_layer(index) for b in batches]
    layer = layers[index].to(device)
    out = []
    for group in adapter.layer_groups(layer):
        H = group_hessian(layer, layer.get_submodule(group[0]), batches)
        out += [(n, layer.get_submodule(n).weight.detach().float().clone(), H) for n in group]
    layer.to("cpu")
    return out
