"""Where the package's warnings are shown: at the user's line, the one that called into the package.

Each public call that warns is made from a one-line lambda (or a `with` line) of this file, and its
warning must name this file and that line (warnings' filename and lineno, what `python -W` and
pytest print), once per call, in its category.  Before session 59 the stacklevels were counted by
hand: fit's warnings showed at model_editor.py:734 (train_editor's, called directly, at the caller's
line), apply's untrained-editor warning at model_editor.py:559 (a line of apply), block_prefix's at
train_loss.py:185, and the compiled library's at _library.py:163."""

import os
import re
import subprocess
import sys
import warnings

import pytest
import torch

from dcedit_kernels.evaluate import evaluate_method, measure_edit
from dcedit_kernels.model_editor import ModelEditor
from dcedit_kernels.models import tiny_model, tiny_tokenizer
from dcedit_kernels.train import TrainConfig, train_editor

from helpers import tiny_mend
from test_model_editor import make_editor, one_thread, random_requests  # noqa: F401 (one_thread: autouse fixture)

# The two ways to train, each on a line of its own: fit reaches train_editor one frame deeper.
TRAIN = {"fit": lambda me, train, val=None, config=None: me.fit(train, val, config),
         "train_editor": lambda me, train, val=None, config=None: train_editor(me, train, val, config)}


