"""Capture the rank-one gradient factors of edited linear layers.

For a layer `y = x Wᵀ + b` applied to tokens t, the weight gradient of any loss is
`∇W = Σ_t η_t μ_tᵀ` with μ_t = x_t (the layer input) and η_t = ∂loss/∂y_t.  MEND-style editors
consume the factors (μ, η) instead of ∇W.  This module records them with hooks:

- a forward hook on each edited module keeps its input rows μ for the kept tokens and attaches a
  tensor hook to its output; the output hook receives ∂loss/∂y during backward and keeps those
  rows as η.  Hooks sit on activations, never on parameters, so capture works when the weights
  have `requires_grad=False` (an output that does not require grad is swapped for an identical
  leaf that does, which is harmless because nothing upstream of it wants a gradient; the model
  gets a copy of that leaf, since some add to a layer's output in place, Falcon's MLP among them,
  and autograd refuses in-place changes to a leaf that requires grad).
- A module may see its tokens flattened, (rows·L, in) instead of (rows, L, in), as OPT's decoder
  layers do: the tokens are then taken in row-major order, as `reshape(-1, in)` lays them out (a
  sequence-first flattening of the same size would be read wrongly; no Hugging Face causal LM
  in tests/test_architectures.py does that).
- Factors are laid out as the ops expect (SPEC "Shapes and conventions"): `mu` (T, in), `eta`
  (T, out), `edit_offsets` int32 (E+1,), one edit per batch row, each edit's tokens contiguous in
  row-major (position) order (int32: more than 2**31 - 1 tokens in one capture is a ValueError).
  GPT-2's `Conv1D` stores its weight in×out; its factors are the same (it computes `x W`), and
  `Factors.gradient()` / `weight_out_in` give the out×in view, so the ops never see the transposed
  layout.

Token selection (`tokens=`):
- "all" (MEND): every non-padding token, by the attention mask of the sequence the module runs
  on: the encoder mask for encoder modules and for cross-attention key/value projections (whose
  input is the encoder output), the decoder mask (`decoder_attention_mask`, else labels != -100)
  for the other decoder modules and the LM head of BART/T5; and every scored position (below),
  also one the mask calls padding (a left-padded causal row whose first token is a label is
  predicted from its last padding position).  Other padded tokens get exactly zero gradient
  (they are masked as attention keys and carry no label), so "all" reproduces the full
  `weight.grad`, with left or right padding, in every model that masks padded keys.  A model
  that ignores the attention mask (RWKV) reads left padding as context for every later token:
  there the padded tokens' rows, which "all" drops, carry gradient too, and the factors are not
  the full gradient (right padding, which `tokenize` and `ModelEditor` use, is exact: no real
  token comes after the padding).  Nor is it exact with a scored last padding position under
  transformers before 4.53 (Llama) / 4.54 (GPT-2), whose masks let that position attend to every
  position (`compat.transformers_versions`).
- "target" (MALMEN): only the positions whose output is scored against a label.  In a causal LM
  (labels shifted inside the model's loss) that is position t with `labels[t+1] != -100`, i.e. the
  positions that predict the target tokens; in a masked LM or a seq2seq decoder it is position t
  with `labels[t] != -100`.  Encoder-side sequences carry no labels, so there "target" keeps every
  non-padding token.  `eta.T @ mu == weight.grad` holds exactly when the loss's gradient reaches
  the layer only through kept tokens (e.g. the LM head); otherwise the factors are the kept
  tokens' share of the gradient.

Loss scaling: η is the gradient of whatever the caller backpropagates.  With HF's `outputs.loss`
(mean NLL over all label tokens of the batch, which is what MEND feeds its editor) every η carries
the 1/(number of label tokens of the whole batch) factor, so an edit's factors shrink as more edits
share the batch; nothing here rescales it.  `ModelEditor(loss_reduction="edit")` (not its default)
backpropagates the sum over edits of each edit's own mean target NLL instead, which makes an edit's
factors independent of the rest of the batch.  `ModelEditor` backpropagates its batch mean at a
power-of-two scale and divides η back (`losses.backward_scale`), so that fp16 gradients do not
flush to zero; a caller of this module that backpropagates a mean in fp16 may want to do the same.

Frozen forward: `compute_factors` (and `ModelEditor.capture`) run the forward with every model
parameter's `requires_grad` temporarily False (`frozen_parameters`; each flag is restored exactly
afterwards, also when the pass raises).  η is unchanged, since the hooks sit on activations, but
autograd then records only the part of the graph downstream of the first captured module instead of
the whole model (measured on SmolLM2, a 125-edit edit peaked at 4.5 GB with the parameters
requiring grad and 1.6 GB without).  `FactorCapture` itself leaves the flags alone: a caller that
runs its own `loss.backward()` inside it may want the parameters' `.grad`.

Devices: μ and η of a layer live on the device the layer computes on (its output's), so on a
model split across devices each layer's factors stay beside its weight; masks and labels are moved
to each module's input device.

Dtypes: μ and η are stored in the dtype the layer computed in (its output dtype; under autocast
the input is cast to it, exactly as F.linear does), so a bf16 model gives bf16 factors.
`Factors.gradient()` accumulates in fp32 (fp64 for fp64 factors).

Compiled models: inside the capture's block whatever torch.compile compiled runs eagerly
(`eager_compiled_calls`, torch 2.6 on): dynamo does not guard on the hooks added here, and a
compiled graph without them skipped them.  Torch 2.5 has no stances: there a compiled model (or
one holding a compiled module) is refused with a ValueError naming `model`.

A module may run once per capture: a second call raises RuntimeError (accumulating calls would
break the one-segment-per-edit layout; run one forward per capture context).  This also rules out
activation (gradient) checkpointing, which re-runs the forward during backward.  Several backward
passes through the same graph (retain_graph) accumulate into η, as they do into `.grad`.

A weight shared with another module (a tied LM head shares the input embedding) gets this
module's share of the gradient only; its `.grad` also holds the other use's share.
"""

