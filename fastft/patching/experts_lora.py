"""PEFT LoRA on expert weights (``target_parameters``), fused into the experts op.

PEFT adapts a 3-D expert weight with a ``ParamWrapper`` around the experts module (two nested
wrappers when both ``gate_up_proj`` and ``down_proj`` are targeted). Its forward registers a
parametrization that replaces the weight by ``W + s B A`` for the call: a delta the size of the
whole expert stack is formed (and, for a 16-bit base, materialised) on every forward, and its
gradient flows back through it. The patch swaps the *outermost* wrapper's ``forward`` for a
:class:`FusedExpertsLoraForward`, which calls :func:`fastft.ops.experts` with the raw expert
weights and the adapters as ``ExpertsLora`` factors (views of PEFT's ``lora_A`` / ``lora_B``
weights, so gradients land in PEFT's parameters): ``x W + s (x A) B`` per expert, no delta.

PEFT's modules and parameters stay as they are (state dict, ``save_pretrained``, merging). Per
call the guard checks that every wrapper of the chain is in the state the fused op computes:
adapters enabled, not merged, exactly one active adapter and no LoRA variant; and that the
experts module itself fits the fused experts op (:class:`~fastft.patching.experts.FusedExpertsForward`'s
checks). Otherwise PEFT's own forward runs (counted in ``report.fallbacks``): under
``disable_adapter()`` that is the base experts module, itself fused by the experts patch.
"""

from __future__ import annotations

from .guard import GuardedForward

FEATURE = "experts"


def _param_wrapper_type():
    try:
        from peft.tuners.lora.layer import ParamWrapper
    except Exception:  # pragma: no cover - peft is a dependency
        return None
    return ParamWrapper


def is_param_wrapper(module) -> bool:
    pw = _param_wrapper_type()
    return pw is not None and isinstance(module, pw)


def chains(root):
    """``[(name, outermost wrapper, [wrappers outside-in], base module)]`` for every ParamWrapper chain."""
    wrappers = [(n, m) for n, m in root.named_modules() if is_param_wrapper(m)]
    inner = {id(m.base_layer) for _, m in wrappers}
    out = []
    for name, m in wrappers:
        if id(m) in inner:
            continue
        chain, base = [], m
        while is_param_wrapper(base):
            chain.append(base)
            base = base.base_layer
        out.append((name, m, chain, base))
    return out


def _factors(wrapper, adapter):
    """``ExpertsLora`` views of one wrapper's adapter: ``A (E, r, in)``, ``B (E, out, r)`` (PEFT's layout:
    ``lora_A.weight (E r, in)`` rows expert-major, ``lora_B.weight (out, r E)`` columns expert-minor)."""
    from ..ops.experts import ExpertsLora

    E = wrapper.num_experts
    A = wrapper.lora_A[adapter].weight
    B = wrapper.lora_B[adapter].weight
    A = A.view(E, -1, A.shape[-1])
    B = B.view(B.shape[0], -1, E).permute(2, 0, 1)
    return ExpertsLora(A, B, float(wrapper.scaling[adapter]))


