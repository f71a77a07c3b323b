"""fastft.losses against TRL 1.16's own code, loss and gradients.

TRL computes these objectives inside trainer methods, so the oracle runs those methods
(``DPOTrainer._compute_loss``, ``KTOTrainer._compute_loss``, ``CPOTrainer.cpo_loss``,
``ORPOTrainer.odds_ratio_loss``) on a stand-in ``self`` and a stand-in model whose per-token
log-probs are leaf tensors: both sides see the same per-token values, and the gradients with
respect to them are compared.
"""

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from fastft import losses as L

trl = pytest.importorskip("trl")
CPU = torch.device("cpu")


def _accelerator():
    return SimpleNamespace(device=CPU, gather=lambda x: x, gather_for_metrics=lambda x: x, unwrap_model=lambda m: m)


def _trainer_self(**kw):
    base = dict(
        model=SimpleNamespace(training=True), accelerator=_accelerator(), aux_loss_enabled=False,
        precompute_ref_logps=True, _metrics=defaultdict(lambda: defaultdict(list)), _total_train_tokens=0, _tp_size=1,
    )  # fmt: skip
    base.update(kw)
    return SimpleNamespace(**base)


class _FakeModel:
    """Returns designed per-token log-probs in the fused-head output TRL reads."""

    def __init__(self, per_token):
        self.per_token = per_token

    def __call__(self, **kw):
        z = torch.zeros_like(self.per_token.detach())
        return SimpleNamespace(log_probs=self.per_token, entropy=z, mean_logits=z, is_top1=z.bool())


def _sequences(n, T=9, seed=0):
    """(input_ids, completion_mask, per-token log-prob leaf (n, T-1) zero outside the completion)."""
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(1, 4, (n,), generator=g)
    comp = torch.randint(1, T - 3, (n,), generator=g)
    pos = torch.arange(T)
    mask = ((pos >= prompt[:, None]) & (pos < (prompt + comp)[:, None])).long()
    raw = (-torch.rand(n, T - 1, generator=g, dtype=torch.float64) * 1.5).requires_grad_(True)
    ids = torch.randint(5, 50, (n, T), generator=g)
    return ids, mask, raw


DPO_CASES = [(t, 0.0) for t in L.DPO_LOSS_TYPES if t != "exo_pair"] + [("robust", 0.2), ("exo_pair", 1e-3)]
DPO_CASES += [("aot", 0.1), ("aot_unpaired", 0.1)]


@pytest.mark.parametrize("loss_type, ls", DPO_CASES)
@pytest.mark.parametrize("beta", [0.1, 0.7])
def test_dpo_loss_matches_trl(loss_type, ls, beta):
    from trl import DPOTrainer

    P = 5
    ids, mask, raw = _sequences(2 * P, seed=hash((loss_type, beta)) % 1000)
    per_tok = raw * mask[:, 1:]
    ref = -torch.rand(2 * P, dtype=torch.float64, generator=torch.Generator().manual_seed(7)) * 6
    inputs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), completion_mask=mask,
                  ref_chosen_logps=ref[:P], ref_rejected_logps=ref[P:])  # fmt: skip
    me = _trainer_self(ld_alpha=None, f_divergence_type="reverse_kl", loss_types=[loss_type], loss_weights=[1.0],
                       beta=beta, label_smoothing=ls, use_weighting=False, args=SimpleNamespace(discopop_tau=0.05))  # fmt: skip
    want = DPOTrainer._compute_loss(me, _FakeModel(per_tok), inputs, False)
    (g_want,) = torch.autograd.grad(want, raw, retain_graph=True)

    logps = per_tok.sum(1)
    lengths = mask.sum(1)
    got = L.dpo_loss(logps[:P], logps[P:], ref[:P], ref[P:], beta=beta, loss_type=loss_type, label_smoothing=ls,
                     chosen_lengths=lengths[:P], rejected_lengths=lengths[P:])  # fmt: skip
    (g_got,) = torch.autograd.grad(got.loss, raw)
    # exo_pair: TRL takes log(eps) of an fp32 tensor, fastft in double (its only difference, ~1e-8)
    tol = 1e-7 if loss_type == "exo_pair" else 1e-12
    torch.testing.assert_close(got.loss, want, rtol=tol, atol=tol)
    torch.testing.assert_close(g_got, g_want, rtol=max(tol, 1e-10), atol=tol)
    m = L.reward_metrics(got.chosen_rewards, got.rejected_rewards, logps[:P], logps[P:])
    for k, v in m.items():  # TRL's logged metrics (it logs .item() of the same means)
        assert v.item() == pytest.approx(me._metrics["train"][k][-1], rel=1e-12, abs=1e-12), k


