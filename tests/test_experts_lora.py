"""LoRA on the experts, fused: the op against its reference, the patch against PEFT's ``target_parameters``."""

import copy
import sys

import pytest
import torch

import fastft
from fastft.ops.experts import ExpertsLora, experts, experts_reference

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from test_experts import ACTS, FAMILIES, FP32, _batch, _experts_modules, _model  # noqa: E402

TARGETS = {
    "gate_up": ["experts.gate_up_proj"],
    "down": ["experts.down_proj"],
    "both": ["experts.gate_up_proj", "experts.down_proj"],
}


def _bf16_ok(fast, plain, oracle):
    """The bf16 rule: fastft's error against the fp32 oracle is at most twice plain bf16 PyTorch's."""
    return (fast - oracle).abs().max() <= 2 * (plain - oracle).abs().max() + 1e-6


# --------------------------------------------------------------------------------------
# the op
# --------------------------------------------------------------------------------------
def _adapters(E, H, IN, r, which, dtype=torch.float32):
    """``(lora_gate_up, lora_down, tensors)``: random factors (B not zero, so every gradient counts)."""
    l1 = l2 = None
    ts = []
    if which in ("gate_up", "both"):
        A, B = torch.randn(E, r, H) / H**0.5, torch.randn(E, 2 * IN, r) / r**0.5
        ts += [A.to(dtype).requires_grad_(), B.to(dtype).requires_grad_()]
        l1 = ExpertsLora(ts[-2], ts[-1], 0.5)
    if which in ("down", "both"):
        A, B = torch.randn(E, r, IN) / IN**0.5, torch.randn(E, H, r) / r**0.5
        ts += [A.to(dtype).requires_grad_(), B.to(dtype).requires_grad_()]
        l2 = ExpertsLora(ts[-2], ts[-1], 2.0)
    return l1, l2, ts


def _routing(kind, E, T, top_k):
    idx = torch.stack([torch.randperm(E)[:top_k] for _ in range(T)])
    if kind == "one_expert_all":
        idx[:, 0] = 3
        if top_k == 2:
            idx[:, 1] = 1
    elif kind == "unused_experts":  # experts 0, 2, 4 get no token
        idx = torch.where(torch.rand(T, top_k) < 0.5, 1, 3)
        if top_k == 2:
            idx[:, 1] = 4 - idx[:, 0]
    return idx


def _weights(E, H, IN, transposed, bias, frozen, dtype=torch.float32):
    w1 = torch.randn((E, H, 2 * IN) if transposed else (E, 2 * IN, H)) / H**0.5
    w2 = torch.randn((E, IN, H) if transposed else (E, H, IN)) / IN**0.5
    b1 = torch.randn(E, 2 * IN) * 0.1 if bias else None
    b2 = torch.randn(E, H) * 0.1 if bias else None
    return [None if t is None else t.to(dtype).requires_grad_(not frozen) for t in (w1, w2, b1, b2)]


def _run(fn, x, idx, w, ws, l1, l2, act, transposed, d, inputs):
    out = fn(x, idx, w, *ws, act=act, transposed=transposed, lora_gate_up=l1, lora_down=l2)
    return [out] + list(torch.autograd.grad(out, inputs, d))


@pytest.mark.parametrize("act,transposed,bias", ACTS, ids=lambda v: getattr(v, "kind", str(v)))
@pytest.mark.parametrize("which", ["gate_up", "down", "both"])
@pytest.mark.parametrize("routing", ["random", "one_expert_all", "unused_experts"])
@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("H,IN,r", [(16, 24, 4), (13, 7, 3)])  # aligned (grouped_mm) and odd (per-expert loop)
@pytest.mark.parametrize("dense", [True, False], ids=["cpu-dense", "grouped"])
def test_op_lora_matches_reference_fp32(act, transposed, bias, which, routing, top_k, H, IN, r, dense, monkeypatch):
    """Both forms of the rank-r products: a CPU's dense one over all experts, and the grouped GEMMs
    (what a GPU runs, and a CPU past experts_lora.DENSE_MAX_N)."""
    if not dense:
        monkeypatch.setattr("fastft.ops.experts_lora.DENSE_MAX_N", 0)
    E, T = 5, 11
    x = torch.randn(T, H, requires_grad=True)
    idx = _routing(routing, E, T, top_k)
    w = torch.rand(T, top_k).requires_grad_()
    frozen = routing != "random"  # the frozen base (LoRA's case) and a trainable one
    ws = _weights(E, H, IN, transposed, bias, frozen)
    l1, l2, ts = _adapters(E, H, IN, r, which)
    inputs = [x, w, *ts] + [t for t in ws if t is not None and t.requires_grad]
    d = torch.randn(T, H)
    got = _run(experts, x, idx, w, ws, l1, l2, act, transposed, d, inputs)
    want = _run(experts_reference, x, idx, w, ws, l1, l2, act, transposed, d, inputs)
    for g, r_ in zip(got, want):
        torch.testing.assert_close(g, r_, **FP32)
    if routing == "unused_experts":  # experts that got no token get exactly zero adapter gradients
        for g in got[3 : 3 + len(ts)]:
            assert g[[0, 2]].abs().max() == 0 and g[[1, 3]].abs().max() > 0


