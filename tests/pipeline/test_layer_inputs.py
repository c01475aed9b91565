"""Every decoder layer is calibrated on exactly what the model's own forward gives it.

With the quantizer out of the loop (full-precision layers), the pipeline's capture and
propagation must reproduce, layer by layer, the hidden states and keyword arguments
(masks, rotary embeddings) of the model's forward.  The tiny models' sliding windows
(8 tokens) are shorter than the calibration windows (32), so a layer calibrated with
another layer's mask would see different inputs.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import neuqi
from neuqi.models.adapters import ADAPTERS, adapter_for, decoder_layers
from neuqi.pipeline.sequential import capture_layer_inputs, layer_outputs

SEQ, WINDOW, LAYERS = 32, 8, 4

# per architecture: sliding windows shorter than the calibration windows, small MoEs
SLIDING = {
    "qwen3_moe": dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=2, num_experts=8,
                      num_experts_per_tok=2, moe_intermediate_size=32, mlp_only_layers=[1]),
    "mixtral": dict(sliding_window=WINDOW, num_local_experts=4, num_experts_per_tok=2),
    "mistral": dict(sliding_window=WINDOW),
    "qwen2": dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=2),
    "qwen3": dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=2),
    "phi3": dict(sliding_window=WINDOW, pad_token_id=0, bos_token_id=1, eos_token_id=2),
    "gemma3_text": dict(sliding_window=WINDOW, head_dim=16,
                        layer_types=["sliding_attention", "full_attention"] * (LAYERS // 2)),
}


def tiny(model_type: str) -> torch.nn.Module:
    cfg = AutoConfig.for_model(
        model_type, vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=LAYERS,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        **SLIDING.get(model_type, {}))
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg).eval()


def forward_inputs(model, adapter, ids):
    """Each decoder layer's hidden-state input in the model's own forward."""
    seen = []

    def hook(_m, args, kwargs):
        seen.append((args[0] if args else kwargs["hidden_states"]).clone())

    handles = [layer.register_forward_pre_hook(hook, with_kwargs=True)
               for layer in decoder_layers(model, adapter)]
    try:
        with torch.no_grad():
            model(ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return seen


@pytest.mark.parametrize("model_type", sorted(ADAPTERS))
def test_every_layer_sees_what_the_models_forward_gives_it(model_type):
    model = tiny(model_type)
    adapter = adapter_for(model.config.model_type)
    ids = torch.randint(0, 128, (3, SEQ))
    expected = forward_inputs(model, adapter, ids)
    batches = capture_layer_inputs(model, adapter, ids, 2, torch.device("cpu"))
    for i, layer in enumerate(decoder_layers(model, adapter)):
        batches = [b.at_layer(i) for b in batches]
        got = torch.cat([b.hidden for b in batches])
        torch.testing.assert_close(got, expected[i], rtol=1e-5, atol=1e-6)
        batches = layer_outputs(layer, batches)


def test_layer_zero_arguments_replayed_would_miscalibrate_gemma3():
    """The test above has teeth: replaying layer 0's (sliding-window) mask for the
    full-attention layer 1, as the pipeline once did, changes its output."""
    model = tiny("gemma3_text")
    adapter = adapter_for("gemma3_text")
    ids = torch.randint(0, 128, (1, SEQ))
    (batch,) = capture_layer_inputs(model, adapter, ids, 1, torch.device("cpu"))
    layers = decoder_layers(model, adapter)
    with torch.no_grad():
        h1 = layers[0](batch.hidden, **batch.layer_kwargs[0])
        right = layers[1](h1, **batch.layer_kwargs[1])
        wrong = layers[1](h1, **batch.layer_kwargs[0])
    assert not torch.allclose(right, wrong, atol=1e-4)


def test_an_adapter_that_does_not_match_the_forward_is_an_error(monkeypatch):
    import neuqi.pipeline.sequential as seq

    model = tiny("llama")
    adapter = adapter_for("llama")
    layers = decoder_layers(model, adapter)
    model.model.layers = torch.nn.ModuleList(list(layers)[:2])  # the forward now skips two
    monkeypatch.setattr(seq, "decoder_layers", lambda m, a: layers)
    with pytest.raises(RuntimeError, match="called 2 of its 4 decoder layers"):
        capture_layer_inputs(model, adapter, torch.randint(0, 128, (1, SEQ)), 1, torch.device("cpu"))


@pytest.mark.parametrize("model_type", sorted(set(ADAPTERS) - {"llama", "qwen2"}))
def test_every_listed_architecture_quantizes_saves_and_loads(model_type, tmp_path, calib_file):
    """The architectures without a real model here, end to end on a tiny random one:
    calibrate and quantize, write the checkpoint, and get the same logits back from
    both loaders."""
    from neuqi.formats.checkpoint import write_checkpoint
    from neuqi.pipeline.config import RunConfig
    from neuqi.pipeline.run import calibrate_and_quantize

    from ..conftest import _tiny_tokenizer

    model = tiny(model_type)
    tok = _tiny_tokenizer()
    cfg = RunConfig(model="unused", bits=3, group_size=32, calib=str(calib_file), nsamples=4, seqlen=SEQ,
                    device="cpu")
    records, stats, _ = calibrate_and_quantize(cfg, model, tok, torch.device("cpu"), quiet=True)
    adapter = adapter_for(model_type)
    expected_names = []
    for i, layer in enumerate(decoder_layers(model, adapter)):
        expected_names += [f"model.layers.{i}.{n}" for g in adapter.layer_groups(layer) for n in g]
        if (experts := adapter.layer_experts(layer)) is not None:
            n_experts = experts.gate_up_proj.shape[0]
            expected_names += [f"model.layers.{i}.mlp.experts.{p}.{e}" for e in range(n_experts)
                               for p in ("gate_up_proj", "down_proj")]
    assert sorted(records) == sorted(expected_names) and all(s["quant_loss"] >= 0 for s in stats)
    for name in adapter.linears[:2]:  # fused projections (Phi-3) are quantized whole
        assert isinstance(model.get_submodule(f"model.layers.0.{name}"), torch.nn.Linear)
    x = torch.randint(0, 128, (2, SEQ))
    with torch.no_grad():
        expected = model(x).logits
    (tmp_path / "ckpt").mkdir()
    write_checkpoint(model, records, cfg.spec, cfg.zero_point, cfg.act_order, tmp_path / "ckpt", tok)
    for loaded in (neuqi.load(tmp_path / "ckpt"), AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt")):
        with torch.no_grad():
            torch.testing.assert_close(loaded(x).logits, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("model_type", sorted(ADAPTERS))
def test_replaying_settled_modules_changes_nothing(model_type, monkeypatch):
    """The attention's output, replayed once its linears are quantized instead of
    recomputed in the later passes, gives bit-identical codes, parameters and layer
    outputs to recomputing everything, on every listed architecture (MoE layers,
    Gemma 3's per-layer masks, Phi-3's fused projections)."""
    from neuqi.pipeline.config import QuantConfig
    from neuqi.pipeline.replay import SettledReplay
    from neuqi.pipeline.sequential import quantize_layers

    opts = QuantConfig(bits=3, group_size=32, init="minmax")
    ids = torch.randint(0, 128, (3, SEQ))
    made: list[SettledReplay] = []
    init = SettledReplay.__init__

    def recording_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        made.append(self)

    monkeypatch.setattr(SettledReplay, "__init__", recording_init)
    runs = []
    for replay in (True, False):
        if not replay:
            monkeypatch.setattr(SettledReplay, "_settled", lambda self, child: False)
        model = tiny(model_type)
        adapter = adapter_for(model_type)
        batches = capture_layer_inputs(model, adapter, ids, 2, torch.device("cpu"))
        records, _ = quantize_layers(model, adapter, batches, opts, torch.device("cpu"))
        with torch.no_grad():
            logits = model(ids).logits
        runs.append((records, logits, sum(r.replayed for r in made)))
        made.clear()
    (on, logits_on, replayed), (off, logits_off, none) = runs
    assert replayed > 0 and none == 0
    assert sorted(on) == sorted(off)
    for name in on:
        assert torch.equal(on[name].qweight, off[name].qweight), name
        assert torch.equal(on[name].params.scale, off[name].params.scale), name
        assert torch.equal(on[name].params.zero, off[name].params.zero), name
    assert torch.equal(logits_on, logits_off)
