"""The 16-bit experts block as ``torch.library`` operators, so ``torch.compile`` traces it (issue 15).

:func:`fastft.ops.experts` with tensor weights (16/32-bit, LoRA or not) runs two operators:

* ``fastft::experts_fwd`` returns the block's output and what backward needs (the routing:
  ``perm``, ``sorted_ids``, ``offs``, the sorted routing weights ``ws``; the pre-activation ``h``;
  per adapted GEMM the rank-``r`` product ``u``, an empty tensor where there is no adapter).
  The saved intermediates are outputs (marked non-differentiable), so nothing lives on a Python
  ``ctx`` that a compiled graph could not carry.
* ``fastft::experts_bwd`` returns every gradient (an empty tensor for one not needed).

Both run the math of :class:`fastft.ops.experts._Experts` (its ``forward`` / ``backward`` on a
stand-in ``ctx``, the same code eager and compiled), so the numbers are those of the autograd
Function. Inside an operator the tensors are real: the host-side decisions of the grouped GEMMs
(the 16-byte alignment test on ``data_ptr``, the per-expert loop's host read of the offsets, the
CPU ``Groups`` of the LoRA products) run there, at run time, never under tracing. The fake
implementations give shapes and dtypes only (every real output is contiguous, as they say).

Validation stays outside, in :func:`fastft.ops.experts` (shapes, dtypes, devices, ``ValueError`` /
``TypeError`` before any kernel); the one check that reads data, the expert ids' range, is left
to the operator: done here, eager or compiled, on CPU tensors (a ``ValueError`` at run time,
before any GEMM). On CUDA
it is never done (a host sync), as in eager.

4-bit weights (:class:`fastft.nn.ExpertsWeight4bit`) are not tensors: under ``torch.compile`` their
parts are the arguments of ``fastft::experts_4bit_fwd`` / ``experts_4bit_bwd``
(:mod:`fastft.ops.experts_op4bit`, the same bodies on a view rebuilt from them); eager calls and
mixed 4-bit / 16-bit weights run the autograd Function (mixed ones graph-break under compile; the
patch report says so).
"""

from __future__ import annotations

import torch

from . import experts_lora as _lo

__all__ = ["experts_op_call"]


class _Ctx:
    """Stands in for an autograd ``ctx`` around ``_Experts.forward`` / ``backward``."""

    needs_input_grad = ()

    def save_for_backward(self, *tensors):
        self.saved_tensors = tensors


def _act(kind: str, alpha: float, limit: float):
    from .experts import ExpertsActivation

    return ExpertsActivation(kind, alpha, limit)


_EMPTY = (0,)


def run_forward(x, top_k_index, top_k_weights, w1, w2, b1, b2, A1, B1, A2, B2, act, alpha, limit, transposed, s1, s2,
                dtype, gemm="torch"):  # fmt: skip
    """:meth:`_Experts.forward` on a stand-in ``ctx`` (the body of both forward operators; ``w1`` / ``w2``
    tensors or 4-bit views, ``dtype`` the compute dtype): ``(out, perm, sorted_ids, offs, ws, h, u1, u2)``,
    each contiguous (an empty ``u`` where there is no adapter). The expert ids' range is checked first."""
    from .experts import _Experts, check_ids

    check_ids(top_k_index, w1.shape[0])
    ctx = _Ctx()
    out = _Experts.forward(
        ctx, x, top_k_index, top_k_weights, w1, w2, b1, b2, _act(act, alpha, limit), transposed, A1, B1, A2, B2,
        (s1, s2), gemm,
    )  # fmt: skip
    _, perm, sorted_ids, offs, ws, h, _, _, _, *lora = ctx.saved_tensors
    u1 = lora[2] if A1 is not None else x.new_empty(_EMPTY, dtype=dtype)
    u2 = lora[-1] if A2 is not None else x.new_empty(_EMPTY, dtype=dtype)
    return tuple(t.contiguous() for t in (out, perm, sorted_ids, offs, ws, h, u1, u2))


