"""UserError: a mistake in the command line or its inputs, which `dcedit` prints as one line."""

from __future__ import annotations


class UserError(Exception):
    """A mistake in the command line or its inputs: printed as one line, exit status 2."""


def check_path(path, name: str, none_ok: bool = False) -> None:
    """`_checks.check_path` for the helpers whose other refusals are UserErrors (a Python caller's
    non-path argument; argparse gives strings)."""
    from .._checks import check_path as library_check_path

    try:
        library_check_path(path, name, none_ok)
    except ValueError as exc:
        raise UserError(str(exc)) from None


def refuse_empty(args, flags: dict[str, str]) -> None:
    """UserError for a flag of `flags` ({flag: what to give instead}) given as "": the programs read
    "" as the flag left out (`args.out or ...`), so `dcedit edit --out ""` wrote no record, `train
    --out ""` saved to the default file, `train --val-data ""` trained without validation and
    `evaluate --n-edits ""` ran the default sizes, each without a word."""
    for flag, what in flags.items():
        if getattr(args, flag[2:].replace("-", "_"), None) == "":
            raise UserError(f"{flag} is empty; give {what}")
