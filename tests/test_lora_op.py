"""fastft.ops.lora_linear (torch backend) against the formula and PEFT's unfused layers."""

import pytest
import torch

from fastft.ledger import Ledger
from fastft.ops import dropout_mask, lora_linear, lora_linear_reference
from fastft.ops.lora import cast_adapter

TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5)}


def _inputs(lead, in_f, out_f, r, *, dtype=torch.float32, fifo=False, bias=True, lora_bias=False, train_w=False):
    g = torch.Generator().manual_seed(3)

    def rnd(*shape, dt=dtype, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dt).requires_grad_(True)

    x = rnd(*lead, in_f)
    w = rnd(*((in_f, out_f) if fifo else (out_f, in_f)), scale=0.2).detach().requires_grad_(train_w)
    b = rnd(out_f) if bias else None
    A = rnd(r, in_f, scale=0.3)
    B = rnd(out_f, r, scale=0.3)
    lb = rnd(out_f) if lora_bias else None
    return x, w, b, A, B, lb


def _seed_the_op_draws(k):
    torch.manual_seed(k)
    return int(torch.randint(0, 2**62, (1,)).item())


def _grads(y, tensors, go):
    live = [t for t in tensors if t is not None and t.requires_grad]
    return torch.autograd.grad(y, live, go)


@pytest.mark.parametrize("lead", [(37,), (3, 5), (1,)])
@pytest.mark.parametrize("fifo", [False, True])
@pytest.mark.parametrize("p", [0.0, 0.25])
@pytest.mark.parametrize("extras", ["none", "bias", "bias+lora_bias+train_w"])
def test_matches_formula_fp32(lead, fifo, p, extras):
    x, w, b, A, B, lb = _inputs(
        lead, 29, 41, 8, fifo=fifo, bias=extras != "none", lora_bias="lora_bias" in extras, train_w="train_w" in extras
    )
    torch.manual_seed(11)
    y = lora_linear(x, w, A, B, 0.7, bias=b, lora_bias=lb, dropout_p=p, fan_in_fan_out=fifo)
    seed = _seed_the_op_draws(11)
    mask = dropout_mask(seed, (x.numel() // x.shape[-1], x.shape[-1]), p, "cpu").reshape(x.shape) if p else None
    ref = lora_linear_reference(x, w, A, B, 0.7, bias=b, lora_bias=lb, mask=mask, fan_in_fan_out=fifo)
    torch.testing.assert_close(y, ref, **TOL[torch.float32])
    go = torch.randn_like(ref)
    for got, want in zip(_grads(y, (x, w, b, A, B, lb), go), _grads(ref, (x, w, b, A, B, lb), go)):
        torch.testing.assert_close(got, want, **TOL[torch.float32])


@pytest.mark.parametrize("p", [0.0, 0.1])
def test_bf16_base_within_plain_bf16_error(p):
    """bf16 judged against an fp32 oracle, relative to the same formula run in plain bf16."""
    x, w, b, A, B, _ = _inputs((64,), 96, 80, 16, dtype=torch.bfloat16)
    torch.manual_seed(5)
    y = lora_linear(x, w, A, B, 2.0, bias=b, dropout_p=p)
    seed = _seed_the_op_draws(5)
    mask = dropout_mask(seed, tuple(x.shape), p, "cpu") if p else None
    f32 = [t.detach().float().requires_grad_(t.requires_grad) if t is not None else None for t in (x, w, b, A, B)]
    oracle = lora_linear_reference(*f32[:2], f32[3], f32[4], 2.0, bias=f32[2], mask=mask)
    plain = lora_linear_reference(x, w, A, B, 2.0, bias=b, mask=mask)
    assert y.dtype == torch.bfloat16
    err, base = (y.float() - oracle).abs().max(), (plain.float() - oracle).abs().max()
    assert err <= 2 * base + 1e-3
    go = torch.randn_like(oracle)
    for got, pl, orc in zip(
        _grads(y, (x, b, A, B), go.bfloat16()),
        _grads(plain, (x, b, A, B), go.bfloat16()),
        _grads(oracle, (f32[0], f32[2], f32[3], f32[4]), go),
    ):
        assert got.dtype == torch.bfloat16
        assert (got.float() - orc).abs().max() <= 2 * (pl.float() - orc).abs().max() + 1e-2


def test_fp32_adapters_over_bf16_base_follow_peft_promotion():
    x, w, b, _, _, _ = _inputs((16,), 32, 24, 4, dtype=torch.bfloat16)
    _, _, _, A, B, _ = _inputs((16,), 32, 24, 4, dtype=torch.float32)
    y = lora_linear(x, w, A, B, 1.5, bias=b, precision="peft")
    ref = lora_linear_reference(x, w, A, B, 1.5, bias=b)  # result + lora in fp32, cast back: PEFT's order
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, ref, atol=1e-2, rtol=1e-2)
    go = torch.randn_like(y)
    for got, want in zip(_grads(y, (x, A, B), go), _grads(ref, (x, A, B), go)):
        assert got.dtype == want.dtype
        torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)


