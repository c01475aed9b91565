"""Exports of a finished run to the formats inference engines load.

``export_run`` writes the export into a temporary folder, verifies it (reference reader
+ consumer library) and only then renames it into place.
"""

from __future__ import annotations

import json
from pathlib import Path

from neuqi.formats.export import compressed_tensors, gptq, hqq
from neuqi.formats.export.source import DTYPES, read_source
from neuqi.formats.export.verify import verify
from neuqi.io_utils import atomic_dir

FORMATS = ("compressed-tensors", "gptq", "hqq", "gguf")


def export_run(
    run_dir: Path | str,
    fmt: str,
    out: Path | str,
    dtype: str = "float16",
    checkpoint_format: str = "gptq_v2",
    check: bool = True,
    gguf_options: dict | None = None,
) -> dict:
    """Export ``run_dir`` to ``out`` in ``fmt``; returns the verification record.

    ``gguf`` writes one file (``out``); ``gguf_options`` passes ``embed_type``,
    ``output_type`` and ``source`` to :func:`neuqi.formats.export.gguf.export_gguf`.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if fmt == "gguf":
        from neuqi.formats.export.gguf import export_gguf

        return export_gguf(run_dir, out, check=check, **(gguf_options or {}))
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    src = read_source(run_dir)
    if src.zero_point == "offset":
        raise ValueError(f"{Path(run_dir).name} was quantized for a GGUF block type (its parameters are "
                         "the type's step and offset per block of 32): export it with --format gguf")
    dt = DTYPES[dtype]
    out = Path(out)
    with atomic_dir(out) as tmp:
        if fmt == "compressed-tensors":
            compressed_tensors.write(src, tmp, dt)
        elif fmt == "gptq":
            gptq.write(src, tmp, dt, checkpoint_format)
        else:
            hqq.write(src, tmp, dt)
        result = verify(tmp, run_dir, dtype, src) if check else {"ok": None, "skipped": "--no-verify"}
        result["export"] = str(out)
        if check and not result["ok"]:
            raise RuntimeError(f"the {fmt} export failed verification; nothing written: "
                               + json.dumps(result, default=str))
        (tmp / "neuqi_export.json").write_text(json.dumps({"format": fmt, "source": str(run_dir),
                                                           "verify": result}, indent=2) + "\n")
    return result
