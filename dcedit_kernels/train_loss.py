"""The training loss of one batch of edits: loss = cedit·L_edit + cloc·KL + balance_weight·L_balance.

One training batch of E edits costs three model passes (the capture's split in
`capture_batch_size` rows), whatever the number of editors N_g:
1. capture: forward + backward of the edit loss on the edit prompts gives the gradient factors
   (μ, η) of every edited weight (and MoEditor's edit features); it is `ModelEditor.capture`, so
   its loss is the ModelEditor's `loss_reduction` ("edit": each edit's mean target NLL, summed;
   "token": MEND's batch mean), the same one `apply()` uses: an editor's normalisation statistics
   and steps α are learned on the scale of the factors it will be given at edit time;
2. editors (train mode: normalisation statistics update, gate noise on) map them to grouped
   low-rank factors, differentiably;
3. one forward pass over [rephrase rows; locality rows] with `lowrank_layers.lowrank_edited`:
   each edit's rephrase row sees its own group's shift (paper Eq. 18; `edit_rows="all"` makes it
   see every group's), each locality row sees the sum of every group's shift (the "add" fusion:
   what `apply()` adds for one editor or fusion "add", for "sss" on the entries where the groups
   agree in sign only, and not what "max" or "ssm" add, see lowrank_layers;
   `locality_rows="own"` for the paper's per-group form; `locality_rows="fused"` for exactly the
   shift `apply()` adds, whatever the fusion and mask, at the cost of one dense o×i fused shift per
   edited weight and step (shared by the step's passes), as the Fisher-masked path below: it
   makes the KL term measure the drawdown of the model as it will be edited for "sss", "max" and
   "ssm" editors, and gives "all"'s losses up to rounding for one editor or fusion "add"; on a
   CPU model the rows run as a few passes of rows of similar length, `length_buckets`), and
   backprop reaches the editors through `ops.lowrank_delta_linear` without any o×i shift
   (except for Fisher-masked editors, ProEditor's, below, and `locality_rows="fused"`; on the CPU
   a 16-bit layer's weight is read as an fp32 copy in each forward and backward, see
   `reference.lowrank_delta_linear`);
   plus a no-grad pass of the unedited model over the locality rows for the KL reference, whose
   hidden states below the lowest edited block the edited pass takes over instead of computing
   them again for those rows (`reuse_prefix`, `block_prefix`).

ProEditor's Fisher mask (`fisher_mask=True`, the default): as we read the paper, its framework
routes, edits, then refines (masks) the shift, and the training losses are those of the language
model after that refining stage, so the losses are taken on the masked shift.  The mask is not
low-rank, so editors built with `fisher_keep` take the dense path of `lowrank_layers` (each
group's o×i shift formed and masked; gradients flow through the kept entries only, the mask itself
being a constant of the captured gradients).  For ProEditor (one group) that costs about one extra
dense linear layer per edited weight in the forward and the backward, plus one o×i selection per
step: measured on SmolLM2 (ProEditor, rank 32, 3 down_proj layers, 25 edits, CPU, 1 thread), a
training step took 4.73-4.77 s masked against 4.68-4.73 s unmasked.  `fisher_mask=False` trains
on the unmasked shift (the mask then only acts at edit time, as this package did before).

L_edit is the mean NLL of the target tokens on each edit's rephrase (its prompt when it has none),
over all the batch's rephrase target tokens (the training objective; the capture's
`loss_reduction` only sets the scale of the factors fed to the editors): MEND's edit_outer
(EasyEdit's MEND trainer scores the edit prompts, its edit_inner, instead);
KL = mean over locality tokens of KL(p_unedited ‖ p_edited) (MEND's direction), the locality text
being the request's `locality` (+ ` locality_target`), else the prompt of the next edit in the
batch with its last position left out (that position predicts the other edit's own target, which
the edit is meant to change).  Every position of a locality text counts, as MEND's attention mask
takes them (EasyEdit's trainer keeps only a row's last positions, as many as its answer's tokens).
L_balance is the gate's importance + load loss (MoEditor).

The KL is taken from the LM head's input at the locality positions, a block of rows at a time
(`head_kl_function`): the reference and edited passes give the head none of their rows, and no
(n, V) tensor is held from the reference pass to the backward (MEND, 128 CounterFact edits a step
on SmolLM2, CPU, 1 thread: a step's peak RSS growth 927 to 197 MiB, 19.1 to 18.1 s; MoEditor with
N_g 8: 930 to 357 MiB, 18.3 to 18.0 s).  That needs the model's logits to be its head's output as
it is; where a pass shows they are not (soft-capping or scaling after the head, Gemma 2's; an
upcast of 16-bit logits in the forward), or the head is edited, compiled or trained
(`head_kl_function.kl_head`), the loss is taken from the logits at the scored positions, as before:
the first such call on a model runs its reference pass twice.

Split models (layers on several devices): each edited layer computes on its own device with the
editor outputs moved there (lowrank_layers), the losses are gathered on the logits' device, and the
gradients reach each editor on its own device through those moves.

Separate from the loop (`train`, which steps the optimisers on this loss): a function of one batch
and the editors, with no optimiser, RNG or checkpoint state of its own.
"""

