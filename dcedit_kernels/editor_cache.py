"""Trained editors cached on disk, keyed by everything that determines them; and RaEditor twins.

The demo (`python/edit_demo.py`) and the report (`python/report.py`) train the same editors run
after run: `trained_editor` loads one from `cache_dir()` when an editor was trained with the same
settings (`editor_cache_key`), else trains and caches it (safetensors, written atomically).
`random_routing_twin` gives the paper's routing ablation of a trained MoEditor at no training cost.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Sequence


def cache_dir() -> Path:
    """Where trained demo editors are cached: $DCEDIT_CACHE_DIR, else $XDG_CACHE_HOME/dcedit_kernels,
    else ~/.cache/dcedit_kernels."""
    env = os.environ.get("DCEDIT_CACHE_DIR")
    if env:
        # "~/cache" from an env file or quoted in a shell is not expanded there: it made a folder
        # named "~" in the working directory (DCEDIT_DATA_DIR is expanded the same way).
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "dcedit_kernels"


def editor_cache_key(method: str, layers: list[str], kwargs: dict, train_config: dict,
                     train_ids: Sequence[str], model_file: str, model_dtype: str | None = None,
                     train_requests=None) -> str:
    """A hash of everything that determines a trained editor (package version, method, layers,
    editor arguments, training settings, the training edits, the model file's name, size and
    content (`_file_digest`: another model saved under the same name, of the same size, as two
    fine-tunes of one architecture and quantization are, is another model), and
    the dtype the model was trained in when given: an editor trained on an fp16 model is not the
    fp32 one's; and, when given, the content of the training requests, every field: ids that name
    only some of them, such as prompt and target, would not tell data with other rephrases or
    locality prompts apart); and the versions of what reads the model file: transformers (its
    tokenizer and weight conversion) and, for a .gguf file, the gguf package, whose `dequantize`
    transformers calls (SmolLM2's Q4_1 tensors): another version may load other weights or token
    ids from one file.

    The capture settings (`tokens`, `loss_reduction`), MoEditor's `gate_norm` and the training
    settings enter with their defaults resolved (a default written out is the same editor), so
    that changing a default (as when `TrainConfig.fisher_mask` appeared) gives a new key: an
    editor trained under the old semantics is never reused under the new ones.
    """
    import transformers

    from . import __version__
    from .editors.grouped_editor import GATE_NORM_DEFAULT
    from .train import TrainConfig

    model_path = Path(model_file)
    model_id = (f"{model_path.name}:{model_path.stat().st_size}:{_file_digest(model_path)}" if model_path.is_file()
                else str(model_file))
    capture = _capture_settings(kwargs)
    train = {k: v for k, v in dataclasses.asdict(TrainConfig(**train_config)).items() if k not in _NO_EFFECT}
    editor_kwargs = {k: v for k, v in kwargs.items() if k not in capture and k not in _RUNTIME}
    if method == "moeditor":  # resolved, as the settings above: a MoEditor cached before gate_norm read raw features
        editor_kwargs.setdefault("gate_norm", GATE_NORM_DEFAULT)
    readers = dict(transformers=transformers.__version__)
    if model_path.suffix == ".gguf":
        readers["gguf"] = _installed_version("gguf")
    blob = json.dumps(dict(version=__version__, readers=readers, method=method, layers=list(layers),
                           kwargs=editor_kwargs, capture=capture, train=train, edits=list(train_ids), model=model_id,
                           **({} if model_dtype is None else dict(model_dtype=model_dtype)),
                           **({} if train_requests is None else dict(requests=_requests_digest(train_requests)))),
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _installed_version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


# (resolved path, size, mtime_ns) -> sha256: read once per process (0.4 s for SmolLM2).  Shared by
# threads without a lock: two that miss at once both hash the file and store the same digest.
_FILE_DIGESTS: dict = {}


def _file_digest(path: Path) -> str:
    """The sha256 of a file's content, remembered for this process while its size and mtime stay."""
    st = path.stat()
    memo = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if memo not in _FILE_DIGESTS:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):  # hashlib.file_digest is Python 3.11+
                h.update(chunk)
        _FILE_DIGESTS[memo] = h.hexdigest()[:16]
    return _FILE_DIGESTS[memo]