from __future__ import annotations

import contextlib
import difflib
import inspect
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, Sequence

import torch
from torch import nn

from ._checks import MAX_INT32_ROWS, all_finite, check_autograd, first_non_finite
from .compiled_calls import eager_compiled_calls, refuse_compiled_without_stances
from .edit_handle import deferred_interrupt
from .reference.segments import kept_offsets
from .tokenize import IGNORE_INDEX, listed_causal_lm, no_kv_cache

TOKEN_MODES = ("all", "target")
_MASK_KEYS = ("attention_mask", "labels", "decoder_attention_mask")
# What else of a call is kept: the row layout of a call without a mask (`_row_layout`).
_LAYOUT_KEYS = ("input_ids", "decoder_input_ids", "inputs_embeds", "decoder_inputs_embeds")
# Entries a model takes only as tensors: compute_factors refuses a list there (tokenizer output
# without return_tensors), which reached the embedding as torch's TypeError.
_TENSOR_KEYS = ("input_ids", "decoder_input_ids", *_MASK_KEYS)


def _conv1d_type():
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # transformers is optional for plain nn.Linear models
        return None
    return Conv1D


def is_conv1d(module: nn.Module) -> bool:
    conv1d = _conv1d_type()
    return conv1d is not None and isinstance(module, conv1d)


def is_editable(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module)


def weight_out_in(module: nn.Module) -> torch.Tensor:
    """The module's weight as out×in: the weight itself for nn.Linear, a transposed view for
    GPT-2's Conv1D (in×out storage); in-place updates of the view update the parameter."""
    if isinstance(module, nn.Linear):
        return module.weight
    if is_conv1d(module):
        return module.weight.t()
    raise ValueError(f"module must be nn.Linear or transformers Conv1D, got {type(module).__name__}")


def _owner_of_parameter(model: nn.Module, name: str) -> str | None:
    """The name of the editable module whose parameter `name` is ("x.weight" -> "x"), else None."""
    owner, _, leaf = name.rpartition(".")
    try:
        module = model.get_submodule(owner)
    except AttributeError:
        return None
    return owner if is_editable(module) and leaf in dict(module.named_parameters(recurse=False)) else None


def resolve_modules(model: nn.Module, module_names: Iterable[str], arg: str = "module_names") -> dict[str, nn.Module]:
    """Map names to editable submodules; ValueError (naming `arg`, the caller's argument) listing
    close candidates for unknown names."""
    if not isinstance(model, nn.Module):  # a model name, None: AttributeError from named_modules before
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(module_names, str):
        module_names = [module_names]
    try:
        names = list(module_names)
    except TypeError:
        raise ValueError(f"{arg} must be a list of module names, got {type(module_names).__name__}") from None
    if not names:
        raise ValueError(f"{arg} must not be empty")
    for name in names:
        if not isinstance(name, str):
            raise ValueError(f"{arg} must hold str, got {type(name).__name__}")
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"{arg} has duplicates: {dup}")
    out = {}
    for name in names:
        try:
            # get_submodule finds a module under every name it has (named_modules lists a shared
            # module once, under its first name).
            module = model.get_submodule(name)
        except AttributeError:
            owner = _owner_of_parameter(model, name)
            if owner is not None:
                # MEND's and EasyEdit's inner_params name weights ("...down_proj.weight"): a user
                # trial passing one got "no module named ...", though the model holds it.
                raise ValueError(f"{arg}: {name!r} is a parameter, not a module: give the module's name, "
                                 f"{owner!r} (its weight is what is edited)") from None
            editable = [n for n, m in model.named_modules() if is_editable(m)]
            close = difflib.get_close_matches(name, editable, n=5, cutoff=0.5)
            hint = f"; close matches: {close}" if close else f"; editable modules include {editable[:5]}"
            raise ValueError(f"{arg}: no module named {name!r} in the model{hint}") from None
        if not is_editable(module):
            kind, base = type(module), getattr(module, "base_layer", None)
            # peft's adapter layers (LoRA's, also named Linear) wrap the layer they adapt: "of type
            # Linear; capture supports nn.Linear" named neither.
            wraps = (f" ({kind.__module__}.{kind.__qualname__}, an adapter layer over the {type(base).__name__} "
                     f"{name + '.base_layer'!r}: name that to edit its weight)"
                     if isinstance(base, nn.Module) and is_editable(base) else "")
            raise ValueError(
                f"{arg}: {name!r} is of type {kind.__name__}{wraps}; capture supports nn.Linear "
                "and transformers Conv1D"
            )
        out[name] = module
    return out


