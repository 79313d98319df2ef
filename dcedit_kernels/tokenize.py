"""Tokenize (prompt, target) pairs into padded training batches with labels on the target only.

Causal LMs (`tokenize_causal`): one sequence per pair, `prompt + " " + target` (the space is added
when the prompt does not end in whitespace and the target does not start with it, as EasyEdit and
MEND do); `labels` is -100 everywhere except at the target's tokens, which the model's own loss
shifts (HF causal LMs predict `labels[t]` from position t-1).  The text is tokenized as one string
and the prompt's tokens are located inside it, rather than tokenizing prompt and target apart,
because SentencePiece-style tokenizers (Llama) tokenize a lone " target" differently from the same
words after a prompt.  Leading special tokens (BOS) are kept; trailing ones (an EOS some
tokenizers append) are dropped, since a causal LM must not see an EOS between prompt and target.

Seq2seq LMs (`tokenize_seq2seq`): encoder `input_ids` = the prompt, `labels` = the target with the
tokenizer's special tokens (T5 appends `</s>`, BART wraps in `<s>…</s>`), padding in labels = -100,
and `decoder_attention_mask` marking the real label positions (gradient capture needs it).

Both pad on the right and return a dict of LongTensors that `model(**batch)` accepts.
"""

from __future__ import annotations

import inspect
import itertools
from typing import Sequence

import torch

from ._checks import check_items, check_text
from .devices import default_device, input_embeddings

IGNORE_INDEX = -100


def _check_texts(texts, name: str) -> list[str]:
    items = check_items(texts, name, str, "str")
    for i, text in enumerate(items):
        check_text(text, f"{name}[{i}]")
    return items


def _check_pairs(prompts, targets) -> tuple[list[str], list[str]]:
    prompts = _check_texts(prompts, "prompts")
    targets = _check_texts(targets, "targets")
    if len(prompts) != len(targets):
        raise ValueError(f"prompts and targets must have the same length, got {len(prompts)} and {len(targets)}")
    return prompts, targets


def pad_token_id(tokenizer) -> int:
    """The id to pad with: the tokenizer's pad token, else its eos, else 0 (padding is masked)."""
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    return 0


def join_prompt_target(prompt: str, target: str) -> tuple[str, int]:
    """The text `prompt [space] target` and the index where the target part (with its space) starts."""
    sep = "" if (prompt[-1].isspace() or target[0].isspace()) else " "
    return prompt + sep + target, len(prompt)


def _strip_trailing_specials(ids: list[int], special: list[int], offsets: list | None):
    end = len(ids)
    while end > 0 and special[end - 1]:
        end -= 1
    return ids[:end], special[:end], (offsets[:end] if offsets is not None else None)


def _encode(tokenizer, text: str, offsets: bool):
    kwargs = dict(add_special_tokens=True, return_special_tokens_mask=True)
    try:
        enc = tokenizer(text, **kwargs, return_offsets_mapping=offsets)
    except NotImplementedError:  # 4.x's Python ("slow") tokenizers refuse offsets; 5.x's give none
        enc = tokenizer(text, **kwargs)
    return _strip_trailing_specials(
        list(enc["input_ids"]), list(enc["special_tokens_mask"]), enc.get("offset_mapping")
    )


def text_ids(tokenizer, text: str) -> list[int]:
    """Token ids of `text` as every row here is tokenized: leading specials (BOS) kept, trailing
    ones (an EOS some tokenizers append) dropped, so the last id is the text's last token."""
    return _encode(tokenizer, text, offsets=False)[0]


