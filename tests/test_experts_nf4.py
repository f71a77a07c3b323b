"""4-bit (NF4) MoE experts: ``fastft.quantize`` on 3-D expert weights, the experts op on them, QLoRA on MoE.

Oracles: bitsandbytes' ``quantize_4bit`` of each expert's ``[out, in]`` slice (the bytes), and
the same model with the 4-bit weights dequantised into ordinary parameters run by
transformers' own eager experts loop (the numbers: same bytes on both sides, so fp32 is
held to 1e-5 / 1e-4, bf16 to the bf16 rule against the fp32 oracle).
"""

import copy
import sys
import warnings

import pytest
import torch

import fastft
from fastft.nn import ExpertsWeight4bit
from fastft.ops.experts import ExpertsActivation, experts, experts_reference
from fastft.ops.experts_nf4 import dequantize_nf4_experts, quantize_nf4_experts
from fastft.ops.nf4 import dequantize_nf4

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from test_experts import FAMILIES, FP32, _batch, _experts_modules, _loss_and_grads, _model  # noqa: E402

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    try:
        import bitsandbytes.functional as bnbF
    except Exception:  # pragma: no cover - bnb is a dev dependency
        bnbF = None

needs_bnb = pytest.mark.skipif(bnbF is None, reason="bitsandbytes is not installed")
PATCH = dict(loss=False, norms=False, rope=False, mlp=False)


def _w3d(E, a, b, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(E, a, b, generator=g) * (0.02 + torch.rand(E, a, b, generator=g))).to(dtype)


def _dense_copy(model):
    """``model`` with every 4-bit expert weight dequantised back into a frozen ``nn.Parameter``
    (the same numbers the 4-bit weights stand for), run by transformers' eager loop."""
    ref = copy.deepcopy(model)
    for mod in ref.modules():
        for pname in ("gate_up_proj", "down_proj"):
            w = getattr(mod, pname, None)
            if isinstance(w, ExpertsWeight4bit):
                dense = w.dequantize().contiguous()
                delattr(mod, pname)
                setattr(mod, pname, torch.nn.Parameter(dense, requires_grad=False))
    ref.config._experts_implementation = "eager"
    return ref


def _quantized(family, **kw):
    model = _model(family)
    fastft.quantize(model, **kw)
    return model


# --------------------------------------------------------------------------------------
# format: each expert's slice is bitsandbytes' NF4 of it
# --------------------------------------------------------------------------------------
@needs_bnb
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("shape", [(3, 64, 96), (3, 14, 13)])  # blocks tile the experts / odd slices
def test_slices_match_bnb_quantize_4bit(dtype, double_quant, transposed, shape):
    w = _w3d(*shape, dtype=dtype)
    q = ExpertsWeight4bit.from_weight(w, transposed=transposed, double_quant=double_quant)
    assert q.shape == w.shape and q.dtype == dtype
    dense = q.dequantize()
    assert dense.shape == w.shape and dense.dtype == dtype
    for e in range(shape[0]):
        slice2d = w[e].t().contiguous() if transposed else w[e]  # bnb quantises the [out, in] layout
        p_ref, s_ref = bnbF.quantize_4bit(slice2d, blocksize=64, compress_statistics=double_quant, quant_type="nf4")
        assert torch.equal(q.weight[e], p_ref.reshape(-1))
        st = q.slice_state(e)
        if double_quant:
            assert torch.equal(st.absmax, s_ref.absmax)
            assert torch.equal(st.absmax2, s_ref.state2.absmax) and torch.equal(st.offset, s_ref.offset)
        else:
            assert torch.equal(st.absmax, s_ref.absmax)
        want = dequantize_nf4(p_ref, s_ref, dtype=dtype)  # bit-exact with bnb's dequant (tests/test_nf4.py)
        if slice2d.shape[-1] % 64 == 0:  # where bnb's own CPU dequant kernel is right
            torch.testing.assert_close(bnbF.dequantize_4bit(p_ref, s_ref), want, rtol=0, atol=0)
        want = want.t() if transposed else want
        assert torch.equal(dense[e], want) and torch.equal(q[e], want)


