"""What a user of any torch nn.Module does with the editors and the result objects in a notebook:
print them, move them, copy them (`repr`, `.to("meta")`)."""

import dataclasses

import pytest
import torch

from helpers import EDITOR_KINDS, OP_CASE_DIMS, editor_inputs, ragged_offsets, randn, small_editor


@pytest.mark.parametrize("method", EDITOR_KINDS)
def test_an_editor_on_the_meta_device_prints(method):
    """`print(editor)` of an editor moved to "meta" (as one builds a model before `to_empty`): the
    running norms' extra_repr read their token count with int(), which raised RuntimeError
    ("Tensor.item() cannot be called on meta tensors").  On "meta" the count has no value and is
    left out; the sizes are still shown."""
    editor = small_editor(method)
    on_cpu = repr(editor)
    assert "tokens_seen=0" in on_cpu
    text = repr(editor.to("meta"))
    assert "RunningNorm(in_features=" in text and "tokens_seen" not in text and "rows_seen" not in text
    assert text.splitlines()[1] == on_cpu.splitlines()[1]  # the editor's own arguments, as before
    if method == "moeditor":
        assert "FeatureNorm(features=" in text
    assert "tokens_seen=" in repr(editor.to_empty(device="cpu").norm)  # a count with values is shown again


@pytest.mark.parametrize("method", [*EDITOR_KINDS, "random_with_psi"])
def test_a_seeded_editor_built_on_meta_then_loaded_edits_as_the_one_built_on_the_cpu(method, gen):
    """A model skeleton's recipe: build under torch.device("meta"), `to_empty(device="cpu")`, then
    `load_state_dict`.  A seeded editor's own generator draws its initial v (and ψ's first layer),
    then its random groups; on "meta" those first draws drew nothing and left the generator where
    the seed put it, so a RaEditor built so routed the same edits to other groups than the same
    editor built on the CPU (or loaded by GroupedEditor.load), call after call.  The draws now
    advance the generator as on the CPU: the same generator state and the same edits, bit for bit."""
    from dcedit_kernels.editors import GroupedEditor

    def build(seed):
        if method == "random_with_psi":  # random routing with ψ: its first layer draws from the generator too
            d_in, d_out = OP_CASE_DIMS["d_in"], OP_CASE_DIMS["d_out"]
            return GroupedEditor(d_in, d_out, n_editors=3, rank=3, routing="random", generator="token", seed=seed)
        return small_editor(method, seed=seed)

    on_cpu = build(7)
    with torch.device("meta"):
        on_meta = build(7)
    assert all(p.is_meta for p in on_meta.parameters())
    on_meta = on_meta.to_empty(device="cpu")
    on_meta.load_state_dict(on_cpu.state_dict())
    assert torch.equal(on_meta.route_generator.get_state(), on_cpu.route_generator.get_state())
    mu, eta, offsets, feats = editor_inputs(gen)
    for _ in range(3):  # each call draws the next random groups
        a, b = (e.eval()(mu, eta, offsets, edit_feats=feats) for e in (on_cpu, on_meta))
        assert torch.equal(a.edit_group, b.edit_group) and torch.equal(a.dense(), b.dense())


def strict_draws(monkeypatch):
    """torch's draws made as strict on every device as on a GPU: a generator of another device than
    the tensor drawn into raises torch's CUDA error ("Expected a 'cuda' device type for generator
    but found 'cpu'"), where a draw into a "meta" tensor takes any generator.  With "meta" standing
    for the GPU, the CPU machine runs what a GPU default device runs."""
    real_uniform, real_randn = torch.Tensor.uniform_, torch.randn

    def check(device, generator):
        if generator is not None and torch.device(device).type != generator.device.type:
            raise RuntimeError(f"Expected a '{torch.device(device).type}' device type for generator but found "
                               f"'{generator.device.type}'")

    def uniform_(self, *args, generator=None, **kwargs):
        check(self.device, generator)
        return real_uniform(self, *args, generator=generator, **kwargs)

    def randn(*size, generator=None, device=None, **kwargs):
        check(device if device is not None else torch.get_default_device(), generator)
        return real_randn(*size, generator=generator, device=device, **kwargs)

    monkeypatch.setattr(torch.Tensor, "uniform_", uniform_)
    monkeypatch.setattr(torch, "randn", randn)


