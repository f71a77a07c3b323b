"""4-bit NormalFloat (NF4) weights, byte-compatible with bitsandbytes.

Format. A weight ``W`` (any shape, ``n`` elements) is flattened and cut into blocks of
``blocksize`` consecutive elements (the last block may be short). Per block ``b``::

    absmax[b] = max |W_i|                       (fp32; the block's scale)
    q_i       = nearest code index of W_i / absmax[b] in the 16-entry NF4 table ``code``
    W~_i      = code[q_i] * absmax[b]            (fp32 product, then cast to the dtype)

"Nearest" is bitsandbytes' rule: bucketize against the fp32 midpoints of consecutive
codes, a value exactly on a midpoint going to the lower code (full blocks are scaled by
``x * (1 / absmax)``, the short last block by ``x / absmax``, exactly as bnb does; an
all-zero block has absmax 0 and codes 7, the zero code). Two codes per byte, the FIRST
element in the HIGH nibble; an odd ``n`` pads one zero code (7). ``packed`` has shape
``(ceil(n / 2), 1)``, uint8.

Double quantisation (``double_quant=True``, bnb's ``compress_statistics``) stores the
absmax itself in 8 bits::

    offset  = mean(absmax)                         (fp32, 0-dim)
    absmax2 = blockwise absmax of (absmax - offset), blocks of 256
    qabsmax = 8-bit index into ``code2`` (bnb's signed dynamic map, 256 entries)
    absmax  ~ code2[qabsmax] * absmax2[b // 256] + offset      (fp32, two roundings)

The 8-bit index follows bnb's CPU quantiser bit for bit: ``x = clamp(v * (1 / absmax2), -1, 1)``
is mapped onto a 65536-entry grid ``j = trunc((x + 1) * 0.5 * 65535 + 0.5)`` and the grid
point ``-1 + 2j / 65535`` takes the code whose midpoint interval contains it (a table
lookup, so not always the exact nearest code; an all-zero block gets index 0).

Ops: :func:`quantize_nf4` (pure PyTorch, any device), :func:`dequantize_nf4` and
:func:`nf4_matmul` (``y = x W~^T + bias``, ``W~`` of shape ``[N, K]``, computed in
``x``'s dtype like bnb's ``matmul_4bit``; differentiable in ``x`` and ``bias``:
``dX = dY W~``). The latter two dispatch through :mod:`fastft.backends` to ``triton``
(:mod:`fastft.kernels.nf4`), ``cuda`` (:mod:`fastft.kernels.nf4_cuda`), ``cpp``
(:mod:`fastft.kernels.nf4_cpu`) or ``torch`` (the reference below), all with one low-level
contract on plain tensors:

    dequantize_nf4_*(packed, absmax, code, blocksize, numel, out_dtype, **nested) -> 1-D [numel]
    nf4_matmul_*(x2d, packed, absmax, code, blocksize, N, K, bias, **nested)      -> [M, N] in x2d.dtype

``absmax`` is fp32, or (fused backends) the uint8 double-quantised absmax with ``nested =
dict(absmax2=, code2=, offset=, blocksize2=)``, decoded per block inside the kernels; the torch
reference always takes fp32 scales (:meth:`NF4State.absmax_fp32`). An :class:`NF4State` is
validated once, when first used (:func:`prepare_state` keeps the kernels' flat views on it), so
a call does only cheap checks of ``x``, ``bias`` and the packed bytes. Launch counts per call
(tests hold them): dequantise 1; matmul ``M <= 8`` 1, ``8 < M <= 64`` 1 (Triton: 2 with split-K),
above that dequantise + GEMM 2 (the C++ CPU kernel 1 for fp32 ``x``).

The fused matmul kernels need ``K % blocksize == 0`` (blocks never cross rows of ``W``);
:func:`nf4_matmul` dequantises other layouts and calls the framework's GEMM.

Operators. The three public functions validate, then call ``torch.library`` operators
``fastft::quantize_nf4`` (:mod:`fastft.ops.nf4_quant`), ``fastft::dequantize_nf4`` and
``fastft::nf4_matmul`` (fake implementations registered; ``nf4_matmul``'s backward ``dX = dY W~``,
``dbias = sum dY`` is its registered autograd formula), which pick the backend at run time, so
torch.compile traces each as one node without a graph break. The :class:`NF4State` is passed
flattened (absmax or its fp32 cache, code, absmax2 / code2 / offset when double-quantised,
blocksizes), taken from the validated-once cache eagerly and read off the state under tracing.

Modules: this one holds the torch backend, the dispatch, the dequantise / matmul operators and
the public functions; the code tables, :class:`NF4State` and its validation are in
:mod:`fastft.ops.nf4_state`, the quantiser in :mod:`fastft.ops.nf4_quant`. Both are re-exported
here; to monkeypatch a helper, patch the module that defines it.
"""

