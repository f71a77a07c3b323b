"""fastft.patch(norms=, mlp=, rope=): RMSNorm, gated MLPs and RoPE swapped in by structure, same numbers."""

import sys

import pytest
import torch

import fastft
from fastft.patching.fused_ops import FusedMLPForward, FusedRMSNormForward, RopeDispatch, RopeScope
from fastft.patching.lora import FusedLoraForward
from fastft.testing import tiny_batch, tiny_model

VOCAB = 256
GATED = ["llama", "mistral", "qwen2", "gemma2", "phi3"]


def _peft(model):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=8, target_modules="all-linear", init_lora_weights=False))


def _step(model, batch):
    model.zero_grad(set_to_none=True)
    out = model(**batch)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _swapped(model, cls):
    return [m for m in model.modules() if isinstance(m.__dict__.get("forward"), cls)]


@pytest.mark.parametrize("wrapped", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("family", GATED)
def test_fused_norms_mlp_rope_match_the_model(family, wrapped):
    model = tiny_model(family, vocab_size=VOCAB)
    model = (_peft(model) if wrapped else model).train()
    batch = tiny_batch(VOCAB, seq=20)
    ref_loss, ref_grads = _step(model, batch)
    report = fastft.patch(model)
    feats = report.features()
    assert {"norms", "mlp", "rope"} <= feats, str(report)
    n_layers = model.config.num_hidden_layers
    assert len(_swapped(model, FusedMLPForward)) == n_layers
    assert len(_swapped(model, RopeScope)) == n_layers
    assert len(_swapped(model, FusedRMSNormForward)) >= 2 * n_layers + 1
    if wrapped:  # LoRA on the projections still goes through the fused LoRA path
        assert len(_swapped(model, FusedLoraForward)) > 0
    loss, grads = _step(model, batch)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert grads.keys() == ref_grads.keys()
    for n, g in grads.items():
        err = (g - ref_grads[n]).abs().max() / ref_grads[n].abs().max().clamp(min=1e-8)
        assert err <= 1e-4, f"{n}: {err:.2e}"


def test_gemma_norm_offset_and_phi3_fused_gate_up_are_recognised():
    report = str(fastft.patch(tiny_model("gemma2", vocab_size=VOCAB)))
    assert "Gemma-style" in report and "geglu (approximate='tanh')" in report
    report = str(fastft.patch(tiny_model("phi3", vocab_size=VOCAB)))
    assert "between gate_up_proj and down_proj" in report
    report = str(fastft.patch(tiny_model("llama", vocab_size=VOCAB)))
    assert "w * x_hat" in report and "swiglu" in report


def test_gpt2_has_nothing_to_fuse_and_says_so():
    report = fastft.patch(tiny_model("gpt2", vocab_size=VOCAB))
    skipped = {s.feature: s.reason for s in report.skipped}
    assert "no gated MLPs" in skipped["mlp"] and "no RMSNorm-like" in skipped["norms"]
    assert "rope" in skipped


def test_rope_dispatch_is_per_model_and_unpatch_restores_the_function(monkeypatch):
    mod = sys.modules[type(tiny_model("llama", vocab_size=VOCAB).model.layers[0].self_attn).__module__]
    original = mod.apply_rotary_pos_emb
    patched, plain = tiny_model("llama", vocab_size=VOCAB), tiny_model("llama", vocab_size=VOCAB)
    fastft.patch(patched)
    assert isinstance(mod.apply_rotary_pos_emb, RopeDispatch)
    calls = []
    import fastft.ops as ops

    real = ops.rope
    monkeypatch.setattr(ops, "rope", lambda *a, **k: calls.append(1) or real(*a, **k))
    batch = tiny_batch(VOCAB)
    plain(**batch)
    assert not calls  # an unpatched model of the same family keeps transformers' function
    patched(input_ids=batch["input_ids"])  # no labels: one forward, no loss-convention check
    assert len(calls) == patched.config.num_hidden_layers
    torch.testing.assert_close(patched.eval()(**batch).logits, plain.eval()(**batch).logits, rtol=1e-5, atol=1e-5)
    fastft.unpatch(patched)
    assert mod.apply_rotary_pos_emb is original


def test_each_feature_can_be_turned_off():
    model = tiny_model("qwen2", vocab_size=VOCAB)
    report = fastft.patch(model, norms=False, mlp=False, rope=False)
    assert not ({"norms", "mlp", "rope"} & report.features())
    assert not _swapped(model, FusedMLPForward) and not _swapped(model, FusedRMSNormForward)


@pytest.mark.parametrize("wrapped", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("family", ["llama", "phi3"])
def test_down_proj_input_is_recomputed_with_the_same_bits(family, wrapped, monkeypatch):
    """down_proj's saved input is the gated activation recomputed in backward (not a third
    intermediate-sized buffer): the gradients are bit-identical to keeping it (what any outer
    saved-tensor hook, e.g. activation checkpointing, makes the patch do), and with such a hook
    active the recompute stays off."""
    import fastft.patching.fused_ops as F

    model = tiny_model(family, vocab_size=VOCAB)
    model = (_peft(model) if wrapped else model).train()
    fastft.patch(model)
    batch = tiny_batch(VOCAB, seq=20)
    calls = []
    real_unpack = F._RecomputedInput.unpack
    monkeypatch.setattr(F._RecomputedInput, "unpack", staticmethod(lambda p: calls.append(type(p)) or real_unpack(p)))
    loss, grads = _step(model, batch)
    recomputed = calls.count(tuple)
    assert recomputed >= model.config.num_hidden_layers, calls  # each MLP's down_proj input, at least once
    calls.clear()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):  # an outer hook: recompute off
        ref_loss, ref_grads = _step(model, batch)
    assert calls == []
    assert torch.equal(loss, ref_loss) and grads.keys() == ref_grads.keys()
    for n, g in grads.items():
        assert torch.equal(g, ref_grads[n]), n