def test_dpo_sigmoid_label_smoothing_is_the_conservative_form_trl_writes():
    """TRL 1.16's DPO sigmoid has no label smoothing; its CPO sigmoid has the cDPO form. On log-ratios
    in place of log-probs it is the smoothed DPO loss."""
    from trl.experimental.cpo import CPOTrainer

    g = torch.Generator().manual_seed(3)
    c, r, rc, rr = (-torch.rand(6, generator=g, dtype=torch.float64) * 5 for _ in range(4))
    c.requires_grad_(True)
    got = L.dpo_loss(c, r, rc, rr, beta=0.3, label_smoothing=0.15)
    me = SimpleNamespace(alpha=0.0, loss_type="sigmoid", beta=0.3, label_smoothing=0.15, accelerator=_accelerator())
    want, wc, wr = CPOTrainer.cpo_loss(me, c - rc, r - rr)
    torch.testing.assert_close(got.loss, want.mean())
    torch.testing.assert_close(torch.autograd.grad(got.loss, c)[0], torch.autograd.grad(want.mean(), c)[0])
    torch.testing.assert_close(got.chosen_rewards, wc)


@pytest.mark.parametrize("beta, gamma, ls", [(0.1, 0.5, 0.0), (2.0, 1.0, 0.0), (2.5, 0.3, 0.1)])
def test_simpo_loss_matches_trl_cpo(beta, gamma, ls):
    from trl.experimental.cpo import CPOTrainer

    g = torch.Generator().manual_seed(int(beta * 10))
    c = (-torch.rand(7, generator=g, dtype=torch.float64) * 3).requires_grad_(True)
    r = (-torch.rand(7, generator=g, dtype=torch.float64) * 3).requires_grad_(True)
    me = SimpleNamespace(alpha=0.0, loss_type="simpo", simpo_gamma=gamma, beta=beta, label_smoothing=ls,
                         accelerator=_accelerator())  # fmt: skip
    want, wc, wr = CPOTrainer.cpo_loss(me, c, r)
    got = L.simpo_loss(c, r, beta=beta, gamma=gamma, label_smoothing=ls)
    torch.testing.assert_close(got.loss, want.mean())
    for a, b in zip(torch.autograd.grad(got.loss, (c, r)), torch.autograd.grad(want.mean(), (c, r))):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(got.chosen_rewards, wc)
    torch.testing.assert_close(got.rejected_rewards, wr)


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_orpo_loss_matches_trl(beta):
    from trl.experimental.orpo import ORPOTrainer

    g = torch.Generator().manual_seed(11)
    # mean log-probs from near 0 (p -> 1, where log(1-p) needs care) to very negative
    c = torch.tensor([-1e-4, -0.3, -0.69, -0.7, -2.0, -9.0], dtype=torch.float64).requires_grad_(True)
    r = (-torch.rand(6, generator=g, dtype=torch.float64) * 4).requires_grad_(True)
    nll = (-c).mean()
    me = SimpleNamespace(beta=beta, accelerator=_accelerator())
    terms, wc, wr, _, _ = ORPOTrainer.odds_ratio_loss(me, c, r)
    want = nll - terms.mean()  # ORPOTrainer.get_batch_loss_metrics
    got = L.orpo_loss(c, r, nll, beta=beta)
    torch.testing.assert_close(got.loss, want.float() if want.dtype != got.loss.dtype else want)
    for a, b in zip(torch.autograd.grad(got.loss, (c, r)), torch.autograd.grad(want, (c, r))):
        torch.testing.assert_close(a, b.to(a.dtype))
    torch.testing.assert_close(got.chosen_rewards, wc)


