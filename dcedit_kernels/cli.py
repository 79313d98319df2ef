"""`dcedit`: train an editor, apply edits, evaluate methods, from the command line.

    dcedit train    --method mend --data counterfact-train.json --out editor.safetensors
    dcedit edit     --editor editor.safetensors --prompt "The capital of France is" --target Rome
    dcedit edit     --method ft --data counterfact-val.json --n-edits 10 --out edit.json
    dcedit evaluate --editor editor.safetensors --data counterfact-val.json --n-edits 25,75 --repeats 3

Common flags: `--model` (default: the embedded SmolLM2-135M-Instruct; else a Hugging Face causal
or seq2seq model name or a local folder / .gguf file), `--layers` (module names, comma-separated;
default: the MLP output projections of the last three blocks), `--method`, `--n-editors`,
`--data` (a CounterFact (EasyEdit) or zsRE (MEND) JSON file, format detected from its records, or
a data set's name such as `counterfact-val`, looked up as `data.load_dataset` does; default: our
own facts, `dcedit_kernels.facts`), `--n-edits`, `--device`, `--dtype`, `--out`.

Errors a user can fix (a missing model file, an unknown layer name, an empty or malformed data
file) print one `dcedit: error: ...` line naming the culprit and return exit status 2.
`python/train_editor.py`, `python/edit.py` and `python/evaluate.py` run the same subcommands.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import re
import sys
import time
import warnings
from pathlib import Path
from typing import Sequence

import torch

from .models import DTYPES  # --dtype's names: the map `load_model(dtype=)` takes too

METHOD_NAMES = {
    "ft": "FT",
    "ft_kl": "FT+KL",
    "mend": "MEND",
    "raeditor": "RaEditor",
    "moeditor": "MoEditor",
    "proeditor": "ProEditor",
}
EDITOR_METHODS = ("mend", "raeditor", "moeditor", "proeditor")

# Names of the MLP's output projection in the model families transformers ships (Llama/Mistral/
# SmolLM2, BART/Marian/OPT, T5, GPT-NeoX/Falcon, BERT): MEND edits these in the last blocks.
# BERT-style blocks name their MLP output `output.dense` and their (cross-)attention output
# `attention.output.dense` / `crossattention.output.dense`: only the first is an MLP's.
_MLP_OUT = re.compile(r"(mlp\.(down_proj|c_proj|fc_out|dense_4h_to_h)|\bfc2|DenseReluDense\.wo"
                      r"|(?<!attention\.)output\.dense)$")


class UserError(Exception):
    """A mistake in the command line or its inputs: printed as one line, exit status 2."""


def _check_path(path, name: str, none_ok: bool = False) -> None:
    """`_checks.check_path` for the helpers whose other refusals are UserErrors (a Python caller's
    non-path argument; argparse gives strings)."""
    from ._checks import check_path

    try:
        check_path(path, name, none_ok)
    except ValueError as exc:
        raise UserError(str(exc)) from None


# ModelEditor.apply's rounding warning, as the command line says it: the library's text points a
# Python caller at `handle.stats['changed_fraction']` and at editing "a float32 copy of the model",
# under a source line of evaluate.py; the command line's user has --dtype float32 instead.
_ROUNDING = re.compile(r"ModelEditor\.apply: most entries of the shift of (?P<layers>.*) were lost to "
                       r"rounding: ")


def _show_warning(message, category, filename, lineno, file=None, line=None, *, shown):
    """warnings.showwarning while a command runs (`shown`: the one it replaces): the warnings the
    command line words itself go to stderr as one `dcedit: warning:` line; the others to `shown`."""
    found = _ROUNDING.match(str(message))
    if found is None:
        return shown(message, category, filename, lineno, file, line)
    print(f"dcedit: warning: most entries of the shift of {found['layers']} were lost to rounding: "
          "they are below half the resolution of the 16-bit weights, which store W + αΔ rounded; "
          "--dtype float32 keeps the whole shift", file=sys.stderr if file is None else file, flush=True)


# The library's refusals of `dcedit train` (a resume: train_checkpoint; torchrun's processes:
# distributed), as the command line says them: the library's text names TrainConfig and
# ModelEditor fields ("lr_lr 0.0001 -> 0.5", "loss_reduction='token'", "n_editors: saved 2")
# and advises Python ("use another checkpoint_dir, or resume=False"), where the command line's
# user typed flags.  Matched on the library's wording, as _ROUNDING is; a message that matches
# none is shown as the library words it.
_FLAGS = {"lr": "--lr", "lr_lr": "--lr-lr", "batch_size": "--batch-size", "locality_rows": "--locality-rows",
          "seed": "--seed", "val_size": "--val-size", "rank": "--rank", "n_editors": "--n-editors",
          "train_requests": "--data / --n-edits: other training edits",
          "val_requests": "--val-data / --val-size: other validation edits"}
_RESUME_ADVICE = "give that run's flags to resume it, or another --checkpoint-dir (or empty it) to start over"


def _flag_value(text: str) -> str:
    """A value of the library's message (a repr) as a flag takes it: 'own' -> own, None -> unset."""
    import ast

    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text
    return "unset" if value is None else value if isinstance(value, str) else text


