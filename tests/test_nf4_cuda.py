"""The CUDA C++ NF4 backend (csrc/cuda, fastft.kernels.nf4_cuda) on a machine without CUDA.

The kernels themselves are checked on a GPU by tests/test_gpu.py; here: on a CPU build of
torch the backend reports itself unavailable (without trying to build or warning), a forced
``backend="cuda"`` raises BackendUnavailable, "auto" is unchanged, and the loader's
failure path warns once.
"""

import glob
import os
import shutil
import subprocess
import warnings

import pytest
import torch

import fastft
from fastft import _ext, backends
from fastft.kernels import nf4_cuda
from fastft.ops import dequantize_nf4, nf4_matmul, quantize_nf4

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
cpu_torch = pytest.mark.skipif(torch.version.cuda is not None, reason="checks a CPU build of torch")


@cpu_torch
def test_cuda_backend_unavailable_on_cpu_torch():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a CPU build is not a failure: no warning
        for op in ("nf4_matmul", "dequantize_nf4"):
            ok, why = _ext.available("cuda", op)
            assert not ok and "CPU build" in why
        assert "CPU build" in _ext.status()["cuda"]
        ok, why = nf4_cuda.available()
        assert not ok and "CPU build" in why
    assert not nf4_cuda._LOADER.tried  # nothing imported or built


@cpu_torch
def test_forcing_cuda_raises_backend_unavailable(monkeypatch):
    w = torch.randn(64, 128) * 0.05
    packed, state = quantize_nf4(w, blocksize=64)
    x = torch.randn(3, 128)
    with pytest.raises(fastft.BackendUnavailable, match="cuda"):
        nf4_matmul(x, packed, state, backend="cuda")
    with pytest.raises(fastft.BackendUnavailable, match="cuda"):
        dequantize_nf4(packed, state, backend="cuda")
    monkeypatch.setenv("FASTFT_BACKEND", "cuda")
    with pytest.raises(fastft.BackendUnavailable):
        nf4_matmul(x, packed, state)
    monkeypatch.delenv("FASTFT_BACKEND")
    # "auto" on CPU tensors is unchanged
    assert backends.select("nf4_matmul", "cpu").backend in ("cpp", "torch")
    assert backends.select("dequantize_nf4", "cpu").backend in ("cpp", "torch")
    with pytest.raises(RuntimeError, match="CPU build"):
        nf4_cuda.dequantize_nf4_cuda(packed, state.absmax_fp32(), state.code, 64, w.numel(), torch.float32)


def test_cuda_backend_is_registered():
    for op in ("nf4_matmul", "dequantize_nf4"):
        order = backends.registered_ops()[op]
        assert "cuda" in order and order.index("triton") < order.index("cuda")


def test_loader_failure_warns_once(monkeypatch):
    monkeypatch.setattr(nf4_cuda, "_precondition", lambda: None)  # pretend a CUDA torch + GPU
    monkeypatch.setenv("FASTFT_NO_JIT", "1")
    loader = nf4_cuda._Loader(aot_module="fastft._C_cuda_not_there")
    with pytest.warns(RuntimeWarning, match="FASTFT_NO_JIT"):
        ok, why = loader.available()
    assert not ok and "_C_cuda_not_there is not built" in why
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert loader.available() == (False, why)  # remembered, no second warning
    monkeypatch.setenv("FASTFT_NO_JIT", "0")
    loader = nf4_cuda._Loader(aot_module="fastft._C_cuda_not_there", sources=["/nonexistent/nf4.cu"])
    with pytest.warns(RuntimeWarning, match="nf4.cu not found"):
        assert not loader.available()[0]


def test_sources_found_and_one_module():
    found = [p for p in nf4_cuda.source_candidates() if os.path.isfile(p)]
    assert found, nf4_cuda.source_candidates()
    here = os.path.dirname(found[0])
    for name in ("nf4_kernels.cuh", "nf4_launch.h", "nf4_binding.cpp"):
        assert os.path.isfile(os.path.join(here, name)), name
    # setup.py compiles every csrc/cuda/*.cu and *.cpp into fastft._C_cuda: only one may define
    # the module, and it is host-compiled C++ (the checks that throw never go through nvcc)
    src = glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")) + glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cpp"))
    with_module = [p for p in src if "PYBIND11_MODULE" in open(p).read()]
    assert [os.path.basename(p) for p in with_module] == ["nf4_binding.cpp"]
    for p in glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")):
        text = open(p).read()
        assert "TORCH_CHECK" not in text and "torch/extension.h" not in text, p


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc")
def test_kernels_compile_for_sm90(tmp_path):
    cmd = [
        "nvcc", "-std=c++17", "-arch=sm_90", "-O3", "-x", "cu", "-DFASTFT_NF4_KERNELS_SELFTEST",
        "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
        "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__",
        "-c", os.path.join(ROOT, "csrc", "cuda", "nf4_kernels.cuh"), "-o", str(tmp_path / "k.o"),
    ]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    # the launchers the binding calls (nvcc's half of the extension; no torch headers)
    cmd = cmd[: cmd.index("-c")] + ["-c", os.path.join(ROOT, "csrc", "cuda", "nf4.cu"), "-o", str(tmp_path / "l.o")]
    cmd.remove("-DFASTFT_NF4_KERNELS_SELFTEST")
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