def causal_pair_ids(tokenizer, prompt: str, target: str, index: int = 0) -> tuple[list[int], int]:
    """Token ids of `prompt [space] target` and the number of leading prompt tokens.

    The prompt tokens are the joint text's prefix when it matches the prompt tokenized alone
    (BPE/byte-level and SentencePiece tokenizers split at the space); otherwise (a token that
    straddles the boundary) every token that ends after the prompt's last character counts as
    target, found from the offset mapping.  A tokenizer without offsets (a Python "slow" one) counts
    the tokens the joint text shares with the prompt alone, from the start, as prompt.  Raises
    ValueError when the prompt tokenizes to no tokens (a normalizer drops every character of it, as
    BERT's does a control character) or no target token is left.
    """
    text, boundary = join_prompt_target(prompt, target)
    prompt_ids = text_ids(tokenizer, prompt)
    if not prompt_ids:  # its special tokens alone, stripped as trailing: a leading BOS was labelled as target
        raise ValueError(f"prompts[{index}] ({prompt!r}) tokenizes to no tokens")
    full_ids, special, offsets = _encode(tokenizer, text, offsets=True)
    if full_ids[: len(prompt_ids)] == prompt_ids:
        n_prompt = len(prompt_ids)
    elif offsets is None:  # iterating None raised TypeError (a SentencePiece prompt ending in a space)
        n_prompt = 0
        while n_prompt < len(prompt_ids) and full_ids[n_prompt] == prompt_ids[n_prompt]:
            n_prompt += 1
    else:
        n_prompt = 0
        for is_special, (_, end) in zip(special, offsets):
            if is_special or end <= boundary:
                n_prompt += 1
            else:
                break
    if n_prompt >= len(full_ids):
        raise ValueError(f"targets[{index}] ({target!r}) tokenizes to no tokens after prompts[{index}]")
    if n_prompt == 0:
        # The whole prompt merged into the target's first token (a tokenizer with no BOS and no split at
        # the space): that token sits at position 0, which a causal LM never predicts, so the losses and
        # metrics dropped it; an edit with one target token applied as a silent no-op (session 68).
        raise ValueError(f"prompts[{index}] ({prompt!r}) leaves no token before targets[{index}] ({target!r}): "
                         "the tokenizer merges the whole prompt into the target's first token, and a causal LM "
                         "scores no token at position 0 (a longer prompt, or one ending in a word of its own)")
    _check_spelled(tokenizer, full_ids[n_prompt:], target, f"targets[{index}]")
    return full_ids, n_prompt


def _check_spelled(tokenizer, ids: list[int], target: str, label: str) -> None:
    """ValueError naming `label` (targets[i]) when the target's tokens spell none of its characters:
    every one is the tokenizer's unknown token or whitespace (T5's "巴黎" is ['▁', '<unk>']; a
    tokenizer without byte fallback may drop such characters altogether).  Such a target was edited
    towards, and scored on, the lone word-start piece: a reliability of 1 for any unspellable target,
    the model generating "".  A target that writes the unknown token's own text spells it, as
    "<|im_end|>" spells its token (GPT-2's and SmolLM2's unknown token is their "<|endoftext|>")."""
    if not callable(getattr(tokenizer, "decode", None)):  # a bare callable tokenizer: nothing to spell with
        return
    unk = getattr(tokenizer, "unk_token_id", None)
    unk_text = getattr(tokenizer, "unk_token", None)
    if isinstance(unk_text, str) and unk_text and unk_text in target:
        unk = None
    kept = [i for i in ids if i != unk]
    if not tokenizer.decode(kept, clean_up_tokenization_spaces=False).strip():
        raise ValueError(f"{label} ({target!r}) tokenizes to {tokenizer.convert_ids_to_tokens(ids)}, which "
                         "spells none of its characters (the tokenizer's unknown token or whitespace only)")


def check_targets_spelled(tokenizer, requests, name: str) -> None:
    """`_check_spelled` for each request's target, tokenized alone (its characters are its tokens'
    in any context), naming `name[i].target`: editor training tokenizes a request only when a batch
    draws it, so a tokenizer without byte fallback refused one as many steps into a run as its batch
    came, naming its place in that batch (a helper's trial: step 13 of 20, the editors trained).
    About 10-25 µs a request (the decode)."""
    if not requests or not callable(getattr(tokenizer, "decode", None)):
        return
    targets = [r.target for r in requests]
    rows = tokenizer(targets, add_special_tokens=False)["input_ids"]
    for i, (target, row) in enumerate(zip(targets, rows)):
        _check_spelled(tokenizer, list(row), target, f"{name}[{i}].target")


