"""The ``fastft`` command line: ``fastft info``, ``fastft train``, ``fastft generate``, ``fastft bench``.

Errors in what the user typed end with exit code 2 and one line on stderr, no traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


class UsageError(Exception):
    """A bad argument or input: reported in one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own errors: one line, exit 2
        raise UsageError(message)


def _cmd_info(args) -> int:
    from .info import collect, render

    info = collect()
    print(json.dumps(info, indent=2) if args.json else render(info))
    return 0


# ------------------------------------------------------------------------------------------ train
# flag -> (TrainConfig field, argparse keywords); every default is None so only flags given override the file
def _int_list_or_str(text: str):
    parts = [t.strip() for t in text.split(",") if t.strip()]
    return parts[0] if len(parts) == 1 else parts


_TRAIN_FLAGS = [
    ("--model", dict(help="local path or hub name of a causal LM (default: the embedded tiny Llama)")),
    ("--data", dict(help="training data: .jsonl / .json / .csv (default: the embedded Alpaca tasks)")),
    ("--eval-data", dict(help="evaluation data (default: --eval-frac of the training data)")),
    ("--method", dict(choices=["full", "lora", "qlora"], help="full fine-tuning, LoRA, or QLoRA (NF4 base)")),
    ("--output-dir", dict(help="where checkpoints, metrics and the plot go (default ./fastft-output)")),
    ("--max-steps", dict(type=int, help="optimizer steps (default: --epochs over the data)")),
    ("--epochs", dict(type=int, help="passes over the data when --max-steps is not given")),
    ("--lr", dict(type=float, help="peak learning rate")),
    ("--batch-size", dict(type=int, help="micro-batch size per process")),
    ("--grad-accum", dict(type=int, help="micro-batches per optimizer step")),
    ("--seq-len", dict(type=int, help="maximum tokens per example / packed row")),
    ("--rank", dict(type=int, help="LoRA rank")),
    ("--alpha", dict(type=float, help="LoRA alpha")),
    ("--dropout", dict(type=float, help="LoRA dropout")),
    ("--rslora", dict(action="store_const", const=True, help="rank-stabilised LoRA scaling (alpha / sqrt(r))")),
    ("--target-modules", dict(type=_int_list_or_str, help="'all-linear' (default) or comma-separated module names")),
    ("--schedule", dict(choices=["linear", "cosine", "constant"], help="learning-rate schedule after warm-up")),
    ("--warmup-steps", dict(type=int, help="linear warm-up steps")),
    ("--weight-decay", dict(type=float, help="AdamW weight decay (default 0)")),
    ("--max-grad-norm", dict(type=float, help="gradient clipping norm (0: off; default 1.0)")),
    ("--precision", dict(choices=["auto", "fp32", "bf16", "fp16"], help="auto: bf16 on CUDA, fp32 on CPU")),
    ("--seed", dict(type=int, help="random seed (default 0)")),
    ("--eval-every", dict(type=int, help="evaluate every N steps (default: about 10 times per run)")),
    ("--eval-frac", dict(type=float, help="fraction of the data held out when no --eval-data (default 0.1)")),
    ("--save-every", dict(type=int, help="also write checkpoint-last every N steps")),
    ("--early-stopping-patience", dict(type=int, help="stop after N evaluations without improvement")),
    ("--packing", dict(action=argparse.BooleanOptionalAction, help="pack several examples per row")),
    ("--template", dict(choices=["auto", "alpaca", "chat", "text"], help="data format (default: detected)")),
    ("--train-on-prompt", dict(action="store_const", const=True, help="train on the prompt tokens too")),
    ("--report-to", dict(help="comma-separated: tensorboard, mlflow, wandb")),
    ("--resume-from", dict(help="a checkpoint directory, or 'last' (OUTPUT_DIR/checkpoint-last)")),
    ("--fsdp", dict(action="store_const", const=True, help="under torchrun: FSDP2 per decoder layer, not DDP")),
    ("--backend", dict(help="kernel backend for fastft.patch: auto (default), torch, triton, ...")),
    ("--checkpointing", dict(choices=["recompute", "offload"], help="activation checkpointing per decoder layer")),
    ("--trust-remote-code", dict(action="store_const", const=True, help="allow the model's own code from the hub")),
    ("--max-new-tokens", dict(type=int, help="tokens generated for the before/after samples")),
    ("--num-generations", dict(type=int, help="prompts shown before/after training (0: none)")),
    ("--quiet", dict(action="store_const", const=True, help="no progress bar, no report")),
    (
        "--objective",
        dict(
            choices=["sft", "dpo", "orpo", "simpo", "kto"],
            help="training objective (default sft); "
            "the others read prompt/chosen/rejected (KTO: prompt/completion/label) records",
        ),
    ),
    ("--beta", dict(type=float, help="the preference objectives' beta (default 0.1)")),
    ("--dpo-loss-type", dict(help="DPO variant: sigmoid (default), ipo, hinge, robust, ... (fastft.losses)")),
    ("--label-smoothing", dict(type=float, help="DPO sigmoid (cDPO) / robust / exo_pair and SimPO label smoothing")),
    ("--simpo-gamma", dict(type=float, help="SimPO's target margin (default 0.5)")),
    ("--precompute-ref", dict(action="store_const", const=True, help="reference log-probs once before training")),
    (
        "--compile",
        dict(
            nargs="?",
            const="default",
            metavar="MODE",
            help="torch.compile the training forward; MODE: default (no MODE), reduce-overhead, max-autotune, "
            "max-autotune-no-cudagraphs (FASTFT_COMPILE_BACKEND picks the compiler backend, default inductor)",
        ),
    ),
]


