"""`dcedit`'s flags: the argument parser, the flags' types and checks, and the editor arguments
they give."""

from __future__ import annotations

import argparse
import math

import torch

from .._checks import is_torch_seed
from ..models import DTYPES
from .methods import EDITOR_METHODS, METHOD_NAMES
from .user_error import UserError, refuse_empty


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
        from ..losses import DEFAULT_LOSS_REDUCTION  # ModelEditor's, where --loss-reduction is not given

        _check_rescale(args.method, args.loss_reduction or DEFAULT_LOSS_REDUCTION)
        kwargs["rescale_batch_size"] = args.rescale_batch_size
    return kwargs


# The flags that "" cannot mean, and what to give instead (`refuse_empty`); --layers and
# --checkpoint-dir have their own refusals.
EMPTY_REFUSED = {
    "--model": "a model name or path, or leave it out for the embedded SmolLM2",
    "--data": "a file or a data set's name, or leave it out for the built-in facts",
    "--val-data": "a file or a data set's name",
    "--editor": "the file `dcedit train` saved",
    "--out": "a file name",
    "--n-edits": "comma-separated N_u values, or leave it out for 25,75,125",  # evaluate's (a str)
    "--device": "a torch device such as cpu or cuda:0",
}


def check_flags(args) -> None:
    """UserError, before any work, for the flags that are wrong whatever the model: one given ""
    (`EMPTY_REFUSED`), an empty --layers, and the editor flags of a method that has no such setting
    (editor_kwargs: --rank, --n-editors, --loss-reduction, --rescale-batch-size for the FT
    baselines, ...).  Those were refused only once the model had loaded, and after --out's folder was
    made: measured on a busy 2-core machine, `dcedit edit --method ft --rank 8 ...` took 18-21 s to
    say so (SmolLM2's load: 15 s), a refused --seed 2.7 s; now 2.5-3.4 s.  editor_kwargs runs again
    after the load, to build the editor: one set of checks and messages for both.  With --editor the
    saved editor holds these settings, so they are checked against it after the load
    (_check_editor_flags)."""
    refuse_empty(args, EMPTY_REFUSED)
    if getattr(args, "layers", None) is not None:
        layer_names(args.layers)
    if getattr(args, "editor", None) is None:
        # edit and evaluate without --method or --editor run FT (commands._model_editor)
        editor_kwargs(argparse.Namespace(**{**vars(args), "method": args.method or "ft"}))


def layer_names(spec: str) -> list[str]:
    """--layers' module names (UserError when it names none); checked against the model by
    `inputs.parse_layers`."""
    names = [s.strip() for s in spec.split(",") if s.strip()]
    if not names:
        raise UserError("--layers is empty")
    return names


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


def positive_int(text: str) -> int:
    """argparse type of the count flags: argparse names the flag in its error (exit status 2)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive int, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive int, got {text!r}")
    return value


# torch.set_num_threads takes a C int: --threads 2147483648 (or more) ended in its bare ValueError
# "Overflow when unpacking long" (a traceback, exit status 1).
MAX_THREADS = 2**31 - 1


def thread_count(text: str) -> int:
    """argparse type of --threads: a positive int that torch.set_num_threads takes (`MAX_THREADS`)."""
    value = positive_int(text)
    if value > MAX_THREADS:
        raise argparse.ArgumentTypeError(f"must be a positive int up to 2**31 - 1, got {text!r}")
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


def seed_int(text: str) -> int:
    """argparse type of --seed: an int torch can seed with (a larger one raised "Overflow when
    unpacking long long", naming no flag, or a traceback)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an int, got {text!r}") from None
    if not is_torch_seed(value):
        raise argparse.ArgumentTypeError(f"must be an int in [-2**63, 2**64 - 1], got {text!r}")
    return value


def parse_sizes(text: str) -> list[int]:
    try:
        sizes = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise UserError(f"--n-edits must be a comma-separated list of positive ints, got {text!r}") from None
    if not sizes or any(n < 1 for n in sizes):
        raise UserError(f"--n-edits must be a comma-separated list of positive ints, got {text!r}")
    if len(set(sizes)) != len(sizes):
        raise UserError(f"--n-edits must not repeat a value, got {text!r}")
    return sizes


def _common(p: argparse.ArgumentParser, method_default: str | None, methods=tuple(METHOD_NAMES)) -> None:
    from ..data import FILES

    p.add_argument("--model", default=None, help="model name or path (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--layers", default=None, help="comma-separated module names to edit (default: the last 3 MLP output projections)")
    p.add_argument("--method", default=method_default, choices=sorted(methods),
                   help=f"editing method (default: {method_default})" if method_default else
                   "editing method (default: ft, or the method of --editor)")
    p.add_argument("--n-editors", type=positive_int, default=None, help="number of editors N_g (raeditor, moeditor; default 4)")
    p.add_argument("--rank", type=positive_int, default=None,
                   help="editor rank (the editor methods; default 1920, every preset's; at most the "
                   "layer's in + out features are used)")
    p.add_argument("--data", default=None, help="CounterFact or zsRE JSON file, or a data set's name ("
                   + ", ".join(FILES) + ": in $DCEDIT_DATA_DIR) (default: the built-in facts, "
                   "dcedit_kernels.facts)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="model dtype (default float32)")
    p.add_argument("--threads", type=thread_count, default=None, help="CPU threads (default: 1 on <=2-core machines)")
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
                   "<method>-editor.safetensors here) or a JSON record of the run (edit, evaluate); checked "
                   "before any work, its folder created when it is written")


# What edit and evaluate print, in their help: the paper's names, of which "es" reads as ROME's
# and EasyEdit's Efficacy Score (the edit prompt itself) to their users, where it is the rephrase's.
METRICS_HELP = ("Scores (teacher-forced accuracy of the target tokens, dcedit_kernels.metrics): "
                "es: edit success, on the rephrased prompts (generalisation; not ROME's efficacy "
                "score); reliability: on the edit prompts themselves (efficacy); ns: neighbourhood "
                "success, of the locality prompts' own answers under the edit; dd: drawdown, the "
                "share of locality prompts with an answer token's prediction changed by the edit; "
                "lmp = es - dd.")


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

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
    p.add_argument("--val-every", type=positive_int, default=None,  # None: 50, and whether it was given
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