def _pad(rows: list[list[int]], value: int, width: int | None = None) -> torch.Tensor:
    return _padded(rows, value, width)[0]


def _padded(rows: list[list[int]], value: int, width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(`rows` right-padded with `value`, int64, and the attention mask of their real entries,
    int64): the mask is the one the ids are written through, not a second padding of rows of ones."""
    width = max(len(r) for r in rows) if width is None else width
    # Built on the host whatever torch.set_default_device says, then moved (`_to_device`): under a "meta"
    # default device the move to the model's device raised "Cannot copy out of meta tensor" in every
    # entry point.
    out = torch.full((len(rows), width), value, dtype=torch.long, device="cpu")
    # Every row's ids in one tensor, written through one mask of the rows' lengths (row-major, as
    # they are chained): a tensor and a slice copy per row were 4 aten ops a row, and pad_rows of
    # 1,000 CounterFact rows (SmolLM2's tokenizer: ids, mask, labels) took 22 ms, 4 ms this way.
    lengths = torch.tensor([len(r) for r in rows], dtype=torch.long, device="cpu")
    ids = torch.tensor(list(itertools.chain.from_iterable(rows)), dtype=torch.long, device="cpu")
    real = torch.arange(width, device="cpu") < lengths[:, None]
    out[real] = ids
    return out, real.long()


def embedding_rows(model) -> int | None:
    """How many token ids `model`'s input embedding can look up (its num_embeddings); None where it
    has no such table to read."""
    rows = getattr(input_embeddings(model), "num_embeddings", None)
    return rows if isinstance(rows, int) and not isinstance(rows, bool) else None


def check_vocabulary(rows: list[list[int]], vocab_size: int | None, row_name, pad_id: int | None = None) -> None:
    """ValueError naming the first row (`row_name(i, j)`: row i, whose token j it is) that holds a
    token id the model's embedding lacks (>= vocab_size), or the pad id when it lacks that and pads
    a row; vocab_size None checks nothing.  A tokenizer given tokens (`add_tokens`) without
    `model.resize_token_embeddings` gives such ids, and the forward raised torch's bare IndexError
    ("index out of range in self"; on CUDA a device-side assert).  Read on the Python lists,
    before the batch is built: no device sync."""
    if vocab_size is None:
        return
    hint = "; the tokenizer has tokens the model has not: call model.resize_token_embeddings(len(tokenizer))"
    for i, row in enumerate(rows):
        if row and max(row) >= vocab_size:
            j = next(j for j, t in enumerate(row) if t >= vocab_size)
            raise ValueError(f"{row_name(i, j)} holds token id {row[j]}, past the model's embedding of "
                             f"{vocab_size} tokens{hint}")
    if pad_id is not None and pad_id >= vocab_size and len({len(r) for r in rows}) > 1:
        raise ValueError(f"the tokenizer's pad token id {pad_id} is past the model's embedding of {vocab_size} "
                         f"tokens{hint}")


def _to_device(batch: dict, device) -> dict:
    """`batch` (built on the CPU by `_pad`) on `device`; None: torch's default device, where the
    batch was built before `_pad` built it on the CPU."""
    device = default_device() if device is None else device
    return {k: v.to(device) for k, v in batch.items()}


def pad_rows(rows: list[list[int]], pad_id: int, device=None, labels: list[list[int]] | None = None,
             vocab_size: int | None = None, row_name=None) -> dict:
    """Right-padded `input_ids` and `attention_mask` (and `labels`, as wide, padded with -100).
    vocab_size: the model's (`embedding_rows`), to refuse ids past it (`check_vocabulary`, naming
    row i as `row_name(i, j)`, "rows[i]" by default)."""
    check_vocabulary(rows, vocab_size, row_name or (lambda i, j: f"rows[{i}]"), pad_id)
    input_ids, attention_mask = _padded(rows, pad_id)
    batch = {"input_ids": input_ids, "attention_mask": attention_mask}
    if labels is not None:
        batch["labels"] = _pad(labels, IGNORE_INDEX, width=batch["input_ids"].shape[1])
    return _to_device(batch, device)


def tokenize_causal(tokenizer, prompts: Sequence[str], targets: Sequence[str], device=None,
                    vocab_size: int | None = None) -> dict:
    """Batch for a causal LM: `input_ids`, `attention_mask`, `labels` (B, L), right-padded.

    Row b is `prompts[b] [space] targets[b]`; labels hold the target tokens and -100 elsewhere.
    vocab_size: the model's, to refuse token ids past it (`check_vocabulary`).
    """
    prompts, targets = _check_pairs(prompts, targets)
    ids, labels, n_prompts = [], [], []
    for i, (prompt, target) in enumerate(zip(prompts, targets)):
        row, n_prompt = causal_pair_ids(tokenizer, prompt, target, i)
        ids.append(row)
        labels.append([IGNORE_INDEX] * n_prompt + row[n_prompt:])
        n_prompts.append(n_prompt)

    def row_name(i, j):
        return f"prompts[{i}] ({prompts[i]!r})" if j < n_prompts[i] else f"targets[{i}] ({targets[i]!r})"

    return pad_rows(ids, pad_token_id(tokenizer), device, labels, vocab_size, row_name)


def tokenize_texts(tokenizer, texts: Sequence[str], device=None, vocab_size: int | None = None) -> dict:
    """Batch for a causal LM scored on whole texts: every token but the first is a label.
    vocab_size: the model's, to refuse token ids past it (`check_vocabulary`)."""
    texts = _check_texts(texts, "texts")
    ids = []
    for i, text in enumerate(texts):
        row = text_ids(tokenizer, text)
        if len(row) < 2:
            raise ValueError(f"texts[{i}] ({text!r}) needs at least 2 tokens to be scored, got {len(row)}")
        ids.append(row)
    return pad_rows(ids, pad_token_id(tokenizer), device, [[IGNORE_INDEX] + r[1:] for r in ids], vocab_size,
                    lambda i, j: f"texts[{i}] ({texts[i]!r})")


