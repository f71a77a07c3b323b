"""The 4-bit (NF4) experts block as ``torch.library`` operators, so ``torch.compile`` traces it.

An :class:`fastft.nn.ExpertsWeight4bit` is a module, not a tensor, so it cannot be an operator
argument; its parts can (:meth:`~fastft.nn.ExpertsWeight4bit.op_args`): the packed uint8 weight, the
absmax, the NF4 code, with double quantisation the nested absmax / code / offset, the fp32 scales
where the module keeps them decoded (``cache_absmax``), and as static arguments its
``[out_features, in_features, blocksize, transposed]`` and dtype. Inside the operators a
:class:`~fastft.nn.ExpertsWeight4bitView` is rebuilt from them (the module's own dequantisation
methods), and:

* ``fastft::experts_4bit_fwd`` runs :meth:`fastft.ops.experts._Experts.forward` on a stand-in ``ctx``
  (as ``fastft::experts_fwd`` does, :mod:`fastft.ops.experts_op`) and returns the output and what
  backward reads (the routing, the pre-activation ``h``, the LoRA products ``u``);
* ``fastft::experts_4bit_bwd`` runs :meth:`~fastft.ops.experts._Experts.backward` and returns the
  gradients of ``x``, ``top_k_weights``, the biases and the adapters (the 4-bit weights are frozen:
  none for them; an empty tensor for one not needed).

So the numbers are those of the autograd Function, which eager calls keep running (each GEMM
dequantises the weight again, in forward and in backward; nothing 16-bit is saved). The GEMMs'
backend (``gemm``: ``"triton"``, the in-kernel NF4 grouped GEMM, or ``"torch"``) is a static string
argument: :func:`fastft.ops.experts.experts` picks it from host-known facts (device, requested
backend, tokens x top-k) before the operator, a constant of the compiled graph. Host-side decisions
of the GEMMs (the CPU chunking over the offsets, the alignment test) run inside the operator, at run
time; the expert ids' range is checked there too (CPU tensors, as ``fastft::experts_fwd`` does).

Mixed weights (one 4-bit, one 16-bit) keep the autograd Function (a graph break under compile; the
patch report says so).
"""

from __future__ import annotations

import torch

from .experts_op import _EMPTY, fake_forward, run_backward, run_forward

__all__ = ["experts_4bit_op_call"]


def _view(weight, absmax, code, nested_absmax, nested_code, nested_offset, scales, meta, dtype):
    from ..nn import ExpertsWeight4bitView

    return ExpertsWeight4bitView(weight, absmax, code, nested_absmax, nested_code, nested_offset, scales, meta, dtype)


_OUT = tuple[
    torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor
]


@torch.library.custom_op("fastft::experts_4bit_fwd", mutates_args=())
def _experts_4bit_fwd(
    x: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    q1: torch.Tensor, absmax1: torch.Tensor, code1: torch.Tensor, nabsmax1: torch.Tensor | None,
    ncode1: torch.Tensor | None, noffset1: torch.Tensor | None, scales1: torch.Tensor | None, meta1: list[int],
    dtype1: torch.dtype,
    q2: torch.Tensor, absmax2: torch.Tensor, code2: torch.Tensor, nabsmax2: torch.Tensor | None,
    ncode2: torch.Tensor | None, noffset2: torch.Tensor | None, scales2: torch.Tensor | None, meta2: list[int],
    dtype2: torch.dtype,
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
    gemm: str,
) -> _OUT:  # fmt: skip
    """``(out, perm, sorted_ids, offs, ws, h, u1, u2)``: the output, then what backward reads."""
    w1 = _view(q1, absmax1, code1, nabsmax1, ncode1, noffset1, scales1, meta1, dtype1)
    w2 = _view(q2, absmax2, code2, nabsmax2, ncode2, noffset2, scales2, meta2, dtype2)
    return run_forward(
        x, top_k_index, top_k_weights, w1, w2, b1, b2, A1, B1, A2, B2, act, alpha, limit, transposed, s1, s2, dtype1,
        gemm,
    )  # fmt: skip


@_experts_4bit_fwd.register_fake
def _(x, top_k_index, top_k_weights, q1, absmax1, code1, nabsmax1, ncode1, noffset1, scales1, meta1, dtype1, q2,
      absmax2, code2, nabsmax2, ncode2, noffset2, scales2, meta2, dtype2, b1, b2, A1, B1, A2, B2, act, alpha, limit,
      transposed, s1, s2, gemm):  # fmt: skip
    # meta: [out_features, in_features, ...]
    return fake_forward(x, top_k_index, top_k_weights, q1.shape[0], meta1[0], dtype1, A1, A2)


# experts_4bit_bwd's gradients (x, top_k_weights, b1, b2, A1, B1, A2, B2): their index in
# _Experts.backward's needs_input_grad and result
_FN_INDEX = (0, 2, 5, 6, 9, 10, 11, 12)


