"""Grouped LoRA projections in the patch: siblings fed the same tensor run as one autograd node.

Found by structure, not by name: at patch time one tiny forward (8 tokens, ``no_grad``,
eval mode, then the modes restored) runs with a pre-hook on every fused LoRA layer; layers
with the same parent module that received the very same input tensor (q/k/v, gate/up)
form a group. At run time the first member called computes every member's output with
:func:`fastft.ops.lora_group.lora_linear_group` and keeps the others' until they are called
with that same tensor; a call that does not fit (another input, a member in another state,
PEFT's promotion with adapters in another dtype) takes the per-layer path. Groups live on
the swapped forwards, so :func:`fastft.unpatch` removes them with the forwards. Under
torch.compile the stash is Python state dynamo traces (the group node is the operator
``fastft::lora_group``), matched by the input's identity (no version counter in a traced graph).
"""

from __future__ import annotations

import torch
from torch import nn

from ..ops.lora_group import LoraMember, lora_linear_group

FEATURE = "lora-group"


def _version(x):
    """``x``'s version counter, to tell an input mutated in place since the group ran. Under
    torch.compile None: the traced graph is functional (no version counters; reading one would be
    data-dependent), and the stash is matched by the input's identity alone."""
    if torch.compiler.is_compiling():
        return None
    try:
        return x._version
    except RuntimeError:  # an inference-mode tensor: no version counter (and nothing mutates it)
        return None


class LoraGroup:
    """The members (their :class:`FusedLoraForward`) of one group and the outputs not yet taken."""

    def __init__(self, forwards):
        self.forwards = list(forwards)
        for i, f in enumerate(self.forwards):
            f.group, f.group_index = self, i
        self._stash = None  # (x, x version, outputs, indices not yet taken)

    def output(self, fwd, x, adapter):
        """This member's output for ``x`` from the group's one node, or None (per-layer path)."""
        st = self._stash
        i = fwd.group_index
        if st is not None and st[0] is x and st[1] == _version(x) and i in st[3]:
            st[3].discard(i)
            if not st[3]:
                self._stash = None
            return st[2][i]
        members = self._members(x, adapter)
        if members is None:
            return None
        ys = lora_linear_group(x, members, backend=fwd.backend)
        self._stash = (x, _version(x), ys, set(range(len(ys))) - {i})
        return ys[i]

    def _members(self, x, adapter):
        out = []
        for f in self.forwards:
            layer = f.layer
            if f.unfused_reason((), {}) is not None or adapter not in layer.lora_A:
                return None
            if next((a for a in layer.active_adapters if a in layer.lora_A), None) != adapter:
                return None
            base = layer.base_layer
            A, B = layer.lora_A[adapter], layer.lora_B[adapter]
            if f.kind != "linear" or base.weight.requires_grad or B.bias is not None:
                return None
            if x.dtype != base.weight.dtype or A.weight.shape[-1] != x.shape[-1]:
                return None
            if f.precision == "peft" and A.weight.dtype != x.dtype:
                return None
            drop = layer.lora_dropout[adapter]
            p = float(drop.p) if isinstance(drop, nn.Dropout) and drop.training else 0.0
            out.append(LoraMember(base.weight, A.weight, B.weight, layer.scaling[adapter], base.bias, p))
        return out


def _probe(ctx, fused: dict) -> tuple[list, str | None]:
    """Groups of layer names fed the same tensor by one parent, from one tiny forward."""
    model = ctx.wrapper if ctx.wrapper is not None else ctx.model
    config = getattr(ctx.model, "config", None)
    vocab = getattr(config, "vocab_size", None)
    if not vocab:
        return [], "no transformers config to build a probe input from"
    seen = {}
    handles = []

    def hook(name):
        def record(_module, args):
            seen.setdefault(name, id(args[0]) if args else None)  # returns None: the input is untouched

        return record

    for name, (module, _) in fused.items():
        handles.append(module.register_forward_pre_hook(hook(name)))
    modes = {m: m.training for m in model.modules()}
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    try:
        model.eval()
        with torch.no_grad():
            model(input_ids=torch.zeros(1, 8, dtype=torch.long, device=device))
    except Exception as exc:  # noqa: BLE001 - a probe failure only means no grouping
        return [], f"probe forward failed ({type(exc).__name__})"
    finally:
        for h in handles:
            h.remove()
        for m, t in modes.items():
            m.training = t
    by_key = {}
    for name, key in seen.items():
        if key is not None:
            by_key.setdefault((name.rsplit(".", 1)[0] if "." in name else "", key), []).append(name)
    return [names for names in by_key.values() if len(names) > 1], None


def apply(ctx, fused: dict) -> None:
    """Group the fused LoRA layers ``fused`` (name -> (module, FusedLoraForward)), reporting each group."""
    groups, why = _probe(ctx, fused)
    if why is not None:
        ctx.report.skip(FEATURE, "model", f"{why}: every LoRA layer runs on its own")
        return
    for names in groups:
        LoraGroup([fused[n][1] for n in names])
        parent = names[0].rsplit(".", 1)[0]
        leaves = "+".join(n.rsplit(".", 1)[-1] for n in names)
        ctx.report.add(
            FEATURE, parent, f"{leaves}: one autograd node (x saved once, one dX, rank products concatenated)"
        )
    if not groups:
        ctx.report.skip(FEATURE, "model", "no LoRA layers share an input")


__all__ = ["apply", "LoraGroup", "FEATURE"]
