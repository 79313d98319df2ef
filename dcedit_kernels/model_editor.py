"""ModelEditor: edit a Hugging Face model in place with a trained editor (or fine-tuning), undoably.

    editor = ModelEditor(model, tokenizer, layers=["model.layers.28.mlp.down_proj", ...],
                         method="mend", rank=64)
    handle = editor.apply([EditRequest("The Eiffel Tower is in", "Rome")])
    ...                                    # the model is edited
    handle.undo()                          # every weight bit-identical to before
    with editor.edited(requests): ...      # the same, scoped

Editor methods ("mend", "raeditor", "moeditor", "proeditor"): a forward + backward of the edit
loss (`loss_reduction`, below) captures the gradient factors (μ, η) of every edited weight
(`capture.py`; the pass itself, one per `capture_batch_size` edits: `edit_capture.py`); the
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
and checkpoints record it (those written before it existed load as "token", and so do original
MEND editors: `editor_checkpoint.py`).

Tied weights: a layer whose weight is shared with another module (an LM head tied to the input
embedding) cannot be edited without changing that module too, so the constructor raises ValueError
naming both unless `allow_tied=True`; apply and fit check again (a tie made after the constructor).

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
already been changed, and setting a seeded RaEditor's routing generator back to where it was (the
next apply splits its edits as if the failed one never ran).  A Ctrl-C (SIGINT, in the main
thread) that arrives while a weight is being shifted waits until that weight's saved values are
recorded, so the restore never misses it.
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
and the constructor refuses such a layer with ValueError (so do `apply` and `fit`, for a layer offloaded
since, by `cpu_offload`/`disk_offload`/`dispatch_model` of the built model; `undo` refuses with
RuntimeError, restoring nothing, once an edited weight was offloaded after the edit: its values
then live in accelerate's hook, out of the restore's reach, so undo before offloading).
`stats["peak_memory_bytes"]` sums the per-GPU peaks of every CUDA device in play; to measure
them, `apply` resets those devices' peak statistics (`torch.cuda.reset_peak_memory_stats`), so a
caller's own `max_memory_allocated` reading spans from the last edit on (the statistics are the
device's: another thread's allocations on it count in, and its edits reset them).

Threads: ModelEditors of different models share none of this package's state (their edits, undos
and scoring can run in parallel threads; torch's global random generator is shared, see README
"Threads"); one model is edited by one thread at a time, since an edit, its capture's hooks and the
model's live-edit list (`edit_handle.LIVE_EDITS`) are the model's own state (apply, undo and fit
raise RuntimeError while another thread runs one of them on the model: `edit_handle.one_editing_thread`).
"""

from __future__ import annotations

import contextlib
import hashlib
import time
from collections.abc import Mapping
from typing import Iterable, Iterator, Sequence

import torch
from torch import nn
from torch.nn.utils import parametrize, prune

from ._checks import (HALF_DTYPES, check_autograd, check_bool, compute_dtype, first_non_finite, is_finite_number,
                      is_int)
from ._warn import warn
from .capture import TOKEN_MODES, Factors, modes_restored, resolve_modules, weight_out_in
from .devices import as_device, check_resident, cuda_indices, input_device, model_devices, place_editor
from .dropout_check import warn_active_dropout
from .edit_capture import DEFAULT_CAPTURE_BATCH_SIZE, EditCapture
from .edit_handle import (APPLY_CALL, LIVE_EDITS, EditHandle, add_note, deferred_interrupt, one_editing_thread,
                          restore, weights_owner)
from .editor_checkpoint import CHECKPOINT_FORMAT, CHECKPOINT_KEY, LEGACY_LOSS_REDUCTION, EditorCheckpoints
from .editors.presets import MEND, MoEditor, ProEditor, RaEditor
from .ft_baseline import FT_KL_ONLY, FineTuneBaselines
from .head_input import head_width
from .losses import DEFAULT_LOSS_REDUCTION, LOSS_REDUCTIONS
from .requests import EditRequest, validate_requests
from .tied_weights import check_untied
from .tokenize import bidirectional_lm, is_seq2seq
from .train_config import TrainResult

# What other modules import from here: the capture's and the checkpoints' constants live beside
# their code (edit_capture.py, editor_checkpoint.py) and are re-exported.
__all__ = ["ModelEditor", "EDITOR_METHODS", "FT_METHODS", "METHODS", "DEFAULT_CAPTURE_BATCH_SIZE",
           "DEFAULT_LOSS_REDUCTION", "LEGACY_LOSS_REDUCTION", "CHECKPOINT_FORMAT", "CHECKPOINT_KEY"]

EDITOR_METHODS = {"mend": MEND, "raeditor": RaEditor, "moeditor": MoEditor, "proeditor": ProEditor}
FT_METHODS = ("ft", "ft_kl")
METHODS = tuple(EDITOR_METHODS) + FT_METHODS


