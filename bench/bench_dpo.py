"""DPO step: fastft (logits-free log-probs, reference from the disabled adapters) vs TRL's DPO loss
on materialised logits, same model, adapters and data, each in its own process.

What is timed is one DPO training step's compute: the reference forward under ``no_grad`` with
the LoRA adapters disabled, then the policy forward on ``2P`` rows (chosen then rejected), the
loss and its backward (both sides in that order, as TRL's trainer and fastft's do). The optimizer
update (identical on both sides) is left out. Run it with ``PYTHONPATH=.`` from a source checkout
whose ``fastft`` is not the installed one (the workers run as ``bench/`` scripts).

* ``fastft``: ``fastft.patch`` on the PEFT model; per-sequence log-probs from the decoder's
  hidden states by :func:`fastft.ops.fused_linear_logprobs` (:func:`fastft.preference.sequence_logps`),
  :func:`fastft.losses.dpo_loss`.
* ``trl``: TRL 1.16's own ``DPOTrainer._compute_loss`` (its loss and metrics code), fed with
  per-token log-probs from the unpatched PEFT model's logits through TRL's
  ``selective_log_softmax``, i.e. what TRL computes without its fused head. TRL's trainer itself is
  not stepped: it needs its dataset pipeline and accelerate; this is said in the JSON (``reference``).

    python bench/bench_dpo.py            # CPU: the bench_e2e 58M Llama, LoRA r16, 2 pairs x 512 tokens, fp32
    python bench/bench_dpo.py --quick    # tiny shapes, format check only
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from types import SimpleNamespace

import _harness as H

NAME = "dpo"
CPU_CFG = dict(hidden=512, layers=8, intermediate=1408, heads=8, kv_heads=8, vocab=32000, tie=False,
               pairs=2, seq=512, prompt=128, rank=16, max_seq_cap=512)  # fmt: skip
QUICK_CFG = dict(hidden=64, layers=2, intermediate=192, heads=4, kv_heads=4, vocab=512, tie=False,
                 pairs=2, seq=64, prompt=16, rank=8, max_seq_cap=64)  # fmt: skip
DEFAULTS = {"cpu": {"reps": 3, "warmup": 1}, "cuda": {"reps": 10, "warmup": 3}}
TARGETS = {"mem_ratio_max": 0.4, "tokens_per_s_ratio_min": 1.2}


def _build(cfg: dict, seed: int):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from bench_e2e import llama_config

    torch.manual_seed(seed)
    model = LlamaForCausalLM(llama_config(cfg)).float()
    model.config._attn_implementation = "sdpa"
    lcfg = LoraConfig(
        r=cfg["rank"],
        lora_alpha=2 * cfg["rank"],
        lora_dropout=0.0,
        target_modules="all-linear",
        task_type="CAUSAL_LM",
        init_lora_weights=False,
    )  # fmt: skip  (B != 0: policy != reference)
    torch.manual_seed(seed + 1)
    return get_peft_model(model, lcfg)


def _batch(cfg: dict, seed: int, *, pairs: int | None = None, seq: int | None = None):
    """``2P`` rows: P chosen then P rejected, sharing each prompt; labels -100 on the prompt."""
    import torch

    P, T, Tp = pairs or cfg["pairs"], seq or cfg["seq"], min(cfg["prompt"], (seq or cfg["seq"]) // 4)
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(3, cfg["vocab"], (P, Tp), generator=g)
    comp = torch.randint(3, cfg["vocab"], (2 * P, T - Tp), generator=g)
    ids = torch.cat([prompt.repeat(2, 1), comp], 1)
    labels = ids.clone()
    labels[:, :Tp] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def _fastft_step(model, checkpointing=None):
    import fastft
    from fastft.losses import dpo_loss
    from fastft.preference import sequence_logps

    fastft.patch(model, checkpointing=checkpointing)
    hf = model.get_base_model()

    def step(b):
        import torch

        with torch.no_grad(), model.disable_adapter():  # first, as the trainer (and TRL) do
            ref = sequence_logps(hf, b["input_ids"], b["attention_mask"], b["labels"])
        lp = sequence_logps(hf, b["input_ids"], b["attention_mask"], b["labels"])
        c, r = lp.chunk(2)
        rc, rr = ref.chunk(2)
        loss = dpo_loss(c, r, rc, rr, beta=0.1).loss
        loss.backward()
        return loss.detach()

    return step


def _trl_step(model):
    import torch
    from trl import DPOTrainer
    from trl.trainer.utils import selective_log_softmax

    def per_token(b):
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False).logits
        lab = b["labels"][:, 1:]
        lp = selective_log_softmax(logits[:, :-1], lab.clamp(min=0))
        return lp * (lab != -100)

    acc = SimpleNamespace(device=torch.device("cpu"), gather=lambda x: x, gather_for_metrics=lambda x: x,
                          unwrap_model=lambda m: m)  # fmt: skip

    def step(b):
        from collections import defaultdict

        with torch.no_grad(), model.disable_adapter():
            ref = per_token(b).sum(1)
        P = ref.shape[0] // 2
        policy = per_token(b)
        z = torch.zeros_like(policy.detach())
        fake = lambda **kw: SimpleNamespace(log_probs=policy, entropy=z, mean_logits=z, is_top1=z.bool())  # noqa: E731
        me = SimpleNamespace(model=SimpleNamespace(training=True), accelerator=acc, aux_loss_enabled=False,
                             precompute_ref_logps=True, ld_alpha=None, f_divergence_type="reverse_kl",
                             loss_types=["sigmoid"], loss_weights=[1.0], beta=0.1, label_smoothing=0.0,
                             use_weighting=False, _metrics=defaultdict(lambda: defaultdict(list)),
                             _total_train_tokens=0, _tp_size=1, args=SimpleNamespace())  # fmt: skip
        completion_mask = torch.cat([torch.zeros_like(b["labels"][:, :1]), (b["labels"][:, 1:] != -100).long()], 1)
        inputs = dict(input_ids=b["input_ids"], attention_mask=b["attention_mask"], completion_mask=completion_mask,
                      ref_chosen_logps=ref[:P], ref_rejected_logps=ref[P:])  # fmt: skip
        loss = DPOTrainer._compute_loss(me, fake, inputs, False)
        loss.backward()
        return loss.detach()

    return step


def worker_main(args) -> None:
    import torch

    torch.set_num_threads(max(1, args.threads))
    cfg = QUICK_CFG if args.quick else CPU_CFG
    model = _build(cfg, args.seed)
    if args.provider == "trl":
        step = _trl_step(model)
    else:
        step = _fastft_step(model, "recompute" if args.provider == "fastft+ckpt" else None)
        model.train()
    batch = _batch(cfg, args.seed + 2)
    tiny = _batch(cfg, args.seed + 3, pairs=1, seq=16)

    def zero():
        for p in model.parameters():
            p.grad = None

    res = {"provider": args.provider, "status": "ok"}
    if not args.skip_memory:
        mem = H.measure_peak_memory(lambda: step(batch), "cpu", prime=lambda: (step(tiny), zero()))
        zero()
        res["memory"] = mem
    loss = step(batch)
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    res["loss"] = float(loss)
    res["grad_norm"] = float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads.values()])))
    zero()
    t = H.time_fn(lambda: (step(batch), zero()), args.warmup, args.reps, device="cpu")
    res.update({k: v for k, v in t.items() if k != "times_ms"}, times_ms=t["times_ms"])
    res["tokens_per_s"] = batch["input_ids"].numel() / (t["median_ms"] / 1e3)
    H.emit_worker_result(res)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    H.add_run_args(p, DEFAULTS)
    H.add_common_args(p, NAME, memory="peak memory")
    p.add_argument("--quick", action="store_true", help="tiny shapes (format check)")
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    p.add_argument("--worker", choices=("fastft", "fastft+ckpt", "trl"), help=argparse.SUPPRESS)
    p.add_argument("--no-ckpt", action="store_true", help="skip the fastft + checkpointing='recompute' variant")
    args = p.parse_args(argv)
    device = H.resolve_device(args.device)
    if device != "cpu":
        print("bench_dpo: the CPU case only for now (the GPU 1B bf16 case vs TRL and Liger is open)", file=sys.stderr)
        return 2
    dflt = DEFAULTS[device]
    args.reps = args.reps if args.reps is not None else (1 if args.quick else dflt["reps"])
    args.warmup = args.warmup if args.warmup is not None else (0 if args.quick else dflt["warmup"])
    if args.worker:
        args.provider = args.worker
        worker_main(args)
        return 0
    t0 = time.perf_counter()
    cfg = QUICK_CFG if args.quick else CPU_CFG
    common = ["--device", "cpu", "--reps", args.reps, "--warmup", args.warmup, "--seed", args.seed,
              "--threads", args.threads] + (["--quick"] if args.quick else []) + (["--skip-memory"] if args.skip_memory else [])  # fmt: skip
    results = {}
    provs = ("fastft", "trl") if args.no_ckpt else ("fastft", "fastft+ckpt", "trl")
    for prov in provs:  # one after the other: the CPU is shared
        results[prov] = H.run_isolated(__file__, ["--worker", prov, *common], H.worker_env("cpu"))
        r = results[prov]
        print(f"{prov:11s} {r.get('status')}: " + (f"{r['median_ms']:.0f} ms, {r['tokens_per_s']:.0f} tok/s, "
              f"peak {r.get('memory', {}).get('peak_mib', float('nan')):.0f} MiB, loss {r['loss']:.6f}"
              if r.get("status") == "ok" else str(r.get("reason"))[-800:]), flush=True)  # fmt: skip
    f, t = results["fastft"], results["trl"]
    summary = {}
    if f.get("status") == "ok" and t.get("status") == "ok":
        fm, tm = (f.get("memory") or {}).get("peak_mib"), (t.get("memory") or {}).get("peak_mib")
        summary = dict(
            speedup=H.ratio(t["median_ms"], f["median_ms"]),
            tokens_per_s_ratio=H.ratio(f["tokens_per_s"], t["tokens_per_s"]),
            mem_ratio=H.ratio(fm, tm) if fm and tm else None,
            loss_abs_diff=abs(f["loss"] - t["loss"]),
            grad_norm_rel_diff=abs(f["grad_norm"] - t["grad_norm"]) / max(abs(t["grad_norm"]), 1e-12),
            agree=abs(f["loss"] - t["loss"]) <= 1e-4 * max(1.0, abs(t["loss"])),
        )
        k = results.get("fastft+ckpt", {})
        if k.get("status") == "ok":
            km = (k.get("memory") or {}).get("peak_mib")
            summary["ckpt"] = dict(tokens_per_s_ratio=H.ratio(k["tokens_per_s"], t["tokens_per_s"]),
                                   mem_ratio=H.ratio(km, tm) if km and tm else None,
                                   loss_abs_diff=abs(k["loss"] - t["loss"]))  # fmt: skip
        summary["meets_targets"] = {
            "memory": summary["mem_ratio"] is not None and summary["mem_ratio"] <= TARGETS["mem_ratio_max"],
            "tokens_per_s": summary["tokens_per_s_ratio"] >= TARGETS["tokens_per_s_ratio_min"],
        }
        print(f"fastft vs TRL: {summary['tokens_per_s_ratio']:.2f}x tokens/s, memory "
              f"{summary['mem_ratio'] if summary['mem_ratio'] is None else round(summary['mem_ratio'], 3)}x, "
              f"|loss diff| {summary['loss_abs_diff']:.2e}", flush=True)  # fmt: skip
    payload = dict(
        config=dict(cfg, params=sum_params(cfg), rows=2 * cfg["pairs"], dtype="fp32", threads=args.threads),
        reference="TRL 1.16 DPOTrainer._compute_loss on materialised logits (selective_log_softmax); "
        "the trainer is not stepped (its dataset pipeline / accelerate), the optimizer update is left out on both sides",
        targets=TARGETS,
        results=[results[p] for p in provs],
        summary=summary,
    )
    H.finish(args, NAME, payload, device="cpu", quick=args.quick, t_start=t0)
    return 0 if summary else 1


def sum_params(cfg: dict) -> int:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from bench_e2e import count_params

    return count_params(cfg)


if __name__ == "__main__":
    sys.exit(main())