from __future__ import annotations

import math

import torch

from .. import backends
from .nf4_quant import quantize_nf4
from .nf4_state import (  # noqa: F401  (re-exported)
    _DQ_BLOCKSIZE,
    _DYNAMIC,
    _FLOAT_OUT,
    _LUT_SIZE,
    _NF4_VALUES,
    _ZERO_CODE,
    NF4Kernels,
    NF4State,
    _check_blocksize,
    _check_state,
    _dynamic_values,
    _plain,
    _source,
    _validate_state,
    as_nf4_state,
    dynamic_code,
    nf4_code,
    prepare_state,
)

__all__ = [
    "NF4State",
    "as_nf4_state",
    "quantize_nf4",
    "dequantize_nf4",
    "nf4_matmul",
    "nf4_matmul_reference",
    "dequantize_nf4_torch",
    "nf4_matmul_torch",
    "nf4_code",
    "dynamic_code",
    "OP_DEQUANT",
    "OP_NF4_MATMUL",
    "GEMV_POLICY",
    "NF4Kernels",
    "prepare_state",
]

OP_DEQUANT = "dequantize_nf4"
OP_NF4_MATMUL = "nf4_matmul"
# "auto" order. CUDA tensors: Triton first (its GEMV for M <= 8 and its fused dequant-GEMM
# for training shapes are the GPU-tested defaults); the CUDA C++ kernels (fastft.kernels.
# nf4_cuda: a GEMV for M <= 8, CUDA dequant + torch GEMM above) run when forced with
# backend="cuda" / FASTFT_BACKEND=cuda, or when Triton cannot run. They come before "cpp"
# only nominally: cuda runs on CUDA tensors, cpp on CPU tensors.
backends.register(OP_DEQUANT, ("triton", "cuda", "cpp", "torch"))
backends.register(OP_NF4_MATMUL, ("triton", "cuda", "cpp", "torch"))

# The small-batch GEMV (x with at most GEMV_MAX_M rows): which backend "auto" runs it on, by
# device type. To be decided from the GPU bench (bench/bench_nf4.py times the Triton and the
# CUDA C++ GEMV side by side on CUDA); until a GPU run has measured both with the in-kernel
# absmax decoding, Triton stays the default. Switching is this one line: {"cuda": "cuda"} makes
# the CUDA C++ GEMV the default for M <= 8; the other stays available as a forced backend.
# A policy backend that cannot run here (e.g. the extension is not built) falls back to the
# order above.
GEMV_MAX_M = 8
GEMV_POLICY: dict[str, str] = {"cuda": "triton"}