def fake_forward(x, top_k_index, top_k_weights, E: int, two_i: int, dtype, A1, A2):
    """The forward operators' fake outputs (shapes and dtypes of :func:`run_forward`'s)."""
    S = top_k_index.numel()
    return (
        x.new_empty(x.shape),
        x.new_empty(S, dtype=torch.int64),
        x.new_empty(S, dtype=top_k_index.dtype),
        x.new_empty(E, dtype=torch.int32),
        x.new_empty(S, dtype=top_k_weights.dtype),
        x.new_empty(S, two_i, dtype=dtype),
        x.new_empty((S, A1.shape[1]) if A1 is not None else _EMPTY, dtype=dtype),
        x.new_empty((S, A2.shape[1]) if A2 is not None else _EMPTY, dtype=dtype),
    )


def run_backward(dout, x, w1, w2, b2, A1, B1, A2, B2, perm, sorted_ids, offs, ws, h, u1, u2, act, alpha, limit,
                 transposed, s1, s2, top_k, needs, fn_index, dtype, gemm="torch"):  # fmt: skip
    """:meth:`_Experts.backward` on a stand-in ``ctx`` (the body of both backward operators): the
    gradients at ``fn_index`` (their places in ``_Experts``' inputs) where ``needs`` says, an empty
    tensor for the others."""
    from .experts import _Experts, _packed, _saveable, set_ctx_meta

    lora = []
    if A1 is not None:
        lora += [*_lo.prepare(A1, B1, s1, dtype), u1]
    if A2 is not None:
        lora += [*_lo.prepare(A2, B2, s2, dtype), u2]
    ctx = _Ctx()
    ctx.saved_tensors = (x, perm, sorted_ids, offs, ws, h, *_saveable(w1, w2), b2, *lora)
    set_ctx_meta(ctx, _act(act, alpha, limit), transposed, top_k, A1, B1, A2, B2, (s1, s2), _packed(w1, w2), gemm)
    need = [False] * 15
    for i, n in zip(fn_index, needs):
        need[i] = bool(n)
    ctx.needs_input_grad = tuple(need)
    grads = _Experts.backward(ctx, dout)
    return tuple(
        grads[i].contiguous() if n and grads[i] is not None else dout.new_empty(_EMPTY) for i, n in zip(fn_index, needs)
    )


@torch.library.custom_op("fastft::experts_fwd", mutates_args=())
def _experts_fwd(
    x: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    b1: torch.Tensor | None,
    b2: torch.Tensor | None,
    A1: torch.Tensor | None,
    B1: torch.Tensor | None,
    A2: torch.Tensor | None,
    B2: torch.Tensor | None,
    act: str,
    alpha: float,
    limit: float,
    transposed: bool,
    s1: float,
    s2: float,
) -> tuple[
    torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor
]:
    """``(out, perm, sorted_ids, offs, ws, h, u1, u2)``: the output, then what backward reads."""
    return run_forward(
        x, top_k_index, top_k_weights, w1, w2, b1, b2, A1, B1, A2, B2, act, alpha, limit, transposed, s1, s2, w1.dtype
    )  # fmt: skip


@_experts_fwd.register_fake
def _(x, top_k_index, top_k_weights, w1, w2, b1, b2, A1, B1, A2, B2, act, alpha, limit, transposed, s1, s2):
    two_i = w1.shape[2] if transposed else w1.shape[1]
    return fake_forward(x, top_k_index, top_k_weights, w1.shape[0], two_i, w1.dtype, A1, A2)


# experts_bwd's gradients (x, top_k_weights, w1, w2, b1, b2, A1, B1, A2, B2): the index of each in
# _Experts.backward's needs_input_grad and result
_FN_INDEX = (0, 2, 3, 4, 5, 6, 9, 10, 11, 12)


