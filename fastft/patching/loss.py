"""The loss patch: a causal LM's training loss by fused linear cross-entropy, without logits.

One generic mechanism for every decoder-only causal LM, found by structure, not by name:

* the model's own ``forward`` still runs (so every argument, cache, mask and
  model-specific detail of the decoder stays the model's), but with ``labels=None``;
* its output embedding (``get_output_embeddings()``, an ``nn.Linear``) is swapped for a
  *capture* while that call runs: it records the hidden states the model feeds it and
  returns a tiny probe tensor instead of ``(tokens, vocab)`` logits;
* whatever the model does to its logits afterwards (Gemma-2's final soft-capping,
  Cohere's ``logit_scale``, Granite's ``logits_scaling``) therefore runs on the probe.
  The transform predicted from the config is checked against the probe's values on
  the first call; a model that does something else is left unpatched from then on
  (with a warning and a line in the report), never given a wrong loss;
* the loss is then ``fused_linear_cross_entropy(hidden, lm_head.weight, shifted labels)``
  with transformers' exact conventions (``ForCausalLMLoss``): labels shifted by one,
  ``ignore_index``, ``shift_labels``, ``num_items_in_batch``; an MoE model's
  ``aux_loss`` is added as its own forward would.
* that convention is *checked, not assumed*: on the first training call (and again when
  the call's structure changes: labels' rank, ``shift_labels`` or ``num_items_in_batch``
  given or not, ``ignore_index``) the model's original forward runs once more, under
  ``no_grad`` and with the same RNG state, on the batch's first row with check labels,
  while its output embedding returns designed logits (noise plus a spike at each
  shifted target). The model's own loss on those logits must equal ``ForCausalLMLoss``'s
  (plus the aux loss) to a tight tolerance; a model whose head computes its loss any
  other way (no shift, no ``num_items_in_batch``, several prediction streams, ...) is
  left to its own loss from then on, with a warning and a line in the report. The
  spike makes a wrong convention miss by about 8 nats whatever the model's weights, so
  an untrained model is checked as surely as a trained one. It costs one forward of one
  row, once; never a per-step cost.

Only a model in training mode called with ``labels`` takes this path, and it returns
``logits=None``. Without labels, or in eval mode, the original forward runs unchanged.
"""

from __future__ import annotations

import inspect
import threading
import warnings

import torch
from torch import nn

from .. import backends
from ..ops.cross_entropy import OP_FLCE, fused_linear_cross_entropy
from .guard import one_line

FEATURE = "loss"
# model_type values with the deepest parity tests (tests/test_patch_*.py: every option, batch
# shape and bf16); every other family transformers registers is swept by tests/test_zoo.py.
VERIFIED_FAMILIES = frozenset({"llama", "mistral", "qwen2", "gemma2", "phi3", "gpt2"})
_PROBE = (-6.0, -1.5, -0.25, 0.0, 0.75, 2.0, 9.0)


def _causal_lm_loss_fn():
    from transformers.loss.loss_utils import ForCausalLMLoss

    return ForCausalLMLoss


def _uses_causal_lm_loss(model) -> bool:
    if "_loss_function" in model.__dict__:  # the user set a custom loss function
        return model.__dict__["_loss_function"] is _causal_lm_loss_fn()
    loss_type = getattr(model, "loss_type", None)
    return loss_type in (None, "ForCausalLM") or loss_type not in _loss_mapping()


def _loss_mapping():
    from transformers.loss.loss_utils import LOSS_MAPPING

    return LOSS_MAPPING


def _logit_transform(config) -> tuple[float | None, float | None]:
    """(scale, softcap) that the model applies to its logits, predicted from its config."""
    scale = None
    if getattr(config, "logit_scale", None) is not None:  # Cohere: logits * logit_scale
        scale = float(config.logit_scale)
    if getattr(config, "logits_scaling", None) not in (None, 1, 1.0):  # Granite: logits / logits_scaling
        scale = (scale or 1.0) / float(config.logits_scaling)
    softcap = getattr(config, "final_logit_softcapping", None)
    softcap = float(softcap) if softcap is not None else None
    return scale, softcap


def _close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> bool:
    """Equal up to rounding: the two sides compute the same formula on the same values."""
    tol = 1e-4 if dtype in (torch.float32, torch.float64) else 2e-2
    return bool(torch.allclose(got.float(), want.float(), rtol=tol, atol=tol * 0.1))


