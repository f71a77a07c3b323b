"""Preference training under torchrun: DPO / ORPO / KTO on 2 gloo ranks (DDP and FSDP2) equal one process.

Two ``torchrun --standalone --nproc_per_node=2`` launches of tests/_dist_pref_worker.py train
LoRA on the embedded default model with ``fastft.train`` (see the worker for the runs). The
reference is the same ``fastft.train`` in this process with ``grad_accum`` 2: the same two
micro-batches per step, rank ``r`` taking micro-batch ``r`` of each step. Compared: every
per-step train loss and every evaluation record (loss and the reward metrics, which the ranks
reduce over their shares of the eval set), the final adapter, the precomputed reference table,
and (resume) the losses, adapter and reference table of a run resumed from its step-2 checkpoint.

Tolerances: the per-rank loss is the rank's summed per-pair loss divided by (pairs / 2) and
DDP / FSDP2 average the two gradients, i.e. ``(2 g_0 + 2 g_1) / 2`` against one process's
``g_0 + g_1``: scaling by 2 is exact in binary floating point and the models are identical, so
on one machine the runs agree bit for bit (seen), and the tolerances (1e-6 relative for losses
and metrics, 1e-5 for adapter entries, which pass through 4 Adam steps) only leave room for a
different summation order in a different gloo / BLAS build. A missing gradient all-reduce (the
bug a direct decoder call under DDP has) leaves each rank with its own half-batch adapter, off by
percents: far outside these tolerances.
"""

import functools
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

WORKER = Path(__file__).with_name("_dist_pref_worker.py")
ROOT = Path(__file__).resolve().parents[1]

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.slow,
    pytest.mark.skipif(
        not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
        reason="torch.distributed with the gloo backend is not available",
    ),
]


def _worker_module():
    spec = importlib.util.spec_from_file_location("_fastft_dist_pref_worker", WORKER)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


W = _worker_module()


