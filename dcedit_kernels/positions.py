"""The model's position limit, and the error naming a row past it.

A learned position table (GPT-2's, OPT's, BART's) fails past its end: a bare IndexError from its
embedding on the CPU, a device-side assert on a GPU (which leaves the CUDA context unusable for the
rest of the process).  So where the model has one (`learned_position_limit`), a row past it is
refused before the model runs (`past_positions` on a tokenized batch; `check_request_lengths` on
editor training's requests, all of them before its first step); rotary and ALiBi models run past
their config's limit, as transformers lets them, and are refused nothing.  An IndexError raised
over a batch with a row past the limit still becomes a ValueError naming that row.
"""

from __future__ import annotations

import torch

from .devices import input_embeddings


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


def learned_position_limit(model) -> int | None:
    """`position_limit(model)` where a learned position table enforces it, else None: an
    nn.Embedding other than the input embedding with that many rows, or up to 2 more (OPT and BART
    keep 2 offset rows).  GPT-2's `wpe` is one; Llama's, GPT-NeoX's and T5's models have none (T5's
    relative-position bias has 32 rows), and run past their config's limit."""
    limit = position_limit(model)
    if limit is None:
        return None
    tokens = input_embeddings(model)
    for module in model.modules():
        if (isinstance(module, torch.nn.Embedding) and module is not tokens
                and limit <= module.num_embeddings <= limit + 2):
            return limit
    return None


def check_request_lengths(model, tokenizer, requests, name: str, edit_rows_only: bool = False) -> None:
    """ValueError naming the first row of `requests` (`name[i]` and its fields) that editor training
    would run past the model's learned position table (`learned_position_limit`; nothing for other
    models): prompt + target (the capture), rephrase + target (the edit row) and, unless
    `edit_rows_only` (validation scores the edit rows only), the locality text.  Checked for every
    request before the first step: the training pass raised torch's bare IndexError mid-step, as
    late in a run as the long request's batch, after the editors' running norms had taken the batch in."""
    limit = learned_position_limit(model)
    if limit is None:
        return
    from .ft_baseline import locality_texts
    from .tokenize import causal_pair_ids, text_ids

    for i, r in enumerate(requests):
        rows = [("prompt + target", r.prompt, r.target)]  # (what, text, target or None: a text of its own)
        if r.rephrase is not None:
            rows.append(("rephrase + target", r.rephrase, r.target))
        if r.locality is not None and not edit_rows_only:
            what = "locality + locality_target" if r.locality_target is not None else "locality"
            rows.append((what, locality_texts([r])[0], None))
        for what, text, target in rows:
            n = len(causal_pair_ids(tokenizer, text, target, i)[0] if target is not None else text_ids(tokenizer, text))
            if n > limit:
                raise ValueError(f"{name}[{i}].{what.replace(' + ', f' + {name}[{i}].')} is {n} tokens, more "
                                 f"than the model's {limit} positions")