def tokenize_seq2seq(tokenizer, prompts: Sequence[str], targets: Sequence[str], device=None,
                     vocab_size: int | None = None) -> dict:
    """Batch for an encoder-decoder LM: `input_ids`, `attention_mask` (encoder, the prompts),
    `labels` (the targets with the tokenizer's special tokens, -100 at padding) and
    `decoder_attention_mask` (1 at real label positions).  The model builds its decoder inputs by
    shifting `labels` right, so decoder position t is real exactly when label t is.  vocab_size: the
    model's, to refuse token ids past it (`check_vocabulary`; the decoder shares the embedding).
    """
    prompts, targets = _check_pairs(prompts, targets)
    for i, target in enumerate(targets):
        target_ids = tokenizer(target, add_special_tokens=False)["input_ids"]
        if not target_ids:
            raise ValueError(f"targets[{i}] ({target!r}) tokenizes to no tokens")
        _check_spelled(tokenizer, list(target_ids), target, f"targets[{i}]")
    enc = [list(tokenizer(p, add_special_tokens=True)["input_ids"]) for p in prompts]
    dec = [list(tokenizer(text_target=t, add_special_tokens=True)["input_ids"]) for t in targets]
    check_vocabulary(enc, vocab_size, lambda i, j: f"prompts[{i}] ({prompts[i]!r})", pad_token_id(tokenizer))
    check_vocabulary(dec, vocab_size, lambda i, j: f"targets[{i}] ({targets[i]!r})")
    input_ids, attention_mask = _padded(enc, pad_token_id(tokenizer))
    labels, decoder_attention_mask = _padded(dec, IGNORE_INDEX)
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
             "decoder_attention_mask": decoder_attention_mask}
    return _to_device(batch, device)


