"""fastft.patch(model, loss=True): the fused loss equals the model's own, on every tested family."""

import copy
import functools

import pytest
import torch
from torch import nn

import fastft
from fastft.patching.loss import FusedLossForward
from fastft.testing import FAMILIES, hard_batch, packed_batch, tiny_batch, tiny_model

FAMILY_NAMES = sorted(FAMILIES)
VOCAB = 256


def _peft(model, dropout=0.0):
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=dropout, init_lora_weights=False)
    return get_peft_model(model, cfg)


def _build(family, wrapped, **kw):
    kw.setdefault("vocab_size", VOCAB)
    model = tiny_model(family, **kw)
    if wrapped:
        model = _peft(model)
    return model.train()


def _loss_and_grads(model, batch, **kwargs):
    model.zero_grad(set_to_none=True)
    out = model(**batch, **kwargs)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


def _assert_same(out_ref, grads_ref, out, grads, *, rtol_loss=1e-5, rtol_grad=1e-4):
    torch.testing.assert_close(out.loss, out_ref.loss, rtol=rtol_loss, atol=1e-6)
    assert grads.keys() == grads_ref.keys() and grads
    for name, g in grads.items():
        ref = grads_ref[name]
        scale = ref.abs().max().clamp(min=1e-8)
        err = (g - ref).abs().max() / scale
        assert err <= rtol_grad, f"{name}: relative error {err:.2e}"


@pytest.mark.parametrize("wrapped", [False, True], ids=["plain", "peft"])
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_patched_loss_and_grads_equal_unpatched(family, wrapped):
    model = _build(family, wrapped)
    batch = tiny_batch(VOCAB, batch=2, seq=24)
    out_ref, grads_ref = _loss_and_grads(model, batch)
    assert out_ref.logits is not None

    report = fastft.patch(model)
    assert "loss" in report.features()
    out, grads = _loss_and_grads(model, batch)
    assert out.logits is None  # never materialised
    assert out.loss.dtype == torch.float32
    _assert_same(out_ref, grads_ref, out, grads)

    assert fastft.unpatch(model)
    out2, grads2 = _loss_and_grads(model, batch)
    assert out2.logits is not None
    _assert_same(out_ref, grads_ref, out2, grads2, rtol_loss=0, rtol_grad=0)


@pytest.mark.parametrize("kind", ["left-padded+all-ignored-row", "packed"])
@pytest.mark.parametrize("wrapped", [False, True], ids=["plain", "peft"])
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_parity_beyond_one_batch_shape(family, wrapped, kind):
    """Left padding with an attention mask and a row whose labels are all ignored; a packed row
    with position ids restarting per sequence (where the family's forward takes position_ids)."""
    model = _build(family, wrapped)
    if kind == "packed":
        batch = packed_batch(VOCAB)
    else:
        batch = hard_batch(VOCAB, batch=3, seq=18)
    out_ref, grads_ref = _loss_and_grads(model, batch)
    report = fastft.patch(model)
    assert "loss" in report.features()
    out, grads = _loss_and_grads(model, batch)
    assert out.logits is None
    _assert_same(out_ref, grads_ref, out, grads)
    assert not report.fallbacks, report.fallbacks


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_bf16_parity_on_the_hard_batch(family):
    """bf16 by the bf16 rule: the patched model's error against an fp32 oracle is at most twice the
    unpatched bf16 model's own (loss and every gradient)."""
    fp32 = _build(family, True)
    bf16 = copy.deepcopy(fp32).to(torch.bfloat16)
    batch = hard_batch(VOCAB, batch=3, seq=18)
    oracle, g_oracle = _loss_and_grads(fp32, batch)
    plain, g_plain = _loss_and_grads(bf16, batch)
    fastft.patch(bf16)
    ours, g_ours = _loss_and_grads(bf16, batch)
    assert (ours.loss - oracle.loss).abs() <= 2 * (plain.loss - oracle.loss).abs() + 1e-2
    for name, ref in g_oracle.items():
        e_plain = (g_plain[name].float() - ref).abs().max()
        e_ours = (g_ours[name].float() - ref).abs().max()
        assert e_ours <= 2 * e_plain + 2e-2 * ref.abs().max() + 1e-6, f"{name}: {e_ours:.3g} vs {e_plain:.3g}"


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_eval_and_unlabelled_calls_return_the_usual_logits(family):
    model = _build(family, False)
    batch = tiny_batch(VOCAB)
    ref_train = model(input_ids=batch["input_ids"]).logits
    model.eval()
    ref_eval = model(**batch)
    fastft.patch(model, norms=False, mlp=False, rope=False)  # the loss feature alone: exact logits
    out_eval = model(**batch)  # eval mode with labels: the original forward
    torch.testing.assert_close(out_eval.logits, ref_eval.logits, rtol=0, atol=0)
    torch.testing.assert_close(out_eval.loss, ref_eval.loss, rtol=0, atol=0)
    model.train()
    out_train = model(input_ids=batch["input_ids"])  # training without labels
    torch.testing.assert_close(out_train.logits, ref_train, rtol=0, atol=0)
    assert out_train.loss is None


