"""Data-parallel training of patched models: DDP and FSDP2 on 2 CPU ranks equal one process.

One ``torchrun --standalone --nproc_per_node=2`` launch (gloo) of tests/_dist_worker.py
trains a patched tiny llama (LoRA on a dense base, and QLoRA on fastft's NF4 base) under
DDP and under FSDP2 (``fully_shard`` per decoder layer and at the root, so the packed
uint8 4-bit weights are sharded too) for a few AdamW steps with gradient clipping, each
rank on half of a fixed global batch with uneven token counts. The same steps on the
whole batch in this process are the reference: per-step loss (averaged over ranks),
per-step gradient norm and the final LoRA parameters must agree. Why they are equal,
and what ``num_items_in_batch`` does for it, is in the worker's docstring.
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

WORKER = Path(__file__).with_name("_dist_worker.py")
# ...compile: the wrapper under torch.compile (aot_eager), as the trainer's --compile under torchrun
# compile under DDP and FSDP2 on LoRA; QLoRA under both eagerly (QLoRA compiled is tests/test_library_qlora.py's)
MODES = ["ddp-lora", "ddp-qlora", "fsdp-lora", "fsdp-qlora", "ddpcompile-lora", "fsdpcompile-lora"]

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="torch.distributed with the gloo backend is not available",
)


def _worker_module():
    spec = importlib.util.spec_from_file_location("_fastft_dist_worker", WORKER)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


W = _worker_module()


@pytest.fixture(scope="module")
def distributed(tmp_path_factory):
    """The worker's results for every mode, from one 2-rank torchrun launch."""
    out = tmp_path_factory.mktemp("dist") / "results.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    cmd += [str(WORKER), str(out), *MODES]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    if proc.returncode != 0 or not out.exists():
        pytest.fail(f"torchrun exited with {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    results = json.loads(out.read_text())
    assert results["world_size"] == 2
    return results


def _has_fsdp2() -> bool:
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError:
        return False
    return True


@functools.cache
def _single_process(kind):
    model = W.build(kind)
    init = W.lora_params(model)
    losses, norms = W.train(model, W.global_batch())
    return losses, norms, W.lora_params(model), init


def test_global_batch_is_uneven_and_clipping_is_active():
    # the cases num_items_in_batch exists for: a per-rank mean would weight tokens unequally
    labels = W.global_batch()["labels"]
    assert W.counted(labels[:2]) != W.counted(labels[2:])
    _, norms, _, _ = _single_process("lora")
    assert all(n > 2 * W.MAX_NORM for n in norms)


@pytest.mark.parametrize("mode", MODES)
def test_data_parallel_training_equals_single_process(distributed, mode):
    if mode.startswith("fsdp") and not _has_fsdp2():
        pytest.skip("this torch has no FSDP2 (torch.distributed.fsdp.fully_shard)")
    got = distributed[mode]
    if "error" in got:  # the thing under test failed: a failure, never a skip
        pytest.fail(f"{mode} failed in the worker:\n{got['traceback']}")
    kind = mode.split("-", 1)[1]
    if "compile" in mode:  # it did compile, and no graph break is fastft's (DDP's own skipped
        # _inside_ddp_forward is one, by torch's design: dynamo compiles the module inside it)
        assert got["compile"]["graphs"] >= 1, got["compile"]
        ours = [why for why in got["compile"]["breaks"] if "fastft" in why]
        assert not ours, ours
    ref_losses, ref_norms, ref_params, init = _single_process(kind)
    assert len(got["losses"]) == len(ref_losses) == W.STEPS
    torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(ref_losses), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.tensor(got["grad_norms"]), torch.tensor(ref_norms), rtol=1e-4, atol=1e-6)
    assert got["params"].keys() == ref_params.keys() and len(ref_params) == 2 * 14
    for name, ref in ref_params.items():
        p = torch.tensor(got["params"][name], dtype=ref.dtype)
        assert p.shape == ref.shape, name
        err = (p - ref).abs().max() / ref.abs().max().clamp(min=1e-8)
        assert err <= 1e-4, f"{name}: {err:.2e}"
    # the parameters did move (the comparison is not of untouched initial values)
    assert max((ref_params[n] - init[n]).abs().max() for n in init) > W.LR


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["fsdp"])
def test_fastft_train_resumes_exactly_under_fsdp(tmp_path, mode):
    """fastft.train under FSDP2 on 2 ranks, checkpoint-last every 2 of 4 steps, LoRA dropout 0.1
    (so each rank's RNG state matters): resuming from the step-2 checkpoint (full optimizer state
    gathered on save and re-sharded on load, one RNG state per rank) gives the same per-step
    losses and the same final adapter as the uninterrupted run."""
    words = "the cat sat on a mat while dogs ran far away".split()
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"text": " ".join(words[i % 5 : i % 5 + 2 + i % 4])}) + "\n" for i in range(24)))
    worker = Path(__file__).with_name("_dist_resume_worker.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    proc = subprocess.run([*cmd, str(worker), str(tmp_path), str(data), mode], env=env, capture_output=True, text=True,
                          timeout=240)  # fmt: skip
    out = tmp_path / "resume.json"
    if proc.returncode != 0 or not out.exists():
        pytest.fail(f"torchrun exited with {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    r = json.loads(out.read_text())
    assert len(r["full"]) == 4 and len(r["resumed"]) == 4
    assert r["resumed"][:2] == r["full"][:2]  # read back from the checkpoint's log history
    torch.testing.assert_close(torch.tensor(r["resumed"]), torch.tensor(r["full"]), rtol=1e-6, atol=1e-7)
    assert r["full_adapter"].keys() == r["resumed_adapter"].keys() and r["full_adapter"]
    for k, v in r["full_adapter"].items():
        torch.testing.assert_close(torch.tensor(r["resumed_adapter"][k]), torch.tensor(v), rtol=1e-6, atol=1e-7)
