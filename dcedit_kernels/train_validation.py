"""Validation during editor training: `evaluate_edits` applies real (fused, masked) edits batch by
batch and scores edit success on the requests' rephrases; `_evaluate_split` shares those batches
among a data-parallel run's processes.

Separate from the loop (`train`, whose `_validate` keeps the best editor and counts validations for
early stopping): it scores any ModelEditor's edits, trained by the loop or loaded.
"""

from __future__ import annotations

import torch

from . import distributed
from ._checks import is_int
from .losses import scored_accuracy, scored_nll
from .model_editor import ModelEditor
from .positions import check_request_lengths
from .requests import validate_requests
from .scored_logits import logits_at, scored_positions
from .tokenize import no_kv_cache


def evaluate_edits(me: ModelEditor, requests, batch_size: int = 4) -> dict:
    """Apply the edits (fused path, editors in eval mode) batch by batch, score each edit's
    rephrase (its prompt when it has none) teacher-forced, undo.  Every edit is scored once, in a
    batch of `batch_size` edits (all of them when there are fewer): the last batch is filled up
    with the edits before it (`_applied_with`).  Returns `es` (mean share of target tokens predicted
    by argmax), `es_all` (share of edits with every token right) and `nll` (mean target NLL per
    edit).  The LM head computes the scored positions' logits only (`scored_logits.logits_at`)."""
    requests = validate_requests(requests)
    if not is_int(batch_size) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if me.seq2seq:
        raise ValueError("evaluate_edits supports causal LMs only (as editor training does)")
    # Named by its place in `requests` (the apply of a batch named it by its place in that batch), and
    # before the model reads past a learned position table (a GPU's device-side assert); fit checks first.
    check_request_lengths(me.model, me.tokenizer, requests, "requests", edit_rows_only=True)
    return _edit_summary(_batch_scores(me, requests, batch_size, range(_n_batches(requests, batch_size))))


def _n_batches(requests, batch_size: int) -> int:
    return -(-len(requests) // batch_size)


def _batch_scores(me: ModelEditor, requests, batch_size: int, batches) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(each edit's target-token accuracy, each edit's mean target NLL) of the batches numbered
    `batches` (batch b: requests[b·batch_size:(b+1)·batch_size]), each applied, scored and undone."""
    out = []
    for b in batches:
        chunk = requests[b * batch_size:(b + 1) * batch_size]  # the edits batch b scores
        rows = me.tokenize([r.rephrase or r.prompt for r in chunk], [r.target for r in chunk])
        positions = scored_positions(rows["labels"], causal=True)
        applied = requests[_applied_with(len(requests), batch_size, b)]
        with me.edited(applied), torch.no_grad(), logits_at(me.model, positions, skip=me.modules.values()) as scored:
            logits = me.model(input_ids=rows["input_ids"], attention_mask=rows["attention_mask"],
                              **no_kv_cache(me.model)).logits  # read back by nobody (see metrics._score_batch)
            picked = scored.pick(logits)
            acc = scored_accuracy(picked, rows["labels"], causal=True).cpu()
            sums, counts = scored_nll(picked, rows["labels"], causal=True, reduction="row")
            out.append((acc, (sums / counts.clamp(min=1)).cpu()))
    return out


def _applied_with(n: int, batch_size: int, b: int) -> slice:
    """The requests applied together while batch b (requests b·batch_size up to (b+1)·batch_size)
    is scored: the batch itself, or, for a last batch of fewer, it and the edits before it, up to
    `batch_size` in all (only its own are run and scored).  Under loss_reduction="token" an edit's
    factors scale as 1/N, so a remainder batch applied alone took steps as many times larger
    (SmolLM2, MEND trained 100 steps on 20-edit batches, 25 validation edits: the last 5 scored ES
    1.0 applied alone, 0.40 applied with the other 20, and lifted the validation's ES, which picks
    the best step, from the first 20's 0.25 to 0.40)."""
    stop = min((b + 1) * batch_size, n)
    return slice(max(0, stop - batch_size), stop)


def _edit_summary(batch_scores: list[tuple[torch.Tensor, torch.Tensor]]) -> dict:
    acc_t, nll_t = torch.cat([a for a, _ in batch_scores]), torch.cat([n for _, n in batch_scores])
    return dict(es=float(acc_t.mean()), es_all=float((acc_t == 1).float().mean()), nll=float(nll_t.mean()))


def _evaluate_split(me: ModelEditor, requests, batch_size: int, rank: int, size: int) -> dict:
    """`evaluate_edits` shared by the `size` processes of a data-parallel run (their editors are
    equal): process r scores batches r, r + W, …; the batches' scores are gathered and put back in
    order, so every process gets what one process scoring them all would (bit for bit, but for
    RaEditor's random routing, which each process draws from its own generator).  `requests`:
    validated, as `train_editor` gives them."""
    n = _n_batches(requests, batch_size)
    parts = distributed.gather_outcomes(lambda: _batch_scores(me, requests, batch_size, range(rank, n, size)),
                                        "validating")
    return _edit_summary([parts[b % size][b // size] for b in range(n)])
