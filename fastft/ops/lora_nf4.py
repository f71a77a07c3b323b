"""LoRA over a 4-bit NF4 base (QLoRA) as ``torch.library`` operators.

``y = x W~^T + b + s * dropout(x) A^T B^T (+ s * b_B)`` with ``W~`` the dequantised NF4 weight
(:mod:`fastft.ops.nf4`). The computation is :class:`fastft.ops.lora._LoraLinear`'s, forward and
backward bodies unchanged (same GEMMs, same order, same dropout masks), with the base product
``x W~^T`` run by the ``fastft::nf4_matmul`` operator and backward's ``dY W~`` on the weight
dequantised by ``fastft::dequantize_nf4`` for that product only (no 16-bit copy kept).

Operators (one node each under torch.compile, no graph break):

* ``fastft::lora_nf4_linear(x2d, packed, <state>, bias, lora_A, lora_B, lora_bias, <sizes>,
  scaling, p, seed, precision, backend, nf4_backend) -> (y, xa)``
* ``fastft::lora_nf4_linear_bwd(dy, x2d, packed, <state>, lora_A, lora_B, xa, <sizes>, scaling,
  p, seed, precision, backend, nf4_backend, needs) -> (dx, dbias, dA, dB, dlora_bias)``

The :class:`~fastft.ops.nf4.NF4State` crosses the boundary as the ``nf4_matmul`` operator takes
it: tensors ``absmax, code, absmax2?, code2?, offset?`` and static ints ``blocksize, blocksize2,
N, K`` (:func:`fastft.ops.nf4._op_state`: the validated-once cache eagerly, read off the state
under tracing). ``backend`` picks the rank-``r`` products (:data:`fastft.ops.lora.OP_LORA`:
``triton`` / ``torch``), ``nf4_backend`` the dequant-matmul (``triton`` / ``cuda`` / ``cpp`` /
``torch``); the public :func:`fastft.ops.lora_linear` passes its one ``backend`` to both (a
forced LoRA backend that cannot run raises there, eagerly). The packed weight is frozen: it has
no gradient; ``dbias`` is ``sum dY`` when the bias requires grad.

The dropout seed is a ``(1,)`` int64 tensor drawn from torch's generator before the call, as
for the 16-bit base (:func:`fastft.ops.lora_linear`): the same seed, the same mask, eager or
compiled.
"""

from __future__ import annotations

import torch

from .. import backends
from .lora import OP_LORA, _branch_adapters, _Ctx, _kernels, _LoraLinear, _seed_value

__all__ = ["lora_nf4_call"]


class _FlatNF4:
    """The NF4 base as :class:`_LoraLinear`'s bodies use it (``quant``): the flattened state."""

    def __init__(self, absmax, code, absmax2, code2, offset, blocksize, blocksize2, N, K, backend):
        self.tensors = (absmax, code, absmax2, code2, offset)
        self.sizes = (blocksize, blocksize2)
        self.N, self.K, self.backend = N, K, backend

    def matmul(self, x2d, packed, bias):
        """``x2d W~^T + bias`` ``[M, N]`` (``fastft::nf4_matmul``)."""
        return torch.ops.fastft.nf4_matmul(x2d, packed, *self.tensors, bias, *self.sizes, self.N, self.K, self.backend)

    def dequant(self, packed, dtype):
        """``W~`` ``[N, K]`` in ``dtype`` (``fastft::dequantize_nf4``)."""
        w = torch.ops.fastft.dequantize_nf4(packed, *self.tensors, *self.sizes, self.N * self.K, dtype, self.backend)
        return w.view(self.N, self.K)


