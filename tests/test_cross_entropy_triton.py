"""Tests of the Triton cross-entropy row kernel (fastft.kernels.cross_entropy.ce_rows_triton) called
directly, against the torch row kernel (ce_rows_torch): out-of-range targets, in-place and
strided gradients, per-row scales, many tiles, int32 targets, bad arguments; and its
ahead-of-time compile for sm_90 (no GPU needed).

Runs in the Triton interpreter on CPU. Moved out of tests/test_cross_entropy.py; helpers in _ce.py.
"""

from __future__ import annotations

import pytest
import torch
from _aot import run_compile_script
from _ce import (
    IGNORE,
    _assert_close,
    _logits_target,
)

from fastft.ops.cross_entropy import (
    ce_rows_torch,
)


# --------------------------------------------------------------------------------------
# the Triton row kernel directly
# --------------------------------------------------------------------------------------
def _rows(kernel, x, t, opts, grad_scale=None, grad_out=None):
    return kernel(x, t, ignore_index=IGNORE, grad_scale=grad_scale, grad_out=grad_out, **opts)


ROW_OPTS = {
    "plain": dict(label_smoothing=0.0, z_loss=0.0, softcap=None),
    "all": dict(label_smoothing=0.1, z_loss=1e-2, softcap=4.0),
}


@pytest.fixture
def triton_rows():
    from fastft.kernels.cross_entropy import ce_rows_triton

    return ce_rows_triton


@pytest.mark.parametrize("opts", list(ROW_OPTS))
def test_triton_rows_out_of_range_target_is_nan(triton_rows, opts):
    opts = ROW_OPTS[opts]
    N, V = 6, 40
    x = torch.randn(N, V)
    t = torch.tensor([1, V, -5, IGNORE, 2**40, 39])
    g = torch.full((N, V), 7.0)
    g_ref = torch.full((N, V), 7.0)
    loss, lse = _rows(triton_rows, x, t, opts, torch.ones(1), g)
    loss_ref, lse_ref = _rows(ce_rows_torch, x, t, opts, torch.ones(1), g_ref)
    bad = torch.tensor([False, True, True, False, True, False])
    assert torch.isnan(loss[bad]).all() and torch.isnan(g[bad]).all()
    assert loss[3] == 0 and not g[3].any()
    assert torch.isfinite(loss[~bad]).all() and torch.isfinite(g[~bad]).all()
    _assert_close(loss[~bad], loss_ref[~bad])
    _assert_close(lse, lse_ref)  # lse is defined on every row
    _assert_close(g[~bad], g_ref[~bad])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("opts", list(ROW_OPTS))
def test_triton_rows_in_place_gradient(triton_rows, opts, dtype):
    opts = ROW_OPTS[opts]
    x, t = _logits_target((24,), 300, dtype=dtype)
    scale = torch.tensor([0.25])
    g = torch.empty_like(x)
    loss, lse = _rows(triton_rows, x, t, opts, scale, g)
    buf = x.clone()
    loss_ip, lse_ip = _rows(triton_rows, buf, t, opts, scale, buf)
    assert torch.equal(loss_ip, loss) and torch.equal(lse_ip, lse)
    assert torch.equal(buf, g)
    # and against the torch row kernel, in place as well
    buf_ref = x.clone()
    loss_ref, _ = _rows(ce_rows_torch, buf_ref, t, opts, scale, buf_ref)
    _assert_close(loss, loss_ref)
    _assert_close(g, buf_ref, dtype)


@pytest.mark.parametrize("opts", list(ROW_OPTS))
def test_triton_rows_strided_rows(triton_rows, opts):
    """A slice of a wider buffer: row stride != V, for the logits and for grad_out."""
    opts = ROW_OPTS[opts]
    N, V, W = 12, 100, 131
    wide = torch.randn(N, W) * 3
    x = wide[:, :V]
    assert x.stride() == (W, 1)
    t = torch.randint(0, V, (N,))
    t[2] = IGNORE
    gwide = torch.full((N, W), 5.0)
    g = gwide[:, 3 : 3 + V]
    loss, lse = _rows(triton_rows, x, t, opts, torch.ones(1), g)
    g_ref = torch.empty(N, V)
    loss_ref, lse_ref = _rows(ce_rows_torch, x.contiguous(), t, opts, torch.ones(1), g_ref)
    _assert_close(loss, loss_ref)
    _assert_close(lse, lse_ref)
    _assert_close(g, g_ref)
    assert (gwide[:, :3] == 5.0).all() and (gwide[:, 3 + V :] == 5.0).all()  # nothing written outside
    # in place into the strided view
    wide2 = wide.clone()
    _rows(triton_rows, wide2[:, :V], t, opts, torch.ones(1), wide2[:, :V])
    _assert_close(wide2[:, :V], g_ref)
    assert torch.equal(wide2[:, V:], wide[:, V:])


