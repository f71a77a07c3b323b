"""Tests of fastft.ops.fused_linear_cross_entropy: chunk sizing, the chunk loop (padded rows,
ignored tokens left out of the GEMMs, no grad_weight for a frozen head), results and gradients
against fused_linear_cross_entropy_reference for every reduction, option and dtype, partial
requires_grad, double backward, and the traffic ledger at the GPU bench's shape.

Every numerical test runs for the ``torch`` and the ``triton`` backend (the Triton interpreter on
CPU), so shapes stay small; low-precision results are judged against what plain PyTorch gets in
that dtype. Moved out of tests/test_cross_entropy.py; helpers in _ce.py, fixtures in conftest.py.
"""

from __future__ import annotations

import importlib

import pytest
import torch
from _ce import (
    BACKENDS,
    IGNORE,
    REDUCTIONS,
    _assert_close,
    _assert_no_worse_than_lowp,
    _flce_inputs,
    _interpreter_rounding_slack,
    _loss_and_grads,
    _upstream,
)

from fastft.ops.cross_entropy import (
    chunk_rows,
    fused_linear_cross_entropy,
    fused_linear_cross_entropy_reference,
)

ce_mod = importlib.import_module("fastft.ops.cross_entropy")  # the module; fastft.ops.cross_entropy is the function
chunked_mod = importlib.import_module("fastft.ops.ce_chunked")  # where the chunk loop looks its helpers up


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
