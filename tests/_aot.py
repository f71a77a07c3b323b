"""Run a Triton ahead-of-time compile script for a GPU target in a fresh process (no GPU needed).

A fresh process because this one has TRITON_INTERPRET=1 (set by conftest.py), so its
kernels are already defined as interpreted. The script prints "OK" when every kernel
compiled, or "SKIP <reason>" when this Triton install cannot compile for the target.

FASTFT_AOT_TRITON=DIR runs the scripts against another Triton, installed apart from this
environment (``pip install --no-deps --target DIR triton==3.6.0``): DIR goes first on the
script's PYTHONPATH.
"""

import os
import pathlib
import subprocess
import sys

import pytest


def run_compile_script(script: str, timeout: int = 600) -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # silence triton 3.9's notice; fusion on is the default anyway
    root = str(pathlib.Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [env.get("FASTFT_AOT_TRITON"), root, env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    if proc.stdout.startswith("SKIP"):  # pragma: no cover - depends on the Triton install
        pytest.skip(proc.stdout.strip())
    assert proc.stdout.strip().endswith("OK"), proc.stdout
