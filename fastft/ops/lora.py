"""Fused LoRA linear: ``y = x W^T + b + s * dropout(x) A^T B^T (+ s * b_B)``.

Shapes: ``x [..., in]``, ``W [out, in]`` (``[in, out]`` with ``fan_in_fan_out``, GPT-2's
Conv1D), ``A [r, in]``, ``B [out, r]``, ``b [out]``, ``b_B [out]`` (PEFT's ``lora_bias``).
The LoRA branch runs in ``A``'s dtype (PEFT keeps adapters in fp32 over a bf16 base and
casts ``x`` the same way), the result comes back in the base layer's dtype.

Dropout (training only; the op is told by ``dropout_p``) applies once, to the LoRA
branch's input only, unbiased (kept values scaled by ``1 / (1 - p)``). The mask is never
stored: forward draws a seed and backward regenerates the same mask from it, so memory
is ``x`` (shared with the caller) plus ``x A^T`` (``[N, r]``), strictly less than PEFT's
dropped copy of ``x`` plus its mask.

Backward, with ``M`` the scaled mask (ones without dropout), ``xd = x * M``,
``xa = xd A^T`` (saved) and ``t = s * dY B`` (``[N, r]``)::

    dX  = dY W + (t A) * M
    dA  = t^T xd
    dB  = s * dY^T xa
    db_B = s * sum(dY)          dW = dY^T x, db = sum(dY)   (only when they require grad)

Backends: ``torch`` materialises ``M`` transiently (drawn from ``torch.Generator(seed)``,
see :func:`dropout_mask`) for the rank-``r`` products. ``triton`` (picked by ``auto`` on
CUDA tensors) keeps every big GEMM on cuBLAS and, with dropout, runs the three masked
products ``xd A^T``, ``(t A) * M`` and ``t^T xd`` as Triton kernels that regenerate ``M``
tile by tile from ``(seed, offset)`` with Philox (:mod:`fastft.kernels.lora`;
``dropout_mask_triton`` there gives the same mask): neither ``xd`` nor ``M`` ever exists.
The two backends draw different masks for the same seed; each is identical between its
forward and backward.

GEMM count: forward 3 (``xd A^T``, ``s xa B^T`` into ``y``, the base GEMM accumulated onto it
in place), backward 4 (``dY B``, ``t A`` into ``dX`` with ``dY W`` accumulated onto it in place,
``t^T xd``, ``dY^T xa``) plus ``dY^T x`` only for a trainable base. Everything rank-``r`` is
tiny next to the base GEMMs.

Precision (``precision=``), when the adapters' dtype differs from ``x``'s (PEFT keeps fp32
adapters over a bf16 base):

* ``"activation"`` (default): the branch runs in ``x``'s dtype. The adapters are cast to it
  once per parameter version (:func:`cast_adapter`: once per optimizer step, however many
  forwards and recomputations), ``x`` and ``dY`` are never converted, every GEMM accumulates
  in fp32 (cuBLAS; Triton's ``tl.dot``) and ``dA``/``dB`` come out in the adapters' dtype
  (fp32 results straight from the GEMM where torch has ``out_dtype``: CUDA; on a CPU the
  rank-sized result is cast). Judged by the flash-attention rule: its error against an fp32
  oracle is at most twice that of PEFT's own computation in ``x``'s dtype.
* ``"peft"``: PEFT's promotion exactly: ``x`` cast to the adapters' dtype, the branch computed
  there and added to the base result in that dtype, then cast back (full-size conversions of
  ``x``, ``dY`` and ``[N, out]``; what the fp32 parity tests hold to 1e-5).

With equal dtypes the two are the same computation.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .. import backends

__all__ = ["lora_linear", "lora_linear_reference", "dropout_mask", "cast_adapter", "PRECISIONS"]

OP_LORA = "lora_linear"
backends.register(OP_LORA, ("triton", "torch"))
PRECISIONS = ("activation", "peft")


# --------------------------------------------------------------------------------------
# reference (pure PyTorch, autograd): the oracle
# --------------------------------------------------------------------------------------
def lora_linear_reference(
    x, weight, lora_A, lora_B, scaling, *, bias=None, lora_bias=None, mask=None, fan_in_fan_out=False, precision="peft"
):
    """The formula with autograd, as PEFT computes it. ``mask`` is the scaled dropout mask (or None).

    ``precision="activation"``: the adapters (and ``lora_bias``) cast to ``x``'s dtype first, so
    the branch runs there (what PEFT computes with adapters in the activation dtype)."""
    if precision == "activation":
        lora_A, lora_B = lora_A.to(x.dtype), lora_B.to(x.dtype)
        lora_bias = lora_bias.to(x.dtype) if lora_bias is not None else None
    w = weight.t() if fan_in_fan_out else weight
    result = nn.functional.linear(x, w, bias)
    xl = x.to(lora_A.dtype)
    if mask is not None:
        xl = xl * mask.to(xl.dtype)
    lora = nn.functional.linear(nn.functional.linear(xl, lora_A), lora_B, lora_bias) * scaling
    return (result + lora).to(result.dtype)


def dropout_mask(seed: int, shape, p: float, device, dtype=torch.float32) -> torch.Tensor:
    """The scaled keep-mask (``0`` or ``1/(1-p')``) the torch backend draws for ``seed``.

    The mask is drawn twice per step (forward, and again in backward instead of being
    stored), so drawing must be cheap: each 64-bit draw of the generator gives four 16-bit
    uniforms (a quarter of the work of ``torch.rand``; ~7x faster on a CPU). An element is
    dropped when its uniform is below ``round(p * 65536)``, so the drop probability is
    ``p' = round(p * 65536) / 65536`` (``|p' - p| <= 7.7e-6``), and kept elements are scaled by
    ``1 / (1 - p')``: the branch stays exactly unbiased.
    """
    numel = math.prod(shape)
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    draws = torch.randint(-(2**63), 2**63 - 1, (-(-numel // 4),), dtype=torch.int64, generator=g, device=device)
    u16 = draws.view(torch.int16)[:numel]  # uniform over [-32768, 32767]: uint16 shifted by -32768
    threshold = min(round(p * 65536), 65535)
    keep = u16 >= threshold - 32768
    return keep.view(shape).to(dtype) * (65536.0 / (65536 - threshold))


def cast_adapter(t: torch.Tensor, dtype: torch.dtype, scale: float = 1.0) -> torch.Tensor:
    """``scale * t`` in ``dtype`` (detached): the scale is applied in ``t``'s dtype before the one
    rounding to ``dtype``. Formed on every call (an adapter is rank-sized: r x in or out x r, one
    small launch). It is deliberately not cached across calls: FSDP2 refills its unsharded
    parameters in place without bumping their version counters, so no stamp of a parameter
    (pointer, version) can tell a stale copy from a fresh one; a cache keyed on them trained
    on stale adapters under FSDP2."""
    if t.dtype == dtype and scale == 1.0:
        return t
    with torch.no_grad():
        return (t.detach() * scale if scale != 1.0 else t.detach()).to(dtype)


def mm_to(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``a @ b`` as ``dtype``: accumulated in fp32 and written as ``dtype`` by the GEMM itself where
    torch offers it (``out_dtype``, CUDA and meta tensors); elsewhere the (rank-sized) result is cast."""
    if a.dtype == dtype:
        return torch.mm(a, b)
    if a.device.type in ("cuda", "meta") and dtype == torch.float32:
        try:
            return torch.mm(a, b, out_dtype=dtype)
        except RuntimeError:  # an older build without mm.dtype for this pair
            pass
    return torch.mm(a, b).to(dtype)


# --------------------------------------------------------------------------------------
# the rank-r products, per backend
# --------------------------------------------------------------------------------------
class _TorchLoraKernels:
    """The torch backend's dropout and rank-``r`` products (the Triton one shares the interface).

    ``dropout(seed, p, shape, device, dtype)`` returns a handle the three products take:
    here the materialised scaled mask (``None`` without dropout), drawn once per forward
    and once per backward; :class:`_TritonLoraKernels` passes ``(seed, p)`` and never
    materialises it.
    """

    name = "torch"

    @staticmethod
    def dropout(seed, p, shape, device, dtype):
        return dropout_mask(seed, shape, p, device, dtype) if p > 0.0 else None

    @staticmethod
    def xa(x2d, lora_A, drop):
        """``(x * M) A^T`` ``[N, r]`` in ``A``'s dtype."""
        xl = x2d.to(lora_A.dtype)
        xd = xl * drop if drop is not None else xl
        return torch.mm(xd, lora_A.t())

    @staticmethod
    def dx_add_(dx, t, lora_A, drop):
        """``dx += (t A) * M`` in place; returns ``dx``."""
        if drop is None and lora_A.dtype == dx.dtype:
            return dx.addmm_(t, lora_A)
        lo = torch.mm(t, lora_A)
        if drop is not None:
            lo.mul_(drop)
        return dx.add_(lo.to(dx.dtype)) if lo.dtype != dx.dtype else dx.add_(lo)

    @staticmethod
    def dA(t, x2d, lora_A, drop, out_dtype=None):
        """``t^T (x * M)`` ``[r, in]`` in ``out_dtype`` (default ``A``'s dtype), computed in ``A``'s."""
        xd = x2d.to(lora_A.dtype)
        xd = xd * drop if drop is not None else xd
        return mm_to(t.t(), xd, out_dtype or lora_A.dtype)


class _TritonLoraKernels(_TorchLoraKernels):
    """Dropout fused into Triton kernels (:mod:`fastft.kernels.lora`): the mask is regenerated
    tile by tile from ``(seed, offset)``, never stored. Without dropout there is nothing to
    fuse and the torch products (cuBLAS) run."""

    name = "triton"

    @staticmethod
    def dropout(seed, p, shape, device, dtype):
        return (seed, p) if p > 0.0 else None

    @staticmethod
    def xa(x2d, lora_A, drop):
        if drop is None:
            return _TorchLoraKernels.xa(x2d, lora_A, drop)
        from ..kernels.lora import lora_xa

        return lora_xa(x2d, lora_A, *drop)

    @staticmethod
    def dx_add_(dx, t, lora_A, drop):
        if drop is None:
            return _TorchLoraKernels.dx_add_(dx, t, lora_A, drop)
        from ..kernels.lora import lora_dx_add_

        return lora_dx_add_(dx, t, lora_A, *drop)

    @staticmethod
    def dA(t, x2d, lora_A, drop, out_dtype=None):
        if drop is None:
            return _TorchLoraKernels.dA(t, x2d, lora_A, drop, out_dtype)
        from ..kernels.lora import lora_dA

        return lora_dA(t.to(lora_A.dtype), x2d, *drop, out_dtype=out_dtype)


_TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _kernels(backend: str, x2d: torch.Tensor, lora_A: torch.Tensor):
    """The rank-``r`` products for ``backend``: the Triton kernels take fp32/bf16/fp16 (float64
    runs the torch products, with the torch backend's mask, in forward and backward alike)."""
    if backend == "triton" and x2d.dtype in _TRITON_DTYPES and lora_A.dtype in _TRITON_DTYPES:
        return _TritonLoraKernels
    return _TorchLoraKernels


# --------------------------------------------------------------------------------------
# autograd Function (every backend: the rank-r products come from ``kernels``)
# --------------------------------------------------------------------------------------
class _LoraLinear(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, x2d, weight, bias, lora_A, lora_B, lora_bias, scaling, p, seed, fan_in_fan_out, kernels, quant, precision
    ):
        out_dtype = x2d.dtype
        act = precision == "activation"
        if act or lora_B.dtype == out_dtype:
            # the branch in x's dtype: s * B and A cast once per call (rank-sized), x never converted
            A, B = cast_adapter(lora_A, out_dtype), cast_adapter(lora_B, out_dtype, scaling)  # B holds s * B
            lb = lora_bias.to(out_dtype) if lora_bias is not None else None
        else:
            A, B, lb = lora_A, lora_B, lora_bias
        b_scaled = B.dtype == out_dtype
        drop = kernels.dropout(seed, p, x2d.shape, x2d.device, A.dtype)
        xa = kernels.xa(x2d, A, drop)  # (N, r)
        del drop
        w = None if quant is not None else (weight.t() if fan_in_fan_out else weight)  # (out, in) view
        if b_scaled:
            if quant is not None:
                # 4-bit base: the fused dequant-matmul reads the packed weight, no 16-bit copy kept
                y = quant.matmul(x2d, weight, bias)
                y.addmm_(xa, B.t())
                if lb is not None:
                    y.add_(lb, alpha=scaling)
            else:
                # small product first, then the base GEMM accumulating onto it in place
                b = bias if lb is None else (lb * scaling if bias is None else torch.add(bias, lb, alpha=scaling))
                y = torch.addmm(b, xa, B.t()) if b is not None else torch.mm(xa, B.t())
                y.addmm_(x2d, w.t())
        else:  # PEFT's promotion: the branch and the sum in the adapters' dtype, then cast back
            if quant is not None:
                y = quant.matmul(x2d, weight, bias)
            else:
                y = torch.addmm(bias, x2d, w.t()) if bias is not None else torch.mm(x2d, w.t())
            lo = torch.mm(xa, B.t())
            if lb is not None:
                lo.add_(lb)
            y = (y + lo * scaling).to(out_dtype)
        ctx.save_for_backward(x2d, weight, A, B, xa)
        ctx.scaling, ctx.p, ctx.seed, ctx.fan_in_fan_out = scaling, p, seed, fan_in_fan_out
        ctx.has_bias, ctx.has_lora_bias = bias is not None, lora_bias is not None
        ctx.kernels = kernels
        ctx.quant = quant
        ctx.grad_dtype, ctx.b_scaled = lora_A.dtype, b_scaled
        return y

    @staticmethod
    def backward(ctx, dy):
        x2d, weight, A, B, xa = ctx.saved_tensors  # A, B in the branch's dtype (B as s * B if b_scaled)
        s, p, K = ctx.scaling, ctx.p, ctx.kernels
        gdt = ctx.grad_dtype  # the adapters' own dtype: dA, dB, d lora_bias come out in it
        need_x, need_w, need_b, need_A, need_B, need_lb = ctx.needs_input_grad[:6]
        dyl = dy.to(B.dtype)  # no-op in the activation dtype; PEFT's promotion otherwise
        t = torch.mm(dyl, B) if ctx.b_scaled else torch.mm(dyl, B).mul_(s)  # t = s dY B (N, r)
        drop = None
        if p > 0.0 and (need_x or need_A):
            drop = K.dropout(ctx.seed, p, x2d.shape, x2d.device, A.dtype)
        dx = dw = db = dA = dB = dlb = None
        if need_x and ctx.quant is not None:
            # dY W with W dequantised for this product only (freed right after)
            dx = torch.mm(dy, ctx.quant.dequant(weight, dy.dtype))
            dx = K.dx_add_(dx, t, A, drop)
        elif need_x:
            w = weight.t() if ctx.fan_in_fan_out else weight  # (out, in)
            w = w.to(dy.dtype) if w.dtype != dy.dtype else w
            if A.dtype == dy.dtype and (drop is None or torch.is_tensor(drop)):
                # small product first (the torch mask applied to it), dY W accumulated onto it in place
                dx = torch.mm(t, A)
                if drop is not None:
                    dx.mul_(drop)
                dx.addmm_(dy, w)
            else:  # PEFT's promotion, or the Triton kernel applying the mask it regenerates
                dx = K.dx_add_(torch.mm(dy, w), t, A, drop)  # (N, in)
        if need_A:
            dA = K.dA(t, x2d, A, drop, gdt)  # (r, in)
        del drop
        if need_B:
            dB = mm_to(dyl.t(), xa, gdt).mul_(s)  # (out, r)
        if need_lb:
            dlb = dyl.sum(0, dtype=gdt).mul_(s)
        if need_w:
            dw = torch.mm(dy.t(), x2d)  # (out, in)
            if ctx.fan_in_fan_out:
                dw = dw.t()
        if need_b:
            db = dy.sum(0)
        return dx, dw, db, dA, dB, dlb, None, None, None, None, None, None, None


# --------------------------------------------------------------------------------------
# the operators (torch.library, 16-bit / fp32 bases; a 4-bit base: fastft.ops.lora_nf4)
# --------------------------------------------------------------------------------------
class _Ctx:
    """A stand-in autograd ctx: the operators run :class:`_LoraLinear`'s forward and backward bodies."""

    def save_for_backward(self, *tensors):
        self.saved_tensors = tensors


def _branch_adapters(x2d, lora_A, lora_B, scaling, precision):
    """The adapters as forward uses them: ``(A, B, b_scaled)`` (``B`` holds ``s * B`` when scaled)."""
    if precision == "activation" or lora_B.dtype == x2d.dtype:
        return cast_adapter(lora_A, x2d.dtype), cast_adapter(lora_B, x2d.dtype, scaling), True
    return lora_A, lora_B, False


def _seed_value(kernels, seed: torch.Tensor, p: float):
    if p <= 0.0:
        return 0
    return seed if kernels is _TritonLoraKernels else int(seed.item())  # the torch seed lives on the CPU


_NO_SEED = torch.zeros(1, dtype=torch.int64)  # the seed argument without dropout (never read): no allocation per call


@torch.library.custom_op("fastft::lora_linear", mutates_args=())
def _lora_op(
    x2d: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    lora_bias: torch.Tensor | None,
    scaling: float,
    p: float,
    seed: torch.Tensor,
    fan_in_fan_out: bool,
    precision: str,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(y, xa)``: the layer's output and the rank-``r`` product ``(x * M) A^T`` (saved for backward)."""
    kernels = _kernels(backends.select(OP_LORA, x2d.device, backend).backend, x2d, lora_A)
    ctx = _Ctx()
    sd = _seed_value(kernels, seed, p)
    y = _LoraLinear.forward(
        ctx, x2d, weight, bias, lora_A, lora_B, lora_bias, scaling, p, sd, fan_in_fan_out, kernels, None, precision
    )
    return y, ctx.saved_tensors[4]


@_lora_op.register_fake
def _(x2d, weight, bias, lora_A, lora_B, lora_bias, scaling, p, seed, fan_in_fan_out, precision, backend):
    out_f = weight.shape[1] if fan_in_fan_out else weight.shape[0]
    A_dtype = x2d.dtype if (precision == "activation" or lora_B.dtype == x2d.dtype) else lora_A.dtype
    return x2d.new_empty(x2d.shape[0], out_f), x2d.new_empty(x2d.shape[0], lora_A.shape[0], dtype=A_dtype)


@torch.library.custom_op("fastft::lora_linear_bwd", mutates_args=())
def _lora_bwd_op(
    dy: torch.Tensor,
    x2d: torch.Tensor,
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    xa: torch.Tensor,
    scaling: float,
    p: float,
    seed: torch.Tensor,
    fan_in_fan_out: bool,
    precision: str,
    backend: str,
    needs: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dx, dweight, dbias, dA, dB, dlora_bias)``; one not asked for (``needs``) is empty."""
    kernels = _kernels(backends.select(OP_LORA, x2d.device, backend).backend, x2d, lora_A)
    A, B, b_scaled = _branch_adapters(x2d, lora_A, lora_B, scaling, precision)
    ctx = _Ctx()
    ctx.saved_tensors = (x2d, weight, A, B, xa)
    ctx.needs_input_grad = tuple(needs)
    ctx.scaling, ctx.p, ctx.seed, ctx.fan_in_fan_out = scaling, p, _seed_value(kernels, seed, p), fan_in_fan_out
    ctx.kernels, ctx.quant, ctx.grad_dtype, ctx.b_scaled = kernels, None, lora_A.dtype, b_scaled
    grads = _LoraLinear.backward(ctx, dy)[:6]
    return tuple(g.contiguous() if g is not None else dy.new_empty(0) for g in grads)


@_lora_bwd_op.register_fake
def _(dy, x2d, weight, lora_A, lora_B, xa, scaling, p, seed, fan_in_fan_out, precision, backend, needs):
    out_f = dy.shape[1]
    shapes = [
        (x2d.shape, dy.dtype),
        (weight.shape, dy.dtype),
        ((out_f,), dy.dtype),
        (lora_A.shape, lora_A.dtype),
        (lora_B.shape, lora_A.dtype),
        ((out_f,), lora_A.dtype),
    ]
    return tuple(dy.new_empty(sh, dtype=dt) if n else dy.new_empty(0) for (sh, dt), n in zip(shapes, needs))


def _lora_setup(ctx, inputs, output):
    x2d, weight, bias, lora_A, lora_B, lora_bias, scaling, p, seed, fan_in_fan_out, precision, backend = inputs
    ctx.save_for_backward(x2d, weight, lora_A, lora_B, output[1], seed)
    ctx.args = (scaling, p, fan_in_fan_out, precision, backend)
    ctx.has = (True, True, bias is not None, True, True, lora_bias is not None)
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)


def _lora_grad(ctx, dy, _dxa):
    if dy is None:
        return (None,) * 12
    x2d, weight, lora_A, lora_B, xa, seed = ctx.saved_tensors
    scaling, p, fan_in_fan_out, precision, backend = ctx.args
    needs = [bool(n and h) for n, h in zip(ctx.needs_input_grad[:6], ctx.has)]
    if not any(needs):
        return (None,) * 12
    grads = _lora_bwd_op(
        dy.contiguous(), x2d, weight, lora_A, lora_B, xa, scaling, p, seed, fan_in_fan_out, precision, backend, needs
    )
    return tuple(g if n else None for g, n in zip(grads, needs)) + (None,) * 6


_lora_op.register_autograd(_lora_grad, setup_context=_lora_setup)


def _lora_traced(x2d, weight, bias, lora_A, lora_B, lora_bias, s, fan_in_fan_out, precision):
    """The operator's forward without dropout as plain PyTorch, for torch.compile to trace where the
    torch backend would run (:func:`fastft.backends.traces_reference`): the same products in the same
    dtypes (the branch in ``x``'s dtype with ``s`` folded into ``B``, or PEFT's promotion), the
    backward derived by autograd (no base-weight gradient when it is frozen)."""
    w = weight.t() if fan_in_fan_out else weight
    base = nn.functional.linear(x2d, w, bias)
    if precision == "activation" or lora_B.dtype == x2d.dtype:
        dt = x2d.dtype
        B = (lora_B * s if s != 1.0 else lora_B).to(dt)
        y = base + nn.functional.linear(nn.functional.linear(x2d, lora_A.to(dt)), B)
        return y + lora_bias.to(dt) * s if lora_bias is not None else y
    lo = nn.functional.linear(nn.functional.linear(x2d.to(lora_A.dtype), lora_A), lora_B, lora_bias)
    return (base + lo * s).to(x2d.dtype)


# --------------------------------------------------------------------------------------
# public function
# --------------------------------------------------------------------------------------
def _check(x, weight, lora_A, lora_B, scaling, bias, lora_bias, dropout_p, fan_in_fan_out, quant_state):
    """Validate; return the NF4 state (or None) and the base weight's logical (out, in)."""
    for name, t in (("x", x), ("weight", weight), ("lora_A", lora_A), ("lora_B", lora_B)):
        if not torch.is_tensor(t):
            raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
        if name != "weight" and not t.dtype.is_floating_point:
            raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    state = None
    if quant_state is not None:
        from .nf4 import as_nf4_state

        state = as_nf4_state(quant_state)
        if weight.dtype != torch.uint8:
            raise TypeError(f"with quant_state, weight must be the packed uint8 NF4 tensor, got dtype {weight.dtype}")
        if fan_in_fan_out:
            raise ValueError("fan_in_fan_out does not apply to a 4-bit base weight (it is stored [out, in])")
        if len(state.shape) != 2:
            raise ValueError(f"quant_state describes a weight of shape {tuple(state.shape)}, expected 2-D [out, in]")
        out_f, in_f = state.shape
    elif not weight.dtype.is_floating_point:
        raise TypeError(f"weight must be a floating-point tensor (or packed NF4 with quant_state), got {weight.dtype}")
    else:
        if weight.dim() != 2:
            raise ValueError(f"weight must be 2-D, got shape {tuple(weight.shape)}")
        out_f, in_f = (weight.shape[1], weight.shape[0]) if fan_in_fan_out else tuple(weight.shape)
    if lora_A.dim() != 2 or lora_B.dim() != 2:
        raise ValueError(f"lora_A and lora_B must be 2-D, got shapes {tuple(lora_A.shape)}, {tuple(lora_B.shape)}")
    layout = "[in, out] (fan_in_fan_out)" if fan_in_fan_out else "[out, in]"
    if x.dim() < 1 or x.shape[-1] != in_f:
        raise ValueError(
            f"x shape {tuple(x.shape)} does not match the base weight [out, in] = [{out_f}, {in_f}] {layout}"
        )
    r = lora_A.shape[0]
    if lora_A.shape[1] != in_f:
        raise ValueError(f"lora_A shape {tuple(lora_A.shape)} must be [r, in] = [{r}, {in_f}]")
    if tuple(lora_B.shape) != (out_f, r):
        raise ValueError(f"lora_B shape {tuple(lora_B.shape)} must be [out, r] = [{out_f}, {r}]")
    if lora_A.dtype != lora_B.dtype:
        raise TypeError(f"lora_A dtype {lora_A.dtype} does not match lora_B dtype {lora_B.dtype}")
    base_dtype = x.dtype if state is not None else weight.dtype
    if x.dtype != base_dtype:
        raise TypeError(f"x dtype {x.dtype} does not match weight dtype {weight.dtype}")
    for name, b, dt in (("bias", bias, base_dtype), ("lora_bias", lora_bias, lora_B.dtype)):
        if b is not None:
            if not torch.is_tensor(b) or tuple(b.shape) != (out_f,):
                raise ValueError(f"{name} must have shape ({out_f},), got {tuple(getattr(b, 'shape', ()))}")
            if b.dtype != dt:
                raise TypeError(f"{name} dtype {b.dtype} does not match {dt}")
    if isinstance(scaling, bool) or not isinstance(scaling, (int, float)):
        raise TypeError(f"scaling must be a number, got {type(scaling).__name__}")
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)) or not (0.0 <= dropout_p < 1.0):
        raise ValueError(f"dropout_p must be a number in [0, 1), got {dropout_p!r}")
    for name, t in (
        ("weight", weight),
        ("lora_A", lora_A),
        ("lora_B", lora_B),
        ("bias", bias),
        ("lora_bias", lora_bias),
    ):
        if t is not None and t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    return state


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    *,
    bias: torch.Tensor | None = None,
    lora_bias: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    fan_in_fan_out: bool = False,
    quant_state=None,
    backend: str = "auto",
    precision: str = "activation",
) -> torch.Tensor:
    """``x @ W.T + bias + scaling * dropout(x) @ A.T @ B.T (+ scaling * lora_bias)`` in one autograd node.

    See the module docstring for shapes, dtypes, dropout, ``precision`` and the backward.
    ``dropout_p`` is applied whenever it is > 0: pass 0.0 in eval mode (the PEFT patch does).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    dev = x.device.type
    if dev in ("cuda", "cpu") and torch.is_autocast_enabled(dev):
        # what nn.Linear does under autocast: every floating operand in the autocast dtype (the
        # activation precision leaves the adapters to the op, which casts them once per call)
        dt = torch.get_autocast_dtype(dev)

        def cast(t):
            return t.to(dt) if t is not None and t.dtype.is_floating_point else t

        x, weight, bias = map(cast, (x, weight, bias))
        if precision == "peft":
            lora_A, lora_B, lora_bias = map(cast, (lora_A, lora_B, lora_bias))
        with torch.autocast(dev, enabled=False):
            return lora_linear(
                x, weight, lora_A, lora_B, scaling, bias=bias, lora_bias=lora_bias, dropout_p=dropout_p,
                fan_in_fan_out=fan_in_fan_out, quant_state=quant_state, backend=backend, precision=precision,
            )  # fmt: skip
    state = _check(x, weight, lora_A, lora_B, scaling, bias, lora_bias, dropout_p, fan_in_fan_out, quant_state)
    lead = x.shape[:-1]
    x2d = x.reshape(-1, x.shape[-1])
    p, s = float(dropout_p), float(scaling)
    # the dropout seed: drawn on the device by torch's generator (no host sync; a CUDA-graph replay
    # draws a fresh one); the torch products take it from the CPU generator (no device sync either)
    seed_dev = x.device if x.device.type == "cuda" else torch.device("cpu")
    seed = torch.randint(0, 2**62, (1,), device=seed_dev) if p > 0.0 else _NO_SEED
    if state is not None:  # a 4-bit base: the operators of fastft.ops.lora_nf4
        from .lora_nf4 import lora_nf4_call

        state = state.to(x.device) if state.absmax.device != x.device else state
        y = lora_nf4_call(x2d, weight, state, bias, lora_A, lora_B, lora_bias, s, p, seed, precision, backend)
        return y.reshape(*lead, y.shape[-1])
    if not torch.compiler.is_compiling():  # an unknown or unavailable forced backend raises here
        backends.select(OP_LORA, x.device, backend)
    elif p == 0.0 and backends.traces_reference(OP_LORA, x.device, backend):  # inductor fuses it (see backends)
        y = _lora_traced(x2d, weight, bias, lora_A, lora_B, lora_bias, s, bool(fan_in_fan_out), precision)
        return y.reshape(*lead, y.shape[-1])
    y, _ = torch.ops.fastft.lora_linear(
        x2d, weight, bias, lora_A, lora_B, lora_bias, s, p, seed, bool(fan_in_fan_out), precision, backend
    )
    return y.reshape(*lead, y.shape[-1])