def test_dequantize_is_one_flat_dequant_when_blocks_tile(monkeypatch):
    import fastft.ops.experts_nf4 as mod

    calls = []
    real = mod.dequantize_nf4
    monkeypatch.setattr(mod, "dequantize_nf4", lambda *a, **k: calls.append(1) or real(*a, **k))
    q = ExpertsWeight4bit.from_weight(_w3d(6, 64, 32))
    q.dequantize(torch.bfloat16)
    assert len(calls) == 1  # all experts in one dequantisation (one kernel launch on the fused backends)
    calls.clear()
    ExpertsWeight4bit.from_weight(_w3d(6, 14, 13)).dequantize()
    assert len(calls) == 6  # slices whose blocks do not tile: one expert at a time


@pytest.mark.parametrize("backend", ["cpp", "triton"])  # triton: the interpreter (tests/conftest.py)
def test_dequantize_backends_match_torch(backend):
    """The flat dequantisation of all experts on each backend: the bytes the torch reference gives."""
    from fastft import backends
    from fastft.ops.nf4 import OP_DEQUANT

    try:
        backends.select(OP_DEQUANT, torch.device("cpu"), backend)
    except backends.BackendUnavailable as exc:
        pytest.skip(str(exc))
    for cache in (False, True):
        q = ExpertsWeight4bit.from_weight(_w3d(3, 64, 32), transposed=True, cache_absmax=cache)
        want = q.dequantize(torch.float32, backend="torch")
        assert torch.equal(q.dequantize(torch.float32, backend=backend), want)


def test_cached_absmax_same_weight_decoded_once(monkeypatch):
    import fastft.ops.experts_nf4 as mod

    w = _w3d(4, 64, 32)
    plain, cached = ExpertsWeight4bit.from_weight(w), ExpertsWeight4bit.from_weight(w, cache_absmax=True)
    decodes = []
    real = mod.decode_experts_absmax
    monkeypatch.setattr(mod, "decode_experts_absmax", lambda *a, **k: decodes.append(1) or real(*a, **k))
    for _ in range(2):
        assert torch.equal(cached.dequantize(), plain.dequantize())
    assert len(decodes) == 3  # plain: every call; cached: once
    assert cached.scales().dtype == torch.float32 and plain.scales() is None
    cached.load_state_dict(plain.state_dict())  # buffers overwritten in place: decoded again
    cached.dequantize()
    assert len(decodes) == 4


def test_patch_nf4_cache_absmax_on_experts_and_unpatch():
    model = _quantized("mixtral")
    ref = _dense_copy(model)
    batch = _batch(model)
    report = fastft.patch(model, nf4_cache_absmax=True, **PATCH)
    cached = [p for p in report.patched if p.feature == "quant" and "expert dequantisation" in p.detail]
    mods = [m for m in model.modules() if isinstance(m, ExpertsWeight4bit)]
    assert len(cached) == len(mods) and all(m.cache_absmax for m in mods)
    torch.testing.assert_close(model(**batch).loss, ref(**batch).loss, **FP32)
    assert all(m.scales() is not None for m in mods)
    fastft.unpatch(model)
    assert all(not m.cache_absmax and m.scales() is None and m._scales is None for m in mods)


def test_quantize_experts_opt_out_and_skip():
    model = _model("olmoe")
    fastft.quantize(model, experts=False)
    assert not [m for m in model.modules() if isinstance(m, ExpertsWeight4bit)]
    assert all(isinstance(m.gate_up_proj, torch.nn.Parameter) for _, m in _experts_modules(model))
    model = _model("olmoe")
    names = [n for n, _ in _experts_modules(model)]
    fastft.quantize(model, skip=("lm_head", "0"))  # layer 0 stays 16-bit
    kinds = {n: type(m.gate_up_proj).__name__ for n, m in _experts_modules(model)}
    assert kinds == {n: ("Parameter" if ".0." in n else "ExpertsWeight4bit") for n in names}
    report = fastft.patch(model, **PATCH)  # mixed 16-bit and 4-bit experts under one config
    assert len([p for p in report.patched if p.feature == "experts"]) == len(names)
    ref = _dense_copy(model)
    batch = _batch(model)
    torch.testing.assert_close(model(**batch).loss, ref(**batch).loss, **FP32)
    assert not report.fallbacks
    fastft.unpatch(model)


