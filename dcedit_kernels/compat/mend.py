"""Load the editors of an original MEND checkpoint (Mitchell et al., eric-mitchell/mend).

MEND's layout (``mend.combine=True``, ``mlp_class=IDMLP``, ``mend.init=id``, its defaults; a
checkpoint trained with another ``init`` has the same keys but layers without the residual, which
the state dict does not tell apart: it would load as residual, so convert only ``init=id`` ones):

- ``mend.<editor>.mlp.layers.{k}.{u, v, bias}``: the k-th residual low-rank layer over
  ``[μ; η]`` (d = in + out; u (d, r), v (r, d), bias (d,));
  ``...mode_scale.weight`` / ``...mode_shift.weight`` (n_modes, d): the per-weight "modes".
- ``mend.<editor>.{u_mean, v_mean, u_std, v_std, u_s, v_s, k}``: running statistics of μ (u)
  and η (v), used frozen in eval as ``(x - mean) / (std + 1e-7)``.
- ``edit_lrs`` (n_inner,): the step of each inner parameter, in ``inner_params`` order.

Older MEND archives hold the editors under ``gtn.`` instead of ``mend.`` (ROME's and EasyEdit's
MEND loaders rename ``gtn.`` to ``mend.`` in every archive they load): with the default prefix, a
checkpoint with no ``mend.`` key and some ``gtn.`` ones is read under ``gtn.``.

Shared editors (``mend.shared=True``) are keyed ``str((in, out))``, one per weight shape; the
mode of a weight is its index among the inner parameters of that shape.  Non-shared editors are
keyed by the parameter name with "." replaced by "#" and have no modes (scale 1, shift 0).

Each editor becomes a :class:`GroupedEditor` (one editor, ``routing="single"``, ``fusion="add"``),
whose ``grouped_lowrank`` layers compute exactly MEND's ``LRLinear`` (clamp, not relu; residual)
and whose ``alpha[mode]`` holds that weight's ``edit_lr``: ``W ← W + edit_lr · Σ η̃ μ̃ᵀ``, as
MEND's ``edit()`` does in eval mode.  ``ModelEditor.from_mend(model, tokenizer, state_dict,
inner_params)`` puts these editors in a ModelEditor (apply / undo / save / evaluate_method).

Which loss the factors must come from (``LOSS_REDUCTION = "token"``): MEND's ``edit()``
backpropagates ``masked_log_probs(...)["nll"]``, the mean NLL over every label token of the batch,
and its editors were trained that way: their running statistics (``u_mean``/``v_std``...) and
``edit_lrs`` are on the scale of η with its 1/(label tokens in the batch) factor.  Feed the views
factors of that loss, e.g. ``ModelEditor(..., loss_reduction=LOSS_REDUCTION).capture(batch)`` or
``capture.compute_factors`` with the model's own ``outputs.loss``, to get MEND's edits ("token" is also
ModelEditor's default); the per-edit loss ("edit") would scale each edit's η up by about the
number of edits in the batch and change what the normalisation and the steps see.
"""

from __future__ import annotations

import operator
import os
import re
from collections.abc import Iterable, Mapping

import torch

from .._checks import all_finite
from ..devices import as_device
from ..editors.grouped_editor import GroupedEditor, MendWeightView

# The capture loss MEND's editors were trained and applied with (see the module docstring).
LOSS_REDUCTION = "token"

# The editors' key prefix of older MEND archives, which ROME's and EasyEdit's loaders rename to "mend.".
_OLD_PREFIX = "gtn."
_LAYER_FIELD = re.compile(r"mlp\.layers\.(\d+)\.(u|v|bias|mode_scale\.weight|mode_shift\.weight)")
_MODE_FIELDS = ("mode_scale.weight", "mode_shift.weight")
_NORM_BUFFERS = ("u_mean", "v_mean", "u_std", "v_std", "u_s", "v_s", "k")
# Extensions torch.save files usually carry; loading them would mean unpickling.
_PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl", ".pickle", ".tar", ".bk")
_CONVERT_HINT = (
    "convert it once, from a file you trust, with: "
    "a = torch.load(path, map_location='cpu', weights_only=False); sd = a.get('model', a); "
    "safetensors.torch.save_file({k: v.contiguous() for k, v in sd.items() "
    "if isinstance(v, torch.Tensor)}, 'mend.safetensors')"
)


