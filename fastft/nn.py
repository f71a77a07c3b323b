"""4-bit NF4 linear layers and ``fastft.quantize(model)``: QLoRA without bitsandbytes.

:class:`Linear4bit` is an ``nn.Linear`` whose weight is stored packed in bitsandbytes'
NF4 format (see :mod:`fastft.ops.nf4`). It subclasses ``nn.Linear`` so that PEFT wraps it
with LoRA like any linear layer (``target_modules="all-linear"`` finds it) and
``fastft.patch`` then fuses the LoRA branch with the 4-bit base (the dequantisation
happens inside the fused op, forward and backward, with no persistent 16-bit copy).

State dict: ``weight`` holds the packed bytes (uint8, ``[ceil(out*in/2), 1]`` like
bitsandbytes), the per-block statistics are buffers (``absmax``, and with double
quantisation ``nested_absmax``, ``nested_offset``, ``nested_code``), so a quantised model
round-trips through ``save_pretrained``/safetensors. Adapter weights are keyed by module
name only, so an adapter trained here loads onto a bitsandbytes-quantised or an
unquantised base alike.
"""

from __future__ import annotations

import torch
from torch import nn

from .ops.nf4 import NF4State, dequantize_nf4, nf4_matmul, quantize_nf4

__all__ = ["Linear4bit", "ExpertsWeight4bit", "ExpertsWeight4bitView", "quantize"]