from __future__ import annotations

import contextlib

import torch

from .block_prefix import PrefixReuse
from .capture import frozen_parameters
from .ft_baseline import locality_texts
from .head_kl_function import LogitsAfterHead, head_kl, head_logits, head_rows_at, kl_head, rows_of
from .length_buckets import plan_passes, run_in_passes
from .lowrank_layers import lowrank_edited
from .losses import log_probs_at, picked_kl, scored_nll
from .model_editor import ModelEditor
from .positions import learned_position_limit, past_positions
from .requests import EditRequest, validate_requests
from .scored_logits import logits_at, scored_positions
from .tokenize import causal_pair_ids, embedding_rows, no_kv_cache, pad_rows, pad_token_id, text_ids
from .train_config import TrainConfig


def _locality_row(requests: list[EditRequest], e: int, tokenizer) -> tuple[list[int], int] | None:
    """(token ids, number of KL positions) of edit e's locality row, or None (one edit, no locality)."""
    # Tokenized as the edit rows' prompts are (`tokenize.text_ids`: no appended EOS), so that the
    # last position of a prompt row is its last prompt token, the one that predicts that edit's target.
    r = requests[e]
    if r.locality is not None:
        ids = text_ids(tokenizer, locality_texts([r])[0])
        return ids, len(ids)
    if len(requests) < 2:
        return None
    ids = text_ids(tokenizer, requests[(e + 1) % len(requests)].prompt)
    return ids, len(ids) - 1  # the last position predicts the other edit's target: not locality


def _refuse_rows_past_positions(model, batch: dict, requests: list[EditRequest], row_edit: list[int],
                                is_edit: list[bool]) -> None:
    """ValueError naming the training row of `batch` past the model's learned position table, before
    the model reads it (`positions`; fit checks every request before its first step, this is for
    `batch_loss`, `loss_from_edits` and `eval_rows` called on their own)."""
    if learned_position_limit(model) is None:
        return
    past = past_positions(model, batch, causal=True)
    if past is None:
        return
    i, length, _, limit = past
    e = row_edit[i]
    r = requests[e]
    if is_edit[i]:
        name = f"requests[{e}].{'rephrase' if r.rephrase is not None else 'prompt'} + requests[{e}].target"
    elif r.locality is not None:
        name = f"requests[{e}].locality" + (f" + requests[{e}].locality_target" if r.locality_target is not None else "")
    else:  # the next edit's prompt stands in for an edit without a locality prompt (`_locality_row`)
        name = f"requests[{(e + 1) % len(requests)}].prompt (the locality row of requests[{e}])"
    raise ValueError(f"{name} is {length} tokens, more than the model's {limit} positions")


