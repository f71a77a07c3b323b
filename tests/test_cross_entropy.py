"""Tests of fastft.ops.cross_entropy (on logits) and of what both public functions share: the
case with nothing counted, bad inputs, torch.compile and the backend dispatch.
The fused linear CE's numerics and chunking are in test_cross_entropy_fused.py, the Triton row
kernel called directly in test_cross_entropy_triton.py; helpers in _ce.py, fixtures in conftest.py.

Every numerical test runs for the ``torch`` backend and for the ``triton`` backend
(on CPU in the Triton interpreter: ``TRITON_INTERPRET=1`` is set in conftest.py), so
shapes stay small. Oracles: ``torch.nn.functional.cross_entropy`` on fp32-upcast
logits where it has the option, else :func:`cross_entropy_reference` (fp32).
Low-precision results are judged against what plain PyTorch gets in that dtype.
"""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F
from _ce import (
    BACKENDS,
    IGNORE,
    REDUCTIONS,
    _assert_close,
    _assert_no_worse_than_lowp,
    _flce_inputs,
    _interpreter_rounding_slack,
    _logits_target,
    _loss_and_grads,
    _plain_lowp_ce,
    _upstream,
)

import fastft
from fastft import backends
from fastft.ops.cross_entropy import (
    cross_entropy,
    cross_entropy_reference,
    fused_linear_cross_entropy,
)

ce_mod = importlib.import_module("fastft.ops.cross_entropy")  # the module; fastft.ops.cross_entropy is the function


