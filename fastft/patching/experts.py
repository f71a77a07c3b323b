"""The experts patch: transformers 5 MoE experts modules run :func:`fastft.ops.experts`.

Plugged in through transformers' own extension point: ``"fastft"`` is registered in
``transformers.integrations.moe.ALL_EXPERTS_FUNCTIONS`` (the ``ExpertsInterface``) and the
patched model's config selects it (``config._experts_implementation``), so every experts
module's own dispatching forward calls :func:`fastft_experts_forward`; no forward is copied
and nothing is matched by model name.

Found by structure: a module decorated by ``use_experts_implementation`` (it carries
``has_gate`` / ``is_transposed`` / ``_is_expert_parallel`` and a ``config``) with 3-D
``gate_up_proj`` and ``down_proj``. Its gated activation is read off a *probe*: the module's
own ``_apply_gate`` runs on a random ``(rows, 2I)`` input and must match one of fastft's
activations (``silu`` / ``gelu`` / ``gelu_tanh`` of the first half times the second, or
gpt-oss' clamped interleaved form with the module's ``alpha`` / ``limit``); a module that
computes something else keeps its implementation and the report says why. Each call is
guarded (:class:`~fastft.patching.guard.GuardedForward`): expert-parallel modules, extra
arguments or weights in another dtype than the input run the previous implementation,
counted in ``report.fallbacks``.

4-bit experts (:func:`fastft.quantize` replaced the 3-D weights by
:class:`fastft.nn.ExpertsWeight4bit`) are found the same way and run the same op, which
dequantises inside its GEMMs (under ``torch.compile`` as the operators ``fastft::experts_4bit_fwd`` /
``experts_4bit_bwd``; a module with one 4-bit and one 16-bit weight keeps the autograd Function
there, which the report says). Their fallback is always the model's own eager loop (whatever
the implementation was): indexing a 4-bit weight dequantises one expert's slice, and no other
transformers implementation reads packed weights.
"""

from __future__ import annotations

import torch

from .guard import GuardedForward

_IMPL = "fastft"
_GUARD_ATTR = "_fastft_experts"


def _eager(module):
    forward = type(module).forward
    return getattr(forward, "__wrapped__", forward)  # use_experts_implementation wraps the eager forward


def fastft_experts_forward(self, hidden_states, top_k_index, top_k_weights, *args, **kwargs):
    """The ``"fastft"`` entry of transformers' ``ExpertsInterface``."""
    guard = self.__dict__.get(_GUARD_ATTR)
    if guard is None:  # an experts module fastft.patch did not see: the model's own eager loop
        return _eager(self)(self, hidden_states, top_k_index, top_k_weights, *args, **kwargs)
    return guard(hidden_states, top_k_index, top_k_weights, *args, **kwargs)


def register() -> None:
    """Register ``"fastft"`` in transformers' ``ExpertsInterface`` (idempotent)."""
    from transformers.integrations.moe import ExpertsInterface

    ExpertsInterface.register(_IMPL, fastft_experts_forward)