def _candidate_transforms(config, predicted):
    """(scale, softcap) pairs a model may apply to its logits besides ``predicted`` (the one the
    known config keys predict, already checked): every combination of the config's ``*logit*scal*`` values (as a
    factor or a divisor) and ``*logit*cap*`` values, and none at all. Which one the model really
    applies is read off its output on designed logits (:meth:`FusedLossForward._check_once`)."""
    scales, caps = [None], [None]
    for cfg in (config, getattr(config, "text_config", None)):
        if cfg is None:
            continue
        for key, value in vars(cfg).items():
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value or "logit" not in key:
                continue
            if "cap" in key:
                caps.append(float(value))
            elif "scal" in key:
                scales += [float(value), 1.0 / float(value)]
    seen = [predicted]  # already checked by the caller: not returned again
    for sc in scales:
        for cap in caps:
            if (sc, cap) not in seen:
                seen.append((sc, cap))
    return seen[1:]


def _apply_transform(x: torch.Tensor, scale, softcap) -> torch.Tensor:
    x = x.float()
    if scale is not None:
        x = x * scale
    if softcap is not None:
        x = softcap * torch.tanh(x / softcap)
    return x


class _Capture:
    """Stands in for the output embedding's forward; records its input while armed.

    Armed, it returns a tiny probe instead of the logits; in *design* mode (the
    convention check, :meth:`FusedLossForward._verify`) it returns designed logits."""

    def __init__(self, lm_head: nn.Linear, original):
        self.lm_head = lm_head
        self.original = original
        self.local = threading.local()

    def __getstate__(self):  # deepcopy / pickle: the thread-local scratch is not state
        return {k: v for k, v in self.__dict__.items() if k != "local"}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.local = threading.local()

    def armed(self) -> bool:
        return getattr(self.local, "armed", False)

    def __call__(self, hidden, *args, **kwargs):
        design = getattr(self.local, "design", None)
        if design is not None:
            return self._designed(hidden, design)
        if not self.armed():
            return self.original(hidden, *args, **kwargs)
        self.local.hidden = hidden
        w = self.lm_head.weight
        probe = torch.tensor(_PROBE, dtype=w.dtype, device=hidden.device)
        return probe.expand(*hidden.shape[:-1], len(_PROBE))

    def _designed(self, hidden, design: dict):
        """Logits for the convention check: noise (std ``amp``) plus ``8 * amp`` at each target
        the ForCausalLMLoss convention reads (when the hidden states line up with the labels)."""
        w = self.lm_head.weight
        shape = (*hidden.shape[:-1], w.shape[0])
        g = torch.Generator(device=hidden.device).manual_seed(20261202)
        z = torch.randn(shape, generator=g, device=hidden.device, dtype=torch.float32) * design["amp"]
        targets = design["targets"]
        if targets.shape == hidden.shape[:-1]:
            t = targets.to(hidden.device)
            valid = t != design["ignore_index"]
            z[valid, t[valid]] += 8.0 * design["amp"]
        z = z.to(w.dtype)
        self.local.designed = z
        return z


