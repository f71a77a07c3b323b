"""Mixture-of-experts expert block: route, gate/up GEMM, gated activation, down GEMM, weighted scatter.

What a transformers 5 experts module (``gate_up_proj [E, 2I, H]``, ``down_proj [E, H, I]``,
or transposed ``[E, H, 2I]`` / ``[E, I, H]`` with optional biases, as in gpt-oss) computes
for tokens ``x (T, H)`` routed to ``top_k_index (T, K)`` with ``top_k_weights (T, K)``::

    out[t] = sum_k w[t, k] * (act(x[t] W1_e + b1_e) W2_e + b2_e),   e = top_k_index[t, k]

``act`` is a gated activation of the ``2I`` gate/up row (:class:`ExpertsActivation`):
``silu`` / ``gelu`` / ``gelu_tanh`` of the first half times the second half (Mixtral,
Qwen3-MoE, OLMoE, DeepSeek-V3, ...), or gpt-oss' clamped ``(clamp(up) + 1) * g sigmoid(alpha g)``
on interleaved columns.

The fast path routes once: the ``S = T K`` (token, slot) pairs are sorted by expert on the
device, per-expert end offsets come from ``searchsorted`` (no host sync, no ``bincount``),
and each GEMM is one ``torch._grouped_mm`` over the sorted rows. Backward, with
``g = dout[tok] W2_e^T`` (one GEMM)::

    dw    = sum(g * a) (+ dout[tok] . b2_e)      no need to keep the expert outputs
    da    = w g,   dy = w dout[tok]
    dW2_e = dy_e^T a_e,   db2_e = sum dy_e
    dh    = act'(h) da    (a = act(h) recomputed from the saved pre-activation h)
    dW1_e = dh_e^T x_e,   db1_e = sum dh_e,   dx = scatter_add(dh W1_e^T)

Saved between passes: the pre-activation ``h (S, 2I)`` and the routing (ints); the gathered
input, the activation and the expert outputs are recomputed or never needed.
``torch._grouped_mm`` wants 16-byte aligned strides; a GEMM whose operands are not aligned
(odd sizes) runs a per-expert loop over the same sorted rows instead (one host read of the
offsets). Measured on a 2-core CPU at E 8, H 1024, I 2816, 4096 rows: grouped_mm 0.39 s vs
loop 0.41 s forward, 0.69 s vs 1.5 s for a weight gradient, hence grouped_mm everywhere.

LoRA on either GEMM (``lora_gate_up`` / ``lora_down``: ``x W_e + s (x A_e^T) B_e^T``) runs as two
more rank-``r`` grouped GEMMs over the same sorted rows in forward and three in backward; the
delta ``s B_e A_e`` is never formed (:mod:`fastft.ops.experts_lora` holds that math).

4-bit weights. ``gate_up_proj`` / ``down_proj`` may be :class:`fastft.nn.ExpertsWeight4bit`
(NF4 per expert, what :func:`fastft.quantize` puts in an experts module; format in
:mod:`fastft.ops.experts_nf4`). Each GEMM that reads a weight (two in forward, ``dout W2^T``
and ``dh W1^T`` in backward) dequantises it right there, in the activation dtype, and drops it
after the GEMM (:func:`_wgemm`): nothing 16-bit is saved for backward, and 4-bit weights get no
gradient (frozen). How much of it is dense at a time depends on the device:

* CPU: a bounded chunk of experts (:func:`_gmm_4bit_chunked`). The offsets are host memory there,
  so each GEMM takes consecutive experts that have rows while their dense slices fit
  :data:`DEQUANT_CHUNK_BYTES` (``FASTFT_EXPERTS_CHUNK_MB`` overrides; one expert at least; experts
  with no rows are never dequantised), dequantises just those slices and runs one ``mm`` per expert
  over its sorted rows into its rows of the output - the very calls ``torch._grouped_mm``'s CPU
  path makes on the whole stack, so the bits are the same. At the bench shape (E 8, H 1024,
  I 2816, 2048 tokens, fp32) this took the 4-bit block's step peak from 526 to 375 MiB (the frozen
  16-bit block's: 358) and its time from 1.54-1.59x to 1.07-1.38x the frozen block's; see
  :data:`DEQUANT_CHUNK_BYTES` for the budget.
* CUDA: no dense copy at all. A Triton grouped GEMM (:mod:`fastft.kernels.experts_nf4`) reads the
  packed NF4 bytes and the (double-quantised) scales of each expert and dequantises every weight
  tile in registers right before its ``tl.dot`` (fp32 accumulation, the result in the activation
  dtype), the forward form ``a_e W_e^T`` and the data-grad form ``a_e W_e``; its programs find their
  expert and row tile from the device offsets, so there is no host sync. The backend of these
  GEMMs is the op ``experts_nf4`` (:data:`OP_EXPERTS_NF4`: ``triton`` on CUDA tensors under
  ``"auto"`` while the routed rows average at most :data:`NF4_TRITON_MAX_ROWS_PER_EXPERT` per expert,
  above that dequantise-then-grouped-GEMM; forced ``backend="triton"`` runs it in the interpreter on CPU tensors with
  ``TRITON_INTERPRET=1``). A weight it cannot read (``in_features`` not a multiple of the blocksize,
  a compute dtype other than fp32 / bf16 / fp16) runs the torch path under ``"auto"`` and is a
  ``ValueError`` under a forced ``"triton"``.
* The torch path off the CPU (``backend="torch"``, no Triton, or such a weight): the whole
  ``(E, out, in)`` stack, one flat dequantisation, no host sync, one weight at a time. Chunking there
  needs each chunk's first row on the host (a sync per GEMM): ``torch._grouped_mm``'s groups tile the
  rows from row 0, so a subset of experts can only be given its rows by slicing at a host offset, and
  the sync-free stand-ins cost FLOPs (a dummy group over the rows before the chunk, or a fixed
  capacity of all ``S`` rows per chunk, multiply the GEMM work by up to the number of chunks).

:func:`experts_reference` is the plain PyTorch definition (a loop over experts, autograd),
the oracle of the tests and the baseline of the benchmark (it reads a 4-bit weight one
dequantised expert slice at a time).

Tensor weights run :class:`_Experts`' forward and backward as the ``torch.library`` operators
``fastft::experts_fwd`` / ``experts_bwd`` (:mod:`fastft.ops.experts_op`), so ``torch.compile``
traces the block without a graph break. Two 4-bit weights (not tensors) run the autograd Function
eagerly and, under ``torch.compile``, the operators ``fastft::experts_4bit_fwd`` / ``experts_4bit_bwd``
(:mod:`fastft.ops.experts_op4bit`: the weights' parts as arguments, the same bodies, the same
numbers); one 4-bit and one 16-bit weight keep the autograd Function (a graph break under compile).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .. import backends
from . import experts_lora as _lo
from .experts_lora import ExpertsLora
from .experts_nf4 import _DQ_BLOCKSIZE

__all__ = ["ExpertsActivation", "ExpertsLora", "experts", "experts_reference"]

OP_EXPERTS = "experts"
backends.register(OP_EXPERTS, ("torch",))
# The grouped GEMMs over 4-bit expert weights (the op's backend for a call with an ExpertsWeight4bit):
# "triton" dequantises NF4 tiles inside a Triton grouped GEMM (fastft.kernels.experts_nf4; CUDA
# tensors, or CPU tensors in the interpreter when forced), "torch" dequantises first (a chunk of
# experts at a time on a CPU, the whole stack elsewhere) and runs torch's GEMMs.
OP_EXPERTS_NF4 = "experts_nf4"
backends.register(OP_EXPERTS_NF4, ("triton", "torch"))

_GATED = ("silu", "gelu", "gelu_tanh")


@dataclass(frozen=True)
class ExpertsActivation:
    """The gated activation between the two expert GEMMs.

    ``kind``: ``"silu"`` / ``"gelu"`` / ``"gelu_tanh"`` (``act(gate) * up``, gate = first half
    of the ``2I`` columns) or ``"gpt_oss"`` (interleaved columns, ``gate <= limit``,
    ``|up| <= limit``, ``(up + 1) * gate * sigmoid(alpha * gate)``)."""

    kind: str = "silu"
    alpha: float = 1.702
    limit: float = 7.0

    def __post_init__(self):
        if self.kind not in _GATED + ("gpt_oss",):
            raise ValueError(f"activation kind must be one of {_GATED + ('gpt_oss',)}, got {self.kind!r}")


def _split(h: torch.Tensor, act: ExpertsActivation):
    if act.kind == "gpt_oss":
        return h[..., ::2], h[..., 1::2]
    return h.chunk(2, dim=-1)


def act_forward(h: torch.Tensor, act: ExpertsActivation) -> torch.Tensor:
    """``(S, 2I) -> (S, I)``, op for op what the model's own experts compute (same dtype)."""
    gate, up = _split(h, act)
    if act.kind == "gpt_oss":
        gate = gate.clamp(max=act.limit)
        up = up.clamp(min=-act.limit, max=act.limit)
        return (up + 1) * (gate * torch.sigmoid(gate * act.alpha))
    if act.kind == "silu":
        return F.silu(gate) * up
    return F.gelu(gate, approximate="tanh" if act.kind == "gelu_tanh" else "none") * up


