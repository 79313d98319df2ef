"""dcedit_kernels: fused kernels and editors for divide-and-conquer knowledge editing."""

from . import _library, ops, reference
from ._library import backends
from .editors import MEND, GroupedEdit, GroupedEditor, MoEditor, ProEditor, RaEditor
from .ops import op_backends

__version__ = "0.1.0"

__all__ = [
    "GroupedEdit",
    "GroupedEditor",
    "MEND",
    "MoEditor",
    "ProEditor",
    "RaEditor",
    "backends", "op_backends", "ops", "reference", "__version__"]
