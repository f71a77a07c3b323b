"""QLoRA that trains the experts: PEFT ``target_parameters`` LoRA over 4-bit (NF4) expert weights.

Recipe: ``get_peft_model`` on the 16-bit model (PEFT's target_parameters wraps parameters, and a
packed weight is not one), then ``fastft.quantize(peft_model)`` (the experts are quantised inside
PEFT's wrappers, the adapters left alone), then ``fastft.patch``. Oracle: the same PEFT model with
every 4-bit expert weight dequantised back into a frozen parameter, run by PEFT's own
parametrization and transformers' eager loop (same numbers on both sides: fp32 1e-5 / 1e-4).
"""

import copy
import sys

import pytest
import torch

import fastft
from fastft.nn import ExpertsWeight4bit, Linear4bit
from fastft.ops.nf4 import dequantize_nf4

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from test_experts import FAMILIES, FP32, _batch, _experts_modules, _model  # noqa: E402
from test_experts_lora import TARGETS, _bf16_ok, _count_fused, _lora_lines, _loss_and_lora_grads, _patch  # noqa: E402
from test_experts_nf4 import _dense_copy  # noqa: E402


def _qlora(family, target="both", second=False, dtype=torch.float32):
    """PEFT LoRA (random A and B) on the 16-bit experts, then ``fastft.quantize`` of the PEFT model."""
    from peft import LoraConfig, get_peft_model

    model = _model(family, dtype)
    model.config._experts_implementation = "eager"
    torch.manual_seed(2)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=[], target_parameters=TARGETS[target], init_lora_weights=False)
    pm = get_peft_model(model, cfg)
    if second:
        cfg2 = LoraConfig(r=2, target_modules=[], target_parameters=TARGETS[target], init_lora_weights=False)
        pm.add_adapter("second", cfg2)
    fastft.quantize(pm)
    return pm


def _no_16bit_experts(model):
    """Every expert weight is 4-bit and no parameter / state-dict entry holds a 16-bit expert stack."""
    mods = _experts_modules(model)
    assert mods and all(isinstance(m.gate_up_proj, ExpertsWeight4bit) for _, m in mods)
    assert all(isinstance(m.down_proj, ExpertsWeight4bit) for _, m in mods)
    smallest = min(min(m.gate_up_proj.shape.numel(), m.down_proj.shape.numel()) for _, m in mods)
    big = [k for k, t in model.state_dict().items() if t.is_floating_point() and t.numel() >= smallest]
    assert not [k for k in big if "experts" in k and "lora_" not in k], big


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("target", list(TARGETS))
def test_patched_lora_on_4bit_experts_matches_peft_on_dequantised(family, target, monkeypatch):
    calls = _count_fused(monkeypatch)
    model = _qlora(family, target)
    ref = _dense_copy(model)
    # the adapters were not quantised (quantize leaves a PEFT model's LoRA linears alone) and train
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == [n for n, p in ref.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n and "experts" in n for n in trainable)
    batch = _batch(model)
    ref_loss, ref_grads = _loss_and_lora_grads(ref, batch)
    report = _patch(model)
    lines = _lora_lines(report)
    assert len(lines) == len(_experts_modules(model))
    assert all("experts + LoRA (fused)" in p.detail and "4-bit (NF4) base" in p.detail for p in lines)
    loss, grads = _loss_and_lora_grads(model, batch)
    assert not report.fallbacks and len(calls) == len(lines)
    torch.testing.assert_close(loss, ref_loss, **FP32)
    assert grads.keys() == ref_grads.keys()
    for n in grads:
        torch.testing.assert_close(grads[n], ref_grads[n], **FP32, msg=lambda m, n=n: f"{n}: {m}")
    _no_16bit_experts(model)


