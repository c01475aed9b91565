"""GGUF export for llama.cpp: our codes and block parameters, written as the type stores them.

A run quantized with ``--gguf TYPE`` holds, per block (or k-quant sub-block), exactly
the step and offset the type stores, and the codes LDLQ chose on that grid; this
writer only lays them out in ggml's blocks, each linear at its own type
(``quantization_config.gguf_types``: overrides and row-length fallbacks).
Everything llama.cpp needs besides the linears (architecture metadata, tokenizer,
norms) comes from a *source* GGUF of the same model: the file the model was read
from, or one that llama.cpp's own ``convert_hf_to_gguf.py`` wrote.  Embeddings and an
untied output head are quantized by the ``gguf`` package's reference quantizer at a
type the caller chooses (Q8_0 by default: llama-quantize's own pick for these tensors
at the block-32 types when their rows do not fit a k-quant, as with SmolLM2's 576 and
Qwen2.5-0.5B's 896).

The file is written next to its destination, read back with the ``gguf`` package's
reader and dequantizer (written by llama.cpp's authors) and compared with our
de-quantized weights bit for bit, and only then renamed into place.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from neuqi.formats.export.source import LinearCodes, read_source
from neuqi.formats.gguf_blocks import pack_blocks, pack_kquant_blocks
from neuqi.io_utils import atomic_path
from neuqi.quant.gguf_presets import dense_type, is_preset, preset
from neuqi.quant.gguf_types import GGUF_TYPES, GGUFType, block_fields, gguf_params, gguf_type
from neuqi.quant.grid import QuantParams, dequantize, quantize
from neuqi.quant.kquants import KQuantFields, kquant_fields

log = logging.getLogger(__name__)

# Dense tensors (embeddings, output head) may be written at these types: the gguf
# package quantizes the first ones, neuqi's own min-max k-quant parameters the rest.
GGUF_PY_TYPES = ("F32", "F16", "Q8_0", "Q5_1", "Q5_0", "Q4_1", "Q4_0")
DENSE_TYPES = (*GGUF_PY_TYPES, "Q6_K", "Q5_K", "Q4_K", "Q3_K", "Q2_K")
# llama.cpp's converter permutes the rows of these projections for these
# architectures (rotary halves interleaved); transformers undoes it on load.
PERMUTED_ROWS: dict[str, dict[str, str]] = {
    "llama": {"self_attn.q_proj": "num_attention_heads", "self_attn.k_proj": "num_key_value_heads"},
}
# general.file_type (llama_ftype) of a file whose linears are mostly this type.
FILE_TYPES = {"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9,
              "Q2_K": 10, "Q3_K": 12, "Q4_K": 15, "Q5_K": 17, "Q6_K": 18}


def _gguf():
    import gguf

    return gguf


def open_gguf(path: Path | str):
    """``GGUFReader`` for ``path`` with a clear error for a missing, truncated or foreign file."""
    gguf = _gguf()
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file {path} does not exist")
    try:
        return gguf.GGUFReader(path)
    except Exception as exc:  # the reader raises ValueError/struct/IndexError on bad bytes
        raise ValueError(f"{path} is not a readable GGUF file (truncated or not GGUF): {exc}") from None


def source_gguf_for(run_dir: Path) -> Path:
    """The GGUF the run's model was read from (a ``.gguf`` path or a registry model)."""
    meta = run_dir / "neuqi_run.json"
    info = json.loads(meta.read_text()) if meta.exists() else {}
    model = str(info.get("config", {}).get("model", ""))
    from neuqi.data.fetch import MODELS

    if model in MODELS:
        from neuqi.data.cache import cache_dir

        return cache_dir() / "gguf" / MODELS[model].gguf_name
    p = Path(model)
    if p.suffix == ".gguf":
        return p
    if p.is_dir():
        ggufs = sorted(p.glob("*.gguf"))
        if len(ggufs) == 1:
            return ggufs[0]
    raise ValueError(
        f"{run_dir.name} was quantized from {model or 'an unknown model'}, not from a GGUF file: "
        "pass --source-gguf with a GGUF of the same model (llama.cpp's convert_hf_to_gguf.py "
        "writes one: `python -m neuqi.engines.llamacpp convert MODEL_FOLDER OUT.gguf`)"
    )


