"""The checkpointing patch: per-decoder-layer activation checkpointing (``recompute`` or ``offload``).

Found by structure: the decoder stack is an ``nn.ModuleList`` of repeated blocks of one
class inside the transformers model (``model.layers``, ``transformer.h``, ...). Every
outermost such list of transformers ``GradientCheckpointingLayer``\\ s is patched (a
multimodal model has one per tower); a model without any gets the largest list of
repeated same-class blocks. Each layer's ``forward`` becomes a
:class:`CheckpointedForward`, which - in training mode with grad enabled - runs the
original forward under ``torch.utils.checkpoint.checkpoint(..., use_reentrant=False)``,
so only the layer's input is kept for backward and the layer is recomputed there.
Eval-mode and no-grad calls run the original forward directly.

Other features' swaps (LoRA, NF4 layers inside the block, the fused loss around the
whole model) are untouched: the recompute calls the same patched submodules again.

transformers' own gradient checkpointing (``gradient_checkpointing_enable()``) checkpoints
in the layer class's ``forward`` when ``layer.gradient_checkpointing and layer.training``.
Policy, never both at once:

* on when :func:`fastft.patch` runs: fastft takes over - the layer's
  ``gradient_checkpointing`` flag is set to False through the engine (so :func:`unpatch`
  turns it back on) and the report says so;
* turned on after :func:`fastft.patch`: fastft steps aside for those calls and
  transformers checkpoints them (noted once per layer in the report).

A KV cache passed to a checkpointed call would be updated again by the recompute, so,
as transformers does, an *empty* cache is dropped from checkpointed calls
(``use_cache=False``); a call with a non-empty cache runs unchecked (not checkpointed).

``offload``: around the checkpoint call a ``saved_tensors_hooks`` pair moves what the
checkpoint saves outside the layer - the layer's positional tensor inputs, i.e. the
hidden states - to pinned host memory with an asynchronous copy on a side CUDA stream
during forward, and brings it back when the backward recomputes the layer, prefetching
the previous layer's input (the next one backward needs) on the side stream meanwhile:
double-buffered, at most two layers' inputs on the GPU. CPU tensors pass through
unchanged: on a CPU model ``offload`` is ``recompute`` (the report says so).
"""

from __future__ import annotations

import functools
import weakref

import torch
from torch import nn
from torch.utils import checkpoint as _checkpoint_module

FEATURE = "checkpointing"
# torch.utils.checkpoint.checkpoint's own keyword parameters: layer kwargs with these
# names are bound with functools.partial instead of being passed through
_CHECKPOINT_PARAMS = frozenset({"use_reentrant", "preserve_rng_state", "context_fn", "determinism_check", "debug"})


# --------------------------------------------------------------------------------------
# finding the decoder stack(s)
# --------------------------------------------------------------------------------------
def _gc_layer_cls():
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
    except Exception:  # pragma: no cover - older transformers
        return None
    return GradientCheckpointingLayer


def _outermost(candidates):
    names = [n for n, _ in candidates]
    return [(n, m) for n, m in candidates if not any(o != n and n.startswith(o + ".") for o in names)]


def find_decoder_stacks(model: nn.Module) -> tuple[list[tuple[str, nn.ModuleList]], str, list[tuple[str, str]]]:
    """(stacks as (name, ModuleList), how they were found, [(name, why left alone)])."""
    lists = [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, nn.ModuleList) and len(m) > 0 and len({type(c) for c in m}) == 1
    ]
    gc_cls = _gc_layer_cls()
    if gc_cls is not None:
        gc = [(n, m) for n, m in lists if isinstance(m[0], gc_cls)]
        if gc:
            return _outermost(gc), "transformers GradientCheckpointingLayer stack", []
    blocks = _outermost([(n, m) for n, m in lists if len(m) >= 2 and next(m[0].children(), None) is not None])
    if not blocks:
        return [], "", []
    best = max(blocks, key=lambda nm: (len(nm[1]), sum(p.numel() for p in nm[1].parameters())))
    others = [
        (n, f"a smaller list of repeated blocks than {best[0]} (only the largest stack is checkpointed)")
        for n, _ in blocks
        if n != best[0]
    ]
    return [best], "largest nn.ModuleList of repeated same-class blocks", others