def _launch(out: Path, runs: list[str]) -> Path:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "TOKENIZERS_PARALLELISM": "false"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)  # this checkout's fastft
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(WORKER)]
    proc = subprocess.run([*cmd, str(out), *runs], env=env, capture_output=True, text=True, timeout=240)
    status = out / "status.json"
    if proc.returncode != 0 or not status.exists():
        pytest.fail(f"torchrun exited with {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    got = json.loads(status.read_text())
    assert got["world_size"] == 2
    failed = {r: got.get(r) for r in runs if got.get(r) != "ok"}
    if failed:  # the thing under test failed: a failure, never a skip
        pytest.fail("\n\n".join(f"{r} failed in the worker:\n{msg}" for r, msg in failed.items()))
    return out


@pytest.fixture(scope="module")
def parity_runs(tmp_path_factory):
    return _launch(tmp_path_factory.mktemp("pref-dist"), ["ddp-dpo", "fsdp-dpo", "ddp-orpo"])


@pytest.fixture(scope="module")
def ref_runs(tmp_path_factory):
    return _launch(tmp_path_factory.mktemp("pref-dist-ref"), ["ddp-kto", "fsdp-dpo-pre", "ddp-dpo-pre-resume"])


@functools.cache
def _single(run: str, root: str) -> Path:
    """The 1-process run of ``run`` (DDP and FSDP2 runs of one objective share it)."""
    out = Path(root) / run.split("-", 1)[1]
    if not (out / "result.json").exists():
        W.train(W.config(run, out, world=1))
    return out


def _metrics(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def _adapter(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(out / "checkpoint-last" / "adapter_model.safetensors"))


def _assert_same_run(got: Path, ref: Path, *, with_history: bool = True) -> None:
    g, r = _metrics(got), _metrics(ref)
    assert [x["step"] for x in g] == [x["step"] for x in r]  # rank 0 wrote each record once
    assert sum("loss" in x for x in r) == W.STEPS and sum("eval_loss" in x for x in r) == 3  # steps 0, 2, 4
    for a, b in zip(g, r):
        keys = [k for k in b if k == "loss" or k.startswith("eval_")]
        assert keys and set(keys) <= set(a), (a, b)
        # fp32 gradients summed in another order over two ranks (FSDP2's reduce-scatter) move the trained
        # weights by ulps: the fp32 tolerance of the adapters below (an AMD EPYC gave 3.3e-6 relative on
        # a reward after two steps, past the 1e-6 an Intel Xeon had always met)
        torch.testing.assert_close(torch.tensor([a[k] for k in keys], dtype=torch.float64),
                                   torch.tensor([b[k] for k in keys], dtype=torch.float64),
                                   rtol=1e-5, atol=1e-6, msg=lambda m, s=b["step"], ks=keys: f"step {s} {ks}: {m}")  # fmt: skip
    ga, ra = _adapter(got), _adapter(ref)
    assert ga.keys() == ra.keys() and ra
    for k in ra:
        torch.testing.assert_close(ga[k], ra[k], rtol=1e-5, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")
    init = torch.tensor(1e-3)  # the adapters trained (B starts at 0)
    assert max(v.abs().max() for k, v in ra.items() if "lora_B" in k) > init


@pytest.mark.parametrize("run", ["ddp-dpo", "fsdp-dpo", "ddp-orpo"])
def test_preference_training_on_two_ranks_equals_one_process(parity_runs, run, tmp_path_factory):
    ref = _single(run, str(tmp_path_factory.getbasetemp() / "single"))
    _assert_same_run(parity_runs / run, ref)
    evals = [x for x in _metrics(ref) if "eval_loss" in x]
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"]  # it learned something


def test_kto_on_two_ranks_equals_one_process(ref_runs, tmp_path_factory):
    """KTO's KL reference point is per micro-batch (its own mismatched pairs), as in one process."""
    ref = _single("ddp-kto", str(tmp_path_factory.getbasetemp() / "single"))
    _assert_same_run(ref_runs / "ddp-kto", ref)
    assert {"eval_rewards/chosen", "eval_rewards/rejected", "eval_rewards/margins"} <= set(_metrics(ref)[-1])


def test_precomputed_reference_under_fsdp_equals_one_process(ref_runs, tmp_path_factory):
    """Each rank scores half the batches (the uneven eval set padded with weight-0 forwards), the
    tables are summed over ranks: the same table as one process, and the same training."""
    ref = _single("fsdp-dpo-pre", str(tmp_path_factory.getbasetemp() / "single"))
    got = ref_runs / "fsdp-dpo-pre"
    _assert_same_run(got, ref)
    a = torch.load(got / "checkpoint-last" / "ref_logps.pt", weights_only=True)
    b = torch.load(ref / "checkpoint-last" / "ref_logps.pt", weights_only=True)
    assert a.keys() == b.keys() == {"train", "eval"}
    assert a["train"].shape == (W.N_TRAIN, 2) and a["eval"].shape == (W.N_EVAL, 2)
    assert (b["train"] < 0).all() and (b["eval"] < 0).all()  # every entry filled (log-probs of sequences)
    for k in b:
        torch.testing.assert_close(a[k], b[k], rtol=1e-6, atol=1e-6)


def test_preference_resume_under_torchrun_is_exact(ref_runs):
    """DDP, precomputed reference, LoRA dropout 0.1: resumed from the step-2 checkpoint (optimizer,
    schedule, one RNG state per rank, the reference table) = the uninterrupted run."""
    full, resumed = ref_runs / "ddp-dpo-pre-resume", ref_runs / "ddp-dpo-pre-resume-resumed"
    f, r = _metrics(full), _metrics(resumed)
    assert [x["step"] for x in r] == [x["step"] for x in f]
    fl = [x["loss"] for x in f if "loss" in x]
    rl = [x["loss"] for x in r if "loss" in x]
    assert len(fl) == W.STEPS and rl[: W.SAVE_EVERY] == fl[: W.SAVE_EVERY]  # read back from the checkpoint
    torch.testing.assert_close(torch.tensor(rl), torch.tensor(fl), rtol=1e-6, atol=1e-7)
    fe = [x["eval_loss"] for x in f if "eval_loss" in x]
    torch.testing.assert_close(torch.tensor([x["eval_loss"] for x in r if "eval_loss" in x]), torch.tensor(fe),
                               rtol=1e-6, atol=1e-7)  # fmt: skip
    fa, ra = _adapter(full), _adapter(resumed)
    assert fa.keys() == ra.keys() and fa
    for k in fa:
        torch.testing.assert_close(ra[k], fa[k], rtol=1e-6, atol=1e-7)
    a = torch.load(full / "checkpoint-last" / "ref_logps.pt", weights_only=True)
    b = torch.load(resumed / "checkpoint-last" / "ref_logps.pt", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # carried through the checkpoint
