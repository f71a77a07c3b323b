"""fastft.ops.experts and the experts patch: same numbers as the model's own eager experts."""

import sys

import pytest
import torch

import fastft
from fastft.ops.experts import ExpertsActivation, experts, experts_reference
from fastft.patching.experts import FusedExpertsForward

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from zoo_configs import tiny_config  # noqa: E402

FAMILIES = ["mixtral", "qwen3_moe", "olmoe", "deepseek_v3", "gpt_oss"]
# (dtype, rtol, atol) for fp32; bf16 is judged by the bf16 rule against an fp32 oracle
FP32 = dict(rtol=1e-5, atol=1e-4)


def _weights(E, H, IN, transposed, bias, dtype=torch.float32):
    w1 = torch.randn((E, H, 2 * IN) if transposed else (E, 2 * IN, H)) / H**0.5
    w2 = torch.randn((E, IN, H) if transposed else (E, H, IN)) / IN**0.5
    b1 = torch.randn(E, 2 * IN) * 0.1 if bias else None
    b2 = torch.randn(E, H) * 0.1 if bias else None
    return [None if t is None else t.to(dtype).requires_grad_() for t in (w1, w2, b1, b2)]


def _run(fn, x, idx, w, ws, act, transposed, d):
    out = fn(x, idx, w, *ws, act=act, transposed=transposed)
    params = [p for p in (x, w, *ws) if p is not None]
    return out, torch.autograd.grad(out, params, d)


ACTS = [
    (ExpertsActivation("silu"), False, False),
    (ExpertsActivation("gelu"), False, False),
    (ExpertsActivation("gelu_tanh"), False, False),
    (ExpertsActivation("gpt_oss", alpha=1.702, limit=1.5), True, True),
]


@pytest.mark.parametrize("act,transposed,bias", ACTS, ids=lambda v: getattr(v, "kind", str(v)))
@pytest.mark.parametrize("routing", ["random", "one_expert_all", "unused_experts"])
@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("H,IN", [(16, 24), (13, 7)])  # aligned (grouped_mm) and odd (per-expert loop)
def test_op_matches_reference_fp32(act, transposed, bias, routing, top_k, H, IN):
    E, T = 5, 11
    x = torch.randn(T, H, requires_grad=True)
    idx = torch.stack([torch.randperm(E)[:top_k] for _ in range(T)])
    if routing == "one_expert_all":
        idx[:, 0] = 3
        if top_k == 2:
            idx[:, 1] = 1
    elif routing == "unused_experts":  # experts 0, 2, 4 get no token
        idx = torch.where(torch.rand(T, top_k) < 0.5, 1, 3)
        if top_k == 2:
            idx[:, 1] = 4 - idx[:, 0]
    w = torch.rand(T, top_k).requires_grad_()
    ws = _weights(E, H, IN, transposed, bias)
    d = torch.randn(T, H)
    out, grads = _run(experts, x, idx, w, ws, act, transposed, d)
    ref, ref_grads = _run(experts_reference, x, idx, w, ws, act, transposed, d)
    torch.testing.assert_close(out, ref, **FP32)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, **FP32)
    if routing == "unused_experts":  # experts that got no token get exactly zero weight gradient
        assert grads[2][[0, 2]].abs().max() == 0


@pytest.mark.parametrize("act,transposed,bias", ACTS, ids=lambda v: getattr(v, "kind", str(v)))
def test_op_bf16_rule(act, transposed, bias):
    E, T, H, IN, K = 4, 37, 32, 48, 2
    x32 = torch.randn(T, H)
    idx = torch.stack([torch.randperm(E)[:K] for _ in range(T)])
    w32 = torch.rand(T, K)
    ws32 = [None if t is None else t.detach() for t in _weights(E, H, IN, transposed, bias)]
    d32 = torch.randn(T, H)

    def grads_of(fn, dtype):
        x = x32.to(dtype).requires_grad_()
        w = w32.to(dtype).requires_grad_()
        ws = [None if t is None else t.to(dtype).requires_grad_() for t in ws32]
        out, g = _run(fn, x, idx, w, ws, act, transposed, d32.to(dtype))
        return [out.float()] + [t.float() for t in g]

    oracle = grads_of(experts_reference, torch.float32)
    plain = grads_of(experts_reference, torch.bfloat16)
    fast = grads_of(experts, torch.bfloat16)
    for f, p, o in zip(fast, plain, oracle):
        assert (f - o).abs().max() <= 2 * (p - o).abs().max() + 1e-6