def _arch_enum(arch: str):
    gguf = _gguf()
    names = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}
    if arch not in names:
        raise ValueError(f"the source GGUF's architecture {arch!r} is unknown to the gguf package")
    return names[arch]


def _field(reader, key: str):
    f = reader.fields.get(key)
    return None if f is None else f.contents()


def row_permutation(model_type: str, name: str, out: int, config: dict) -> Tensor | None:
    """Rows of HF weight ``name`` in the order llama.cpp's converter stores them (or None)."""
    for suffix, key in PERMUTED_ROWS.get(model_type, {}).items():
        if name.endswith(suffix):
            heads = int(config[key])
            return torch.arange(out).reshape(heads, 2, out // heads // 2).transpose(1, 2).reshape(-1)
    return None


def _dense_payload(data: np.ndarray, type_name: str) -> tuple[np.ndarray, object]:
    """An embedding or output head at ``type_name``: the gguf package's quantizer where it
    has one; k-quants (which it only decodes) from llama.cpp's reference (min-max)
    parameters and round-to-nearest codes."""
    gguf = _gguf()
    qtype = gguf.GGMLQuantizationType[type_name]
    if type_name in GGUF_PY_TYPES:
        return gguf.quants.quantize(data.astype(np.float32), qtype), qtype
    t = gguf_type(type_name)
    w = torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32))
    params = gguf_params(w, t, "minmax")
    lin = LinearCodes(quantize(w, params, t.spec), params.scale, params.zero, None, t.block, params.offset)
    return linear_payload(lin, t, None)[0], qtype


def linear_payload(lin: LinearCodes, t: GGUFType, perm: Tensor | None) -> tuple[np.ndarray, Tensor]:
    """Blocks of one quantized linear, rows in GGUF order; also our de-quantized weight."""
    if lin.offset is None:
        raise ValueError(f"a linear of this run has no block offsets: quantize with --gguf {t.name}")
    params = QuantParams(lin.scale.float(), lin.zero.float(), lin.offset.float())
    w_hat = dequantize(lin.codes, params, t.spec)
    if t.is_kquant:
        fields = kquant_fields(params, t)
        flip = fields.flip
    else:
        d, m, flip = block_fields(params, t)
    codes = lin.codes
    if flip is not None and bool(flip.any()):
        fl = flip.repeat_interleave(t.block, dim=1)
        codes = torch.where(fl, t.maxq - codes.to(torch.int16), codes.to(torch.int16)).to(torch.uint8)
    if t.is_kquant:
        if perm is not None:  # whole rows move: super-blocks stay within their row
            codes, w_hat = codes[perm], w_hat[perm]
            fields = KQuantFields(*(getattr(fields, f.name)[perm] for f in dataclasses.fields(fields)))
        return pack_kquant_blocks(codes, fields, t), w_hat
    if perm is not None:
        codes, d, w_hat = codes[perm], d[perm], w_hat[perm]
        m = None if m is None else m[perm]
    return pack_blocks(codes, d, m, t), w_hat


def _check_mapping(name: str, ours: Tensor, src_tensor, what: str) -> None:
    """Our weight (quantized, rows in GGUF order) must resemble the source's tensor."""
    gguf = _gguf()
    ref = torch.from_numpy(np.asarray(gguf.quants.dequantize(src_tensor.data, src_tensor.tensor_type)))
    ref = ref.reshape(ours.shape).float()
    rel = float((ours - ref).pow(2).sum() / ref.pow(2).sum().clamp_min(1e-30))
    if rel > 0.25:
        raise ValueError(f"{name} does not match the source GGUF's {what} (relative error {rel:.2f}): "
                         "the source is not the same model, or its row layout is unknown to neuqi")


