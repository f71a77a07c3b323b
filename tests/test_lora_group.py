"""fastft.ops.lora_linear_group: several LoRA linears on one input as one autograd node."""

import pytest
import torch

from fastft.ledger import Ledger
from fastft.ops.lora import lora_linear
from fastft.ops.lora_group import LoraMember, lora_linear_group


def _members(in_f, outs, rs, *, dtype=torch.float32, adapter_dtype=torch.float32, ps=None, bias=True):
    g = torch.Generator().manual_seed(7)
    ps = ps or [0.0] * len(outs)
    ms = []
    for j, (o, r) in enumerate(zip(outs, rs)):
        w = (torch.randn(o, in_f, generator=g) * 0.2).to(dtype)
        b = torch.randn(o, generator=g).to(dtype).requires_grad_(True) if bias else None
        a = (torch.randn(r, in_f, generator=g) * 0.3).to(adapter_dtype).requires_grad_(True)
        bb = (torch.randn(o, r, generator=g) * 0.3).to(adapter_dtype).requires_grad_(True)
        ms.append(LoraMember(w, a, bb, 0.5 + j, bias=b, dropout_p=ps[j]))
    return ms


def _leaves(x, ms):
    return [x] + [t for m in ms for t in (m.bias, m.lora_A, m.lora_B) if t is not None]


@pytest.mark.parametrize("ps", [[0.0, 0.0, 0.0], [0.0, 0.3, 0.1], [0.2, 0.2, 0.2]], ids=["p0", "mixed", "all"])
@pytest.mark.parametrize("lead", [(37,), (3, 5)])
def test_group_equals_the_per_layer_op_fp32(lead, ps):
    """Same numbers as three lora_linear calls (same seeds, so the same per-layer masks), forward and backward."""
    ms = _members(29, [41, 16, 16], [8, 8, 4], ps=ps)
    x = torch.randn(*lead, 29, requires_grad=True)
    torch.manual_seed(3)
    ys = lora_linear_group(x, ms)
    torch.manual_seed(3)
    refs = [lora_linear(x, m.weight, m.lora_A, m.lora_B, m.scaling, bias=m.bias, dropout_p=m.dropout_p) for m in ms]
    gos = [torch.randn_like(r) for r in refs]
    for y, r in zip(ys, refs):
        torch.testing.assert_close(y, r, atol=1e-5, rtol=1e-5)
    got = torch.autograd.grad(ys, _leaves(x, ms), gos)
    want = torch.autograd.grad(refs, _leaves(x, ms), gos)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


def test_bf16_activation_precision_matches_the_per_layer_op():
    ms = _members(48, [40, 24], [16, 8], dtype=torch.bfloat16, ps=[0.0, 0.1])
    x = torch.randn(33, 48).bfloat16().requires_grad_(True)
    torch.manual_seed(4)
    ys = lora_linear_group(x, ms)
    torch.manual_seed(4)
    refs = [lora_linear(x, m.weight, m.lora_A, m.lora_B, m.scaling, bias=m.bias, dropout_p=m.dropout_p) for m in ms]
    for y, r in zip(ys, refs):
        assert y.dtype == torch.bfloat16
        torch.testing.assert_close(y, r, atol=3e-2, rtol=2e-2)
    gos = [torch.randn_like(r) for r in refs]
    got = torch.autograd.grad(ys, _leaves(x, ms), gos)
    want = torch.autograd.grad(refs, _leaves(x, ms), gos)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype
        torch.testing.assert_close(g.float(), w.float(), atol=6e-2, rtol=3e-2)


def test_unused_member_output_gets_no_gradient_work():
    ms = _members(20, [12, 12], [4, 4])
    x = torch.randn(9, 20, requires_grad=True)
    ys = lora_linear_group(x, ms)
    ys[0].sum().backward()
    assert ms[1].lora_A.grad is None and ms[0].lora_A.grad is not None
    ref_x = x.detach().requires_grad_(True)
    m = ms[0]
    lora_linear(ref_x, m.weight, m.lora_A.detach(), m.lora_B.detach(), m.scaling, bias=m.bias.detach()).sum().backward()
    torch.testing.assert_close(x.grad, ref_x.grad)


def test_x_saved_once_and_one_dx_buffer():
    N, in_f = 64, 48
    ms = _members(in_f, [40, 16, 16], [8, 8, 8])
    x = torch.randn(N, in_f, requires_grad=True)
    counts = {}
    for how in ("grouped", "per-layer"):
        with Ledger(min_numel=N * in_f, inside=True) as led:
            with led.section("forward"):
                if how == "grouped":
                    ys = lora_linear_group(x, ms)
                else:
                    ys = [lora_linear(x, m.weight, m.lora_A, m.lora_B, m.scaling, bias=m.bias) for m in ms]
            with led.section("backward"):
                torch.autograd.backward(ys, [torch.ones_like(y) for y in ys])
        counts[how] = (len(led.saved_of((N, in_f))), len(led.temporaries_of((N, in_f), "backward")))
    assert counts["grouped"] == (1, 1)  # x saved once; one [N, in] dX, accumulated in place
    assert counts["per-layer"][0] == 3 and counts["per-layer"][1] > 1


def test_bad_members():
    x = torch.randn(4, 8)
    with pytest.raises(TypeError, match="LoraMember"):
        lora_linear_group(x, [])
    ms = _members(8, [4], [2])
    ms[0].weight.requires_grad_(True)
    with pytest.raises(ValueError, match="trainable base"):
        lora_linear_group(x, ms)
    with pytest.raises(ValueError, match="x shape"):
        lora_linear_group(torch.randn(4, 9), _members(8, [4], [2]))