@pytest.mark.parametrize("expanded", [False, True], ids=["dense", "stride0"])
def test_triton_rows_per_row_grad_scale(triton_rows, expanded):
    opts = ROW_OPTS["all"]
    x, t = _logits_target((20,), 150)
    scale = torch.full((1,), 0.3).expand(20) if expanded else torch.randn(20)
    g, g_ref = torch.empty_like(x), torch.empty_like(x)
    loss, _ = _rows(triton_rows, x, t, opts, scale, g)
    loss_ref, _ = _rows(ce_rows_torch, x, t, opts, scale, g_ref)
    _assert_close(loss, loss_ref)
    _assert_close(g, g_ref)
    # row i of the gradient is scale[i] times the unit-scale one
    g1 = torch.empty_like(x)
    _rows(triton_rows, x, t, opts, torch.ones(1), g1)
    _assert_close(g, g1 * scale[:, None])


@pytest.mark.parametrize("V", [1, 15, 16, 17, 100])
def test_triton_rows_many_tiles(triton_rows, monkeypatch, V):
    """Tiles much narrower than the row: the online max / sum-exp across tiles and the tails."""
    from fastft.kernels import cross_entropy as kmod

    monkeypatch.setattr(kmod, "_MAX_BLOCK_V_INTERPRET", 16)
    opts = ROW_OPTS["all"]
    x, t = _logits_target((9,), V, scale=5.0)
    x[0, -1] = 40.0  # the row max in the last (partial) tile
    x[1, 0] = 40.0  # ... and in the first
    g, g_ref = torch.empty_like(x), torch.empty_like(x)
    loss, lse = _rows(triton_rows, x, t, opts, torch.ones(1), g)
    loss_ref, lse_ref = _rows(ce_rows_torch, x, t, opts, torch.ones(1), g_ref)
    _assert_close(loss, loss_ref)
    _assert_close(lse, lse_ref)
    _assert_close(g, g_ref)


def test_triton_rows_int32_target_and_empty(triton_rows):
    opts = ROW_OPTS["plain"]
    x, t = _logits_target((10,), 33)
    loss, lse = _rows(triton_rows, x, t.int(), opts)
    loss_ref, lse_ref = _rows(ce_rows_torch, x, t, opts)
    _assert_close(loss, loss_ref)
    _assert_close(lse, lse_ref)
    loss0, lse0 = _rows(triton_rows, torch.randn(0, 33), torch.zeros(0, dtype=torch.long), opts)
    assert loss0.shape == (0,) and lse0.shape == (0,) and loss0.dtype == torch.float32


def test_triton_rows_bad_arguments(triton_rows):
    opts = ROW_OPTS["plain"]
    x, t = _logits_target((4,), 10)
    with pytest.raises(ValueError, match="2-D"):
        _rows(triton_rows, x[0], t[0], opts)
    with pytest.raises(ValueError, match="unit stride"):
        _rows(triton_rows, torch.randn(10, 4).t(), t, opts)
    with pytest.raises(ValueError, match="target"):
        _rows(triton_rows, x, t[:3], opts)
    with pytest.raises(ValueError, match="grad_out"):
        _rows(triton_rows, x, t, opts, torch.ones(1), None)
    with pytest.raises(ValueError, match="grad_scale"):
        _rows(triton_rows, x, t, opts, torch.ones(3), torch.empty_like(x))


_COMPILE_SCRIPT = r"""
import sys
try:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
except ImportError as exc:
    print("SKIP: Triton's compiler API is not where this test expects it:", exc)
    sys.exit(0)
from fastft.kernels import cross_entropy as kmod

sig = {name: "constexpr" for name in kmod._ce_rows_kernel.arg_names if name.isupper()}
sig.update(
    logits_ptr=None, logits_row_stride="i64", target_ptr="*i64", target_stride="i32", loss_ptr="*fp32",
    lse_ptr="*fp32", grad_scale_ptr="*fp32", grad_scale_stride="i32", grad_ptr=None, grad_row_stride="i64",
    V="i32", ignore_index="i32", label_smoothing="fp32", z_loss="fp32", softcap="fp32",
)
names = ("HAS_SOFTCAP", "HAS_SMOOTHING", "HAS_ZLOSS", "COMPUTE_GRAD")
for dtype, flags in [("*fp32", (0, 0, 0, 0)), ("*bf16", (1, 1, 1, 1)), ("*fp16", (1, 0, 1, 1)), ("*bf16", (0, 1, 0, 1))]:
    sig.update(logits_ptr=dtype, grad_ptr=dtype)
    constexprs = dict(zip(names, map(bool, flags)), BLOCK_V=kmod._MAX_BLOCK_V)
    try:
        k = triton.compile(ASTSource(kmod._ce_rows_kernel, sig, constexprs), target=GPUTarget("cuda", 90, 32),
                           options={"num_warps": 8})
    except Exception as exc:
        if "ptxas" in str(exc).lower():
            print("SKIP: no ptxas to assemble with:", exc)
            sys.exit(0)
        raise
    assert k.asm.get("ptx"), (dtype, flags)
print("OK")
"""


@pytest.mark.slow
def test_triton_kernel_compiles_for_gpu():
    """Compile the kernel ahead of time for sm_90 (no GPU needed): catches what the
    interpreter lets through, such as a loop-carried variable that changes type.
    In a fresh process: the kernels of this one are already defined as interpreted."""
    run_compile_script(_COMPILE_SCRIPT, timeout=300)
