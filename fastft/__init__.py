"""fastft: compiled kernels that make fine-tuning Hugging Face causal LMs faster and lighter.

report = fastft.patch(model)      # a transformers or PEFT model, before training
print(report)                     # what was accelerated, what was not and why
fastft.unpatch(model)             # back to the original behaviour

result = fastft.train(fastft.TrainConfig(model=..., data=..., method="lora"))   # the lean trainer
"""

__version__ = "0.1.0"

from . import backends, ops  # noqa: E402
from .backends import BackendUnavailable  # noqa: E402
from .nn import ExpertsWeight4bit, Linear4bit, quantize  # noqa: E402
from .patching import PatchReport, patch, patch_report, unpatch  # noqa: E402

__all__ = [
    "__version__",
    "ops",
    "backends",
    "BackendUnavailable",
    "patch",
    "unpatch",
    "patch_report",
    "PatchReport",
    "quantize",
    "Linear4bit",
    "ExpertsWeight4bit",
    "train",
    "TrainConfig",
    "TrainResult",
    "TrainingInterrupted",
]

_LAZY = {"train", "TrainConfig", "TrainResult", "TrainingInterrupted"}  # fastft.training, imported on first use


def __getattr__(name):
    if name in _LAZY:
        from . import training

        return getattr(training, name)
    raise AttributeError(f"module 'fastft' has no attribute {name!r}")