def export_gguf(
    run_dir: Path | str,
    out: Path | str,
    embed_type: str | None = None,
    output_type: str | None = None,
    source: Path | str | None = None,
    check: bool = True,
) -> dict:
    """Write ``run_dir`` (quantized with ``--gguf``) as one GGUF file at ``out``.

    ``embed_type`` defaults to Q8_0, or for a run made with a llama.cpp mix
    (``--gguf Q4_K_M``) to the mix's own choice (as is ``output_type``)."""
    gguf = _gguf()
    run_dir, out = Path(run_dir), Path(out)
    mix = _run_mix(run_dir)
    if mix is not None and embed_type is None:
        embed_type, output_type = mix.embedding, output_type or mix.output
    embed_type = embed_type or "Q8_0"
    for what, ty in (("embedding", embed_type), ("output", output_type or embed_type)):
        if ty.upper() not in DENSE_TYPES:
            raise ValueError(f"--{what}-type must be one of {', '.join(DENSE_TYPES)}, got {ty!r}")
    embed_type = embed_type.upper()
    output_type = (output_type or embed_type).upper()
    src = read_source(run_dir)
    qc = json.loads((run_dir / "config.json").read_text())["quantization_config"]
    if src.zero_point != "offset" or "gguf_type" not in qc:
        raise ValueError(f"{run_dir.name} was not quantized for a GGUF type (its zero-points are "
                         f"{src.zero_point}); quantize it with --gguf TYPE ({', '.join(GGUF_TYPES)})")
    t = gguf_type(qc["gguf_type"])
    types = {n: gguf_type(ty) for n, ty in qc.get("gguf_types", {}).items()}
    source = Path(source) if source is not None else source_gguf_for(run_dir)
    reader = open_gguf(source)
    arch = str(_field(reader, "general.architecture"))
    n_layers = int(src.config["num_hidden_layers"])
    name_map = gguf.get_tensor_name_map(_arch_enum(arch), n_layers)
    src_tensors = {tt.name: tt for tt in reader.tensors}
    model_type = src.config.get("model_type", arch)

    payloads: dict[str, tuple[np.ndarray, object]] = {}
    expected: dict[str, Tensor] = {}  # GGUF name -> float weights the file must decode to
    linear_types: Counter[str] = Counter()  # linears per type
    for name, lin in src.linears.items():
        gname = name_map.get_name(name + ".weight", try_suffixes=(".weight",))
        if gname is None or gname not in src_tensors:
            raise ValueError(f"{name} has no tensor in the source GGUF ({source.name})")
        perm = row_permutation(model_type, name, lin.shape[0], src.config)
        lt = types.get(name, t)
        data, w_hat = linear_payload(lin, lt, perm)
        if ".0." in name:
            _check_mapping(name, w_hat, src_tensors[gname], gname)
        payloads[gname] = (data, gguf.GGMLQuantizationType[lt.name])
        linear_types[lt.name] += 1
        expected[gname] = w_hat
        if lin.bias is not None:
            b = lin.bias if perm is None else lin.bias[perm]
            payloads[gname.replace(".weight", ".bias")] = (b.numpy().astype(np.float32), None)
    for key, value in src.dense.items():
        gname = name_map.get_name(key, try_suffixes=(".weight", ".bias"))
        if gname is None or gname not in src_tensors:
            raise ValueError(f"{key} has no tensor in the source GGUF ({source.name})")
        arr = value.float().numpy()
        if gname == "token_embd.weight" or gname == "output.weight":
            ty = embed_type if gname == "token_embd.weight" else output_type
            payloads[gname] = _dense_payload(arr, ty)
        else:
            payloads[gname] = (arr.astype(np.float32), None)
    missing = sorted(set(src_tensors) - set(payloads))
    for gname in missing:  # e.g. rope_freqs: carried over unchanged
        tt = src_tensors[gname]
        payloads[gname] = (np.asarray(tt.data), tt.tensor_type)

    file_type = FILE_TYPES[t.name] if mix is None else mix.ftype
    with atomic_path(out) as tmp:
        _write(reader, arch, [tt.name for tt in reader.tensors], payloads, file_type, tmp)
        result = verify_gguf(tmp, expected) if check else {"ok": None, "skipped": "--no-verify"}
        if check and not result["ok"]:
            raise RuntimeError(f"the GGUF export failed verification; nothing written: {result}")
    result.update(export=str(out), type=t.name if mix is None else mix.name,
                  linear_types=dict(sorted(linear_types.items())),
                  embedding_type=embed_type, output_type=output_type, source_gguf=str(source),
                  bytes=out.stat().st_size)
    return result


@dataclasses.dataclass(frozen=True)
class _Mix:
    name: str
    ftype: int
    embedding: str
    output: str


