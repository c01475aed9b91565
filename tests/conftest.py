import os

import pytest
import torch

# Tests run eager: compiling the NeUQI sweep costs ~20 s per process and the
# compiled path is checked against eager in tests/quant/test_init.py.
os.environ.setdefault("NEUQI_COMPILE", "0")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def random_hessian(n: int, tokens: int = 512, seed: int = 0) -> torch.Tensor:
    """A realistic SPD second-moment matrix: correlated inputs, uneven scales."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(n, n, generator=g) * 0.3 + torch.eye(n)
    x = torch.randn(tokens, n, generator=g) @ mix * (torch.rand(n, generator=g) * 2 + 0.1)
    return (x.T @ x / tokens).double()


TINY_ARCHS = ("llama", "qwen2")


def _tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.trainers import BpeTrainer
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel()
    tok.decoder = decoders.ByteLevel()
    trainer = BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([SAMPLE_TEXT], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


SAMPLE_TEXT = (
    "Quantization maps every weight of a layer to one of a few levels. "
    "The scale sets the spacing of the levels and the zero-point their offset. "
    "Calibration text shows which input channels matter most for the output. "
) * 40


def make_tiny_model(folder, arch: str = "llama", layers: int = 2, hidden: int = 64, intermediate: int = 96):
    """A random-initialised decoder with real structure, saved with a tokenizer."""
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    common = dict(vocab_size=320, hidden_size=hidden, intermediate_size=intermediate,
                  num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    if arch == "llama":
        cfg = LlamaConfig(**common, tie_word_embeddings=True)
    elif arch == "qwen2":
        cfg = Qwen2Config(**common, tie_word_embeddings=False)
    else:
        raise ValueError(arch)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(folder)
    _tiny_tokenizer().save_pretrained(folder)
    return folder


def llamacpp_tiny_llama(folder, tool: str, **config):
    """A random LLaMA with SmolLM2's real tokenizer (llama.cpp's converter needs a real
    one) saved to ``folder`` and written as an F32 GGUF by llama.cpp's converter.
    Skips (fails on CI) without the cached tokenizer; fails with how to build llama.cpp
    when its ``tool`` is missing. Returns ``(model, source_gguf)``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    from neuqi.data.cache import cache_dir
    from neuqi.engines import llamacpp

    tok_dir = cache_dir() / "models" / "smollm2-135m"
    if not (tok_dir / "tokenizer.json").exists():
        if os.environ.get("CI"):
            pytest.fail(f"{tok_dir} is missing: `make test` fetches it with `make data`")
        pytest.skip("SmolLM2 not in the data cache (run `make data`)")
    llamacpp.tool(tool)
    tok = AutoTokenizer.from_pretrained(tok_dir)
    cfg = LlamaConfig(vocab_size=len(tok), max_position_embeddings=1024, initializer_range=0.1,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, **config)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return model, llamacpp.convert(folder, folder.parent / f"{folder.name}.f32.gguf")


@pytest.fixture(params=TINY_ARCHS)
def tiny_model(request, tmp_path):
    return make_tiny_model(tmp_path / f"tiny-{request.param}", request.param)


@pytest.fixture
def calib_file(tmp_path):
    path = tmp_path / "calib.txt"
    path.write_text(SAMPLE_TEXT)
    return path