# --------------------------------------------------------------------------------------
# cross_entropy vs torch.nn.functional.cross_entropy
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("shape", [(37, 101), (5, 7, 123), (6, 1)], ids=["37x101", "5x7x123", "V1"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_cross_entropy_matches_torch(backend, shape, reduction, label_smoothing):
    *lead, V = shape
    x, t = _logits_target(lead, V)
    up = _upstream(reduction, t.shape)

    def ours(x):
        return cross_entropy(x, t, reduction=reduction, label_smoothing=label_smoothing, backend=backend)

    def theirs(x):
        out = F.cross_entropy(
            x.float().reshape(-1, V),
            t.reshape(-1),
            ignore_index=IGNORE,
            reduction=reduction,
            label_smoothing=label_smoothing,
        )
        return out.reshape(t.shape) if reduction == "none" else out

    loss, (g,) = _loss_and_grads(ours, [x], up)
    ref, (g_ref,) = _loss_and_grads(theirs, [x], up)
    assert loss.dtype == torch.float32 and loss.shape == ref.shape
    _assert_close(loss, ref, what="loss")
    assert g.dtype == x.dtype and g.shape == x.shape
    _assert_close(g, g_ref, what="grad")


@pytest.mark.parametrize("backend", BACKENDS)
def test_none_reduction_with_expanded_upstream(backend):
    """loss(reduction='none').sum().backward() hands the kernel a stride-0 upstream gradient."""
    x, t = _logits_target((3, 5), 77)
    loss, (g,) = _loss_and_grads(lambda x: cross_entropy(x, t, reduction="none", backend=backend).sum(), [x])
    ref, (g_ref,) = _loss_and_grads(lambda x: cross_entropy_reference(x, t, reduction="sum"), [x])
    _assert_close(loss, ref)
    _assert_close(g, g_ref)


# --------------------------------------------------------------------------------------
# cross_entropy vs cross_entropy_reference: softcap, z_loss, num_items_in_batch
# --------------------------------------------------------------------------------------
OPTION_CASES = {
    "softcap": dict(softcap=4.0),
    "z_loss": dict(z_loss=1e-2),
    "num_items_int": dict(num_items_in_batch=50),
    "num_items_tensor": dict(num_items_in_batch=torch.tensor(50)),
    "combined_mean": dict(softcap=4.0, z_loss=1e-2, label_smoothing=0.1, num_items_in_batch=torch.tensor(50)),
    "combined_sum": dict(softcap=4.0, z_loss=1e-2, label_smoothing=0.1, reduction="sum"),
    "combined_none": dict(softcap=4.0, z_loss=1e-2, label_smoothing=0.1, reduction="none"),
}


@pytest.mark.parametrize("case", list(OPTION_CASES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_cross_entropy_matches_reference(backend, case):
    opts = OPTION_CASES[case]
    x, t = _logits_target((4, 9), 300, scale=4.0)
    up = _upstream(opts.get("reduction", "mean"), t.shape)
    loss, (g,) = _loss_and_grads(lambda x: cross_entropy(x, t, backend=backend, **opts), [x], up)
    ref, (g_ref,) = _loss_and_grads(lambda x: cross_entropy_reference(x, t, **opts), [x], up)
    assert loss.dtype == torch.float32
    _assert_close(loss, ref, what="loss")
    _assert_close(g, g_ref, what="grad")


@pytest.mark.parametrize("backend", BACKENDS)
def test_num_items_in_batch_divides_the_sum(backend):
    x, t = _logits_target((20,), 50)
    total = cross_entropy(x, t, reduction="sum", backend=backend)
    for n in (7, torch.tensor(7), torch.tensor(7.0)):
        _assert_close(cross_entropy(x, t, num_items_in_batch=n, backend=backend), total / 7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_softcap_saturates(backend):
    """Huge logits under a small cap: finite loss and gradient, equal to the reference."""
    x, t = _logits_target((16,), 64, scale=1e4)
    opts = dict(softcap=2.0, reduction="sum")
    loss, (g,) = _loss_and_grads(lambda x: cross_entropy(x, t, backend=backend, **opts), [x])
    ref, (g_ref,) = _loss_and_grads(lambda x: cross_entropy_reference(x, t, **opts), [x])
    assert torch.isfinite(loss) and torch.isfinite(g).all()
    _assert_close(loss, ref)
    _assert_close(g, g_ref)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_odd_shape_all_options(backend, reduction, narrow_tiles):
    opts = dict(softcap=3.0, z_loss=1e-3, label_smoothing=0.2, reduction=reduction)
    x, t = _logits_target((5, 7), 123)
    up = _upstream(reduction, t.shape)
    loss, (g,) = _loss_and_grads(lambda x: cross_entropy(x, t, backend=backend, **opts), [x], up)
    ref, (g_ref,) = _loss_and_grads(lambda x: cross_entropy_reference(x, t, **opts), [x], up)
    _assert_close(loss, ref)
    _assert_close(g, g_ref)


@pytest.mark.parametrize("target_value", [3, IGNORE])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_one_dimensional_logits(backend, reduction, target_value):
    """logits (V,) with a 0-dim target: one token; the result is 0-dim for every reduction."""
    x = torch.randn(40) * 3
    t = torch.tensor(target_value)
    loss, (g,) = _loss_and_grads(lambda x: cross_entropy(x, t, reduction=reduction, backend=backend), [x])
    ref, (g_ref,) = _loss_and_grads(lambda x: cross_entropy_reference(x[None], t[None], reduction="sum"), [x])
    assert loss.shape == () and g.shape == (40,)
    _assert_close(loss, ref)
    _assert_close(g, g_ref)
    if target_value == IGNORE:
        assert loss.item() == 0.0 and not g.any()


# --------------------------------------------------------------------------------------
# dtypes
# --------------------------------------------------------------------------------------
DTYPE_OPTIONS = {
    "plain": dict(),
    "combined": dict(softcap=5.0, z_loss=1e-3, label_smoothing=0.1),
}


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("case", list(DTYPE_OPTIONS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_cross_entropy_dtypes(backend, dtype, case, reduction):
    opts = dict(DTYPE_OPTIONS[case], reduction=reduction)
    x, t = _logits_target((24,), 257, dtype=dtype)
    up = _upstream(reduction, t.shape)
    loss, (g,) = _loss_and_grads(lambda x: cross_entropy(x, t, backend=backend, **opts), [x], up)
    # the fp32 oracle sees exactly the same (bf16-representable) logits
    ref, (g_ref,) = _loss_and_grads(lambda x: cross_entropy_reference(x, t, **opts), [x.float()], up)
    assert loss.dtype == torch.float32 and g.dtype == dtype
    if dtype == torch.float32:
        _assert_close(loss, ref, what="loss")
        _assert_close(g, g_ref, what="grad")
        return
    lowp, (g_lowp,) = _loss_and_grads(lambda x: _plain_lowp_ce(x, t, **opts), [x], up)
    _assert_no_worse_than_lowp(loss, lowp, ref, dtype, "loss")
    _assert_no_worse_than_lowp(g, g_lowp, g_ref, dtype, "grad", _interpreter_rounding_slack(backend, g_ref, dtype))
    _assert_close(loss, ref, dtype, "loss")  # and within the table's absolute bounds
    _assert_close(g, g_ref, dtype, "grad")


# --------------------------------------------------------------------------------------
# nothing counted
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("op", ["cross_entropy", "fused_linear_cross_entropy"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_all_targets_ignored(backend, reduction, op, small_chunks):
    opts = dict(reduction=reduction, backend=backend, label_smoothing=0.1, z_loss=1e-3)
    if op == "cross_entropy":
        x, _ = _logits_target((3, 11), 70)
        t = torch.full((3, 11), IGNORE)
        inputs = [x]

        def fn(x):
            return cross_entropy(x, t, **opts)
    else:
        h, w, b, _ = _flce_inputs((33,), V=70)
        t = torch.full((33,), IGNORE)
        inputs = [h, w, b]

        def fn(h, w, b):
            return fused_linear_cross_entropy(h, w, t, b, **opts)

    loss, grads = _loss_and_grads(fn, inputs, _upstream(reduction, t.shape))
    assert not torch.isnan(loss).any()
    assert torch.equal(loss, torch.zeros_like(loss))
    for g in grads:
        assert not torch.isnan(g).any()
        assert torch.equal(g, torch.zeros_like(g))


# --------------------------------------------------------------------------------------
# bad inputs
# --------------------------------------------------------------------------------------
def _x():
    return torch.randn(4, 10)


def _t():
    return torch.randint(0, 10, (4,))


def _hw():
    return torch.randn(4, 8), torch.randn(10, 8)


BAD_CE = {
    "shape_mismatch": (lambda: cross_entropy(_x(), torch.zeros(5, dtype=torch.long)), ValueError, "target shape"),
    "float_target": (lambda: cross_entropy(_x(), torch.zeros(4)), TypeError, "integer"),
    "bool_target": (lambda: cross_entropy(_x(), torch.zeros(4, dtype=torch.bool)), TypeError, "integer"),
    "target_eq_V": (lambda: cross_entropy(_x(), torch.tensor([0, 10, 1, 2])), ValueError, "outside"),
    "target_negative": (lambda: cross_entropy(_x(), torch.tensor([0, -5, 1, 2])), ValueError, "-5"),
    "int_logits": (lambda: cross_entropy(torch.ones(4, 10, dtype=torch.long), _t()), TypeError, "floating"),
    "empty_vocab": (lambda: cross_entropy(torch.randn(4, 0), _t()), ValueError, "vocabulary"),
    "unknown_reduction": (lambda: cross_entropy(_x(), _t(), reduction="avg"), ValueError, "reduction"),
    "negative_z_loss": (lambda: cross_entropy(_x(), _t(), z_loss=-0.1), ValueError, "z_loss"),
    "softcap_zero": (lambda: cross_entropy(_x(), _t(), softcap=0.0), ValueError, "softcap"),
    "softcap_negative": (lambda: cross_entropy(_x(), _t(), softcap=-1.0), ValueError, "softcap"),
    "label_smoothing_gt_1": (lambda: cross_entropy(_x(), _t(), label_smoothing=1.5), ValueError, "label_smoothing"),
    "ignore_index_float": (lambda: cross_entropy(_x(), _t(), ignore_index=-100.0), TypeError, "ignore_index"),
    "num_items_with_sum": (
        lambda: cross_entropy(_x(), _t(), reduction="sum", num_items_in_batch=4),
        ValueError,
        "num_items_in_batch",
    ),
    "num_items_with_none": (
        lambda: cross_entropy(_x(), _t(), reduction="none", num_items_in_batch=torch.tensor(4)),
        ValueError,
        "num_items_in_batch",
    ),
    "num_items_zero": (lambda: cross_entropy(_x(), _t(), num_items_in_batch=0), ValueError, "num_items_in_batch"),
    "num_items_string": (lambda: cross_entropy(_x(), _t(), num_items_in_batch="4"), TypeError, "num_items_in_batch"),
    "num_items_vector": (
        lambda: cross_entropy(_x(), _t(), num_items_in_batch=torch.tensor([4, 4])),
        ValueError,
        "num_items_in_batch",
    ),
}

BAD_FLCE = {
    "H_mismatch": (
        lambda: fused_linear_cross_entropy(torch.randn(4, 8), torch.randn(10, 9), _t()),
        ValueError,
        "H == weight.shape",
    ),
    "weight_not_2d": (
        lambda: fused_linear_cross_entropy(torch.randn(4, 8), torch.randn(10, 8, 1), _t()),
        ValueError,
        "weight must be 2-D",
    ),
    "bias_shape": (
        lambda: fused_linear_cross_entropy(*_hw(), _t(), torch.randn(9)),
        ValueError,
        "bias shape",
    ),
    "dtype_mismatch": (
        lambda: fused_linear_cross_entropy(torch.randn(4, 8, dtype=torch.bfloat16), torch.randn(10, 8), _t()),
        TypeError,
        "dtype",
    ),
    "target_shape": (
        lambda: fused_linear_cross_entropy(*_hw(), torch.zeros(4, 1, dtype=torch.long)),
        ValueError,
        "target shape",
    ),
    "float_target": (lambda: fused_linear_cross_entropy(*_hw(), torch.zeros(4)), TypeError, "integer"),
    "target_out_of_range": (
        lambda: fused_linear_cross_entropy(*_hw(), torch.tensor([0, 1, 10, 2])),
        ValueError,
        "outside",
    ),
    "unknown_reduction": (lambda: fused_linear_cross_entropy(*_hw(), _t(), reduction="max"), ValueError, "reduction"),
    "negative_z_loss": (lambda: fused_linear_cross_entropy(*_hw(), _t(), z_loss=-1.0), ValueError, "z_loss"),
    "softcap_zero": (lambda: fused_linear_cross_entropy(*_hw(), _t(), softcap=0), ValueError, "softcap"),
    "num_items_with_none": (
        lambda: fused_linear_cross_entropy(*_hw(), _t(), reduction="none", num_items_in_batch=3),
        ValueError,
        "num_items_in_batch",
    ),
}


@pytest.mark.parametrize("case", list(BAD_CE))
def test_cross_entropy_bad_inputs(case):
    fn, exc, match = BAD_CE[case]
    with pytest.raises(exc, match=match):
        fn()


@pytest.mark.parametrize("case", list(BAD_FLCE))
def test_flce_bad_inputs(case):
    fn, exc, match = BAD_FLCE[case]
    with pytest.raises(exc, match=match):
        fn()


def test_bad_inputs_raise_before_dispatch():
    """Validation does not depend on the backend: a forced Triton backend gives the same errors."""
    with pytest.raises(ValueError, match="outside"):
        cross_entropy(_x(), torch.tensor([0, 1, 2, 10]), backend="triton")
    with pytest.raises(ValueError, match="H == weight.shape"):
        fused_linear_cross_entropy(torch.randn(4, 8), torch.randn(10, 9), _t(), backend="triton")


# --------------------------------------------------------------------------------------
# torch.compile
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_matches_eager(backend, small_chunks):
    torch._dynamo.reset()
    x, t = _logits_target((2, 9), 50)
    h, w, b, t2 = _flce_inputs((2, 17), V=50)
    t[0, :3] = IGNORE
    t2[1, :4] = IGNORE

    def f(x, h, w, b):
        a = cross_entropy(x * 1.5, t, label_smoothing=0.1, backend=backend)
        c = fused_linear_cross_entropy(h, w, t2, b, z_loss=1e-3, backend=backend)
        return a + 2.0 * c

    inputs = [x, h, w, b]
    eager, grads = _loss_and_grads(f, inputs)
    compiled, grads_c = _loss_and_grads(torch.compile(f, backend="aot_eager"), inputs)
    _assert_close(compiled, eager)
    for g, gc in zip(grads, grads_c):
        _assert_close(gc, g)


# --------------------------------------------------------------------------------------
# dispatch
# --------------------------------------------------------------------------------------
def test_triton_on_cpu_without_interpreter_is_unavailable(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not backends.interpreting()
    x, t = _logits_target((4,), 10)
    with pytest.raises(fastft.BackendUnavailable, match="TRITON_INTERPRET"):
        cross_entropy(x, t, backend="triton")
    h, w, b, t2 = _flce_inputs((4,), V=10)
    with pytest.raises(backends.BackendUnavailable):
        fused_linear_cross_entropy(h, w, t2, b, backend="triton")
    monkeypatch.setenv("FASTFT_BACKEND", "triton")
    with pytest.raises(backends.BackendUnavailable):
        cross_entropy(x, t)


def test_env_forces_torch(monkeypatch, count_triton):
    monkeypatch.setenv("FASTFT_BACKEND", "torch")
    choice = backends.select(ce_mod.OP_CE, "cpu")
    assert choice.backend == "torch" and "forced" in choice.reason
    x, t = _logits_target((4,), 10)
    cross_entropy(x, t)
    assert not count_triton


def test_env_forces_triton_and_argument_wins(monkeypatch, count_triton):
    monkeypatch.setenv("FASTFT_BACKEND", "triton")
    x, t = _logits_target((4,), 10)
    ref = cross_entropy_reference(x, t)
    _assert_close(cross_entropy(x, t), ref)
    assert len(count_triton) == 1
    _assert_close(cross_entropy(x, t, backend="torch"), ref)
    assert len(count_triton) == 1


def test_triton_backend_runs_the_triton_kernel(count_triton, small_chunks):
    x, t = _logits_target((4,), 10, ignore_frac=0.0)
    x.requires_grad_(True)
    cross_entropy(x, t, backend="triton").backward()  # forward + backward
    assert len(count_triton) == 2
    h, w, b, t2 = _flce_inputs((40,), V=300)
    fused_linear_cross_entropy(h, w, t2, b, backend="triton")  # 3 chunks of <= 16 rows
    assert len(count_triton) == 5


def test_unknown_backend_name_raises(monkeypatch):
    x, t = _logits_target((4,), 10)
    with pytest.raises(ValueError, match="backend"):
        cross_entropy(x, t, backend="cuda_graphs")
    h, w, b, t2 = _flce_inputs((4,), V=10)
    with pytest.raises(ValueError, match="backend"):
        fused_linear_cross_entropy(h, w, t2, b, backend="Triton ")
    monkeypatch.setenv("FASTFT_BACKEND", "nope")
    with pytest.raises(ValueError, match="FASTFT_BACKEND"):
        cross_entropy(x, t)


def test_auto_picks_torch_on_cpu(monkeypatch, count_triton):
    monkeypatch.delenv("FASTFT_BACKEND", raising=False)
    assert backends.interpreting()  # even with the interpreter on, auto never runs Triton on CPU
    for op in (ce_mod.OP_CE, ce_mod.OP_FLCE):
        assert backends.select(op, "cpu").backend == "torch"
        assert backends.select(op, "cpu", "auto").backend == "torch"
    x, t = _logits_target((4,), 10)
    cross_entropy(x, t)
    assert not count_triton
