"""fastft.ops.fused_linear_logprobs against the materialised-logits reference (and plain torch).

Both backends (``triton`` runs in the interpreter on CPU, see conftest.py); forward and backward
to hidden, weight and bias; fp32 tables and the bf16 rule (error against the fp32 oracle at most
twice plain bf16 PyTorch's, plus a small slack); odd shapes, padding, packed segments, all-ignored
rows, softcap, temperature, small chunks (several chunks per call), bad input.
"""

import pytest
import torch

from fastft.ops import fused_linear_logprobs, fused_linear_logprobs_reference

BACKENDS = ["torch", "triton"]
IGNORE = -100
TOL = {torch.float32: (3e-5, 1e-5), torch.bfloat16: (3e-2, 2e-2)}


@pytest.fixture
def small_chunks(monkeypatch):
    monkeypatch.setenv("FASTFT_CE_CHUNK_MB", "0.01")  # chunk_rows' minimum of 16 rows


def _inputs(lead, H, V, *, dtype=torch.float32, bias=False, ignore_frac=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = (torch.randn(*lead, H, generator=g) * 0.7).to(dtype)
    w = (torch.randn(V, H, generator=g) * 0.5).to(dtype)
    b = (torch.randn(V, generator=g) * 0.3).to(dtype) if bias else None
    t = torch.randint(0, V, lead, generator=g)
    t[torch.rand(lead, generator=g) < ignore_frac] = IGNORE
    return h, w, b, t


def _run(fn, h, w, b, up):
    leaves = [x.detach().clone().requires_grad_(True) for x in (h, w, b) if x is not None]
    out = fn(*leaves) if b is not None else fn(*leaves, None)
    grads = torch.autograd.grad(out, leaves, up(out))
    return out.detach(), grads


def _close(a, b, dtype, what):
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(a.float(), b.float(), atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")


def _upstream(seed=1):
    return lambda out: torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))


