"""Editing metrics, in the paper's notation (Han, Li, Li and Pan; its metric definitions).

Prediction metrics score a target teacher-forced: the model reads `prompt [space] target` and at
each target position its argmax is compared with the target token (MEND's and EasyEdit's
accuracy).  A request's accuracy is the share of its target tokens predicted right (EasyEdit's
`test_prediction_acc`), or, with `exact=True`, 1 only when all are (MEND's `acc`, which counts a
sequence right only when every label token is); a metric is the mean over requests.
- `reliability`: accuracy of the target on the edit prompt itself.
- `edit_success` (ES): accuracy of the target on the request's `rephrase` (the generalisation
  the paper reports as ES).
- `drawdown` (DD): share of unrelated inputs (`locality` prompts, scored on `locality_target`, or
  on every next token of the prompt when it has no target: causal LMs only, a seq2seq model's
  locality prompts need their target) whose prediction changed with respect
  to the unedited model (`reduction="input"`: any scored token changed; `"token"`: the share of
  changed tokens, averaged over inputs).  Take `locality_predictions` of the unedited model
  first, then call `drawdown` on the edited one.  "input" (the default, and the evaluation's)
  grows with the answers' length: on SmolLM2, MEND at 125 edits, "input" gave 0.200 on
  CounterFact (one-token answers) and 0.960 on zsRE (median 4 tokens), "token" 0.187 and 0.671
  (RESULTS.md, "Why CounterFact's DD stays low").
  Neither is MEND's drawdown (the drop in `acc` on the locality inputs' own labels, acc before −
  acc after, which can be negative); EasyEdit's locality (the share of locality-target tokens whose
  prediction is unchanged, averaged over inputs) is 1 − DD with `reduction="token"`.
- `lmp` = ES − DD.
- `neighbourhood_success` (ROME-style NS): accuracy of the `locality_target` (the neighbour's
  original answer) on the `locality` prompt under the edit.
For seq2seq models the target is the decoder's labels without the special tokens (the
tokenizer's `all_special_ids`: BOS, EOS, pad and unk, so a character T5 cannot spell is not
scored); a target with nothing else (the text "<unk>" or "</s>") raises ValueError naming it.  Errors name
the caller's item (`requests[i].rephrase`, ...), also for a text past a learned position table.
Models are switched to eval mode while scored (their mode is restored) and run without grad.

Gradient metrics over E per-edit gradients g_e (rows of an (E, P) matrix, or given as factors):
- `gcr`: share of pairs i<j with cos(g_i, g_j) < 0 (a zero gradient conflicts with nothing);
- `gms`: mean over pairs i<j of 2‖g_i‖‖g_j‖ / (‖g_i‖² + ‖g_j‖²) (1 for a pair of zeros).
Both only need the E×E Gram matrix, which `factor_gram` computes from the factors without any
per-edit gradient matrix: <η_aμ_aᵀ, η_bμ_bᵀ>_F = Σ_{s∈a,t∈b} (η_s·η_t)(μ_s·μ_t).
"""

from __future__ import annotations

import contextlib
import math
import re
import threading
import weakref
from typing import Mapping, Sequence

import torch

from ._checks import check_bool, check_offsets, check_tensor, is_int, is_real_number, no_values
from .block_prefix import PrefixReuse
from .capture import Factors, module_modes, restore_modes
from .devices import input_device
from .edit_handle import deferred_interrupt
from .positions import learned_position_limit, past_positions
from .requests import EditRequest, require_field, validate_requests
from .scored_logits import logits_at, scored_positions
from .tokenize import (
    IGNORE_INDEX, embedding_rows, forward_inputs, is_seq2seq, join_prompt_target, no_kv_cache, tokenize_pairs,
    tokenize_texts,
)

REDUCTIONS = ("input", "token")


# --- prediction metrics ------------------------------------------------------------------------


def _check_batch_size(batch_size) -> None:
    if not is_int(batch_size) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")


