"""Layer-by-layer reading from safetensors shards (models larger than RAM)."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import neuqi
from neuqi.models import lazy
from neuqi.pipeline.config import RunConfig
from neuqi.pipeline.run import quantize_model

from ..conftest import make_tiny_model


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_sharded_low_memory_run_matches_the_in_ram_run(arch, calib_file, tmp_path, monkeypatch):
    folder = make_tiny_model(tmp_path / f"tiny-{arch}", arch, layers=3)
    m = AutoModelForCausalLM.from_pretrained(folder)
    m.save_pretrained(folder, max_shard_size="60KB")  # many shards
    shards = list(folder.glob("model-*.safetensors"))
    assert len(shards) > 3 and (folder / "model.safetensors.index.json").exists()

    seen = []
    real_materialize = lazy.materialize

    def one_layer_at_a_time(module, prefix, ckpt, dtype):
        assert not any(lazy.is_materialized(layer) for layer in seen), "an earlier layer is still in RAM"
        seen.append(module)
        real_materialize(module, prefix, ckpt, dtype)

    monkeypatch.setattr(lazy, "materialize", one_layer_at_a_time)
    common = dict(model=str(folder), bits=3, group_size=32, calib=str(calib_file), nsamples=4, seqlen=64,
                  device="cpu")
    lazy_dir = quantize_model(RunConfig(**common, out_dir=str(tmp_path / "lazy"), low_memory=True),
                              quiet=True)
    assert len(seen) == 3
    ram_dir = quantize_model(RunConfig(**common, out_dir=str(tmp_path / "ram")), quiet=True)
    x = torch.randint(0, 320, (1, 48))
    torch.testing.assert_close(neuqi.load(lazy_dir)(x).logits, neuqi.load(ram_dir)(x).logits)
    assert json.loads((lazy_dir / "result.json").read_text())["config"]["low_memory"] is True


def test_low_memory_refuses_a_gguf_file(calib_file, tmp_path):
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    cfg = RunConfig(model=str(tmp_path / "m.gguf"), calib=str(calib_file), low_memory=True,
                    out_dir=str(tmp_path / "r"), nsamples=2, seqlen=32)
    with pytest.raises(ValueError, match="low-memory"):
        quantize_model(cfg, quiet=True)
