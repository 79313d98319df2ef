"""What `dcedit`'s commands read (threads, layers, the model, edit requests) and print
(completions); shared with python/edit_demo.py and python/report.py."""

from __future__ import annotations

import contextlib
import os
import re
import sys
from pathlib import Path
from typing import Sequence

import torch

from .._checks import is_int
from ..models import DTYPES  # --dtype's names: the map `load_model(dtype=)` takes too
from .messages import rank0
from .options import MAX_THREADS, layer_names
from .user_error import UserError, check_path

# Names of the MLP's output projection in the model families transformers ships (Llama/Mistral/
# SmolLM2, BART/Marian/OPT, T5, GPT-NeoX/Falcon, BERT): MEND edits these in the last blocks.
# BERT-style blocks name their MLP output `output.dense` and their (cross-)attention output
# `attention.output.dense` / `crossattention.output.dense`: only the first is an MLP's.
_MLP_OUT = re.compile(r"(mlp\.(down_proj|c_proj|fc_out|dense_4h_to_h)|\bfc2|DenseReluDense\.wo"
                      r"|(?<!attention\.)output\.dense)$")


def require_matplotlib() -> None:
    """UserError unless matplotlib imports: the demo and the report plot at the end of their run,
    and matplotlib is optional (the "plot" extra), so they check before any work (without it a
    run ended, minutes in, in ModuleNotFoundError, the report before writing its Markdown)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        raise UserError(f"the plots need matplotlib ({exc}): pip install matplotlib, or the package's "
                        "[plot] extra") from None


def set_threads(threads: int | None) -> int:
    """Use `threads` CPU threads (None: 1 on machines with at most 2 cores, else torch's default).

    Why 1 on small machines: with 2 threads on a busy 2-core machine every parallel op waits at
    OpenMP's barrier for a descheduled thread; measured here, a SmolLM2 forward of 8 short rows took
    5.6 s with 2 threads against 0.21 s with 1.
    """
    if threads is None:
        threads = 1 if (os.cpu_count() or 1) <= 2 else torch.get_num_threads()
    if not is_int(threads) or threads < 1:  # True is not 1 thread
        raise UserError(f"--threads must be a positive int, got {threads!r}")
    if threads > MAX_THREADS:
        raise UserError(f"--threads must be a positive int up to 2**31 - 1, got {threads!r}")
    torch.set_num_threads(threads)
    return threads


@contextlib.contextmanager
def callers_threads_kept():
    """torch's thread count back as the caller had it when the block ends: a program's main() sets
    --threads (`set_threads`: 1 on a 2-core machine), and called from Python (a notebook, the tests)
    it left the whole process on it."""
    threads = torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def editable_layers(model) -> list[str]:
    from ..capture import is_editable

    return [name for name, module in model.named_modules() if name and is_editable(module)]


def default_layers(model, n: int = 3) -> list[str]:
    """The MLP output projections of the model's last `n` blocks (MEND's choice of weights; the
    decoder's blocks in an encoder-decoder model)."""
    found = [name for name in editable_layers(model) if _MLP_OUT.search(name)]
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        found = [name for name in found if "decoder" in name.split(".")] or found
    if not found:
        raise UserError("cannot pick default layers for this model: give --layers "
                        f"(editable modules include {editable_layers(model)[-6:]})")
    return found[-n:]


def parse_layers(model, spec: str | None) -> list[str]:
    """`--layers`: comma-separated module names (checked against the model, close names listed);
    None: `default_layers`."""
    if spec is None:
        return default_layers(model)
    names = layer_names(spec)
    from ..capture import resolve_modules
    from ..tied_weights import shared_parameters

    try:
        modules = resolve_modules(model, names, arg="--layers")
    except ValueError as exc:
        raise UserError(str(exc)) from None
    for name, module in modules.items():
        # ModelEditor's refusal says "Pass allow_tied=True", which no flag passes: SmolLM2's
        # lm_head (tied to the input embedding) got that advice on the command line.
        shared = shared_parameters(model, module)
        if shared:
            raise UserError(f"--layers: {name!r} shares its weight with {', '.join(shared)} (tied "
                            "weights): editing it would change that too, so the command line does "
                            "not edit it (Python: ModelEditor(..., allow_tied=True))")
    return names


def load_any_model(name_or_path: str | None, dtype: str = "float32", device: str = "cpu"):
    """(model, tokenizer), with errors a user can act on.  The parameters keep their requires_grad:
    the capture freezes them for its own pass (`capture.frozen_parameters`), FT turns on only the
    edited weights, training freezes the model, and scoring runs under no_grad."""
    from ..models import load_model

    if dtype not in DTYPES:
        raise UserError(f"--dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    try:
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"--device {device!r} is not usable here: {first}") from None  # one line: a dispatcher error has 50
    try:
        if name_or_path is not None and _is_encoder_decoder(name_or_path):
            model, tokenizer = _load_seq2seq(name_or_path, DTYPES[dtype], device)
        else:
            model, tokenizer = load_model(name_or_path, dtype=DTYPES[dtype], device=device)
        return model, tokenizer
    except (FileNotFoundError, ImportError) as exc:  # ImportError: gguf or accelerate missing (load_model)
        raise UserError(f"--model: {exc}") from None
    except (OSError, ValueError, TypeError) as exc:  # from_pretrained: not a folder, not on the hub, no network,
        # no tokenizer; TypeError: a config.json (or a file given as the model) that is JSON but not an object
        raise UserError(f"--model: cannot load {name_or_path!r}: {exc}") from None


def _is_encoder_decoder(name_or_path) -> bool:
    """Whether a (non-gguf) model's config says encoder-decoder; False when it has no readable
    config, or is a file (then `load_model` reports what is wrong: transformers 5.17 read a JSON
    data file as the config and failed on its list, 5.24 left it to load_model)."""
    if str(name_or_path).lower().endswith(".gguf"):
        return False
    from transformers import AutoConfig

    try:
        if Path(name_or_path).expanduser().is_file():
            return False
        return bool(getattr(AutoConfig.from_pretrained(str(name_or_path)), "is_encoder_decoder", False))
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return False


def _load_seq2seq(name_or_path, dtype: torch.dtype, device: str):
    """(model, tokenizer) of an encoder-decoder model (BART, T5, ...), in eval mode.
    (`models.load_model` loads causal LMs only.)"""
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    from ..compat.transformers_versions import dtype_kwarg

    tokenizer = AutoTokenizer.from_pretrained(str(name_or_path))
    model = AutoModelForSeq2SeqLM.from_pretrained(str(name_or_path), **dtype_kwarg(dtype))
    return model.to(device).eval(), tokenizer


def detect_format(path) -> str:
    """"counterfact" or "zsre" from the first record's fields (ValueError when neither)."""
    from ..data._records import read_records

    path, records = read_records(path, limit=1)
    keys = set(records[0])
    if "target_new" in keys:
        return "counterfact"
    if {"src", "alt"} <= keys or {"src", "answers"} <= keys:
        return "zsre"
    raise ValueError(f"{path}: cannot tell the format from record 0's fields {sorted(keys)}: expected "
                     "CounterFact (prompt, target_new, ...) or zsRE (src, alt, ...)")


def named_data_file(path: str | None) -> Path | None:
    """Where a data set's name (`data.FILES`, as `data.load_dataset` takes) is looked for, when
    `path` is such a name and no file of that name exists here; None otherwise.  A folder of that
    name (an --out folder named after the data set) is no file: it does not hide the data set."""
    from ..data import FILES, data_path

    if path in FILES and not Path(path).is_file():
        return data_path(path)
    return None


def load_requests(path: str | None, limit: int | None = None, flag: str = "--data"):
    """EditRequests from a CounterFact or zsRE file, or a data set's name (`data.FILES`: looked up
    in DCEDIT_DATA_DIR); None: our default facts.  The first `limit` (the flags that set it are
    checked by argparse; this guards Python callers).  `flag` names the option in errors."""
    from ..data import FILES, load_counterfact, load_dataset, load_zsre
    from ..facts import default_requests

    if limit is not None and (not is_int(limit) or limit < 1):
        raise UserError(f"limit must be a positive int or None, got {limit!r}")
    check_path(path, "path", none_ok=True)
    if path is None:
        return default_requests()[:limit]
    try:
        found = named_data_file(path)
        if found is not None:
            if not found.is_file():
                return load_dataset(path, limit=limit)  # raises, saying where it looked
            path = str(found)
        if detect_format(path) == "counterfact":
            return load_counterfact(path, limit=limit)
        skipped: list[int] = []
        # `limit` counts requests (load_zsre's, records): --n-edits 535 of MEND's file gave 534
        requests = load_zsre(path, skipped=skipped)
        # >=: with exactly `limit` requests, a blank record after the last one used was not used either
        # (it was named as left out only when no request followed it)
        if limit is not None and len(requests) >= limit:
            gone = set(skipped)
            kept = [i for i in range(len(requests) + len(skipped)) if i not in gone]
            requests, skipped = requests[:limit], [i for i in skipped if i < kept[limit - 1]]
        if skipped and rank0():  # the counts a report prints would not add up without it (998 of zsRE's 1,000)
            shown = ", ".join(map(str, skipped[:10])) + (", ..." if len(skipped) > 10 else "")
            print(f"note: {path}: {len(skipped)} record(s) with a blank prompt or target left out "
                  f"(record {shown})", file=sys.stderr, flush=True)
        return requests
    except FileNotFoundError as exc:
        if path not in FILES:  # "--data counterfact": say which names there are
            raise UserError(f"{flag}: {exc} (nor a data set's name ({', '.join(sorted(FILES))}))") from None
        raise UserError(f"{flag}: {exc}") from None
    except ValueError as exc:
        raise UserError(f"{flag}: {exc}") from None


def check_count(requests: list, n: int | None, flag: str = "--n-edits", data: str = "--data") -> None:
    """UserError when `n` edits were asked for and the data holds fewer (rather than using fewer silently)."""
    if n is not None and len(requests) < n:
        raise UserError(f"{flag} asks for {n} edits but {data} holds {len(requests)}")


@torch.no_grad()
def greedy_completions(model, tokenizer, prompts: Sequence[str], max_new_tokens: int = 6) -> list[str]:
    """Greedy continuation of each prompt (causal LMs), its first line of text only (`_first_line`):
    what `model.generate` gives for that prompt alone, tokenized as the edit and the scores read it
    (`tokenize.text_ids`: a trailing EOS that some tokenizers append is dropped); up to
    `max_new_tokens` tokens, fewer where a learned position table (GPT-2's) ends first, and
    ValueError for a prompt that fills it.

    One prompt per `generate`, unpadded: in one left-padded batch the completions printed were not
    the prompts' own where the model ignores the attention mask or its batched generation mixes
    rows (a tiny RWKV's, even unpadded), or a padded row turns to NaN (tiny Bloom and Gemma 2 in
    float64: ""), and a tokenizer's appended EOS was continued after.  The cost, on SmolLM2 (1
    thread): 0.36-0.4 s of CPU time a prompt (25 CounterFact prompts: 9.0-9.7 s, against 1.6 s as
    one left-padded batch and 5.1 s in unpadded batches of one length; all three the same text)."""
    from ..devices import input_device
    from ..positions import learned_position_limit, position_limit
    from ..tokenize import check_vocabulary, embedding_rows, text_ids

    rows = [text_ids(tokenizer, prompt) for prompt in prompts]
    check_vocabulary(rows, embedding_rows(model), lambda i, j: f"prompt {prompts[i]!r}")
    learned = learned_position_limit(model)
    new_ids = []
    for prompt, row in zip(prompts, rows):
        # A learned position table (GPT-2's) ends the completion at its last position: a prompt that
        # fits with its target but not with 6 more tokens was refused, its edit never run; past the
        # table, a GPU's lookup is a device-side assert, not the CPU's IndexError.  The last token
        # generated is never fed back, so P prompt tokens leave limit − P + 1 to generate.
        n_new = max_new_tokens if learned is None else min(max_new_tokens, learned - len(row) + 1)
        if n_new < 1:
            quoted = prompt if len(prompt) <= 60 else prompt[:60] + "…"
            raise ValueError(f"a prompt is {len(row)} tokens, which leaves none of the model's {learned} positions "
                             f"to complete it: {quoted!r}")
        # on the embedding's device (a split model's first block)
        ids = torch.tensor([row], device=input_device(model))
        try:
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n_new,
                                 do_sample=False, pad_token_id=tokenizer.pad_token_id)
        except IndexError:  # a learned position table's bare IndexError (`positions`)
            limit, width = position_limit(model), ids.shape[1]
            if limit is None or width + n_new <= limit:
                raise
            raise ValueError(f"a prompt is {width} tokens: with {n_new} generated that is more than the "
                             f"model's {limit} positions") from None
        new_ids.append(out[0, ids.shape[1]:].tolist())
    # The tokens as they were generated, on every transformers: a tokenizer's own
    # clean_up_tokenization_spaces (SmolLM2's gguf one says True on 4.x and 5.17, False on 5.25)
    # joined " ," and " 's" on 4.x, and logged a warning on 5.17 that ignores it for BPE.
    texts = tokenizer.batch_decode(new_ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    return [_first_line(t) for t in texts]


def _first_line(text: str) -> str:
    """`text`'s first line that holds more than whitespace, with the lines before it, stripped on the
    right; "" when none does.  The first line alone showed a target that starts with a line break
    ("\nA: Rome", a question-and-answer prompt) as "" before and after its edit, while the edited
    model generated "\nA: Rome Rome Rome" (SmolLM2, a helper's trial)."""
    lines = text.split("\n")
    for k, line in enumerate(lines):
        if line.strip():
            return "\n".join(lines[:k] + [line.rstrip()])
    return ""


def shown(completion: str) -> str:
    """A completion as `edit` prints it; an empty one says why (SmolLM2-Instruct ends the text right
    after zsRE's questions: its first greedy token is <|im_end|>)."""
    return repr(completion) if completion else "'' (the model ends the line or the text here)"
