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

Operators: ``fastft::lora_group(x2d, weights[], biases[], lora_As[], lora_Bs[], scalings[],
ps[], seeds, backend) -> [y_1..y_k, xa_1..xa_k]`` and ``fastft::lora_group_bwd`` (registered as
its backward; it returns only the gradients asked for, in :func:`_emitted`'s order, since a list
of outputs cannot hold aliasing placeholders), both running :class:`_LoraGroup`'s bodies, so
torch.compile traces the group as one node. The members' dropout seeds are one int64 tensor
drawn from torch's generator before the call (one draw per member with dropout, in member order:
what the per-layer calls draw), so eager and compiled steps draw the same masks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import backends
from .lora import _NO_SEED, OP_LORA, _check, _kernels, _TritonLoraKernels, cast_adapter, mm_to

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


# --------------------------------------------------------------------------------------
# the operators (torch.library: one node each under torch.compile), running the bodies above
# --------------------------------------------------------------------------------------
class _GroupCtx:
    """A stand-in autograd ctx for :class:`_LoraGroup`'s forward and backward bodies."""

    def save_for_backward(self, *tensors):
        self.saved_tensors = tensors

    def set_materialize_grads(self, value):
        pass


def _meta(scalings, ps, seeds, kernels):
    """``_LoraGroup``'s meta: the per-member seeds as its kernels take them (an int for the torch
    products, a (1,) device tensor for the Triton kernels; 0 without dropout)."""
    vals = []
    for i, p in enumerate(ps):
        if p <= 0.0:
            vals.append(0)
        elif kernels is _TritonLoraKernels:
            vals.append(seeds[i : i + 1])
        else:
            vals.append(int(seeds[i].item()))  # the torch seeds live on the CPU: no device sync
    return tuple(scalings), tuple(ps), tuple(vals), kernels


def _own(t, like):
    """An operator output with its own storage (the rank products of several members are slices of
    one concatenated GEMM; outputs may not alias each other): a slice is copied (rank-sized)."""
    whole = t.storage_offset() == 0 and t.untyped_storage().nbytes() == t.numel() * t.element_size()
    return t if whole and t.is_contiguous() else t.clone()


def _flat(weights, biases, As, Bs):
    flat = []
    for w, b, a, bb in zip(weights, biases, As, Bs):
        flat += [w, b, a, bb]
    return flat


@torch.library.custom_op("fastft::lora_group", mutates_args=())
def _group_op(
    x2d: torch.Tensor,
    weights: list[torch.Tensor],
    biases: list[torch.Tensor | None],
    lora_As: list[torch.Tensor],
    lora_Bs: list[torch.Tensor],
    scalings: list[float],
    ps: list[float],
    seeds: torch.Tensor,
    backend: str,
) -> list[torch.Tensor]:
    """``[y_1, ..., y_k, xa_1, ..., xa_k]``: the members' outputs, then their ``(x * M_i) A_i^T``
    (saved for backward)."""
    kernels = _kernels(backends.select(OP_LORA, x2d.device, backend).backend, x2d, lora_As[0])
    ctx = _GroupCtx()
    ys = _LoraGroup.forward(ctx, x2d, _meta(scalings, ps, seeds, kernels), *_flat(weights, biases, lora_As, lora_Bs))
    k = len(ys)
    return list(ys) + [_own(xa, x2d) for xa in ctx.saved_tensors[1 + 3 * k :]]


@_group_op.register_fake
def _(x2d, weights, biases, lora_As, lora_Bs, scalings, ps, seeds, backend):
    n = x2d.shape[0]
    return [x2d.new_empty(n, w.shape[0]) for w in weights] + [x2d.new_empty(n, a.shape[0]) for a in lora_As]


def _emitted(dys, need_x, needs):
    """Which gradients the backward operator returns, in order: ``dx``, then ``dA_i``, ``dB_i``,
    ``dbias_i`` of every member asked for (``needs``: ``[A, B, bias]`` per member) whose output has a
    gradient. Only those: a list of outputs holds no empty placeholders (they would alias)."""
    live = [d is not None for d in dys]
    k = len(dys)
    keys = [("x", 0)] if need_x and any(live) else []
    for j, name in enumerate(("A", "B", "bias")):
        keys += [(name, i) for i in range(k) if needs[3 * i + j] and live[i]]
    return keys


