"""C++ CPU NF4 kernels (csrc/cpu/nf4.cpp via fastft.kernels.nf4_cpu) against a PyTorch reference.

Every numeric test runs once per code path this CPU has (AVX-512, AVX2, scalar), forced
through ``FASTFT_NF4_ISA``. The extension is JIT-built on first use (about 30 s on 2 cores,
then cached by torch); without a compiler the numeric tests skip, and a build that fails
with one is a failure.
"""

import os
import shutil
import warnings

import pytest
import torch

from fastft import _ext
from fastft.kernels import nf4_cpu
from fastft.ops.nf4 import dequantize_nf4_torch, nf4_code

# the NF4 table and the reference: the package's own (one reference per op)
CODE = nf4_code()


@pytest.fixture(scope="module")
def ext():
    ok, why = nf4_cpu.available()
    if not ok:
        if shutil.which(os.environ.get("CXX", "c++")) is None or shutil.which("ninja") is None:
            pytest.skip(f"no C++ compiler or ninja to build the NF4 kernels: {why}")
        pytest.fail(f"the C++ NF4 kernels did not build although a compiler is present: {why}")
    return nf4_cpu


@pytest.fixture(params=["avx512", "avx2", "scalar"])
def isa(request, monkeypatch, ext):
    monkeypatch.setenv("FASTFT_NF4_ISA", request.param)
    try:
        got = ext.isa()
    except RuntimeError as exc:  # "this CPU supports at most ..."
        pytest.skip(str(exc))
    assert got == request.param
    return request.param


