"""CUDA C++ kernels for 4-bit NF4 weights (bitsandbytes' format): dequantise and GEMV.

Low-level contract (plain tensors, all on one CUDA device, contiguous):

* ``packed``: uint8, ``ceil(numel / 2)`` bytes; byte ``i`` holds flat element ``2i`` in the
  HIGH nibble and ``2i + 1`` in the LOW nibble;
* ``absmax``: float32 ``[ceil(numel / blocksize)]``; or, double-quantised, uint8 indices with
  the keywords ``absmax2`` (fp32), ``code2`` (fp32 ``[256]``), ``offset`` (fp32 ``[1]``, read on
  the device: no host synchronisation) and ``blocksize2`` (a power of two): the kernels decode
  each block's scale ``(code2[absmax[b]] * absmax2[b // blocksize2]) + offset`` themselves,
  product and sum rounded apart as bitsandbytes' decode is, so a call is one launch;
* ``code``: float32 ``[16]``, the NF4 table;
* ``W[j] = code[nibble(j)] * absmax[j // blocksize]`` (fp32 product, rounded once).

:func:`dequantize_nf4_cuda` returns ``W`` flat in fp32/bf16/fp16 (bit-identical to the torch
reference). :func:`nf4_matmul_cuda` returns ``x2d @ W.view(N, K).T (+ bias)`` in ``x2d``'s
dtype (fp32/bf16/fp16), ``K % blocksize == 0``:

* ``M <= 8`` rows (generation): the fused GEMV kernel -- one warp per output row reads that
  row's packed bytes once, with 128-bit loads, for all ``M`` rows of x; fp32 weights and
  fp32 accumulation, a warp-shuffle reduction, one rounding to x's dtype at the end;
* ``M > 8`` (training shapes): the weight is dequantised into x's dtype with the CUDA
  kernel and the product goes to torch's GEMM (cuBLAS, tensor cores), as bitsandbytes'
  ``matmul_4bit`` does. It never returns None: a forced ``backend="cuda"`` runs every shape.

The kernels are in ``csrc/cuda/nf4_kernels.cuh`` (raw pointers, no torch headers), their
launchers in ``csrc/cuda/nf4.cu`` (nvcc) and the torch binding in ``csrc/cuda/nf4_binding.cpp``
(the host compiler: the checks that throw are there, never in nvcc-compiled code). Inputs are
also checked here, in Python, before the extension is called. Kernels launch on the current CUDA stream; nothing
synchronises the host.

Where the compiled code comes from, in order:

1. ``fastft._C_cuda``, built ahead of time by ``FASTFT_BUILD_EXT=1 pip install
   --no-build-isolation .`` when nvcc and a CUDA build of torch are present (setup.py
   compiles ``csrc/cuda/*.cu`` and ``*.cpp`` into it);
2. otherwise a just-in-time build of ``nf4.cu`` + ``nf4_binding.cpp`` with ``torch.utils.cpp_extension.load``
   (needs nvcc -- ``CUDA_HOME`` or nvcc on PATH -- and ninja; a minute or two once, for the
   visible GPU's architecture or ``TORCH_CUDA_ARCH_LIST``; torch caches it under
   ``TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``). The source is looked
   up at ``<fastft>/csrc/cuda/nf4.cu`` (package data) and then at ``<repo>/csrc/cuda/nf4.cu``
   (source checkouts and editable installs); ``nf4_binding.cpp``, ``nf4_launch.h`` and
   ``nf4_kernels.cuh`` must sit next to it (its
   hash is part of the build flags, so editing it rebuilds). ``FASTFT_NO_JIT=1`` disables
   the JIT build.

Nothing is attempted -- no import, no build, no warning -- when torch is a CPU build
(``torch.version.cuda is None``) or no CUDA device is visible: :func:`available` just
says so. Otherwise the first :func:`available` call (made by :func:`fastft._ext.available`
when an op considers the ``cuda`` backend for a CUDA tensor) loads or builds once per
process; a failure warns once (``RuntimeWarning`` with the reason), is remembered, and
reports the backend unavailable.
"""

from __future__ import annotations

import hashlib
import os
import shutil

import torch

from . import _jit

__all__ = ["GEMV_MAX_M", "OPS", "available", "dequantize_nf4_cuda", "nf4_matmul_cuda", "source_candidates"]


def _launch(fn, *args, **kwargs):
    """Every call into the compiled kernels (and torch GEMM) of this module goes through here,
    so that tests can count the launches of one op."""
    return fn(*args, **kwargs)


