"""The gradient capture of ModelEditor: the edit batch, the forward + backward of its edit loss,
and the factors (μ, η) and edit features that pass yields.

A forward + backward of the edit loss (`loss_reduction`, see `model_editor`) captures the gradient
factors (μ, η) of every edited weight (`capture.py`), with the model's parameters frozen for the
pass (their `requires_grad` flags are restored afterwards) so that autograd keeps only the graph
above the first edited layer, one pass per `capture_batch_size` edits (their factors concatenated)
and the LM head computing logits at the target-predicting positions only (`scored_logits.py`), so
that its memory grows with the number of edits only through the factors themselves (a causal LM's
chunks are copied into the joined factors as they run, `_capture_into`; otherwise they are held
twice for one layer while the chunks' factors are joined).  MoEditor's edit features (the mean
last hidden state over each edit's prompt, `_edit_features`) come from the same forward.

`EditCapture` is a mixin of ModelEditor, kept apart from its construction, apply and checkpoints:
it uses the editor's model, tokenizer, layers, modules, tokens, loss_reduction, seq2seq,
capture_batch_size, device and editors; the FT baselines (`ft_baseline.py`) run their chunked
forward through it too (`_capture_chunks`, `_scored_edit_loss`, `_length_errors`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Sequence

import torch

from ._checks import first_non_finite
from .capture import Factors, capture_factors, check_token_count, frozen_parameters
from .head_input import called_head, head_input
from .losses import backward_scale, edit_loss, unscale
from .positions import learned_position_limit, past_positions
from .scored_logits import logits_at, scored_positions
from .tokenize import IGNORE_INDEX, embedding_rows, forward_inputs, no_kv_cache, tokenize_causal, tokenize_seq2seq

# Rows per forward + backward of the capture (and of the FT baselines).  SmolLM2-135M, 3 edited
# down_proj layers, CounterFact prompts of ~20 tokens, CPU: the capture of 500 edits in one pass
# took 8.2 GB over the model's 1.3 GB (2.2 GB once the LM head computed only the scored positions).
DEFAULT_CAPTURE_BATCH_SIZE = 32


class EditCapture:
    """Tokenization and gradient capture of ModelEditor (a mixin; see the module docstring)."""

    # -- tokenization and capture ----------------------------------------------------------------
    def tokenize(self, prompts: Sequence[str], targets: Sequence[str], name: str = "requests") -> dict:
        """Edit batch of `prompts` and `targets` (labels on the target tokens); ValueError naming
        the request on an empty target (`name`: what the messages call the list, "requests")."""
        for arg, texts in (("prompts", prompts), ("targets", targets)):
            # list() below: None raised "'NoneType' object is not iterable", and a lone str became its
            # characters, one row each (as metrics.target_accuracy refuses it).
            if isinstance(texts, str) or not hasattr(texts, "__iter__"):
                shown = "a single str" if isinstance(texts, str) else type(texts).__name__
                raise ValueError(f"{arg} must be a sequence of str, got {shown}")
        fn = tokenize_seq2seq if self.seq2seq else tokenize_causal
        try:
            return fn(self.tokenizer, list(prompts), list(targets), device=self.device,
                      vocab_size=embedding_rows(self.model))
        except ValueError as exc:
            raise ValueError(f"{name} could not be tokenized ({exc}); the model was not changed") from None

    @contextlib.contextmanager
    def _length_errors(self, batch: dict, name: str, row_names: Sequence[str] | None = None):
        """A ValueError naming the row of `batch` past the model's positions
        (`positions.past_positions`): `{name}[i]`, or `row_names[i]` when given (the caller's name of
        row i, e.g. "requests[3].locality").  Raised before the block runs where the model has a
        learned position table (on a GPU, a lookup past it is a device-side assert that no except
        clause catches and that leaves the CUDA context unusable), else from an IndexError inside it."""

        def refused(past):
            i, length, what, limit = past
            what = f" ({what})" if name == "requests" else ""
            row = row_names[i] if row_names is not None and i < len(row_names) else f"{name}[{i}]"
            return ValueError(f"{row} is {length} tokens{what}, more than the model's "
                              f"{limit} positions; the model was not changed")

        if learned_position_limit(self.model) is not None:
            past = past_positions(self.model, batch, causal=not self.seq2seq)
            if past is not None:
                raise refused(past)
        try:
            yield
        except IndexError as exc:
            past = past_positions(self.model, batch, causal=not self.seq2seq)
            if past is None:
                raise
            raise refused(past) from exc

    def capture(self, batch: dict, need_feats: bool | None = None):
        """({layer: Factors}, edit features (E, hidden) or None, loss): one forward + backward per
        `capture_batch_size` rows, their factors and features concatenated in row order.  `batch`:
        what `tokenize` gives; need_feats: compute the edit features (None: `needs_feats`, True
        when an editor routes by a gate; otherwise the features are None).

        η is the gradient of the edit loss of `loss_reduction` ("edit": Σ_e of edit e's mean target
        NLL; "token": the batch's mean target NLL, each chunk's rows divided by the whole batch's
        number of target tokens, so chunking changes η by rounding only; the backward runs at the
        per-token sum's scale and η is divided back, exactly, which keeps fp16 gradients from
        flushing to zero (`losses.backward_scale`): an fp16 layer's η comes back in fp32).
        Gradients are taken with `torch.autograd.grad` against the edited modules' outputs only:
        no parameter's `.grad` changes and the weights need not require grad.  The pass runs with
        every parameter's requires_grad off (restored exactly afterwards, also on an exception), so
        the forward records only the graph the backward to the edited layers needs, whatever flags
        the caller's model has; the LM head computes logits at the scored positions only
        (`scored_logits.logits_at`).
        """
        return self._capture(batch, need_feats, nonzero=False)[:3]

    def _capture_nonzero(self, batch: dict, need_feats: bool | None = None):
        """`capture` whose factors come without their zero rows: each layer's are those of
        `Factors.without_zero_rows()` of `capture`'s, bit for bit, but the zero rows are dropped as
        each chunk runs instead of after the whole capture, so they are never held together.  Under
        tokens="all" the last block's layers get a gradient at the scored positions only, and no
        layer at a row's last token (SmolLM2, down_proj of blocks 27-29, 1,000 CounterFact edits:
        10,246 of 28,239 rows are zero, 8,246 of block 29's 9,413), and a (T, ·) buffer per factor
        held them all until the end.  Returns (factors, features, loss, rows captured: the number of
        rows before the drop, summed over the layers)."""
        return self._capture(batch, need_feats, nonzero=True)

    def _capture(self, batch: dict, need_feats: bool | None, nonzero: bool):
        if not isinstance(batch, Mapping) or not isinstance(batch.get("input_ids"), torch.Tensor):
            # None raised TypeError "not subscriptable", a dict without input_ids a bare KeyError.
            got = (type(batch).__name__ if not isinstance(batch, Mapping)
                   else f"a {type(batch).__name__} without an input_ids tensor")
            raise ValueError("batch must be a dict of tensors as ModelEditor.tokenize returns (input_ids, "
                             f"attention_mask, labels), got {got}")
        if need_feats is None:
            need_feats = self.needs_feats
        chunks, order = self._capture_chunks(batch)
        if len(chunks) == 1:
            return self._nonzero_part(self._capture_rows(batch, need_feats, None), nonzero)
        n_scored = self._n_scored(batch)
        if order is not None:  # a causal LM's sorted chunks: their token counts are known beforehand
            joined = self._capture_into(chunks, order, self._kept_per_row(batch), need_feats, n_scored, nonzero)
            if joined is not None:
                return joined
        parts = [self._nonzero_part(self._capture_rows(chunk, need_feats, n_scored), nonzero) for chunk in chunks]
        # One layer at a time, each chunk's copy dropped once joined (and the joined copy once put
        # back in row order): the peak holds the factors plus one layer's joined copy, not two
        # copies of everything.
        back = None if order is None else torch.argsort(order)
        factors = {}
        for name in self.layers:
            joined = Factors.cat([p[0].pop(name) for p in parts])
            factors[name] = joined if back is None else joined.take_edits(back)
            del joined
        feats = torch.cat([p[1] for p in parts]) if need_feats else None
        if feats is not None and back is not None:
            feats = feats[back.to(feats.device)]
        return factors, feats, sum(p[2] for p in parts), sum(p[3] for p in parts)

    @staticmethod
    def _nonzero_part(part: tuple, nonzero: bool) -> tuple:
        """`_capture_rows`' (factors, features, loss) with the rows captured (all layers' together)
        appended, and with `nonzero` each layer's factors without their zero rows."""
        factors, feats, loss = part
        captured = sum(f.num_tokens for f in factors.values())
        if nonzero:
            for name in factors:
                factors[name] = factors[name].without_zero_rows()
        return factors, feats, loss, captured

    def _kept_per_row(self, batch: dict) -> torch.Tensor:
        """(rows,) int64 on the CPU: how many tokens the capture keeps of each row of a batch that
        `_capture_chunks` sorted (a causal LM's, with a 2-D attention mask and labels of its shape),
        as `FactorCapture._keep_mask` chooses them: the scored positions, and with tokens="all" also
        the unmasked ones."""
        mask, labels = batch["attention_mask"], batch["labels"]
        keep = scored_positions(labels, causal=True)  # position t predicts label t+1
        if self.tokens != "target":
            keep = keep | (mask.to(keep.device) != 0)
        return keep.sum(1).cpu()

    def _capture_into(self, chunks: list[dict], order: torch.Tensor, kept: torch.Tensor,
                      need_feats: bool, n_scored: int, nonzero: bool = False):
        """`capture` of several chunks whose token counts are known before they run (`kept`):
        each chunk's factors are copied, as soon as it has run, to their rows in one (T, ·) buffer
        per factor of each layer (allocated at the first chunk), in the batch's row order, and
        dropped.  The same values as joining the chunks' factors afterwards (`Factors.cat`, then
        `take_edits`), without their two joined copies of a layer, and without keeping every
        chunk's small factor tensors on the heap between the chunks' activations, which glibc
        then could not give back (SmolLM2, 3 down_proj layers, CounterFact edits in chunks of 32,
        the capture's peak RSS over the model's: 400 edits 261-270 -> 176-186 MiB for 92 MiB of
        factors, 1,000 edits 605 -> 332 MiB for 228 MiB).  None when a
        chunk keeps other counts than `kept` says, or its factors do not fit one buffer: the caller
        then runs every chunk again and joins their factors afterwards (not seen on any architecture
        of tests/test_architectures.py, which all take this path).

        With `nonzero` (`_capture_nonzero`) each chunk's factors lose their zero rows as it runs and
        wait, without them, until the last chunk has run: only then are the kept rows' places in
        the batch's row order known (the chunks run sorted by length).  Each layer's buffer then
        has its nonzero rows only, filled one layer at a time as its chunks' pieces are dropped.
        SmolLM2, 3 down_proj layers, 1,000 CounterFact edits (228 MiB of factors, 145 MiB nonzero),
        the capture with the drop, 1 thread: the peak of live tensors 298 -> 213 MiB (the buffers
        of every row beside the last chunk's activations, then the nonzero rows and one layer's
        buffer), peak RSS over the start 322 -> 290 MiB (324 without `_merge_small`).
        Returns (factors, features, loss, rows captured, all layers' together)."""
        rows = kept.numel()
        step = self.capture_batch_size or rows
        row_of = order.cpu()  # the batch row of each chunk row
        total = int(kept.sum())  # `kept` is on the CPU: no device sync
        check_token_count(total)  # before any chunk runs or a (total, ·) buffer is allocated
        starts = _starts(kept)
        buffers: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        pieces: dict[str, list] = {name: [] for name in self.layers}  # nonzero: (batch rows, Factors) per chunk
        feats, loss = [], 0
        for k, chunk in enumerate(chunks):
            index = row_of[k * step:(k + 1) * step]
            factors, chunk_feats, chunk_loss = self._capture_rows(chunk, need_feats, n_scored)
            for name in self.layers:
                f = factors.pop(name)
                if not torch.equal((f.edit_offsets[1:] - f.edit_offsets[:-1]).long().cpu(), kept[index]):
                    return None
                if nonzero:
                    pieces[name].append((index, f.without_zero_rows()))
                    _merge_small(pieces[name])
                elif not _copy_rows(buffers, name, f, starts[index], total):
                    return None
                del f
            del factors
            feats.append(chunk_feats)
            loss = loss + chunk_loss
        offsets = {name: starts for name in self.layers}
        if nonzero:  # every chunk has run: each layer's kept rows get their places in row order
            for name in self.layers:
                counts = torch.zeros(rows, dtype=torch.int64, device="cpu")
                for index, f in pieces[name]:
                    counts[index] = (f.edit_offsets[1:] - f.edit_offsets[:-1]).long().cpu()
                offsets[name] = _starts(counts)
                while pieces[name]:  # each piece dropped once copied: the layer's rows are held once
                    index, f = pieces[name].pop(0)
                    if not _copy_rows(buffers, name, f, offsets[name][index], int(offsets[name][-1])):
                        return None
                    del f
        out = {name: Factors(mu, eta, offsets[name].to(torch.int32).to(mu.device)) for name, (mu, eta) in buffers.items()}
        joined_feats = None
        if need_feats:
            joined_feats = torch.cat(feats)
            joined_feats = joined_feats[torch.argsort(order).to(joined_feats.device)]
        return out, joined_feats, loss, total * len(self.layers)

    def _capture_chunks(self, batch: dict) -> tuple[list[dict], torch.Tensor | None]:
        """(chunks, order): for a causal LM cut into more than one chunk, the rows sorted by length
        (`order`: the batch's row of each sorted row) and each chunk trimmed of the trailing columns
        that are padding in all its rows, so a chunk of short rows runs on short rows only; else
        `_row_chunks` (order None).  A batch without labels (FT+KL's locality texts) is sorted by
        its attention mask alone.  A real token attends to the positions before it only, so the
        trimmed columns change no kept token's output (rounding aside: the matmuls see other
        shapes).  Measured on SmolLM2 (fp32, CPU, layers 27-29, 125 CounterFact edits in chunks of 32): the
        chunks held 1,875 token slots for 1,159 real tokens in row order, 1,299 sorted (-31 %); the capture
        is ~95 % of apply, and apply took 2.3-2.5 s instead of 2.7-3.2 s (MoEditor, the three least
        contended of 7 alternating pairs), the same shifts."""
        chunks = self._row_chunks(batch)
        mask, labels = batch.get("attention_mask"), batch.get("labels")
        if (len(chunks) == 1 or self.seq2seq or mask is None or mask.dim() != 2
                or (labels is not None and labels.shape != mask.shape)):
            return chunks, None
        rows, width = mask.shape
        used = (mask != 0) if labels is None else (mask != 0) | (labels != IGNORE_INDEX)
        # The length of a row: up to its last real (or labelled) column, whatever side it is padded on.
        last = torch.where(used, torch.arange(1, width + 1, device=used.device), 0).amax(1)
        order = torch.argsort(last, stable=True)
        step = self.capture_batch_size or rows
        out = []
        for lo in range(0, rows, step):
            index = order[lo:lo + step]
            keep = max(int(last[index].max()), 1)
            out.append({k: (v[index.to(v.device)][:, :keep]
                            if v.dim() >= 2 and tuple(v.shape[:2]) == (rows, width)
                            else v[index.to(v.device)])
                        for k, v in batch.items()})
        return out, order

    def _n_scored(self, batch: dict) -> int:
        """The batch's number of target tokens (the "token" reduction's N over all its chunks)."""
        return int(scored_positions(batch["labels"], not self.seq2seq).sum())

    def _row_chunks(self, batch: dict) -> list[dict]:
        """`batch` cut into consecutive chunks of at most `capture_batch_size` rows (every entry of
        the batch is per row); [batch] itself when it fits."""
        rows = batch["input_ids"].shape[0]
        step = self.capture_batch_size or rows
        if rows <= step:
            return [batch]
        return [{k: v[lo:lo + step] for k, v in batch.items()} for lo in range(0, rows, step)]

    def _scored_edit_loss(self, batch: dict, reduction: str, n_scored: int | None, need_feats: bool = False):
        """(the edit loss of one forward over `batch` (see `edit_loss`), each edit's features (see
        `_edit_features`) when `need_feats`, else None), the LM head computing logits at the scored
        positions only."""
        causal = not self.seq2seq
        inputs = self.model_inputs(batch)
        gather = "labels" not in inputs  # with labels the model computes its own loss from the full logits
        positions = scored_positions(batch["labels"], causal)
        # The hidden states only where no head input can be recorded (see head_input.py).
        fallback = need_feats and causal and called_head(self.model) is None
        hidden_states = {"output_hidden_states": True} if fallback else {}
        with head_input(self.model, positions.shape, enabled=need_feats and causal) as hidden, \
                logits_at(self.model, positions, skip=self.modules.values(), enabled=gather) as scored:
            # No KV cache for a causal LM: RWKV writes its state in place, which broke the backward of
            # an edit below its last block.
            with _flex_attention_refused():
                out = self.model(**inputs, **hidden_states, **no_kv_cache(self.model))
        feats = self._edit_features(out, hidden.value, batch) if need_feats else None
        return edit_loss(scored.pick(out.logits), batch["labels"], causal, reduction, n_scored), feats

    def _capture_rows(self, batch: dict, need_feats: bool, n_scored: int | None, scale: float | None = None):
        if scale is None:  # "token": the batch mean, backpropagated at the per-token sum's scale
            scale = 1.0 if self.loss_reduction != "token" else backward_scale(
                n_scored if n_scored is not None else self._n_scored(batch))
        # The label shift is the edit loss's (causal unless seq2seq), not guessed from the model's class:
        # a causal LM that transformers' causal-LM mapping does not list (trust_remote_code) was read as
        # unshifted, and tokens="target" kept the target tokens' rows instead of those predicting them.
        capture = capture_factors(self.model, self.layers, tokens=self.tokens, batch=batch,
                                  label_shift=not self.seq2seq)
        with torch.enable_grad(), frozen_parameters(self.model), capture as cap:
            loss, feats = self._scored_edit_loss(batch, self.loss_reduction, n_scored, need_feats=need_feats)
            if not bool(torch.isfinite(loss)):
                raise FloatingPointError(f"the edit loss is not finite ({float(loss.detach())}); the model was not changed")
            # A layer off the forward's path, named: with none run, grad raised "`inputs` argument
            # to `grad()` cannot be empty".
            cap.check_all_ran()
            torch.autograd.grad(loss * scale, cap.outputs, allow_unused=True)
            factors = cap.factors
        for name, f in factors.items():
            # η divided back, exactly (see losses.backward_scale); an fp16 layer's in fp32.
            factors[name] = Factors(f.mu, unscale(f.eta, scale), f.edit_offsets)
        bad = first_non_finite({name: (f.mu, f.eta) for name, f in factors.items()})
        if bad is not None:
            if scale != 1:  # the scaled backward overflowed (fp16): these rows again, unscaled
                del factors, feats, capture, cap
                return self._capture_rows(batch, need_feats, n_scored, scale=1.0)
            raise FloatingPointError(f"non-finite gradient for layer {bad!r}; the model was not changed")
        return factors, feats, loss.detach()

    def model_inputs(self, batch: dict) -> dict:
        """What the forward needs, without labels: the loss is computed here, on the scored
        positions only, instead of HF's full-vocabulary loss over every position.  An
        encoder-decoder gets the decoder inputs its forward would build from the labels
        (`prepare_decoder_input_ids_from_labels`, BART's and T5's shift right); a model without
        that method keeps its labels."""
        return forward_inputs(self.model, batch)

    @property
    def needs_feats(self) -> bool:
        """Whether an editor routes by a gate (MoEditor), so that the capture also computes each
        edit's features (the mean last hidden state over its prompt)."""
        return any(getattr(e, "routing", None) == "gate" for e in self.editors.values())

    def _edit_features(self, out, head_in: torch.Tensor | None, batch: dict) -> torch.Tensor:
        """Mean of the last hidden state over each edit's prompt tokens (fp32, no grad): the
        encoder's for an encoder-decoder, else the input of the LM head (`head_input`: the normed
        last hidden state, which the logits are read from)."""
        if self.seq2seq:
            hidden, mask = out.encoder_last_hidden_state, batch["attention_mask"].bool()
        else:
            if head_in is None and getattr(out, "hidden_states", None) is not None:
                head_in = out.hidden_states[-1]  # a head that is not one called module
            if head_in is None or head_in.dim() != 3 or tuple(head_in.shape[:2]) != tuple(batch["labels"].shape):
                raise ValueError("MoEditor's gate reads each edit's features from the input of the model's LM "
                                 "head, and this model's get_output_embeddings() was not called on (batch, "
                                 f"length, hidden) states; {type(self.model).__name__} cannot use a gate")
            hidden = head_in
            mask = batch["attention_mask"].bool() & (batch["labels"] == IGNORE_INDEX)
        hidden, mask = hidden.detach().float(), mask.to(hidden.device).unsqueeze(-1).float()
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)