def _changed_setting(item: str) -> str:
    """One entry of a resume's "other settings" list ("lr 0.001 -> 0.002", "train_requests
    (different requests)") in flags; a field no flag sets (a checkpoint of a Python run) as it is."""
    field, _, rest = item.partition(" ")
    if field not in _FLAGS:
        return item
    if rest == "(different requests)":
        return _FLAGS[field]
    before, arrow, now = rest.partition(" -> ")
    return f"{_FLAGS[field]} {_flag_value(before)} -> {_flag_value(now)}" if arrow else item


def _other_settings(found: re.Match) -> str:
    changed = ", ".join(_changed_setting(item) for item in found["changed"].split(", "))
    return (f"--checkpoint-dir: {found['path']} was written by a run with other settings ({changed}): "
            f"resuming would continue that run; {_RESUME_ADVICE}")


def _other_editor(found: re.Match) -> str:
    """"written for another editor (mend on [...]) (editor 37x24 rank: saved 4, here 8)": the
    saved run's flags (--method, --layers, --rank, --n-editors)."""
    import ast

    flags = [f"--method {found['method']}", "--layers " + ",".join(ast.literal_eval(found["layers"]))]
    for part in (found["diff"] or "").split("; "):
        key, _, values = re.sub(r"^editor \S+ ", "", part).partition(": saved ")
        saved = values.rpartition(", here ")[0]
        shown = f"{_FLAGS[key]} {_flag_value(saved)}" if key in _FLAGS else part
        if part and shown not in flags:  # one per editor shape: said once
            flags.append(shown)
    return (f"--checkpoint-dir: {found['path']} was written for another editor ({' '.join(flags)}): "
            f"{_RESUME_ADVICE}")


def _other_processes(found: re.Match) -> str:
    keys = ", ".join(_FLAGS.get(key.removeprefix("config."), key) for key in found["keys"].split(", "))
    return (f"the processes were given different training settings ({keys}): every process of a "
            "data-parallel `dcedit train` needs the same flags, --data, --val-data and --checkpoint-dir")


_IN_CLI_TERMS = (
    (re.compile(r"(?P<path>.+) was written by a run with other settings \((?P<changed>.*)\): resuming would "
                r"continue that run; use another checkpoint_dir, or resume=False to start over"), _other_settings),
    (re.compile(r"(?P<path>.+) was written for another editor \((?P<method>\w+) on (?P<layers>\[.*?\])\)"
                r"(?: \((?P<diff>.*)\))?"), _other_editor),
    (re.compile(r"(?P<path>.+) was trained with loss_reduction='(?P<saved>\w+)', this ModelEditor uses "
                r"'(?P<now>\w+)': (?P<why>.*)"),
     lambda m: (f"--checkpoint-dir: {m['path']} was trained with --loss-reduction {m['saved']}, not {m['now']}: "
                f"{m['why']}; {_RESUME_ADVICE}")),
    (re.compile(r"(?P<path>.+) is not a train_editor checkpoint(?P<why> \(.*\))?"
                r"(?:; use another checkpoint_dir, or resume=False to start over)?"),
     lambda m: (f"--checkpoint-dir: {m['path']} is not a `dcedit train` checkpoint{m['why'] or ''}: "
                "give another --checkpoint-dir, or empty it, to start over")),
    (re.compile(r"(?P<what>the processes .*): a resume needs the same checkpoint_dir on every process"),
     lambda m: f"{m['what']}: a resume needs the same --checkpoint-dir on every process"),
    (re.compile(r"the processes were given different training settings \((?P<keys>.*)\): every process of a "
                r"data-parallel run needs .*"), _other_processes),
    (re.compile(r"device '(?P<device>[^']*)': (?P<rest>.*)"),  # distributed.init_from_env: no GPU of LOCAL_RANK
     lambda m: f"--device {m['device']}: " + m["rest"].replace("(device 'cpu')", "(--device cpu)")),
)


def in_cli_terms(message: str) -> str:
    """`message`, a refusal of `dcedit train`'s library calls, in the flags' terms (_IN_CLI_TERMS)."""
    for pattern, reworded in _IN_CLI_TERMS:
        found = pattern.fullmatch(message)
        if found is not None:
            return reworded(found)
    return message


# ---------------------------------------------------------------------------------------------
# Helpers shared with python/edit_demo.py and python/report.py
# ---------------------------------------------------------------------------------------------
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
    if not isinstance(threads, int) or threads < 1:
        raise UserError(f"--threads must be a positive int, got {threads!r}")
    torch.set_num_threads(threads)
    return threads


def editable_layers(model) -> list[str]:
    from .capture import is_editable

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
    names = [s.strip() for s in spec.split(",") if s.strip()]
    if not names:
        raise UserError("--layers is empty")
    from .capture import resolve_modules
    from .tied_weights import shared_parameters

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
    from .models import load_model

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

    from .compat.transformers_versions import dtype_kwarg

    tokenizer = AutoTokenizer.from_pretrained(str(name_or_path))
    model = AutoModelForSeq2SeqLM.from_pretrained(str(name_or_path), **dtype_kwarg(dtype))
    return model.to(device).eval(), tokenizer


def detect_format(path) -> str:
    """"counterfact" or "zsre" from the first record's fields (ValueError when neither)."""
    from .data._records import read_records

    path, records = read_records(path, limit=1)
    keys = set(records[0])
    if "target_new" in keys:
        return "counterfact"
    if {"src", "alt"} <= keys or {"src", "answers"} <= keys:
        return "zsre"
    raise ValueError(f"{path}: cannot tell the format from record 0's fields {sorted(keys)}: expected "
                     "CounterFact (prompt, target_new, ...) or zsRE (src, alt, ...)")