@pytest.mark.parametrize("act,transposed,bias", ACTS, ids=lambda v: getattr(v, "kind", str(v)))
@pytest.mark.parametrize("dense", [True, False], ids=["cpu-dense", "grouped"])
def test_op_lora_bf16_rule_fp32_adapters(act, transposed, bias, dense, monkeypatch):
    """bf16 activations and experts, fp32 adapters: within twice plain bf16's error; adapter grads in fp32."""
    if not dense:
        monkeypatch.setattr("fastft.ops.experts_lora.DENSE_MAX_N", 0)
    E, T, H, IN, K, r = 4, 37, 32, 48, 2, 8
    x32, idx, w32, d32 = torch.randn(T, H), _routing("random", E, T, K), torch.rand(T, K), torch.randn(T, H)
    ws32 = [None if t is None else t.detach() for t in _weights(E, H, IN, transposed, bias, True)]
    _, _, ts32 = _adapters(E, H, IN, r, "both")
    ts32 = [t.detach() for t in ts32]

    def grads_of(fn, dtype):
        x, w = x32.to(dtype).requires_grad_(), w32.to(dtype).requires_grad_()
        ws = [None if t is None else t.to(dtype) for t in ws32]
        ts = [t.clone().requires_grad_() for t in ts32]  # adapters stay fp32
        l1, l2 = ExpertsLora(ts[0], ts[1], 0.5), ExpertsLora(ts[2], ts[3], 2.0)
        res = _run(fn, x, idx, w, ws, l1, l2, act, transposed, d32.to(dtype), [x, w, *ts])
        assert all(g.dtype == torch.float32 for g in res[3:])  # the adapters' gradients in their own dtype
        return [t.float() for t in res]

    oracle = grads_of(experts_reference, torch.float32)
    plain, fast = grads_of(experts_reference, torch.bfloat16), grads_of(experts, torch.bfloat16)
    for f, p, o in zip(fast, plain, oracle):
        assert _bf16_ok(f, p, o)


def test_op_lora_rejects_bad_adapters():
    E, H, IN = 3, 8, 6
    x, idx, w = torch.randn(4, H), torch.zeros(4, 2, dtype=torch.long), torch.rand(4, 2)
    w1, w2 = torch.randn(E, 2 * IN, H), torch.randn(E, H, IN)
    with pytest.raises(ValueError, match=r"lora_gate_up factors must be A \(E=3, r, 8\)"):
        experts(x, idx, w, w1, w2, lora_gate_up=ExpertsLora(torch.randn(E, 2, 7), torch.randn(E, 12, 2)))
    with pytest.raises(ValueError, match=r"lora_down factors .* got \(3, 2, 6\) and \(3, 8, 3\)"):
        experts(x, idx, w, w1, w2, lora_down=ExpertsLora(torch.randn(E, 2, IN), torch.randn(E, H, 3)))
    with pytest.raises(ValueError, match=r"E=3"):
        experts(x, idx, w, w1, w2, lora_down=ExpertsLora(torch.randn(2, 2, IN), torch.randn(2, H, 2)))
    with pytest.raises(TypeError, match="must be an ExpertsLora"):
        experts(x, idx, w, w1, w2, lora_down=(torch.randn(E, 2, IN), torch.randn(E, H, 2)))


