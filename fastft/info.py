"""What this machine can run: versions, devices, and for each op which backend runs and why."""

from __future__ import annotations

import importlib.metadata
import platform

import torch

from . import __version__, _ext, backends


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def collect() -> dict:
    import fastft.ops  # noqa: F401  (registers the ops with the dispatcher)

    devices = ["cpu"]
    cuda = {"available": torch.cuda.is_available()}
    if cuda["available"]:
        devices.append("cuda")
        cuda["devices"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        cuda["version"] = torch.version.cuda
    ops = {}
    for op, impls in sorted(backends.registered_ops().items()):
        ops[op] = {"implemented": list(impls)}
        for dev in devices:
            try:
                choice = backends.select(op, dev, "auto")
                ops[op][dev] = {"backend": choice.backend, "why": choice.reason}
            except backends.BackendUnavailable as exc:
                ops[op][dev] = {"backend": None, "why": str(exc)}
    ok, why = backends.triton_importable()
    return {
        "fastft": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": {d: _version(d) for d in ("torch", "triton", "transformers", "peft", "bitsandbytes")},
        "cuda": cuda,
        "triton": why,
        "triton_interpret": backends.interpreting(),
        "forced_backend": backends.requested(None),
        "extensions": _ext.status(),
        "ops": ops,
    }


def render(info: dict) -> str:
    lines = [f"fastft {info['fastft']}  (python {info['python']}, {info['platform']})"]
    lines.append("versions: " + ", ".join(f"{k} {v}" for k, v in info["versions"].items()))
    cuda = info["cuda"]
    if cuda["available"]:
        lines.append(f"cuda: {cuda['version']}, devices: {', '.join(cuda['devices'])}")
    else:
        lines.append("cuda: not available (every op runs its CPU path)")
    lines.append(f"triton: {info['triton']}" + ("; TRITON_INTERPRET=1" if info["triton_interpret"] else ""))
    lines.append("compiled extensions: " + "; ".join(f"{k}: {v}" for k, v in info["extensions"].items()))
    if info["forced_backend"] != "auto":
        lines.append(f"FASTFT_BACKEND={info['forced_backend']} forces that backend for every op")
    lines.append("")
    lines.append("| op | device | backend | why |")
    lines.append("|---|---|---|---|")
    for op, d in info["ops"].items():
        for dev in ("cpu", "cuda"):
            if dev in d:
                lines.append(f"| {op} | {dev} | {d[dev]['backend'] or '-'} | {d[dev]['why']} |")
    return "\n".join(lines)