def _named_data_file(path: str | None) -> Path | None:
    """Where a data set's name (`data.FILES`, as `data.load_dataset` takes) is looked for, when
    `path` is such a name and no file of that name exists here; None otherwise."""
    from .data import FILES, data_path

    if path in FILES and not Path(path).exists():
        return data_path(path)
    return None


def load_requests(path: str | None, limit: int | None = None, flag: str = "--data"):
    """EditRequests from a CounterFact or zsRE file, or a data set's name (`data.FILES`: looked up
    in DCEDIT_DATA_DIR); None: our default facts.  The first `limit` (the flags that set it are
    checked by argparse; this guards Python callers).  `flag` names the option in errors."""
    from ._checks import is_int
    from .data import FILES, load_counterfact, load_dataset, load_zsre
    from .facts import default_requests

    if limit is not None and (not is_int(limit) or limit < 1):
        raise UserError(f"limit must be a positive int or None, got {limit!r}")
    _check_path(path, "path", none_ok=True)
    if path is None:
        return default_requests()[:limit]
    try:
        found = _named_data_file(path)
        if found is not None:
            if not found.is_file():
                return load_dataset(path, limit=limit)  # raises, saying where it looked
            path = str(found)
        if detect_format(path) == "counterfact":
            return load_counterfact(path, limit=limit)
        skipped: list[int] = []
        # `limit` counts requests (load_zsre's, records): --n-edits 535 of MEND's file gave 534
        requests = load_zsre(path, skipped=skipped)
        if limit is not None and len(requests) > limit:
            gone = set(skipped)
            kept = [i for i in range(len(requests) + len(skipped)) if i not in gone]
            requests, skipped = requests[:limit], [i for i in skipped if i < kept[limit - 1]]
        if skipped:  # the counts a report prints would not add up without it (998 of zsRE's 1,000)
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
    """Greedy continuation of each prompt (one left-padded batch; causal LMs), first line only."""
    from .devices import input_device
    from .positions import position_limit

    enc = tokenizer(list(prompts), return_tensors="pt", padding=True, padding_side="left")
    enc = {k: v.to(input_device(model)) for k, v in enc.items()}  # the embedding's device (split models)
    enc = {k: enc[k] for k in ("input_ids", "attention_mask")}  # a tokenizer's token_type_ids: generate refuses them
    try:
        ids = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
    except IndexError:  # a learned position table's bare IndexError (`positions`)
        limit, width = position_limit(model), enc["input_ids"].shape[1]
        if limit is None or width + max_new_tokens <= limit:
            raise
        raise ValueError(f"a prompt is {width} tokens: with {max_new_tokens} generated that is more than the "
                         f"model's {limit} positions") from None
    texts = tokenizer.batch_decode(ids[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    return [t.split("\n")[0].rstrip() for t in texts]


def shown(completion: str) -> str:
    """A completion as `edit` prints it; an empty one says why (SmolLM2-Instruct ends the text right
    after zsRE's questions: its first greedy token is <|im_end|>)."""
    return repr(completion) if completion else "'' (the model ends the line or the text here)"


def editor_kwargs(args) -> dict:
    """Editor constructor arguments from the flags (only those given)."""
    kwargs = {}
    if getattr(args, "n_editors", None) is not None:
        if args.method not in ("raeditor", "moeditor"):
            raise UserError(f"--n-editors applies to raeditor and moeditor, not {args.method}")
        kwargs["n_editors"] = args.n_editors
    if getattr(args, "rank", None) is not None:
        if args.method not in EDITOR_METHODS:
            raise UserError(f"--rank applies to the editor methods {EDITOR_METHODS}, not {args.method}")
        kwargs["rank"] = args.rank
    if args.method in EDITOR_METHODS and getattr(args, "seed", None) is not None:
        kwargs["seed"] = args.seed  # the editors' initial weights and RaEditor's groups
    if getattr(args, "loss_reduction", None) is not None:
        if args.method not in EDITOR_METHODS:  # FT, FT+KL: the batch mean whatever it says
            raise UserError(f"--loss-reduction applies to the editor methods {EDITOR_METHODS}, "
                            f"not {args.method}")
        kwargs["loss_reduction"] = args.loss_reduction
    if getattr(args, "capture_batch_size", None) is not None:
        kwargs["capture_batch_size"] = args.capture_batch_size
    if getattr(args, "rescale_batch_size", None) is not None:
        from .losses import DEFAULT_LOSS_REDUCTION  # ModelEditor's, where --loss-reduction is not given

        _check_rescale(args.method, args.loss_reduction or DEFAULT_LOSS_REDUCTION)
        kwargs["rescale_batch_size"] = args.rescale_batch_size
    return kwargs


def _check_rescale(method: str, loss_reduction: str) -> None:
    """UserError where --rescale-batch-size does not apply, in the flags' terms (ModelEditor's
    refusal said "rescale_batch_size is for the editor methods under loss_reduction='token', got
    method='ft', ..."): it undoes the 1/N that the batch-mean loss puts in every captured factor,
    which the FT baselines (no factors) and --loss-reduction edit do not have."""
    if method not in EDITOR_METHODS:
        raise UserError(f"--rescale-batch-size applies to the editor methods {EDITOR_METHODS} under "
                        f"--loss-reduction token, not --method {method}")
    if loss_reduction != "token":
        raise UserError(f"--rescale-batch-size applies to the editor methods {EDITOR_METHODS} under "
                        f"--loss-reduction token, not --loss-reduction {loss_reduction}")


def train_out(args) -> str:
    """Where `dcedit train` saves the editor: --out, else <method>-editor.safetensors here."""
    return args.out or f"{args.method}-editor.safetensors"


def check_out(path: str) -> None:
    """Refuse an --out that cannot be written before any work is done (its folder is created)."""
    _check_path(path, "path")
    out = Path(path)
    try:
        is_dir = out.is_dir()
    except OSError as exc:  # a name too long, ...: pathlib raises for all but "missing"
        raise UserError(f"--out {path}: {exc.strerror or exc}") from None
    if is_dir:
        raise UserError(f"--out {path}: is a folder; give a file name")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"--out {path}: cannot create its folder ({exc})") from None
    if not os.access(out.parent, os.W_OK):
        raise UserError(f"--out {path}: its folder is not writable")
    existed = out.exists()
    try:  # os.access passes for root, and says nothing of the file itself: open it as the write will
        with open(out, "ab"):
            pass
        if not existed:
            out.unlink()
    except OSError as exc:
        raise UserError(f"--out {path}: cannot be written ({exc.strerror or exc})") from None


def check_inputs(args, out: str | None) -> None:
    """Refuse, before the model loads, an --editor that is no file (found only after the model
    had loaded, minutes for a large one) and an --out that is one of the command's input files:
    `dcedit edit --editor E --out E` wrote its JSON record over the trained editor E."""
    editor = getattr(args, "editor", None)
    if editor is not None and not Path(editor).is_file():
        raise UserError(f"--editor: file not found: {editor}")
    if out is None:
        return
    for flag in ("--editor", "--data", "--val-data"):
        path = getattr(args, flag[2:].replace("-", "_"), None)
        if flag != "--editor":
            path = _named_data_file(path) or path  # a data set's name, as load_requests reads it
        try:
            same = path is not None and Path(path).is_file() and os.path.samefile(path, out)
        except OSError:  # out does not exist yet: it is no input file
            same = False
        if same:
            raise UserError(f"--out {out} is the {flag} file: the run would write over it; "
                            "give another --out")


def write_json(path, data) -> None:
    """`data` as JSON at `path`, written beside it and moved over it (`replace_atomically`): a write
    cut short (a full disk, a Ctrl-C) leaves the previous file whole, not a truncated one."""
    from ._checks import check_path
    from .safetensors_file import replace_atomically

    check_path(path, "path")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(data, indent=2, default=_json_default)
    replace_atomically(path, lambda tmp: tmp.write_text(text))


def _json_default(value):
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, torch.Tensor):
        return value.tolist()
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def positive_int(text: str) -> int:
    """argparse type of the count flags: argparse names the flag in its error (exit status 2)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive int, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive int, got {text!r}")
    return value


def rate(text: str) -> float:
    """argparse type of --lr and --lr-lr: a non-negative finite float, refused with the flag's
    name (TrainConfig's "lr must be a non-negative finite number" named the Python field, and
    only after the model had loaded)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative finite number, got {text!r}")
    return value


SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.manual_seed and torch.Generator.manual_seed take


def seed_int(text: str) -> int:
    """argparse type of --seed: an int torch can seed with (a larger one raised "Overflow when
    unpacking long long", naming no flag, or a traceback)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an int, got {text!r}") from None
    if not SEED_RANGE[0] <= value <= SEED_RANGE[1]:
        raise argparse.ArgumentTypeError(f"must be an int in [-2**63, 2**64 - 1], got {text!r}")
    return value


def _parse_sizes(text: str) -> list[int]:
    try:
        sizes = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise UserError(f"--n-edits must be a comma-separated list of positive ints, got {text!r}") from None
    if not sizes or any(n < 1 for n in sizes):
        raise UserError(f"--n-edits must be a comma-separated list of positive ints, got {text!r}")
    if len(set(sizes)) != len(sizes):
        raise UserError(f"--n-edits must not repeat a value, got {text!r}")
    return sizes


# ---------------------------------------------------------------------------------------------
# Subcommands
# ---------------------------------------------------------------------------------------------
def _model_editor(args, model, tokenizer):
    """A ModelEditor from --editor (a saved one) or from --method/--layers."""
    from .model_editor import ModelEditor

    if getattr(args, "editor", None):
        path = Path(args.editor)  # main's check_inputs refused a missing one before the model loaded
        try:
            me = ModelEditor.load(path, model, tokenizer)
        except ValueError as exc:  # "path: X is not a safetensors file": the flag, not load's argument
            raise UserError(f"--editor: {str(exc).removeprefix('path: ')}") from None
        _check_editor_flags(args, model, me, path)
        if getattr(args, "rescale_batch_size", None) is not None and me.loss_reduction != "token":
            # The setter's refusal below named rescale_batch_size and loss_reduction='edit'.
            raise UserError(f"--rescale-batch-size applies to editors trained under --loss-reduction token; "
                            f"the editor in {path} was trained with --loss-reduction {me.loss_reduction}")
        for flag, key in (("--capture-batch-size", "capture_batch_size"),
                          ("--rescale-batch-size", "rescale_batch_size")):
            if getattr(args, key, None) is not None:
                try:
                    setattr(me, key, getattr(args, key))
                except ValueError as exc:
                    raise UserError(f"{flag}: {exc}") from None
        wanted = getattr(args, "loss_reduction", None)
        if wanted is not None and wanted != me.loss_reduction:
            raise UserError(f"--loss-reduction {wanted}: the editor in {path} was trained with "
                            f"{me.loss_reduction!r} (its statistics and steps are on that scale)")
        return me
    if args.method is None:  # edit / evaluate without --editor: the fine-tuning baseline
        args.method = "ft"
    layers = parse_layers(model, args.layers)
    try:
        me = ModelEditor(model, tokenizer, layers=layers, method=args.method, **editor_kwargs(args))
    except ValueError as exc:
        raise UserError(str(exc)) from None
    if args.method in EDITOR_METHODS:
        # apply's UserWarning says this for the Python API ("fit", "ModelEditor.load") under a source
        # line; a user trial of `dcedit edit --method mend` got that.  Said once, in the CLI's terms
        # (main's catch_warnings drops the filter again).
        print(f"dcedit: note: --method {args.method} without --editor edits with an untrained editor, "
              "which takes about one gradient step and rarely changes a prediction: train one with "
              f"`dcedit train --method {args.method} --out EDITOR.safetensors`, then pass "
              "--editor EDITOR.safetensors", file=sys.stderr, flush=True)
        warnings.filterwarnings("ignore", message=r"ModelEditor\.apply: the .* editors are at their initialisation",
                                category=UserWarning)
    return me


def _check_editor_flags(args, model, me, path) -> None:
    """UserError when --method, --layers, --rank or --n-editors, given with --editor, differ from
    what the saved editor holds: they describe the editor, which comes from the checkpoint, so
    they would otherwise be ignored without a word."""
    saved = {key: {e.config[key] for e in me.editors.values()} for key in ("rank", "n_editors")}
    if args.method is not None and args.method != me.method:
        raise UserError(f"--method {args.method}: the editor in {path} is {me.method!r} "
                        "(with --editor, drop --method or give the editor's)")
    if args.layers is not None and parse_layers(model, args.layers) != me.layers:
        raise UserError(f"--layers: the editor in {path} edits {me.layers} "
                        "(with --editor, drop --layers or give the editor's)")
    for flag, key in (("--rank", "rank"), ("--n-editors", "n_editors")):
        value = getattr(args, key, None)
        if value is not None and saved[key] != {value}:
            raise UserError(f"{flag} {value}: the editor in {path} has {key} {sorted(saved[key])} "
                            f"(with --editor, drop {flag} or give the editor's)")


def cmd_train(args) -> dict:
    """Train editors; under torchrun, data-parallel over its processes (`distributed`): each loads
    the model on its own device, and rank 0 saves the editor."""
    from . import distributed

    if args.val_size is not None and not args.val_data:  # it counts --val-data's edits: alone it would be ignored
        raise UserError("--val-size goes with --val-data")
    if args.checkpoint_dir is not None and Path(args.checkpoint_dir).exists() and not Path(args.checkpoint_dir).is_dir():
        raise UserError(f"--checkpoint-dir {args.checkpoint_dir}: is a file; give a folder")
    requests = load_requests(args.data, args.n_edits)
    check_count(requests, args.n_edits)
    val = load_requests(args.val_data, None, flag="--val-data") if args.val_data else None
    if val is not None:
        check_count(val, args.val_size, "--val-size", "--val-data")
    try:
        torch.device(args.device)
    except RuntimeError as exc:
        raise UserError(f"--device {args.device!r} is not a device: {exc}") from None
    try:
        device, joined = distributed.init_from_env(args.device)
    except ValueError as exc:  # torchrun's variables set by hand, or half of them; no GPU of LOCAL_RANK
        raise UserError(in_cli_terms(str(exc))) from None
    try:
        return _train(args, requests, val, device)
    except distributed.PeerFailure as exc:  # the failed process prints its own error
        raise UserError(str(exc)) from None
    finally:
        if joined:
            torch.distributed.destroy_process_group()


def _train(args, requests, val, device) -> dict:
    from . import distributed
    from .model_editor import ModelEditor
    from .train import TrainConfig

    rank, size = distributed.world()
    model, tokenizer = load_any_model(args.model, args.dtype, device)
    layers = parse_layers(model, args.layers)
    try:
        me = ModelEditor(model, tokenizer, layers=layers, method=args.method, **editor_kwargs(args))
        config = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, lr_lr=args.lr_lr,
                             locality_rows=args.locality_rows, checkpoint_dir=args.checkpoint_dir,
                             val_every=args.val_every, val_size=args.val_size, seed=args.seed, data_parallel=size > 1)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    if args.batch_size > len(requests):
        # fit's UserWarning said this in Python's terms (batch_size, "requests") under a source
        # line of model_editor.py; said once, in the CLI's (main's catch_warnings drops the filter),
        # when training starts (not before an error that ends the run first).
        n = len(requests)
        if rank == 0:
            print(f"dcedit: note: --batch-size {args.batch_size} is more than the {n} training "
                  f"edits: every batch is all {n} of them", file=sys.stderr, flush=True)
        warnings.filterwarnings("ignore", message=r"train_editor: batch_size \d+ is larger than",
                                category=UserWarning)
    try:
        result = me.fit(requests, val, config)
    except ValueError as exc:  # a resume of another run (--checkpoint-dir), processes that disagree, ...
        raise UserError(in_cli_terms(str(exc))) from None
    out = Path(train_out(args))
    summary = dict(editor=str(out), method=args.method, layers=layers, steps=result.steps,
                   elapsed_s=result.elapsed_s, best_es=result.best_es, processes=size,
                   final_loss=result.history[-1].get("loss") if result.history else None,
                   best_step=result.best_step, stopped_early=result.stopped_early)
    if rank == 0:  # the processes' editors are equal; main() made out's folder (check_out)
        me.save(out)
        processes = f", {size} processes" if size > 1 else ""
        print(f"saved the trained editor to {out} ({METHOD_NAMES[args.method]}, "  # not "the trained MoEditor editor"
              f"{_steps(result.steps)}, {result.elapsed_s:.0f} s{processes})"
              + _best_note(result, config))
    return summary


def _steps(n: int) -> str:
    return f"{n} step" if n == 1 else f"{n} steps"  # not "1 steps"


def _best_note(result, config) -> str:
    """What `fit` did with --val-data that the step count alone hides: it stops after `patience`
    validations without a better ES, and saves the best validation's editor, not the last step's
    (a user trial's "30 steps" line saved the step-10 editor; --steps 10 ran 6 steps unsaid)."""
    notes = []
    if result.steps > config.steps:
        # A --checkpoint-dir run resumed with a smaller --steps: fit trains no further and the
        # editor saved is the checkpoint's, which the line's step count alone left unexplained.
        notes.append(f"--checkpoint-dir's run had already trained {_steps(result.steps)}, more "
                     f"than --steps {config.steps}: the editor saved is its, trained no further")
    if result.stopped_early and result.steps < config.steps:
        notes.append(f"stopped early, before --steps {config.steps}: the last {config.patience} "
                     "validations gave no better ES")
    if result.best_step is not None and result.best_step != result.steps:
        notes.append(f"the editor saved is step {result.best_step}'s, the best validation ES "
                     f"({result.best_es:.3f}), not step {result.steps}'s")
    return "".join(f"\n  {note}" for note in notes)


def cmd_edit(args) -> dict:
    from .evaluate import measure_edit
    from .requests import EditRequest

    if args.prompt is not None or args.target is not None:
        if args.prompt is None or args.target is None:
            raise UserError("--prompt and --target go together")
        if args.data is not None:
            raise UserError("give either --data or --prompt/--target, not both")
        if args.n_edits is not None:  # it counts --data's requests: with one --prompt it would be ignored
            raise UserError("--n-edits goes with --data, not with --prompt/--target")
        for flag, text in (("--prompt", args.prompt), ("--target", args.target), ("--rephrase", args.rephrase)):
            if text is not None and not text.strip():
                raise UserError(f"{flag} must be a non-empty string, got {text!r}")
        requests = [EditRequest(args.prompt, args.target, rephrase=args.rephrase)]
    elif args.rephrase is not None:
        raise UserError("--rephrase goes with --prompt and --target")
    else:
        requests = load_requests(args.data, args.n_edits or 5)
        check_count(requests, args.n_edits)
    if getattr(args, "seed_given", False):
        # It seeds only a new editor's initial weights here, so with a saved editor or fine-tuning
        # it was ignored without a word (as --loss-reduction for ft was).
        if getattr(args, "editor", None) is not None:
            raise UserError("--seed goes with a new editor (--method without --editor): the editor of "
                            "--editor has its trained weights")
        if args.method not in EDITOR_METHODS:  # None: ft, the default
            raise UserError(f"--seed goes with the editor methods {EDITOR_METHODS} (a new editor's initial "
                            f"weights), not --method {args.method or 'ft'}, which draws no random numbers")
    model, tokenizer = load_any_model(args.model, args.dtype, args.device)
    me = _model_editor(args, model, tokenizer)
    prompts = [r.prompt for r in requests]
    causal = not getattr(model.config, "is_encoder_decoder", False)
    try:  # a request the edit, its scoring or the completions refuse: the model is left unchanged
        before = greedy_completions(model, tokenizer, prompts) if causal else None
        scores = measure_edit(me, requests, during=(lambda m: greedy_completions(m, tokenizer, prompts)) if causal
                              else None)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    after = scores.pop("during", None)
    rows = []
    for i, r in enumerate(requests):
        rows.append(dict(prompt=r.prompt, target=r.target,
                         before=before[i] if before else None, after=after[i] if after else None))
        if before:
            print(f"{r.prompt!r} -> {r.target!r}\n    before: {shown(before[i])}\n    after:  {shown(after[i])}")
    print("  ".join(f"{k}={v:.3f}" for k, v in scores.items() if isinstance(v, float)))
    print("(the model is unchanged: the edit was undone after scoring)")
    return dict(method=me.method, layers=me.layers, scores=scores, edits=rows)


def cmd_evaluate(args) -> dict:
    from .evaluate import evaluate_method

    requests = load_requests(args.data, None)
    sizes = _parse_sizes(args.n_edits or "25,75,125")
    if max(sizes) > len(requests):
        # Without --n-edits the line named a flag the user never gave (a small file of one's own).
        flag = "--n-edits" if args.n_edits else "--n-edits (default 25,75,125; give smaller ones)"
        raise UserError(f"{flag} asks for {max(sizes)} edits but --data holds {len(requests)}")
    model, tokenizer = load_any_model(args.model, args.dtype, args.device)
    me = _model_editor(args, model, tokenizer)
    try:  # a request the edit or its scoring refuses (as `edit` reports it): the model is left unchanged
        result = evaluate_method(model, tokenizer, me, requests, n_edits=sizes, repeats=args.repeats, seed=args.seed)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    print(f"{METHOD_NAMES[me.method]} on {len(requests)} requests, {args.repeats} repeats")
    for n, row in result["by_n"].items():
        cells = "  ".join(f"{m}={_mean_std(row[m])}" for m in ("es", "reliability", "dd", "lmp", "latency_s"))
        print(f"  N_u={n}: {cells}")
    return dict(result, layers=me.layers)


def _mean_std(stat: dict) -> str:
    return "n/a" if stat["mean"] is None else f"{stat['mean']:.3f}±{stat['std']:.3f}"


# ---------------------------------------------------------------------------------------------
# Argument parsing
# ---------------------------------------------------------------------------------------------
def _common(p: argparse.ArgumentParser, method_default: str | None, methods=tuple(METHOD_NAMES)) -> None:
    from .data import FILES

    p.add_argument("--model", default=None, help="model name or path (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--layers", default=None, help="comma-separated module names to edit (default: the last 3 MLP output projections)")
    p.add_argument("--method", default=method_default, choices=sorted(methods),
                   help=f"editing method (default: {method_default})" if method_default else
                   "editing method (default: ft, or the method of --editor)")
    p.add_argument("--n-editors", type=positive_int, default=None, help="number of editors N_g (raeditor, moeditor)")
    p.add_argument("--rank", type=positive_int, default=None,
                   help="editor rank (the editor methods; default: the method's preset)")
    p.add_argument("--data", default=None, help="CounterFact or zsRE JSON file, or a data set's name ("
                   + ", ".join(FILES) + ": in $DCEDIT_DATA_DIR) (default: the built-in facts, "
                   "dcedit_kernels.facts)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="model dtype (default float32)")
    p.add_argument("--threads", type=positive_int, default=None, help="CPU threads (default: 1 on <=2-core machines)")
    # default None, read as 0 (main): `edit` refuses a --seed it would not use, so it must tell one given
    p.add_argument("--seed", type=seed_int, default=None, help="random seed (editor initialisation, training batches, "
                   "evaluation samples; default 0)")
    p.add_argument("--loss-reduction", default=None, choices=("edit", "token"),
                   help="edit loss whose gradients the editors see (the editor methods; FT "
                        "and FT+KL fine-tune on the batch mean): 'token' (MEND's batch mean; the "
                        "default for new editors) or 'edit' (each edit's mean target NLL, summed)"
                        + ("" if method_default else "; a saved --editor keeps its own"))
    p.add_argument("--capture-batch-size", type=positive_int, default=None,
                   help="edits per forward + backward of the gradient capture (default 32): bounds its memory")
    p.add_argument("--out", default=None, help="output file: the trained editor (train; default "
                   "<method>-editor.safetensors here) or a JSON record of the run (edit, evaluate); its folder "
                   "is created, and checked before any work")


# What edit and evaluate print, in their help: the paper's names, of which "es" reads as ROME's
# and EasyEdit's Efficacy Score (the edit prompt itself) to their users, where it is the rephrase's.
METRICS_HELP = ("Scores (teacher-forced accuracy of the target tokens, dcedit_kernels.metrics): "
                "es: edit success, on the rephrased prompts (generalisation; not ROME's efficacy "
                "score); reliability: on the edit prompts themselves (efficacy); ns: neighbourhood "
                "success, of the locality prompts' own answers under the edit; dd: drawdown, the "
                "share of locality prompts with an answer token's prediction changed by the edit; "
                "lmp = es - dd.")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="dcedit", description="Divide-and-conquer knowledge editing.")
    # The package's version (it keys the editor cache) and torch's (a compiled _C loads with its own only).
    parser.add_argument("--version", action="version",
                        version=f"dcedit_kernels {__version__} (torch {torch.__version__})")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train an editor and save it (safetensors); under torchrun, data-parallel",
                       description="Train an editor and save it (safetensors).  Under torchrun (torchrun "
                       "--nproc_per_node N -m dcedit_kernels.cli train ...) the N processes train it "
                       "data-parallel: each loads the model on its own GPU (--device cuda, NCCL: not yet "
                       "run on GPUs) or on the CPU (gloo), each step takes N x --batch-size edits, and "
                       "rank 0 saves the editor.")
    _common(p, "mend", EDITOR_METHODS)
    p.add_argument("--n-edits", type=positive_int, default=None, help="use the first N training edits (default: all)")
    p.add_argument("--val-data", default=None,
                   help="validation edits (a file or data set name, as --data): training stops "
                   "after 5 validations without a better ES, and the best validation's editor is "
                   "saved")
    p.add_argument("--val-size", type=positive_int, default=None,
                   help="validate on the first N edits of --val-data (default: all)")
    p.add_argument("--val-every", type=positive_int, default=50,
                   help="validate (and checkpoint) every N steps (default 50)")
    p.add_argument("--steps", type=positive_int, default=100, help="optimiser steps (default 100)")
    # Under --loss-reduction token (the default, MEND's batch-mean loss) the captured gradients
    # shrink as 1/N, so batches should be as large as the edits will be applied in (the demo
    # measured ES 0.92 at 5 edits at once but 0.27 at 25 for an editor trained on batches of 6).
    # Under "edit" an edit's factors do not depend on N, but the fused shift adds N edits' shifts,
    # so batches near the N_u you will edit with remain the closest match there too.
    p.add_argument("--batch-size", type=positive_int, default=25,
                   help="edits per step and process (near the N_u you will edit with; default 25)")
    p.add_argument("--lr", type=rate, default=1e-3, help="editor learning rate (default 1e-3)")
    p.add_argument("--lr-lr", type=rate, default=1e-4,
                   help="learning rate of the per-weight edit steps α (default 1e-4)")
    p.add_argument("--locality-rows", choices=("all", "own", "fused"), default="all",
                   help="what the KL rows see in training: every editor's summed shift (default), their own "
                        "group's, or the fused shift apply() adds (exact for sss/max/ssm; one o×i matrix per layer)")
    p.add_argument("--checkpoint-dir", default=None, help="resumable training checkpoints")

    p = sub.add_parser("edit", help="apply edits, show before/after completions and scores, undo",
                       epilog=METRICS_HELP)
    _common(p, None)
    p.add_argument("--editor", default=None, help="a trained editor (from `dcedit train`)")
    p.add_argument("--n-edits", type=positive_int, default=None, help="edit the first N requests of --data (default 5)")
    p.add_argument("--prompt", default=None, help="one edit's prompt, e.g. 'The capital of France is' (with --target)")
    p.add_argument("--target", default=None, help="the new continuation of --prompt, e.g. 'Rome'")
    p.add_argument("--rephrase", default=None, help="a paraphrase of --prompt, scored for edit success (optional)")

    p = sub.add_parser("evaluate", epilog=METRICS_HELP,
                       help="mean ± std of ES, DD, LMP, ... over repeated samples of N_u edits")
    _common(p, None)
    p.add_argument("--editor", default=None, help="a trained editor (from `dcedit train`)")
    p.add_argument("--n-edits", default=None, help="comma-separated N_u values (default 25,75,125)")
    p.add_argument("--repeats", type=positive_int, default=3, help="samples of N_u edits per N_u (default 3)")
    for applying in (sub.choices["edit"], sub.choices["evaluate"]):
        applying.add_argument("--rescale-batch-size", type=positive_int, default=None,
                              help="the editors' training batch size R: N edits are applied with η × N/R and "
                                   "α × R/N (ModelEditor(rescale_batch_size=R); opt-in, for N far above R)")
    for command in sub.choices.values():
        command.set_defaults(command_parser=command)  # main() reports unknown flags with its usage
    return parser


