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


# a CPU runs a rank-r product whose other dimension is at most this as one dense GEMM over every
# expert's factors (see Groups)
DENSE_MAX_N = 4096


class Groups:
    """The rank-``r`` products over the expert-sorted rows (``offs``: end row per expert, ``ids``: the
    expert of each row), as grouped GEMMs (``gmm``).

    On a CPU each per-expert GEMM is its own parallel region (a fork/join of the thread pool; on a
    loaded 2-core machine a (512, 1024) x (1024, 16) product took 0.1 ms on one thread and 6-12 ms on
    two), so a product whose non-rank dimension ``n`` is at most :data:`DENSE_MAX_N` runs instead as one
    dense GEMM against all experts' factors side by side (``E r`` columns): rows times every expert's
    factor, then each row's own block picked (or, for products into the rows, each row's ``t`` put in
    its own block of an ``(S, E r)`` zero matrix). ``E`` times the FLOPs of a rank-sized product (a few
    per cent of the block's), one parallel region instead of ``E``. Elsewhere (GPU): grouped GEMMs."""

    def __init__(self, offs, ids, gmm):
        self.offs, self.ids, self.gmm = offs, ids, gmm
        self.E = offs.numel()
        self._rows = None

    def _dense(self, t, n: int) -> bool:
        return t.device.type == "cpu" and n <= DENSE_MAX_N

    def _blocks(self, t):
        """``(S, E r)``: row ``s`` holds ``t[s]`` in the columns of its expert, zeros elsewhere."""
        S, r = t.shape
        if self._rows is None:
            self._rows = torch.arange(S, device=t.device)
        out = t.new_zeros(S, self.E, r)
        out[self._rows, self.ids] = t
        return out.view(S, self.E * r)

    def to_rank(self, a, F):
        """``a_e F_e`` (S, r) for ``a (S, n)``, ``F (E, n, r)``."""
        n, r = a.shape[1], F.shape[2]
        if not self._dense(a, n):
            return self.gmm(a, F, self.offs)
        if self._rows is None:
            self._rows = torch.arange(a.shape[0], device=a.device)
        full = a @ F.transpose(0, 1).reshape(n, self.E * r)  # (S, E r): every expert's product
        return full.view(-1, self.E, r)[self._rows, self.ids]

    def add_from_rank_(self, c, t, G):
        """``c += t_e G_e`` in place for ``c (S, n)``, ``t (S, r)``, ``G (E, r, n)``.

        On a CPU the GEMM accumulates into ``c`` (dense: one ``addmm_``; else per expert an ``addmm_``
        into its rows, the offsets being host memory already); elsewhere one grouped GEMM into a
        temporary, added (``torch._grouped_mm`` has no accumulate)."""
        n = c.shape[1]
        if self._dense(c, n):
            return c.addmm_(self._blocks(t), G.reshape(-1, n))
        if c.device.type != "cpu":
            c += self.gmm(t, G, self.offs)
            return c
        start = 0
        for e, end in enumerate(self.offs.tolist()):
            if end > start:
                c[start:end].addmm_(t[start:end], G[e])
            start = end
        return c

    def rank_outer(self, t, a):
        """``t_e^T a_e`` (E, r, n) for ``t (S, r)``, ``a (S, n)``: a gradient of a factor."""
        n, r = a.shape[1], t.shape[1]
        if not self._dense(a, n):
            return self.gmm(t.T, a, self.offs)
        return (self._blocks(t).T @ a).view(self.E, r, n)


def lora_forward_(h, xs, At, Bs, grp: Groups):
    """``h += (xs At_e) Bs_e`` in place over the expert-sorted rows; returns ``u = xs At_e`` (S, r)."""
    u = grp.to_rank(xs, At)
    grp.add_from_rank_(h, u, Bs)
    return u


def lora_t(dh, Bs, grp: Groups):
    """``t = dh (s B_e)`` (S, r): the rank-sized upstream of ``A`` and of the input."""
    return grp.to_rank(dh, Bs.transpose(-2, -1))


def lora_grads(t, dh, xs, u, scaling: float, grp: Groups, need_A: bool, need_B: bool, grad_dtypes):
    """``(dA (E, r, in), dB (E, out, r))`` in the adapters' dtypes (None where not needed)."""
    dA = dB = None
    if need_A:
        dA = grp.rank_outer(t, xs).to(grad_dtypes[0])  # (E, r, in) = t_e^T x_e
    if need_B:
        dB = grp.rank_outer(u, dh).transpose(-2, -1)  # (E, out, r) = dh_e^T u_e
        dB = dB.to(grad_dtypes[1]).mul_(scaling) if dB.dtype != grad_dtypes[1] else dB.mul_(scaling)
    return dA, dB


def lora_dx_(dxs, t, At, grp: Groups):
    """``dxs += t A_e`` in place (S, in)."""
    return grp.add_from_rank_(dxs, t, At.transpose(-2, -1))


def lora_term(x, lora: ExpertsLora, e: int):
    """The reference's LoRA term for expert ``e`` rows ``x``: ``s (x A_e^T) B_e^T`` (autograd, ``x``'s dtype)."""
    A, B = lora.A[e].to(x.dtype), lora.B[e].to(x.dtype)
    return (x @ A.T) @ B.T * lora.scaling
