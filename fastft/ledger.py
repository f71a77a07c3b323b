"""A traffic ledger: what a callable launches, allocates, converts, saves and moves, counted on a CPU.

GPU time is scarce; a design claim such as "no full-size upcast", "``x`` saved once" or
"one launch per call" can still be checked without one. :class:`Ledger` runs code under a
``TorchDispatchMode`` (every aten op the dispatcher sees, forward and backward) and a
``saved_tensors_hooks`` pair (every tensor autograd keeps for backward), and records:

* **launches** - aten ops that do work (views, metadata ops and bare allocations are not
  launches); a fastft ``torch.library`` operator (``fastft::...``) counts as one launch with its
  input and output bytes, and so does a fastft custom kernel (a Triton launch, a C++ extension
  call) whose launcher wraps the call in :func:`record_kernel` (the aten ops inside either are
  not counted);
* **temporaries** - outputs of at least ``min_numel`` elements (the "full-size" ones at the
  shapes of a test: pass the activation size), with shape and dtype;
* **conversions** - dtype changes (``_to_copy`` / ``copy_`` across dtypes) with their sizes;
* **bytes moved** - per launch, the bytes of its tensor inputs plus its outputs (an in-place
  op reads and writes its destination): the torch-level traffic, an upper bound on what the
  hardware moves (caches not modelled);
* **saved** - each tensor packed for backward, with the storage it lives in, so a test can tell
  "saved three times" from "saved once".

It runs on CPU tensors at small shapes or on ``meta`` tensors at the GPU bench's shapes (no
memory, no compute: the torch-level counts are the same; a Triton launcher skips the launch
on meta tensors when :func:`record_kernel` says so). Usage::

    with Ledger(min_numel=N * in_f) as led:
        y = op(x); y.backward(dy)
    print(led.table())
    assert not led.conversions_at_least(N * in_f)
"""

from __future__ import annotations

import contextlib
import math
import threading
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

__all__ = ["Ledger", "record_kernel", "active_ledger", "Launch", "Tensor"]

_aten = torch.ops.aten
# ops that allocate or describe but compute nothing: not launches (their outputs may still be temporaries)
_NOT_LAUNCHES = {
    _aten.empty.memory_format,
    _aten.empty_strided.default,
    _aten.empty_like.default,
    _aten.new_empty.default,
    _aten.new_empty_strided.default,
    _aten.detach.default,
    _aten.lift_fresh.default,
    _aten.alias.default,
    _aten.set_.source_Storage_storage_offset,
    _aten._local_scalar_dense.default,
    _aten.is_same_size.default,
    _aten.sym_size.int,
    _aten.sym_stride.int,
    _aten.sym_numel.default,
    _aten.sym_storage_offset.default,
}
_ALLOCS = {
    _aten.empty.memory_format,
    _aten.empty_strided.default,
    _aten.empty_like.default,
    _aten.new_empty.default,
    _aten.new_empty_strided.default,
}
_TLS = threading.local()


@dataclass(frozen=True)
class Tensor:
    """A tensor as the ledger records it."""

    shape: tuple
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize

    def __str__(self):
        return f"{str(self.dtype).replace('torch.', '')}{list(self.shape)}"


def _t(x: torch.Tensor) -> Tensor:
    return Tensor(tuple(x.shape), x.dtype)


def _nbytes(x: torch.Tensor) -> int:
    return x.numel() * x.element_size()


@dataclass
class Launch:
    """One launched op: an aten op or a recorded fastft kernel."""

    name: str
    inputs: list
    outputs: list
    section: str
    kernel: bool = False  # a fastft custom kernel recorded by :func:`record_kernel`

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.inputs) + sum(t.nbytes for t in self.outputs)


@dataclass
class Conversion:
    src: Tensor
    dst: Tensor
    section: str

    def __str__(self):
        return f"{self.src} -> {str(self.dst.dtype).replace('torch.', '')} ({self.src.nbytes + self.dst.nbytes} B)"


@dataclass
class Saved:
    tensor: Tensor
    storage: object  # a key equal for tensors sharing memory (data pointer; object identity on meta)
    section: str


def _storage_key(x: torch.Tensor):
    if x.device.type == "meta":
        base = x._base if x._base is not None else x
        return ("meta", id(base))
    try:
        return (x.device.type, x.untyped_storage().data_ptr())
    except Exception:  # tensor subclasses without storage
        return ("id", id(x))