# --------------------------------------------------------------------------------------
# offloading the checkpoint's saved inputs
# --------------------------------------------------------------------------------------
class _Offloaded:
    """One saved tensor living in pinned host memory (packed by :class:`ActivationOffloader`)."""

    __slots__ = ("cpu", "gpu", "device", "requires_grad", "d2h", "h2d", "prev", "__weakref__")

    def __init__(self, cpu, device, requires_grad, d2h, prev):
        self.cpu = cpu
        self.gpu = None
        self.device = device
        self.requires_grad = requires_grad
        self.d2h = d2h  # event: the device-to-host copy is done
        self.h2d = None  # event: the prefetch (host-to-device copy) is done
        self.prev = prev  # weakref to the input offloaded just before this one (the previous layer's)

    def prefetch(self, side) -> None:
        """Start copying back on the side stream (no-op if already there)."""
        if self.gpu is not None or self.cpu is None:
            return
        with torch.cuda.stream(side):
            side.wait_event(self.d2h)
            gpu = torch.empty_like(self.cpu, device=self.device)
            gpu.copy_(self.cpu, non_blocking=True)
            self.h2d = torch.cuda.Event()
            self.h2d.record(side)
        self.gpu = gpu

    def fetch(self) -> torch.Tensor:
        """The tensor on its device, ready for the current stream."""
        main = torch.cuda.current_stream(self.device)
        if self.gpu is None:  # not prefetched: copy on the current stream
            main.wait_event(self.d2h)
            gpu = torch.empty_like(self.cpu, device=self.device)
            gpu.copy_(self.cpu, non_blocking=True)
            self.gpu = gpu
        elif self.h2d is not None:
            main.wait_event(self.h2d)
            self.gpu.record_stream(main)  # allocated on the side stream, used on this one
            self.h2d = None
        self.cpu = None  # the pinned block goes back to torch's host cache once the copy is done
        t = self.gpu
        if self.requires_grad and not t.requires_grad:
            t.requires_grad_(True)
        return t


class ActivationOffloader:
    """``saved_tensors_hooks`` that keep CUDA tensors saved for backward in pinned host memory.

    Shared by all layers of one patched model, so that the unpack of one layer's input can
    prefetch the previous layer's. Tensors not on CUDA, or smaller than ``min_numel``
    elements, are kept as they are.
    """

    def __init__(self, min_numel: int = 1024):
        self.min_numel = min_numel
        self._streams: dict = {}
        self._last = None
        self.offloaded = 0  # tensors moved to the host so far (for tests and benchmarks)

    def __getstate__(self):  # deepcopy / pickle: streams and the prefetch chain are not state
        return {"min_numel": self.min_numel}

    def __setstate__(self, state):
        self.__init__(**state)

    def _side_stream(self, device):
        s = self._streams.get(device)
        if s is None:
            s = self._streams[device] = torch.cuda.Stream(device=device)
        return s

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)

    def pack(self, t: torch.Tensor):
        if not t.is_cuda or t.numel() < self.min_numel:
            return t
        device = t.device
        side = self._side_stream(device)
        side.wait_stream(torch.cuda.current_stream(device))  # t is complete
        cpu = torch.empty_like(t, device="cpu", pin_memory=True)
        with torch.cuda.stream(side):
            cpu.copy_(t, non_blocking=True)
            d2h = torch.cuda.Event()
            d2h.record(side)
        t.record_stream(side)  # its memory is not reused before the copy has read it
        prev = self._last() if self._last is not None else None
        h = _Offloaded(cpu, device, t.requires_grad, d2h, weakref.ref(prev) if prev is not None else None)
        self._last = weakref.ref(h)
        self.offloaded += 1
        return h

    def unpack(self, packed):
        if not isinstance(packed, _Offloaded):
            return packed
        t = packed.fetch()
        prev = packed.prev() if packed.prev is not None else None
        if prev is not None:  # the input backward needs next: copy it back while this layer runs
            prev.prefetch(self._side_stream(prev.device))
        return t


# --------------------------------------------------------------------------------------
# the patched forward
# --------------------------------------------------------------------------------------
def _cache_cls():
    try:
        from transformers.cache_utils import Cache
    except Exception:  # pragma: no cover
        return None
    return Cache


def _cache_is_empty(cache) -> bool:
    try:
        return int(cache.get_seq_length()) == 0
    except Exception:  # unknown cache: treat as filled (the call is then not checkpointed)
        return False


