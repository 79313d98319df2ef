"""The fine-tuning baselines of ModelEditor: "ft" and "ft_kl" (MEND's FT and FT+KL).

Fine-tune only the edited layers' weights on the edits for `ft_steps` steps of Adam or SGD
(`ft_optimizer`, `ft_lr`), on the batch-mean target NLL; "ft_kl" adds `kl_weight`·KL(p_unedited ‖
p_edited) over every token of locality texts (the requests' `locality` [+ `locality_target`],
else `locality_texts`, else a few generic sentences; an empty `locality_texts` is refused), as in
MEND's baseline.  MEND's own runs of
these baselines (its algs/ft.py, config/alg/ft.yaml) take other settings: RMSprop at 5e-6 for up to
100 steps, stopping once every edit's target is predicted whole (teacher-forced), the gradient's norm
clipped at 100, and FT+KL's loss KL + 0.01·L_edit; here the defaults are `FT_DEFAULTS` (Adam at 5e-4,
10 steps, stopping once the edit loss is below `ft_stop_loss`, no clipping, L_edit + `kl_weight`·KL
with kl_weight 1: kl_weight=100 gives MEND's ratio).  The steps after the first run the blocks
above the lowest fine-tuned one only (`block_prefix`).  `FineTuneBaselines` is a mixin of
ModelEditor: it uses the editor's model, layers, tokenizer and its chunked forward
(`_capture_chunks`, `_scored_edit_loss`, `_length_errors`).
"""

from __future__ import annotations

import contextlib
import time

import torch
from torch import nn

from ._checks import (
    HALF_DTYPES, all_finite, all_finite_many, check_text, first_non_finite, is_finite_number, is_int,
)
from .block_prefix import PrefixReuse
from .capture import no_activation_checkpointing
from .devices import host_scalars_on_cpu
from .edit_handle import add_note, deferred_interrupt, restore
from .head_kl_function import LogitsAfterHead, head_kl, head_rows_at, kl_head, rows_of
from .losses import backward_scale, log_probs_at, picked_kl
from .requests import EditRequest
from .scored_logits import logits_at, scored_positions
from .tied_weights import shared_parameters
from .tokenize import embedding_rows, join_prompt_target, no_kv_cache, pad_rows, pad_token_id, text_ids

FT_DEFAULTS = dict(ft_steps=10, ft_lr=5e-4, ft_optimizer="adam", kl_weight=1.0, locality_texts=None,
                   ft_stop_loss=1e-2)
FT_KL_ONLY = ("kl_weight", "locality_texts")  # FT_DEFAULTS that only method "ft_kl" uses

# Unrelated text for FT+KL when neither the requests nor `locality_texts` give any (as in
# `evaluate.measure_edit`, which holds the scored locality prompts out): everyday sentences in the
# style of the wiki text MEND's baseline uses, so the KL term has something to hold in place.  They
# state no fact an edit is likely to target (an earlier list had "The capital of France is Paris",
# the README's example edit) and paraphrase none of `facts.py`'s neighbour prompts.
GENERIC_LOCALITY_TEXTS = (
    "Many people enjoy reading a good book on a quiet evening at home.",
    "The quick brown fox jumps over the lazy dog near the old barn.",
    "In 1969 the first humans walked on the surface of the Moon.",
    "She poured a cup of tea and sat down by the window to watch the rain.",
    "The train left the station a few minutes late on a rainy morning.",
    "Regular exercise and enough sleep help people stay healthy.",
    "The children built a small boat out of paper and floated it on the pond.",
    "A good recipe lists its ingredients before it explains each step.",
)


def locality_texts(requests) -> list[str]:
    """The locality prompt (+ its answer) of each request that has one: FT+KL's KL texts, e.g. a
    training split's for `locality_texts=` (python/report.py)."""
    texts = []
    for r in requests:
        if r.locality is not None:
            # Joined as the metrics score the pair (`join_prompt_target`: no space added before a target
            # that starts with whitespace; the KL read "is  blue" where NS and DD read "is blue").
            target = r.locality_target
            texts.append(r.locality if target is None else join_prompt_target(r.locality, target)[0])
    return texts


