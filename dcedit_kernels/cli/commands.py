"""`dcedit`'s subcommands: train, edit, evaluate."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import torch

from .._checks import lone_surrogate
from .inputs import check_count, greedy_completions, load_any_model, load_requests, parse_layers, shown
from .messages import counted, in_cli_terms, non_finite_edit, rank0
from .methods import EDITOR_METHODS, METHOD_NAMES
from .options import editor_kwargs, parse_sizes
from .output_files import check_checkpoint_dir, make_folder, train_out
from .user_error import UserError


def _model_editor(args, model, tokenizer):
    """A ModelEditor from --editor (a saved one) or from --method/--layers."""
    from ..model_editor import ModelEditor

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
        if rank0():
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
    from .. import distributed

    if args.val_size is not None and not args.val_data:  # it counts --val-data's edits: alone it would be ignored
        raise UserError("--val-size goes with --val-data")
    if args.val_every is not None and not args.val_data and args.checkpoint_dir is None:
        # It times the validations and the checkpoints: with neither it did nothing, without a word.
        raise UserError("--val-every goes with --val-data or --checkpoint-dir (it sets how often they run)")
    if args.checkpoint_dir == "":  # Path("") is the current directory: TrainConfig refuses it, after the model's load
        raise UserError("--checkpoint-dir: an empty path; give a folder")
    if args.checkpoint_dir is not None:  # under torchrun rank 0 writes them
        check_checkpoint_dir(args.checkpoint_dir, writes=rank0())
    requests = load_requests(args.data, args.n_edits)
    check_count(requests, args.n_edits)
    # The first --val-size requests, as --n-edits counts --data's: loading them all named blank zsRE
    # records past those as left out (--val-size 2 of zsre-train: "record 534, 723"); fit validates on
    # the same first --val-size either way, and its resume digest is taken of those alone.
    val = load_requests(args.val_data, args.val_size, flag="--val-data") if args.val_data else None
    if val is not None:
        check_count(val, args.val_size, "--val-size", "--val-data")
    try:
        torch.device(args.device)
    except RuntimeError as exc:
        raise UserError(f"--device {args.device!r} is not a device: {exc}") from None
    # init_process_group wraps sys.excepthook to put "[rankN]: " before every line, and destroying the
    # group leaves the wrapper: after main() returned, a later traceback of the process read as the
    # group's, one "[rankN]: " more for each `dcedit train` run in it.  A traceback on its way out of
    # main() keeps it: it says which process the error came from.
    excepthook, traceback_escapes = sys.excepthook, False
    try:
        device, joined = distributed.init_from_env(args.device)
    except ValueError as exc:  # torchrun's variables set by hand, or half of them; no GPU of LOCAL_RANK
        raise UserError(in_cli_terms(str(exc))) from None
    try:
        return _train(args, requests, val, device)
    except distributed.PeerFailure as exc:  # the failed process prints its own error
        raise UserError(str(exc)) from None
    except BaseException as exc:
        traceback_escapes = not isinstance(exc, (UserError, KeyboardInterrupt))  # main() says these in a line
        raise
    finally:
        if joined:
            torch.distributed.destroy_process_group()
            if not traceback_escapes:
                sys.excepthook = excepthook


def _train(args, requests, val, device) -> dict:
    from .. import distributed
    from ..model_editor import ModelEditor
    from ..train import TrainConfig
    from ..train_checkpoint import run_editor_defaults

    rank, size = distributed.world()
    model, tokenizer = load_any_model(args.model, args.dtype, device)
    layers = parse_layers(model, args.layers)
    kwargs = editor_kwargs(args)
    if args.checkpoint_dir is not None and args.method in EDITOR_METHODS:
        # A run of an older release resumes as the editor it trained (a 0.5.5 MoEditor's gate_norm
        # was off): there is no flag to say so, and "give that run's flags" could not be followed.
        kwargs = {**run_editor_defaults(args.checkpoint_dir, args.method), **kwargs}
    try:
        me = ModelEditor(model, tokenizer, layers=layers, method=args.method, **kwargs)
        config = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, lr_lr=args.lr_lr,
                             locality_rows=args.locality_rows, checkpoint_dir=args.checkpoint_dir,
                             val_every=args.val_every or TrainConfig.val_every, val_size=args.val_size, seed=args.seed,
                             data_parallel=size > 1)
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
    # A resume with a smaller --steps: _best_note says it in the CLI's terms, on the saved line.
    warnings.filterwarnings("ignore", message=r"train_editor: checkpoint_dir's run had already trained",
                            category=UserWarning)
    try:
        result = me.fit(requests, val, config)
    except ValueError as exc:  # a resume of another run (--checkpoint-dir), processes that disagree, ...
        raise UserError(in_cli_terms(str(exc))) from None
    except FloatingPointError as exc:
        # A validation edit's overflow (--dtype float16, editors whose steps grew past its range: a
        # large --lr-lr) ended main() in a traceback through the training loop; as `edit`'s, one line.
        raise UserError(f"training stopped: {non_finite_edit(exc, args.dtype)}") from None
    out = Path(train_out(args))
    summary = dict(editor=str(out), method=args.method, layers=layers, steps=result.steps,
                   elapsed_s=result.elapsed_s, best_es=result.best_es, processes=size,
                   final_loss=result.history[-1].get("loss") if result.history else None,
                   best_step=result.best_step, stopped_early=result.stopped_early)
    if rank == 0:  # the processes' editors are equal
        make_folder(out)  # now, not when main() checked --out (check_out): a refused run left it empty
        me.save(out)
        processes = f", {size} processes" if size > 1 else ""
        print(f"saved the trained editor to {out} ({METHOD_NAMES[args.method]}, "  # not "the trained MoEditor editor"
              f"{counted(result.steps, 'step')}, {result.elapsed_s:.0f} s{processes})"
              + _best_note(result, config))
    return summary


def _best_note(result, config) -> str:
    """What `fit` did with --val-data that the step count alone hides: it stops after `patience`
    validations without a better ES, and saves the best validation's editor, not the last step's
    (a user trial's "30 steps" line saved the step-10 editor; --steps 10 ran 6 steps unsaid)."""
    notes = []
    if result.steps > config.steps:
        # A --checkpoint-dir run resumed with a smaller --steps: fit trains no further and the
        # editor saved is the checkpoint's, which the line's step count alone left unexplained.
        notes.append(f"--checkpoint-dir's run had already trained {counted(result.steps, 'step')}, more "
                     f"than --steps {config.steps}: the editor saved is its, trained no further")
    if result.stopped_early and result.steps < config.steps:
        notes.append(f"stopped early, before --steps {config.steps}: the last {config.patience} "
                     "validations gave no better ES")
    if result.best_step is not None and result.best_step != result.steps:
        # Its NLL too: a later validation of the same ES is the best when its NLL is lower
        # (train._better_at_no_gain), and the ES alone read as a tie the earlier step had won.
        from ..train import _best_nll

        nll = _best_nll(result)
        nll_part = f", NLL {nll:.4g}" if nll is not None else ""
        notes.append(f"the editor saved is step {result.best_step}'s, the best validation (ES "
                     f"{result.best_es:.3f}{nll_part}), not step {result.steps}'s")
    return "".join(f"\n  {note}" for note in notes)


def cmd_edit(args) -> dict:
    from ..evaluate import measure_edit
    from ..requests import EditRequest

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
            bad = None if text is None else lone_surrogate(text)
            if bad:  # a byte the locale cannot decode (Python's surrogateescape): the tokenizer's TypeError
                # came after the model's load, a traceback naming nothing
                raise UserError(f"{flag} is not valid Unicode (a lone surrogate {bad}: a byte your locale "
                                "does not decode)")
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
    except FloatingPointError as exc:  # an fp16 overflow, the model restored: was a traceback
        raise UserError(non_finite_edit(exc, args.dtype)) from None
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
    from ..evaluate import evaluate_method

    requests = load_requests(args.data, None)
    sizes = parse_sizes(args.n_edits or "25,75,125")
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
    except FloatingPointError as exc:  # as `edit`'s
        raise UserError(non_finite_edit(exc, args.dtype)) from None
    print(f"{METHOD_NAMES[me.method]} on {counted(len(requests), 'request')}, {counted(args.repeats, 'repeat')}")
    for n, row in result["by_n"].items():
        cells = "  ".join(f"{m}={_mean_std(row[m])}" for m in ("es", "reliability", "dd", "lmp", "ns", "latency_s"))
        print(f"  N_u={n}: {cells}")
    return dict(result, layers=me.layers)


def _mean_std(stat: dict) -> str:
    return "n/a" if stat["mean"] is None else f"{stat['mean']:.3f}±{stat['std']:.3f}"


COMMANDS = {"train": cmd_train, "edit": cmd_edit, "evaluate": cmd_evaluate}
