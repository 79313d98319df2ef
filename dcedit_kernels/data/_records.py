"""Reading a JSON list of records with errors that name the file, the record index and the field."""

from __future__ import annotations

import json
from pathlib import Path

from .._checks import check_path, is_int, lone_surrogate


def read_records(path, limit: int | None = None) -> tuple[Path, list]:
    """The records of a JSON file holding a non-empty list of objects (`limit` keeps the first n)."""
    check_limit(limit)
    check_path(path, "path")
    path = Path(path).expanduser()  # "~/cf.json" as load_model takes "~/model"
    if path.is_dir():
        raise ValueError(f"{path} is a folder: give a JSON file")
    if path.exists() and not path.is_file():  # `--data <(jq ...)`, /dev/stdin: was "data file not found"
        raise ValueError(f"{path} is not a regular file (a pipe or a device): give a JSON file "
                         "(write a command's output to a file first)")
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    try:
        text = path.read_bytes().decode("utf-8-sig")  # a byte-order mark some editors write is dropped
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not text.strip():
        raise ValueError(f"{path}: the file is empty")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    except (ValueError, RecursionError) as e:  # an int past sys.get_int_max_str_digits(); nesting past the recursion limit
        raise ValueError(f"{path}: cannot read its JSON ({e})") from None
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
    if not data:
        raise ValueError(f"{path}: the file holds no records")
    if limit is not None:
        data = data[:limit]
    for i, record in enumerate(data):
        if not isinstance(record, dict):
            raise ValueError(f"{path}: record {i} must be a JSON object, got {type(record).__name__}")
    return path, data


def check_limit(limit) -> None:
    """ValueError naming `limit` unless it is a positive int or None."""
    if limit is not None and (not is_int(limit) or limit < 1):
        raise ValueError(f"limit must be a positive int or None, got {limit!r}")


def text_field(path: Path, index: int, record: dict, field: str, required: bool) -> str | None:
    """`record[field]` as a str: ValueError naming file, record and field when it is missing
    (and required), not a string, or blank (and required).  An optional blank field is None."""
    if field not in record or record[field] is None:
        if required:
            raise ValueError(f"{path}: record {index} has no field {field!r}")
        return None
    value = record[field]
    if not isinstance(value, str):
        raise ValueError(f"{path}: record {index} field {field!r} must be a string, got {type(value).__name__}")
    bad = lone_surrogate(value)  # json.loads takes "\ud83c"; the tokenizer would raise a TypeError
    if bad:
        raise ValueError(f"{path}: record {index} field {field!r} is not valid Unicode (a lone surrogate {bad})")
    if not value.strip():
        if required:
            raise ValueError(f"{path}: record {index} field {field!r} is empty")
        return None
    return value