def _check_model_and_tokenizer(model, tokenizer) -> None:
    """The scoring functions' model and tokenizer, checked as ModelEditor checks them: a model name
    given for the model, or None, raised AttributeError ("'str' object has no attribute 'modules'"),
    and a tokenizer that is not one TypeError ("'str' object is not callable"), naming neither."""
    if not isinstance(model, torch.nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not callable(tokenizer):
        raise ValueError(f"tokenizer must be a Hugging Face tokenizer (callable), got {type(tokenizer).__name__}")


@contextlib.contextmanager
def _eval_mode(model):
    """Eval mode and no grad while scoring; every submodule's previous mode comes back afterwards
    (`model.train(was_training)` would also flip the submodules a caller keeps in the other mode,
    e.g. a frozen block left in eval mode inside a model that trains).

    Shared by the threads scoring one model at once (README "Threads"): the first in keeps the
    modes and switches to eval, the last out puts them back.  Each thread on its own took the
    modes it found: one that came in while another had switched kept "eval", and put it back after
    the first had restored train mode (two threads scoring a model in train mode: left in eval
    mode in 12-15 of 20 trials), and a thread still scoring after the first left ran its passes in
    train mode (dropout on: 9-14 of 40 scores off the eval-mode ones)."""
    entry = None
    try:
        with deferred_interrupt(), _EVAL_LOCK:  # a Ctrl-C here is raised at the `with`'s exit: counted by then
            counted = _EVAL_USERS.get(model)
            if counted is None:
                counted = _EVAL_USERS[model] = [0, module_modes(model)]
                model.eval()
            counted[0] += 1
            entry = counted
        with torch.no_grad():
            yield
    finally:
        if entry is not None:
            with deferred_interrupt(), _EVAL_LOCK:
                entry[0] -= 1
                if entry[0] == 0:
                    del _EVAL_USERS[model]
                    restore_modes(model, entry[1])


# {model: [the scoring calls inside `_eval_mode` now, its modes from before the first]}
_EVAL_USERS: "weakref.WeakKeyDictionary[torch.nn.Module, list]" = weakref.WeakKeyDictionary()
_EVAL_LOCK = threading.RLock()


_KEPT = threading.local()


@contextlib.contextmanager
def lower_blocks_kept(modules: Mapping[str, torch.nn.Module], store: dict):
    """Inside the block (this thread), a causal LM's scoring passes run the blocks below the lowest
    of `modules` (the edited layers, {name: module}) once per batch: `store` keeps their output for
    each batch scored, and a later pass over the same batch (the same ids and mask: the same
    requests in the same batches), with any edit of those layers applied, runs the blocks from
    the lowest edited one only (`block_prefix`: the same tensors, so the same scores; where its
    checks rule it out, every block runs).  The caller keeps `store` between calls on one model
    whose weights below those layers do not change meanwhile; it grows by one (rows, width,
    hidden) tensor per new batch."""
    # Checked on entry: a list of modules or a list/None store raised AttributeError ("'list' object has
    # no attribute 'values'") from the first scoring pass inside the block, and modules given by name
    # ({name: "transformer.h.1..."}) were never any model's, so nothing was kept, without a word.
    if not isinstance(modules, Mapping):
        raise ValueError(f"modules must be a mapping of layer name -> torch.nn.Module (a ModelEditor's "
                         f"modules), got {type(modules).__name__}")
    for name, module in modules.items():
        if not isinstance(module, torch.nn.Module):
            raise ValueError(f"modules[{name!r}] must be a torch.nn.Module, got {type(module).__name__}")
    if not isinstance(store, dict):
        raise ValueError(f"store must be a dict, got {type(store).__name__}")
    previous = getattr(_KEPT, "value", None)
    _KEPT.value = (modules, store)
    try:
        yield
    finally:
        _KEPT.value = previous


def _holds(model, modules: Mapping[str, torch.nn.Module]) -> bool:
    """Whether every one of `modules` is a module of `model`: `lower_blocks_kept` keeps the blocks of
    the model that holds them.  Scoring another model inside the block looked its layers' names up
    in that model (AttributeError where it has no such module) or kept and reused its lower blocks'
    output, which the caller never promised stays the same (stale predictions once it changed)."""
    held = {id(m) for m in model.modules()}
    return all(id(m) in held for m in modules.values())


def _scored_logits(model, inputs: dict, positions: torch.Tensor) -> torch.Tensor:
    """(n, V): the model's logits at `positions`, the LM head computing those only; inside
    `lower_blocks_kept`, from the kept output of the lower blocks when the batch was seen."""
    enabled = "labels" not in inputs  # with labels kept, the model's own loss needs full logits

    def run(b):
        # No KV cache: a scoring pass never reads one back, and a causal LM's holds every block's keys
        # and values for the whole batch.
        with logits_at(model, positions, enabled=enabled) as scored:
            return scored.pick(model(**b, **no_kv_cache(model)).logits)

    kept = getattr(_KEPT, "value", None)
    if kept is None or not enabled or set(inputs) != {"input_ids", "attention_mask"}:
        return run(inputs)
    modules, store = kept
    if not _holds(model, modules):  # another model scored inside the block: its blocks are not the kept ones
        return run(inputs)
    # Not for an encoder-decoder, nor where another parameter views an edited weight (allow_tied).
    prefix = PrefixReuse.for_written_weights(model, modules, no_grad=True)
    if prefix is None:
        return run(inputs)
    prefix = store.setdefault((model, prefix.k), prefix)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    key = (*ids.shape, *ids.flatten().tolist(), *mask.flatten().tolist())
    with prefix.run_from(key, tuple(ids.shape)):
        logits = run(inputs)
    prefix.confirm(key, run, inputs, logits)  # after a reused pass, or a failed record: nothing to do
    return logits


def _score_batch(model, tokenizer, batch: dict) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(predicted ids, gold ids) at the scored positions of every row of `batch` (on the model's
    `input_device`); the LM head computes the logits of those positions only (`scored_logits.logits_at`)."""
    labels = batch["labels"]
    seq2seq = is_seq2seq(model)
    inputs = forward_inputs(model, batch)
    positions = scored_positions(labels, causal=not seq2seq)  # causal: position t predicts token t+1
    pred = _scored_logits(model, inputs, positions).argmax(-1)  # (n,), row-major
    gold = labels if seq2seq else labels[:, 1:]
    gold = gold[gold != IGNORE_INDEX].to(pred.device)  # the LM head's device, when the model is split
    rows = positions.nonzero()[:, 0].to(pred.device)
    if seq2seq:
        special = torch.tensor(sorted(set(tokenizer.all_special_ids)), device=gold.device, dtype=gold.dtype)
        keep = ~torch.isin(gold, special)
        pred, gold, rows = pred[keep], gold[keep], rows[keep]
    counts = torch.bincount(rows, minlength=labels.shape[0]).tolist()
    return list(zip(pred.cpu().split(counts), gold.cpu().split(counts)))


def _renamed(exc: ValueError, lo: int, names) -> ValueError:
    """The tokenizer's message about item k of a batch starting at `lo`, naming it as the caller
    does (`names`: the names of the prompts and of the targets) rather than by its place in the batch."""
    def name(m):
        return names[1 if m.group(1) == "targets" else 0][lo + int(m.group(2))]

    return ValueError(re.sub(r"\b(texts|prompts|targets)\[(\d+)\]", name, str(exc)))


def _past_positions_error(past, lo: int, chunk, targets, names) -> ValueError:
    """The ValueError for row `past[0]` of the batch `chunk` (starting at `lo`) past the model's
    positions, named as the caller's item and quoting the text that is too long: a seq2seq target
    past the decoder's positions itself (its prompt fits), a causal pair as joined (its target may
    be the long part)."""
    i, length, what, limit = past
    j = lo + i
    if what == "target":
        label, text = names[1][j], targets[j]
    elif targets is not None and what == "prompt + target":
        label, text = f"{names[0][j]} + {names[1][j]}", join_prompt_target(chunk[i], targets[j])[0]
    else:  # a causal LM's text scored without a target is all prompt (it said "prompt + target")
        label, text, what = names[0][j], chunk[i], "prompt"
    text = text if len(text) <= 60 else text[:60] + "…"
    return ValueError(f"{label}: a text is {length} tokens ({what}), more than the model's {limit} "
                      f"positions: {text!r}")


def _score(model, tokenizer, prompts, targets, batch_size, names=None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Teacher-forced (pred, gold) per pair; `targets=None` scores every next token of `prompts`.
    `names`: (names of the prompts, names of the targets) for error messages; by default
    `prompts[i]` and `targets[i]`, i the place in the whole list."""
    _check_batch_size(batch_size)
    _check_model_and_tokenizer(model, tokenizer)
    if names is None:
        names = ([f"prompts[{i}]" for i in range(len(prompts))], [f"targets[{i}]" for i in range(len(prompts))])
    # Rows of similar length batched together (by characters, a proxy for tokens; stable), so that a
    # batch pads to a length near its rows' own instead of to one long row's (CounterFact, 400 edits,
    # batches of 16, SmolLM2's tokenizer: the rephrase rows' 5,077 tokens took 10,336 padded slots in
    # the given order, 5,376 sorted; prompts 5,648 -> 3,984, locality 5,904 -> 3,936).  A row's
    # scores change by rounding only (a causal row's real tokens never see its right padding); the
    # results come back in the given order.
    if len(prompts) <= batch_size:
        return _score_rows(model, tokenizer, prompts, targets, batch_size, names)

    def size(text):  # anything else is refused, with its name, when its batch is tokenized
        return len(text) if isinstance(text, str) else 0

    sizes = [size(p) + (0 if targets is None else size(targets[i])) for i, p in enumerate(prompts)]
    order = sorted(range(len(prompts)), key=sizes.__getitem__)
    out, failed = [], None
    try:
        _score_rows(model, tokenizer, [prompts[i] for i in order],
                    None if targets is None else [targets[i] for i in order], batch_size,
                    ([names[0][i] for i in order], [names[1][i] for i in order]), out)
    except ValueError as exc:
        failed = exc
    if failed is not None:
        # The error names the first bad row in the caller's order, as the unsorted batches did: that
        # row is at or before the last row of the sorted batch that failed (rows order[len(out):...]),
        # so the given order's batches up to that row raise it (their first failing batch's error).
        last = max(order[len(out):len(out) + batch_size])
        _score_rows(model, tokenizer, list(prompts[:last + 1]),
                    None if targets is None else list(targets[:last + 1]), batch_size, names)
        raise failed
    back = [0] * len(order)
    for k, i in enumerate(order):
        back[i] = k
    return [out[k] for k in back]