def test_weight_memory_at_most_0_3_of_bf16():
    E, H, IN = 8, 256, 704
    for double_quant, bound in ((True, 0.27), (False, 0.3)):
        q1 = ExpertsWeight4bit.from_weight(_w3d(E, 2 * IN, H, torch.bfloat16), double_quant=double_quant)
        q2 = ExpertsWeight4bit.from_weight(_w3d(E, H, IN, torch.bfloat16), double_quant=double_quant)
        ratio = (q1.nbytes + q2.nbytes) / (3 * E * H * IN * 2)
        assert ratio <= bound, ratio
    model = _model("qwen3_moe")
    dense_bytes = sum(p.numel() * 2 for n, p in model.named_parameters() if n.endswith(("gate_up_proj", "down_proj")))
    fastft.quantize(model)
    assert not [n for n, p in model.named_parameters() if n.endswith(("gate_up_proj", "down_proj"))]  # no 16-bit copy
    four_bit = sum(m.nbytes for m in model.modules() if isinstance(m, ExpertsWeight4bit))
    assert 0 < four_bit <= 0.3 * dense_bytes + 4 * (16 + 256) * 4  # + the per-weight tables at this tiny size


# --------------------------------------------------------------------------------------
# the op on 4-bit weights vs dequantise-then-reference
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind,transposed,bias", [("silu", False, False), ("gpt_oss", True, True)])
@pytest.mark.parametrize("H,IN", [(32, 48), (13, 7)])
def test_op_on_4bit_weights_matches_dequantised_reference(kind, transposed, bias, H, IN):
    E, T, K = 5, 17, 2
    act = ExpertsActivation(kind, limit=1.5) if kind == "gpt_oss" else ExpertsActivation(kind)
    w1 = _w3d(E, H, 2 * IN) if transposed else _w3d(E, 2 * IN, H)
    w2 = _w3d(E, IN, H, seed=1) if transposed else _w3d(E, H, IN, seed=1)
    q1, q2 = (ExpertsWeight4bit.from_weight(w, transposed=transposed) for w in (w1, w2))
    d1, d2 = q1.dequantize(), q2.dequantize()
    x = torch.randn(T, H, requires_grad=True)
    idx = torch.stack([torch.randperm(E)[:K] for _ in range(T)])
    w = torch.rand(T, K, requires_grad=True)
    b1 = (torch.randn(E, 2 * IN) * 0.1).requires_grad_() if bias else None
    b2 = (torch.randn(E, H) * 0.1).requires_grad_() if bias else None
    leaves = [t for t in (x, w, b1, b2) if t is not None]
    dout = torch.randn(T, H)
    out = experts(x, idx, w, q1, q2, b1, b2, act=act, transposed=transposed)
    grads = torch.autograd.grad(out, leaves, dout)
    ref = experts_reference(x, idx, w, d1, d2, b1, b2, act=act, transposed=transposed)
    ref_grads = torch.autograd.grad(ref, leaves, dout)
    torch.testing.assert_close(out, ref, **FP32)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, **FP32)
    # the reference itself reads 4-bit weights too (w[e] dequantises one slice): same numbers
    torch.testing.assert_close(experts_reference(x, idx, w, q1, q2, b1, b2, act=act, transposed=transposed), ref)


def test_backward_dequantises_again_and_saves_no_16bit_weight(monkeypatch):
    """The 4-bit weights are dequantised once per GEMM that needs them (2 forward, 2 backward), never saved."""
    E, T, H, IN = 4, 9, 32, 32
    q1, q2 = ExpertsWeight4bit.from_weight(_w3d(E, 2 * IN, H)), ExpertsWeight4bit.from_weight(_w3d(E, H, IN))
    calls = []
    real = ExpertsWeight4bit.dequantize
    monkeypatch.setattr(
        ExpertsWeight4bit, "dequantize", lambda self, *a, **k: calls.append(self) or real(self, *a, **k)
    )
    x = torch.randn(T, H, requires_grad=True)
    idx = torch.stack([torch.randperm(E)[:2] for _ in range(T)])
    idx[:E, 0] = torch.arange(E)  # every expert has rows: at this size each GEMM is one chunk of all E
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        out = experts(x, idx, torch.rand(T, 2), q1, q2)
    assert calls == [q1, q2]
    assert torch.Size((E, 2 * IN, H)) not in saved and torch.Size((E, H, IN)) not in saved
    out.sum().backward()
    assert calls == [q1, q2, q2, q1]


# --------------------------------------------------------------------------------------
# CPU: each GEMM dequantises a bounded chunk of experts at a time, same bits as the whole stack
# --------------------------------------------------------------------------------------
def _chunk_routing(routing, T, E):
    """``(top_k_index, K)``: ``spread`` (random top-2, experts 1 and E-1 get no rows) or ``one_expert``
    (top-1, every token to expert 2: one chunk holds all the rows, every other expert is empty)."""
    if routing == "one_expert":
        return torch.full((T, 1), 2, dtype=torch.long), 1
    live = torch.tensor([e for e in range(E) if e not in (1, E - 1)])
    return torch.stack([live[torch.randperm(len(live))[:2]] for _ in range(T)]), 2


