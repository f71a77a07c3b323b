"""What :func:`fastft.patch` did: each accelerated module or forward, and each one left alone with the reason."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field

# Every feature's patched path is made of torch.library operators (issue 15): under torch.compile
# patching adds no graph break (tests/test_compile_patched.py). What a feature puts in that still
# runs eagerly (4-bit experts, checkpointing="offload") it says so per patch, through
# PatchReport.runs_eager (tests/test_compile_experts.py, tests/test_compile_patched.py).


@dataclass(frozen=True)
class Patched:
    feature: str  # "loss", "lora", "quant", "checkpointing", ...
    target: str  # module path or forward that was swapped, e.g. "lm_head + forward (LlamaForCausalLM)"
    detail: str  # what it got: the op, backend, options


@dataclass(frozen=True)
class Skipped:
    feature: str
    target: str
    reason: str


@dataclass
class PatchReport:
    model: str = ""
    patched: list[Patched] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    # calls a patched module ran with its original forward because that call did not fit the
    # fused op (shape, dtype, extra arguments): "feature | target | reason" -> number of calls
    fallbacks: dict[str, int] = field(default_factory=dict)
    # what this patch put in that runs eagerly under torch.compile:
    # feature -> why (see runs_eager)
    eager_parts: dict[str, str] = field(default_factory=dict)

    def add(self, feature: str, target: str, detail: str) -> None:
        self.patched.append(Patched(feature, target, detail))

    def skip(self, feature: str, target: str, reason: str) -> None:
        self.skipped.append(Skipped(feature, target, reason))

    def fallback(self, feature: str, target: str, reason: str) -> None:
        """Count one call of a patched module that ran its original forward instead (see ``fallbacks``)."""
        key = f"{feature} | {target} | {reason}"
        self.fallbacks[key] = self.fallbacks.get(key, 0) + 1

    def runs_eager(self, feature: str, why: str) -> None:
        """Note that something ``feature`` patched runs eagerly under torch.compile (a graph break each)."""
        self.eager_parts[feature] = why

    def features(self) -> set[str]:
        """Features that patched at least one module."""
        return {p.feature for p in self.patched}

    def eager_under_compile(self) -> dict[str, str]:
        """Features that patched something and run eagerly under torch.compile -> why."""
        return {f: self.eager_parts[f] for f in sorted(self.features()) if f in self.eager_parts}

    def compile_ready(self) -> str:
        """One line: whether torch.compile sees only operators from fastft (no graph break added)."""
        eager = self.eager_under_compile()
        if not eager:
            return (
                "compile-ready: yes (every fastft feature patched here is a torch.library op; where an op's "
                "backend is the PyTorch reference, e.g. norms, MLP, RoPE and LoRA on a CPU, compile traces "
                "the reference so inductor fuses it)"
            )
        return "compile-ready: no: " + "; ".join(
            f"{f} runs eager ({why}; a graph break each)" for f, why in eager.items()
        )

    def to_dict(self) -> dict:
        return {
            "model": self.model,
            "compile_ready": self.compile_ready(),
            "patched": [asdict(p) for p in self.patched],
            "skipped": [asdict(s) for s in self.skipped],
            "fallbacks": dict(self.fallbacks),
        }

    def __str__(self) -> str:
        """A table; modules that differ only by layer index and got the same treatment share a row."""
        lines = [f"fastft patch report for {self.model}: {len(self.patched)} patched, {len(self.skipped)} not patched"]
        rows = [("", "feature", "target", "detail / reason")]
        rows += [("+", *r) for r in _grouped((p.feature, p.target, p.detail) for p in self.patched)]
        rows += [("-", *r) for r in _grouped((s.feature, s.target, s.reason) for s in self.skipped)]
        w1 = max(len(r[1]) for r in rows)
        w2 = min(max(len(r[2]) for r in rows), 60)
        for mark, feat, target, text in rows:
            lines.append(f"  {mark:1} {feat:<{w1}}  {target:<{w2}}  {text}")
        if self.fallbacks:
            lines.append("  calls that ran the original forward (did not fit the fused op):")
            for (feat, target, reason), n in _grouped_counts(self.fallbacks).items():
                lines.append(f"    {feat}  {target}: {reason} ({n} call{'s' if n != 1 else ''})")
        lines.append(f"  {self.compile_ready()}")
        return "\n".join(lines)

    __repr__ = __str__


def _grouped_counts(fallbacks: dict[str, int]) -> dict[tuple[str, str, str], int]:
    out: dict[tuple[str, str, str], int] = {}
    for key, n in fallbacks.items():
        feature, target, reason = key.split(" | ", 2)
        k = (feature, re.sub(r"\.\d+\.", ".*.", target), reason)
        out[k] = out.get(k, 0) + n
    return out


def _grouped(entries):
    """Collapse ``layers.3.q_proj`` / ``layers.4.q_proj`` with the same text into ``layers.*.q_proj (x2)``."""
    groups: dict[tuple[str, str, str], int] = {}
    for feature, target, text in entries:
        key = (feature, re.sub(r"\.\d+\.", ".*.", target), text)
        groups[key] = groups.get(key, 0) + 1
    return [(f, t if n == 1 else f"{t} (x{n})", x) for (f, t, x), n in groups.items()]