def _score_rows(model, tokenizer, prompts, targets, batch_size, names, out=None) -> list:
    """`_score` of the rows in the given order, batch by batch; each batch's results appended to
    `out` (a new list by default) once the whole batch has passed its checks."""
    out = [] if out is None else out
    # The embedding's device (a split model's first block), not torch's default one (a "meta" default:
    # no data): the batches are tokenized onto it.
    device = input_device(model)
    learned = learned_position_limit(model) is not None  # a walk of the model's modules: once, not per batch
    with _eval_mode(model):
        for lo in range(0, len(prompts), batch_size):
            chunk = prompts[lo : lo + batch_size]
            if targets is None and is_seq2seq(model):
                raise ValueError("scoring plain texts needs a causal LM; give locality_target for seq2seq models")
            try:
                if targets is None:
                    batch = tokenize_texts(tokenizer, chunk, device, vocab_size=embedding_rows(model))
                else:
                    batch = tokenize_pairs(model, tokenizer, chunk, targets[lo : lo + batch_size], device)
            except ValueError as exc:
                raise _renamed(exc, lo, names) from exc
            # A learned position table (`positions`): refused before the pass where the model has one (on a
            # GPU a lookup past it is a device-side assert, not an IndexError), else from its IndexError.
            if learned:
                past = past_positions(model, batch, causal=not is_seq2seq(model))
                if past is not None:
                    raise _past_positions_error(past, lo, chunk, targets, names)
            try:
                scored = _score_batch(model, tokenizer, batch)
            except IndexError as exc:
                past = past_positions(model, batch, causal=not is_seq2seq(model))
                if past is None:
                    raise
                raise _past_positions_error(past, lo, chunk, targets, names) from exc
            for i, (_, gold) in enumerate(scored):
                # A seq2seq target of special-token text only ("<unk>", "</s>") keeps no token once the
                # special ones are dropped: its accuracy was NaN (the metric's mean with it), exact=True's min() raised.
                if not gold.numel():
                    k = 0 if targets is None else 1
                    text = (prompts if targets is None else targets)[lo + i]
                    raise ValueError(f"{names[k][lo + i]} ({text!r}) has no token to score (a seq2seq target is "
                                     "scored without its special tokens, and this one holds nothing else)")
            out.extend(scored)
    return out


def _accuracies(scored, exact: bool) -> torch.Tensor:
    acc = []
    for pred, gold in scored:
        hits = (pred == gold).double()
        acc.append(float(hits.min()) if exact else float(hits.mean()))
    # On the CPU whatever torch.set_default_device says (under "meta", ES's float() of the mean raised).
    return torch.tensor(acc, dtype=torch.float64, device="cpu")


