"""zsRE in MEND's format: a JSON list of records

    {"subject", "src", "pred", "rephrase", "alt", "answers", "loc", "loc_ans", "cond"}

This is the JSON that ROME (`zsre_mend_eval.json`, its MENDQADataset) and EasyEdit
(`zsre_mend_train.json`, ...) derived from MEND's zsRE split, not the KILT JSON-lines files MEND's
own code reads (`structured_zeroshot-*.jsonl`: "input", "alternatives", "filtered_rephrases",
"output"), which raise ValueError here (not a JSON list).

mapped to EditRequest(prompt=src, target=alt, rephrase=rephrase, locality=loc,
locality_target=loc_ans, subject).  `alt` is the alternative answer MEND (and EasyEdit's zsRE
loader) edits the model towards; `target="answer"` edits towards `answers[0]` instead (ROME's
zsRE evaluation).  The locality prompts keep MEND's "nq question: " prefix.

Text fields are stripped: MEND's file has a few `alt` values with a leading space, which would
otherwise become a double space between prompt and target.  Two records of MEND's 1k training
file have an empty `alt`: they cannot be edited, so with `skip_empty=True` (the default) records
with a blank prompt or target are skipped (their indices go to `skipped` when a list is given);
with `skip_empty=False` they raise ValueError.
"""

from __future__ import annotations

from .._checks import check_bool
from ..requests import EditRequest
from ._records import read_records, text_field

TARGETS = ("alt", "answer")


def load_zsre(path, limit: int | None = None, target: str = "alt", skip_empty: bool = True,
              skipped: list | None = None) -> list[EditRequest]:
    """EditRequests of a MEND-format zsRE file at `path` (a leading "~" is the home folder).

    `target`: "alt" (MEND's edit target, the default) or "answer" (`answers[0]`, ROME's; see the
    module docstring).
    `limit` reads only the first n records, so fewer than n requests come back when some of them
    are skipped (MEND's 1k file: limit=535 gives 534; the CLI's --n-edits counts requests).
    Records whose prompt or target is blank are skipped with `skip_empty` (their indices appended
    to `skipped` when a list is given, only when the call returns: a call that raises leaves
    `skipped` as it was), else they raise; missing fields and wrong types always raise ValueError
    naming the record and field.
    """
    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
    check_bool(skip_empty, "skip_empty")  # "no" was truthy (skipped), None falsy (raised): neither said so
    if skipped is not None and not isinstance(skipped, list):
        raise ValueError(f"skipped must be a list or None, got {type(skipped).__name__}")
    path, records = read_records(path, limit)
    requests, skipped_here = [], []  # `skipped` is extended only once the whole file has loaded
    for i, record in enumerate(records):
        if target == "alt":
            goal = _required(path, i, record, "alt", skip_empty)
        else:
            answers = record.get("answers")
            if not isinstance(answers, list) or not answers:
                raise ValueError(f"{path}: record {i} field 'answers' must be a non-empty list")
            goal = _required(path, i, {"answers[0]": answers[0]}, "answers[0]", skip_empty)
        prompt = _required(path, i, record, "src", skip_empty)
        # read before the skip: a skipped record's wrong types raise too ("always", the docstring)
        rephrase = _optional(path, i, record, "rephrase")
        locality = _optional(path, i, record, "loc")
        locality_target = _optional(path, i, record, "loc_ans")
        subject = _optional(path, i, record, "subject")
        if goal is None or prompt is None:
            skipped_here.append(i)
            continue
        if locality_target is not None and locality is None:
            raise ValueError(f"{path}: record {i} has 'loc_ans' but no 'loc'")
        requests.append(EditRequest(prompt=prompt, target=goal, rephrase=rephrase, locality=locality,
                                    locality_target=locality_target, subject=subject))
    if not requests:
        raise ValueError(f"{path}: no record has both a prompt and a target")
    if skipped is not None:
        skipped.extend(skipped_here)
    return requests


def _required(path, i, record, field, skip_empty):
    if field in record and isinstance(record[field], str) and not record[field].strip() and skip_empty:
        return None
    return text_field(path, i, record, field, required=True).strip()


def _optional(path, i, record, field):
    value = text_field(path, i, record, field, required=False)
    return value.strip() if value is not None else None
