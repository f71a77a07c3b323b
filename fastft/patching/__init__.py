"""``fastft.patch(model)``: one generic engine that puts fastft's kernels into a transformers or PEFT model."""

from .engine import patch, patch_report, unpatch
from .report import PatchReport

__all__ = ["patch", "unpatch", "patch_report", "PatchReport"]