def act_backward(da: torch.Tensor, h: torch.Tensor, act: ExpertsActivation) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dh (S, 2I), a (S, I))``: the gradient of :func:`act_forward` for upstream ``da`` and the
    activation itself, both from one recomputation of the activation off the saved ``h``."""
    gate, up = _split(h, act)
    if act.kind == "gpt_oss":
        gc = gate.clamp(max=act.limit)
        uc = up.clamp(min=-act.limit, max=act.limit)
        s = torch.sigmoid(gc * act.alpha)
        glu = gc * s
        du = (da * glu) * ((up >= -act.limit) & (up <= act.limit))
        dg = (da * (uc + 1)) * (s + act.alpha * glu * (1 - s)) * (gate <= act.limit)
        return torch.stack((dg, du), dim=-1).reshape(h.shape), (uc + 1) * glu
    n = gate.shape[-1]
    dh = torch.empty_like(h)
    if act.kind == "silu":
        sg = F.silu(gate)
        torch.ops.aten.silu_backward.grad_input(da * up, gate, grad_input=dh[:, :n])
    else:
        approx = "tanh" if act.kind == "gelu_tanh" else "none"
        sg = F.gelu(gate, approximate=approx)
        dh[:, :n] = torch.ops.aten.gelu_backward(da * up, gate, approximate=approx)
    torch.mul(sg, da, out=dh[:, n:])
    return dh, sg.mul_(up)


# --------------------------------------------------------------------------------------
# reference (pure PyTorch, autograd): the oracle for tests and benchmarks
# --------------------------------------------------------------------------------------
def experts_reference(
    x: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    gate_up_bias: torch.Tensor | None = None,
    down_bias: torch.Tensor | None = None,
    *,
    act: ExpertsActivation = ExpertsActivation(),
    transposed: bool = False,
    lora_gate_up: ExpertsLora | None = None,
    lora_down: ExpertsLora | None = None,
) -> torch.Tensor:
    """The expert block as a loop over experts (what transformers' ``eager`` computes); with
    ``lora_gate_up`` / ``lora_down`` each GEMM adds ``s (x A_e^T) B_e^T`` (adapters cast to the
    input's dtype, :mod:`fastft.ops.experts_lora`)."""
    _check(x, top_k_index, top_k_weights, gate_up_proj, down_proj, gate_up_bias, down_bias, transposed)
    _check_lora(gate_up_proj, down_proj, transposed, lora_gate_up, lora_down)
    out = torch.zeros_like(x)
    for e in range(gate_up_proj.shape[0]):
        tok, slot = torch.where(top_k_index == e)
        if tok.numel() == 0:
            continue
        w1 = gate_up_proj[e] if transposed else gate_up_proj[e].T
        w2 = down_proj[e] if transposed else down_proj[e].T
        h = x[tok] @ w1
        if lora_gate_up is not None:
            h = h + _lo.lora_term(x[tok], lora_gate_up, e)
        if gate_up_bias is not None:
            h = h + gate_up_bias[e]
        a = act_forward(h, act)
        y = a @ w2
        if lora_down is not None:
            y = y + _lo.lora_term(a, lora_down, e)
        if down_bias is not None:
            y = y + down_bias[e]
        out = out.index_add(0, tok, (y * top_k_weights[tok, slot, None]).to(x.dtype))
    return out


# --------------------------------------------------------------------------------------
# grouped GEMM over expert-sorted rows
# --------------------------------------------------------------------------------------
def _aligned(t: torch.Tensor) -> bool:
    es = t.element_size()
    return t.data_ptr() % 16 == 0 and all(s == 1 or (s * es) % 16 == 0 for s in t.stride())


def _gmm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """``torch._grouped_mm(a, b, offs)``: 2-D x 3-D (rows grouped) or 2-D x 2-D (inner dim grouped)."""
    if _aligned(a) and _aligned(b):
        return torch._grouped_mm(a, b, offs=offs)
    ends = offs.tolist()  # odd sizes only: one host read of the offsets
    starts = [0] + ends[:-1]
    if b.dim() == 3:
        out = a.new_empty(a.shape[0], b.shape[2])
        for e, (s, t) in enumerate(zip(starts, ends)):
            if t > s:
                torch.mm(a[s:t], b[e], out=out[s:t])
        return out
    out = a.new_zeros(len(ends), a.shape[0], b.shape[1])
    for e, (s, t) in enumerate(zip(starts, ends)):
        if t > s:
            torch.mm(a[:, s:t], b[s:t], out=out[e])
    return out


def _materialise(w, dtype: torch.dtype, transposed: bool, experts=None, scales=None) -> torch.Tensor:
    """Expert weight ``w`` as the ``(E, in, out)`` operand of the grouped GEMM: a view of a 16-bit
    weight, or a 4-bit one (:class:`fastft.nn.ExpertsWeight4bit`) dequantised to ``dtype``, a
    transient each GEMM makes afresh (forward and backward), one weight at a time; ``experts=(start,
    stop)``: only those experts of a 4-bit weight (a chunk, :func:`_gmm_4bit_chunked`), with its
    ``scales`` decoded once for all the chunks."""
    if not torch.is_tensor(w):
        w = w.dequantize(dtype, experts=experts, scales=scales)
    return w if transposed else w.transpose(-2, -1)


# Bytes of dense (dequantised) 4-bit expert weight a CPU GEMM holds at a time: a chunk of whole
# experts, one expert at least (so 0 means one at a time); FASTFT_EXPERTS_CHUNK_MB overrides it.
# Measured on the 2-core bench CPU at E 8, H 1024, I 2816, 2048 tokens (one expert: gate_up 22 MiB,
# down 11 MiB in fp32), fwd+bwd of the 4-bit block (bench_moe memory workers; times interleaved):
#   budget          0 (one)   32 MiB   64 MiB   128 MiB   unbounded   whole stack (before)
#   step peak MiB   372       372      394      454       526         526     (frozen 16-bit: 358)
#   fp32 ms         652       784      690      -         907         914     (frozen 601; load ~1.8)
#   bf16 ms         231       235      243      -         249         259     (frozen 208)
# (Measured with the scales decoded per chunk; decoded once per GEMM, as now, 32 MiB: 375 MiB,
# the whole weight's fp32 scales, 2.8 MiB, being alive over the GEMM.) The peak grows with the chunk; the time does not get worse below 32 MiB (timing noise on this
# shared machine is +-20%). 32 MiB: the peak of one expert at a time here, but fewer dequantisation
# calls where experts are small (each is a parallel region, milliseconds on a loaded CPU), and no
# larger than glibc's biggest dynamic mmap threshold, so a chunk is recycled from the heap instead
# of being faulted in afresh every GEMM (with MALLOC_MMAP_THRESHOLD_=16384 forcing fresh pages the
# chunked runs lost their edge over the whole stack: 839-978 vs 701 ms).
DEQUANT_CHUNK_BYTES = 32 * 2**20
CHUNK_ENV = "FASTFT_EXPERTS_CHUNK_MB"


def dequant_chunk_bytes() -> int:
    """The chunk budget in bytes: ``$FASTFT_EXPERTS_CHUNK_MB`` (MiB, >= 0) if set, else :data:`DEQUANT_CHUNK_BYTES`."""
    env = os.environ.get(CHUNK_ENV, "").strip()
    if not env:
        return int(DEQUANT_CHUNK_BYTES)
    try:
        mb = float(env)
    except ValueError:
        mb = float("nan")
    if not mb >= 0 or mb == float("inf"):
        raise ValueError(f"{CHUNK_ENV} must be a finite number of MiB >= 0 (0: one expert at a time), got {env!r}")
    return int(mb * 2**20)


def _gmm_4bit_chunked(a, w, offs, dtype: torch.dtype, transposed: bool, grad: bool) -> torch.Tensor:
    """:func:`_wgemm` for a 4-bit weight on a CPU: a bounded chunk of experts dequantised at a time.

    The offsets are host memory: consecutive experts with rows are taken while their dense slices
    fit :func:`dequant_chunk_bytes` (one at least; experts with no rows are never dequantised), the
    chunk is dequantised (the same bits as those slices of the whole stack) and each expert's sorted
    rows are one ``mm`` into its rows of the output: the calls ``torch._grouped_mm``'s CPU path
    makes on the whole stack, so the same result."""
    ends = offs.tolist()
    starts = [0] + ends[:-1]
    E = len(ends)
    _, d1, d2 = w.shape
    n_in, n_out = (d1, d2) if transposed else (d2, d1)  # of the forward operand W_e (in, out)
    cap = max(1, dequant_chunk_bytes() // (d1 * d2 * dtype.itemsize))
    out = a.new_empty(a.shape[0], n_in if grad else n_out)
    # the fp32 block scales of the whole weight (1/32 of its bf16 bytes), decoded once for all its chunks:
    # decoding per chunk is a handful of small ops per chunk, each a parallel region on a CPU (~4 ms
    # apiece on the loaded 2-core bench machine, which made one-expert chunks 1.9x slower in bf16)
    scales = w.scales()
    if scales is None and w.double_quant:  # (without double quantisation absmax is the fp32 scales)
        scales = w.decode_scales()[0]
    e = 0
    while e < E:
        if ends[e] <= starts[e]:
            e += 1
            continue
        stop = e + 1
        while stop < E and stop - e < cap and ends[stop] > starts[stop]:
            stop += 1
        wc = _materialise(w, dtype, transposed, (e, stop), scales)  # (stop - e, in, out)
        if grad:
            wc = wc.transpose(-2, -1)
        for j in range(e, stop):
            torch.mm(a[starts[j] : ends[j]], wc[j - e], out=out[starts[j] : ends[j]])
        del wc
        e = stop
    return out


def nf4_kernel_misfit(w, dtype: torch.dtype) -> str | None:
    """Why the Triton grouped GEMM cannot read the 4-bit weight ``w`` at compute ``dtype`` (None: it can)."""
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return f"compute dtype {dtype} (the kernel runs float32 / bfloat16 / float16)"
    if w.in_features % w.blocksize:
        return (
            f"in_features {w.in_features} of the {tuple(w.shape)} expert weight is not a multiple of "
            f"blocksize {w.blocksize} (quantisation blocks run across its rows)"
        )
    return None


# Under "auto", the Triton NF4 grouped GEMM runs when the routed rows average at most this many per
# expert (host-known: rows = tokens * top_k, no sync); above it, dequantise-then-grouped_mm (cuBLAS).
# Why, before a GPU measurement (bench_moe.py's fastft_nf4 vs fastft_nf4_dequant cases decide it): the
# in-kernel path decodes every weight tile once per row tile of its expert (ceil(rows_e / 64) times),
# so its extra ALU work grows with the rows while the dequantised path's extra cost (writing and
# re-reading the dense stack, ~2 x its bytes) does not. At one or two row tiles per expert (decoding,
# small batches) the GEMMs are bandwidth-bound and reading 4-bit bytes wins; at training shapes
# (Mixtral-like, 8192 tokens: ~2048 rows per expert) the decode would run 32 times per weight and
# cuBLAS on a dense transient is the safer default. The fused path's memory gain (no dense stack) is
# then available with backend="triton".
NF4_TRITON_MAX_ROWS_PER_EXPERT = 128


@torch.compiler.assume_constant_result
def _nf4_select(device_type: str, backend: str) -> tuple[str, str]:
    """``(backend selected for OP_EXPERTS_NF4, backend requested)``: host facts (environment, Triton's
    availability), evaluated once when torch.compile traces, a constant of the graph."""
    return backends.select(OP_EXPERTS_NF4, device_type, backend).backend, backends.requested(backend)


def _nf4_gemm_backend(device: torch.device, ws, dtype: torch.dtype, backend: str, rows: int = 0) -> str:
    """``"triton"`` or ``"torch"``: how the GEMMs over the 4-bit weights among ``ws`` run (see
    :data:`OP_EXPERTS_NF4`). Under ``"auto"`` a weight the kernel cannot read runs the torch path
    (:func:`_wgemm` decides per weight), and so do ``rows`` (routed rows, tokens x top-k) above
    :data:`NF4_TRITON_MAX_ROWS_PER_EXPERT` per expert; a forced ``"triton"`` that cannot read one is a
    ``ValueError``."""
    choice, requested = _nf4_select(torch.device(device).type, backend)
    if choice == "triton" and requested == "auto":
        E = next(w.shape[0] for _, w in ws)
        if rows > NF4_TRITON_MAX_ROWS_PER_EXPERT * E:
            return "torch"
    if choice == "triton" and requested != "auto":
        for name, w in ws:
            why = None if torch.is_tensor(w) else nf4_kernel_misfit(w, dtype)
            if why is not None:
                raise ValueError(f"experts: backend='triton' cannot run the 4-bit {name}: {why}; use 'auto' or 'torch'")
    return choice


def _gmm_nf4_triton(a: torch.Tensor, w, offs: torch.Tensor, grad: bool) -> torch.Tensor:
    """:func:`_wgemm` of a 4-bit weight in the Triton grouped GEMM: each NF4 tile dequantised in-kernel."""
    from ..kernels.experts_nf4 import nf4_grouped_mm_triton

    scales = w.scales()  # the fp32 scales when kept decoded (cache_absmax): no in-kernel second level
    nested = {}
    if scales is None and w.double_quant:
        nested = dict(absmax2=w.nested_absmax, code2=w.nested_code, offset=w.nested_offset, blocksize2=_DQ_BLOCKSIZE)
    return nf4_grouped_mm_triton(
        a, offs, w.weight.detach(), w.absmax if scales is None else scales, w.code,
        out_features=w.out_features, in_features=w.in_features, blocksize=w.blocksize, grad=grad, **nested,
    )  # fmt: skip


def _wgemm(
    a: torch.Tensor, w, offs: torch.Tensor, dtype: torch.dtype, transposed: bool, grad: bool = False, gemm="torch"
):
    """The grouped GEMM of the sorted rows ``a`` with their experts' weight ``w``: ``a_e W_e`` with
    ``W_e`` the ``(in, out)`` operand of the forward GEMM, or ``a_e W_e^T`` (``grad``: the backward
    GEMMs ``dout W2^T`` and ``dh W1^T``). A 4-bit weight: with ``gemm="triton"`` (and a layout the
    kernel reads) the Triton grouped GEMM dequantises its tiles in-kernel (:func:`_gmm_nf4_triton`);
    else on a CPU a chunk of experts is dequantised at a time (:func:`_gmm_4bit_chunked`), elsewhere
    the whole stack for the one grouped GEMM."""
    if not torch.is_tensor(w) and gemm == "triton" and nf4_kernel_misfit(w, dtype) is None:
        return _gmm_nf4_triton(a, w, offs, grad)
    if torch.is_tensor(w) or a.device.type != "cpu":
        wt = _materialise(w, dtype, transposed)
        return _gmm(a, wt.transpose(-2, -1) if grad else wt, offs)
    return _gmm_4bit_chunked(a, w, offs, dtype, transposed, grad)


def _saveable(*ws):
    """The weights for ``save_for_backward`` (a 4-bit weight is not a tensor: None there, see :func:`_packed`)."""
    return tuple(w if torch.is_tensor(w) else None for w in ws)


def _packed(*ws):
    """The 4-bit weights, kept on ``ctx`` for backward to dequantise again (None for tensors)."""
    return tuple(None if torch.is_tensor(w) else w for w in ws)


def set_ctx_meta(ctx, act, transposed, K, A1, B1, A2, B2, lora_s, packed=(None, None), gemm="torch") -> None:
    """What :meth:`_Experts.backward` reads off ``ctx`` besides the saved tensors (also set by the
    ``fastft::experts_bwd`` operator on its stand-in ``ctx``, :mod:`fastft.ops.experts_op`);
    ``gemm``: how the 4-bit weights' GEMMs run (:func:`_wgemm`)."""
    ctx.packed, ctx.gemm = packed, gemm
    ctx.act, ctx.transposed, ctx.K = act, transposed, K
    ctx.lora1, ctx.lora2, ctx.lora_s = A1 is not None, A2 is not None, lora_s
    ctx.lora_dtypes = [(t.dtype, u.dtype) for t, u in ((A1, B1), (A2, B2)) if t is not None]


class _Experts(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, top_k_index, top_k_weights, w1, w2, b1, b2, act, transposed, A1=None, B1=None, A2=None,
                B2=None, lora_s=(1.0, 1.0), gemm="torch"):  # fmt: skip
        T, K = top_k_index.shape
        E = w1.shape[0]
        dtype = w1.dtype
        flat = top_k_index.reshape(-1)
        sorted_ids, perm = torch.sort(flat, stable=True)  # (S,)
        offs = torch.searchsorted(sorted_ids, torch.arange(E, device=x.device, dtype=sorted_ids.dtype), right=True)
        offs = offs.to(torch.int32)  # (E,) end row of each expert
        tok = perm // K  # (S,) token of each sorted row
        ws = top_k_weights.reshape(-1)[perm]  # (S,)
        xs = x[tok].to(dtype)  # (S, H)
        h = _wgemm(xs, w1, offs, dtype, transposed, gemm=gemm)  # (S, 2I)
        lora = []  # LoRA (experts_lora): per adapted GEMM its cast factors and u = x A^T, saved for backward
        grp = _lo.Groups(offs, sorted_ids, _gmm) if A1 is not None or A2 is not None else None
        if A1 is not None:
            At1, Bs1 = _lo.prepare(A1, B1, lora_s[0], dtype)
            lora += [At1, Bs1, _lo.lora_forward_(h, xs, At1, Bs1, grp)]
        if b1 is not None:
            h += b1[sorted_ids]
        a = act_forward(h, act)
        y = _wgemm(a, w2, offs, dtype, transposed, gemm=gemm)  # (S, H)
        if A2 is not None:
            At2, Bs2 = _lo.prepare(A2, B2, lora_s[1], dtype)
            lora += [At2, Bs2, _lo.lora_forward_(y, a, At2, Bs2, grp)]
        del a
        if b2 is not None:
            y += b2[sorted_ids]
        acc = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
        out = torch.zeros(x.shape, device=x.device, dtype=acc).index_add_(0, tok, (y * ws[:, None]).to(acc))
        ctx.save_for_backward(x, perm, sorted_ids, offs, ws, h, *_saveable(w1, w2), b2, *lora)
        set_ctx_meta(ctx, act, transposed, K, A1, B1, A2, B2, lora_s, _packed(w1, w2), gemm)
        return out.to(x.dtype)

    @staticmethod
    def backward(ctx, dout):
        x, perm, sorted_ids, offs, ws, h, w1, w2, b2, *lora = ctx.saved_tensors
        w1, w2 = (p if p is not None else w for p, w in zip(ctx.packed, (w1, w2)))
        act, transposed, K = ctx.act, ctx.transposed, ctx.K
        lora1 = lora[:3] if ctx.lora1 else None  # (At, Bs, u) of the gate/up adapter
        lora2 = lora[-3:] if ctx.lora2 else None
        dtypes1, dtypes2 = (ctx.lora_dtypes[0], ctx.lora_dtypes[-1]) if ctx.lora_dtypes else (None, None)
        grp = _lo.Groups(offs, sorted_ids, _gmm) if lora else None
        E, dtype = w1.shape[0], w1.dtype
        need = ctx.needs_input_grad
        tok = perm // K
        dout_s = dout[tok].to(dtype)  # (S, H)
        g = _wgemm(dout_s, w2, offs, dtype, transposed, grad=True, gemm=ctx.gemm)  # (S, I) = dout W2^T
        if lora2 is not None:  # g += (dout s B2) A2
            t2 = _lo.lora_t(dout_s, lora2[1], grp)  # (S, r), before the routing weight
            _lo.lora_dx_(g, t2, lora2[0], grp)
        wcol = ws[:, None].to(dtype)
        dh, a = act_backward(g * wcol, h, act)  # (S, 2I), and a (S, I) recomputed
        dw = None
        if need[2]:
            dws = (g.float() * a.float()).sum(-1)
            if b2 is not None:
                dws += (dout_s.float() * b2[sorted_ids].float()).sum(-1)
            dw = torch.empty_like(dws)
            dw[perm] = dws
            dw = dw.view(-1, K).to(ws.dtype)
        del g  # each intermediate is dropped at its last use: backward's peak holds h, dh and dX only
        dy = dout_s * wcol  # (S, H)
        del dout_s
        dw2 = db2 = dw1 = db1 = dx = dA1 = dB1 = dA2 = dB2 = None
        if lora2 is not None and (need[11] or need[12]):
            dA2, dB2 = _lo.lora_grads(t2 * wcol, dy, a, lora2[2], ctx.lora_s[1], grp, need[11], need[12], dtypes2)
        if need[4]:
            dw2 = _gmm(a.T, dy, offs) if transposed else _gmm(dy.T, a, offs)
        del a
        if need[6]:
            db2 = torch.zeros(E, dy.shape[1], device=dy.device, dtype=torch.float32)
            db2 = db2.index_add_(0, sorted_ids, dy.float()).to(b2.dtype)
        del dy
        t1 = _lo.lora_t(dh, lora1[1], grp) if lora1 is not None and (need[0] or need[9]) else None
        if need[3] or need[0] or (lora1 is not None and (need[9] or need[10])):
            xs = x[tok].to(dtype)
            if need[3]:
                dw1 = _gmm(xs.T, dh, offs) if transposed else _gmm(dh.T, xs, offs)
            if lora1 is not None:
                dA1, dB1 = _lo.lora_grads(t1, dh, xs, lora1[2], ctx.lora_s[0], grp, need[9], need[10], dtypes1)
            del xs
        if need[5]:
            db1 = torch.zeros(E, dh.shape[1], device=dh.device, dtype=torch.float32)
            db1 = db1.index_add_(0, sorted_ids, dh.float()).to(dtype)
        if need[0]:
            dxs = _wgemm(dh, w1, offs, dtype, transposed, grad=True, gemm=ctx.gemm)  # (S, H)
            del dh
            if t1 is not None:
                _lo.lora_dx_(dxs, t1, lora1[0], grp)
            acc = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
            dx = torch.zeros(x.shape, device=x.device, dtype=acc).index_add_(0, tok, dxs.to(acc)).to(x.dtype)
        return dx, None, dw, dw1, dw2, db1, db2, None, None, dA1, dB1, dA2, dB2, None, None


def _check(x, idx, w, w1, w2, b1, b2, transposed, ids: bool = True) -> None:
    """Shapes and dtypes; with ``ids`` also the expert ids' range (tensor weights leave that to their operator)."""
    if x.dim() != 2:
        raise ValueError(f"experts: hidden states must be (tokens, hidden), got {tuple(x.shape)}")
    if idx.dim() != 2 or idx.shape[0] != x.shape[0] or w.shape != idx.shape:
        raise ValueError(
            f"experts: top_k_index {tuple(idx.shape)} and top_k_weights {tuple(w.shape)} must both be "
            f"(tokens={x.shape[0]}, top_k)"
        )
    if idx.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"experts: top_k_index must be an integer tensor, got {idx.dtype}")
    if w1.dim() != 3 or w2.dim() != 3 or w1.shape[0] != w2.shape[0]:
        raise ValueError(f"experts: expert weights must be 3-D (E, ., .), got {tuple(w1.shape)} and {tuple(w2.shape)}")
    E, H = w1.shape[0], x.shape[1]
    two_i, hin = (w1.shape[2], w1.shape[1]) if transposed else (w1.shape[1], w1.shape[2])
    i_in, hout = (w2.shape[1], w2.shape[2]) if transposed else (w2.shape[2], w2.shape[1])
    if hin != H or hout != H or two_i != 2 * i_in:
        raise ValueError(
            f"experts: gate_up_proj {tuple(w1.shape)} / down_proj {tuple(w2.shape)} do not fit hidden {H} "
            f"(transposed={transposed})"
        )
    if b1 is not None and tuple(b1.shape) != (E, two_i):
        raise ValueError(f"experts: gate_up bias must be {(E, two_i)}, got {tuple(b1.shape)}")
    if b2 is not None and tuple(b2.shape) != (E, H):
        raise ValueError(f"experts: down bias must be {(E, H)}, got {tuple(b2.shape)}")
    if ids and not torch.compiler.is_compiling():  # reads data: the operators check it at run time
        check_ids(idx, E)


def check_ids(idx: torch.Tensor, E: int) -> None:
    """``ValueError`` for an expert id outside ``[0, E)``: CPU tensors only (on a device it would sync)."""
    if idx.device.type == "cpu" and idx.numel():
        lo, hi = int(idx.min()), int(idx.max())
        if lo < 0 or hi >= E:
            raise ValueError(f"experts: top_k_index values must lie in [0, {E}), got [{lo}, {hi}]")


def _check_lora(w1, w2, transposed, lora_gate_up, lora_down) -> None:
    E = w1.shape[0]
    h, two_i = (w1.shape[1], w1.shape[2]) if transposed else (w1.shape[2], w1.shape[1])
    _lo.check_lora(lora_gate_up, "lora_gate_up", E, h, two_i)
    _lo.check_lora(lora_down, "lora_down", E, two_i // 2, h)


def experts(
    x: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    gate_up_bias: torch.Tensor | None = None,
    down_bias: torch.Tensor | None = None,
    *,
    act: ExpertsActivation = ExpertsActivation(),
    transposed: bool = False,
    backend: str = "auto",
    lora_gate_up: ExpertsLora | None = None,
    lora_down: ExpertsLora | None = None,
) -> torch.Tensor:
    """The expert block ``(T, H) -> (T, H)`` on expert-sorted rows with grouped GEMMs (see the module doc).

    ``gate_up_proj (E, 2I, H)`` and ``down_proj (E, H, I)`` (``transposed``: ``(E, H, 2I)`` and
    ``(E, I, H)``), biases ``(E, 2I)`` / ``(E, H)``; ``top_k_index (T, K)`` in ``[0, E)``;
    ``top_k_weights (T, K)``. Gradients flow to ``x``, the weights, the biases and ``top_k_weights``.
    ``lora_gate_up`` / ``lora_down``: LoRA on that GEMM, ``ExpertsLora(A (E, r, in), B (E, out, r), s)``,
    fused (:mod:`fastft.ops.experts_lora`; gradients flow to ``A`` and ``B``).
    Either weight may be a frozen 4-bit :class:`fastft.nn.ExpertsWeight4bit` (dequantised inside the GEMMs);
    ``backend`` then picks how their GEMMs run (:data:`OP_EXPERTS_NF4`: ``"triton"``, the in-kernel NF4
    grouped GEMM, or ``"torch"``, dequantise then GEMM)."""
    for name, wt in (("gate_up_proj", gate_up_proj), ("down_proj", down_proj)):
        if not torch.is_tensor(wt) and not hasattr(wt, "dequantize"):
            raise TypeError(f"experts: {name} must be a tensor or a 4-bit ExpertsWeight4bit, got {type(wt).__name__}")
    tensors = torch.is_tensor(gate_up_proj) and torch.is_tensor(down_proj)  # else 4-bit: the autograd Function
    _check(x, top_k_index, top_k_weights, gate_up_proj, down_proj, gate_up_bias, down_bias, transposed, ids=not tensors)
    for name, wt in (("gate_up_proj", gate_up_proj), ("down_proj", down_proj)):
        if wt.device != x.device:
            raise ValueError(f"experts: {name} is on {wt.device} but the hidden states are on {x.device}")
    _check_lora(gate_up_proj, down_proj, transposed, lora_gate_up, lora_down)
    if tensors and not torch.compiler.is_compiling():  # an unknown or unavailable forced backend raises here
        backends.select(OP_EXPERTS, x.device, backend)
    if tensors:  # the operators (torch.compile traces them; they check the ids' range at run time)
        return _op.experts_op_call(
            x, top_k_index, top_k_weights, gate_up_proj, down_proj, gate_up_bias, down_bias, act, transposed,
            lora_gate_up, lora_down,
        )  # fmt: skip
    # 4-bit: the GEMMs' backend (a forced one that cannot run raises here; host-known facts only, a
    # constant of a compiled graph), and a bad FASTFT_EXPERTS_CHUNK_MB is a ValueError here, before any
    # kernel (under compile: when the operator runs)
    weights = (("gate_up_proj", gate_up_proj), ("down_proj", down_proj))
    gemm = _nf4_gemm_backend(x.device, weights, gate_up_proj.dtype, backend, rows=top_k_index.numel())
    if not torch.compiler.is_compiling():
        dequant_chunk_bytes()
    four_bit = not torch.is_tensor(gate_up_proj) and not torch.is_tensor(down_proj)
    if four_bit and torch.compiler.is_compiling():  # the operators (they check the ids' range at run time)
        return _op4.experts_4bit_op_call(
            x, top_k_index, top_k_weights, gate_up_proj, down_proj, gate_up_bias, down_bias, act, transposed,
            lora_gate_up, lora_down, gemm,
        )  # fmt: skip
    l1, l2 = lora_gate_up, lora_down  # eager, or mixed 4-bit / 16-bit weights: the autograd Function
    return _Experts.apply(
        x, top_k_index, top_k_weights, gate_up_proj, down_proj, gate_up_bias, down_bias, act, transposed,
        *((l1.A, l1.B) if l1 is not None else (None, None)), *((l2.A, l2.B) if l2 is not None else (None, None)),
        (float(l1.scaling) if l1 is not None else 1.0, float(l2.scaling) if l2 is not None else 1.0), gemm,
    )  # fmt: skip


from . import experts_op as _op  # noqa: E402  (registers fastft::experts_fwd / experts_bwd)
from . import experts_op4bit as _op4  # noqa: E402  (registers fastft::experts_4bit_fwd / experts_4bit_bwd)
