"""The norms / mlp / rope patches: RMSNorm, gated MLPs and rotary embeddings run fastft's ops.

All three are found by structure and confirmed by a *probe* before anything is swapped:
the module's own forward runs once on a tiny random input (no grad, eval mode for the
probe only) and fastft's formula must give the same numbers; a module that computes
something else keeps its forward, and the report says why. Nothing is matched by model name.

* norms: a module with a 1-D ``weight``, a float ``variance_epsilon`` or ``eps`` and no
  ``bias``; the probe also tells Llama-style ``w * x_hat`` from Gemma-style ``(1 + w) * x_hat``.
* mlp: ``down_proj(act(gate_proj(x)) * up_proj(x))`` (Llama, Mistral, Qwen2, Gemma-2) or
  ``down_proj(act(gate) * up)`` with ``gate, up = gate_up_proj(x).chunk(2)`` (Phi-3); ``act`` is
  recognised as SiLU (-> swiglu) or GELU exact / tanh (-> geglu). The projections are still
  called as modules, so LoRA layers on them keep their fused LoRA path. down_proj's saved input
  is not kept: backward recomputes it from ``gate`` and ``up``, which the activation keeps anyway
  (:class:`_RecomputedInput`; off under activation checkpointing and torch.compile).
* rope: transformers' attention modules call their modeling file's module-level
  ``apply_rotary_pos_emb(q, k, cos, sin, ...)``. The patch swaps that function for a
  dispatcher that runs :func:`fastft.ops.rope` only while a patched model's attention
  module is running (its forward is wrapped to say so), so another, unpatched model of the
  same family in the process keeps transformers' function.
"""

from __future__ import annotations

import inspect
import sys
import threading

import torch
from torch import nn

from .guard import GuardedForward

FEATURES = ("norms", "mlp", "rope")


def _probe_eval(module: nn.Module):
    """Context: every submodule in eval mode (dropout off) for the probe, then the flags restored."""

    class _Ctx:
        def __enter__(self):
            self.flags = [(m, m.training) for m in module.modules()]
            for m, _ in self.flags:
                m.training = False

        def __exit__(self, *exc):
            for m, flag in self.flags:
                m.training = flag

    return _Ctx()


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    tol = 1e-5 if a.dtype == torch.float32 and b.dtype == torch.float32 else 2e-2
    return a.shape == b.shape and bool(torch.allclose(a.float(), b.float(), rtol=tol, atol=tol))


# --------------------------------------------------------------------------------------
# norms
# --------------------------------------------------------------------------------------
class FusedRMSNormForward(GuardedForward):
    feature = "norms"

    def __init__(self, module, original, eps: float, offset: float, backend: str, *, target="", report=None):
        super().__init__(original, backend, target=target, report=report)
        self.module, self.eps, self.offset = module, eps, offset

    def misfit(self, x, args, kwargs) -> str | None:
        """Why this call does not fit rms_norm (None when it does)."""
        if args or kwargs:
            return "extra forward arguments"
        w = self.module.weight
        if not torch.is_tensor(x) or not x.is_floating_point():
            return "input is not a floating-point tensor"
        if w.dim() != 1 or x.dim() == 0 or x.shape[-1] != w.shape[0]:
            return f"input's last dim {tuple(x.shape)[-1:]} is not the weight's size {tuple(w.shape)}"
        return None

    def __call__(self, x, *args, **kwargs):
        why = None if self.forced else self.misfit(x, args, kwargs)
        if why is not None:
            return self.fall_back(why, x, *args, **kwargs)
        from ..ops import rms_norm

        return self.fused_or_fall_back(
            lambda: rms_norm(x, self.module.weight, self.eps, offset=self.offset, backend=self.backend),
            (x, *args),
            kwargs,
        )


def _rmsnorm_eps(module) -> float | None:
    w = getattr(module, "weight", None)
    if not isinstance(w, torch.Tensor) or w.dim() != 1 or getattr(module, "bias", None) is not None:
        return None
    if isinstance(module, (nn.LayerNorm, nn.GroupNorm)):
        return None
    for attr in ("variance_epsilon", "eps"):
        eps = getattr(module, attr, None)
        if isinstance(eps, float) and eps > 0:
            return eps
    return None


