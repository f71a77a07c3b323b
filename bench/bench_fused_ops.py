#!/usr/bin/env python
"""Benchmark: fastft's fused RMSNorm / gated-MLP activations / RoPE against transformers' eager code.

Two parts, in one run:

1. Per op, forward + backward (``torch.autograd.backward(outputs, fixed random grads)``) of
   the ``transformers`` provider (the module / function a model runs without fastft) and the
   ``fastft`` provider (the op ``fastft.patch`` swaps in), on the same inputs:

   * ``rms_llama``: ``LlamaRMSNorm`` vs ``fastft.ops.rms_norm(offset=0)``
   * ``rms_gemma2``: ``Gemma2RMSNorm`` vs ``fastft.ops.rms_norm(offset=1.0)``
   * ``swiglu``: ``ACT2FN["silu"](gate) * up`` (as ``LlamaMLP`` computes it) vs ``fastft.ops.swiglu``
   * ``geglu``: ``ACT2FN["gelu_pytorch_tanh"](gate) * up`` vs ``fastft.ops.geglu(approximate="tanh")``
   * ``rope``: ``modeling_llama.apply_rotary_pos_emb`` vs ``fastft.ops.rope``; GQA (q 32 heads,
     k 8 heads), q / k as the attention module makes them (``[b, s, h, d]`` viewed ``[b, h, s, d]``).

   Reports median / p20 / p80 ms, fastft / transformers time, the peak memory of one fwd+bwd
   (fresh process per op and provider, see ``bench/README.md``) and the max relative error
   of the fastft outputs and gradients against transformers'.
2. End to end: one training step (forward, loss, backward) of a small random-weight Llama
   (``fastft.testing.tiny_model``) patched with ``fastft.patch(model)`` (``fused``) vs
   ``fastft.patch(model, norms=False, mlp=False, rope=False)`` (``unfused``), plus the
   unpatched model (``eager``, for information).

Targets (reported, never asserted): every op's fastft time < 1.0x transformers, and the fused
training step < 1.0x the unfused one.

    python bench/bench_fused_ops.py --quick          # seconds (mostly imports), any machine
    python bench/bench_fused_ops.py                  # CPU: rms 4096 x 2048, mlp 4096 x 5632, rope 4096 pos, fp32
    python bench/bench_fused_ops.py --device cuda    # GPU: 8192 tokens, hidden 4096 / 14336, bf16
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import _harness as H

OPS = ("rms_llama", "rms_gemma2", "swiglu", "geglu", "rope")
PROVIDERS = ("transformers", "fastft")

DEFAULTS = {
    "cpu": dict(
        tokens=4096,
        hidden=2048,
        intermediate=5632,
        q_heads=32,
        kv_heads=8,
        head_dim=64,
        dtype="fp32",
        e2e_hidden=512,
        e2e_layers=4,
        e2e_vocab=8192,
        e2e_heads=4,
        e2e_kv_heads=2,
        e2e_batch=1,
        e2e_seq=2048,
    ),
    "cuda": dict(
        tokens=8192,
        hidden=4096,
        intermediate=14336,
        q_heads=32,
        kv_heads=8,
        head_dim=64,
        dtype="bf16",
        e2e_hidden=2048,
        e2e_layers=4,
        e2e_vocab=32000,
        e2e_heads=16,
        e2e_kv_heads=4,
        e2e_batch=4,
        e2e_seq=2048,
    ),
}
RUNS = {"cpu": dict(reps=5, warmup=2), "cuda": dict(reps=20, warmup=5)}
QUICK = dict(
    tokens=256,
    hidden=128,
    intermediate=384,
    q_heads=4,
    kv_heads=2,
    head_dim=16,
    e2e_hidden=64,
    e2e_layers=2,
    e2e_vocab=512,
    e2e_heads=4,
    e2e_kv_heads=2,
    e2e_batch=1,
    e2e_seq=128,
    reps=2,
    warmup=1,
)
SHAPE_KEYS = tuple(DEFAULTS["cpu"])
TARGET_RATIO = 1.0  # fastft / transformers time (ops) and fused / unfused (training step): below this
TOLERANCE = {"fp32": 1e-4, "bf16": 3e-2}  # informational, on max|diff| / max|transformers|


# --------------------------------------------------------------------------------------
# configuration
# --------------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, help="tokens (rows) of the norm / mlp ops and rope positions")
    p.add_argument("--hidden", type=int, help="RMSNorm width; default CPU 2048, CUDA 4096")
    p.add_argument("--intermediate", type=int, help="MLP intermediate size; default CPU 5632, CUDA 14336")
    p.add_argument("--dtype", choices=("fp32", "bf16"), help="default CPU fp32, CUDA bf16")
    p.add_argument("--ops", default=",".join(OPS), help=f"comma-separated subset of {','.join(OPS)}")
    p.add_argument("--skip-e2e", action="store_true", help="do not time the end-to-end training step")
    p.add_argument("--e2e-seq", type=int, help="training step: sequence length; default 2048")
    p.add_argument("--e2e-batch", type=int, help="training step: batch; default CPU 1, CUDA 4")
    H.add_run_args(p, RUNS)
    p.add_argument("--quick", action="store_true", help="tiny shapes, reps 2: seconds")
    H.add_common_args(p, "fused_ops", memory="peak memory of the ops", mem_processes="memory processes")
    p.add_argument("--_mem-worker", dest="mem_worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    names = [s.strip() for s in args.ops.split(",") if s.strip()]
    bad = [n for n in names if n not in OPS]
    if bad or not names:
        p.error(f"--ops: unknown {bad}; choose from {OPS}")
    args.op_list = list(dict.fromkeys(names))
    return args


def resolve(args: argparse.Namespace) -> dict:
    """The defaults of the device, overridden by --quick and the flags. Deterministic (workers redo it)."""
    device = H.resolve_device(args.device)
    base = dict(DEFAULTS[device], **RUNS[device])
    if args.quick:
        base.update(QUICK)
    cfg = dict(base)
    for k in ("tokens", "hidden", "intermediate", "dtype", "e2e_seq", "e2e_batch", "reps", "warmup"):
        if getattr(args, k, None) is not None:
            cfg[k] = getattr(args, k)
    cfg.update(device=device, quick=args.quick, seed=args.seed, ops=args.op_list)
    target = DEFAULTS[device]
    cfg["at_target_shape"] = all(cfg[k] == target[k] for k in SHAPE_KEYS)
    return cfg


def op_shape(cfg: dict, op: str) -> str:
    t = cfg["tokens"]
    if op.startswith("rms"):
        return f"{t} x {cfg['hidden']}"
    if op in ("swiglu", "geglu"):
        return f"{t} x {cfg['intermediate']}"
    return f"1 x {t} pos, q {cfg['q_heads']} / k {cfg['kv_heads']} heads x {cfg['head_dim']}"


# --------------------------------------------------------------------------------------
# one op, one provider: fixed inputs, forward + backward
# --------------------------------------------------------------------------------------
class OpStep:
    """Inputs (leaves requiring grad), fixed output grads and a forward for (op, provider)."""

    def __init__(self, op: str, provider: str, cfg: dict, *, tiny: bool = False):
        import torch

        dev, dt = cfg["device"], H.torch_dtype(cfg["dtype"])
        tokens, hidden, inter = cfg["tokens"], cfg["hidden"], cfg["intermediate"]
        qh, kh, hd = cfg["q_heads"], cfg["kv_heads"], cfg["head_dim"]
        if tiny:  # to page in code / start thread pools before a CPU memory measurement
            tokens, hidden, inter, qh, kh, hd = 8, 16, 16, 2, 1, 8
        g = torch.Generator(device="cpu")
        g.manual_seed(cfg["seed"] + OPS.index(op))

        def randn(*shape, scale=1.0, shift=0.0):  # drawn on the CPU: the same values on every device
            return (torch.randn(*shape, generator=g) * scale + shift).to(device=dev, dtype=dt)

        self.leaves: dict = {}
        if op.startswith("rms"):
            offset = 0.0 if op == "rms_llama" else 1.0
            x = randn(1, tokens, hidden).requires_grad_(True)
            w = randn(hidden, scale=0.1, shift=1.0 - offset)
            self.dys = (randn(1, tokens, hidden),)
            if provider == "transformers":
                if op == "rms_llama":
                    from transformers.models.llama.modeling_llama import LlamaRMSNorm as Norm
                else:
                    from transformers.models.gemma2.modeling_gemma2 import Gemma2RMSNorm as Norm
                mod = Norm(hidden, eps=1e-6).to(device=dev, dtype=dt)
                with torch.no_grad():
                    mod.weight.copy_(w)
                self.forward = lambda: (mod(x),)
                w = mod.weight
            else:
                from fastft.ops import rms_norm

                w.requires_grad_(True)
                self.forward = lambda: (rms_norm(x, w, 1e-6, offset=offset),)
            self.leaves = {"x": x, "weight": w}
        elif op in ("swiglu", "geglu"):
            gate = randn(1, tokens, inter).requires_grad_(True)
            up = randn(1, tokens, inter).requires_grad_(True)
            self.dys = (randn(1, tokens, inter),)
            if provider == "transformers":
                from transformers.activations import ACT2FN

                act = ACT2FN["silu" if op == "swiglu" else "gelu_pytorch_tanh"]
                self.forward = lambda: (act(gate) * up,)
            else:
                from fastft.ops import geglu, swiglu

                if op == "swiglu":
                    self.forward = lambda: (swiglu(gate, up),)
                else:
                    self.forward = lambda: (geglu(gate, up, approximate="tanh"),)
            self.leaves = {"gate": gate, "up": up}
        else:  # rope
            # q / k as LlamaAttention makes them: proj(x).view(b, s, h, d).transpose(1, 2)
            q = randn(1, tokens, qh, hd).requires_grad_(True)
            k = randn(1, tokens, kh, hd).requires_grad_(True)
            inv_freq = 1.0 / (10000.0 ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
            freqs = torch.outer(torch.arange(tokens, dtype=torch.float32), inv_freq)
            emb = torch.cat([freqs, freqs], dim=-1)[None]
            cos, sin = emb.cos().to(dev, dt), emb.sin().to(dev, dt)  # the rotary module returns x's dtype
            self.dys = (randn(1, qh, tokens, hd), randn(1, kh, tokens, hd))
            if provider == "transformers":
                from transformers.models.llama.modeling_llama import apply_rotary_pos_emb as fn
            else:
                from fastft.ops import rope as fn
            self.forward = lambda: tuple(fn(q.transpose(1, 2), k.transpose(1, 2), cos, sin))
            self.leaves = {"q": q, "k": k}

    def clear(self) -> None:
        for t in self.leaves.values():
            t.grad = None

    def step(self):
        import torch

        self.clear()
        outs = self.forward()
        torch.autograd.backward(outs, self.dys)
        return outs


def mem_worker(args, cfg: dict) -> None:
    """Child process: peak memory of one fwd+bwd of ``op:provider``."""
    op, provider = args.mem_worker.split(":")
    dev = cfg["device"]
    try:
        s = OpStep(op, provider, cfg)
        full_prime = dev.startswith("cuda") or (
            all(os.environ.get(k) for k in H.CPU_WORKER_ENV) and H._reset_peak_rss()
        )
        if full_prime:

            def prime():
                s.step()
                s.clear()

        else:
            tiny = OpStep(op, provider, cfg, tiny=True)
            prime = tiny.step
        mem = H.measure_peak_memory(s.step, dev, prime=prime)
        mem["full_prime"] = full_prime
        H.emit_worker_result({"status": "ok", "memory": mem})
    except Exception as exc:  # reported, never raised
        H.emit_worker_result({"status": "error", "reason": f"{type(exc).__name__}: {exc}"})


# --------------------------------------------------------------------------------------
# end to end: a small Llama training step
# --------------------------------------------------------------------------------------
E2E_VARIANTS = (
    ("fused", dict()),
    ("unfused", dict(norms=False, mlp=False, rope=False)),
    ("eager", None),  # not patched at all
)


def e2e_rows(cfg: dict) -> list[dict]:
    import torch

    import fastft
    from fastft.testing import tiny_model

    dev, dt = cfg["device"], H.torch_dtype(cfg["dtype"])
    b, s = cfg["e2e_batch"], cfg["e2e_seq"]
    g = torch.Generator().manual_seed(cfg["seed"])
    ids = torch.randint(0, cfg["e2e_vocab"], (b, s), generator=g).to(dev)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    rows = []
    for name, flags in E2E_VARIANTS:
        model = tiny_model(
            "llama",
            seed=cfg["seed"],
            dtype=dt,
            hidden_size=cfg["e2e_hidden"],
            layers=cfg["e2e_layers"],
            vocab_size=cfg["e2e_vocab"],
            num_attention_heads=cfg["e2e_heads"],
            num_key_value_heads=cfg["e2e_kv_heads"],
            intermediate_size=cfg["e2e_hidden"] * 11 // 4,
            max_position_embeddings=max(128, s),
        ).to(dev)
        model.train()
        patched = []
        if flags is not None:
            report = fastft.patch(model, **flags)
            patched = sorted(report.features())

        def step(model=model):
            model.zero_grad(set_to_none=True)
            loss = model(**batch).loss
            loss.backward()
            return loss

        loss = step().item()
        t = H.time_fn(step, cfg["warmup"], cfg["reps"], device=dev)
        model.zero_grad(set_to_none=True)
        rows.append(
            dict(
                variant=name,
                patch="none"
                if flags is None
                else ("fastft.patch(model" + "".join(f", {k}={v}" for k, v in flags.items()) + ")"),
                features=",".join(patched) or "-",
                loss=loss,
                time=t,
                median_ms=t["median_ms"],
                p20_ms=t["p20_ms"],
                p80_ms=t["p80_ms"],
                tokens_per_s=b * s / (t["median_ms"] / 1e3),
            )
        )
        del model, step
        H.free_memory(dev)
    base = next(r for r in rows if r["variant"] == "unfused")
    for r in rows:
        r["time_x_unfused"] = H.ratio(r["median_ms"], base["median_ms"])
    return rows


# --------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------
def main(argv=None) -> int:
    raw_args = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(raw_args)
    cfg = resolve(args)
    if args.mem_worker:
        mem_worker(args, cfg)
        return 0
    script = os.path.abspath(__file__)
    t_start = time.perf_counter()
    parallel = H.mem_parallel(args)
    dev = cfg["device"]
    jobs = [] if args.skip_memory else [(op, p) for op in cfg["ops"] for p in PROVIDERS]
    env = H.worker_env(dev)

    def launch(job):
        return H.launch_isolated(script, raw_args + ["--_mem-worker", f"{job[0]}:{job[1]}"], env=env)

    running = [(job, launch(job)) for job in jobs] if parallel else []

    import torch

    cfg["torch_threads"] = torch.get_num_threads()
    print(
        f"fused ops bench: tokens={cfg['tokens']} hidden={cfg['hidden']} intermediate={cfg['intermediate']} "
        f"rope q/k heads={cfg['q_heads']}/{cfg['kv_heads']} head_dim={cfg['head_dim']} dtype={cfg['dtype']} "
        f"device={dev} ({H.device_name(dev)}) threads={cfg['torch_threads']} reps={cfg['reps']} "
        f"warmup={cfg['warmup']}{' [quick]' if cfg['quick'] else ''}"
    )

    # 1a. memory: fresh processes, none running during the timing
    mem: dict[tuple[str, str], dict] = {}
    if jobs:
        if parallel:
            results = [(job, H.collect_isolated(run, timeout=1800)) for job, run in running]
        else:
            results = [(job, H.collect_isolated(launch(job), timeout=1800)) for job in jobs]
        mem = dict(results)

    # 1b. time and agreement, in this process
    rows, agreement = [], []
    for op in cfg["ops"]:
        outs: dict[str, tuple] = {}
        op_rows = {}
        for provider in PROVIDERS:
            row = dict(op=op, shape=op_shape(cfg, op), provider=provider)
            rows.append(row)
            op_rows[provider] = row
            try:
                s = OpStep(op, provider, cfg)
                t = H.time_fn(s.step, cfg["warmup"], cfg["reps"], device=dev)
                y = s.step()
                outs[provider] = (
                    [o.detach() for o in y],
                    {k: v.grad for k, v in s.leaves.items()},
                )
                del s, y
            except Exception as exc:
                row.update(status="error", reason=f"{type(exc).__name__}: {exc}")
                print(f"  {op} / {provider} failed: {row['reason']}")
                continue
            row.update(status="ok", time=t, median_ms=t["median_ms"], p20_ms=t["p20_ms"], p80_ms=t["p80_ms"])
            m = mem.get((op, provider))
            if m is not None and m.get("status") == "ok":
                row["memory"] = m["memory"]
                row["peak_mib"] = m["memory"].get("peak_mib")
            elif m is not None:
                row["memory_error"] = m.get("reason", m.get("status"))
                print(f"  memory measurement failed for {op} / {provider}: {row['memory_error']}")
        ref = op_rows["transformers"]
        for row in op_rows.values():
            row["time_x_hf"] = H.ratio(row.get("median_ms"), ref.get("median_ms"))
            row["peak_x_hf"] = H.ratio(row.get("peak_mib"), ref.get("peak_mib"))
        if len(outs) == 2:
            (y_hf, g_hf), (y_ff, g_ff) = outs["transformers"], outs["fastft"]
            errs = {"out": max(H.rel_err(a, b) for a, b in zip(y_ff, y_hf))}
            errs.update({f"d{k}": H.rel_err(g_ff[k], g_hf[k]) for k in g_hf})
            worst = max(errs.values())
            agreement.append(
                dict(
                    op=op,
                    max_rel_err=worst,
                    detail=", ".join(f"{k} {v:.1e}" for k, v in errs.items()),
                    agrees=worst <= TOLERANCE[cfg["dtype"]],
                )
            )
        del outs
        H.free_memory(dev)

    # 2. end to end
    e2e = []
    if not args.skip_e2e:
        try:
            e2e = e2e_rows(cfg)
        except Exception as exc:
            print(f"  end-to-end step failed: {type(exc).__name__}: {exc}")

    # targets (reported, never asserted)
    note = "" if cfg["at_target_shape"] else "not the target shape: for information only"
    targets = []
    for op in cfg["ops"]:
        r = next(r for r in rows if r["op"] == op and r["provider"] == "fastft")
        v = r.get("time_x_hf")
        targets.append(
            dict(
                target=f"{op}: fastft time < {TARGET_RATIO:g}x transformers",
                value=v,
                met=None if v is None else v < TARGET_RATIO,
                note=note,
            )
        )
    if e2e:
        v = next(r for r in e2e if r["variant"] == "fused")["time_x_unfused"]
        targets.append(
            dict(
                target=f"training step: fused < {TARGET_RATIO:g}x unfused",
                value=v,
                met=None if v is None else v < TARGET_RATIO,
                note=note,
            )
        )

    print()
    print(
        H.markdown_table(
            [r for r in rows if r.get("status") == "ok"],
            [
                "op",
                "shape",
                "provider",
                ("median_ms", "fwd+bwd ms (median)"),
                ("p20_ms", "p20"),
                ("p80_ms", "p80"),
                ("time_x_hf", "time x hf"),
                ("peak_mib", "peak MiB"),
                ("peak_x_hf", "peak x hf"),
            ],
        )
    )
    if args.skip_memory:
        print("(peak memory skipped: --skip-memory)")
    inexact = sorted({f"{r['op']}/{r['provider']}" for r in rows if r.get("memory") and not r["memory"].get("exact")})
    if inexact:
        print(f"note: peak memory may be underestimated for {inexact} (VmHWM could not be reset)")
    print()
    if agreement:
        print(f"fastft vs transformers (max |diff| / max |transformers|; agrees: <= {TOLERANCE[cfg['dtype']]:g}):")
        print(H.markdown_table(agreement, ["op", ("max_rel_err", "max rel err"), "detail", "agrees"]))
        print()
    if e2e:
        print(
            f"training step: Llama hidden={cfg['e2e_hidden']} layers={cfg['e2e_layers']} vocab={cfg['e2e_vocab']} "
            f"heads={cfg['e2e_heads']}/{cfg['e2e_kv_heads']} batch={cfg['e2e_batch']} x seq={cfg['e2e_seq']} "
            f"{cfg['dtype']} (eager attention; peak memory not measured):"
        )
        print(
            H.markdown_table(
                e2e,
                [
                    "variant",
                    "patch",
                    ("median_ms", "step ms (median)"),
                    ("p20_ms", "p20"),
                    ("p80_ms", "p80"),
                    ("features", "patched features"),
                    ("time_x_unfused", "time x unfused"),
                    ("tokens_per_s", "tokens/s"),
                    "loss",
                ],
            )
        )
        print()
    print(H.markdown_table(targets, ["target", "value", "met", "note"]))

    H.finish(
        args,
        "fused_ops",
        {"config": cfg, "results": rows, "agreement": agreement, "e2e": e2e, "targets": targets},
        device=dev,
        quick=cfg["quick"],
        t_start=t_start,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