def test_op_rejects_bad_input():
    x = torch.randn(4, 8)
    w1, w2 = torch.randn(3, 12, 8), torch.randn(3, 8, 6)
    idx, w = torch.zeros(4, 2, dtype=torch.long), torch.rand(4, 2)
    with pytest.raises(ValueError, match=r"top_k_index values must lie in \[0, 3\)"):
        experts(x, idx + 3, w, w1, w2)
    with pytest.raises(ValueError, match="do not fit hidden 8"):
        experts(x, idx, w, w1, torch.randn(3, 7, 6))
    with pytest.raises(ValueError, match=r"must both be \(tokens=4, top_k\)"):
        experts(x, idx, w[:, :1], w1, w2)
    with pytest.raises(TypeError, match="integer tensor"):
        experts(x, idx.float(), w, w1, w2)
    with pytest.raises(ValueError, match="activation kind"):
        ExpertsActivation("relu")


# --------------------------------------------------------------------------------------
# the patch, on tiny models of each family
# --------------------------------------------------------------------------------------
def _model(family, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = tiny_config(family)
    model = AutoModelForCausalLM.from_config(cfg).to(dtype)
    with torch.no_grad():  # tiny random init leaves biases / some weights at zero: make them count
        for n, p in model.named_parameters():
            if "experts" in n or "router" in n or "gate" in n:
                p.normal_(0, 0.2)
    return model


def _experts_modules(model):
    from fastft.patching.experts import is_experts_module

    return [(n, m) for n, m in model.named_modules() if is_experts_module(m)]


def _batch(model, T=12):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (2, T), generator=g)
    return dict(input_ids=ids, labels=ids)


def _loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family", FAMILIES)
def test_patched_model_matches_eager(family, monkeypatch):
    import fastft.ops.experts as op

    calls = []
    call = op._op.experts_op_call  # 16-bit experts run the operators (fastft.ops.experts_op)
    monkeypatch.setattr(op._op, "experts_op_call", lambda *a: calls.append(1) or call(*a))
    model = _model(family)
    model.config._experts_implementation = "eager"
    batch = _batch(model)
    ref_loss, ref_grads = _loss_and_grads(model, batch)
    report = fastft.patch(model, loss=False, norms=False, rope=False, mlp=False)
    mods = _experts_modules(model)
    assert mods and all(isinstance(m.__dict__["_fastft_experts"], FusedExpertsForward) for _, m in mods)
    assert {p.target for p in report.patched if p.feature == "experts"} == {n for n, _ in mods}
    assert model.config._experts_implementation == "fastft"
    loss, grads = _loss_and_grads(model, batch)
    assert not report.fallbacks and len(calls) == len(mods)  # every experts module ran the fused op
    torch.testing.assert_close(loss, ref_loss, **FP32)
    assert grads.keys() == ref_grads.keys()
    for n in grads:
        torch.testing.assert_close(grads[n], ref_grads[n], **FP32, msg=lambda m, n=n: f"{n}: {m}")
    assert fastft.unpatch(model)
    assert model.config._experts_implementation == "eager"
    assert all("_fastft_experts" not in m.__dict__ for _, m in mods)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("routing", ["one_expert_all", "unused_experts", "top1"])