@torch.library.custom_op("fastft::lora_group_bwd", mutates_args=())
def _group_bwd_op(
    dys: list[torch.Tensor | None],
    x2d: torch.Tensor,
    weights: list[torch.Tensor],
    lora_As: list[torch.Tensor],
    lora_Bs: list[torch.Tensor],
    xas: list[torch.Tensor],
    scalings: list[float],
    ps: list[float],
    seeds: torch.Tensor,
    backend: str,
    need_x: bool,
    needs: list[bool],
) -> list[torch.Tensor]:
    """The gradients :func:`_emitted` names (``needs``: ``[A, B, bias]`` per member), in its order."""
    kernels = _kernels(backends.select(OP_LORA, x2d.device, backend).backend, x2d, lora_As[0])
    k, dt = len(weights), x2d.dtype
    ctx = _GroupCtx()
    A = [cast_adapter(a, dt) for a in lora_As]
    B = [cast_adapter(b, dt, s) for b, s in zip(lora_Bs, scalings)]
    ctx.saved_tensors = (x2d, *weights, *A, *B, *xas)
    ctx.k, ctx.meta = k, _meta(scalings, ps, seeds, kernels)
    ctx.plain = [i for i in range(k) if ps[i] == 0.0]
    ctx.grad_dtypes = [a.dtype for a in lora_As]
    ctx.has_bias = [bool(needs[3 * i + 2]) for i in range(k)]
    need = [need_x, False]
    for i in range(k):
        need += [False, needs[3 * i + 2], needs[3 * i], needs[3 * i + 1]]  # W, b, A, B of member i
    ctx.needs_input_grad = tuple(need)
    grads = _LoraGroup.backward(ctx, *dys)
    slot = {"A": 2, "B": 3, "bias": 1}
    return [_own(grads[0] if name == "x" else grads[2 + 4 * i + slot[name]], x2d)
            for name, i in _emitted(dys, need_x, needs)]  # fmt: skip


@_group_bwd_op.register_fake
def _(dys, x2d, weights, lora_As, lora_Bs, xas, scalings, ps, seeds, backend, need_x, needs):
    def fake(name, i):
        if name == "x":
            return x2d.new_empty(x2d.shape)
        if name == "A":
            return x2d.new_empty(lora_As[i].shape, dtype=lora_As[i].dtype)
        if name == "B":
            return x2d.new_empty(lora_Bs[i].shape, dtype=lora_As[i].dtype)
        return x2d.new_empty(weights[i].shape[0])

    return [fake(name, i) for name, i in _emitted(dys, need_x, needs)]


def _group_setup(ctx, inputs, output):
    x2d, weights, biases, lora_As, lora_Bs, scalings, ps, seeds, backend = inputs
    k = len(weights)
    ctx.save_for_backward(x2d, seeds, *weights, *lora_As, *lora_Bs, *output[k:])
    ctx.args = (k, list(scalings), list(ps), backend, [b is not None for b in biases])
    ctx.mark_non_differentiable(*output[k:])
    ctx.set_materialize_grads(False)


def _group_grad(ctx, grads):
    k, scalings, ps, backend, has_bias = ctx.args
    saved = ctx.saved_tensors
    x2d, seeds = saved[0], saved[1]
    weights, As, Bs, xas = (list(saved[2 + j * k : 2 + (j + 1) * k]) for j in range(4))
    _, need_w, need_b, need_A, need_B = ctx.needs_input_grad[:5]
    # a list argument of no tensors (every bias None) is one leaf: one flag, and its gradient is None
    bias_leaf = isinstance(need_b, bool)
    need_b = [need_b] * k if bias_leaf else need_b
    dys = list(grads[:k])
    needs = []
    for i in range(k):
        needs += [bool(need_A[i]), bool(need_B[i]), bool(need_b[i] and has_bias[i])]
    need_x = bool(ctx.needs_input_grad[0])
    none = (None, [None] * k, None if bias_leaf else [None] * k, [None] * k, [None] * k, None, None, None, None)
    if all(d is None for d in dys) or not (need_x or any(needs)):
        return none
    out = _group_bwd_op(dys, x2d, weights, As, Bs, xas, scalings, ps, seeds, backend, need_x, needs)
    got = dict(zip(_emitted(dys, need_x, needs), out))
    dx = got.get(("x", 0))
    dA, dB, db = ([got.get((name, i)) for i in range(k)] for name in ("A", "B", "bias"))
    return dx, [None] * k, None if bias_leaf else db, dA, dB, None, None, None, None


_group_op.register_autograd(_group_grad, setup_context=_group_setup)


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
    if not torch.compiler.is_compiling():  # an unknown or unavailable forced backend raises here
        backends.select(OP_LORA, x.device, backend)
    lead = x.shape[:-1]
    x2d = x.reshape(-1, x.shape[-1])
    # one seed (one mask) per member, in member order (as the per-layer calls draw them): a (1,)
    # int64 tensor each from torch's generator (on the device for CUDA tensors: no host sync)
    seed_dev = x.device if x.device.type == "cuda" else torch.device("cpu")
    if any(m.dropout_p > 0.0 for m in members):
        seeds = torch.cat(
            [torch.randint(0, 2**62, (1,), device=seed_dev) if m.dropout_p > 0.0
             else torch.zeros(1, dtype=torch.int64, device=seed_dev) for m in members]
        )  # fmt: skip
    else:
        seeds = _NO_SEED  # never read: no allocation per call
    ys = torch.ops.fastft.lora_group(
        x2d,
        [m.weight for m in members],
        [m.bias for m in members],
        [m.lora_A for m in members],
        [m.lora_B for m in members],
        [float(m.scaling) for m in members],
        [float(m.dropout_p) for m in members],
        seeds,
        backend,
    )
    return tuple(y.reshape(*lead, y.shape[-1]) for y in ys[: len(members)])
