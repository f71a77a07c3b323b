"""Issue 13: a swapped module never fails where the original would not; any PeftModel is accepted.

* every fused replacement checks per call what its op relies on and runs the original
  forward for a call that does not fit, counted in ``report.fallbacks``; a forced backend raises;
* ``fastft.patch`` takes a PeftModel around any ``nn.Module``: its LoRA linear layers are
  fused, every other LoRA layer type keeps PEFT's forward and is reported, and PEFT's
  behaviour (merge, disable_adapter, several adapters, saving) is unchanged;
* the loss convention is checked against the model's own loss once per call structure.
"""

import warnings

import pytest
import torch
from torch import nn

import fastft
from fastft.patching.fused_ops import FusedRMSNormForward
from fastft.testing import tiny_batch, tiny_model


def _peft(model, **kw):
    from peft import LoraConfig, get_peft_model

    kw.setdefault("r", 4)
    kw.setdefault("lora_alpha", 8)
    kw.setdefault("init_lora_weights", False)
    return get_peft_model(model, LoraConfig(**kw))


# --------------------------------------------------------------------------------------
# per-call guards
# --------------------------------------------------------------------------------------
def test_a_norm_called_on_another_shape_runs_its_original_forward():
    model = tiny_model("llama").train()
    report = fastft.patch(model)
    norm = model.model.norm
    assert isinstance(norm.__dict__["forward"], FusedRMSNormForward)
    x = torch.randn(3, 1)  # the original broadcasts the weight over a size-1 last dim; the fused op cannot
    got = norm(x)
    fastft.unpatch(model)
    want = norm(x)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert any(k.startswith("norms | model.norm | ") for k in report.fallbacks), report.fallbacks
    assert "calls that ran the original forward" in str(report)


def test_the_fitting_call_still_takes_the_fused_path():
    model = tiny_model("llama").train()
    report = fastft.patch(model)
    out = model(**tiny_batch(256))
    out.loss.backward()
    assert out.logits is None
    assert not report.fallbacks, report.fallbacks


def test_a_forced_backend_raises_instead_of_falling_back():
    model = tiny_model("llama").train()
    fastft.patch(model, backend="torch")
    with pytest.raises(ValueError, match="weight"):
        model.model.norm(torch.randn(3, 1))


def test_lora_layer_called_with_extra_arguments_is_counted():
    model = _peft(tiny_model("llama"), target_modules=["q_proj", "v_proj"]).train()
    report = fastft.patch(model)
    batch = tiny_batch(256)
    with model.disable_adapter():
        assert torch.isfinite(model(**batch).loss)
    keys = [k for k in report.fallbacks if k.startswith("lora |")]
    assert keys and all("adapters disabled" in k for k in keys)


# --------------------------------------------------------------------------------------
# any PeftModel
# --------------------------------------------------------------------------------------
class _MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, 16)
        self.conv = nn.Conv1d(16, 16, 3, padding=1)
        self.up = nn.Linear(16, 32)
        self.down = nn.Linear(32, 8)

    def forward(self, ids):
        h = self.emb(ids)  # (B, T, 16)
        h = self.conv(h.transpose(1, 2)).transpose(1, 2)
        return self.down(torch.relu(self.up(h)))


def _grads(model, ids):
    model.zero_grad(set_to_none=True)
    y = model(ids)
    (y.square().mean()).backward()
    return y.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_patch_accepts_a_peft_model_around_a_plain_sequential():
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(
        nn.Sequential(nn.Linear(8, 8)), LoraConfig(r=2, target_modules=["0"], init_lora_weights=False)
    )
    x = torch.randn(5, 8)
    want = model(x)
    report = fastft.patch(model)
    assert "lora" in report.features()
    skipped = {s.feature: s.reason for s in report.skipped}
    assert "not a transformers model" in skipped["loss"]
    torch.testing.assert_close(model(x), want, rtol=1e-6, atol=1e-6)
    assert fastft.unpatch(model)


