"""llama.cpp's own tools, built from source and driven from Python.

The tools come from the vendored llama.cpp tree inside the PyPI sdist of
``llama-cpp-python`` (the only registry that carries it), built once on the CPU with
cmake and the system compiler into the neuqi cache.  We use them as the engine's
own judge of our GGUF files: ``llama-perplexity`` (perplexity and its KL-divergence
mode), ``llama-quantize`` and ``llama-imatrix`` (the peer we measure against), and
``convert_hf_to_gguf.py`` (a source GGUF for models that did not come from one).

Run ``python -m neuqi.engines.llamacpp build`` (``make test`` does it when the tools
are missing); ``... convert HF_FOLDER OUT.gguf`` writes an F16/F32 GGUF.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from neuqi.io_utils import atomic_path

# The sdist pins the llama.cpp tree (and the gguf-py next to it) we build and test against.
LLAMA_CPP_PYTHON_VERSION = "0.3.36"
TOOLS = ("llama-quantize", "llama-perplexity", "llama-imatrix", "llama-tokenize")


def _cache(cache: Path | str | None = None) -> Path:
    # stdlib-only on purpose: the build runs before (and without) the torch venv
    root = Path(cache or os.environ.get("NEUQI_CACHE") or Path.home() / ".cache" / "neuqi")
    return root.resolve() / "llama.cpp" / LLAMA_CPP_PYTHON_VERSION


def source_dir(cache: Path | str | None = None) -> Path:
    """The vendored llama.cpp tree (holds ``convert_hf_to_gguf.py`` and ``gguf-py``)."""
    return _cache(cache) / "src" / f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}" / "vendor" / "llama.cpp"


def bin_dir(cache: Path | str | None = None) -> Path:
    return _cache(cache) / "build" / "bin"


def is_built(cache: Path | str | None = None) -> bool:
    return (_cache(cache) / "build" / ".complete").exists() and all(
        (bin_dir(cache) / t).is_file() for t in TOOLS
    )


def tool(name: str, cache: Path | str | None = None) -> Path:
    """Path of one llama.cpp tool, or an error that says how to build it."""
    path = bin_dir(cache) / name
    if not path.is_file():
        raise FileNotFoundError(
            f"llama.cpp tool {name} is not built (looked in {path.parent}); build it once with "
            "`python -m neuqi.engines.llamacpp build` (needs cmake and a C++ compiler; "
            "`make test` does this when it is missing)"
        )
    return path


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=True, **kw)


def _fetch_sdist(root: Path) -> Path:
    """Download the llama-cpp-python sdist from PyPI (never a model hub) and unpack it."""
    src = root / "src"
    tree = src / f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}"
    if (tree / "vendor" / "llama.cpp" / "CMakeLists.txt").is_file():
        return tree
    downloads = root / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    name = f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}.tar.gz"
    if not (downloads / name).is_file():
        _run(
            [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
             "-d", str(downloads), f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}"]
        )
    staging = Path(tempfile.mkdtemp(dir=root, prefix=".src-"))
    try:
        with tarfile.open(downloads / name) as tar:
            tar.extractall(staging, filter="data")
        src.mkdir(parents=True, exist_ok=True)
        if tree.exists():
            shutil.rmtree(tree)
        (staging / tree.name).replace(tree)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return tree


def build(cache: Path | str | None = None, jobs: int | None = None) -> Path:
    """Build llama.cpp's CPU tools once; returns the folder that holds them."""
    root = _cache(cache)
    if is_built(cache):
        return bin_dir(cache)
    missing = [t for t in ("cmake", "c++") if shutil.which(t) is None]
    if missing:
        raise RuntimeError(
            f"building llama.cpp needs {' and '.join(missing)} on PATH (e.g. `apt-get install cmake g++`)"
        )
    root.mkdir(parents=True, exist_ok=True)
    _fetch_sdist(root)
    build_dir = root / "build"
    (build_dir / ".complete").unlink(missing_ok=True)
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    _run(
        ["cmake", "-S", str(source_dir(cache)), "-B", str(build_dir), *generator,
         "-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF",
         "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_TESTS=OFF",
         "-DLLAMA_BUILD_EXAMPLES=OFF", "-DBUILD_SHARED_LIBS=OFF"],
        stdout=subprocess.DEVNULL,
    )
    _run(["cmake", "--build", str(build_dir), "-j", str(jobs or os.cpu_count() or 2),
          "--target", *TOOLS])
    (build_dir / ".complete").write_text(LLAMA_CPP_PYTHON_VERSION + "\n")
    return bin_dir(cache)