def apply_norms(ctx) -> None:
    from ..ops import rms_norm_reference

    root = ctx.wrapper if ctx.wrapper is not None else ctx.model
    backend = ctx.options["backend"]
    found = 0
    for name, module in root.named_modules():
        eps = _rmsnorm_eps(module)
        if eps is None:
            continue
        found += 1
        w = module.weight
        g = torch.Generator(device="cpu").manual_seed(0)
        x = torch.randn(3, w.shape[0], generator=g).to(device=w.device, dtype=w.dtype)
        with torch.no_grad(), _probe_eval(module):
            try:
                got = module(x)
            except Exception as exc:  # not callable on a plain (rows, hidden) tensor
                ctx.report.skip("norms", name, f"probe failed ({type(exc).__name__}): forward kept")
                continue
            offset = next((o for o in (0.0, 1.0) if _close(got, rms_norm_reference(x, w, eps, offset=o))), None)
        if offset is None:
            ctx.report.skip("norms", name, f"{type(module).__name__} does not compute RMSNorm: forward kept")
            continue
        fwd = FusedRMSNormForward(module, module.forward, eps, offset, backend, target=name, report=ctx.report)
        ctx.swap(module, "forward", fwd)
        kind = "(1 + w) * x_hat, Gemma-style" if offset else "w * x_hat"
        ctx.report.add("norms", name, f"rms_norm, {kind}, eps={eps:g}")
    if not found:
        ctx.report.skip("norms", "model", "no RMSNorm-like modules (weight + eps, no bias)")


# --------------------------------------------------------------------------------------
# gated MLPs
# --------------------------------------------------------------------------------------
def _act_kind(act) -> tuple[str, dict] | None:
    """Which fused activation ``act`` is: ('swiglu', {}) / ('geglu', {'approximate': ...}) / None."""
    if not callable(act):
        return None
    t = torch.linspace(-6, 6, 97)
    try:
        with torch.no_grad():
            y = act(t)
    except Exception:
        return None
    if _close(y, nn.functional.silu(t)):
        return "swiglu", {}
    for approx in ("tanh", "none"):
        if _close(y, nn.functional.gelu(t, approximate=approx)):
            return "geglu", {"approximate": approx}
    return None


class FusedMLPForward(GuardedForward):
    feature = "mlp"

    def __init__(self, module, original, layout: str, act_attr: str, kind: str, kw: dict, backend: str, **where):
        super().__init__(original, backend, **where)
        self.module, self.layout, self.act_attr = module, layout, act_attr
        self.kind, self.kw = kind, kw

    def misfit(self, x, args, kwargs) -> str | None:
        if args or kwargs:
            return "extra forward arguments"
        if not torch.is_tensor(x) or not x.is_floating_point() or x.dim() == 0:
            return "input is not a floating-point tensor"
        return None

    def _fused(self, x):
        from ..ops import geglu, swiglu

        m = self.module
        if self.layout == "gate_up_proj":
            gate, up = m.gate_up_proj(x).chunk(2, dim=-1)
        else:
            gate, up = m.gate_proj(x), m.up_proj(x)
        if gate.shape != up.shape:  # checked here, before the activation and down_proj run
            raise ValueError(f"gate {tuple(gate.shape)} and up {tuple(up.shape)} projections differ in shape")
        fn = swiglu if self.kind == "swiglu" else geglu
        act = fn(gate, up, **self.kw, backend=self.backend)
        if not _recompute_applies(act, gate, up):
            return m.down_proj(act)
        kw, backend = self.kw, self.backend
        hooks = _RecomputedInput(act, lambda: fn(gate, up, **kw, backend=backend))
        with torch.autograd.graph.saved_tensors_hooks(hooks.pack, hooks.unpack):
            return m.down_proj(act)

    def __call__(self, x, *args, **kwargs):
        why = None if self.forced else self.misfit(x, args, kwargs)
        if why is not None:
            return self.fall_back(why, x, *args, **kwargs)
        return self.fused_or_fall_back(lambda: self._fused(x), (x, *args), kwargs)


def _recompute_applies(act, gate, up) -> bool:
    """Whether down_proj's saved input can be the gated activation recomputed in backward: the
    activation's own backward keeps ``gate`` and ``up`` (so recomputing costs no memory), ``act``
    is a whole contiguous buffer, and no other saved-tensor hooks (activation checkpointing,
    offloading) are active, nor a torch.compile trace (its own memory planning)."""
    if not (torch.is_grad_enabled() and act.requires_grad and gate.requires_grad and up.requires_grad):
        return False
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)  # no such query: stay off
    if torch.compiler.is_compiling() or top is None or top(False) is not None:
        return False
    return act.is_contiguous() and act.storage_offset() == 0 and act.untyped_storage().nbytes() == act.nbytes


