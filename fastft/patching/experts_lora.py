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

4-bit experts (QLoRA that trains them): PEFT wraps parameters only, so the adapter is built on the
16-bit experts and :func:`fastft.quantize` then replaces them by ``ExpertsWeight4bit`` inside the
wrappers (adapters left alone). The fused path passes the 4-bit weights to the op, which
dequantises inside each GEMM (no persistent or saved 16-bit stack). PEFT's own forward
parametrizes the weight and needs a tensor: ``quantize`` gives the outermost wrapper a
:class:`PeftForwardOn4bit` (PEFT's forward on a transient dequantised copy, for unpatched models)
and the fused forward's fallback does the same, reported. PEFT's merge raises a clear error
(:class:`fastft.nn.ExpertsWeight4bit` has no in-place ``data``). The order that cannot work,
``quantize`` before ``get_peft_model`` with expert ``target_parameters``, is reported and warned.
"""

from __future__ import annotations

import contextlib
import warnings

import torch

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

    def fall_back(self, reason: str, *args, **kwargs):
        """PEFT's forward; over 4-bit experts with the adapters on, on a transient dequantised copy."""
        from .experts import has_4bit_experts

        m = self.experts_guard.module
        if not _adapters_applied(self.chain) or not has_4bit_experts(m):
            return super().fall_back(reason, *args, **kwargs)
        self.count(f"{reason} (4-bit experts dequantised for PEFT's forward)")
        with dequantized_experts(m):
            return self.original(*args, **kwargs)

    def __call__(self, x, top_k_index, top_k_weights, *args, **kwargs):
        why = self.unfused_reason(args, kwargs)
        if why is None and not self.forced:
            why = self.experts_guard.misfit(x, top_k_index, top_k_weights, args, kwargs)
        if why is not None:
            return self.fall_back(why, x, top_k_index, top_k_weights, *args, **kwargs)
        return self.fused_or_fall_back(
            lambda: self._fused(x, top_k_index, top_k_weights), (x, top_k_index, top_k_weights, *args), kwargs
        )


def _adapters_applied(chain) -> bool:
    """PEFT's forward would parametrize an expert weight (adapters on and not merged)."""
    return any(not w.disable_adapters and not w.merged and any(a in w.lora_A for a in w.active_adapters) for w in chain)


@contextlib.contextmanager
def dequantized_experts(module):
    """For the call: ``module``'s 4-bit expert weights as frozen 16-bit parameters (what PEFT's
    parametrization needs), the 4-bit ones put back after. The 16-bit copy lives as long as the
    autograd graph that saved it: a fallback's cost, never the fused path's."""
    from ..nn import ExpertsWeight4bit

    saved = {}
    try:
        for pname in ("gate_up_proj", "down_proj"):
            w = getattr(module, pname, None)
            if isinstance(w, ExpertsWeight4bit):
                saved[pname] = w
                delattr(module, pname)
                setattr(module, pname, torch.nn.Parameter(w.dequantize(), requires_grad=False))
        yield module
    finally:
        for pname, w in saved.items():
            if pname in module._parameters:
                delattr(module, pname)
            setattr(module, pname, w)


class PeftForwardOn4bit:
    """The ``forward`` :func:`fastft.quantize` gives the outermost PEFT ``ParamWrapper`` around experts it
    quantised: PEFT's own forward, unpatched models included (``fastft generate``, user code without
    ``fastft.patch``), which parametrizes the expert weight and so needs a tensor there. With adapters
    applied the call runs on a transient dequantised 16-bit copy (:func:`dequantized_experts`); with
    them disabled or merged the base experts run on the 4-bit weights. ``fastft.patch`` replaces it by
    the fused :class:`FusedExpertsLoraForward` (and keeps it as that one's fallback)."""

    def __init__(self, wrapper, chain, base):
        self.wrapper, self.chain, self.base = wrapper, chain, base

    def __call__(self, *args, **kwargs):
        from .experts import has_4bit_experts

        forward = type(self.wrapper).forward
        if not _adapters_applied(self.chain) or not has_4bit_experts(self.base):
            return forward(self.wrapper, *args, **kwargs)
        with dequantized_experts(self.base):
            return forward(self.wrapper, *args, **kwargs)


def guard_4bit_wrappers(root) -> int:
    """Give every ParamWrapper chain around 4-bit experts a :class:`PeftForwardOn4bit` (idempotent);
    how many chains have one."""
    from .experts import has_4bit_experts

    n = 0
    for _, outer, chain, base in chains(root):
        if not has_4bit_experts(base):
            continue
        n += 1
        if not isinstance(outer.__dict__.get("forward"), (PeftForwardOn4bit, FusedExpertsLoraForward)):
            outer.forward = PeftForwardOn4bit(outer, chain, base)
    return n


def _ranks(chain) -> str:
    parts = []
    for w in chain:
        rs = sorted({int(w.r[a]) for a in w.lora_A})
        parts.append(f"{w.parameter_name} r={'/'.join(map(str, rs))}")
    return ", ".join(reversed(parts))


def apply(ctx, guards: dict) -> None:
    """Fuse every ParamWrapper chain around an experts module in ``guards`` (``id(module) -> guard``)."""
    from .experts import has_4bit_experts

    root = ctx.wrapper if ctx.wrapper is not None else ctx.model
    _unwrapped_4bit_targets(ctx, root)
    if any(has_4bit_experts(base) for _, _, _, base in chains(root)):
        from .merge_4bit import guard_experts_merge

        guard_experts_merge(ctx)  # merging raises before any layer merges, not half-way through the model
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
        nf4 = (
            ", 4-bit (NF4) base dequantised inside the GEMMs (fallback: PEFT's forward on a transient 16-bit copy)"
            if has_4bit_experts(base)
            else ""
        )
        ctx.report.add(FEATURE, target, f"experts + LoRA (fused), {_ranks(chain)}, no delta weight formed, {prec}{nf4}")


def _unwrapped_4bit_targets(ctx, root) -> None:
    """The order that cannot work: ``fastft.quantize`` before ``get_peft_model`` with ``target_parameters``
    naming expert weights (given, or added by PEFT's own transformers-v5 MoE conversion of names such as
    ``gate_proj`` / ``all-linear``). PEFT then finds no parameter to wrap (a packed 4-bit weight is a
    module) and the experts train nothing: reported per weight, and one warning naming the right order.
    Not an error: LoRA on the linear layers over frozen 4-bit experts is a valid QLoRA."""
    from .experts import has_4bit_experts, is_experts_module

    wanted = set()
    for cfg in (getattr(root, "peft_config", None) or {}).values():
        wanted |= set(getattr(cfg, "target_parameters", None) or ())
    if not wanted:
        return
    wrapped = {id(base) for _, _, _, base in chains(root)}
    missed = []
    for name, module in root.named_modules():
        if id(module) in wrapped or not is_experts_module(module) or not has_4bit_experts(module):
            continue
        plain = name.replace(".base_layer", "")
        for pname in ("gate_up_proj", "down_proj"):
            key = f"{plain}.{pname}"
            hit = sorted(t for t in wanted if key == t or key.endswith(f".{t}"))
            if hit:
                missed.append(key)
                ctx.report.skip(FEATURE, f"{key} (LoRA)", f"target_parameters {hit}: {_ORDER}")
    if missed:
        warnings.warn(f"fastft: {len(missed)} expert weights named by LoRA target_parameters are 4-bit: {_ORDER}",
                      stacklevel=5)  # fmt: skip


_ORDER = (
    "a 4-bit (NF4) expert weight PEFT did not wrap (fastft.quantize ran before get_peft_model; PEFT's "
    "target_parameters cannot wrap a packed weight), so it stays frozen. For LoRA on 4-bit experts build the "
    "adapter on the 16-bit model, then quantise: peft_model = get_peft_model(model, config); "
    "fastft.quantize(peft_model); fastft.patch(peft_model)"
)


def is_expert_lora_layer(module) -> bool:
    """A PEFT ParamWrapper (LoRA on a parameter) around an experts module: the experts feature's business."""
    from .experts import is_experts_module

    if not is_param_wrapper(module):
        return False
    base = module
    while is_param_wrapper(base):
        base = base.base_layer
    return is_experts_module(base)


__all__ = [
    "apply",
    "chains",
    "dequantized_experts",
    "FusedExpertsLoraForward",
    "guard_4bit_wrappers",
    "is_expert_lora_layer",
]