@pytest.mark.parametrize("method", [*EDITOR_KINDS, "random_with_psi"])
def test_seeded_draws_run_on_their_generators_device(method, gen, monkeypatch):
    """A seeded editor's generator is a CPU one, and its initial v (and ψ's first layer) were drawn
    into tensors on torch's default device: under torch.set_default_device("cuda") (or `with
    torch.device("cuda"):`) the build raised torch's "Expected a 'cuda' device type for generator
    but found 'cpu'".  Likewise noisy_topk_gate's noise, drawn on the features' device from the
    generator given.  Each draw now runs on its generator's device and is copied (moved) where it
    goes.  No GPU here: "meta" stands for it, with torch's draws as strict as a GPU's
    (`strict_draws`; before the fix the build raised there, as on a GPU)."""
    from dcedit_kernels import ops
    from dcedit_kernels.editors import GroupedEditor

    def build(seed):
        if method == "random_with_psi":  # ψ's first layer draws from the generator too
            d_in, d_out = OP_CASE_DIMS["d_in"], OP_CASE_DIMS["d_out"]
            return GroupedEditor(d_in, d_out, n_editors=3, rank=3, routing="random", generator="token", seed=seed)
        return small_editor(method, seed=seed)

    seed = int(torch.randint(0, 2**31, (1,), generator=gen))
    on_cpu = build(seed)
    strict_draws(monkeypatch)
    with torch.device("meta"):
        elsewhere = build(seed)
    assert all(p.is_meta for p in elsewhere.parameters())
    # The same draws as on the CPU: the routing generator (which drew v) is where the CPU build left it.
    assert torch.equal(elsewhere.route_generator.get_state(), on_cpu.route_generator.get_state())

    E, f, G = 5, 4, 3
    feats, w = torch.randn(E, f, device="meta"), torch.randn(f, G, device="meta")
    g = torch.Generator().manual_seed(seed)
    gates, chosen, loss = ops.noisy_topk_gate(feats, w, w, k=2, training=True, generator=g)
    assert gates.is_meta and chosen.is_meta and loss.is_meta
    want = torch.Generator().manual_seed(seed)
    torch.randn(E, G, generator=want)  # the noise's one draw, on the CPU
    assert torch.equal(g.get_state(), want.get_state())


def global_draws_raise(monkeypatch):
    """torch's in-place and factory draws raise when they would draw from a device's global
    generator (generator=None, a tensor not on "meta": a meta draw draws nothing)."""
    def refusing(real, name, factory):
        def draw(*args, generator=None, **kwargs):
            if factory:
                device = torch.device(kwargs.get("device") or torch.get_default_device())
            else:
                device = args[0].device
            if generator is None and device.type != "meta":
                raise AssertionError(f"{name} drew from the global generator of {device}")
            return real(*args, generator=generator, **kwargs)
        return draw

    for name in ("uniform_", "normal_", "random_", "bernoulli_", "exponential_"):
        monkeypatch.setattr(torch.Tensor, name, refusing(getattr(torch.Tensor, name), f"Tensor.{name}", False))
    for name in ("rand", "randn", "randint", "randperm"):
        monkeypatch.setattr(torch, name, refusing(getattr(torch, name), f"torch.{name}", True))


@pytest.mark.parametrize("method", [*EDITOR_KINDS, "random_with_psi", "sentence_psi"])
def test_a_seeded_build_draws_nothing_from_the_global_generators_on_any_device(method, gen, monkeypatch):
    """A seeded editor draws its initial values from its own generator only.  ψ's layers were
    built as nn.Linear, whose default initialisation (then overwritten) drew from the default
    device's global generator inside `fork_rng(devices=[])`, which restores the CPU's generator
    only: under torch.set_default_device("cuda") a seeded ProEditor's build advanced the global
    CUDA generator.  No GPU here: the build runs on the CPU with every draw from a global generator
    made to raise (`global_draws_raise`; before the fix ψ's fc1 kaiming_uniform_ raised there,
    a draw that on the CPU fork_rng hid), and gives the same values as an unpatched build."""
    from dcedit_kernels.editors import GroupedEditor

    d_in, d_out = OP_CASE_DIMS["d_in"], OP_CASE_DIMS["d_out"]

    def build(seed):
        if method == "random_with_psi":
            return GroupedEditor(d_in, d_out, n_editors=3, rank=3, routing="random", generator="token", seed=seed)
        if method == "sentence_psi":
            return small_editor("proeditor", seed=seed, generator="sentence")
        return small_editor(method, seed=seed)

    seed = int(torch.randint(0, 2**31, (1,), generator=gen))
    before = build(seed)
    state = torch.get_rng_state()
    global_draws_raise(monkeypatch)
    again = build(seed)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(again.route_generator.get_state(), before.route_generator.get_state())
    for (name, a), b in zip(before.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), name
    with torch.device("meta"):  # and on a device that is not the generator's
        assert all(p.is_meta for p in build(seed).parameters())


