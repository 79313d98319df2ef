"""python/report.py's rendering and its --fusions rows, on a synthetic report (the real run trains
editors on CounterFact for minutes: RESULTS.md records those)."""

import importlib.util
import random
from pathlib import Path

import pytest
import torch

from dcedit_kernels.model_editor import ModelEditor
from dcedit_kernels.models import tiny_model

from helpers import options_without_their_defaults
from test_demo import _counterfact_file, _demo_module

REPO = Path(__file__).resolve().parents[1]
SIZES = [2, 5]


@pytest.fixture(scope="module")
def report_module():
    spec = importlib.util.spec_from_file_location("report_program", REPO / "python" / "report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _stat(mean):
    return dict(mean=mean, std=0.01, values=[mean - 0.01, mean + 0.01])


def _result(es, dd):
    return dict(by_n={n: dict(es=_stat(es), reliability=_stat(es), dd=_stat(dd), lmp=_stat(es - dd), ns=_stat(0.1),
                              latency_s=_stat(1.0), peak_memory_mb=_stat(100.0)) for n in SIZES})


def _report(methods):
    layers = ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    unedited = {n: dict(es=_stat(0.04), reliability=_stat(0.05), dd=_stat(0.0), lmp=_stat(0.04), ns=_stat(0.1),
                        latency_s=dict(mean=None, std=None, values=[]),
                        peak_memory_mb=dict(mean=None, std=None, values=[])) for n in SIZES}
    return dict(
        date="2026-11-30 00:00 UTC", command="python python/report.py --fusions add", machine="x", model="m.gguf",
        threads=1, layers=layers, data="val.json", train_data="train.json", n_requests=10, n_train=4, repeats=2,
        seed=0, train_config=dict(steps=2, batch_size=2, lr=1e-3, lr_lr=1e-4),
        editor=dict(rank=4, n_editors=2, loss_reduction="token", fusion="sss"), ft_steps=1,
        training={"moeditor": dict(cached=False, train_s=1.0)}, methods=methods, unedited=unedited,
        gradients={n: {name: dict(gcr=0.2, gms=0.9) for name in layers} for n in SIZES},
        timings=dict(load_s=1.0, train_s=1.0, eval_s=1.0, gradient_s=1.0, total_s=4.0),
    ), layers


def test_fusion_rows_are_rendered(report_module, tmp_path):
    methods = {"mend": _result(0.2, 0.1), "moeditor": _result(0.15, 0.3), "moeditor:add": _result(0.14, 0.3),
               "raeditor:ssm": _result(0.1, 0.2)}
    report, layers = _report(methods)
    report["editor"]["top_k"] = 1
    text = report_module.markdown(report, SIZES, layers, tmp_path / "report.md", tmp_path)
    for name in ("| MEND | 2 |", "| MoEditor | 5 |", "| MoEditor (add) | 2 |", "| RaEditor (ssm) | 5 |"):
        assert name in text, name
    assert "instead of sss (`--fusions`)" in text
    assert "gate top-1, balance weight 0.01" in text
    assert "loss weights cedit 0.1 and cloc 1.0" in text  # TrainConfig's: not given

    report["edit_statistics"] = {"moeditor": {n: {name: dict(edits_per_editor=[n - 1, 1], shift_norm=12.5,
                                                              weight_norm=190.0) for name in layers}
                                              for n in SIZES}}
    text = report_module.markdown(report, SIZES, layers, tmp_path / "report.md", tmp_path)
    assert "| MoEditor | 5 | `model.layers.1.mlp.down_proj` | 4 / 1 | 12.5 | 190 |" in text

    plain, _ = _report({"mend": _result(0.2, 0.1)})
    assert "(`--fusions`)" not in report_module.markdown(plain, SIZES, layers, tmp_path / "r.md", tmp_path)

    report_module.plot_es_dd(methods, SIZES, tmp_path / "es_dd.png")
    report_module.plot_gradients(report["gradients"], SIZES, layers, tmp_path / "gcr.png")
    assert (tmp_path / "es_dd.png").stat().st_size > 0 and (tmp_path / "gcr.png").stat().st_size > 0


def test_gradient_table_leaves_out_n_u_1(report_module, tmp_path):
    """GCR and GMS are over pairs of edits: at N_u = 1 the report has none (gradient_conflict refuses
    one edit, which once ended a --n-edits 1 run in a traceback after its whole evaluation)."""
    report, layers = _report({"mend": _result(0.2, 0.1)})
    report["unedited"][1] = report["unedited"][2]
    report["methods"]["mend"]["by_n"][1] = report["methods"]["mend"]["by_n"][2]
    text = report_module.markdown(report, [1, *SIZES], layers, tmp_path / "report.md", tmp_path)
    assert "| MEND | 1 |" in text  # evaluated at N_u = 1
    assert "GCR N_u=1" not in text and "| layer | GCR N_u=2 | GMS N_u=2 | GCR N_u=5 | GMS N_u=5 |" in text
    # --n-edits 1 alone: no table of no column (it was "| layer |  |" over a one-cell separator)
    report["gradients"] = {}
    text = report_module.markdown(report, [1], layers, tmp_path / "report.md", tmp_path)
    assert "| layer |" not in text and "None: every N_u is 1" in text
    assert not any(line.startswith("| `model.layers") for line in text.splitlines())


def test_given_loss_weights_are_rendered(report_module, tmp_path):
    report, layers = _report({"moeditor": _result(0.2, 0.1)})
    report["train_config"].update(cloc=10.0, balance_weight=0.5)
    report["editor"]["top_k"] = 2
    text = report_module.markdown(report, SIZES, layers, tmp_path / "report.md", tmp_path)
    assert "gate top-2, balance weight 0.5" in text and "loss weights cedit 0.1 and cloc 10.0" in text
    assert "length_buckets" not in text  # a report from before 0.4.0: one padded pass
    for setting, shown in ((None, True), (True, True), (False, False)):
        report["train_config"]["length_buckets"] = setting
        text = report_module.markdown(report, SIZES, layers, tmp_path / "report.md", tmp_path)
        assert ("rows in passes of similar length (`length_buckets`)" in text) == shown
    assert "reuse_prefix" not in text  # a report from before 0.5.0: every block for every row
    for setting in (True, False):
        report["train_config"]["reuse_prefix"] = setting
        text = report_module.markdown(report, SIZES, layers, tmp_path / "report.md", tmp_path)
        assert ("lower blocks run once, in the KL reference pass (`reuse_prefix`)" in text) == setting
    assert ": 2 steps × 2 edits, Adam" in text
    report["train_config"]["batch_size"] = 25  # more than the 4 training edits: every batch is all 4
    text = report_module.markdown(report, SIZES, layers, tmp_path / "report.md", tmp_path)
    assert ": 2 steps × 4 edits, Adam" in text  # once "× 25"
    report["train_config"]["steps"] = 1  # "1 steps × 4 edits" before
    text = report_module.markdown(report, SIZES, layers, tmp_path / "report.md", tmp_path)
    assert ": 1 step × 4 edits, Adam" in text
    report["methods"] = {"mend": _result(0.2, 0.1)}
    report["training"] = {"mend": dict(cached=False, train_s=1.0)}  # MEND only: no other editor described
    text = report_module.markdown(report, SIZES, layers, tmp_path / "report.md", tmp_path)
    assert "N_g" not in text and "ProEditor" not in text and "RaEditor" not in text


def test_rescale_batch_size_is_rendered(report_module, tmp_path):
    report, layers = _report({"mend": _result(0.2, 0.1)})
    text = report_module.markdown(report, SIZES, layers, tmp_path / "report.md", tmp_path)
    assert "rescale_batch_size" not in text  # off, and reports from before the option
    report["editor"]["rescale_batch_size"] = 25
    text = report_module.markdown(report, SIZES, layers, tmp_path / "report.md", tmp_path)
    assert ("Applied with `rescale_batch_size` 25: an edit of N_u edits runs the editors on η × N_u/25 and steps "
            "with α × 25/N_u.") in text


def test_the_trained_moeditors_top_k_is_recorded(report_module):
    """Without --top-k the report records the editor's own top_k (the preset's default), not 1."""
    model, tok = tiny_model("llama")
    layers = ["model.layers.0.mlp.down_proj"]
    for n_editors, kwargs, want in ((2, {}, 2), (2, {"top_k": 1}, 1), (1, {}, 1)):
        me = ModelEditor(model, tok, layers, method="moeditor", n_editors=n_editors, rank=4, **kwargs)
        assert report_module.gate_top_k({"moeditor": me}) == want
    assert report_module.gate_top_k({}) is None


def test_applied_fusion_restores(report_module):
    model, tok = tiny_model("llama")
    me = ModelEditor(model, tok, ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"],
                     method="moeditor", n_editors=2, rank=4)
    editors = list(me.editors.values())
    assert editors and all(e.fusion == "sss" for e in editors)
    with report_module.applied_fusion(me, "add"):
        assert all(e.fusion == "add" for e in editors)
    with pytest.raises(RuntimeError):
        with report_module.applied_fusion(me, "max"):
            raise RuntimeError("an evaluation that fails")
    assert all(e.fusion == "sss" for e in editors)
    with report_module.applied_fusion(me, None):
        assert all(e.fusion == "sss" for e in editors)


def test_report_main_gives_torch_threads_back(report_module, capsys):
    """main() sets torch's thread count (--threads, or 1 on a small machine) and puts the caller's back
    when it returns, as dcedit's main() does: called from Python it left the process on that many
    threads, and every test after one of this file's runs went on with 1 thread on a 2-core machine."""
    threads = torch.get_num_threads()
    assert report_module.main(["--threads", str(threads + 1), "--fusions", "add,mean"]) == 2
    assert "--fusions: unknown ['mean']" in capsys.readouterr().err  # refused after the threads were set
    assert torch.get_num_threads() == threads


def test_unknown_fusion_is_refused(report_module, capsys):
    assert report_module.main(["--fusions", "add,mean"]) == 2
    assert "--fusions: unknown ['mean']" in capsys.readouterr().err


def test_ft_rows_alone_and_ft_kl_texts_are_rendered(report_module, tmp_path):
    """A report of the FT baselines only has no editors line; FT+KL's KL texts are named."""
    report, layers = _report({"ft": _result(0.1, 0.8), "ft_kl": _result(0.1, 0.7)})
    report["training"], report["ft_kl_edits"] = {}, 25
    text = report_module.markdown(report, SIZES, layers, tmp_path / "report.md", tmp_path)
    assert "- Editors" not in text and "| FT+KL | 5 |" in text
    assert "- FT / FT+KL: 1 Adam step (lr 5e-4) on the edited weights" in text  # --ft-steps, not editor --steps (2)
    assert "FT+KL adds the KL on the locality prompts of the first 25 training edits" in text
    report["ft_kl_edits"] = 0
    assert "FT+KL adds the KL on its generic texts" in report_module.markdown(report, SIZES, layers,
                                                                          tmp_path / "report.md", tmp_path)


def test_the_ft_line_only_with_ft_rows_and_the_std_is_named(report_module, tmp_path):
    report, layers = _report({"mend": _result(0.2, 0.1)})
    text = report_module.markdown(report, SIZES, layers, tmp_path / "report.md", tmp_path)
    assert "FT / FT+KL" not in text  # no FT row: the line described a run that did not happen
    assert "Mean ± std over the samples (the population std, ddof 0" in text
    report["ft_kl_edits"], report["ft_kl_skipped"] = 25, 1
    report["methods"]["ft_kl"] = _result(0.1, 0.7)
    text = report_module.markdown(report, SIZES, layers, tmp_path / "report.md", tmp_path)
    assert "the first 25 training edits whose prompts DD does not score (1 skipped)" in text


def test_training_edits_are_not_evaluated_and_scored_prompts_are_not_kl_texts(report_module):
    """zsRE ships one file, so --data and --train-data can be the same: its training edits are left
    out of the evaluation; FT+KL's KL edits skip a training edit whose locality prompt is scored."""
    from dcedit_kernels import EditRequest

    def req(i, loc):
        return EditRequest(f"prompt {i}", f"target {i}", locality=loc)

    pool = [req(i, f"loc {i}") for i in range(10)]
    kept, left = report_module.held_out(pool, pool[:4])
    assert kept == pool[4:] and left == 4
    training = [req(20, "loc 5"), req(21, "loc 21"), req(22, None), req(23, "loc 6"), req(24, "loc 24")]
    picked, skipped = report_module.kl_source_edits(training, pool[4:], 3)
    assert picked == [training[1], training[2], training[4]] and skipped == 2
    # It stops at n: the edits after the n-th are neither picked nor counted as skipped.
    assert report_module.kl_source_edits(training, pool[4:], 2) == ([training[1], training[2]], 1)


def test_training_edits_lose_the_locality_prompts_dd_scores(report_module):
    """The editors' KL trains on the training edits' locality prompts: one that an evaluated edit
    is scored on is taken away (the edit keeps its place and its other fields), so that DD never
    scores a prompt the editors were fitted to keep; the others are the very same requests."""
    from dcedit_kernels import EditRequest

    def req(i, loc):
        return EditRequest(f"prompt {i}", f"target {i}", rephrase=f"rephrase {i}", locality=loc,
                           locality_target=None if loc is None else f"answer {i}")

    evaluated = [req(i, f"loc {i}") for i in range(5)] + [req(5, None)]
    training = [req(20, "loc 3"), req(21, "loc 21"), req(22, None), req(23, "loc 0"), req(24, "loc 24")]
    kept, n = report_module.without_scored_locality(training, evaluated)
    assert n == 2 and len(kept) == len(training)
    for i in (0, 3):
        assert kept[i].locality is None and kept[i].locality_target is None
        assert (kept[i].prompt, kept[i].target, kept[i].rephrase) == (training[i].prompt, training[i].target,
                                                                      training[i].rephrase)
        assert training[i].locality is not None  # the caller's requests are not modified
    assert all(kept[i] is training[i] for i in (1, 2, 4))
    assert report_module.without_scored_locality(training, []) == (training, 0)


def test_the_report_says_how_many_training_edits_lost_their_locality(report_module, tmp_path):
    report, layers = _report({"mend": _result(0.3, 0.1)})
    report["n_train_unlocalized"] = 39
    text = report_module.markdown(report, SIZES, layers, tmp_path / "report.md", tmp_path)
    assert "(39 of them without their locality prompt, which DD scores)" in text
    report["n_train_unlocalized"] = 0
    assert "without their locality prompt" not in report_module.markdown(report, SIZES, layers,
                                                                           tmp_path / "report.md", tmp_path)


def test_each_row_starts_raeditors_routing_from_the_same_state():
    """RaEditor's routing generator keeps drawing; restoring its state makes a second evaluation
    route the same edits alike (the --fusions rows of one method)."""
    model, tok = tiny_model("llama")
    me = ModelEditor(model, tok, ["model.layers.0.mlp.down_proj"], method="raeditor", n_editors=3, rank=4, seed=5)
    states = me.route_states()  # what report.py keeps per method
    assert states
    editor = next(iter(me.editors.values()))
    first = editor.route(30)[0]
    assert not torch.equal(editor.route(30)[0], first)  # it keeps drawing
    me.set_route_states(states)
    assert torch.equal(editor.route(30)[0], first)


@pytest.mark.parametrize("extra, message", [
    (["--n-edits", "x"], "--n-edits must be comma-separated ints, got 'x'"),
    (["--methods", "ft", "--n-edits", "2", "--gradient-layers", "27,x"],
     "--gradient-layers must be comma-separated ints, got '27,x'"),
    (["--n-edits", ","], "--n-edits is empty"),
    # "" fell back to the flag's default (an unset shell variable): another data file than the one meant
    (["--data", ""], "--data is empty; give a file or a data set's name"),
    (["--train-data", ""], "--train-data is empty; give a file or a data set's name"),
    (["--markdown", ""], "--markdown is empty; give a file name"),
    (["--out-dir", ""], "--out-dir is empty; give a folder"),
    (["--methods", "mend,bogus"], "--methods: unknown ['bogus']"),
    (["--data", "/nonexistent/val.json"], "data file not found"),
    (["--methods", "ft", "--n-edits", "25"], "--n-edits asks for 25 edits but"),
    (["--methods", "ft", "--n-edits", "2,0"], "--n-edits must hold positive ints, got '2,0'"),
    (["--methods", "ft", "--n-edits", "2,3,2"], "--n-edits must not repeat a value"),
    # --lr -1 and --cloc nan: argparse's now (test_rates_and_loss_weights_are_refused_by_flag)
    (["--methods", "ft", "--n-edits", "2", "--out-dir", "AFILE"], "report.json: cannot create its folder"),
    (["--methods", "ft", "--n-edits", "2", "--markdown", "IN_AFILE"], "report.md: cannot create its folder"),
    # Refused at the end of the run (a traceback, no report.md) or after the model loaded and MEND trained:
    (["--methods", "ft", "--n-edits", "2", "--markdown", "ADIR"], "is a folder; give a file name"),
    # --out-dir names a folder: "give a file name" (--out-dir r.json) wrote r.json/report.json all the same.
    (["--methods", "ft", "--n-edits", "2", "--out-dir", "JSON_TAKEN"],
     "report.json: is a folder; move it away, or give another --out-dir"),
    # a plot's name taken by a folder: a traceback after the whole run, a new report.json beside the old report.md
    (["--methods", "ft", "--n-edits", "2", "--out-dir", "ES_PLOT_TAKEN"],
     "es_dd_by_n.png: is a folder; move it away, or give another --out-dir"),
    (["--methods", "ft", "--n-edits", "2", "--out-dir", "GCR_PLOT_TAKEN"],
     "gcr_gms_by_layer.png: is a folder; move it away, or give another --out-dir"),
    (["--methods", "mend,moeditor", "--n-edits", "2", "--n-editors", "2", "--top-k", "3"],
     "--top-k 3 cannot exceed --n-editors 2"),
    # RaEditor's rows come from a MoEditor twin, built after the model loads (once a traceback then):
    (["--methods", "raeditor", "--n-edits", "2", "--n-editors", "2", "--top-k", "3", "--train-data", "TRAIN"],
     "--top-k 3 cannot exceed --n-editors 2"),
    (["--methods", "mend", "--n-edits", "2", "--train-data", "EMPTY"], "--train-data: "),  # once "--data: "
    (["--methods", ",", "--n-edits", "2"], "--methods is empty"),  # once a report of nothing, exit status 0
    # "none" is grouped_outer's unfused per-group stack, not a rule an edit applies (report.FUSIONS)
    (["--methods", "moeditor", "--n-edits", "2", "--train-data", "TRAIN", "--n-train", "1", "--fusions", "none"],
     "--fusions: unknown ['none']"),
    (["--methods", "ft,mend", "--n-edits", "2", "--fusions", "add"], "--fusions adds rows to"),  # once ignored
    (["--n-edits", "2", "--loss-reduction", "edit", "--rescale-batch-size", "2"], "--rescale-batch-size undoes"),
])
def test_report_refuses_bad_arguments_before_loading_the_model(extra, message, report_module, capsys, tmp_path,
                                                               monkeypatch):
    import dcedit_kernels.models as models

    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("the model loaded"))
    data = _counterfact_file(tmp_path / "cf.json", n=6)
    argv = ["--data", str(data), "--out-dir", str(tmp_path / "out"), "--no-progress"]
    (tmp_path / "a_file").write_text("")
    (tmp_path / "a_dir").mkdir()
    (tmp_path / "empty.json").write_text("")
    (tmp_path / "taken" / "report.json").mkdir(parents=True)  # a folder where --out-dir's file goes
    for plot in ("es_dd_by_n.png", "gcr_gms_by_layer.png"):
        (tmp_path / plot / plot).mkdir(parents=True)
    extra = [{"TRAIN": str(data), "AFILE": str(tmp_path / "a_file"), "ADIR": str(tmp_path / "a_dir"),
              "IN_AFILE": str(tmp_path / "a_file" / "report.md"), "JSON_TAKEN": str(tmp_path / "taken"),
              "EMPTY": str(tmp_path / "empty.json"), "ES_PLOT_TAKEN": str(tmp_path / "es_dd_by_n.png"),
              "GCR_PLOT_TAKEN": str(tmp_path / "gcr_gms_by_layer.png")}.get(word, word) for word in extra]
    assert report_module.main(argv + extra) == 2
    err = capsys.readouterr().err
    assert "report: error:" in err and message in err
    if "--out-dir" in message:
        assert f"--out-dir {extra[-1]}" in err


