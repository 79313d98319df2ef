"""ModelEditor's checkpoints: `save` / `load` (safetensors, the config as JSON metadata, no
pickle), the editors' state tensors, and `from_mend` for an original MEND checkpoint.

The edit loss (`loss_reduction`) belongs to the editor, so checkpoints record it.  Checkpoints
written before the setting existed (format 1, no "loss_reduction") load as "token", the semantics
they were trained under; so do original MEND editors (`compat.mend.LOSS_REDUCTION`;
`ModelEditor.from_mend` builds a ModelEditor from an original MEND checkpoint).  Checkpoints hold
CPU tensors and load into each editor where it lives (see "Models split across devices" in
`model_editor`).

`EditorCheckpoints` is a mixin of ModelEditor, kept apart from its construction, capture and
apply: it reads the editor's settings and editors, and builds ModelEditors through the class it is
mixed into (`cls(...)`, `cls.shape_of`).
"""

from __future__ import annotations

import difflib
import inspect
import json
import os
import sys
from typing import Sequence

import torch
from torch import nn

from ._checks import check_path, is_int
from ._warn import warn
from .capture import is_conv1d, resolve_modules
from .edit_capture import DEFAULT_CAPTURE_BATCH_SIZE
from .edit_handle import deferred_interrupt
from .editors.grouped_editor import (check_saved_shapes, config_differences, ignored_fusion, ignored_gate_norm,
                                     ignored_sizes, with_absent_defaults)
from .ft_baseline import FT_KL_ONLY
from .safetensors_file import check_state, json_metadata, read_safetensors, save_safetensors
from .tokenize import is_seq2seq

# load and from_mend build the class this is mixed into (ModelEditor), which imports this module:
# Self names it where typing.get_type_hints can resolve it.
if sys.version_info >= (3, 11):
    from typing import Self
else:
    from typing_extensions import Self  # a dependency of torch's

# What a checkpoint without a "loss_reduction" entry (format 1) was trained and applied under.
LEGACY_LOSS_REDUCTION = "token"
CHECKPOINT_FORMAT = 2
CHECKPOINT_KEY = "dcedit_model_editor"