def target_accuracy(model, tokenizer, prompts: Sequence[str], targets: Sequence[str],
                    batch_size: int = 16, exact: bool = False) -> torch.Tensor:
    """Per-pair teacher-forced accuracy of `targets` after `prompts`, (N,) float64."""
    for name, texts in (("prompts", prompts), ("targets", targets)):
        # _target_accuracy lists them: a lone str became its characters, each scored as a text.
        if isinstance(texts, str):
            raise ValueError(f"{name} must be a sequence of str, got a single str")
        # and list() of None raised "'NoneType' object is not iterable", naming neither.
        if not hasattr(texts, "__iter__"):
            raise ValueError(f"{name} must be a sequence of str, got {type(texts).__name__}")
    check_bool(exact, "exact")
    return _target_accuracy(model, tokenizer, prompts, targets, batch_size, exact)


def _target_accuracy(model, tokenizer, prompts, targets, batch_size, exact, names=None) -> torch.Tensor:
    prompts, targets = list(prompts), list(targets)
    if len(prompts) != len(targets):  # checked whole: the batches would drop or misname the extras
        raise ValueError(f"prompts and targets must have the same length, got {len(prompts)} and {len(targets)}")
    return _accuracies(_score(model, tokenizer, prompts, targets, batch_size, names), exact)


def _request_names(rows, prompt_field: str, target_field: str) -> tuple[list[str], list[str]]:
    """`_score`'s names for the requests at indices `rows` (a range, or a subset's indices)."""
    return [f"requests[{i}].{prompt_field}" for i in rows], [f"requests[{i}].{target_field}" for i in rows]


def reliability(model, tokenizer, requests: Sequence[EditRequest], batch_size: int = 16,
                exact: bool = False) -> float:
    """Accuracy of each request's target on its own prompt (`batch_size` requests per forward
    pass; `exact`: see the module docstring)."""
    check_bool(exact, "exact")
    requests = validate_requests(requests)
    prompts, targets = [r.prompt for r in requests], [r.target for r in requests]
    names = _request_names(range(len(requests)), "prompt", "target")
    return float(_target_accuracy(model, tokenizer, prompts, targets, batch_size, exact, names).mean())


def edit_success(model, tokenizer, requests: Sequence[EditRequest], batch_size: int = 16,
                 exact: bool = False) -> float:
    """ES: accuracy of each request's target on its rephrase (paraphrase) prompt, which every
    request needs (ValueError naming the first without one); batch_size, exact: as `reliability`'s."""
    check_bool(exact, "exact")
    requests = validate_requests(requests)
    prompts = require_field(requests, "rephrase")
    names = _request_names(range(len(requests)), "rephrase", "target")
    return float(_target_accuracy(model, tokenizer, prompts, [r.target for r in requests], batch_size, exact,
                                  names).mean())


def neighbourhood_success(model, tokenizer, requests: Sequence[EditRequest], batch_size: int = 16,
                          exact: bool = False) -> float:
    """NS: accuracy of each request's locality_target (its original answer) on its locality prompt
    (every request needs both); batch_size, exact: as `reliability`'s."""
    check_bool(exact, "exact")
    return float(_accuracies(_neighbourhood_scores(model, tokenizer, requests, batch_size), exact).mean())


def _neighbourhood_scores(model, tokenizer, requests, batch_size) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(pred, gold) of each request's locality_target on its locality prompt: NS's scores, and, when every
    request has a locality_target, the predictions `locality_predictions` gives (the same pairs in the
    same batches)."""
    requests = validate_requests(requests)
    prompts = require_field(requests, "locality")
    targets = require_field(requests, "locality_target")
    names = _request_names(range(len(requests)), "locality", "locality_target")
    prompts, targets = list(prompts), list(targets)
    return _score(model, tokenizer, prompts, targets, batch_size, names)


def _neighbourhood_success_and_drawdown(model, tokenizer, requests: Sequence[EditRequest],
                                        base_predictions: Sequence[torch.Tensor], batch_size: int = 16,
                                        exact: bool = False, reduction: str = "input") -> tuple[float, float]:
    """(`neighbourhood_success`, `drawdown`) of requests that all have a locality_target, from one scoring
    pass: both score the locality_target on the locality prompt, so the predictions are the same."""
    check_bool(exact, "exact")
    requests, base = _drawdown_inputs(requests, base_predictions, reduction)
    scored = _neighbourhood_scores(model, tokenizer, requests, batch_size)
    ns = float(_accuracies(scored, exact).mean())
    return ns, _changed_share([pred for pred, _ in scored], base, reduction)


def locality_predictions(model, tokenizer, requests: Sequence[EditRequest],
                         batch_size: int = 16) -> list[torch.Tensor]:
    """The model's argmax ids at the scored positions of every request's locality input."""
    requests = validate_requests(requests)
    prompts = require_field(requests, "locality")
    with_target = [i for i, r in enumerate(requests) if r.locality_target is not None]
    without = [i for i, r in enumerate(requests) if r.locality_target is None]
    preds: list[torch.Tensor | None] = [None] * len(requests)
    if with_target:
        scored = _score(model, tokenizer, [prompts[i] for i in with_target],
                        [requests[i].locality_target for i in with_target], batch_size,
                        _request_names(with_target, "locality", "locality_target"))
        for i, (pred, _) in zip(with_target, scored):
            preds[i] = pred
    if without:
        scored = _score(model, tokenizer, [prompts[i] for i in without], None, batch_size,
                        _request_names(without, "locality", "locality_target"))
        for i, (pred, _) in zip(without, scored):
            preds[i] = pred
    return preds


def drawdown(model, tokenizer, requests: Sequence[EditRequest], base_predictions: Sequence[torch.Tensor],
             batch_size: int = 16, reduction: str = "input") -> float:
    """DD: share of locality inputs whose prediction differs from `base_predictions` (the
    unedited model's `locality_predictions` on the same requests).  reduction: "input" (an input
    counts as changed when any scored token changed) or "token" (its share of changed tokens);
    see the module docstring."""
    requests, base = _drawdown_inputs(requests, base_predictions, reduction)
    return _changed_share(locality_predictions(model, tokenizer, requests, batch_size), base, reduction)


def _drawdown_inputs(requests, base_predictions, reduction: str) -> tuple[list, list]:
    """drawdown's checked (requests, base predictions as a list)."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    requests = validate_requests(requests)
    if not hasattr(base_predictions, "__iter__"):
        # list() of None raised "'NoneType' object is not iterable", naming nothing.
        raise ValueError("base_predictions must be a sequence of tensors (locality_predictions' list), "
                         f"got {type(base_predictions).__name__}")
    base = list(base_predictions)
    if len(base) != len(requests):
        raise ValueError(f"base_predictions must have one entry per request ({len(requests)}), got {len(base)}")
    return requests, base