class FusedExpertsForward(GuardedForward):
    feature = "experts"

    def __init__(self, module, original, act, backend: str, *, unsupported: str | None = None, **where):
        super().__init__(original, backend, **where)
        self.module, self.act, self.unsupported = module, act, unsupported

    def misfit(self, x, idx, w, args, kwargs) -> str | None:
        m = self.module
        if args or kwargs:
            return "extra forward arguments"
        if getattr(m, "_is_expert_parallel", False):
            return "expert-parallel module (sentinel expert ids)"
        if not torch.is_tensor(x) or x.dim() != 2 or not x.is_floating_point():
            return "hidden states are not a (tokens, hidden) floating-point tensor"
        if x.dtype != m.gate_up_proj.dtype or m.down_proj.dtype != m.gate_up_proj.dtype:
            return f"input dtype {x.dtype} differs from the expert weights' {m.gate_up_proj.dtype}"
        return None

    def _fused(self, x, idx, w):
        from ..ops.experts import experts

        m = self.module
        b1 = getattr(m, "gate_up_proj_bias", None) if m.has_bias else None
        b2 = getattr(m, "down_proj_bias", None) if m.has_bias else None
        return experts(
            x,
            idx,
            w,
            m.gate_up_proj,
            m.down_proj,
            b1,
            b2,
            act=self.act,
            transposed=m.is_transposed,
            backend=self.backend,
        )

    def __call__(self, x, top_k_index, top_k_weights, *args, **kwargs):
        if self.unsupported is not None:  # reported at patch time; not a per-call fallback
            return self.original(x, top_k_index, top_k_weights, *args, **kwargs)
        why = None if self.forced else self.misfit(x, top_k_index, top_k_weights, args, kwargs)
        if why is not None:
            return self.fall_back(why, x, top_k_index, top_k_weights, *args, **kwargs)
        return self.fused_or_fall_back(
            lambda: self._fused(x, top_k_index, top_k_weights), (x, top_k_index, top_k_weights, *args), kwargs
        )


def _is_4bit(w) -> bool:
    from ..nn import ExpertsWeight4bit

    return isinstance(w, ExpertsWeight4bit)


def _is_weight3d(w) -> bool:
    return (isinstance(w, torch.Tensor) and w.dim() == 3) or _is_4bit(w)


def is_experts_module(module) -> bool:
    """A transformers experts module: 3-D ``gate_up_proj`` / ``down_proj`` (16-bit, or fastft's 4-bit)."""
    w1, w2 = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    return (
        hasattr(module, "_is_expert_parallel")
        and hasattr(module, "is_transposed")
        and hasattr(getattr(module, "config", None), "_experts_implementation_internal")
        and _is_weight3d(w1)
        and _is_weight3d(w2)
    )


def has_4bit_experts(module) -> bool:
    """An experts module whose weights :func:`fastft.quantize` stored in NF4."""
    return _is_4bit(getattr(module, "gate_up_proj", None)) or _is_4bit(getattr(module, "down_proj", None))


def _probe_activation(module):
    """The :class:`ExpertsActivation` ``module._apply_gate`` computes, or (None, why)."""
    from ..ops.experts import ExpertsActivation, act_forward

    if not getattr(module, "has_gate", True):
        return None, "ungated experts (up_proj + activation): not fused"
    if getattr(module, "has_post_expert_norm", False):
        return None, "post-expert norm: not fused"
    w1 = module.gate_up_proj
    two_i = w1.shape[2] if module.is_transposed else w1.shape[1]
    g = torch.Generator(device="cpu").manual_seed(0)
    h = (torch.randn(5, two_i, generator=g) * 4).to(device=w1.device, dtype=torch.float32)
    candidates = [ExpertsActivation(k) for k in ("silu", "gelu", "gelu_tanh")]
    alpha, limit = getattr(module, "alpha", None), getattr(module, "limit", None)
    if isinstance(alpha, (int, float)) and isinstance(limit, (int, float)):
        candidates.append(ExpertsActivation("gpt_oss", alpha=float(alpha), limit=float(limit)))
    try:
        with torch.no_grad():
            got = module._apply_gate(h)
    except Exception as exc:
        return None, f"activation probe failed ({type(exc).__name__})"
    for act in candidates:
        want = act_forward(h, act)
        if want.shape == got.shape and torch.allclose(got, want, rtol=1e-5, atol=1e-5):
            return act, None
    return None, f"{type(module).__name__}._apply_gate is not a known gated activation: implementation kept"


