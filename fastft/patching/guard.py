"""The one rule every swapped forward follows: a swapped module never fails where the original would not.

Each patched forward (norms, MLP, RoPE, LoRA, NF4, loss) is a :class:`GuardedForward`.
Per call it checks the cheap conditions its fused op relies on (shapes, dtypes, extra
arguments); a call that does not fit runs the module's original forward, and the call is
counted in ``report.fallbacks`` with the reason. Under ``backend="auto"`` an input
error the fused op raises itself (``ValueError`` / ``TypeError``, always raised before
any kernel launches) also falls back, counted the same way; a *forced* backend raises
instead, as an explicitly requested backend must.
"""

from __future__ import annotations

import warnings


class GuardedForward:
    """Base of the patched forwards: the original forward, the report, and the fallback rule."""

    feature = "?"

    def __init__(self, original, backend: str, *, target: str = "", report=None):
        self.original = original
        self.backend = backend
        self.target = target
        self.report = report
        self.__wrapped__ = original  # inspect.signature(module.forward) keeps the real parameters
        self._warned = False

    @property
    def forced(self) -> bool:
        return self.backend != "auto"

    def count(self, reason: str) -> None:
        """Count one call that ran an original function instead of the fused op, and why."""
        if self.report is not None:
            self.report.fallback(self.feature, self.target, reason)

    def fall_back(self, reason: str, *args, **kwargs):
        """Run the original forward for this call, counting it (and why) in the report."""
        self.count(reason)
        return self.original(*args, **kwargs)

    def fused_or_fall_back(self, fused, args, kwargs):
        """``fused()``, or - when it rejects its input under ``backend="auto"`` - the original forward."""
        try:
            return fused()
        except (ValueError, TypeError) as exc:
            if self.forced:
                raise
            if not self._warned:
                self._warned = True
                warnings.warn(
                    f"fastft: {self.feature} at {self.target or '?'}: the fused op rejected a call "
                    f"({type(exc).__name__}: {exc}); running the original forward for such calls",
                    stacklevel=3,
                )
            return self.fall_back(
                f"fused op rejected the input ({type(exc).__name__}: {one_line(exc)})", *args, **kwargs
            )


def one_line(exc: BaseException, n: int = 120) -> str:
    """An exception's message on one line, cut to ``n`` characters (for warnings and the report)."""
    s = " ".join(str(exc).split())
    return s if len(s) <= n else s[: n - 3] + "..."