class EditorCheckpoints:
    """Checkpoints of ModelEditor (a mixin; see the module docstring)."""

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
        (what a checkpoint holds; empty for the baselines).  They name shapes, not layers: an editor's
        mode m is the m-th layer of its shape in `layers` order, so load them into a ModelEditor of
        the same layers in the same order (`load_state_tensors` cannot tell: into one of those layers
        reversed, each layer takes the other's α and mode scale; `ModelEditor.load` checks the file's
        layers)."""
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
        states = {}
        for key, editor in self.editors.items():
            prefix = f"editors.{key}."
            states[key] = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
            # Checked for every editor before any loads: a bad second editor left the first loaded.
            editor.check_saved_state(states[key], lambda k, p=prefix: f"editor checkpoint key {p}{k}")
        # An error mid-load (out of memory moving a state to its editor's device, Ctrl-C) left the
        # editors before it loaded and the one it stopped in half loaded: they go back (CPU copies,
        # no more device memory), as after a refused state.
        previous = {key: {k: v.detach().to("cpu", copy=True) for k, v in editor.state_dict().items()}
                    for key, editor in self.editors.items()}
        try:
            for key, editor in self.editors.items():
                editor.load_saved_state(states[key])  # in the saved editor's dtype, on its own device
        except BaseException:
            with deferred_interrupt():  # a Ctrl-C meanwhile waits until every editor is back
                for key, editor in self.editors.items():
                    editor.load_saved_state(previous[key])
            raise

    def save(self, path) -> None:
        """Editors' state to safetensors, with the ModelEditor config as JSON metadata (no pickle).

        `path`'s folder must exist (FileNotFoundError naming it otherwise; none is created, as
        torch.save and safetensors' save_file create none: the CLI's --out creates its folder).
        The file is written beside `path` and moved over it (`save_safetensors`)."""
        try:
            meta = json.dumps(self.config())
        except TypeError as exc:
            raise ValueError(f"editor_kwargs must be JSON-serializable to save: {exc}") from None
        save_safetensors(self.state_tensors(), path, metadata={CHECKPOINT_KEY: meta})

    @classmethod
    def load(cls, path, model: nn.Module, tokenizer, editor_device=None,
             capture_batch_size: int | None = DEFAULT_CAPTURE_BATCH_SIZE,
             rescale_batch_size: int | None = None) -> Self:
        """A ModelEditor for `model` from what `save` wrote; its editors are placed as the
        constructor places them (`editor_device`; the checkpoint records no device), and
        `capture_batch_size` and `rescale_batch_size` are the constructor's (runtime settings,
        not saved).

        A checkpoint from before `loss_reduction` existed (format 1) loads with "token": its
        editors were trained on factors of the batch-mean loss, and feeding them per-edit factors
        would change the scale their statistics and steps α were learned at.

        The file's editor configs are checked against its tensors before anything is built: every
        setting that sizes a tensor or brings one (rank, n_layers, n_editors, feat_dim, the running
        norms, MoEditor's gate and gate_norm, ProEditor's ψ) must give exactly the tensors saved
        (ValueError naming the file).  The settings that hold no tensor (fusion, top_k, fisher_keep,
        ψ's "token" or "sentence"; edit_lr only set α's first value) cannot be checked that way and
        load as the file says: a file edited to fisher_keep=null, in its editor_kwargs and its
        editors alike, loads a ProEditor that edits without its Fisher mask, as one built so would.
        """
        from safetensors import SafetensorError

        check_path(path, "path")
        # Read as the str it stands for: str() of an os.PathLike other than pathlib's is its repr.
        path = os.fspath(path)
        if not os.path.isfile(path):  # not pathlib's: it drops a trailing "/" (GroupedEditor.load's test)
            raise FileNotFoundError(f"checkpoint not found: {path}")
        try:
            # The config and the tensors of one file, on the CPU (load_state_dict then copies each
            # once into its editor's device); a file without the config is refused unread.
            meta, keys, tensors = read_safetensors(path, {CHECKPOINT_KEY})
        except SafetensorError as exc:
            from .compat.mend import _CONVERT_HINT, _PICKLE_SUFFIXES

            what = ("its suffix says torch.save (pickle), which this package never unpickles"
                    if path.lower().endswith(_PICKLE_SUFFIXES) else "if it was written by torch.save")
            raise ValueError(f"path: {path} is not a safetensors file ({exc}); {what}: for an original MEND "
                             f"checkpoint, {_CONVERT_HINT}, then ModelEditor.from_mend(model, tokenizer, "
                             f"'mend.safetensors', inner_params)") from None
        if CHECKPOINT_KEY not in meta:
            mend = any(k == "edit_lrs" or k.endswith(".edit_lrs") for k in keys)  # MEND's per-weight steps
            hint = "; it looks like an original MEND checkpoint: use ModelEditor.from_mend" if mend else ""
            if "dcedit_config" in meta:  # GroupedEditor.save's key
                hint = "; it is a GroupedEditor checkpoint: GroupedEditor.load(path)"
            if "counters" in meta and "model_editor" in meta:  # train_checkpoint's trainer.safetensors
                hint = ("; it is a training checkpoint (trainer.safetensors: the optimisers' state): the "
                        "editor is editor.safetensors beside it")
            raise ValueError(f"{path} is not a ModelEditor checkpoint (no {CHECKPOINT_KEY} metadata){hint}")
        config = _checkpoint_config(path, meta[CHECKPOINT_KEY])
        # Editor arguments newer than the checkpoint (gate_norm) take the value it was trained with.
        config["editors"] = {key: with_absent_defaults(saved, config["method"])
                             for key, saved in config["editors"].items()}
        kwargs = dict(config["editor_kwargs"])
        # ModelEditor's own arguments are the config's other fields and the caller's, never an editor's:
        # in editor_kwargs (a damaged file) they raised TypeError "got multiple values for argument".
        named = {n for n, p in inspect.signature(cls.__init__).parameters.items() if p.kind is not p.VAR_KEYWORD}
        own = sorted(set(kwargs) & (named - {"self"}))
        if own:
            raise ValueError(f"{path}: its editor_kwargs hold {own}, arguments of ModelEditor itself, not of an editor")
        if config["method"] == "ft":  # accepted and ignored before 0.3.1, refused since
            kwargs = {k: v for k, v in kwargs.items() if k not in FT_KL_ONLY}
        if config["method"] == "ft_kl" and kwargs.get("locality_texts") == []:
            del kwargs["locality_texts"]  # taken up to 0.5.25 as None is (the generic sentences), refused since
        if config["method"] == "raeditor" and is_int(kwargs.get("top_k")) and kwargs["top_k"] > 1:
            del kwargs["top_k"]  # taken and ignored up to 0.5.22 (no gate reads it), refused since: see without_ignored_top_k
        if ignored_fusion(config["method"], kwargs):
            del kwargs["fusion"]  # taken and ignored up to 0.5.23 (one editor fuses nothing), refused since
        if ignored_gate_norm(config["method"], kwargs):
            del kwargs["gate_norm"]  # taken and ignored up to 0.5.24 (no gate reads it), refused since
        for name in ignored_sizes(config["method"], kwargs):
            del kwargs[name]  # feat_dim without a gate, generator_hidden without ψ: taken and ignored up to 0.5.24
        # Editor arguments whose preset default changed since (MoEditor's top_k: 1 before 0.2.0)
        # come from the saved editors, so an older checkpoint rebuilds the editor it was trained as.
        kwargs.update(changed_defaults_of(config["method"], config["editors"], kwargs))
        _check_saved_editors(path, config["editors"], kwargs, tensors)
        # The initial weights of unseeded editors, all overwritten below, drawn from a fork of
        # torch's generator: loading left the caller's random stream advanced.
        with torch.random.fork_rng(devices=[]):
            try:
                editor = cls(model, tokenizer, config["layers"], method=config["method"], tokens=config["tokens"],
                             loss_reduction=config.get("loss_reduction", LEGACY_LOSS_REDUCTION),
                             allow_tied=config.get("allow_tied", False), editor_device=editor_device,
                             capture_batch_size=capture_batch_size, rescale_batch_size=rescale_batch_size,
                             **kwargs)
            except ValueError as exc:
                # The layer names come from the file, not the caller: a bare "layers: no module named
                # ..." read as a mistake in the call (a user trial loaded SmolLM2's editor onto another model).
                if str(exc).startswith(_CALLER_ARGUMENTS):
                    raise
                if not str(exc).startswith("layers: "):
                    # The other arguments are the file's too (its method, tokens, editor_kwargs): "rank
                    # must be a positive int, got None" named no file.
                    raise ValueError(f"{path}: its config does not build a ModelEditor: {exc}") from None
                raise ValueError(f"{path}: the checkpoint's layers ({', '.join(config['layers'])}) do not fit "
                                 f"this model: {exc}") from None
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
        editor.load_state_tensors(tensors)
        return editor

    @classmethod
    def from_mend(cls, model: nn.Module, tokenizer, state_dict, inner_params: Sequence[str], prefix: str = "mend.",
                  norm: bool | None = None, edit_lrs_key: str | None = None, editor_device=None,
                  capture_batch_size: int | None = DEFAULT_CAPTURE_BATCH_SIZE,
                  allow_tied: bool = False) -> Self:
        """A "mend" ModelEditor holding the editors of an original MEND checkpoint (Mitchell et
        al.'s code, or EasyEdit's MEND): `apply` then edits each inner parameter as MEND's
        `edit()` does, W ← W + edit_lr · shift, from factors of MEND's loss
        (`compat.mend.LOSS_REDUCTION`, the batch-mean NLL).

        state_dict, prefix, norm, edit_lrs_key: as `compat.mend.load` takes them (a dict of
        tensors, MEND's trainer archive, or a safetensors path; never a pickle).  inner_params:
        MEND's `config.model.inner_params`, in its order ("<module>.weight" names of the model);
        their modules become `layers`, and shapes and Conv1D layouts are read off the model.
        editor_device, capture_batch_size, allow_tied: the constructor's (allow_tied=True takes an
        inner parameter whose weight another module shares, such as a tied LM head; an edit then
        changes both).  The editors are kept in fp32 (the constructor's type, and MEND's compute
        type).  `save` writes an ordinary checkpoint for `ModelEditor.load`.

        MEND's shared editors (one per weight shape, mode = the weight's index among the inner
        parameters of that shape) are ModelEditor's layout exactly; its non-shared editors (one
        per parameter) fit only when no two inner parameters have one shape (ValueError otherwise).

        Encoder-decoder models: the factors come from the model's own convention (decoder input =
        the labels shifted right, loss unshifted), which is MEND's for T5 only.  MEND shifts the
        loss of every other seq2seq model (`shift_targets`: "t5" not in the name) and feeds BART
        the target with its first token replaced by </s>, so a BART editor gets other factors
        than in MEND (a tiny BART's decoder fc1 gradient: cosine 0.40 with MEND's) and edits
        otherwise; a UserWarning says so.
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
        model_type = str(getattr(getattr(model, "config", None), "model_type", ""))
        if is_seq2seq(model) and "t5" not in model_type.lower():
            # MEND's seq2seq batches (data_classes/zsre.py, utils.shift_targets) match ours for T5 only.
            warn(f"ModelEditor.from_mend: {type(model).__name__} is an encoder-decoder model other than "
                 "T5; apply() captures its factors with the decoder input = the labels shifted right and "
                 "the loss unshifted (MEND's T5 convention), whereas MEND fed such models (BART) the target "
                 "with its first token replaced by </s> and shifted the loss, so the edits are not MEND's")
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
                     editor_device=editor_device, capture_batch_size=capture_batch_size, allow_tied=allow_tied,
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


