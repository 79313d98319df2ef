"""The `dcedit` CLI's errors a user can fix: each one `dcedit: error:` line and exit status 2
(see also test_demo.py)."""

import json
import os
import random
import re
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from dcedit_kernels import cli
from dcedit_kernels.models import tiny_model

from test_demo import _counterfact_file, tiny_model_dir  # noqa: F401 (tiny_model_dir: a fixture)


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------
def test_cli_model_folder_without_a_tokenizer_is_one_error_line(capsys, tmp_path):
    """A --model folder that holds no tokenizer (here an empty folder): AutoTokenizer's ValueError
    is one error line (it once ended main() in a traceback)."""
    empty = tmp_path / "empty_model"
    empty.mkdir()
    assert cli.main(["edit", "--model", str(empty), "--method", "ft", "--prompt", "a b", "--target", "c"]) == 2
    assert "dcedit: error: --model" in capsys.readouterr().err


def test_cli_rephrase_without_prompt_is_refused(capsys, tiny_model_dir):
    """`dcedit edit --rephrase X` without --prompt/--target is refused, as other flags that would
    be ignored are (it once edited the default facts without a word)."""
    code = cli.main(["edit", "--model", str(tiny_model_dir), "--method", "ft", "--rephrase", "Look: the sky is"])
    assert code == 2
    assert "--rephrase" in capsys.readouterr().err


def test_cli_main_gives_torch_threads_back(capsys, tiny_model_dir):
    """main() sets torch's thread count for its command (--threads, or 1 on a small machine) and
    puts the caller's back when it returns, as the other entry points leave torch's global state:
    called from Python (a notebook, these tests) it left the whole process on that many threads."""
    threads = torch.get_num_threads()
    code = cli.main(["edit", "--model", str(tiny_model_dir), "--method", "ft", "--threads", str(threads + 1),
                     "--rephrase", "Look: the sky is"])
    assert code == 2 and "--rephrase" in capsys.readouterr().err  # refused after the threads were set
    assert torch.get_num_threads() == threads


@pytest.mark.parametrize("command", ["train", "edit", "evaluate"])
def test_threads_past_a_c_int_are_refused_by_flag(command, capsys, gen):
    """torch.set_num_threads takes a C int: --threads 2**31 (or more) ended in its bare "Overflow when
    unpacking long" traceback (exit status 1), before any model; now argparse's line naming the flag
    (exit status 2), and set_threads refuses it from Python callers; 2**31 - 1 is still taken."""
    threads = torch.get_num_threads()
    too_many = 2**31 + int(torch.randint(0, 2**40, (), generator=gen))
    with pytest.raises(SystemExit) as exit_info:
        cli.build_parser().parse_args([command, "--threads", str(too_many)])
    assert exit_info.value.code == 2
    assert f"argument --threads: must be a positive int up to 2**31 - 1, got '{too_many}'" in capsys.readouterr().err
    assert cli.build_parser().parse_args([command, "--threads", str(2**31 - 1)]).threads == 2**31 - 1
    with pytest.raises(cli.UserError, match=r"^--threads must be a positive int up to 2\*\*31 - 1, got "):
        cli.set_threads(too_many)
    assert torch.get_num_threads() == threads


@pytest.mark.parametrize("cores", [1, 2, 3, None])
def test_set_threads_default_is_one_thread_on_two_cores_or_fewer(cores, monkeypatch):
    """Without --threads: 1 thread where os.cpu_count() is at most 2 (or unknown), torch's own count
    on a larger machine."""
    import os

    threads = torch.get_num_threads()
    monkeypatch.setattr(os, "cpu_count", lambda: cores)
    try:
        torch.set_num_threads(3)  # torch's count, whatever this machine's is
        expected = 3 if cores == 3 else 1
        assert cli.set_threads(None) == expected and torch.get_num_threads() == expected
    finally:
        torch.set_num_threads(threads)


def test_cli_helpers_refuse_bad_values_from_python_callers():
    with pytest.raises(cli.UserError, match="--threads must be a positive int, got 0"):
        cli.set_threads(0)
    with pytest.raises(cli.UserError, match="--threads must be a positive int, got True"):
        cli.set_threads(True)
    with pytest.raises(cli.UserError, match="limit must be a positive int or None, got 0"):
        cli.load_requests(None, 0)
    with pytest.raises(cli.UserError, match=r"--dtype must be one of .*got 'float8'"):
        cli.load_any_model(None, dtype="float8")
    model, _ = tiny_model("llama", seed=0)
    with pytest.raises(cli.UserError, match="--layers is empty"):
        cli.parse_layers(model, " , ")
    with pytest.raises(cli.UserError, match="cannot pick default layers for this model: give --layers"):
        cli.default_layers(nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2)))


def test_default_layers_are_mlp_outputs_not_attention_outputs():
    """BERT-style blocks: `layer.N.output.dense` is the MLP's output, `layer.N.attention.output.dense`
    (and a decoder's `crossattention.output.dense`) the attention's; the defaults are MLP outputs
    only (the last 3 once held layer 1's attention output)."""
    model, _ = tiny_model("bert", seed=0)
    assert cli.default_layers(model) == ["bert.encoder.layer.0.output.dense", "bert.encoder.layer.1.output.dense"]
    assert cli.default_layers(model, n=1) == ["bert.encoder.layer.1.output.dense"]  # the last blocks' ones
    config = model.config.to_dict()
    config.update(is_decoder=True, add_cross_attention=True)
    import transformers

    decoder = transformers.BertLMHeadModel(transformers.BertConfig(**config))
    assert any(n.endswith("crossattention.output.dense") for n, _ in decoder.named_modules())
    assert cli.default_layers(decoder, n=5) == [f"bert.encoder.layer.{i}.output.dense" for i in (0, 1)]


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cli_device_not_usable_here_is_one_error_line(capsys, tiny_model_dir):
    assert cli.main(["edit", "--model", str(tiny_model_dir), "--device", "cuda", "--prompt", "a b",
                     "--target", "c"]) == 2
    err = capsys.readouterr().err
    assert "dcedit: error: --device 'cuda' is not usable here" in err and "Traceback" not in err


