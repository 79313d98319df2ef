"""ModelEditor: edit a Hugging Face model in place with a trained editor (or fine-tuning), undoably.

    editor = ModelEditor(model, tokenizer, layers=["model.layers.28.mlp.down_proj", ...],
                         method="mend", rank=64)
    handle = editor.apply([EditRequest("The Eiffel Tower is in", "Rome")])
    ...                                    # the model is edited
    handle.undo()                          # every weight bit-identical to before
    with editor.edited(requests): ...      # the same, scoped

Editor methods ("mend", "raeditor", "moeditor", "proeditor"): a forward + backward of the edit
loss (`loss_reduction`, below) captures the gradient factors (μ, η) of every edited weight
(`capture.py`), with the model's parameters frozen for the pass (their `requires_grad` flags are
restored afterwards) so that autograd keeps only the graph above the first edited layer, one pass
per `capture_batch_size` edits (their factors concatenated) and the LM head computing logits at
the target-predicting positions only (`scored_logits.py`), so that its memory grows with the
number of edits only through the factors themselves (a causal LM's chunks are copied into the
joined factors as they run, `_capture_into`; otherwise they are held twice for one layer while the
chunks' factors are joined); the
editors map them to grouped low-rank factors (eval mode, no grad) and each weight gets its fused
shift in place through `GroupedEdit.apply_` (`ops.apply_shift_`), which returns the previous
values: undo copies them back, so it is exact even in bf16, where subtracting the shift again
would not be.

The edit loss (`loss_reduction`): "token" (the default) is the mean NLL over all target tokens of
the batch, the loss MEND feeds its editor, under which every η carries a 1/(target tokens in the
whole batch) factor and an edit's shift shrinks as the batch grows (an editor trained on batches of
6 reached ES 0.92 applied 5 edits at a time but 0.27 applied 25 at once); "edit" is the sum over
edits of each edit's own mean target NLL, so an edit's (μ, η) are the same whether it is applied
alone or with 100 others.  Measured on CounterFact (RESULTS.md), "edit" raises ES but the fused
shift then grows with the number of edits and so does drawdown: LMP is lower at every N_u, much
lower above the training batch size, hence the default.  The setting belongs to the editor (its
normalisation statistics and steps α are learned on that scale): training uses the same capture,
and checkpoints record it.  Checkpoints
written before the setting existed (format 1, no "loss_reduction") load as "token", the semantics
they were trained under; so do original MEND editors (`compat.mend.LOSS_REDUCTION`;
`ModelEditor.from_mend` builds a ModelEditor from an original MEND checkpoint).

Tied weights: a layer whose weight is shared with another module (an LM head tied to the input
embedding) cannot be edited without changing that module too, so the constructor raises ValueError
naming both unless `allow_tied=True`.

As in MEND, weights of the same (in, out) shape share one editor (a `GroupedEditor` per shape) and
tell it apart by `mode` = the weight's index among the layers of that shape (in `layers` order).
MoEditor routes on edit features = the mean of the model's last hidden state (the LM head's input,
`head_input.py`) over each edit's prompt tokens (the encoder's output for seq2seq models), taken
from the capture's own forward pass, detached.

Baselines ("ft", "ft_kl"): MEND's fine-tuning baselines, FT and FT+KL, on the edited layers'
weights only (`ft_baseline.py`).  Undo copies the saved weights back.

Atomicity: a request that is invalid or tokenizes to an empty target raises ValueError before
anything changes; a non-finite loss, gradient factor, editor output or shifted weight raises
FloatingPointError; any other exception mid-edit (out of memory, a failing kernel, an interrupt)
is re-raised with a note — in every case after restoring, bit for bit, each weight that had
already been changed.  A Ctrl-C (SIGINT, in the main thread) that arrives while a weight is being
shifted waits until that weight's saved values are recorded, so the restore never misses it.
Edits must be undone in reverse order, across every ModelEditor of the same model
(`torch.compile(model)` counts as the model; a handle that is not the model's latest live one
refuses, since restoring its saved values would also wipe the later edit); `edited()` undoes, on
exit, the edits applied inside its block too.  A live edit holds a copy of every weight it changed
until `undo()`, or `keep()`, which makes it permanent and frees
the copy (earlier edits then can no longer be undone), or until the model is freed.

Models split across devices (`device_map="auto"`, or blocks moved by hand with hooks that move the
hidden states, as accelerate's do): inputs go to the input embedding's device (`device`); the
capture keeps each layer's μ, η on that layer's device; the editor of a shape lives on the device
of the first layer of that shape (`editor_device=` puts every editor on one device instead) and
gets the factors (and the edit features) moved to it; each weight's fused shift, Fisher mask and
in-place update run on the weight's own device, from editor outputs moved there once (T rows of
factors and, for ProEditor, one o×i Fisher matrix); losses are taken on the device of the logits,
with labels and masks moved there.  Undo, the baselines, training and save/load follow the same
rules (checkpoints hold CPU tensors and load into each editor where it lives).  With everything on
one device every move is a no-op.  Edited layers must be resident: accelerate offloads modules
that `device_map` sends to "cpu"/"disk" while a GPU is in the map (their weights stay on "meta"),
and the constructor refuses such a layer with ValueError (so does `apply`, for a layer offloaded
since, by `cpu_offload`/`disk_offload`/`dispatch_model` of the built model; `undo` refuses with
RuntimeError, restoring nothing, once an edited weight was offloaded after the edit: its values
then live in accelerate's hook, out of the restore's reach, so undo before offloading).
`stats["peak_memory_bytes"]` sums the per-GPU peaks of every CUDA device in play; to measure
them, `apply` resets those devices' peak statistics (`torch.cuda.reset_peak_memory_stats`), so a
caller's own `max_memory_allocated` reading spans from the last edit on.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import time
import warnings
from pathlib import Path
from typing import Iterable, Sequence

import torch
from torch import nn

from ._checks import HALF_DTYPES, is_int
from .capture import (
    TOKEN_MODES, Factors, capture_factors, frozen_parameters, is_conv1d, modes_restored, resolve_modules,
    weight_out_in,
)
from .devices import as_device, check_resident, cuda_indices, input_device, model_devices, place_editor
from .edit_handle import LIVE_EDITS, EditHandle, add_note, deferred_interrupt, restore, weights_owner
from .editors.grouped_editor import config_differences, with_absent_defaults
from .editors.presets import MEND, MoEditor, ProEditor, RaEditor
from .ft_baseline import FT_KL_ONLY, FineTuneBaselines
from .head_input import called_head, head_input, head_width
from .losses import DEFAULT_LOSS_REDUCTION, LOSS_REDUCTIONS, backward_scale, edit_loss, unscale
from .positions import past_positions
from .requests import EditRequest, validate_requests
from .safetensors_file import check_state, json_metadata, save_safetensors
from .scored_logits import logits_at, scored_positions
from .tied_weights import check_untied
from .tokenize import IGNORE_INDEX, forward_inputs, is_seq2seq, no_kv_cache, tokenize_causal, tokenize_seq2seq

EDITOR_METHODS = {"mend": MEND, "raeditor": RaEditor, "moeditor": MoEditor, "proeditor": ProEditor}
FT_METHODS = ("ft", "ft_kl")
METHODS = tuple(EDITOR_METHODS) + FT_METHODS
# Rows per forward + backward of the capture (and of the FT baselines).  SmolLM2-135M, 3 edited
# down_proj layers, CounterFact prompts of ~20 tokens, CPU: the capture of 500 edits in one pass
# took 8.2 GB over the model's 1.3 GB (2.2 GB once the LM head computed only the scored positions).
DEFAULT_CAPTURE_BATCH_SIZE = 32
# What a checkpoint without a "loss_reduction" entry (format 1) was trained and applied under.
LEGACY_LOSS_REDUCTION = "token"
CHECKPOINT_FORMAT = 2
CHECKPOINT_KEY = "dcedit_model_editor"


def _peak_memory_start(devices: list[torch.device]) -> None:
    for index in cuda_indices(devices):
        torch.cuda.reset_peak_memory_stats(index)


def _peak_memory(devices: list[torch.device]):
    """Sum over the CUDA devices in play of each one's peak (the peak of a single GPU when the model
    is on one); None when none is CUDA."""
    indices = cuda_indices(devices)
    return sum(int(torch.cuda.max_memory_allocated(i)) for i in indices) if indices else None


class ModelEditor(FineTuneBaselines):
    """Edits `model` in place at the named `layers` with `method`; see the module docstring.

    layers: module names (nn.Linear or GPT-2 Conv1D); method: "mend", "raeditor", "moeditor",
    "proeditor", "ft" or "ft_kl"; tokens: "all" (MEND: every non-padding token feeds the editor)
    or "target" (MALMEN: only the target-predicting positions); loss_reduction: "edit" (each edit's
    mean target NLL, summed over edits) or "token" (MEND's batch mean), the loss the capture
    backpropagates (the FT baselines always fine-tune on the batch mean, as MEND's baseline does);
    allow_tied: edit layers whose weight is shared with another module (ValueError otherwise);
    editor_device: where every editor lives (a device, "cuda:1", or a CUDA index); None (the
    default) puts the editor of each weight shape on the device of the first layer of that shape
    (see "Models split across devices" in the module docstring; ignored by the baselines);
    capture_batch_size: rows per forward + backward of the capture and of the FT baselines (the
    factors are concatenated, so an edit's factors do not depend on it beyond rounding; None:
    the whole batch in one pass), which bounds their activation memory whatever the number of
    edits; FT+KL over more locality rows than this recomputes each chunk's KL reference at every
    step instead of keeping n×V log-probabilities (on SmolLM2, 500 CounterFact edits, 2 steps:
    peak RSS 1.8 instead of 2.7 GB, 97 instead of 83 s; bit-identical weights, the model in
    eval mode), so None
    is also the faster choice when memory allows;
    rescale_batch_size: None (the default) or the batch size the editors were trained on, an
    opt-in remedy for applying many more edits than that at once (see the property);
    editor_kwargs: the GroupedEditor
    preset's own arguments (`n_editors`, `rank`, `norm`, `fisher_keep`, `edit_lr`, `fusion`,
    `seed`, ...) or, for the baselines, `ft_steps`, `ft_lr`, `ft_optimizer` ("adam"|"sgd"),
    `ft_stop_loss` (stop once the edit loss is below it; None: run every step), and for "ft_kl"
    `kl_weight` and `locality_texts`.
    """

    def __init__(self, model: nn.Module, tokenizer, layers: Sequence[str], method: str = "mend",
                 tokens: str = "all", loss_reduction: str = DEFAULT_LOSS_REDUCTION, allow_tied: bool = False,
                 editor_device=None, capture_batch_size: int | None = DEFAULT_CAPTURE_BATCH_SIZE,
                 rescale_batch_size: int | None = None, **editor_kwargs):
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        if tokens not in TOKEN_MODES:
            raise ValueError(f"tokens must be one of {TOKEN_MODES}, got {tokens!r}")
        if loss_reduction not in LOSS_REDUCTIONS:
            raise ValueError(f"loss_reduction must be one of {LOSS_REDUCTIONS}, got {loss_reduction!r}")
        if not isinstance(allow_tied, bool):
            raise ValueError(f"allow_tied must be a bool, got {type(allow_tied).__name__}")
        if isinstance(layers, str):
            raise ValueError("layers must be a list of module names, got a single str")
        if not callable(tokenizer):
            raise ValueError(f"tokenizer must be a Hugging Face tokenizer (callable), got {type(tokenizer).__name__}")
        self.editor_device = as_device(editor_device, "editor_device")
        self.model, self.tokenizer, self.method, self.tokens = model, tokenizer, method, tokens
        self.loss_reduction, self.allow_tied = loss_reduction, allow_tied
        self.capture_batch_size = capture_batch_size
        self.rescale_batch_size = rescale_batch_size  # ValueError unless an editor method under "token"
        self.modules = resolve_modules(model, layers, arg="layers")  # ValueError with close candidates
        self.layers = list(self.modules)
        self._check_resident()
        if not allow_tied:
            check_untied(model, self.modules)
        self.editor_kwargs = dict(editor_kwargs)
        self.seq2seq = is_seq2seq(model)
        self._live: list[EditHandle] = LIVE_EDITS.setdefault(weights_owner(model), [])
        self.editors = nn.ModuleDict()
        self._warned_initial = False
        self._warned_rounding = False  # see _warn_rounded_away
        self.slots: dict[str, tuple[str, int]] = {}  # layer -> (shape key, mode)
        if method in FT_METHODS:
            self.ft_options = self._ft_options(editor_kwargs)
            if "locality_texts" in self.editor_kwargs:  # as listed (a generator is read once), for save
                self.editor_kwargs["locality_texts"] = self.ft_options["locality_texts"]
        else:
            self._build_editors(editor_kwargs)

    def __repr__(self) -> str:
        editors = ", ".join(f"{key}: {type(e).__name__}({e.extra_repr()})" for key, e in self.editors.items())
        if not editors:  # the baselines: their options, locality_texts as a count (it may hold hundreds)
            texts = self.ft_options["locality_texts"]
            shown = dict(self.ft_options, locality_texts=texts if texts is None else f"<{len(texts)} texts>")
        extra = f", editors={{{editors}}}" if editors else f", ft_options={shown}"
        return (f"ModelEditor(method={self.method!r}, layers={self.layers}, tokens={self.tokens!r}, "
                f"loss_reduction={self.loss_reduction!r}, model={type(self.model).__name__}{extra})")

    def __deepcopy__(self, memo) -> "ModelEditor":
        """A copy of the editor with a copy of its model (and of its live edits, undone in order
        as the original's): the copied model's live-edit list is registered for it, so another
        ModelEditor of that model shares it (without this, an edit of the copy could be undone
        out of order and leave the weights changed)."""
        import copy

        new = type(self).__new__(type(self))
        memo[id(self)] = new
        new.__dict__.update(copy.deepcopy(self.__dict__, memo))
        new._live = LIVE_EDITS.setdefault(weights_owner(new.model), new._live)
        for handle in new._live:  # the copies' saved weights go with the copied model
            if handle.active and not handle.kept:
                handle._watch(weights_owner(new.model))
        return new

    @property
    def capture_batch_size(self) -> int | None:
        """Rows per forward + backward of the capture and of the FT baselines (None: all at once)."""
        return self._capture_batch_size

    @capture_batch_size.setter
    def capture_batch_size(self, value: int | None) -> None:
        if value is not None and (not is_int(value) or value < 1):
            raise ValueError(f"capture_batch_size must be a positive int or None, got {value!r}")
        self._capture_batch_size = value

    @property
    def rescale_batch_size(self) -> int | None:
        """Opt-in (None, the default: off).  The batch size (edits) the editors were trained on:
        an apply of N edits then runs them on η × N/rescale_batch_size and steps with α ×
        rescale_batch_size/N.  Under loss_reduction="token" every η carries a 1/(target tokens of
        the batch) factor, so above the training batch size the editors' frozen normalisation sees
        η far below its training scale and η̃ = (η − mean)/std is mostly the running mean's offset,
        the same for every token: the shift turns into one edit-independent direction (SmolLM2,
        zsRE, MEND trained on 25-edit batches, 125 edits: DD 0.96, ES 0.12).  Rescaled, each token's
        η̃ is at its training scale and the shift is the mean, not the sum, of N/rescale_batch_size
        training-size shifts (there: DD 0.42, ES 0.31; RESULTS.md).  At N =
        rescale_batch_size nothing changes.  Applies to `apply` and `edits_as_applied` (hence
        `evaluate.edit_statistics`), not to training; a runtime setting, not saved."""
        return self._rescale_batch_size

    @rescale_batch_size.setter
    def rescale_batch_size(self, value: int | None) -> None:
        if value is not None and (not is_int(value) or value < 1):
            raise ValueError(f"rescale_batch_size must be a positive int or None, got {value!r}")
        if value is not None and (self.method in FT_METHODS or self.loss_reduction != "token"):
            raise ValueError("rescale_batch_size is for the editor methods under loss_reduction='token', "
                             f"got method={self.method!r}, loss_reduction={self.loss_reduction!r}")
        self._rescale_batch_size = value

    # -- construction --------------------------------------------------------------------------
    def _check_resident(self) -> None:
        """ValueError naming an edited layer whose weight is not resident (accelerate's "meta")."""
        check_resident({name: weight_out_in(m) for name, m in self.modules.items()})

    @staticmethod
    def shape_of(module: nn.Module) -> tuple[int, int]:
        """(in_features, out_features) of an editable module (Conv1D stores in×out)."""
        out_features, in_features = weight_out_in(module).shape
        return in_features, out_features

    def _build_editors(self, kwargs: dict) -> None:
        if "n_modes" in kwargs:
            raise ValueError("n_modes is set by ModelEditor (the number of layers sharing a shape)")
        preset = EDITOR_METHODS[self.method]
        if "n_editors" in kwargs and self.method not in ("raeditor", "moeditor"):
            raise ValueError(f"n_editors is for methods 'raeditor' and 'moeditor' only; {self.method!r} has one editor")
        if self.method == "moeditor":
            # The gate reads edit features of the head input's width (see `hidden_size`).
            feat_dim = kwargs.get("feat_dim")
            if feat_dim is not None and feat_dim != self.hidden_size():
                raise ValueError(f"feat_dim must be the width of the model's last hidden state "
                                 f"({self.hidden_size()}) or None, got {feat_dim!r}")
            kwargs = {**kwargs, "feat_dim": self.hidden_size()}
        by_shape: dict[tuple[int, int], list[str]] = {}
        for name, module in self.modules.items():
            by_shape.setdefault(self.shape_of(module), []).append(name)
        for (i, o), names in by_shape.items():
            key = f"{i}x{o}"
            try:
                editor = preset(i, o, n_modes=len(names), **kwargs)
            except TypeError as exc:  # an argument the preset does not take
                raise ValueError(f"bad editor argument for method {self.method!r}: {exc}") from None
            layer_devices = (weight_out_in(self.modules[name]).device for name in names)
            self.editors[key] = editor.to(place_editor(layer_devices, self.editor_device))
            for mode, name in enumerate(names):
                self.slots[name] = (key, mode)

    def hidden_size(self) -> int:
        """The width of MoEditor's edit features: a causal LM's head input width where its head is
        an nn.Linear (`head_input.head_width`), else the model's hidden width (its config's
        hidden_size, d_model or n_embd, else the input embedding's width)."""
        width = None if self.seq2seq else head_width(self.model)
        if width is not None:
            return width
        config = getattr(self.model, "config", None)
        for attr in ("hidden_size", "d_model", "n_embd"):
            value = getattr(config, attr, None)
            if isinstance(value, int):
                return value
        return int(self.model.get_input_embeddings().embedding_dim)

    @property
    def device(self) -> torch.device:
        """Where edit batches go: the device of the model's input embedding (of its first parameter
        for a model without one); with the whole model on one device, that device."""
        return input_device(self.model)

    @property
    def devices(self) -> list[torch.device]:
        """Every device the model's parameters or the editors live on (peak memory, RNG state)."""
        found = dict.fromkeys(model_devices(self.model))
        found.update(dict.fromkeys(p.device for p in self.editors.parameters()))
        return list(found)

    def parameters(self):
        """The editors' trainable parameters (empty for the baselines)."""
        return self.editors.parameters()

    def train(self, mode: bool = True) -> "ModelEditor":
        """The editors' train mode (running-norm updates, MoEditor's gate noise), as nn.Module.train;
        `apply` runs them in eval mode whatever this says."""
        self.editors.train(mode)
        return self

    def eval(self) -> "ModelEditor":
        """`train(False)`."""
        return self.train(False)

    # -- tokenization and capture ----------------------------------------------------------------
    def tokenize(self, prompts: Sequence[str], targets: Sequence[str], name: str = "requests") -> dict:
        """Edit batch (labels on the target tokens); ValueError naming the request on an empty target."""
        fn = tokenize_seq2seq if self.seq2seq else tokenize_causal
        try:
            return fn(self.tokenizer, list(prompts), list(targets), device=self.device)
        except ValueError as exc:
            raise ValueError(f"{name} could not be tokenized ({exc}); the model was not changed") from None

    @contextlib.contextmanager
    def _length_errors(self, batch: dict, name: str):
        """An IndexError inside the block, when `batch` has a row past the model's positions,
        becomes a ValueError naming that row (`positions.past_positions`)."""
        try:
            yield
        except IndexError as exc:
            past = past_positions(self.model, batch, causal=not self.seq2seq)
            if past is None:
                raise
            i, length, what, limit = past
            what = f" ({what})" if name == "requests" else ""
            raise ValueError(f"{name}[{i}] is {length} tokens{what}, more than the model's "
                             f"{limit} positions; the model was not changed") from exc

    def capture(self, batch: dict, need_feats: bool | None = None):
        """({layer: Factors}, edit features (E, hidden) or None, loss): one forward + backward per
        `capture_batch_size` rows, their factors and features concatenated in row order.

        η is the gradient of the edit loss of `loss_reduction` ("edit": Σ_e of edit e's mean target
        NLL; "token": the batch's mean target NLL, each chunk's rows divided by the whole batch's
        number of target tokens, so chunking changes η by rounding only; the backward runs at the
        per-token sum's scale and η is divided back, exactly, which keeps fp16 gradients from
        flushing to zero (`losses.backward_scale`): an fp16 layer's η comes back in fp32).
        Gradients are taken with `torch.autograd.grad` against the edited modules' outputs only:
        no parameter's `.grad` changes and the weights need not require grad.  The pass runs with
        every parameter's requires_grad off (restored exactly afterwards, also on an exception), so
        the forward records only the graph the backward to the edited layers needs, whatever flags
        the caller's model has; the LM head computes logits at the scored positions only
        (`scored_logits.logits_at`).
        """
        if need_feats is None:
            need_feats = self.needs_feats
        chunks, order = self._capture_chunks(batch)
        if len(chunks) == 1:
            return self._capture_rows(batch, need_feats, None)
        n_scored = self._n_scored(batch)
        if order is not None:  # a causal LM's sorted chunks: their token counts are known beforehand
            joined = self._capture_into(chunks, order, self._kept_per_row(batch), need_feats, n_scored)
            if joined is not None:
                return joined
        parts = [self._capture_rows(chunk, need_feats, n_scored) for chunk in chunks]
        # One layer at a time, each chunk's copy dropped once joined (and the joined copy once put
        # back in row order): the peak holds the factors plus one layer's joined copy, not two
        # copies of everything.
        back = None if order is None else torch.argsort(order)
        factors = {}
        for name in self.layers:
            joined = Factors.cat([p[0].pop(name) for p in parts])
            factors[name] = joined if back is None else joined.take_edits(back)
            del joined
        feats = torch.cat([p[1] for p in parts]) if need_feats else None
        if feats is not None and back is not None:
            feats = feats[back.to(feats.device)]
        return factors, feats, sum(p[2] for p in parts)

    def _kept_per_row(self, batch: dict) -> torch.Tensor:
        """(rows,) int64 on the CPU: how many tokens the capture keeps of each row of a batch that
        `_capture_chunks` sorted (a causal LM's, with a 2-D attention mask and labels of its shape),
        as `FactorCapture._keep_mask` chooses them: the scored positions, and with tokens="all" also
        the unmasked ones."""
        mask, labels = batch["attention_mask"], batch["labels"]
        keep = scored_positions(labels, causal=True)  # position t predicts label t+1
        if self.tokens != "target":
            keep = keep | (mask.to(keep.device) != 0)
        return keep.sum(1).cpu()

    def _capture_into(self, chunks: list[dict], order: torch.Tensor, kept: torch.Tensor,
                      need_feats: bool, n_scored: int):
        """`capture` of several chunks whose token counts are known before they run (`kept`):
        each chunk's factors are copied, as soon as it has run, to their rows in one (T, ·) buffer
        per factor of each layer (allocated at the first chunk), in the batch's row order, and
        dropped.  The same values as joining the chunks' factors afterwards (`Factors.cat`, then
        `take_edits`), without their two joined copies of a layer, and without keeping every
        chunk's small factor tensors on the heap between the chunks' activations, which glibc
        then could not give back (SmolLM2, 3 down_proj layers, CounterFact edits in chunks of 32,
        the capture's peak RSS over the model's: 400 edits 261-270 -> 176-186 MiB for 92 MiB of
        factors, 1,000 edits 605 -> 332 MiB for 228 MiB).  None when a
        chunk keeps other counts than `kept` says, or its factors do not fit one buffer: the caller
        then runs every chunk again and joins their factors afterwards (not seen on the 13
        architectures of tests/test_architectures.py, which all take this path)."""
        rows = kept.numel()
        step = self.capture_batch_size or rows
        row_of = order.cpu()  # the batch row of each chunk row
        starts = torch.zeros(rows + 1, dtype=torch.int64)
        starts[1:] = kept.cumsum(0)
        total = int(starts[-1])
        buffers: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        feats, loss = [], 0
        for k, chunk in enumerate(chunks):
            index = row_of[k * step:(k + 1) * step]
            factors, chunk_feats, chunk_loss = self._capture_rows(chunk, need_feats, n_scored)
            for name in self.layers:
                f = factors.pop(name)
                counts = (f.edit_offsets[1:] - f.edit_offsets[:-1]).long().cpu()
                if not torch.equal(counts, kept[index]):
                    return None
                if name not in buffers:
                    buffers[name] = (f.mu.new_empty((total, f.mu.shape[1])), f.eta.new_empty((total, f.eta.shape[1])))
                mu, eta = buffers[name]
                if any(a.dtype != b.dtype or a.device != b.device or a.shape[1:] != b.shape[1:]
                       for a, b in ((mu, f.mu), (eta, f.eta))):
                    return None
                # Row j of edit e goes to starts[e] + j.
                dest = torch.repeat_interleave(starts[index] - f.edit_offsets[:-1].long().cpu(), counts,
                                               output_size=f.num_tokens) + torch.arange(f.num_tokens)
                dest = dest.to(mu.device)
                mu.index_copy_(0, dest, f.mu)
                eta.index_copy_(0, dest, f.eta)
                del f
            del factors
            feats.append(chunk_feats)
            loss = loss + chunk_loss
        offsets = starts.to(torch.int32)
        out = {name: Factors(mu, eta, offsets.to(mu.device)) for name, (mu, eta) in buffers.items()}
        joined_feats = None
        if need_feats:
            joined_feats = torch.cat(feats)
            joined_feats = joined_feats[torch.argsort(order).to(joined_feats.device)]
        return out, joined_feats, loss

    def _capture_chunks(self, batch: dict) -> tuple[list[dict], torch.Tensor | None]:
        """(chunks, order): for a causal LM cut into more than one chunk, the rows sorted by length
        (`order`: the batch's row of each sorted row) and each chunk trimmed of the trailing columns
        that are padding in all its rows, so a chunk of short rows runs on short rows only; else
        `_row_chunks` (order None).  A real token attends to the positions before it only, so the
        trimmed columns change no kept token's output (rounding aside: the matmuls see other
        shapes).  Measured on SmolLM2 (fp32, CPU, layers 27-29, 125 CounterFact edits in chunks of 32): the
        chunks held 1,875 token slots for 1,159 real tokens in row order, 1,299 sorted (-31 %); the capture
        is ~95 % of apply, and apply took 2.3-2.5 s instead of 2.7-3.2 s (MoEditor, the three least
        contended of 7 alternating pairs), the same shifts."""
        chunks = self._row_chunks(batch)
        mask, labels = batch.get("attention_mask"), batch.get("labels")
        if (len(chunks) == 1 or self.seq2seq or mask is None or labels is None or mask.dim() != 2
                or labels.shape != mask.shape):
            return chunks, None
        rows, width = mask.shape
        used = (mask != 0) | (labels != IGNORE_INDEX)
        # The length of a row: up to its last real (or labelled) column, whatever side it is padded on.
        last = torch.where(used, torch.arange(1, width + 1, device=used.device), 0).amax(1)
        order = torch.argsort(last, stable=True)
        step = self.capture_batch_size or rows
        out = []
        for lo in range(0, rows, step):
            index = order[lo:lo + step]
            keep = max(int(last[index].max()), 1)
            out.append({k: (v[index.to(v.device)][:, :keep]
                            if v.dim() >= 2 and tuple(v.shape[:2]) == (rows, width)
                            else v[index.to(v.device)])
                        for k, v in batch.items()})
        return out, order

    def _n_scored(self, batch: dict) -> int:
        """The batch's number of target tokens (the "token" reduction's N over all its chunks)."""
        return int(scored_positions(batch["labels"], not self.seq2seq).sum())

    def _row_chunks(self, batch: dict) -> list[dict]:
        """`batch` cut into consecutive chunks of at most `capture_batch_size` rows (every entry of
        the batch is per row); [batch] itself when it fits."""
        rows = batch["input_ids"].shape[0]
        step = self.capture_batch_size or rows
        if rows <= step:
            return [batch]
        return [{k: v[lo:lo + step] for k, v in batch.items()} for lo in range(0, rows, step)]

    def _scored_edit_loss(self, batch: dict, reduction: str, n_scored: int | None, need_feats: bool = False):
        """(the edit loss of one forward over `batch` (see `edit_loss`), each edit's features (see
        `_edit_features`) when `need_feats`, else None), the LM head computing logits at the scored
        positions only."""
        causal = not self.seq2seq
        inputs = self.model_inputs(batch)
        gather = "labels" not in inputs  # with labels the model computes its own loss from the full logits
        positions = scored_positions(batch["labels"], causal)
        # The hidden states only where no head input can be recorded (see head_input.py).
        fallback = need_feats and causal and called_head(self.model) is None
        hidden_states = {"output_hidden_states": True} if fallback else {}
        with head_input(self.model, positions.shape, enabled=need_feats and causal) as hidden, \
                logits_at(self.model, positions, skip=self.modules.values(), enabled=gather) as scored:
            # No KV cache for a causal LM: RWKV writes its state in place, which broke the backward of
            # an edit below its last block.
            out = self.model(**inputs, **hidden_states, **no_kv_cache(self.model))
        feats = self._edit_features(out, hidden.value, batch) if need_feats else None
        return edit_loss(scored.pick(out.logits), batch["labels"], causal, reduction, n_scored), feats

    def _capture_rows(self, batch: dict, need_feats: bool, n_scored: int | None, scale: float | None = None):
        if scale is None:  # "token": the batch mean, backpropagated at the per-token sum's scale
            scale = 1.0 if self.loss_reduction != "token" else backward_scale(
                n_scored if n_scored is not None else self._n_scored(batch))
        capture = capture_factors(self.model, self.layers, tokens=self.tokens, batch=batch)
        with torch.enable_grad(), frozen_parameters(self.model), capture as cap:
            loss, feats = self._scored_edit_loss(batch, self.loss_reduction, n_scored, need_feats=need_feats)
            if not bool(torch.isfinite(loss)):
                raise FloatingPointError(f"the edit loss is not finite ({float(loss.detach())}); the model was not changed")
            torch.autograd.grad(loss * scale, cap.outputs, allow_unused=True)
            factors = cap.factors
        for name, f in factors.items():
            # η divided back, exactly (see losses.backward_scale); an fp16 layer's in fp32.
            factors[name] = f = Factors(f.mu, unscale(f.eta, scale), f.edit_offsets)
            if not (bool(torch.isfinite(f.mu).all()) and bool(torch.isfinite(f.eta).all())):
                if scale != 1:  # the scaled backward overflowed (fp16): these rows again, unscaled
                    del factors, feats, capture, cap
                    return self._capture_rows(batch, need_feats, n_scored, scale=1.0)
                raise FloatingPointError(f"non-finite gradient for layer {name!r}; the model was not changed")
        return factors, feats, loss.detach()

    def model_inputs(self, batch: dict) -> dict:
        """What the forward needs, without labels: the loss is computed here, on the scored
        positions only, instead of HF's full-vocabulary loss over every position.  An
        encoder-decoder gets the decoder inputs its forward would build from the labels
        (`prepare_decoder_input_ids_from_labels`, BART's and T5's shift right); a model without
        that method keeps its labels."""
        return forward_inputs(self.model, batch)

    def route_generators(self) -> dict:
        """{editor key: its routing generator} for the editors that have one (RaEditor's random
        groups, seeded per editor): training checkpoints their states, the report restarts them."""
        return {key: e.route_generator for key, e in self.editors.items() if e.route_generator is not None}

    @property
    def needs_feats(self) -> bool:
        """Whether an editor routes by a gate (MoEditor), so that the capture also computes each
        edit's features (the mean last hidden state over its prompt)."""
        return any(getattr(e, "routing", None) == "gate" for e in self.editors.values())

    def _edit_features(self, out, head_in: torch.Tensor | None, batch: dict) -> torch.Tensor:
        """Mean of the last hidden state over each edit's prompt tokens (fp32, no grad): the
        encoder's for an encoder-decoder, else the input of the LM head (`head_input`: the normed
        last hidden state, which the logits are read from)."""
        if self.seq2seq:
            hidden, mask = out.encoder_last_hidden_state, batch["attention_mask"].bool()
        else:
            if head_in is None and getattr(out, "hidden_states", None) is not None:
                head_in = out.hidden_states[-1]  # a head that is not one called module
            if head_in is None or head_in.dim() != 3 or tuple(head_in.shape[:2]) != tuple(batch["labels"].shape):
                raise ValueError("MoEditor's gate reads each edit's features from the input of the model's LM "
                                 "head, and this model's get_output_embeddings() was not called on (batch, "
                                 f"length, hidden) states; {type(self.model).__name__} cannot use a gate")
            hidden = head_in
            mask = batch["attention_mask"].bool() & (batch["labels"] == IGNORE_INDEX)
        hidden, mask = hidden.detach().float(), mask.to(hidden.device).unsqueeze(-1).float()
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)

    def run_editors(self, factors: dict, feats: torch.Tensor | None, consume: bool = False,
                    eta_scale: float = 1.0) -> dict:
        """{layer: GroupedEdit}, in whatever grad / train mode the caller set.  consume=True takes
        each layer's factors out of `factors` (and drops them) once its editor has run, so that
        layers already edited do not keep their factors while the next one's editor runs.
        eta_scale: the editors read η × eta_scale (a copy, one layer at a time; `factors` unchanged)."""
        edits = {}
        for name in self.layers:
            key, mode = self.slots[name]
            editor = self.editors[key]
            f = factors.pop(name) if consume else factors[name]
            dev = next(editor.parameters()).device
            eta = f.eta.to(dev)
            if eta_scale != 1:
                eta = eta * eta_scale
            edits[name] = editor(f.mu.to(dev), eta, f.edit_offsets.to(dev), mode=mode,
                                 edit_feats=None if feats is None else feats.to(dev))
            del eta
        return edits

    def edits_as_applied(self, factors: dict, feats: torch.Tensor | None, consume: bool = False) -> dict:
        """{layer: GroupedEdit} as `apply` makes them: the editors in eval mode (frozen
        normalisation statistics, no gate noise), no grad; their train/eval mode comes back.
        consume: as `run_editors`'.  With `rescale_batch_size` set, the editors read η ×
        N/rescale_batch_size and each edit's alpha is divided by that factor (N: the edits in
        `factors`)."""
        scale = 1.0
        if self.rescale_batch_size is not None and factors:
            scale = next(iter(factors.values())).num_edits / self.rescale_batch_size
        with modes_restored(self.editors), torch.no_grad():  # the container's flag too (fit reads it)
            self.editors.eval()
            edits = self.run_editors(factors, feats, consume=consume, eta_scale=scale)
        if scale != 1:
            for edit in edits.values():
                edit.alpha = edit.alpha / scale
        return edits

    # -- apply / undo ----------------------------------------------------------------------------
    def editors_at_initialisation(self) -> bool:
        """Whether every editor is as constructed: all u of the low-rank layers still 0 (MEND's
        identity init; any training step or a trained checkpoint makes them non-zero)."""
        return all(not bool(layer.u.detach().any()) for e in self.editors.values() for layer in e.layers)

    def apply(self, requests: Iterable[EditRequest]) -> EditHandle:
        """Edit the model in place with every request at once; returns the EditHandle that undoes
        it (`handle.undo()`, bit for bit) and holds the edit's `stats`.

        ValueError for bad requests (naming the request: an empty target, a non-EditRequest, a row
        past a learned position table); RuntimeError under torch.inference_mode.  Warns once per
        ModelEditor while its editors are untrained, and once when most of a 16-bit (bf16/fp16)
        weight's shift is lost to rounding: W + αΔ is stored in the weight's dtype, so shift entries
        below half its resolution vanish (`stats["changed_fraction"]`: each layer's share of
        changed entries).  Whatever fails or interrupts the edit, the
        model is left as it was (see the module docstring).  The model runs in the mode it is in:
        in train mode its dropout is on in the capture and the fine-tuning (`load_model` and
        `from_pretrained` return models in eval mode)."""
        requests = validate_requests(requests)
        if torch.is_inference_mode_enabled():
            raise RuntimeError("ModelEditor.apply needs autograd for its capture (or fine-tuning): "
                               "call it outside torch.inference_mode()")
        # Offloaded since the constructor checked (accelerate's cpu_offload/disk_offload of the model
        # after the ModelEditor was built): the shift went to a "meta" tensor and failed with
        # NotImplementedError, and FT said the layer got no gradient.
        self._check_resident()
        devices = self.devices
        _peak_memory_start(devices)
        start = time.perf_counter()
        if self.method not in FT_METHODS and not self._warned_initial and self.editors_at_initialisation():
            self._warned_initial = True  # once per ModelEditor: evaluate_method applies hundreds of times
            warnings.warn(f"ModelEditor.apply: the {self.method!r} editors are at their initialisation (never "
                          "trained or loaded): an initial editor takes about one gradient step of size edit_lr (1e-4 "
                          "by default; MoEditor's initial top-2 gate halves it), "
                          "which rarely changes a prediction. Train them (fit) or load a checkpoint "
                          "(ModelEditor.load).", UserWarning, stacklevel=2)
        batch = self.tokenize([r.prompt for r in requests], [r.target for r in requests])
        # The handle is live before the first write and its saved list fills as weights change, so
        # no exception (an interrupt included) can leave a changed weight without a way back.
        saved: list[tuple[torch.Tensor, torch.Tensor]] = []
        handle = EditHandle(self._live, saved, {}, model=weights_owner(self.model))
        try:
            self._live.append(handle)
            with self._length_errors(batch, "requests"):
                if self.method in FT_METHODS:
                    stats = self._apply_ft(requests, batch, saved)
                else:
                    stats = self._apply_editors(batch, saved)
            stats.update(latency_s=time.perf_counter() - start, n_edits=len(requests),
                         peak_memory_bytes=_peak_memory(devices))
            handle.stats = stats
        except BaseException:
            restore(saved)  # the methods restore (and say so) themselves: this covers the rest
            handle._discard()
            raise
        return handle

    @contextlib.contextmanager
    def edited(self, requests: Iterable[EditRequest]):
        """`with editor.edited(requests) as handle:` the model is edited inside the block only:
        on exit, edits applied inside the block that are still live are undone too (latest
        first), then this one.  `handle.keep()` inside the block keeps this edit; keeping a later
        one makes this one permanent too, and exit then raises RuntimeError saying so.  An
        exception leaving the block is never replaced by one from the undo (it gets a note)."""
        outer = list(self._live)  # the model's live edits from before the block: not undone on exit
        handle = self.apply(requests)
        try:
            yield handle
        except BaseException as exc:
            try:
                self._leave_edited(handle, outer)
            except RuntimeError as undo_exc:
                add_note(exc, f"dcedit: on leaving edited(): {undo_exc}")
            raise
        self._leave_edited(handle, outer)

    def _leave_edited(self, handle: EditHandle, outer: list) -> None:
        """Undo the block's later live edits, latest first, down to a kept one (or one from before
        the block: the block's own edit may have been undone inside it); then the block's own edit
        unless it was kept, or raise when a later kept edit pins it."""
        live = self._live
        while (live and live[-1] is not handle and not live[-1].kept
               and not any(live[-1] is h for h in outer)):
            live[-1].undo()
        if not handle.active or handle.kept:
            return
        if live and live[-1] is not handle:
            raise RuntimeError("an edit applied inside this edited() block was kept (handle.keep()), which "
                               "made the block's own edit permanent: it was not undone (the block's live edits "
                               "after the kept one were)")
        handle.undo()

    def _apply_editors(self, batch: dict, saved: list):
        t0 = time.perf_counter()
        factors, feats, _ = self.capture(batch)
        t1 = time.perf_counter()
        n_tokens = sum(f.num_tokens for f in factors.values())
        # Each layer's factors dropped once its editor has run: the editors' peak holds one layer's
        # factors beside the edits, not every layer's (SmolLM2, 3 down_proj layers, 1,000 CounterFact
        # edits, untrained editors: that phase's peak RSS 291 -> 216 MiB for MEND, with the one
        # permuted copy fewer of GroupedEditor.forward).
        edits = self.edits_as_applied(factors, feats, consume=True)
        del factors
        for name, edit in edits.items():
            if not all(bool(torch.isfinite(t).all()) for t in (edit.mu_t, edit.eta_t, edit.alpha)):
                raise FloatingPointError(
                    f"the editor's shift for layer {name!r} is not finite; the model was not changed")
        t2 = time.perf_counter()
        changed = {}
        try:
            for name in self.layers:
                weight = weight_out_in(self.modules[name])
                param = self.modules[name].weight
                with deferred_interrupt():
                    try:  # a non-finite shift or sum raises with this weight as it was
                        previous = edits[name].apply_(weight)
                    except FloatingPointError as exc:
                        raise FloatingPointError(f"layer {name!r}: {exc}") from exc
                    # Undo writes into the Parameter itself, not into the out×in view of a Conv1D
                    # weight: `model.to(dtype or device)` after the edit swaps the Parameter's data,
                    # and a view of the old data would take the restore while the model kept the edit.
                    saved.append((param, previous if weight is param else previous.t()))
                changed[name] = float((weight != previous).sum()) / max(weight.numel(), 1)
        except BaseException as exc:
            restore(saved)
            add_note(exc, f"dcedit: the edit failed after changing {len(saved)} of {len(self.layers)} weights; "
                          "all of them were restored bit for bit")
            raise
        self._warn_rounded_away(edits, changed)
        return dict(capture_s=t1 - t0, editor_s=t2 - t1, apply_s=time.perf_counter() - t2,
                    n_tokens=n_tokens, changed_fraction=changed)

    def _warn_rounded_away(self, edits: dict, changed: dict) -> None:
        """Warn, once per ModelEditor, when a 16-bit weight changed in less than half of the entries
        its shift covers (the first apply that does; evaluate_method applies hundreds of times).
        `apply_shift_` adds in fp32 but stores W + αΔ in the weight's dtype, so a shift entry below
        half the weight's resolution there rounds away (bf16: |W|·2⁻⁹ to |W|·2⁻⁸, 4.9e-4 at |W| =
        0.125; fp16: |W|·2⁻¹² to |W|·2⁻¹¹).  SmolLM2's down_proj layers 27-29 in bf16 (|W| median
        0.13): an untrained MEND (edit_lr 1e-4, 2 edits) changed 0.04-0.1 % of their entries, a
        trained one (8 CounterFact edits) 97, 92 and 32 %.  The shift covers the rows of η̃ and the
        columns of μ̃ that are not all zero (times the keep share of a Fisher-masked edit)."""
        if self._warned_rounding:
            return
        lost = []
        for name, fraction in changed.items():
            weight = weight_out_in(self.modules[name])
            if weight.dtype not in HALF_DTYPES:
                continue
            edit = edits[name]
            rows = int((edit.eta_t != 0).any(0).sum())
            cols = int((edit.mu_t != 0).any(0).sum())
            covered = rows * cols / max(weight.numel(), 1)
            if edit.fisher is not None and edit.fisher_keep is not None:
                covered *= edit.fisher_keep
            if fraction < 0.5 * covered:
                lost.append(f"{name!r} ({str(weight.dtype).replace('torch.', '')}: {100 * fraction:.3g}% of its "
                            f"entries changed, of the {100 * covered:.3g}% its shift covers)")
        if lost:
            self._warned_rounding = True  # once per ModelEditor, as the warning about untrained editors
            warnings.warn("ModelEditor.apply: most entries of the shift of " + ", ".join(lost) + " were lost to "
                          "rounding: they are below half the resolution of the 16-bit weight, which stores W + αΔ "
                          "rounded (handle.stats['changed_fraction'] has each layer's share of changed entries). "
                          "Edit a float32 copy of the model for the whole shift.", UserWarning, stacklevel=4)

    # -- training --------------------------------------------------------------------------------
    def fit(self, train_requests, val_requests=None, config=None, **overrides):
        """Train the editors (see `dcedit_kernels.train.train_editor`); returns its TrainResult."""
        from .train import TrainConfig, train_editor

        if self.method in FT_METHODS:
            raise ValueError(f"method {self.method!r} has no editor to train")
        if config is None:
            config = TrainConfig().replace(**overrides)  # ValueError naming an unknown field
        elif overrides:
            config = config.replace(**overrides)
        return train_editor(self, train_requests, val_requests, config)

    # -- checkpoints -----------------------------------------------------------------------------
    def config(self) -> dict:
        """What a checkpoint records to rebuild this ModelEditor (JSON: method, layers, tokens,
        loss_reduction, allow_tied, the editor arguments and each editor's config)."""
        return dict(format=CHECKPOINT_FORMAT, method=self.method, layers=self.layers, tokens=self.tokens,
                    loss_reduction=self.loss_reduction, allow_tied=self.allow_tied,
                    editor_kwargs=self.editor_kwargs,
                    editors={key: editor.config for key, editor in self.editors.items()})

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Every editor's parameters and buffers, detached CPU copies keyed "editors.<shape>.<name>"
        (what a checkpoint holds; empty for the baselines)."""
        # Copies also on the CPU (.contiguous().cpu() returned the editor's own tensors there, so
        # that a state kept aside changed with the editor and loading it back restored nothing).
        return {f"editors.{key}.{k}": v.detach().to("cpu", copy=True).contiguous()
                for key, editor in self.editors.items() for k, v in editor.state_dict().items()}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Load what `state_tensors` gave (ValueError naming a missing or unexpected key)."""
        # Every editor checked before any is loaded (the keys of state_tensors, without its copies).
        expected = {f"editors.{key}.{k}": v for key, editor in self.editors.items()
                    for k, v in editor.state_dict().items()}
        check_state(tensors, expected, "editor checkpoint does not match", lambda k: f"editor checkpoint key {k}")
        for key, editor in self.editors.items():
            prefix = f"editors.{key}."
            state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
            editor.load_saved_state(state)  # in the saved editor's dtype, on its own device

    def save(self, path) -> None:
        """Editors' state to safetensors, with the ModelEditor config as JSON metadata (no pickle)."""
        try:
            meta = json.dumps(self.config())
        except TypeError as exc:
            raise ValueError(f"editor_kwargs must be JSON-serializable to save: {exc}") from None
        save_safetensors(self.state_tensors(), path, metadata={CHECKPOINT_KEY: meta})

    @classmethod
    def load(cls, path, model: nn.Module, tokenizer, editor_device=None,
             capture_batch_size: int | None = DEFAULT_CAPTURE_BATCH_SIZE,
             rescale_batch_size: int | None = None) -> "ModelEditor":
        """A ModelEditor for `model` from what `save` wrote; its editors are placed as the
        constructor places them (`editor_device`; the checkpoint records no device), and
        `capture_batch_size` and `rescale_batch_size` are the constructor's (runtime settings,
        not saved).

        A checkpoint from before `loss_reduction` existed (format 1) loads with "token": its
        editors were trained on factors of the batch-mean loss, and feeding them per-edit factors
        would change the scale their statistics and steps α were learned at.
        """
        from safetensors import SafetensorError, safe_open
        from safetensors.torch import load_file

        if not Path(path).is_file():
            raise FileNotFoundError(f"checkpoint not found: {path}")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta, keys = f.metadata() or {}, list(f.keys())
        except SafetensorError as exc:
            from .compat.mend import _CONVERT_HINT, _PICKLE_SUFFIXES

            what = ("its suffix says torch.save (pickle), which this package never unpickles"
                    if str(path).lower().endswith(_PICKLE_SUFFIXES) else "if it was written by torch.save")
            raise ValueError(f"path: {path} is not a safetensors file ({exc}); {what}: for an original MEND "
                             f"checkpoint, {_CONVERT_HINT}, then ModelEditor.from_mend(model, tokenizer, "
                             f"'mend.safetensors', inner_params)") from None
        if CHECKPOINT_KEY not in meta:
            mend = any(k == "edit_lrs" or k.endswith(".edit_lrs") for k in keys)  # MEND's per-weight steps
            hint = "; it looks like an original MEND checkpoint: use ModelEditor.from_mend" if mend else ""
            raise ValueError(f"{path} is not a ModelEditor checkpoint (no {CHECKPOINT_KEY} metadata){hint}")
        config = _checkpoint_config(path, meta[CHECKPOINT_KEY])
        # Editor arguments newer than the checkpoint (gate_norm) take the value it was trained with.
        config["editors"] = {key: with_absent_defaults(saved) for key, saved in config["editors"].items()}
        kwargs = dict(config["editor_kwargs"])
        if config["method"] == "ft":  # accepted and ignored before 0.3.1, refused since
            kwargs = {k: v for k, v in kwargs.items() if k not in FT_KL_ONLY}
        # Editor arguments whose preset default changed since (MoEditor's top_k: 1 before 0.2.0)
        # come from the saved editors, so an older checkpoint rebuilds the editor it was trained as.
        for name in _CHANGED_DEFAULTS.get(config["method"], ()):
            saved = {e.get(name) for e in config["editors"].values()}
            if name not in kwargs and len(saved) == 1 and None not in saved:
                kwargs[name] = saved.pop()
        # The initial weights of unseeded editors, all overwritten below, drawn from a fork of
        # torch's generator: loading left the caller's random stream advanced.
        with torch.random.fork_rng(devices=[]):
            editor = cls(model, tokenizer, config["layers"], method=config["method"], tokens=config["tokens"],
                         loss_reduction=config.get("loss_reduction", LEGACY_LOSS_REDUCTION),
                         allow_tied=config.get("allow_tied", False), editor_device=editor_device,
                         capture_batch_size=capture_batch_size, rescale_batch_size=rescale_batch_size, **kwargs)
        saved_shapes = {key: saved.get("n_modes") for key, saved in config["editors"].items()}
        if saved_shapes != {key: e.config.get("n_modes") for key, e in editor.editors.items()}:
            # Shapes (in x out) and how many layers share each: one layer of another shape changes both.
            held = ", ".join(f"{key} for {n} layer(s)" for key, n in saved_shapes.items())
            here = ", ".join(f"{name} {editor.slots[name][0]}" for name in editor.layers)
            raise ValueError(f"{path}: it holds editors of {held} (in x out weights), but in this model its "
                             f"layers are {here}: a checkpoint of another model")
        for key, saved in config["editors"].items():
            now = editor.editors[key].config
            if now != saved:
                raise ValueError(f"{path}: editor {key} differs from the one this model gives "
                                 f"({config_differences(saved, now)})")
        # Read on the CPU: load_state_dict then copies each tensor once into its editor's device.
        editor.load_state_tensors(load_file(str(path)))
        return editor

    @classmethod
    def from_mend(cls, model: nn.Module, tokenizer, state_dict, inner_params: Sequence[str], prefix: str = "mend.",
                  norm: bool | None = None, edit_lrs_key: str | None = None, editor_device=None,
                  capture_batch_size: int | None = DEFAULT_CAPTURE_BATCH_SIZE) -> "ModelEditor":
        """A "mend" ModelEditor holding the editors of an original MEND checkpoint (Mitchell et
        al.'s code, or EasyEdit's MEND): `apply` then edits each inner parameter as MEND's
        `edit()` does, W ← W + edit_lr · shift, from factors of MEND's loss
        (`compat.mend.LOSS_REDUCTION`, the batch-mean NLL).

        state_dict, prefix, norm, edit_lrs_key: as `compat.mend.load` takes them (a dict of
        tensors, MEND's trainer archive, or a safetensors path; never a pickle).  inner_params:
        MEND's `config.model.inner_params`, in its order ("<module>.weight" names of the model);
        their modules become `layers`, and shapes and Conv1D layouts are read off the model.
        editor_device, capture_batch_size: the constructor's.  The editors are kept in fp32 (the
        constructor's type, and MEND's compute type).  `save` writes an ordinary checkpoint for
        `ModelEditor.load`.

        MEND's shared editors (one per weight shape, mode = the weight's index among the inner
        parameters of that shape) are ModelEditor's layout exactly; its non-shared editors (one
        per parameter) fit only when no two inner parameters have one shape (ValueError otherwise).
        """
        from .compat import mend as compat_mend

        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        names = compat_mend._check_inner_params(inner_params)
        params = dict(model.named_parameters(remove_duplicate=False))
        for name in names:
            if not name.endswith(".weight") or name not in params:
                weights = [p for p in params if p.endswith(".weight")]
                close = difflib.get_close_matches(name, weights, n=3, cutoff=0.5)
                hint = f"; close matches: {close}" if close else ""
                raise ValueError(f"inner_params: {name!r} is not the weight of a module of the model (MEND's "
                                 f"inner_params are '<module>.weight' names){hint}")
        layers = [name[: -len(".weight")] for name in names]
        modules = resolve_modules(model, layers, arg="inner_params")  # ValueError for a non-Linear/Conv1D
        shapes = {name: cls.shape_of(modules[layer]) for name, layer in zip(names, layers)}
        conv1d = [name for name, layer in zip(names, layers) if is_conv1d(modules[layer])]
        views = compat_mend.load(state_dict, names, shapes, prefix=prefix, norm=norm, conv1d=conv1d,
                                 dtype=torch.float32, edit_lrs_key=edit_lrs_key)

        # One editor per weight shape: a non-shared checkpoint with two weights of one shape has two.
        sources: dict[tuple[int, int], nn.Module] = {}
        for name in names:
            source = sources.setdefault(shapes[name], views[name].editor)
            if source is not views[name].editor:
                other = next(n for n in names if views[n].editor is source)
                raise ValueError(
                    f"inner_params: {other!r} and {name!r} have one shape {shapes[name]} but separate editors "
                    f"in the checkpoint (MEND's mend.shared=False); a ModelEditor shares one editor per weight "
                    f"shape, so it cannot hold them: use compat.mend.load's per-weight views instead")
        # MEND gives every editor the mid width min(rank, in + out) and one depth, so the widest
        # editor's width as `rank` rebuilds each of them (the constructor takes the same min).
        rank = max(e.layers[0].u.shape[-1] for e in sources.values())
        first = next(iter(sources.values()))
        # seed=0: building draws no global random numbers (every value is overwritten below).
        editor = cls(model, tokenizer, layers, method="mend", loss_reduction=compat_mend.LOSS_REDUCTION,
                     editor_device=editor_device, capture_batch_size=capture_batch_size,
                     rank=rank, n_layers=len(first.layers), norm=first.norm is not None, seed=0)
        # Both number a shape's weights by their order (MEND in inner_params, ModelEditor in
        # layers, the same list), so mode k of the one is mode k of the other.
        for shape, source in sources.items():
            target, state = editor.editors["{}x{}".format(*shape)], source.state_dict()
            if {k: v.shape for k, v in state.items()} != {k: v.shape for k, v in target.state_dict().items()}:
                raise ValueError(
                    f"the checkpoint's editor of shape {shape} has mid width {source.layers[0].u.shape[-1]} and "
                    f"{len(source.layers)} layers; MEND builds every editor with min(rank, in + out) = "
                    f"{target.layers[0].u.shape[-1]} and one depth ({len(first.layers)} layers here)")
            target.load_state_dict(state)
        return editor


# What every checkpoint's config holds (format 1 on): ModelEditor.load reads them.
_CONFIG_FIELDS = {"method": str, "layers": list, "tokens": str, "editor_kwargs": dict, "editors": dict}


def _checkpoint_config(path, text: str) -> dict:
    """The ModelEditor config of a checkpoint's metadata; ValueError naming what is wrong with it
    (not JSON, a field missing or of another type: a KeyError or TypeError before; a format newer
    than this package reads, which loaded as if it were this one's)."""
    config = json_metadata(path, CHECKPOINT_KEY, text)
    version = config.get("format", 1)
    if not is_int(version) or version < 1:
        raise ValueError(f"{path}: checkpoint format must be a positive int, got {version!r}")
    if version > CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: checkpoint format {version} was written by a newer dcedit_kernels (this one "
                         f"reads formats 1 to {CHECKPOINT_FORMAT}): upgrade the package to load it")
    for name, kind in _CONFIG_FIELDS.items():
        if not isinstance(config.get(name), kind):
            got = "nothing" if name not in config else type(config[name]).__name__
            raise ValueError(f"{path}: its {CHECKPOINT_KEY} metadata needs {name!r} ({kind.__name__}), got {got}")
    return config


# Per method, the editor arguments whose default changed: ModelEditor.load takes them from the
# saved editors when a checkpoint's editor_kwargs lack them.
_CHANGED_DEFAULTS = {"moeditor": ("top_k", "gate_norm")}



