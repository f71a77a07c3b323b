"""Which implementation runs for an op, and why.

Every op in :mod:`fastft.ops` asks :func:`select` which backend to use for the
tensors at hand. The answer depends on three things only:

* what the caller asked for: ``backend=`` on the call, else the ``FASTFT_BACKEND``
  environment variable, else ``"auto"``;
* what the op implements (``register`` below; the ops declare it at import);
* what this process can run: a CUDA tensor and an importable Triton for
  ``triton`` (or ``TRITON_INTERPRET=1`` when ``triton`` is forced on CPU tensors),
  a built extension for ``cuda`` / ``cpp`` (see :mod:`fastft._ext`), anything for
  ``torch`` (the pure-PyTorch reference).

``"auto"`` takes the first runnable backend in the op's preference order and
falls back quietly; a forced backend that cannot run raises
:class:`BackendUnavailable` with the reason, before any kernel is launched.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

BACKENDS = ("triton", "cuda", "cpp", "torch")
_VALID = BACKENDS + ("auto",)


class BackendUnavailable(RuntimeError):
    """A backend was forced (argument or ``FASTFT_BACKEND``) but cannot run here."""


@dataclass(frozen=True)
class Choice:
    backend: str
    reason: str


# op name -> backends it implements, in order of preference for "auto"
_REGISTRY: dict[str, tuple[str, ...]] = {}


def register(op: str, backends: tuple[str, ...]) -> None:
    for b in backends:
        if b not in BACKENDS:
            raise ValueError(f"unknown backend {b!r} for op {op!r}")
    _REGISTRY[op] = tuple(backends)


def registered_ops() -> dict[str, tuple[str, ...]]:
    return dict(_REGISTRY)


def interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.cache
def triton_importable() -> tuple[bool, str]:
    if importlib.util.find_spec("triton") is None:
        return False, "triton is not installed"
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as exc:  # broken install: report, never fail import fastft
        return False, f"triton failed to import: {type(exc).__name__}: {exc}"
    return True, "triton importable"


def _can_run(backend: str, op: str, device: torch.device, forced: bool) -> tuple[bool, str]:
    """Can ``backend`` run ``op`` on ``device``? Returns (ok, reason)."""
    if backend == "torch":
        return True, "pure-PyTorch reference (runs everywhere)"
    if backend == "triton":
        ok, why = triton_importable()
        if not ok:
            return False, why
        if device.type == "cuda":
            return True, "CUDA tensor and triton available"
        if interpreting():
            if forced:
                return True, "TRITON_INTERPRET=1: Triton kernels run in the CPU interpreter"
            return False, "TRITON_INTERPRET=1 runs Triton on CPU only when backend='triton' is forced"
        return False, f"Triton kernels need CUDA tensors (got {device.type}; set TRITON_INTERPRET=1 to interpret)"
    if backend in ("cuda", "cpp"):
        from . import _ext

        want = "cuda" if backend == "cuda" else "cpu"
        if device.type != want:
            return False, f"the {backend} extension runs on {want} tensors (got {device.type})"
        return _ext.available(backend, op)
    return False, f"unknown backend {backend!r}"


def requested(backend: str | None) -> str:
    """The backend asked for: the argument, else FASTFT_BACKEND, else 'auto'."""
    if backend is None or backend == "auto":
        env = os.environ.get("FASTFT_BACKEND", "").strip().lower()
        backend = env or "auto"
        source = "FASTFT_BACKEND"
    else:
        source = "backend="
    if backend not in _VALID:
        raise ValueError(f"{source} must be one of {_VALID}, got {backend!r}")
    return backend


def select(op: str, device: torch.device | str, backend: str | None = "auto") -> Choice:
    """Pick the backend that runs ``op`` for tensors on ``device``.

    Raises :class:`BackendUnavailable` when a forced backend cannot run, and
    ``ValueError`` for a backend name that does not exist.
    """
    device = torch.device(device)
    want = requested(backend)
    impls = _REGISTRY.get(op)
    if impls is None:
        raise KeyError(f"op {op!r} is not registered with fastft.backends")
    if want != "auto":
        if want not in impls:
            raise BackendUnavailable(f"{op}: backend {want!r} is not implemented (available: {', '.join(impls)})")
        ok, why = _can_run(want, op, device, forced=True)
        if not ok:
            raise BackendUnavailable(f"{op}: backend {want!r} was requested but cannot run: {why}")
        return Choice(want, f"forced; {why}")
    skipped = []
    for b in impls:
        ok, why = _can_run(b, op, device, forced=False)
        if ok:
            if skipped:
                why = f"{why} [not {'; not '.join(skipped)}]"
            return Choice(b, why)
        skipped.append(f"{b}: {why}")
    raise BackendUnavailable(f"{op}: no backend can run on {device}: {'; '.join(skipped)}")  # pragma: no cover


def check_forced(op: str, device: torch.device | str, backend: str | None) -> Choice:
    """Same as :func:`select`; named for call sites that only validate (e.g. at patch time)."""
    return select(op, device, backend)


def dispatch(op: str, impls: dict[str, Callable], device, backend: str | None = "auto"):
    """Return the implementation chosen for ``op`` among ``impls`` (backend -> callable)."""
    choice = select(op, device, backend)
    return impls[choice.backend], choice


# --------------------------------------------------------------------------------------
# under torch.compile: trace the reference where it is what would run
# --------------------------------------------------------------------------------------
@torch.compiler.assume_constant_result
def _reference_where_auto(op: str, device_type: str, backend: str) -> bool:
    """Whether ``op`` with ``backend`` would run its pure-PyTorch reference on ``device_type``
    (evaluated once at trace time: a constant of the graph)."""
    if os.environ.get("FASTFT_COMPILE_OPAQUE", "0") not in ("", "0"):
        return False
    if requested(backend) != "auto":
        return False
    return select(op, torch.device(device_type), "auto").backend == "torch"


def traces_reference(op: str, device: torch.device, backend: str | None = "auto") -> bool:
    """True while torch.compile traces a call of ``op`` that would run the pure-PyTorch reference.

    An operator whose code is the eager reference is opaque to inductor: its elementwise work
    runs unfused, kernel by kernel (on a CPU, a patched Llama step ran ~560 such kernels that
    inductor fuses in the unpatched model). So under tracing, where ``backend`` is ``"auto"``
    (the argument and ``FASTFT_BACKEND``) and no Triton / C++ kernel would run on this device,
    the elementwise ops (``rms_norm``, ``swiglu`` / ``geglu``, ``rope``, ``lora_linear`` without
    dropout) emit their reference as plain PyTorch instead of the ``torch.ops.fastft`` node, and
    inductor fuses it with its neighbours (forward and the derived backward). Where a kernel runs
    (CUDA tensors), or a backend is forced, or ``FASTFT_COMPILE_OPAQUE=1``, the operator stays.
    The decision is a constant of the compiled graph: set the environment before compiling.
    Eager calls are never affected."""
    return torch.compiler.is_compiling() and _reference_where_auto(op, torch.device(device).type, backend or "auto")