@pytest.mark.parametrize("kind", ["tensor", "int"])
def test_num_items_in_batch_follows_transformers(kind):
    model = _build("qwen2", True)
    batch = tiny_batch(VOCAB, batch=2, seq=20)
    n = 57
    num = torch.tensor(n) if kind == "tensor" else n
    out_ref, grads_ref = _loss_and_grads(model, batch, num_items_in_batch=num)
    fastft.patch(model)
    out, grads = _loss_and_grads(model, batch, num_items_in_batch=num)
    _assert_same(out_ref, grads_ref, out, grads)


def test_gradient_accumulation_matches_one_big_batch():
    """Two micro-batches with uneven counted tokens, each divided by the global count."""
    model = _build("llama", True)
    full = tiny_batch(VOCAB, batch=4, seq=16, ignore_frac=0.4)
    ref_out, ref_grads = _loss_and_grads(model, full)
    fastft.patch(model)
    model.zero_grad(set_to_none=True)
    counted = (full["labels"][:, 1:] != -100).sum()
    total = 0.0
    for half in (slice(0, 1), slice(1, 4)):
        micro = {k: v[half] for k, v in full.items()}
        loss = model(**micro, num_items_in_batch=counted).loss
        loss.backward()
        total += loss.detach()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    torch.testing.assert_close(total, ref_out.loss, rtol=1e-5, atol=1e-6)
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name], rtol=1e-4, atol=1e-6)


def test_shift_labels_and_ignore_index_kwargs():
    model = _build("mistral", False)
    batch = tiny_batch(VOCAB, seq=18)
    shift = torch.roll(batch["labels"], -1, dims=1)
    shift[:, -1] = -100
    out_ref, grads_ref = _loss_and_grads(model, batch, shift_labels=shift)
    fastft.patch(model)
    out, grads = _loss_and_grads(model, batch, shift_labels=shift)
    _assert_same(out_ref, grads_ref, out, grads)

    fastft.unpatch(model)
    labels = batch["labels"].masked_fill(batch["labels"] == -100, -1)
    b2 = {**batch, "labels": labels}
    out_ref, grads_ref = _loss_and_grads(model, b2, ignore_index=-1)
    fastft.patch(model)
    out, grads = _loss_and_grads(model, b2, ignore_index=-1)
    _assert_same(out_ref, grads_ref, out, grads)


def test_logits_to_keep_and_tuple_output():
    model = _build("phi3", False)
    batch = tiny_batch(VOCAB, seq=16)
    k = 6
    b_keep = {"input_ids": batch["input_ids"], "labels": batch["labels"][:, -k:]}
    out_ref, grads_ref = _loss_and_grads(model, b_keep, logits_to_keep=k)
    tuple_ref = model(**batch, return_dict=False)
    fastft.patch(model)
    out, grads = _loss_and_grads(model, b_keep, logits_to_keep=k)
    _assert_same(out_ref, grads_ref, out, grads)
    tup = model(**batch, return_dict=False)
    assert isinstance(tup, tuple)
    torch.testing.assert_close(tup[0], tuple_ref[0], rtol=1e-5, atol=1e-6)