def _changed_share(now: list[torch.Tensor], base: list, reduction: str) -> float:
    """`drawdown` from the edited model's locality predictions `now`."""
    changed = []
    for i, (a, b) in enumerate(zip(now, base)):
        if not isinstance(b, torch.Tensor) or b.shape != a.shape:
            raise ValueError(
                f"base_predictions[{i}] must be a tensor of shape {tuple(a.shape)} "
                "(the same requests scored with the same tokenizer)"
            )
        if b.dtype.is_floating_point or b.dtype.is_complex or b.dtype == torch.bool:
            # Compared with the ids as numbers: a bool tensor (a mask passed for the ids) counted every
            # input changed (DD 1.0 of an unchanged model), and a NaN entry a change.
            raise ValueError(f"base_predictions[{i}] must hold token ids (an integer dtype, as "
                             f"locality_predictions gives them), got {b.dtype}")
        diff = a != b.to(a.device)
        changed.append(float(diff.any()) if reduction == "input" else float(diff.double().mean()))
    return float(sum(changed) / len(changed))


def lmp(es: float, dd: float) -> float:
    """LMP = ES − DD, of ES and DD in [0, 1] (shares, as `edit_success` and `drawdown` give them)."""
    for name, value in (("es", es), ("dd", dd)):
        # float() took a str ("0.5") or a bool without a word: a table built from parsed text
        # reported a number computed from whatever the text held.
        if not is_real_number(value):
            raise ValueError(f"{name} must be a real number (edit_success's / drawdown's result), "
                             f"got {type(value).__name__}")
        # NaN and inf went through to an LMP of NaN or ±inf, and percentages (ES 50, DD 10) to an
        # LMP of 40 beside the [−1, 1] LMPs of the reports.  The comparison is False for NaN.
        if not 0 <= value <= 1:
            raise ValueError(f"{name} must be in [0, 1] (a share, as edit_success / drawdown give it, not a "
                             f"percentage), got {value!r}")
    return float(es) - float(dd)


# --- gradient metrics --------------------------------------------------------------------------


def gradient_gram(grads: torch.Tensor) -> torch.Tensor:
    """E×E Gram matrix of the rows of an (E, P) gradient matrix (fp32, fp64 for fp64 input), as it
    is: rows of norm past the dtype's range's root (fp32 1.8e19, fp64 1.3e154) overflow it and tiny
    ones underflow; `gcr(grads)` / `gms(grads)` avoid both (their Gram is of rows scaled first)."""
    check_tensor(grads, "grads", ndim=2)
    g = grads.to(torch.float64 if grads.dtype == torch.float64 else torch.float32)
    return g @ g.t()