class _RecomputedInput:
    """Saved-tensor hooks around ``down_proj(act)``: a saved tensor that is ``act`` (or a view of it,
    e.g. the LoRA op's ``(rows, intermediate)`` input) is kept as *how to recompute it* (the fused
    activation on ``gate`` and ``up``, which its backward keeps anyway) instead of as a third
    ``(tokens, intermediate)`` buffer; unpacked in backward by running the activation again, which
    gives the same bits (same kernel, same inputs). Every other saved tensor passes through. What
    this saves is one intermediate-sized activation per MLP (bench_dpo: 88 of 564 MiB); what it
    costs is one elementwise activation per MLP in backward, no GEMM."""

    def __init__(self, act, recompute):
        self.ptr, self.dtype, self.device = act.untyped_storage().data_ptr(), act.dtype, act.device
        self.recompute = recompute  # closes over gate and up, never over act

    def pack(self, t):
        if t.dtype == self.dtype and t.device == self.device and t.untyped_storage().data_ptr() == self.ptr:
            return (_RecomputedInput, self, t.shape, t.stride(), t.storage_offset())
        return t

    @staticmethod
    def unpack(packed):
        if type(packed) is tuple and len(packed) == 5 and packed[0] is _RecomputedInput:
            _, me, shape, stride, offset = packed
            with torch.no_grad():
                return me.recompute().as_strided(shape, stride, offset)
        return packed


def _mlp_layout(module) -> tuple[str, str] | None:
    act_attr = next((a for a in ("act_fn", "activation_fn", "act") if hasattr(module, a)), None)
    if act_attr is None or not hasattr(module, "down_proj"):
        return None
    if hasattr(module, "gate_proj") and hasattr(module, "up_proj"):
        return "gate_proj", act_attr
    if hasattr(module, "gate_up_proj"):
        return "gate_up_proj", act_attr
    return None


def apply_mlp(ctx) -> None:
    root = ctx.wrapper if ctx.wrapper is not None else ctx.model
    backend = ctx.options["backend"]
    found = 0
    for name, module in root.named_modules():
        layout = _mlp_layout(module)
        if layout is None:
            continue
        found += 1
        from .experts import is_experts_module

        if is_experts_module(module):  # 3-D expert weights (16-bit or 4-bit): the experts patch's business
            ctx.report.skip("mlp", name, "experts module (3-D expert weights): see the experts patch")
            continue
        param = next(module.parameters(), None)
        layout, act_attr = layout
        act = _act_kind(getattr(module, act_attr))
        if act is None:
            ctx.report.skip("mlp", name, f"activation {type(getattr(module, act_attr)).__name__} is not SiLU or GELU")
            continue
        kind, kw = act
        fwd = FusedMLPForward(
            module, module.forward, layout, act_attr, kind, kw, backend, target=name, report=ctx.report
        )
        hidden = module.down_proj.out_features if hasattr(module.down_proj, "out_features") else None
        if hidden is None or param is None:
            ctx.report.skip("mlp", name, "cannot size a probe input: forward kept")
            continue
        dtype = param.dtype if param.dtype.is_floating_point else torch.float32
        g = torch.Generator(device="cpu").manual_seed(0)
        x = torch.randn(2, hidden, generator=g).to(device=param.device, dtype=dtype)
        with torch.no_grad(), _probe_eval(module):
            try:
                ok = _close(fwd(x), module(x))
            except Exception as exc:
                ctx.report.skip("mlp", name, f"probe failed ({type(exc).__name__}): forward kept")
                continue
        if not ok:
            ctx.report.skip("mlp", name, "its forward is not act(gate) * up -> down_proj: forward kept")
            continue
        ctx.swap(module, "forward", fwd)
        what = "swiglu" if kind == "swiglu" else f"geglu (approximate={kw['approximate']!r})"
        ctx.report.add("mlp", name, f"{what} between {layout} and down_proj (LoRA on the projections stays fused)")
    if not found:
        ctx.report.skip("mlp", "model", "no gated MLPs (gate/up/down projections with an activation)")


# --------------------------------------------------------------------------------------
# rotary embeddings
# --------------------------------------------------------------------------------------
_ACTIVE = threading.local()


