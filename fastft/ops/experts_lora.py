"""LoRA on the expert GEMMs, fused into :func:`fastft.ops.experts` (the rank-``r`` half of it).

Per expert ``e`` and for either expert GEMM (gate/up ``W1``, down ``W2``), with the adapter
``A_e (r, in)``, ``B_e (out, r)`` and scaling ``s``::

    h = x W_e + s (x A_e^T) B_e^T          (W_e as the GEMM uses it: (in, out))

computed over the rows the expert block has already sorted by expert: ``u = x A_e^T`` is one
grouped GEMM into an ``(S, r)`` intermediate and ``u (s B_e)^T`` a second one accumulated onto
``h``. The delta ``s B_e A_e`` (an ``(E, out, in)`` tensor) is never formed, forward or
backward. Backward, for the upstream ``dh (S, out)`` of that GEMM::

    t   = dh (s B_e)         (S, r)
    dA_e = t_e^T x_e         (r, in)        grouped GEMM over the inner (row) dimension
    dB_e = s dh_e^T u_e      (out, r)
    dx  += t A_e             (S, in)        added to the base GEMM's input gradient

For the down GEMM ``x`` is the activation ``a`` (recomputed in backward from the saved
pre-activation, as the base block does), and ``dh = w dout`` (routing weight times the
upstream gradient); the routing-weight gradient ``sum(g a)`` picks the LoRA term up through
``g = dout (W2_e^T + (s B2_e) A2_e)``.

Precision, as :func:`fastft.ops.lora_linear`'s ``"activation"`` precision: the adapters are cast
to the block's compute dtype once per call (rank-sized: ``E r (in + out)`` elements), ``s`` folded
into ``B`` before the one rounding; activations are never converted; the GEMMs accumulate in
fp32 (cuBLAS) and ``dA`` / ``dB`` come back in the adapters' own dtype (fp32 adapters over a
bf16 base: the rank-sized results are cast). Saved for backward: ``u`` per adapted GEMM
(``(S, r)``) and the cast factors; nothing the size of an expert weight.

Layout: ``A (E, r, in)`` and ``B (E, out, r)``, any strides (PEFT's ``ParamWrapper`` keeps them as
``lora_A.weight (E r, in)`` and ``lora_B.weight (out, r E)``; :mod:`fastft.patching.experts_lora`
passes views of those, so the gradients land in PEFT's parameters through autograd).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .lora import cast_adapter

__all__ = ["ExpertsLora", "check_lora", "prepare", "lora_term"]


@dataclass(frozen=True)
class ExpertsLora:
    """One GEMM's adapter: ``A (E, r, in)``, ``B (E, out, r)``, scaling ``s``."""

    A: torch.Tensor
    B: torch.Tensor
    scaling: float = 1.0

    @property
    def rank(self) -> int:
        return int(self.A.shape[1])


def check_lora(lora, name: str, E: int, in_f: int, out_f: int) -> None:
    """ValueError / TypeError naming the bad adapter before any kernel."""
    if lora is None:
        return
    if not isinstance(lora, ExpertsLora):
        raise TypeError(f"experts: {name} must be an ExpertsLora(A, B, scaling) or None, got {type(lora).__name__}")
    A, B = lora.A, lora.B
    if not (torch.is_tensor(A) and torch.is_tensor(B) and A.is_floating_point() and B.is_floating_point()):
        raise TypeError(f"experts: {name} factors must be floating-point tensors")
    if A.dim() != 3 or B.dim() != 3 or A.shape[0] != E or B.shape[0] != E or B.shape[2] != A.shape[1]:
        raise ValueError(
            f"experts: {name} factors must be A (E={E}, r, {in_f}) and B (E={E}, {out_f}, r), "
            f"got {tuple(A.shape)} and {tuple(B.shape)}"
        )
    if A.shape[2] != in_f or B.shape[1] != out_f:
        raise ValueError(
            f"experts: {name} factors must be A (E={E}, r, {in_f}) and B (E={E}, {out_f}, r), "
            f"got {tuple(A.shape)} and {tuple(B.shape)}"
        )


def prepare(A, B, scaling: float, dtype: torch.dtype):
    """``(At (E, in, r), Bs (E, r, out))`` in ``dtype``, ``Bs = s B^T``: the factors as the grouped GEMMs
    read them (rank-sized copies; contiguous where the GEMM needs it)."""
    At = cast_adapter(A, dtype).transpose(-2, -1)
    Bs = cast_adapter(B, dtype, scaling).transpose(-2, -1).contiguous()
    return At, Bs


def gmm_add_(c, a, b, offs, gmm):
    """``c[rows of e] += a[rows of e] @ b[e]`` in place (``c`` activation-sized, ``a @ b`` rank-``r`` inner).

    On a CPU: per expert an ``addmm_`` into ``c``'s rows (the GEMM accumulates, no temporary and no
    extra pass over ``c``; the offsets are host memory already, no sync). Elsewhere one grouped GEMM
    into a temporary, added (``torch._grouped_mm`` has no accumulate)."""
    if c.device.type != "cpu":
        c += gmm(a, b, offs)
        return c
    start = 0
    for e, end in enumerate(offs.tolist()):
        if end > start:
            c[start:end].addmm_(a[start:end], b[e])
        start = end
    return c


def lora_forward_(h, xs, At, Bs, offs, gmm):
    """``h += (xs At_e) Bs_e`` in place over the expert-sorted rows; returns ``u = xs At_e`` (S, r)."""
    u = gmm(xs, At, offs)
    gmm_add_(h, u, Bs, offs, gmm)
    return u


def lora_t(dh, Bs, offs, gmm):
    """``t = dh (s B_e)`` (S, r): the rank-sized upstream of ``A`` and of the input."""
    return gmm(dh, Bs.transpose(-2, -1), offs)


def lora_grads(t, dh, xs, u, At, scaling: float, offs, gmm, need_A: bool, need_B: bool, grad_dtypes):
    """``(dA (E, r, in), dB (E, out, r))`` in the adapters' dtypes (None where not needed)."""
    dA = dB = None
    if need_A:
        dA = gmm(t.T, xs, offs).to(grad_dtypes[0])  # (E, r, in)
    if need_B:
        dB = gmm(dh.T, u, offs)  # (E, out, r) = dh_e^T u_e
        dB = dB.to(grad_dtypes[1]).mul_(scaling) if dB.dtype != grad_dtypes[1] else dB.mul_(scaling)
    return dA, dB


def lora_dx_(dxs, t, At, offs, gmm):
    """``dxs += t A_e`` in place (S, in)."""
    return gmm_add_(dxs, t, At.transpose(-2, -1), offs, gmm)


def lora_term(x, lora: ExpertsLora, e: int):
    """The reference's LoRA term for expert ``e`` rows ``x``: ``s (x A_e^T) B_e^T`` (autograd, ``x``'s dtype)."""
    A, B = lora.A[e].to(x.dtype), lora.B[e].to(x.dtype)
    return (x @ A.T) @ B.T * lora.scaling