def test_dropout_is_applied_once_and_unbiased():
    """The mean over many draws is the no-dropout output; single draws vary; base branch untouched."""
    x, w, b, A, B, _ = _inputs((4,), 16, 8, 4)
    x, A, B = x.detach(), A.detach(), B.detach()
    clean = lora_linear(x, w, A, B, 1.0, bias=b).detach()
    base = torch.nn.functional.linear(x, w, b).detach()
    torch.manual_seed(0)
    draws = torch.stack([lora_linear(x, w, A, B, 1.0, bias=b, dropout_p=0.5).detach() for _ in range(4000)])
    assert draws.var(0).mean() > 1e-3  # dropout did something
    mean_lora = (draws - base).mean(0)
    torch.testing.assert_close(mean_lora, clean - base, atol=0.05, rtol=0.05)
    # with A = 0 the LoRA branch vanishes: dropout never touches the base branch
    y0 = lora_linear(x, w, torch.zeros_like(A), B, 1.0, bias=b, dropout_p=0.9)
    torch.testing.assert_close(y0, base)


def test_mask_statistics():
    m = dropout_mask(123, (200, 300), 0.3, "cpu")
    kept = (m > 0).float().mean().item()
    assert abs(kept - 0.7) < 0.01
    assert abs(m.mean().item() - 1.0) < 0.02
    torch.testing.assert_close(m, dropout_mask(123, (200, 300), 0.3, "cpu"))  # same seed, same mask


def test_only_needed_gradients_are_computed():
    x, w, b, A, B, _ = _inputs((10,), 12, 6, 2)
    x = x.detach()  # frozen input, frozen base: only A and B get gradients
    b = b.detach()
    y = lora_linear(x, w, A, B, 1.0, bias=b, dropout_p=0.2)
    y.sum().backward()
    assert A.grad is not None and B.grad is not None and w.grad is None


@pytest.mark.parametrize(
    "mutate, err, match",
    [
        (lambda a: a.update(x=a["x"][..., :-1]), ValueError, "x shape"),
        (lambda a: a.update(A=a["A"][:, :-1]), ValueError, "lora_A shape"),
        (lambda a: a.update(B=a["B"][:-1]), ValueError, "lora_B shape"),
        (lambda a: a.update(x=a["x"].double()), TypeError, "dtype"),
        (lambda a: a.update(x=a["x"].long()), TypeError, "floating-point"),
        (lambda a: a.update(p=1.0), ValueError, "dropout_p"),
        (lambda a: a.update(p=-0.1), ValueError, "dropout_p"),
        (lambda a: a.update(s="2"), TypeError, "scaling"),
        (lambda a: a.update(b=a["b"][:-1]), ValueError, "bias"),
        (lambda a: a.update(backend="cuda"), Exception, "cuda"),
    ],
)
def test_bad_input_is_a_clear_error(mutate, err, match):
    x, w, b, A, B, _ = _inputs((5,), 12, 6, 2)
    a = dict(x=x, w=w, b=b, A=A, B=B, p=0.0, s=1.0, backend="auto")
    mutate(a)
    with pytest.raises(err, match=match):
        lora_linear(a["x"], a["w"], a["A"], a["B"], a["s"], bias=a["b"], dropout_p=a["p"], backend=a["backend"])


def test_under_torch_compile():
    x, w, b, A, B, _ = _inputs((9,), 16, 12, 4)

    def f(x, A, B):
        return lora_linear(x, w, A, B, 0.5, bias=b).square().sum()

    eager = f(x, A, B)
    ge = torch.autograd.grad(eager, (x, A, B))
    compiled = torch.compile(f, backend="aot_eager")(x, A, B)
    gc = torch.autograd.grad(compiled, (x, A, B))
    torch.testing.assert_close(compiled, eager)
    for a, c in zip(ge, gc):
        torch.testing.assert_close(a, c)


def _f32_copies(*ts):
    return [t.detach().float().requires_grad_(t.requires_grad) if t is not None else None for t in ts]


def _bf16_copies(*ts):
    return [t.detach().bfloat16().requires_grad_(t.requires_grad) if t is not None else None for t in ts]