@torch.library.custom_op("fastft::experts_4bit_bwd", mutates_args=())
def _experts_4bit_bwd(
    dout: torch.Tensor,
    x: torch.Tensor,
    q1: torch.Tensor, absmax1: torch.Tensor, code1: torch.Tensor, nabsmax1: torch.Tensor | None,
    ncode1: torch.Tensor | None, noffset1: torch.Tensor | None, scales1: torch.Tensor | None, meta1: list[int],
    dtype1: torch.dtype,
    q2: torch.Tensor, absmax2: torch.Tensor, code2: torch.Tensor, nabsmax2: torch.Tensor | None,
    ncode2: torch.Tensor | None, noffset2: torch.Tensor | None, scales2: torch.Tensor | None, meta2: list[int],
    dtype2: torch.dtype,
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
    gemm: str,
    needs: list[bool],
) -> tuple[
    torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor
]:  # fmt: skip
    """``(dx, dtop_k_weights, db1, db2, dA1, dB1, dA2, dB2)`` (``needs`` in that order); one not needed
    is an empty tensor."""
    w1 = _view(q1, absmax1, code1, nabsmax1, ncode1, noffset1, scales1, meta1, dtype1)
    w2 = _view(q2, absmax2, code2, nabsmax2, ncode2, noffset2, scales2, meta2, dtype2)
    return run_backward(
        dout, x, w1, w2, b2, A1, B1, A2, B2, perm, sorted_ids, offs, ws, h, u1, u2, act, alpha, limit, transposed, s1,
        s2, top_k, needs, _FN_INDEX, dtype1, gemm,
    )  # fmt: skip


@_experts_4bit_bwd.register_fake
def _(dout, x, q1, absmax1, code1, nabsmax1, ncode1, noffset1, scales1, meta1, dtype1, q2, absmax2, code2, nabsmax2,
      ncode2, noffset2, scales2, meta2, dtype2, b2, A1, B1, A2, B2, perm, sorted_ids, offs, ws, h, u1, u2, act, alpha,
      limit, transposed, s1, s2, top_k, gemm, needs):  # fmt: skip
    dt, E = dtype1, q1.shape[0]  # the compute dtype: what _Experts.backward returns the x / bias grads in
    metas = [
        (x.shape, x.dtype),
        ((x.shape[0], top_k), ws.dtype),
        ((E, meta1[0]), dt),
        ((E, x.shape[1]), b2.dtype if b2 is not None else dt),
        *((t.shape, t.dtype) if t is not None else None for t in (A1, B1, A2, B2)),
    ]
    return tuple(dout.new_empty(m[0], dtype=m[1]) if n else dout.new_empty(_EMPTY) for m, n in zip(metas, needs))


_N_IN = 34  # experts_4bit_fwd's arguments
_DIFF = (0, 2, 21, 22, 23, 24, 25, 26)  # its differentiable inputs (x, top_k_weights, b1, b2, A1, B1, A2, B2)
_W1, _W2 = slice(3, 12), slice(12, 21)  # the two weights' op_args


def _setup(ctx, inputs, output):
    x, idx, tkw = inputs[:3]
    b1, b2, A1, B1, A2, B2, act, alpha, limit, transposed, s1, s2, gemm = inputs[21:]
    (*t1, meta1, dtype1), (*t2, meta2, dtype2) = inputs[_W1], inputs[_W2]
    _, perm, sorted_ids, offs, ws, h, u1, u2 = output
    ctx.save_for_backward(x, *t1, *t2, b2, A1, B1, A2, B2, perm, sorted_ids, offs, ws, h, u1, u2)
    ctx.meta = (meta1, dtype1, meta2, dtype2)
    ctx.args = (act, alpha, limit, transposed, s1, s2, idx.shape[1], gemm)
    ctx.has = [inputs[i] is not None for i in _DIFF]
    ctx.mark_non_differentiable(*output[1:])
    ctx.set_materialize_grads(False)


def _grad(ctx, dout, *_):
    if dout is None:
        return (None,) * _N_IN
    needs = [bool(ctx.needs_input_grad[i]) and h for i, h in zip(_DIFF, ctx.has)]
    if not any(needs):
        return (None,) * _N_IN
    saved = ctx.saved_tensors
    x, t1, t2, rest = saved[0], saved[1:8], saved[8:15], saved[15:]
    meta1, dtype1, meta2, dtype2 = ctx.meta
    grads = _experts_4bit_bwd(dout, x, *t1, meta1, dtype1, *t2, meta2, dtype2, *rest, *ctx.args, needs)
    out = [None] * _N_IN
    for i, g, n in zip(_DIFF, grads, needs):
        out[i] = g if n else None
    return tuple(out)


_experts_4bit_fwd.register_autograd(_grad, setup_context=_setup)


def experts_4bit_op_call(
    x, top_k_index, top_k_weights, w1, w2, b1, b2, act, transposed, lora_gate_up, lora_down, gemm: str
):
    """The block over two 4-bit weights through ``fastft::experts_4bit_fwd`` (inputs validated by
    :func:`fastft.ops.experts`; ``gemm`` its 4-bit GEMMs' backend, picked there)."""
    l1, l2 = lora_gate_up, lora_down
    out = torch.ops.fastft.experts_4bit_fwd(
        x, top_k_index, top_k_weights, *w1.op_args(), *w2.op_args(), b1, b2,
        *((l1.A, l1.B) if l1 is not None else (None, None)), *((l2.A, l2.B) if l2 is not None else (None, None)),
        act.kind, float(act.alpha), float(act.limit), bool(transposed),
        float(l1.scaling) if l1 is not None else 1.0, float(l2.scaling) if l2 is not None else 1.0, gemm,
    )  # fmt: skip
    return out[0]
