"""QLoRA: fastft.quantize and bitsandbytes Linear4bit bases, wrapped by PEFT, patched by fastft."""

import copy

import pytest
import torch
from _bnb import bnb_quantize
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

import fastft
from fastft.nn import Linear4bit
from fastft.ops import dequantize_nf4, lora_linear, lora_linear_reference, quantize_nf4
from fastft.patching.lora import FusedLoraForward
from fastft.testing import tiny_batch, tiny_model

VOCAB = 256


def _lora(model, **kw):
    cfg = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False, **kw)
    return get_peft_model(model, cfg)


def _step(model, batch):
    model.zero_grad(set_to_none=True)
    out = model(**batch)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same(ref, got, rtol=1e-4):
    (l1, g1), (l2, g2) = ref, got
    torch.testing.assert_close(l2, l1, rtol=1e-5, atol=1e-6)
    assert g1.keys() == g2.keys() and g1
    for n in g1:
        err = (g2[n] - g1[n]).abs().max() / g1[n].abs().max().clamp(min=1e-8)
        assert err <= rtol, f"{n}: {err:.2e}"


def test_quantize_replaces_linears_and_keeps_the_head():
    model = tiny_model("llama", vocab_size=VOCAB)
    dense = model(**tiny_batch(VOCAB)).logits
    fastft.quantize(model)
    n4 = [n for n, m in model.named_modules() if isinstance(m, Linear4bit)]
    assert len(n4) == 2 * 7 and "lm_head" not in " ".join(n4)
    assert type(model.lm_head) is nn.Linear
    q = model(**tiny_batch(VOCAB)).logits
    assert (q - dense).abs().max() < 0.25 * dense.abs().max()  # 4-bit, but the same model
    # the packed weight is what the op dequantises
    layer = model.model.layers[0].self_attn.q_proj
    w = dequantize_nf4(layer.weight, layer.quant_state)
    assert w.shape == (layer.out_features, layer.in_features)


def test_quantize_gpt2_conv1d_and_bad_options():
    model = tiny_model("gpt2", vocab_size=VOCAB)
    ref = model(**tiny_batch(VOCAB)).logits
    fastft.quantize(model, double_quant=False)
    assert isinstance(model.transformer.h[0].attn.c_attn, Linear4bit)
    assert (model(**tiny_batch(VOCAB)).logits - ref).abs().max() < 0.25 * ref.abs().max()
    with pytest.raises(ValueError, match="blocksize"):
        fastft.quantize(tiny_model("llama", vocab_size=VOCAB), blocksize=48)
    with pytest.raises(TypeError):
        fastft.quantize("llama")


@pytest.mark.parametrize("double_quant", [True, False], ids=["dq", "no-dq"])
@pytest.mark.parametrize("cast", ["to_bf16", "half", "to_fp64"])
def test_casting_a_quantized_model_keeps_the_4bit_weights(cast, double_quant):
    """``model.to(torch.bfloat16)`` / ``.half()`` after ``fastft.quantize`` casts the biases and the
    dequantisation dtype, never the NF4 statistics (fp32 code tables, absmax, nested absmax and
    offset: casting them would change every weight); ``.float()`` back restores fp32 compute."""
    model = tiny_model("llama", vocab_size=VOCAB)
    fastft.quantize(model, double_quant=double_quant)
    layers = [m for m in model.modules() if isinstance(m, Linear4bit)]
    before = [dequantize_nf4(m.weight, m.quant_state) for m in layers]
    stats = [{k: b.clone() for k, b in m.named_buffers()} for m in layers]
    dtype = {"to_bf16": torch.bfloat16, "half": torch.float16, "to_fp64": torch.float64}[cast]
    model = model.half() if cast == "half" else model.to(dtype)
    for m, st, w in zip(layers, stats, before):
        assert m.weight.dtype == torch.uint8 and m.weight_dtype == dtype and m.quant_state.dtype == dtype
        for k, b in m.named_buffers():
            assert b.dtype == st[k].dtype and torch.equal(b, st[k]), k
        assert torch.equal(dequantize_nf4(m.weight, m.quant_state).float(), w.to(dtype).float())
    assert model(**tiny_batch(VOCAB)).logits.dtype == dtype  # the model runs in its new dtype
    model.float()
    assert all(m.weight_dtype == torch.float32 for m in layers)
    for m, w in zip(layers, before):
        assert torch.equal(dequantize_nf4(m.weight, m.quant_state), w)


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
def test_qlora_on_fastft_quantized_base_matches_unpatched(family):
    model = _lora(fastft.quantize(tiny_model(family, vocab_size=VOCAB))).train()
    n_lora = sum(1 for n, _ in model.named_modules() if n.endswith("lora_A"))
    assert n_lora == (14 if family != "gpt2" else 8)  # all-linear found the 4-bit layers
    batch = tiny_batch(VOCAB, seq=20)
    ref = _step(model, batch)
    report = fastft.patch(model)
    fused = [p for p in report.patched if p.feature == "lora"]
    assert len(fused) == n_lora and all("4-bit NF4 base" in p.detail for p in fused)
    _assert_same(ref, _step(model, batch))


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_qlora_on_bitsandbytes_base_matches_unpatched(family):
    model = _lora(bnb_quantize(tiny_model(family, vocab_size=VOCAB))).train()
    batch = tiny_batch(VOCAB, seq=20)
    ref = _step(model, batch)
    report = fastft.patch(model)
    fused = [p for p in report.patched if p.feature == "lora"]
    assert fused and all("bitsandbytes 4-bit NF4" in p.detail for p in fused)
    _assert_same(ref, _step(model, batch))


