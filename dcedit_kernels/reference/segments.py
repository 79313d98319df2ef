"""CSR helpers: offsets (G+1,) to per-row group ids or host-side bounds."""

import torch


def group_ids(offsets: torch.Tensor, total: int) -> torch.Tensor:
    """(total,) int64 group id of every row; works on any device without a host copy."""
    counts = (offsets[1:] - offsets[:-1]).to(torch.int64)
    groups = torch.arange(counts.numel(), device=offsets.device)
    return torch.repeat_interleave(groups, counts, output_size=total)


def segment_bounds(offsets: torch.Tensor):
    """[(start, end)] per group, read on the host."""
    b = offsets.detach().cpu().tolist()
    return list(zip(b[:-1], b[1:]))