def _run_mix(run_dir: Path) -> _Mix | None:
    """The llama.cpp mix a run was quantized for (``--gguf Q4_K_M``): the checkpoint's
    ``quantization_config.gguf_mix``, or (runs written before it was recorded there)
    the ``gguf`` option in the run's result.json."""
    model = json.loads((run_dir / "config.json").read_text())
    name = model.get("quantization_config", {}).get("gguf_mix")
    if name is None:
        try:
            name = json.loads((run_dir / "result.json").read_text())["config"].get("gguf")
        except (OSError, KeyError, json.JSONDecodeError):
            return None
    if not name or not is_preset(name):
        return None
    p = preset(name)
    tied = bool(model.get("tie_word_embeddings", False))
    n = int(model["hidden_size"])
    return _Mix(p.name, p.ftype, dense_type(p, n, "embedding", tied), dense_type(p, n, "output", tied))


def _write(reader, arch: str, order: list[str], payloads: dict, file_type: int, path: Path) -> None:
    gguf = _gguf()
    writer = gguf.GGUFWriter(path, arch)
    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue
        if field.name == gguf.Keys.General.FILE_TYPE:
            writer.add_uint32(field.name, file_type)
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), vtype, sub_type=sub)
    for gname in order + sorted(set(payloads) - set(order)):
        data, qtype = payloads[gname]
        writer.add_tensor(gname, data, raw_dtype=qtype)
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()


def verify_gguf(path: Path, expected: dict[str, Tensor]) -> dict:
    """Decode every quantized linear with the ``gguf`` package; it must equal ours exactly."""
    gguf = _gguf()
    reader = open_gguf(path)
    tensors = {tt.name: tt for tt in reader.tensors}
    worst, bad = 0.0, []
    for gname, w_hat in expected.items():
        tt = tensors.get(gname)
        if tt is None:
            bad.append(f"{gname} missing")
            continue
        dec = torch.from_numpy(np.asarray(gguf.quants.dequantize(tt.data, tt.tensor_type), dtype=np.float32))
        if tuple(dec.shape) != tuple(w_hat.shape):
            bad.append(f"{gname} shape {tuple(dec.shape)} != {tuple(w_hat.shape)}")
            continue
        diff = float((dec - w_hat).abs().max())
        worst = max(worst, diff)
        if diff != 0.0:
            bad.append(f"{gname} max |Δ| {diff:.3g}")
    return {"ok": not bad, "bit_exact": not bad, "linears": len(expected), "max_abs_diff": worst,
            "tensors": len(tensors), "errors": bad[:5]}


def write_dense_gguf(model_folder: Path, source: Path, out: Path, dtype: str = "F32") -> Path:
    """The FP model (a float folder) as a GGUF with the source's metadata: the common
    input of llama-quantize and our comparisons ("same FP GGUF in")."""
    from safetensors.torch import load_file

    gguf = _gguf()
    reader = open_gguf(source)
    arch = str(_field(reader, "general.architecture"))
    config = json.loads((model_folder / "config.json").read_text())
    name_map = gguf.get_tensor_name_map(_arch_enum(arch), int(config["num_hidden_layers"]))
    state: dict[str, Tensor] = {}
    for f in sorted(model_folder.glob("*.safetensors")):
        state.update(load_file(f))
    src_tensors = {tt.name for tt in reader.tensors}
    payloads = {}
    for key, value in state.items():
        if key == "lm_head.weight" and config.get("tie_word_embeddings"):
            continue
        gname = name_map.get_name(key, try_suffixes=(".weight", ".bias"))
        if gname is None or gname not in src_tensors:
            raise ValueError(f"{key} has no tensor in the source GGUF ({source.name})")
        w = value.float()
        perm = row_permutation(config.get("model_type", arch), key.rsplit(".", 1)[0], w.shape[0], config)
        if perm is not None:
            w = w[perm]
        ty = dtype if w.dim() == 2 else "F32"
        payloads[gname] = (w.numpy().astype(np.float16 if ty == "F16" else np.float32), None)
    for tt in reader.tensors:
        payloads.setdefault(tt.name, (np.asarray(tt.data), tt.tensor_type))
    with atomic_path(out) as tmp:
        _write(reader, arch, [tt.name for tt in reader.tensors], payloads, FILE_TYPES[dtype], tmp)
        open_gguf(tmp)
    return out

