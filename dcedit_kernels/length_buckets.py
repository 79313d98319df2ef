"""Run a batch of right-padded rows as a few passes of similar length instead of one padded pass.

An editor training batch holds rows of very different lengths (rephrases with their targets,
locality sentences), and one pass pads them all to the longest: on SmolLM2 with CounterFact, a
25-edit batch filled 1,400 slots of 28 tokens for 597 real ones, and the forward passes were 74 %
of a CPU training step, 82 % of it in `aten::mm`, so the cost follows the padded slots.
`plan_passes` cuts the rows, sorted by length, into the passes that minimise
Σ (rows × longest row + PASS_COST), and `run_in_passes` runs them and gives back the picked
logits in the one pass's row-major order, so the losses are computed as before.

The result is the one pass's up to rounding: the matmuls see other shapes (measured on SmolLM2:
the losses 1 ulp apart, the editor weights up to 1.3e-5 apart after 3 training steps).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

# A pass's fixed cost in padded token slots: it sets how many passes are worth making.  Measured
# on SmolLM2 (fp32, 2 CPU threads, MEND, rank 32, layers 27-29, 3 steps of 25 CounterFact edits):
# 10.65-10.93 s in one pass, 7.74-7.81 s at 32, 7.85-7.86 s at 64, 8.24-8.96 s at 128; 64 makes
# fewer passes for the same time (2-3 a pass kind here, against 3-4 at 32).
PASS_COST = 64


def plan_passes(lengths: Sequence[int], pass_cost: int | None = None) -> list[list[int]]:
    """The row indices of each pass, each pass's in ascending order: the rows sorted by length,
    cut where Σ (rows × longest + pass_cost) is least (an O(n²) dynamic programme over n rows;
    cutting the sorted order loses nothing: a pass's cost depends on its longest row only).
    pass_cost: PASS_COST when None."""
    pass_cost = PASS_COST if pass_cost is None else pass_cost
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


def run_in_passes(batch: dict, positions: torch.Tensor, passes: list[list[int]],
                  run: Callable[[dict, torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """(n, V): what `run(sub_batch, sub_positions, rows)` picks (the logits at sub_positions,
    row-major), over every pass, in the row-major order of `positions` over the whole batch.

    `batch` holds right-padded (B, L) `input_ids` and `attention_mask`; each pass gets its rows,
    trimmed to its longest one (positions past a row's length must be False); `rows` is the
    pass's row indices (B,) on the batch's device.  One pass of every row runs the batch as it is.
    """
    ids, mask = batch["input_ids"], batch["attention_mask"]
    if len(passes) == 1 and len(passes[0]) == ids.shape[0]:
        rows = torch.arange(ids.shape[0], device=ids.device)
        return run(batch, positions, rows)
    lengths = mask.sum(1)
    picks, keys = [], []
    for p in passes:
        rows = torch.tensor(p, dtype=torch.long, device=ids.device)
        width = int(lengths[rows].max())
        where = positions[rows.to(positions.device), :width]
        picks.append(run(dict(input_ids=ids[rows, :width], attention_mask=mask[rows, :width]), where, rows))
        at = where.nonzero()
        keys.append(rows.to(at.device)[at[:, 0]] * ids.shape[1] + at[:, 1])
    order = torch.argsort(torch.cat(keys))
    picked = torch.cat(picks)
    return picked[order.to(picked.device)]