# The arguments of ModelEditor.load that are the caller's, not the file's: the constructor's errors
# about them (which start with their names) are the caller's to fix, and name no file.
_CALLER_ARGUMENTS = ("model ", "tokenizer ", "editor_device", "capture_batch_size", "rescale_batch_size")

# What every checkpoint's config holds (format 1 on): ModelEditor.load reads them.
_CONFIG_FIELDS = {"method": str, "layers": list, "tokens": str, "editor_kwargs": dict, "editors": dict}
# Written by every save since format 2; only a format-1 checkpoint loads without them ("token", False).
_FORMAT_2_FIELDS = {"loss_reduction": str, "allow_tied": bool}


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
    for name, kind in (_CONFIG_FIELDS | (_FORMAT_2_FIELDS if version >= 2 else {})).items():
        if not isinstance(config.get(name), kind):
            got = "nothing" if name not in config else type(config[name]).__name__
            raise ValueError(f"{path}: its {CHECKPOINT_KEY} metadata needs {name!r} ({kind.__name__}), got {got}")
    for key, saved in config["editors"].items():  # each editor's config is read with .get below
        if not isinstance(saved, dict):
            raise ValueError(f"{path}: its {CHECKPOINT_KEY} metadata needs 'editors' of JSON objects, got "
                             f"{type(saved).__name__} for {key!r}")
    return config


