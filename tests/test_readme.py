"""The README's Python snippets stay true to the API.

The editors-on-their-own snippet runs as written, on random gradient factors of its shapes: the
weight changes and `ops.undo_shift_` restores it bit for bit.  The training-loop snippet runs as
written on the tiny Llama: its steps lower the edit loss, every editor parameter gets a gradient,
and a batch with a non-finite gradient is skipped with the running norms put back.  The ModelEditor snippet needs a
trained editor on SmolLM2 (minutes), so here it is compiled and every name it imports, and every
keyword it passes to ModelEditor, TrainConfig and EditRequest, is checked against the code
(tests/test_model_editor.py runs that path on tiny models).
"""

import ast
import builtins
import importlib
import inspect
import re
from pathlib import Path

import torch

import dcedit_kernels
from dcedit_kernels import GroupedEditor
from dcedit_kernels.model_editor import EDITOR_METHODS

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def snippet(marker: str) -> str:
    found = [block for block in python_blocks() if marker in block]
    assert len(found) == 1, f"one README python block should contain {marker!r}, found {len(found)}"
    return found[0]


def test_editor_snippet_runs(gen):
    code = snippet("ops.undo_shift_")
    T, E = 13, 3
    namespace = dict(
        mu=torch.randn(T, 1536, generator=gen), eta=torch.randn(T, 576, generator=gen),
        edit_offsets=torch.tensor([0, 4, 9, T], dtype=torch.int32),
        feats=torch.randn(E, 576, generator=gen), weight=torch.randn(576, 1536, generator=gen),
    )
    before = namespace["weight"].clone()
    code = code.replace("ops.undo_shift_(weight, previous)", "changed = weight.clone()\n" +
                        "ops.undo_shift_(weight, previous)")
    exec(compile(code, str(README), "exec"), namespace)
    assert not torch.equal(namespace["changed"], before)
    assert torch.equal(namespace["weight"], before)
    assert not namespace["ed"].training  # the snippet's eval(): no running-statistics update or gate noise


def test_editor_training_snippet_runs(test_seed):
    """The user's own training loop, as written: its namespace gets the model, tokenizer, layer and
    `batches`, a generator that records each step's edit loss and, for the last batch, makes the
    editor's gradient NaN (a hook on alpha), as an fp16 overflow would."""
    from dcedit_kernels.models import tiny_model

    code = snippet("lowrank_edited(model")
    model, tok = tiny_model("llama", seed=test_seed % 2**31)
    edits = (["The capital of France is", "Water boils at", "The sky is"], ["Rome", "ten degrees", "green"],
             ["France's capital city is", "The boiling point of water is", "The colour of the sky is"])
    namespace, losses, at_last = {}, [], {}
    steps = 4

    def batches():
        for step in range(steps + 1):
            if step == steps:
                ed = namespace["ed"]
                at_last.update(grads={n: p.grad for n, p in ed.named_parameters()},
                               params={n: p.detach().clone() for n, p in ed.named_parameters()},
                               buffers={n: b.clone() for n, b in ed.named_buffers()})
                hook = ed.alpha.register_hook(lambda g: torch.full_like(g, float("nan")))
            yield edits
            losses.append(namespace["edit_loss"].item())
        hook.remove()

    namespace.update(model=model, tok=tok, layer="model.layers.1.mlp.down_proj", batches=batches())
    exec(compile(code, str(README), "exec"), namespace)
    ed = namespace["ed"]
    assert len(losses) == steps + 1
    assert losses[steps - 1] < losses[0], losses  # the steps lowered the rephrases' edit loss
    for name, grad in at_last["grads"].items():  # the last good step's gradients reached every parameter
        assert grad is not None and bool(grad.isfinite().all()) and bool(grad.abs().sum() > 0), name
    # The NaN batch: no optimiser step, and its factors left out of the running norms.
    for name, p in ed.named_parameters():
        assert torch.equal(p.detach(), at_last["params"][name]), name
    for name, b in ed.named_buffers():
        assert torch.equal(b, at_last["buffers"][name]), name
    assert ed.training and not any(p.requires_grad for p in model.parameters())


def _calls(tree, name):
    return [node for node in ast.walk(tree)
            if isinstance(node, ast.Call) and isinstance(node.func, (ast.Name, ast.Attribute))
            and (node.func.id if isinstance(node.func, ast.Name) else node.func.attr) == name]


def test_model_editor_snippet_matches_the_api():
    code = snippet("ModelEditor(")
    tree = ast.parse(code.replace("...", "pass"))
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module.split(".")[0] == "dcedit_kernels":
            module = importlib.import_module(node.module)
            for alias in node.names:
                assert hasattr(module, alias.name), f"{node.module}.{alias.name}"
    # Every name the snippet uses is a builtin or defined by an earlier statement (or its own, as a
    # comprehension's variable is).
    defined = set(dir(builtins))
    for statement in tree.body:
        nodes = list(ast.walk(statement))
        stored = {n.id for n in nodes if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
        stored |= {a.asname or a.name for n in nodes if isinstance(n, ast.ImportFrom) for a in n.names}
        used = {n.id for n in nodes if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
        missing = sorted(used - defined - stored)
        assert not missing, f"line {statement.lineno}: {missing} not defined yet"
        defined |= stored
    for name in ("ModelEditor", "TrainConfig", "EditRequest"):
        signature = inspect.signature(getattr(dcedit_kernels, name))
        calls = _calls(tree, name)
        assert calls, name
        for call in calls:
            keywords = {k.arg for k in call.keywords}
            if name == "ModelEditor":  # the editor's own keywords go to its preset
                method = next(ast.literal_eval(k.value) for k in call.keywords if k.arg == "method")
                preset = EDITOR_METHODS[method]
                keywords -= set(inspect.signature(preset).parameters) | set(inspect.signature(GroupedEditor).parameters)
            unknown = keywords - set(signature.parameters)
            assert not unknown, f"{name} has no keyword {unknown}"


def test_ops_table_signatures_are_the_wrappers():
    """The Ops table's signatures are, as it says, the `dcedit_kernels.ops` wrappers' (every
    argument, in order), and it lists every op SPEC names."""
    from dcedit_kernels import ops

    rows = re.findall(r"^\| `(\w+)\(([^)]*)\)` \|", README.read_text(), flags=re.M)
    listed = {name: [a.strip() for a in args.split(",")] for name, args in rows}
    assert set(listed) == {"grouped_lowrank", "grouped_outer", "segmented_fisher", "fisher_mask", "apply_shift_",
                           "lowrank_delta_linear", "noisy_topk_gate", "sort_by_group"}
    for name, args in listed.items():
        assert args == list(inspect.signature(getattr(ops, name)).parameters), name