def _peak_memory_start(devices: list[torch.device]) -> None:
    for index in cuda_indices(devices):
        torch.cuda.reset_peak_memory_stats(index)


def _peak_memory(devices: list[torch.device]):
    """Sum over the CUDA devices in play of each one's peak (the peak of a single GPU when the model
    is on one); None when none is CUDA."""
    indices = cuda_indices(devices)
    return sum(int(torch.cuda.max_memory_allocated(i)) for i in indices) if indices else None


def shape_seed(seed: int, key: str) -> int:
    """The seed of the editor of weight shape `key` ("576x1536") in a ModelEditor built with `seed`,
    for every shape but the first (which takes `seed` itself): 64 bits of SHA-256 of both."""
    digest = hashlib.sha256(f"{int(seed)}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


class ModelEditor(EditCapture, EditorCheckpoints, FineTuneBaselines):
    """Edits `model` in place at the named `layers` with `method`; see the module docstring.

    tokenizer: the model's Hugging Face tokenizer (callable; it tokenizes the edits' prompts and
    targets); layers: module names (nn.Linear or GPT-2 Conv1D); method: "mend" (the default),
    "raeditor", "moeditor", "proeditor", "ft" or "ft_kl"; tokens: "all" (the default; MEND: every
    non-padding token feeds the editor)
    or "target" (MALMEN: only the target-predicting positions), the capture's rows (the FT
    baselines feed no editor: their `apply` fine-tunes on the target tokens whichever it is);
    loss_reduction: "edit" (each edit's mean target NLL, summed over edits) or "token" (MEND's
    batch mean, the default), the loss the capture
    backpropagates (the FT baselines always fine-tune on the batch mean, as MEND's baseline does);
    on the baselines both are taken all the same, as `capture`'s settings: an "ft" ModelEditor is
    the capture without editors (`evaluate.gradient_conflict` captures per-edit factors through
    one with loss_reduction="edit"), so refusing them there would take that away;
    allow_tied: edit layers whose weight is shared with another module (ValueError otherwise);
    editor_device: where every editor lives (a device, "cuda:1", or a CUDA index); None (the
    default) puts the editor of each weight shape on the device of the first layer of that shape
    (see "Models split across devices" in the module docstring; ignored by the baselines);
    capture_batch_size: rows per forward + backward of the capture and of the FT baselines (default
    32; the factors are concatenated, so an edit's factors do not depend on it beyond rounding; None:
    the whole batch in one pass), which bounds their activation memory whatever the number of
    edits; FT+KL over more locality rows than this recomputes each chunk's KL reference at every
    step instead of keeping n×V log-probabilities (on SmolLM2, 500 CounterFact edits, 2 steps:
    peak RSS 1.8 instead of 2.7 GB, 97 instead of 83 s; bit-identical weights, the model in
    eval mode), so there None is also the faster choice when memory allows; not for the editor
    methods, whose chunks are sorted by length so that few rows are padded (SmolLM2, 512
    CounterFact edits, MoEditor: 2x the time and 4.6x the peak RSS growth with None);
    rescale_batch_size: None (the default) or the batch size the editors were trained on, an
    opt-in remedy for applying many more edits than that at once (see the property);
    editor_kwargs: the GroupedEditor
    preset's own arguments (`n_editors`, `rank`, `norm`, `fisher_keep`, `edit_lr`, `fusion`,
    `seed` (the first weight shape's editor's; each other shape's editor a seed of its own derived
    from it, `shape_seed`), ...; `n_editors` and a `fusion` other than "add" for the methods of several editors,
    "raeditor" and "moeditor") or, for the baselines, `ft_steps`, `ft_lr`, `ft_optimizer` ("adam"|"sgd"),
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
        self._check_untied()
        self.editor_kwargs = dict(editor_kwargs)
        self.seq2seq = is_seq2seq(model)
        bidirectional = bidirectional_lm(model)
        if bidirectional:  # the edit loss reads the target from the input: edits "succeeded" meaninglessly
            raise ValueError(f"model must be a causal or encoder-decoder LM; {bidirectional}, so it sees the "
                             "target it is edited to predict")
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
            if self.method == "ft":  # not kl_weight and locality_texts, which "ft" refuses as arguments
                shown = {k: v for k, v in shown.items() if k not in FT_KL_ONLY}
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
        new._register_live()
        return new

    def __setstate__(self, state: dict) -> None:
        """Unpickling (pickle, torch.save + torch.load) gives a copy of the model, as deepcopy does,
        so its live-edit list is registered for that copy the same way: without this, another
        ModelEditor of the unpickled model got a list of its own, and edits of the two could be
        undone out of order, leaving the model edited after both undos returned True."""
        self.__dict__.update(state)
        self._register_live()

    def _register_live(self) -> None:
        """Make this editor's live-edit list (a copy's) the one of its model, and have the copied
        live edits watch that model (their saved weights go with it)."""
        owner = weights_owner(self.model)
        self._live = LIVE_EDITS.setdefault(owner, self._live)
        for handle in self._live:
            if handle.active and not handle.kept:
                handle._watch(owner)

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
        `evaluate.edit_statistics`, and `fit`'s validation, which applies the val edits in batches
        of `TrainConfig.batch_size`), not to the training loss; a runtime setting, not saved."""
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
    def _check_modules_in_model(self) -> None:
        """ValueError naming an edited layer whose module is no longer the model's module of that name
        (replaced since the constructor resolved it: `resize_token_embeddings` builds a new LM head, and
        a module may be assigned anew).  The capture and training find the layers by name, the shift
        goes to the module resolved here: MEND's edit of a replaced layer changed the old module, which
        the model no longer runs, and returned as if it had edited the model."""
        for name, module in self.modules.items():
            try:
                current = self.model.get_submodule(name)
            except AttributeError:
                current = None
            if current is not module:
                raise ValueError(f"layers: {name!r} is no longer the model's module of that name (replaced after "
                                 "the ModelEditor was built, e.g. by resize_token_embeddings): an edit would change "
                                 "a module the model no longer runs; build the ModelEditor again")

    def _check_layers_still_editable(self) -> None:
        """What apply and fit check again about the edited layers before they start: the model may
        have changed since the constructor checked.  One list for both, so a new check reaches both
        (the tie check was added to apply and, in a second change, to fit)."""
        self._check_modules_in_model()  # a layer replaced since: its edit would miss the model
        # Offloaded since (accelerate's cpu_offload/disk_offload of the model after the ModelEditor was
        # built): the shift went to a "meta" tensor and failed with NotImplementedError, and FT said the
        # layer got no gradient.
        self._check_resident()
        self._check_weight_parameters()  # an edit would change nothing the model reads
        self._check_untied()  # a weight tied since (allow_tied False): an edit would change both

    def _check_untied(self) -> None:
        """Unless allow_tied: ValueError naming an edited layer whose weight another parameter shares
        (`check_untied`).  Run again by apply and fit: a tie made after the constructor checked (the
        head set to the embedding's Parameter, as HF's tie_weights does) was edited with its
        embedding, without a word (about 12 ms an apply for SmolLM2's 397 modules and 3 layers)."""
        if not self.allow_tied:
            check_untied(self.model, self.modules)

    def _check_resident(self) -> None:
        """ValueError naming an edited layer whose weight is not resident (accelerate's "meta")."""
        check_resident({name: weight_out_in(m) for name, m in self.modules.items()})

    def _check_weight_parameters(self) -> None:
        """ValueError naming an edited layer whose weight is not a parameter of its module but computed
        from others at every forward (a torch parametrization: weight_norm, spectral_norm; pruning's
        pre-hook, weight_orig × weight_mask): the in-place shift changed nothing the model reads (apply
        returned, the outputs as before, and undo refused) and the baselines' optimiser refused it as a
        non-leaf tensor.  Checked by apply and fit, not by the constructor: gradient_conflict builds a
        ModelEditor to read such a layer's gradient factors."""
        for name, module in self.modules.items():
            if "weight" in module._parameters:
                continue
            source, fix = "something other than the module's own parameter", "make it an nn.Parameter of the module"
            pruning = [h for h in module._forward_pre_hooks.values()
                       if isinstance(h, prune.BasePruningMethod) and h._tensor_name == "weight"]
            if parametrize.is_parametrized(module, "weight"):
                source = f"a torch parametrization ({type(module.parametrizations.weight[0]).__name__})"
                fix = "torch.nn.utils.parametrize.remove_parametrizations(module, 'weight')"
            elif pruning:
                source, fix = f"torch.nn.utils.prune ({type(pruning[0]).__name__})", "torch.nn.utils.prune.remove(module, 'weight')"
            raise ValueError(f"layers: the weight of {name!r} is not a parameter of the module: {source} computes it "
                             f"at every forward, which an in-place edit cannot change; remove that first ({fix})")

    @staticmethod
    def shape_of(module: nn.Module) -> tuple[int, int]:
        """(in_features, out_features) of an editable module (Conv1D stores in×out)."""
        out_features, in_features = weight_out_in(module).shape
        return in_features, out_features

    def _build_editors(self, kwargs: dict) -> None:
        if "n_modes" in kwargs:
            raise ValueError("n_modes is set by ModelEditor (the number of layers sharing a shape)")
        preset = EDITOR_METHODS[self.method]
        if "routing" in kwargs:  # a gate on another method's editor got no edit features of its width
            raise ValueError(f"routing is set by method ({self.method!r}); for a gate use method='moeditor', "
                             f"for random groups method='raeditor', got routing={kwargs['routing']!r}")
        if "n_editors" in kwargs and self.method not in ("raeditor", "moeditor"):
            raise ValueError(f"n_editors is for methods 'raeditor' and 'moeditor' only; {self.method!r} has one editor")
        if self.method == "moeditor":
            # The gate reads edit features of the head input's width (see `hidden_size`); where
            # nothing tells that width, the caller's feat_dim is the only source of it.
            feat_dim, width = kwargs.get("feat_dim"), self._known_width()
            if width is None and feat_dim is None:
                raise ValueError("feat_dim: the width of the model's last hidden state is unknown (no config "
                                 "hidden_size/d_model/n_embd, no nn.Linear head, no input embedding): give "
                                 "method 'moeditor' feat_dim=<that width>")
            if width is not None and feat_dim is not None and feat_dim != width:
                raise ValueError(f"feat_dim must be the width of the model's last hidden state "
                                 f"({width}) or None, got {feat_dim!r}")
            kwargs = {**kwargs, "feat_dim": feat_dim if width is None else width}
        by_shape: dict[tuple[int, int], list[str]] = {}
        for name, module in self.modules.items():
            by_shape.setdefault(self.shape_of(module), []).append(name)
        for k, ((i, o), names) in enumerate(by_shape.items()):
            key = f"{i}x{o}"
            # The first shape's editor takes `seed`, every other shape's one derived from it and the
            # shape: with one seed each, the editors of (i, o) and (o, i) drew the same numbers (i + o
            # per row of v), so a seeded RaEditor split every batch alike in an up_proj and a
            # down_proj, where unseeded ones split independently.
            shape_kwargs = kwargs if k == 0 or kwargs.get("seed") is None else {
                **kwargs, "seed": shape_seed(kwargs["seed"], key)}
            try:
                # On the CPU whatever torch.set_default_device says, then moved beside its layers: built
                # on a "meta" default device (left on after building a model skeleton) the move raised
                # "Cannot copy out of meta tensor", in the constructor and in ModelEditor.load.
                with torch.device("cpu"):
                    editor = preset(i, o, n_modes=len(names), **shape_kwargs)
            except TypeError as exc:  # an argument the preset does not take
                raise ValueError(f"bad editor argument for method {self.method!r}: {exc}") from None
            layer_devices = (weight_out_in(self.modules[name]).device for name in names)
            self.editors[key] = editor.to(place_editor(layer_devices, self.editor_device))
            for mode, name in enumerate(names):
                self.slots[name] = (key, mode)

    def hidden_size(self) -> int:
        """The width of MoEditor's edit features: a causal LM's head input width where its head is
        an nn.Linear (`head_input.head_width`), else the model's hidden width (its config's
        hidden_size, d_model or n_embd, else the input embedding's width); ValueError where none
        of them tells it."""
        width = self._known_width()
        if width is None:
            raise ValueError("the width of the model's last hidden state is unknown (no config hidden_size/"
                             "d_model/n_embd, no nn.Linear head, no input embedding)")
        return width

    def _known_width(self) -> int | None:
        """`hidden_size`, or None where nothing tells it.  `get_input_embeddings` may be absent
        (a plain nn.Module) or raise NotImplementedError (PreTrainedModel's default): either was a
        bare error from the constructor of a MoEditor, whose feat_dim could not stand in for it."""
        width = None if self.seq2seq else head_width(self.model)
        if width is not None:
            return width
        config = getattr(self.model, "config", None)
        for attr in ("hidden_size", "d_model", "n_embd"):
            value = getattr(config, attr, None)
            if isinstance(value, int):
                return value
        get = getattr(self.model, "get_input_embeddings", None)
        try:
            embeddings = get() if callable(get) else None
        except NotImplementedError:
            return None
        dim = getattr(embeddings, "embedding_dim", None)
        return dim if is_int(dim) else None

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

    def parameters(self) -> Iterator[nn.Parameter]:
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

    def route_generators(self) -> dict:
        """{editor key: its routing generator} for the editors that have one (RaEditor's random
        groups, seeded per editor): training checkpoints their states, the report restarts them."""
        return {key: e.route_generator for key, e in self.editors.items() if e.route_generator is not None}

    def route_states(self) -> dict:
        """{editor key: its routing generator's state} (`route_generators`): a failed apply sets them
        back with `set_route_states`, and the report starts each row's routing from the same state."""
        return {key: gen.get_state() for key, gen in self.route_generators().items()}

    def set_route_states(self, states: dict) -> None:
        """Set the routing generators named in `states` to what `route_states` gave for them.
        ValueError naming the key for one no editor's generator has or a state no generator takes,
        checked before any is set: a bare KeyError, AttributeError (None) or torch's TypeError or
        RuntimeError before, some generators already set."""
        if not isinstance(states, Mapping):
            raise ValueError(f"states must be a dict as route_states() returns, got {type(states).__name__}")
        generators = self.route_generators()
        for key, state in states.items():
            if key not in generators:
                raise ValueError(f"states: no editor {key!r} with a routing generator (those with one: "
                                 f"{sorted(generators)})")
            try:  # on a scratch generator of its device: the editors' are set only once every state is taken
                torch.Generator(device=generators[key].device).set_state(state)
            except (TypeError, RuntimeError) as exc:
                raise ValueError(f"states[{key!r}] is not a generator state as route_states() gives ({exc})") from None
        for key, state in states.items():
            generators[key].set_state(state)

    # -- running the editors ---------------------------------------------------------------------
    def run_editors(self, factors: dict, feats: torch.Tensor | None, consume: bool = False,
                    eta_scale: float = 1.0) -> dict:
        """{layer: GroupedEdit}, in whatever grad / train mode the caller set.  consume=True takes
        each layer's factors out of `factors` (and drops them) once its editor has run, so that
        layers already edited do not keep their factors while the next one's editor runs.
        eta_scale: the editors read η × eta_scale (a copy, one layer at a time; `factors` unchanged)."""
        self._check_editor_inputs(factors, feats, eta_scale)
        check_bool(consume, "consume")  # read for its truth: consume="False" emptied the caller's factors
        edits = {}
        for name in self.layers:
            key, mode = self.slots[name]
            editor = self.editors[key]
            f = factors.pop(name) if consume else factors[name]
            dev = next(editor.parameters()).device
            eta = f.eta.to(dev)
            if eta_scale != 1:  # in fp32 (float64 kept): a bf16 model's η × N/B rounded to bf16 again
                eta = eta.to(compute_dtype(eta)) * eta_scale
            edits[name] = editor(f.mu.to(dev), eta, f.edit_offsets.to(dev), mode=mode,
                                 edit_feats=None if feats is None else feats.to(dev))
            del eta
        return edits

    def _check_editor_inputs(self, factors, feats, eta_scale) -> None:
        """run_editors' arguments, checked before the first editor runs: a layer missing from
        `factors` raised KeyError after the editors before it had taken their factors into their
        running statistics (in training mode), a layer's factors of another shape the editor's
        ValueError naming its `mu` after them, and a feats or eta_scale of another type
        AttributeError or TypeError from inside the loop, naming nothing."""
        if not isinstance(factors, dict):
            raise ValueError(f"factors must be a dict of layer name to Factors (capture's), got {type(factors).__name__}")
        missing = [name for name in self.layers if name not in factors]
        if missing:
            raise ValueError(f"factors has no entry for the edited layers {missing}")
        for name in self.layers:
            f = factors[name]
            if not isinstance(f, Factors):
                raise ValueError(f"factors[{name!r}] must be a Factors, got {type(f).__name__}")
            # Shapes only (no host read): factors of another layer's shape raised forward's "mu must
            # have shape (T, in)", naming neither the layer nor `factors`, after the editors before it
            # had taken theirs into their running statistics.
            i, o = self.shape_of(self.modules[name])
            mu, eta = f.mu, f.eta
            if not (isinstance(mu, torch.Tensor) and isinstance(eta, torch.Tensor) and mu.dim() == 2
                    and mu.shape[1] == i and tuple(eta.shape) == (mu.shape[0], o)):
                got = (f"mu {tuple(mu.shape)} and eta {tuple(eta.shape)}"
                       if isinstance(mu, torch.Tensor) and isinstance(eta, torch.Tensor)
                       else f"mu {type(mu).__name__} and eta {type(eta).__name__}")
                raise ValueError(f"factors[{name!r}] must hold that layer's mu (T, {i}) and eta (T, {o}), got {got}")
        if feats is not None and not isinstance(feats, torch.Tensor):
            raise ValueError(f"feats must be a torch.Tensor (capture's edit features) or None, got {type(feats).__name__}")
        if feats is not None and feats.is_meta:  # moved to each editor's device: "Cannot copy out of meta tensor"
            raise ValueError("feats must hold values (they are moved to each editor's device), got a meta tensor")
        if not is_finite_number(eta_scale):
            raise ValueError(f"eta_scale must be a finite number, got {eta_scale!r}")

    def edits_as_applied(self, factors: dict, feats: torch.Tensor | None, consume: bool = False) -> dict:
        """{layer: GroupedEdit} as `apply` makes them: the editors in eval mode (frozen
        normalisation statistics, no gate noise), no grad; their train/eval mode comes back.
        consume: as `run_editors`'.  With `rescale_batch_size` set, the editors read η ×
        N/rescale_batch_size and each edit's alpha is divided by that factor (N: the edits in
        `factors`)."""
        check_bool(consume, "consume")  # checked before the editors' modes change (run_editors checks it too)
        scale = 1.0
        if self.rescale_batch_size is not None and factors:
            scale = next(iter(factors.values())).num_edits / self.rescale_batch_size
        with modes_restored(self.editors), torch.no_grad():  # the container's flag too (fit reads it)
            self.editors.eval()
            edits = self.run_editors(factors, feats, consume=consume, eta_scale=scale)
            for edit in edits.values():
                # No grad, as documented: α is a view of the editor's Parameter, and a view taken
                # under no_grad still requires grad; the division by `scale` ran outside no_grad and
                # kept a graph in α, which a `lowrank_edited` block of these edits put into every
                # pass (FT inside it raised "backward through the graph a second time").  detach()
                # keeps the memory: an unscaled α still reads the editor's value.
                # A 16-bit editor's α is divided in fp32, as the editors compute: rounded back to bf16,
                # α / scale was off by up to 2⁻⁹, and so was the whole shift (tests/test_editor_dtypes.py).
                alpha = edit.alpha.detach()
                edit.alpha = alpha.to(compute_dtype(alpha)) / scale if scale != 1 else alpha
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
        past a learned position table) and for a layer replaced in the model since the ModelEditor
        was built (`resize_token_embeddings` of an edited LM head) or, unless allow_tied, tied to
        another module's weight since, offloaded since (accelerate), or whose weight is not a
        parameter of its module (a torch parametrization or pruning computes it); RuntimeError under
        torch.inference_mode.  Warns once per ModelEditor while its editors are untrained, and once
        when most of a 16-bit (bf16/fp16) weight's shift is lost to rounding: W + αΔ is stored in
        the weight's dtype, so shift entries below half its resolution vanish
        (`stats["changed_fraction"]`: each layer's share of changed entries).  Whatever fails or
        interrupts the edit, the model is left as it was (see the module docstring).  The model runs
        in the mode it is in: in train mode its dropout is on in the capture and the fine-tuning,
        and apply warns (`load_model` and `from_pretrained` return models in eval mode).  RuntimeError, too, for a model built or
        loaded under inference_mode (its parameters are inference tensors), and while another
        thread edits the model (apply, undo, fit: one thread edits a model at a time)."""
        # The edit is rolled back when anything raises after `_apply` made its handle (`made`:
        # [(handle, the routing states before)]).  `_apply` restores what it changed itself; this
        # covers an exception after it finished: a Ctrl-C in `one_editing_thread`'s exit made apply
        # raise KeyboardInterrupt with the edit live in the model, its handle reachable nowhere.
        made = []
        try:
            with one_editing_thread(weights_owner(self.model), APPLY_CALL):
                return self._apply(requests, made)
        except BaseException as exc:
            if made and made[0][0].active:
                # Claiming the model again, in this frame (`one_editing_thread` then takes a record of
                # this apply left by a Ctrl-C in its exit for stale): a Ctrl-C held back by that exit
                # is raised after the model was let go, and restoring without a claim wiped an edit
                # another thread applied in between (its handle live, its undo then restoring this
                # edit's values).  When another thread edits the model, or edited it since, this
                # edit stays applied, and the exception says so.
                handle, routes = made[0]
                try:
                    with deferred_interrupt(), one_editing_thread(weights_owner(self.model), APPLY_CALL):
                        if not self._live or self._live[-1] is not handle:
                            raise RuntimeError("another thread edited the model since")
                        restore(handle._saved)
                        handle._discard()
                        self.set_route_states(routes)
                except RuntimeError as why:
                    add_note(exc, f"dcedit: this apply's edit stays applied, not rolled back ({why}): undo the "
                             "later edits, then this one (its handle is the model's live edit below them)")
            raise

    def _apply(self, requests: Iterable[EditRequest], made: list) -> EditHandle:
        """`apply`, this thread the only one editing the model; `made` gets the handle (and the
        routing states before) as soon as it exists (`apply`)."""
        requests = validate_requests(requests)
        check_autograd("ModelEditor.apply", "its capture (or fine-tuning)", self.model)
        self._check_layers_still_editable()
        warn_active_dropout(self.model, "ModelEditor.apply", "the capture and the fine-tuning draw dropout "
                            "masks, so the same requests give another edit at each apply")
        devices = self.devices
        _peak_memory_start(devices)
        start = time.perf_counter()
        if self.method not in FT_METHODS and not self._warned_initial and self.editors_at_initialisation():
            self._warned_initial = True  # once per ModelEditor: evaluate_method applies hundreds of times
            warn(f"ModelEditor.apply: the {self.method!r} method's editors are at their initialisation "
                 "(never trained or loaded): an initial editor takes about one gradient step of size edit_lr "
                 "(1e-4 by default; MoEditor's initial top-2 gate halves it), "
                 "which rarely changes a prediction. Train them (fit) or load a checkpoint "
                 "(ModelEditor.load).", UserWarning)
        batch = self.tokenize([r.prompt for r in requests], [r.target for r in requests])
        # The handle is live before the first write and its saved list fills as weights change, so
        # no exception (an interrupt included) can leave a changed weight without a way back.
        saved: list[tuple[torch.Tensor, torch.Tensor]] = []
        # A seeded RaEditor draws the edits' groups from its own generator: a failed apply sets it
        # back, so the next apply splits as if the failed one never ran (it drew a split first).
        routes = self.route_states()
        # (Nothing between the handle, which watches the model with a finalizer, and `made`.)
        handle = EditHandle(self._live, saved, {}, model=weights_owner(self.model))
        made.append((handle, routes))
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
            try:
                restore(saved)  # the methods restore (and say so) themselves: this covers the rest
            finally:  # a Ctrl-C held back during the restore raises at its end: the handle goes all the same
                handle._discard()
                self.set_route_states(routes)
            raise
        return handle

    @contextlib.contextmanager
    def edited(self, requests: Iterable[EditRequest]):
        """`with editor.edited(requests) as handle:` the model is edited inside the block only:
        on exit, edits applied inside the block that are still live are undone too (latest
        first), then this one.  `handle.keep()` inside the block keeps this edit; keeping a later
        one makes this one permanent too, and exit then raises RuntimeError saying so.  An
        exception leaving the block is never replaced by an error of the undo (it gets a note); a
        Ctrl-C during that undo is raised once the undo is done."""
        outer = list(self._live)  # the model's live edits from before the block: not undone on exit
        handle = None
        try:
            handle = self.apply(requests)
            yield handle
        except BaseException as exc:
            if handle is None:
                # A Ctrl-C between the apply's return and here: the block's edit is the first live one
                # this thread applied that is not from before (it stayed live, the block never entered
                # and its exit never run).  An apply that failed left none; another thread's edit made
                # meanwhile is not this block's to undo.
                handle = next((h for h in self._live
                               if h._applied_by_this_thread() and not any(h is o for o in outer)), None)
            if handle is not None:
                try:
                    self._leave_edited(handle, outer)
                except Exception as undo_exc:  # noqa: BLE001 (a MemoryError replaced the block's error)
                    add_note(exc, f"dcedit: on leaving edited(): {type(undo_exc).__name__}: {undo_exc}")
            raise
        self._leave_edited(handle, outer)

    def _leave_edited(self, handle: EditHandle, outer: list) -> None:
        """Undo the block's later live edits, latest first, down to a kept one (or one from before
        the block: the block's own edit may have been undone inside it); then the block's own edit
        unless it was kept, or raise when a later kept edit, or one of a thread still running, pins
        it.  A Ctrl-C meanwhile waits until all of it is done (it left the block's edit live after
        the block)."""
        with deferred_interrupt():
            live = self._live
            while (live and live[-1] is not handle and not live[-1].kept
                   and not any(live[-1] is h for h in outer)):
                last = live[-1]
                if last._by_another_running_thread():
                    # That thread may still be inside its own edited() block, reading the model: undoing
                    # its edit here left it scoring a model without the edit, without a word.  (A thread
                    # that has ended, e.g. a worker this block ran, left its edit to the block.)
                    raise RuntimeError(f"{last!r}, applied by another thread that is still running, is live on "
                                       "top of this edited() block's edit: undo it in that thread first (edits of "
                                       "a model are undone latest first; one model is edited by one thread at a "
                                       "time, README \"Threads\"); the block's edit, and any edit applied inside "
                                       "the block under that one, were left live")
                last.undo()
                if live and live[-1] is last:  # undo took nothing off: looping here would never end
                    raise RuntimeError(f"{last!r}, applied inside this edited() block, could not be undone")
            if not handle.active or handle.kept:
                return
            if live and live[-1] is not handle:
                raise RuntimeError("an edit applied inside this edited() block was kept (handle.keep()), which "
                                   "made the block's own edit permanent: it was not undone (the block's live edits "
                                   "after the kept one were)")
            handle.undo()

    def _apply_editors(self, batch: dict, saved: list):
        t0 = time.perf_counter()
        # Token rows whose μ or η is all zero dropped before any editor runs (the editors skip them,
        # so the shifts are bit for bit the same).  Under tokens="all" the layers next to the head
        # get a gradient at the scored positions only (in the last block, 356 of 2,816 rows for 300
        # CounterFact edits), and every zero row was held until the last editor ran, beside each
        # editor's own copy of its layer's nonzero rows.  Random Llama (hidden 1024, 2 down_proj
        # layers), 1,000 edits: peak RSS over the model 899 -> 569 MiB.  They are dropped as each
        # capture chunk runs (`_capture_nonzero`), not once the whole capture has run: SmolLM2, 3
        # down_proj layers, 1,000 CounterFact edits, 10,246 of 28,239 rows zero, the capture's peak
        # of live tensors 298 -> 213 MiB, its peak RSS 322 -> 290 MiB.
        factors, feats, _, n_tokens = self._capture_nonzero(batch)
        t1 = time.perf_counter()
        # Each layer's factors dropped once its editor has run: the editors' peak holds one layer's
        # factors beside the edits, not every layer's (SmolLM2, 3 down_proj layers, 1,000 CounterFact
        # edits, untrained editors: that phase's peak RSS 291 -> 216 MiB for MEND, with the one
        # permuted copy fewer of GroupedEditor.forward).
        edits = self.edits_as_applied(factors, feats, consume=True)
        del factors
        bad = first_non_finite({name: (edit.mu_t, edit.eta_t, edit.alpha) for name, edit in edits.items()})
        if bad is not None:
            raise FloatingPointError(f"the editor's shift for layer {bad!r} is not finite; the model was not changed")
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
                    # The written weight is not in `saved` yet: an error in forming its entry (the
                    # transpose is an op, which a dispatch mode or tensor subclass may fail) undoes it
                    # here.  A sweep failing each op of a GPT-2 apply in turn left the weight being
                    # recorded shifted, under a note saying every weight was restored.
                    try:
                        entry = (param, previous if weight is param else previous.t())
                    except BaseException:
                        restore([(weight, previous)])
                        raise
                    saved.append(entry)
                # count_nonzero: a bool tensor's sum() first copies it to int64 (SmolLM2's down_proj:
                # 7 MB and 2.7 ms a layer, 10 ms of a 150 ms one-edit apply on the CPU).
                changed[name] = float(torch.count_nonzero(weight != previous)) / max(weight.numel(), 1)
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
            warn("ModelEditor.apply: most entries of the shift of " + ", ".join(lost) + " were lost to "
                 "rounding: they are below half the resolution of the 16-bit weight, which stores W + αΔ "
                 "rounded (handle.stats['changed_fraction'] has each layer's share of changed entries). "
                 "Edit a float32 copy of the model for the whole shift.", UserWarning)

    # -- training --------------------------------------------------------------------------------
    def fit(self, train_requests, val_requests=None, config=None, **overrides) -> TrainResult:
        """Train the editors (see `dcedit_kernels.train.train_editor`); returns its TrainResult.
        train_requests, val_requests (None: no validation): EditRequests (EditRequest says which
        fields `fit` reads); config: a TrainConfig (None: the defaults), with `overrides`
        (TrainConfig fields) replacing its fields.  ValueError for the baselines ("ft", "ft_kl":
        no editor to train) and for an encoder-decoder model (training supports causal LMs only).
        Its steps run with grad on under a caller's `torch.no_grad()`; under torch.inference_mode
        it raises RuntimeError, as `apply` does, and while another thread edits the model.  Every
        editor parameter is trained: one a caller froze (requires_grad False) raises ValueError,
        before anything changes.  On a model that holds live edits (applied, neither undone nor
        kept) it trains on the edited model and warns (`edit_handle.warn_live_edits`).

        A second call goes on from the editors' weights as the first left them, but is a new run
        otherwise: new Adam optimisers (no moments), its steps counted from 0, its batches drawn
        again from `config.seed` (the first call's order), validation, patience and the best state
        started over.  To continue one run, train with a `checkpoint_dir`: a later call with the same
        folder and a larger `steps` resumes it (TrainConfig's `resume`, on by default).  A call
        interrupted before its first checkpoint leaves nothing to resume: calling fit again on this
        ModelEditor then starts a new run from the editors as the interrupted steps left them (and
        MEND's running norms as its batches left them, a batch whose step never came included), not
        as the uninterrupted run would go (build the ModelEditor again to start over)."""
        from .train import TrainConfig, train_editor

        if self.method in FT_METHODS:
            raise ValueError(f"method {self.method!r} has no editor to train")
        if config is None:
            config = TrainConfig().replace(**overrides)  # ValueError naming an unknown field
        elif overrides:
            config = config.replace(**overrides)
        with one_editing_thread(weights_owner(self.model), "ModelEditor.fit"):  # its passes hook and patch the model
            return train_editor(self, train_requests, val_requests, config)