# ---------------------------------------------------------------- running the tools


# Tools that run a model keep the weights in the plain CPU buffers: on CPUs with AMX
# (seen here on a Xeon with AMX_INT8, GGML_NATIVE build) the AMX buffer type's
# matmul crashes llama-perplexity with SIGSEGV on every quantized file of a model
# with 256-wide rows, llama-quantize's own included.  The plain kernels are the
# ones every other x86 CPU runs.
COMPUTE_FLAGS = ("--no-repack",)


def _threads(threads: int | None) -> str:
    return str(threads or os.cpu_count() or 2)


def _tool_output(cmd: list[str]) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    out = proc.stdout + proc.stderr
    if proc.returncode != 0:
        tail = "\n".join(out.splitlines()[-15:])
        raise RuntimeError(f"{Path(cmd[0]).name} failed (exit {proc.returncode}):\n{tail}")
    return out


@dataclass(frozen=True)
class PerplexityResult:
    """What ``llama-perplexity`` printed; KL fields only in its KL-divergence mode."""

    ppl: float
    ppl_err: float
    chunks: int
    ctx: int
    kl_mean: float | None = None
    kl_err: float | None = None
    same_top1: float | None = None  # % of tokens whose top-1 matches the base model's
    # KL mode: mean ln(PPL(Q)/PPL(base)) over the scored tokens, and its ± (the paired
    # difference's uncertainty, which two files' PPL ± overstate); mean and RMS change of
    # the probability of the text's next token, in percentage points.
    ln_ppl_ratio: float | None = None
    ln_ppl_ratio_err: float | None = None
    mean_dp: float | None = None
    mean_dp_err: float | None = None
    rms_dp: float | None = None
    log: str = ""


def _parse_perplexity(out: str, ctx: int) -> PerplexityResult:
    m = re.search(r"Final estimate: PPL = ([0-9.]+) \+/- ([0-9.]+)", out)
    kl = re.search(r"Mean\s+KLD:\s+([0-9.eE+-]+)\s+±\s+([0-9.eE+-]+)", out)
    top = re.search(r"Same top p:\s+([0-9.]+)\s+±", out)
    chunks = re.search(r"calculating perplexity over (\d+) chunks", out)
    kl_ppl = re.search(r"Mean PPL\(Q\)\s+:\s+([0-9.]+)\s+±\s+([0-9.]+)", out)
    num = r"(-?[0-9.]+(?:[eE][+-]?[0-9]+)?)"
    ratio = re.search(rf"Mean ln\(PPL\(Q\)/PPL\(base\)\)\s+:\s+{num}\s+±\s+{num}", out)
    dp = re.search(rf"Mean\s+Δp:\s+{num}\s+±\s+{num}\s*%", out)
    rms = re.search(rf"RMS Δp\s+:\s+{num}\s+±", out)
    if m is None and kl_ppl is None:
        tail = "\n".join(out.splitlines()[-15:])
        raise RuntimeError(f"llama-perplexity printed no final estimate:\n{tail}")
    ppl, err = (m or kl_ppl).groups()
    return PerplexityResult(
        ppl=float(ppl), ppl_err=float(err), ctx=ctx,
        chunks=int(chunks.group(1)) if chunks else 0,
        kl_mean=float(kl.group(1)) if kl else None, kl_err=float(kl.group(2)) if kl else None,
        same_top1=float(top.group(1)) if top else None,
        ln_ppl_ratio=float(ratio.group(1)) if ratio else None,
        ln_ppl_ratio_err=float(ratio.group(2)) if ratio else None,
        mean_dp=float(dp.group(1)) if dp else None, mean_dp_err=float(dp.group(2)) if dp else None,
        rms_dp=float(rms.group(1)) if rms else None, log=out,
    )