def shown(call, said: str) -> list[tuple]:
    """(category, file, line) of each warning that call() gives whose message matches `said`."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        call()
    return [(w.category, w.filename, w.lineno) for w in caught if re.search(said, str(w.message))]


def here(line: int, category=UserWarning) -> list[tuple]:
    """One warning of `category`, shown at `line` of this file."""
    return [(category, __file__, line)]


def first_line(fn) -> int:
    return fn.__code__.co_firstlineno


@pytest.mark.parametrize("entry", sorted(TRAIN))
def test_training_warnings_show_at_the_callers_line(entry, gen, monkeypatch, tmp_path):
    """fit's and train_editor's warnings about their arguments and the model (a batch or val_size
    larger than the requests, data_parallel without a launcher, live edits), a resume that takes no
    step, and batches skipped for non-finite gradients: each once, at the line calling fit or
    train_editor."""
    from test_train_checks import _poison_batches

    train = TRAIN[entry]
    me = tiny_mend("gpt2", gen)
    requests, val = random_requests(gen, 3), random_requests(gen, 2)
    handle = me.apply(random_requests(gen, 1))  # live: fit trains on the edited model, and says so
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    config = TrainConfig(steps=2, batch_size=5, val_size=4, val_every=1, data_parallel=True, progress=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(me, requests, val, config)
    for said in ("batch_size 5 is larger than the 3", "val_size 4 is larger than the 2", "data_parallel=True",
                 "the model holds 1 live edit"):
        assert [(w.category, w.filename, w.lineno) for w in caught if said in str(w.message)] == here(
            first_line(train)), (said, [(str(w.message)[:60], w.filename, w.lineno) for w in caught])
    handle.undo()

    config = TrainConfig(steps=2, batch_size=2, checkpoint_dir=str(tmp_path), val_every=1, progress=False)
    train(me, requests, None, config)
    config.steps, config.resume = 1, True
    assert shown(lambda: train(me, requests, None, config), "had already trained 2 steps") == here(first_line(train))

    _poison_batches(monkeypatch, {r.prompt for r in requests})  # every batch non-finite: skipped
    config = TrainConfig(steps=2, batch_size=2, progress=False)
    assert shown(lambda: train(me, requests, None, config), "2 of this run.s 2 batches were skipped") == here(first_line(train))


def test_a_skipped_prefix_reuse_warns_at_the_fit_line(gen):
    """block_prefix's warning that a model's blocks 0..k-1 cannot be skipped comes from a check
    inside a pass of the model's own forward (transformers' and torch's frames between the package's):
    shown at the fit line."""
    from test_block_prefix import _exotic

    tok = tiny_tokenizer("llama")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
        model, layer = _exotic("buffer", tok)
    me = ModelEditor(model, tok, [layer], method="mend", rank=3)
    me.editors.to(torch.float64)
    config = TrainConfig(steps=1, batch_size=4, progress=False)
    requests = random_requests(gen, 4)
    fit = lambda: me.fit(requests, config=config)  # noqa: E731
    assert shown(fit, "reuse_prefix: ") == here(first_line(fit))


def test_apply_warnings_show_at_the_callers_line(gen):
    """apply's warnings (untrained editors; a 16-bit weight's shift rounded away) reach the user
    through apply, through `with editor.edited(...)` (contextlib's frame between) and through
    evaluate_method: each at the user's line, once."""
    untrained = "editors are at their initialisation"
    me = make_editor("gpt2", "mend")  # no gen: the editors as constructed
    apply = lambda: me.apply(random_requests(gen, 2)).undo()  # noqa: E731
    assert shown(apply, untrained) == here(first_line(apply))

    def edited():
        with me.edited(random_requests(gen, 1)):
            pass

    me = make_editor("gpt2", "mend")
    assert shown(edited, untrained) == here(first_line(edited) + 1)
    me = make_editor("gpt2", "mend")
    requests, runs = random_requests(gen, 2), dict(n_edits=(1,), repeats=2, progress=False)
    evaluate = lambda: evaluate_method(me.model, me.tokenizer, me, requests, **runs)  # noqa: E731
    assert shown(evaluate, untrained) == here(first_line(evaluate))

    rounding = "were lost to rounding"
    me = make_editor("llama", "mend", gen, dtype=torch.bfloat16, edit_lr=1e-7)
    assert shown(apply, rounding) == here(first_line(apply))
    me = make_editor("llama", "mend", gen, dtype=torch.bfloat16, edit_lr=1e-7)
    assert shown(edited, rounding) == here(first_line(edited) + 1)


def test_live_edit_warnings_of_the_metrics_show_at_the_callers_line(gen):
    """measure_edit's and evaluate_method's warnings that the model holds a live edit: at the
    user's line, once per call (evaluate_method's runs call measure_edit without warning)."""
    me = make_editor("gpt2", "mend", gen)
    requests = random_requests(gen, 3)
    handle = me.apply(requests[2:])
    measure = lambda: measure_edit(me, requests[:2], batch_size=2)  # noqa: E731
    assert shown(measure, "live edit") == here(first_line(measure))
    runs = dict(n_edits=(1, 2), repeats=2, progress=False)
    evaluate = lambda: evaluate_method(me.model, me.tokenizer, me, requests, **runs)  # noqa: E731
    assert shown(evaluate, "live edit") == here(first_line(evaluate))
    handle.undo()


def test_from_mend_warning_shows_at_the_callers_line(gen):
    """from_mend's warning that a non-T5 encoder-decoder's edits are not MEND's: at the caller's line."""
    from test_compat_mend import make_mend_state_dict

    model, tok = tiny_model("bart", seed=int(torch.randint(0, 100, (1,), generator=gen)))
    inner = [n for n, _ in model.named_parameters() if n.endswith("decoder.layers.1.fc1.weight")]
    shapes = {n: ModelEditor.shape_of(model.get_submodule(n[: -len(".weight")])) for n in inner}
    sd = make_mend_state_dict(gen, inner, shapes, rank=8)
    load = lambda: ModelEditor.from_mend(model, tok, sd, inner)  # noqa: E731
    assert shown(load, "encoder-decoder model other than T5") == here(first_line(load))


def test_a_compiled_library_that_fails_to_load_warns_at_the_import_line(tmp_path):
    """`import dcedit_kernels` with a dcedit_kernels._C that does not load (built for another
    torch): the RuntimeWarning shows at the script's import line, importlib's frames crossed."""
    script = tmp_path / "user_script.py"
    script.write_text(
        "import importlib.abc, sys, warnings\n"
        "class Broken(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name == 'dcedit_kernels._C':\n"
        "            raise ImportError('undefined symbol: _ZN3c10')\n"
        "sys.meta_path.insert(0, Broken())\n"
        "warnings.simplefilter('always')\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    import dcedit_kernels.ops\n"
        "print([(w.category.__name__, w.filename, w.lineno) for w in caught if '_C) failed to load' in str(w.message)])\n")
    env_path = [p for p in sys.path if p]
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "DCEDIT_DISABLE_C": "0", "PYTHONPATH": os.pathsep.join(env_path)})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == repr([("RuntimeWarning", str(script), 9)]), out.stdout + out.stderr


def test_a_caller_whose_globals_name_no_module_still_gets_the_warning():
    """A frame's globals may lack `__name__` (exec(code, {})) or hold another type there (exec with a
    namespace of the caller's own): warnings.warn takes such a frame as module "<string>".  `warn`
    called str methods on it and raised AttributeError ('int' object has no attribute 'startswith')
    or TypeError (bytes) in place of the warning."""
    from dcedit_kernels._warn import warn

    for name in (None, 5, b"dcedit_kernels", ("torch",), "dcedit_kernels_x", "torchy"):
        space = {} if name is None else {"__name__": name}
        exec(compile("def call(warn):\n    warn('from a namespace')\n", "<user code>", "exec"), space)
        assert shown(lambda: space["call"](warn), "from a namespace") == [(UserWarning, "<user code>", 2)], name
