"""The public op wrappers: validate arguments (ValueError naming the argument), then call the
`dcedit` custom op, which dispatches to the C++, Triton or reference kernel for the device."""

from ._dispatch import op_backends, reference_mode
from .apply_shift import apply_shift_, undo_shift_
from .fisher_mask import fisher_mask
from .grouped_lowrank import grouped_lowrank
from .grouped_outer import grouped_outer
from .lowrank_delta_linear import lowrank_delta_linear
from .routing import noisy_topk_gate, sort_by_group
from .segmented_fisher import segmented_fisher

__all__ = [
    "apply_shift_",
    "undo_shift_",
    "fisher_mask",
    "grouped_lowrank",
    "grouped_outer",
    "lowrank_delta_linear",
    "noisy_topk_gate",
    "sort_by_group",
    "segmented_fisher",
    "op_backends",
    "reference_mode",
]