def factor_gram(mu: torch.Tensor, eta: torch.Tensor, edit_offsets: torch.Tensor, chunk: int = 2048) -> torch.Tensor:
    """E×E Gram of the per-edit gradients η_eᵀμ_e of one weight, from its factors.

    G[a, b] = Σ_{s∈a, t∈b} (η_s·η_t)(μ_s·μ_t).  Rows of the T×T token kernel are formed `chunk`
    at a time and summed into their edits, so memory is O(chunk·T + E²) and no o×i matrix is
    ever built.  fp32 products (fp64 for fp64 factors) of rows first scaled by powers of two
    (exact) that bring each token's largest |μ| and |η| entry into [0.5, 1), combined and summed
    in float64 (a float64 Gram): the fp32 kernel of unscaled factors underflowed to 0 for tiny
    per-edit gradients (entries ~1e-24: cosine −1 read as no conflict, GMS 1 for norms 1 and 2)
    and overflowed for huge ones, as `_row_scaled_gram` avoids for gradient rows.  The diagonal
    (each edit's norm², all that GMS reads) comes from the edit's own tokens, a sum of squares in
    float64 (`_edit_norms_sq`): never below zero, where the kernel's rounding inflated the norm² of
    an edit whose token gradients cancel, or took it below zero.  Such an edit's products with the
    other edits keep the fp32 kernel's rounding at the scale of its cancelled terms, so its pairs'
    signs (GCR) are those of that rounding; that is the scale of the rounding the fp32 factors
    already hold from the model's backward, so float64 products would not make those signs the
    gradients' either.  Per-edit gradients of norm past 1.3e154 (only float64 factors reach it)
    overflow the float64 Gram; `gcr`/`gms` of the gradient rows (`grads`) take any finite ones.
    """
    check_tensor(mu, "mu", ndim=2)
    check_tensor(eta, "eta", ndim=2)
    if mu.shape[0] != eta.shape[0]:
        raise ValueError(f"mu and eta must have the same number of rows, got {mu.shape[0]} and {eta.shape[0]}")
    if not is_int(chunk) or chunk < 1:
        raise ValueError(f"chunk must be a positive int, got {chunk!r}")
    # Devices before the offsets' values (which check_offsets reads), but a list has no .device.
    if mu.device != eta.device or (isinstance(edit_offsets, torch.Tensor) and edit_offsets.device != mu.device):
        raise ValueError("mu, eta and edit_offsets must be on one device")
    E = check_offsets(edit_offsets, "edit_offsets", mu.shape[0])
    _check_has_values(mu=mu, eta=eta, edit_offsets=edit_offsets)
    dtype = torch.float64 if torch.float64 in (mu.dtype, eta.dtype) else torch.float32
    mu, mu_exp = _pow2_scaled_rows(mu.to(dtype))
    eta, eta_exp = _pow2_scaled_rows(eta.to(dtype))
    # token t's rows were multiplied by 2^-(its exponents): its kernel entries come back times
    # 2^(e_s + e_t), applied in float64, in two factors so that neither leaves float64's range.
    tok_exp = (mu_exp + eta_exp).double()
    T = mu.shape[0]
    counts = torch.diff(edit_offsets.long())
    edit_of_token = torch.repeat_interleave(torch.arange(E, device=mu.device), counts)
    gram = torch.zeros(E, E, dtype=torch.float64, device=mu.device)
    back = torch.pow(2.0, tok_exp)
    for lo in range(0, T, chunk):
        hi = min(T, lo + chunk)
        # In place where the values allow (the same products, bit for bit): the out-of-place
        # products held three float64 (c, T) kernels at once, 3·8·c·T bytes, which dominated
        # gradient_conflict's peak (1,000 CounterFact edits, T = 9,369, c = 2,048: 439 MiB of 646
        # for the Gram of one 1024×4096 weight); now one, beside one fp32 (c, T) product.
        kernel = eta[lo:hi] @ eta.t()
        kernel = kernel.mul_(mu[lo:hi] @ mu.t()).double()  # (c, T)
        kernel.mul_(back[lo:hi, None]).mul_(back[None, :])
        by_edit = torch.zeros(hi - lo, E, dtype=torch.float64, device=mu.device).index_add_(1, edit_of_token, kernel)
        gram.index_add_(0, edit_of_token[lo:hi], by_edit)
    # Symmetric by construction: the fp32 kernels' (s, t) and (t, s) entries are rounded apart (the
    # matmul sums them in other orders: on this AMD EPYC machine, not on the earlier ones), and the
    # row of an edit whose token gradients cancel holds that rounding only, above the zero Cauchy-
    # Schwarz bound of gcr/gms's symmetry check, which refused the Gram (9,772 of 20,000 cases of
    # test_gms_of_an_edit_whose_token_gradients_cancel_is_a_number).
    gram = (gram + gram.t()).mul_(0.5)
    gram.diagonal().copy_(_edit_norms_sq(mu, eta, edit_offsets, tok_exp, chunk))
    return gram


def _check_has_values(**named) -> None:
    """The gradient metrics read values: a meta (or fake) tensor raised torch's RuntimeError from deep
    inside ("cannot repeat_interleave a meta tensor without output_size", "Tensor.item() cannot be
    called on meta tensors"), naming no argument."""
    for name, t in named.items():
        if no_values(t):
            raise ValueError(f"{name} has no values (a meta or fake tensor, on {t.device}): the gradient "
                             "metrics are computed from its values")