@pytest.mark.parametrize("loss_type", L.KTO_LOSS_TYPES)
@pytest.mark.parametrize("weights", [(1.0, 1.0), (1.0, 1.33)])
def test_kto_loss_matches_trl(loss_type, weights):
    from trl import KTOTrainer

    n = 8
    ids, mask, raw = _sequences(n, seed=5)
    per_tok = raw * mask[:, 1:]
    label = torch.tensor([1, 0, 1, 1, 0, 0, 1, 0])
    g = torch.Generator().manual_seed(2)
    ref = -torch.rand(n, generator=g, dtype=torch.float64) * 5
    kl_logps, ref_kl = (
        -torch.rand(n, generator=g, dtype=torch.float64) * 5,
        -torch.rand(n, generator=g, dtype=torch.float64) * 6,
    )
    batch = dict(label=label, input_ids=ids, attention_mask=torch.ones_like(ids), completion_mask=mask,
                 ref_logps=ref, ref_KL_logps=ref_kl)  # fmt: skip
    me = _trainer_self(calculate_KL=True, beta=0.2, loss_type=loss_type, desirable_weight=weights[0],
                       undesirable_weight=weights[1], _compute_kl_logps=lambda model, b: kl_logps)  # fmt: skip
    want = KTOTrainer._compute_loss(me, _FakeModel(per_tok), batch, False)
    (g_want,) = torch.autograd.grad(want, raw, retain_graph=True)
    kl = L.kto_kl(kl_logps, ref_kl)
    got = L.kto_loss(per_tok.sum(1), ref, label.bool(), kl, beta=0.2, loss_type=loss_type,
                     desirable_weight=weights[0], undesirable_weight=weights[1])  # fmt: skip
    torch.testing.assert_close(got.loss, want)
    torch.testing.assert_close(torch.autograd.grad(got.loss, raw)[0], g_want)
    assert kl.item() == pytest.approx(me._metrics["train"]["kl"][-1])
    m = L.reward_metrics(got.chosen_rewards, got.rejected_rewards)
    assert m["rewards/chosen"].item() == pytest.approx(me._metrics["train"]["rewards/chosen"][-1])
    assert m["rewards/margins"].item() == pytest.approx(me._metrics["train"]["rewards/margins"][-1])


def test_reductions_and_accumulation():
    g = torch.Generator().manual_seed(0)
    c, r, rc, rr = (-torch.rand(6, generator=g) * 5 for _ in range(4))
    none = L.dpo_loss(c, r, rc, rr, reduction="none").loss
    assert none.shape == (6,)
    torch.testing.assert_close(L.dpo_loss(c, r, rc, rr, reduction="sum").loss, none.sum())
    halves = (
        L.dpo_loss(c[:3], r[:3], rc[:3], rr[:3], reduction="sum").loss
        + L.dpo_loss(c[3:], r[3:], rc[3:], rr[3:], reduction="sum").loss
    )
    torch.testing.assert_close(halves / 6, L.dpo_loss(c, r, rc, rr).loss)  # micro-batches sum to the mean


@pytest.mark.parametrize(
    "call, exc, needle",
    [
        (lambda x: L.dpo_loss(x, x, x, x, loss_type="kto"), ValueError, "loss_type"),
        (lambda x: L.dpo_loss(x, x, x, x, beta=0), ValueError, "beta"),
        (lambda x: L.dpo_loss(x, x, x, x, beta=math.nan), ValueError, "beta"),
        (lambda x: L.dpo_loss(x, x[:2], x, x), ValueError, "rejected_logps has shape (2,)"),
        (lambda x: L.dpo_loss(x[None], x[None], x[None], x[None]), ValueError, "1-D float tensor"),
        (lambda x: L.dpo_loss(x, x, x, x.tolist()), TypeError, "ref_rejected_logps must be a tensor"),
        (lambda x: L.dpo_loss(x, x, x, x, loss_type="ipo"), ValueError, "chosen_lengths"),
        (lambda x: L.dpo_loss(x, x, x, x, loss_type="robust", label_smoothing=0.5), ValueError, "label_smoothing"),
        (lambda x: L.dpo_loss(x, x, x, x, loss_type="exo_pair"), ValueError, "exo_pair needs"),
        (lambda x: L.dpo_loss(x, x, x, x, reduction="avg"), ValueError, "reduction"),
        (lambda x: L.kto_loss(x, x, torch.ones(2, dtype=torch.bool)), ValueError, "desirable"),
        (lambda x: L.simpo_loss(x, x, label_smoothing=1.0), ValueError, "label_smoothing"),
    ],
)
def test_bad_input_names_the_problem(call, exc, needle):
    with pytest.raises(exc, match=None) as info:
        call(-torch.rand(4))
    assert needle in str(info.value)
