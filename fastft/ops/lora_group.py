"""Grouped LoRA projections: several LoRA linears reading the same ``x`` as one autograd node.

q/k/v (or gate/up) each read the same input. Run as separate :func:`lora_linear` calls they
each save ``x`` for backward, each build their own ``[N, in]`` ``dX``, and autograd then adds
those. :func:`lora_linear_group` computes ``y_i = x W_i^T + b_i + s_i dropout_i(x) A_i^T B_i^T``
for every member in one node::

    forward   xa = x [A_1; ...; A_k]^T          one rank-(r_1+..+r_k) GEMM (members without dropout)
              y_i = xa_i (s_i B_i)^T + b_i ;  y_i += x W_i^T   (small product first, base in place)
    backward  t_i = dY_i (s_i B_i)                          (N, r_i)
              dX  = [t_1 ... t_k] [A_1; ...; A_k]             one GEMM into the one dX buffer
              dX += dY_i W_i                                 for every member, in place
              [dA_1; ...; dA_k] = [t_1 ... t_k]^T x           one GEMM, fp32 out
              dB_i = s_i dY_i^T xa_i

``x`` is saved once. A member with dropout keeps its own mask (one per layer, as PEFT
draws them): its rank-``r`` products run on their own (the Triton kernels regenerate its
mask, the torch backend draws it from its seed) and its ``(t_i A_i) * M_i`` is added into the
same ``dX``. Precision as :func:`fastft.ops.lora_linear` (``"activation"``: the branch in
``x``'s dtype, adapters cast once per call; ``"peft"``: only when adapters and ``x`` share
a dtype, else use the per-layer op). Base weights are frozen (a trainable base, a 4-bit
base, ``fan_in_fan_out`` or ``lora_bias`` keep the per-layer op).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import backends
from .lora import OP_LORA, _check, _kernels, cast_adapter, draw_seed, mm_to

__all__ = ["LoraMember", "lora_linear_group"]


@dataclass
class LoraMember:
    """One LoRA linear of a group: base ``weight [out, in]`` (+ ``bias``), adapters ``lora_A [r, in]``,
    ``lora_B [out, r]``, ``scaling``, ``dropout_p`` (0 in eval)."""

    weight: torch.Tensor
    lora_A: torch.Tensor
    lora_B: torch.Tensor
    scaling: float
    bias: torch.Tensor | None = None
    dropout_p: float = 0.0


class _LoraGroup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2d, meta, *flat):
        # meta: (scalings, ps, seeds, kernels); flat: (W, b, A, B) per member
        scalings, ps, seeds, K = meta
        k = len(scalings)
        Ws, bs, As_, Bs_ = flat[0::4], flat[1::4], flat[2::4], flat[3::4]
        dt = x2d.dtype
        A = [cast_adapter(a, dt) for a in As_]
        B = [cast_adapter(b, dt, s) for b, s in zip(Bs_, scalings)]  # s_i * B_i
        plain = [i for i in range(k) if ps[i] == 0.0]
        xa = [None] * k
        if plain:  # one GEMM for every member without dropout
            xa_cat = torch.mm(x2d, torch.cat([A[i] for i in plain]).t())  # (N, sum r)
            for i, part in zip(plain, xa_cat.split([A[i].shape[0] for i in plain], dim=1)):
                xa[i] = part
        for i in range(k):
            if ps[i] > 0.0:
                drop = K.dropout(seeds[i], ps[i], x2d.shape, x2d.device, dt)
                xa[i] = K.xa(x2d, A[i], drop)
                del drop
        ys = []
        for i in range(k):
            y = torch.addmm(bs[i], xa[i], B[i].t()) if bs[i] is not None else torch.mm(xa[i], B[i].t())
            ys.append(y.addmm_(x2d, Ws[i].t()))
        ctx.save_for_backward(x2d, *Ws, *A, *B, *xa)  # x once
        ctx.k, ctx.meta, ctx.plain = k, meta, plain
        ctx.set_materialize_grads(False)  # an unused output's gradient stays None: no work for it
        ctx.grad_dtypes = [a.dtype for a in As_]
        ctx.has_bias = [b is not None for b in bs]
        return tuple(ys)

    @staticmethod
    def backward(ctx, *dys):
        k, (scalings, ps, seeds, K), plain = ctx.k, ctx.meta, ctx.plain
        saved = ctx.saved_tensors
        x2d, Ws, A, B, xa = (
            saved[0],
            saved[1 : 1 + k],
            saved[1 + k : 1 + 2 * k],
            saved[1 + 2 * k : 1 + 3 * k],
            saved[1 + 3 * k :],
        )
        need = ctx.needs_input_grad
        need_x = need[0]
        live = [i for i in range(k) if dys[i] is not None]
        t = {i: torch.mm(dys[i], B[i]) for i in live}  # s_i dY_i B_i (N, r_i)
        grads = [None] * (4 * k)
        lp = [i for i in plain if i in live]
        dx = None
        if need_x and live:
            if lp:  # one GEMM for every member without dropout, into the one dX buffer
                dx = torch.mm(torch.cat([t[i] for i in lp], dim=1), torch.cat([A[i] for i in lp]))
                for i in live:
                    dx.addmm_(dys[i], Ws[i])
            else:
                dx = torch.mm(dys[live[0]], Ws[live[0]])
                for i in live[1:]:
                    dx.addmm_(dys[i], Ws[i])
        # dA: one GEMM for the members without dropout, fp32 out
        want_A = [i for i in lp if need[2 + 4 * i + 2]]
        if want_A:
            gdt = ctx.grad_dtypes[want_A[0]]
            dA_cat = mm_to(torch.cat([t[i] for i in want_A], dim=1).t(), x2d, gdt)
            for i, part in zip(want_A, dA_cat.split([A[i].shape[0] for i in want_A])):
                grads[4 * i + 2] = part.to(ctx.grad_dtypes[i])
        for i in live:
            if ps[i] > 0.0 and (need_x or need[2 + 4 * i + 2]):
                drop = K.dropout(seeds[i], ps[i], x2d.shape, x2d.device, A[i].dtype)
                if need_x:
                    dx = K.dx_add_(dx, t[i], A[i], drop)
                if need[2 + 4 * i + 2]:
                    grads[4 * i + 2] = K.dA(t[i], x2d, A[i], drop, ctx.grad_dtypes[i])
                del drop
            if need[2 + 4 * i + 3]:
                grads[4 * i + 3] = mm_to(dys[i].t(), xa[i], ctx.grad_dtypes[i]).mul_(scalings[i])
            if need[2 + 4 * i + 1] and ctx.has_bias[i]:
                grads[4 * i + 1] = dys[i].sum(0)
        return (dx, None, *grads)


@torch.compiler.disable
def lora_linear_group(x: torch.Tensor, members, *, backend: str = "auto") -> tuple[torch.Tensor, ...]:
    """``(y_1, ..., y_k)``, ``y_i`` what :func:`fastft.ops.lora_linear` gives for member ``i``, in one
    autograd node (``x`` saved once, one ``dX``, the rank products concatenated; see the module
    docstring). ``members``: a sequence of :class:`LoraMember` whose base weights are frozen.
    """
    members = list(members)
    if not members or not all(isinstance(m, LoraMember) for m in members):
        raise TypeError("members must be a non-empty sequence of LoraMember")
    dev = x.device.type
    if dev in ("cuda", "cpu") and torch.is_autocast_enabled(dev):  # as nn.Linear: base operands in that dtype
        dt = torch.get_autocast_dtype(dev)
        x = x.to(dt)
        members = [
            LoraMember(m.weight.to(dt), m.lora_A, m.lora_B, m.scaling, m.bias.to(dt) if m.bias is not None else None,
                       m.dropout_p)
            for m in members
        ]  # fmt: skip
        with torch.autocast(dev, enabled=False):
            return lora_linear_group(x, members, backend=backend)
    for j, m in enumerate(members):
        _check(x, m.weight, m.lora_A, m.lora_B, m.scaling, m.bias, None, m.dropout_p, False, None)
        if m.weight.requires_grad:
            raise ValueError(f"member {j}: a trainable base weight is not grouped (use lora_linear)")
    choice = backends.select(OP_LORA, x.device, backend)
    lead = x.shape[:-1]
    x2d = x.reshape(-1, x.shape[-1])
    kernels = _kernels(choice.backend, x2d, members[0].lora_A)
    # one seed (one mask) per member, in member order (as the per-layer calls draw them)
    seeds = tuple(draw_seed(kernels, x.device) if m.dropout_p > 0.0 else 0 for m in members)
    meta = (tuple(float(m.scaling) for m in members), tuple(float(m.dropout_p) for m in members), seeds, kernels)
    flat = []
    for m in members:
        flat += [m.weight, m.bias, m.lora_A, m.lora_B]
    ys = _LoraGroup.apply(x2d, meta, *flat)
    return tuple(y.reshape(*lead, y.shape[-1]) for y in ys)