def perplexity(
    model: Path, text: Path, *, ctx: int = 512, chunks: int | None = None, threads: int | None = None,
    kl_base: Path | None = None, save_kl_base: Path | None = None, batch: int | None = None,
) -> PerplexityResult:
    """``llama-perplexity`` on ``text`` (or, with ``kl_base``, KL against a saved base run).

    llama.cpp's protocol: the text's tokens are cut into chunks of ``ctx``, each starts
    with BOS, and only the second half of each chunk is scored.  ``save_kl_base`` also
    writes every scored token's log-probabilities (see :func:`read_kl_base`).
    """
    cmd = [str(tool("llama-perplexity")), "-m", str(model), "-c", str(ctx), "-t", _threads(threads),
           *COMPUTE_FLAGS]
    if batch:
        cmd += ["-b", str(batch)]
    if kl_base is not None:
        cmd += ["--kl-divergence-base", str(kl_base), "--kl-divergence"]
    else:
        cmd += ["-f", str(text)]
        if save_kl_base is not None:
            cmd += ["--kl-divergence-base", str(save_kl_base)]
    if chunks:
        cmd += ["--chunks", str(chunks)]
    return _parse_perplexity(_tool_output(cmd), ctx)


@dataclass(frozen=True)
class KLBase:
    """Tokens and per-token log-softmax that ``llama-perplexity --kl-divergence-base`` saved.

    ``tokens``: [n_chunk, ctx] int32, the text's tokens as llama.cpp cut them (the first
    of each chunk is replaced by BOS when the model adds one).  llama.cpp scores position
    ``i`` (predicting token ``i + 1``) for ``i`` in ``[ctx // 2, ctx - 1)``;
    :meth:`logprobs` decodes those rows from its 16-bit storage.
    """

    tokens: object  # numpy int32 [n_chunk, ctx]; numpy is imported lazily
    packed: object  # numpy uint16 [n_chunk, n_scored, nv]
    ctx: int
    vocab: int

    @property
    def first(self) -> int:
        return self.ctx // 2

    def logprobs(self, chunk: int):
        """float32 [ctx - 1 - ctx // 2, vocab]: ``log p = scale·v + min_log_prob`` per row.

        Values below ``max_logit - 16`` are stored as that floor (llama.cpp's choice).
        """
        import numpy as np

        rows = self.packed[chunk]
        head = np.ascontiguousarray(rows[:, :4]).view(np.float32)  # scale, min_log_prob
        return rows[:, 4 : 4 + self.vocab].astype(np.float32) * head[:, :1] + head[:, 1:2]


