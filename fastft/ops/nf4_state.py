"""The NF4 format's data: the code tables, :class:`NF4State`, and validating a state once.

* :func:`nf4_code` (the 16 NF4 values) and :func:`dynamic_code` (bnb's 8-bit signed dynamic map,
  the double-quantised absmax's code), with the format's constants;
* :class:`NF4State` (everything besides the packed bytes) and :func:`as_nf4_state` (from a
  bitsandbytes ``QuantState``);
* validation: :func:`_validate_state` checks a state once, :func:`prepare_state` caches the kernels'
  flat views on it (:class:`NF4Kernels`), :func:`_check_state` is the cheap per-call check.

The format itself is described in :mod:`fastft.ops.nf4`, which re-exports these names; the
quantiser is :mod:`fastft.ops.nf4_quant`, the operators and public functions :mod:`fastft.ops.nf4`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

# bitsandbytes' get_4bit_type("nf4") (already normalised: max |code| == 1)
_NF4_VALUES = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)
_ZERO_CODE = 7
_DQ_BLOCKSIZE = 256
_LUT_SIZE = 65536
_FLOAT_OUT = (torch.float32, torch.bfloat16, torch.float16)


def nf4_code(device=None) -> torch.Tensor:
    """The NF4 table, fp32 [16] (same values as bitsandbytes' ``get_4bit_type("nf4")``)."""
    return torch.tensor(_NF4_VALUES, dtype=torch.float32, device=device)


def _dynamic_values() -> list[float]:
    # bitsandbytes' create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8)
    data: list[float] = []
    for i in range(7):
        items = int(2**i + 1)
        bounds = torch.linspace(0.1, 1, items, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        data += ((10 ** (-6 + i)) * means).tolist()
        data += (-(10 ** (-6 + i)) * means).tolist()
    data.append(0)
    data.append(1.0)
    data.sort()
    return data


_DYNAMIC = _dynamic_values()


def dynamic_code(device=None) -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic map, fp32 [256] (the ``code2`` of double quantisation)."""
    return torch.tensor(_DYNAMIC, dtype=torch.float32, device=device)


# --------------------------------------------------------------------------------------
# state
# --------------------------------------------------------------------------------------
@dataclass
class NF4State:
    """Everything besides the packed bytes needed to dequantise an NF4 weight.

    ``absmax`` is fp32 ``[nblocks]``, or uint8 ``[nblocks]`` indices into ``code2`` when
    double-quantised (then ``offset``, ``absmax2`` and ``code2`` are set).
    """

    shape: torch.Size
    dtype: torch.dtype
    blocksize: int
    absmax: torch.Tensor
    code: torch.Tensor
    offset: torch.Tensor | None = None
    absmax2: torch.Tensor | None = None
    code2: torch.Tensor | None = None
    blocksize2: int = _DQ_BLOCKSIZE
    # optional fp32 per-block scales kept beside a double-quantised absmax (``cache_absmax=True``
    # at quantise / patch time: +32 / blocksize bits per weight, 0.5 at blocksize 64); the kernels
    # then read it instead of decoding the 8-bit absmax
    absmax_cache: torch.Tensor | None = None
    # what the kernels need, validated once (see prepare_state); rebuilt when a tensor is replaced
    _prepared: NF4Kernels | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self):
        self.shape = torch.Size(self.shape)

    @property
    def double_quant(self) -> bool:
        return self.absmax2 is not None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nblocks(self) -> int:
        return -(-self.numel // self.blocksize)

    @property
    def device(self) -> torch.device:
        return self.absmax.device

    def absmax_fp32(self) -> torch.Tensor:
        """Per-block scales, fp32 ``[nblocks]`` (the double quantisation undone as bnb does it)."""
        if self.absmax_cache is not None:
            return self.absmax_cache
        if not self.double_quant:
            return self.absmax if self.absmax.dtype == torch.float32 else self.absmax.float()
        q = self.absmax.reshape(-1).long()
        n = q.numel()
        bs2 = int(self.blocksize2)
        nb2 = -(-n // bs2)
        vals = self.code2.to(device=q.device, dtype=torch.float32)[q]
        if n % bs2:
            vals = torch.nn.functional.pad(vals, (0, nb2 * bs2 - n))
        scales = self.absmax2.to(device=q.device, dtype=torch.float32).reshape(nb2, 1)
        out = (vals.view(nb2, bs2) * scales).reshape(-1)[:n]
        return out + self.offset.to(device=q.device, dtype=torch.float32)

    def to(self, device) -> NF4State:
        def mv(t):
            return None if t is None else t.to(device)

        return NF4State(
            shape=self.shape,
            dtype=self.dtype,
            blocksize=self.blocksize,
            absmax=mv(self.absmax),
            code=mv(self.code),
            offset=mv(self.offset),
            absmax2=mv(self.absmax2),
            code2=mv(self.code2),
            blocksize2=self.blocksize2,
            absmax_cache=mv(self.absmax_cache),
        )

    def with_absmax_cache(self) -> NF4State:
        """This state with the fp32 absmax decoded once and kept (``absmax_cache``); a state
        without double quantisation already has fp32 scales and is returned as is."""
        if not self.double_quant or self.absmax_cache is not None:
            return self
        return NF4State(
            shape=self.shape,
            dtype=self.dtype,
            blocksize=self.blocksize,
            absmax=self.absmax,
            code=self.code,
            offset=self.offset,
            absmax2=self.absmax2,
            code2=self.code2,
            blocksize2=self.blocksize2,
            absmax_cache=self.absmax_fp32().contiguous(),
        )

    @property
    def extra_bits_per_weight(self) -> float:
        """Bits per weight the fp32 absmax cache adds (0 without one)."""
        return 32.0 / self.blocksize if self.absmax_cache is not None and self.double_quant else 0.0

    @classmethod
    def from_bnb(cls, quant_state) -> NF4State:
        """From a bitsandbytes ``QuantState`` (quant_type ``"nf4"``); shares its tensors."""
        qt = getattr(quant_state, "quant_type", "nf4")
        if qt != "nf4":
            raise ValueError(f"only NF4 quant states are supported, got quant_type={qt!r}")
        if quant_state.shape is None:
            raise ValueError("the bitsandbytes QuantState has no shape")
        state2 = getattr(quant_state, "state2", None)
        extra = {}
        if state2 is not None:
            extra = dict(
                offset=quant_state.offset,
                absmax2=state2.absmax,
                code2=state2.code,
                blocksize2=int(state2.blocksize),
            )
        return cls(
            shape=torch.Size(quant_state.shape),
            dtype=quant_state.dtype,
            blocksize=int(quant_state.blocksize),
            absmax=quant_state.absmax,
            code=quant_state.code,
            **extra,
        )

    def to_bnb(self):
        """A bitsandbytes ``QuantState`` sharing these tensors (imports bitsandbytes)."""
        from bitsandbytes.functional import QuantState

        state2 = None
        if self.double_quant:
            state2 = QuantState(absmax=self.absmax2, code=self.code2, blocksize=self.blocksize2, dtype=torch.float32)
        return QuantState(
            absmax=self.absmax,
            shape=self.shape,
            code=self.code,
            blocksize=self.blocksize,
            quant_type="nf4",
            dtype=self.dtype,
            offset=self.offset,
            state2=state2,
        )


def as_nf4_state(obj) -> NF4State:
    """An :class:`NF4State` from itself or from a bitsandbytes ``QuantState``
    (e.g. ``layer.weight.quant_state`` of a bnb ``Linear4bit``)."""
    if isinstance(obj, NF4State):
        return obj
    # a bitsandbytes QuantState (duck-typed: bitsandbytes is optional; state2 is absent on
    # some states that were never double-quantised). The NF4State is kept on the QuantState
    # (so it is validated once) while the QuantState's tensors stay the same objects; moving
    # the QuantState (bnb replaces its tensors) builds a new one.
    if all(hasattr(obj, a) for a in ("absmax", "shape", "code", "blocksize", "dtype")):
        cached = getattr(obj, "_fastft_nf4", None)
        state2 = getattr(obj, "state2", None)
        if (
            cached is not None
            and cached.absmax is obj.absmax
            and cached.code is obj.code
            and cached.absmax2 is (None if state2 is None else state2.absmax)
            and cached.offset is (None if state2 is None else obj.offset)
        ):
            return cached
        state = NF4State.from_bnb(obj)
        try:
            obj._fastft_nf4 = state
        except AttributeError:  # a QuantState with __slots__: no cache, validated per call
            pass
        return state
    raise TypeError(f"expected an NF4State or a bitsandbytes QuantState, got {type(obj).__name__}")


# --------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------
def _check_blocksize(blocksize, name: str = "blocksize") -> int:
    if isinstance(blocksize, bool) or not isinstance(blocksize, int):
        raise TypeError(f"{name} must be an int, got {type(blocksize).__name__}")
    if blocksize < 32 or blocksize > 4096 or blocksize & (blocksize - 1):
        raise ValueError(f"{name} must be a power of two in [32, 4096], got {blocksize}")
    return blocksize


def _plain(t: torch.Tensor) -> torch.Tensor:
    """Strip tensor subclasses (nn.Parameter, bnb's Params4bit) to a plain tensor view."""
    return t.data if isinstance(t, torch.nn.Parameter) or type(t) is not torch.Tensor else t


def _validate_state(state: NF4State) -> None:
    """Every check of an :class:`NF4State` on its own (not the packed bytes): ValueError /
    TypeError naming the bad field. Runs once per state (:func:`prepare_state` caches the
    result); tests count its calls."""
    _check_blocksize(state.blocksize, "state.blocksize")
    n = state.numel
    if n <= 0:
        raise ValueError(f"state.shape {tuple(state.shape)} has no elements")
    tensors = [("state.absmax", state.absmax), ("state.code", state.code)]
    for name, t in tensors:
        if not torch.is_tensor(t):
            raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if state.absmax.numel() != state.nblocks:
        raise ValueError(
            f"state.absmax has {state.absmax.numel()} entries, expected ceil({n}/{state.blocksize}) = {state.nblocks}"
        )
    if state.code.numel() != 16:
        raise ValueError(f"state.code must have 16 entries, got {state.code.numel()}")
    if state.double_quant:
        if state.absmax.dtype != torch.uint8:
            raise TypeError(f"double-quantised state.absmax must be uint8, got {state.absmax.dtype}")
        if state.offset is None or state.code2 is None:
            raise ValueError("double-quantised state needs offset, absmax2 and code2")
        tensors += [("state.offset", state.offset), ("state.absmax2", state.absmax2), ("state.code2", state.code2)]
        for name, t in tensors[2:]:
            if not torch.is_tensor(t):
                raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
        if state.offset.numel() != 1:
            raise ValueError(f"state.offset must have one element, got shape {tuple(state.offset.shape)}")
        if state.code2.numel() != 256:
            raise ValueError(f"state.code2 must have 256 entries, got {state.code2.numel()}")
        _check_blocksize(int(state.blocksize2), "state.blocksize2")
        nb2 = -(-state.nblocks // int(state.blocksize2))
        if state.absmax2.numel() != nb2:
            raise ValueError(f"state.absmax2 has {state.absmax2.numel()} entries, expected {nb2}")
        for name in ("state.offset", "state.absmax2", "state.code2"):
            t = dict(tensors)[name]
            if not t.dtype.is_floating_point:
                raise TypeError(f"{name} must be floating point, got {t.dtype}")
    elif not state.absmax.dtype.is_floating_point:
        raise TypeError(f"state.absmax must be floating point without double quantisation, got {state.absmax.dtype}")
    if state.absmax_cache is not None:
        tensors.append(("state.absmax_cache", state.absmax_cache))
        if not torch.is_tensor(state.absmax_cache) or state.absmax_cache.dtype != torch.float32:
            raise TypeError("state.absmax_cache must be a float32 tensor")
        if state.absmax_cache.numel() != state.nblocks:
            raise ValueError(f"state.absmax_cache has {state.absmax_cache.numel()} entries, expected {state.nblocks}")
    if not state.code.dtype.is_floating_point:
        raise TypeError(f"state.code must be floating point, got {state.code.dtype}")
    dev = state.absmax.device
    for name, t in tensors:
        if t.device != dev:
            raise ValueError(f"{name} is on {t.device} but state.absmax is on {dev}")


class NF4Kernels:
    """What the kernels need from one validated :class:`NF4State`, built once by
    :func:`prepare_state`: flat contiguous views (copies only where a dtype differs), and the
    double quantisation handed over undecoded (``nested``: the kernels decode the 8-bit
    absmax per block, in-kernel), unless the state keeps an fp32 ``absmax_cache``."""

    __slots__ = ("source", "shape", "blocksize", "numel", "nbytes", "device", "absmax", "code", "nested")

    def __init__(self, state: NF4State):
        self.source = _source(state)
        self.shape = state.shape
        self.blocksize = int(state.blocksize)
        self.numel = state.numel
        self.nbytes = -(-self.numel // 2)
        self.device = state.absmax.device
        self.code = state.code.reshape(-1).to(torch.float32).contiguous()
        if state.absmax_cache is not None or not state.double_quant:
            am = state.absmax_cache if state.absmax_cache is not None else state.absmax
            self.absmax = am.reshape(-1).to(torch.float32).contiguous()
            self.nested: dict = {}
        else:
            self.absmax = state.absmax.reshape(-1).contiguous()
            self.nested = dict(
                absmax2=state.absmax2.reshape(-1).to(torch.float32).contiguous(),
                code2=state.code2.reshape(-1).to(torch.float32).contiguous(),
                offset=state.offset.reshape(1).to(torch.float32).contiguous(),
                blocksize2=int(state.blocksize2),
            )

    def matches(self, state: NF4State) -> bool:
        s = self.source
        return (
            s[0] is state.absmax
            and s[1] is state.code
            and s[2] is state.offset
            and s[3] is state.absmax2
            and s[4] is state.code2
            and s[5] is state.absmax_cache
            and s[6] == state.blocksize
            and s[7] == state.blocksize2
            and self.shape == state.shape
        )


def _source(state: NF4State) -> tuple:
    return (
        state.absmax,
        state.code,
        state.offset,
        state.absmax2,
        state.code2,
        state.absmax_cache,
        state.blocksize,
        state.blocksize2,
    )


def prepare_state(state) -> NF4Kernels:
    """The validated kernel arguments of ``state`` (an :class:`NF4State` or bnb ``QuantState``),
    cached on the state: validation runs the first time a state is seen, and again only when
    one of its tensors or sizes is replaced."""
    state = as_nf4_state(state)
    prep = state._prepared
    if prep is not None and prep.matches(state):
        return prep
    _validate_state(state)
    prep = NF4Kernels(state)
    state._prepared = prep
    return prep


def _check_state(packed, state) -> tuple[torch.Tensor, NF4State, NF4Kernels]:
    """Per call: the state validated once (cached), the packed bytes checked (cheap)."""
    state = as_nf4_state(state)
    prep = prepare_state(state)
    if not torch.is_tensor(packed):
        raise TypeError(f"packed must be a tensor, got {type(packed).__name__}")
    if packed.dtype != torch.uint8:
        raise TypeError(f"packed must be uint8 (two NF4 codes per byte), got dtype {packed.dtype}")
    if packed.numel() != prep.nbytes:
        raise ValueError(
            f"packed has {packed.numel()} bytes (shape {tuple(packed.shape)}) but state.shape "
            f"{tuple(state.shape)} needs ceil({prep.numel}/2) = {prep.nbytes}"
        )
    if packed.device != prep.device:
        raise ValueError(f"state.absmax is on {prep.device} but packed is on {packed.device}")
    return _plain(packed), state, prep