def _train_config(args):
    from .training import TrainConfig

    cfg = TrainConfig.from_file(args.config) if args.config else TrainConfig()
    overrides = {}
    for flag, _ in _TRAIN_FLAGS:
        name = flag[2:].replace("-", "_")
        value = getattr(args, name)
        if value is not None:
            overrides[name] = value
    cfg = cfg.replace(**overrides)
    cfg.validate()
    return cfg


def _cmd_train(args) -> int:
    from .training import train

    cfg = _train_config(args)
    if cfg.data is not None and not Path(cfg.data).is_file():
        raise UsageError(f"data file not found: {cfg.data}")
    if cfg.eval_data is not None and not Path(cfg.eval_data).is_file():
        raise UsageError(f"eval data file not found: {cfg.eval_data}")
    train(cfg)
    return 0


# --------------------------------------------------------------------------------------- generate
def _cmd_generate(args) -> int:
    import torch

    from .training import format_prompt, generate_text

    if args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.adapter is not None and not (Path(args.adapter) / "adapter_config.json").is_file():
        raise UsageError(f"--adapter {args.adapter}: not a PEFT adapter directory (no adapter_config.json)")
    base, method = args.model, None
    if args.adapter is not None:
        base, method = _adapter_base(Path(args.adapter), args.model)
    if base is None:
        from . import default

        tokenizer, model = default.load_tokenizer(), default.load_model(torch.float32)
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        try:
            tok_src = base
            if args.adapter is not None and (Path(args.adapter) / "tokenizer_config.json").is_file():
                tok_src = args.adapter
            tokenizer = AutoTokenizer.from_pretrained(tok_src, trust_remote_code=args.trust_remote_code)
            model = AutoModelForCausalLM.from_pretrained(base, trust_remote_code=args.trust_remote_code)
        except (OSError, ValueError) as e:
            raise UsageError(f"cannot load model {base!r}: {' '.join(str(e).split())[:300]}") from None
    if method == "qlora":  # the adapter was trained over an NF4 base: generate over the same one
        from . import quantize
        from .patching.experts import is_experts_module

        # MoE: the experts after the adapter (PEFT's target_parameters wraps 16-bit expert weights only)
        experts_later = args.adapter is not None and any(is_experts_module(m) for m in model.modules())
        quantize(model, experts=not experts_later)
    if args.adapter is not None:
        from peft import PeftModel

        from .training.model import quiet_peft_warnings

        try:
            with quiet_peft_warnings():
                model = PeftModel.from_pretrained(model, args.adapter)
        except (OSError, ValueError, RuntimeError, KeyError) as e:
            raise UsageError(
                f"cannot load adapter {args.adapter!r} onto the model: {' '.join(str(e).split())[:300]}"
            ) from None
        if method == "qlora" and experts_later:
            quantize(model)  # the experts, inside the adapter's wrappers (its LoRA layers are left alone)
    template = args.template
    if template == "auto":
        template = "alpaca" if base is None else ("chat" if getattr(tokenizer, "chat_template", None) else "none")
    prompt = format_prompt(args.prompt, tokenizer, template)
    print(generate_text(model.eval(), tokenizer, prompt, max_new_tokens=args.max_new_tokens))
    return 0


