"""The model's position limit, and the error naming a row past it.

A learned position table (GPT-2's, BART's) fails past its end with a bare IndexError from its
embedding; rotary models run past theirs.  So nothing is refused in advance: an IndexError raised
over a batch with a row past the limit becomes a ValueError naming that row (`past_positions`).
"""

from __future__ import annotations

import torch


def position_limit(model) -> int | None:
    """The config's `n_positions` or `max_position_embeddings`, else None."""
    config = getattr(model, "config", None)
    limit = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)
    return limit if isinstance(limit, int) and not isinstance(limit, bool) else None


def past_positions(model, batch: dict, causal: bool) -> tuple[int, int, str, int] | None:
    """(row, its length in tokens, what it is, the limit) of the longest row of `batch` past the
    model's limit, else None.  What: "prompt + target" for a causal LM; for an encoder-decoder the
    encoder's "prompt" or, when only the decoder's row is past the limit, its "target"."""
    limit = position_limit(model)
    if limit is None:
        return None
    parts = [("attention_mask", "prompt + target" if causal else "prompt")]
    if not causal:
        parts.append(("decoder_attention_mask", "target"))
    for key, what in parts:
        mask = batch.get(key)
        if isinstance(mask, torch.Tensor) and mask.numel():
            lengths = mask.sum(1)
            if int(lengths.max()) > limit:
                i = int(lengths.argmax())
                return i, int(lengths[i]), what, limit
    return None