def test_quantize_after_get_peft_model_equals_the_usual_order_on_linear_layers():
    """``quantize(peft_model)`` quantises the LoRA layers' bases (same bytes as quantising first) and never
    the adapters: the one-call recipe and ``quantize(experts=False)`` -> PEFT -> ``quantize`` agree exactly."""
    from peft import LoraConfig, get_peft_model

    cfg = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], target_parameters=TARGETS["both"])
    models = []
    for first in (False, True):
        model = _model("qwen3_moe")
        model.config._experts_implementation = "eager"
        if first:
            fastft.quantize(model, experts=False)
        torch.manual_seed(2)
        pm = get_peft_model(model, LoraConfig(**cfg, init_lora_weights=False))
        fastft.quantize(pm)
        models.append(pm)
    for pm in models:
        assert all(isinstance(m.base_layer, Linear4bit) for n, m in pm.named_modules() if n.endswith("q_proj"))
        assert all(type(m) is torch.nn.Linear for n, m in pm.named_modules() if n.endswith("lora_A.default"))
    batch = _batch(models[0])
    (la, ga), (lb, gb) = (_loss_and_lora_grads(m, batch) for m in models)
    torch.testing.assert_close(la, lb, rtol=0, atol=0)
    assert ga.keys() == gb.keys() and any("q_proj" in n for n in ga)
    for n in ga:
        torch.testing.assert_close(ga[n], gb[n], rtol=0, atol=0)


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_bf16_rule(family):
    """bf16 model over 4-bit experts, fp32 adapters (PEFT's autocast_adapter_dtype): logits and LoRA gradients
    within twice plain bf16 PyTorch's error (PEFT over the bf16 dequantised experts) against the fp32 oracle
    (the same 4-bit numbers, fp32 throughout)."""
    fast = _qlora(family, dtype=torch.bfloat16)
    assert all(p.dtype == torch.float32 for n, p in fast.named_parameters() if "lora_" in n)
    plain = _dense_copy(fast)
    oracle = _dense_copy(copy.deepcopy(fast).float())
    batch = _batch(fast)
    o_loss, o_grads = _loss_and_lora_grads(oracle, batch)
    p_loss, p_grads = _loss_and_lora_grads(plain, batch)
    report = _patch(fast)
    f_loss, f_grads = _loss_and_lora_grads(fast, batch)
    assert not report.fallbacks and "float32 adapters cast once per call" in _lora_lines(report)[0].detail
    with torch.no_grad():
        o_logits, p_logits, f_logits = (m(**batch).logits.float() for m in (oracle, plain, fast))
    assert _bf16_ok(f_logits, p_logits, o_logits)
    assert abs(f_loss.float() - o_loss) < 1e-2 * o_loss.abs()
    for n in o_grads:
        assert f_grads[n].dtype == torch.float32
        assert _bf16_ok(f_grads[n], p_grads[n], o_grads[n]), n


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3"])
def test_unpatched_peft_on_4bit_experts_matches_the_oracle(family):
    """Without fastft.patch (``fastft generate``, user code): PEFT's own forward on a transient dequantised
    copy per call (quantize gave the wrapper that forward); the 4-bit weights are back after every call."""
    model = _qlora(family)
    ref = _dense_copy(model)
    batch = _batch(model)
    loss, grads = _loss_and_lora_grads(model, batch)
    ref_loss, ref_grads = _loss_and_lora_grads(ref, batch)
    torch.testing.assert_close(loss, ref_loss, **FP32)
    assert grads.keys() == ref_grads.keys()
    for n in grads:
        torch.testing.assert_close(grads[n], ref_grads[n], **FP32, msg=lambda m, n=n: f"{n}: {m}")
    _no_16bit_experts(model)
    fastft.patch(model)
    assert fastft.unpatch(model)
    torch.testing.assert_close(_loss_and_lora_grads(model, batch)[0], ref_loss, **FP32)  # unpatch keeps it


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_disable_adapter_and_enabled_match_the_oracle(family):
    """``disable_adapter()`` (a preference reference model): the 4-bit base experts' numbers; enabled again: LoRA's."""
    model = _qlora(family)
    ref = _dense_copy(model)
    batch = _batch(model)
    report = _patch(model)
    with torch.no_grad():
        with model.disable_adapter():
            got_base = model(**batch).logits
        with ref.disable_adapter():
            want_base = ref(**batch).logits
        got, want = model(**batch).logits, ref(**batch).logits
    torch.testing.assert_close(got_base, want_base, **FP32)
    torch.testing.assert_close(got, want, **FP32)
    assert not torch.allclose(got_base, got)
    assert report.fallbacks and all("adapters disabled" in k for k in report.fallbacks)
    _no_16bit_experts(model)


