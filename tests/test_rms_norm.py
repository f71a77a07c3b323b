"""Tests of fastft.ops.rms_norm against transformers' LlamaRMSNorm and Gemma2RMSNorm.

Every numerical test runs for the ``torch`` backend and for the ``triton`` backend (on
CPU in the Triton interpreter: ``TRITON_INTERPRET=1`` is set in conftest.py), so shapes
stay small; hidden sizes are not all powers of two. fp32 results are compared with the
modules directly; bf16 results are judged against an fp32 oracle, relative to the
module's own bf16 error. The torch backend's forward is bit-for-bit the modules'.
"""

from __future__ import annotations

import importlib

import pytest
import torch
from transformers.models.gemma2.modeling_gemma2 import Gemma2RMSNorm
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from fastft import backends
from fastft.ops import rms_norm, rms_norm_reference

rn_mod = importlib.import_module("fastft.ops.rms_norm")  # the module; fastft.ops.rms_norm is the function

BACKENDS = ["torch", "triton"]
SHAPES = [(3, 5, 64), (7, 100), (2, 3, 1), (9, 40)]
SHAPE_IDS = ["3x5x64", "7x100", "H1", "9x40"]
MODULES = ["llama", "gemma2"]
EPS = 1e-6

# {what: (atol, rtol)} for fp32 comparisons with the modules
TOL = {"out": (1e-6, 1e-5), "dx": (1e-5, 1e-5), "dw": (1e-5, 1e-5)}
# slack added to "no worse than twice the module in bf16"
LOWP_ATOL = 1e-3


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------
def _module(kind: str, hidden: int, dtype=torch.float32) -> torch.nn.Module:
    m = LlamaRMSNorm(hidden, eps=EPS) if kind == "llama" else Gemma2RMSNorm(hidden, eps=EPS)
    with torch.no_grad():
        m.weight.copy_(torch.randn(hidden) * 0.5 + (1.0 if kind == "llama" else 0.0))
    return m.to(dtype)


def _offset(kind: str) -> float:
    return 0.0 if kind == "llama" else 1.0


def _run(fn, x, w, dy):
    """Output of ``fn(x, w)`` and the gradients (dx, dw) for upstream ``dy`` (fresh leaves)."""
    x = x.detach().clone().requires_grad_(True)
    w = w.detach().clone().requires_grad_(True)
    out = fn(x, w)
    dx, dw = torch.autograd.grad(out, [x, w], dy.to(out.dtype))
    return out.detach(), dx, dw


def _module_fn(m):
    def fn(x, w):
        return torch.func.functional_call(m, {"weight": w}, (x,))

    return fn


def _ours(kind, backend):
    return lambda x, w: rms_norm(x, w, EPS, offset=_offset(kind), backend=backend)


def _err(a, b):
    return (a.float() - b.float()).abs().max().item()


def _interp_slack(backend, oracle):
    """The Triton interpreter converts fp32 to bf16 by truncation (a GPU rounds to nearest
    even): up to one more bf16 ulp on values a kernel writes in bf16."""
    if backend != "triton" or not backends.interpreting():
        return 0.0
    biggest = oracle.float().abs().max().item()
    return 2.0 ** (torch.tensor(biggest).log2().floor().item() - 7) if biggest > 0 else 0.0


def _no_worse(ours, lowp, oracle, what, slack=0.0):
    err, base = _err(ours, oracle), _err(lowp, oracle)
    bound = 2 * base + LOWP_ATOL + slack
    assert err <= bound, f"{what}: error {err:.3g} vs the module in bf16 {base:.3g} (slack {slack:.3g})"


# --------------------------------------------------------------------------------------
# the reference is the modules, op for op
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", MODULES)
def test_reference_is_the_module(kind, dtype):
    m = _module(kind, 72, dtype)
    x = torch.randn(4, 6, 72).to(dtype)
    with torch.no_grad():
        assert torch.equal(rms_norm_reference(x, m.weight, EPS, offset=_offset(kind)), m(x))