# --------------------------------------------------------------------------------------
# torch backend: the low-level contract, pure PyTorch (the reference the kernels match)
# --------------------------------------------------------------------------------------
def dequantize_nf4_torch(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor,
    blocksize: int,
    numel: int,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """``code[nibble_i] * absmax[i // blocksize]`` for ``i < numel`` (fp32 product, then cast): 1-D."""
    p = packed.reshape(-1)
    idx = torch.stack((p >> 4, p & 0xF), dim=-1).reshape(-1)[:numel]
    vals = code.to(dtype=torch.float32)[idx.long()]
    nb = -(-numel // blocksize)
    if numel % blocksize:
        vals = torch.nn.functional.pad(vals, (0, nb * blocksize - numel))
    out = (vals.view(nb, blocksize) * absmax.to(torch.float32).reshape(nb, 1)).reshape(-1)
    if numel % blocksize:
        out = out[:numel]
    return out.to(out_dtype)


def nf4_matmul_torch(
    x2d: torch.Tensor,
    packed: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor,
    blocksize: int,
    N: int,
    K: int,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """``x2d @ W.T + bias`` with ``W = dequant`` ``[N, K]`` in ``x2d.dtype`` (as bnb's matmul_4bit)."""
    w = dequantize_nf4_torch(packed, absmax, code, blocksize, N * K, x2d.dtype).view(N, K)
    if bias is not None and bias.dtype != x2d.dtype:
        bias = bias.to(x2d.dtype)
    return torch.nn.functional.linear(x2d, w, bias)


def nf4_matmul_reference(x, packed, state, bias=None) -> torch.Tensor:
    """``x @ dequantize_nf4(packed, state, dtype=x.dtype).T + bias``, with autograd in ``x``."""
    w = dequantize_nf4(packed, state, dtype=x.dtype, backend="torch")
    return torch.nn.functional.linear(x, w, None if bias is None else bias.to(x.dtype))


# --------------------------------------------------------------------------------------
# dispatch
# --------------------------------------------------------------------------------------
def _dequant_impl(backend: str, dtype: torch.dtype):
    if backend == "triton" and dtype in _FLOAT_OUT:
        from ..kernels.nf4 import dequantize_nf4_triton

        return dequantize_nf4_triton
    if backend == "cuda" and dtype in _FLOAT_OUT:
        from ..kernels.nf4_cuda import dequantize_nf4_cuda

        return dequantize_nf4_cuda
    if backend == "cpp" and dtype in _FLOAT_OUT:
        from ..kernels.nf4_cpu import dequantize_nf4_cpp

        return dequantize_nf4_cpp
    return dequantize_nf4_torch


def _matmul_impl(backend: str, dtype: torch.dtype):
    if backend == "triton" and dtype in _FLOAT_OUT:
        from ..kernels.nf4 import nf4_matmul_triton

        return nf4_matmul_triton
    if backend == "cuda" and dtype in _FLOAT_OUT:
        from ..kernels.nf4_cuda import nf4_matmul_cuda

        return nf4_matmul_cuda
    if backend == "cpp" and dtype in _FLOAT_OUT:
        from ..kernels.nf4_cpu import nf4_matmul_cpp

        return nf4_matmul_cpp
    return nf4_matmul_torch


def _decode_absmax(absmax, absmax2, code2, offset, blocksize2: int) -> torch.Tensor:
    """fp32 per-block scales from the operator's arguments: ``absmax`` as is when it is fp32
    (plain or cached scales), else the double quantisation undone as bnb does it (the same ops
    as :meth:`NF4State.absmax_fp32`, so the same bits)."""
    if absmax2 is None:
        return absmax if absmax.dtype == torch.float32 else absmax.float()
    q = absmax.reshape(-1).long()
    n = q.numel()
    nb2 = -(-n // blocksize2)
    vals = code2.to(torch.float32)[q]
    if n % blocksize2:
        vals = torch.nn.functional.pad(vals, (0, nb2 * blocksize2 - n))
    out = (vals.view(nb2, blocksize2) * absmax2.to(torch.float32).reshape(nb2, 1)).reshape(-1)[:n]
    return out + offset.to(torch.float32)


def _impl_scales(fused: bool, absmax, absmax2, code2, offset, blocksize2: int) -> tuple[torch.Tensor, dict]:
    """(absmax, nested) for an implementation: the fused kernels take the flat tensors as they
    are (8-bit absmax + ``nested`` decoded in-kernel, or fp32); the torch reference takes fp32
    scales decoded by PyTorch (its own, reference, way)."""
    if not fused:
        return _decode_absmax(absmax, absmax2, code2, offset, blocksize2), {}
    if absmax2 is None:
        return absmax, {}
    return absmax, dict(absmax2=absmax2, code2=code2, offset=offset, blocksize2=blocksize2)


def _op_state(state: NF4State) -> tuple:
    """An :class:`NF4State` flattened into operator arguments: ``(absmax, code, absmax2, code2,
    offset, blocksize, blocksize2)``, the kernels' flat views. Eager: from the validated, cached
    :class:`NF4Kernels` (validated once). Traced: read off the state directly (no validation,
    no cache written: the shape/dtype checks already ran eagerly or run on the real call)."""
    if not torch.compiler.is_compiling():
        prep = prepare_state(state)
        n = prep.nested
        if n:
            return prep.absmax, prep.code, n["absmax2"], n["code2"], n["offset"], prep.blocksize, n["blocksize2"]
        return prep.absmax, prep.code, None, None, None, prep.blocksize, int(state.blocksize2)
    code = state.code.reshape(-1).to(torch.float32)
    bs, bs2 = int(state.blocksize), int(state.blocksize2)
    if state.absmax_cache is not None or state.absmax2 is None:
        am = state.absmax_cache if state.absmax_cache is not None else state.absmax
        return am.reshape(-1).to(torch.float32), code, None, None, None, bs, bs2
    return (
        state.absmax.reshape(-1),
        code,
        state.absmax2.reshape(-1).to(torch.float32),
        state.code2.reshape(-1).to(torch.float32),
        state.offset.reshape(1).to(torch.float32),
        bs,
        bs2,
    )


# --------------------------------------------------------------------------------------
# the operators (torch.library: one node each under torch.compile, no graph break)
# --------------------------------------------------------------------------------------
@torch.library.custom_op("fastft::dequantize_nf4", mutates_args=())
def _dequantize_op(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor,
    absmax2: torch.Tensor | None,
    code2: torch.Tensor | None,
    offset: torch.Tensor | None,
    blocksize: int,
    blocksize2: int,
    numel: int,
    out_dtype: torch.dtype,
    backend: str,
) -> torch.Tensor:
    """The flat weight ``[numel]`` in ``out_dtype``; the backend is chosen here, at run time."""
    fn = _dequant_impl(backends.select(OP_DEQUANT, packed.device, backend).backend, out_dtype)
    am, nested = _impl_scales(fn is not dequantize_nf4_torch, absmax, absmax2, code2, offset, blocksize2)
    return fn(packed, am, code, blocksize, numel, out_dtype, **nested)


@_dequantize_op.register_fake
def _(packed, absmax, code, absmax2, code2, offset, blocksize, blocksize2, numel, out_dtype, backend):
    return packed.new_empty((numel,), dtype=out_dtype)


@torch.library.custom_op("fastft::nf4_matmul", mutates_args=())
def _nf4_matmul_op(
    x2d: torch.Tensor,
    packed: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor,
    absmax2: torch.Tensor | None,
    code2: torch.Tensor | None,
    offset: torch.Tensor | None,
    bias: torch.Tensor | None,
    blocksize: int,
    blocksize2: int,
    N: int,
    K: int,
    backend: str,
) -> torch.Tensor:
    """``x2d @ W.T + bias`` ``[M, N]`` in ``x2d.dtype``; the backend is chosen here, at run time
    (:data:`GEMV_POLICY` for small ``M``). A layout the fused kernels cannot read (``K`` not a
    multiple of ``blocksize``) is dequantised and run through the framework's GEMM."""
    chosen = _select_matmul(x2d, backend)
    if K % blocksize and chosen != "torch":
        w = _dequantize_op(
            packed, absmax, code, absmax2, code2, offset, blocksize, blocksize2, N * K, x2d.dtype, "auto"
        )
        return torch.nn.functional.linear(x2d, w.view(N, K), bias)
    fn = _matmul_impl(chosen, x2d.dtype)
    am, nested = _impl_scales(fn is not nf4_matmul_torch, absmax, absmax2, code2, offset, blocksize2)
    return fn(x2d, packed, am, code, blocksize, N, K, bias, **nested)


@_nf4_matmul_op.register_fake
def _(x2d, packed, absmax, code, absmax2, code2, offset, bias, blocksize, blocksize2, N, K, backend):
    return x2d.new_empty((x2d.shape[0], N))


def _matmul_setup(ctx, inputs, output):
    x2d, packed, absmax, code, absmax2, code2, offset, bias, blocksize, blocksize2, N, K, backend = inputs
    ctx.save_for_backward(packed, absmax, code, absmax2, code2, offset)
    ctx.meta = (blocksize, blocksize2, N, K, backend, bias is not None)


def _matmul_grad(ctx, dy):
    """``dX = dY W~`` (the weight dequantised to ``dy.dtype``, one launch on the fused
    backends, then the framework's GEMM), ``dbias = sum of dY``; the NF4 weight is frozen."""
    packed, absmax, code, absmax2, code2, offset = ctx.saved_tensors
    blocksize, blocksize2, N, K, backend, has_bias = ctx.meta
    dx = dbias = None
    if ctx.needs_input_grad[0]:
        w = _dequantize_op(
            packed, absmax, code, absmax2, code2, offset, blocksize, blocksize2, N * K, dy.dtype, backend
        )
        dx = torch.mm(dy, w.view(N, K))
    if has_bias and ctx.needs_input_grad[7]:
        dbias = dy.sum(0)
    return dx, None, None, None, None, None, None, dbias, None, None, None, None, None


_nf4_matmul_op.register_autograd(_matmul_grad, setup_context=_matmul_setup)


# --------------------------------------------------------------------------------------
# the public functions: validate (once per state), flatten the state, call the operators
# --------------------------------------------------------------------------------------
def _check_packed(packed, state) -> torch.Tensor:
    """``packed`` checked against the state (cheap: metadata only); under tracing the state's
    own (cached) validation is skipped, as :func:`_op_state` says."""
    if torch.compiler.is_compiling():
        nbytes = -(-math.prod(state.shape) // 2)
        if packed.dtype != torch.uint8 or packed.numel() != nbytes:
            raise ValueError(
                f"packed must be {nbytes} uint8 bytes for state.shape {tuple(state.shape)}, "
                f"got {packed.numel()} of dtype {packed.dtype}"
            )
        return packed.data if isinstance(packed, torch.nn.Parameter) else packed
    return _check_state(packed, state)[0]


def dequantize_nf4(packed: torch.Tensor, state, *, dtype: torch.dtype | None = None, backend: str = "auto"):
    """The weight back, of ``state.shape`` in ``dtype`` (default ``state.dtype``).

    ``state`` is an :class:`NF4State` or a bitsandbytes ``QuantState``. Equals
    bitsandbytes' ``dequantize_4bit`` bit for bit (see the module docstring for the format).
    One kernel launch on the fused backends, double quantisation included. Runs as the
    operator ``torch.ops.fastft.dequantize_nf4`` (traced by torch.compile without a graph break).
    """
    state = as_nf4_state(state)
    packed = _check_packed(packed, state)
    out_dtype = state.dtype if dtype is None else dtype
    if not isinstance(out_dtype, torch.dtype) or not out_dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating-point torch.dtype, got {out_dtype!r}")
    if not torch.compiler.is_compiling():  # an unknown or unavailable forced backend raises here
        backends.select(OP_DEQUANT, packed.device, backend)
    absmax, code, absmax2, code2, offset, bs, bs2 = _op_state(state)
    numel = math.prod(state.shape)
    out = torch.ops.fastft.dequantize_nf4(
        packed, absmax, code, absmax2, code2, offset, bs, bs2, numel, out_dtype, backend
    )
    return out.view(state.shape)


def _select_matmul(x2d: torch.Tensor, backend: str) -> str:
    """The backend for this call: :func:`fastft.backends.select`, then :data:`GEMV_POLICY` for
    ``M <= GEMV_MAX_M`` rows under ``"auto"``."""
    choice = backends.select(OP_NF4_MATMUL, x2d.device, backend).backend
    if x2d.shape[0] <= GEMV_MAX_M:
        want = GEMV_POLICY.get(x2d.device.type)
        if want is not None and want != choice and backends.requested(backend) == "auto":
            try:
                return backends.select(OP_NF4_MATMUL, x2d.device, want).backend
            except backends.BackendUnavailable:
                return choice
    return choice


def check_matmul_backend(x2d: torch.Tensor, state: NF4State, backend: str) -> None:
    """Eagerly, before the operator: a forced backend that cannot run raises
    :class:`~fastft.backends.BackendUnavailable`, a forced fused one on a layout it cannot read
    (``K`` not a multiple of the blocksize) ValueError."""
    chosen = _select_matmul(x2d, backend)
    K = state.shape[-1]
    if K % state.blocksize and chosen != "torch" and backends.requested(backend) != "auto":
        # NF4 blocks run across the rows of W (bitsandbytes quantises the flat weight): the
        # fused kernels cannot read them; under "auto" the operator dequantises + GEMMs
        raise ValueError(
            f"K={K} is not a multiple of blocksize={state.blocksize}: the fused {chosen} kernels "
            "need blocks within rows; use backend='auto' (dequantise + GEMM) or 'torch'"
        )


def nf4_matmul(
    x: torch.Tensor,
    packed: torch.Tensor,
    state,
    bias: torch.Tensor | None = None,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """``x @ W.T (+ bias)`` with ``W = dequantize_nf4(packed, state)`` of shape ``[N, K]``.

    ``x`` is ``[..., K]`` floating point; the result is ``[..., N]`` in ``x.dtype``. The weight
    is dequantised to ``x.dtype`` as bnb's ``matmul_4bit`` does; fused backends accumulate in
    fp32. Differentiable in ``x`` and ``bias``. The fused kernels need ``K % state.blocksize == 0``;
    other layouts (valid NF4: bitsandbytes quantises the flat weight) are dequantised and run
    through ``torch.nn.functional.linear`` under ``"auto"``, and refused by an explicit fused backend.

    The state is validated once (:func:`prepare_state`, cached on it); a call on a fused backend
    is a fixed number of kernel launches whatever the double quantisation (the 8-bit absmax is
    decoded inside the kernels): one for ``M <= 64`` rows (two with split-K), dequantise + GEMM above.

    Backends for CUDA tensors under ``"auto"``: ``triton``, then ``cuda`` (the CUDA C++ GEMV
    for ``M <= 8`` rows, CUDA dequant + torch GEMM above); :data:`GEMV_POLICY` picks the GEMV.
    """
    state = as_nf4_state(state)
    packed = _check_packed(packed, state)
    if not torch.is_tensor(x):
        raise TypeError(f"x must be a tensor, got {type(x).__name__}")
    if not x.dtype.is_floating_point:
        raise TypeError(f"x must be a floating-point tensor, got dtype {x.dtype}")
    if len(state.shape) != 2:
        raise ValueError(f"nf4_matmul needs a 2-D weight [N, K], got state.shape {tuple(state.shape)}")
    N, K = state.shape
    if x.dim() < 1 or x.shape[-1] != K:
        raise ValueError(f"x shape {tuple(x.shape)} does not match the weight [N, K] = [{N}, {K}]: need x[..., {K}]")
    if bias is not None:
        if not torch.is_tensor(bias) or tuple(bias.shape) != (N,):
            raise ValueError(f"bias must have shape ({N},), got {tuple(getattr(bias, 'shape', ()))}")
        if not bias.dtype.is_floating_point:
            raise TypeError(f"bias must be floating point, got dtype {bias.dtype}")
        if bias.device != x.device:
            raise ValueError(f"bias is on {bias.device} but x is on {x.device}")
    if packed.device != x.device:
        raise ValueError(f"packed is on {packed.device} but x is on {x.device}")
    lead = x.shape[:-1]
    x2d = x.reshape(-1, K)
    if bias is not None and bias.dtype != x.dtype:
        bias = bias.to(x.dtype)
    if not torch.compiler.is_compiling():  # a forced backend that cannot run raises here, eagerly
        check_matmul_backend(x2d, state, backend)
    absmax, code, absmax2, code2, offset, bs, bs2 = _op_state(state)
    y = torch.ops.fastft.nf4_matmul(x2d, packed, absmax, code, absmax2, code2, offset, bias, bs, bs2, N, K, backend)
    return y.reshape(*lead, N)