def test_two_adapters_fall_back_to_peft_on_a_dequantised_copy():
    """Two active adapters (not fused): PEFT's own forward on a transient 16-bit copy, reported; the 4-bit
    weights are back after the call and the gradients are PEFT's."""
    model = _qlora("qwen3_moe", second=True)
    model.base_model.set_adapter(["default", "second"])
    ref = _dense_copy(model)
    batch = _batch(model)
    report = _patch(model)
    loss, grads = _loss_and_lora_grads(model, batch)
    ref_loss, ref_grads = _loss_and_lora_grads(ref, batch)
    assert any("2 active adapters" in k and "4-bit experts dequantised" in k for k in report.fallbacks)
    torch.testing.assert_close(loss, ref_loss, **FP32)
    assert grads.keys() == ref_grads.keys() and any("second" in n for n in grads)
    for n in grads:
        torch.testing.assert_close(grads[n], ref_grads[n], **FP32, msg=lambda m, n=n: f"{n}: {m}")
    _no_16bit_experts(model)


def test_merge_into_4bit_experts_is_a_clear_error():
    model = _qlora("mixtral")
    batch = _batch(model)
    _patch(model)
    with torch.no_grad():
        before = model(**batch).logits
    for merge in (model.merge_adapter, model.merge_and_unload):
        with pytest.raises(ValueError, match="cannot merge a LoRA adapter into 4-bit"):
            merge()
    wrappers = [m for n, m in model.named_modules() if n.endswith("mlp.experts")]
    assert wrappers and not any(w.merged for w in wrappers)
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, before, rtol=0, atol=0)


def test_merge_with_4bit_experts_raises_before_any_linear_layer_merges():
    """LoRA on the attention (over fastft's 4-bit linears, which do merge) and on 4-bit experts (which do
    not): the patched model refuses before PEFT merges the first layer, not half-way through it."""
    from peft import LoraConfig, get_peft_model

    model = _model("qwen3_moe")
    model.config._experts_implementation = "eager"
    cfg = LoraConfig(r=4, target_modules=["q_proj", "o_proj"], target_parameters=TARGETS["both"],
                     init_lora_weights=False)  # fmt: skip
    pm = fastft.quantize(get_peft_model(model, cfg))
    _patch(pm)
    linears = [m for m in pm.modules() if hasattr(m, "lora_A") and isinstance(m.base_layer, Linear4bit)]
    bytes_before = [m.base_layer.weight.clone() for m in linears]
    assert linears
    for merge in (pm.merge_adapter, pm.merge_and_unload):
        with pytest.raises(ValueError, match="experts.*cannot merge a LoRA adapter into 4-bit"):
            merge()
    assert not any(m.merged for m in linears)
    assert all(torch.equal(m.base_layer.weight, b) for m, b in zip(linears, bytes_before))
    fastft.unpatch(pm)
    assert "_check_merge_allowed" not in pm.base_model.__dict__


def test_quantize_before_get_peft_model_says_why_the_experts_stay_frozen():
    """PEFT cannot wrap a packed weight: target_parameters then match nothing; fastft.patch warns with the
    order that works and reports each 4-bit expert weight left frozen (LoRA on the linear layers still runs)."""
    from peft import LoraConfig, get_peft_model

    model = _model("qwen3_moe")
    fastft.quantize(model)
    with pytest.warns(RuntimeWarning, match="no parameter was matched"):
        pm = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj"], target_parameters=TARGETS["both"]))
    with pytest.warns(UserWarning, match=r"fastft.quantize ran before get_peft_model.*get_peft_model\(model"):
        report = fastft.patch(pm)
    skipped = [s for s in report.skipped if s.feature == "experts" and "PEFT did not wrap" in s.reason]
    assert len(skipped) == 2 * len(_experts_modules(pm))
    assert any(p.feature == "lora" and "q_proj" in p.target for p in report.patched)


