"""Shared pieces of bench_nf4's sections: seeded inputs, per-call timing, bitsandbytes probing."""

from __future__ import annotations

import itertools
import math
import warnings

import _harness as H

QLORA_PROVIDERS = ("fastft", "peft-bnb", "dense")
# informational agreement thresholds on max|diff| / max|reference| (the bench never fails on them)
TOLERANCE = {"fp32": 1e-4, "bf16": 2e-2}

Skip = H.Skip


def _randn(g, *shape, scale, dtype, device):
    """Drawn on the CPU (the same values on every device), then moved."""
    import torch

    return torch.randn(*shape, generator=g).mul_(scale).to(device=device, dtype=dtype)


def _gen(seed: int):
    import torch

    g = torch.Generator(device="cpu")
    g.manual_seed(seed)
    return g


def _state_bytes(packed, state) -> int:
    """Bytes of the NF4 representation a kernel reads: packed codes and the statistics."""
    n = packed.numel() * packed.element_size()
    for t in (state.absmax, state.code, state.offset, state.absmax2, state.code2):
        if t is not None:
            n += t.numel() * t.element_size()
    return n


def _copies(cfg: dict, nbytes: int) -> int:
    """How many copies of a weight of ``nbytes`` to cycle through (see ``--rotate-mib``)."""
    if cfg["rotate_mib"] <= 0 or nbytes <= 0:
        return 1
    return max(1, min(64, math.ceil(cfg["rotate_mib"] * 2**20 / nbytes)))


def _time(calls: list, cfg: dict, dev: str, inner: int | None = None) -> dict:
    """``H.time_fn`` over ``inner`` calls per repetition cycling through ``calls``; per-call ms."""
    inner = cfg["inner"] if inner is None else inner
    it = itertools.cycle(calls)

    def run():
        for _ in range(inner):
            next(it)()

    t = H.time_fn(run, cfg["warmup"], cfg["reps"], device=dev)
    for k in ("median_ms", "p20_ms", "p80_ms", "min_ms"):
        t[k] /= inner
    t["times_ms"] = [v / inner for v in t["times_ms"]]
    t["inner"] = inner
    t["copies"] = len(calls)
    return t


_BNB: dict = {}


def bnb_modules():
    """``(bitsandbytes, bitsandbytes.functional)``, or raise :class:`Skip` with the reason."""
    if "err" in _BNB:
        raise Skip(_BNB["err"])
    if "mods" not in _BNB:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                import bitsandbytes
                import bitsandbytes.functional as bnbF
            _BNB["mods"] = (bitsandbytes, bnbF)
        except Exception as exc:
            _BNB["err"] = f"bitsandbytes not importable ({type(exc).__name__}: {exc})"
            raise Skip(_BNB["err"]) from None
    return _BNB["mods"]


def bnb_version() -> str | None:
    try:
        return bnb_modules()[0].__version__
    except Skip:
        return None


def _probe_bnb(dev: str, dtype) -> None:
    """Run bnb's dequant / matmul once on a tiny weight: bnb may import but not run on this device."""
    import torch

    from fastft.ops import quantize_nf4

    bnb, bnbF = bnb_modules()
    key = ("probe", dev, dtype)
    if key in _BNB:
        if _BNB[key]:
            raise Skip(_BNB[key])
        return
    try:
        packed, state = quantize_nf4(torch.randn(64, 128, device=dev, dtype=dtype), blocksize=64)
        bnbF.dequantize_4bit(packed, state.to_bnb())
        bnb.matmul_4bit(torch.randn(2, 128, device=dev, dtype=dtype), packed.t(), state.to_bnb())
        _BNB[key] = ""
    except Exception as exc:
        _BNB[key] = f"bitsandbytes cannot run on {dev} ({type(exc).__name__}: {str(exc)[:200]})"
        raise Skip(_BNB[key]) from None


def _backend(op: str, dev: str, want: str) -> str:
    from fastft import backends

    try:
        c = backends.select(op, dev, want)
        return c.backend
    except Exception as exc:
        raise Skip(f"fastft backend {want!r} unavailable: {exc}") from None
