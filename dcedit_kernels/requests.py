"""One knowledge edit: a prompt whose continuation should become `target`.

The optional fields carry what the evaluation suites need: `rephrase` (a paraphrase of the prompt,
scored for edit success), `locality` / `locality_target` (an unrelated prompt and its original
answer, scored for drawdown and neighbourhood success) and `subject` (the entity the edit is
about, used by ROME-style suites).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from ._checks import check_items, check_text

REQUIRED_FIELDS = ("prompt", "target")
OPTIONAL_FIELDS = ("rephrase", "locality", "locality_target", "subject")


@dataclass
class EditRequest:
    """One edit: `prompt` + " " + `target` is the text to teach (see the README's "Prompts and
    targets" for the space); the rest is optional: `rephrase`, a paraphrase of the prompt (edit
    success, ES); `locality` and `locality_target`, an unrelated prompt and its answer (drawdown
    DD and neighbourhood success, NS; `locality_target` needs `locality`); `subject`, the entity
    the edit is about.  The editors' `apply` reads prompt and target only, but the scores are not
    the only other readers: FT+KL's `apply` fits its KL term to `locality` (+ `locality_target`;
    `evaluate.measure_edit` hands the method the requests without them), and `fit` trains on
    `rephrase` (else the prompt) and `locality` (+ `locality_target`).
    Every given field is a non-blank str (`validate`).  `dcedit_kernels.data.load_dataset` gives
    CounterFact and zsRE as these."""

    prompt: str
    target: str
    rephrase: str | None = None
    locality: str | None = None
    locality_target: str | None = None
    subject: str | None = None

    def validate(self, where: str = "request") -> "EditRequest":
        """Raise ValueError naming the field unless every given field is a non-blank string.

        `where` prefixes the message (e.g. "requests[3]") so a caller holding a list can say
        which request is bad.  Returns self so it chains.
        """
        for name in REQUIRED_FIELDS:
            _check_text(getattr(self, name), f"{where}.{name}", required=True)
        for name in OPTIONAL_FIELDS:
            _check_text(getattr(self, name), f"{where}.{name}", required=False)
        if (self.locality_target is not None) and (self.locality is None):
            raise ValueError(f"{where}.locality_target is given but {where}.locality is None")
        return self


def validate_requests(requests: Iterable[EditRequest], name: str = "requests") -> list[EditRequest]:
    """Validate a non-empty sequence of EditRequests; returns them as a list."""
    if isinstance(requests, str):  # else "requests[0] must be an EditRequest, got str", of its first letter
        raise ValueError(f"{name} must be a sequence of EditRequest, got a str (a data set's name? "
                         "dcedit_kernels.data.load_dataset(name) loads one as EditRequests)")
    items = check_items(requests, name, EditRequest, "EditRequest")
    for i, request in enumerate(items):
        request.validate(f"{name}[{i}]")
    return items


def require_field(requests: list[EditRequest], field: str, name: str = "requests") -> list[str]:
    """The value of an optional `field` for every request; ValueError naming the first missing one."""
    values = []
    for i, request in enumerate(requests):
        value = getattr(request, field)
        if value is None:
            raise ValueError(f"{name}[{i}].{field} is None but this metric needs it")
        values.append(value)
    return values


def _check_text(value, name: str, required: bool) -> None:
    if value is None:
        if required:
            raise ValueError(f"{name} is required, got None")
        return
    if not isinstance(value, str):
        raise ValueError(f"{name} must be a str, got {type(value).__name__}")
    check_text(value, name)