class FusedLossForward:
    """The patched ``forward`` of a causal LM (an instance attribute; see the module docstring)."""

    def __init__(self, model, original, capture: _Capture, backend: str, scale, softcap):
        self.model = model
        self.original = original
        self.capture = capture
        self.backend = backend
        self.scale = scale
        self.softcap = softcap
        self.verified = False  # the probe (logit transform) was checked
        self.checked: set[tuple] = set()  # call structures whose loss convention was checked
        self.disabled_reason: str | None = None
        self.signature = inspect.signature(original)
        self.__wrapped__ = original  # inspect.signature(model.forward) keeps showing the real parameters
        self.__doc__ = getattr(original, "__doc__", None)

    # --- helpers ----------------------------------------------------------------------
    def _bind(self, args, kwargs):
        bound = self.signature.bind_partial(*args, **kwargs)
        return bound

    def _disable(self, reason: str):
        self.disabled_reason = reason
        warnings.warn(f"fastft: fused loss disabled for {type(self.model).__name__}: {reason}", stacklevel=3)
        state = self.model.__dict__.get("_fastft_patch_state")
        if state is not None:  # the loss is no longer fused: the report says so, not "patched"
            state.report.patched[:] = [p for p in state.report.patched if p.feature != FEATURE]
            state.report.skip(FEATURE, "forward", f"disabled at the first training step: {reason}")

    def _fall_back(self, reason: str, args, kwargs):
        state = self.model.__dict__.get("_fastft_patch_state")
        if state is not None:
            state.report.fallback(FEATURE, "forward", reason)
        return self.original(*args, **kwargs)

    def _check_probe(self, logits) -> bool:
        if not torch.is_tensor(logits) or logits.shape[-1] != len(_PROBE):
            return False
        got = logits.reshape(-1, len(_PROBE))[0].float()
        want = _apply_transform(
            torch.tensor(_PROBE, dtype=logits.dtype, device=logits.device), self.scale, self.softcap
        )
        tol = 1e-5 if logits.dtype == torch.float32 else 3e-2
        return bool(torch.allclose(got, want, rtol=tol, atol=tol))

    # --- the loss-convention check ------------------------------------------------------
    @staticmethod
    def _structure(labels, call) -> tuple:
        return (
            labels.dim() if torch.is_tensor(labels) else None,
            call.get("shift_labels") is not None,
            call.get("num_items_in_batch") is not None,
            call.get("ignore_index", -100),
        )

    def _check_labels(self, like: torch.Tensor, vocab: int, ignore_index: int, salt: int) -> torch.Tensor:
        """Random targets with the shape of ``like``, every fourth one ignored (deterministic)."""
        g = torch.Generator().manual_seed(1234 + salt)
        t = torch.randint(0, vocab, tuple(like.shape), generator=g)
        t.view(-1)[1::4] = ignore_index
        return t.to(device=like.device, dtype=like.dtype if not like.is_floating_point() else torch.long)

    @torch.compiler.disable
    def _verify(self, call: dict, labels: torch.Tensor) -> str | None:
        """Check the model's own loss against ForCausalLMLoss on designed logits; None if it agrees.

        Runs the original forward once (twice if the one-row slice of the batch cannot run)."""
        if not torch.is_tensor(labels) or labels.is_floating_point() or labels.dim() == 0:
            return f"labels must be an integer tensor, got {type(labels).__name__}"
        B = labels.shape[0] if labels.dim() >= 2 else 1
        attempts = (1, None) if B > 1 else (None,)
        error = None
        for rows in attempts:
            sub = {}
            for k, v in call.items():
                if rows is not None and torch.is_tensor(v) and v.dim() >= 1 and v.shape[0] == B:
                    v = v[:rows]
                sub[k] = v
            try:
                verdict = self._check_once(sub)
            except Exception as exc:  # the sliced call does not run: try the whole batch
                error = exc
                continue
            return verdict
        return f"the check forward with labels raised {type(error).__name__}: {one_line(error, 160)}"

    def _check_once(self, sub: dict) -> str | None:
        lm_head = self.capture.lm_head
        vocab = lm_head.weight.shape[0]
        ignore_index = sub.get("ignore_index", -100)
        labels = self._check_labels(sub["labels"], vocab, ignore_index, 0)
        sub["labels"] = labels
        shift = sub.get("shift_labels")
        if shift is not None:
            shift = sub["shift_labels"] = self._check_labels(shift, vocab, ignore_index, 1)
            targets = shift
        else:
            targets = nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]
        sub["return_dict"] = True
        amp = 1.0 / abs(self.scale) if self.scale else 1.0
        device = lm_head.weight.device
        self.capture.local.design = {"targets": targets, "ignore_index": ignore_index, "amp": amp}
        self.capture.local.designed = None
        try:
            with torch.no_grad(), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                out = self.original(**sub)
        finally:
            self.capture.local.design = None
        designed, self.capture.local.designed = self.capture.local.designed, None
        if designed is None:
            return "the forward did not call its output embedding"
        own = getattr(out, "loss", None)
        if not torch.is_tensor(own):
            return "its forward computed no loss from the labels"
        z = _apply_transform(designed, self.scale, self.softcap)
        logits = getattr(out, "logits", None)
        if torch.is_tensor(logits) and logits.shape == z.shape and not _close(logits.float(), z, designed.dtype):
            # not the transform the config keys predict: is it another one the config names?
            for scale, softcap in _candidate_transforms(self.model.config, (self.scale, self.softcap)):
                z = _apply_transform(designed, scale, softcap)
                if _close(logits.float(), z, designed.dtype):
                    if scale is not None and self.capture.lm_head.bias is not None:
                        return "scaled logits with an lm_head bias are not supported by the fused loss"
                    self.scale, self.softcap = scale, softcap
                    break
            else:
                return "its forward transforms the logits in a way fastft does not recognise"
        flat_t = targets.reshape(-1).to(z.device)
        if z.numel() // vocab != flat_t.numel():
            return (
                f"its output embedding gives {z.numel() // vocab} token rows for {flat_t.numel()} labels "
                "(several prediction streams?)"
            )
        num_items = sub.get("num_items_in_batch")
        want = nn.functional.cross_entropy(
            z.reshape(-1, vocab),
            flat_t,
            ignore_index=ignore_index,
            reduction="sum" if num_items is not None else "mean",
        )
        if num_items is not None:
            want = want / (num_items.to(want.device) if torch.is_tensor(num_items) else num_items)
        aux = getattr(out, "aux_loss", None)
        coef = getattr(self.model, "router_aux_loss_coef", getattr(self.model.config, "router_aux_loss_coef", None))
        if aux is not None and coef:
            want = want + coef * aux.to(want.device).float()
        if _close(own.float().reshape(()), want, designed.dtype):
            return None
        unshifted = nn.functional.cross_entropy(
            z.reshape(-1, vocab), labels.reshape(-1).to(z.device), ignore_index=ignore_index
        )
        hint = (
            " (it matches an unshifted cross-entropy: its head does not shift labels)"
            if _close(own.float().reshape(()), unshifted, designed.dtype)
            else ""
        )
        return (
            f"its own loss ({float(own):.6g}) on a check batch is not transformers' ForCausalLMLoss "
            f"({float(want):.6g}){hint}: the model's own loss is used"
        )

    # --- the forward ------------------------------------------------------------------
    def __call__(self, *args, **kwargs):
        model = self.model
        labels = kwargs.get("labels")
        if labels is None and args:
            labels = self._bind(args, kwargs).arguments.get("labels")
        if labels is None or not model.training or self.disabled_reason is not None or not _uses_causal_lm_loss(model):
            return self.original(*args, **kwargs)

        bound = self._bind(args, kwargs)
        call = dict(bound.arguments)
        extra = call.pop(next((n for n, p in self.signature.parameters.items() if p.kind is p.VAR_KEYWORD), "_"), {})
        call.update(extra)
        call["labels"] = None
        want_tuple = call.get("return_dict") is False or (
            "return_dict" not in call and getattr(model.config, "return_dict", True) is False
        )
        if want_tuple:
            call["return_dict"] = True
        ignore_index = call.get("ignore_index", -100)
        shift_labels = call.get("shift_labels")
        num_items_in_batch = call.get("num_items_in_batch")

        key = self._structure(labels, call)
        if key not in self.checked:
            reason = self._verify(dict(call, labels=labels), labels)
            if reason is not None:
                self._disable(reason)
                return self.original(*args, **kwargs)
            self.checked.add(key)

        self.capture.local.armed = True
        self.capture.local.hidden = None
        try:
            out = self.original(**call)
        finally:
            self.capture.local.armed = False
        hidden = self.capture.local.hidden
        self.capture.local.hidden = None
        logits = getattr(out, "logits", None)

        if not self.verified:
            reason = None
            if hidden is None:
                reason = "the forward did not call its output embedding"
            elif not self._check_probe(logits):
                reason = "its forward transforms the logits in a way fastft does not recognise"
            if reason is not None:
                self._disable(reason)
                return self.original(*args, **kwargs)
            self.verified = True

        lm_head = self.capture.lm_head
        if shift_labels is None:
            padded = nn.functional.pad(labels, (0, 1), value=ignore_index)
            shift_labels = padded[..., 1:]
        target = shift_labels.reshape(-1).to(hidden.device)
        h = hidden.reshape(-1, hidden.shape[-1])
        if h.shape[0] != target.numel():  # e.g. logits_to_keep trimmed the hidden states
            return self._fall_back(f"{h.shape[0]} hidden rows for {target.numel()} labels", args, kwargs)
        if self.scale is not None:
            h = h * self.scale
        try:
            loss = fused_linear_cross_entropy(
                h,
                lm_head.weight,
                target,
                lm_head.bias,
                ignore_index=ignore_index,
                softcap=self.softcap,
                num_items_in_batch=num_items_in_batch,
                backend=self.backend,
            )
        except (ValueError, TypeError) as exc:  # raised before any kernel launch
            if self.backend != "auto":
                raise
            return self._fall_back(
                f"fused op rejected the input ({type(exc).__name__}: {one_line(exc, 160)})", args, kwargs
            )
        aux = getattr(out, "aux_loss", None)
        coef = getattr(model, "router_aux_loss_coef", getattr(model.config, "router_aux_loss_coef", None))
        if aux is not None and coef:
            loss = loss + coef * aux.to(loss.device)
        fields = {k: v for k, v in out.items() if k not in ("loss", "logits")}
        out = type(out)(loss=loss, logits=None, **fields)
        return out.to_tuple() if want_tuple else out


