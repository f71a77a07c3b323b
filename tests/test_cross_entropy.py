"""Tests of fastft.ops.cross_entropy and fastft.ops.fused_linear_cross_entropy.

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
from _aot import run_compile_script

import fastft
from fastft import backends
from fastft.ops.cross_entropy import (
    ce_rows_torch,
    chunk_rows,
    cross_entropy,
    cross_entropy_reference,
    fused_linear_cross_entropy,
    fused_linear_cross_entropy_reference,
)

ce_mod = importlib.import_module("fastft.ops.cross_entropy")  # the module; fastft.ops.cross_entropy is the function
chunked_mod = importlib.import_module("fastft.ops.ce_chunked")  # where the chunk loop looks its helpers up

BACKENDS = ["torch", "triton"]
REDUCTIONS = ["mean", "sum", "none"]
IGNORE = -100

# {dtype: (atol, rtol)} for direct comparisons with an fp32 oracle
TOL = {
    torch.float32: (2e-5, 1e-5),
    torch.bfloat16: (2e-2, 2e-2),
    torch.float16: (5e-3, 5e-3),
}
# slack added to "no worse than twice plain PyTorch in that dtype"
LOWP_ATOL = {torch.bfloat16: 1e-3}


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------
def _logits_target(lead, V, dtype=torch.float32, ignore_frac=0.25, scale=3.0):
    lead = tuple(lead)
    x = (torch.randn(*lead, V) * scale).to(dtype)
    t = torch.randint(0, V, lead)
    t[torch.rand(lead) < ignore_frac] = IGNORE
    if t.numel() and bool((t == IGNORE).all()):
        t.view(-1)[0] = 0
    return x, t


def _loss_and_grads(fn, inputs, upstream=None):
    """Loss of ``fn(*inputs)`` and the gradients of every input (fresh leaves)."""
    leaves = [i.detach().clone().requires_grad_(True) for i in inputs]
    loss = fn(*leaves)
    g = upstream if upstream is not None else torch.ones_like(loss)
    grads = torch.autograd.grad(loss, leaves, g)
    return loss.detach(), grads


def _upstream(reduction, shape):
    return torch.randn(shape) if reduction == "none" else None


def _assert_close(actual, expected, dtype=torch.float32, what=""):
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(actual.float(), expected.float(), atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")


def _max_err(a, b):
    return (a.float() - b.float()).abs().max().item()


def _interpreter_rounding_slack(backend, oracle, dtype):
    """The Triton interpreter converts fp32 to bf16 by truncation (a GPU rounds to nearest
    even), which costs up to one more bf16 ulp on values written in bf16 by a kernel."""
    if backend != "triton" or dtype != torch.bfloat16 or not backends.interpreting():
        return 0.0
    biggest = oracle.float().abs().max().item()
    return 2.0 ** (torch.tensor(biggest).log2().floor().item() - 7) if biggest > 0 else 0.0


def _assert_no_worse_than_lowp(ours, lowp, oracle, dtype, what="", slack=0.0):
    """flash-attention style: our error vs the fp32 oracle is at most twice plain PyTorch's in ``dtype``."""
    err, base = _max_err(ours, oracle), _max_err(lowp, oracle)
    bound = 2 * base + LOWP_ATOL[dtype] + slack
    assert err <= bound, f"{what}: error {err:.3g} vs plain {dtype} PyTorch {base:.3g} (slack {slack:.3g})"


def _plain_lowp_ce(x, t, *, reduction="mean", label_smoothing=0.0, z_loss=0.0, softcap=None, num_items_in_batch=None):
    """What plain PyTorch code computes in ``x.dtype`` (no upcast)."""
    V = x.shape[-1]
    z, tt = x.reshape(-1, V), t.reshape(-1)
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    loss = F.cross_entropy(z, tt, ignore_index=IGNORE, reduction="none", label_smoothing=label_smoothing)
    if z_loss:
        lse2 = torch.logsumexp(z, -1).square()
        loss = loss + z_loss * torch.where(tt != IGNORE, lse2, torch.zeros_like(lse2))
    if reduction == "none":
        return loss.reshape(t.shape)
    if reduction == "sum":
        return loss.sum()
    n = num_items_in_batch if num_items_in_batch is not None else (tt != IGNORE).sum()
    return loss.sum() / n


@pytest.fixture
def small_chunks(monkeypatch):
    """A tiny chunk budget: chunk_rows hits its minimum of 16 rows."""
    monkeypatch.setenv("FASTFT_CE_CHUNK_MB", "0.01")


@pytest.fixture
def narrow_tiles(monkeypatch):
    """Interpreted Triton tiles of 64 along V: the ops' multi-tile paths with small vocabularies."""
    from fastft.kernels import cross_entropy as kmod

    monkeypatch.setattr(kmod, "_MAX_BLOCK_V_INTERPRET", 64)


