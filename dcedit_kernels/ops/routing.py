"""dcedit::noisy_topk_gate and dcedit::sort_by_group: routing edits to editors."""

import torch

from .. import reference
from .._checks import check_tensor
from .._library import _LIB
from ._dispatch import REGISTRY, opcall

# A composite of differentiable torch ops: autograd flows through the decomposition, so the
# gate needs no hand-written backward.
_LIB.impl("noisy_topk_gate", reference.noisy_topk_gate, "CompositeImplicitAutograd")
_LIB.impl("sort_by_group", reference.sort_by_group, "CompositeExplicitAutograd")
REGISTRY["noisy_topk_gate"] = {"CPU": "reference", "CUDA": "reference"}
REGISTRY["sort_by_group"] = {"CPU": "reference", "CUDA": "reference"}


@torch.library.register_fake("dcedit::sort_by_group")
def _(group_of_row, G):
    n = group_of_row.shape[0]
    perm = group_of_row.new_empty((n,), dtype=torch.int64)
    return perm, torch.empty_like(perm), group_of_row.new_empty((G + 1,), dtype=torch.int32)


def noisy_topk_gate(feats, w_gate, w_noise, k=1, training=True, generator=None):
    """Noisy top-k gating (Shazeer et al. 2017) of E edits over G editors.

    logits = f W_g + ε ⊙ softplus(f W_noise), ε ~ N(0, 1) only when training; keep the top k,
    softmax over them.  feats (E, f), w_gate and w_noise (f, G).  Returns (gates (E, G),
    chosen group per edit (E,) int64 — the top-1 — and the importance + load balancing loss).
    """
    check_tensor(feats, "feats", 2)
    check_tensor(w_gate, "w_gate", 2)
    check_tensor(w_noise, "w_noise", 2)
    if w_gate.shape[0] != feats.shape[1] or w_noise.shape != w_gate.shape:
        raise ValueError(
            f"w_gate and w_noise must be ({feats.shape[1]}, G), got {tuple(w_gate.shape)} and {tuple(w_noise.shape)}"
        )
    G = w_gate.shape[1]
    if not isinstance(k, int) or not 1 <= k <= G:
        raise ValueError(f"k must be an int in [1, {G}], got {k!r}")
    noise = None
    if training:
        noise = torch.randn(feats.shape[0], G, generator=generator, device=feats.device, dtype=feats.dtype)
    return opcall("noisy_topk_gate")(feats, w_gate, w_noise, k, noise)


def sort_by_group(group_of_row, G):
    """Stable permutation that makes groups contiguous, its inverse, and int32 offsets (G+1,)."""
    if not isinstance(group_of_row, torch.Tensor) or group_of_row.dtype not in (torch.int32, torch.int64):
        raise ValueError("group_of_row must be an int32 or int64 tensor")
    if group_of_row.dim() != 1:
        raise ValueError(f"group_of_row must be 1-D, got shape {tuple(group_of_row.shape)}")
    if not isinstance(G, int) or G < 1:
        raise ValueError(f"G must be a positive int, got {G!r}")
    if group_of_row.numel() and (int(group_of_row.min()) < 0 or int(group_of_row.max()) >= G):
        raise ValueError(f"group_of_row entries must be in [0, {G - 1}]")
    return opcall("sort_by_group")(group_of_row, G)