def test_custom_module_lora_fused_where_linear_and_peft_elsewhere(tmp_path):
    torch.manual_seed(0)
    base = _MLP()
    model = _peft(base, target_modules=["emb", "conv", "up", "down"])
    ids = torch.randint(0, 11, (2, 7))
    y_ref, g_ref = _grads(model, ids)

    report = fastft.patch(model)
    fused = {p.target for p in report.patched if p.feature == "lora"}
    assert any(t.endswith(".up") for t in fused) and any(t.endswith(".down") for t in fused)
    kept = {s.target: s.reason for s in report.skipped if s.feature == "lora"}
    assert any(t.endswith(".emb") and "Embedding" in r for t, r in kept.items()), kept
    assert any(t.endswith(".conv") and "Conv1d" in r for t, r in kept.items()), kept

    y, g = _grads(model, ids)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
    assert g.keys() == g_ref.keys() and g
    for n in g:
        torch.testing.assert_close(g[n], g_ref[n], rtol=1e-4, atol=1e-6, msg=n)

    # PEFT's own behaviour is unchanged on the patched model
    with model.disable_adapter():
        torch.testing.assert_close(model(ids), base.__class__.forward(model.get_base_model(), ids))
    model.save_pretrained(tmp_path / "ad")
    assert (tmp_path / "ad" / "adapter_model.safetensors").exists()
    model.add_adapter("second", model.peft_config["default"])
    model.set_adapter("second")
    y2 = model(ids)  # a second adapter: the fused path serves the active one
    assert torch.isfinite(y2).all()
    model.set_adapter("default")
    torch.testing.assert_close(model(ids), y_ref, rtol=1e-5, atol=1e-6)
    merged = model.merge_and_unload()
    torch.testing.assert_close(merged(ids), y_ref, rtol=1e-4, atol=1e-5)


def test_mha_lora_keeps_peft_forward_and_is_reported():
    torch.manual_seed(0)
    model = _peft(_Attn(), target_modules=["mha", "proj"])
    x = torch.randn(2, 3, 8)
    want = model(x)
    report = fastft.patch(model)
    kept = {s.target: s.reason for s in report.skipped if s.feature == "lora"}
    assert any(t.endswith("mha") and "MultiheadAttention" in r for t, r in kept.items()), kept
    assert any(p.target.endswith("proj") for p in report.patched if p.feature == "lora")
    torch.testing.assert_close(model(x), want, rtol=1e-5, atol=1e-6)


def test_dora_keeps_peft_forward_and_is_reported():
    torch.manual_seed(0)
    model = _peft(_Attn(), target_modules=["proj"], use_dora=True)
    x = torch.randn(2, 3, 8)
    want = model(x)
    report = fastft.patch(model)
    kept = " ".join(s.reason for s in report.skipped if s.feature == "lora")
    assert "DoRA" in kept
    assert "lora" not in report.features()
    torch.testing.assert_close(model(x), want, rtol=0, atol=0)


class _Attn(nn.Module):
    def __init__(self):
        super().__init__()
        self.mha = nn.MultiheadAttention(8, 2, batch_first=True)
        self.proj = nn.Linear(8, 8)

    def forward(self, x):
        return self.proj(self.mha(x, x, x, need_weights=False)[0])