def load(state_dict, inner_params, shapes, prefix: str = "mend.", norm: bool | None = None,
         conv1d: bool | Iterable[str] = False, device=None, dtype: torch.dtype | None = None,
         edit_lrs_key: str | None = None) -> dict[str, MendWeightView]:
    """Editors of an original MEND checkpoint, one view per inner parameter.

    state_dict: ``MEND.state_dict()`` (a dict of tensors; non-tensor entries outside ``prefix``
    such as ``model_config`` are ignored), the archive MEND's trainer saves (its ``"model"``
    entry is used), or the path of a safetensors file (never a pickle: a ``.pt`` path raises).
    inner_params: ``config.model.inner_params``, in MEND's order (it fixes edit_lrs and modes).
    shapes: ``{name: (in_features, out_features)}`` for every inner parameter.
    norm: MEND's ``mend.norm``; the checkpoint does not record it, so None means "the running
    statistics are in the checkpoint" (True for every MEND checkpoint, MEND's default); pass
    False for a checkpoint trained with ``mend.norm=False``.
    conv1d: True when every weight is stored in × out (MEND's GPT-2 models), or the names of
    those that are.  device / dtype: where and in what to keep the editors (default: the
    checkpoint's device; float64 for a float64 checkpoint, else float32, MEND's compute type).
    edit_lrs_key: default ``prefix`` with its trailing "mend." replaced by "edit_lrs".

    prefix: what the editors' keys start with, ending with "." (MEND's ``"mend."``; with it, a
    checkpoint without ``mend.`` keys whose editors are under ``"gtn."``, an older MEND's, is read there).

    Returns ``{name: MendWeightView}`` in ``inner_params`` order.  Raises ValueError naming the
    key for a missing, unexpected or badly shaped entry, and naming the argument for a bad one.
    """
    if not isinstance(prefix, str) or not prefix.endswith("."):
        # Keys are <prefix><editor>.<field>: without the trailing dot the editor names come out wrong.
        raise ValueError(f"prefix must be a str ending with '.' (MEND's 'mend.'), got {prefix!r}")
    if norm is not None and not isinstance(norm, bool):
        raise ValueError(f"norm must be None, True or False, got {norm!r}")
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"dtype must be None or a floating torch.dtype, got {dtype!r}")
    if edit_lrs_key is not None and not isinstance(edit_lrs_key, str):
        raise ValueError(f"edit_lrs_key must be None or a str, got {type(edit_lrs_key).__name__}")
    device = as_device(device, "device")
    state_dict = _read_state_dict(state_dict)
    prefix = _editor_prefix(state_dict, prefix)
    names = _check_inner_params(inner_params)
    dims = _check_shapes(shapes, names)
    conv1d_names = _check_conv1d(conv1d, names)
    if edit_lrs_key is None:
        edit_lrs_key = (prefix[: -len("mend.")] if prefix.endswith("mend.") else "") + "edit_lrs"
    edit_lrs = _edit_lrs(state_dict, edit_lrs_key, len(names))
    editors = _editor_fields(state_dict, prefix, edit_lrs_key)

    # Which of MEND's two layouts: one editor per shape (shared) or one per parameter.
    shared_keys = {str(dims[n]): None for n in names}
    separate_keys = {n.replace(".", "#"): None for n in names}
    shared = any(k.startswith("(") for k in editors) or not editors
    expected = shared_keys if shared else separate_keys
    for key in editors:
        if key not in expected:
            raise ValueError(f"unexpected key {prefix}{key}.*: no inner parameter "
                             f"{'has shape' if shared else 'is named'} {key}")
    for key in expected:
        if key not in editors:
            raise ValueError(f"missing key {prefix}{key}.mlp.layers.0.u (the editor of "
                             f"{'shape' if shared else 'parameter'} {key})")

    if norm is None:
        norm = any(b in fields for fields in editors.values() for b in _NORM_BUFFERS)
    if dtype is None:
        some_u = next(iter(editors.values())).get("mlp.layers.0.u")
        dtype = torch.float64 if some_u is not None and some_u.dtype == torch.float64 else torch.float32

    # Weights of one shape in inner_params order: their index there is MEND's mode.
    users: dict[str, list[str]] = {}
    for n in names:
        users.setdefault(str(dims[n]) if shared else n.replace(".", "#"), []).append(n)
    built: dict[str, GroupedEditor] = {}
    for key, members in users.items():
        in_f, out_f = dims[members[0]]
        editor = _build_editor(prefix + key + ".", editors[key], in_f, out_f,
                               len(members) if shared else None, norm, dtype)
        with torch.no_grad():
            for mode, n in enumerate(members):
                editor.alpha[mode] = float(edit_lrs[names.index(n)])  # exact: Python floats are doubles
        built[key] = editor.to(device) if device is not None else editor.to(edit_lrs.device)

    views = {}
    for n in names:
        key = str(dims[n]) if shared else n.replace(".", "#")
        views[n] = MendWeightView(n, built[key], users[key].index(n), n in conv1d_names)
    return views