def _starts(counts: torch.Tensor) -> torch.Tensor:
    """(rows + 1,) int64 on the CPU: where each row's tokens start in a buffer of all rows' (and the end)."""
    starts = torch.zeros(counts.numel() + 1, dtype=torch.int64, device="cpu")
    starts[1:] = counts.cumsum(0)
    return starts


def _copy_rows(buffers: dict, name: str, f: Factors, starts: torch.Tensor, total: int) -> bool:
    """Copy the rows of `f` (one chunk's factors of layer `name`) to their places in that layer's
    (total, ·) buffers (allocated at its first chunk): row j of the chunk's edit e goes to
    starts[e] + j.  False when the factors do not fit the buffers (dtype, device, features)."""
    if name not in buffers:
        buffers[name] = (f.mu.new_empty((total, f.mu.shape[1])), f.eta.new_empty((total, f.eta.shape[1])))
    mu, eta = buffers[name]
    if any(a.dtype != b.dtype or a.device != b.device or a.shape[1:] != b.shape[1:] for a, b in ((mu, f.mu), (eta, f.eta))):
        return False
    counts = (f.edit_offsets[1:] - f.edit_offsets[:-1]).long().cpu()
    dest = torch.repeat_interleave(starts - f.edit_offsets[:-1].long().cpu(), counts,
                                   output_size=f.num_tokens) + torch.arange(f.num_tokens, device="cpu")
    dest = dest.to(mu.device)
    mu.index_copy_(0, dest, f.mu)
    eta.index_copy_(0, dest, f.eta)
    return True


