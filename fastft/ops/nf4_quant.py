"""NF4 quantisation (bitsandbytes' CPU algorithm, pure PyTorch) as the operator
``fastft::quantize_nf4``; the format is described in :mod:`fastft.ops.nf4`, which re-exports
:func:`quantize_nf4`."""

from __future__ import annotations

import torch

from .nf4_state import _DQ_BLOCKSIZE, _LUT_SIZE, _ZERO_CODE, NF4State, _check_blocksize, dynamic_code, nf4_code

__all__ = ["quantize_nf4"]


# --------------------------------------------------------------------------------------
# quantisation (pure PyTorch; bitsandbytes' CPU algorithm)
# --------------------------------------------------------------------------------------
_DYNAMIC_LUT: dict[torch.device, torch.Tensor] = {}


def _dynamic_lut(device: torch.device) -> torch.Tensor:
    """uint8 [65536]: bnb's CPU lookup table from a point of [-1, 1] to its nearest ``dynamic_code`` entry,
    built once per device (building it is most of a small weight's double quantisation)."""
    lut = _DYNAMIC_LUT.get(device)
    if lut is None:
        code2 = dynamic_code(device)
        mid = (code2[:-1] + code2[1:]) * 0.5
        grid = torch.arange(_LUT_SIZE, dtype=torch.float32, device=device)
        grid = (2.0 * grid) / float(_LUT_SIZE - 1) - 1.0
        lut = _DYNAMIC_LUT[device] = torch.searchsorted(mid, grid, side="left").to(torch.uint8)
    return lut


def _quantize_8bit_dynamic(A: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """bnb's CPU ``quantize_blockwise`` over ``dynamic_code`` (65536-point lookup table): uint8 [n], fp32 absmax [nb]."""
    n = A.numel()
    nb = -(-n // blocksize)
    padded = torch.nn.functional.pad(A, (0, nb * blocksize - n)) if n % blocksize else A
    am = padded.abs().view(nb, blocksize).amax(dim=1)
    safe = torch.where(am == 0, torch.ones_like(am), am)
    inv = (1.0 / safe).repeat_interleave(blocksize)[:n]
    x = (A * inv).clamp_(-1.0, 1.0)
    j = x.add_(1.0).mul_(0.5).mul_(float(_LUT_SIZE - 1)).add_(0.5).to(torch.int64)  # trunc, as the C cast
    q = _dynamic_lut(A.device)[j]
    zero = (am == 0).repeat_interleave(blocksize)[:n]
    return q.masked_fill_(zero, 0), am


@torch.library.custom_op("fastft::quantize_nf4", mutates_args=())
def _quantize_op(
    weight: torch.Tensor, blocksize: int, double_quant: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(packed, absmax, absmax2, offset)`` of the flat ``weight`` (bnb's CPU algorithm):
    ``absmax`` fp32 ``[nblocks]``, or the uint8 indices with ``double_quant`` (then ``absmax2``
    fp32 ``[ceil(nblocks / 256)]`` and ``offset`` fp32 ``[]``; else both empty ``[0]``)."""
    n = weight.numel()
    device = weight.device
    code = nf4_code(device)
    A = weight.reshape(-1).float()
    rem = n % blocksize
    full = n - rem
    nfull = full // blocksize
    blk = A[:full].view(nfull, blocksize)
    absmax = blk.abs().amax(dim=-1) if nfull else A.new_empty(0)
    scaled = torch.clamp(blk * (1.0 / absmax.clamp(min=1e-38).view(-1, 1)), -1, 1).reshape(-1)
    if rem:
        tail = A[full:]
        am = tail.abs().max()
        absmax = torch.cat([absmax, am.unsqueeze(0)])
        scaled = torch.cat([scaled, torch.clamp(tail / am.clamp(min=1e-38), -1, 1)])
    q = torch.bucketize(scaled, (code[:-1] + code[1:]) / 2, out_int32=True).to(torch.uint8)
    if n % 2:
        q = torch.cat([q, q.new_full((1,), _ZERO_CODE)])
    packed = ((q[0::2] << 4) | q[1::2]).unsqueeze(1)
    if not double_quant:
        return packed, absmax, A.new_empty(0), A.new_empty(0)
    offset = absmax.mean()
    qabsmax, absmax2 = _quantize_8bit_dynamic(absmax - offset, _DQ_BLOCKSIZE)
    return packed, qabsmax, absmax2, offset


@_quantize_op.register_fake
def _(weight, blocksize, double_quant):
    n = weight.numel()
    nb = -(-n // blocksize)
    packed = weight.new_empty((-(-n // 2), 1), dtype=torch.uint8)
    if not double_quant:
        return (
            packed,
            weight.new_empty(nb, dtype=torch.float32),
            weight.new_empty(0, dtype=torch.float32),
            weight.new_empty(0, dtype=torch.float32),
        )
    nb2 = -(-nb // _DQ_BLOCKSIZE)
    return (
        packed,
        weight.new_empty(nb, dtype=torch.uint8),
        weight.new_empty(nb2, dtype=torch.float32),
        weight.new_empty((), dtype=torch.float32),
    )


@torch.no_grad()
def quantize_nf4(
    weight: torch.Tensor, *, blocksize: int = 64, double_quant: bool = True, cache_absmax: bool = False
) -> tuple[torch.Tensor, NF4State]:
    """Quantise ``weight`` to NF4: ``(packed uint8 [ceil(numel/2), 1], NF4State)``.

    Same bytes and absmax as ``bitsandbytes.functional.quantize_4bit(weight, blocksize=...,
    compress_statistics=double_quant, quant_type="nf4")``. ``cache_absmax=True`` (with
    ``double_quant``) also keeps the decoded fp32 absmax on the state (``absmax_cache``, +32 /
    blocksize bits per weight) for the kernels to read instead of decoding the 8-bit one.
    Runs as the operator ``torch.ops.fastft.quantize_nf4`` (the weight is not differentiated).
    """
    if not torch.is_tensor(weight):
        raise TypeError(f"weight must be a tensor, got {type(weight).__name__}")
    if not weight.dtype.is_floating_point:
        raise TypeError(f"weight must be a floating-point tensor, got dtype {weight.dtype}")
    _check_blocksize(blocksize)
    if weight.numel() == 0:
        raise ValueError(f"weight of shape {tuple(weight.shape)} has no elements")
    double_quant = bool(double_quant)
    packed, absmax, absmax2, offset = torch.ops.fastft.quantize_nf4(weight.detach(), blocksize, double_quant)
    device = weight.device
    code = nf4_code(device)
    if not double_quant:
        return packed, NF4State(shape=weight.shape, dtype=weight.dtype, blocksize=blocksize, absmax=absmax, code=code)
    state = NF4State(
        shape=weight.shape,
        dtype=weight.dtype,
        blocksize=blocksize,
        absmax=absmax,
        code=code,
        offset=offset,
        absmax2=absmax2,
        code2=dynamic_code(device),
        blocksize2=_DQ_BLOCKSIZE,
    )
    if cache_absmax:
        state = state.with_absmax_cache()
    return packed, state