def _requests_digest(requests) -> str:
    """A hash of every field of the requests (EditRequests), in order."""
    blob = json.dumps([dataclasses.asdict(r) if dataclasses.is_dataclass(r) else repr(r) for r in requests],
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# TrainConfig fields that do not change the trained editor (display, where checkpoints go), and
# the validation settings: `trained_editor` trains without val requests, so they change nothing
# (validation itself leaves the training's random draws as they were: `train._validate`); in the
# key they retrained an editor for a new val_every (or min_delta: it only compares validations' scores).
_NO_EFFECT = ("progress", "checkpoint_dir", "resume", "val_every", "val_size", "patience", "min_delta", "restore_best")
# ModelEditor arguments that do not change the trained editor (memory and placement only; not
# saved with it): `ModelEditor.load` takes them again, so a cached editor gets them as a new one does.
_RUNTIME = ("capture_batch_size", "editor_device", "rescale_batch_size")


def trained_editor(model, tokenizer, method: str, layers: list[str], kwargs: dict, train_config: dict,
                   train_requests, train_ids: Sequence[str], model_file: str, use_cache: bool = True,
                   progress: bool = True):
    """(ModelEditor, info): the editor loaded from `cache_dir()` when one was trained with the
    same settings (see `editor_cache_key`), else trained now (`TrainConfig(**train_config)`) and
    cached.  `info`: cached, path, train_s (0 when cached), steps, first_loss, last_loss (of the
    first and last steps with a loss; None when every batch was skipped), and for a cached editor
    trained_earlier_s (the training time of the run that cached it)."""
    from .model_editor import ModelEditor
    from .train import TrainConfig

    dtype = str(next(model.parameters()).dtype)
    key = editor_cache_key(method, layers, kwargs, train_config, train_ids, model_file, dtype,
                           train_requests=train_requests)
    path = cache_dir() / f"{method}-{key}.safetensors"
    info_path = path.with_suffix(".json")  # how the cached editor was trained (for reports)
    if use_cache and path.is_file():
        try:
            runtime = {k: kwargs[k] for k in _RUNTIME if k in kwargs}
            me = ModelEditor.load(path, model, tokenizer, **runtime)
            _check_capture_settings(me, kwargs)
        except (ValueError, OSError, KeyError, TypeError) as exc:  # a stale or damaged file: retrain
            print(f"ignoring the cached editor {path}: {exc}")
        else:
            try:
                earlier = json.loads(info_path.read_text())
            except (OSError, ValueError, RecursionError):  # RecursionError: JSON nested ~1000 deep
                earlier = {}
            if not isinstance(earlier, dict):  # a list or a number: earlier.get raised AttributeError
                earlier = {}
            return me, dict(earlier, cached=True, path=str(path), train_s=0.0,
                            trained_earlier_s=earlier.get("train_s"))
    me = ModelEditor(model, tokenizer, layers=list(layers), method=method, **kwargs)
    start = time.perf_counter()
    result = me.fit(train_requests, None, TrainConfig(**{"progress": progress, **train_config}))
    # A step whose every batch was skipped (non-finite) logs no loss: the first and last that do.
    losses = [step["loss"] for step in result.history if "loss" in step]
    info = dict(cached=False, path=str(path), train_s=time.perf_counter() - start, steps=result.steps,
                skipped_batches=result.skipped_batches,
                first_loss=losses[0] if losses else None, last_loss=losses[-1] if losses else None)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        me.save(path)  # atomic (save_safetensors): a concurrent run never reads half a file
        from .cli import write_json

        write_json(info_path, info)
    except OSError as exc:  # a read-only home: still usable, retrained next time
        print(f"could not cache the editor at {path}: {exc}")
    return me, info


def _capture_settings(kwargs: dict) -> dict:
    """The capture settings ModelEditor(**kwargs) would use, defaults resolved."""
    from .model_editor import DEFAULT_LOSS_REDUCTION

    return dict(tokens=kwargs.get("tokens", "all"), loss_reduction=kwargs.get("loss_reduction", DEFAULT_LOSS_REDUCTION))


def _check_capture_settings(me, kwargs: dict) -> None:
    """ValueError when a cached editor was saved with other capture settings than asked for."""
    wanted = _capture_settings(kwargs)
    saved = dict(tokens=me.tokens, loss_reduction=me.loss_reduction)
    if saved != wanted:
        raise ValueError(f"it was trained with {saved}, not {wanted}")


def random_routing_twin(moeditor, **kwargs):
    """A RaEditor holding a trained MoEditor's editors, with random groups instead of the gate
    (the paper's routing ablation, at no training cost): everything but the gate is copied, and the
    capture settings (tokens, loss_reduction, allow_tied: the scale its editors were trained on;
    and capture_batch_size, rescale_batch_size) are the MoEditor's.  `kwargs`: the RaEditor's
    constructor arguments (n_editors, rank, ... as the MoEditor's).

    Not a scale-matched ablation: the twin applies each edit at weight 1, while the MoEditor's α
    were learned with its gate's softmax weights (top-2 means of 0.54-0.60 on zsRE), so the twin's
    shifts are larger (1.5-1.9× on block 27 there).  With α scaled by the gate's mean weight it
    scored level with the MoEditor (RESULTS.md, "MoEditor against MEND ... 125-edit batches")."""
    from .model_editor import ModelEditor

    if moeditor.method != "moeditor":
        raise ValueError(f"moeditor must be a ModelEditor with method 'moeditor', got {moeditor.method!r}")
    kwargs = dict(dict(tokens=moeditor.tokens, loss_reduction=moeditor.loss_reduction,
                       allow_tied=moeditor.allow_tied, capture_batch_size=moeditor.capture_batch_size,
                       rescale_batch_size=moeditor.rescale_batch_size), **kwargs)
    twin = ModelEditor(moeditor.model, moeditor.tokenizer, layers=moeditor.layers, method="raeditor", **kwargs)
    state = moeditor.state_tensors()
    missing = sorted(set(twin.state_tensors()) - set(state))
    if missing:
        raise ValueError(f"the MoEditor has no {missing[:3]}: build the RaEditor with the MoEditor's arguments")
    twin.load_state_tensors({k: state[k] for k in twin.state_tensors()})
    return twin