def test_bare_bitsandbytes_layers_run_fastft_kernels():
    model = bnb_quantize(tiny_model("llama", vocab_size=VOCAB)).eval()
    batch = tiny_batch(VOCAB)
    ref = model(**batch).logits
    report = fastft.patch(model)
    assert any("bitsandbytes NF4 Linear4bit -> fastft" in p.detail for p in report.patched)
    torch.testing.assert_close(model(**batch).logits, ref, rtol=1e-4, atol=1e-4)


def test_adapter_trained_on_fastft_4bit_loads_on_bnb_and_dense_bases(tmp_path):
    model = _lora(fastft.quantize(tiny_model("llama", vocab_size=VOCAB)), lora_dropout=0.1).train()
    fastft.patch(model, norms=False, mlp=False, rope=False)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    batch = tiny_batch(VOCAB)
    for _ in range(2):
        opt.zero_grad()
        model(**batch).loss.backward()
        opt.step()
    model.eval()
    want = model(**batch).logits
    model.save_pretrained(tmp_path)
    on_bnb = PeftModel.from_pretrained(bnb_quantize(tiny_model("llama", vocab_size=VOCAB)), tmp_path).eval()
    on_dense = PeftModel.from_pretrained(tiny_model("llama", vocab_size=VOCAB), tmp_path).eval()
    on_fastft = PeftModel.from_pretrained(fastft.quantize(tiny_model("llama", vocab_size=VOCAB)), tmp_path).eval()
    torch.testing.assert_close(on_fastft(**batch).logits, want, rtol=0, atol=0)
    # other bases differ only by their own quantisation, and the patch keeps their numbers:
    # exactly on the dense base; on bitsandbytes' base up to its CPU inference kernel, which
    # (in eval mode, on AVX512-BF16) repacks the weight with bf16 block scales and computes in bf16
    for other, tol in ((on_dense, 1e-4), (on_bnb, 1e-2)):
        got = other(**batch).logits
        assert (got - want).abs().max() < 0.25 * want.abs().max()
        fastft.patch(other, norms=False, mlp=False, rope=False)
        torch.testing.assert_close(other(**batch).logits, got, rtol=tol, atol=tol)


def _trained_adapter(model, seed=3):
    """Give every LoRA layer non-zero A and B, as training would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


@pytest.mark.parametrize("double_quant", [True, False])
def test_merge_and_unload_on_fastft_4bit_equals_peft_on_bitsandbytes(double_quant):
    """PEFT merges an adapter into bitsandbytes' 4-bit weight by dequantise + add + quantise again; the
    patched PEFT model over fastft's 4-bit base merges the same way, to the same bytes (the oracle:
    PEFT's own bnb merge of the same adapter on the same quantised weights)."""
    dense = tiny_model("qwen2", vocab_size=VOCAB)  # q/k/v with a bias
    ours = _lora(fastft.quantize(copy.deepcopy(dense), double_quant=double_quant))
    theirs = bnb_quantize(copy.deepcopy(dense), double_quant=double_quant)
    theirs.is_loaded_in_4bit = True  # what from_pretrained(quantization_config=...) sets: PEFT's bnb LoRA layers
    theirs = _lora(theirs)
    _trained_adapter(ours)
    theirs.load_state_dict({k: v for k, v in ours.state_dict().items() if "lora_" in k}, strict=False)
    fastft.patch(ours)
    batch = {k: v for k, v in tiny_batch(VOCAB).items() if k != "labels"}  # logits, not the fused loss
    with torch.no_grad():
        adapted = ours(**batch).logits
        with ours.disable_adapter():
            base = ours(**batch).logits
    with pytest.warns(UserWarning, match="quantises again"):
        merged = ours.merge_and_unload()
    oracle = theirs.merge_and_unload()
    got = {n: m for n, m in merged.named_modules() if isinstance(m, Linear4bit)}
    want = {n: m for n, m in oracle.named_modules() if type(m).__name__ == "Linear4bit" and n in got}
    assert got and got.keys() == want.keys()
    for n, m in got.items():
        bnb_w = want[n].weight
        torch.testing.assert_close(m.dequantize(), dequantize_nf4(bnb_w.data, bnb_w.quant_state), rtol=0, atol=0)
        torch.testing.assert_close(m.bias, want[n].bias, rtol=0, atol=0)
    with torch.no_grad():  # quantising again rounds: the adapter's effect, not exactly
        out = merged(**batch).logits
    assert not any(hasattr(m, "lora_A") for m in merged.modules())
    assert (out - adapted).norm() < 0.5 * (base - adapted).norm()


