from .grouped_edit import GroupedEdit
from .grouped_editor import GroupedEditor
from .presets import MEND, MoEditor, ProEditor, RaEditor

__all__ = ["GroupedEdit", "GroupedEditor", "MEND", "MoEditor", "ProEditor", "RaEditor"]
