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
import shutil

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCE_PATTERNS = ("*.cpp", "*.cu", "*.cuh", "*.h")


class BuildPyWithSources(build_py):
    """Also copy ``csrc/`` into the package (``fastft/csrc/``), so that an installed wheel can
    build its C++ / CUDA extensions just in time, as a source checkout does. An editable
    install reads ``<checkout>/csrc`` directly."""

    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return
        shutil.rmtree(os.path.join(self.build_lib, "fastft", "csrc"), ignore_errors=True)  # no stale sources
        for pattern in SOURCE_PATTERNS:
            for src in sorted(glob.glob(os.path.join(HERE, "csrc", "*", pattern))):
                rel = os.path.relpath(src, HERE)
                dst = os.path.join(self.build_lib, "fastft", rel)
                self.mkpath(os.path.dirname(dst))
                self.copy_file(src, dst)


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
    cuda_src = sorted(
        glob.glob(os.path.join("csrc", "cuda", "*.cu")) + glob.glob(os.path.join("csrc", "cuda", "*.cpp"))
    )
    if cuda_src and torch.version.cuda and CUDA_HOME:
        mods.append(CUDAExtension("fastft._C_cuda", cuda_src, extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3"]}))
    return mods, {"build_ext": BuildExtension}


ext_modules, cmdclass = _ext_modules()
setup(ext_modules=ext_modules, cmdclass={**cmdclass, "build_py": BuildPyWithSources})