@pytest.fixture
def count_triton(monkeypatch):
    """Count the calls to the Triton row kernel (imported lazily by the ops)."""
    from fastft.kernels import cross_entropy as kmod

    calls = []
    real = kmod.ce_rows_triton

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(kmod, "ce_rows_triton", counting)
    return calls


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
# fused linear cross-entropy
# --------------------------------------------------------------------------------------
def test_small_chunks_fixture_gives_minimum_chunk(small_chunks):
    assert chunk_rows(40, 300) == 16
    assert chunk_rows(40, 300, 2) == 16
    assert chunk_rows(5, 300) == 5


def test_chunk_rows_gpu_sizing(monkeypatch):
    """CUDA: a trainable head gets chunks big enough for compute-bound grad_weight GEMMs, a
    frozen one small chunks (no accumulator); FASTFT_CE_CHUNK_MB overrides both."""
    monkeypatch.delenv("FASTFT_CE_CHUNK_MB", raising=False)
    kw = dict(fp32_scratch=False, device_type="cuda")
    assert chunk_rows(8192, 128256, 2, trainable_weight=True, **kw) == 2048  # 501 MiB of bf16
    assert chunk_rows(8192, 128256, 2, trainable_weight=False, **kw) == 512  # 125 MiB
    assert chunk_rows(8192, 256000, 2, trainable_weight=True, **kw) == 1024  # floor of 1024 rows
    assert chunk_rows(8192, 1 << 20, 2, trainable_weight=False, **kw) == 256  # floor of 256 rows
    assert chunk_rows(8192, 128256, 4) == 128  # the CPU budgets: 64 MiB, trainable head
    assert chunk_rows(8192, 32000, 4, trainable_weight=False) == 128  # 16 MiB, frozen head
    monkeypatch.setenv("FASTFT_CE_CHUNK_MB", "64")
    assert chunk_rows(8192, 128256, 2, trainable_weight=True, **kw) == 256


