"""Triton elementwise kernels for the gated MLP activations (SwiGLU, GeGLU).

:func:`gated_act_fwd_triton` and :func:`gated_act_bwd_triton` have exactly the contract
of :func:`fastft.ops.activations.gated_act_fwd_torch` / ``gated_act_bwd_torch`` (see the
formulas in the docstring of :mod:`fastft.ops.activations`): one program per
``BLOCK`` contiguous elements of the flattened ``gate`` / ``up``.

* forward:  ``out = act(gate) * up``;
* backward: ``dgate = dout * up * act'(gate)``, ``dup = dout * act(gate)``; the
  activation and its derivative are recomputed from ``gate`` (nothing else is saved).

All arithmetic is fp32 whatever the input dtype; results are stored once, in the
inputs' dtype. No host synchronisation.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..backends import BackendUnavailable, interpreting

__all__ = ["gated_act_fwd_triton", "gated_act_bwd_triton", "ACTIVATIONS"]

# activation -> the ACT constexpr of the kernels
ACTIVATIONS = {"silu": 0, "gelu": 1, "gelu_tanh": 2}

# Elements per program. On a GPU 1024 elements at 4 warps is 8 per thread: enough to
# stream at full bandwidth. The interpreter runs each program in Python: keep its blocks
# small so that the tests' small shapes still reach several programs and masked tails.
_BLOCK = 1024
_BLOCK_INTERPRET = 128


@triton.jit
def _act_and_grad(g, ACT: tl.constexpr, NEED_GRAD: tl.constexpr):
    """act(g) and, when NEED_GRAD, act'(g) (else 0); g is fp32."""
    if ACT == 0:  # silu(x) = x * sigmoid(x); silu'(x) = s * (1 + x * (1 - s))
        s = tl.sigmoid(g)
        a = g * s
        if NEED_GRAD:
            da = s * (1.0 + g * (1.0 - s))
        else:
            da = 0.0 * g
    elif ACT == 1:  # gelu(x) = x * Phi(x); gelu'(x) = Phi(x) + x * phi(x)
        cdf = 0.5 * (1.0 + tl.math.erf(g * 0.7071067811865476))
        a = g * cdf
        if NEED_GRAD:
            da = cdf + g * 0.3989422804014327 * tl.exp(-0.5 * g * g)
        else:
            da = 0.0 * g
    else:  # gelu_tanh(x) = 0.5 x (1 + tanh(u)), u = sqrt(2/pi) (x + 0.044715 x^3)
        u = 0.7978845608028654 * (g + 0.044715 * g * g * g)
        # t = tanh(u) from e = exp(-2|u|) in (0, 1] (nothing overflows), written so that
        # neither 1 + t nor 1 - t^2 cancels: 1 + t = 2e / (1 + e) (u < 0) or 2 / (1 + e),
        # 1 - t^2 = 4e / (1 + e)^2 (torch's 1 - tanh(u)^2 loses every digit for |x| > 4)
        e = tl.exp(-2.0 * tl.abs(u))
        r = 1.0 / (1.0 + e)
        one_plus_t = tl.where(u < 0.0, 2.0 * e * r, 2.0 * r)
        a = 0.5 * g * one_plus_t
        if NEED_GRAD:
            du = 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * g * g)
            da = 0.5 * one_plus_t + 2.0 * g * e * r * r * du
        else:
            da = 0.0 * g
    return a, da


@triton.jit
def _gated_act_fwd_kernel(
    gate_ptr,  # (N,) contiguous gate, any float dtype
    up_ptr,  # (N,) contiguous up, same dtype as gate
    out_ptr,  # (N,) out: act(gate) * up, in gate's dtype
    N,  # number of elements
    ACT: tl.constexpr,  # 0 silu, 1 exact gelu, 2 tanh-approximated gelu
    BLOCK: tl.constexpr,  # elements per program (power of two)
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # int64: N may pass 2**31
    mask = offs < N
    g = tl.load(gate_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    a, _ = _act_and_grad(g, ACT, False)
    tl.store(out_ptr + offs, (a * u).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gated_act_bwd_kernel(
    dout_ptr,  # (N,) contiguous upstream gradient
    gate_ptr,  # (N,) contiguous gate, any float dtype
    up_ptr,  # (N,) contiguous up, same dtype as gate
    dgate_ptr,  # (N,) out: dout * up * act'(gate), in gate's dtype
    dup_ptr,  # (N,) out: dout * act(gate), in up's dtype
    N,  # number of elements
    ACT: tl.constexpr,  # 0 silu, 1 exact gelu, 2 tanh-approximated gelu
    BLOCK: tl.constexpr,  # elements per program (power of two)
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    d = tl.load(dout_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(gate_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    a, da = _act_and_grad(g, ACT, True)
    tl.store(dgate_ptr + offs, (d * u * da).to(dgate_ptr.dtype.element_ty), mask=mask)
    tl.store(dup_ptr + offs, (d * a).to(dup_ptr.dtype.element_ty), mask=mask)


def _launch_config() -> tuple[int, int]:
    block = _BLOCK_INTERPRET if interpreting() else _BLOCK
    return block, 4


def _check(act: str, **tensors: torch.Tensor) -> torch.Tensor:
    if act not in ACTIVATIONS:
        raise ValueError(f"act must be one of {tuple(ACTIVATIONS)}, got {act!r}")
    (name0, t0), *rest = tensors.items()
    if t0.device.type != "cuda" and not interpreting():
        raise BackendUnavailable(
            f"gated activation: Triton kernels need CUDA tensors (got {t0.device.type}; "
            "set TRITON_INTERPRET=1 to interpret)"
        )
    for name, t in tensors.items():
        if not t.dtype.is_floating_point:
            raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
        if t.shape != t0.shape:
            raise ValueError(f"{name} shape {tuple(t.shape)} does not match {name0} shape {tuple(t0.shape)}")
        if t.device != t0.device:
            raise ValueError(f"{name} is on {t.device} but {name0} is on {t0.device}")
    return t0


def gated_act_fwd_triton(gate: torch.Tensor, up: torch.Tensor, act: str) -> torch.Tensor:
    """``act(gate) * up`` in ``gate``'s dtype (fp32 arithmetic). Same shapes, any strides."""
    # check
    _check(act, gate=gate, up=up)
    if up.dtype != gate.dtype:
        raise TypeError(f"up dtype {up.dtype} does not match gate dtype {gate.dtype}")
    # allocate
    gate, up = gate.contiguous(), up.contiguous()
    out = torch.empty_like(gate)
    N = gate.numel()
    if N == 0:
        return out
    # launch
    block, num_warps = _launch_config()
    _gated_act_fwd_kernel[(triton.cdiv(N, block),)](
        gate, up, out, N, ACT=ACTIVATIONS[act], BLOCK=block, num_warps=num_warps
    )
    return out


def gated_act_bwd_triton(
    dout: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, act: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dgate, dup)`` of ``act(gate) * up`` for upstream ``dout``, in ``gate``'s dtype."""
    # check
    _check(act, gate=gate, up=up, dout=dout)
    # allocate
    dout, gate, up = dout.contiguous(), gate.contiguous(), up.contiguous()
    dgate = torch.empty_like(gate)
    dup = torch.empty_like(up)
    N = gate.numel()
    if N == 0:
        return dgate, dup
    # launch
    block, num_warps = _launch_config()
    _gated_act_bwd_kernel[(triton.cdiv(N, block),)](
        dout, gate, up, dgate, dup, N, ACT=ACTIVATIONS[act], BLOCK=block, num_warps=num_warps
    )
    return dgate, dup