def random_nf4(numel, blocksize, gen=None):
    packed = torch.randint(0, 256, ((numel + 1) // 2,), dtype=torch.uint8, generator=gen)
    nblocks = (numel + blocksize - 1) // blocksize
    absmax = torch.rand(nblocks, generator=gen) * 2 + 0.05
    return packed, absmax


def ref_dequant(packed, absmax, code, blocksize, numel):
    return dequantize_nf4_torch(packed, absmax, code, blocksize, numel, torch.float32)


# ---------------------------------------------------------------------------------------
# dequantisation
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("blocksize", [32, 64, 128, 256])
@pytest.mark.parametrize("numel", [96 * 128, 12345, 7, 1, 64 * 33 + 31])
def test_dequant_fp32_exact(isa, blocksize, numel):
    packed, absmax = random_nf4(numel, blocksize)
    got = nf4_cpu.dequantize_nf4_cpp(packed, absmax, CODE, blocksize, numel, torch.float32)
    ref = ref_dequant(packed, absmax, CODE, blocksize, numel)
    assert got.shape == (numel,) and got.dtype == torch.float32
    torch.testing.assert_close(got, ref, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("numel", [4096 * 1024 + 3, 777])  # the first gets the huge-page allocation
def test_dequant_half_dtypes_round_like_torch(isa, dtype, numel):
    packed, absmax = random_nf4(numel, 64)
    got = nf4_cpu.dequantize_nf4_cpp(packed, absmax, CODE, 64, numel, dtype)
    ref = ref_dequant(packed, absmax, CODE, 64, numel).to(dtype)  # round to nearest even
    assert got.dtype == dtype
    assert torch.equal(got, ref)


def test_dequant_odd_blocksize_and_empty(isa):
    packed, absmax = random_nf4(101, 7)
    got = nf4_cpu.dequantize_nf4_cpp(packed, absmax, CODE, 7, 101, torch.float32)
    torch.testing.assert_close(got, ref_dequant(packed, absmax, CODE, 7, 101), rtol=0, atol=0)
    empty = nf4_cpu.dequantize_nf4_cpp(torch.empty(0, dtype=torch.uint8), torch.empty(0), CODE, 64, 0, torch.bfloat16)
    assert empty.shape == (0,)


# ---------------------------------------------------------------------------------------
# fused matmul
# ---------------------------------------------------------------------------------------

# max |error| / max |reference| allowed, by x dtype (bf16 compares the bf16 output of a
# bf16 input against the fp32 reference computed from that same bf16 input)
TOL = {torch.float32: 2e-5, torch.bfloat16: 1.6e-2}


@pytest.mark.parametrize("blocksize", [32, 64, 128, 256])
@pytest.mark.parametrize("M", [1, 7, 16, 64, 300])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_bias", [False, True])
def test_matmul_matches_reference(isa, blocksize, M, dtype, with_bias):
    N, K = (96, 256) if blocksize > 128 else (96, 128)
    if M == 300 and blocksize in (32, 128):
        N, K = 17, 512  # odd N, longer K
    packed, absmax = random_nf4(N * K, blocksize)
    x = torch.randn(M, K).to(dtype)
    bias = torch.randn(N).to(dtype) if with_bias else None
    y = nf4_cpu.nf4_matmul_cpp(x, packed, absmax, CODE, blocksize, N, K, bias)
    W = ref_dequant(packed, absmax, CODE, blocksize, N * K).view(N, K)
    ref = x.float() @ W.T
    if bias is not None:
        ref = ref + bias.float()
    assert y.shape == (M, N) and y.dtype == dtype
    err = (y.float() - ref).abs().max().item() / ref.abs().max().item()
    assert err <= TOL[dtype], f"{isa} bs={blocksize} M={M} {dtype}: relative error {err:.2e}"


@pytest.mark.parametrize("blocksize", [48, 20, 6])  # bs % 32 != 0: the scalar tail of each block
def test_matmul_block_tails(isa, blocksize):
    N, K, M = 5, blocksize * 3, 9
    packed, absmax = random_nf4(N * K, blocksize)
    x = torch.randn(M, K)
    y = nf4_cpu.nf4_matmul_cpp(x, packed, absmax, CODE, blocksize, N, K)
    W = ref_dequant(packed, absmax, CODE, blocksize, N * K).view(N, K)
    torch.testing.assert_close(y, x @ W.T, rtol=2e-5, atol=2e-5)


def test_matmul_noncontiguous_x_and_empty(ext):
    N, K = 8, 64
    packed, absmax = random_nf4(N * K, 64)
    xt = torch.randn(K, 3).T  # not contiguous: the wrapper makes it so
    W = ref_dequant(packed, absmax, CODE, 64, N * K).view(N, K)
    torch.testing.assert_close(nf4_cpu.nf4_matmul_cpp(xt, packed, absmax, CODE, 64, N, K), xt @ W.T)
    y = nf4_cpu.nf4_matmul_cpp(torch.empty(0, K), packed, absmax, CODE, 64, N, K)
    assert y.shape == (0, N)


# ---------------------------------------------------------------------------------------
# bad inputs
# ---------------------------------------------------------------------------------------


def test_bad_inputs_raise_clearly(ext):
    N, K, bs = 8, 64, 32
    packed, absmax = random_nf4(N * K, bs)
    x = torch.randn(2, K)
    mm = nf4_cpu.nf4_matmul_cpp
    dq = nf4_cpu.dequantize_nf4_cpp
    cases = [
        (ValueError, "K .* multiple of blocksize", lambda: mm(x, packed, absmax, CODE, 48, N, K)),
        (RuntimeError, "x has 63 columns", lambda: mm(x[:, :63].contiguous(), packed, absmax, CODE, bs, N, K)),
        (RuntimeError, "float32 or bfloat16", lambda: mm(x.double(), packed, absmax, CODE, bs, N, K)),
        (RuntimeError, "packed has", lambda: mm(x, packed[:-1], absmax, CODE, bs, N, K)),
        (RuntimeError, "absmax has", lambda: mm(x, packed, absmax[:-1], CODE, bs, N, K)),
        (RuntimeError, "absmax must be float32", lambda: mm(x, packed, absmax.half(), CODE, bs, N, K)),
        (RuntimeError, "packed must be uint8", lambda: mm(x, packed.to(torch.int8), absmax, CODE, bs, N, K)),
        (RuntimeError, "16 entries", lambda: mm(x, packed, absmax, CODE[:8], bs, N, K)),
        (RuntimeError, "bias must have shape", lambda: mm(x, packed, absmax, CODE, bs, N, K, torch.zeros(N + 1))),
        (RuntimeError, "2-D", lambda: mm(x[None], packed, absmax, CODE, bs, N, K)),
        (RuntimeError, "contiguous", lambda: dq(packed[::2], absmax, CODE, bs, N * K // 2, torch.float32)),
        (ValueError, "blocksize must be positive", lambda: dq(packed, absmax, CODE, 0, N * K, torch.float32)),
        (ValueError, "out_dtype", lambda: dq(packed, absmax, CODE, bs, N * K, torch.int32)),
    ]
    for exc, match, fn in cases:
        with pytest.raises(exc, match=match):
            fn()


def test_forcing_an_unknown_path_raises(ext, monkeypatch):
    monkeypatch.setenv("FASTFT_NF4_ISA", "neon")
    with pytest.raises(ValueError, match="FASTFT_NF4_ISA"):
        ext.isa()


# ---------------------------------------------------------------------------------------
# loading, JIT build and its fallbacks
# ---------------------------------------------------------------------------------------


def test_ext_reports_the_cpp_ops(ext):
    for op in ("dequantize_nf4", "nf4_matmul"):
        ok, why = _ext.available("cpp", op)
        assert ok, why
    assert "nf4_matmul" in _ext.status()["cpp"]


def _no_aot(**kw):
    return nf4_cpu._Loader(aot_module="fastft._C_cpu_not_there", **kw)


def test_missing_source_warns_once_and_reports_unavailable():
    loader = _no_aot(sources=[os.path.join("/nonexistent", "nf4.cpp")])
    with pytest.warns(RuntimeWarning, match="nf4.cpp not found"):
        ok, why = loader.available()
    assert not ok and "/nonexistent/nf4.cpp" in why
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # remembered: no second warning, no second try
        assert loader.available() == (False, why)


def test_no_jit_env_disables_the_build(monkeypatch):
    monkeypatch.setenv("FASTFT_NO_JIT", "1")
    loader = _no_aot()
    with pytest.warns(RuntimeWarning, match="FASTFT_NO_JIT"):
        ok, why = loader.available()
    assert not ok and "FASTFT_NO_JIT=1" in why


def test_missing_compiler_reported(monkeypatch):
    monkeypatch.setenv("CXX", "no-such-compiler-fastft")
    with pytest.warns(RuntimeWarning, match="no C\\+\\+ compiler"):
        ok, _ = _no_aot().available()
    assert not ok


def test_failed_build_warns_and_falls_back(tmp_path, monkeypatch):
    bad = tmp_path / "nf4.cpp"
    bad.write_text("this is not C++;\n")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))  # keep the real cache clean
    loader = _no_aot(sources=[str(bad)], name="fastft_cpu_nf4_broken_test")
    with pytest.warns(RuntimeWarning, match="JIT build .* failed"):
        ok, why = loader.available()
    assert not ok and "failed" in why


def test_sources_are_found_from_the_package():
    found = [p for p in nf4_cpu.source_candidates() if os.path.isfile(p)]
    assert found, nf4_cpu.source_candidates()


@pytest.mark.slow
def test_a_built_wheel_ships_the_sources_the_jit_build_looks_for(tmp_path):
    """``pip install .`` (not editable) must still be able to build the C++ / CUDA extensions just
    in time: the wheel carries ``fastft/csrc/...`` where ``source_candidates()`` looks first."""
    import subprocess
    import sys
    import zipfile
    from pathlib import Path

    root = Path(nf4_cpu.__file__).resolve().parents[2]
    if not (root / "setup.py").is_file():
        pytest.skip("not a source checkout")
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(root)],
        capture_output=True, text=True, timeout=600, env={**os.environ, "FASTFT_BUILD_EXT": "0"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    (wheel,) = tmp_path.glob("fastft-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    sources = [p for p in (root / "csrc").glob("*/*") if p.suffix in (".cpp", ".cu", ".cuh", ".h")]
    assert {"nf4.cpp", "nf4.cu", "nf4_binding.cpp", "nf4_kernels.cuh", "nf4_launch.h"} <= {p.name for p in sources}
    for p in sources:
        assert f"fastft/{p.relative_to(root).as_posix()}" in names, (p, sorted(n for n in names if "csrc" in n))
    # the loaders look there first when fastft is installed from that wheel
    assert nf4_cpu.source_candidates()[0].replace(os.sep, "/").endswith("fastft/csrc/cpu/nf4.cpp")
    assert "fastft/default/model.safetensors" in names  # the embedded default ships too


@pytest.mark.parametrize(("M", "blocksize"), [(3, 64), (16, 64), (20, 32), (16, 512)])
@pytest.mark.parametrize("double_quant", [False, True])
def test_matmul_long_k_in_chunks_and_row_groups(isa, M, blocksize, double_quant):
    """K long enough that the fused kernel cuts it into chunks (x kept in L1 while a group of
    16 weight rows goes by), N not a multiple of the group, bias, and the double-quantised
    absmax decoded in-kernel: the same as dequantise-then-matmul."""
    from fastft.ops.nf4 import nf4_matmul_reference, prepare_state, quantize_nf4

    N, K = 37, 4096
    g = torch.Generator().manual_seed(M)
    packed, state = quantize_nf4(torch.randn(N, K, generator=g) * 0.05, blocksize=blocksize, double_quant=double_quant)
    prep = prepare_state(state)
    x = torch.randn(M, K, generator=g)
    bias = torch.randn(N, generator=g)
    y = nf4_cpu.nf4_matmul_cpp(x, packed, prep.absmax, prep.code, blocksize, N, K, bias, **prep.nested)
    ref = nf4_matmul_reference(x, packed, state, bias)
    err = (y - ref).abs().max().item() / ref.abs().max().item()
    assert err <= TOL[torch.float32], f"{isa} M={M} bs={blocksize}: relative error {err:.2e}"
