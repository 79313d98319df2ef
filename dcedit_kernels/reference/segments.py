"""CSR helpers: offsets (G+1,) to per-row group ids or host-side bounds."""

import torch

from .._checks import MAX_INT32_ROWS


def group_ids(offsets: torch.Tensor, total: int) -> torch.Tensor:
    """(total,) int64 group id of every row; works on any device without a host copy."""
    counts = (offsets[1:] - offsets[:-1]).to(torch.int64)
    groups = torch.arange(counts.numel(), device=offsets.device)
    return torch.repeat_interleave(groups, counts, output_size=total)


def kept_offsets(offsets: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """(G+1,) int32 offsets, on `keep`'s device, of the rows `keep` (bool, one per row) leaves in
    each group: the groups of `x[keep]`."""
    if keep.numel() > MAX_INT32_ROWS:
        # The int32 cumulative sum would wrap past 2**31 - 1 kept rows.  From the shape: no device sync.
        raise ValueError(f"keep has {keep.numel()} rows; kept_offsets' offsets are int32, at most {MAX_INT32_ROWS} rows")
    counts = torch.zeros(offsets.numel() - 1, dtype=torch.int64, device=keep.device)
    counts.index_add_(0, group_ids(offsets.to(keep.device), keep.numel()), keep.long())
    return torch.cat([counts.new_zeros(1), counts.cumsum(0)]).to(torch.int32)


def segment_bounds(offsets: torch.Tensor):
    """[(start, end)] per group, read on the host."""
    b = offsets.detach().cpu().tolist()
    return list(zip(b[:-1], b[1:]))