@pytest.mark.skipif(torch.backends.mps.is_available(), reason="needs a machine without MPS")
def test_cli_device_error_is_its_first_line_only(capsys, tiny_model_dir):
    """torch's error for a backend it was not built with lists every dispatch key (55 lines)."""
    assert cli.main(["edit", "--model", str(tiny_model_dir), "--device", "mps", "--prompt", "a b",
                     "--target", "c"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dcedit: error: --device 'mps' is not usable here") and err.count("\n") == 1, err


def test_cli_train_device_that_is_not_a_device(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(cli.commands, "load_any_model", lambda *a, **k: pytest.fail("the model loaded"))
    assert cli.main(["train", "--device", "nonsense", "--out", str(tmp_path / "e.safetensors")]) == 2
    assert "dcedit: error: --device 'nonsense' is not a device" in capsys.readouterr().err


def test_write_json_writes_paths_and_tensors_and_refuses_the_rest(tmp_path):
    out = tmp_path / "sub" / "x.json"
    cli.write_json(out, dict(path=Path("/a/b"), t=torch.tensor([1.5, 2.0])))
    assert json.loads(out.read_text()) == dict(path="/a/b", t=[1.5, 2.0])
    with pytest.raises(TypeError, match="not JSON serializable: object"):
        cli.write_json(out, dict(x=object()))


def test_cli_json_record_is_the_result_and_the_runs_time(capsys, tmp_path, monkeypatch):
    """edit's and evaluate's --out record is the command's result with elapsed_s added: the seconds
    from main's start, before the command ran, to its return."""
    from types import SimpleNamespace

    for command in ("edit", "evaluate"):
        clock = iter([10.0, 12.5])
        monkeypatch.setattr(cli, "time", SimpleNamespace(perf_counter=lambda: next(clock)))
        monkeypatch.setitem(cli.COMMANDS, command, lambda args: {"method": "ft", "n": 3})
        out = tmp_path / f"{command}.json"
        assert cli.main([command, "--out", str(out)]) == 0
        assert json.loads(out.read_text()) == {"method": "ft", "n": 3, "elapsed_s": 2.5}
        assert capsys.readouterr().out == f"wrote {out}\n"


def test_dcedit_version(capsys):
    from dcedit_kernels import __version__

    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out == f"dcedit_kernels {__version__} (torch {torch.__version__})\n"


def test_write_json_cut_short_leaves_the_previous_file_whole(tmp_path, monkeypatch):
    """A write that fails midway (a full disk, a Ctrl-C) truncated the results file in place."""
    out = tmp_path / "results.json"
    cli.write_json(out, dict(a=1))
    real_write_text = Path.write_text

    def half_then_full_disk(self, text, *args, **kwargs):
        real_write_text(self, text[: len(text) // 2], *args, **kwargs)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_text", half_then_full_disk)
    with pytest.raises(OSError, match="No space left"):
        cli.write_json(out, dict(b=[2] * 100))
    monkeypatch.undo()
    assert json.loads(out.read_text()) == dict(a=1)
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]  # no temporary file left


def test_write_text_writes_utf8_under_an_ascii_locale(tmp_path):
    """report.md ("±", "‖") was written in the locale's encoding: under a C locale without UTF-8 mode
    (ASCII) the report's last write raised UnicodeEncodeError after the whole run."""
    import subprocess
    import sys

    out = tmp_path / "report.md"
    code = ("import sys; from dcedit_kernels.cli import write_text; "
            "import locale; assert locale.getpreferredencoding(False) != 'UTF-8'; "
            "write_text(sys.argv[1], 'ES 0.50 \\u00b1 0.10, \\u2016\\u0394\\u2016')")  # escapes: the command line is ASCII
    env = dict(os.environ, LC_ALL="C", LANG="C", PYTHONUTF8="0", PYTHONCOERCECLOCALE="0",
               PYTHONPATH=os.pathsep.join([str(Path(cli.__file__).parents[2]), os.environ.get("PYTHONPATH", "")]))
    subprocess.run([sys.executable, "-c", code, str(out)], env=env, check=True, timeout=120)
    assert out.read_text(encoding="utf-8") == "ES 0.50 \u00b1 0.10, \u2016\u0394\u2016"


@pytest.mark.parametrize("sizes", ["x,2", "0", ",", "3,-1"])
def test_cli_n_edits_list_is_checked_before_the_model_loads(sizes, capsys, monkeypatch):
    monkeypatch.setattr(cli.commands, "load_any_model", lambda *a, **k: pytest.fail("the model loaded"))
    assert cli.main(["evaluate", "--n-edits", sizes]) == 2
    assert "dcedit: error: --n-edits must be a comma-separated list of positive ints" in capsys.readouterr().err


def test_cli_n_edits_list_skips_blank_entries():
    """evaluate's --n-edits reads '3, 5,' (spaces, a trailing comma) as N_u 3 and 5."""
    assert cli.parse_sizes("3, 5,") == [3, 5]
    assert cli.parse_sizes(" 7 ,,2") == [7, 2]


def test_cli_editor_file_missing_or_not_an_editor(capsys, tmp_path, tiny_model_dir):
    base = ["edit", "--model", str(tiny_model_dir), "--prompt", "a b", "--target", "c", "--editor"]
    assert cli.main(base + [str(tmp_path / "none.safetensors")]) == 2
    assert "dcedit: error: --editor: file not found" in capsys.readouterr().err
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    assert cli.main(base + [str(tmp_path / "junk.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "dcedit: error: --editor: " in err and "is not a safetensors file" in err
    assert "path:" not in err  # ModelEditor.load's argument: the command line's user typed --editor


def test_cli_editor_pointed_at_a_training_checkpoint_names_the_editor_file(capsys, tmp_path, tiny_model_dir):
    """--editor given a --checkpoint-dir's trainer.safetensors said only "is not a ModelEditor
    checkpoint (no dcedit_model_editor metadata)"; the editor is the editor.safetensors beside it."""
    ckpt, data = tmp_path / "ck", _counterfact_file(tmp_path / "cf.json", n=4)
    assert cli.main(["train", "--model", str(tiny_model_dir), "--method", "mend", "--rank", "3", "--data", str(data),
                     "--steps", "1", "--checkpoint-dir", str(ckpt), "--out", str(tmp_path / "e.safetensors")]) == 0
    capsys.readouterr()
    base = ["edit", "--model", str(tiny_model_dir), "--prompt", "a b", "--target", "c", "--editor"]
    assert cli.main(base + [str(ckpt / "trainer.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "--editor: " in err and "the editor is editor.safetensors beside it" in err
    assert cli.main(base + [str(ckpt / "editor.safetensors")]) == 0


def test_cli_prompt_and_target_go_together_and_not_with_data(capsys, monkeypatch):
    monkeypatch.setattr(cli.commands, "load_any_model", lambda *a, **k: pytest.fail("the model loaded"))
    assert cli.main(["edit", "--prompt", "a b"]) == 2
    assert "--prompt and --target go together" in capsys.readouterr().err
    assert cli.main(["edit", "--target", "c"]) == 2
    assert "--prompt and --target go together" in capsys.readouterr().err
    assert cli.main(["edit", "--prompt", "a b", "--target", "c", "--data", "counterfact-val"]) == 2
    assert "give either --data or --prompt/--target, not both" in capsys.readouterr().err


def test_cli_train_bad_setting_is_one_error_line(capsys, tmp_path, tiny_model_dir):
    data = _counterfact_file(tmp_path / "cf.json", n=4)
    assert cli.main(["train", "--model", str(tiny_model_dir), "--method", "mend", "--rank", "3", "--data", str(data),
                     "--steps", "1", "--lr", "-1", "--out", str(tmp_path / "e.safetensors")]) == 2
    err = capsys.readouterr().err
    # Named by its flag (TrainConfig's "lr must be ..." named the Python field, after the model
    # had loaded).
    assert "argument --lr: must be a non-negative finite number, got '-1'" in err
    assert "Traceback" not in err
    assert not (tmp_path / "e.safetensors").exists()
    for flag, value in (("--lr", "nan"), ("--lr-lr", "inf"), ("--lr-lr", "fast")):
        assert cli.main(["train", "--data", str(data), flag, value]) == 2
        assert f"argument {flag}: must be a" in capsys.readouterr().err
    # Non-negative: 0 is a rate (--lr-lr 0 keeps the edit steps α at their initial values).
    assert cli.rate("0") == 0.0 and cli.rate("1e-3") == 1e-3


def test_cli_edit_past_a_learned_position_table_is_one_error_line(capsys, tmp_path):
    """A refused edit (prompt + target past GPT-2's 128 positions) and a prompt too long to
    complete (a bare IndexError inside generate) ended in tracebacks."""
    model, tok = tiny_model("gpt2", seed=0)
    model.save_pretrained(tmp_path / "gpt2")
    tok.save_pretrained(tmp_path / "gpt2")
    for prompt, target, message in (("word " * 20, "xy " * 15, "requests[0] is 145 tokens (prompt + target)"),
                                    ("word " * 200, "c",
                                     "a prompt is 1000 tokens, which leaves none of the model's 128 positions")):
        assert cli.main(["edit", "--model", str(tmp_path / "gpt2"), "--method", "ft", "--layers",
                         "transformer.h.0.mlp.c_fc", "--prompt", prompt, "--target", target]) == 2
        err = capsys.readouterr().err
        assert f"dcedit: error: {message}" in err and "128 positions" in err and "Traceback" not in err


def test_cli_train_of_a_seq2seq_model_is_one_error_line(capsys, tmp_path):
    model, tok = tiny_model("bart", seed=0)
    model.save_pretrained(tmp_path / "bart")
    tok.save_pretrained(tmp_path / "bart")
    data = _counterfact_file(tmp_path / "cf.json", n=4)
    assert cli.main(["train", "--model", str(tmp_path / "bart"), "--method", "mend", "--rank", "3", "--data", str(data),
                     "--steps", "1", "--batch-size", "2", "--out", str(tmp_path / "e.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "dcedit: error: editor training supports causal LMs only" in err and "Traceback" not in err


def test_cli_evaluate_past_a_learned_position_table_is_one_error_line(capsys, tmp_path):
    """`evaluate` reports a request the edit refuses as `edit` does (it ended in a traceback), and
    writes no --out."""
    model, tok = tiny_model("gpt2", seed=0)
    model.save_pretrained(tmp_path / "gpt2")
    tok.save_pretrained(tmp_path / "gpt2")
    data = _counterfact_file(tmp_path / "cf.json", n=4)
    records = json.loads(data.read_text())
    for r in records:
        r["prompt"], r["target_new"] = "word " * 20 + r["prompt"], "xy " * 15
    data.write_text(json.dumps(records))
    out = tmp_path / "eval.json"
    assert cli.main(["evaluate", "--model", str(tmp_path / "gpt2"), "--method", "ft", "--layers",
                     "transformer.h.0.mlp.c_fc", "--data", str(data), "--n-edits", "2", "--repeats", "1",
                     "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "dcedit: error: requests[" in err and "128 positions" in err and "Traceback" not in err
    assert not out.exists()


@pytest.mark.parametrize("command", ["train", "edit", "evaluate"])
@pytest.mark.parametrize("seed", [str(2**64), str(-(2**63) - 1), "1.5"])
def test_cli_seed_torch_cannot_take_is_refused_by_flag(capsys, monkeypatch, command, seed):
    """A --seed past torch's 64 bits was "dcedit: error: Overflow when unpacking long long" (no flag named)."""
    monkeypatch.setattr(cli.commands, "load_any_model", lambda *a, **k: pytest.fail("the model loaded"))
    assert cli.main([command, "--seed", seed]) == 2
    assert "argument --seed: must be an int" in capsys.readouterr().err
    assert cli.seed_int(str(2**64 - 1)) == 2**64 - 1 and cli.seed_int(str(-(2**63))) == -(2**63)


# ---------------------------------------------------------------------------------------------
# Found by an audit of the CLI (session 29): each once a traceback, a wrong flag or fewer edits
# ---------------------------------------------------------------------------------------------
def _no_model(monkeypatch):
    monkeypatch.setattr(cli.commands, "load_any_model", lambda *a, **k: pytest.fail("the model loaded"))


@pytest.mark.parametrize("command, flag", [
    (command, flag) for command in ("train", "edit", "evaluate")
    for flag in ("--model", "--data", "--out", "--device") + {"train": ("--val-data",), "edit": ("--editor",),
                                                              "evaluate": ("--editor", "--n-edits")}[command]
])
def test_cli_flag_given_an_empty_string_is_refused_before_the_model_loads(command, flag, capsys, tmp_path,
                                                                          monkeypatch):
    """A flag given "" (an unset shell variable) was taken as left out: `edit --out ""` wrote no
    record, `train --out ""` saved to its default file, `train --val-data ""` trained without
    validation, `evaluate --n-edits ""` ran the default sizes, `--data ""` used the built-in facts."""
    _no_model(monkeypatch)
    monkeypatch.chdir(tmp_path)  # where train's default --out would go
    what = {"edit": ["--prompt", "The sky is", "--target", "green"], "train": [], "evaluate": []}[command]
    assert cli.main([command, *what, flag, ""]) == 2
    assert _one_cli_line(capsys).startswith(f"dcedit: error: {flag} is empty; give ")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("flag", ["--prompt", "--target", "--rephrase"])
def test_cli_edit_text_that_is_not_valid_unicode_is_refused_before_the_model_loads(flag, capsys, monkeypatch):
    """A byte the locale does not decode reaches Python as a lone surrogate ("caf\\xe9" in a UTF-8
    locale: '\\udce9'); in --prompt the tokenizer's TypeError came after the model's load, a
    traceback naming nothing (--target and --rephrase were refused by the edit, after the load)."""
    _no_model(monkeypatch)
    texts = {"--prompt": "The sky is", "--target": "green", "--rephrase": "The colour of the sky is"}
    texts[flag] = "The caf\udce9 is"
    argv = ["edit"] + [word for f, text in texts.items() for word in (f, text)]
    assert cli.main(argv) == 2
    assert _one_cli_line(capsys) == (f"dcedit: error: {flag} is not valid Unicode (a lone surrogate '\\udce9' at "
                                     "index 7: a byte your locale does not decode)")


def test_cli_model_that_is_a_data_file_or_has_a_list_config(capsys, tmp_path):
    """A JSON file given as --model was read as a config.json (TypeError, a traceback); so was a
    folder whose config.json holds a list."""
    data = _counterfact_file(tmp_path / "cf.json")
    folder = tmp_path / "list_config"
    folder.mkdir()
    (folder / "config.json").write_text("[1, 2]")
    # (The list config's own message is transformers' and differs by version.)
    for model, message in ((data, "is a file: give a model folder, a .gguf file or a hub name"), (folder, "")):
        assert cli.main(["edit", "--model", str(model), "--method", "ft", "--prompt", "a b", "--target", "c"]) == 2
        err = capsys.readouterr().err
        assert "dcedit: error: --model: cannot load" in err and message in err and "Traceback" not in err


@pytest.mark.parametrize("rank", ["0", "1"])
def test_cli_checkpoint_dir_that_is_a_file(rank, capsys, tmp_path, monkeypatch):
    """A file, or a folder under a file (which fit's mkdir refused after the model's load), on every
    process of a torchrun (each makes the folder; rank 0 alone writes in it): cmd_train's own "is a
    file" check, on every rank, and check_checkpoint_dir's, on rank 0, said it twice over; one check
    now, the same words."""
    _no_model(monkeypatch)
    monkeypatch.setenv("RANK", rank)
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    assert cli.main(["train", "--checkpoint-dir", str(a_file), "--out", str(tmp_path / "e.safetensors")]) == 2
    assert f"dcedit: error: --checkpoint-dir {a_file}: is a file; give a folder" in capsys.readouterr().err
    under = a_file / "ckpt" / "run"
    assert cli.main(["train", "--checkpoint-dir", str(under), "--out", str(tmp_path / "e.safetensors")]) == 2
    assert f"dcedit: error: --checkpoint-dir {under}: {a_file} is a file; give a folder" in capsys.readouterr().err


_TRAIN_TO = """
import sys
from dcedit_kernels import cli

sys.stderr = sys.stdout  # the error line, in the output the test reads

def loaded(*args, **kwargs):
    print("the model loaded")
    sys.exit(0)

cli.commands.load_any_model = loaded
print("exit", cli.main(["train", "--checkpoint-dir", sys.argv[1], "--out", sys.argv[2]]))
"""


def test_cli_checkpoint_dir_that_may_not_be_written_is_refused_before_the_model_loads(tmp_path):
    """A --checkpoint-dir in a read-only folder loaded the model and trained --val-every steps, then
    the first checkpoint failed ("Permission denied: '<dir>/editor.safetensors'") and the training was
    lost: --out is written at the end only.  It is refused before the model loads, as an --out that
    cannot be written is, whether the folder exists or fit would create it under a read-only one."""
    import os

    from test_editor_save_load import _run_unprivileged

    read_only = tmp_path / "read-only"
    read_only.mkdir()
    os.chmod(read_only, 0o555)
    try:
        for ckpt in (read_only, read_only / "new" / "deeper"):
            out = _run_unprivileged(_TRAIN_TO, ckpt, tmp_path / "e.safetensors").splitlines()
            assert out[-1] == "exit 2" and out[0].startswith(
                f"dcedit: error: --checkpoint-dir {ckpt}: cannot write in {read_only} (its checkpoints would "
                "fail after --val-every steps)"), out
        out = _run_unprivileged(_TRAIN_TO, tmp_path / "writable" / "ck", tmp_path / "e.safetensors")
        assert out.splitlines()[-1] == "the model loaded", out
    finally:
        os.chmod(read_only, 0o755)


def test_cli_checkpoint_dir_holding_a_read_only_checkpoint_file_is_refused_before_the_model_loads(tmp_path):
    """A save refuses to replace a file its user may not write (replace_atomically): a --checkpoint-dir
    whose editor.safetensors, best.safetensors or trainer.safetensors was made read-only (chmod a-w,
    to keep it) passed the folder's check, loaded the model and trained --val-every steps, then the
    first checkpoint failed ("Permission denied (a read-only file)") and that training was lost.  It
    is refused before the model loads; a writable file there is not."""
    import os

    from test_editor_save_load import _run_unprivileged

    for name in ("editor.safetensors", "best.safetensors", "trainer.safetensors"):
        ckpt = tmp_path / name.split(".")[0]
        ckpt.mkdir()
        (ckpt / name).write_bytes(b"kept")
        os.chmod(ckpt / name, 0o444)
        out = _run_unprivileged(_TRAIN_TO, ckpt, tmp_path / "e.safetensors").splitlines()
        assert out[-1] == "exit 2" and out[0] == (
            f"dcedit: error: --checkpoint-dir {ckpt}: its {name} is read-only, which its checkpoints may not "
            "replace (they would fail after --val-every steps); make it writable or give another folder"), out
        assert (ckpt / name).read_bytes() == b"kept"
    writable = tmp_path / "writable"
    writable.mkdir()
    (writable / "editor.safetensors").write_bytes(b"old")
    out = _run_unprivileged(_TRAIN_TO, writable, tmp_path / "e.safetensors")
    assert out.splitlines()[-1] == "the model loaded", out


def test_cli_empty_checkpoint_dir_is_refused_before_the_model_loads(capsys, tmp_path, monkeypatch):
    """--checkpoint-dir "" (the current directory, which TrainConfig refuses) passed argparse and
    the folder check, loaded the model and then said "checkpoint_dir must be a path or None, got ''",
    TrainConfig's field name."""
    _no_model(monkeypatch)
    assert cli.main(["train", "--checkpoint-dir", "", "--out", str(tmp_path / "e.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "dcedit: error: --checkpoint-dir: " in err and not PYTHON_TERMS.search(err), err


def test_cli_paths_the_os_refuses_are_one_error_line(capsys, tmp_path, monkeypatch, tiny_model_dir):
    """A name past the file system's limit (ENAMETOOLONG: pathlib raises, where a missing file
    returns False) and an --out the OS refuses although its folder passes os.access (root): one line,
    exit 2 (--out and --data before any work)."""
    long = str(tmp_path / ("a" * 300))
    edit = ["edit", "--method", "ft", "--prompt", "a b", "--target", "c"]
    runs = [edit + ["--out", long + ".json"], ["edit", "--method", "ft", "--data", long + ".json"]]
    if Path("/proc/self").is_dir():
        runs.append(edit + ["--out", "/proc/dcedit_no_such_entry.json"])
    with monkeypatch.context() as patched:
        patched.setattr(cli.commands, "load_any_model", lambda *a, **k: pytest.fail("the model loaded"))
        for argv in runs:
            code = cli.main(argv)
            err = capsys.readouterr().err
            assert code == 2 and "dcedit: error:" in err and "Traceback" not in err, (argv[-1][-40:], err)
    if len(runs) == 3:
        assert "--out /proc/dcedit_no_such_entry.json: cannot be written" in err
    code = cli.main(["edit", "--model", str(tiny_model_dir), "--editor", long + ".safetensors",
                     "--prompt", "a b", "--target", "c"])
    err = capsys.readouterr().err
    assert code == 2 and "dcedit: error:" in err and "File name too long" in err, err


@pytest.mark.parametrize("text, message", [
    ("[" * 100_000 + "]" * 100_000, "cannot read its JSON"),  # RecursionError
    ("[" + "9" * 5000 + "]", "cannot read its JSON"),  # past sys.get_int_max_str_digits()
], ids=["deep", "long_int"])
def test_cli_data_json_python_cannot_read_is_one_error_line(text, message, capsys, tmp_path, monkeypatch):
    _no_model(monkeypatch)
    path = tmp_path / "odd.json"
    path.write_text(text)
    assert cli.main(["edit", "--method", "ft", "--data", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"dcedit: error: --data: {path}: {message}" in err and "Traceback" not in err


def test_cli_data_that_is_a_folder_says_so(capsys, tmp_path, monkeypatch):
    _no_model(monkeypatch)
    assert cli.main(["edit", "--method", "ft", "--data", str(tmp_path)]) == 2
    assert f"--data: {tmp_path} is a folder: give a JSON file" in capsys.readouterr().err


def test_cli_data_set_name_is_not_hidden_by_a_folder_of_that_name(capsys, tmp_path, monkeypatch):
    """A folder named like a data set in the working folder (an --out folder named after it) made
    `--data counterfact-val` read the folder ("is a folder: give a JSON file"), where only a file of
    that name is read in the data set's place."""
    _counterfact_file(tmp_path / "counterfact-val.json", n=4)
    monkeypatch.setenv("DCEDIT_DATA_DIR", str(tmp_path))
    (tmp_path / "here" / "counterfact-val").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "here")
    assert len(cli.load_requests("counterfact-val")) == 4

    def data_loaded(*args, **kwargs):
        raise cli.UserError("the data loaded")
    monkeypatch.setattr(cli.commands, "load_any_model", data_loaded)
    assert cli.main(["edit", "--method", "ft", "--data", "counterfact-val",
                     "--out", "counterfact-val/edit.json"]) == 2
    assert "dcedit: error: the data loaded" in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--data", "--val-data"])
def test_cli_out_that_is_a_home_relative_data_file_is_refused(flag, capsys, tmp_path, monkeypatch):
    """--data "~/cf.json" (quoted, so the shell leaves the ~) is read from the home folder, but the
    check that --out is no input file compared the unexpanded path: --out ~/cf.json passed it, and
    the run would have written its record over the data."""
    _no_model(monkeypatch)
    monkeypatch.setenv("HOME", str(tmp_path))
    data = _counterfact_file(tmp_path / "cf.json")
    args = {"--data": ["edit", "--method", "ft", "--data", "~/cf.json"],
            "--val-data": ["train", "--data", str(_counterfact_file(tmp_path / "train.json")),
                           "--val-data", "~/cf.json"]}[flag]
    assert cli.main(args + ["--out", str(data)]) == 2
    assert f"dcedit: error: --out {data} is the {flag} file" in capsys.readouterr().err


def test_cli_val_data_errors_name_val_data(capsys, tmp_path, monkeypatch):
    _no_model(monkeypatch)
    data = _counterfact_file(tmp_path / "cf.json")
    (tmp_path / "empty.json").write_text("")
    assert cli.main(["train", "--data", str(data), "--val-data", str(tmp_path / "empty.json"),
                     "--out", str(tmp_path / "e.safetensors")]) == 2
    assert "dcedit: error: --val-data: " in capsys.readouterr().err
    assert cli.main(["train", "--data", str(data), "--val-data", str(data), "--val-size", "7",
                     "--out", str(tmp_path / "e.safetensors")]) == 2  # once 6 used without a word
    assert "dcedit: error: --val-size asks for 7 edits but --val-data holds 6" in capsys.readouterr().err


def test_cli_val_size_counts_val_data_requests_as_n_edits_counts_data(capsys, tmp_path, monkeypatch):
    """--val-size N validates on the first N edits of --val-data, and the note on blank zsRE records
    names only those among the records read for them, as --n-edits does for --data: `dcedit train
    --val-data zsre-train --val-size 2` said "2 record(s) with a blank prompt or target left out
    (record 534, 723)", records no validation edit comes from."""
    def data_loaded(*args, **kwargs):
        raise cli.UserError("the data loaded")
    monkeypatch.setattr(cli.commands, "load_any_model", data_loaded)
    n = random.randint(6, 12)
    blank = random.randint(2, n - 2)
    records = [dict(src=f"Question {i}?", alt="" if i == blank else f"answer {i}", rephrase=f"Q {i}?",
                    loc=f"nq question: q{i}", loc_ans=f"a{i}", subject=f"s{i}") for i in range(n)]
    zsre = tmp_path / "zsre.json"
    zsre.write_text(json.dumps(records))
    train = str(_counterfact_file(tmp_path / "train.json"))
    note = f"note: {zsre}: 1 record(s) with a blank prompt or target left out (record {blank})"
    for size, noted in ((blank, False), (blank + 1, True), (None, True)):
        argv = ["train", "--data", train, "--val-data", str(zsre), "--out", str(tmp_path / "e.safetensors")]
        assert cli.main(argv + ([] if size is None else ["--val-size", str(size)])) == 2
        err = capsys.readouterr().err
        assert "dcedit: error: the data loaded" in err
        assert (note in err) == noted, (size, err)
    assert cli.main(["train", "--data", train, "--val-data", str(zsre), "--val-size", str(n),
                     "--out", str(tmp_path / "e.safetensors")]) == 2
    assert f"--val-size asks for {n} edits but --val-data holds {n - 1}" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["edit", "train"])
def test_cli_n_edits_past_the_data_is_refused(command, capsys, tmp_path, monkeypatch):
    """`edit --n-edits 100` on a file of 6 edited 6 without a word (evaluate refused)."""
    _no_model(monkeypatch)
    data = _counterfact_file(tmp_path / "cf.json", n=6)
    out = tmp_path / ("e.safetensors" if command == "train" else "e.json")
    assert cli.main([command, "--method", "mend" if command == "train" else "ft", "--data", str(data),
                     "--n-edits", "100", "--out", str(out)]) == 2
    assert "dcedit: error: --n-edits asks for 100 edits but --data holds 6" in capsys.readouterr().err


def test_cli_zsre_limit_counts_requests_not_records(tmp_path, capsys):
    """A blank record among the first N gave N - 1 edits for --n-edits N; the note lists only the
    blank records among those read."""
    records = [dict(src=f"Question {i}?", alt="" if i in (1, 4) else f"answer {i}", rephrase=f"Q {i}?",
                    loc=f"nq question: q{i}", loc_ans=f"a{i}", subject=f"s{i}") for i in range(8)]
    path = tmp_path / "zsre.json"
    path.write_text(json.dumps(records))
    got = cli.load_requests(str(path), 3)
    assert [r.prompt for r in got] == ["Question 0?", "Question 2?", "Question 3?"]
    assert "1 record(s) with a blank prompt or target left out (record 1)" in capsys.readouterr().err
    assert len(cli.load_requests(str(path), 6)) == 6 and len(cli.load_requests(str(path))) == 6
    assert "(record 1, 4)" in capsys.readouterr().err
    # Ten blank records are all named: no ", ..." (that is for more than ten).
    path.write_text(json.dumps([dict(records[0], alt="")] * 10 + records[:1]))
    assert len(cli.load_requests(str(path))) == 1
    assert "10 record(s) with a blank prompt or target left out (record 0, 1, 2, 3, 4, 5, 6, 7, 8, 9)\n" \
        in capsys.readouterr().err
    # A blank record after the last request used is not named, as record 4 is for --n-edits 3 above,
    # also where no request follows it (the file holds exactly 5 requests: it was "(record 1, 4, 7)").
    records[7]["alt"] = ""
    path.write_text(json.dumps(records))
    assert len(cli.load_requests(str(path), 5)) == 5
    assert "(record 1, 4)\n" in capsys.readouterr().err


def test_cli_os_error_naming_no_file_keeps_its_traceback(capsys, monkeypatch):
    """Only an OSError about a path becomes one error line: one that names no file (from deep in a
    run: a socket, a device) propagates, so its traceback says where it came from."""
    def fail(args):
        raise OSError(28, "No space left on device")
    monkeypatch.setitem(cli.COMMANDS, "edit", fail)
    with pytest.raises(OSError, match="No space left"):
        cli.main(["edit", "--method", "ft", "--prompt", "a b", "--target", "c"])
    def fail_on_a_file(args):
        raise OSError(28, "No space left on device", "/somewhere/editor.safetensors")
    monkeypatch.setitem(cli.COMMANDS, "edit", fail_on_a_file)
    assert cli.main(["edit", "--method", "ft", "--prompt", "a b", "--target", "c"]) == 2
    assert "dcedit: error: [Errno 28] No space left on device: '/somewhere/editor.safetensors'" in capsys.readouterr().err


def test_cli_train_process_told_another_failed_prints_one_line(capsys, tmp_path, monkeypatch):
    """Under torchrun the process that failed prints its own error; the others printed a traceback
    of the collective they heard it in.  Now one line naming the failed rank, exit 2."""
    from dcedit_kernels import distributed

    def peer_failed(*args):
        raise distributed.PeerFailure("another process failed in a training step (rank 1: OSError: disk)")
    monkeypatch.setattr(cli.commands, "_train", peer_failed)
    data = _counterfact_file(tmp_path / "cf.json", n=4)
    assert cli.main(["train", "--method", "mend", "--data", str(data), "--out", str(tmp_path / "e.safetensors")]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "dcedit: error: another process failed in a training step (rank 1: OSError: disk)", err


@pytest.mark.parametrize("env, message", [
    ({"WORLD_SIZE": "abc"}, "WORLD_SIZE must be an int, got 'abc'"),
    ({"WORLD_SIZE": "2", "RANK": "0"}, "WORLD_SIZE=2 but MASTER_ADDR, MASTER_PORT not set: run under torchrun"),
], ids=["not_an_int", "half_of_torchrun"])
def test_cli_train_with_torchrun_variables_set_by_hand_is_one_error_line(env, message, capsys, tmp_path, monkeypatch):
    """WORLD_SIZE that is not an int raised int()'s ValueError, and WORLD_SIZE > 1 without the
    rendezvous variables init_process_group's, each as a traceback: one line naming them."""
    _no_model(monkeypatch)
    for name in ("WORLD_SIZE", "RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    data = _counterfact_file(tmp_path / "cf.json", n=4)
    assert cli.main(["train", "--method", "mend", "--data", str(data), "--out", str(tmp_path / "e.safetensors")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"dcedit: error: {message}") and err.count("\n") == 1, err


# ---------------------------------------------------------------------------------------------
# Found by a user trial of the CLI (SmolLM2, CounterFact and zsRE from the command line only)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["ft", "ft_kl"])
def test_cli_loss_reduction_for_the_ft_baselines_is_refused(method, capsys, tiny_model_dir):
    """The FT baselines fine-tune on the batch mean whatever --loss-reduction says: `edit --method
    ft_kl --loss-reduction edit` ran FT+KL's own loss without a word, as --n-editors and --rank,
    which the CLI refuses for the methods that have none, would otherwise be."""
    code = cli.main(["edit", "--model", str(tiny_model_dir), "--method", method,
                     "--loss-reduction", "edit", "--prompt", "The sky is", "--target", "green"])
    assert code == 2
    err = capsys.readouterr().err
    assert "dcedit: error: --loss-reduction applies to the editor methods" in err


@pytest.mark.parametrize("command", ["train", "edit", "evaluate"])
def test_cli_out_that_is_a_file_of_the_model_is_refused(command, capsys, tmp_path, monkeypatch):
    """A README user trial: `dcedit train --model M --out M/model.safetensors` trained for 100 steps,
    then wrote the editor over the model's weights; --out checked the --editor and data files only.
    A file of the --model folder (or the --model file itself, a .gguf) is refused before any work;
    a new file in that folder is not (it overwrites nothing)."""
    _no_model(monkeypatch)
    folder = tmp_path / "model"
    folder.mkdir()
    weights, gguf = folder / "model.safetensors", tmp_path / "m.gguf"
    for path in (weights, gguf, folder / "config.json"):
        path.write_bytes(b"the model")
    extra = ["--method", "ft", "--n-edits", "2"] if command == "evaluate" else []
    for model, out, said in ((folder, weights, "a file of the --model folder"),
                             (folder, folder / "config.json", "a file of the --model folder"),
                             (folder, tmp_path / "." / "model" / "model.safetensors", "a file of the --model folder"),
                             (gguf, gguf, "the --model file")):
        assert cli.main([command, "--model", str(model), *extra, "--out", str(out)]) == 2
        assert f"--out {out} is {said}: the run would write over it" in capsys.readouterr().err
    assert all(p.read_bytes() == b"the model" for p in (weights, gguf, folder / "config.json"))
    monkeypatch.setattr(cli.commands, "load_any_model", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    # A new file there, or an existing file beside a .gguf: past the check (the model's load is next).
    for model, out in ((folder, folder / "new.json"), (gguf, tmp_path / "other.json")):
        if out.name == "other.json":
            out.write_text("{}")
        assert cli.main([command, "--model", str(model), *extra, "--out", str(out)]) == 130
        assert "would write over it" not in capsys.readouterr().err


def test_cli_path_flags_expand_a_quoted_home(capsys, tmp_path, monkeypatch):
    """A quoted "~/..." reaches the CLI as it is: --model and --data expanded it (their loaders do),
    but --out "~/sub/e.safetensors" made a folder named "~" in the working folder (a data-loader
    fuzz's find) and --editor "~/e.safetensors" was "file not found". Every path flag expands it."""
    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    (home / "e.safetensors").write_bytes(b"an editor")
    monkeypatch.setattr(cli.commands, "load_any_model", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    checked = []  # (check_out makes no folder: the run stopped before the save leaves none to see)
    monkeypatch.setattr(cli, "check_out", lambda out, check=cli.check_out: (checked.append(out), check(out)))
    assert cli.main(["train", "--out", "~/sub/e.safetensors", "--checkpoint-dir", "~/ck"]) == 130  # at the model's load
    assert checked == [str(home / "sub" / "e.safetensors")] and not (work / "~").exists()
    assert cli.main(["edit", "--editor", "~/e.safetensors", "--prompt", "a b", "--target", "c"]) == 130
    assert "not found" not in capsys.readouterr().err


def test_cli_out_that_is_the_checkpoint_trainer_file_is_refused(capsys, tmp_path, monkeypatch):
    """`dcedit train --checkpoint-dir C --out C/trainer.safetensors` saved the editor over the file a
    resume reads: the next run with more --steps was refused ("not a `dcedit train` checkpoint").
    Refused before any work, whether that file exists yet or not; another name in C is not."""
    _no_model(monkeypatch)
    data, ckpt = _counterfact_file(tmp_path / "cf.json"), tmp_path / "ck"
    for out in (ckpt / "trainer.safetensors", tmp_path / "." / "ck" / "trainer.safetensors"):
        assert cli.main(["train", "--data", str(data), "--checkpoint-dir", str(ckpt), "--out", str(out)]) == 2
        assert f"--out {out} is --checkpoint-dir's trainer.safetensors, which a resume reads" in capsys.readouterr().err
        ckpt.mkdir(exist_ok=True)
        (ckpt / "trainer.safetensors").write_bytes(b"a checkpoint")
    assert (ckpt / "trainer.safetensors").read_bytes() == b"a checkpoint"
    monkeypatch.setattr(cli.commands, "load_any_model", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    assert cli.main(["train", "--data", str(data), "--checkpoint-dir", str(ckpt),
                     "--out", str(ckpt / "editor.safetensors")]) == 130  # past the check: the model's load is next
    assert "which a resume reads" not in capsys.readouterr().err


@pytest.mark.parametrize("command, flag", [("edit", "--editor"), ("evaluate", "--data"),
                                           ("train", "--data"), ("train", "--val-data")])
def test_cli_out_that_is_an_input_file_is_refused(command, flag, capsys, tmp_path, monkeypatch):
    """`dcedit edit --editor E --out E` wrote its JSON record over the trained editor E (the next
    run: "E is not a safetensors file"); an --out that is an input is refused before any work."""
    _no_model(monkeypatch)
    files = {"--data": _counterfact_file(tmp_path / "cf.json", n=6),
             "--val-data": _counterfact_file(tmp_path / "val.json", n=4),
             "--editor": tmp_path / "editor.safetensors"}
    files["--editor"].write_bytes(b"an editor")
    args = {"edit": ["--editor", str(files["--editor"]), "--data", str(files["--data"])],
            "evaluate": ["--method", "ft", "--data", str(files["--data"]), "--n-edits", "2"],
            "train": ["--data", str(files["--data"]), "--val-data", str(files["--val-data"])]}
    out = files[flag]
    before = out.read_bytes()
    # The same file by another name: a path with "..", as a shell's completion can give.
    other_name = tmp_path / ".." / tmp_path.name / out.name
    assert cli.main([command, *args[command], "--out", str(other_name)]) == 2
    assert f"is the {flag} file: the run would write over it" in capsys.readouterr().err
    assert out.read_bytes() == before
    if flag == "--data":  # named as a data set: counterfact-val in $DCEDIT_DATA_DIR
        monkeypatch.setenv("DCEDIT_DATA_DIR", str(tmp_path))
        named = tmp_path / "counterfact-val.json"
        named.write_bytes(before)
        named_args = [a if a != str(files["--data"]) else "counterfact-val" for a in args[command]]
        assert cli.main([command, *named_args, "--out", str(named)]) == 2
        assert "is the --data file: the run would write over it" in capsys.readouterr().err
        assert named.read_bytes() == before


def test_cli_editor_that_is_no_file_is_refused_before_the_model_loads(capsys, tmp_path,
                                                                       monkeypatch):
    """A mistyped --editor was found only after the model had loaded (minutes for a large one),
    where a missing --data or an unwritable --out is refused before any work."""
    _no_model(monkeypatch)
    missing = tmp_path / "no.safetensors"
    for command in ("edit", "evaluate"):
        assert cli.main([command, "--editor", str(missing), "--data", "cf.json"]) == 2
        assert f"dcedit: error: --editor: file not found: {missing}" in capsys.readouterr().err
    # A folder is no editor file either (ModelEditor.load would meet it after the model loaded).
    for command in ("edit", "evaluate"):
        assert cli.main([command, "--editor", str(tmp_path), "--data", "cf.json"]) == 2
        assert f"dcedit: error: --editor: file not found: {tmp_path}" in capsys.readouterr().err


def test_cli_tied_layer_is_refused_without_python_advice(capsys, tmp_path):
    """A tied LM head in --layers (SmolLM2's lm_head) got ModelEditor's "Pass allow_tied=True to
    edit it anyway", which no flag passes."""
    import transformers

    model, tok = tiny_model("llama", seed=0)
    config = dict(model.config.to_dict(), tie_word_embeddings=True)  # lm_head is embed_tokens'
    tied = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config))
    tied.save_pretrained(tmp_path / "tied")
    tok.save_pretrained(tmp_path / "tied")
    code = cli.main(["edit", "--model", str(tmp_path / "tied"), "--method", "ft",
                     "--layers", "lm_head", "--prompt", "The sky is", "--target", "green"])
    err = capsys.readouterr().err
    assert code == 2
    assert "dcedit: error: --layers: 'lm_head' shares its weight with model.embed_tokens" in err
    assert "allow_tied=True to edit" not in err


def test_cli_evaluate_default_sizes_past_the_data_say_they_are_the_default(capsys, tmp_path,
                                                                           monkeypatch):
    """`dcedit evaluate --data small.json` without --n-edits said "--n-edits asks for 125 edits",
    a flag the user never gave."""
    _no_model(monkeypatch)
    data = _counterfact_file(tmp_path / "cf.json", n=6)
    assert cli.main(["evaluate", "--method", "ft", "--data", str(data)]) == 2
    assert ("dcedit: error: --n-edits (default 25,75,125; give smaller ones) asks for 125 edits "
            "but --data holds 6") in capsys.readouterr().err


def test_cli_train_interrupted_says_how_to_resume(capsys, tmp_path, monkeypatch, tiny_model_dir):
    """A Ctrl-C of `dcedit train` ended in a traceback into train.py's loop; it is one line saying
    how to resume, exit status 130, and the same command then resumes and finishes."""
    import dcedit_kernels.train as train

    data = _counterfact_file(tmp_path / "cf.json", n=8)
    args = ["train", "--model", str(tiny_model_dir), "--data", str(data), "--steps", "3",
            "--batch-size", "2", "--rank", "4", "--val-every", "1",
            "--checkpoint-dir", str(tmp_path / "ck"), "--out", str(tmp_path / "mend.safetensors")]
    step = train._optimizer_step

    def interrupted_at_once(*a, **k):
        raise KeyboardInterrupt

    # Interrupted before anything could be resumed: the line says so, not "run it again".
    monkeypatch.setattr(train, "_optimizer_step", interrupted_at_once)
    at = args.index("--checkpoint-dir")
    without_checkpoints = args[:at] + args[at + 2:]  # the flag and its folder
    at = without_checkpoints.index("--val-every")  # alone, it is refused
    without_checkpoints = without_checkpoints[:at] + without_checkpoints[at + 2:]
    for more, said in (([], "nothing was saved (with --checkpoint-dir a run can be resumed)"),
                       (["--checkpoint-dir", str(tmp_path / "ck0")],
                        f"no checkpoint in {tmp_path / 'ck0'} yet (one is written every --val-every steps)")):
        assert cli.main(without_checkpoints + more) == 130
        assert f"dcedit: interrupted: {said}\n" in capsys.readouterr().err
    calls = []

    def interrupted_at_the_second_step(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return step(*a, **k)

    monkeypatch.setattr(train, "_optimizer_step", interrupted_at_the_second_step)
    try:
        code = cli.main(args)
    except KeyboardInterrupt:  # uncaught, it would stop pytest itself
        pytest.fail("KeyboardInterrupt left main()")
    assert code == 130
    err = capsys.readouterr().err
    assert ("dcedit: interrupted: run the same command again to resume from the last checkpoint "
            f"in {tmp_path / 'ck'}") in err
    assert "Traceback" not in err
    resumed = []
    counted = lambda *a, **k: resumed.append(1) or step(*a, **k)  # noqa: E731
    monkeypatch.setattr(train, "_optimizer_step", counted)
    assert cli.main(args) == 0
    assert "(MEND, 3 steps, " in capsys.readouterr().out
    assert len(resumed) == 2  # steps 2 and 3: step 1 came from the checkpoint


@pytest.mark.parametrize("command", ["edit", "evaluate"])
def test_cli_edit_or_evaluate_interrupted_is_one_line(command, capsys, monkeypatch):
    """A Ctrl-C of `dcedit edit` or `evaluate` is one line and exit status 130, with nothing of
    resuming: only train writes checkpoints, and only train's flags hold --checkpoint-dir."""
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setitem(cli.COMMANDS, command, interrupted)
    assert cli.main([command]) == 130
    assert capsys.readouterr().err == "dcedit: interrupted\n"


@pytest.mark.parametrize("command", ["edit", "evaluate"])
def test_cli_edit_that_overflows_float16_is_one_error_line(command, capsys, tmp_path, tiny_model_dir):
    """`edit`/`evaluate --dtype float16` with an editor whose shift passes fp16's 65504: apply's
    FloatingPointError (the model restored) ended main() in a traceback; it is one line, exit status
    2, naming the flags with the range.  The same editor under --dtype bfloat16 edits."""
    from dcedit_kernels import ModelEditor

    model, tok = tiny_model("llama", seed=0)
    me = ModelEditor(model, tok, ["model.layers.1.mlp.down_proj"], method="mend", rank=4)
    with torch.no_grad():
        for editor in me.editors.values():
            editor.alpha.fill_(-1e9)  # an initial MEND's shift is α times the gradient: far past fp16's range
    me.save(tmp_path / "big.safetensors")
    data = _counterfact_file(tmp_path / "cf.json")
    args = [command, "--model", str(tiny_model_dir), "--editor", str(tmp_path / "big.safetensors"),
            "--data", str(data), "--n-edits", "2"] + (["--repeats", "1"] if command == "evaluate" else [])
    assert cli.main(args + ["--dtype", "float16"]) == 2
    line = _one_cli_line(capsys)
    assert line.startswith("dcedit: error: layer 'model.layers.1.mlp.down_proj': the shifted weight is not "
                           "finite in torch.float16 (an overflow)"), line
    assert line.endswith("(the model is unchanged); --dtype float16 overflows above 65504: --dtype bfloat16 "
                         "or float32 has the range"), line
    assert cli.main(args + ["--dtype", "bfloat16"]) == 0


def test_cli_train_whose_validation_edit_overflows_float16_is_one_error_line(capsys, tmp_path, tiny_model_dir):
    """`dcedit train --dtype float16 --lr-lr 1e6`: the first step's α is past fp16's range, and the
    validation edit's FloatingPointError (the model restored) ended main() in a traceback through the
    training loop (a dtype sweep's find, for edit/evaluate above); it is one line, exit status 2."""
    data = _counterfact_file(tmp_path / "cf.json")
    args = ["train", "--model", str(tiny_model_dir), "--method", "mend", "--rank", "3", "--data", str(data),
            "--val-data", str(data), "--val-every", "1", "--steps", "2", "--batch-size", "2", "--dtype", "float16",
            "--out", str(tmp_path / "e.safetensors")]
    assert cli.main(args + ["--lr-lr", "1e6"]) == 2
    line = _one_cli_line(capsys)
    assert line.startswith("dcedit: error: training stopped: layer 'model.layers."), line
    assert "the shifted weight is not finite in torch.float16 (an overflow)" in line, line
    assert line.endswith("--dtype bfloat16 or float32 has the range"), line
    assert not (tmp_path / "e.safetensors").exists()


def test_cli_train_batch_larger_than_the_data_is_a_note_in_the_cli_terms(capsys, tmp_path,
                                                                         tiny_model_dir):
    """The default --batch-size 25 on a small --n-edits gave fit's UserWarning, in Python's terms
    ("batch_size", "requests") under a source line of model_editor.py."""
    import warnings

    data = _counterfact_file(tmp_path / "cf.json", n=8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert cli.main(["train", "--model", str(tiny_model_dir), "--data", str(data),
                         "--n-edits", "3", "--steps", "1", "--rank", "4",
                         "--out", str(tmp_path / "e.safetensors")]) == 0
    assert not [w for w in caught if "batch_size 25 is larger" in str(w.message)]
    assert ("dcedit: note: --batch-size 25 is more than the 3 training edits: every batch is all 3 "
            "of them") in capsys.readouterr().err
    # A batch of all the edits, no more: nothing to note.
    assert cli.main(["train", "--model", str(tiny_model_dir), "--data", str(data), "--n-edits", "3",
                     "--batch-size", "3", "--steps", "1", "--rank", "4",
                     "--out", str(tmp_path / "e.safetensors")]) == 0
    assert "--batch-size" not in capsys.readouterr().err


def test_cli_train_resumed_with_fewer_steps_says_the_editor_is_the_checkpoints(capsys, tmp_path,
                                                                              tiny_model_dir):
    """A --checkpoint-dir run resumed with a smaller --steps trains no further and saves the
    checkpoint's editor: the line said "(MEND, 2 steps, ...)" for --steps 1 without a word why.
    And a one-step run's line said "1 steps"."""
    data = _counterfact_file(tmp_path / "cf.json", n=6)
    args = ["train", "--model", str(tiny_model_dir), "--data", str(data), "--batch-size", "2",
            "--rank", "4", "--val-every", "1", "--checkpoint-dir", str(tmp_path / "ck"),
            "--out", str(tmp_path / "mend.safetensors")]
    assert cli.main(args + ["--steps", "2"]) == 0
    assert "(MEND, 2 steps, " in capsys.readouterr().out
    with warnings.catch_warnings(record=True) as shown:  # what main() shows besides its own lines
        warnings.simplefilter("always")
        assert cli.main(args + ["--steps", "1"]) == 0
    out = capsys.readouterr().out
    assert "(MEND, 2 steps, " in out
    assert ("--checkpoint-dir's run had already trained 2 steps, more than --steps 1: the editor "
            "saved is its, trained no further") in out
    # fit's UserWarning says the same in Python's terms (steps=1): said once, in the CLI's.
    assert not [w for w in shown if "already trained" in str(w.message)]
    one_step = args[:-6] + ["--steps", "1", "--out", str(tmp_path / "one.safetensors")]  # no --val-every either
    assert cli.main(one_step) == 0
    assert "(MEND, 1 step, " in capsys.readouterr().out


def test_cli_rounding_warning_is_in_the_cli_terms(capsys, tiny_model_dir):
    """`edit --dtype bfloat16` whose shift mostly rounds away: apply's UserWarning came under a
    source line of evaluate.py and told the user to read `handle.stats['changed_fraction']` and to
    "edit a float32 copy of the model", neither of which a command-line user can do."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert cli.main(["edit", "--model", str(tiny_model_dir), "--method", "mend", "--rank", "4",
                         "--dtype", "bfloat16", "--prompt", "The sky is", "--target", " green"]) == 0
    err = capsys.readouterr().err
    assert not [w for w in caught if "lost to rounding" in str(w.message)]
    assert "dcedit: warning: most entries of the shift of " in err
    assert "--dtype float32 keeps the whole shift" in err
    assert "handle.stats" not in err and "evaluate.py" not in err


def test_cli_passes_the_warnings_it_does_not_reword_on(capsys, monkeypatch):
    """While a command runs, a warning the command line does not word itself (all but apply's
    rounding warning) reaches the caller's warnings.showwarning as it was raised."""
    import warnings

    def command(args):
        warnings.warn("some other warning", UserWarning)
        return {}

    monkeypatch.setitem(cli.COMMANDS, "edit", command)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert cli.main(["edit"]) == 0
    assert [(str(w.message), w.category) for w in caught] == [("some other warning", UserWarning)]
    assert "dcedit: warning" not in capsys.readouterr().err


@pytest.mark.parametrize("flags, named", [(["--method", "ft"], "not --method ft"),
                                          ([], "not --method ft"),
                                          (["--method", "ft_kl"], "not --method ft_kl"),
                                          (["--editor", "E"], "the editor of --editor")])
def test_cli_edit_refuses_a_seed_it_would_not_use(capsys, tmp_path, flags, named):
    """`edit --seed` seeds only a new editor's initial weights: with --editor or fine-tuning it was
    ignored without a word.  Refused before the model loads (the --model here does not exist)."""
    if flags[:1] == ["--editor"]:
        (tmp_path / "E").write_bytes(b"")
        flags = ["--editor", str(tmp_path / "E")]
    code = cli.main(["edit", "--model", str(tmp_path / "no_model"), "--seed", "3", "--prompt", "a b",
                     "--target", "c"] + flags)
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("dcedit: error: --seed goes with") and named in err


def test_cli_edit_seed_of_a_new_editor_is_taken(capsys, tiny_model_dir):
    """With a new editor --seed picks its initial weights: accepted."""
    assert cli.main(["edit", "--model", str(tiny_model_dir), "--method", "mend", "--rank", "4",
                     "--seed", "1", "--prompt", "The sky is", "--target", " green"]) == 0
    assert "error" not in capsys.readouterr().err


def test_cli_gguf_model_without_the_gguf_package_is_one_error_line(capsys, tmp_path, monkeypatch):
    """Without the gguf package (not a core dependency: the `models` extra), `dcedit edit` on a
    .gguf model ended in a 30-line traceback from transformers' config parsing, which asked for
    gguf>=0.10.0 (0.10 fails: pyproject)."""
    import sys

    monkeypatch.setitem(sys.modules, "gguf", None)  # `import gguf` raises ImportError
    model = tmp_path / "m.gguf"
    model.write_bytes(b"")
    assert cli.main(["edit", "--model", str(model), "--method", "ft", "--prompt", "a b", "--target", "c"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dcedit: error: --model: reading m.gguf needs the packages gguf (gguf>=0.11, "
                          "accelerate): pip install 'dcedit_kernels[models]'")
    assert "Traceback" not in err


# ---------------------------------------------------------------------------------------------
# Library messages that named Python fields on the command line (resume, rescale, torchrun)
# ---------------------------------------------------------------------------------------------
# What a command-line user never typed: TrainConfig / ModelEditor fields and Python calls.
PYTHON_TERMS = re.compile(r"checkpoint_dir|resume=|(?<!-)\blr\b|lr_lr|batch_size|locality_rows|val_size|"
                          r"train_requests|val_requests|loss_reduction|n_editors|rescale_batch_size|"
                          r"ModelEditor|train_editor|TrainConfig|device '")


def _one_cli_line(capsys) -> str:
    err = capsys.readouterr().err  # beside transformers' progress bars of the model's load
    lines = [line for line in err.splitlines() if line.startswith("dcedit: error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert not PYTHON_TERMS.search(lines[0]), lines[0]
    return lines[0]


def test_cli_train_resumed_with_other_flags_names_the_flags(capsys, tmp_path, tiny_model_dir):
    """A --checkpoint-dir run resumed with other flags was refused in TrainConfig's and
    ModelEditor's terms ("lr 0.001 -> 0.002", "loss_reduction='token'", "n_editors: saved 2"),
    advising "use another checkpoint_dir, or resume=False" and then "(here: give another
    --checkpoint-dir, ...)"."""
    data = _counterfact_file(tmp_path / "cf.json", n=6)
    other = _counterfact_file(tmp_path / "cf7.json", n=7)
    args = ["train", "--model", str(tiny_model_dir), "--data", str(data), "--batch-size", "2", "--rank", "4",
            "--steps", "1", "--checkpoint-dir", str(tmp_path / "ck"), "--out", str(tmp_path / "e.safetensors")]
    assert cli.main(args) == 0
    capsys.readouterr()
    for extra, said in ((["--lr", "0.002", "--locality-rows", "own", "--seed", "3"],
                         "(--locality-rows all -> own, --lr 0.001 -> 0.002, --seed 0 -> 3)"),
                        (["--batch-size", "3", "--lr-lr", "0.5"], "(--batch-size 2 -> 3, --lr-lr 0.0001 -> 0.5)"),
                        (["--data", str(other)], "(--data / --n-edits: other training edits)"),
                        (["--val-data", str(data)], "(--val-data / --val-size: other validation edits)"),
                        (["--loss-reduction", "edit"], "was trained with --loss-reduction token, not edit"),
                        (["--rank", "8"], "(--method mend --layers model.layers.0.mlp.down_proj,"
                                          "model.layers.1.mlp.down_proj --rank 4)"),
                        # another method: no editor differences to list, so the flags end at --layers
                        (["--method", "proeditor"], "(--method mend --layers model.layers.0.mlp.down_proj,"
                                                    "model.layers.1.mlp.down_proj): give that run's flags")):
        assert cli.main(args + extra) == 2, extra
        err = _one_cli_line(capsys)
        assert f"dcedit: error: --checkpoint-dir: {tmp_path / 'ck' / 'trainer.safetensors'} " in err
        assert said in err, err
        assert "give that run's flags to resume it, or another --checkpoint-dir (or empty it) to start over" in err
    moe = ["--method", "moeditor", "--checkpoint-dir", str(tmp_path / "moe")]
    assert cli.main(args + moe + ["--n-editors", "2"]) == 0
    capsys.readouterr()
    assert cli.main(args + moe + ["--n-editors", "3"]) == 2
    assert "--n-editors 2)" in _one_cli_line(capsys)


def test_cli_train_resume_refusal_says_a_flag_once_and_unset_as_unset(capsys, tmp_path, tiny_model_dir):
    """The refusal's editor differences come one per editor shape ("editor 64x32 rank: saved 4,
    here 8; editor 32x64 rank: ..."): a flag is said once; a setting the first run left at None is
    "unset", not Python's None."""
    data = _counterfact_file(tmp_path / "cf.json", n=6)
    args = ["train", "--model", str(tiny_model_dir), "--data", str(data), "--val-data", str(data),
            "--layers", "model.layers.1.mlp.up_proj,model.layers.1.mlp.down_proj",  # two shapes: two editors
            "--batch-size", "2", "--rank", "4", "--steps", "1", "--checkpoint-dir", str(tmp_path / "ck"),
            "--out", str(tmp_path / "e.safetensors")]
    assert cli.main(args) == 0
    capsys.readouterr()
    assert cli.main(args + ["--rank", "8"]) == 2
    err = _one_cli_line(capsys)
    assert "model.layers.1.mlp.down_proj --rank 4): give that run's flags" in err and err.count("--rank") == 1, err
    assert cli.main(args + ["--val-size", "6"]) == 2
    assert "(--val-size unset -> 6)" in _one_cli_line(capsys)


def test_cli_train_resume_from_a_broken_checkpoint_names_the_flag(capsys, tmp_path, tiny_model_dir):
    """A trainer.safetensors that is not one said "use another checkpoint_dir, or resume=False"."""
    broken = tmp_path / "ck" / "trainer.safetensors"
    broken.parent.mkdir()
    broken.write_text("not safetensors")
    data = _counterfact_file(tmp_path / "cf.json", n=4)
    assert cli.main(["train", "--model", str(tiny_model_dir), "--data", str(data), "--rank", "4", "--steps", "1",
                     "--checkpoint-dir", str(tmp_path / "ck"), "--out", str(tmp_path / "e.safetensors")]) == 2
    err = _one_cli_line(capsys)
    assert f"dcedit: error: --checkpoint-dir: {broken} is not a `dcedit train` checkpoint (not a readable" in err
    assert err.endswith("give another --checkpoint-dir, or empty it, to start over")


@pytest.mark.parametrize("flags, said", [
    (["--method", "ft"], "not --method ft"),
    (["--method", "ft_kl"], "not --method ft_kl"),
    (["--method", "mend", "--rank", "4", "--loss-reduction", "edit"], "not --loss-reduction edit"),
], ids=["ft", "ft_kl", "mend_edit"])
@pytest.mark.parametrize("command", ["edit", "evaluate"])
def test_cli_rescale_refusal_names_the_flags(command, flags, said, capsys, tmp_path, tiny_model_dir):
    """--rescale-batch-size where it does not apply was refused as "rescale_batch_size is for the
    editor methods under loss_reduction='token', got method='ft', ..."."""
    data = _counterfact_file(tmp_path / "cf.json", n=4)
    what = (["--prompt", "The sky is", "--target", "green"] if command == "edit"
            else ["--data", str(data), "--n-edits", "2", "--repeats", "1"])
    assert cli.main([command, "--model", str(tiny_model_dir), "--rescale-batch-size", "2"] + flags + what) == 2
    err = _one_cli_line(capsys)
    assert "dcedit: error: --rescale-batch-size applies to the editor methods" in err
    assert "under --loss-reduction token" in err and said in err


def test_cli_rescale_of_a_saved_editor_names_the_flags(capsys, tmp_path, tiny_model_dir):
    data = _counterfact_file(tmp_path / "cf.json", n=4)
    editor = tmp_path / "e.safetensors"
    assert cli.main(["train", "--model", str(tiny_model_dir), "--data", str(data), "--rank", "4", "--steps", "1",
                     "--loss-reduction", "edit", "--out", str(editor)]) == 0
    capsys.readouterr()
    assert cli.main(["edit", "--model", str(tiny_model_dir), "--editor", str(editor), "--rescale-batch-size", "2",
                     "--prompt", "The sky is", "--target", "green"]) == 2
    err = _one_cli_line(capsys)
    assert (f"dcedit: error: --rescale-batch-size applies to editors trained under --loss-reduction token; "
            f"the editor in {editor} was trained with --loss-reduction edit") in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cli_train_torchrun_without_the_gpu_names_device_by_its_flag(capsys, tmp_path, monkeypatch):
    """Under torchrun with --device cuda and no GPU of LOCAL_RANK: "device 'cuda': ... (device 'cpu')"."""
    _no_model(monkeypatch)
    for name, value in dict(WORLD_SIZE="2", RANK="0", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                            MASTER_PORT="29500").items():
        monkeypatch.setenv(name, value)
    data = _counterfact_file(tmp_path / "cf.json", n=4)
    assert cli.main(["train", "--data", str(data), "--device", "cuda", "--out", str(tmp_path / "e.safetensors")]) == 2
    err = _one_cli_line(capsys)
    assert err.startswith("dcedit: error: --device cuda: the process of LOCAL_RANK=0 needs CUDA device 0")
    assert err.endswith("or train on the CPU over gloo (--device cpu)")


@pytest.mark.parametrize("message, said", [
    ("the processes would start from different steps [0, 3]: a resume needs the same checkpoint_dir on every "
     "process", "a resume needs the same --checkpoint-dir on every process"),
    ("the processes resumed from different checkpoints (resumed.best_es) at step 3: a resume needs the same "
     "checkpoint_dir on every process", "a resume needs the same --checkpoint-dir on every process"),
    ("the processes were given different training settings (config.lr, train_requests): every process of a "
     "data-parallel run needs the same ModelEditor settings, TrainConfig, requests and checkpoint_dir or none",
     "(--lr, --data / --n-edits: other training edits): every process of a data-parallel `dcedit train` needs "
     "the same flags, --data, --val-data and --checkpoint-dir"),
], ids=["steps", "checkpoints", "settings"])
def test_cli_train_data_parallel_disagreement_names_the_flags(message, said, capsys, tmp_path, monkeypatch,
                                                              tiny_model_dir):
    """distributed.agree_on_start's refusals (torchrun processes given other flags or checkpoint
    folders: needs torchrun, so raised here by hand, with the library's wording)."""
    from dcedit_kernels.model_editor import ModelEditor

    def disagree(*a, **k):
        raise ValueError(message)
    monkeypatch.setattr(ModelEditor, "fit", disagree)
    data = _counterfact_file(tmp_path / "cf.json", n=4)
    assert cli.main(["train", "--model", str(tiny_model_dir), "--data", str(data), "--rank", "4",
                     "--out", str(tmp_path / "e.safetensors")]) == 2
    assert said in _one_cli_line(capsys)


@pytest.mark.parametrize("old", [{"gate_norm": False}, {"top_k": 1}], ids=["gate_norm", "top_k"])
def test_cli_train_resumes_a_moeditor_run_of_an_older_release(old, capsys, monkeypatch, tmp_path, tiny_model_dir):
    """A `dcedit train --method moeditor --checkpoint-dir` run of 0.5.5 (its editors' configs
    without gate_norm: trained on the raw edit features) or of 0.1.x (top_k=1, the default before
    0.2.0) was refused by the current dcedit train, "written for another editor (... gate_norm:
    saved False, here True): give that run's flags to resume it", with no flag that could say so
    (found resuming 0.2.2 and 0.5.5 runs with the current code).  It resumes as the run it was, as
    ModelEditor.load reads such files: the editor equals a run of the same steps straight."""
    import json

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from dcedit_kernels.cli import commands
    from dcedit_kernels.cli.options import editor_kwargs

    data = _counterfact_file(tmp_path / "cf.json", n=6)

    def train(steps, ckpt, out):
        return cli.main(["train", "--model", str(tiny_model_dir), "--data", str(data), "--method", "moeditor",
                         "--n-editors", "2", "--rank", "4", "--batch-size", "3", "--steps", str(steps),
                         "--checkpoint-dir", str(ckpt), "--out", str(out)])

    with monkeypatch.context() as m:  # the MoEditor of the older release
        m.setattr(commands, "editor_kwargs", lambda args: {**editor_kwargs(args), **old})
        assert train(2, tmp_path / "straight", tmp_path / "straight.safetensors") == 0
        assert train(1, tmp_path / "old", tmp_path / "old.safetensors") == 0
    path = tmp_path / "old" / "trainer.safetensors"
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    saved = json.loads(meta["model_editor"])
    del saved["editor_kwargs"][next(iter(old))]  # the release's default, not a flag
    if "gate_norm" in old:  # as 0.5.5 wrote it
        for editor in saved["editors"].values():
            del editor["gate_norm"]
    save_file(load_file(str(path)), str(path), metadata={**meta, "model_editor": json.dumps(saved)})
    capsys.readouterr()
    code, said = train(2, tmp_path / "old", tmp_path / "resumed.safetensors"), capsys.readouterr()
    assert code == 0, said.err.splitlines()[-1]
    assert "(MoEditor, 2 steps, " in said.out
    with safe_open(str(tmp_path / "resumed.safetensors"), framework="pt") as f:
        editors = json.loads(f.metadata()["dcedit_model_editor"])["editors"]
    name, value = next(iter(old.items()))
    assert {e[name] for e in editors.values()} == {value}
    want, got = load_file(str(tmp_path / "straight.safetensors")), load_file(str(tmp_path / "resumed.safetensors"))
    assert got.keys() == want.keys()
    for key in want:
        assert torch.allclose(got[key], want[key], rtol=1e-6, atol=1e-8), key


def test_cli_train_resume_with_another_n_editors_names_n_editors(capsys, tmp_path, tiny_model_dir):
    """A MoEditor run (2 editors, top_k 2) resumed with --n-editors 1: the refusal names n_editors
    (the run's top_k taken from the checkpoint as an explicit top_k=2 made it "top_k (2) cannot
    exceed n_editors (1)", an argument the command line has no flag for)."""
    data = _counterfact_file(tmp_path / "cf.json", n=6)
    args = ["train", "--model", str(tiny_model_dir), "--data", str(data), "--method", "moeditor", "--rank", "4",
            "--batch-size", "3", "--steps", "1", "--checkpoint-dir", str(tmp_path / "ck"),
            "--out", str(tmp_path / "e.safetensors")]
    assert cli.main(args + ["--n-editors", "2"]) == 0
    capsys.readouterr()
    assert cli.main(args + ["--n-editors", "1"]) == 2
    err = capsys.readouterr().err
    assert "written for another editor" in err and "--n-editors 2" in err, err  # in the command line's terms
    assert "cannot exceed" not in err


_BASELINE = object()  # stands for --method ft or ft_kl, drawn per run


def _flags_id(flags) -> str:
    return " ".join("ft|ft_kl" if f is _BASELINE else f.format(n="N") for f in flags)


# The whole line after "dcedit: error: ", as the refusal said it after the model's load ({m}: the
# --method drawn for _BASELINE, {em}: the editor methods).
_ONLY_EDITORS = "applies to the editor methods {em}"
_RESCALE = "--rescale-batch-size " + _ONLY_EDITORS + " under --loss-reduction token, not "


@pytest.mark.parametrize("command, flags, said", [
    pytest.param(command, flags, said, id=f"{command} {_flags_id(flags)}")
    for command in ("edit", "evaluate") for flags, said in (
        (["--method", _BASELINE, "--rank", "{n}"], "--rank " + _ONLY_EDITORS + ", not {m}"),
        (["--rank", "{n}"], "--rank " + _ONLY_EDITORS + ", not ft"),  # no --method, no --editor: FT
        (["--method", _BASELINE, "--n-editors", "{n}"], "--n-editors applies to raeditor and moeditor, not {m}"),
        (["--method", "mend", "--n-editors", "{n}"], "--n-editors applies to raeditor and moeditor, not mend"),
        (["--method", _BASELINE, "--loss-reduction", "edit"], "--loss-reduction " + _ONLY_EDITORS + ", not {m}"),
        (["--method", _BASELINE, "--rescale-batch-size", "{n}"], _RESCALE + "--method {m}"),
        (["--method", "raeditor", "--loss-reduction", "edit", "--rescale-batch-size", "{n}"],
         _RESCALE + "--loss-reduction edit"),
        (["--layers", " , "], "--layers is empty"),
    )
] + [
    pytest.param("train", flags, said, id=f"train {_flags_id(flags)}") for flags, said in (
        (["--method", "mend", "--n-editors", "{n}"], "--n-editors applies to raeditor and moeditor, not mend"),
        (["--method", "proeditor", "--n-editors", "{n}"], "--n-editors applies to raeditor and moeditor, not proeditor"),
        (["--layers", ","], "--layers is empty"),
    )
])
def test_cli_refuses_contradicting_flags_before_the_model_loads(command, flags, said, capsys, tmp_path,
                                                                monkeypatch):
    """Flags that contradict each other whatever the model (options.check_flags) are refused before
    it loads, and before --out's folder is made: `edit --method ft --rank 8` waited for the model's
    load (SmolLM2: 15 s) to be refused, where `--seed` was refused at once.  The same line as
    before, exit status 2."""
    _no_model(monkeypatch)
    method = random.choice(["ft", "ft_kl"])
    flags = [method if f is _BASELINE else f.format(n=random.randint(1, 64)) for f in flags]
    what = {"edit": ["--prompt", "The sky is", "--target", "green"], "train": [],
            "evaluate": ["--n-edits", "2", "--repeats", "1"]}[command]
    out = tmp_path / "sub" / ("e.safetensors" if command == "train" else "run.json")
    assert cli.main([command, *flags, *what, "--out", str(out)]) == 2
    assert _one_cli_line(capsys) == "dcedit: error: " + said.format(m=method, em=cli.EDITOR_METHODS)
    assert not out.parent.exists()


def _tree(folder: Path):
    """Every path under `folder` with its bytes (None for a folder); None when `folder` is missing."""
    if not folder.exists():
        return None
    return sorted((str(p.relative_to(folder)), None if p.is_dir() else p.read_bytes()) for p in folder.rglob("*"))


def _overflowing_editor(path: Path) -> Path:
    """A saved MEND editor whose shift passes fp16's range: `edit --dtype float16` fails in the edit."""
    from dcedit_kernels import ModelEditor

    model, tok = tiny_model("llama", seed=0)
    me = ModelEditor(model, tok, ["model.layers.1.mlp.down_proj"], method="mend", rank=4)
    with torch.no_grad():
        for editor in me.editors.values():
            editor.alpha.fill_(-1e9)
    me.save(path)
    return path


_PROMPT = ["--prompt", "The sky is", "--target", "green"]


@pytest.mark.parametrize("command, flags, said", [
    ("edit", ["--method", "ft", "--seed", "{n}", *_PROMPT], "--seed goes with the editor methods"),  # main's order
    ("edit", ["--prompt", "The sky is"], "--prompt and --target go together"),
    ("edit", ["--data", "{bad}"], "--data: "),
    ("edit", ["--data", "{data}", "--n-edits", "9"], "--n-edits asks for 9 edits but --data holds 6"),
    ("edit", ["--method", "ft", "--rank", "{n}", *_PROMPT], "--rank applies to the editor methods"),  # check_flags
    ("edit", ["--layers", "no.such", *_PROMPT], "--layers"),  # after the model's load
    ("edit", ["--editor", "{big}", "--data", "{data}", "--n-edits", "2", "--dtype", "float16"],
     "layer 'model.layers.1.mlp.down_proj': the shifted weight is not finite"),  # a failed edit
    ("evaluate", ["--data", "{data}", "--n-edits", "9"], "--n-edits asks for 9 edits but --data holds 6"),
    ("evaluate", ["--data", "{data}", "--n-edits", "2", "--repeats", "1", "--layers", "no.such"], "--layers"),
    ("train", ["--val-size", "{n}"], "--val-size goes with --val-data"),
    ("train", ["--data", "{bad}"], "--data: "),
    ("train", ["--data", "{data}", "--layers", "no.such"], "--layers"),
    ("train", ["--method", "mend", "--n-editors", "{n}"], "--n-editors applies to raeditor and moeditor"),
], ids=lambda v: " ".join(v).replace("{", "").replace("}", "") if isinstance(v, list) else None)
def test_cli_refused_command_leaves_out_as_it_was(command, flags, said, capsys, tmp_path, tiny_model_dir):
    """A command refused after main() checked --out (a --seed it would not use, a bad data file, a
    layer name the model lacks, a failed edit) left --out's folders behind, made by that check
    (`dcedit edit --method ft --seed 1 --out new/run.json`: an empty new/); they are made when the
    file is written.  A folder the user made, and the files in it, stay as they were.  The same
    error line and exit status 2."""
    data = _counterfact_file(tmp_path / "cf.json")
    bad = tmp_path / "bad.json"
    bad.write_text(random.choice(['[{"x": 1}]', "[", "[]"]))
    big = _overflowing_editor(tmp_path / "big.safetensors") if "{big}" in flags else None
    flags = [f.format(n=random.randint(1, 64), data=data, bad=bad, big=big) for f in flags]
    name = "e.safetensors" if command == "train" else "run.json"
    argv = [command, "--model", str(tiny_model_dir), *flags]
    new = tmp_path / "new"
    out = new.joinpath(*["sub"] * random.randint(0, 3), name)  # folders that do not exist yet
    assert cli.main([*argv, "--out", str(out)]) == 2
    line = _one_cli_line(capsys)
    assert line.startswith("dcedit: error: ") and said in line, line
    assert not new.exists()
    kept = tmp_path / "kept"  # the user's own folder, with files in it, --out among them or not
    kept.mkdir()
    (kept / "notes.txt").write_bytes(os.urandom(8))
    if random.random() < 0.5:
        (kept / name).write_bytes(os.urandom(8))
    before = _tree(kept)
    assert cli.main([*argv, "--out", str(kept / name)]) == 2
    assert _one_cli_line(capsys) == line
    assert _tree(kept) == before


@pytest.mark.parametrize("command", ["train", "edit", "evaluate"])
def test_cli_out_folders_are_made_when_the_file_is_written(command, capsys, tmp_path, tiny_model_dir):
    """--out's missing folders, no longer made by main()'s check (check_out), are made by the write:
    train's save (which makes no folder, `replace_atomically`) and the JSON record of edit and evaluate.
    Where none can be made the check refuses before any work: a file on the way, /proc."""
    data = _counterfact_file(tmp_path / "cf.json")
    flags = {"train": ["--method", "mend", "--rank", "2", "--steps", "1", "--batch-size", "2"],
             "edit": ["--method", "ft", "--n-edits", "1"],
             "evaluate": ["--method", "ft", "--n-edits", "2", "--repeats", "1"]}[command]
    name = "e.safetensors" if command == "train" else "run.json"
    out = tmp_path.joinpath(*["new"] * random.randint(1, 3), name)
    link = tmp_path / f"link-{name}"  # a symbolic link to a file in a missing folder: the save writes there
    link.symlink_to(tmp_path.joinpath(*["target"] * random.randint(1, 3), name))
    for path in (out, link):
        assert cli.main([command, "--model", str(tiny_model_dir), "--data", str(data), *flags, "--out", str(path)]) == 0
        assert path.is_file() and (command == "train" or json.loads(path.read_text())["layers"])
    assert link.is_symlink()
    capsys.readouterr()
    (tmp_path / "a_file").write_text("")
    refusals = [(tmp_path / "a_file" / "sub" / name, f"cannot create its folder ({tmp_path / 'a_file'} is not a folder)")]
    if Path("/proc/self").is_dir():
        refusals.append((Path("/proc/dcedit_no_such_folder") / name, "cannot create its folder in /proc ("))
    for bad, said in refusals:
        assert cli.main([command, "--model", str(tiny_model_dir), "--data", str(data), *flags, "--out", str(bad)]) == 2
        assert f"dcedit: error: --out {bad}: {said}" in _one_cli_line(capsys)


def test_cli_edit_prints_under_a_stdout_that_cannot_encode_its_text(tiny_model_dir, tmp_path, monkeypatch):
    """Under a latin-1 stdout (PYTHONIOENCODING, a non-UTF-8 locale) `edit`'s lines of a Chinese prompt
    (or of a completion cut inside a character, U+FFFD) raised UnicodeEncodeError after the edit had
    run, and --out was never written.  They print with backslash escapes now, and stdout's error
    handler is given back after the command."""
    import io
    import sys

    stdout = io.TextIOWrapper(io.BytesIO(), encoding="latin-1", errors="strict", write_through=True)
    monkeypatch.setattr(sys, "stdout", stdout)
    out = tmp_path / "edit.json"
    assert cli.main(["edit", "--model", str(tiny_model_dir), "--method", "ft", "--prompt", "法国的首都是",
                     "--target", "巴黎", "--out", str(out)]) == 0
    assert stdout.errors == "strict"
    printed = stdout.buffer.getvalue().decode("latin-1")
    assert "\\u6cd5\\u56fd" in printed and "巴黎" not in printed
    assert json.loads(out.read_text(encoding="utf-8"))


@pytest.fixture
def sigterm_default():
    """SIGTERM at its default action for the test, whatever this process had (a skip when it had a
    handler hid a main() that left dcedit's handler behind: every later SIGTERM test skipped)."""
    import signal

    previous = signal.signal(signal.SIGTERM, signal.SIG_DFL)
    yield
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL, "SIGTERM's handler was left changed"
    signal.signal(signal.SIGTERM, previous)


def test_cli_train_terminated_by_sigterm_says_how_to_resume_and_leaves_no_temporary_file(
        sigterm_default, capsys, tmp_path, monkeypatch, tiny_model_dir):
    """SIGTERM (a cluster's preemption) ended `dcedit train` at once, Python's default: a checkpoint
    being written left its hidden temporary file in --checkpoint-dir for good, and nothing said how
    to resume.  It now ends the run as Ctrl-C does: one line, exit status 143, the temporary file
    removed, SIGTERM's default action back after main(); the same command then resumes."""
    import signal

    from dcedit_kernels import safetensors_file

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    data = _counterfact_file(tmp_path / "cf.json", n=8)
    ck = tmp_path / "ck"
    args = ["train", "--model", str(tiny_model_dir), "--data", str(data), "--steps", "3",
            "--batch-size", "2", "--rank", "4", "--val-every", "1",
            "--checkpoint-dir", str(ck), "--out", str(tmp_path / "mend.safetensors")]
    sync, synced = safetensors_file._sync, []

    def terminated_in_the_second_trainer_write(path):
        sync(path)
        if path.name.startswith(".trainer.safetensors."):
            if synced:
                os.kill(os.getpid(), signal.SIGTERM)  # its handler raises before kill returns
            synced.append(path)

    monkeypatch.setattr(safetensors_file, "_sync", terminated_in_the_second_trainer_write)
    assert cli.main(args) == 143
    assert len(synced) == 1  # the first checkpoint's; the second one's write was cut short
    err = capsys.readouterr().err
    assert f"dcedit: terminated (SIGTERM): run the same command again to resume from the last checkpoint in {ck}" in err
    assert "Traceback" not in err
    assert sorted(p.name for p in ck.iterdir() if p.name.endswith(".tmp")) == []
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    monkeypatch.setattr(safetensors_file, "_sync", sync)
    assert cli.main(args) == 0
    assert "(MEND, 3 steps, " in capsys.readouterr().out


def test_sigterm_is_taken_once_and_left_alone_in_a_process_group(sigterm_default, monkeypatch):
    """A second SIGTERM while the first unwinds (a launcher forwarding it, `kill` run twice) raised
    again inside a checkpoint write's cleanup, which then left its temporary file (8 of 12 trials
    of two back-to-back signals): the first one sets SIGTERM to be ignored until main() ends.  A
    process of a group of several that its caller set up (no WORLD_SIZE) keeps SIGTERM's default,
    as a torchrun worker does: a peer waiting in a collective runs no Python handler."""
    import signal

    import torch.distributed as dist

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(cli.Terminated):
        with cli._sigterm_interrupts():
            try:
                os.kill(os.getpid(), signal.SIGTERM)
            finally:
                assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
                os.kill(os.getpid(), signal.SIGTERM)  # ignored: no second Terminated in the unwinding
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 1)
    with cli._sigterm_interrupts():
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


@pytest.mark.parametrize("world_size", ["2", " 3 ", "two"])
def test_sigterm_keeps_its_default_where_world_size_says_several_or_cannot_be_read(
        sigterm_default, monkeypatch, world_size):
    """A torchrun worker (WORLD_SIZE > 1) keeps SIGTERM's default; so does a process whose WORLD_SIZE
    is no int, where there may be several (training refuses it; the CLI must not raise over it
    before it gets there, nor guess one process)."""
    import signal
    monkeypatch.setenv("WORLD_SIZE", world_size)
    with cli._sigterm_interrupts():
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_a_callers_sigterm_handler_is_left_in_place():
    """A SIGTERM handler of the caller's own is neither replaced nor reset to the default."""
    import signal
    def mine(signum, frame):
        pass

    previous = signal.signal(signal.SIGTERM, mine)
    try:
        with cli._sigterm_interrupts():
            assert signal.getsignal(signal.SIGTERM) is mine
        assert signal.getsignal(signal.SIGTERM) is mine
    finally:
        signal.signal(signal.SIGTERM, previous)


@pytest.mark.parametrize("world_size", ["1", "", " "])
def test_world_size_one_takes_sigterm_as_ctrl_c(sigterm_default, monkeypatch, world_size):
    """WORLD_SIZE=1 (torchrun with one process) is no group, nor is an empty WORLD_SIZE (a shell's
    `WORLD_SIZE=`, no launcher's): SIGTERM raises Terminated."""
    import signal
    monkeypatch.setenv("WORLD_SIZE", world_size)
    with pytest.raises(cli.Terminated):
        with cli._sigterm_interrupts():
            os.kill(os.getpid(), signal.SIGTERM)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_a_surrogateescape_stdout_is_left_as_it_is(monkeypatch):
    """Only a strict stdout takes backslashreplace; a C locale's surrogateescape writes a path's
    undecodable bytes back as they were."""
    import io
    import sys
    raw = io.BytesIO()
    out = io.TextIOWrapper(raw, encoding="ascii", errors="surrogateescape", write_through=True)
    monkeypatch.setattr(sys, "stdout", out)
    with cli._printable_stdout():
        print("caf\udce9")
    assert raw.getvalue() == b"caf\xe9\n"


def test_main_from_a_worker_thread_leaves_sigterm_alone(sigterm_default, capsys):
    """Python sets signal handlers from the main thread only (signal.signal raises ValueError
    elsewhere): main() called from another thread runs without dcedit's SIGTERM handling."""
    import threading

    got = []
    worker = threading.Thread(target=lambda: got.append(cli.main(["edit", "--prompt", "a b"])))
    worker.start()
    worker.join()
    assert got == [2]
    assert "--prompt and --target go together" in capsys.readouterr().err