def eval_rows(me: ModelEditor, requests: list[EditRequest], config: TrainConfig) -> dict:
    """The one-pass batch: E rephrase rows (labels on the target), then the locality rows.

    Returns input_ids, attention_mask, labels (−100 on locality rows), row_edit, row_sees_all,
    row_sees_fused (`lowrank_edited`'s), is_edit_row (B,) bool and kl_mask (B, L) bool (the
    positions the KL is taken at).  ValueError naming `requests` unless they are a non-empty
    sequence of EditRequests (`validate_requests`).
    """
    # Checked here, where the rows are built: no requests padded zero rows, which raised a bare
    # "max() arg is an empty sequence" from pad_rows (in loss_from_edits and batch_loss too).
    requests = validate_requests(requests)
    check_config(config)
    tok = me.tokenizer
    rows, labels, row_edit, sees_all, is_edit, kl_len = [], [], [], [], [], []
    for e, r in enumerate(requests):
        ids, n_prompt = causal_pair_ids(tok, r.rephrase or r.prompt, r.target, e)
        rows.append(ids)
        labels.append([-100] * n_prompt + ids[n_prompt:])
        row_edit.append(e), sees_all.append(config.edit_rows == "all"), is_edit.append(True), kl_len.append(0)
    for e in range(len(requests)):
        loc = _locality_row(requests, e, tok)
        if loc is None or loc[1] < 1:
            continue
        rows.append(loc[0])
        labels.append([])
        row_edit.append(e), sees_all.append(config.locality_rows == "all"), is_edit.append(False)
        kl_len.append(loc[1])
    batch = pad_rows(rows, pad_token_id(tok), me.device, labels=labels, vocab_size=embedding_rows(me.model),
                     row_name=lambda i, j: f"a training row ({tok.decode(rows[i])!r})")
    _refuse_rows_past_positions(me.model, batch, requests, row_edit, is_edit)
    width = batch["input_ids"].shape[1]
    dev = me.device
    # On the model's device, not torch's default one ("meta": the move to `dev` raised).
    kl_mask = torch.arange(width, device=dev).unsqueeze(0) < torch.tensor(kl_len, device=dev).unsqueeze(1)
    batch.update(row_edit=torch.tensor(row_edit, dtype=torch.int64, device=dev),
                 row_sees_all=torch.tensor(sees_all, dtype=torch.bool, device=dev),
                 row_sees_fused=torch.tensor([not e and config.locality_rows == "fused" for e in is_edit],
                                             dtype=torch.bool, device=dev),
                 is_edit_row=torch.tensor(is_edit, dtype=torch.bool, device=dev),
                 kl_mask=kl_mask)
    return batch


def check_config(config) -> None:
    """ValueError unless `config` is a TrainConfig (a dict of its fields raised AttributeError)."""
    if not isinstance(config, TrainConfig):
        raise ValueError(f"config must be a TrainConfig, got {type(config).__name__}")


def check_has_editors(me: ModelEditor) -> None:
    """ValueError for an "ft"/"ft_kl" ModelEditor, which has no editors: train_editor refuses it up
    front, and batch_edits on its own ran the capture's forward and backward, then failed in
    run_editors with a bare KeyError naming the first layer."""
    if not len(me.editors):
        raise ValueError(f"method {me.method!r} has no editor to train")


def batch_edits(me: ModelEditor, requests: list[EditRequest]) -> dict:
    """{layer: GroupedEdit} for a batch of edits: capture, then the editors, differentiably (in
    the mode the editors are in: train mode updates the statistics and draws gate noise)."""
    check_has_editors(me)
    requests = validate_requests(requests)  # a str among them raised AttributeError reading .prompt
    edit_batch = me.tokenize([r.prompt for r in requests], [r.target for r in requests])
    with me._length_errors(edit_batch, "requests"):  # as apply's: a row past a learned position table
        factors, feats, _ = me.capture(edit_batch)
    with torch.enable_grad():
        return me.run_editors(factors, feats)


