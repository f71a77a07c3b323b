"""fastft's ops as torch.library operators (issue 15): opcheck, and torch.compile with fullgraph=True.

Every converted op is checked with ``torch.library.opcheck`` (schema, autograd registration,
fake tensor, aot dispatch) for every backend that runs here (the Triton kernels in the
interpreter), and its public function compiles with ``fullgraph=True`` (no graph break)
to the eager result, forward and backward.
"""

from __future__ import annotations

import pytest
import torch
from _compile import compiled_matches_eager, no_graph_breaks

import fastft  # noqa: F401  (registers the operators)
from fastft.ops.rms_norm import rms_norm

BACKENDS = ["torch", "triton"]


# --------------------------------------------------------------------------------------
# rms_norm
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("offset", [0.0, 1.0], ids=["llama", "gemma"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", BACKENDS)
def test_rms_norm_opcheck(backend, dtype, offset):
    x = torch.randn(7, 40, dtype=dtype, requires_grad=True)
    w = torch.randn(40, requires_grad=True)
    torch.library.opcheck(torch.ops.fastft.rms_norm_fwd.default, (x, w, 1e-6, offset, backend))
    dy = torch.randn(7, 40, dtype=torch.promote_types(dtype, w.dtype) if offset == 0 else dtype)
    _, rstd = torch.ops.fastft.rms_norm_fwd(x.detach(), w.detach(), 1e-6, offset, backend)
    for need_dx, need_dw in ((True, True), (True, False), (False, True)):
        torch.library.opcheck(
            torch.ops.fastft.rms_norm_bwd.default, (dy, x.detach(), w.detach(), rstd, offset, need_dx, need_dw, backend)
        )


@pytest.mark.parametrize("backend", ["auto", *BACKENDS])
def test_rms_norm_fullgraph(backend):
    x = torch.randn(2, 5, 48, requires_grad=True)
    w = torch.randn(48, requires_grad=True)

    def fn(x, w):
        return rms_norm(x * 2.0, w, 1e-6, offset=1.0, backend=backend) + 1.0

    no_graph_breaks(fn, x, w)
    compiled_matches_eager(fn, [x, w])


# --------------------------------------------------------------------------------------
# swiglu / geglu
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("act", ["silu", "gelu", "gelu_tanh"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", BACKENDS)
def test_gated_act_opcheck(backend, dtype, act):
    gate = torch.randn(3, 5, 33, dtype=dtype, requires_grad=True)
    up = torch.randn(3, 5, 33, dtype=dtype, requires_grad=True)
    torch.library.opcheck(torch.ops.fastft.gated_act_fwd.default, (gate, up, act, backend))
    dout = torch.randn_like(gate)
    torch.library.opcheck(torch.ops.fastft.gated_act_bwd.default, (dout, gate.detach(), up.detach(), act, backend))


@pytest.mark.parametrize("backend", ["auto", *BACKENDS])
def test_gated_act_fullgraph(backend):
    gate = torch.randn(2, 7, 24, requires_grad=True)
    up = torch.randn(2, 7, 24, requires_grad=True)

    def fn(gate, up):
        return fastft.ops.swiglu(gate, up, backend=backend) * 3.0 + fastft.ops.geglu(up, gate, backend=backend)

    no_graph_breaks(fn, gate, up)
    compiled_matches_eager(fn, [gate, up])


# --------------------------------------------------------------------------------------
# rope
# --------------------------------------------------------------------------------------
def _rope_inputs(dtype=torch.float32, R=8, D=12):
    q = torch.randn(2, 3, 5, D, dtype=dtype, requires_grad=True)
    k = torch.randn(2, 1, 5, D, dtype=dtype, requires_grad=True)
    ang = torch.randn(2, 5, R // 2)
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
    return q, k, cos, sin


@pytest.mark.parametrize("backward", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", BACKENDS)
def test_rope_opcheck(backend, dtype, backward):
    q, _, cos, sin = _rope_inputs(dtype)
    c = cos.unsqueeze(1).expand(2, 3, 5, 8)  # the broadcast views rope() passes
    s = sin.unsqueeze(1).expand(2, 3, 5, 8)
    out_dtype = torch.promote_types(dtype, cos.dtype)
    torch.library.opcheck(torch.ops.fastft.rope_rotate.default, (q, c, s, backward, out_dtype, backend))


@pytest.mark.parametrize("partial", [False, True], ids=["full", "partial"])
@pytest.mark.parametrize("backend", ["auto", *BACKENDS])
def test_rope_fullgraph(backend, partial):
    q, k, cos, sin = _rope_inputs(R=8 if partial else 12)

    def fn(q, k, cos, sin):
        qo, ko = fastft.ops.rope(q * 1.5, k, cos, sin, backend=backend)
        return qo.sum(1) + ko.sum(1)

    no_graph_breaks(fn, q, k, cos, sin)
    compiled_matches_eager(fn, [q, k, cos, sin])


# --------------------------------------------------------------------------------------
# cross_entropy / fused_linear_cross_entropy
# --------------------------------------------------------------------------------------
CE_OPTS = [(-100, 0.0, 0.0, None), (-100, 0.1, 1e-3, 4.0)]


def _targets(n, V, ignored=(0, 3)):
    t = torch.randint(0, V, (n,))
    t[list(ignored)] = -100
    return t


@pytest.mark.parametrize("opts", CE_OPTS, ids=["plain", "all_options"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_ce_opcheck(backend, opts):
    x = torch.randn(9, 70, requires_grad=True)
    t = _targets(9, 70)
    torch.library.opcheck(torch.ops.fastft.ce_rows.default, (x, t, *opts, backend))
    g = torch.rand(9)
    torch.library.opcheck(torch.ops.fastft.ce_rows_grad.default, (x.detach(), t, g, *opts, backend))


@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("opts", CE_OPTS, ids=["plain", "all_options"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_flce_opcheck(backend, opts, bias):
    h = torch.randn(11, 16, requires_grad=True)
    w = torch.randn(70, 16, requires_grad=True)
    b = torch.randn(70, requires_grad=True) if bias else None
    t = _targets(11, 70)
    denom = (t != -100).sum().float()
    for need in ((True, True, bias), (True, False, False), (False, False, False)):
        torch.library.opcheck(torch.ops.fastft.flce.default, (h, w, b, t, denom, *need, *opts, backend))
    torch.library.opcheck(torch.ops.fastft.flce_rows.default, (h, w, b, t, *opts, backend))
    frozen = (w.detach(), b.detach() if bias else None)  # a frozen head: per-token d loss / d h from forward
    torch.library.opcheck(torch.ops.fastft.flce_rows_hgrad.default, (h, *frozen, t, *opts, backend))
    g = torch.randn(11)
    dets = (h.detach(), w.detach(), b.detach() if bias else None, t, g)
    for need in ((True, True, bias), (False, True, False)):
        torch.library.opcheck(torch.ops.fastft.flce_rows_grad.default, (*dets, *need, *opts, backend))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("backend", ["auto", *BACKENDS])
def test_ce_fullgraph(backend, reduction):
    x = torch.randn(2, 5, 40, requires_grad=True)
    h = torch.randn(2, 5, 16, requires_grad=True)
    w = torch.randn(40, 16, requires_grad=True)
    t = _targets(10, 40).view(2, 5)

    def fn(x, h, w):
        a = fastft.ops.cross_entropy(x * 2.0, t, reduction=reduction, z_loss=1e-3, backend=backend)
        b = fastft.ops.fused_linear_cross_entropy(h, w, t, reduction=reduction, softcap=5.0, backend=backend)
        return a + b

    no_graph_breaks(fn, x, h, w)
    compiled_matches_eager(fn, [x, h, w])


# --------------------------------------------------------------------------------------
# lora_linear
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("fan_in_fan_out", [False, True], ids=["out_in", "fan_in_fan_out"])
@pytest.mark.parametrize("p", [0.0, 0.2], ids=["nodrop", "dropout"])
@pytest.mark.parametrize("case", ["fp32", "bf16_activation", "bf16_peft"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_lora_opcheck(backend, case, p, fan_in_fan_out):
    dt = torch.float32 if case == "fp32" else torch.bfloat16
    precision = "peft" if case == "bf16_peft" else "activation"
    x = torch.randn(13, 24, dtype=dt, requires_grad=True)
    w = torch.randn(*((24, 20) if fan_in_fan_out else (20, 24)), dtype=dt, requires_grad=True)
    b = torch.randn(20, dtype=dt, requires_grad=True)
    A = torch.randn(4, 24, requires_grad=True)
    B = torch.randn(20, 4, requires_grad=True)
    lb = torch.randn(20, requires_grad=True)
    seed = torch.tensor([12345])
    args = (x, w, b, A, B, lb, 0.5, p, seed, fan_in_fan_out, precision, backend)
    torch.library.opcheck(torch.ops.fastft.lora_linear.default, args)
    _, xa = torch.ops.fastft.lora_linear(*[a.detach() if torch.is_tensor(a) else a for a in args])
    dy = torch.randn(13, 20, dtype=dt)
    det = [t.detach() for t in (x, w, A, B)]
    for needs in ([True] * 6, [True, False, False, True, True, False]):
        torch.library.opcheck(
            torch.ops.fastft.lora_linear_bwd.default,
            (dy, *det, xa, 0.5, p, seed, fan_in_fan_out, precision, backend, needs),
        )


@pytest.mark.parametrize("backend", ["auto", *BACKENDS])
def test_lora_fullgraph(backend):
    x = torch.randn(2, 5, 24, requires_grad=True)
    w = torch.randn(20, 24)
    A = torch.randn(4, 24, requires_grad=True)
    B = torch.randn(20, 4, requires_grad=True)

    def fn(x, A, B):
        return fastft.ops.lora_linear(x * 1.5, w, A, B, 2.0, dropout_p=0.25, backend=backend)

    no_graph_breaks(fn, x, A, B)
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    results = []
    for f in (fn, compiled):  # the dropout seed comes from the generator: same seed, same mask
        leaves = [t.detach().clone().requires_grad_(True) for t in (x, A, B)]
        torch.manual_seed(0)
        y = f(*leaves)
        results.append((y.detach(), torch.autograd.grad(y.sum(), leaves)))
    (ye, ge), (yc, gc) = results
    torch.testing.assert_close(yc, ye, atol=1e-5, rtol=1e-5)
    for a, b in zip(gc, ge):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------
# the grouped LoRA node (lora_linear_group)
# --------------------------------------------------------------------------------------
def _group_members(dtype, ps, bias):
    from fastft.ops.lora_group import LoraMember

    g = torch.Generator().manual_seed(5)
    ms = []
    for j, (o, r) in enumerate(zip((20, 12, 12), (4, 4, 2))):
        w = (torch.randn(o, 24, generator=g) * 0.2).to(dtype)
        b = torch.randn(o, generator=g).to(dtype).requires_grad_(True) if bias else None
        a = (torch.randn(r, 24, generator=g) * 0.3).requires_grad_(True)
        bb = (torch.randn(o, r, generator=g) * 0.3).requires_grad_(True)
        ms.append(LoraMember(w, a, bb, 0.5 + j, bias=b, dropout_p=ps[j]))
    return ms


@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("ps", [(0.0, 0.0, 0.0), (0.0, 0.3, 0.1)], ids=["nodrop", "mixed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", BACKENDS)
def test_lora_group_opcheck(backend, dtype, ps, bias):
    ms = _group_members(dtype, ps, bias)
    x = torch.randn(13, 24, dtype=dtype, requires_grad=True)
    seeds = torch.tensor([0 if p == 0 else 100 + i for i, p in enumerate(ps)])
    lists = ([m.weight for m in ms], [m.bias for m in ms], [m.lora_A for m in ms], [m.lora_B for m in ms])
    args = (x, *lists, [m.scaling for m in ms], list(ps), seeds, backend)
    torch.library.opcheck(torch.ops.fastft.lora_group.default, args)
    out = torch.ops.fastft.lora_group(x.detach(), *[[t.detach() if t is not None else None for t in lst] for lst in lists],
                                      [m.scaling for m in ms], list(ps), seeds, backend)  # fmt: skip
    xas = out[3:]
    dys = [torch.randn_like(y) for y in out[:3]]
    det = [[t.detach() for t in lst] for lst in (lists[0], lists[2], lists[3])]
    for need_x, needs, live in ((True, [True, True, bias] * 3, (0, 1, 2)), (False, [True, False, False] * 3, (1,))):
        d = [dy if i in live else None for i, dy in enumerate(dys)]
        torch.library.opcheck(
            torch.ops.fastft.lora_group_bwd.default,
            (d, x.detach(), *det, xas, [m.scaling for m in ms], list(ps), seeds, backend, need_x, needs),
        )


@pytest.mark.parametrize("backend", ["auto", *BACKENDS])
def test_lora_group_fullgraph(backend):
    from fastft.ops.lora_group import lora_linear_group

    ms = _group_members(torch.float32, (0.0, 0.3, 0.1), True)
    x = torch.randn(2, 5, 24, requires_grad=True)
    leaves0 = [x] + [t for m in ms for t in (m.bias, m.lora_A, m.lora_B)]

    def fn(x, *ts):
        from fastft.ops.lora_group import LoraMember

        members = [LoraMember(m.weight, ts[3 * i + 1], ts[3 * i + 2], m.scaling, ts[3 * i], m.dropout_p)
                   for i, m in enumerate(ms)]  # fmt: skip
        ys = lora_linear_group(x * 1.5, members, backend=backend)
        return torch.cat([y.square().sum(-1) for y in ys], -1)

    no_graph_breaks(fn, *leaves0, one_graph=True)
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    results = []
    for f in (fn, compiled):  # the members' seeds come from the generator: same seeds, same masks
        leaves = [t.detach().clone().requires_grad_(True) for t in leaves0]
        torch.manual_seed(0)
        y = f(*leaves)
        results.append((y.detach(), torch.autograd.grad(y.sum(), leaves)))
    (ye, ge), (yc, gc) = results
    torch.testing.assert_close(yc, ye, atol=1e-5, rtol=1e-5)
    for a, b in zip(gc, ge):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