# glibc's largest mmap threshold (DEFAULT_MMAP_THRESHOLD_MAX on 64-bit): a larger allocation is a
# mapping of its own, which goes back to the system when freed.
_MERGED_BYTES = 32 << 20


def _merge_small(pieces: list) -> None:
    """Join the last pieces (batch rows, Factors) of one layer, those after its last large one,
    once they hold `_MERGED_BYTES`: one tensor per factor, outside glibc's heap.  Left apart, each
    chunk's pieces sat on the heap between the next chunks' activations, which glibc then could
    not give back, and the join at the end allocated the layer's rows anew beside them (SmolLM2,
    down_proj of blocks 27-29, 1,000 CounterFact edits: the capture's peak RSS was 324 MiB with
    the pieces apart, as without dropping the zero rows early)."""
    def nbytes(f: Factors) -> int:
        return f.mu.nbytes + f.eta.nbytes

    k = len(pieces)
    while k and nbytes(pieces[k - 1][1]) < _MERGED_BYTES:
        k -= 1
    tail = pieces[k:]
    if len(tail) > 1 and sum(nbytes(f) for _, f in tail) >= _MERGED_BYTES:
        pieces[k:] = [(torch.cat([index for index, _ in tail]), Factors.cat([f for _, f in tail]))]


@contextlib.contextmanager
def _flex_attention_refused():
    """torch's FlexAttention has no backward on the CPU (torch 2.13: "FlexAttention does not support
    backward on CPU. Please set the input requires_grad to False ...", which an edit's capture cannot
    do): that error as a ValueError saying which setting to change.  Raised in the forward, before
    any weight changed; sdpa's captured shift is eager's to ~1e-7 (tiny models of eight
    architectures), and the edited model may run flex_attention again after."""
    try:
        yield
    except NotImplementedError as exc:
        if "FlexAttention does not support backward on CPU" not in str(exc):
            raise
        raise ValueError("the model runs attn_implementation='flex_attention' on the CPU, where torch has no "
                         "FlexAttention backward, and an edit's gradient needs one: call "
                         "model.set_attn_implementation('sdpa') (or 'eager') before editing or training; "
                         "the model was not changed") from exc