OPS = frozenset({"dequantize_nf4", "nf4_matmul"})
JIT_NAME = "fastft_cuda_nf4"
GEMV_MAX_M = 8  # kGemvMaxM in csrc/cuda/nf4_kernels.cuh; above it: CUDA dequant + torch GEMM
_SYMBOLS = ("nf4_dequantize", "nf4_gemv")
_HEADER = "nf4_kernels.cuh"
_BINDING = "nf4_binding.cpp"


def source_candidates() -> list[str]:
    """Where the JIT build looks for ``nf4.cu``, in order."""
    return _jit.source_candidates("cuda", "nf4.cu")


def _precondition() -> str | None:
    """Why nothing should even be tried here (None: go ahead). Cheap; never builds."""
    if torch.version.cuda is None:
        return "torch is a CPU build (torch.version.cuda is None): the CUDA kernels need a CUDA build of torch"
    if not torch.cuda.is_available():
        return "no CUDA device is visible (torch.cuda.is_available() is False)"
    return None


class _Loader(_jit.ExtensionLoader):
    label = "CUDA NF4 kernels"
    symbols = _SYMBOLS
    default_sources = ("cuda", "nf4.cu")

    def __init__(self, sources: list[str] | None = None, aot_module: str = "fastft._C_cuda", name: str = JIT_NAME):
        super().__init__(sources, aot_module, name)

    def precondition(self):
        return _precondition()

    def prepare(self, src):
        header = os.path.join(os.path.dirname(src), _HEADER)
        for f in (header, os.path.join(os.path.dirname(src), "nf4_launch.h")):
            if not os.path.isfile(f):
                return None, f"{f} not found (nf4.cu includes it)"
        binding = os.path.join(os.path.dirname(src), _BINDING)
        if not os.path.isfile(binding):
            return None, f"{binding} not found (the torch binding of nf4.cu)"
        from torch.utils import cpp_extension

        if cpp_extension.CUDA_HOME is None and shutil.which("nvcc") is None:
            return None, "nvcc not found (set CUDA_HOME or put nvcc on PATH)"
        h = hashlib.sha1()
        for f in (header, os.path.join(os.path.dirname(src), "nf4_launch.h")):
            with open(f, "rb") as fh:  # torch hashes the sources and flags only, not included headers
                h.update(fh.read())
        tag = h.hexdigest()[:12]
        return {
            "extra_sources": [binding],
            "extra_cflags": ["-O3"],
            "extra_cuda_cflags": ["-O3", f"-DFASTFT_NF4_KERNELS_TAG={tag}"],
        }, ""


_LOADER = _Loader()


def available() -> tuple[bool, str]:
    """(ok, reason): can the CUDA NF4 kernels run here? Loads or builds them on the first call."""
    return _LOADER.available()


def _module():
    return _LOADER.require()


_OUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _check_weight(where: str, packed, absmax, code, blocksize: int, numel: int, nested: dict | None = None) -> None:
    """ValueError/TypeError naming the bad input, before the extension is called."""
    tensors = [("packed", packed), ("absmax", absmax), ("code", code)]
    if nested:
        tensors += [(k, nested[k]) for k in ("absmax2", "code2", "offset")]
    for name, t in tensors:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{where}: {name} must be a tensor, got {type(t).__name__}")
        if t.device.type != "cuda":
            raise ValueError(f"{where}: {name} must be a CUDA tensor, got device {t.device}")
        if t.device != packed.device:
            raise ValueError(
                f"{where}: all tensors must be on one device, got {name} on {t.device}, packed on {packed.device}"
            )
    if packed.dtype != torch.uint8:
        raise TypeError(f"{where}: packed must be uint8, got {packed.dtype}")
    if absmax.dtype != (torch.uint8 if nested else torch.float32) or code.dtype != torch.float32:
        want = "uint8 (double-quantised)" if nested else "float32"
        raise TypeError(f"{where}: absmax must be {want} and code float32, got {absmax.dtype} and {code.dtype}")
    if nested:
        for k in ("absmax2", "code2", "offset"):
            if nested[k].dtype != torch.float32:
                raise TypeError(f"{where}: {k} must be float32, got {nested[k].dtype}")
        bs2 = int(nested["blocksize2"])
        if bs2 <= 0 or bs2 & (bs2 - 1):
            raise ValueError(f"{where}: blocksize2 must be a power of two, got {bs2}")
    if code.numel() != 16:
        raise ValueError(f"{where}: code must have 16 entries, got {code.numel()}")
    if int(blocksize) <= 0:
        raise ValueError(f"{where}: blocksize must be positive, got {blocksize}")
    if int(numel) < 0:
        raise ValueError(f"{where}: numel must be non-negative, got {numel}")
    if packed.numel() != (int(numel) + 1) // 2:
        raise ValueError(
            f"{where}: packed has {packed.numel()} bytes, expected ceil({numel} / 2) = {(int(numel) + 1) // 2}"
        )
    nblocks = -(-int(numel) // int(blocksize))
    if absmax.numel() != nblocks:
        raise ValueError(
            f"{where}: absmax has {absmax.numel()} entries, expected ceil({numel} / {blocksize}) = {nblocks}"
        )


def _nested(absmax2, code2, offset, blocksize2) -> dict:
    if absmax2 is None:
        return {}
    return dict(
        absmax2=absmax2.contiguous(), code2=code2.contiguous(), offset=offset.contiguous(), blocksize2=int(blocksize2)
    )


def dequantize_nf4_cuda(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor,
    blocksize: int,
    numel: int,
    out_dtype: torch.dtype = torch.bfloat16,
    *,
    absmax2: torch.Tensor | None = None,
    code2: torch.Tensor | None = None,
    offset: torch.Tensor | None = None,
    blocksize2: int = 256,
) -> torch.Tensor:
    """Flat ``[numel]`` weight ``code[nibble(j)] * scale(j // blocksize)`` in ``out_dtype``; one launch."""
    if out_dtype not in _OUT_DTYPES:
        raise ValueError(f"dequantize_nf4_cuda: out_dtype must be one of {_OUT_DTYPES}, got {out_dtype}")
    mod = _module()
    nested = _nested(absmax2, code2, offset, blocksize2)
    _check_weight("dequantize_nf4_cuda", packed, absmax, code, blocksize, numel, nested)
    return _launch(
        mod.nf4_dequantize,
        packed.contiguous(),
        absmax.contiguous(),
        code.contiguous(),
        int(blocksize),
        int(numel),
        out_dtype,
        **nested,
    )


def nf4_matmul_cuda(
    x2d: torch.Tensor,
    packed: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor,
    blocksize: int,
    N: int,
    K: int,
    bias: torch.Tensor | None = None,
    *,
    absmax2: torch.Tensor | None = None,
    code2: torch.Tensor | None = None,
    offset: torch.Tensor | None = None,
    blocksize2: int = 256,
) -> torch.Tensor:
    """``x2d [M, K] @ W.view(N, K).T (+ bias)`` in ``x2d.dtype`` (fp32, bf16 or fp16).

    ``M <= GEMV_MAX_M`` (8): the fused GEMV (fp32 weights and accumulation). Larger ``M``:
    ``W`` is dequantised into x's dtype by the CUDA kernel and multiplied by torch's GEMM.
    """
    where = "nf4_matmul_cuda"
    mod = _module()
    N, K = int(N), int(K)
    if N <= 0 or K <= 0:
        raise ValueError(f"{where}: N and K must be positive, got N={N} K={K}")
    nested = _nested(absmax2, code2, offset, blocksize2)
    _check_weight(where, packed, absmax, code, blocksize, N * K, nested)
    if not isinstance(x2d, torch.Tensor) or x2d.dim() != 2:
        raise ValueError(f"{where}: x must be a 2-D tensor [M, K], got {getattr(x2d, 'shape', type(x2d).__name__)}")
    if x2d.device != packed.device:
        raise ValueError(f"{where}: x must be on {packed.device} (CUDA, with the weight), got {x2d.device}")
    if x2d.dtype not in _OUT_DTYPES:
        raise TypeError(f"{where}: x must be float32, bfloat16 or float16, got {x2d.dtype}")
    if x2d.shape[1] != K:
        raise ValueError(f"{where}: x has {x2d.shape[1]} columns, expected K={K}")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != N or bias.device != x2d.device):
        raise ValueError(f"{where}: bias must be [{N}] on {x2d.device}, got {tuple(bias.shape)} on {bias.device}")
    if x2d.shape[0] <= GEMV_MAX_M and (K % 2 or int(blocksize) % 2 or K % int(blocksize)):
        raise ValueError(
            f"{where}: the GEMV (M <= {GEMV_MAX_M}) needs K ({K}) a multiple of blocksize ({blocksize}), both even"
        )
    if not x2d.is_contiguous():
        x2d = x2d.contiguous()
    packed, absmax, code = packed.contiguous(), absmax.contiguous(), code.contiguous()
    if x2d.shape[0] > GEMV_MAX_M:
        w = _launch(mod.nf4_dequantize, packed, absmax, code, int(blocksize), int(N) * int(K), x2d.dtype, **nested)
        w = w.view(int(N), int(K))
        if bias is None:
            return _launch(torch.mm, x2d, w.t())
        return _launch(torch.addmm, bias.to(x2d.dtype), x2d, w.t())
    return _launch(mod.nf4_gemv, x2d, packed, absmax, code, int(blocksize), int(N), int(K), bias, **nested)
