"""Shared test setup.

``TRITON_INTERPRET=1`` must be in the environment before triton is imported (triton
reads it when a kernel is defined), so it is set here, at the very top: Triton kernels
then run on CPU tensors in the interpreter whenever ``backend="triton"`` is forced.

On a GPU machine, ``FASTFT_GPU_TESTS=1 python -m pytest tests/test_gpu.py`` leaves the
interpreter off so the same kernels compile and run on the device (tests/test_gpu.py).
"""

import os

if os.environ.get("FASTFT_GPU_TESTS", "0") != "1":
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(0)
