"""Load, or build just in time, one compiled extension; remember the outcome and why.

Shared by the C++ CPU (:mod:`fastft.kernels.nf4_cpu`) and CUDA (:mod:`fastft.kernels.nf4_cuda`)
loaders. Order: the ahead-of-time build made by ``setup.py`` (``FASTFT_BUILD_EXT=1``), then a
``torch.utils.cpp_extension.load`` build of the sources (cached by torch in
``TORCH_EXTENSIONS_DIR``), unless ``FASTFT_NO_JIT=1``. Any failure warns once
(``RuntimeWarning`` with the reason) and is remembered; nothing here ever raises.
Subclasses say where the sources are and what a build needs (:meth:`ExtensionLoader.prepare`).
"""

from __future__ import annotations

import importlib
import os
import sys
import threading
import warnings

PKG_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # .../fastft


def source_candidates(*parts: str) -> list[str]:
    """Where a source file is looked for, in order: package data, then a source checkout."""
    return [os.path.join(PKG_DIR, "csrc", *parts), os.path.join(os.path.dirname(PKG_DIR), "csrc", *parts)]


def first_line(exc: BaseException, limit: int = 300) -> str:
    """The useful line of a build error: the first mentioning "error", else the last."""
    text = str(exc).strip().splitlines()
    msg = text[-1] if text else ""
    for line in text:
        if "error" in line.lower():
            msg = line.strip()
            break
    return f"{type(exc).__name__}: {msg[:limit]}"


class ExtensionLoader:
    """One extension: ``aot_module`` if built, else a JIT build named ``name`` from ``sources``."""

    label = "compiled kernels"  # for messages, e.g. "C++ NF4 kernels"
    symbols: tuple[str, ...] = ()  # what the module must export
    default_sources: tuple[str, ...] = ()  # path parts under csrc/, e.g. ("cpu", "nf4.cpp")

    def __init__(self, sources: list[str] | None = None, aot_module: str = "", name: str = ""):
        self.sources = sources  # None: source_candidates(*default_sources)
        self.aot_module = aot_module
        self.name = name
        self.module = None
        self.reason = "not loaded yet (loads or builds on first use)"
        self.tried = False
        self.warned = False
        self._lock = threading.Lock()

    # --- hooks ---------------------------------------------------------------------------
    def precondition(self) -> str | None:
        """Why nothing should even be tried here (None: go ahead). Cheap; never builds."""
        return None

    def prepare(self, src: str) -> tuple[dict | None, str]:
        """Build keywords for ``cpp_extension.load`` (besides name and sources; ``extra_sources``
        lists files compiled with ``src``), or (None, why not)."""
        return {}, ""

    # --- the machinery -------------------------------------------------------------------
    def candidates(self) -> list[str]:
        return source_candidates(*self.default_sources) if self.sources is None else list(self.sources)

    def _aot(self):
        try:
            mod = importlib.import_module(self.aot_module)
        except Exception as exc:  # not built (the usual case) or broken
            return None, f"{self.aot_module} is not built ({type(exc).__name__})"
        missing = [s for s in self.symbols if not hasattr(mod, s)]
        if missing:
            return None, f"{self.aot_module} lacks the {self.label} ({', '.join(missing)})"
        return mod, f"{self.aot_module} loaded"

    def _jit(self):
        if os.environ.get("FASTFT_NO_JIT", "0") not in ("", "0"):
            return None, "FASTFT_NO_JIT=1 disables the JIT build"
        candidates = self.candidates()
        src = next((p for p in candidates if os.path.isfile(p)), None)
        if src is None:
            what = os.path.basename(candidates[0]) if candidates else "the source"
            return None, f"{what} not found for the JIT build (looked in {', '.join(candidates)})"
        kwargs, why = self.prepare(src)
        if kwargs is None:
            return None, why
        sources = [src, *kwargs.pop("extra_sources", ())]
        from torch.utils import cpp_extension

        try:
            cpp_extension.verify_ninja_availability()
        except Exception:
            return None, "ninja is not installed (pip install ninja)"
        try:  # say so when this is a real compile, not a cache hit: it takes a while
            build_dir = cpp_extension._get_build_directory(self.name, False)
            cached = os.path.exists(os.path.join(build_dir, f"{self.name}.so"))
        except Exception:
            cached = False
        if not cached:
            print(f"fastft: compiling the {self.label} (first use only; cached afterwards)...", file=sys.stderr)
        try:
            mod = cpp_extension.load(name=self.name, sources=sources, verbose=False, **kwargs)
        except Exception as exc:  # compile/link error, unwritable cache, ...
            return None, f"JIT build of {src} failed ({first_line(exc)})"
        return mod, f"JIT-built {self.name} from {src}"

    def load(self):
        if self.precondition() is not None:
            return None
        with self._lock:
            if self.tried:
                return self.module
            self.tried = True
            mod, why = self._aot()
            if mod is None:
                mod, jit_why = self._jit()
                why = f"{why}; {jit_why}"
            self.module, self.reason = mod, why
            if mod is None and not self.warned:
                self.warned = True
                warnings.warn(f"fastft: {self.label} unavailable: {why}", RuntimeWarning, stacklevel=4)
            return mod

    def available(self) -> tuple[bool, str]:
        pre = self.precondition()
        if pre is not None:
            return False, pre
        return self.load() is not None, self.reason

    def require(self):
        """The loaded module, or RuntimeError with the reason."""
        mod = self.load()
        if mod is None:
            raise RuntimeError(f"fastft: {self.label} unavailable: {self.available()[1]}")
        return mod
