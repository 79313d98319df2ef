"""CounterFact in EasyEdit's format: a JSON list of records

    {"case_id", "prompt", "target_new", "subject", "ground_truth", "rephrase_prompt",
     "locality_prompt", "locality_ground_truth"}

mapped to EditRequest(prompt, target=target_new, rephrase=rephrase_prompt,
locality=locality_prompt, locality_target=locality_ground_truth, subject).  `prompt` and
`target_new` are required; the other fields may be absent (None).  The prompts are already filled
in (no "{}" template), so nothing is formatted here.
"""

from __future__ import annotations

from ..requests import EditRequest
from ._records import read_records, text_field

FIELDS = {
    "prompt": ("prompt", True),
    "target": ("target_new", True),
    "rephrase": ("rephrase_prompt", False),
    "locality": ("locality_prompt", False),
    "locality_target": ("locality_ground_truth", False),
    "subject": ("subject", False),
}


def load_counterfact(path, limit: int | None = None) -> list[EditRequest]:
    """EditRequests of an EasyEdit CounterFact file at `path` (a leading "~" is the home folder),
    the first `limit` records (None: all); ValueError naming record and field on bad data."""
    path, records = read_records(path, limit)
    requests = []
    for i, record in enumerate(records):
        values = {name: text_field(path, i, record, key, required) for name, (key, required) in FIELDS.items()}
        if values["locality_target"] is not None and values["locality"] is None:
            raise ValueError(f"{path}: record {i} has 'locality_ground_truth' but no 'locality_prompt'")
        requests.append(EditRequest(**values))
    return requests