@pytest.mark.parametrize("level", ["token", "sentence"])
def test_a_seeded_psi_is_built_where_torch_device_puts_the_rest(level, gen, monkeypatch):
    """Inside `with torch.device(...)` a seeded ProEditor's ψ lies with its other parameters.  ψ's
    layers went to torch.get_default_device(), which before torch 2.8 ignores that context
    (pytorch#131328: the package takes torch >= 2.5): under `with torch.device("meta")` fc1/fc2 were
    real CPU tensors beside meta ones.  That older behaviour is patched in here (no
    set_default_device in this test, so it gives "cpu"), the real one on this torch also checked."""
    from dcedit_kernels import ProEditor

    dims = dict(in_features=int(torch.randint(2, 9, (1,), generator=gen)),
                out_features=int(torch.randint(2, 9, (1,), generator=gen)), rank=2, generator=level,
                seed=int(torch.randint(0, 2**31, (1,), generator=gen)))
    for patched in (False, True):
        if patched:
            monkeypatch.setattr(torch, "get_default_device", lambda: torch.device("cpu"))
        with torch.device("meta"):
            ed = ProEditor(**dims)
        elsewhere = {name: p.device.type for name, p in ed.named_parameters() if not p.is_meta}
        assert not elsewhere, (patched, elsewhere)


def test_a_train_results_repr_summarises_its_histories():
    """`editor.fit(...)` as a notebook cell's last line prints its TrainResult: the dataclass's repr
    wrote out every step's dict (26 KB for the README's 200 steps; here, 10,000 steps, 0.96 MB).  It shows
    each history's length and last entry; the lists and equality are as before."""
    from dcedit_kernels.train_config import TrainResult

    history = [dict(step=i + 1, loss=1 / (i + 1), edit=2.0, kl=0.123456789, balance=0.0) for i in range(10_000)]
    val_history = [dict(step=50 * i, es=i / 200, es_all=0.5, nll=1.0) for i in range(1, 201)]
    result = TrainResult(steps=10_000, history=history, val_history=val_history, best_step=9_950, best_es=0.995,
                         elapsed_s=4321.123456)
    text = repr(result)
    assert len(text) < 500, len(text)
    assert text.startswith("TrainResult(steps=10000, history=<10000 steps, last {'step': 10000, 'loss': 0.0001, ")
    assert "val_history=<200 validations, last {'step': 10000, 'es': 1.0, 'es_all': 0.5, 'nll': 1.0}>" in text
    assert text.endswith("best_step=9950, best_es=0.995, stopped_early=False, resumed_from=None, skipped_batches=0, "
                         "elapsed_s=4321.1)")
    assert "history=<1 step, last {'step': 1}>" in repr(TrainResult(steps=1, history=[{"step": 1}]))
    assert "history=<0 steps>, val_history=<0 validations>" in repr(TrainResult(steps=0))
    assert result.history is history and result == dataclasses.replace(result)