def test_merge_adapter_and_unmerge_on_fastft_4bit():
    model = _lora(fastft.quantize(tiny_model("llama", vocab_size=VOCAB)))
    _trained_adapter(model)
    report = fastft.patch(model)
    layer = next(m for m in model.modules() if hasattr(m, "lora_A") and isinstance(m.base_layer, Linear4bit))
    w0 = layer.base_layer.dequantize()
    delta = layer.get_delta_weight("default")
    batch = {k: v for k, v in tiny_batch(VOCAB).items() if k != "labels"}
    with torch.no_grad():
        adapted = model(**batch).logits
        with model.disable_adapter():
            base = model(**batch).logits
    with pytest.warns(UserWarning, match="quantises again"):
        model.merge_adapter(safe_merge=True)
    assert layer.merged
    requant = lambda w: dequantize_nf4(*quantize_nf4(w.detach(), blocksize=64))  # noqa: E731
    merged = layer.base_layer.dequantize()
    torch.testing.assert_close(merged, requant(w0 + delta), rtol=0, atol=0)
    with torch.no_grad():  # merged: the base alone (PEFT's forward), the adapter's effect within the rounding
        out = model(**batch).logits
    assert (out - adapted).norm() < 0.5 * (base - adapted).norm()
    model.unmerge_adapter()
    assert not layer.merged  # not exactly w0 again: the subtraction is quantised too
    torch.testing.assert_close(layer.base_layer.dequantize(), requant(merged - delta), rtol=0, atol=0)
    assert report.patched and fastft.unpatch(model)
    assert "merge" not in layer.__dict__ and "unmerge" not in layer.__dict__


def test_requantize_checks_its_input():
    layer = Linear4bit.from_linear(nn.Linear(64, 8))
    with pytest.raises(ValueError, match=r"shape \(8, 64\)"):
        layer.requantize_(torch.zeros(64, 8))
    with pytest.raises(TypeError, match="floating-point"):
        layer.requantize_(torch.zeros(8, 64, dtype=torch.int32))
    w = torch.randn(8, 64)
    layer.requantize_(w)
    torch.testing.assert_close(layer.dequantize(), dequantize_nf4(*quantize_nf4(w, blocksize=64)), rtol=0, atol=0)


def test_quant_false_keeps_peft_forward_on_4bit_bases():
    model = _lora(fastft.quantize(tiny_model("llama", vocab_size=VOCAB)))
    report = fastft.patch(model, quant=False)
    assert not [p for p in report.patched if p.feature == "lora"]
    assert any("quant=False" in s.reason for s in report.skipped)
    assert not any(isinstance(m.__dict__.get("forward"), FusedLoraForward) for m in model.modules())


@pytest.mark.parametrize("p", [0.0, 0.2])
def test_lora_linear_with_quant_state_matches_dequantised_formula(p):
    torch.manual_seed(0)
    w = torch.randn(48, 128) * 0.1
    packed, state = quantize_nf4(w, blocksize=64)
    wd = dequantize_nf4(packed, state)
    x = torch.randn(3, 11, 128, requires_grad=True)
    A = (torch.randn(8, 128) * 0.1).requires_grad_(True)
    B = (torch.randn(48, 8) * 0.1).requires_grad_(True)
    b = torch.randn(48)
    torch.manual_seed(3)
    y = lora_linear(x, packed, A, B, 0.5, bias=b, dropout_p=p, quant_state=state)
    torch.manual_seed(3)
    seed = int(torch.randint(0, 2**62, (1,)).item())
    from fastft.ops import dropout_mask

    mask = dropout_mask(seed, (33, 128), p, "cpu").reshape(3, 11, 128) if p else None
    ref = lora_linear_reference(x, wd, A, B, 0.5, bias=b, mask=mask)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    go = torch.randn_like(y)
    for g1, g2 in zip(torch.autograd.grad(y, (x, A, B), go), torch.autograd.grad(ref, (x, A, B), go)):
        torch.testing.assert_close(g1, g2, rtol=1e-5, atol=1e-5)