def read_kl_base(path: Path) -> KLBase:
    """Decode the file ``llama-perplexity --kl-divergence-base`` writes.

    Layout (llama.cpp's perplexity tool): magic ``_logits_``, i32 ctx, i32 vocab,
    i32 n_chunk, n_chunk·ctx i32 tokens; then per scored token two float32
    (``scale``, ``min_log_prob``) and ``2·ceil(vocab/2)`` u16 values.
    """
    import numpy as np

    raw = Path(path).read_bytes()
    if raw[:8] != b"_logits_":
        raise ValueError(f"{path} is not a llama-perplexity KL-divergence base file")
    ctx, vocab, n_chunk = struct.unpack_from("<iii", raw, 8)
    off = 20
    tokens = np.frombuffer(raw, dtype=np.int32, count=n_chunk * ctx, offset=off).reshape(n_chunk, ctx)
    off += 4 * n_chunk * ctx
    n_scored = ctx - 1 - ctx // 2
    nv = 2 * ((vocab + 1) // 2) + 4
    data = np.frombuffer(raw, dtype=np.uint16, offset=off)
    need = n_chunk * n_scored * nv
    if data.size < need:
        raise ValueError(f"{path} is truncated: {data.size} of {need} 16-bit values")
    return KLBase(tokens=tokens, packed=data[:need].reshape(n_chunk, n_scored, nv), ctx=ctx, vocab=vocab)


def quantize(
    src: Path, dst: Path, type_name: str, *, imatrix: Path | None = None, pure: bool = True,
    embed_type: str | None = None, output_type: str | None = None, threads: int | None = None,
    tensor_types: dict[str, str] | None = None,
) -> str:
    """``llama-quantize`` ``src`` → ``dst`` at ``type_name``; returns its log.

    ``pure`` quantizes every linear at ``type_name`` (no preset mixing); the token
    embedding and output head take ``embed_type``/``output_type`` when given;
    ``tensor_types`` (``{"ffn_down": "Q3_K"}``) sets the type of the tensors whose
    GGUF names match.
    """
    cmd = [str(tool("llama-quantize"))]
    if pure:
        cmd.append("--pure")
    if imatrix is not None:
        cmd += ["--imatrix", str(imatrix)]
    if embed_type:
        cmd += ["--token-embedding-type", embed_type.lower()]
    if output_type:
        cmd += ["--output-tensor-type", output_type.lower()]
    for name, ty in (tensor_types or {}).items():
        cmd += ["--tensor-type", f"{name}={ty.lower()}"]
    with atomic_path(dst) as tmp:
        return _tool_output([*cmd, str(src), str(tmp), type_name, _threads(threads)])


def imatrix(
    model: Path, text: Path, out: Path, *, ctx: int = 512, chunks: int | None = None,
    threads: int | None = None,
) -> str:
    """``llama-imatrix`` on ``text``: the importance matrix llama-quantize weighs errors by."""
    # llama-imatrix picks its output format by the file's extension: keep it
    with atomic_path(out, suffix=f".tmp{out.suffix}") as tmp:
        cmd = [str(tool("llama-imatrix")), "-m", str(model), "-f", str(text), "-o", str(tmp),
               "-c", str(ctx), "-t", _threads(threads), *COMPUTE_FLAGS]
        if chunks:
            cmd += ["--chunks", str(chunks)]
        return _tool_output(cmd)


def tokenize(model: Path, text: str) -> list[int]:
    """llama.cpp's tokenization of ``text`` with ``model``'s vocabulary (no BOS added)."""
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as fh:
        fh.write(text)
    try:
        out = _tool_output([str(tool("llama-tokenize")), "-m", str(model), "-f", fh.name,
                            "--ids", "--no-bos", "--log-disable"])
    finally:
        os.unlink(fh.name)
    line = [ln for ln in out.splitlines() if ln.startswith("[")][-1]
    return [int(t) for t in line.strip("[] \n").split(",") if t.strip()]


def convert(hf_folder: Path, out: Path, outtype: str = "f32") -> Path:
    """A GGUF of a transformers folder as llama.cpp's own converter writes it."""
    script = source_dir() / "convert_hf_to_gguf.py"
    if not script.is_file():
        raise FileNotFoundError(f"{script} is missing; run `python -m neuqi.engines.llamacpp build` first")
    if importlib.util.find_spec("sentencepiece") is None:  # the converter imports it for every vocab
        raise RuntimeError("llama.cpp's convert_hf_to_gguf.py needs sentencepiece: "
                           "pip install 'neuqi[export]'")
    with atomic_path(out) as tmp:
        _tool_output([sys.executable, str(script), str(hf_folder), "--outfile", str(tmp),
                      "--outtype", outtype])
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m neuqi.engines.llamacpp", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build llama.cpp's CPU tools into the cache (once)")
    b.add_argument("--jobs", type=int, default=None)
    sub.add_parser("where", help="print the folder that holds the built tools")
    c = sub.add_parser("convert", help="write a GGUF of a transformers folder with llama.cpp's converter")
    c.add_argument("hf_folder", type=Path)
    c.add_argument("out", type=Path)
    c.add_argument("--outtype", default="f32", choices=("f32", "f16", "bf16", "q8_0"))
    a = p.parse_args(argv)
    if a.cmd == "build":
        print(build(jobs=a.jobs))
    elif a.cmd == "where":
        print(bin_dir() if is_built() else "not built")
    else:
        print(convert(a.hf_folder, a.out, a.outtype))


if __name__ == "__main__":
    main()