@pytest.mark.parametrize("method", EDITOR_KINDS)
def test_a_grouped_edits_repr_shows_its_sizes_not_its_tensors(method, gen):
    """`edit = ed(mu, eta, offsets)` in a notebook shows the edit: the dataclass's repr printed the
    factors, the group per edit and ProEditor's o×i Fisher matrix as (summarised) tensors, with no
    shape, number of groups, tokens or edits.  It shows those sizes and the options; on "meta" it
    leaves out alpha, which has no value there."""
    mu, eta, offsets, feats = editor_inputs(gen)
    editor = small_editor(method).eval()
    edit = editor(mu, eta, offsets, edit_feats=feats)
    text = repr(edit)
    assert "tensor(" not in text
    groups = 3 if method in ("raeditor", "moeditor") else 1
    assert text.startswith(f"GroupedEdit(groups={groups}, tokens={edit.mu_t.shape[0]}, "
                           f"in_features={OP_CASE_DIMS['d_in']}, out_features={OP_CASE_DIMS['d_out']}, "
                           f"edits={offsets.numel() - 1}, fusion={editor.fusion!r}, alpha=-0.0001")
    assert ("fisher_keep=0.7" in text) == (method == "proeditor")
    assert text.endswith("dtype=torch.float32, device=cpu)")
    on_meta = dataclasses.replace(edit, mu_t=edit.mu_t.to("meta"), eta_t=edit.eta_t.to("meta"),
                                  alpha=edit.alpha.to("meta"))
    assert "alpha=" not in repr(on_meta) and repr(on_meta).endswith("device=meta)")


def test_an_editors_layers_print_their_sizes():
    """print(editor) showed its low-rank layers, most of its parameters, as "2 x Module()": no
    sizes, and the rank in use nowhere (the editor's own line shows the rank asked for, 1920 by
    default, capped at in + out features).  Each layer now shows its editors, width, rank and modes;
    the parameters' names, and so the state dict and checkpoints, are as before."""
    from dcedit_kernels import MoEditor

    editor = MoEditor(16, 12, n_editors=3, n_modes=2)
    text = repr(editor)
    assert "rank=1920" in text.splitlines()[1]
    assert "(0-1): 2 x LowRankLayer(n_editors=3, features=28, rank=28, n_modes=2)" in text
    assert "Module()" not in text
    fields = ("u", "v", "bias", "mode_scale", "mode_shift")
    assert [n for n, _ in editor.named_parameters()] == (
        ["alpha", "w_gate", "w_noise"] + [f"layers.{k}.{f}" for k in range(2) for f in fields])
    layer = small_editor("mend", n_layers=3).to("meta").layers[2]  # sizes only: printable on "meta" too
    G, d, r = layer.u.shape
    assert repr(layer) == f"LowRankLayer(n_editors={G}, features={d}, rank={r}, n_modes=1)"


def test_factors_repr_shows_their_sizes_not_their_tensors(gen):
    """`compute_factors` returns a Factors per layer, which a notebook shows as a dict: the
    dataclass's repr printed μ, η and the offsets as (summarised) tensors, without shapes or the
    number of edits and tokens."""
    from dcedit_kernels.capture import Factors

    factors = Factors(randn((40, 1536), gen), randn((40, 576), gen), ragged_offsets([12, 0, 28]))
    text = repr({"model.layers.27.mlp.down_proj": factors})
    assert "tensor(" not in text
    assert text == ("{'model.layers.27.mlp.down_proj': Factors(edits=3, tokens=40, in_features=1536, out_features=576, "
                    "dtype=torch.float32, device=cpu)}")
    on_meta = Factors(factors.mu.to("meta"), factors.eta.to("meta"), factors.edit_offsets.to("meta"))
    assert repr(on_meta) == ("Factors(edits=3, tokens=40, in_features=1536, out_features=576, dtype=torch.float32, "
                             "device=meta)")


def _public_callables():
    """{name: function} of the public API: the functions of `dcedit_kernels.__all__`, `ops.__all__`,
    `data.__all__` and `train.__all__`, and the public methods (and constructors) of the classes
    among them."""
    import importlib
    import inspect

    found = {}
    for module_name in ("dcedit_kernels", "dcedit_kernels.ops", "dcedit_kernels.data", "dcedit_kernels.train"):
        module = importlib.import_module(module_name)
        for name in module.__all__:
            if name.startswith("_"):
                continue
            obj = getattr(module, name)
            if inspect.isclass(obj):
                for attr, member in vars(obj).items():
                    member = getattr(member, "__func__", member)  # classmethod, staticmethod
                    if inspect.isfunction(member) and (not attr.startswith("_") or attr == "__init__"):
                        found[f"{module_name}.{name}.{attr}"] = member
            elif inspect.isfunction(obj):
                found[f"{module_name}.{name}"] = obj
    return found