def test_padded_vocab():
    assert ce_mod.padded_vocab(50257, "cuda") == 50304
    assert ce_mod.padded_vocab(128256, "cuda") == 128256
    assert ce_mod.padded_vocab(50257, "cpu") == 50257


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_flce_padded_row_stride(backend, reduction, small_chunks, monkeypatch):
    """The GPU layout (logits rows padded to ROW_ALIGN) forced on the CPU, with a vocabulary
    that is not a multiple of it: same results, and the GEMMs write into the padded buffer."""
    monkeypatch.setattr(chunked_mod, "padded_vocab", lambda v, device_type="cuda": -(-v // 64) * 64)
    # (wrapping the row kernel also takes the torch rows off their transposed CPU layout)
    strides = []
    real_rows = ce_mod._row_kernel(backend)

    def rows(logits, *a, **k):
        strides.append(logits.stride(0))
        return real_rows(logits, *a, **k)

    monkeypatch.setattr(chunked_mod, "_row_kernel", lambda b: rows)
    h, w, b, t = _flce_inputs((2, 19), V=301)
    leaves = [x.clone().requires_grad_(True) for x in (h, w, b)]
    up = _upstream(reduction, t.shape)
    loss = fused_linear_cross_entropy(*leaves[:2], t, leaves[2], reduction=reduction, backend=backend)
    loss.backward(up if up is not None else torch.ones_like(loss))
    ref, grads_ref = _loss_and_grads(
        lambda h, w, b: fused_linear_cross_entropy_reference(h, w, t, b, reduction=reduction), [h, w, b], up
    )
    _assert_close(loss.detach(), ref, what="loss")
    for x, gr in zip(leaves, grads_ref):
        _assert_close(x.grad, gr, what="grad")
    assert strides and set(strides) == {320}, strides


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_flce_gemms_skip_ignored_tokens(backend, reduction, small_chunks, monkeypatch):
    """Ignored tokens never reach a GEMM (any reduction, forward and backward): the chunks'
    logits, which the GEMMs write, hold the counted rows only."""
    seen = []
    real_rows = ce_mod._row_kernel(backend)

    def rows(logits, *a, **k):
        seen.append(logits.shape[0])
        return real_rows(logits, *a, **k)

    monkeypatch.setattr(chunked_mod, "_row_kernel", lambda b: rows)
    h, w, b, t = _flce_inputs((50,))
    t[:30] = IGNORE
    t[30:] = torch.randint(0, 300, (20,))
    hh = h.clone().requires_grad_(True)
    up = _upstream(reduction, t.shape)
    loss = fused_linear_cross_entropy(hh, w, t, b, reduction=reduction, backend=backend)
    loss.backward(up if up is not None else torch.ones_like(loss))
    ref, (g_ref,) = _loss_and_grads(
        lambda h: fused_linear_cross_entropy_reference(h, w, t, b, reduction=reduction), [h], up
    )
    _assert_close(loss.detach(), ref, what="loss")
    _assert_close(hh.grad, g_ref, what="grad hidden")
    assert torch.equal(hh.grad[:30], torch.zeros_like(hh.grad[:30]))
    # reduction none recomputes the logits in backward, except with a frozen head (as here), whose
    # per-token gradients forward computes (fastft::flce_rows_hgrad): one pass over the rows then
    assert not w.requires_grad
    assert sum(seen) == 20, seen


@pytest.mark.parametrize("backend", BACKENDS)
def test_flce_frozen_head_has_no_grad_weight(backend, small_chunks, monkeypatch):
    """A frozen lm_head (every LoRA run): no grad_weight work at all, grad_hidden exact."""
    accumulations = []
    real = ce_mod._accumulate_grad_weight
    monkeypatch.setattr(chunked_mod, "_accumulate_grad_weight", lambda *a: accumulations.append(1) or real(*a))
    h, w, b, t = _flce_inputs((3, 13), bias=False)
    hh = h.clone().requires_grad_(True)
    fused_linear_cross_entropy(hh, w, t, backend=backend).backward()
    ref, (g_ref,) = _loss_and_grads(lambda h: fused_linear_cross_entropy_reference(h, w, t), [h])
    _assert_close(hh.grad, g_ref, what="grad hidden")
    assert w.grad is None and not accumulations


def _flce_inputs(lead, H=32, V=300, dtype=torch.float32, bias=True):
    h = torch.randn(*lead, H).to(dtype)
    w = (torch.randn(V, H) * H**-0.5 * 2).to(dtype)
    b = (torch.randn(V) * 0.5).to(dtype) if bias else None
    t = torch.randint(0, V, lead)
    t[torch.rand(lead) < 0.25] = IGNORE
    return h, w, b, t


def _flce_check(backend, lead, bias, opts, dtype=torch.float32):
    h, w, b, t = _flce_inputs(lead, dtype=dtype, bias=bias)
    inputs = [h, w] + ([b] if bias else [])
    up = _upstream(opts.get("reduction", "mean"), t.shape)

    def ours(h, w, b=None):
        return fused_linear_cross_entropy(h, w, t, b, backend=backend, **opts)

    def ref_fn(h, w, b=None):
        return fused_linear_cross_entropy_reference(h, w, t, b, **opts)

    loss, grads = _loss_and_grads(ours, inputs, up)
    assert loss.dtype == torch.float32 and loss.shape == (t.shape if opts.get("reduction") == "none" else ())
    for g, i in zip(grads, inputs):
        assert g.dtype == i.dtype and g.shape == i.shape
    ref, grads_ref = _loss_and_grads(ref_fn, [i.float() for i in inputs], up)
    names = ["hidden", "weight", "bias"]
    if dtype == torch.float32:
        _assert_close(loss, ref, what="loss")
        for name, g, gr in zip(names, grads, grads_ref):
            _assert_close(g, gr, what=f"grad {name}")
        return
    lowp, grads_lowp = _loss_and_grads(ref_fn, inputs, up)  # plain PyTorch: bf16 GEMMs, fp32 loss
    _assert_no_worse_than_lowp(loss, lowp, ref, dtype, "loss")
    for name, g, gl, gr in zip(names, grads, grads_lowp, grads_ref):
        # the logits' gradient is stored in bf16 by the kernel before the GEMMs
        slack = _interpreter_rounding_slack(backend, gr, dtype)
        _assert_no_worse_than_lowp(g, gl, gr, dtype, f"grad {name}", slack)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("lead", [(40,), (2, 19)], ids=["2d", "3d"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_flce_matches_reference(backend, bias, lead, reduction, small_chunks):
    _flce_check(backend, lead, bias, dict(reduction=reduction))


@pytest.mark.parametrize(
    "opts",
    [
        dict(softcap=4.0, z_loss=1e-2, label_smoothing=0.1, num_items_in_batch=torch.tensor(15)),
        dict(softcap=4.0, z_loss=1e-2, label_smoothing=0.1, num_items_in_batch=15),
        dict(softcap=4.0, z_loss=1e-2, label_smoothing=0.1, reduction="sum"),
        dict(softcap=4.0, z_loss=1e-2, label_smoothing=0.1, reduction="none"),
    ],
    ids=["mean_items_tensor", "mean_items_int", "sum", "none"],
)
@pytest.mark.parametrize("backend", BACKENDS)
def test_flce_all_options(backend, opts, small_chunks, narrow_tiles):
    _flce_check(backend, (3, 7), True, opts)


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_flce_bf16(backend, reduction, small_chunks):
    _flce_check(backend, (33,), True, dict(reduction=reduction, z_loss=1e-3), dtype=torch.bfloat16)


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("which", ["hidden", "weight", "bias"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_flce_only_some_inputs_require_grad(backend, which, reduction, small_chunks):
    h, w, b, t = _flce_inputs((21,))
    ref = fused_linear_cross_entropy_reference(h, w, t, b, reduction=reduction)
    leaves = {"hidden": h, "weight": w, "bias": b}
    leaves[which].requires_grad_(True)
    loss = fused_linear_cross_entropy(h, w, t, b, reduction=reduction, backend=backend)
    up = torch.randn_like(loss)
    loss.backward(up)
    _assert_close(loss.detach(), ref)
    leaf_ref = leaves[which].detach().clone().requires_grad_(True)
    args = {k: (leaf_ref if k == which else v.detach()) for k, v in leaves.items()}
    fused_linear_cross_entropy_reference(args["hidden"], args["weight"], t, args["bias"], reduction=reduction).backward(
        up
    )
    _assert_close(leaves[which].grad, leaf_ref.grad)
    for k, v in leaves.items():
        if k != which:
            assert v.grad is None


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_flce_no_grad_forward(backend, reduction, small_chunks, monkeypatch):
    h, w, b, t = _flce_inputs((2, 10))
    for x in (h, w, b):
        x.requires_grad_(True)
    accumulations = []
    real = ce_mod._accumulate_grad_weight
    monkeypatch.setattr(chunked_mod, "_accumulate_grad_weight", lambda *a: accumulations.append(1) or real(*a))
    with torch.no_grad():
        loss = fused_linear_cross_entropy(h, w, t, b, reduction=reduction, backend=backend)
        ref = fused_linear_cross_entropy_reference(h, w, t, b, reduction=reduction)
    assert not loss.requires_grad and loss.grad_fn is None
    _assert_close(loss, ref)
    assert not accumulations, "no gradient work is done under torch.no_grad()"


@pytest.mark.parametrize("backend", BACKENDS)
def test_flce_second_backward_raises(backend, small_chunks):
    """Mean/sum compute the gradients during forward: a second backward is refused, loudly."""
    h, w, b, t = _flce_inputs((20,))
    h.requires_grad_(True)
    loss = fused_linear_cross_entropy(h, w, t, b, backend=backend)
    loss.backward(retain_graph=True)
    first = h.grad.clone()
    with pytest.raises(RuntimeError, match="backpropagated once"):
        loss.backward()
    _assert_close(h.grad, first)  # the refused backward left the gradient alone


@pytest.mark.parametrize("backend", BACKENDS)
def test_flce_none_reduction_supports_second_backward(backend, small_chunks):
    """reduction='none' recomputes in backward, so retain_graph works and gives the same gradient."""
    h, w, b, t = _flce_inputs((20,))
    h.requires_grad_(True)
    loss = fused_linear_cross_entropy(h, w, t, b, reduction="none", backend=backend).sum()
    (g1,) = torch.autograd.grad(loss, h, retain_graph=True)
    (g2,) = torch.autograd.grad(loss, h)
    assert torch.equal(g1, g2)


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


# --------------------------------------------------------------------------------------
# the traffic ledger at the GPU bench's shape (meta tensors: counts, no memory, no compute)
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("head", ["trainable", "frozen"])
def test_flce_ledger_at_gpu_shape(head):
    """8192 x 4096 x 128256 bf16: one fused operator call; never an (N, V) tensor; no
    activation-sized dtype conversion; a frozen head allocates nothing of the head's size and
    keeps only grad_hidden for backward."""
    from fastft.ledger import Ledger

    N, H, V = 8192, 4096, 128256
    h = torch.randn(N, H, device="meta", dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(V, H, device="meta", dtype=torch.bfloat16, requires_grad=head == "trainable")
    t = torch.randint(0, V, (N,), device="meta")
    with Ledger(min_numel=N * H) as led:
        with led.section("forward"):
            loss = fused_linear_cross_entropy(h, w, t)
        with led.section("backward"):
            loss.backward()
    ops = led.ops("forward")
    assert ops.count("fastft::flce") == 1 and not led.temporaries_of((N, V)), led.table()
    # the only large conversion: the fp32 grad_weight accumulator to the weight's dtype, once
    big = led.conversions_at_least(N * H)
    assert len(big) == (1 if head == "trainable" else 0), led.table()
    if head == "trainable":
        assert big[0].src.shape == (V, H) and big[0].src.dtype == torch.float32
    else:
        assert not led.temporaries_of((V, H)), led.table()
        assert led.saved_bytes() <= N * H * 2 + 2**20, led.table()