def _spy_dequantize(monkeypatch):
    calls = []
    real = ExpertsWeight4bit.dequantize
    monkeypatch.setattr(
        ExpertsWeight4bit,
        "dequantize",
        lambda self, *a, **k: calls.append((self, k.get("experts"))) or real(self, *a, **k),
    )
    return calls


def _check_chunks(calls, order, idx, E, cap):
    """Per GEMM (weights in ``order``) the chunks are runs of consecutive experts with rows, at most
    ``cap`` experts each (maximal runs where the cap allows), covering every expert with rows once."""
    has_rows = torch.bincount(idx.reshape(-1), minlength=E) > 0
    want, run = [], []
    for e in range(E + 1):
        if e < E and has_rows[e] and len(run) < cap:
            run.append(e)
            continue
        if run:
            want.append((run[0], run[-1] + 1))
        run = [e] if e < E and has_rows[e] else []
    got = [(q, tuple(r)) for q, r in calls]
    assert got == [(q, r) for q in order for r in want]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("budget", ["one", "two", "all"])
@pytest.mark.parametrize("routing", ["spread", "one_expert"])
@pytest.mark.parametrize("H,IN", [(32, 48), (13, 7)])
def test_chunked_dequant_gemms_equal_the_whole_stack(H, IN, routing, budget, dtype, monkeypatch):
    """The four weight GEMMs on a CPU dequantise a chunk of experts at a time (``DEQUANT_CHUNK_BYTES``:
    one expert, two, or all of them): output and every gradient equal, bit for bit, the same op on the
    whole dequantised stacks (one ``torch._grouped_mm`` each), for experts with no rows and for one
    expert taking every token; (13, 7): gpt-oss layout (transposed, biases), blocks that do not tile."""
    import fastft.ops.experts as op

    E, T = 6, 21
    transposed = H == 13
    act = ExpertsActivation("gpt_oss", limit=1.5) if transposed else ExpertsActivation("silu")
    w1 = _w3d(E, H, 2 * IN, dtype) if transposed else _w3d(E, 2 * IN, H, dtype)
    w2 = _w3d(E, IN, H, dtype, seed=1) if transposed else _w3d(E, H, IN, dtype, seed=1)
    q1, q2 = (ExpertsWeight4bit.from_weight(w, transposed=transposed) for w in (w1, w2))
    d1, d2 = q1.dequantize(), q2.dequantize()
    idx, K = _chunk_routing(routing, T, E)
    x = torch.randn(T, H, dtype=dtype, requires_grad=True)
    w = torch.rand(T, K, dtype=dtype).softmax(-1).requires_grad_()
    b1 = (torch.randn(E, 2 * IN, dtype=dtype) * 0.1).requires_grad_() if transposed else None
    b2 = (torch.randn(E, H, dtype=dtype) * 0.1).requires_grad_() if transposed else None
    leaves = [t for t in (x, w, b1, b2) if t is not None]
    dout = torch.randn(T, H, dtype=dtype)
    kw = dict(act=act, transposed=transposed)
    ref = experts(x, idx, w, d1, d2, b1, b2, **kw)
    ref_grads = torch.autograd.grad(ref, leaves, dout)

    per1 = 2 * IN * H * dtype.itemsize  # bytes of one dense expert of gate_up (down: half)
    monkeypatch.setattr(op, "DEQUANT_CHUNK_BYTES", {"one": 0, "two": 2 * per1, "all": 1 << 40}[budget])
    calls = _spy_dequantize(monkeypatch)
    out = experts(x, idx, w, q1, q2, b1, b2, **kw)
    grads = torch.autograd.grad(out, leaves, dout)
    assert torch.equal(out, ref)
    for g, r in zip(grads, ref_grads):
        assert torch.equal(g, r)
    fwd, bwd = calls[: len(calls) // 2], calls[len(calls) // 2 :]
    cap1 = {"one": 1, "two": 2, "all": E}[budget]
    cap2 = {"one": 1, "two": 4, "all": E}[budget]
    _check_chunks([c for c in fwd if c[0] is q1], [q1], idx, E, cap1)
    _check_chunks([c for c in fwd if c[0] is q2], [q2], idx, E, cap2)
    assert [q for q, _ in fwd] == sorted((q for q, _ in fwd), key=lambda q: q is q2)  # gate_up, then down
    assert [q for q, _ in bwd] == sorted((q for q, _ in bwd), key=lambda q: q is q1)  # down, then gate_up
    assert sorted((id(q), r) for q, r in bwd) == sorted((id(q), r) for q, r in fwd)  # the same chunks again


@pytest.mark.parametrize("double_quant,cache_absmax", [(False, False), (True, True)])
def test_chunked_dequant_without_double_quant_or_with_cached_scales(double_quant, cache_absmax, monkeypatch):
    """One-expert chunks read the scales as they are kept (fp32 absmax, or the decoded cache): same bits."""
    import fastft.ops.experts as op

    E, T, H, IN = 4, 9, 32, 32
    kw = dict(double_quant=double_quant, cache_absmax=cache_absmax)
    q1, q2 = (ExpertsWeight4bit.from_weight(_w3d(E, a, b), **kw) for a, b in ((2 * IN, H), (H, IN)))
    x = torch.randn(T, H, requires_grad=True)
    idx, w = torch.randint(0, E, (T, 2)), torch.rand(T, 2)
    ref = experts(x, idx, w, q1.dequantize(), q2.dequantize())
    monkeypatch.setattr(op, "DEQUANT_CHUNK_BYTES", 0)
    out = experts(x, idx, w, q1, q2)
    assert torch.equal(out, ref)
    assert torch.equal(*(torch.autograd.grad(o, x, torch.ones_like(o))[0] for o in (out, ref)))


def test_chunk_budget_env_and_bad_values(monkeypatch):
    import fastft.ops.experts as op

    monkeypatch.setenv("FASTFT_EXPERTS_CHUNK_MB", "1.5")
    assert op.dequant_chunk_bytes() == int(1.5 * 2**20)
    monkeypatch.setenv("FASTFT_EXPERTS_CHUNK_MB", "0")
    assert op.dequant_chunk_bytes() == 0
    E, T, H, IN = 4, 9, 32, 32
    q1, q2 = ExpertsWeight4bit.from_weight(_w3d(E, 2 * IN, H)), ExpertsWeight4bit.from_weight(_w3d(E, H, IN))
    idx = torch.arange(T).remainder(E).view(T, 1)
    calls = _spy_dequantize(monkeypatch)
    experts(torch.randn(T, H), idx, torch.rand(T, 1), q1, q2)
    assert [r for _, r in calls] == [(e, e + 1) for e in range(E)] * 2  # env 0: one expert at a time
    for bad in ("-1", "abc", "inf", "nan"):
        monkeypatch.setenv("FASTFT_EXPERTS_CHUNK_MB", bad)
        with pytest.raises(ValueError, match="FASTFT_EXPERTS_CHUNK_MB must be a finite number of MiB >= 0"):
            experts(torch.randn(T, H), idx, torch.rand(T, 1), q1, q2)
    monkeypatch.delenv("FASTFT_EXPERTS_CHUNK_MB")
    assert op.dequant_chunk_bytes() == op.DEQUANT_CHUNK_BYTES
    # a range of experts: the same bits as those slices of the whole; bad ranges are a ValueError
    torch.testing.assert_close(q1.dequantize(experts=(1, 3)), q1.dequantize()[1:3], rtol=0, atol=0)
    for bad in ((2, 2), (-1, 2), (0, E + 1), (1.0, 2), 3, (1, 2, 3)):
        with pytest.raises(ValueError, match=r"experts must be \(start, stop\) with 0 <= start < stop <= 4"):
            q1.dequantize(experts=bad)


# --------------------------------------------------------------------------------------
# quantised models of each family: patched == unpatched == dequantised eager
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_quantized_model_matches_dequantised_eager(family, monkeypatch):
    import fastft.ops.experts as op

    model = _quantized(family)
    mods = _experts_modules(model)
    assert mods and all(isinstance(m.gate_up_proj, ExpertsWeight4bit) for _, m in mods)
    assert all(isinstance(m.down_proj, ExpertsWeight4bit) for _, m in mods)
    assert model.config._experts_implementation == "eager"  # the implementation that reads 4-bit weights
    ref = _dense_copy(model)
    batch = _batch(model)
    ref_loss, ref_grads = _loss_and_grads(ref, batch)
    loss, grads = _loss_and_grads(model, batch)  # unpatched: the eager loop on 4-bit weights
    torch.testing.assert_close(loss, ref_loss, **FP32)
    calls = []
    apply = op._Experts.apply
    monkeypatch.setattr(op._Experts, "apply", lambda *a: calls.append(1) or apply(*a))
    report = fastft.patch(model, **PATCH)
    assert {p.target for p in report.patched if p.feature == "experts"} == {n for n, _ in mods}
    assert all("NF4" in p.detail for p in report.patched if p.feature == "experts")
    loss, grads = _loss_and_grads(model, batch)
    assert not report.fallbacks and len(calls) == len(mods)
    torch.testing.assert_close(loss, ref_loss, **FP32)
    assert grads.keys() == ref_grads.keys() and grads
    for n in grads:
        torch.testing.assert_close(grads[n], ref_grads[n], **FP32, msg=lambda m, n=n: f"{n}: {m}")
    assert fastft.unpatch(model)
    assert model.config._experts_implementation == "eager"
    assert all("_fastft_experts" not in m.__dict__ and isinstance(m.gate_up_proj, ExpertsWeight4bit) for _, m in mods)
    torch.testing.assert_close(_loss_and_grads(model, batch)[0], ref_loss, **FP32)


@pytest.mark.parametrize("impl", ["grouped_mm", "batched_mm"])
def test_whole_tensor_experts_implementations_say_why_they_cannot_read_4bit_weights(impl):
    """transformers' grouped_mm / batched_mm take the experts' weights as whole tensors: over 4-bit
    experts they stop with an error that names the implementations that can run (fastft's, eager),
    never a bare missing-attribute; the model then runs again under eager."""
    model = _quantized("qwen3_moe")
    batch = _batch(model)
    model.set_experts_implementation(impl)
    with pytest.raises((AttributeError, TypeError), match="4-bit experts run fastft's"):
        model(**batch)
    w = _experts_modules(model)[0][1].gate_up_proj
    assert not hasattr(w, "storage_offset") and not hasattr(w, "no_such_attribute")  # hasattr keeps working
    with pytest.raises(AttributeError, match="no_such_attribute") as err:
        getattr(w, "no_such_attribute")  # noqa: B009
    assert "4-bit" not in str(err.value)  # only tensor attributes get the explanation
    model.set_experts_implementation("eager")
    assert torch.isfinite(model(**batch).loss)


@pytest.mark.parametrize("family", FAMILIES)
def test_quantized_module_grads_fp32_and_bf16_rule(family):
    """One experts module: output and input / top-k weight / bias grads, fp32 tight and bf16 by the bf16 rule."""
    model = _quantized(family)
    ref = _dense_copy(model)
    (_, mod), (_, ref_mod) = _experts_modules(model)[0], _experts_modules(ref)[0]
    E, H, T, K = mod.gate_up_proj.shape[0], model.config.hidden_size, 13, 2
    idx = torch.stack([torch.randperm(E)[:K] for _ in range(T)])
    x32, w32, d32 = torch.randn(T, H), torch.rand(T, K), torch.randn(T, H)

    def run(m, root, dtype, patched):
        m.to(dtype)
        if patched:
            fastft.patch(root, **PATCH)
        m.zero_grad(set_to_none=True)
        x, w = x32.to(dtype).clone().requires_grad_(), w32.to(dtype).clone().requires_grad_()
        out = m(x, idx, w)
        out.backward(d32.to(dtype))
        res = [out.detach().float(), x.grad.float(), w.grad.float()]
        res += [p.grad.float() for _, p in sorted(m.named_parameters()) if p.grad is not None]
        if patched:
            fastft.unpatch(root)
        return res

    oracle = run(ref_mod, ref, torch.float32, False)
    fast = run(mod, model, torch.float32, True)
    assert len(fast) == len(oracle) == (5 if family == "gpt_oss" else 3)  # gpt-oss: + both bias grads
    for f, o in zip(fast, oracle):
        torch.testing.assert_close(f, o, **FP32)
    plain16 = run(ref_mod, ref, torch.bfloat16, False)
    fast16 = run(mod, model, torch.bfloat16, True)
    assert mod.gate_up_proj.dtype == torch.bfloat16 and mod.gate_up_proj.nested_code.dtype == torch.float32
    for f, p, o in zip(fast16, plain16, oracle):
        assert (f - o).abs().max() <= 2 * (p - o).abs().max() + 1e-6


def test_fallback_dequantises_and_matches():
    """A call the fast path cannot take runs the model's eager loop on the 4-bit weights (reported)."""
    model = _quantized("qwen3_moe")
    report = fastft.patch(model, **PATCH)
    name, mod = _experts_modules(model)[0]
    E, H = mod.gate_up_proj.shape[0], model.config.hidden_size
    x = torch.randn(5, H)
    idx = torch.stack([torch.randperm(E)[:2] for _ in range(5)])
    w = torch.rand(5, 2)
    fast = mod(x, idx, w)
    mod._is_expert_parallel = True  # misfit: the guard runs the previous implementation
    slow = mod(x, idx, w)
    mod._is_expert_parallel = False
    assert any("expert-parallel" in k and name in k for k in report.fallbacks)
    torch.testing.assert_close(fast, slow, **FP32)
    fastft.unpatch(model)


def test_state_dict_saves_as_safetensors_and_loads(tmp_path):
    model = _quantized("gpt_oss")
    batch = _batch(model)
    want = model(**batch).loss
    model.save_pretrained(tmp_path, safe_serialization=True)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert "model.safetensors" in files and not [f for f in files if f.endswith((".bin", ".pt", ".pkl"))]
    from safetensors.torch import load_file

    sd = load_file(str(tmp_path / "model.safetensors"))
    keys = [k for k in sd if "experts.gate_up_proj." in k]
    assert {k.rsplit(".", 1)[-1] for k in keys} == {
        "weight",
        "absmax",
        "code",
        "nested_absmax",
        "nested_offset",
        "nested_code",
    }
    other = _model("gpt_oss")
    with torch.no_grad():
        for p in other.parameters():
            p.normal_()  # different weights, then the saved ones loaded over them
    fastft.quantize(other)
    missing, unexpected = other.load_state_dict(sd, strict=False)
    assert not unexpected and all("lm_head" in k or "embed" in k for k in missing)
    torch.testing.assert_close(other(**batch).loss, want, rtol=0, atol=0)


# --------------------------------------------------------------------------------------
# QLoRA on an MoE model
# --------------------------------------------------------------------------------------
def _lora(model, seed=0):
    """LoRA on the linear layers by name (on the dense reference PEFT's "all-linear" would also
    wrap the 3-D expert parameters; the 4-bit experts stay frozen)."""
    from peft import LoraConfig, get_peft_model

    from fastft.nn import Linear4bit

    names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, Linear4bit)})
    torch.manual_seed(seed)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=names, init_lora_weights=False)
    return get_peft_model(model, cfg)


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_qlora_by_hand_trains_and_matches_dequantised_reference(family):
    model = _quantized(family)
    ref = _dense_copy(model)
    peft_model, peft_ref = _lora(model), _lora(ref)
    assert [n for n, p in peft_model.named_parameters() if p.requires_grad] == [
        n for n, p in peft_ref.named_parameters() if p.requires_grad
    ]
    report = fastft.patch(peft_model, norms=False, rope=False, mlp=False)
    assert any(p.feature == "experts" for p in report.patched)
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable) and not any("experts" in n for n in trainable)
    batch = _batch(model)
    losses = {}
    for key, m in (("fast", peft_model), ("ref", peft_ref)):
        opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.5)
        losses[key] = []
        for _ in range(4):
            opt.zero_grad()
            loss = m(**batch).loss
            loss.backward()
            opt.step()
            losses[key].append(loss.item())
    assert losses["fast"][-1] < losses["fast"][0]
    torch.testing.assert_close(torch.tensor(losses["fast"]), torch.tensor(losses["ref"]), rtol=1e-5, atol=1e-4)
    assert not report.fallbacks