@torch.library.custom_op("fastft::lora_nf4_linear", mutates_args=())
def _lora_nf4_op(
    x2d: torch.Tensor,
    packed: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor,
    absmax2: torch.Tensor | None,
    code2: torch.Tensor | None,
    offset: torch.Tensor | None,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    lora_bias: torch.Tensor | None,
    blocksize: int,
    blocksize2: int,
    N: int,
    K: int,
    scaling: float,
    p: float,
    seed: torch.Tensor,
    precision: str,
    backend: str,
    nf4_backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(y, xa)``: the layer's output and ``(x * M) A^T`` (saved for backward)."""
    kernels = _kernels(backends.select(OP_LORA, x2d.device, backend).backend, x2d, lora_A)
    quant = _FlatNF4(absmax, code, absmax2, code2, offset, blocksize, blocksize2, N, K, nf4_backend)
    ctx = _Ctx()
    sd = _seed_value(kernels, seed, p)
    y = _LoraLinear.forward(
        ctx, x2d, packed, bias, lora_A, lora_B, lora_bias, scaling, p, sd, False, kernels, quant, precision
    )
    return y, ctx.saved_tensors[4]


@_lora_nf4_op.register_fake
def _(x2d, packed, absmax, code, absmax2, code2, offset, bias, lora_A, lora_B, lora_bias, blocksize, blocksize2, N, K,
      scaling, p, seed, precision, backend, nf4_backend):  # fmt: skip
    A_dtype = x2d.dtype if (precision == "activation" or lora_B.dtype == x2d.dtype) else lora_A.dtype
    return x2d.new_empty(x2d.shape[0], N), x2d.new_empty(x2d.shape[0], lora_A.shape[0], dtype=A_dtype)


@torch.library.custom_op("fastft::lora_nf4_linear_bwd", mutates_args=())
def _lora_nf4_bwd_op(
    dy: torch.Tensor,
    x2d: torch.Tensor,
    packed: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor,
    absmax2: torch.Tensor | None,
    code2: torch.Tensor | None,
    offset: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    xa: torch.Tensor,
    blocksize: int,
    blocksize2: int,
    N: int,
    K: int,
    scaling: float,
    p: float,
    seed: torch.Tensor,
    precision: str,
    backend: str,
    nf4_backend: str,
    needs: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dx, dbias, dA, dB, dlora_bias)``; one not asked for (``needs``) is empty."""
    kernels = _kernels(backends.select(OP_LORA, x2d.device, backend).backend, x2d, lora_A)
    A, B, b_scaled = _branch_adapters(x2d, lora_A, lora_B, scaling, precision)
    ctx = _Ctx()
    ctx.saved_tensors = (x2d, packed, A, B, xa)
    need_x, need_b, need_A, need_B, need_lb = needs
    ctx.needs_input_grad = (need_x, False, need_b, need_A, need_B, need_lb)
    ctx.scaling, ctx.p, ctx.seed, ctx.fan_in_fan_out = scaling, p, _seed_value(kernels, seed, p), False
    ctx.quant = _FlatNF4(absmax, code, absmax2, code2, offset, blocksize, blocksize2, N, K, nf4_backend)
    ctx.kernels, ctx.grad_dtype, ctx.b_scaled = kernels, lora_A.dtype, b_scaled
    dx, _, db, dA, dB, dlb = _LoraLinear.backward(ctx, dy)[:6]
    return tuple(g.contiguous() if g is not None else dy.new_empty(0) for g in (dx, db, dA, dB, dlb))


@_lora_nf4_bwd_op.register_fake
def _(dy, x2d, packed, absmax, code, absmax2, code2, offset, lora_A, lora_B, xa, blocksize, blocksize2, N, K, scaling,
      p, seed, precision, backend, nf4_backend, needs):  # fmt: skip
    shapes = [
        (x2d.shape, dy.dtype),
        ((N,), dy.dtype),
        (lora_A.shape, lora_A.dtype),
        (lora_B.shape, lora_A.dtype),
        ((N,), lora_A.dtype),
    ]
    return tuple(dy.new_empty(sh, dtype=dt) if n else dy.new_empty(0) for (sh, dt), n in zip(shapes, needs))


# argument positions of the forward operator
_X, _PACKED, _BIAS, _A, _B, _LB, _SEED = 0, 1, 7, 8, 9, 10, 17


def _setup(ctx, inputs, output):
    x2d, packed, absmax, code, absmax2, code2, offset = inputs[:7]
    ctx.save_for_backward(x2d, packed, absmax, code, absmax2, code2, offset, inputs[_A], inputs[_B], output[1],
                          inputs[_SEED])  # fmt: skip
    ctx.args = inputs[11:17] + inputs[18:]  # blocksize, blocksize2, N, K, scaling, p | precision, backend, nf4_backend
    ctx.has = (True, inputs[_BIAS] is not None, True, True, inputs[_LB] is not None)
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)


def _grad(ctx, dy, _dxa):
    n_in = 21
    if dy is None:
        return (None,) * n_in
    x2d, packed, absmax, code, absmax2, code2, offset, lora_A, lora_B, xa, seed = ctx.saved_tensors
    bs, bs2, N, K, scaling, p, precision, backend, nf4_backend = ctx.args
    wanted = [ctx.needs_input_grad[i] for i in (_X, _BIAS, _A, _B, _LB)]
    needs = [bool(n and h) for n, h in zip(wanted, ctx.has)]
    if not any(needs):
        return (None,) * n_in
    dx, db, dA, dB, dlb = _lora_nf4_bwd_op(
        dy.contiguous(), x2d, packed, absmax, code, absmax2, code2, offset, lora_A, lora_B, xa, bs, bs2, N, K,
        scaling, p, seed, precision, backend, nf4_backend, needs,
    )  # fmt: skip
    grads = [None] * n_in
    for pos, g, n in zip((_X, _BIAS, _A, _B, _LB), (dx, db, dA, dB, dlb), needs):
        grads[pos] = g if n else None
    return tuple(grads)


_lora_nf4_op.register_autograd(_grad, setup_context=_setup)


def lora_nf4_call(x2d, packed, state, bias, lora_A, lora_B, lora_bias, scaling, p, seed, precision, backend):
    """The forward operator on a validated call of :func:`fastft.ops.lora_linear` with a 4-bit base:
    ``packed`` checked against ``state`` (validated once, cached), the state flattened. Returns ``y``."""
    from .nf4 import _check_packed, _op_state, check_matmul_backend

    packed = _check_packed(packed, state)
    nf4_backend = backend if backend not in (None, "auto") else "auto"
    N, K = state.shape
    if not torch.compiler.is_compiling():  # a forced backend that cannot run raises here, eagerly
        backends.select(OP_LORA, x2d.device, backend)
        check_matmul_backend(x2d, state, nf4_backend)
    absmax, code, absmax2, code2, offset, bs, bs2 = _op_state(state)
    y, _ = torch.ops.fastft.lora_nf4_linear(
        x2d, packed, absmax, code, absmax2, code2, offset, bias, lora_A, lora_B, lora_bias, bs, bs2, N, K,
        scaling, p, seed, precision, backend, nf4_backend,
    )  # fmt: skip
    return y
