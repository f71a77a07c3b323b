"""Tests of fastft.ops.swiglu and fastft.ops.geglu.

Every numerical test runs for the ``torch`` backend and for the ``triton`` backend (on
CPU in the Triton interpreter: ``TRITON_INTERPRET=1`` is set in conftest.py), so shapes
stay small. Oracles: the references (``F.silu(gate) * up``, ``F.gelu(gate) * up``), and
transformers' own activation modules, in fp32. Low-precision results are judged against
what plain PyTorch gets in that dtype.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers.activations import ACT2FN

from fastft import backends
from fastft.ops import geglu, geglu_reference, swiglu, swiglu_reference

BACKENDS = ["torch", "triton"]
SHAPES = [(7,), (3, 5, 33), (2, 130), (1, 1, 1)]

# name -> (ours, reference, transformers' activation module)
CASES = {
    "swiglu": (swiglu, swiglu_reference, ACT2FN["silu"]),
    "geglu_tanh": (
        lambda g, u, **kw: geglu(g, u, approximate="tanh", **kw),
        lambda g, u: geglu_reference(g, u, approximate="tanh"),
        ACT2FN["gelu_pytorch_tanh"],
    ),
    "geglu_none": (
        lambda g, u, **kw: geglu(g, u, approximate="none", **kw),
        lambda g, u: geglu_reference(g, u, approximate="none"),
        ACT2FN["gelu"],
    ),
}


def _inputs(shape, dtype=torch.float32, scale=3.0):
    gate = (torch.randn(shape) * scale).to(dtype).requires_grad_()
    up = torch.randn(shape).to(dtype).requires_grad_()
    return gate, up


def _out_and_grads(fn, gate, up, dout):
    gate = gate.detach().clone().requires_grad_()
    up = up.detach().clone().requires_grad_()
    out = fn(gate, up)
    out.backward(dout)
    return out.detach(), gate.grad, up.grad


def _max_err(a, b):
    return (a.double() - b.double()).abs().max().item()


def _interpreter_rounding_slack(backend, oracle):
    """The Triton interpreter converts fp32 to bf16 by truncation (a GPU rounds to nearest
    even), which costs up to one more bf16 ulp on values a kernel writes in bf16."""
    if backend != "triton" or not backends.interpreting():
        return 0.0
    biggest = oracle.float().abs().max().item()
    return 2.0 ** (torch.tensor(biggest).log2().floor().item() - 7) if biggest > 0 else 0.0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("shape", SHAPES)
def test_fp32_matches_reference_and_transformers(backend, case, shape):
    ours, ref, hf_act = CASES[case]
    gate, up = _inputs(shape)
    dout = torch.randn(shape)
    got = _out_and_grads(lambda g, u: ours(g, u, backend=backend), gate, up, dout)
    exact = _out_and_grads(ref, gate.double(), up.double(), dout.double())  # the reference, in fp64
    want = _out_and_grads(ref, gate, up, dout)
    hf = _out_and_grads(lambda g, u: hf_act(g) * u, gate, up, dout)
    for name, a, x, b, c in zip(("out", "dgate", "dup"), got, exact, want, hf):
        assert a.dtype == torch.float32 and a.shape == b.shape
        # against the fp64 oracle: within 1e-6, or no worse than twice torch's own fp32 ops
        err, torch_err = float((a.double() - x).abs().max()), float((c.double() - x).abs().max())
        assert err <= max(1e-6, 2 * torch_err), f"{case} {name} vs fp64: {err:.2e} (torch fp32: {torch_err:.2e})"
        # torch's fp32 ops round on their own (e.g. 1 - tanh(u)**2 cancels for |x| > 4): a bit more slack
        torch.testing.assert_close(
            a, b, atol=1e-5, rtol=1e-5, msg=lambda m, name=name: f"{case} {name} vs reference: {m}"
        )
        torch.testing.assert_close(
            a, c, atol=1e-5, rtol=1e-5, msg=lambda m, name=name: f"{case} {name} vs transformers: {m}"
        )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
def test_bf16_no_worse_than_plain_pytorch(backend, case):
    ours, ref, _ = CASES[case]
    shape = (4, 257)
    gate, up = _inputs(shape, torch.bfloat16)
    dout = torch.randn(shape).to(torch.bfloat16)
    got = _out_and_grads(lambda g, u: ours(g, u, backend=backend), gate, up, dout)
    lowp = _out_and_grads(ref, gate, up, dout)  # plain PyTorch in bf16
    oracle = _out_and_grads(ref, gate.float(), up.float(), dout.float())
    for name, a, b, o in zip(("out", "dgate", "dup"), got, lowp, oracle):
        assert a.dtype == torch.bfloat16
        err, base = _max_err(a, o), _max_err(b, o)
        slack = _interpreter_rounding_slack(backend, o)
        assert err <= 2 * base + 1e-3 + slack, f"{case} {name}: err {err:.3g} vs plain bf16 {base:.3g}"
        # and elementwise close in bf16's own terms
        torch.testing.assert_close(a.float(), o, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_saves_only_gate_and_up(backend):
    gate, up = _inputs((3, 40))
    out = swiglu(gate, up, backend=backend)
    saved = out.grad_fn.saved_tensors
    assert len(saved) == 2
    assert saved[0].data_ptr() == gate.data_ptr() and saved[1].data_ptr() == up.data_ptr()


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_and_partial_grads(backend):
    base_g = torch.randn(6, 34) * 2
    base_u = torch.randn(34, 6)
    gate = base_g[:, 1:33].clone().requires_grad_()
    up_leaf = base_u.clone().requires_grad_(False)
    up = up_leaf.t()[:, 1:33]  # non-contiguous, no grad
    out = geglu(gate[:, ::1], up, approximate="none", backend=backend)
    out.sum().backward()
    g2 = gate.detach().clone().requires_grad_()
    geglu_reference(g2, up, approximate="none").sum().backward()
    torch.testing.assert_close(out, geglu_reference(gate.detach(), up, approximate="none"), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(gate.grad, g2.grad, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_grad_and_empty(backend):
    gate, up = _inputs((5, 9))
    with torch.no_grad():
        out = swiglu(gate, up, backend=backend)
    assert out.grad_fn is None
    torch.testing.assert_close(out, swiglu_reference(gate, up).detach(), atol=1e-6, rtol=1e-6)
    e = torch.empty(0, 8)
    assert swiglu(e, e, backend=backend).shape == (0, 8)


def test_auto_is_torch_on_cpu():
    assert backends.select("swiglu", "cpu", "auto").backend == "torch"
    assert backends.select("geglu", "cpu", "auto").backend == "torch"


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_inputs(backend):
    g = torch.randn(3, 4)
    with pytest.raises(ValueError, match="shape"):
        swiglu(g, torch.randn(3, 5), backend=backend)
    with pytest.raises(ValueError, match="shape"):
        geglu(g, torch.randn(4), backend=backend)  # no broadcasting
    with pytest.raises(TypeError, match="dtype"):
        swiglu(g, g.to(torch.bfloat16), backend=backend)
    with pytest.raises(TypeError, match="floating-point"):
        swiglu(g.long(), g.long(), backend=backend)
    with pytest.raises(TypeError, match="tensor"):
        swiglu([1.0], g, backend=backend)
    with pytest.raises(ValueError, match="approximate"):
        geglu(g, g, approximate="erf", backend=backend)
    with pytest.raises(ValueError):
        swiglu(g, g, backend="nope")


def test_matches_functional_in_bf16_exactly_for_torch_semantics():
    # the reference is, by definition, transformers' eager computation
    gate, up = _inputs((2, 16), torch.bfloat16)
    torch.testing.assert_close(swiglu_reference(gate, up), F.silu(gate) * up, atol=0, rtol=0)
