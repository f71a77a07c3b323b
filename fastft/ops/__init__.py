"""fastft's ops: each validates its inputs, picks a backend (:mod:`fastft.backends`) and runs it.

Every op has a pure-PyTorch reference next to it (``*_reference``), used by the
CPU path, the tests and the benchmarks alike.
"""

from .activations import geglu, geglu_reference, swiglu, swiglu_reference
from .cross_entropy import (
    cross_entropy,
    cross_entropy_reference,
    fused_linear_cross_entropy,
    fused_linear_cross_entropy_reference,
)
from .logprobs import fused_linear_logprobs, fused_linear_logprobs_reference
from .lora import dropout_mask, lora_linear, lora_linear_reference
from .lora_nf4 import lora_nf4_call as _lora_nf4_call  # noqa: F401  (registers fastft::lora_nf4_linear)
from .nf4 import (
    NF4State,
    as_nf4_state,
    dequantize_nf4,
    nf4_matmul,
    nf4_matmul_reference,
    quantize_nf4,
)
from .rms_norm import rms_norm, rms_norm_reference
from .rope import rope, rope_reference

__all__ = [
    "swiglu",
    "swiglu_reference",
    "geglu",
    "geglu_reference",
    "rope",
    "rope_reference",
    "cross_entropy",
    "cross_entropy_reference",
    "fused_linear_cross_entropy",
    "fused_linear_cross_entropy_reference",
    "fused_linear_logprobs",
    "fused_linear_logprobs_reference",
    "lora_linear",
    "lora_linear_reference",
    "dropout_mask",
    "NF4State",
    "as_nf4_state",
    "quantize_nf4",
    "dequantize_nf4",
    "nf4_matmul",
    "nf4_matmul_reference",
    "rms_norm",
    "rms_norm_reference",
]
