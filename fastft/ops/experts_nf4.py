"""4-bit NF4 expert weights: a 3-D ``[E, out, in]`` weight stored as ``E`` bitsandbytes NF4 slices.

Format. Expert ``e``'s 2-D slice ``W_e [out, in]`` (the layout of the ``nn.Linear`` weight
that computes it, so gpt-oss' transposed ``[E, in, out]`` slices are transposed first) is
quantised on its own exactly as ``bitsandbytes.functional.quantize_4bit(W_e, blocksize=...,
compress_statistics=double_quant, quant_type="nf4")`` does (:func:`fastft.ops.nf4.quantize_nf4`):
its own blocks, its own absmax, and with double quantisation its own ``offset`` and
second-level ``absmax2``. The slices are stacked::

    packed   uint8 [E, ceil(out*in / 2)]     row e = bnb's packed bytes of W_e (flattened)
    absmax   [E, nblocks]                    fp32, or uint8 indices into code2 (double quant)
    absmax2  fp32 [E, ceil(nblocks / 256)]   double quant only
    offset   fp32 [E]                        double quant only
    code     fp32 [16], code2 fp32 [256]     the NF4 / dynamic tables (shared by the slices)

so ``(packed[e], absmax[e], absmax2[e], offset[e])`` is a bitsandbytes ``QuantState`` of
``W_e`` (:func:`slice_state`) and an adapter or checkpoint tool that knows bnb reads each slice.

Dequantisation (:func:`dequantize_nf4_experts`, the whole ``[E, out, in]`` at once, what the
experts op calls inside its forward and backward): the per-expert scales are decoded with a
few vectorised elementwise ops (``code2[q] * absmax2 + offset``, the same fp32 operations as
bnb, so the same bits; skipped when the fp32 scales are kept), then the flat bytes of all
experts are one ``fastft::dequantize_nf4`` call (one kernel launch on the fused backends, no
host sync), since with ``out*in % blocksize == 0`` the per-expert blocks tile the flat array.
Slices whose blocks do not tile (``out*in`` not a multiple of ``blocksize``: tiny test shapes
only) are dequantised one expert at a time. ``experts=(start, stop)`` dequantises a contiguous
range of experts only (the same bits as those slices of the whole: the experts op's chunks).
"""

from __future__ import annotations

import torch

from .nf4 import _DQ_BLOCKSIZE, NF4State, _check_blocksize, dequantize_nf4, dynamic_code, nf4_code, quantize_nf4

__all__ = ["quantize_nf4_experts", "dequantize_nf4_experts", "decode_experts_absmax", "slice_state"]


@torch.no_grad()
def quantize_nf4_experts(
    weight: torch.Tensor, *, blocksize: int = 64, double_quant: bool = True, transposed: bool = False
) -> dict[str, torch.Tensor]:
    """Quantise a 3-D expert weight per expert: ``{"packed", "absmax", "code"[, "absmax2", "offset", "code2"]}``.

    ``weight`` is ``[E, out, in]``, or ``[E, in, out]`` with ``transposed`` (each slice is then
    transposed to ``[out, in]`` before quantising). One expert at a time (the transient is one
    slice in fp32)."""
    if not torch.is_tensor(weight) or not weight.dtype.is_floating_point:
        raise TypeError(f"expert weight must be a floating-point tensor, got {getattr(weight, 'dtype', weight)!r}")
    if weight.dim() != 3 or weight.numel() == 0:
        raise ValueError(f"expert weight must be a non-empty 3-D (E, out, in) tensor, got {tuple(weight.shape)}")
    _check_blocksize(blocksize)
    packed, absmax, absmax2, offset = [], [], [], []
    for e in range(weight.shape[0]):
        w = weight[e].detach()
        w = w.t().contiguous() if transposed else w.contiguous()
        p, st = quantize_nf4(w, blocksize=blocksize, double_quant=double_quant)
        packed.append(p.reshape(-1))
        absmax.append(st.absmax.reshape(-1))
        if double_quant:
            absmax2.append(st.absmax2.reshape(-1))
            offset.append(st.offset.reshape(()))
    out = dict(packed=torch.stack(packed), absmax=torch.stack(absmax), code=nf4_code(weight.device))
    if double_quant:
        out.update(absmax2=torch.stack(absmax2), offset=torch.stack(offset), code2=dynamic_code(weight.device))
    return out


