"""Shared by the cross-entropy tests (test_cross_entropy*.py): tolerances, input makers (logits and
targets; hidden, weight, bias and targets for the fused linear CE), the low-precision rule (no
worse than twice plain PyTorch in that dtype, against an fp32 oracle) and plain PyTorch's
low-precision cross-entropy; their fixtures (``small_chunks``, ``narrow_tiles``,
``count_triton``) are in conftest.py.

Moved out of tests/test_cross_entropy.py, unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastft import backends

BACKENDS = ["torch", "triton"]
REDUCTIONS = ["mean", "sum", "none"]
IGNORE = -100

# {dtype: (atol, rtol)} for direct comparisons with an fp32 oracle
TOL = {
    torch.float32: (2e-5, 1e-5),
    torch.bfloat16: (2e-2, 2e-2),
    torch.float16: (5e-3, 5e-3),
}
# slack added to "no worse than twice plain PyTorch in that dtype"
LOWP_ATOL = {torch.bfloat16: 1e-3}


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------
def _logits_target(lead, V, dtype=torch.float32, ignore_frac=0.25, scale=3.0):
    lead = tuple(lead)
    x = (torch.randn(*lead, V) * scale).to(dtype)
    t = torch.randint(0, V, lead)
    t[torch.rand(lead) < ignore_frac] = IGNORE
    if t.numel() and bool((t == IGNORE).all()):
        t.view(-1)[0] = 0
    return x, t


def _loss_and_grads(fn, inputs, upstream=None):
    """Loss of ``fn(*inputs)`` and the gradients of every input (fresh leaves)."""
    leaves = [i.detach().clone().requires_grad_(True) for i in inputs]
    loss = fn(*leaves)
    g = upstream if upstream is not None else torch.ones_like(loss)
    grads = torch.autograd.grad(loss, leaves, g)
    return loss.detach(), grads


def _upstream(reduction, shape):
    return torch.randn(shape) if reduction == "none" else None


def _assert_close(actual, expected, dtype=torch.float32, what=""):
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(actual.float(), expected.float(), atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")


def _max_err(a, b):
    return (a.float() - b.float()).abs().max().item()


def _interpreter_rounding_slack(backend, oracle, dtype):
    """The Triton interpreter converts fp32 to bf16 by truncation (a GPU rounds to nearest
    even), which costs up to one more bf16 ulp on values written in bf16 by a kernel."""
    if backend != "triton" or dtype != torch.bfloat16 or not backends.interpreting():
        return 0.0
    biggest = oracle.float().abs().max().item()
    return 2.0 ** (torch.tensor(biggest).log2().floor().item() - 7) if biggest > 0 else 0.0


def _assert_no_worse_than_lowp(ours, lowp, oracle, dtype, what="", slack=0.0):
    """flash-attention style: our error vs the fp32 oracle is at most twice plain PyTorch's in ``dtype``."""
    err, base = _max_err(ours, oracle), _max_err(lowp, oracle)
    bound = 2 * base + LOWP_ATOL[dtype] + slack
    assert err <= bound, f"{what}: error {err:.3g} vs plain {dtype} PyTorch {base:.3g} (slack {slack:.3g})"


def _plain_lowp_ce(x, t, *, reduction="mean", label_smoothing=0.0, z_loss=0.0, softcap=None, num_items_in_batch=None):
    """What plain PyTorch code computes in ``x.dtype`` (no upcast)."""
    V = x.shape[-1]
    z, tt = x.reshape(-1, V), t.reshape(-1)
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    loss = F.cross_entropy(z, tt, ignore_index=IGNORE, reduction="none", label_smoothing=label_smoothing)
    if z_loss:
        lse2 = torch.logsumexp(z, -1).square()
        loss = loss + z_loss * torch.where(tt != IGNORE, lse2, torch.zeros_like(lse2))
    if reduction == "none":
        return loss.reshape(t.shape)
    if reduction == "sum":
        return loss.sum()
    n = num_items_in_batch if num_items_in_batch is not None else (tt != IGNORE).sum()
    return loss.sum() / n


def _flce_inputs(lead, H=32, V=300, dtype=torch.float32, bias=True):
    h = torch.randn(*lead, H).to(dtype)
    w = (torch.randn(V, H) * H**-0.5 * 2).to(dtype)
    b = (torch.randn(V) * 0.5).to(dtype) if bias else None
    t = torch.randint(0, V, lead)
    t[torch.rand(lead) < 0.25] = IGNORE
    return h, w, b, t