def _edit_norms_sq(mu: torch.Tensor, eta: torch.Tensor, edit_offsets: torch.Tensor, tok_exp: torch.Tensor,
                   chunk: int) -> torch.Tensor:
    """factor_gram's diagonal, ‖η_eᵀμ_e‖² (`mu`, `eta`: the rows scaled by 2^-exponent, `tok_exp` each
    token's exponent), as ‖R H‖_F² in float64, where M_eᵀ = QR (M_e: the edit's μ rows, H its η rows
    times their token's 2^exponent over the edit's largest): η_eᵀμ_e = HᵀRᵀQᵀ and Q has orthonormal
    columns.  A sum of squares, so never below zero, rounded at the scale of the gradient's entries.
    The fp32 kernel rounded the norm² of an edit whose token gradients cancel at the scale of its terms
    (at 100× the other edits' scale, up to 7× their largest norm², GMS 0.88 where the float64 gradients
    give 0.33, or as far below zero); the float64 kernel Σ_{s,t} (η_s·η_t)(μ_s·μ_t) still rounds at the
    scale of the squared terms (at 1000×: 7.0 where the gradient's norm² is 8.46, GMS 0.02 off, and
    below zero when the gradient is exactly 0), QR's at that of the terms themselves.  The QR costs
    2·T_e²·i, the kernel's bmm T_e²·(o+i), and no o×i matrix.  Edits of one token count go through in
    batches of about `chunk` tokens (a loop over the edits took 0.45 ms an edit)."""
    bounds = edit_offsets.tolist()
    sq = torch.zeros(len(bounds) - 1, dtype=torch.float64, device=mu.device)
    by_count = {}
    for e, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        if b > a:
            by_count.setdefault(b - a, []).append(e)
    for count, edits in by_count.items():
        per = max(1, chunk // count)
        for k in range(0, len(edits), per):
            ids = edits[k:k + per]
            rows = torch.tensor([bounds[e] + t for e in ids for t in range(count)], device=mu.device)
            m, h = (x.index_select(0, rows).double().view(len(ids), count, -1) for x in (mu, eta))
            exp = tok_exp.index_select(0, rows).view(len(ids), count)
            # Each token's weight 2^exponent relative to its edit's largest (<= 1, no overflow), the
            # largest put back after the sum of squares, in two factors: 2^(2·top) overflows where the
            # norm² need not (fp32 factors: top <= 2·128, in range); past 1023 (float64 factors whose
            # token gradients pass 1e308) the Gram's other entries overflow too, as the docstring says.
            top = exp.amax(1)
            h = h * torch.pow(2.0, exp - top[:, None])[:, :, None]
            r = torch.linalg.qr(m.transpose(1, 2), mode="r")[1]  # (n, min(i, count), count)
            norm_sq = torch.bmm(r, h).square().sum((1, 2))
            sq[torch.tensor(ids, device=mu.device)] = norm_sq * torch.pow(2.0, top) * torch.pow(2.0, top)
    return sq


def _pow2_scaled_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x with each row times a power of two that brings its largest |entry| into [0.5, 1), the
    exponents e with x = scaled · 2^e per row); zero and non-finite rows are left as they are (e = 0)."""
    peak = x.abs().amax(dim=1) if x.shape[1] else x.new_zeros(x.shape[0])
    exp = torch.frexp(peak.double()).exponent.long()
    exp = torch.where(torch.isfinite(peak) & (peak > 0), exp, torch.zeros_like(exp))
    x = x.clone()
    half = torch.div(-exp, 2, rounding_mode="floor")  # two exact steps, each within x's dtype's range
    for e in (half, -exp - half):
        x.mul_(torch.pow(2.0, e.double()).to(x.dtype)[:, None])
    return x, exp


def factors_gram(factors: Factors | Mapping[str, Factors], chunk: int = 2048) -> torch.Tensor:
    """Gram of the per-edit gradients over every weight in `factors` (the sum of the weights'
    Grams: the flattened gradient of several weights is their concatenation)."""
    if isinstance(factors, Factors):
        return factor_gram(factors.mu, factors.eta, factors.edit_offsets, chunk)
    if not isinstance(factors, Mapping) or not factors:
        raise ValueError("factors must be a Factors or a non-empty mapping of name -> Factors")
    grams = []
    for name, f in factors.items():
        if not isinstance(f, Factors):
            raise ValueError(f"factors[{name!r}] must be a Factors, got {type(f).__name__}")
        grams.append(factor_gram(f.mu, f.eta, f.edit_offsets, chunk))
    if len({g.shape for g in grams}) != 1:
        shapes = [tuple(g.shape) for g in grams]
        raise ValueError(f"every weight's factors must hold the same edits, got Gram shapes {shapes}")
    dtype = torch.float64 if any(g.dtype == torch.float64 for g in grams) else torch.float32
    return sum(g.to(dtype) for g in grams)


def _row_scaled_gram(grads: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(the float64 Gram of `grads`' rows each first scaled by a power of two (exact) that brings its
    largest entry into [0.5, 1), those exponents e): G = S ∘ 2^(e_i + e_j).  The fp32 Gram of unscaled
    rows underflows for tiny gradients (entries ~1e-23 read as zero, so a pair with cosine -1 did not
    conflict and GMS was 1 for norms 1 and 2) and overflows for huge ones, and so did G itself in
    float64 for float64 rows of norm past 1e154 or below 1e-154; S keeps every cosine's sign and,
    with e, every ratio of norms, which is all GCR and GMS read (`_pair_stats`)."""
    dtype = torch.float64 if grads.dtype == torch.float64 else torch.float32
    g, exp = _pow2_scaled_rows(grads.detach().to(dtype))
    return (g @ g.t()).double(), exp


