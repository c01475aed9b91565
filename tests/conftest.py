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


@pytest.fixture(params=TINY_ARCHS)
def tiny_model(request, tmp_path):
    return make_tiny_model(tmp_path / f"tiny-{request.param}", request.param)


@pytest.fixture
def calib_file(tmp_path):
    path = tmp_path / "calib.txt"
    path.write_text(SAMPLE_TEXT)
    return path