def is_seq2seq(model) -> bool:
    return bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))


def listed_causal_lm(model) -> bool:
    """True when the model's class (or a base of it) is in transformers' causal-LM mapping, not an
    encoder-decoder: its loss predicts label t at position t-1 (HF causal LMs)."""
    if getattr(model, "config", None) is None or is_seq2seq(model):
        return False
    try:
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    except ImportError:
        return False
    return bool(_class_names(model) & set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()))  # subclasses count too


def bidirectional_lm(model) -> str | None:
    """Why `model`, not an encoder-decoder, is a Hugging Face LM whose tokens also attend to the tokens
    after them (a masked LM such as BertForMaskedLM, or BertLMHeadModel without `is_decoder`, which
    is what AutoModelForCausalLM loads from a BERT checkpoint), or None.  Such a model reads the target
    in its own input, so the causal edit loss and the teacher-forced metrics are meaningless on it.
    Judged from transformers' causal- and masked-LM mappings; a class they do not list passes."""
    config = getattr(model, "config", None)
    if config is None or is_seq2seq(model):
        return None
    try:
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES as causal_lms
        from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES as masked_lms
    except ImportError:
        return None
    names, kind = _class_names(model), type(model).__name__
    if not listed_causal_lm(model):
        if names & set(masked_lms.values()):
            return f"{kind} is a masked LM: its tokens attend to the tokens after them"
        return None
    model_type = getattr(config, "model_type", None)
    if causal_lms.get(model_type) in names and model_type in masked_lms:  # an encoder family's causal head
        flag = "causal" if model_type == "xlm" else "is_decoder"  # XLM's causal attention has its own flag
        if not getattr(config, flag, False):
            return f"{kind} has config.{flag}=False: its tokens attend to the tokens after them"
    return None


def _class_names(model) -> set[str]:
    """The names of the model's class and its bases (how transformers' auto mappings name classes)."""
    return {cls.__name__ for cls in type(model).__mro__}


def forward_inputs(model, batch: dict) -> dict:
    """What `model`'s forward needs from a tokenized batch, without its labels, so that the model
    computes no loss of its own over the full logits: an encoder-decoder gets the decoder inputs
    its forward would build from the labels (`prepare_decoder_input_ids_from_labels`, BART's and
    T5's shift right); one without that method keeps its labels."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    if not is_seq2seq(model) or "decoder_input_ids" in batch:
        return inputs
    prepare = getattr(model, "prepare_decoder_input_ids_from_labels", None)
    if not callable(prepare):
        return dict(batch)
    inputs["decoder_input_ids"] = prepare(labels=batch["labels"])
    return inputs


def no_kv_cache(model) -> dict:
    """For a causal LM, {"use_cache": False} where its forward takes it, by name or, for a model whose config
    knows the flag, through **kwargs; else {} (a custom forward may pass **kwargs on to blocks that
    take no such argument).  The forwards that are backpropagated (the capture, FT, training) need
    no cache, and a cache is state shared by the blocks (RWKV's, written in place, broke the backward
    of an edit below its last block)."""
    if is_seq2seq(model):  # an encoder-decoder keeps its own cache (BART's logits round otherwise)
        return {}
    try:
        parameters = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        return {}
    named = any(p.name == "use_cache" for p in parameters)
    knows = getattr(getattr(model, "config", None), "use_cache", None) is not None
    return {"use_cache": False} if named or (knows and any(p.kind is p.VAR_KEYWORD for p in parameters)) else {}


def tokenize_pairs(model, tokenizer, prompts: Sequence[str], targets: Sequence[str], device=None) -> dict:
    """`tokenize_seq2seq` for encoder-decoder models, else `tokenize_causal`; token ids past the
    model's embedding are refused (`check_vocabulary`)."""
    fn = tokenize_seq2seq if is_seq2seq(model) else tokenize_causal
    return fn(tokenizer, prompts, targets, device=device, vocab_size=embedding_rows(model))