def loss_from_edits(me: ModelEditor, requests: list[EditRequest], edits: dict, config: TrainConfig):
    """(loss, parts): the training loss of these edits, from one edited forward pass (or passes of
    rows of similar length: `TrainConfig.length_buckets`); `parts` holds its terms' values and
    `edit_tokens`, the number of target tokens L_edit averages over.  The loss is differentiable in
    the edits (the editors) only: the model's own parameters record no graph, whatever their
    requires_grad (flags restored on return)."""
    # Frozen here, as train_editor freezes them around its whole loop: called on its own (a model
    # loaded with requires_grad=True weights, the default), the edited pass recorded every model
    # weight, so that the loss's backward filled all of the model's .grad (a tiny GPT-2: 29 of its
    # 29 parameters) and held the graph for them, besides turning `reuse_prefix` off (block_prefix
    # refuses lower blocks whose weights require grad).  The editors' gradients are those of the
    # frozen model, which the loop trains with.
    with frozen_parameters(me.model):
        return _loss_from_edits(me, requests, edits, config)


def _loss_from_edits(me: ModelEditor, requests: list[EditRequest], edits: dict, config: TrainConfig):
    """`loss_from_edits` with the model's parameters frozen by the caller: from the head's input
    rows (`head_kl_function`) where the head allows it, else (or when a pass shows that the
    model's logits are not its head's output) from the logits."""
    skip = list(me.modules.values())
    head = kl_head(me.model, skip)
    if head is not None:
        try:
            return _loss(me, requests, edits, config, skip, head)
        except LogitsAfterHead:
            # Once per model (`rows_of` remembers it): the failed pass was the reference's, or the
            # edited one's where the forward changes the logits under grad only.
            pass
    return _loss(me, requests, edits, config, skip, None)


def _loss(me: ModelEditor, requests: list[EditRequest], edits: dict, config: TrainConfig, skip: list, head):
    """The loss, from the head's input rows at the scored positions when `head` is given (the
    model's output head, `head_kl_function.kl_head`), else from the logits there."""
    model = me.model
    rows = eval_rows(me, requests, config)
    is_edit, loc_rows = rows["is_edit_row"], ~rows["is_edit_row"]
    has_loc = bool(loc_rows.any())
    # Only the KL needs the rows (the edit rows' logits are few): without locality rows, the logits.
    head = head if has_loc else None
    # The locality rows' lower blocks run once, in the reference pass (`block_prefix`).
    prefix = PrefixReuse.for_model(model, me.modules) if config.reuse_prefix and has_loc else None
    no_cache = no_kv_cache(model)  # training needs none, and RWKV's in-place state breaks the backward
    if has_loc:
        def reference(batch, where, r):
            def run(batch):
                at = log_probs_at if head is None else head_rows_at
                return at(model, batch["input_ids"], batch["attention_mask"], where, skip, **no_cache)

            if prefix is None:
                return run(batch)
            key = [loc_index[i] for i in r.tolist()]
            with prefix.record(key, batch["input_ids"].shape):
                logp = run(batch)
            prefix.confirm(key, run, batch, logp)
            return logp

        loc = {k: rows[k][loc_rows] for k in ("input_ids", "attention_mask")}
        loc_passes = _passes(me, loc, config)
        if prefix is not None:
            loc_index = loc_rows.nonzero()[:, 0].tolist()
            if loc_passes is None:  # one pass, trimmed as the edited one's will be
                loc_passes = [list(range(len(loc_index)))]
        # The base model at the KL positions: its log-probabilities (n, V), or its head's input (n, H).
        base = run_in_passes(loc, rows["kl_mask"][loc_rows], loc_passes, reference)
    # The LM head computes the logits that a loss reads only: the rephrase rows' target-predicting
    # positions and the locality rows' KL positions (scored_logits), in row-major order.
    positions = rows["kl_mask"] & loc_rows.unsqueeze(1)
    positions[is_edit] = scored_positions(rows["labels"][is_edit], causal=True)
    row_of = positions.nonzero()[:, 0]

    # The passes' one backward runs after all of them: the o×i masks and shifts that depend on the
    # edits only (Fisher-masked editors, locality_rows="fused") are formed once for every pass
    # (`lowrank_edited`'s `shared`), and dropped with this call's graph.
    shared = {}

    def edited(batch, where, r):
        key = tuple(r.tolist()) if prefix is not None else None
        reused = prefix is not None and prefix.reusable(key)
        with lowrank_edited(model, edits, rows["row_edit"][r], rows["row_sees_all"][r], masked=config.fisher_mask,
                            row_sees_fused=rows["row_sees_fused"][r], shared=shared), \
                logits_at(model, where, skip, rows_only=head is not None) as scored, \
                prefix.reuse(key) if reused else contextlib.nullcontext():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **no_cache).logits
        return scored.pick(logits) if head is None else rows_of(scored, logits, model)

    if prefix is not None and prefix.recorded:
        passes = _edited_passes(me, rows, config, loc_index, loc_passes)
    else:
        passes = _passes(me, rows, config)
    with torch.enable_grad():
        # (n, V) logits, or (n, H) head input rows with `head`.
        picked = run_in_passes(rows, positions, passes, edited)
        # The losses are gathered on the logits' device (a split model's LM head may sit elsewhere
        # than the inputs and the editors); on one device these moves are no-ops.
        out = picked.device
        edit_pick = is_edit[row_of].to(out)
        # eval_rows puts the rephrase rows first, so their positions lead the row-major order: the
        # two parts are a split of `picked` (views; its backward is one cat), where boolean picks
        # copied the (n, V) logits twice and scattered each gradient back into zeros (CPU, 1 thread,
        # 330 × 49152 fp32, forward + backward: 156-196 ms against 68-72 ms; the same values).
        n_edit = int(edit_pick.sum())
        if bool(edit_pick[:n_edit].all()):
            edit_logits, loc_logits = picked.split([n_edit, picked.shape[0] - n_edit])
        else:
            edit_logits, loc_logits = picked[edit_pick], picked[~edit_pick]
        if head is not None:  # rows: the edit rows' logits from the head, the KL a block of rows at a time
            edit_logits = head_logits(head, edit_logits)
            kl = head_kl(base, loc_logits, head)
        else:
            kl = picked_kl(base, loc_logits) if has_loc else picked.new_zeros(())
        l_edit = scored_nll(edit_logits, rows["labels"][is_edit], causal=True)
        balance = torch.stack([e.aux_loss.to(device=out, dtype=l_edit.dtype) for e in edits.values()]).mean()
        loss = config.cedit * l_edit + config.cloc * kl + config.balance_weight * balance
    parts = {k: float(v.detach()) for k, v in dict(loss=loss, edit=l_edit, kl=kl, balance=balance).items()}
    parts["edit_tokens"] = n_edit
    return loss, parts