# --------------------------------------------------------------------------------------
# the patch: PEFT target_parameters on tiny models of each family
# --------------------------------------------------------------------------------------
def _peft(family, target, dtype=torch.float32, target_modules=(), r=4):
    from peft import LoraConfig, get_peft_model

    model = _model(family, dtype)
    model.config._experts_implementation = "eager"
    tm = target_modules if isinstance(target_modules, str) else list(target_modules)
    cfg = LoraConfig(r=r, lora_alpha=8, target_modules=tm, target_parameters=TARGETS[target], init_lora_weights=False)
    torch.manual_seed(2)
    return get_peft_model(model, cfg)


def _patch(model):
    return fastft.patch(model, loss=False, norms=False, rope=False, mlp=False)


def _loss_and_lora_grads(model, batch):
    model.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert grads and all("lora_" in n for n in grads)  # the base stays frozen
    return loss.detach(), grads


def _count_fused(monkeypatch):
    import fastft.patching.experts_lora as el

    calls = []
    fused = el.FusedExpertsLoraForward._fused
    monkeypatch.setattr(el.FusedExpertsLoraForward, "_fused", lambda *a: calls.append(1) or fused(*a))
    return calls


def _lora_lines(report):
    return [p for p in report.patched if p.feature == "experts" and "LoRA" in p.detail]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("target", list(TARGETS))
def test_patched_lora_matches_peft_fp32(family, target, monkeypatch):
    calls = _count_fused(monkeypatch)
    model = _peft(family, target)
    batch = _batch(model)
    ref_loss, ref_grads = _loss_and_lora_grads(model, batch)
    report = _patch(model)
    n_mods = len(_experts_modules(model))
    lines = _lora_lines(report)
    assert len(lines) == n_mods and all("experts + LoRA (fused)" in p.detail for p in lines)
    assert all(
        f"{name} r=4" in p.detail
        for p in lines
        for name in ("gate_up_proj", "down_proj")
        if name in str(TARGETS[target])
    )
    loss, grads = _loss_and_lora_grads(model, batch)
    assert not report.fallbacks and len(calls) == n_mods  # every experts module ran the fused LoRA op
    torch.testing.assert_close(loss, ref_loss, **FP32)
    assert grads.keys() == ref_grads.keys()
    for n in grads:
        torch.testing.assert_close(grads[n], ref_grads[n], **FP32, msg=lambda m, n=n: f"{n}: {m}")
    assert fastft.unpatch(model)
    wrappers = [m for n, m in model.named_modules() if n.endswith("mlp.experts")]
    assert wrappers and all("forward" not in m.__dict__ for m in wrappers)
    loss2, grads2 = _loss_and_lora_grads(model, batch)  # PEFT's own path again, same numbers
    assert len(calls) == n_mods
    torch.testing.assert_close(loss2, ref_loss, rtol=0, atol=0)


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_patched_lora_matches_peft_grouped_form(family, monkeypatch):
    """The grouped-GEMM form of the rank-r products (a GPU's) at model level too."""
    monkeypatch.setattr("fastft.ops.experts_lora.DENSE_MAX_N", 0)
    test_patched_lora_matches_peft_fp32(family, "both", monkeypatch)


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_patched_lora_with_all_linear(family, monkeypatch):
    """``target_modules="all-linear"`` plus the experts: the linear layers' LoRA and the experts' LoRA, both fused."""
    calls = _count_fused(monkeypatch)
    model = _peft(family, "both", target_modules="all-linear")
    batch = _batch(model)
    ref_loss, ref_grads = _loss_and_lora_grads(model, batch)
    assert any("q_proj" in n for n in ref_grads) and any("experts" in n for n in ref_grads)
    report = _patch(model)
    assert any(p.feature == "lora" for p in report.patched) and _lora_lines(report)
    loss, grads = _loss_and_lora_grads(model, batch)
    assert not report.fallbacks and calls
    torch.testing.assert_close(loss, ref_loss, **FP32)
    assert grads.keys() == ref_grads.keys()
    for n in grads:
        torch.testing.assert_close(grads[n], ref_grads[n], **FP32, msg=lambda m, n=n: f"{n}: {m}")


