"""Engine-free readers of the exported tensors, written from each format's layout
description rather than from our packers, so an export can be checked bit for bit
without the consumer library (and our packing is checked against an independent
reading)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import load_file


def _bitstream(words: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Values ``0..count-1`` of little-endian ``bits``-bit fields laid end to end in
    ``words`` (uint32, axis 0 runs along the stream; other axes are independent)."""
    w = words.astype(np.uint64)
    out = np.zeros((count, *words.shape[1:]), dtype=np.uint64)
    for i in range(count):
        start = i * bits
        k, off = divmod(start, 32)
        v = w[k] >> np.uint64(off)
        if off + bits > 32:
            v |= w[k + 1] << np.uint64(32 - off)
        out[i] = v & np.uint64((1 << bits) - 1)
    return out.astype(np.int64)


def _stream_rows(packed: np.ndarray, bits: int, n: int) -> np.ndarray:
    """Unpack along axis 0 in independent blocks of 32 values (``bits`` words each)."""
    words = packed.view(np.uint32)
    blocks = words.reshape(-1, bits, *words.shape[1:])
    vals = [_bitstream(b, bits, 32) for b in blocks]
    return np.concatenate(vals, axis=0)[:n]


def gptq(folder: Path) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """``{linear: (codes [out,in], scales [out,G], zeros [out,G])}`` of a GPTQ export."""
    qc = json.loads((folder / "config.json").read_text())["quantization_config"]
    bits, v1 = qc["bits"], qc["checkpoint_format"] == "gptq"
    t = load_file(folder / "model.safetensors")
    res = {}
    for key in t:
        if not key.endswith(".qweight"):
            continue
        name = key.removesuffix(".qweight")
        out_f = t[f"{name}.scales"].shape[1]
        in_f = t[key].shape[0] * 32 // bits
        codes = _stream_rows(t[key], bits, in_f).T  # packed along the input dim
        zeros = _stream_rows(t[f"{name}.qzeros"].T, bits, out_f) + (1 if v1 else 0)  # [out, G]
        g_idx = t[f"{name}.g_idx"].astype(np.int64)
        scales = t[f"{name}.scales"].T
        if not np.array_equal(g_idx, np.sort(g_idx)):
            raise ValueError(f"{name}: g_idx is not contiguous")
        res[name] = (codes, scales, zeros)
    return res


def compressed_tensors(folder: Path) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Same, for a compressed-tensors ``pack-quantized`` export (codes re-centred to 0..2^b−1)."""
    qc = json.loads((folder / "config.json").read_text())["quantization_config"]
    (group,) = qc["config_groups"].values()
    bits = group["weights"]["num_bits"]
    off = 1 << (bits - 1)
    t = load_file(folder / "model.safetensors")
    res = {}
    for key in t:
        if not key.endswith(".weight_packed"):
            continue
        name = key.removesuffix(".weight_packed")
        out_f, in_f = (int(x) for x in t[f"{name}.weight_shape"])
        scales = t[f"{name}.weight_scale"]  # [out, G]
        # Dense packing: the whole row is one bit stream (32 values per `bits` words).
        codes = _dense_rows(t[key], bits, in_f)
        zeros = _dense_rows(t[f"{name}.weight_zero_point"].T, bits, out_f).T
        res[name] = (codes + off, scales, zeros + off)
    return res


def _dense_rows(packed: np.ndarray, bits: int, n: int) -> np.ndarray:
    """Rows of ``packed`` are independent streams of signed ``bits``-bit values stored
    with an offset of 2^(bits−1); returns the signed values ``[rows, n]``."""
    words = packed.view(np.uint32).T  # stream axis first
    raw = _bitstream(words, bits, n).T
    return raw - (1 << (bits - 1))


def hqq(folder: Path) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Same, for an HQQ export (``qmodel.pt``: one state dict per module)."""
    weights = torch.load(folder / "qmodel.pt", map_location="cpu", weights_only=True)
    res = {}
    for name, sd in weights.items():
        if "W_q" not in sd:
            continue
        bits, g = int(sd["nbits"]), int(sd["group_size"])
        out_f, in_f = (int(x) for x in sd["shape"])
        rows = out_f * in_f // g
        wq = sd["W_q"].numpy()
        if bits == 8:
            flat = wq.astype(np.int64)
        elif bits in (2, 4):  # per = values per byte, first slice in the high bits
            per = 8 // bits
            flat = np.concatenate([(wq.astype(np.int64) >> (8 - bits * (k + 1))) & ((1 << bits) - 1)
                                   for k in range(per)])
        elif bits == 3:  # ten 3-bit slices per int32, first slice at bit 27
            u = wq.view(np.uint32).astype(np.int64)
            flat = np.concatenate([(u >> (27 - 3 * k)) & 7 for k in range(10)])
        else:
            raise ValueError(f"unexpected HQQ bit width {bits}")
        codes = flat[:rows].reshape(out_f, in_f)
        scale = sd["scale"].float().numpy().reshape(out_f, -1)
        zero = sd["zero"].float().numpy().reshape(out_f, -1)
        res[name] = (codes, scale, zero)
    return res


READERS = {"gptq": gptq, "compressed-tensors": compressed_tensors, "hqq": hqq}
