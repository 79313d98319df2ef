"""dcedit_kernels: fused kernels and editors for divide-and-conquer knowledge editing."""

from typing import TYPE_CHECKING

from . import _library, ops, reference
from ._library import backends
from .editors import MEND, GroupedEdit, GroupedEditor, MoEditor, ProEditor, RaEditor
from .ops import op_backends

__version__ = "0.5.39"

if TYPE_CHECKING:  # what type checkers and IDEs read for the lazy names below (they saw Any)
    from .edit_handle import EditHandle
    from .lowrank_layers import lowrank_edited
    from .model_editor import ModelEditor
    from .models import load_model
    from .requests import EditRequest
    from .train import TrainConfig, train_editor
del TYPE_CHECKING  # not a name of the package's (dir() listed it)

# The editing pipeline imports transformers; load it on first use so `import dcedit_kernels`
# stays as light as the ops.
_LAZY = {
    "ModelEditor": "model_editor",
    "EditHandle": "edit_handle",
    "EditRequest": "requests",
    "TrainConfig": "train",
    "train_editor": "train",
    "lowrank_edited": "lowrank_layers",
    "load_model": "models",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    # The lazy names too, so dir() and tab completion list the pipeline's classes.
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "GroupedEdit",
    "GroupedEditor",
    "MEND",
    "MoEditor",
    "ProEditor",
    "RaEditor",
    "ModelEditor",
    "EditHandle",
    "EditRequest",
    "TrainConfig",
    "train_editor",
    "lowrank_edited",
    "load_model",
    "backends", "op_backends", "ops", "reference", "__version__"]
