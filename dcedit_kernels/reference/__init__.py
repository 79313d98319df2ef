"""Plain PyTorch references of every op: the test oracle and the fallback path.

They take already-validated inputs, compute in fp32 (fp64 when any input is fp64; `apply_shift_`:
when the weight is) and are written for clarity, not memory: the fused modes of `grouped_outer`
here do hold G o×i matrices.
"""

from .apply_shift import apply_shift_, undo_shift_
from .fisher_mask import fisher_mask, fisher_threshold_for_keep, keep_count
from .grouped_lowrank import grouped_lowrank, grouped_lowrank_backward
from .grouped_outer import grouped_outer, grouped_outer_backward
from .lowrank_delta_linear import lowrank_delta_linear, lowrank_delta_linear_backward
from .routing import noisy_topk_gate, sort_by_group
from .segmented_fisher import segmented_fisher
from .segments import group_ids, segment_bounds

__all__ = [
    "apply_shift_",
    "undo_shift_",
    "fisher_mask",
    "fisher_threshold_for_keep",
    "keep_count",
    "grouped_lowrank",
    "grouped_lowrank_backward",
    "grouped_outer",
    "grouped_outer_backward",
    "lowrank_delta_linear",
    "lowrank_delta_linear_backward",
    "noisy_topk_gate",
    "sort_by_group",
    "segmented_fisher",
    "group_ids",
    "segment_bounds",
]