# ---------------------------------------------------------------------- argument checks
def _read_state_dict(source) -> Mapping:
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if path.lower().endswith(_PICKLE_SUFFIXES):
            raise ValueError(f"state_dict: {path!r} looks like a torch.save (pickle) file, which this "
                             f"loader never unpickles; {_CONVERT_HINT}")
        if not os.path.isfile(path):
            raise ValueError(f"state_dict: no file at {path!r}")
        from ..safetensors_file import read_safetensors

        try:
            # One held read of one file, as the editors' loads read theirs: load_file parsed one file's
            # header and mapped the path again for the tensors, so a save over it in between gave
            # tensors read at another file's offsets.
            return read_safetensors(path, set())[2]
        except OSError:  # the OS's own, naming the file: one it may not read is not "not a safetensors file"
            raise
        except Exception as exc:  # safetensors' own error type differs across versions
            raise ValueError(f"state_dict: {path!r} is not a safetensors file ({exc}); if it is a MEND "
                             f"archive saved by torch.save, {_CONVERT_HINT}") from exc
    if not isinstance(source, Mapping):
        raise ValueError(f"state_dict must be a mapping of tensors or a safetensors path, "
                         f"got {type(source).__name__}")
    if isinstance(source.get("model"), Mapping) and not any(
            isinstance(v, torch.Tensor) for v in source.values()):
        return source["model"]  # the archive MEND's trainer saves: {"model": ..., "opt": ...}
    return source


def _editor_prefix(state_dict: Mapping, prefix: str) -> str:
    """`prefix`, or "gtn." in place of the default "mend." for an older MEND archive: one with no key
    under "mend." and some under "gtn." (ROME's and EasyEdit's MEND loaders rename "gtn." to "mend."
    in every archive they load).  Read with "mend.", such a checkpoint raised "missing key mend.(in, out)...",
    naming the keys it has nowhere."""
    if prefix != "mend.":
        return prefix
    keys = [k for k in state_dict if isinstance(k, str)]
    if any(k.startswith(prefix) for k in keys) or not any(k.startswith(_OLD_PREFIX) for k in keys):
        return prefix
    return _OLD_PREFIX