# --------------------------------------------------------------------------------------
# fp32: forward and backward vs the modules
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("kind", MODULES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_fp32_matches_module(backend, kind, shape):
    m = _module(kind, shape[-1])
    x = torch.randn(shape) * 2.0
    dy = torch.randn(shape)
    out, dx, dw = _run(_ours(kind, backend), x, m.weight, dy)
    ref, dx_ref, dw_ref = _run(_module_fn(m), x, m.weight, dy)
    assert out.dtype == ref.dtype == torch.float32 and out.shape == ref.shape
    if backend == "torch":
        assert torch.equal(out, ref)  # same ops in the same order: the same bits
    for name, a, b in (("out", out, ref), ("dx", dx, dx_ref), ("dw", dw, dw_ref)):
        atol, rtol = TOL[name]
        torch.testing.assert_close(a, b, atol=atol, rtol=rtol, msg=lambda s, n=name: f"{n}: {s}")
    assert dx.dtype == x.dtype and dw.dtype == m.weight.dtype


# --------------------------------------------------------------------------------------
# bf16 (and mixed dtypes): relative to the module's own low-precision error
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("w_dtype", [torch.bfloat16, torch.float32], ids=["w_bf16", "w_fp32"])
@pytest.mark.parametrize("shape", [(3, 5, 64), (7, 100)], ids=["3x5x64", "7x100"])
@pytest.mark.parametrize("kind", MODULES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_vs_module(backend, kind, shape, w_dtype):
    m = _module(kind, shape[-1], w_dtype)
    x = (torch.randn(shape) * 2.0).to(torch.bfloat16)
    dy = torch.randn(shape)
    out, dx, dw = _run(_ours(kind, backend), x, m.weight, dy)
    lowp, dx_lowp, dw_lowp = _run(_module_fn(m), x, m.weight, dy)
    oracle, dx_o, dw_o = _run(
        lambda x, w: rms_norm_reference(x.float(), w.float(), EPS, _offset(kind)), x, m.weight, dy
    )

    # result dtype: promote(weight, x) in the Llama order, x.dtype in the Gemma order
    want = torch.promote_types(w_dtype, torch.bfloat16) if kind == "llama" else torch.bfloat16
    assert out.dtype == lowp.dtype == want
    assert dx.dtype == torch.bfloat16 and dw.dtype == w_dtype
    if backend == "torch":
        assert torch.equal(out, lowp)
    slack = _interp_slack(backend, oracle) if want == torch.bfloat16 else 0.0
    _no_worse(out, lowp, oracle, "out", slack)
    _no_worse(dx, dx_lowp, dx_o, "dx", _interp_slack(backend, dx_o))
    _no_worse(dw, dw_lowp, dw_o, "dw", _interp_slack(backend, dw_o) if w_dtype == torch.bfloat16 else 0.0)


# --------------------------------------------------------------------------------------
# layouts, partial gradients, saved tensors
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_input(backend):
    m = _module("llama", 48)
    x = torch.randn(48, 6).t()  # (6, 48) with stride 1 along rows
    dy = torch.randn(48, 6).t()
    out, dx, dw = _run(_ours("llama", backend), x, m.weight, dy)
    ref, dx_ref, dw_ref = _run(_module_fn(m), x, m.weight, dy)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(dx, dx_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dw, dw_ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("which", ["x_only", "w_only"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_partial_gradients(backend, which):
    m = _module("gemma2", 40)
    x = torch.randn(5, 40, requires_grad=which == "x_only")
    w = m.weight.detach().clone().requires_grad_(which == "w_only")
    out = rms_norm(x, w, EPS, offset=1.0, backend=backend)
    (g,) = torch.autograd.grad(out.sum(), [x if which == "x_only" else w])
    ref = rms_norm_reference(x, w, EPS, offset=1.0)
    (g_ref,) = torch.autograd.grad(ref.sum(), [x if which == "x_only" else w])
    torch.testing.assert_close(g, g_ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_saves_x_and_rstd_only(backend):
    x = torch.randn(2, 3, 24, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(24, requires_grad=True)
    out = rms_norm(x, w, EPS, backend=backend)
    node = out.grad_fn
    while "rms_norm" not in type(node).__name__:  # past the reshape back to x's shape
        node = node.next_functions[0][0]
    shapes = sorted(((tuple(t.shape), t.dtype) for t in node.saved_tensors), key=str)
    want = [((6, 24), torch.bfloat16), ((24,), torch.float32), ((6,), torch.float32)]  # x, weight, rstd
    assert shapes == sorted(want, key=str)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_rows(backend):
    x = torch.randn(0, 3, 32, requires_grad=True)
    w = torch.randn(32, requires_grad=True)
    out = rms_norm(x, w, EPS, backend=backend)
    assert out.shape == x.shape
    dx, dw = torch.autograd.grad(out.sum(), [x, w])
    assert dx.shape == x.shape and torch.equal(dw, torch.zeros_like(w))


def test_auto_backend_on_cpu_is_torch():
    assert backends.select(rn_mod.OP_RMS_NORM, "cpu", "auto").backend == "torch"


# --------------------------------------------------------------------------------------
# bad inputs
# --------------------------------------------------------------------------------------
BAD = {
    "x_int": (lambda: (torch.ones(2, 4, dtype=torch.int64), torch.ones(4), EPS, {}), TypeError, "x must be"),
    "x_list": (lambda: ([[1.0] * 4], torch.ones(4), EPS, {}), TypeError, "x must be a tensor"),
    "w_int": (lambda: (torch.ones(2, 4), torch.ones(4, dtype=torch.int32), EPS, {}), TypeError, "weight must be"),
    "w_2d": (lambda: (torch.ones(2, 4), torch.ones(1, 4), EPS, {}), ValueError, "weight must be 1-D"),
    "w_size": (lambda: (torch.ones(2, 4), torch.ones(5), EPS, {}), ValueError, "x.shape\\[-1\\] = 4"),
    "x_0d": (lambda: (torch.tensor(1.0), torch.ones(1), EPS, {}), ValueError, "hidden"),
    "hidden_0": (lambda: (torch.ones(2, 0), torch.ones(0), EPS, {}), ValueError, "hidden"),
    "eps_0": (lambda: (torch.ones(2, 4), torch.ones(4), 0.0, {}), ValueError, "eps"),
    "eps_neg": (lambda: (torch.ones(2, 4), torch.ones(4), -1e-6, {}), ValueError, "eps"),
    "eps_inf": (lambda: (torch.ones(2, 4), torch.ones(4), float("inf"), {}), ValueError, "eps"),
    "eps_nan": (lambda: (torch.ones(2, 4), torch.ones(4), float("nan"), {}), ValueError, "eps"),
    "eps_str": (lambda: (torch.ones(2, 4), torch.ones(4), "1e-6", {}), TypeError, "eps"),
    "eps_bool": (lambda: (torch.ones(2, 4), torch.ones(4), True, {}), TypeError, "eps"),
    "offset_str": (lambda: (torch.ones(2, 4), torch.ones(4), EPS, {"offset": "1"}), TypeError, "offset"),
    "offset_nan": (lambda: (torch.ones(2, 4), torch.ones(4), EPS, {"offset": float("nan")}), ValueError, "offset"),
    "backend": (lambda: (torch.ones(2, 4), torch.ones(4), EPS, {"backend": "nope"}), ValueError, "backend"),
    "backend_cuda": (
        lambda: (torch.ones(2, 4), torch.ones(4), EPS, {"backend": "cuda"}),
        backends.BackendUnavailable,
        "not implemented",
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_inputs(case):
    make, exc, match = BAD[case]
    x, w, eps, kw = make()
    with pytest.raises(exc, match=match):
        rms_norm(x, w, eps, **kw)


@pytest.mark.parametrize("kind", MODULES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_fp32_x_with_bf16_weight(backend, kind):
    """Llama promotes to fp32 (weight bf16 * fp32 x); Gemma returns x.dtype."""
    m = _module(kind, 56, torch.bfloat16)
    x = torch.randn(6, 56)
    dy = torch.randn(6, 56)
    out, dx, dw = _run(_ours(kind, backend), x, m.weight, dy)
    ref, dx_ref, dw_ref = _run(_module_fn(m), x, m.weight, dy)
    assert out.dtype == ref.dtype == torch.float32 and dx.dtype == torch.float32 and dw.dtype == torch.bfloat16
    if backend == "torch":
        assert torch.equal(out, ref)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(dx, dx_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dw, dw_ref, atol=1e-2, rtol=1e-2)  # bf16 weight gradient