CASES = {
    "sum": dict(reduction="sum"),
    "mean": dict(reduction="mean"),
    "none": dict(reduction="none"),
    "softcap": dict(reduction="sum", softcap=2.5),
    "temperature": dict(reduction="mean", temperature=0.6),
    "softcap+temperature": dict(reduction="sum", softcap=4.0, temperature=1.7),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize(
    "shape", [((3, 11), 24, 101), ((2, 5, 7), 16, 37), ((1, 1), 8, 3)], ids=["3x11", "2x5x7", "1x1"]
)
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_the_reference_fp32(backend, shape, case, small_chunks):
    lead, H, V = shape
    h, w, b, t = _inputs(lead, H, V, bias=case == "sum")
    kw = CASES[case]
    got, g_got = _run(lambda h, w, b: fused_linear_logprobs(h, w, t, b, backend=backend, **kw), h, w, b, _upstream())
    ref, g_ref = _run(lambda h, w, b: fused_linear_logprobs_reference(h, w, t, b, **kw), h, w, b, _upstream())
    want_shape = lead if kw["reduction"] == "none" else lead[:-1]
    assert got.shape == want_shape and got.dtype == torch.float32
    _close(got, ref, torch.float32, "logprobs")
    for name, a, r in zip("hwb", g_got, g_ref):
        _close(a, r, torch.float32, f"grad {name}")


def test_reference_is_torch_log_softmax():
    h, w, _, t = _inputs((2, 6), 8, 13)
    logp = torch.log_softmax(h @ w.T, -1).gather(-1, t.clamp(min=0)[..., None])[..., 0]
    want = torch.where(t != IGNORE, logp, 0.0).sum(-1)
    torch.testing.assert_close(fused_linear_logprobs_reference(h, w, t), want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_is_no_worse_than_plain_bf16_pytorch(backend):
    h, w, b, t = _inputs((4, 13), 32, 129, dtype=torch.bfloat16)
    kw = dict(reduction="sum")
    got, g_got = _run(lambda h, w, b: fused_linear_logprobs(h, w, t, b, backend=backend, **kw), h, w, b, _upstream())
    ref, g_ref = _run(
        lambda h, w, b: fused_linear_logprobs_reference(h, w, t, b, **kw), h.float(), w.float(), None, _upstream()
    )

    def plain(h, w, b):  # what plain bf16 PyTorch code computes (no upcast)
        logp = torch.log_softmax(h @ w.T, -1).gather(-1, t.clamp(min=0)[..., None])[..., 0]
        return torch.where(t != IGNORE, logp, torch.zeros_like(logp)).sum(-1)

    low, g_low = _run(plain, h, w, b, _upstream())
    for what, a, lo, r in [("logprobs", got, low, ref)] + [
        (f"grad {n}", *x) for n, x in zip("hw", zip(g_got, g_low, g_ref))
    ]:
        err = (a.float() - r.float()).abs().max().item()
        base = (lo.float() - r.float()).abs().max().item()
        slack = 2.0 ** (r.float().abs().max().log2().floor().item() - 7)  # one bf16 ulp (interpreter truncation)
        assert err <= 2 * base + 1e-3 + slack, f"{what}: {err:.3g} vs plain bf16 {base:.3g}"
    assert got.dtype == torch.float32 and g_got[0].dtype == torch.bfloat16


@pytest.mark.parametrize("backend", BACKENDS)
def test_padding_and_all_ignored_rows(backend):
    h, w, b, t = _inputs((4, 9), 16, 41, ignore_frac=0.0)
    t[1] = IGNORE  # a row with nothing counted: 0, gradient 0, never NaN
    t[2, 6:] = IGNORE  # right padding
    t[3, :4] = IGNORE  # a prompt
    for red in ("sum", "mean"):
        got, (gh, gw) = _run(
            lambda h, w, b, red=red: fused_linear_logprobs(h, w, t, reduction=red, backend=backend),
            h,
            w,
            None,
            _upstream(),
        )
        ref, (rh, rw) = _run(
            lambda h, w, b, red=red: fused_linear_logprobs_reference(h, w, t, reduction=red), h, w, None, _upstream()
        )
        assert got[1] == 0 and torch.isfinite(got).all() and (gh[1] == 0).all() and (gh[2, 6:] == 0).all()
        _close(got, ref, torch.float32, red)
        _close(gh, rh, torch.float32, "grad h")
        _close(gw, rw, torch.float32, "grad w")
    all_ignored = torch.full_like(t, IGNORE)
    out = fused_linear_logprobs(h.requires_grad_(True), w, all_ignored, reduction="mean", backend=backend)
    assert (out == 0).all()
    (g,) = torch.autograd.grad(out.sum(), h)
    assert (g == 0).all()


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_packed_segments_equal_the_sequences_run_alone(backend, reduction):
    """Two rows packing 3 and 2 sequences (and padding, segment -1): per-segment values equal each
    sequence's own log-probability computed separately."""
    H, V = 16, 53
    g = torch.Generator().manual_seed(4)
    lengths = [[4, 3, 5], [6, 4]]
    T = 13
    h = torch.randn(2, T, H, generator=g)
    w = torch.randn(V, H, generator=g) * 0.5
    t = torch.randint(0, V, (2, T), generator=g)
    seg = torch.full((2, T), -1)
    for r, ls in enumerate(lengths):
        start = 0
        for s, n in enumerate(ls):
            seg[r, start : start + n] = s
            t[r, start] = IGNORE  # each segment's first position is a prompt token
            start += n
    t[seg < 0] = IGNORE
    got = fused_linear_logprobs(h, w, t, segment_ids=seg, reduction=reduction, backend=backend)
    assert got.shape == (2, 3)
    assert got[1, 2] == 0  # row 1 has no third segment
    for r, ls in enumerate(lengths):
        start = 0
        for s, n in enumerate(ls):
            alone = fused_linear_logprobs_reference(
                h[r, start : start + n], w, t[r, start : start + n], reduction=reduction
            )
            torch.testing.assert_close(got[r, s], alone, atol=3e-5, rtol=1e-5)
            start += n
    fixed = fused_linear_logprobs(h, w, t, segment_ids=seg, num_segments=5, reduction=reduction, backend=backend)
    assert fixed.shape == (2, 5) and torch.equal(fixed[:, :3], got) and (fixed[:, 3:] == 0).all()
    # gradients as the reference's
    ref, gr = _run(
        lambda h, w, b: fused_linear_logprobs_reference(h, w, t, segment_ids=seg, reduction=reduction),
        h,
        w,
        None,
        _upstream(),
    )
    out, go = _run(
        lambda h, w, b: fused_linear_logprobs(h, w, t, segment_ids=seg, reduction=reduction, backend=backend),
        h,
        w,
        None,
        _upstream(),
    )
    for a, b_ in zip(go, gr):
        _close(a, b_, torch.float32, "grad")


def _run_frozen_head(fn, h, w, b, up):
    """Only ``hidden`` is a leaf (a LoRA run's frozen head): the ``fastft::flce_rows_hgrad`` path."""
    h = h.detach().clone().requires_grad_(True)
    out = fn(h, w, b)
    (g,) = torch.autograd.grad(out, h, up(out))
    return out.detach(), g


def _uses_hgrad(out) -> bool:
    seen, todo = set(), [out.grad_fn]
    while todo:
        f = todo.pop()
        if f is None or f in seen:
            continue
        seen.add(f)
        if "flce_rows_hgrad" in type(f).__name__:
            return True
        todo += [n for n, _ in f.next_functions]
    return False


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_frozen_head_fp32_matches_the_reference(backend, case, small_chunks):
    """Frozen head: each token's d logp / d h comes from forward (no logits recomputed in backward)."""
    h, w, b, t = _inputs((3, 11), 24, 101, bias=case == "sum")
    kw = CASES[case]
    h1 = h.detach().clone().requires_grad_(True)
    assert _uses_hgrad(fused_linear_logprobs(h1, w, t, b, backend=backend, **kw))
    got, g_got = _run_frozen_head(
        lambda h, w, b: fused_linear_logprobs(h, w, t, b, backend=backend, **kw), h, w, b, _upstream()
    )
    ref, g_ref = _run_frozen_head(lambda h, w, b: fused_linear_logprobs_reference(h, w, t, b, **kw), h, w, b,
                                  _upstream())  # fmt: skip
    _close(got, ref, torch.float32, "logprobs")
    _close(g_got, g_ref, torch.float32, "grad h")
    assert (g_got.reshape(-1, 24)[(t == IGNORE).reshape(-1)] == 0).all()  # ignored tokens: no gradient


@pytest.mark.parametrize("backend", BACKENDS)
def test_frozen_head_bf16_is_no_worse_than_plain_bf16_pytorch(backend):
    h, w, b, t = _inputs((4, 13), 32, 129, dtype=torch.bfloat16)
    got, g_got = _run_frozen_head(lambda h, w, b: fused_linear_logprobs(h, w, t, backend=backend), h, w, b,
                                  _upstream())  # fmt: skip
    ref, g_ref = _run_frozen_head(lambda h, w, b: fused_linear_logprobs_reference(h, w, t), h.float(), w.float(),
                                  None, _upstream())  # fmt: skip

    def plain(h, w, b):
        logp = torch.log_softmax(h @ w.T, -1).gather(-1, t.clamp(min=0)[..., None])[..., 0]
        return torch.where(t != IGNORE, logp, torch.zeros_like(logp)).sum(-1)

    low, g_low = _run_frozen_head(plain, h, w, b, _upstream())
    for what, a, lo, r in [("logprobs", got, low, ref), ("grad h", g_got, g_low, g_ref)]:
        err = (a.float() - r.float()).abs().max().item()
        base = (lo.float() - r.float()).abs().max().item()
        slack = 2.0 ** (r.float().abs().max().log2().floor().item() - 7)  # one bf16 ulp
        assert err <= 2 * base + 1e-3 + slack, f"{what}: {err:.3g} vs plain bf16 {base:.3g}"
    assert g_got.dtype == torch.bfloat16


def test_frozen_weight_gets_no_gradient_and_hidden_does():
    h, w, _, t = _inputs((2, 7), 8, 19)
    h.requires_grad_(True)
    out = fused_linear_logprobs(h, w, t)
    (g,) = torch.autograd.grad(out.sum(), h)
    assert w.grad is None and g.abs().sum() > 0


@pytest.mark.parametrize(
    "kw, exc, needle",
    [
        (dict(reduction="avg"), ValueError, "reduction must be one of"),
        (dict(temperature=0.0), ValueError, "temperature"),
        (dict(temperature=float("inf")), ValueError, "temperature"),
        (dict(temperature="1"), TypeError, "temperature"),
        (dict(softcap=-1.0), ValueError, "softcap"),
        (dict(segment_ids=torch.zeros(3, 5)), TypeError, "integer tensor"),
        (dict(segment_ids=torch.zeros(3, 4, dtype=torch.long)), ValueError, "segment_ids shape (3, 4)"),
        (dict(segment_ids=torch.zeros(3, 5, dtype=torch.long), reduction="none"), ValueError, "segment_ids needs"),
        (dict(num_segments=2), ValueError, "num_segments"),
        (dict(segment_ids=torch.full((3, 5), 4), num_segments=2), ValueError, "id >= num_segments"),
        (dict(backend="cuda-magic"), ValueError, "cuda-magic"),
    ],
)
def test_bad_input_is_a_clear_error(kw, exc, needle):
    h, w, _, t = _inputs((3, 5), 8, 11)
    with pytest.raises(exc) as info:
        fused_linear_logprobs(h, w, t, **kw)
    assert needle in str(info.value)


@pytest.mark.parametrize(
    "args, needle",
    [
        (lambda h, w, t: (h[..., :7], w, t), "does not match weight shape"),
        (lambda h, w, t: (h, w, t[:, :4]), "target"),
        (lambda h, w, t: (h, w.double(), t), "dtype"),
        (lambda h, w, t: (h, w, t.float()), "target"),
    ],
)
def test_bad_shapes_and_dtypes_name_them(args, needle):
    h, w, _, t = _inputs((3, 5), 8, 11)
    with pytest.raises((ValueError, TypeError)) as info:
        fused_linear_logprobs(*args(h, w, t))
    assert needle in str(info.value)
