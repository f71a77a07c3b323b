"""C++ CPU kernels for 4-bit NF4 weights (bitsandbytes' format): dequantise and fused matmul.

Low-level contract (plain tensors, all on the CPU):

* ``packed``: uint8, ``ceil(numel / 2)`` bytes; byte ``i`` holds flat element ``2i`` in the
  HIGH nibble and ``2i + 1`` in the LOW nibble;
* ``absmax``: float32 ``[ceil(numel / blocksize)]``; or, double-quantised, uint8 indices with
  the keywords ``absmax2`` (fp32 ``[ceil(nblocks / blocksize2)]``), ``code2`` (fp32 ``[256]``),
  ``offset`` (fp32 ``[1]``) and ``blocksize2``: the kernels decode each block's scale
  ``code2[absmax[b]] * absmax2[b // blocksize2] + offset`` themselves (no PyTorch ops);
* ``code``: float32 ``[16]``, the NF4 table;
* ``W[j] = code[nibble(j)] * absmax[j // blocksize]``.

:func:`dequantize_nf4_cpp` returns ``W`` flat in fp32/bf16/fp16; :func:`nf4_matmul_cpp`
returns ``x2d @ W.view(N, K).T (+ bias)`` accumulated in fp32, reading each 4-bit weight
once for the whole batch (see the strategy notes at the top of ``csrc/cpu/nf4.cpp``). The
kernels check their inputs and raise ``RuntimeError`` / ``ValueError`` before any work.

Where the compiled code comes from, in order:

1. ``fastft._C_cpu``, built ahead of time by ``FASTFT_BUILD_EXT=1 pip install
   --no-build-isolation .`` (setup.py compiles ``csrc/cpu/*.cpp`` into it);
2. otherwise a just-in-time build of ``nf4.cpp`` with ``torch.utils.cpp_extension.load``
   (needs a C++ compiler with OpenMP and ninja; about 30 s on 2 cores, once: torch caches
   it under ``TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``, and later
   processes load it in about a second). The source is looked up at
   ``<fastft>/csrc/cpu/nf4.cpp`` (if a build ships it as package data) and then at
   ``<repo>/csrc/cpu/nf4.cpp`` next to the package (source checkouts and editable
   installs). A wheel that ships neither has no JIT build: ``fastft info`` says so.
   ``FASTFT_NO_JIT=1`` disables the JIT build.

Nothing is built or loaded at ``import fastft``: :func:`available` (asked by
:func:`fastft._ext.available` the first time an op considers the ``cpp`` backend) does it
lazily, once per process. A missing compiler or ninja, or a failed build, warns once
(``RuntimeWarning`` with the reason), is remembered, and reports the backend unavailable.

``FASTFT_NF4_ISA=avx512|avx2|scalar`` forces a code path (read by the C++ on every call,
for tests and debugging); ``auto`` or unset picks the best the CPU supports.
"""

from __future__ import annotations

import os
import shutil

import torch

from . import _jit

__all__ = ["OPS", "available", "dequantize_nf4_cpp", "isa", "nf4_matmul_cpp", "source_candidates"]


def _launch(fn, *args, **kwargs):
    """Every call into the compiled kernels (and torch GEMM) of this module goes through here,
    so that tests can count the launches of one op."""
    return fn(*args, **kwargs)


OPS = frozenset({"dequantize_nf4", "nf4_matmul"})
JIT_NAME = "fastft_cpu_nf4"
_SYMBOLS = ("dequantize_nf4", "dequantize_nf4_out", "nf4_matmul", "nf4_isa")


def source_candidates() -> list[str]:
    """Where the JIT build looks for ``nf4.cpp``, in order."""
    return _jit.source_candidates("cpu", "nf4.cpp")


class _Loader(_jit.ExtensionLoader):
    label = "C++ NF4 kernels"
    symbols = _SYMBOLS
    default_sources = ("cpu", "nf4.cpp")

    def __init__(self, sources: list[str] | None = None, aot_module: str = "fastft._C_cpu", name: str = JIT_NAME):
        super().__init__(sources, aot_module, name)

    def prepare(self, src):
        cxx = os.environ.get("CXX", "c++")
        if shutil.which(cxx.split()[0]) is None:
            return None, f"no C++ compiler ({cxx!r} is not on PATH)"
        return {"extra_cflags": ["-O3", "-fopenmp"], "extra_ldflags": ["-fopenmp"]}, ""


_LOADER = _Loader()


def available() -> tuple[bool, str]:
    """(ok, reason): can the C++ NF4 kernels run here? Loads or builds them on the first call."""
    return _LOADER.available()


def _module():
    return _LOADER.require()


_OUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _nested(absmax2, code2, offset, blocksize2) -> dict:
    if absmax2 is None:
        return {}
    return dict(absmax2=absmax2, code2=code2, offset=offset, blocksize2=int(blocksize2))


def dequantize_nf4_cpp(
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
    """Flat ``[numel]`` weight ``code[nibble(j)] * scale(j // blocksize)`` in ``out_dtype``; one call."""
    if out_dtype not in _OUT_DTYPES:
        raise ValueError(f"dequantize_nf4_cpp: out_dtype must be one of {_OUT_DTYPES}, got {out_dtype}")
    mod = _module()
    nested = _nested(absmax2, code2, offset, blocksize2)
    return _launch(mod.dequantize_nf4, packed, absmax, code, int(blocksize), int(numel), out_dtype, **nested)


def nf4_matmul_cpp(
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
    """``x2d [M, K] @ W.view(N, K).T (+ bias)`` in ``x2d.dtype`` (fp32 or bf16), fp32 accumulation.

    One call into the C++ for fp32 and bf16 ``x``: small batches (generation; fp32 x up to
    M=32, bf16 x up to M=8) run the fused kernel that reads each 4-bit weight once; larger fp32
    batches dequantise fp32 panels for torch's GEMM; larger bf16 batches dequantise bf16
    panels that stay in L2, one parallel region with a single-threaded GEMM per panel (at
    M=16, 4096x4096 on a loaded 2-core Xeon: 14 ms against 23 ms for dequantising the whole
    weight to bf16 then one GEMM, and 42 ms for bitsandbytes' matmul_4bit). fp16 ``x``: the
    weight dequantised to fp16, then torch's GEMM (two calls).
    """
    mod = _module()
    nested = _nested(absmax2, code2, offset, blocksize2)
    if x2d.dim() == 2 and not x2d.is_contiguous():
        x2d = x2d.contiguous()
    # fp16 x (the C++ matmul takes fp32 and bf16): dequantise to fp16 and run torch's GEMM
    if x2d.dim() == 2 and x2d.dtype == torch.float16:
        w = dequantize_nf4_cpp(packed, absmax, code, blocksize, int(N) * int(K), x2d.dtype, **nested)
        w = w.view(int(N), int(K))
        if bias is not None:
            return _launch(torch.addmm, bias.to(x2d.dtype), x2d, w.t())
        return _launch(torch.mm, x2d, w.t())
    return _launch(mod.nf4_matmul, x2d, packed, absmax, code, int(blocksize), int(N), int(K), bias, **nested)


def isa() -> str:
    """The code path the kernels take now: 'avx512', 'avx2' or 'scalar' (honours FASTFT_NF4_ISA)."""
    return _module().nf4_isa()