class CheckpointedForward:
    """The patched ``forward`` of one decoder layer (see the module docstring)."""

    def __init__(self, layer, original, mode: str, offloader: ActivationOffloader | None, name: str, report):
        self.layer = layer
        self.original = original
        self.mode = mode
        self.offloader = offloader
        self.name = name
        self.report = report
        self.checkpointed_calls = 0  # for tests and benchmarks
        self.deferred_calls = 0  # left to transformers' own gradient checkpointing
        self._rope_scopes = None  # the RopeScopes inside the layer, found at its first checkpointed call
        self._noted: set[str] = set()
        self.__wrapped__ = original
        self.__doc__ = getattr(original, "__doc__", None)

    def _note(self, reason: str) -> None:
        if reason not in self._noted:
            self._noted.add(reason)
            self.report.skip(FEATURE, f"{self.name}.forward", reason)

    def _without_cache(self, args, kwargs):
        """args/kwargs with an empty KV cache removed, or None if a filled cache is passed."""
        cache_cls = _cache_cls()
        if cache_cls is None or getattr(self.layer, "_can_checkpoint_with_cache", False):
            return args, kwargs
        pos = [i for i, a in enumerate(args) if isinstance(a, cache_cls)]
        keys = [k for k, v in kwargs.items() if isinstance(v, cache_cls)]
        if not pos and not keys:
            return args, kwargs
        if not all(_cache_is_empty(args[i]) for i in pos) or not all(_cache_is_empty(kwargs[k]) for k in keys):
            return None
        args = tuple(None if i in pos else a for i, a in enumerate(args))
        kwargs = {k: (None if k in keys else v) for k, v in kwargs.items()}
        if kwargs.get("use_cache"):
            kwargs["use_cache"] = False
        return args, kwargs

    def __call__(self, *args, **kwargs):
        layer = self.layer
        if not (torch.is_grad_enabled() and layer.training):
            return self.original(*args, **kwargs)
        if getattr(layer, "gradient_checkpointing", False):
            self.deferred_calls += 1
            self._note(
                "transformers' gradient checkpointing was enabled after fastft.patch: "
                "transformers checkpoints this layer, fastft steps aside (no double checkpointing)"
            )
            return self.original(*args, **kwargs)
        stripped = self._without_cache(args, kwargs)
        if stripped is None:
            self._note(
                "called with a filled KV cache: that call is not checkpointed (the recompute would update it again)"
            )
            return self.original(*args, **kwargs)
        args, kwargs = stripped
        fn = self.original
        if _CHECKPOINT_PARAMS.intersection(kwargs):
            fn, kwargs = functools.partial(fn, **kwargs), {}
        self.checkpointed_calls += 1
        checkpoint = _checkpoint_module.checkpoint
        from .fused_ops import enter_rope_scopes, exit_rope_scopes, rope_scopes_of  # side effects outside it

        if self._rope_scopes is None:  # the layer's patched attention modules (fixed once patched)
            self._rope_scopes = rope_scopes_of(layer)
        entered = enter_rope_scopes(self._rope_scopes)
        try:
            if self.offloader is None:
                return checkpoint(fn, *args, use_reentrant=False, **kwargs)
            with self.offloader.hooks():
                return checkpoint(fn, *args, use_reentrant=False, **kwargs)
        finally:
            exit_rope_scopes(entered)


# --------------------------------------------------------------------------------------
# the feature
# --------------------------------------------------------------------------------------
def _model_device(model) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def apply(ctx) -> None:
    """Checkpoint every layer of the model's decoder stack(s), in ``ctx.options["checkpointing"]`` mode."""
    mode = ctx.options["checkpointing"]
    model, report = ctx.model, ctx.report
    root = ctx.wrapper if ctx.wrapper is not None else ctx.model
    stacks, how, others = find_decoder_stacks(model)
    if not stacks:
        report.skip(FEATURE, type(model).__name__, "no decoder stack found (no nn.ModuleList of repeated blocks)")
        return
    full_names = {id(m): n for n, m in root.named_modules()}

    offloader = None
    mode_text = "recompute: torch.utils.checkpoint (non-reentrant) around the layer's forward"
    if mode == "offload":
        offloader = ActivationOffloader()
        report.runs_eager(
            FEATURE,
            "checkpointing='offload' installs saved-tensor hooks, which dynamo does not trace, at each decoder "
            "layer; 'recompute' compiles",
        )
        mode_text = (
            "offload: non-reentrant checkpoint; the layer's saved input goes to pinned host memory "
            "(side CUDA stream) and is prefetched back ahead of the recompute (double-buffered)"
        )
        device = _model_device(model)
        if device.type != "cuda":
            report.skip(
                FEATURE,
                "offload",
                f"the model is on {device.type}: inputs that are not on CUDA stay where they are, "
                "so offload behaves as 'recompute' here",
            )
    mode_text += " in training with grad enabled; eval / no-grad calls run it directly"

    for stack_name, stack in stacks:
        full = full_names.get(id(stack), stack_name)
        for i, layer in enumerate(stack):
            name = f"{full}.{i}"
            detail = f"{mode_text} [{how}]"
            if getattr(layer, "gradient_checkpointing", False):
                ctx.swap(layer, "gradient_checkpointing", False)
                detail += (
                    "; transformers' gradient checkpointing was on for this layer: "
                    "switched off while patched (fastft checkpoints it instead; unpatch turns it back on)"
                )
            wrapper = CheckpointedForward(layer, layer.forward, mode, offloader, name, report)
            ctx.swap(layer, "forward", wrapper)
            report.add(FEATURE, f"{name}.forward", detail)
    for name, why in others:
        report.skip(FEATURE, full_names.get(id(model.get_submodule(name)), name), why)