def test_non_causal_transformers_model_in_peft():
    from transformers import BertConfig, BertModel

    cfg = BertConfig(
        vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    torch.manual_seed(0)
    model = _peft(BertModel(cfg), target_modules=["query", "value"]).train()
    ids = torch.randint(0, 64, (2, 5))
    model.zero_grad()
    want = model(input_ids=ids).last_hidden_state
    report = fastft.patch(model)
    assert "lora" in report.features()
    assert any(s.feature == "loss" for s in report.skipped)
    got = model(input_ids=ids).last_hidden_state
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_plain_module_without_peft_is_still_refused():
    with pytest.raises(TypeError, match="PreTrainedModel or a peft PeftModel"):
        fastft.patch(nn.Linear(2, 2))


# --------------------------------------------------------------------------------------
# the loss-convention check
# --------------------------------------------------------------------------------------
def _bart_causal_lm():
    from transformers import BartConfig, BartForCausalLM

    cfg = BartConfig(
        vocab_size=128, d_model=32, encoder_layers=1, decoder_layers=2, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
        dropout=0.0, attention_dropout=0.0, is_decoder=True, is_encoder_decoder=False, use_cache=False,
    )  # fmt: skip
    torch.manual_seed(0)
    return BartForCausalLM(cfg).train()


def test_a_head_that_does_not_shift_labels_keeps_its_own_loss():
    model = _bart_causal_lm()
    batch = tiny_batch(128, seq=12)
    batch.pop("attention_mask")
    model.zero_grad()
    ref = model(**batch)
    ref.loss.backward()
    g_ref = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    report = fastft.patch(model)
    model.zero_grad()
    with pytest.warns(UserWarning, match="does not shift labels"):
        out = model(**batch)
    out.loss.backward()
    torch.testing.assert_close(out.loss, ref.loss, rtol=0, atol=0)
    for n, p in model.named_parameters():
        if n in g_ref:
            torch.testing.assert_close(p.grad, g_ref[n], rtol=0, atol=0)
    assert "loss" not in report.features()
    assert any(s.feature == "loss" and "model's own loss is used" in s.reason for s in report.skipped)
    # from then on the model's own loss, without a second check
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.testing.assert_close(model(**batch).loss, ref.loss, rtol=0, atol=0)


def test_the_check_runs_once_per_call_structure(monkeypatch):
    from fastft.patching.loss import FusedLossForward

    model = tiny_model("llama").train()
    fastft.patch(model)
    calls = []
    orig = FusedLossForward._check_once
    monkeypatch.setattr(FusedLossForward, "_check_once", lambda self, sub: calls.append(1) or orig(self, sub))
    batch = tiny_batch(256)
    for _ in range(3):
        model(**batch)
    assert len(calls) == 1
    model(**batch, num_items_in_batch=torch.tensor(7))  # a new structure: checked once more
    model(**batch, num_items_in_batch=torch.tensor(9))
    assert len(calls) == 2
    model(**tiny_batch(256, seq=9))  # another length is the same structure
    assert len(calls) == 2


def test_the_check_does_not_change_the_training_rng_stream():
    """With dropout, the first patched step draws the same masks as an unpatched one would."""
    torch.manual_seed(0)
    a = _peft(tiny_model("llama"), target_modules="all-linear", lora_dropout=0.3).train()
    import copy

    b = copy.deepcopy(a)
    fastft.patch(b)
    batch = tiny_batch(256)
    torch.manual_seed(5)
    la = a(**batch).loss
    torch.manual_seed(5)
    lb = b(**batch).loss
    torch.manual_seed(5)
    fastft.unpatch(b)
    lc = b(**batch).loss
    torch.testing.assert_close(la, lc, rtol=0, atol=0)
    assert torch.isfinite(lb)  # fastft's dropout mask is its own stream; the check consumed none of it
    fastft.patch(b)
    torch.manual_seed(5)
    l1 = b(**batch).loss  # first call: the check runs
    torch.manual_seed(5)
    l2 = b(**batch).loss  # second call: no check
    torch.testing.assert_close(l1, l2, rtol=0, atol=0)


def test_the_check_works_under_torch_compile():
    model = tiny_model("llama").train()
    batch = tiny_batch(256)
    ref = model(**batch).loss
    fastft.patch(model)
    compiled = torch.compile(model, backend="aot_eager")
    got = compiled(**batch).loss
    got2 = compiled(**batch).loss
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got2, ref, rtol=1e-5, atol=1e-6)