@pytest.mark.parametrize("p", [0.0, 0.2])
@pytest.mark.parametrize("lead, in_f, out_f, r", [((3, 41), 96, 72, 16), ((67,), 50, 130, 8)])
def test_activation_precision_meets_the_bf16_rule(lead, in_f, out_f, r, p):
    """fp32 adapters over a bf16 base, branch in bf16 (the default): error against the fp32 oracle
    <= 2x that of PEFT's own all-bf16 computation, forward and every gradient; dA, dB in fp32."""
    x, w, b, _, _, _ = _inputs(lead, in_f, out_f, r, dtype=torch.bfloat16)
    _, _, _, A, B, lb = _inputs(lead, in_f, out_f, r, lora_bias=True)
    torch.manual_seed(5)
    y = lora_linear(x, w, A, B, 2.0, bias=b, lora_bias=lb, dropout_p=p)
    seed = _seed_the_op_draws(5)
    n = x.numel() // in_f
    mask = dropout_mask(seed, (n, in_f), p, "cpu").reshape(x.shape) if p else None
    fx, fw, fb, fA, fB, flb = _f32_copies(x, w, b, A, B, lb)
    oracle = lora_linear_reference(fx, fw, fA, fB, 2.0, bias=fb, lora_bias=flb, mask=mask)
    bA, bB, blb = _bf16_copies(A, B, lb)  # PEFT's computation with its adapters in bf16
    plain = lora_linear_reference(x, w, bA, bB, 2.0, bias=b, lora_bias=blb, mask=mask)
    assert y.dtype == torch.bfloat16
    assert (y.float() - oracle).abs().max() <= 2 * (plain.float() - oracle).abs().max()
    go = torch.randn(oracle.shape)
    got = _grads(y, (x, b, A, B, lb), go.bfloat16())
    pl = _grads(plain, (x, b, bA, bB, blb), go.bfloat16())
    orc = _grads(oracle, (fx, fb, fA, fB, flb), go)
    for name, g, q, o in zip(("x", "b", "A", "B", "lora_bias"), got, pl, orc):
        want_dtype = torch.float32 if name in ("A", "B", "lora_bias") else torch.bfloat16
        assert g.dtype == want_dtype, name
        assert (g.float() - o).abs().max() <= 2 * (q.float() - o).abs().max(), name


def test_activation_precision_converts_no_activation_sized_tensor():
    N, in_f, out_f, r = 96, 64, 80, 8
    x, w, b, _, _, _ = _inputs((N,), in_f, out_f, r, dtype=torch.bfloat16)
    _, _, _, A, B, _ = _inputs((N,), in_f, out_f, r)
    small = min(N * in_f, N * out_f)
    for precision in ("activation", "peft"):
        with Ledger(min_numel=small, inside=True) as led:
            with led.section("forward"):
                y = lora_linear(x, w, A, B, 2.0, bias=b, dropout_p=0.1, precision=precision)
            with led.section("backward"):
                y.backward(torch.ones_like(y))
        # the torch backend's dropout mask is drawn as bool and scaled in the branch's dtype: not
        # a conversion of an activation (the Triton backend never materialises it)
        big = [c for c in led.conversions_at_least(small) if c.src.dtype.is_floating_point]
        if precision == "activation":
            assert big == [], led.table()
            # forward: x A^T (after the mask), s xa B^T (+ bias), the base GEMM accumulated in place
            assert [o for o in led.ops("forward") if o in ("mm", "addmm", "addmm_")] == ["mm", "addmm", "addmm_"]
            assert "addmm_" in led.ops("backward")  # dY W accumulated onto t A
        else:  # PEFT's promotion: x, dY and the [N, out] sum change dtype
            assert {(c.src.dtype, c.dst.dtype) for c in big} >= {
                (torch.bfloat16, torch.float32),
                (torch.float32, torch.bfloat16),
            }


def test_adapters_are_cast_per_call_and_never_stale():
    """Each call casts the rank-sized adapters in forward and again in backward (the operator saves
    the adapters themselves, not their casts) and never reuses a cast across calls: FSDP2 refills
    parameters in place without bumping their version counter, which a cache keyed on
    (pointer, version) once mistook for no change."""
    x, w, _, _, _, _ = _inputs((20,), 24, 16, 4, dtype=torch.bfloat16)
    _, _, _, A, B, _ = _inputs((20,), 24, 16, 4)
    with Ledger(min_numel=0, inside=True) as led:
        for _ in range(3):  # three forwards + backwards (gradient accumulation)
            lora_linear(x, w, A, B, 1.0).sum().backward()
    casts = [c for c in led.conversions if c.src.shape in ((4, 24), (16, 4)) and c.dst.dtype == torch.bfloat16]
    assert len(casts) == 4 * 3, led.table()
    before = lora_linear(x, w, A, B, 1.0).detach()
    with torch.no_grad(), torch.autograd._unsafe_preserve_version_counter(A):
        A.mul_(2.0)  # what FSDP2's unshard does: new values, same version
    after = lora_linear(x, w, A, B, 1.0).detach()
    torch.testing.assert_close(after, lora_linear(x, w, A.detach().clone(), B, 1.0).detach())
    assert not torch.equal(after, before)
    assert cast_adapter(A, torch.float32) is A


def test_unknown_precision_is_a_clear_error():
    x, w, b, A, B, _ = _inputs((5,), 12, 6, 2)
    with pytest.raises(ValueError, match="precision"):
        lora_linear(x, w, A, B, 1.0, precision="fp8")