@pytest.mark.parametrize("family", FAMILIES)
def test_patched_lora_bf16_rule(family):
    """bf16 model, fp32 adapters (PEFT's autocast_adapter_dtype): logits and LoRA grads within twice plain bf16's
    error against the fp32 model."""
    ref = _peft(family, "both")
    batch = _batch(ref)
    o_loss, o_grads = _loss_and_lora_grads(ref, batch)
    plain = copy.deepcopy(ref).to(torch.bfloat16)
    for n, p in plain.named_parameters():
        if "lora_" in n:
            p.data = p.data.float()
    fast = copy.deepcopy(plain)
    p_loss, p_grads = _loss_and_lora_grads(plain, batch)
    report = _patch(fast)
    assert _lora_lines(report) and "float32 adapters cast once per call" in _lora_lines(report)[0].detail
    f_loss, f_grads = _loss_and_lora_grads(fast, batch)
    assert not report.fallbacks
    # the forward by its logits (a whole tensor: the scalar loss's error is one noisy sample)
    with torch.no_grad():
        o_logits, p_logits, f_logits = (m(**batch).logits.float() for m in (ref, plain, fast))
    assert _bf16_ok(f_logits, p_logits, o_logits)
    assert abs(f_loss.float() - o_loss) < 1e-2 * o_loss.abs()
    for n in o_grads:
        assert f_grads[n].dtype == torch.float32
        assert _bf16_ok(f_grads[n], p_grads[n], o_grads[n]), n


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("routing", ["one_expert_all", "unused_experts", "top1"])
def test_patched_lora_edge_routing(family, routing):
    """The experts module (its PEFT wrappers) called with designed routing: fused vs PEFT, fp32."""
    model = _peft(family, "both")
    wrapper = [m for n, m in model.named_modules() if n.endswith("mlp.experts")][0]
    base = _experts_modules(model)[0][1]
    E, H = base.gate_up_proj.shape[0], model.config.hidden_size
    T, K = 9, (1 if routing == "top1" else 2)
    idx = torch.stack([torch.randperm(E)[:K] for _ in range(T)])
    if routing == "one_expert_all":
        idx[:, 0] = E - 1
    elif routing == "unused_experts":
        idx = torch.stack([torch.zeros(T, dtype=torch.long), torch.ones(T, dtype=torch.long)], 1)
    x0, w0, d = torch.randn(T, H), torch.rand(T, K), torch.randn(T, H)
    lora = [p for n, p in wrapper.named_parameters() if "lora_" in n]

    def run():
        x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
        out = wrapper(x, idx, w)
        return [out] + list(torch.autograd.grad(out, [x, w, *lora], d))

    want = run()
    report = _patch(model)
    got = run()
    assert not report.fallbacks
    for g, r_ in zip(got, want):
        torch.testing.assert_close(g, r_, **FP32)
    if routing == "unused_experts":  # experts 2.. got no token: their A rows are exactly zero-gradient
        r = wrapper.r["default"]
        dA = got[3]  # the first adapter's lora_A.weight grad, (E r, in), expert-major rows
        assert dA[2 * r :].abs().max() == 0 and dA[: 2 * r].abs().max() > 0


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
def test_saved_adapters_load_in_plain_peft(family, tmp_path):
    """A patched optimizer step, ``save_pretrained``, then plain PEFT on a fresh base: identical logits."""
    from peft import PeftModel

    model = _peft(family, "both")
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
    fresh = _model(family)
    fresh.config._experts_implementation = "eager"
    loaded = PeftModel.from_pretrained(fresh, tmp_path)
    with torch.no_grad():
        plain = loaded(**batch).logits
    torch.testing.assert_close(logits, plain, **FP32)


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3"])
def test_disable_adapter_gives_base_outputs(family):
    """``disable_adapter()`` (the reference model of preference training): the base model's numbers."""
    model = _peft(family, "both")
    batch = _batch(model)
    with model.disable_adapter(), torch.no_grad():
        base_logits = model(**batch).logits
    with torch.no_grad():
        lora_logits = model(**batch).logits
    report = _patch(model)
    with model.disable_adapter(), torch.no_grad():
        got = model(**batch).logits
    torch.testing.assert_close(got, base_logits, **FP32)
    assert any("adapters disabled" in k for k in report.fallbacks)  # PEFT's path: the fused base experts op
    n_fallbacks = sum(report.fallbacks.values())
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, lora_logits, **FP32)
    assert sum(report.fallbacks.values()) == n_fallbacks  # enabled again: fused again
    assert not torch.allclose(base_logits, lora_logits)