def test_trainer_qlora_on_a_quantized_moe_keeps_its_4bit_experts_frozen(tmp_path, capsys):
    """A model quantised before the trainer: PEFT cannot wrap its packed experts, and the report says so
    (a 16-bit model gets LoRA on its experts, then 4-bit: tests/test_experts_qlora.py)."""
    from test_trainer import TOK, _adapter, _cfg, _records

    model = _quantized("qwen3_moe")
    result = fastft.train(
        _cfg(tmp_path, method="qlora", max_steps=4, eval_every=4, quiet=False),
        model=model,
        tokenizer=TOK,
        train_data=_records(8),
        eval_data=_records(2, seed=1),
    )
    printed = capsys.readouterr().out
    assert "4-bit (NF4) expert weights quantised before the trainer stay frozen" in printed
    assert "NF4 weights dequantised inside the GEMMs" in printed
    assert "experts module (3-D expert weights): see the experts patch" in printed  # the MLP patch leaves it
    assert "probe failed" not in printed
    assert all(isinstance(m.gate_up_proj, ExpertsWeight4bit) for _, m in _experts_modules(model))
    keys = _adapter(tmp_path / "checkpoint-last").keys()
    assert any("q_proj.lora_A" in k for k in keys) and not any("experts" in k for k in keys)
    assert result.eval_loss < result.eval_loss_before


