"""Mixture-of-experts: each expert calibrated on its own tokens, one at a time, stored
in the fused 3-D shape and loaded back by both loaders."""

from __future__ import annotations

import json
import weakref

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import neuqi
from neuqi.formats.checkpoint import write_checkpoint
from neuqi.models.adapters import adapter_for, decoder_layers
from neuqi.pipeline import moe
from neuqi.pipeline.config import RunConfig
from neuqi.pipeline.run import calibrate_and_quantize, quantize_model
from neuqi.pipeline.sequential import capture_layer_inputs

from ..conftest import _tiny_tokenizer

MOE = {
    "qwen3_moe": dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, mlp_only_layers=[1]),
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
}


def tiny_moe(model_type: str, layers: int = 3) -> torch.nn.Module:
    cfg = AutoConfig.for_model(model_type, vocab_size=320, hidden_size=64, intermediate_size=96,
                               num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                               max_position_embeddings=128, **MOE[model_type])
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg).eval()


def run_config(calib_file, **kw) -> RunConfig:
    base = dict(model="unused", bits=3, group_size=32, calib=str(calib_file), nsamples=4, seqlen=32,
                device="cpu", moe_prior_tokens=64)
    return RunConfig(**{**base, **kw})


@pytest.mark.parametrize(("model_type", "init"), [("qwen3_moe", "neuqi"), ("mixtral", "minmax")])
def test_moe_quantizes_saves_in_the_fused_shape_and_loads_with_the_same_logits(model_type, init, calib_file,
                                                                                tmp_path):
    """Float zero-points (NeUQI) on Qwen3-MoE, integer ones (packed qzeros) on Mixtral."""
    model = tiny_moe(model_type)
    tok = _tiny_tokenizer()
    cfg = run_config(calib_file, init=init)
    records, stats, _ = calibrate_and_quantize(cfg, model, tok, torch.device("cpu"), quiet=True)
    experts = model.model.layers[0].mlp.experts
    n_experts = experts.gate_up_proj.shape[0]
    expert_stats = [s for s in stats if ".experts." in s["name"]]
    moe_layers = 2 if model_type == "qwen3_moe" else 3  # Qwen3-MoE's layer 1 is dense here
    assert len(expert_stats) == moe_layers * n_experts * 2
    assert all(s["prior_weight"] == pytest.approx(64 / (s["tokens"] + 64)) for s in expert_stats)
    # each expert's matrix now holds exactly its de-quantized codes
    x = torch.randint(0, 128, (2, 32))
    with torch.no_grad():
        expected = model(x).logits
    (tmp_path / "ckpt").mkdir()
    write_checkpoint(model, records, cfg.spec, cfg.zero_point, cfg.act_order, tmp_path / "ckpt", tok)
    qc = json.loads((tmp_path / "ckpt" / "config.json").read_text())["quantization_config"]
    assert "model.layers.0.mlp.experts.gate_up_proj" in qc["experts"]
    assert not any(".experts." in m for m in qc["modules"])
    from safetensors import safe_open

    with safe_open(tmp_path / "ckpt" / "model.safetensors", "pt") as f:
        keys = set(f.keys())
        assert f.get_slice("model.layers.0.mlp.experts.down_proj.qweight").get_shape()[0] == n_experts
    assert "model.layers.0.mlp.experts.gate_up_proj" not in keys  # no FP copy beside the codes
    assert "model.layers.0.mlp.gate.weight" in keys  # the router stays full precision
    for loaded in (neuqi.load(tmp_path / "ckpt"), AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt")):
        assert type(loaded.model.layers[0].mlp.experts.gate_up_proj).__name__ == "QuantExperts"
        with torch.no_grad():
            torch.testing.assert_close(loaded(x).logits, expected, rtol=1e-5, atol=1e-5)


def test_each_expert_gets_the_h_of_its_routed_tokens_one_expert_at_a_time(calib_file, monkeypatch):
    """Brute force: the router's own choice on the layer's input picks the tokens; the
    down projection sees act(gate)·up through the already quantized gate_up; and no
    expert's H outlives its turn (memory does not grow with the number of experts)."""
    model = tiny_moe("qwen3_moe", layers=1)
    layer = model.model.layers[0]
    experts = layer.mlp.experts
    prior = 64
    cfg = run_config(calib_file, bits=4, moe_prior_tokens=prior)
    windows = torch.randint(0, 320, (4, 32))
    batches = [b.at_layer(0) for b in capture_layer_inputs(model, adapter_for("qwen3_moe"), windows, 2,
                                                           torch.device("cpu"))]
    seen: dict[str, torch.Tensor] = {}
    alive: list[weakref.ref] = []
    real = moe.quantize_weight

    def spy(weight, bias, H, opts, name="", expert_of=None):
        # besides the current one, at most the layer's shared H is alive: memory does
        # not grow with the number of experts
        assert sum(r() is not None and r() is not H for r in alive) <= 1, "earlier experts' H still held"
        alive.append(weakref.ref(H))
        seen[name] = H.clone()
        return real(weight, bias, H, opts, name, expert_of)

    monkeypatch.setattr(moe, "quantize_weight", spy)
    # what the experts receive: the post-attention norm of the residual stream
    x_ref, top_ref = moe.expert_inputs(layer, experts, batches)
    with torch.no_grad():
        kw = [{k: v for k, v in b.kwargs.items() if k != "use_cache"} for b in batches]
        h = torch.cat([layer.post_attention_layernorm(b.hidden + layer.self_attn(
            layer.input_layernorm(b.hidden), **k)[0]) for b, k in zip(batches, kw, strict=True)])
        h = h.reshape(-1, 64)
        _, _, top = layer.mlp.gate(h)
    torch.testing.assert_close(x_ref, h)
    assert torch.equal(top_ref, top)
    gate_up_fp = experts.gate_up_proj.detach().clone()
    _, stats = moe.quantize_experts(layer, experts, adapter_for("qwen3_moe").experts, batches, cfg, "L")
    def second_moment(v):
        return (v.T @ v).double() / len(v)

    for e in range(8):
        mask = (top == e).any(-1)
        n = int(mask.sum())
        want = (n * second_moment(h[mask]) + prior * second_moment(h)) / (n + prior)
        torch.testing.assert_close(seen[f"L.gate_up_proj.{e}"], want)
        g, u = (h @ experts.gate_up_proj[e].T).chunk(2, -1)  # through the quantized gate_up
        a = torch.nn.functional.silu(g) * u
        want = (n * second_moment(a[mask]) + prior * second_moment(a)) / (n + prior)
        torch.testing.assert_close(seen[f"L.down_proj.{e}"], want, rtol=1e-5, atol=1e-7)
        assert not torch.equal(experts.gate_up_proj[e], gate_up_fp[e])
    assert [s["tokens"] for s in stats[::2]] == [int((top == e).any(-1).sum()) for e in range(8)]


def test_an_expert_no_token_reaches_gets_the_layers_h_and_without_a_prior_an_error(
        calib_file, monkeypatch):
    model = tiny_moe("qwen3_moe", layers=1)
    layer = model.model.layers[0]
    windows = torch.randint(0, 320, (2, 32))
    batches = [b.at_layer(0) for b in capture_layer_inputs(model, adapter_for("qwen3_moe"), windows, 2,
                                                           torch.device("cpu"))]
    real = moe.expert_inputs

    def no_expert_7(*args):
        x, top = real(*args)
        return x, torch.where(top == 7, torch.zeros_like(top), top)  # the router never picks 7

    monkeypatch.setattr(moe, "expert_inputs", no_expert_7)
    layout = adapter_for("qwen3_moe").experts
    _, stats = moe.quantize_experts(layer, layer.mlp.experts, layout, batches, run_config(calib_file), "L")
    assert [s["prior_weight"] for s in stats if s["name"].endswith(".7")] == [1.0, 1.0]
    assert all(s["tokens"] > 0 for s in stats if not s["name"].endswith(".7"))
    with pytest.raises(RuntimeError, match="expert 7 got no calibration tokens"):
        moe.quantize_experts(layer, layer.mlp.experts, layout, batches,
                             run_config(calib_file, moe_prior_tokens=0), "L")


def test_moe_refuses_what_it_cannot_do(calib_file, tmp_path, monkeypatch):
    model = tiny_moe("mixtral", layers=1)
    tok = _tiny_tokenizer()
    with pytest.raises(ValueError, match="--gguf is not available for mixture-of-experts"):
        calibrate_and_quantize(run_config(calib_file, gguf="Q4_0", init="neuqi"), model, tok,
                               torch.device("cpu"), quiet=True)
    with pytest.raises(ValueError, match="--fp-target applies to dense decoder layers"):
        calibrate_and_quantize(run_config(calib_file, fp_target=0.25), model, tok, torch.device("cpu"),
                               quiet=True)
    with pytest.raises(ValueError, match=r"--shrink auto .* experts"):
        calibrate_and_quantize(run_config(calib_file, shrink="auto"), model, tok, torch.device("cpu"),
                               quiet=True)
    # an experts module in another layout is refused, not quantized wrongly
    monkeypatch.setattr(model.model.layers[0].mlp.experts, "is_transposed", True)
    with pytest.raises(ValueError, match="does not store its experts as neuqi expects"):
        adapter_for("mixtral").layer_experts(decoder_layers(model, adapter_for("mixtral"))[0])


def test_an_interrupted_moe_run_resumes_to_the_same_checkpoint(calib_file, tmp_path, monkeypatch):
    from neuqi.pipeline import sequential

    folder = tmp_path / "tiny-qwen3-moe"
    tiny_moe("qwen3_moe").save_pretrained(folder)
    _tiny_tokenizer().save_pretrained(folder)
    cfg = dict(model=str(folder), bits=3, group_size=32, calib=str(calib_file), nsamples=4, seqlen=32,
               device="cpu", moe_prior_tokens=64)
    whole = quantize_model(RunConfig(**cfg, out_dir=str(tmp_path / "a")), quiet=True)
    real = sequential.quantize_linear
    with monkeypatch.context() as m:
        def stop(lin, H, opts, name="", **kwargs):
            if ".2." in name:
                raise KeyboardInterrupt
            return real(lin, H, opts, name, **kwargs)

        m.setattr(sequential, "quantize_linear", stop)
        with pytest.raises(KeyboardInterrupt):
            quantize_model(RunConfig(**cfg, out_dir=str(tmp_path / "b")), quiet=True)
    resumed = quantize_model(RunConfig(**cfg, out_dir=str(tmp_path / "b"), resume=True), quiet=True)
    assert (whole / "model.safetensors").read_bytes() == (resumed / "model.safetensors").read_bytes()


@pytest.mark.parametrize("model_type", sorted(MOE))
def test_a_moe_run_exports_to_compressed_tensors_under_the_hub_checkpoint_names(model_type, calib_file,
                                                                                tmp_path):
    """vLLM reads MoE experts one matrix per expert, named as the model's hub
    checkpoints name them (Mixtral: block_sparse_moe.experts.E.w1/w3/w2); the export is
    checked bit for bit by our reader and by transformers loading it through the
    compressed-tensors library."""
    from safetensors import safe_open

    from neuqi.formats.export import export_run

    folder = tmp_path / f"tiny-{model_type}"
    tiny_moe(model_type, layers=2).save_pretrained(folder)
    _tiny_tokenizer().save_pretrained(folder)
    run = quantize_model(RunConfig(model=str(folder), bits=4, group_size=32, init="minmax", nsamples=4,
                                   seqlen=32, calib=str(calib_file), device="cpu",
                                   out_dir=str(tmp_path / "runs")), quiet=True)
    res = export_run(run, "compressed-tensors", tmp_path / "ct", dtype="float32")
    assert res["ok"] and res["tensors"]["bit_exact"] and res["engine"]["ok"], res
    layout = adapter_for(model_type).experts
    with safe_open(tmp_path / "ct" / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    n_experts = 8 if model_type == "qwen3_moe" else 4
    for e in range(n_experts):
        for hub in (layout.hub_gate, layout.hub_up, layout.hub_down):
            assert f"model.layers.0.{layout.hub_path}.{e}.{hub}.weight_packed" in keys
    assert f"model.layers.0.{layout.hub_router}.weight" in keys  # the router, full precision
    assert not any("gate_up_proj" in k for k in keys)
    ignore = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]["ignore"]
    assert f"re:.*{layout.hub_router}$" in ignore
    with pytest.raises(ValueError, match="use --format compressed-tensors"):
        export_run(run, "gptq", tmp_path / "gptq")


def test_the_python_api_returns_a_moe_model_holding_packed_experts(tmp_path):
    model = tiny_moe("mixtral", layers=1)
    tok = _tiny_tokenizer()
    windows = torch.randint(0, 320, (4, 32))
    out = neuqi.quantize(model, tok, calib=windows, save=tmp_path / "run", bits=4, group_size=32,
                         init="minmax")
    assert type(out.model.layers[0].mlp.experts.down_proj).__name__ == "QuantExperts"
    x = torch.randint(0, 128, (2, 32))
    with torch.no_grad():
        torch.testing.assert_close(out(x).logits, neuqi.load(tmp_path / "run")(x).logits)


@pytest.mark.parametrize("model_type", sorted(MOE))
def test_the_adapters_hub_names_are_the_ones_transformers_saves(model_type, tmp_path):
    """The exports' per-expert names and the gate/up row split, checked against
    transformers' own reverse conversion (save_pretrained writes hub checkpoints)."""
    from safetensors.torch import load_file

    model = tiny_moe(model_type, layers=1)
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "model.safetensors")
    layout = adapter_for(model_type).experts
    experts = model.model.layers[0].mlp.experts
    half = experts.gate_up_proj.shape[1] // 2
    for e in range(experts.gate_up_proj.shape[0]):
        base = f"model.layers.0.{layout.hub_path}.{e}"
        assert torch.equal(saved[f"{base}.{layout.hub_gate}.weight"], experts.gate_up_proj[e, :half])
        assert torch.equal(saved[f"{base}.{layout.hub_up}.weight"], experts.gate_up_proj[e, half:])
        assert torch.equal(saved[f"{base}.{layout.hub_down}.weight"], experts.down_proj[e])
    router = model.model.layers[0].mlp.gate.weight
    assert torch.equal(saved[f"model.layers.0.{layout.hub_router}.weight"], router)