def _passes(me: ModelEditor, batch: dict, config: TrainConfig) -> list[list[int]] | None:
    """The row indices of each forward pass over `batch`, rows of similar length together, when
    `config.length_buckets` (None: when the model's inputs go to the CPU); else None: the batch
    in one pass, as it is."""
    on = config.length_buckets if config.length_buckets is not None else me.device.type == "cpu"
    return plan_passes(batch["attention_mask"].sum(1).tolist()) if on else None


def _edited_passes(me: ModelEditor, rows: dict, config: TrainConfig, loc_index: list[int],
                   loc_passes: list[list[int]]) -> list[list[int]]:
    """The edited pass's passes when the locality rows reuse the reference's prefix: the rephrase
    rows' own (`_passes`, or all in one), then the locality rows in the reference's passes (the
    same rows in the same order: the recorded outputs fit them), as indices into `rows`
    (`loc_index`: the locality rows' indices there, in order)."""
    is_edit = rows["is_edit_row"]
    edit_index = is_edit.nonzero()[:, 0].tolist()
    edit_passes = _passes(me, {k: rows[k][is_edit] for k in ("input_ids", "attention_mask")}, config)
    passes = [[edit_index[i] for i in p] for p in edit_passes or [range(len(edit_index))]]
    return passes + [[loc_index[i] for i in p] for p in loc_passes]


def batch_loss(me: ModelEditor, requests: list[EditRequest], config: TrainConfig):
    """(loss, parts) of one batch of edits, differentiable in the editors' parameters."""
    if me.seq2seq:
        raise ValueError("editor training supports causal LMs only")
    check_config(config)  # before the capture's forward and backward
    return loss_from_edits(me, requests, batch_edits(me, requests), config)
