"""dcedit::noisy_topk_gate and dcedit::sort_by_group: routing edits to editors."""

import torch

from .. import reference
from .._checks import MAX_INT32_ROWS, check_bool, check_ids, check_same_device, check_tensor, compute_dtype, is_int
from .._library import _LIB
from ._dispatch import REGISTRY, checked, opcall


@torch.library.register_fake("dcedit::sort_by_group")
def _(group_of_row, G):
    n = group_of_row.shape[0]
    perm = group_of_row.new_empty((n,), dtype=torch.int64)
    return perm, torch.empty_like(perm), group_of_row.new_empty((G + 1,), dtype=torch.int32)


def noisy_topk_gate(feats, w_gate, w_noise, k=1, training=True,
                    generator=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Noisy top-k gating (Shazeer et al. 2017) of E edits over G editors.

    logits = f W_g + ε ⊙ (softplus(f W_noise) + 0.01), ε ~ N(0, 1) only when training; keep the
    top k, softmax over them.  The 0.01 is Shazeer et al.'s `noise_epsilon` (in their code, not in
    their paper's equation): it keeps the noise scale, which the smooth load estimate
    divides by, away from 0 where softplus underflows.  feats (E, f), w_gate and w_noise (f, G),
    any float dtypes: computed in fp32 (fp64 if any is fp64); k an int in [1, G]; training: a
    bool; generator: the torch.Generator ε is drawn from (on its own device, then moved to
    feats'), None: torch's default generator of feats' device.  Returns (gates (E, G) in that
    dtype, chosen group per edit (E,) int64 — the top-1 — and the importance + load balancing
    loss).
    """
    check_noisy_topk_gate(feats, w_gate, w_noise, k)
    # Read for its truth: training="False" (or None for "use the default") drew the noise, or
    # dropped it, silently; the package's other flags are bools too (GroupedEditor's norm).
    check_bool(training, "training")
    # Checked even when not training (then unused): a wrong generator is a mistake either way,
    # and torch.randn's own TypeError would not name it.
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    G = w_gate.shape[1]
    acc = compute_dtype(feats, w_gate, w_noise)
    feats, w_gate, w_noise = feats.to(acc), w_gate.to(acc), w_noise.to(acc)  # differentiable casts
    noise = None
    if training:
        # Drawn on the generator's device, then moved to the features': torch draws on a device from
        # that device's generator only, so a CPU generator (what GroupedEditor seeds) with features
        # on a GPU raised torch's "Expected a 'cuda' device type for generator but found 'cpu'".
        where = generator.device if generator is not None else feats.device
        # No generator= keyword without one: randn's generator overload has no symbolic-size kernel, so
        # a compiled gate (a MoEditor's training) failed in dynamo's fake run once its edit count went
        # dynamic ("SymIntArrayRef expected to contain only concrete integers"), at its second count.
        drawn = dict(generator=generator) if generator is not None else {}
        noise = torch.randn(feats.shape[0], G, **drawn, device=where, dtype=acc).to(feats.device)
    return opcall("noisy_topk_gate")(feats, w_gate, w_noise, k, noise)


def check_noisy_topk_gate(feats, w_gate, w_noise, k=1, noise=None, raw=False):
    """The gate's checks; `raw` (the `torch.ops.dcedit` op, which the wrapper calls with one
    dtype and its own noise) also wants one dtype and an (E, G) noise."""
    check_tensor(feats, "feats", 2)
    check_tensor(w_gate, "w_gate", 2)
    check_tensor(w_noise, "w_noise", 2)
    if w_gate.shape[0] != feats.shape[1] or w_noise.shape != w_gate.shape:
        raise ValueError(
            f"w_gate and w_noise must be ({feats.shape[1]}, G), got {tuple(w_gate.shape)} and {tuple(w_noise.shape)}"
        )
    G = w_gate.shape[1]
    if G == 0:  # before k's range, which read "k must be an int in [1, 0], got 1"
        raise ValueError(f"w_gate and w_noise must have at least one column (G >= 1 editors to route to), "
                         f"got {tuple(w_gate.shape)}")
    if not is_int(k) or not 1 <= k <= G:
        raise ValueError(f"k must be an int in [1, {G}], got {k!r}")
    check_same_device(dict(feats=feats, w_gate=w_gate, w_noise=w_noise, noise=noise))
    if raw:
        if noise is not None:
            check_tensor(noise, "noise", 2)
            if noise.shape != (feats.shape[0], G):
                raise ValueError(f"noise must have shape ({feats.shape[0]}, {G}), got {tuple(noise.shape)}")
        dtypes = {t.dtype for t in (feats, w_gate, w_noise, noise) if t is not None}
        if len(dtypes) > 1:
            raise ValueError(f"feats, w_gate, w_noise and noise must share one dtype, got {sorted(map(str, dtypes))}")


def check_sort_by_group(group_of_row, G):
    if not isinstance(group_of_row, torch.Tensor) or group_of_row.dtype not in (torch.int32, torch.int64):
        raise ValueError("group_of_row must be an int32 or int64 tensor")
    if group_of_row.dim() != 1:
        raise ValueError(f"group_of_row must be 1-D, got shape {tuple(group_of_row.shape)}")
    # Past int64 the op's schema raised torch's "Expected a value of type 'int' for argument 'G' but
    # instead found type 'int'" (G = 10**30).
    if not is_int(G) or not 1 <= G < 2**63:  # not a bool, as k and the other int arguments
        raise ValueError(f"G must be a positive int below 2**63, got {G!r}")
    if group_of_row.shape[0] > MAX_INT32_ROWS:
        # The offsets are int32, the ops' CSR form: past 2**31 - 1 rows the counts' cumulative sum
        # wrapped to negative offsets without a word.  A shape test: no host read.
        raise ValueError(f"group_of_row has {group_of_row.shape[0]} rows; sort_by_group's offsets are int32, "
                         f"at most {MAX_INT32_ROWS} rows")
    check_ids(group_of_row, "group_of_row", 0, G - 1)


def sort_by_group(group_of_row, G) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stable permutation that makes groups contiguous, its inverse, and int32 offsets (G+1,).

    group_of_row: int32 or int64 (N,), each entry in [0, G); G: a positive int (a group may be
    empty).  The permutation and its inverse are int64 (N,)."""
    check_sort_by_group(group_of_row, G)
    return opcall("sort_by_group")(group_of_row, G)


# Composites of torch ops: autograd flows through the decomposition, so the gate needs no
# hand-written backward.  Behind the same checks as the wrappers (see _dispatch.checked).
_LIB.impl("noisy_topk_gate",
          checked(reference.noisy_topk_gate, lambda *a, **kw: check_noisy_topk_gate(*a, **kw, raw=True)),
          "CompositeImplicitAutograd")
_LIB.impl("sort_by_group", checked(reference.sort_by_group, check_sort_by_group), "CompositeExplicitAutograd")
REGISTRY["noisy_topk_gate"] = {"CPU": "reference", "CUDA": "reference"}
REGISTRY["sort_by_group"] = {"CPU": "reference", "CUDA": "reference"}