COMMANDS = {"train": cmd_train, "edit": cmd_edit, "evaluate": cmd_evaluate}


def _resume_hint(args) -> str:
    """What an interrupted `dcedit train` left to resume from."""
    from .train_checkpoint import has_checkpoint

    if args.command != "train":
        return ""
    if args.checkpoint_dir is None:
        return ": nothing was saved (with --checkpoint-dir a run can be resumed)"
    where = args.checkpoint_dir
    if not has_checkpoint(where):
        return f": no checkpoint in {where} yet (one is written every --val-every steps)"
    return (f": run the same command again to resume from the last checkpoint in {where} "
            "(written every --val-every steps)")


def main(argv: Sequence[str] | None = None) -> int:
    """Run `dcedit` with `argv` (default: sys.argv[1:]); returns the exit status."""
    parser = build_parser()
    try:
        # Unknown flags after the command are refused by the command's parser, whose usage line
        # lists that command's flags (the top-level parser prints only "dcedit {train,edit,evaluate}").
        args, unknown = parser.parse_known_args(argv)
        if unknown:
            words = list(sys.argv[1:] if argv is None else argv)
            before_command = words[:words.index(args.command)]
            owner = parser if any(u in before_command for u in unknown) else args.command_parser
            owner.error(f"unrecognized arguments: {' '.join(unknown)}")
    except SystemExit as exc:  # argparse already printed the usage line
        return int(exc.code or 0)
    args.seed_given = args.seed is not None
    if args.seed is None:
        args.seed = 0
    start = time.perf_counter()
    # The caller's thread count back on return: called from Python (a notebook, the tests) main()
    # left the whole process on its command's --threads (1 on a 2-core machine).
    threads = torch.get_num_threads()
    try:
        out = train_out(args) if args.command == "train" else args.out
        if args.command != "train" or os.environ.get("RANK", "0") == "0":  # under torchrun rank 0 saves
            if out:
                check_out(out)
            check_inputs(args, out)
        set_threads(args.threads)
        with warnings.catch_warnings():  # filters a command adds (`_model_editor`) end with it
            # catch_warnings puts the caller's showwarning back
            warnings.showwarning = functools.partial(_show_warning, shown=warnings.showwarning)
            result = COMMANDS[args.command](args)
        if args.out and args.command != "train":
            write_json(args.out, dict(result, elapsed_s=time.perf_counter() - start))
            print(f"wrote {args.out}")
    except UserError as exc:
        print(f"dcedit: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # A Ctrl-C of a training run ended in a traceback into train.py's loop, which said nothing
        # of the one thing to do next: resume (`fit` checkpoints atomically: the last one is whole).
        print(f"dcedit: interrupted{_resume_hint(args)}", file=sys.stderr)
        return 130  # the shell's status for SIGINT
    except OSError as exc:
        # A path the checks above let through (a name too long, a folder that refuses a file):
        # its str names the file, so one line says it all.  An OSError that names no file (a
        # socket, a device, a library's own) keeps its traceback: that is where it came from.
        if exc.filename is None:
            raise
        print(f"dcedit: error: {exc}", file=sys.stderr)
        return 2
    finally:
        torch.set_num_threads(threads)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