def test_no_16bit_expert_stack_saved_in_a_patched_step():
    """Forward + backward of one experts module: no tensor the size of an expert weight is saved for
    backward (the 4-bit weights are dequantised inside each GEMM, forward and backward, transiently)."""
    from fastft.ledger import Ledger

    model = _qlora("qwen3_moe")
    wrapper = [m for n, m in model.named_modules() if n.endswith("mlp.experts")][0]
    base = _experts_modules(model)[0][1]
    E, H = base.gate_up_proj.shape[0], model.config.hidden_size
    smallest = min(base.gate_up_proj.shape.numel(), base.down_proj.shape.numel())
    T = 20
    x = torch.randn(T, H, requires_grad=True)
    idx, w = torch.stack([torch.randperm(E)[:2] for _ in range(T)]), torch.rand(T, 2, requires_grad=True)
    assert T * 2 * base.gate_up_proj.shape[1] < smallest  # the activations are smaller than an expert weight
    report = _patch(model)
    with Ledger(min_numel=smallest) as led:
        wrapper(x, idx, w).sum().backward()
    assert not report.fallbacks
    assert not [s for s in led.saved if s.tensor.numel >= smallest], led.table()
    # what is formed that large is the dequantised weight, once per GEMM (2 forward, 2 backward), no delta
    assert len(led.temporaries) <= 4, led.table()
    lora = [p for n, p in wrapper.named_parameters() if "lora_" in n]
    assert lora and all(p.grad is not None and p.grad.abs().max() > 0 for p in lora)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_lora_on_4bit_experts_in_one_expert_chunks_equals_the_whole_stack(dtype, monkeypatch):
    """LoRA r4 on both GEMMs over 4-bit experts with a one-expert dequantisation budget (CPU): output and
    the gradients of x, the routing weights and the four factors equal the same op over the whole
    dequantised stacks bit for bit (experts 1 and 5 get no rows, expert 4 is in every token's top-2), and
    the largest dense weight formed in the step is one expert's (the unbounded budget: three)."""
    import fastft.ops.experts as op
    from fastft.ledger import Ledger
    from fastft.ops.experts import ExpertsLora, experts

    E, T, H, IN, r = 6, 24, 32, 48, 4
    g = torch.Generator().manual_seed(3)
    q1 = ExpertsWeight4bit.from_weight((torch.randn(E, 2 * IN, H, generator=g) * H**-0.5).to(dtype))
    q2 = ExpertsWeight4bit.from_weight((torch.randn(E, H, IN, generator=g) * IN**-0.5).to(dtype))
    d1, d2 = q1.dequantize(), q2.dequantize()

    def factors(out_f, in_f):  # fp32 adapters, as PEFT keeps them
        A = (torch.randn(E, r, in_f, generator=g) * in_f**-0.5).requires_grad_()
        return ExpertsLora(A, (torch.randn(E, out_f, r, generator=g) * r**-0.5).requires_grad_(), 2.0)

    lora = dict(lora_gate_up=factors(2 * IN, H), lora_down=factors(H, IN))
    idx = torch.stack((torch.full((T,), 4), torch.tensor([0, 2, 3])[torch.randint(0, 3, (T,), generator=g)]), 1)
    x = torch.randn(T, H, generator=g).to(dtype).requires_grad_()
    w = torch.rand(T, 2, generator=g).to(dtype).softmax(-1).requires_grad_()
    leaves = [x, w] + [t for f in lora.values() for t in (f.A, f.B)]
    dout = torch.randn(T, H, generator=g).to(dtype)

    def step(a, b):
        out = experts(x, idx, w, a, b, **lora)
        return [out.detach(), *torch.autograd.grad(out, leaves, dout)]

    ref = step(d1, d2)
    one = 2 * IN * H  # one expert of gate_up dequantised
    # per GEMM: experts 0, 2, 3, 4 one at a time; unbounded: expert 0, then experts 2-4 as one chunk
    for budget, chunks, largest in ((0, 4, one), (1 << 40, 2, 3 * one)):
        monkeypatch.setattr(op, "DEQUANT_CHUNK_BYTES", budget)
        with Ledger(min_numel=one) as led:
            got = step(q1, q2)
        for a, b in zip(got, ref):
            assert torch.equal(a, b)
        dense = [o.numel for k in led.launches if k.name == "dequantize_nf4" for o in k.outputs]
        assert len(dense) == 4 * chunks and max(dense) == largest, led.table()


