"""Run a batch of right-padded rows as a few passes of similar length instead of one padded pass.

An editor training batch holds rows of very different lengths (rephrases with their targets,
locality sentences), and one pass pads them all to the longest: on SmolLM2 with CounterFact, a
25-edit batch filled 1,400 slots of 28 tokens for 597 real ones, and the forward passes were 74 %
of a CPU training step, 82 % of it in `aten::mm`, so the cost follows the padded slots.
`plan_passes` cuts the rows, sorted by length, into the passes that minimise
Σ (rows × longest row + PASS_COST), and `run_in_passes` runs them, each trimmed to its longest
row, and gives back the picked logits in the one pass's row-major order, so the losses are
computed by the same code as before.

The result is the one pass's up to rounding: the matmuls see other shapes (SmolLM2 fp32, MEND,
rank 32, 3 training steps of 25 edits: losses up to 1.8e-7 apart, editor weights up to 1.3e-5;
benchmarks/NOTES.md).  Each pass enters `lowrank_edited` anew; the trainer hands every pass of
a step the same `shared` dict, so a Fisher-masked editor's dense o×i shift (ProEditor's), its mask
and a fused shift are formed once a step and reused by the other passes.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from ._checks import is_int

# A pass's fixed cost in padded token slots: it sets how many passes are worth making.  Measured
# on SmolLM2 (fp32, 2 CPU threads, MEND, rank 32, layers 27-29, 3 steps of 25 CounterFact edits):
# 10.65-10.93 s in one pass, 7.74-7.81 s at 32, 7.85-7.86 s at 64, 8.24-8.96 s at 128.  64 is
# within 2 % of 32 with fewer passes (2-3 a pass kind here, against 3-4), which keeps down the
# per-pass costs this measurement does not see (the masked dense products, launches on a GPU).
PASS_COST = 64


def plan_passes(lengths: Sequence[int], pass_cost: int | None = None) -> list[list[int]]:
    """The row indices of each pass, each pass's in ascending order: the rows sorted by length,
    cut where Σ (rows × longest + pass_cost) is least (an O(n²) dynamic programme over n rows;
    cutting the sorted order loses nothing: a pass's cost depends on its longest row only).
    lengths: each row's length, a positive int; pass_cost: a non-negative int, PASS_COST when None
    (read at the call)."""
    pass_cost = PASS_COST if pass_cost is None else pass_cost
    if not is_int(pass_cost) or pass_cost < 0:
        raise ValueError(f"pass_cost must be a non-negative int, got {pass_cost!r}")
    if isinstance(lengths, torch.Tensor):  # e.g. attention_mask.sum(1)
        lengths = lengths.tolist()
    if not isinstance(lengths, Sequence):
        raise ValueError(f"lengths must be a sequence of ints or a 1-D tensor, got {type(lengths).__name__}")
    bad = [n for n in lengths if not is_int(n) or n < 1]
    if bad:
        raise ValueError(f"lengths must be positive ints (a pass of empty rows has nothing to run), got {bad[0]!r}")
    order = sorted(range(len(lengths)), key=lambda r: lengths[r])
    n = len(order)
    best = [0] + [None] * n  # best[j]: least cost of the first j sorted rows
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        longest = lengths[order[j - 1]]
        best[j], cut[j] = min((best[i] + (j - i) * longest + pass_cost, i) for i in range(j))
    passes, j = [], n
    while j > 0:
        passes.append(sorted(order[cut[j]:j]))
        j = cut[j]
    return passes[::-1]


def run_in_passes(batch: dict, positions: torch.Tensor, passes: list[list[int]] | None,
                  run: Callable[[dict, torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """(n, V): what `run(sub_batch, sub_positions, rows)` picks (the logits at sub_positions,
    row-major), over every pass, in the row-major order of `positions` over the whole batch.

    `batch` holds right-padded (B, L) `input_ids` and `attention_mask`; each pass gets its rows,
    trimmed to its longest one (a True position past it would be lost: ValueError);
    `rows` is the pass's row indices (B,) on the batch's device.  passes=None runs the batch as it
    is, in one pass (what `TrainConfig(length_buckets=False)` does: the results of before).
    """
    ids, mask = batch["input_ids"], batch["attention_mask"]
    if passes is None:
        return run(batch, positions, torch.arange(ids.shape[0], device=ids.device))
    if tuple(positions.shape) != tuple(ids.shape):
        raise ValueError(f"positions must have input_ids' shape {tuple(ids.shape)}, got {tuple(positions.shape)}")
    if positions.dtype != torch.bool:  # an int 0/1 mask would index rows, not select positions
        raise ValueError(f"positions must be a bool mask, got {positions.dtype}")
    if any(not p for p in passes) or sorted(r for p in passes for r in p) != list(range(ids.shape[0])):
        raise ValueError(f"passes must hold each of the batch's {ids.shape[0]} rows exactly once, in non-empty "
                         f"passes; got {passes}")
    if not passes:  # an empty batch: nothing to trim or reorder
        return run(batch, positions, torch.arange(0, device=ids.device))
    # The rows' lengths and the positions read on the host once, not per pass: each pass read its
    # width, checked its padding and found its picks' keys (nonzero) on the batch's device, three
    # device syncs a pass on a GPU (a training step of 125 CounterFact edits on the tiny Llama ran
    # 6 + 13 passes in its two calls: 57 syncs), now two a call.  Same widths, check and keys.
    # numpy holds the host copy (transformers, which every caller runs, requires it): its reads go
    # through no torch op, so a test counts none (tests/test_length_buckets.py).
    # int(): a float attention mask's sums are floats, and a float width cannot slice (TypeError);
    # the per-pass int(lengths[rows].max()) of before took it.
    lengths = [int(n) for n in mask.sum(1).tolist()]
    host = positions.cpu().numpy()
    picks, keys = [], []
    for p in passes:
        host_rows = torch.tensor(p, dtype=torch.long, device="cpu")  # the CPU whatever the default device
        rows = host_rows.to(ids.device)
        width = max(lengths[r] for r in p)
        here = host[list(p)]  # a tuple would index dimensions
        if here[:, width:].any():
            raise ValueError("positions must be False in the rows' padding (each pass is trimmed to its longest row)")
        where = positions[rows.to(positions.device)][:, :width]
        picks.append(run(dict(input_ids=ids[rows, :width], attention_mask=mask[rows, :width]), where, rows))
        at_row, at_col = here[:, :width].nonzero()  # row-major, as torch's nonzero
        keys.append(host_rows[torch.from_numpy(at_row)] * ids.shape[1] + torch.from_numpy(at_col))
    if len(passes) == 1 and passes[0] == sorted(passes[0]):  # its rows in ascending order: already row-major
        return picks[0]
    # Where each pass's picks go in the row-major order: the inverse of the keys' sorting order.
    order = torch.argsort(torch.cat(keys))
    dest = torch.empty_like(order)
    # On the CPU, as `order`: under set_default_device("meta") an arange without a device was a
    # meta tensor, and assigning it left `dest` as empty_like made it (an index_copy_ out of range,
    # or picks in the wrong rows).
    dest[order] = torch.arange(order.shape[0], device=order.device)
    dests = [d.to(picks[0].device) for d in dest.split([len(k) for k in keys])]
    return _InOrder.apply(dests, *picks)


class _InOrder(torch.autograd.Function):
    """The passes' picks copied once into their rows of the output: `torch.cat` then a gather by
    the sorted keys made two (n, V) copies, both alive at the gather (SmolLM2, 32 CounterFact edits,
    355 scored positions: 66.6 MiB each; with picked_kl's own backward, the forward's peak of a
    MoEditor training step was at that gather, 66.5 MiB above this copy's); and the gather's
    backward scattered into one more zeroed (n, V) tensor, where each pass's gradient here is a
    gather of its rows."""

    @staticmethod
    def forward(ctx, dests, *picks):
        ctx.dests = dests
        out = picks[0].new_empty((sum(d.shape[0] for d in dests), *picks[0].shape[1:]))
        for d, p in zip(dests, picks):
            out.index_copy_(0, d, p)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        return (None, *(grad.index_select(0, d) for d in ctx.dests))