def apply(ctx) -> None:
    """Install the fused loss on ``ctx.model`` if it is a causal LM this mechanism fits."""
    model, report = ctx.model, ctx.report
    name = type(model).__name__
    from .engine import is_transformers_model

    if not is_transformers_model(model):
        report.skip(FEATURE, name, "not a transformers model: the fused loss needs a transformers causal LM head")
        return
    try:
        lm_head = model.get_output_embeddings()
    except Exception:  # some models raise NotImplementedError
        lm_head = None
    if lm_head is None:
        report.skip(FEATURE, name, "the model has no output embedding (not a causal LM head model)")
        return
    if type(lm_head) is not nn.Linear:
        report.skip(
            FEATURE,
            "lm_head",
            f"the output embedding is {type(lm_head).__name__}, not a plain nn.Linear "
            "(an adapter or quantised layer on lm_head keeps the unfused loss)",
        )
        return
    if type(lm_head.weight) is not nn.Parameter and type(lm_head.weight) is not torch.Tensor:
        report.skip(
            FEATURE, "lm_head", f"the output embedding's weight is a {type(lm_head.weight).__name__} (sharded?)"
        )
        return
    if "forward" in model.__dict__:
        report.skip(
            FEATURE,
            name,
            f"its forward was already replaced by another library ({type(model.__dict__['forward']).__name__}); "
            "fastft does not wrap a foreign forward",
        )
        return
    params = inspect.signature(model.forward).parameters
    if "labels" not in params:
        report.skip(FEATURE, name, "its forward takes no labels")
        return
    if not _uses_causal_lm_loss(model):
        report.skip(FEATURE, name, f"its loss is not transformers' ForCausalLMLoss (loss_type={model.loss_type!r})")
        return
    scale, softcap = _logit_transform(model.config)
    if scale is not None and lm_head.bias is not None:
        report.skip(FEATURE, name, "scaled logits with an lm_head bias are not supported by the fused loss")
        return

    backend = ctx.options["backend"]
    capture = _Capture(lm_head, lm_head.forward)
    fwd = FusedLossForward(model, model.forward, capture, backend, scale, softcap)
    ctx.swap(lm_head, "forward", capture)
    ctx.swap(model, "forward", fwd)

    device = lm_head.weight.device
    if backend == "auto":
        where = backends.select(OP_FLCE, device, "auto").backend
        how = f"backend auto ({where} on {device.type})"
    else:
        how = f"backend {backend}"
    extras = []
    if softcap is not None:
        extras.append(f"softcap={softcap:g}")
    if scale is not None:
        extras.append(f"logit scale={scale:g}")
    if lm_head.bias is not None:
        extras.append("lm_head bias")
    if lm_head.weight is getattr(model.get_input_embeddings(), "weight", None):
        extras.append("tied embeddings")
    mtype = getattr(model.config, "model_type", "?")
    family = (
        f"{mtype}, tested family"
        if mtype in VERIFIED_FAMILIES
        else f"{mtype}, generic (found by structure; see the README's model-zoo table)"
    )
    detail = (
        f"fused linear cross-entropy, {how}; logits=None when training with labels [{family}]; "
        "loss convention checked against the model's own loss at the first training call"
    )
    if extras:
        detail += "; " + ", ".join(extras)
    report.add(FEATURE, f"lm_head + forward ({name})", detail)
