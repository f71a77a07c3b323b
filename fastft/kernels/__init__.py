"""Triton kernels and their launchers, one file per op.

Importing a file here imports triton: only :mod:`fastft.ops` does so, lazily, once
:mod:`fastft.backends` has chosen the ``triton`` backend.
"""