@dataclass
class Factors:
    """Gradient factors of one weight: `eta.T @ mu` is its (out×in) gradient.

    mu (T, in) and eta (T, out): one row per captured token; edit_offsets int32 (E+1,): edit e
    owns rows edit_offsets[e]:edit_offsets[e+1] (the ops' CSR form)."""

    mu: torch.Tensor  # (T, in)
    eta: torch.Tensor  # (T, out)
    edit_offsets: torch.Tensor  # int32 (E+1,)

    @property
    def num_edits(self) -> int:
        """E, the number of edits (edit_offsets' length − 1)."""
        return self.edit_offsets.numel() - 1

    @property
    def num_tokens(self) -> int:
        """T, the number of token rows."""
        return self.mu.shape[0]

    def __repr__(self) -> str:
        # Sizes, not values: the dataclass's repr printed μ and η as (summarised) tensors without
        # their shapes, and no number of edits or tokens (compute_factors returns one per layer).
        return (f"Factors(edits={self.num_edits}, tokens={self.num_tokens}, in_features={self.mu.shape[-1]}, "
                f"out_features={self.eta.shape[-1]}, dtype={self.mu.dtype}, device={self.mu.device})")

    def edit(self, e: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(mu, eta) rows of edit `e`."""
        lo, hi = int(self.edit_offsets[e]), int(self.edit_offsets[e + 1])
        return self.mu[lo:hi], self.eta[lo:hi]

    @staticmethod
    def cat(parts: "Sequence[Factors]") -> "Factors":
        """The factors of consecutive row chunks of one batch as one batch's (edits in order)."""
        counts = torch.cat([p.edit_offsets[1:] - p.edit_offsets[:-1] for p in parts])
        offsets = edit_offsets_of(counts, sum(p.num_tokens for p in parts))
        return Factors(torch.cat([p.mu for p in parts]), torch.cat([p.eta for p in parts]), offsets)

    def take_edits(self, edits: torch.Tensor) -> "Factors":
        """The factors of edits `edits` (indices into this batch's edits), in that order."""
        offsets = self.edit_offsets.long()
        index = edits.to(offsets.device).long()
        starts, counts = offsets[:-1][index], (offsets[1:] - offsets[:-1])[index]
        new = torch.zeros(index.numel() + 1, dtype=torch.int64, device=offsets.device)
        new[1:] = counts.cumsum(0)
        total = int(new[-1])  # an edit taken twice counts twice: the total can exceed this batch's
        check_token_count(total)
        rows = torch.repeat_interleave(starts - new[:-1], counts, output_size=total)
        rows = (rows + torch.arange(total, device=rows.device)).to(self.mu.device)
        return Factors(self.mu.index_select(0, rows), self.eta.index_select(0, rows),
                       new.to(self.edit_offsets.device, torch.int32))

    def without_zero_rows(self) -> "Factors":
        """These factors without the tokens whose μ or η row is exactly zero (each edit keeps its
        other tokens, in order; `self` when there are none).  Such a token adds nothing to the
        gradient, and the editors skip it (`GroupedEditor.forward`, which also drops rows that
        are zero once rounded to fp32).  In "all" mode most of the last block's tokens are: only
        the positions the loss scores get a gradient there (see `ModelEditor._apply_editors`)."""
        keep = (self.mu != 0).any(1) & (self.eta != 0).any(1)  # a NaN row is kept (NaN != 0)
        if bool(keep.all()):
            return self
        offsets = kept_offsets(self.edit_offsets, keep).to(self.edit_offsets.device)
        return Factors(self.mu[keep], self.eta[keep], offsets)

    def gradient(self, per_edit: bool = False) -> torch.Tensor:
        """Σ_t η_t μ_tᵀ (out×in) in fp32 (fp64 for fp64 factors); (E, out, in) with per_edit."""
        dtype = torch.float64 if self.mu.dtype == torch.float64 else torch.float32
        mu, eta = self.mu.to(dtype), self.eta.to(dtype)
        if not per_edit:
            return eta.t() @ mu
        return torch.stack([eta[lo:hi].t() @ mu[lo:hi] for lo, hi in _bounds(self.edit_offsets)])


def check_token_count(tokens: int) -> None:
    """Refuse factors of more tokens than int32 `edit_offsets` (SPEC) count.  Past 2**31 - 1 the
    int32 offsets wrapped silently (the int64 cumulative sum cast to int32), and `Factors.edit`,
    `gradient(per_edit=True)` and `take_edits` read the wrong rows; the ops and `kept_offsets` refuse
    such offsets, but name an argument the caller never passed.  int64 offsets would not help:
    the editors' own int32 offsets (`kept_offsets`) stop at the same count.  A capture holds every
    edit's tokens at once (ModelEditor joins its chunks), so the count is of the whole call; reaching
    it takes μ and η of 2**31 tokens in memory: 33 TB for one GPT-2 c_fc layer (768 + 3072 features)
    in fp32, though only 8 GiB for a toy layer of one input and one output in fp16."""
    if tokens > MAX_INT32_ROWS:
        raise ValueError(f"the factors hold {tokens} tokens, but their edit_offsets are int32, which count at most "
                         f"{MAX_INT32_ROWS}: capture fewer edits (or shorter texts) at a time")


def edit_offsets_of(counts: torch.Tensor, tokens: int) -> torch.Tensor:
    """int32 (E+1,) edit offsets, on `counts`' device, from each edit's token count; `tokens` is
    their total, from sizes (a value read here would be a device sync), checked first
    (`check_token_count`)."""
    check_token_count(tokens)
    offsets = torch.zeros(counts.numel() + 1, dtype=torch.int32, device=counts.device)
    offsets[1:] = counts.cumsum(0)
    return offsets


def _bounds(offsets: torch.Tensor) -> list[tuple[int, int]]:
    host = offsets.tolist()
    return list(zip(host[:-1], host[1:]))


class _Record:
    """What one module's capture holds between its forward and the backward."""

    def __init__(self, mu: torch.Tensor, index: torch.Tensor, counts: torch.Tensor, out_features: int):
        self.mu = mu
        self.index = index  # flat positions of the kept tokens in the output's (rows*L) layout
        self.counts = counts  # kept tokens per edit
        self.out_features = out_features
        self.eta: torch.Tensor | None = None

    def add_grad(self, grad: torch.Tensor) -> None:
        rows = grad.reshape(-1, grad.shape[-1]).index_select(0, self.index)
        self.eta = rows if self.eta is None else self.eta + rows


class FactorCapture:
    """Context manager that records `Factors` of the named modules for one forward/backward.

        with capture_factors(model, ["transformer.h.3.mlp.c_fc"], tokens="all") as cap:
            loss = model(**batch).loss
            loss.backward()            # or torch.autograd.grad(loss, cap.outputs)
        f = cap.factors["transformer.h.3.mlp.c_fc"]

    Masks and labels are read from the top-level model call's arguments (`attention_mask`,
    `labels`, `decoder_attention_mask`); pass `batch=` to supply them when the model is called
    without them (e.g. a custom loss computed outside the model).  `label_shift` says whether
    label t is predicted at position t-1 (causal LMs; default: inferred from the model class).
    The capture's hook runs before the caller's forward hooks on a module, so η is the gradient at
    the layer's own output even where such a hook changes it (Σ ημᵀ stays the weight's gradient).
    """

    def __init__(
        self,
        model: nn.Module,
        module_names: Iterable[str],
        tokens: str = "all",
        batch: Mapping[str, torch.Tensor] | None = None,
        label_shift: bool | None = None,
    ):
        if tokens not in TOKEN_MODES:
            raise ValueError(f"tokens must be one of {TOKEN_MODES}, got {tokens!r}")
        if batch is not None and not isinstance(batch, Mapping):
            raise ValueError(f"batch must be a mapping of tensors or None, got {type(batch).__name__}")
        self.model = model
        self.modules = resolve_modules(model, module_names)
        self.tokens = tokens
        self.label_shift = listed_causal_lm(model) if label_shift is None else bool(label_shift)
        self._override = dict(batch) if batch is not None else {}
        config = getattr(model, "config", None)
        self._enc_dec = bool(getattr(config, "is_encoder_decoder", False))
        self._encoder = model.get_encoder() if self._enc_dec and hasattr(model, "get_encoder") else None
        self._encoder_ids = {id(m) for m in self._encoder.modules()} if self._encoder is not None else set()
        self._handles: list = []
        self._records: dict[str, _Record] = {}
        self._outputs: dict[str, torch.Tensor] = {}
        # Masks/labels (and the ids that give a maskless call its rows) of the current forward;
        # batch= entries win over the model call's arguments and also serve models whose top level
        # is never called (their pre-hook never fires).
        self._call: dict[str, torch.Tensor] = {
            k: v for k, v in self._override.items() if k in (*_MASK_KEYS, *_LAYOUT_KEYS) and v is not None
        }
        self._encoder_out: torch.Tensor | None = None
        self._encoder_copies: dict[torch.device, torch.Tensor] = {}
        self._backward_seen = False
        self._entered = False  # `factors` of a capture never entered says so (it recorded nothing)

    # -- context -------------------------------------------------------------------------------
    def __enter__(self) -> "FactorCapture":
        self._entered = True
        self._contexts = contextlib.ExitStack()  # exits only what was entered, also when entering fails
        try:
            # A Ctrl-C meanwhile waits until every hook's handle is kept, then raises here, where they
            # all come off: one landing between a registration and its append left that hook on its
            # module (with this capture), and every later forward of the model raised ("capture needs
            # autograd" under no_grad, else "ran more than once inside one capture").
            with deferred_interrupt():
                refuse_compiled_without_stances(self.model)
                self._contexts.enter_context(no_activation_checkpointing(self.model))
                self._contexts.enter_context(eager_compiled_calls())
                self._handles.append(self.model.register_forward_pre_hook(self._model_pre_hook, with_kwargs=True))
                if self._encoder is not None:
                    self._handles.append(self._encoder.register_forward_hook(self._encoder_hook))
                for name, module in self.modules.items():
                    # First among the module's forward hooks: η is the gradient at the layer's own output.
                    # After a hook of the caller's that changes the output (a scaling, an ablation), it
                    # was the gradient at that hook's output, and Σ ημᵀ was not the weight's gradient.
                    self._handles.append(module.register_forward_hook(self._make_hook(name), with_kwargs=True,
                                                                      prepend=True))
        except BaseException:
            self._unhook()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._unhook()
        self._outputs.clear()  # release the autograd graph; the records keep mu and eta
        # The encoder's output too: its graph holds this capture's gradient hooks (closures over
        # self), a cycle through autograd's C++ graph that the garbage collector cannot see, so an
        # encoder-decoder model's every capture (graph, activations) and the model itself lived on.
        self._encoder_out = None
        self._encoder_copies = {}

    def _unhook(self) -> None:
        """Every hook off the model, and its checkpointing flags back.  A Ctrl-C meanwhile waits
        until the end: one that landed while the hooks were being removed left them on their
        modules, and every later forward of the model raised ("ran more than once inside one
        capture")."""
        with deferred_interrupt():
            for handle in self._handles:
                handle.remove()
            self._handles.clear()
            self._contexts.close()

    # -- results -------------------------------------------------------------------------------
    @property
    def outputs(self) -> list[torch.Tensor]:
        """The captured modules' outputs, for `torch.autograd.grad(loss, cap.outputs)` (inside
        the context only: they are dropped on exit so the graph can be freed)."""
        return list(self._outputs.values())

    def check_all_ran(self) -> None:
        """RuntimeError naming the captured modules that ran no forward pass in the block yet.  Before
        the backward, it names them where torch.autograd.grad(loss, cap.outputs) would raise
        "`inputs` argument to `grad()` cannot be empty" (no module ran) or the loss would not depend
        on them."""
        missing = [n for n in self.modules if n not in self._records]
        if missing:
            raise RuntimeError(f"modules {missing} did not run a forward pass inside the capture")

    @property
    def factors(self) -> dict[str, Factors]:
        if not self._entered:
            raise RuntimeError("the capture records only inside its block: with capture_factors(...) as cap: "
                               "run the forward and the backward there, then read cap.factors")
        self.check_all_ran()
        if not self._backward_seen:
            raise RuntimeError(
                "no backward pass reached the captured modules: call loss.backward() inside the capture"
            )
        out = {}
        for name, rec in self._records.items():
            # A module whose output did not reach the loss has zero gradient.
            eta = rec.eta if rec.eta is not None else rec.mu.new_zeros(rec.mu.shape[0], rec.out_features)
            offsets = edit_offsets_of(rec.counts.to(rec.mu.device), rec.mu.shape[0])
            out[name] = Factors(mu=rec.mu, eta=eta, edit_offsets=offsets)
        return out

    # -- hooks ---------------------------------------------------------------------------------
    def _model_pre_hook(self, module, args, kwargs):
        try:
            bound = inspect.signature(module.forward).bind_partial(*args, **kwargs).arguments
        except TypeError:
            bound = dict(kwargs)
        extra = bound.get("kwargs")
        if isinstance(extra, dict):  # forward(**kwargs) signatures
            bound = {**bound, **extra}
        for key in (*_MASK_KEYS, *_LAYOUT_KEYS):
            value = self._override.get(key, bound.get(key))
            if value is not None:
                self._call[key] = value

    def _encoder_hook(self, module, args, output):
        hidden = output[0] if isinstance(output, (tuple, list)) else getattr(output, "last_hidden_state", output)
        self._encoder_out = hidden
        self._encoder_copies = {}

    def _make_hook(self, name: str) -> Callable:
        def hook(module, args, kwargs, output):
            return self._on_forward(name, module, args, kwargs, output)

        return hook

    def _on_forward(self, name, module, args, kwargs, output):
        if name in self._records:
            raise RuntimeError(
                f"module {name!r} ran more than once inside one capture; capture supports one call "
                "per module (one forward pass per capture context): a module the model calls twice per "
                "forward (one module shared between two places, as ALBERT's layers are) cannot be edited "
                "by the editor methods; the fine-tuning baselines (method 'ft' or 'ft_kl') can edit it"
            )
        if not torch.is_grad_enabled():
            raise RuntimeError("capture needs autograd: the forward pass ran under torch.no_grad()/inference_mode")
        x = args[0] if args else kwargs.get("input", kwargs.get("x"))
        if not isinstance(x, torch.Tensor) or not isinstance(output, torch.Tensor):
            raise RuntimeError(f"module {name!r}: expected tensor input and output")
        keep = self._keep_mask(name, module, x)  # bool, x.shape[:-1], on x's device
        rows = keep.reshape(keep.shape[0] if keep.dim() > 1 else 1, -1)
        counts = rows.sum(1)
        index = rows.reshape(-1).nonzero().squeeze(1)
        mu = x.detach().reshape(-1, x.shape[-1]).index_select(0, index)
        # Everything kept lives where the layer computes (its output's device): η arrives there, and
        # a module whose own accelerate hook moves its input inside forward is called with x still
        # on the previous block's device.  Only the kept rows move; on one device nothing does.
        device = output.device
        mu = mu.to(device=device, dtype=output.dtype)
        record = _Record(mu, index.to(device), counts.to(device), output.shape[-1])
        self._records[name] = record
        passed_on = None
        if not output.requires_grad:
            output = output.detach().requires_grad_()
            passed_on = output.clone()  # a non-leaf: the model may change it in place
        self._outputs[name] = output

        def grad_hook(grad):
            self._backward_seen = True
            record.add_grad(grad.detach())

        output.register_hook(grad_hook)
        return passed_on

    # -- token selection -----------------------------------------------------------------------
    def _is_encoder_output(self, x: torch.Tensor) -> bool:
        """Whether a decoder module's input is the encoder's output (cross-attention keys/values).

        On one device it is that very tensor.  On a split model the hooks hand each decoder block
        its own copy on the block's device, so there the input is compared, by value, with the
        encoder output moved to that device (one copy per device and forward pass)."""
        enc = self._encoder_out
        if enc is None or x is enc:
            return x is enc
        if x.device == enc.device or x.shape != enc.shape or x.dtype != enc.dtype:
            return False
        copy = self._encoder_copies.get(x.device)
        if copy is None:
            copy = self._encoder_copies[x.device] = enc.detach().to(x.device)
        return bool(torch.equal(x, copy))

    def _row_layout(self, shape: torch.Size, labels, encoder_side: bool) -> torch.Size:
        """The token layout of a call without a mask: `shape` (the module's x.shape[:-1]), except
        for a module that sees its tokens flattened, (rows·L, in) as OPT's layers do, where it is the
        (rows, L) of the call's labels or token ids.  Without it "all" mode read such a module's
        rows·L tokens as one edit (OPT, 3 rows of 5 tokens: offsets [0, 15], with a mask of ones
        [0, 5, 10, 15]), while the model's unflattened modules gave one edit per row."""
        if len(shape) != 1:
            return shape
        prefix = "decoder_" if self._enc_dec and not encoder_side else ""
        embeds = self._call.get(prefix + "inputs_embeds")
        for t in (labels, self._call.get(prefix + "input_ids"), embeds[..., 0] if torch.is_tensor(embeds) else None):
            if torch.is_tensor(t) and t.dim() == 2 and t.numel() == shape[0]:
                return t.shape
        return shape

    def _keep_mask(self, name: str, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape[:-1]
        encoder_side = self._enc_dec and (id(module) in self._encoder_ids or self._is_encoder_output(x))
        if self._enc_dec and not encoder_side:
            labels = self._call.get("labels")
            mask = self._call.get("decoder_attention_mask")
            if mask is None and labels is not None:
                mask = labels != IGNORE_INDEX
            shift = False
        else:
            labels = None if encoder_side else self._call.get("labels")
            mask = self._call.get("attention_mask")
            shift = self.label_shift
        if mask is None:
            keep = torch.ones(self._row_layout(shape, labels, encoder_side), dtype=torch.bool, device=x.device)
        else:
            keep = mask.to(x.device).bool()
        if self.tokens == "target" and not encoder_side and labels is None:
            raise ValueError(
                f"tokens='target' needs labels: pass labels to the model call or batch= to the capture "
                f"(module {name!r})"
            )
        # "all" with a mask also keeps every scored position the mask calls padding: in a left-padded
        # causal row the last padding position predicts the row's first token when that is a label.
        # (Without a mask "all" keeps every position already.)
        if labels is not None and not encoder_side and (self.tokens == "target" or mask is not None):
            scored = labels.to(x.device) != IGNORE_INDEX
            if shift:  # position t predicts label t+1
                scored = torch.cat([scored[..., 1:], torch.zeros_like(scored[..., :1])], dim=-1)
            keep = scored if self.tokens == "target" else keep | scored
        flattened = len(shape) == 1 and keep.dim() == 2 and keep.numel() == shape[0]  # (rows·L, in)
        if tuple(keep.shape) != tuple(shape) and not flattened:
            raise RuntimeError(
                f"module {name!r} ran on input of shape {tuple(x.shape)}, which does not match the "
                f"token mask of shape {tuple(keep.shape)}"
            )
        return keep


@contextlib.contextmanager
def no_activation_checkpointing(model: nn.Module):
    """Inside the block, `model` runs as if Hugging Face activation (gradient) checkpointing were
    off, and everything is as before on exit.

    - Modules with `gradient_checkpointing` True (set by `activation_checkpointing_enable` or
      `gradient_checkpointing_enable`) run without it.  Checkpointing recomputes a block's forward
      during the backward: a capture hook would see its module run twice, and `lowrank_edited`'s
      patched forwards are gone by the time the caller's backward runs (the recompute then saves
      other tensors and torch raises CheckpointError).
    - torch's activation-checkpoint wrappers (`checkpoint_wrapper`, `apply_activation_checkpointing`:
      FSDP's, accelerate's FSDP plugin's) call their module directly, for the same reason: they
      checkpoint in eval mode too, and editor training raised CheckpointError, a reentrant wrapper's
      capture "capture needs autograd: ... ran under torch.no_grad()" and FT "element 0 of tensors
      does not require grad".
    - The input embeddings' output is detached while their parameters are frozen.  Enabling
      checkpointing also calls `enable_input_require_grads` (so does PEFT), whose hook makes that
      output require grad: every block below the first edited layer would then keep its graph
      (3.8× the capture's saved bytes on the tiny Llama), though no gradient is taken there.
    """
    flipped = [m for m in model.modules() if getattr(m, "gradient_checkpointing", False) is True]
    wrappers = [(m, m.checkpoint_fn) for m in model.modules() if _is_checkpoint_wrapper(m)]
    handles = []
    try:
        # A Ctrl-C meanwhile waits until the hook's handle is kept: one landing between the
        # registration and its append left the hook on the embeddings for good, one more per interrupt.
        with deferred_interrupt():
            for m in flipped:
                m.gradient_checkpointing = False
            for m, _ in wrappers:
                m.checkpoint_fn = _call_unchecked
            embeddings = _input_embeddings(model)
            if embeddings is not None:
                handles.append(embeddings.register_forward_hook(_detach_if_frozen))
        yield
    finally:
        with deferred_interrupt():  # a Ctrl-C meanwhile waits until everything is back
            for h in handles:
                h.remove()
            for m in flipped:
                m.gradient_checkpointing = True
            for m, checkpoint_fn in wrappers:
                m.checkpoint_fn = checkpoint_fn


def _is_checkpoint_wrapper(module: nn.Module) -> bool:
    """torch's CheckpointWrapper, told by what its forward uses (torch.distributed may be absent)."""
    return "_checkpoint_wrapped_module" in module._modules and callable(module.__dict__.get("checkpoint_fn"))


def _call_unchecked(function, *args, **kwargs):
    """A CheckpointWrapper's `checkpoint_fn` that runs the wrapped module as is."""
    return function(*args, **kwargs)


def _input_embeddings(model: nn.Module) -> nn.Module | None:
    get = getattr(model, "get_input_embeddings", None)
    try:
        embeddings = get() if callable(get) else None
    except NotImplementedError:  # PreTrainedModel's default for models without one
        return None
    return embeddings if isinstance(embeddings, nn.Module) else None


def _detach_if_frozen(module, args, output):
    if isinstance(output, torch.Tensor) and output.requires_grad and not any(
            p.requires_grad for p in module.parameters()):
        return output.detach()
    return None


@contextlib.contextmanager
def frozen_parameters(model: nn.Module):
    """Inside the block every parameter of `model` has `requires_grad=False`; each flag comes back
    exactly as it was on exit, also when the block raises.  A forward run inside records no graph
    for the parameters (and none for activations that depend only on them)."""
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(False)
        yield
    finally:
        # A Ctrl-C meanwhile waits until every flag is back: one that landed in this loop left the
        # parameters after it frozen (a caller's training then silently got no gradient for them).
        with deferred_interrupt():
            for p, flag in zip(params, flags):
                # An inference tensor (a model built under torch.inference_mode) takes requires_grad=True
                # only in inference mode: set outside it, the loop raised there and left every parameter
                # after it frozen (skipping such tensors instead left them unfrozen inside the block).
                with torch.inference_mode() if p.is_inference() else contextlib.nullcontext():
                    p.requires_grad_(flag)


@contextlib.contextmanager
def modes_restored(module: nn.Module):
    """On leaving the block (also when it raises), `module` and each of its submodules get back
    their own train/eval flag: `module.train(mode)` alone would set them all alike (a block a caller
    keeps in eval mode inside a model that trains).  `module.train` runs first, for a subclass that
    extends it."""
    modes = module_modes(module)
    try:
        yield
    finally:
        with deferred_interrupt():  # a Ctrl-C meanwhile waits until every flag is back
            restore_modes(module, modes)


def module_modes(module: nn.Module) -> list:
    """[(each of `module`'s modules, its train flag)], what `restore_modes` puts back."""
    return [(m, m.training) for m in module.modules()]


def restore_modes(module: nn.Module, modes: list) -> None:
    """Every flag of `modes` (`module_modes(module)`) back, `module.train` first (see `modes_restored`)."""
    module.train(modes[0][1])
    for m, mode in modes:
        m.training = mode


def capture_factors(
    model: nn.Module,
    module_names: Iterable[str],
    tokens: str = "all",
    batch: Mapping[str, torch.Tensor] | None = None,
    label_shift: bool | None = None,
) -> FactorCapture:
    """`FactorCapture` as a function: `with capture_factors(model, names, tokens=...) as cap:`.
    The arguments are FactorCapture's (module_names: the modules to capture, names of `model`)."""
    return FactorCapture(model, module_names, tokens=tokens, batch=batch, label_shift=label_shift)


def compute_factors(
    model: nn.Module,
    batch: Mapping[str, torch.Tensor],
    module_names: Iterable[str],
    tokens: str = "all",
    loss_fn: Callable | None = None,
    label_shift: bool | None = None,
    check_finite: bool = True,
) -> tuple[dict[str, Factors], torch.Tensor]:
    """One forward + backward of `model(**batch)`; returns (factors by module name, loss).

    module_names, tokens ("all" or "target", see the module docstring), label_shift: as
    `FactorCapture`'s.  The loss is `loss_fn(outputs, batch)` or the model's own `outputs.loss` (mean NLL over label
    tokens).  Gradients are taken with `torch.autograd.grad` with respect to the captured outputs
    only, so no parameter's `.grad` changes and weights need not require grad; the pass runs with
    the parameters frozen (`frozen_parameters`, flags restored), so only the graph downstream of the
    captured modules is kept.  With `check_finite`, a non-finite loss or factor raises
    FloatingPointError naming the module.
    """
    if not isinstance(batch, Mapping):
        raise ValueError(f"batch must be a mapping of tensors, got {type(batch).__name__}")
    # Under inference_mode the loss records no graph: it said "the loss does not depend on any
    # captured module".  (no_grad is fine: the pass turns grad on.)
    check_autograd("compute_factors", "its backward", model)
    for key, value in batch.items():
        # return_tensors="np" (or none) tokenizer output: torch's TypeError named 'indices' only.
        if type(value).__name__ == "ndarray" or (key in _TENSOR_KEYS and isinstance(value, (list, tuple))):
            kind = f"{type(value).__module__}.ndarray" if type(value).__name__ == "ndarray" else type(value).__name__
            raise ValueError(f"batch[{key!r}] must be a torch.Tensor, got {kind} (tokenize with return_tensors='pt')")
    labels = batch.get("labels")
    if loss_fn is None and isinstance(labels, torch.Tensor) and not bool((labels != IGNORE_INDEX).any()):
        # The model's mean over no label token is 0/0: this raised "the loss is not finite (nan)".
        raise ValueError(f"batch['labels'] has no target token (every entry is {IGNORE_INDEX}): "
                         "the loss would be a mean over no token")
    capture = capture_factors(model, module_names, tokens, batch=batch, label_shift=label_shift)
    with torch.enable_grad(), frozen_parameters(model), capture as cap:
        no_cache = {} if "use_cache" in batch else no_kv_cache(model)  # as ModelEditor's capture
        outputs = model(**batch, **no_cache)
        loss = loss_fn(outputs, batch) if loss_fn is not None else outputs.loss
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise ValueError("the loss must be a scalar tensor (pass labels in batch or a loss_fn)")
        if check_finite and not all_finite(loss):
            raise FloatingPointError(f"the loss is not finite ({float(loss.detach())})")
        cap.check_all_ran()  # a module off the forward's path, named (it raised one of the two below)
        if not loss.requires_grad:
            raise RuntimeError("the loss does not depend on any captured module")
        torch.autograd.grad(loss, cap.outputs, allow_unused=True)
        factors = cap.factors
    bad = first_non_finite({name: (f.eta, f.mu) for name, f in factors.items()}) if check_finite else None
    if bad is not None:
        raise FloatingPointError(f"non-finite gradient factors for module {bad!r}")
    return factors, loss.detach()