def test_lm_head_bias_and_untied_weights():
    model = _build("llama", False)
    old = model.lm_head
    model.lm_head = nn.Linear(old.in_features, old.out_features, bias=True)
    with torch.no_grad():
        model.lm_head.weight.copy_(old.weight)
        model.lm_head.bias.normal_()
    batch = tiny_batch(VOCAB)
    out_ref, grads_ref = _loss_and_grads(model, batch)
    report = fastft.patch(model)
    assert "lm_head bias" in str(report)
    out, grads = _loss_and_grads(model, batch)
    _assert_same(out_ref, grads_ref, out, grads)
    assert "lm_head.bias" in grads


def test_tied_embeddings_get_both_gradients():
    model = _build("gpt2", False)
    assert model.lm_head.weight is model.get_input_embeddings().weight
    batch = tiny_batch(VOCAB)
    out_ref, grads_ref = _loss_and_grads(model, batch)
    report = fastft.patch(model)
    assert "tied embeddings" in str(report)
    out, grads = _loss_and_grads(model, batch)
    _assert_same(out_ref, grads_ref, out, grads)


def test_moe_aux_loss_is_added_like_the_model_does():
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(
        "mixtral",
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
        output_router_logits=True,
        router_aux_loss_coef=0.5,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").train()
    batch = tiny_batch(VOCAB)
    out_ref, grads_ref = _loss_and_grads(model, batch)
    assert out_ref.aux_loss is not None
    report = fastft.patch(model)
    assert "generic" in str(report)  # mixtral is patched, and reported as outside the tested families
    out, grads = _loss_and_grads(model, batch)
    _assert_same(out_ref, grads_ref, out, grads)


def test_a_config_transform_the_forward_never_applies_is_read_off_the_model():
    # A Llama config carrying final_logit_softcapping that Llama's forward never applies:
    # fastft predicts a soft-cap, the check's designed logits show none, so the fused loss
    # runs without one (and equals the model's own loss).
    model = _build("llama", False, final_logit_softcapping=5.0)
    batch = tiny_batch(VOCAB)
    out_ref, grads_ref = _loss_and_grads(model, batch)
    report = fastft.patch(model, norms=False, mlp=False, rope=False)
    out, grads = _loss_and_grads(model, batch)
    assert out.logits is None
    _assert_same(out_ref, grads_ref, out, grads)
    assert "loss" in report.features()


def test_unrecognised_logit_transform_falls_back_with_a_warning():
    # a forward that transforms its logits in a way no config value names: the model's own loss
    model = _build("llama", False)
    original = type(model).forward

    @functools.wraps(original)
    def forward(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        out.logits = out.logits * 0.5 + 0.1
        return out

    cls = type("Odd" + type(model).__name__, (type(model),), {"forward": forward})
    model.__class__ = cls
    batch = tiny_batch(VOCAB)
    report = fastft.patch(model, norms=False, mlp=False, rope=False)
    with pytest.warns(UserWarning, match="fused loss disabled"):
        out = model(**batch)
    assert out.logits is not None
    assert any("disabled at the first training step" in s.reason for s in report.skipped)


def test_patch_twice_unpatch_and_deepcopy():
    model = _build("qwen2", True)
    base = model.get_base_model()
    r1 = fastft.patch(model)
    r2 = fastft.patch(model)
    assert [p.target for p in r1.patched] == [p.target for p in r2.patched]
    assert isinstance(base.__dict__["forward"], FusedLossForward)
    assert fastft.patch_report(model) is r2

    clone = copy.deepcopy(model)
    batch = tiny_batch(VOCAB)
    a = model(**batch).loss
    b = clone(**batch).loss
    torch.testing.assert_close(a, b)
    assert clone.get_base_model().__dict__["forward"].model is clone.get_base_model()

    assert fastft.unpatch(model)
    assert "forward" not in base.__dict__ and "forward" not in base.lm_head.__dict__
    assert not fastft.unpatch(model)
    assert fastft.patch_report(model) is None
    assert fastft.unpatch(clone)
    cbase = clone.get_base_model()
    assert "forward" not in cbase.__dict__ and "forward" not in cbase.lm_head.__dict__
    torch.testing.assert_close(clone(**batch).loss, a)  # the unpatched copy still works


def test_report_lists_what_is_not_available_and_reads_well():
    model = _build("llama", True)
    report = fastft.patch(model, checkpointing="recompute")
    text = str(report)
    assert "loss" in text and "lora" in text and "checkpointing" in text
    assert "(x2)" in text  # the two decoder layers' q_proj share a row
    skipped = {s.feature: s.reason for s in report.skipped}
    assert "no 4-bit layers" in skipped["quant"]
    d = report.to_dict()
    assert {p["feature"] for p in d["patched"]} == {"loss", "lora", "checkpointing", "norms", "mlp", "rope"}
    report = fastft.patch(model, loss=False, lora=False, norms=False, mlp=False, rope=False)
    assert not report.patched
    assert {s.reason for s in report.skipped if s.feature in ("loss", "lora")} == {"disabled by the caller"}
    assert "forward" not in model.get_base_model().__dict__


def test_models_without_a_causal_lm_head_are_reported_not_broken():
    from transformers import AutoConfig, AutoModelForSequenceClassification

    cfg = AutoConfig.for_model(
        "llama", vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, num_labels=3, pad_token_id=0,
    )  # fmt: skip
    model = AutoModelForSequenceClassification.from_config(cfg)
    report = fastft.patch(model)
    assert "loss" not in report.features()
    assert "output embedding" in {s.feature: s.reason for s in report.skipped}["loss"]
    with pytest.raises(TypeError, match="PreTrainedModel"):
        fastft.patch(nn.Linear(2, 2))
    with pytest.raises(TypeError):
        fastft.patch("llama")


def test_bad_options_raise_before_anything_changes(monkeypatch):
    model = _build("llama", False)
    with pytest.raises(ValueError, match="checkpointing"):
        fastft.patch(model, checkpointing="sometimes")
    with pytest.raises(ValueError, match="backend"):
        fastft.patch(model, backend="tpu")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(fastft.BackendUnavailable, match="triton"):
        fastft.patch(model, backend="triton")
    assert "forward" not in model.__dict__


def test_forced_triton_backend_under_the_interpreter(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    model = _build("gemma2", False, vocab_size=128)
    batch = tiny_batch(128, batch=1, seq=12)
    out_ref, grads_ref = _loss_and_grads(model, batch)
    report = fastft.patch(model, backend="triton")
    assert "backend triton" in str(report)
    out, grads = _loss_and_grads(model, batch)
    _assert_same(out_ref, grads_ref, out, grads)


def test_bf16_loss_is_as_close_as_plain_bf16():
    """bf16 judged against an fp32 oracle, relative to the unpatched bf16 model's own error."""
    fp32 = _build("llama", False)
    bf16 = copy.deepcopy(fp32).to(torch.bfloat16)
    batch = tiny_batch(VOCAB, batch=2, seq=32)
    oracle = fp32(**batch).loss.detach()
    plain = bf16(**batch).loss.detach()
    fastft.patch(bf16)
    ours = bf16(**batch).loss.detach()
    assert (ours - oracle).abs() <= 2 * (plain - oracle).abs() + 1e-2


def test_generate_gives_the_same_tokens():
    model = _build("llama", False).eval()
    prompt = torch.tensor([[5, 17, 42, 7]])
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    ref = model.generate(prompt, **kw)
    fastft.patch(model)
    torch.testing.assert_close(model.generate(prompt, **kw), ref)