def _check_inner_params(inner_params) -> list[str]:
    if isinstance(inner_params, str) or not isinstance(inner_params, Iterable):
        raise ValueError(f"inner_params must be a list of parameter names, got {type(inner_params).__name__}")
    names = list(inner_params)
    if not names:
        raise ValueError("inner_params must name at least one parameter")
    for n in names:
        if not isinstance(n, str):
            raise ValueError(f"inner_params must hold str names, got {n!r}")
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise ValueError(f"inner_params names {dup!r} twice")
    return names


def _check_shapes(shapes, names) -> dict[str, tuple[int, int]]:
    if not isinstance(shapes, Mapping):
        raise ValueError(f"shapes must be a dict name -> (in_features, out_features), got {type(shapes).__name__}")
    dims = {}
    for n in names:
        if n not in shapes:
            raise ValueError(f"shapes has no entry for inner parameter {n!r}")
        try:
            in_f, out_f = (operator.index(x) for x in shapes[n])
        except (TypeError, ValueError):
            raise ValueError(f"shapes[{n!r}] must be (in_features, out_features) ints, got {shapes[n]!r}") from None
        if in_f < 1 or out_f < 1:
            raise ValueError(f"shapes[{n!r}] must be positive, got {(in_f, out_f)}")
        dims[n] = (in_f, out_f)  # plain ints: MEND's shared keys are str(tuple of int)
    return dims


def _check_conv1d(conv1d, names) -> set[str]:
    if isinstance(conv1d, bool):
        return set(names) if conv1d else set()
    # A mapping is refused rather than read as its keys: {name: False} would have made that weight Conv1D.
    if isinstance(conv1d, (str, Mapping)) or not isinstance(conv1d, Iterable):
        raise ValueError(f"conv1d must be a bool or a collection of inner parameter names, got {conv1d!r}")
    items = list(conv1d)
    for n in items:  # before set() and sorted(): a nested list or mixed types raised TypeError there
        if not isinstance(n, str):
            raise ValueError(f"conv1d must hold inner parameter names (str), got {n!r}")
    chosen = set(items)
    unknown = chosen - set(names)
    if unknown:
        raise ValueError(f"conv1d names {sorted(unknown)[0]!r}, which is not in inner_params")
    return chosen


def _edit_lrs(state_dict, key, n) -> torch.Tensor:
    if key not in state_dict:
        raise ValueError(f"missing key {key} (MEND's per-parameter edit_lrs)")
    lrs = state_dict[key]
    if not isinstance(lrs, torch.Tensor) or not lrs.is_floating_point():
        raise ValueError(f"{key} must be a float tensor, got "
                         f"{lrs.dtype if isinstance(lrs, torch.Tensor) else type(lrs).__name__}")
    if lrs.shape != (n,):
        raise ValueError(f"{key} must have shape ({n},), one per inner parameter, got {tuple(lrs.shape)}")
    return lrs.detach()


def _editor_fields(state_dict, prefix, edit_lrs_key) -> dict[str, dict[str, torch.Tensor]]:
    """{editor key: {field: tensor}} for every key under prefix."""
    editors: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state_dict.items():
        if not isinstance(key, str) or not key.startswith(prefix) or key == edit_lrs_key:
            continue
        editor_key, _, field = key[len(prefix):].partition(".")
        if not field:
            raise ValueError(f"unexpected key {key}: expected {prefix}<editor>.<field>")
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"{key} must be a tensor, got {type(value).__name__}")
        editors.setdefault(editor_key, {})[field] = value.detach()
    return editors