@contextlib.contextmanager
def swapped_parameters(model: nn.Module, values: list[tuple[nn.Parameter, torch.Tensor]]):
    """Inside the block, every module of `model` that holds one of the parameters (as a module
    may under two names, or two modules may, as a tied LM head and input embedding do) holds a
    frozen Parameter over the paired tensor's memory instead; the parameters themselves are not
    touched and come back on exit.  Unlike `torch.func.functional_call`, which swaps by name: it
    put back a plain tensor, not the Parameter, for a module reachable under two names."""
    by_id = {id(p): v for p, v in values}
    held = [(module, attr, p) for module in model.modules() for attr, p in module._parameters.items()
            if p is not None and id(p) in by_id]
    try:
        for module, attr, p in held:
            module._parameters[attr] = nn.Parameter(by_id[id(p)], requires_grad=False)
        yield
    finally:
        with deferred_interrupt():  # a Ctrl-C meanwhile waits until every Parameter is back
            for module, attr, p in held:
                module._parameters[attr] = p


def _prefixed(prefix: PrefixReuse | None, key: tuple, batch: dict):
    """Where the pass over `batch` (rows `key`) runs: from the kept output of the blocks below the
    fine-tuned ones when `prefix` holds it, else through every block, keeping that output."""
    if prefix is None:
        return contextlib.nullcontext()
    return prefix.run_from(key, tuple(batch["input_ids"].shape))