class Linear4bit(nn.Linear):
    """``y = x @ W.T + b`` with ``W`` stored as NF4 (4 bits a weight, fp32 absmax per block)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        blocksize: int = 64,
        double_quant: bool = True,
        weight_dtype: torch.dtype = torch.float32,
        cache_absmax: bool = False,
        device=None,
    ):
        nn.Module.__init__(self)  # not nn.Linear.__init__: no dense weight is ever allocated
        self.in_features, self.out_features = in_features, out_features
        self.blocksize, self.double_quant, self.weight_dtype = blocksize, double_quant, weight_dtype
        # keep the fp32 absmax decoded from the double quantisation (+32 / blocksize bits per
        # weight, 0.5 at blocksize 64): the kernels read it instead of decoding the 8-bit absmax
        self.cache_absmax = bool(cache_absmax) and double_quant
        self._nf4_state: NF4State | None = None
        numel = in_features * out_features
        self.weight = nn.Parameter(torch.empty((numel + 1) // 2, 1, dtype=torch.uint8, device=device), False)
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=weight_dtype, device=device)) if bias else None
        nblocks = -(-numel // blocksize)
        self.register_buffer("absmax", torch.empty(nblocks, dtype=torch.uint8 if double_quant else torch.float32))
        self.register_buffer("code", torch.empty(16, dtype=torch.float32))
        if double_quant:
            self.register_buffer("nested_absmax", torch.empty(-(-nblocks // 256), dtype=torch.float32))
            self.register_buffer("nested_offset", torch.empty((), dtype=torch.float32))
            self.register_buffer("nested_code", torch.empty(256, dtype=torch.float32))

    @classmethod
    def from_linear(
        cls, linear: nn.Module, *, blocksize: int = 64, double_quant: bool = True, cache_absmax: bool = False
    ) -> Linear4bit:
        """Quantise an ``nn.Linear`` (or transformers' ``Conv1D``, whose weight is ``[in, out]``)."""
        weight = linear.weight.detach()
        if type(linear) is not nn.Linear:  # Conv1D: y = x @ W + b with W [in, out]
            weight = weight.t()
        out_f, in_f = weight.shape
        layer = cls(
            in_f,
            out_f,
            bias=linear.bias is not None,
            blocksize=blocksize,
            double_quant=double_quant,
            weight_dtype=weight.dtype,
            cache_absmax=cache_absmax,
            device=weight.device,
        )
        packed, state = quantize_nf4(weight.contiguous(), blocksize=blocksize, double_quant=double_quant)
        layer.load_state(packed, state)
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=linear.bias.requires_grad)
        return layer

    @staticmethod
    def state_tensors(packed: torch.Tensor, state: NF4State) -> dict[str, torch.Tensor]:
        """The layer's state-dict tensors (``weight`` and its statistics buffers) for a quantised weight."""
        out = {"weight": packed, "absmax": state.absmax, "code": state.code}
        if state.double_quant:
            out.update(nested_absmax=state.absmax2, nested_offset=state.offset.reshape(()), nested_code=state.code2)
        return out

    def load_state(self, packed: torch.Tensor, state: NF4State) -> None:
        with torch.no_grad():
            for name, t in self.state_tensors(packed, state).items():
                if name == "weight":
                    self.weight.data = t.to(self.weight.device)
                else:
                    setattr(self, name, t.to(self.weight.device))

    @property
    def quant_state(self) -> NF4State:
        """The NF4 state of the weight, built from the buffers (no copies) and kept while they
        are the same tensors, so that it is validated once (a ``.to()``, ``load_state_dict`` or
        ``load_state`` that replaces a buffer builds a new one). With ``cache_absmax`` it also
        keeps the decoded fp32 absmax (not a buffer: rebuilt from the 8-bit one when needed)."""
        st = self._nf4_state
        if (
            st is not None
            and st.absmax is self.absmax
            and st.code is self.code
            and (not self.double_quant or (st.absmax2 is self.nested_absmax and st.offset is self.nested_offset))
        ):
            return st
        extra = {}
        if self.double_quant:
            extra = dict(offset=self.nested_offset, absmax2=self.nested_absmax, code2=self.nested_code)
        st = NF4State(
            shape=torch.Size((self.out_features, self.in_features)),
            dtype=self.weight_dtype,
            blocksize=self.blocksize,
            absmax=self.absmax,
            code=self.code,
            **extra,
        )
        if self.cache_absmax:
            st = st.with_absmax_cache()
        self._nf4_state = st
        return st

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight as a dense ``[out_features, in_features]`` tensor in ``dtype`` (default the
        layer's dequantisation dtype); a new tensor, bit-identical to bitsandbytes' ``dequantize_4bit``."""
        return dequantize_nf4(self.weight, self.quant_state, dtype=self.weight_dtype if dtype is None else dtype)

    @torch.no_grad()
    def requantize_(self, weight: torch.Tensor) -> None:
        """Quantise the dense ``weight`` (``[out_features, in_features]``) into this layer, in place, with
        its blocksize and double quantisation (the bytes bitsandbytes' ``quantize_4bit`` gives): what merging
        a LoRA adapter into the 4-bit weight does (:mod:`fastft.patching.merge_4bit`). The packed bytes and
        statistics are replaced; the ``weight`` Parameter object stays the same."""
        if not torch.is_tensor(weight) or not weight.dtype.is_floating_point:
            raise TypeError(f"requantize_ takes a floating-point tensor, got {getattr(weight, 'dtype', weight)!r}")
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise ValueError(
                f"requantize_ takes a weight of shape {(self.out_features, self.in_features)}, got {tuple(weight.shape)}"
            )
        packed, state = quantize_nf4(
            weight.to(self.weight.device).contiguous(), blocksize=self.blocksize, double_quant=self.double_quant
        )
        self.load_state(packed, state)
        self._nf4_state = None

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._nf4_state = None  # the buffers were overwritten in place: validate (and decode) again

    def _apply(self, fn, recurse=True):
        # model.to(torch.bfloat16) / .half() must not cast the NF4 statistics (code tables, nested
        # absmax and offset: the weight itself would change): a casting ``fn`` moves them to its
        # device only, casts the bias as nn.Linear's, and sets the dtype the weight dequantises to
        probe = fn(torch.empty(0, dtype=torch.float32, device=self.weight.device))
        to_dtype = fn(torch.empty(0, dtype=self.weight_dtype, device=self.weight.device)).dtype
        if probe.dtype == torch.float32:  # fp32 stays fp32 (a move, .float(), share_memory_, ...)
            super()._apply(fn, recurse)
        else:
            stats = {k: self._buffers.pop(k) for k in list(self._buffers)}
            try:
                super()._apply(fn, recurse)  # the packed uint8 weight is not floating: only moved
            finally:
                for k, t in stats.items():
                    self._buffers[k] = t.to(device=probe.device) if t is not None else None
        if to_dtype.is_floating_point and to_dtype != self.weight_dtype:
            self.weight_dtype = to_dtype
            self._nf4_state = None
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias.to(x.dtype) if self.bias is not None and self.bias.dtype != x.dtype else self.bias
        return nf4_matmul(x, self.weight, self.quant_state, bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"nf4 blocksize={self.blocksize}, double_quant={self.double_quant}"
            + (", fp32 absmax cached" if self.cache_absmax else "")
        )


_MERGE_4BIT = (
    "cannot merge a LoRA adapter into 4-bit (NF4) expert weights (ExpertsWeight4bit has no in-place data: "
    "merging would quantise the weight again). Save the adapter (save_pretrained) and merge it on the 16-bit "
    "model: PeftModel.from_pretrained(model_16bit, path).merge_and_unload()"
)


_NOT_A_TENSOR = (
    "transformers' 'grouped_mm' / 'batched_mm' experts implementations read the expert weights as whole "
    "tensors; over 4-bit experts run fastft's ('fastft', what fastft.patch(model) sets) or 'eager' (one expert "
    "dequantised at a time): model.set_experts_implementation('eager'), or call .dequantize() for a 16-bit copy"
)


class ExpertsWeight4bit(nn.Module):
    """A 3-D expert weight (``gate_up_proj`` / ``down_proj`` of a transformers experts module) in NF4.

    Takes the place of the module's 16-bit ``nn.Parameter`` under the same attribute name
    (format: :mod:`fastft.ops.experts_nf4`; each expert's ``[out, in]`` slice in bitsandbytes'
    layout). It looks like the weight it replaces where the experts code looks: ``shape`` /
    ``dtype`` / ``device`` / ``dim()`` are the original's (``[E, out, in]``, or ``[E, in, out]``
    when ``transposed`` as in gpt-oss), ``w[e]`` is expert ``e``'s slice dequantised (so the
    model's own eager loop runs on it, one expert's 16-bit slice at a time) and
    :meth:`dequantize` is the whole weight (what :func:`fastft.ops.experts` does inside its
    GEMMs, transiently). It is frozen: QLoRA trains adapters, not the 4-bit weights.

    State dict (plain tensors, safetensors-ready): ``weight`` (uint8 ``[E, ceil(out*in/2)]``,
    a frozen parameter like :class:`Linear4bit`'s), buffers ``absmax`` and ``code``, with double
    quantisation ``nested_absmax``, ``nested_offset``, ``nested_code``. ``module.to(dtype)``
    moves the statistics but keeps them fp32 (casting them would change the weight); it sets
    the dtype the weight dequantises to.
    """

    def __init__(
        self,
        num_experts: int,
        out_features: int,
        in_features: int,
        *,
        transposed: bool = False,
        blocksize: int = 64,
        double_quant: bool = True,
        weight_dtype: torch.dtype = torch.float32,
        cache_absmax: bool = False,
        device=None,
    ):
        super().__init__()
        # keep the double-quantised absmax also decoded in fp32 (+32 / blocksize bits per weight):
        # a dequantisation is then exactly one kernel, no decode ops before it
        self.cache_absmax = bool(cache_absmax) and bool(double_quant)
        self._scales: tuple | None = None  # (fp32 scales, the tensors they were decoded from)
        self.num_experts, self.out_features, self.in_features = num_experts, out_features, in_features
        self.transposed, self.blocksize, self.double_quant = bool(transposed), blocksize, bool(double_quant)
        self.weight_dtype = weight_dtype
        n = out_features * in_features
        nb = -(-n // blocksize)
        E = num_experts
        self.weight = nn.Parameter(torch.empty(E, (n + 1) // 2, dtype=torch.uint8, device=device), False)
        am_dtype = torch.uint8 if double_quant else torch.float32
        self.register_buffer("absmax", torch.empty(E, nb, dtype=am_dtype, device=device))
        self.register_buffer("code", torch.empty(16, dtype=torch.float32, device=device))
        if double_quant:
            self.register_buffer("nested_absmax", torch.empty(E, -(-nb // 256), dtype=torch.float32, device=device))
            self.register_buffer("nested_offset", torch.empty(E, dtype=torch.float32, device=device))
            self.register_buffer("nested_code", torch.empty(256, dtype=torch.float32, device=device))

    @classmethod
    def from_weight(
        cls,
        weight: torch.Tensor,
        *,
        transposed: bool = False,
        blocksize: int = 64,
        double_quant: bool = True,
        cache_absmax: bool = False,
    ) -> ExpertsWeight4bit:
        """Quantise a 3-D expert weight (``[E, out, in]``, or ``[E, in, out]`` with ``transposed``)."""
        from .ops.experts_nf4 import quantize_nf4_experts

        q = quantize_nf4_experts(weight, blocksize=blocksize, double_quant=double_quant, transposed=transposed)
        E, a, b = weight.shape
        out_f, in_f = (b, a) if transposed else (a, b)
        layer = cls(
            E,
            out_f,
            in_f,
            transposed=transposed,
            blocksize=blocksize,
            double_quant=double_quant,
            weight_dtype=weight.dtype,
            cache_absmax=cache_absmax,
            device=weight.device,
        )
        with torch.no_grad():
            layer.weight.data = q["packed"]
            layer.absmax, layer.code = q["absmax"], q["code"]
            if double_quant:
                layer.nested_absmax, layer.nested_offset, layer.nested_code = q["absmax2"], q["offset"], q["code2"]
        return layer

    # -- what the experts code reads off a 3-D weight ------------------------------------
    @property
    def shape(self) -> torch.Size:
        E, o, i = self.num_experts, self.out_features, self.in_features
        return torch.Size((E, i, o) if self.transposed else (E, o, i))

    @property
    def dtype(self) -> torch.dtype:
        return self.weight_dtype

    @property
    def device(self) -> torch.device:
        return self.weight.device

    def dim(self) -> int:
        return 3

    def _nested(self) -> dict:
        if not self.double_quant:
            return {}
        return dict(absmax2=self.nested_absmax, code2=self.nested_code, offset=self.nested_offset)

    def scales(self) -> torch.Tensor | None:
        """The fp32 ``[E, nblocks]`` absmax kept decoded (``cache_absmax``), else None (decoded per call).
        Rebuilt when a statistics buffer is replaced (``.to()``, ``load_state_dict``)."""
        if not self.cache_absmax:
            return None
        if self._scales is None or any(a is not b for a, b in zip(self._scales[1], self._stats())):
            self._scales = self.decode_scales()
        return self._scales[0]

    def _stats(self) -> tuple:
        return (self.absmax, self.nested_absmax, self.nested_offset, self.nested_code)

    @torch.no_grad()
    def decode_scales(self) -> tuple:
        """``(fp32 [E, nblocks] scales, the statistics tensors they come from)``: the cache entry."""
        from .ops.experts_nf4 import decode_experts_absmax

        src = self._stats()
        return decode_experts_absmax(src[0], src[1], code2=src[3], offset=src[2]).contiguous(), src

    def dequantize(
        self,
        dtype: torch.dtype | None = None,
        *,
        backend: str = "auto",
        experts: tuple[int, int] | None = None,
        scales: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The whole weight, of :attr:`shape`, in ``dtype`` (default the original dtype); a new tensor.

        ``experts=(start, stop)``: only those experts, ``[stop - start, *shape[1:]]`` (the same bits
        as that slice of the whole; what :func:`fastft.ops.experts` dequantises a chunk at a time).
        ``scales``: the whole weight's fp32 ``[E, nblocks]`` scales already decoded
        (``decode_scales()[0]``), so that chunk after chunk does not decode them again."""
        from .ops.experts_nf4 import dequantize_nf4_experts

        w = dequantize_nf4_experts(
            self.weight,
            self.absmax,
            self.code,
            **self._nested(),
            shape=(self.num_experts, self.out_features, self.in_features),
            blocksize=self.blocksize,
            dtype=self.weight_dtype if dtype is None else dtype,
            scales=self.scales() if scales is None else scales,
            backend=backend,
            experts=experts,
        )
        return w.transpose(-2, -1) if self.transposed else w

    def op_args(self) -> tuple:
        """The weight as operator arguments (what ``fastft::experts_4bit_fwd`` takes, :mod:`fastft.ops.experts_op4bit`):
        ``(weight, absmax, code, nested_absmax, nested_code, nested_offset, scales, meta, dtype)``, the nested
        statistics None without double quantisation, ``scales`` the kept fp32 scales (``cache_absmax``) or None,
        ``meta = [out_features, in_features, blocksize, transposed]``. :class:`ExpertsWeight4bitView` rebuilds
        from them what the experts op reads."""
        n = self._nested()
        meta = [self.out_features, self.in_features, self.blocksize, int(self.transposed)]
        return (
            self.weight, self.absmax, self.code, n.get("absmax2"), n.get("code2"), n.get("offset"), self.scales(),
            meta, self.weight_dtype,
        )  # fmt: skip

    def slice_state(self, e: int) -> NF4State:
        """Expert ``e``'s :class:`NF4State` (its ``[out, in]`` slice; ``.to_bnb()`` gives bnb's ``QuantState``)."""
        from .ops.experts_nf4 import slice_state

        n = self._nested()
        return slice_state(
            e,
            (self.out_features, self.in_features),
            self.weight_dtype,
            self.blocksize,
            self.absmax,
            self.code,
            n.get("absmax2"),
            n.get("code2"),
            n.get("offset"),
        )

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if hasattr(torch.Tensor, name):  # code that takes the 4-bit weight for the 16-bit tensor
                raise AttributeError(
                    f"ExpertsWeight4bit has no tensor attribute {name!r}: it is a 4-bit weight. " + _NOT_A_TENSOR
                ) from None
            raise

    def __getitem__(self, e) -> torch.Tensor:
        """Expert ``e``'s slice dequantised, as the 16-bit weight's ``w[e]`` (``[out, in]``, or ``[in, out]``)."""
        from .ops.nf4 import dequantize_nf4

        if torch.is_tensor(e):
            if e.numel() != 1 or e.is_floating_point():
                raise TypeError(
                    f"ExpertsWeight4bit[e] takes one integer expert index, got a tensor {tuple(e.shape)}. "
                    + _NOT_A_TENSOR
                )
            e = int(e)  # the eager fallback's expert loop: one host read per expert, as its own loop does
        if not isinstance(e, int) or isinstance(e, bool):
            raise TypeError(f"ExpertsWeight4bit[e] takes one integer expert index, got {type(e).__name__}")
        if not -self.num_experts <= e < self.num_experts:
            raise IndexError(f"expert index {e} out of range for {self.num_experts} experts")
        e %= self.num_experts
        w = dequantize_nf4(self.weight[e], self.slice_state(e), dtype=self.weight_dtype)
        return w.t() if self.transposed else w

    # -- PEFT's merge of a ParamWrapper adapter reads and writes ``param.data`` -------------
    @property
    def data(self):
        """Not a tensor to read or write in place: PEFT's ``ParamWrapper.merge`` (``merge_adapter``,
        ``merge_and_unload``) does ``param.data += delta``, which on packed NF4 could only merge by
        quantising again - a rounding error as large as a small adapter's effect. It raises instead."""
        raise ValueError(_MERGE_4BIT)

    @data.setter
    def data(self, value) -> None:
        raise ValueError(_MERGE_4BIT)

    @property
    def nbytes(self) -> int:
        """Bytes of the packed weight and its statistics (tables included)."""
        return sum(t.numel() * t.element_size() for t in (*self.parameters(), *self.buffers()))

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._scales = None  # the buffers were overwritten in place: decode again

    def _apply(self, fn, recurse=True):
        # .to(dtype) / .half() must not cast the fp32 statistics (the weight would change): apply
        # only the device move to them, and remember the dtype as the one to dequantise to
        probe = fn(torch.empty(0, dtype=self.weight_dtype, device=self.weight.device))
        for key, t in list(self._buffers.items()):
            if t is not None:
                self._buffers[key] = t.to(device=probe.device)
        self.weight.data = self.weight.data.to(device=probe.device)
        if probe.dtype.is_floating_point:
            self.weight_dtype = probe.dtype
        return self

    def extra_repr(self) -> str:
        return (
            f"experts={self.num_experts}, out_features={self.out_features}, in_features={self.in_features}, "
            f"transposed={self.transposed}, nf4 blocksize={self.blocksize}, double_quant={self.double_quant}"
            + (", fp32 absmax cached" if self.cache_absmax else "")
        )


class ExpertsWeight4bitView:
    """What the experts op reads off an :class:`ExpertsWeight4bit`, rebuilt inside an operator from
    :meth:`ExpertsWeight4bit.op_args` (tensors and static ints, no module): the same ``shape`` /
    ``dtype`` / ``dequantize`` / scale decoding (the module's own methods), so the same numbers."""

    shape = ExpertsWeight4bit.shape
    dtype = ExpertsWeight4bit.dtype
    device = ExpertsWeight4bit.device
    dim = ExpertsWeight4bit.dim
    _nested = ExpertsWeight4bit._nested
    _stats = ExpertsWeight4bit._stats
    decode_scales = ExpertsWeight4bit.decode_scales
    dequantize = ExpertsWeight4bit.dequantize

    def __init__(self, weight, absmax, code, nested_absmax, nested_code, nested_offset, scales, meta, dtype):
        self.weight, self.absmax, self.code = weight, absmax, code
        self.nested_absmax, self.nested_code, self.nested_offset = nested_absmax, nested_code, nested_offset
        self.double_quant = nested_absmax is not None
        self._kept = scales
        self.out_features, self.in_features, self.blocksize, transposed = (int(v) for v in meta)
        self.transposed, self.num_experts, self.weight_dtype = bool(transposed), weight.shape[0], dtype

    def scales(self) -> torch.Tensor | None:
        """The fp32 scales the module kept decoded (``cache_absmax``), else None."""
        return self._kept


def _is_linear_like(module: nn.Module) -> bool:
    if type(module) is nn.Linear:
        return True
    try:
        from transformers.pytorch_utils import Conv1D
    except Exception:  # pragma: no cover
        return False
    return type(module) is Conv1D


def quantize(
    model: nn.Module,
    *,
    blocksize: int = 64,
    double_quant: bool = True,
    skip: tuple[str, ...] = ("lm_head",),
    cache_absmax: bool = False,
    experts: bool = True,
) -> nn.Module:
    """Replace every ``nn.Linear`` (and GPT-2 ``Conv1D``) in ``model`` with :class:`Linear4bit`, in place.

    A layer is left alone when any dotted component of its name is in ``skip``
    (default: the output head). Returns ``model``. Quantise before wrapping with PEFT.
    ``cache_absmax=True`` keeps each layer's double-quantised absmax also decoded in fp32
    (+32 / blocksize bits per weight, 0.5 at the default 64) so the kernels skip the decode.

    MoE (``experts=True``): every transformers experts module (found by structure, as the
    experts patch finds them) gets its 3-D ``gate_up_proj`` / ``down_proj`` replaced by
    :class:`ExpertsWeight4bit` (per expert NF4, same ``blocksize`` / ``double_quant``; biases
    stay); the 16-bit parameters are released. Their config's experts implementation is set to
    transformers' ``"eager"`` loop, the one implementation that runs on 4-bit weights without
    fastft (one expert dequantised at a time); ``fastft.patch`` then runs them through
    :func:`fastft.ops.experts`, which dequantises inside its GEMMs.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"quantize expects an nn.Module, got {type(model).__name__}")
    if isinstance(skip, str):
        skip = (skip,)
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"blocksize must be a power of two in [32, 4096], got {blocksize!r}")
    for parent, child_name, _, child in linear_targets(model, skip):
        layer = Linear4bit.from_linear(child, blocksize=blocksize, double_quant=double_quant, cache_absmax=cache_absmax)
        setattr(parent, child_name, layer)
    if experts:
        _quantize_experts(model, blocksize=blocksize, double_quant=double_quant, skip=skip, cache_absmax=cache_absmax)
    _record_quantization(model, blocksize, double_quant, skip, cache_absmax, experts)
    return model


def _record_quantization(model, blocksize, double_quant, skip, cache_absmax, experts) -> None:
    """A transformers model keeps its :class:`fastft.NF4Config` on ``model.config`` (so ``save_pretrained``
    writes a checkpoint that reloads pre-quantised) and saves its 4-bit tensors unconverted
    (:mod:`fastft.hf_quantizer`)."""
    import sys

    if "transformers" not in sys.modules:  # not a transformers model
        return
    try:
        from .hf_quantizer import record_quantization
    except ImportError:  # transformers < 5: no NF4Config
        return
    record_quantization(
        model, blocksize=blocksize, double_quant=double_quant, skip=skip, cache_absmax=cache_absmax, experts=experts
    )


BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)


def _skipped(name: str, skip) -> bool:
    """Whether any dotted component of the module name ``name`` is in ``skip``."""
    return bool(set(name.split(".")) & set(skip))


def linear_targets(model: nn.Module, skip) -> list[tuple[nn.Module, str, str, nn.Module]]:
    """``(parent, child name, full name, layer)`` of every linear layer :func:`quantize` replaces: an
    ``nn.Linear`` or ``Conv1D`` outside PEFT's adapters whose name has no component in ``skip``."""
    adapters = _adapter_module_ids(model)
    targets = []
    for name, module in model.named_modules():
        for child_name, child in module.named_children():
            full = f"{name}.{child_name}" if name else child_name
            if id(child) not in adapters and _is_linear_like(child) and not _skipped(full, skip):
                targets.append((module, child_name, full, child))
    return targets


def experts_targets(model: nn.Module, skip) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of every experts module whose 3-D weights :func:`quantize` replaces."""
    from .patching.experts import is_experts_module

    return [
        (n, m)
        for n, m in model.named_modules()
        if is_experts_module(m) and not _skipped(n, skip) and not getattr(m, "_is_expert_parallel", False)
    ]


def run_experts_eager(module: nn.Module) -> None:
    """Set a 4-bit experts module's implementation to transformers' ``"eager"`` loop (the only one that
    reads the 4-bit weights without fastft), unless it already is that or fastft's."""
    config = module.config
    if config._experts_implementation_internal not in ("eager", "fastft"):
        config._experts_implementation_internal = "eager"


def _adapter_module_ids(model: nn.Module) -> set[int]:
    """Ids of every module inside a PEFT model's trainable parts (the LoRA ``lora_A`` / ``lora_B``
    linears, ``modules_to_save`` copies): a PEFT model is quantised around its adapters, never them."""
    out = set()
    for module in model.modules():
        names = [n for n in getattr(module, "adapter_layer_names", ()) if isinstance(n, str)]
        if isinstance(getattr(module, "modules_to_save", None), nn.Module):
            names.append("modules_to_save")
        for n in names:
            container = getattr(module, n, None)
            if isinstance(container, nn.Module):
                out.update(id(m) for m in container.modules())
    return out


def _quantize_experts(model: nn.Module, *, blocksize: int, double_quant: bool, skip, cache_absmax: bool) -> None:
    found = experts_targets(model, skip)
    for name, module in found:
        if "_fastft_experts" in module.__dict__:
            raise ValueError(f"{name or 'model'} is patched by fastft: quantize the model before fastft.patch")
        for pname in ("gate_up_proj", "down_proj"):
            w = getattr(module, pname)
            if isinstance(w, ExpertsWeight4bit):
                continue
            q = ExpertsWeight4bit.from_weight(
                w.detach(),
                transposed=bool(module.is_transposed),
                blocksize=blocksize,
                double_quant=double_quant,
                cache_absmax=cache_absmax,
            )
            delattr(module, pname)  # the 16-bit parameter goes (no resident copy)
            setattr(module, pname, q)
        run_experts_eager(module)
    if found:
        from .patching.experts_lora import guard_4bit_wrappers

        guard_4bit_wrappers(model)  # PEFT wrappers around them (adapter built on 16-bit experts) keep working