# The editor arguments that size an editor's tensors, as editor_kwargs and each saved editor hold them.
_SIZE_ARGUMENTS = ("n_editors", "rank", "n_layers", "feat_dim", "generator_hidden")


def _check_saved_editors(path, editors: dict, kwargs: dict, tensors: dict) -> None:
    """ValueError naming the file unless each saved editor config gives the file's tensors of that
    editor (`check_saved_shapes`, without building it) and `kwargs` (the checkpoint's editor_kwargs)
    give each the sizes it holds: checked before ModelEditor.load builds its editors from `kwargs`,
    which took the memory the file's sizes asked for (editor_kwargs n_editors=10**6: 5.8 GB, then
    the allocator's RuntimeError; 2**40: its RuntimeError at once) before the editors were compared."""
    for key, saved in editors.items():
        # The message the comparison after the build gives (the built editor takes editor_kwargs' sizes).
        differ = [f"{k}: saved {saved.get(k)!r}, here {kwargs[k]!r}" for k in _SIZE_ARGUMENTS
                  if kwargs.get(k) is not None and kwargs[k] != saved.get(k)]
        if differ:
            raise ValueError(f"{path}: editor {key} differs from the one this model gives ({'; '.join(differ)})")
        prefix = f"editors.{key}."
        state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        check_saved_shapes(path, saved, state, f"{path}: the tensors of editor {key} do not match its config",
                           lambda k, p=prefix: f"{path}: tensor {p}{k}")


# Per method, the editor arguments whose default changed: ModelEditor.load takes them from the
# saved editors when a checkpoint's editor_kwargs lack them.
_CHANGED_DEFAULTS = {"moeditor": ("top_k", "gate_norm")}


def changed_defaults_of(method: str, editors: dict, kwargs: dict) -> dict:
    """The editor arguments of `_CHANGED_DEFAULTS` that `kwargs` lacks, as the saved `editors`
    (their configs, `with_absent_defaults` applied) hold them, where they all hold one value: what
    rebuilds the editor an older release trained (ModelEditor.load, and `dcedit train` resuming a
    run, which has no flag for them)."""
    found = {}
    for name in _CHANGED_DEFAULTS.get(method, ()):
        # A list, not a set: a damaged config's top_k [1] made a set raise TypeError (unhashable);
        # kept here, the editor's constructor refuses it.
        saved = [e.get(name) for e in editors.values()]
        if name not in kwargs and saved and saved[0] is not None and all(v == saved[0] for v in saved):
            found[name] = saved[0]
    return found