def _adapter_base(adapter: Path, model: str | None) -> tuple[str | None, str | None]:
    """(the base model to load, the fastft method the adapter was trained with). Without ``--model``
    the base is the adapter's ``base_model_name_or_path`` (as PEFT's ``AutoPeftModelForCausalLM``
    reads it; empty for the embedded default); the method comes from the fastft checkpoint's
    ``trainer_state.json`` (or the run's ``train_config.json``), so a ``qlora`` run's base is
    quantised to NF4 as it was in training."""
    try:
        acfg = json.loads((adapter / "adapter_config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UsageError(f"--adapter {adapter}: unreadable adapter_config.json: {e}") from None
    base = model if model is not None else (acfg.get("base_model_name_or_path") or None)
    method = None
    for f, key in ((adapter / "trainer_state.json", "method"), (adapter.parent / "train_config.json", "method")):
        try:
            method = json.loads(f.read_text()).get(key)
            break
        except (OSError, json.JSONDecodeError, AttributeError):
            continue
    return base, method


# ------------------------------------------------------------------------------------------ bench
def _cmd_bench(args) -> int:
    import importlib.util

    if importlib.util.find_spec("fastft.benchsuite") is None:
        raise UsageError("bench suite not available (fastft.benchsuite is missing from this install)")
    from . import benchsuite

    p = _Parser(prog="fastft bench", description="fastft's kernel and training benchmarks")
    benchsuite.add_arguments(p)
    return benchsuite.run(p.parse_args(args.bench_args))


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="fastft", description="fastft: fused kernels for fine-tuning Hugging Face causal LMs")
    sub = p.add_subparsers(dest="command", parser_class=_Parser)
    info = sub.add_parser("info", help="versions, devices, and which backend runs each op here and why")
    info.add_argument("--json", action="store_true", help="print machine-readable JSON")
    info.set_defaults(func=_cmd_info)

    tr = sub.add_parser(
        "train",
        help="fine-tune a causal LM (full, LoRA, QLoRA); no --model/--data: the embedded default",
        description="Fine-tune a causal LM. Flags override --config. Under torchrun: data-parallel.",
    )
    tr.add_argument("--config", help="a .json/.yaml file of TrainConfig options (flags override it)")
    for flag, kw in _TRAIN_FLAGS:
        tr.add_argument(flag, default=None, **kw)
    tr.set_defaults(func=_cmd_train)

    gen = sub.add_parser("generate", help="greedy generation from a model, optionally with a LoRA adapter")
    gen.add_argument("--model", help="local path or hub name (default: the embedded tiny Llama)")
    gen.add_argument("--adapter", help="a PEFT adapter directory (e.g. OUTPUT_DIR/checkpoint-best)")
    gen.add_argument("--prompt", required=True, help="the instruction / user message / text")
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument(
        "--template",
        choices=["auto", "alpaca", "chat", "none"],
        default="auto",
        help="how to wrap the prompt (auto: alpaca for the default model, else the chat template if any, else none)",
    )
    gen.add_argument("--trust-remote-code", action="store_true")
    gen.set_defaults(func=_cmd_generate)

    bench = sub.add_parser("bench", help="the benchmark suite (fastft bench --help)", add_help=False)
    bench.set_defaults(func=_cmd_bench, bench_args=[])
    return p


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
        if getattr(args, "func", None) is None:
            raise UsageError("a command is required: fastft info | train | generate | bench  (see fastft --help)")
        if args.command == "bench":
            args.bench_args = extra
        elif extra:
            raise UsageError(f"unrecognized arguments: {' '.join(extra)}")
        return args.func(args)
    except (UsageError, ValueError, TypeError, FileNotFoundError) as exc:
        # DataError (fastft.data) is a ValueError: it names the file and line
        print(f"fastft: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:  # fastft.training.TrainingInterrupted says where the checkpoint is
        print(f"fastft: {_one_line(exc) if str(exc) else 'interrupted'}", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