def decode_experts_absmax(absmax, absmax2=None, code2=None, offset=None, blocksize2: int = _DQ_BLOCKSIZE):
    """fp32 per-block scales ``[E, nblocks]``: ``absmax`` itself without double quantisation, else
    ``code2[absmax] * absmax2[e, b // blocksize2] + offset[e]`` (bnb's fp32 ops, vectorised over experts)."""
    if absmax2 is None:
        return absmax if absmax.dtype == torch.float32 else absmax.float()
    E, nb = absmax.shape
    nb2 = -(-nb // blocksize2)
    vals = code2.to(torch.float32)[absmax.long()]  # (E, nb)
    if nb % blocksize2:
        vals = torch.nn.functional.pad(vals, (0, nb2 * blocksize2 - nb))
    out = (vals.view(E, nb2, blocksize2) * absmax2.to(torch.float32).view(E, nb2, 1)).view(E, -1)[:, :nb]
    return out + offset.to(torch.float32).view(E, 1)


def slice_state(e: int, shape2d, dtype, blocksize, absmax, code, absmax2=None, code2=None, offset=None) -> NF4State:
    """The :class:`NF4State` of expert ``e``'s ``[out, in]`` slice (views of the stacked tensors)."""
    extra = {}
    if absmax2 is not None:
        extra = dict(offset=offset[e], absmax2=absmax2[e], code2=code2)
    return NF4State(shape=torch.Size(shape2d), dtype=dtype, blocksize=blocksize, absmax=absmax[e], code=code, **extra)


def dequantize_nf4_experts(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor,
    absmax2: torch.Tensor | None = None,
    code2: torch.Tensor | None = None,
    offset: torch.Tensor | None = None,
    *,
    shape: tuple[int, int, int],
    blocksize: int,
    dtype: torch.dtype,
    scales: torch.Tensor | None = None,
    backend: str = "auto",
    experts: tuple[int, int] | None = None,
) -> torch.Tensor:
    """The weight ``[E, out, in]`` in ``dtype`` (each slice equal to bnb's ``dequantize_4bit`` of it).

    ``scales``: the fp32 ``[E, nblocks]`` absmax if already decoded (then no decode ops run).
    ``experts=(start, stop)``: only experts ``start .. stop - 1``, ``[stop - start, out, in]``, the
    same bits as those slices of the whole (row views of the stacked tensors, the same elementwise
    ops): what the experts op dequantises a chunk of experts at a time with."""
    E, n_out, n_in = shape
    n = n_out * n_in
    if packed.dim() != 2 or packed.shape[0] != E or packed.shape[1] != -(-n // 2) or packed.dtype != torch.uint8:
        raise ValueError(
            f"packed expert weight must be uint8 (E={E}, {-(-n // 2)}), got {tuple(packed.shape)} {packed.dtype}"
        )
    if experts is not None:
        ok = isinstance(experts, tuple) and len(experts) == 2 and all(type(i) is int for i in experts)
        if not ok or not 0 <= experts[0] < experts[1] <= E:
            raise ValueError(f"experts must be (start, stop) with 0 <= start < stop <= {E}, got {experts!r}")
        start, stop = experts
        if (start, stop) != (0, E):
            rows = slice(start, stop)
            packed, absmax = packed[rows], absmax[rows]
            absmax2 = absmax2[rows] if absmax2 is not None else None
            offset = offset[rows] if offset is not None else None
            scales = scales[rows] if scales is not None else None
            E, shape = stop - start, (stop - start, n_out, n_in)
    if n % blocksize == 0:  # the experts' blocks tile the flat bytes: one dequantisation
        am = scales if scales is not None else decode_experts_absmax(absmax, absmax2, code2, offset)
        state = NF4State(shape=torch.Size((E * n,)), dtype=dtype, blocksize=blocksize, absmax=am.reshape(-1), code=code)
        return dequantize_nf4(packed.reshape(-1), state, dtype=dtype, backend=backend).view(E, n_out, n_in)
    out = torch.empty(shape, dtype=dtype, device=packed.device)
    for e in range(E):
        st = slice_state(e, (n_out, n_in), dtype, blocksize, absmax, code, absmax2, code2, offset)
        out[e] = dequantize_nf4(packed[e], st, dtype=dtype, backend=backend)
    return out