class _Mode(TorchDispatchMode):
    def __init__(self, ledger: Ledger):
        super().__init__()
        self.ledger = ledger

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        led = self.ledger
        if getattr(func, "namespace", None) == "fastft":
            if led.inside:  # look inside: run the operator's implementation with this mode on again
                from torch._library.custom_ops import OPDEFS

                with self:
                    return OPDEFS[func._schema.name]._init_fn(*args, **kwargs)
            # a fastft torch.library operator is one kernel: what runs inside it is not counted
            led._quiet += 1
            try:
                out = func(*args, **kwargs)
            finally:
                led._quiet -= 1
            if not led._quiet:
                ins = [a for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)]
                outs = [o for o in tree_flatten(out)[0] if isinstance(o, torch.Tensor) and o.numel()]
                led._kernel(func._opname, ins, outs)
            return out
        out = func(*args, **kwargs)
        if led._quiet:
            return out
        led._on_op(func, args, kwargs, out)
        return out


@dataclass
class Ledger:
    """Record the launches, temporaries, conversions, traffic and saved tensors of the code run inside.

    ``min_numel``: outputs with at least this many elements are listed as temporaries
    (0 lists every output). ``inside=True`` records what fastft operators run inside them
    instead of one launch each. Use :meth:`section` to label forward / backward.
    """

    min_numel: int = 1 << 16
    # False: a fastft torch.library operator is one launch; True: what its implementation runs is
    # recorded instead (the aten ops and kernels inside), to check an operator's own design
    inside: bool = False
    launches: list = field(default_factory=list)
    temporaries: list = field(default_factory=list)  # (op name, Tensor, section)
    conversions: list = field(default_factory=list)
    saved: list = field(default_factory=list)
    _section: str = "main"
    _quiet: int = 0

    def __post_init__(self):
        if isinstance(self.min_numel, bool) or not isinstance(self.min_numel, int) or self.min_numel < 0:
            raise ValueError(f"min_numel must be an int >= 0, got {self.min_numel!r}")
        self._stack = contextlib.ExitStack()

    # -- running -------------------------------------------------------------------------
    def __enter__(self):
        stack = self._stack
        stack.enter_context(torch.autograd.graph.saved_tensors_hooks(self._pack, lambda x: x))
        stack.enter_context(_Mode(self))
        prev = getattr(_TLS, "ledger", None)
        _TLS.ledger = self
        stack.callback(setattr, _TLS, "ledger", prev)
        return self

    def __exit__(self, *exc):
        self._stack.close()
        self._stack = contextlib.ExitStack()
        return False

    @contextlib.contextmanager
    def section(self, name: str):
        """Label what runs inside (e.g. ``"forward"``, ``"backward"``)."""
        prev, self._section = self._section, name
        try:
            yield self
        finally:
            self._section = prev

    def _pack(self, x):
        if isinstance(x, torch.Tensor):
            self.saved.append(Saved(_t(x), _storage_key(x), self._section))
        return x

    def _on_op(self, func, args, kwargs, out) -> None:
        ins = [a for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)]
        outs = [o for o in tree_flatten(out)[0] if isinstance(o, torch.Tensor)]
        name = str(func.overloadpacket.__name__) if hasattr(func, "overloadpacket") else str(func)
        is_view = bool(getattr(func, "is_view", False))
        # below autograd (inside an operator) ``Tensor.to`` arrives as aten.to, not decomposed yet
        if (func in (_aten._to_copy.default, _aten.copy_.default) or name == "to") and outs and ins:
            src = ins[1] if func is _aten.copy_.default else ins[0]
            dst = outs[0]
            if src.dtype != dst.dtype:
                self.conversions.append(Conversion(_t(src), _t(dst), self._section))
        if name == "to" and outs and ins and outs[0].dtype == ins[0].dtype and outs[0].device == ins[0].device:
            return  # a no-op .to(): the tensor itself
        if is_view or func in _NOT_LAUNCHES:
            if func in _ALLOCS:
                for o in outs:
                    self._temporary(name, o)
            return
        self.launches.append(Launch(name, [_t(a) for a in ins], [_t(o) for o in outs], self._section))
        inplace = name.endswith("_") or "out" in kwargs
        if not inplace:
            for o in outs:
                self._temporary(name, o)

    def _temporary(self, name, o: torch.Tensor) -> None:
        if o.numel() >= self.min_numel and o.numel() > 0:
            self.temporaries.append((name, _t(o), self._section))

    def _kernel(self, name, inputs, outputs) -> None:
        self.launches.append(
            Launch(name, [_t(t) for t in inputs if t is not None], [_t(t) for t in outputs if t is not None],
                   self._section, kernel=True)
        )  # fmt: skip

    # -- reading -------------------------------------------------------------------------
    def _in(self, rows, section):
        return [r for r in rows if section is None or (r[2] if isinstance(r, tuple) else r.section) == section]

    def launch_count(self, section: str | None = None) -> int:
        return len(self._in(self.launches, section))

    def bytes_moved(self, section: str | None = None) -> int:
        return sum(x.nbytes for x in self._in(self.launches, section))

    def ops(self, section: str | None = None) -> list[str]:
        """Names of the launches, in order (fastft kernels prefixed ``fastft::``)."""
        return [("fastft::" if x.kernel else "") + x.name for x in self._in(self.launches, section)]

    def conversions_at_least(self, numel: int, section: str | None = None) -> list:
        """Dtype conversions of tensors with at least ``numel`` elements."""
        return [c for c in self._in(self.conversions, section) if c.src.numel >= numel]

    def temporaries_of(self, shape, section: str | None = None) -> list:
        """Temporaries of exactly ``shape`` (any dtype)."""
        return [t for t in self._in(self.temporaries, section) if t[1].shape == tuple(shape)]

    def saved_of(self, shape) -> list:
        """Saved-for-backward entries whose shape is ``shape``."""
        return [s for s in self.saved if s.tensor.shape == tuple(shape)]

    def saved_bytes(self) -> int:
        """Bytes kept for backward, each storage counted once."""
        seen = {}
        for s in self.saved:
            seen[s.storage] = max(seen.get(s.storage, 0), s.tensor.nbytes)
        return sum(seen.values())

    def summary(self, section: str | None = None) -> dict:
        """The counts as a JSON-able dict (the bench writes it beside its timings)."""
        conv = self._in(self.conversions, section)
        temps = self._in(self.temporaries, section)
        return {
            "launches": self.launch_count(section),
            "kernels": sum(1 for x in self._in(self.launches, section) if x.kernel),
            "bytes_moved": self.bytes_moved(section),
            "temporaries": len(temps),
            "temporary_bytes": sum(t[1].nbytes for t in temps),
            "conversions": len(conv),
            "conversion_bytes": sum(c.src.nbytes + c.dst.nbytes for c in conv),
            "saved_bytes": self.saved_bytes() if section is None else None,
        }

    def table(self) -> str:
        """A short human-readable account, per section."""
        sections = list(dict.fromkeys(x.section for x in self.launches)) or [self._section]
        lines = []
        for sec in sections:
            s = self.summary(sec)
            lines.append(
                f"[{sec}] {s['launches']} launches ({s['kernels']} fastft kernels), "
                f"{s['bytes_moved'] / 2**20:.1f} MiB moved, {s['temporaries']} temporaries >= {self.min_numel} elements "
                f"({s['temporary_bytes'] / 2**20:.1f} MiB), {s['conversions']} dtype conversions "
                f"({s['conversion_bytes'] / 2**20:.1f} MiB)"
            )
            lines.append("  ops: " + " ".join(self.ops(sec)))
            for c in self._in(self.conversions, sec):
                if c.src.numel >= self.min_numel:
                    lines.append(f"  convert {c}")
        lines.append(f"saved for backward: {len(self.saved)} tensors, {self.saved_bytes() / 2**20:.1f} MiB unique")
        return "\n".join(lines)


def active_ledger() -> Ledger | None:
    """The :class:`Ledger` recording on this thread, or None."""
    return getattr(_TLS, "ledger", None)


@contextlib.contextmanager
def record_kernel(name: str, inputs=(), outputs=()):
    """Wrap one fastft kernel launch: it counts as one launch with these input and output bytes.

    Yields whether to launch: False only when a ledger is recording on ``meta`` tensors (the
    launcher then skips the launch; the outputs it allocated stand for the result). Without
    a ledger this costs one thread-local lookup::

        out = torch.empty(...)
        with record_kernel("lora_xa", (x, A), (out,)) as launch:
            if launch:
                _kernel[grid](...)
    """
    led = active_ledger()
    if led is None:
        yield True
        return
    if not led._quiet:
        led._kernel(name, inputs, outputs)
    meta = any(isinstance(t, torch.Tensor) and t.device.type == "meta" for t in (*inputs, *outputs))
    led._quiet += 1
    try:
        yield not meta
    finally:
        led._quiet -= 1