class FusedExpertsLoraForward(GuardedForward):
    """The patched ``forward`` of the outermost PEFT ``ParamWrapper`` around one experts module."""

    feature = FEATURE

    def __init__(self, chain, experts_guard, original, backend: str, **where):
        super().__init__(original, backend, **where)
        self.chain = chain
        self.experts_guard = experts_guard  # the experts module's FusedExpertsForward (its checks, its act)

    def unfused_reason(self, args, kwargs) -> str | None:
        if args or kwargs:
            return "extra forward arguments"
        for w in self.chain:
            if w.disable_adapters:
                return "adapters disabled"
            if w.merged:
                return "adapter merged into the expert weights"
            active = [a for a in w.active_adapters if a in w.lora_A]
            if len(active) != 1:
                return f"{len(active)} active adapters on {w.parameter_name}"
            if active[0] in getattr(w, "lora_variant", {}):
                return f"LoRA variant {type(w.lora_variant[active[0]]).__name__} on {w.parameter_name}"
            if w.lora_B[active[0]].bias is not None:
                return f"lora_bias on {w.parameter_name}"
        return None

    def _fused(self, x, idx, w):
        from ..ops.experts import experts

        m = self.experts_guard.module
        lora = {}
        for wr in self.chain:
            adapter = next(a for a in wr.active_adapters if a in wr.lora_A)
            lora[wr.parameter_name] = _factors(wr, adapter)
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
            act=self.experts_guard.act,
            transposed=m.is_transposed,
            backend=self.backend,
            lora_gate_up=lora.get("gate_up_proj"),
            lora_down=lora.get("down_proj"),
        )

    def __call__(self, x, top_k_index, top_k_weights, *args, **kwargs):
        why = self.unfused_reason(args, kwargs)
        if why is None and not self.forced:
            why = self.experts_guard.misfit(x, top_k_index, top_k_weights, args, kwargs)
        if why is not None:
            return self.fall_back(why, x, top_k_index, top_k_weights, *args, **kwargs)
        return self.fused_or_fall_back(
            lambda: self._fused(x, top_k_index, top_k_weights), (x, top_k_index, top_k_weights, *args), kwargs
        )


def _ranks(chain) -> str:
    parts = []
    for w in chain:
        rs = sorted({int(w.r[a]) for a in w.lora_A})
        parts.append(f"{w.parameter_name} r={'/'.join(map(str, rs))}")
    return ", ".join(reversed(parts))


def apply(ctx, guards: dict) -> None:
    """Fuse every ParamWrapper chain around an experts module in ``guards`` (``id(module) -> guard``)."""
    root = ctx.wrapper if ctx.wrapper is not None else ctx.model
    for name, outer, chain, base in chains(root):
        guard = guards.get(id(base))
        if guard is None:
            continue  # not an experts module: PEFT's forward, reported by the LoRA feature
        target = f"{name} (LoRA)"
        names = {w.parameter_name for w in chain}
        if guard.unsupported is not None:
            why = f"experts module not fused ({guard.unsupported}): PEFT's forward is kept"
            ctx.report.skip(FEATURE, target, why)
            continue
        if not names <= {"gate_up_proj", "down_proj"}:
            ctx.report.skip(FEATURE, target, f"LoRA on {sorted(names)}: only gate_up_proj / down_proj are fused")
            continue
        variants = [a for w in chain for a in w.lora_A if a in getattr(w, "lora_variant", {})]
        if variants:
            ctx.report.skip(FEATURE, target, "LoRA variant (e.g. DoRA): PEFT's forward is kept")
            continue
        fwd = FusedExpertsLoraForward(chain, guard, outer.forward, ctx.options["backend"], target=target,
                                      report=ctx.report)  # fmt: skip
        ctx.swap(outer, "forward", fwd)
        dts = sorted({str(p.dtype).replace("torch.", "") for w in chain for p in w.lora_A.parameters()})
        base_dt = str(base.gate_up_proj.dtype).replace("torch.", "")
        prec = (
            f"branch in {base_dt}"
            if dts == [base_dt]
            else f"{'/'.join(dts)} adapters cast once per call, branch in the activation dtype"
        )
        ctx.report.add(FEATURE, target, f"experts + LoRA (fused), {_ranks(chain)}, no delta weight formed, {prec}")


def is_expert_lora_layer(module) -> bool:
    """A PEFT ParamWrapper (LoRA on a parameter) around an experts module: the experts feature's business."""
    from .experts import is_experts_module

    if not is_param_wrapper(module):
        return False
    base = module
    while is_param_wrapper(base):
        base = base.base_layer
    return is_experts_module(base)


__all__ = ["apply", "chains", "FusedExpertsLoraForward", "is_expert_lora_layer"]