class RopeDispatch:
    """Stands in for a modeling file's ``apply_rotary_pos_emb``: fastft's rope inside patched attention."""

    def __init__(self, original, backend: str):
        self.original, self.backend = original, backend
        self.__wrapped__ = original

    def __call__(self, q, k, cos, sin, *args, **kwargs):
        scopes = getattr(_ACTIVE, "scopes", None)
        if not scopes:  # not inside a patched model's attention: transformers' function
            return self.original(q, k, cos, sin, *args, **kwargs)
        scope = scopes[-1]
        if args or set(kwargs) - {"unsqueeze_dim"}:
            return scope.fall_back_rope(self.original, "extra arguments", q, k, cos, sin, *args, **kwargs)
        from ..ops import rope

        def fused():
            return rope(q, k, cos, sin, unsqueeze_dim=kwargs.get("unsqueeze_dim", 1), backend=scope.backend)

        try:
            return fused()
        except (ValueError, TypeError) as exc:  # the op checks its inputs before any kernel runs
            if scope.forced:
                raise
            reason = f"fused op rejected the input ({type(exc).__name__})"
            return scope.fall_back_rope(self.original, reason, q, k, cos, sin, *args, **kwargs)


class RopeScope(GuardedForward):
    """The patched forward of an attention module: marks that its rope calls may be fused."""

    feature = "rope"

    def fall_back_rope(self, original, reason, *args, **kwargs):
        self.count(reason)
        return original(*args, **kwargs)

    def __call__(self, *args, **kwargs):
        scopes = getattr(_ACTIVE, "scopes", None)
        if scopes is None:
            scopes = _ACTIVE.scopes = []
        if self in scopes:  # entered already, by the checkpointed layer around it (rope_scopes_entered)
            return self.original(*args, **kwargs)
        scopes.append(self)
        try:
            return self.original(*args, **kwargs)
        finally:
            scopes.pop()


def rope_scopes_of(layer) -> list:
    """The :class:`RopeScope` forwards of ``layer``'s attention modules."""
    return [m.__dict__["forward"] for m in layer.modules() if isinstance(m.__dict__.get("forward"), RopeScope)]


def enter_rope_scopes(scopes: list) -> int:
    """Enter ``scopes`` (a layer's, :func:`rope_scopes_of`) ahead of a call that cannot hold a side
    effect; returns how many to :func:`exit_rope_scopes` after it. torch.compile traces activation
    checkpointing as a higher-order op that refuses any mutation of outside state, such as
    :class:`RopeScope`'s push onto the scope stack, so the checkpointed layer pushes its scopes
    before the checkpoint and pops them after; inside, each scope finds itself entered and only
    reads the stack."""
    if scopes:
        stack = getattr(_ACTIVE, "scopes", None)
        if stack is None:
            stack = _ACTIVE.scopes = []
        stack.extend(scopes)
    return len(scopes)


def exit_rope_scopes(n: int) -> None:
    if n:
        del _ACTIVE.scopes[-n:]


def _rope_probe(fn) -> bool:
    """Does ``fn`` compute transformers' rotate-half RoPE? (checked once per modeling file)."""
    from ..ops import rope_reference

    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 2, 3, 8, generator=g), torch.randn(1, 1, 3, 8, generator=g)
    cos, sin = torch.randn(1, 3, 8, generator=g), torch.randn(1, 3, 8, generator=g)
    try:
        with torch.no_grad():
            got = fn(q, k, cos, sin)
    except Exception:
        return False
    want = rope_reference(q, k, cos, sin)
    return isinstance(got, tuple) and len(got) == 2 and all(_close(a, b) for a, b in zip(got, want))


def apply_rope(ctx) -> None:
    root = ctx.wrapper if ctx.wrapper is not None else ctx.model
    backend = ctx.options["backend"]
    files: dict[str, bool] = {}
    found = 0
    for name, module in root.named_modules():
        pymod = sys.modules.get(type(module).__module__)
        fn = getattr(pymod, "apply_rotary_pos_emb", None) if pymod is not None else None
        is_attention = hasattr(module, "q_proj") or hasattr(module, "qkv_proj")
        if fn is None or not is_attention or "position_embeddings" not in inspect.signature(module.forward).parameters:
            continue
        found += 1
        if pymod.__name__ not in files:
            original = fn.original if isinstance(fn, RopeDispatch) else fn
            ok = _rope_probe(original)
            files[pymod.__name__] = ok
            if ok and not isinstance(fn, RopeDispatch):
                ctx.swap(pymod, "apply_rotary_pos_emb", RopeDispatch(original, backend))
            if not ok:
                ctx.report.skip("rope", pymod.__name__, "its apply_rotary_pos_emb is not rotate-half RoPE: kept")
        if files[pymod.__name__]:
            ctx.swap(module, "forward", RopeScope(module.forward, backend, target=name, report=ctx.report))
            ctx.report.add(
                "rope", name, f"rope (fastft) in place of {pymod.__name__.split('.')[-1]}.apply_rotary_pos_emb"
            )
    if not found:
        ctx.report.skip("rope", "model", "no attention modules calling a module-level apply_rotary_pos_emb")
