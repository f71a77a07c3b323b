"""Finds, loads and (later) JIT-builds fastft's compiled extensions.

Compiled code is optional: ``import fastft`` never fails because an extension is
missing or broken. Each extension declares which ops it implements; the first
time an op asks for it, we try to import the ahead-of-time build
(``fastft._C_cpu`` / ``fastft._C_cuda``, made by ``setup.py`` when
``FASTFT_BUILD_EXT=1``) and remember why it is missing if it is.

Ops whose C++ sources can also be built just in time (torch.utils.cpp_extension +
ninja) name a provider module in ``_JIT_PROVIDERS``: for those, :func:`available`
delegates to the provider's ``available()``, which tries ``fastft._C_cpu`` first,
then builds lazily on that first call (never at ``import fastft``), warns once if it
cannot, and remembers why. ``FASTFT_NO_JIT=1`` disables JIT builds.
"""

from __future__ import annotations

import importlib
import warnings
from dataclasses import dataclass, field

# backend -> (module name, ops it implements).
_EXTENSIONS: dict[str, tuple[str, frozenset[str]]] = {
    "cpp": ("fastft._C_cpu", frozenset({"dequantize_nf4", "nf4_matmul"})),
    "cuda": ("fastft._C_cuda", frozenset({"dequantize_nf4", "nf4_matmul"})),
}


# (backend, op) -> module (imported lazily) whose ``available()`` loads the AOT build or
# JIT-builds the sources, returning (ok, reason).
_JIT_PROVIDERS: dict[tuple[str, str], str] = {
    ("cpp", "dequantize_nf4"): "fastft.kernels.nf4_cpu",
    ("cpp", "nf4_matmul"): "fastft.kernels.nf4_cpu",
    # fastft._C_cuda or a JIT build of csrc/cuda/nf4.cu; never tried on a CPU build of torch
    ("cuda", "dequantize_nf4"): "fastft.kernels.nf4_cuda",
    ("cuda", "nf4_matmul"): "fastft.kernels.nf4_cuda",
}


def _provider(backend: str, op: str):
    name = _JIT_PROVIDERS.get((backend, op))
    return None if name is None else importlib.import_module(name)


@dataclass
class _State:
    module: object | None = None
    reason: str = ""
    tried: bool = False
    warned: set = field(default_factory=set)


_STATE: dict[str, _State] = {b: _State() for b in _EXTENSIONS}


def _load(backend: str) -> _State:
    st = _STATE[backend]
    if st.tried:
        return st
    st.tried = True
    name, _ = _EXTENSIONS[backend]
    try:
        st.module = importlib.import_module(name)
        st.reason = f"{name} loaded"
    except Exception as exc:  # never let a broken build break import
        st.module = None
        st.reason = f"{name} is not built ({type(exc).__name__}: {exc})"
    return st


def available(backend: str, op: str) -> tuple[bool, str]:
    """Can the compiled ``backend`` ('cpp' or 'cuda') run ``op``? Returns (ok, reason)."""
    if backend not in _EXTENSIONS:
        return False, f"no compiled backend named {backend!r}"
    _, ops = _EXTENSIONS[backend]
    if op not in ops:
        return False, f"no {backend} extension implements {op} in this version"
    prov = _provider(backend, op)
    if prov is not None:  # AOT module or JIT build; the provider warns once itself
        return prov.available()
    st = _load(backend)
    if st.module is None:
        if op not in st.warned:
            st.warned.add(op)
            warnings.warn(f"fastft: {st.reason}; {op} falls back", RuntimeWarning, stacklevel=3)
        return False, st.reason
    return True, st.reason


def module(backend: str):
    return _load(backend).module


def status() -> dict[str, str]:
    """Why each compiled backend is, or is not, usable (for ``fastft info``)."""
    out = {}
    for backend, (_name, ops) in _EXTENSIONS.items():
        if not ops:
            out[backend] = "no op uses it in this version"
            continue
        reasons = {}
        for op in sorted(ops):
            prov = _provider(backend, op)
            why = prov.available()[1] if prov is not None else _load(backend).reason
            reasons.setdefault(why, []).append(op)
        out[backend] = "; ".join(f"{', '.join(o)}: {why}" for why, o in reasons.items())
    return out