def _pair_stats(grads, gram) -> tuple[torch.Tensor, torch.Tensor]:
    """For each pair i < j: (a number with the sign of g_i·g_j, NaN where it is NaN; the ratio of the
    smaller norm to the larger, 1 for two zero gradients, NaN for a NaN one)."""
    if (grads is None) == (gram is None):
        raise ValueError("give exactly one of grads (E, P) or gram (E, E)")
    if gram is None:
        check_tensor(grads, "grads", ndim=2)
        _check_has_values(grads=grads)
        gram, exp = _row_scaled_gram(grads)  # the Gram of the rows times 2^-exp
    else:
        check_tensor(gram, "gram", ndim=2)
        _check_has_values(gram=gram)
        if gram.shape[0] != gram.shape[1]:
            raise ValueError(f"gram must be square, got shape {tuple(gram.shape)}")
        exp = None
    E = gram.shape[0]
    if E < 2:
        raise ValueError(f"gradient metrics need at least 2 edits, got {E}")
    eps = torch.finfo(gram.dtype).eps
    gram = gram.double()
    if exp is None:
        exp = torch.zeros(E, dtype=torch.long, device=gram.device)
    # A norm² below zero within the gram dtype's rounding at the largest norm² (1024 eps, the symmetry
    # check's allowance) is a zero gradient; further below, the matrix is refused (after the symmetry
    # check: a cross product is named as that).  gradient_gram's and factor_gram's diagonals are sums of
    # squares, never below zero (factor_gram's since its QR diagonal); a diagonal summed from token
    # kernels, as factor_gram's was, rounded the norm² of an edit whose token gradients cancel at the
    # scale of the cancelled terms (fp32 kernel, three tokens at 100× the other edits' scale: down to
    # −69 × their largest norm², and as far above zero, where it read as a large gradient), which is
    # no norm² to read a metric from.
    sq = gram.diagonal().clamp_min(0)
    i, j = torch.triu_indices(E, E, offset=1, device=gram.device)
    # Only the upper triangle is read: a matrix that is not a Gram matrix (a cross product of two
    # gradient sets, a transposed factor) gave a ratio without a word.  Each pair's asymmetry is
    # judged against its Cauchy-Schwarz bound √(G_ii G_jj), far above fp32 rounding of G = g gᵀ,
    # plus the rounding of the gram's own dtype at its largest norm²: the bound is 0 for an edit
    # whose token gradients cancel, while its entries hold the rounding of the terms that cancelled
    # (measured on fp32 factor Grams: up to 2.9 eps × the largest G_ii; 1024 eps leaves 350× to spare
    # and stays far below the asymmetry of a cross product).  A NaN entry passes, and the metric is NaN.
    # A 16-bit gram (only a caller's own: gradient_gram and factor_gram give fp32 or fp64) comes from a
    # product whose output was rounded, so its (i, j) and (j, i) entries may lie one of its ulps apart
    # (2 eps of the bound), but from no fp32 kernel of cancelled terms: the additive allowance is at
    # most fp32's.  With its own eps, 1024 eps was 8× the largest norm² for bf16 (1.0× for fp16): a
    # diagonal entry at -5× it read as a zero gradient and [[1, 3], [-3, 1]] as symmetric (GCR 0).
    slack = 1024 * min(eps, torch.finfo(torch.float32).eps) * sq.max()
    asym = (gram[i, j] - gram[j, i]).abs()
    # (√G_ii·√G_jj: the root of their product overflowed past 1e154 and read every matrix as symmetric.)
    if bool((asym > max(1e-3, 2 * eps) * sq[i].sqrt() * sq[j].sqrt() + slack).any()):
        raise ValueError("gram must be symmetric, the Gram matrix g gᵀ of the edits' gradients "
                         "(gradient_gram, factor_gram or factors_gram gives it)")
    below = gram.diagonal() < -slack
    if bool(below.any()):
        k = int(below.nonzero()[0, 0])
        raise ValueError(f"gram[{k}, {k}] = {float(gram[k, k]):.3g} is below zero beyond rounding (the largest "
                         f"diagonal entry is {float(sq.max()):.3g}): a Gram matrix's diagonal holds the edits' "
                         "gradient norms² (gradient_gram, factor_gram or factors_gram gives it)")
    # The smaller norm over the larger, from the scaled Gram: ‖g_i‖ / ‖g_j‖ = √(S_ii / S_jj) · 2^(e_i - e_j),
    # the larger one picked by its log (only to keep 2^(…) in range: GMS's 2r / (1 + r²) is the same
    # for r and 1/r).  G_ii·G_jj, which GMS took the root of, overflowed for float64 norms past 1e77
    # (GMS inf) and underflowed below 1e-81 (GMS 0 for equal norms); a ratio of norms² would underflow
    # where that of the norms is 1e-160 (its pair's GMS 2e-160, not 0).
    size = sq.log2() + 2 * exp.double()
    i_smaller = size[i] <= size[j]
    lo, hi = torch.where(i_smaller, i, j), torch.where(i_smaller, j, i)
    ratio = (sq[lo] / sq[hi]).sqrt() * torch.pow(2.0, (exp[lo] - exp[hi]).double())
    # A zero gradient (e = 0) against another: 0, set here, not computed: against a float64 row of
    # subnormal entries (e down to -1073) 2^(e_lo - e_hi) overflowed and 0·inf made GMS NaN.
    ratio = torch.where(sq[lo] == 0, torch.zeros_like(ratio), ratio)
    ratio = torch.where((sq[i] == 0) & (sq[j] == 0), torch.ones_like(ratio), ratio)  # two zero gradients
    # A gradient with an infinite entry (an fp16 backward that overflowed; its row is not scaled, so its
    # norm² is inf, or NaN from factor_gram's QR) has no cosine and no norm to compare: its pairs are
    # NaN, as a NaN gradient's are.  GCR counted the signs of its infinite products (0.667 for a
    # number), and the ratio of norms read it as an infinitely large gradient (GMS 0 for its pairs).
    bad = ~torch.isfinite(gram.diagonal())
    bad = bad[i] | bad[j]
    nan = torch.full_like(ratio, math.nan)
    return torch.where(bad, nan, gram[i, j]), torch.where(bad, nan, ratio)


def gcr(grads: torch.Tensor | None = None, *, gram: torch.Tensor | None = None) -> float:
    """Gradient conflict ratio: share of edit pairs whose gradients have negative cosine.
    Exactly one of `grads` (E, P), one per-edit gradient per row, or `gram` (E, E), their Gram
    matrix (`factor_gram`, `factors_gram`); E >= 2.
    `gram`: a diagonal entry below zero within rounding is a zero gradient; further below, ValueError."""
    dot, _ = _pair_stats(grads, gram)
    # cos < 0 exactly when the inner product is < 0 (norms are positive; a zero gradient has
    # inner product 0 with everything and so conflicts with nothing).  A NaN inner product (a
    # NaN or infinite gradient) makes the ratio NaN rather than a pair that silently does not conflict.
    if torch.isnan(dot).any():
        return math.nan
    return float((dot < 0).double().mean())


def gms(grads: torch.Tensor | None = None, *, gram: torch.Tensor | None = None) -> float:
    """Gradient magnitude similarity: mean over pairs of 2‖g_i‖‖g_j‖ / (‖g_i‖² + ‖g_j‖²).
    Exactly one of `grads` (E, P) or `gram` (E, E), as `gcr`'s.
    `gram`: a diagonal entry below zero within rounding is a zero gradient; further below, ValueError."""
    # 2‖g_i‖‖g_j‖ / (‖g_i‖² + ‖g_j‖²) = 2r / (1 + r²), r the ratio of the norms (1 for two zero
    # gradients; NaN stays NaN).
    _, r = _pair_stats(grads, gram)
    return float((2 * r / (1 + r * r)).mean())