def _build_editor(key_prefix, fields, in_f, out_f, n_modes, norm, dtype) -> GroupedEditor:
    """A GroupedEditor holding one MEND GradientTransform (n_modes None: not shared, no modes)."""
    d = in_f + out_f
    layers: dict[int, dict[str, torch.Tensor]] = {}
    buffers = {}
    for field, t in fields.items():
        if field in _NORM_BUFFERS:
            buffers[field] = t
            continue
        m = _LAYER_FIELD.fullmatch(field)
        if m is None or (n_modes is None and m[2] in _MODE_FIELDS):
            raise ValueError(f"unexpected key {key_prefix}{field}: not part of MEND's combined IDMLP "
                             f"editor (mend.combine=True, mlp_class=IDMLP"
                             f"{', non-shared editors have no modes' if m is not None else ''})")
        layers.setdefault(int(m[1]), {})[m[2]] = t
    n_layers = len(layers)
    for k in range(n_layers):
        if k not in layers:
            raise ValueError(f"missing key {key_prefix}mlp.layers.{k}.u (layers must be numbered 0..{n_layers - 1})")

    first_u = layers[0].get("u")
    if first_u is None:
        raise ValueError(f"missing key {key_prefix}mlp.layers.0.u")
    if first_u.dim() != 2 or first_u.shape[0] != d or not 1 <= first_u.shape[1] <= d:
        raise ValueError(f"{key_prefix}mlp.layers.0.u must have shape ({d}, r) with 1 <= r <= {d} "
                         f"(d = in + out = {in_f} + {out_f}), got {tuple(first_u.shape)}")
    rank = first_u.shape[1]
    wanted = {"u": (d, rank), "v": (rank, d), "bias": (d,)}
    if n_modes is not None:
        wanted.update({f: (n_modes, d) for f in _MODE_FIELDS})
    for k in range(n_layers):
        for field, shape in wanted.items():
            t = layers[k].get(field)
            key = f"{key_prefix}mlp.layers.{k}.{field}"
            if t is None:
                raise ValueError(f"missing key {key}")
            if tuple(t.shape) != shape or not t.is_floating_point():
                raise ValueError(f"{key} must be a float tensor of shape {shape}, got {t.dtype} {tuple(t.shape)}")

    if norm:
        sizes = {"u": in_f, "v": out_f}
        for b in _NORM_BUFFERS:
            key = f"{key_prefix}{b}"
            if b not in buffers:
                raise ValueError(f"missing key {key} (MEND's running statistics; pass norm=False for a "
                                 f"checkpoint trained without them)")
            t = buffers[b]
            shape = (sizes[b[0]],) if b != "k" else None
            if (shape is not None and tuple(t.shape) != shape) or (b == "k" and t.numel() != 1):
                raise ValueError(f"{key} must have shape {shape or (1,)}, got {tuple(t.shape)}")
            if not t.is_floating_point():  # MEND's are; an int or bool one was copied in, cast, as the layers' are not
                raise ValueError(f"{key} must be a float tensor (MEND's running statistics), got {t.dtype}")
            if b != "k" and not all_finite(t):
                raise ValueError(f"{key} is not finite: the editor's statistics were never trained")
        # RunningNorm is the identity below two tokens; MEND never normalises with so few.
        count = float(buffers["k"].reshape(()))
        if not count >= 2:  # also catches NaN: MEND's k before any training
            raise ValueError(f"{key_prefix}k must be >= 2 (tokens behind the statistics), got {count}")

    with torch.device("cpu"):  # whatever torch.set_default_device says: on "meta" the copies below had no data
        editor = GroupedEditor(in_f, out_f, n_editors=1, rank=rank, n_layers=n_layers,
                               n_modes=n_modes or 1, routing="single", fusion="add", norm=bool(norm),
                               seed=0)  # seeded: loading must not draw from the global RNG
    editor = editor.to(dtype)
    with torch.no_grad():
        for k, layer in enumerate(editor.layers):
            layer.u[0].copy_(layers[k]["u"])
            layer.v[0].copy_(layers[k]["v"])
            layer.bias[0].copy_(layers[k]["bias"])
            if n_modes is not None:  # otherwise the constructor's scale 1 / shift 0 stand
                layer.mode_scale[0].copy_(layers[k]["mode_scale.weight"])
                layer.mode_shift[0].copy_(layers[k]["mode_shift.weight"])
        if norm:
            for b in _NORM_BUFFERS:
                getattr(editor.norm, b).copy_(buffers[b].reshape(getattr(editor.norm, b).shape))
    editor.eval()
    return editor
