"""fastft.ops.lora_linear (torch backend) against the formula and PEFT's unfused layers."""

import pytest
import torch

from fastft.ops import dropout_mask, lora_linear, lora_linear_reference

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
    y = lora_linear(x, w, A, B, 1.5, bias=b)
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
