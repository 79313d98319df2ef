"""Triton kernels and their launchers (CUDA tensors; CPU tensors under TRITON_INTERPRET=1).

One small file per kernel, launcher beside it.  Launchers check shapes, dtypes and devices but
not offset values (that needs a host copy; the op layer in `dcedit_kernels.ops` does it), and
never synchronise with the host.  launch.py decides the dot form (tensor cores for 16-bit
inputs on a GPU) and the launch configs; `python -m dcedit_kernels.triton_kernels.compile_check`
compiles every kernel for sm_90 without a GPU and `... .tune` times the config candidates on one.
"""

from .grouped_lowrank import grouped_lowrank, grouped_lowrank_backward
from .grouped_outer import grouped_outer
from .grouped_outer_backward import grouped_outer_backward
from .lowrank_delta_linear import lowrank_delta_linear, lowrank_delta_linear_backward
from .segment_matmul import segment_matmul
from .segmented_fisher import segmented_fisher

__all__ = [
    "grouped_lowrank",
    "grouped_lowrank_backward",
    "grouped_outer",
    "grouped_outer_backward",
    "lowrank_delta_linear",
    "lowrank_delta_linear_backward",
    "segment_matmul",
    "segmented_fisher",
]