def test_patched_module_edge_routing(family, routing):
    """Each family's experts module, called with designed routing, vs its own eager loop (fp32 and bf16)."""
    model = _model(family)
    name, mod = _experts_modules(model)[0]
    E = mod.gate_up_proj.shape[0]
    T, K = 9, (1 if routing == "top1" else 2)
    H = model.config.hidden_size
    idx = torch.stack([torch.randperm(E)[:K] for _ in range(T)])
    if routing == "one_expert_all":
        idx[:, 0] = E - 1
    elif routing == "unused_experts":
        idx = torch.stack([torch.zeros(T, dtype=torch.long), torch.ones(T, dtype=torch.long)], 1)
    x32, w32, d32 = torch.randn(T, H), torch.rand(T, K), torch.randn(T, H)

    def run(impl, dtype):
        mod.to(dtype)
        model.config._experts_implementation = "eager"
        if impl == "fastft":
            fastft.patch(model, loss=False, norms=False, rope=False, mlp=False)
        mod.zero_grad(set_to_none=True)
        x, w = x32.to(dtype).clone().requires_grad_(), w32.to(dtype).clone().requires_grad_()
        out = mod(x, idx, w)
        out.backward(d32.to(dtype))
        res = [out.detach().float(), x.grad.float(), w.grad.float()]
        res += [p.grad.float() for _, p in sorted(mod.named_parameters())]
        fastft.unpatch(model)
        return res

    fast, eager = run("fastft", torch.float32), run("eager", torch.float32)
    for f, e in zip(fast, eager):
        torch.testing.assert_close(f, e, **FP32)
    fast16, eager16 = run("fastft", torch.bfloat16), run("eager", torch.bfloat16)
    for f, p, o in zip(fast16, eager16, eager):
        assert (f - o).abs().max() <= 2 * (p - o).abs().max() + 1e-6


def test_guard_falls_back_and_reports():
    model = _model("qwen3_moe")
    report = fastft.patch(model, loss=False, norms=False, rope=False, mlp=False)
    name, mod = _experts_modules(model)[0]
    mod._is_expert_parallel = True
    x = torch.randn(3, model.config.hidden_size)
    idx, w = torch.zeros(3, 2, dtype=torch.long), torch.rand(3, 2)
    idx[:, 1] = 1
    model.config._experts_implementation_internal = "fastft"
    out = mod(x, idx, w)
    mod._is_expert_parallel = False
    torch.testing.assert_close(out, mod(x, idx, w), **FP32)
    assert any("expert-parallel" in k and name in k for k in report.fallbacks)
    assert "experts" in str(report) and "was grouped_mm" in str(report)
    assert fastft.unpatch(model) and model.config._experts_implementation == "grouped_mm"  # the default, back


def test_no_experts_reported_and_disabled():
    from fastft.testing import tiny_model

    report = fastft.patch(tiny_model("llama"), loss=False)
    assert any(s.feature == "experts" and "no transformers experts" in s.reason for s in report.skipped)
    model = _model("mixtral")
    report = fastft.patch(model, experts=False, loss=False)
    assert model.config._experts_implementation != "fastft"
    assert any(s.feature == "experts" and s.reason == "disabled by the caller" for s in report.skipped)


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_peft_target_parameters_lora_on_patched_experts(family):
    """PEFT LoRA on expert weights (target_parameters) under the experts patch: PEFT's loss and every LoRA grad.

    The fused LoRA path itself is tested in test_experts_lora.py; here: both experts modules and both
    wrapper chains are patched."""
    from peft import LoraConfig, get_peft_model

    model = _model(family)
    model.config._experts_implementation = "eager"
    cfg = LoraConfig(
        r=4, target_modules=[], target_parameters=["experts.gate_up_proj", "experts.down_proj"], init_lora_weights=False
    )
    peft_model = get_peft_model(model, cfg)
    batch = _batch(model)
    ref_loss, ref_grads = _loss_and_grads(peft_model, batch)
    assert ref_grads and all("lora_" in n for n in ref_grads)
    report = fastft.patch(peft_model, loss=False, norms=False, rope=False, mlp=False)
    lines = [p.detail for p in report.patched if p.feature == "experts"]
    assert len(lines) == 4 and sum("experts + LoRA (fused)" in d for d in lines) == 2
    loss, grads = _loss_and_grads(peft_model, batch)
    assert not report.fallbacks
    torch.testing.assert_close(loss, ref_loss, **FP32)
    assert grads.keys() == ref_grads.keys()
    for n in grads:
        torch.testing.assert_close(grads[n], ref_grads[n], **FP32)