def apply(ctx) -> None:
    from .. import backends
    from ..ops.experts import OP_EXPERTS, OP_EXPERTS_NF4

    root = ctx.wrapper if ctx.wrapper is not None else ctx.model
    backend = ctx.options["backend"]
    found = [(n, m) for n, m in root.named_modules() if is_experts_module(m)]
    if not found:
        ctx.report.skip("experts", "model", "no transformers experts modules (3-D gate_up_proj / down_proj)")
        return
    if backend != "auto":  # 4-bit experts' GEMMs are their own op (the Triton NF4 grouped GEMM or torch)
        for op in {OP_EXPERTS_NF4 if has_4bit_experts(m) else OP_EXPERTS for _, m in found}:
            backends.check_forced(op, found[0][1].gate_up_proj.device, backend)
    register()
    configs, guards = {}, {}
    for name, module in found:
        prev = module.config._experts_implementation_internal
        if prev == _IMPL:  # a config a previous, still active patch switched (should not happen)
            prev = "grouped_mm"
        eager = _eager(module)
        from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

        impl = ALL_EXPERTS_FUNCTIONS.get_interface(prev, eager) if prev not in (None, "eager") else eager
        four_bit = has_4bit_experts(module)
        if four_bit:  # only the eager loop reads 4-bit weights (w[e] dequantises one expert's slice)
            impl = eager

        def original(*args, _impl=impl, _m=module, **kwargs):
            return _impl(_m, *args, **kwargs)

        act, why = _probe_activation(module)
        guard = FusedExpertsForward(module, original, act, backend, unsupported=why, target=name, report=ctx.report)
        ctx.swap(module, _GUARD_ATTR, guard)
        guards[id(module)] = guard
        configs[id(module.config)] = module.config
        if why is not None:
            ctx.report.skip("experts", name, why)
            continue
        w1 = module.gate_up_proj
        nf4 = ""
        if four_bit:
            ws = [w for w in (module.gate_up_proj, module.down_proj) if _is_4bit(w)]
            nbytes, bf16 = sum(w.nbytes for w in ws), sum(2 * w.shape.numel() for w in ws)
            nf4 = (
                f", NF4 weights dequantised inside the GEMMs ({nbytes / 2**20:.2f} MiB, {nbytes / bf16:.2f}x bf16; "
                "fallback: eager loop, one expert at a time)"
            )
        ctx.report.add(
            "experts",
            name,
            f"experts (grouped GEMM), E={w1.shape[0]}, act={act.kind}, bias={bool(module.has_bias)}, "
            f"was {prev or 'eager'}{nf4}",
        )
        if four_bit and not (_is_4bit(module.gate_up_proj) and _is_4bit(module.down_proj)):
            # both 4-bit: fastft::experts_4bit_fwd (its parts are the operator's arguments); mixed: the autograd Function
            ctx.report.runs_eager(
                "experts", "mixed 4-bit (NF4) / 16-bit expert weights run an autograd Function, not an operator"
            )
    for config in configs.values():
        ctx.swap(config, "_experts_implementation_internal", _IMPL)
    from . import experts_lora

    experts_lora.apply(ctx, guards)  # PEFT LoRA on the expert weights (target_parameters), fused


def expert_target_parameters(model) -> list[str]:
    """PEFT ``target_parameters`` naming every experts module's 3-D weights (``["experts.gate_up_proj", ...]``).

    What the trainer adds to ``target_modules="all-linear"`` so LoRA trains the experts too
    (``all-linear`` alone wraps only ``nn.Linear`` layers and leaves 3-D expert weights frozen).
    4-bit experts (:class:`fastft.nn.ExpertsWeight4bit`) are not parameters and are left out:
    PEFT's parameter LoRA cannot wrap packed weights. For QLoRA on them the trainer asks this of
    the 16-bit model, builds the adapter, then quantises the experts inside PEFT's wrappers."""
    out = set()
    for name, module in model.named_modules():
        if is_experts_module(module):
            leaf = name.rsplit(".", 1)[-1]
            for pname in ("gate_up_proj", "up_proj", "down_proj"):
                p = getattr(module, pname, None)
                if isinstance(p, torch.nn.Parameter) and p.dim() == 3:
                    out.add(f"{leaf}.{pname}")
    return sorted(out)