def test_report_without_matplotlib_says_so_before_the_model_loads(report_module, capsys, tmp_path, monkeypatch):
    """matplotlib is optional (the "plot" extra) and the report plots after report.json, before
    report.md: without it a whole run ended in ModuleNotFoundError and wrote no Markdown. Now one
    error line and exit status 2 before the model loads."""
    import sys

    import dcedit_kernels.models as models

    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("the model loaded"))
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import raises ImportError
    data = _counterfact_file(tmp_path / "cf.json", n=6)
    assert report_module.main(["--data", str(data), "--methods", "ft", "--n-edits", "2",
                               "--out-dir", str(tmp_path / "out"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "report: error:" in err and "matplotlib" in err and "[plot]" in err


def test_missing_default_data_names_the_folder_looked_in(report_module, capsys, tmp_path, monkeypatch):
    """Without --data the report reads counterfact-val.json from $DCEDIT_DATA_DIR when set: the error
    named ../shared/data whatever the variable said."""
    import dcedit_kernels.models as models

    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("the model loaded"))
    monkeypatch.setenv("DCEDIT_DATA_DIR", str(tmp_path / "nodata"))
    assert report_module.main(["--methods", "ft", "--n-edits", "2", "--out-dir", str(tmp_path / "out"),
                               "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "--data is required" in err and str(tmp_path / "nodata" / "counterfact-val.json") in err


def test_length_buckets_help_names_reuse_prefix_too(report_module, capsys):
    """--length-buckets off alone does not give the one padded pass of versions before 0.4.0: the
    prefix reuse (on by default since 0.5.0) runs the locality rows in passes of their own."""
    with pytest.raises(SystemExit):
        report_module.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    buckets = text[text.index("--length-buckets {auto,on,off}"):text.index("--reuse-prefix {on,off} the")]
    assert "--reuse-prefix off" in buckets


def test_every_option_of_the_programs_says_what_it_does_and_its_default(report_module):
    """report.py's --help gave nine options (--rank, --ft-steps, --out-dir, ...) no text and did not
    say the default of eight more (--steps, --lr, ...); the demo's --seed did not say its default. Every option of report.py, the demo
    and `dcedit` has a help text that names its default (or says "default" in its own words)."""
    from dcedit_kernels import cli

    for parser in (report_module.build_parser(), _demo_module().build_parser(), cli.build_parser()):
        assert options_without_their_defaults(parser) == []


def test_an_evaluation_edit_is_left_out_only_when_prompt_and_target_match_a_training_edit(report_module):
    """held_out leaves out evaluation edits that are training edits, the same prompt AND target: an
    edit of a training edit's prompt towards another target is a different edit and is evaluated
    (CounterFact and zsRE can hold several edits of one prompt)."""
    from dcedit_kernels import EditRequest

    training = [EditRequest("The Eiffel Tower is in", "Rome")]
    evaluated = [EditRequest("The Eiffel Tower is in", "Rome"), EditRequest("The Eiffel Tower is in", "Berlin")]
    assert report_module.held_out(evaluated, training) == ([evaluated[1]], 1)


@pytest.mark.parametrize("extra, flag", [
    # --n-edits may ask for every edit the file holds (a sample of all of them).
    (["--methods", "ft", "--n-edits", "2,6"], "--n-edits"),
    # MoEditor's gate may keep all its editors' logits.
    (["--train-data", "DATA", "--n-train", "1", "--methods", "mend,moeditor", "--n-edits", "2", "--n-editors", "2",
      "--top-k", "2"], "--top-k"),
])
def test_report_takes_a_limit_at_its_bound(extra, flag, report_module, capsys, tmp_path, monkeypatch):
    """--n-edits equal to the edits held and --top-k equal to --n-editors are accepted: only more is
    refused.  A later check (--markdown naming a folder) is the one that stops the run, before the
    model loads."""
    import dcedit_kernels.models as models

    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("the model loaded"))
    data = _counterfact_file(tmp_path / "cf.json", n=6)
    (tmp_path / "a_dir").mkdir()
    extra = [str(data) if word == "DATA" else word for word in extra]
    assert report_module.main(["--data", str(data), *extra, "--out-dir", str(tmp_path / "out"),
                               "--markdown", str(tmp_path / "a_dir"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "is a folder; give a file name" in err and flag not in err


def test_raeditor_alone_needs_training_data(report_module, capsys, tmp_path, monkeypatch):
    """RaEditor's rows come from a trained MoEditor's twin: --methods raeditor alone, with no
    --train-data and no counterfact-train.json in DCEDIT_DATA_DIR, is refused before the model
    loads, as MEND's or MoEditor's rows are."""
    import dcedit_kernels.models as models

    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("the model loaded"))
    monkeypatch.setenv("DCEDIT_DATA_DIR", str(tmp_path / "nodata"))
    data = _counterfact_file(tmp_path / "cf.json", n=6)
    assert report_module.main(["--data", str(data), "--methods", "raeditor", "--n-edits", "2",
                               "--out-dir", str(tmp_path / "out"), "--no-progress"]) == 2
    assert "--train-data is required to train the editors" in capsys.readouterr().err


def test_table_rows_have_each_metric_in_its_column_and_precision(report_module, tmp_path):
    """Each table row lists ES, rel, DD, LMP, NS (3 decimals), latency (2) and peak MiB (0) in the
    header's order; the unedited row has no latency or memory ("–")."""
    report, layers = _report({"mend": _result(0.2, 0.05)})
    report["methods"]["mend"]["by_n"][2]["peak_memory_mb"] = _stat(123.4)
    text = report_module.markdown(report, SIZES, layers, tmp_path / "report.md", tmp_path)
    assert "| method | N_u | ES | rel | DD | LMP | NS | latency s | peak MiB |" in text
    assert ("| MEND | 2 | 0.200 ± 0.010 | 0.200 ± 0.010 | 0.050 ± 0.010 | 0.150 ± 0.010 | 0.100 ± 0.010 | "
            "1.00 ± 0.01 | 123 ± 0 |") in text
    assert "| unedited | 5 | 0.040 ± 0.010 | 0.050 ± 0.010 | 0.000 ± 0.010 | 0.040 ± 0.010 | 0.100 ± 0.010 | – | – |" in text


def test_a_cached_editors_earlier_training_time_is_rendered(report_module, tmp_path):
    """An editor loaded from the cache is reported as such, with the training time of the run that
    cached it when that is known (`trained_earlier_s`), and without one when it is not."""
    report, layers = _report({"mend": _result(0.2, 0.1)})
    report["training"] = {"mend": dict(cached=True, train_s=0.0, trained_earlier_s=41.6)}
    text = report_module.markdown(report, SIZES, layers, tmp_path / "report.md", tmp_path)
    assert "Training time: MEND loaded from the cache (trained in 42 s by an earlier run)." in text
    report["training"]["mend"]["trained_earlier_s"] = None
    text = report_module.markdown(report, SIZES, layers, tmp_path / "report.md", tmp_path)
    assert "Training time: MEND loaded from the cache." in text


def test_the_report_says_how_many_evaluation_edits_were_training_edits(report_module, tmp_path):
    """--data and --train-data may be one file (zsRE's): the evaluation line says how many edits
    were left out as training edits, and says nothing of it when none were."""
    report, layers = _report({"mend": _result(0.2, 0.1)})
    report["n_held_out"] = 3
    text = report_module.markdown(report, SIZES, layers, tmp_path / "report.md", tmp_path)
    assert "- Evaluation: `val.json` (10 edits; 3 more, training edits too, left out); for each N_u" in text
    report["n_held_out"] = 0
    text = report_module.markdown(report, SIZES, layers, tmp_path / "report.md", tmp_path)
    assert "- Evaluation: `val.json` (10 edits); for each N_u" in text


def test_table_rows_come_in_method_order_each_by_n_u_as_given(report_module, tmp_path):
    """The ES/DD table holds the unedited rows, then each method's rows in the order the methods
    ran, every group in --n-edits order: a group sorted otherwise (the unedited rows backwards)
    puts a row beside another N_u's."""
    report, layers = _report({"moeditor": _result(0.15, 0.3), "mend": _result(0.2, 0.1)})
    text = report_module.markdown(report, SIZES, layers, tmp_path / "report.md", tmp_path)
    rows = [tuple(cell.strip() for cell in line.split("|")[1:3]) for line in text.splitlines()
            if line.startswith("| ") and " ± " in line]
    assert rows == [("unedited", "2"), ("unedited", "5"), ("MoEditor", "2"), ("MoEditor", "5"), ("MEND", "2"),
                    ("MEND", "5")]


def test_gradient_table_puts_gcr_and_gms_in_their_columns(report_module, tmp_path):
    """Each layer's row of the GCR/GMS table holds, for each N_u, its GCR then its GMS, under the
    header's "GCR N_u=n | GMS N_u=n" (distinct values per layer, N_u and metric, so a swapped or
    misplaced cell shows)."""
    report, layers = _report({"mend": _result(0.2, 0.1)})
    values = {2: [(0.1, 0.9), (0.2, 0.8)], 5: [(0.3, 0.7), (0.4, 0.6)]}
    report["gradients"] = {n: {name: dict(gcr=gcr, gms=gms) for name, (gcr, gms) in zip(layers, values[n])}
                           for n in SIZES}
    text = report_module.markdown(report, SIZES, layers, tmp_path / "report.md", tmp_path)
    assert "| layer | GCR N_u=2 | GMS N_u=2 | GCR N_u=5 | GMS N_u=5 |" in text
    assert "| `model.layers.0.mlp.down_proj` | 0.100 | 0.900 | 0.300 | 0.700 |" in text
    assert "| `model.layers.1.mlp.down_proj` | 0.200 | 0.800 | 0.400 | 0.600 |" in text


def test_the_n_g_line_names_only_the_routed_methods_that_ran(report_module, tmp_path):
    """The editors line's "N_g = ..." names the methods with N_g editors that the report ran: a
    MoEditor-only report does not name RaEditor (which it neither trained nor evaluated)."""
    report, layers = _report({"moeditor": _result(0.2, 0.1)})
    report["editor"]["top_k"] = 2
    text = report_module.markdown(report, SIZES, layers, tmp_path / "report.md", tmp_path)
    assert "N_g = 2 (MoEditor; MoEditor's gate top-2" in text
    report["methods"] = {"raeditor": _result(0.2, 0.1)}  # RaEditor's twin: MoEditor trained, not evaluated
    text = report_module.markdown(report, SIZES, layers, tmp_path / "report.md", tmp_path)
    assert "N_g = 2 (RaEditor, MoEditor; MoEditor's gate top-2" in text


def test_what_was_run_takes_each_number_from_its_own_field(report_module, tmp_path):
    """The "What was run" lines give threads, training file, samples per N_u, seed and each wall
    time from their own report fields (distinct values here: the synthetic report's repeats and
    seed, or its timings, were equal, so a line reading a neighbouring field did not show)."""
    report, layers = _report({"mend": _result(0.2, 0.1)})
    report.update(threads=4, repeats=3, seed=7, n_train=5, data="val.json", train_data="train.json",
                  training={"mend": dict(cached=False, train_s=22.0)},
                  timings=dict(load_s=11.0, train_s=22.0, eval_s=33.0, gradient_s=44.0, total_s=600.0))
    text = report_module.markdown(report, SIZES, layers, tmp_path / "report.md", tmp_path)
    assert "- Model: SmolLM2-135M-Instruct (`m.gguf`), fp32, CPU, 4 threads; machine: x." in text
    report["threads"] = 1  # "1 thread(s)" before
    assert ", CPU, 1 thread; machine" in report_module.markdown(report, SIZES, layers, tmp_path / "report.md", tmp_path)
    assert "trained on the first 5 edits of `train.json`" in text
    assert "for each N_u, 3 samples of N_u edits (the same samples for every method, seed 7)" in text
    assert "- Wall time: load 11 s, training 22 s, evaluation 33 s, gradient statistics 44 s; total 10.0 min." in text
    report.update(repeats=1)  # it said "1 samples", and the std of the samples
    text = report_module.markdown(report, SIZES, layers, tmp_path / "report.md", tmp_path)
    assert "for each N_u, 1 sample of N_u edits (the same samples" in text and "1 samples" not in text
    assert "One sample: its scores, std 0." in text and "half their gap" not in text


def test_the_default_training_edits_are_steps_times_batch_size(report_module, capsys, tmp_path, monkeypatch):
    """Without --n-train the editors train on the first --steps × --batch-size edits of
    --train-data (its help's default): with --data and --train-data one file of 6 edits, 2 steps of
    2 leave out those 4 training edits from the evaluation, said before the model loads (a
    --markdown naming a folder then stops the run)."""
    import dcedit_kernels.models as models

    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("the model loaded"))
    data = _counterfact_file(tmp_path / "cf.json", n=6)
    (tmp_path / "a_dir").mkdir()
    assert report_module.main(["--data", str(data), "--train-data", str(data), "--methods", "mend", "--n-edits", "2",
                               "--steps", "2", "--batch-size", "2", "--out-dir", str(tmp_path / "out"),
                               "--markdown", str(tmp_path / "a_dir"), "--no-progress"]) == 2
    captured = capsys.readouterr()
    assert "note: 4 of the 6 evaluation edits are training edits: evaluating on the other 2" in captured.out
    assert "is a folder; give a file name" in captured.err


def test_the_default_markdown_is_report_md_in_the_out_dir(report_module, capsys, tmp_path, monkeypatch):
    """Without --markdown the report goes to <out-dir>/report.md (its help's default): a folder of
    that name there is refused, naming it, before the model loads."""
    import dcedit_kernels.models as models

    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("the model loaded"))
    data = _counterfact_file(tmp_path / "cf.json", n=6)
    (tmp_path / "out" / "report.md").mkdir(parents=True)
    assert report_module.main(["--data", str(data), "--methods", "ft", "--n-edits", "2",
                               "--out-dir", str(tmp_path / "out"), "--no-progress"]) == 2
    assert f"--markdown {tmp_path / 'out' / 'report.md'}: is a folder" in capsys.readouterr().err


def test_the_defaults_are_the_runs_the_docstring_names(report_module):
    """With no argument the report runs what its docstring says: every method at N_u ∈ {25, 75,
    125}, and the editors train on steps × batch size edits (RESULTS.md's tables are these runs)."""
    args = report_module.parse_args([])
    assert "every method at N_u ∈ {25, 75, 125}" in report_module.__doc__
    assert report_module._ints(args.n_edits, "--n-edits") == [25, 75, 125]
    assert args.methods.split(",") == list(report_module.ALL_METHODS)
    assert args.n_train is None


def test_fusions_are_taken_when_methods_hold_a_routed_method_among_others(report_module, capsys, tmp_path,
                                                                          monkeypatch):
    """--fusions adds rows to RaEditor and MoEditor: it is refused only when --methods holds
    neither, not when it holds one of them beside MEND (a later check, --markdown naming a folder,
    is the one that stops the run, before the model loads)."""
    import dcedit_kernels.models as models

    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("the model loaded"))
    data = _counterfact_file(tmp_path / "cf.json", n=6)
    (tmp_path / "a_dir").mkdir()
    assert report_module.main(["--data", str(data), "--train-data", str(data), "--n-train", "1",
                               "--methods", "mend,moeditor", "--n-edits", "2", "--fusions", "add",
                               "--out-dir", str(tmp_path / "out"), "--markdown", str(tmp_path / "a_dir"),
                               "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "is a folder; give a file name" in err and "--fusions" not in err


def _tiny_model_and_data(tmp_path, monkeypatch):
    """A tiny Llama in SmolLM2's place (blocks 0 and 1), and a 6-edit CounterFact file's path."""
    import dcedit_kernels.models as models

    tiny = models.tiny_model("llama", seed=0)
    monkeypatch.setattr(models, "load_model", lambda *args, **kwargs: tiny)
    monkeypatch.setattr(models, "default_model_path", lambda: tmp_path / "tiny.gguf")
    return _counterfact_file(tmp_path / "cf.json", n=6)


def _tiny_report(report_module, tmp_path, monkeypatch, *extra):
    """A whole report past the model's load, which the tests before these stop before: a tiny
    Llama stands in for SmolLM2 (blocks 0 and 1), editors of rank 2 train one step of 2 edits, no
    cache, at N_u 1 and 2 over a 6-edit file; `extra` adds arguments.  Returns (report.json's
    content, the output folder)."""
    import json

    data = _tiny_model_and_data(tmp_path, monkeypatch)
    out = tmp_path / "out"
    assert report_module.main(["--data", str(data), "--train-data", str(data), "--n-train", "2", "--n-edits", "1,2",
                               "--repeats", "1", "--layers", "0,1", "--gradient-layers", "1", "--rank", "2",
                               "--steps", "1", "--batch-size", "2", "--ft-steps", "1", "--no-cache",
                               "--out-dir", str(out), "--no-progress", *extra]) == 0
    return json.loads((out / "report.json").read_text()), out


def test_a_whole_report_caches_its_editors_in_the_tests_own_folder(report_module, tmp_path, monkeypatch,
                                                                    tmp_path_factory):
    """--no-cache skips loading, not saving: `_tiny_report`'s editors are cached, and these tests
    wrote them into the user's ~/.cache/dcedit_kernels (conftest's editor_cache_of_its_own now gives
    each test a folder of its own under pytest's temporary one)."""
    from dcedit_kernels.editor_cache import cache_dir

    assert cache_dir().is_relative_to(tmp_path_factory.getbasetemp())
    _tiny_report(report_module, tmp_path, monkeypatch, "--methods", "mend")
    assert sorted(p.suffix for p in cache_dir().iterdir()) == [".json", ".safetensors"]


def test_a_whole_report_runs_on_a_tiny_model(report_module, capsys, tmp_path, monkeypatch):
    """FT and MEND with --edit-stats (`_tiny_report`): report.json holds each method's rows and the
    unedited rows at every N_u, GCR/GMS only at N_u 2 (pairs of edits), MEND's edit statistics,
    and report.md and both plots are written.  Before it, no fast test ran report.py past the load."""
    report, out = _tiny_report(report_module, tmp_path, monkeypatch, "--methods", "ft,mend", "--edit-stats")
    assert set(report["methods"]) == {"ft", "mend"}
    for rows in (*report["methods"].values(), {"by_n": report["unedited"]}):
        assert set(rows["by_n"]) == {"1", "2"}
    assert set(report["gradients"]) == {"2"} and set(report["gradients"]["2"]) == {"model.layers.1.mlp.down_proj"}
    assert set(report["edit_statistics"]) == {"mend"} and set(report["edit_statistics"]["mend"]) == {"1", "2"}
    assert report["layers"] == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    assert report["n_train"] == 2 and report["training"]["mend"]["cached"] is False
    for name in ("report.md", "es_dd_by_n.png", "gcr_gms_by_layer.png"):
        assert (out / name).stat().st_size > 0, name
    text = (out / "report.md").read_text()
    assert "| MEND | 2 |" in text and "| FT | 1 |" in text
    assert f"wrote {out / 'report.md'}" in capsys.readouterr().out


def test_a_whole_report_of_the_routed_methods_adds_their_fusion_rows(report_module, tmp_path, monkeypatch):
    """RaEditor and MoEditor with --fusions add (`_tiny_report`): one MoEditor is trained (RaEditor is
    its random-routing twin), each method gets its own rows and an "add" row at every N_u, and the
    editor line records the fusion MoEditor trained with (sss) and its gate's top-k."""
    report, out = _tiny_report(report_module, tmp_path, monkeypatch, "--methods", "raeditor,moeditor",
                               "--n-editors", "2", "--fusions", "add")
    assert set(report["methods"]) == {"raeditor", "moeditor", "raeditor:add", "moeditor:add"}
    for rows in report["methods"].values():
        assert set(rows["by_n"]) == {"1", "2"}
    assert set(report["training"]) == {"moeditor"}
    assert report["editor"]["fusion"] == "sss" and report["editor"]["n_editors"] == 2
    assert report["editor"]["top_k"] is not None and report["edit_statistics"] == {}
    text = (out / "report.md").read_text()
    for row in ("| RaEditor | 1 |", "| MoEditor | 2 |", "| RaEditor (add) | 1 |", "| MoEditor (add) | 2 |"):
        assert row in text, row


def test_raeditors_edit_statistics_are_of_the_split_its_scores_were_measured_on(report_module, tmp_path, monkeypatch):
    """--edit-stats with RaEditor (`_tiny_report`, 3 editors, 3 repeats): each N_u's routing counts
    are those of the apply that scored that N_u's first sample.  Every run draws RaEditor's random
    groups from one generator; the statistics restarted it and took one draw per N_u, so from the
    second N_u on they described another split (edits_as_applied recorded here, call by call)."""
    monkeypatch.setenv("DCEDIT_CACHE_DIR", str(tmp_path / "cache"))
    calls = []
    as_applied = ModelEditor.edits_as_applied

    def recorded(self, *args, **kwargs):
        edits = as_applied(self, *args, **kwargs)
        if self.method == "raeditor":
            calls.append({name: torch.bincount(e.edit_group.cpu(), minlength=e.n_groups).tolist()
                          for name, e in edits.items()})
        return edits

    monkeypatch.setattr(ModelEditor, "edits_as_applied", recorded)
    sizes, repeats = (2, 1, 4), 3
    report, _ = _tiny_report(report_module, tmp_path, monkeypatch, "--methods", "raeditor", "--n-editors", "3",
                             "--edit-stats", "--repeats", str(repeats), "--n-edits", ",".join(map(str, sizes)))
    evaluated = calls[:len(sizes) * repeats]  # evaluate_method's applies, N_u by N_u, repeat by repeat
    for k, n in enumerate(sizes):
        stats = report["edit_statistics"]["raeditor"][str(n)]
        assert {name: st["edits_per_editor"] for name, st in stats.items()} == evaluated[k * repeats], n


def _cf_record(i, words, locality=True, **changes):
    """A CounterFact record (EasyEdit's fields) of edit `i`, its words drawn by the caller."""
    a, b, c, d = words
    record = dict(case_id=i, prompt=f"The {a} {i} flows into", target_new=f"{b[:3]}{i % 3}", subject=f"{a} {i}",
                  ground_truth="lake", rephrase_prompt=f"The {a} {i} ends in the")
    if locality:
        record.update(locality_prompt=f"A {c} thing {i} is", locality_ground_truth=d[:2])
    record.update(changes)
    return record


def _report_on(report_module, tmp_path, monkeypatch, evaluated, training, *extra):
    """python/report.py on a tiny Llama (blocks 0 and 1) over these CounterFact records, editors
    cached under tmp_path: (report.json's content, report.md's text, the output folder)."""
    import json

    import dcedit_kernels.models as models

    tiny = models.tiny_model("llama", seed=0)
    monkeypatch.setattr(models, "load_model", lambda *args, **kwargs: tiny)
    monkeypatch.setattr(models, "default_model_path", lambda: tmp_path / "tiny.gguf")
    monkeypatch.setenv("DCEDIT_CACHE_DIR", str(tmp_path / "cache"))
    (tmp_path / "val.json").write_text(json.dumps(evaluated))
    (tmp_path / "train.json").write_text(json.dumps(training))
    out = tmp_path / "out"
    assert report_module.main(["--data", str(tmp_path / "val.json"), "--train-data", str(tmp_path / "train.json"),
                               "--layers", "0,1", "--gradient-layers", "1", "--rank", "2", "--steps", "4",
                               "--batch-size", str(len(training)), "--lr", "0.05", "--out-dir", str(out),
                               "--no-progress", *extra]) == 0
    return json.loads((out / "report.json").read_text()), (out / "report.md").read_text(), out


def _table_cells(text, row):
    """The cells after "method | N_u" of the Markdown table row that starts with `row`."""
    lines = [line for line in text.splitlines() if line.startswith(row + " |") and line.count("|") == 10]
    assert len(lines) == 1, (row, lines)
    return [cell.strip() for cell in lines[0].split("|")[3:-1]]


def test_the_reports_table_is_the_mean_and_population_std_of_runs_recomputed_alone(report_module, gen, tmp_path,
                                                                                   monkeypatch):
    """Clean-room check of the whole table: every cell of the FT, MEND and unedited rows is the
    float64 mean and population std over the repeats of scores recomputed here, run by run (the
    held-out edits that sample_indices(seed 0) picks, applied alone with a fresh FT editor or the
    MEND the report cached, scored with `metrics`, undone); the evaluation edits that are training
    edits (same prompt and target) are never sampled; every method sees the same samples; the
    latency and memory cells are the mean ± std of their own values."""
    import math

    from dcedit_kernels import metrics
    from dcedit_kernels.evaluate import sample_indices
    from dcedit_kernels.requests import EditRequest

    pool = ["red", "blue", "green", "stone", "river", "cloud", "iron", "salt", "sea", "gold"]

    def words():
        return [pool[int(k)] for k in torch.randint(len(pool), (4,), generator=gen)]

    evaluated = [_cf_record(i, words()) for i in range(9)]
    twins = torch.randperm(9, generator=gen)[:2].tolist()  # two evaluation edits are training edits too
    scored = next(i for i in range(9) if i not in twins)  # a training edit shares this one's locality prompt
    training = [dict(evaluated[twins[0]]), _cf_record(20, words()), dict(evaluated[twins[1]]),
                _cf_record(21, words(), locality_prompt=evaluated[scored]["locality_prompt"])]
    sizes, repeats = (2, 3), 2
    report, text, _ = _report_on(report_module, tmp_path, monkeypatch, evaluated, training, "--methods", "ft,mend",
                                 "--n-edits", "2,3", "--repeats", str(repeats), "--ft-steps", "8")
    held = [EditRequest(r["prompt"], r["target_new"], rephrase=r["rephrase_prompt"], locality=r["locality_prompt"],
                        locality_target=r["locality_ground_truth"]) for i, r in enumerate(evaluated) if i not in twins]
    assert report["n_requests"] == len(held) == 7 and report["n_held_out"] == 2 and report["n_train_unlocalized"] == 1
    import dcedit_kernels.models as models

    model, tok = models.load_model()  # the report's tiny Llama (patched), unedited again
    layers = report["layers"]
    editors = {"ft": ModelEditor(model, tok, layers, method="ft", ft_steps=8),
               "mend": ModelEditor.load(report["training"]["mend"]["path"], model, tok), "unedited": None}

    def scores(sample, editor):
        base = metrics.locality_predictions(model, tok, sample)
        handle = None if editor is None else editor.apply(
            [EditRequest(q.prompt, q.target, rephrase=q.rephrase) for q in sample])
        try:
            es = float(metrics.edit_success(model, tok, sample))
            dd = 0.0 if editor is None else float(metrics.drawdown(model, tok, sample, base))
            return dict(es=es, reliability=float(metrics.reliability(model, tok, sample)), dd=dd, lmp=es - dd,
                        ns=float(metrics.neighbourhood_success(model, tok, sample)))
        finally:
            if handle is not None:
                handle.undo()

    def mean_std(values):
        mean = math.fsum(values) / len(values)
        return mean, math.sqrt(math.fsum((v - mean) ** 2 for v in values) / len(values))

    names = {"unedited": "| unedited", "ft": "| FT", "mend": "| MEND"}
    for key, editor in editors.items():
        rows = report["unedited"] if key == "unedited" else report["methods"][key]["by_n"]
        if key != "unedited":
            runs = report["methods"][key]["runs"]
            assert [(run["n_edits"], run["repeat"], run["indices"]) for run in runs] == [
                (n, r, sample_indices(len(held), n, 0, r)) for n in sizes for r in range(repeats)]
        for n in sizes:
            mine = [scores([held[i] for i in sample_indices(len(held), n, 0, r)], editor) for r in range(repeats)]
            cells = _table_cells(text, f"{names[key]} | {n}")
            for column, metric in enumerate(("es", "reliability", "dd", "lmp", "ns")):
                mean, std = mean_std([run[metric] for run in mine])
                assert rows[str(n)][metric]["mean"] == pytest.approx(mean, abs=1e-12), (key, n, metric)
                assert rows[str(n)][metric]["std"] == pytest.approx(std, abs=1e-12), (key, n, metric)
                shown_mean, shown_std = (float(x) for x in cells[column].split(" ± "))
                assert cells[column] == f"{shown_mean:.3f} ± {shown_std:.3f}", cells[column]
                assert abs(shown_mean - mean) <= 5e-4 + 1e-9 and abs(shown_std - std) <= 5e-4 + 1e-9, (key, n, metric)
            for column, metric, digits in ((5, "latency_s", 2), (6, "peak_memory_mb", 0)):
                if key == "unedited":
                    assert cells[column] == "–"
                    continue
                mean, std = mean_std(rows[str(n)][metric]["values"])
                assert len(rows[str(n)][metric]["values"]) == repeats
                assert rows[str(n)][metric]["mean"] == pytest.approx(mean, abs=1e-12)
                assert rows[str(n)][metric]["std"] == pytest.approx(std, abs=1e-12)
                shown_mean, shown_std = (float(x) for x in cells[column].split(" ± "))
                assert abs(shown_mean - mean) <= 0.5 * 10 ** -digits + 1e-9
                assert abs(shown_std - std) <= 0.5 * 10 ** -digits + 1e-9
    # The editor trained at lr 0.05 changes predictions (DD > 0), so the MEND cells are not all zeros.
    assert any(report["methods"]["mend"]["by_n"][str(n)]["dd"]["mean"] > 0 for n in sizes)


def test_a_report_on_edits_without_locality_prompts_renders_dd_and_lmp_as_missing(report_module, gen, tmp_path,
                                                                                  monkeypatch):
    """Evaluation edits without a locality prompt have no DD and no LMP (None): the report renders
    "–" in those cells and still writes report.md and the plots.  Before, plot_es_dd handed the
    None means to matplotlib's errorbar, which raised after the whole evaluation, with report.json
    written and no report.md."""
    pool = ["red", "blue", "green", "stone", "river", "cloud", "iron", "salt"]
    evaluated = [_cf_record(i, [pool[int(k)] for k in torch.randint(len(pool), (4,), generator=gen)], locality=False)
                 for i in range(5)]
    report, text, out = _report_on(report_module, tmp_path, monkeypatch, evaluated, evaluated[:1], "--methods", "ft",
                                   "--n-edits", "1,2", "--repeats", "2", "--ft-steps", "1")
    for n in (1, 2):
        assert report["methods"]["ft"]["by_n"][str(n)]["dd"]["mean"] is None
        cells = _table_cells(text, f"| FT | {n}")
        assert cells[2] == "–" and cells[3] == "–" and cells[4] == "–"  # DD, LMP, NS
        assert cells[0] != "–" and cells[1] != "–"  # ES, rel
    assert (out / "es_dd_by_n.png").stat().st_size > 0


def _cut_short(write, marker: str):
    """`write(self, target, ...)` (Path.write_text, Figure.savefig) that, for a target whose name
    holds `marker`, writes half of what it would and then fails as a full disk does."""
    import errno
    import io

    def cut(self, target, *args, **kwargs):
        file = self if isinstance(self, Path) else target  # Path.write_text(self: the file, target: the text)
        if marker not in Path(file).name:
            return write(self, target, *args, **kwargs)
        if isinstance(self, Path):
            file, data = self, target.encode()
        else:
            buffer = io.BytesIO()
            write(self, buffer, *args, **{"format": "png", **kwargs})
            data = buffer.getvalue()
        Path(file).write_bytes(data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device", str(file))

    return cut


def test_a_plot_cut_short_leaves_the_previous_plot_whole(report_module, tmp_path, monkeypatch):
    """The plots were saved in place (savefig to the path): a write cut short (a full disk, a Ctrl-C)
    left half a PNG over the previous run's.  They are written beside the path and moved over it,
    as report.json is: the previous plot stays whole, no temporary file is left, and a plot that is
    written is a whole PNG."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    report, layers = _report({"mend": _result(0.2, 0.1)})
    png = tmp_path / "es_dd_by_n.png"
    png.write_bytes(b"the previous plot")
    with monkeypatch.context() as patched:
        patched.setattr(Figure, "savefig", _cut_short(Figure.savefig, "es_dd_by_n.png"))
        with pytest.raises(OSError):
            report_module.plot_es_dd(report["methods"], SIZES, png)
    assert png.read_bytes() == b"the previous plot"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["es_dd_by_n.png"]
    report_module.plot_es_dd(report["methods"], SIZES, png)
    assert png.read_bytes().startswith(b"\x89PNG") and sorted(p.name for p in tmp_path.iterdir()) == ["es_dd_by_n.png"]


def test_the_demos_plot_cut_short_leaves_the_previous_plot_whole(tmp_path, monkeypatch):
    """edit_demo.py saved es_dd.png in place (savefig to the path), as the report's plots were: it goes
    through the same atomic save_figure now."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    results = {"mend": dict(es=0.5, dd=0.1, lmp=0.4), "ft": dict(es=0.9, dd=0.3, lmp=0.6)}
    png = tmp_path / "es_dd.png"
    png.write_bytes(b"the previous plot")
    demo = _demo_module()
    with monkeypatch.context() as patched:
        patched.setattr(Figure, "savefig", _cut_short(Figure.savefig, "es_dd.png"))
        with pytest.raises(OSError):
            demo.plot(results, png, "a title")
    assert png.read_bytes() == b"the previous plot"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["es_dd.png"]
    demo.plot(results, png, "a title")
    assert png.read_bytes().startswith(b"\x89PNG") and sorted(p.name for p in tmp_path.iterdir()) == ["es_dd.png"]


def test_a_markdown_write_cut_short_leaves_the_previous_report_whole(report_module, tmp_path, monkeypatch):
    """report.md was written in place (Path.write_text) at the end of the run: a write cut short
    left half a report over the previous run's good one.  It is written beside the path and moved
    over it (`_tiny_report`): the previous report.md stays whole and no temporary file is left."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "report.md").write_text("the previous report")
    monkeypatch.setattr(Path, "write_text", _cut_short(Path.write_text, "report.md"))
    with pytest.raises(OSError):
        _tiny_report(report_module, tmp_path, monkeypatch, "--methods", "ft")
    assert (out / "report.md").read_text() == "the previous report"
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]


def test_first_sample_statistics_draw_the_other_samples_routing_only(report_module, gen, monkeypatch):
    """--edit-stats computed every evaluation run's `edit_statistics` (a capture of the model each)
    and dropped all but each N_u's first, only to advance RaEditor's routing generators as the runs
    between two first samples did.  `skip_routing` draws those runs' routing alone: the statistics
    and the generators' states after are the same as the full replay's (3 editors, GPT-2's layers, two
    of them one editor's modes, which draws twice per apply), with one `edit_statistics` per N_u."""
    from dcedit_kernels import evaluate
    from test_model_editor import LAYERS, random_requests

    model, tok = tiny_model("gpt2", seed=0)
    me = ModelEditor(model, tok, LAYERS["gpt2"], method="raeditor", n_editors=3, rank=2, seed=1)
    requests, sizes, repeats = random_requests(gen, 8), [2, 5, 3], 3
    start = me.route_states()
    replayed = {}
    for n in sizes:  # the replay before: every run's statistics, each N_u's first kept
        for r in range(repeats):
            stats = evaluate.edit_statistics(me, [requests[i] for i in evaluate.sample_indices(len(requests), n, 0, r)])
            replayed.setdefault(n, stats)
    after = me.route_states()
    me.set_route_states(start)
    calls, edit_statistics = [], evaluate.edit_statistics
    monkeypatch.setattr(evaluate, "edit_statistics", lambda *args: calls.append(1) or edit_statistics(*args))
    assert report_module.first_sample_statistics(me, requests, sizes, repeats, 0) == replayed
    assert len(calls) == len(sizes)
    assert {key: torch.equal(state, after[key]) for key, state in me.route_states().items()} == dict.fromkeys(after, True)


@pytest.mark.parametrize("program, extra, said", [
    ("report", ["--layers", "0,9"], "--layers"),  # after the model's load
    ("report", ["--gradient-layers", "9"], "--gradient-layers"),  # after the model's load
    ("report", ["--no-matplotlib"], "matplotlib"),
    ("demo", ["--no-matplotlib"], "matplotlib"),
])
def test_a_refused_report_or_demo_leaves_its_out_folder_as_it_was(program, extra, said, report_module, capsys,
                                                                  tmp_path, monkeypatch):
    """report.py and edit_demo.py made their --out-dir / --out (and --markdown's) folder before any work:
    a run refused after that (a block the model lacks; the demo: no matplotlib) left them behind,
    empty.  They are made when the files are written; a folder the user made stays as it was."""
    import json
    import sys

    import dcedit_kernels.models as models

    from test_demo import _demo_module

    tiny = models.tiny_model("llama", seed=0)
    monkeypatch.setattr(models, "load_model", lambda *args, **kwargs: tiny)
    monkeypatch.setattr(models, "default_model_path", lambda: tmp_path / "tiny.gguf")
    if "--no-matplotlib" in extra:
        monkeypatch.setitem(sys.modules, "matplotlib", None)  # import raises ImportError
        extra = []
    data = _counterfact_file(tmp_path / "cf.json", n=6)
    depth = random.randint(0, 2)

    def run(out: Path) -> int:
        if program == "demo":
            return _demo_module().main(["--quick", "--no-progress", "--out", str(out)])
        md = [] if random.random() < 0.5 else ["--markdown", str(out / "md" / "r.md")]
        return report_module.main(["--data", str(data), "--methods", "ft", "--n-edits", "2", "--repeats", "1",
                                   "--layers", "0,1", "--gradient-layers", "1", *extra, *md,
                                   "--out-dir", str(out), "--no-progress"])

    new = tmp_path / "new"
    assert run(new.joinpath(*["sub"] * depth)) == 2
    assert said in capsys.readouterr().err
    assert not new.exists()
    kept = tmp_path / "kept"  # the user's own folder, with a previous run's files
    kept.mkdir()
    (kept / "results.json" if program == "demo" else kept / "report.json").write_text(json.dumps({"old": 1}))
    before = sorted((p.name, p.read_bytes()) for p in kept.iterdir())
    assert run(kept) == 2
    assert said in capsys.readouterr().err
    assert sorted((p.name, p.read_bytes()) for p in kept.iterdir()) == before


def test_threads_past_a_c_int_are_refused_by_flag(report_module, capsys):
    """torch.set_num_threads takes a C int: --threads 2**31 ended in its bare "Overflow when unpacking
    long" traceback; now argparse's line naming the flag (exit status 2)."""
    with pytest.raises(SystemExit) as exit_info:
        report_module.parse_args(["--threads", str(2**31)])
    assert exit_info.value.code == 2
    assert "argument --threads: must be a positive int up to 2**31 - 1, got '2147483648'" in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--lr", "--lr-lr", "--balance-weight", "--cedit", "--cloc"])
@pytest.mark.parametrize("value", ["nan", "inf", "-1", "x"])
def test_rates_and_loss_weights_are_refused_by_flag(report_module, capsys, flag, value):
    """A bad --lr, --lr-lr or loss weight was refused by TrainConfig under its Python field's name
    ("report: error: lr must be a non-negative finite number, got nan"); now argparse names the flag,
    as dcedit train's --lr (`cli.rate`)."""
    with pytest.raises(SystemExit) as exit_info:
        report_module.parse_args([flag, value])
    assert exit_info.value.code == 2
    what = "a number" if value == "x" else "a non-negative finite number"
    assert f"argument {flag}: must be {what}, got '{value}'" in capsys.readouterr().err
    assert getattr(report_module.parse_args([flag, "0.5"]), flag[2:].replace("-", "_")) == 0.5


@pytest.mark.parametrize("method", ["moeditor", "raeditor"])
def test_an_editor_too_large_for_the_machine_is_one_error_line(method, report_module, capsys, tmp_path, monkeypatch):
    """--n-editors 10**11: GroupedEditor's size check (editor_size) refused it after the model loaded
    with a ValueError traceback; now one error line naming the sizes, exit status 2, no report."""
    data = _tiny_model_and_data(tmp_path, monkeypatch)
    out = tmp_path / "out"
    assert report_module.main(["--data", str(data), "--train-data", str(data), "--n-train", "2", "--n-edits", "1",
                               "--layers", "0,1", "--gradient-layers", "1", "--methods", method, "--n-editors", str(10**11), "--no-cache",
                               "--out-dir", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "report: error:" in err and f"n_editors={10**11}" in err and "lower these sizes" in err
    assert "Traceback" not in err and not out.exists()