def test_lora_linear_quant_bad_input():
    w = torch.randn(16, 64)
    packed, state = quantize_nf4(w)
    x = torch.randn(2, 64)
    A, B = torch.randn(4, 64), torch.randn(16, 4)
    with pytest.raises(TypeError, match="packed uint8"):
        lora_linear(x, w, A, B, 1.0, quant_state=state)
    with pytest.raises(ValueError, match="fan_in_fan_out"):
        lora_linear(x, packed, A, B, 1.0, quant_state=state, fan_in_fan_out=True)
    with pytest.raises(ValueError, match="x shape"):
        lora_linear(torch.randn(2, 32), packed, A, B, 1.0, quant_state=state)


def _odd_qlora(quantizer):
    model = tiny_model("llama", vocab_size=VOCAB, intermediate_size=96)
    model = fastft.quantize(model) if quantizer == "fastft" else bnb_quantize(model)
    torch.manual_seed(5)
    return _lora(model).train()


@pytest.mark.parametrize("quantizer", ["fastft", "bitsandbytes"])
def test_qlora_base_with_blocks_across_rows_falls_back_and_says_so(quantizer):
    """down_proj's in_features 96 is not a multiple of the blocksize 64: NF4 blocks cross its rows,
    which the fused kernels cannot read. The layer still trains (dequantise + GEMM) and the report
    says which layers took that path and why. The oracle is unpatched PEFT over fastft's
    quantisation, which holds bitsandbytes' very bytes: bitsandbytes' own CPU kernel dequantises
    this layout wrongly (bnb 0.50.2; see tests/test_nf4.py), so its unpatched model is no oracle."""
    batch = tiny_batch(VOCAB, seq=20)
    ref = _step(_odd_qlora("fastft"), batch)
    model = _odd_qlora(quantizer)
    report = fastft.patch(model)
    lora = {p.target: p.detail for p in report.patched if p.feature == "lora"}
    assert len(lora) == 14
    for target, detail in lora.items():
        crosses = target.endswith("down_proj")
        assert ("in_features 96 is not a multiple of blocksize 64" in detail) == crosses, (target, detail)
    _assert_same(ref, _step(model, batch))


def test_bare_4bit_layers_with_blocks_across_rows_are_reported():
    model = fastft.quantize(tiny_model("llama", vocab_size=VOCAB, intermediate_size=96)).eval()
    batch = tiny_batch(VOCAB)
    with torch.no_grad():
        ref = model(**batch).logits
    report = fastft.patch(model)
    quant = {p.target: p.detail for p in report.patched if p.feature == "quant"}
    assert len(quant) == 14
    assert [t for t, d in quant.items() if "not a multiple of blocksize 64" in d] == [
        f"model.layers.{i}.mlp.down_proj" for i in range(2)
    ]
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, ref)


@pytest.mark.parametrize("quantizer", ["fastft", "bnb"])
def test_patch_can_cache_the_fp32_absmax_reported_and_undone(quantizer):
    base = tiny_model("llama", vocab_size=VOCAB)
    base = fastft.quantize(base) if quantizer == "fastft" else bnb_quantize(base)
    model = _lora(base).train()
    batch = tiny_batch(VOCAB, seq=20)
    ref = _step(model, batch)
    report = fastft.patch(model, nf4_cache_absmax=True)
    cached = [p for p in report.patched if p.feature == "quant" and "fp32 absmax cached" in p.detail]
    assert len(cached) == 14 and all("+0.5 bit/weight" in p.detail for p in cached)  # blocksize 64
    for name, module in model.named_modules():
        if name.endswith("q_proj.base_layer"):
            qs = module.quant_state if quantizer == "fastft" else module.weight.quant_state
            state = fastft.ops.as_nf4_state(qs)
            assert state.absmax_cache is not None
            assert torch.equal(state.absmax_cache, state.with_absmax_cache().absmax_fp32())
    # the same numbers as the 8-bit absmax decoded in-kernel (the cache is that decode, kept)
    _assert_same(ref, _step(model, batch), rtol=1e-5)
    fastft.unpatch(model)
    for _name, module in model.named_modules():
        if isinstance(module, Linear4bit):
            assert not module.cache_absmax and module.quant_state.absmax_cache is None
    with pytest.raises(TypeError, match="nf4_cache_absmax"):
        fastft.patch(model, nf4_cache_absmax="yes")
