"""Tests of fastft.ops.rope against transformers' own ``apply_rotary_pos_emb``.

Llama's function (full rotary) and Phi-3's (partial rotary: ``R = cos.shape[-1] <
head_dim``) are imported and called directly. Every numerical test runs for the
``torch`` backend and for the ``triton`` backend (on CPU in the Triton interpreter:
``TRITON_INTERPRET=1`` is set in conftest.py), so shapes stay small. Low-precision
results are judged against what plain PyTorch gets in that dtype.
"""

from __future__ import annotations

import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb as llama_rope
from transformers.models.phi3.modeling_phi3 import apply_rotary_pos_emb as phi3_rope

from fastft import backends
from fastft.ops import rope, rope_reference

BACKENDS = ["torch", "triton"]


def _cos_sin(b, s, R, dtype=torch.float32, base=10000.0):
    """What a model's rotary embedding returns: [b, s, R], the two halves equal."""
    inv = 1.0 / base ** (torch.arange(0, R, 2, dtype=torch.float32) / R)
    pos = torch.stack([torch.randperm(s) for _ in range(b)]).float()  # arbitrary position ids
    freqs = pos[..., None] * inv
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _qk(b, hq, hk, s, d, dtype=torch.float32, layout="bhsd"):
    shape = (lambda h: (b, h, s, d)) if layout == "bhsd" else (lambda h: (b, s, h, d))
    q = torch.randn(shape(hq)).to(dtype).requires_grad_()
    k = torch.randn(shape(hk)).to(dtype).requires_grad_()
    return q, k


def _run(fn, q, k, cos, sin, gq, gk):
    q = q.detach().clone().requires_grad_()
    k = k.detach().clone().requires_grad_()
    qo, ko = fn(q, k, cos, sin)
    torch.autograd.backward([qo, ko], [gq, gk])
    return qo.detach(), ko.detach(), q.grad, k.grad


def _max_err(a, b):
    return (a.double() - b.double()).abs().max().item()


def _interpreter_rounding_slack(backend, oracle):
    """The Triton interpreter converts fp32 to bf16 by truncation (a GPU rounds to nearest
    even), which costs up to one more bf16 ulp on values a kernel writes in bf16."""
    if backend != "triton" or not backends.interpreting():
        return 0.0
    biggest = oracle.float().abs().max().item()
    return 2.0 ** (torch.tensor(biggest).log2().floor().item() - 7) if biggest > 0 else 0.0


# (hf function, rotary dim as a fraction of head_dim)
CASES = {"llama_full": (llama_rope, 1), "phi3_full": (phi3_rope, 1), "phi3_partial": (phi3_rope, 2)}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
@pytest.mark.parametrize("dims", [(2, 4, 2, 5, 16), (1, 3, 1, 3, 40)])  # (b, hq, hk, s, d): GQA, MQA
def test_fp32_matches_transformers(backend, case, layout, dims):
    hf, frac = CASES[case]
    b, hq, hk, s, d = dims
    R = d // frac
    q, k = _qk(b, hq, hk, s, d, layout=layout)
    cos, sin = _cos_sin(b, s, R)
    u = 1 if layout == "bhsd" else 2
    gq, gk = torch.randn_like(q), torch.randn_like(k)
    got = _run(lambda *a: rope(*a, unsqueeze_dim=u, backend=backend), q, k, cos, sin, gq, gk)
    want = _run(lambda *a: hf(*a, unsqueeze_dim=u), q, k, cos, sin, gq, gk)
    ref = _run(lambda *a: rope_reference(*a, unsqueeze_dim=u), q, k, cos, sin, gq, gk)
    for name, a, w, r in zip(("q", "k", "dq", "dk"), got, want, ref):
        assert a.shape == w.shape and a.dtype == w.dtype == torch.float32
        torch.testing.assert_close(a, w, atol=1e-6, rtol=1e-6, msg=lambda m, name=name: f"{name} vs hf: {m}")
        torch.testing.assert_close(r, w, atol=0, rtol=0)
    if frac > 1:  # the pass-through features are copied exactly, their gradient too
        assert torch.equal(got[0][..., R:], q[..., R:].detach())
        assert torch.equal(got[2][..., R:], gq[..., R:])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("frac", [1, 2])
