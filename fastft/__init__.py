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
    "NF4Config",
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
    if name == "NF4Config":  # imports transformers (which import fastft does not)
        try:
            from .hf_quantizer import NF4Config
        except ImportError as e:
            raise ImportError(
                f"fastft.NF4Config needs transformers >= 5 (its weight-conversion loading): {e}"
            ) from None
        return NF4Config
    raise AttributeError(f"module 'fastft' has no attribute {name!r}")


def _register_hf_quantizer() -> None:
    """Register ``NF4Config`` (``quant_method="fastft_nf4"``) with transformers; silently not on a
    transformers without the loading API it needs (< 5), where ``fastft.NF4Config`` says so."""
    try:
        from . import hf_quantizer  # noqa: F401  (registers on import)
    except ImportError:
        pass
    except Exception as e:  # never break importing transformers
        import warnings

        warnings.warn(f"fastft: NF4Config not registered with transformers: {e}", stacklevel=2)


class _RegisterAfterImport:
    """A ``sys.meta_path`` finder that runs :func:`_register_hf_quantizer` right after transformers'
    quantizer registry (``transformers.quantizers.auto``, which ``modeling_utils`` imports before any
    ``from_pretrained`` can read a ``quantization_config``) is imported: ``import fastft`` stays free of
    transformers' import time, and a fastft checkpoint still reloads with plain ``from_pretrained``."""

    name = "transformers.quantizers.auto"

    def find_spec(self, fullname, path, target=None):
        if fullname != self.name:
            return None
        import sys

        if self in sys.meta_path:
            sys.meta_path.remove(self)  # once
        from importlib.util import find_spec

        spec = find_spec(fullname)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_register(module):
            exec_module(module)
            _register_hf_quantizer()

        spec.loader.exec_module = exec_then_register
        return spec


def _install_hf_quantizer() -> None:
    import sys

    if _RegisterAfterImport.name in sys.modules:
        _register_hf_quantizer()
    elif not any(isinstance(f, _RegisterAfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterImport())


_install_hf_quantizer()