def test_every_public_function_is_annotated_for_type_checkers():
    """mypy --strict (disallow_untyped_calls) refuses a call, from annotated code, of a function with
    no annotation at all: a user script of the README's API failed on `editor.fit(...)`,
    `editor.parameters()` and `ops.undo_shift_(...)` ("Call to untyped function ... in typed
    context"), and every op wrapper (`ops.grouped_outer`, ...) returned Any.  Each public function
    now has at least its return type (the arguments the wrappers check at run time stay open)."""
    import inspect
    import typing

    import dcedit_kernels

    found = _public_callables()
    assert "dcedit_kernels.ModelEditor.fit" in found and "dcedit_kernels.ops.undo_shift_" in found
    bare = [name for name, fn in found.items()
            if inspect.signature(fn).return_annotation is inspect.Signature.empty
            and all(p.annotation is inspect.Parameter.empty for p in inspect.signature(fn).parameters.values())]
    assert not bare
    assert typing.get_type_hints(dcedit_kernels.ModelEditor.fit)["return"].__name__ == "TrainResult"
    assert typing.get_type_hints(dcedit_kernels.ops.fisher_mask)["return"] == tuple[torch.Tensor, torch.Tensor]


def _every_public_callable():
    """{name: function or class} of every public module of the package (no part of its name
    starting with "_"): the names of its __all__ (else its public names defined in it), and the
    public methods, properties and constructors of the classes among them, inherited ones from the
    package included (ModelEditor.load is EditorCheckpoints')."""
    import importlib
    import inspect
    import pkgutil

    import dcedit_kernels

    names = ["dcedit_kernels"] + [m.name for m in pkgutil.walk_packages(dcedit_kernels.__path__, "dcedit_kernels.")
                                  if not any(part.startswith("_") for part in m.name.split("."))]
    found = {}
    for module_name in names:
        module = importlib.import_module(module_name)
        public = getattr(module, "__all__", None) or [
            n for n, obj in vars(module).items()
            if not n.startswith("_") and getattr(obj, "__module__", None) == module_name]
        for name in public:
            obj = getattr(module, name)
            if not (inspect.isclass(obj) or inspect.isfunction(obj)) or not obj.__module__.startswith("dcedit_kernels"):
                continue
            found[f"{module_name}.{name}"] = obj
            for klass in obj.__mro__ if inspect.isclass(obj) else ():
                if not klass.__module__.startswith("dcedit_kernels"):
                    continue
                for attr, member in vars(klass).items():
                    member = getattr(member, "fget", None) or getattr(member, "__func__", member)
                    if inspect.isfunction(member) and (not attr.startswith("_") or attr == "__init__"):
                        found.setdefault(f"{module_name}.{name}.{attr}", member)
    return found


def test_every_public_callables_type_hints_resolve():
    """typing.get_type_hints (what pydantic, typer, beartype and IDEs call) raised NameError on
    GroupedEditor.from_mend_state_dict ("MendWeightView" was imported for type checkers only:
    compat.mend, which defined it, imports grouped_editor), and on ModelEditor.load and from_mend
    ("ModelEditor", the same for model_editor and its mixin editor_checkpoint).  MendWeightView
    now lives in grouped_editor (compat.mend re-exports it), and the mixin's methods return Self."""
    import typing

    import dcedit_kernels
    from dcedit_kernels.compat import mend

    found = _every_public_callable()
    assert len(found) > 300
    assert "dcedit_kernels.ModelEditor.load" in found and "dcedit_kernels.compat.mend.load" in found
    unresolved = {}
    for name, fn in found.items():
        try:
            typing.get_type_hints(fn)
        except Exception as exc:  # noqa: BLE001 (each failure is listed)
            unresolved[name] = f"{type(exc).__name__}: {exc}"
    assert not unresolved, unresolved
    views = typing.get_type_hints(dcedit_kernels.GroupedEditor.from_mend_state_dict)["return"]
    assert views == dict[str, mend.MendWeightView]
    assert typing.get_type_hints(mend.MendWeightView.__init__)["editor"] is dcedit_kernels.GroupedEditor
