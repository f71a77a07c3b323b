"""Build hook for fastft's optional compiled extensions.

``pip install .`` always installs the pure-Python package: Triton kernels compile
at run time and the torch reference runs everywhere. Compiled extensions are
built ahead of time only when asked:

    FASTFT_BUILD_EXT=1 pip install --no-build-isolation .

which compiles ``csrc/cpu/*.cpp`` into ``fastft._C_cpu`` and, when nvcc and a CUDA
build of torch are present, ``csrc/cuda/*.cu`` and ``*.cpp`` into ``fastft._C_cuda``. Otherwise
:mod:`fastft._ext` finds them missing, the ops fall back, and ``fastft info`` says
why. Nothing here probes the hardware.
"""

import glob
import os

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _ext_modules():
    if os.environ.get("FASTFT_BUILD_EXT", "0") != "1":
        return [], {}
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    mods = []
    cpu_src = sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    if cpu_src:
        mods.append(
            CppExtension("fastft._C_cpu", cpu_src, extra_compile_args=["-O3", "-fopenmp"], extra_link_args=["-fopenmp"])
        )
    # the kernels (*.cu, nvcc) and their torch binding (*.cpp, the host compiler)
    cuda_src = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")) + glob.glob(os.path.join("csrc", "cuda", "*.cpp")))
    if cuda_src and torch.version.cuda and CUDA_HOME:
        mods.append(CUDAExtension("fastft._C_cuda", cuda_src, extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3"]}))
    return mods, {"build_ext": BuildExtension}


ext_modules, cmdclass = _ext_modules()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