def test_merged_and_two_adapters_fall_back_to_peft():
    from peft import LoraConfig

    model = _peft("qwen3_moe", "both")
    batch = _batch(model)
    report = _patch(model)
    with torch.no_grad():
        fused = model(**batch).logits
        model.merge_adapter()
        merged = model(**batch).logits
        model.unmerge_adapter()
    assert any("merged" in k for k in report.fallbacks)
    torch.testing.assert_close(merged, fused, rtol=1e-4, atol=1e-4)
    cfg = LoraConfig(r=2, target_modules=[], target_parameters=TARGETS["both"], init_lora_weights=False)
    model.add_adapter("second", cfg)
    model.base_model.set_adapter(["default", "second"])
    with torch.no_grad():
        two = model(**batch).logits
    assert any("2 active adapters" in k for k in report.fallbacks)
    fastft.unpatch(model)
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, two, **FP32)


def test_no_expert_sized_tensor_in_patched_lora_step():
    """Frozen base, LoRA on both expert weights: forward + backward allocate nothing the size of an expert
    weight (PEFT's path forms the (E, out, in) delta and its gradient; the fused one only rank-sized tensors)."""
    from fastft.ledger import Ledger

    model = _peft("qwen3_moe", "both")
    wrapper = [m for n, m in model.named_modules() if n.endswith("mlp.experts")][0]
    base = _experts_modules(model)[0][1]
    E, H = base.gate_up_proj.shape[0], model.config.hidden_size
    smallest = min(base.gate_up_proj.numel(), base.down_proj.numel())
    T = 20
    x = torch.randn(T, H, requires_grad=True)
    idx, w = torch.stack([torch.randperm(E)[:2] for _ in range(T)]), torch.rand(T, 2, requires_grad=True)
    assert T * 2 * base.gate_up_proj.shape[1] < smallest  # the activations are smaller than an expert weight

    def step():
        with Ledger(min_numel=smallest) as led:
            wrapper(x, idx, w).sum().backward()
        return led

    plain = step()
    assert plain.temporaries  # PEFT: the delta weight (and its gradient)
    report = _patch(model)
    led = step()
    assert not report.fallbacks and not led.temporaries, led.table()
    assert all(p.grad is None for p in (base.gate_up_proj, base.down_proj))


def test_peft_all_linear_alone_targets_the_experts_with_their_own_ranks(monkeypatch):
    """PEFT's own ``all-linear`` expansion on an MoE model (no target_parameters given): the expert weights get
    wrappers of different ranks (gate_up_proj 2r, PEFT's rank_pattern); fused, with PEFT's numbers."""
    from peft import LoraConfig, get_peft_model

    calls = _count_fused(monkeypatch)
    model = _model("qwen3_moe")
    model.config._experts_implementation = "eager"
    torch.manual_seed(2)
    model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    batch = _batch(model)
    ref_loss, ref_grads = _loss_and_lora_grads(model, batch)
    report = _patch(model)
    lines = _lora_lines(report)
    assert lines and all("gate_up_proj r=8, down_proj r=4" in p.detail for p in lines)
    loss, grads = _loss_and_lora_grads(model, batch)
    assert not report.fallbacks and len(calls) == len(lines)
    torch.testing.assert_close(loss, ref_loss, **FP32)
    assert grads.keys() == ref_grads.keys()
    for n in grads:
        torch.testing.assert_close(grads[n], ref_grads[n], **FP32, msg=lambda m, n=n: f"{n}: {m}")


def test_experts_disabled_keeps_peft_and_says_so():
    model = _peft("mixtral", "both")
    batch = _batch(model)
    ref_loss, _ = _loss_and_lora_grads(model, batch)
    report = fastft.patch(model, experts=False, loss=False, norms=False, rope=False, mlp=False)
    assert not _lora_lines(report)
    assert any(s.feature == "lora" and "PEFT's forward is kept" in s.reason for s in report.skipped)
    wrappers = [m for n, m in model.named_modules() if n.endswith("mlp.experts")]
    assert wrappers and all("forward" not in m.__dict__ for m in wrappers)
    loss, _ = _loss_and_lora_grads(model, batch)
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=0)
