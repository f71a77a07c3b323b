"""CUDA C++ kernels for 4-bit NF4 weights (bitsandbytes' format): dequantise and GEMV.

Low-level contract (plain tensors, all on one CUDA device, contiguous):

* ``packed``: uint8, ``ceil(numel / 2)`` bytes; byte ``i`` holds flat element ``2i`` in the
  HIGH nibble and ``2i + 1`` in the LOW nibble;
* ``absmax``: float32 ``[ceil(numel / blocksize)]`` (already dequantised from any double
  quantisation);
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

The kernels are in ``csrc/cuda/nf4_kernels.cuh`` (raw pointers, no torch headers), the
torch binding in ``csrc/cuda/nf4.cu``. Kernels launch on the current CUDA stream; nothing
synchronises the host.

Where the compiled code comes from, in order:

1. ``fastft._C_cuda``, built ahead of time by ``FASTFT_BUILD_EXT=1 pip install
   --no-build-isolation .`` when nvcc and a CUDA build of torch are present (setup.py
   compiles ``csrc/cuda/*.cu`` into it);
2. otherwise a just-in-time build of ``nf4.cu`` with ``torch.utils.cpp_extension.load``
   (needs nvcc -- ``CUDA_HOME`` or nvcc on PATH -- and ninja; a minute or two once, for the
   visible GPU's architecture or ``TORCH_CUDA_ARCH_LIST``; torch caches it under
   ``TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``). The source is looked
   up at ``<fastft>/csrc/cuda/nf4.cu`` (package data) and then at ``<repo>/csrc/cuda/nf4.cu``
   (source checkouts and editable installs); ``nf4_kernels.cuh`` must sit next to it (its
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

OPS = frozenset({"dequantize_nf4", "nf4_matmul"})
JIT_NAME = "fastft_cuda_nf4"
GEMV_MAX_M = 8  # kGemvMaxM in csrc/cuda/nf4_kernels.cuh; above it: CUDA dequant + torch GEMM
_SYMBOLS = ("nf4_dequantize", "nf4_gemv")
_HEADER = "nf4_kernels.cuh"


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
        if not os.path.isfile(header):
            return None, f"{header} not found (nf4.cu includes it)"
        from torch.utils import cpp_extension

        if cpp_extension.CUDA_HOME is None and shutil.which("nvcc") is None:
            return None, "nvcc not found (set CUDA_HOME or put nvcc on PATH)"
        with open(header, "rb") as f:  # torch hashes the sources and flags only, not included headers
            tag = hashlib.sha1(f.read()).hexdigest()[:12]
        return {"extra_cflags": ["-O3"], "extra_cuda_cflags": ["-O3", f"-DFASTFT_NF4_KERNELS_TAG={tag}"]}, ""


_LOADER = _Loader()


def available() -> tuple[bool, str]:
    """(ok, reason): can the CUDA NF4 kernels run here? Loads or builds them on the first call."""
    return _LOADER.available()


def _module():
    return _LOADER.require()


_OUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def dequantize_nf4_cuda(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor,
    blocksize: int,
    numel: int,
    out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """Flat ``[numel]`` weight ``code[nibble(j)] * absmax[j // blocksize]`` in ``out_dtype``."""
    if out_dtype not in _OUT_DTYPES:
        raise ValueError(f"dequantize_nf4_cuda: out_dtype must be one of {_OUT_DTYPES}, got {out_dtype}")
    return _module().nf4_dequantize(
        packed.contiguous(), absmax.contiguous(), code.contiguous(), int(blocksize), int(numel), out_dtype
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
) -> torch.Tensor:
    """``x2d [M, K] @ W.view(N, K).T (+ bias)`` in ``x2d.dtype`` (fp32, bf16 or fp16).

    ``M <= GEMV_MAX_M`` (8): the fused GEMV (fp32 weights and accumulation). Larger ``M``:
    ``W`` is dequantised into x's dtype by the CUDA kernel and multiplied by torch's GEMM.
    """
    mod = _module()
    if x2d.dim() == 2 and not x2d.is_contiguous():
        x2d = x2d.contiguous()
    packed, absmax, code = packed.contiguous(), absmax.contiguous(), code.contiguous()
    if x2d.dim() == 2 and x2d.shape[0] > GEMV_MAX_M:
        if x2d.dtype not in _OUT_DTYPES:
            raise ValueError(f"nf4_matmul_cuda: x must be float32, bfloat16 or float16, got {x2d.dtype}")
        if x2d.shape[1] != int(K):
            raise ValueError(f"nf4_matmul_cuda: x has {x2d.shape[1]} columns, expected K={K}")
        w = mod.nf4_dequantize(packed, absmax, code, int(blocksize), int(N) * int(K), x2d.dtype).view(int(N), int(K))
        if bias is None:
            return torch.mm(x2d, w.t())
        return torch.addmm(bias.to(x2d.dtype), x2d, w.t())
    return mod.nf4_gemv(x2d, packed, absmax, code, int(blocksize), int(N), int(K), bias)
