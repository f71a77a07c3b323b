"""fastft: compiled kernels that make fine-tuning Hugging Face causal LMs faster and lighter."""

__version__ = "0.1.0"

from . import backends, ops  # noqa: E402
from .backends import BackendUnavailable  # noqa: E402

__all__ = ["__version__", "ops", "backends", "BackendUnavailable"]