def _dequantised_16bit(family, qmodel):
    """A fresh 16-bit model holding the numbers ``qmodel``'s 4-bit layers and experts stand for."""
    fresh = _model(family)
    fresh.config._experts_implementation = "eager"
    mods = dict(fresh.named_modules())
    with torch.no_grad():
        for name, m in qmodel.get_base_model().named_modules():
            plain = name.replace(".base_layer", "")
            if isinstance(m, Linear4bit):
                mods[plain].weight.copy_(dequantize_nf4(m.weight, m.quant_state, dtype=torch.float32))
            for pname in ("gate_up_proj", "down_proj"):
                w = getattr(m, pname, None)
                if isinstance(w, ExpertsWeight4bit):
                    getattr(mods[plain], pname).copy_(w.dequantize(torch.float32))
    return fresh


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
def test_saved_adapters_load_in_plain_peft_over_the_dequantised_model(family, tmp_path):
    from peft import PeftModel

    model = _qlora(family)
    batch = _batch(model)
    report = _patch(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    model(**batch).loss.backward()
    opt.step()
    assert not report.fallbacks
    assert all(not torch.equal(before[n], p) for n, p in model.named_parameters() if p.requires_grad)
    with torch.no_grad():
        logits = model(**batch).logits
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(_dequantised_16bit(family, model), tmp_path)
    with torch.no_grad():
        plain = loaded(**batch).logits
    torch.testing.assert_close(logits, plain, **FP32)
    # the adapter merges exactly on the 16-bit model (what the merge error tells 4-bit users to do)
    merged = copy.deepcopy(loaded).merge_and_unload()
    with torch.no_grad():
        torch.testing.assert_close(merged(**batch).logits, plain, rtol=1e-4, atol=1e-4)


def test_trainer_qlora_trains_the_4bit_experts_lora(tmp_path, capsys):
    from test_trainer import TOK, _adapter, _cfg, _records

    model = _model("qwen3_moe")
    result = fastft.train(
        _cfg(tmp_path, method="qlora", max_steps=3, eval_every=3, dropout=0.1, quiet=False),
        model=model,
        tokenizer=TOK,
        train_data=_records(8),
        eval_data=_records(2, seed=1),
    )
    printed = capsys.readouterr().out
    assert "LoRA on expert weights (target_parameters=['experts.down_proj', 'experts.gate_up_proj'])" in printed
    assert "on 4-bit (NF4) experts" in printed and "4-bit (NF4) base dequantised inside the GEMMs" in printed
    assert "dropout 0.1 on the linear layers only" in printed and "stay frozen" not in printed
    assert all(isinstance(m.gate_up_proj, ExpertsWeight4bit) for _, m in _experts_modules(model))
    assert all(isinstance(m, Linear4bit) for n, m in model.named_modules() if n.endswith("q_proj.base_layer"))
    sd = _adapter(tmp_path / "checkpoint-last")
    expert_b = {k: v for k, v in sd.items() if "experts" in k and "lora_B" in k}
    assert expert_b and any("q_proj.lora_A" in k for k in sd)
    assert all(v.abs().max() > 0 for v in expert_b.values())  # lora_B starts at zero: the experts' LoRA trained
    assert result.eval_loss < result.eval_loss_before


def test_trainer_dpo_qlora_on_moe(tmp_path):
    """DPO over 4-bit experts: the reference model is the same PEFT model under ``disable_adapter()`` (the
    base experts on their 4-bit weights), the policy the fused LoRA; the preference loss goes down."""
    from test_trainer import TOK, _adapter

    from fastft.preference import default_preference_records

    model = _model("qwen3_moe")
    cfg = fastft.TrainConfig(output_dir=str(tmp_path), objective="dpo", method="qlora", max_steps=2, batch_size=2,
                             seq_len=512, lr=1e-2, eval_every=2, warmup_steps=0, dropout=0.0, quiet=True,
                             num_generations=0)  # fmt: skip
    result = fastft.train(
        cfg,
        model=model,
        tokenizer=TOK,
        train_data=default_preference_records(8),
        eval_data=default_preference_records(4, seed=1),
    )
    assert all(isinstance(m.gate_up_proj, ExpertsWeight4bit) for _, m in _experts_modules(model))
    assert any("experts" in k and "lora_B" in k for k in _adapter(tmp_path / "checkpoint-last"))
    assert result.eval_loss < result.eval_loss_before