class FineTuneBaselines:
    """ModelEditor's "ft" and "ft_kl" methods (see the module docstring)."""

    def _ft_options(self, kwargs: dict) -> dict:
        unknown = sorted(set(kwargs) - set(FT_DEFAULTS))
        if unknown:
            takes = sorted(set(FT_DEFAULTS) - (set(FT_KL_ONLY) if self.method == "ft" else set()))
            raise ValueError(f"unknown arguments for method {self.method!r}: {unknown}; it takes {takes}")
        kl_only = sorted(set(kwargs) & set(FT_KL_ONLY))
        if kl_only and self.method == "ft":  # method "ft" has no KL term: they would be ignored
            raise ValueError(f"{', '.join(kl_only)}: for method 'ft_kl' only (method 'ft' has no KL term)")
        opts = {**FT_DEFAULTS, **kwargs}
        if not is_int(opts["ft_steps"]) or opts["ft_steps"] < 1:
            raise ValueError(f"ft_steps must be a positive int, got {opts['ft_steps']!r}")
        lr = opts["ft_lr"]  # the optimiser's steps are taken in the fp32 copies
        if not is_finite_number(lr) or not 0 < lr <= torch.finfo(torch.float32).max:
            raise ValueError(f"ft_lr must be a positive finite number within float32's range, got {lr!r}")
        if opts["ft_optimizer"] not in ("adam", "sgd"):
            raise ValueError(f"ft_optimizer must be 'adam' or 'sgd', got {opts['ft_optimizer']!r}")
        if not is_finite_number(opts["kl_weight"]) or opts["kl_weight"] < 0:
            raise ValueError(f"kl_weight must be a non-negative finite number, got {opts['kl_weight']!r}")
        if opts["ft_stop_loss"] is not None and not is_finite_number(opts["ft_stop_loss"]):
            raise ValueError(f"ft_stop_loss must be a finite number or None, got {opts['ft_stop_loss']!r}")
        texts = opts["locality_texts"]
        if texts is not None:
            try:  # listed first: checking a generator's items would consume them
                texts = None if isinstance(texts, str) else list(texts)
            except TypeError:
                texts = None
            if texts is None or not all(isinstance(t, str) for t in texts):
                raise ValueError("locality_texts must be a list of non-empty strings")
            for i, text in enumerate(texts):
                # A lone surrogate, taken here, made the tokenizer refuse it in `apply` with a TypeError
                # that named nothing (as a request's field, which EditRequest checks the same way).
                check_text(text, f"locality_texts[{i}]")
            if not texts:
                # [] fell back to the generic sentences, as None does, without a word: a caller who
                # passes it most likely means "no extra texts" (that is kl_weight=0, or method "ft")
                # or built it from requests that have no locality prompts (python/report.py checks).
                raise ValueError("locality_texts is empty: FT+KL would use its generic sentences, as with None; "
                                 "pass None for those, or texts (no KL term at all: kl_weight=0 or method 'ft')")
            opts["locality_texts"] = texts
        if self.method == "ft_kl" and self.seq2seq:
            raise ValueError("method 'ft_kl' supports causal LMs only (its KL runs over locality texts)")
        return opts

    def _locality_texts(self, requests: list[EditRequest]) -> list[str]:
        texts = locality_texts(requests)
        return texts or list(self.ft_options["locality_texts"] or GENERIC_LOCALITY_TEXTS)

    def _locality_names(self, requests: list[EditRequest]) -> list[str] | None:
        """The caller's name of each of `_locality_texts`' texts when they are the requests'
        locality prompts ("requests[i].locality", i its place among all the requests: the texts
        list only the requests that have one); None when they are `locality_texts`, which errors
        name by their own index ("locality texts[k]"); the generic sentences are named as such (a
        short-context model refused one as "locality texts[6]", a text its caller never gave)."""
        rows = [i for i, r in enumerate(requests) if r.locality is not None]
        if rows:
            return [f"requests[{i}].locality" for i in rows]
        if self.ft_options["locality_texts"] is None:
            return [f"GENERIC_LOCALITY_TEXTS[{k}] (FT+KL's KL text when no request has a locality prompt and "
                    "locality_texts is None)" for k in range(len(GENERIC_LOCALITY_TEXTS))]
        return None

    def _locality_batch(self, texts: list[str], names: list[str] | None = None) -> dict:
        # As every row here is tokenized: a trailing EOS that the tokenizer appends is no token of the text.
        rows = [text_ids(self.tokenizer, t) for t in texts]
        return pad_rows(rows, pad_token_id(self.tokenizer), self.device, vocab_size=embedding_rows(self.model),
                        row_name=lambda i, j: f"{names[i] if names else f'locality texts[{i}]'} ({texts[i]!r})")

    def _ft_kl_reference(self, loc: dict, names: list[str] | None = None, prefix=None, head=None) -> list:
        """[(chunk, its KL positions, the unedited model's log-probabilities there or None, the
        chunk's share of all KL positions)] for the locality batch `loc`, `capture_batch_size` rows
        at a time, sorted by length (`_capture_chunks`, as the edit rows: see `_apply_ft`; every
        non-padding token is a KL position).  With `head` (`head_kl_function.kl_head`): the head's
        input rows there (n, H) instead of the log-probabilities, every chunk's kept (their KL is
        `head_kl`'s); LogitsAfterHead when the model's logits turn out not to be its head's output.

        On the logits path (no `head`), a batch of one chunk keeps its reference (n×V fp32).
        Chunked batches keep none (None): each step recomputes a chunk's reference from the saved
        unedited weights just before its KL (`_ft_base_log_probs`), one more no-grad forward per
        chunk and step, so the memory stays one chunk's as everywhere else in the chunked path;
        keeping them all would hold n×V fp32 for every locality token (1,000 CounterFact locality
        prompts on SmolLM2, ~9 tokens each at V = 49,152: 1.8 GB).  Also kept when an edited
        weight shares its memory with another parameter object (`_reference_recomputable`)."""
        total = max(int(loc["attention_mask"].sum()), 1)
        chunks, _ = self._capture_chunks(loc)
        keep = head is not None or len(chunks) == 1 or not self._reference_recomputable()
        parts = []
        with self._length_errors(loc, "locality texts", names):
            for k, chunk in enumerate(chunks):
                mask = chunk["attention_mask"].bool()
                base_logp = self._ft_base_log_probs_from(prefix, k, chunk, mask, head=head) if keep else None
                parts.append((chunk, mask, base_logp, int(mask.sum()) / total))
        return parts

    def _reference_recomputable(self) -> bool:
        """Whether the unedited model can be run from the saved weights (`swapped_parameters`):
        not when an edited weight overlaps the memory of another parameter object
        (`shared_parameters`), which would keep reading the edited values."""
        for module in self.modules.values():
            if any(self.model.get_parameter(n) is not module.weight for n in shared_parameters(self.model, module)):
                return False
        return True

    def _ft_base_log_probs(self, chunk: dict, mask: torch.Tensor, reference=(), head=None) -> torch.Tensor:
        """The KL reference of one locality chunk: the model's log-probabilities at `mask` (with
        `head`: the head's input rows there), with `reference` ([(edited weight, its value before
        fine-tuning)]) in place of those weights."""
        with swapped_parameters(self.model, list(reference)):
            at = log_probs_at if head is None else head_rows_at
            return at(self.model, chunk["input_ids"], chunk["attention_mask"], mask, skip=self.modules.values(),
                      **no_kv_cache(self.model))

    def _ft_base_log_probs_from(self, prefix: PrefixReuse | None, k: int, chunk: dict, mask: torch.Tensor,
                                reference=(), head=None) -> torch.Tensor:
        """`_ft_base_log_probs` of locality chunk `k`, run from the kept output of the blocks below
        the fine-tuned ones when `prefix` holds it (else keeping it); on the model's first recorded
        pass, checked once (`PrefixReuse.confirm`)."""
        with _prefixed(prefix, ("kl", k), chunk):
            base_logp = self._ft_base_log_probs(chunk, mask, reference, head)
        if prefix is not None:
            prefix.confirm(("kl", k), lambda b: self._ft_base_log_probs(b, mask, reference, head), chunk, base_logp)
        return base_logp

    def _apply_ft(self, requests: list[EditRequest], batch: dict, saved: list):
        # Hugging Face activation checkpointing off, as for the capture and training: its reentrant
        # form (transformers 4.x's default) hides the weights inside a checkpointed block from
        # `torch.autograd.grad`, so every fine-tuned layer "got no gradient" in a model in train mode.
        with no_activation_checkpointing(self.model):
            start, t0 = len(saved), time.perf_counter()
            try:
                return self._fine_tune(requests, batch, saved)
            except LogitsAfterHead:
                # A step's logits were not the head's output as the reference pass's were (a forward
                # that changes them under grad only): the weights are restored; once more from the
                # logits, which `kl_head` now gives this model (outside this block: an error of the
                # second run is not chained to this one).
                del saved[start:]
            stats = self._fine_tune(requests, batch, saved)
            stats["ft_s"] = time.perf_counter() - t0  # both runs
            return stats

    def _fine_tune(self, requests: list[EditRequest], batch: dict, saved: list):
        opts = self.ft_options
        # Each weight once: a module under two names (or two modules holding one Parameter) is one
        # weight to fine-tune; listed twice, the optimiser stepped it twice per step and its
        # gradient was divided by the backward's scale twice.
        named = {}
        for name in self.layers:
            named.setdefault(id(self.modules[name].weight), (name, self.modules[name].weight))
        names, weights = [n for n, _ in named.values()], [w for _, w in named.values()]
        params = list(self.model.parameters())
        flags = [p.requires_grad for p in params]
        grads = [p.grad for p in weights]
        saved.extend((w, w.detach().clone()) for w in weights)  # before any weight changes
        t0, steps_run = time.perf_counter(), 0
        try:
            for p in params:
                p.requires_grad_(False)
            for w in weights:
                w.requires_grad_(True)
                w.grad = None
            # The blocks below the lowest fine-tuned one see the same rows with the same weights at
            # every step: their output is kept from the first pass over each chunk (and from the KL
            # reference pass) and the later passes run the blocks above from there (`block_prefix`,
            # where it is exact: the same tensors, so the same steps and weights, bit for bit).
            # SmolLM2, the demo's 25 edits on layers 27-29, 10 steps, CPU, 1 thread, CPU time per
            # apply: FT 13.5-13.7 s -> 3.9-4.1 s, FT+KL 21.7-21.9 s -> 8.3-9.0 s (the model's first
            # apply 2.8 s more: `confirm`'s check, which editor training has done when it ran first).
            # Not when another parameter views a fine-tuned weight (allow_tied): a block below may
            # hold it, and its output then changes with every step (`for_written_weights`).
            prefix = PrefixReuse.for_written_weights(self.model, self.modules)
            kl_parts, loc, loc_names, head = [], None, None, None
            if self.method == "ft_kl" and opts["kl_weight"] > 0:
                loc_names = self._locality_names(requests)
                loc = self._locality_batch(self._locality_texts(requests), loc_names)
                # The KL from the head's input rows where the model's logits are its head's output
                # (`head_kl_function`, as editor training's): every chunk's reference kept, (n, H),
                # none recomputed, no n×V tensor; else from the logits.
                head = kl_head(self.model, self.modules.values(), weights)
                if head is not None:
                    try:
                        kl_parts = self._ft_kl_reference(loc, loc_names, prefix, head)
                    except LogitsAfterHead:  # found on the first chunk's pass, once per model
                        head = None
                if head is None:
                    kl_parts = self._ft_kl_reference(loc, loc_names, prefix)
            reference = saved[-len(weights):]  # (weight, its saved value): chunks whose reference is recomputed
            # 16-bit weights are optimised through fp32 copies (mixed precision): Adam's state in
            # fp16 underflows (eps = 1e-8 is 0 there) and one step made every weight non-finite.
            masters = [w.detach().float().requires_grad_(True) if w.dtype in HALF_DTYPES else w for w in weights]
            if opts["ft_optimizer"] == "adam":
                opt = torch.optim.Adam(masters, lr=opts["ft_lr"])
            else:
                opt = torch.optim.SGD(masters, lr=opts["ft_lr"])

            # Both losses are means (the edit loss over the batch's target tokens, the KL over the
            # locality tokens): each is backpropagated at its per-token sum's scale and its
            # gradients divided back, exactly (in fp16 they flushed to zero as the batch grew, see
            # backward_scale; a power of two changes no fp32 or bf16 result).
            scales = (backward_scale(self._n_scored(batch)),
                      backward_scale(int(loc["attention_mask"].sum())) if loc is not None else 1.0)

            def backward(loss, scale):
                """Check, backpropagate `loss` × `scale` to the fine-tuned weights, and add their
                gradients, divided back, to the masters' (a 16-bit weight's in fp32: its chunks'
                gradients add up in fp32)."""
                if not bool(torch.isfinite(loss)):
                    raise FloatingPointError(f"the fine-tuning loss is not finite ({float(loss.detach())})")
                # The fine-tuned weights' gradients only, as the capture takes its own: `.backward()`
                # ran every node the loss reaches, also a graph that is not the fine-tuning's (the
                # edits of a caller's `lowrank_edited` block), and freed it, so the next backward
                # raised "backward through the graph a second time".
                grads = torch.autograd.grad(loss * scale, weights, allow_unused=True)
                for w, m, g in zip(weights, masters, grads):
                    if g is None:
                        continue
                    grad = (g.float() if m is not w else g) / scale
                    m.grad = grad if m.grad is None else m.grad.add_(grad)

            # Rows sorted by length, each chunk trimmed to its longest (`_capture_chunks`), the edit rows
            # and the locality texts alike: cut in input order, every chunk kept the whole batch's width.
            # A random Llama (hidden 256, 4 blocks, fp32, CPU, 1 thread), FT+KL of 125 edits of mixed
            # lengths (30 % long rows) on one down_proj, 5 steps, chunks of 32: 62 % of the passes'
            # token slots were padding, 29 % sorted; CPU time a call 24.0-32.3 s -> 13.6-15.1 s (6 calls
            # each); the tiny Llama (hidden 24) 1.24-1.71 s -> 0.98-1.13 s.  The same sums in another
            # order: weights equal to float64 rounding (tests/test_model_editor.py).
            chunks, _ = self._capture_chunks(batch)
            n_scored = self._n_scored(batch) if len(chunks) > 1 else None

            def step_gradients(scales) -> bool:
                """One step's gradients in the masters: the batch-mean edit loss, then the KL, chunk
                by chunk, each chunk's loss backpropagated at once.  False, with the last edit
                chunk not backpropagated, when the edit loss is below ft_stop_loss."""
                opt.zero_grad(set_to_none=True)
                for w in weights:
                    w.grad = None
                edit_total, last = 0.0, None
                for k, chunk in enumerate(chunks):
                    with _prefixed(prefix, ("edit", k), chunk):
                        loss, _ = self._scored_edit_loss(chunk, "token", n_scored)
                    if prefix is not None:  # on the model's first recorded pass: a check, once (`confirm`)
                        prefix.confirm(("edit", k), lambda b: log_probs_at(
                            self.model, b["input_ids"], b["attention_mask"], scored_positions(b["labels"], True),
                            skip=self.modules.values(), **no_kv_cache(self.model)), chunk, None)
                    edit_total += float(loss.detach())
                    if k < len(chunks) - 1:
                        backward(loss, scales[0])
                    else:
                        last = loss
                if opts["ft_stop_loss"] is not None and edit_total < opts["ft_stop_loss"]:
                    return False
                backward(last, scales[0])
                for k, (chunk, mask, base_logp, share) in enumerate(kl_parts):
                    with self._length_errors(loc, "locality texts", loc_names):
                        if base_logp is None:  # chunked: recomputed, not kept (see _ft_kl_reference)
                            base_logp = self._ft_base_log_probs_from(prefix, k, chunk, mask, reference)
                        with logits_at(self.model, mask, skip=self.modules.values(), rows_only=head is not None) \
                                as scored, _prefixed(prefix, ("kl", k), chunk):
                            logits = self.model(input_ids=chunk["input_ids"], attention_mask=chunk["attention_mask"],
                                                **no_kv_cache(self.model)).logits
                    if head is not None:
                        kl = head_kl(base_logp, rows_of(scored, logits, self.model), head)
                    else:
                        kl = picked_kl(base_logp, scored.pick(logits))
                    kl = opts["kl_weight"] * share * kl
                    del base_logp
                    backward(kl, scales[1])
                return True

            with torch.enable_grad():
                for _ in range(opts["ft_steps"]):
                    if not step_gradients(scales):
                        break
                    # One device sync for every layer's gradient, not one per layer (twice); the
                    # layers are read one by one only to name a bad one.
                    finite = all_finite_many(m.grad for m in masters)
                    if not finite and scales != (1.0, 1.0):
                        # A 16-bit weight's gradient sums over every token, so the scaled one can
                        # overflow where the mean's did not: this step again, unscaled.
                        step_gradients((1.0, 1.0))
                        finite = all_finite_many(m.grad for m in masters)
                    for name, m in zip(names, masters):
                        if m.grad is None:
                            raise RuntimeError(f"layer {name!r} got no gradient from the fine-tuning loss "
                                               "(it did not run in the model's forward)")
                        if not finite and not all_finite(m.grad):
                            raise FloatingPointError(f"non-finite gradient for layer {name!r}")
                    with host_scalars_on_cpu():  # Adam's step counts (devices.host_scalars_on_cpu)
                        opt.step()
                    with torch.no_grad():
                        for w, m in zip(weights, masters):
                            if m is not w:
                                w.copy_(m)
                    steps_run += 1
            bad = first_non_finite({name: (w,) for name, w in zip(names, weights)})
            if bad is not None:
                raise FloatingPointError(f"the fine-tuned weight of layer {bad!r} is not finite")
        except BaseException as exc:
            restore(saved)
            add_note(exc, "dcedit: the fine-tuning edit failed; the edited weights were restored bit for bit")
            raise
        finally:
            with deferred_interrupt():  # a Ctrl-C meanwhile waits until every flag and .grad is back
                for p, flag in zip(params, flags):
                    p.requires_grad_(flag)
                for w, g in zip(weights, grads):
                    w.grad = g
        return dict(ft_s=time.perf_counter() - t0, ft_steps_run=steps_run,
                    n_tokens=int(batch["attention_mask"].sum()))