def test_cli_train_qlora_on_a_saved_moe_model(tmp_path, capsys):
    """``fastft train --method qlora --model DIR`` on a tiny Qwen3-MoE (CLI defaults: dropout > 0)."""
    import json

    from peft import PeftModel
    from test_trainer import TOK, _records

    from fastft.cli import main

    _model("qwen3_moe").save_pretrained(tmp_path / "model")
    TOK.save_pretrained(tmp_path / "model")
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps(r) for r in _records(16)))
    rc = main(
        ["train", "--model", str(tmp_path / "model"), "--data", str(tmp_path / "data.jsonl"), "--method", "qlora",
         "--max-steps", "3", "--eval-frac", "0.2", "--num-generations", "0", "--lr", "1e-2",
         "--output-dir", str(tmp_path / "out")]
    )  # fmt: skip
    printed = capsys.readouterr().out
    assert rc == 0
    assert "LoRA on expert weights" in printed and "on 4-bit (NF4) experts" in printed
    assert "experts + LoRA (fused)" in printed and "4-bit (NF4) base dequantised inside the GEMMs" in printed
    result = json.loads((tmp_path / "out" / "result.json").read_text())
    assert result["steps"] == 3 and result["eval_loss"] < result["eval_loss_before"]
    # generate over the same base: the adapter (experts' LoRA included) on the 16-bit model, then NF4
    loaded = []
    real = PeftModel.from_pretrained

    def spy(*a, **k):
        loaded.append(real(*a, **k))
        return loaded[-1]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(PeftModel, "from_pretrained", spy)
        args = ["generate", "--model", str(tmp_path / "model"), "--adapter", str(tmp_path / "out" / "checkpoint-last")]
        rc = main([*args, "--prompt", "hi", "--max-new-tokens", "3"])
    assert rc == 0 and loaded
    mods = _experts_modules(loaded[0])
    assert mods and all(isinstance(m.gate_up_proj, ExpertsWeight4bit) for _, m in mods)
    assert sum("experts" in n and "lora_B" in n for n, _ in loaded[0].named_parameters()) == 2 * len(mods)