@torch.library.custom_op("fastft::experts_bwd", mutates_args=())
def _experts_bwd(
    dout: torch.Tensor,
    x: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    b2: torch.Tensor | None,
    A1: torch.Tensor | None,
    B1: torch.Tensor | None,
    A2: torch.Tensor | None,
    B2: torch.Tensor | None,
    perm: torch.Tensor,
    sorted_ids: torch.Tensor,
    offs: torch.Tensor,
    ws: torch.Tensor,
    h: torch.Tensor,
    u1: torch.Tensor,
    u2: torch.Tensor,
    act: str,
    alpha: float,
    limit: float,
    transposed: bool,
    s1: float,
    s2: float,
    top_k: int,
    needs: list[bool],
) -> tuple[
    torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
    torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
]:  # fmt: skip
    """``(dx, dtop_k_weights, dw1, dw2, db1, db2, dA1, dB1, dA2, dB2)`` (``needs`` in that order);
    one not needed is an empty tensor."""
    return run_backward(
        dout, x, w1, w2, b2, A1, B1, A2, B2, perm, sorted_ids, offs, ws, h, u1, u2, act, alpha, limit, transposed, s1,
        s2, top_k, needs, _FN_INDEX, w1.dtype,
    )  # fmt: skip


@_experts_bwd.register_fake
def _(dout, x, w1, w2, b2, A1, B1, A2, B2, perm, sorted_ids, offs, ws, h, u1, u2, act, alpha, limit, transposed, s1,
      s2, top_k, needs):  # fmt: skip
    dt = w1.dtype  # the compute dtype: what _Experts.backward returns the x / weight / bias grads in
    b2_dt = b2.dtype if b2 is not None else dt
    metas = [
        (x.shape, x.dtype),
        ((x.shape[0], top_k), ws.dtype),
        (w1.shape, dt),
        (w2.shape, dt),
        ((w1.shape[0], h.shape[1]), dt),
        ((w1.shape[0], x.shape[1]), b2_dt),
        *((t.shape, t.dtype) if t is not None else None for t in (A1, B1, A2, B2)),
    ]
    return tuple(dout.new_empty(m[0], dtype=m[1]) if n else dout.new_empty(_EMPTY) for m, n in zip(metas, needs))


_DIFF = (0, 2, 3, 4, 5, 6, 7, 8, 9, 10)  # experts_fwd's differentiable inputs, in experts_bwd's order


def _setup(ctx, inputs, output):
    x, idx, tkw, w1, w2, b1, b2, A1, B1, A2, B2, act, alpha, limit, transposed, s1, s2 = inputs
    _, perm, sorted_ids, offs, ws, h, u1, u2 = output
    ctx.save_for_backward(x, w1, w2, b2, A1, B1, A2, B2, perm, sorted_ids, offs, ws, h, u1, u2)
    ctx.args = (act, alpha, limit, transposed, s1, s2, idx.shape[1])
    ctx.has = [inputs[i] is not None for i in _DIFF]
    ctx.mark_non_differentiable(*output[1:])
    ctx.set_materialize_grads(False)


def _grad(ctx, dout, *_):
    n_in = 17
    if dout is None:
        return (None,) * n_in
    needs = [bool(ctx.needs_input_grad[i]) and h for i, h in zip(_DIFF, ctx.has)]
    if not any(needs):
        return (None,) * n_in
    grads = _experts_bwd(dout, *ctx.saved_tensors, *ctx.args, needs)
    out = [None] * n_in
    for i, g, n in zip(_DIFF, grads, needs):
        out[i] = g if n else None
    return tuple(out)


_experts_fwd.register_autograd(_grad, setup_context=_setup)


def experts_op_call(x, top_k_index, top_k_weights, w1, w2, b1, b2, act, transposed, lora_gate_up, lora_down):
    """The block through ``fastft::experts_fwd`` (inputs validated by :func:`fastft.ops.experts`)."""
    if w2.dtype != w1.dtype:
        raise TypeError(f"experts: gate_up_proj ({w1.dtype}) and down_proj ({w2.dtype}) must share a dtype")
    l1, l2 = lora_gate_up, lora_down
    out = torch.ops.fastft.experts_fwd(
        x, top_k_index, top_k_weights, w1, w2, b1, b2,
        *((l1.A, l1.B) if l1 is not None else (None, None)), *((l2.A, l2.B) if l2 is not None else (None, None)),
        act.kind, float(act.alpha), float(act.limit), bool(transposed),
        float(l1.scaling) if l1 is not None else 1.0, float(l2.scaling) if l2 is not None else 1.0,
    )  # fmt: skip
    return out[0]