def test_bf16_no_worse_than_plain_pytorch(backend, frac):
    b, hq, hk, s, d = 2, 4, 2, 7, 32
    R = d // frac
    q, k = _qk(b, hq, hk, s, d, torch.bfloat16)
    cos, sin = _cos_sin(b, s, R, torch.bfloat16)
    gq, gk = torch.randn_like(q), torch.randn_like(k)
    got = _run(lambda *a: rope(*a, backend=backend), q, k, cos, sin, gq, gk)
    lowp = _run(phi3_rope, q, k, cos, sin, gq, gk)
    f = [t.float() for t in (q, k, cos, sin, gq, gk)]
    oracle = _run(phi3_rope, *f)
    for name, a, lo, o in zip(("q", "k", "dq", "dk"), got, lowp, oracle):
        assert a.dtype == torch.bfloat16
        err, base = _max_err(a, o), _max_err(lo, o)
        bound = 2 * base + 1e-3 + _interpreter_rounding_slack(backend, o)
        assert err <= bound, f"{name}: err {err:.3g} vs plain bf16 {base:.3g}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp32_cos_with_bf16_q_promotes_like_transformers(backend):
    q, k = _qk(1, 2, 1, 3, 8, torch.bfloat16)
    cos, sin = _cos_sin(1, 3, 8)
    qo, ko = rope(q, k, cos, sin, backend=backend)
    hq, hk = llama_rope(q, k, cos, sin)
    assert qo.dtype == hq.dtype == torch.float32
    torch.testing.assert_close(qo, hq, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(ko, hk, atol=1e-6, rtol=1e-6)
    (qo.sum() + ko.sum()).backward()
    assert q.grad.dtype == torch.bfloat16 and k.grad.dtype == torch.bfloat16


@pytest.mark.parametrize("backend", BACKENDS)
def test_saves_only_cos_sin_and_leaves_inputs_alone(backend):
    q, k = _qk(1, 2, 2, 4, 8)
    q0, k0 = q.detach().clone(), k.detach().clone()
    cos, sin = _cos_sin(1, 4, 8)
    qo, ko = rope(q, k, cos, sin, backend=backend)
    saved = qo.grad_fn.saved_tensors + ko.grad_fn.saved_tensors  # one operator node each
    assert len(saved) == 4
    ptrs = {t.data_ptr() for t in saved}
    assert ptrs <= {cos.data_ptr(), sin.data_ptr()}  # views of cos / sin, nothing copied
    assert torch.equal(q, q0) and torch.equal(k, k0)  # out of place
    assert qo.data_ptr() != q.data_ptr()


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_only_k_grad_and_no_grad(backend):
    base = torch.randn(2, 6, 3, 16)  # [b, s, h, d] storage, viewed as [b, h, s, d]
    q = base.transpose(1, 2)
    k = torch.randn(2, 1, 6, 16, requires_grad=True)
    cos, sin = _cos_sin(2, 6, 16)
    cos_nc = cos.transpose(0, 1).contiguous().transpose(0, 1)  # non-contiguous cos
    qo, ko = rope(q, k, cos_nc, sin, backend=backend)
    hq, hk = llama_rope(q, k, cos, sin)
    torch.testing.assert_close(qo, hq, atol=1e-6, rtol=1e-6)
    ko.sum().backward()
    k2 = k.detach().clone().requires_grad_()
    llama_rope(q, k2, cos, sin)[1].sum().backward()
    torch.testing.assert_close(k.grad, k2.grad, atol=1e-6, rtol=1e-6)
    with torch.no_grad():
        qo, ko = rope(q, k, cos, sin, backend=backend)
    assert qo.grad_fn is None and ko.grad_fn is None
    torch.testing.assert_close(ko, hk.detach(), atol=1e-6, rtol=1e-6)


def test_cos_requiring_grad_falls_back_to_reference():
    q, k = _qk(1, 2, 1, 3, 8)
    cos, sin = _cos_sin(1, 3, 8)
    cos.requires_grad_()
    qo, ko = rope(q, k, cos, sin)
    (qo.sum() + ko.sum()).backward()
    assert cos.grad is not None and q.grad is not None


def test_auto_is_torch_on_cpu():
    assert backends.select("rope", "cpu", "auto").backend == "torch"


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_inputs(backend):
    q, k = _qk(1, 4, 2, 3, 8)
    cos, sin = _cos_sin(1, 3, 8)
    with pytest.raises(ValueError, match="rotary dim"):
        rope(q, k, cos[..., :3], sin[..., :3], backend=backend)  # odd
    c2, s2 = _cos_sin(1, 3, 16)
    with pytest.raises(ValueError, match="rotary dim"):
        rope(q, k, c2, s2, backend=backend)  # wider than head_dim
    with pytest.raises(ValueError, match="head_dim"):
        rope(q, k[..., :4], cos[..., :4], sin[..., :4], backend=backend)
    with pytest.raises(ValueError, match="broadcast"):
        rope(q, k, cos, sin, unsqueeze_dim=2, backend=backend)  # [1,3,1,8] vs [1,4,3,8]
    c5, s5 = _cos_sin(1, 5, 8)
    with pytest.raises(ValueError, match="broadcast"):
        rope(q, k, c5, s5, backend=backend)  # wrong seq length
    with pytest.raises(ValueError, match="sin shape"):
        rope(q, k, cos, sin[:, :2], backend=backend)
    with pytest.raises(TypeError, match="dtype"):
        rope(q, k, cos, sin.double(), backend=backend)
    with pytest.raises(TypeError, match="floating-point"):
        rope(q.long(), k, cos, sin, backend=backend)
    with pytest.raises(ValueError, match="dimensions"):
        rope(q, k[0], cos, sin, backend=backend)
    with pytest.raises(ValueError, match="unsqueeze_dim"):
        rope(q, k, cos, sin, unsqueeze_dim=7, backend=backend)