# --------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------
def test_bad_input_errors():
    q = ExpertsWeight4bit.from_weight(_w3d(3, 16, 8))
    with pytest.raises(IndexError, match="expert index 3 out of range for 3 experts"):
        q[3]
    with pytest.raises(TypeError, match="one integer expert index"):
        q[0:2]
    with pytest.raises(ValueError, match=r"3-D \(E, out, in\)"):
        quantize_nf4_experts(torch.randn(4, 4))
    with pytest.raises(TypeError, match="floating-point"):
        quantize_nf4_experts(torch.ones(2, 4, 4, dtype=torch.int32))
    with pytest.raises(ValueError, match="power of two"):
        quantize_nf4_experts(torch.randn(2, 8, 8), blocksize=48)
    with pytest.raises(ValueError, match=r"packed expert weight must be uint8 \(E=3, 64\)"):
        dequantize_nf4_experts(q.weight[:2], q.absmax, q.code, shape=(3, 16, 8), blocksize=64, dtype=torch.float32)
    x, idx, w = torch.randn(4, 8), torch.zeros(4, 2, dtype=torch.long), torch.rand(4, 2)
    with pytest.raises(ValueError, match="do not fit hidden 8"):
        experts(x, idx, w, q, ExpertsWeight4bit.from_weight(_w3d(3, 7, 8)))
    with pytest.raises(TypeError, match="down_proj must be a tensor or a 4-bit ExpertsWeight4bit, got list"):
        experts(x, idx, w, q, [1, 2])
    model = _model("mixtral")
    fastft.patch(model, **PATCH)
    with pytest.raises(ValueError, match="quantize the model before fastft.patch"):
        fastft.quantize(model)
    fastft.unpatch(model)
