"""A user trial of GroupedEditor on its own (no ModelEditor: the user's own capture and training
loop): the mistakes it made that raised from deep inside torch or safetensors, or named nothing,
each now a ValueError naming the argument (or, for a folder given as a file, an OSError naming
the path, as a missing folder's)."""

import pytest
import torch

from dcedit_kernels.capture import Factors, capture_factors, compute_factors
from dcedit_kernels.editors import MEND, GroupedEditor
from dcedit_kernels.models import tiny_model
from helpers import EDITOR_KINDS, editor_inputs, small_editor

NO_CUDA = not torch.cuda.is_available()


@pytest.mark.parametrize("method", EDITOR_KINDS)
@pytest.mark.parametrize("training", [False, True])
def test_factors_on_another_device_than_the_editor_raise_value_error(method, training, gen):
    """Factors on another device than the editor (meta here, for a model on a GPU and an editor
    left on the CPU), or mu and eta on two devices: the ValueError naming the devices, before the
    running norms take anything.  It was torch's RuntimeError from the norms or the zero-row
    test ("Tensor on device cpu is not on the expected device meta!")."""
    editor = small_editor(method).train(training)
    mu, eta, offsets, feats = editor_inputs(gen)
    before = {k: v.clone() for k, v in editor.state_dict().items()}
    for args, match in (((mu.to("meta"), eta.to("meta")), "mu on meta, eta on meta, the editor on cpu"),
                        ((mu, eta.to("meta")), "mu on cpu, eta on meta, the editor on cpu"),
                        ((mu.to("meta"), eta), "mu on meta, eta on cpu, the editor on cpu")):
        with pytest.raises(ValueError, match=f"one device: {match}"):
            editor(*args, offsets, edit_feats=feats if method == "moeditor" else None)
    assert all(torch.equal(v, before[k]) for k, v in editor.state_dict().items())


def test_dense_checks_its_device_argument(gen):
    """GroupedEdit.dense(device=...) takes what ModelEditor's editor_device takes (as_device): a
    device string torch cannot parse, meta, or a CUDA device this machine lacks is a ValueError
    naming `device`.  It was torch's RuntimeError ("Expected one of cpu, cuda, ... device type at
    start of device string: gpu") or, for an int, "Cannot access accelerator device"."""
    editor = small_editor("mend").eval()
    mu, eta, offsets, _ = editor_inputs(gen)
    edit = editor(mu, eta, offsets)
    bad = ["gpu", "meta", [0]] + (["cuda", 0] if NO_CUDA else [])
    for device in bad:
        with pytest.raises(ValueError, match=r"^device"):
            edit.dense(device=device)
    expected = edit.dense()
    for device in (None, "cpu", torch.device("cpu")):
        assert torch.equal(edit.dense(device=device), expected)


def test_load_checks_map_location(gen, tmp_path):
    """GroupedEditor.load(map_location=...): a device string that is not one, meta, or CUDA on a
    machine without it is a ValueError naming map_location (they were safetensors' SafetensorError
    "device gpu is invalid" and, for "cuda" here, a RuntimeError about pinned memory); None is the
    CPU, as torch.load's None keeps a CPU checkpoint there (it was "device None is invalid")."""
    editor = small_editor("moeditor").eval()
    path = tmp_path / "editor.safetensors"
    editor.save(path)
    for bad in ["gpu", "meta", 1.5] + (["cuda"] if NO_CUDA else []):
        with pytest.raises(ValueError, match=r"^map_location"):
            GroupedEditor.load(path, map_location=bad)
    for where in (None, "cpu", torch.device("cpu")):
        loaded = GroupedEditor.load(path, map_location=where)
        assert loaded.alpha.device.type == "cpu"
        assert all(torch.equal(v, editor.state_dict()[k]) for k, v in loaded.state_dict().items())


def test_save_to_a_folder_names_the_folder(tmp_path):
    """A folder given as the file to save to: IsADirectoryError naming that folder, as a missing
    folder's FileNotFoundError names it.  It named the temporary file the save writes first
    ("[Errno 21] Is a directory: '/tmp/.x.<hex>.tmp' -> '/tmp/x'"), and nothing is left behind."""
    editor = small_editor("mend")
    with pytest.raises(IsADirectoryError, match=f"^cannot save to {tmp_path}: it is a folder"):
        editor.save(tmp_path)
    assert not [p for p in tmp_path.parent.iterdir() if p.name.startswith(f".{tmp_path.name}.")]


def test_mode_given_a_tensor_says_so_without_printing_it(gen):
    """edit_feats passed positionally lands in `mode`: the ValueError names mode and says what it
    got by type and shape, with the hint, instead of printing the whole tensor."""
    editor = small_editor("moeditor").eval()
    mu, eta, offsets, feats = editor_inputs(gen)
    with pytest.raises(ValueError, match=r"^mode must be an int in \[0, 1\), got a Tensor of shape \(4, 6\) "
                                         r"\(edit_feats is a keyword argument\)$"):
        editor(mu, eta, offsets, feats)
    with pytest.raises(ValueError, match=r"^mode must be an int in \[0, 1\), got 1$"):
        editor(mu, eta, offsets, 1, edit_feats=feats)


def test_compute_factors_refuses_labels_without_a_target(gen):
    """compute_factors on a batch whose labels are all -100 (no target token: the prompt masked
    over the whole row): a ValueError naming batch['labels'], before the forward.  It was
    FloatingPointError "the loss is not finite (nan)", which reads as a numerical problem."""
    model, tok = tiny_model("llama", seed=0)
    enc = tok(["The capital of France is Rome"], return_tensors="pt")
    batch = dict(enc, labels=torch.full_like(enc["input_ids"], -100))
    with pytest.raises(ValueError, match=r"^batch\['labels'\] has no target token \(every entry is -100\)"):
        compute_factors(model, batch, ["model.layers.1.mlp.down_proj"])
    batch["labels"][0, -1] = enc["input_ids"][0, -1]  # one target token: factors as before
    factors, loss = compute_factors(model, batch, ["model.layers.1.mlp.down_proj"])
    assert torch.isfinite(loss) and factors["model.layers.1.mlp.down_proj"].num_edits == 1
    # A loss_fn of one's own does not read the model's mean over label tokens: labels without a
    # target are its business, and the capture runs (refusing them too passed every test).
    batch["labels"][:] = -100
    factors, loss = compute_factors(model, batch, ["model.layers.1.mlp.down_proj"],
                                    loss_fn=lambda out, b: out.logits.logsumexp(-1).mean())
    assert torch.isfinite(loss) and factors["model.layers.1.mlp.down_proj"].num_edits == 1


def test_capture_used_without_its_block_says_so():
    """capture_factors(...) called but never entered (`cap = capture_factors(...)` then a forward
    and backward): its factors say that it records only inside its `with` block; it said that the
    module "did not run a forward pass inside the capture", which it had, as far as the user saw."""
    model, tok = tiny_model("llama", seed=0)
    enc = tok(["ab cd"], return_tensors="pt")
    cap = capture_factors(model, ["model.layers.1.mlp.down_proj"])
    model(**enc, labels=enc["input_ids"]).loss.backward()
    with pytest.raises(RuntimeError, match=r"records only inside its block: with capture_factors\(\.\.\.\) as cap:"):
        cap.factors


def test_compute_factors_under_inference_mode_says_so():
    """compute_factors under torch.inference_mode(): the RuntimeError ModelEditor.apply and fit
    raise there (check_autograd), naming compute_factors; it said "the loss does not depend on any
    captured module", which sent the user looking at the layer names."""
    model, tok = tiny_model("llama", seed=0)
    enc = tok(["ab cd"], return_tensors="pt")
    batch = dict(enc, labels=enc["input_ids"])
    with torch.inference_mode(), pytest.raises(RuntimeError, match=r"^compute_factors needs autograd for its "
                                                                   r"backward: call it outside torch\.inference_mode"):
        compute_factors(model, batch, ["model.layers.1.mlp.down_proj"])
    with torch.no_grad():  # no_grad is fine: the capture turns grad on for its own pass
        compute_factors(model, batch, ["model.layers.1.mlp.down_proj"])


def test_apply_to_a_transposed_weight_points_at_weight_out_in(gen):
    """An edit applied to GPT-2's Conv1D weight as stored (in × out): the ValueError names the
    shapes and says how to get the (out, in) view; a weight of another shape gets no hint."""
    model, _ = tiny_model("gpt2", seed=0)
    layer = model.get_submodule("transformer.h.1.mlp.c_proj")
    d_in, d_out = layer.weight.shape
    mu, eta = torch.randn(5, d_in, generator=gen), torch.randn(5, d_out, generator=gen)
    edit = MEND(d_in, d_out, rank=2).eval()(mu, eta, torch.tensor([0, 5], dtype=torch.int32))
    with pytest.raises(ValueError, match=rf"^weight must be the edited layer's \(out, in\) = \({d_out}, {d_in}\) "
                                         rf"weight, got \({d_in}, {d_out}\): the transpose.*"
                                         rf"capture\.weight_out_in\(module\)"):
        edit.apply_(layer.weight)
    with pytest.raises(ValueError, match=r"got \(3, 3\)$"):
        edit.apply_(torch.zeros(3, 3))


def test_a_default_grouped_editor_without_edit_feats_says_how_to_do_without(gen):
    """GroupedEditor(in, out) routes with a gate by default (SPEC's signature), so the MEND-style
    editor a user builds from it asks for edit features: the ValueError, naming edit_feats, says
    that routing='single' (the MEND preset) needs none."""
    editor = GroupedEditor(5, 6, rank=2)
    mu, eta, offsets, _ = editor_inputs(gen)
    with pytest.raises(ValueError, match=r"^edit_feats is required with routing='gate' \(GroupedEditor's default\); "
                                         r"routing='single' \(the MEND preset\) needs none"):
        editor(mu, eta, offsets)


def test_the_two_editor_checkpoints_point_at_each_others_load(tmp_path):
    """A ModelEditor checkpoint given to GroupedEditor.load, or a GroupedEditor one given to
    ModelEditor.load: the ValueError says which kind of checkpoint it is and which load reads it."""
    from dcedit_kernels.model_editor import ModelEditor

    model, tok = tiny_model("llama", seed=0)
    ModelEditor(model, tok, ["model.layers.1.mlp.down_proj"], method="mend", rank=2).save(tmp_path / "me.safetensors")
    MEND(37, 24, rank=2).save(tmp_path / "ge.safetensors")
    with pytest.raises(ValueError, match=r"is not a GroupedEditor checkpoint \(no dcedit_config metadata\); it is a "
                                         r"ModelEditor checkpoint: ModelEditor\.load\(path, model, tokenizer\)"):
        GroupedEditor.load(tmp_path / "me.safetensors")
    with pytest.raises(ValueError, match=r"is not a ModelEditor checkpoint \(no dcedit_model_editor metadata\); it "
                                         r"is a GroupedEditor checkpoint: GroupedEditor\.load\(path\)"):
        ModelEditor.load(tmp_path / "ge.safetensors", model, tok)


def test_compute_factors_refuses_numpy_and_list_inputs():
    """A batch tokenized with return_tensors="np" (or none: lists): a ValueError naming the entry
    instead of torch's TypeError from the embedding ("argument 'indices' (position 2) must be
    Tensor, not numpy.ndarray")."""
    model, tok = tiny_model("llama", seed=0)
    names = ["model.layers.1.mlp.down_proj"]
    enc = tok(["ab cd"], return_tensors="np")
    with pytest.raises(ValueError, match=r"^batch\['input_ids'\] must be a torch\.Tensor, got numpy\.ndarray"):
        compute_factors(model, dict(enc, labels=enc["input_ids"]), names)
    with pytest.raises(ValueError, match=r"^batch\['input_ids'\] must be a torch\.Tensor, got list"):
        compute_factors(model, {"input_ids": [[3, 4, 5]], "labels": [[3, 4, 5]]}, names)
    ids = torch.tensor([[3, 4, 5]])  # a tuple where a tensor goes, as a list
    with pytest.raises(ValueError, match=r"^batch\['attention_mask'\] must be a torch\.Tensor, got tuple"):
        compute_factors(model, {"input_ids": ids, "attention_mask": ((1, 1, 1),), "labels": ids}, names)


@pytest.mark.parametrize("method", EDITOR_KINDS)
def test_seed_outside_torch_range_is_refused_naming_seed(method, gen):
    """A seed torch cannot take (outside [-2**63, 2**64 - 1]) is a ValueError naming `seed`, from
    every preset and from tiny_model, as the CLI's --seed refuses it; it was manual_seed's bare
    "Overflow when unpacking long long".  The two ends of the range seed an editor, and equal
    seeds draw equal RaEditor groups."""
    from dcedit_kernels.editors import presets

    preset = {"mend": presets.MEND, "raeditor": presets.RaEditor, "moeditor": presets.MoEditor,
              "proeditor": presets.ProEditor}[method]
    far = int(torch.randint(1, 2**62, (1,), generator=gen))
    for seed in (2**64, -(2**63) - 1, 2**64 + far, -(2**63) - far, 1.0, True):
        with pytest.raises(ValueError, match=r"^seed must be an int"):
            preset(7, 5, rank=2, seed=seed)
        with pytest.raises(ValueError, match=r"^seed must be an int"):
            tiny_model("gpt2", seed=seed)
    for seed in (2**64 - 1, -(2**63)):
        a, b = preset(7, 5, rank=2, seed=seed), preset(7, 5, rank=2, seed=seed)
        assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
        assert torch.equal(a.route_generator.get_state(), b.route_generator.get_state())


def test_an_int_beyond_floats_range_is_refused_naming_the_argument():
    """A number setting given as an int beyond float's range (10**400): the ValueError naming it that
    any other non-finite value gets.  math.isfinite raised OverflowError ("int too large to convert
    to float") from the shared finiteness check, naming nothing (found by an argument sweep)."""
    from dcedit_kernels.model_editor import ModelEditor
    from dcedit_kernels.train import TrainConfig

    huge = 10**400
    with pytest.raises(ValueError, match=r"^edit_lr must be a finite number"):
        GroupedEditor(5, 6, edit_lr=huge)
    for name in ("lr", "lr_lr", "cedit", "cloc", "balance_weight"):
        with pytest.raises(ValueError, match=rf"^{name} must be a non-negative finite number"):
            TrainConfig(**{name: huge})
    model, tok = tiny_model("llama", seed=0)
    for name in ("ft_lr", "kl_weight", "ft_stop_loss"):
        with pytest.raises(ValueError, match=rf"^{name} must be"):
            ModelEditor(model, tok, ["lm_head"], method="ft_kl", allow_tied=True, **{name: huge})


@pytest.mark.parametrize("method", EDITOR_KINDS)
def test_meta_offsets_and_a_meta_weight_are_named(method, gen):
    """Found by an argument sweep: edit_offsets on meta (factors on the CPU) raised torch's
    NotImplementedError ("Cannot copy out of meta tensor; no data!") from forward, dense and
    apply_; a meta weight given to apply_ was refused as `device`, an argument the caller never
    gave.  Each is now a ValueError naming the argument, with the editor's state and the weight
    as they were."""
    editor = small_editor(method).train()
    mu, eta, offsets, feats = editor_inputs(gen)
    feats = feats if method == "moeditor" else None
    before = {k: v.clone() for k, v in editor.state_dict().items()}
    weight = torch.randn(6, 5, generator=gen)
    kept = weight.clone()
    for call in (lambda: editor(mu, eta, offsets.to("meta"), edit_feats=feats),
                 lambda: editor.dense(mu, eta, offsets.to("meta"), edit_feats=feats),
                 lambda: editor.apply_(weight, mu, eta, offsets.to("meta"), edit_feats=feats)):
        with pytest.raises(ValueError, match=r"^all tensors must be on one device: .*edit_offsets on meta"):
            call()
    with pytest.raises(ValueError, match=r"^weight must be on a device that computes"):
        editor.apply_(weight.to("meta"), mu, eta, offsets, edit_feats=feats)
    assert all(torch.equal(v, before[k]) for k, v in editor.state_dict().items())
    edit = editor.eval()(mu, eta, offsets, edit_feats=feats)
    with pytest.raises(ValueError, match=r"^weight must be on a device that computes"):
        edit.apply_(weight.to("meta"))
    assert torch.equal(weight, kept)


@pytest.mark.parametrize("method", EDITOR_KINDS)
def test_dense_refuses_a_masked_flag_that_is_not_a_bool(method, gen):
    """GroupedEdit.dense read `masked` for its truth: "False" masked a ProEditor's shift, and
    None did not (found by an argument sweep).  Anything but a bool is a ValueError naming it, as
    lowrank_edited's masked is; True and False give what they gave."""
    editor = small_editor(method).eval()
    mu, eta, offsets, feats = editor_inputs(gen)
    edit = editor(mu, eta, offsets, edit_feats=feats if method == "moeditor" else None)
    for bad in ("False", 0, None, torch.tensor(True)):
        with pytest.raises(ValueError, match=r"^masked must be a bool, got "):
            edit.dense(masked=bad)
    assert torch.equal(edit.dense(masked=False), edit.dense(masked=True)) == (method != "proeditor")


def test_model_editor_route_states_and_capture_name_a_bad_argument(gen):
    """ModelEditor.set_route_states({'x': ...}) raised a bare KeyError, of None an AttributeError, of a
    state that is none torch's TypeError (after setting the states before it); capture(None) a
    TypeError ("not subscriptable") and capture({}) a KeyError 'input_ids'.  Each is a ValueError
    naming the argument now, and a refused set_route_states sets no generator."""
    from dcedit_kernels.model_editor import ModelEditor

    model, tok = tiny_model("gpt2", seed=int(torch.randint(0, 100, (1,), generator=gen)))
    layers = ["transformer.h.0.mlp.c_fc", "transformer.h.0.mlp.c_proj"]  # two shapes: two editors
    me = ModelEditor(model, tok, layers, method="raeditor", n_editors=2, rank=2, seed=1)
    first, second = sorted(me.route_generators())
    before = me.route_states()
    drawn = {first: torch.Generator().manual_seed(5).get_state(), second: torch.Generator().manual_seed(6).get_state()}
    for bad, words in (({"x": before[first]}, r"^states: no editor 'x' with a routing generator"),
                       (None, r"^states must be a dict as route_states\(\) returns, got NoneType$"),
                       ({first: drawn[first], second: "abc"}, rf"^states\['{second}'\] is not a generator state"),
                       ({first: drawn[first], second: torch.zeros(3, dtype=torch.uint8)}, rf"^states\['{second}'\]")):
        with pytest.raises(ValueError, match=words):
            me.set_route_states(bad)
        assert all(torch.equal(s, before[k]) for k, s in me.route_states().items())  # none was set
    me.set_route_states(drawn)
    assert all(torch.equal(s, drawn[k]) for k, s in me.route_states().items())
    for bad, got in ((None, "NoneType"), ({}, "a dict without an input_ids tensor"),
                     ({"input_ids": [[1, 2]]}, "a dict without an input_ids tensor")):
        with pytest.raises(ValueError, match=rf"^batch must be a dict of tensors as ModelEditor.tokenize returns .*got {got}$"):
            me.capture(bad)
    factors, _, _ = me.capture(dict(me.tokenize(["The sky is"], ["blue"])))  # any mapping of its tensors
    assert set(factors) == set(layers)


@pytest.mark.parametrize("method", EDITOR_KINDS)
def test_route_checks_n_edits_and_device(method, gen):
    """GroupedEditor.route passed n_edits and device to torch unchecked: randperm's TypeError for
    2.0 or None, RuntimeError "negative dimension" for -1, and for a device torch cannot parse its
    RuntimeError, naming nothing (found by an argument sweep).  Each is now a ValueError naming the
    argument, before the gate's statistics take the features."""
    editor = small_editor(method).train()
    feats = editor_inputs(gen)[3] if method == "moeditor" else None
    before = {k: v.clone() for k, v in editor.state_dict().items()}
    # 2**63 and past: int64 overflowed in randperm ("Overflow when unpacking long long", session 60).
    for bad in (2.0, None, -1, True, "4", 2**63, 10**30):
        with pytest.raises(ValueError, match=r"^n_edits must be a non-negative int below 2\*\*63, got "):
            editor.route(bad, feats)
    for bad in ("gpu", "meta", [0]):
        with pytest.raises(ValueError, match=r"^device"):
            editor.route(4, feats, device=bad)
    assert all(torch.equal(v, before[k]) for k, v in editor.state_dict().items())
    for device in (None, "cpu", torch.device("cpu")):
        assert editor.route(4, feats, device=device)[0].shape == (4,)


def test_model_editor_tokenize_names_texts_that_are_not_a_sequence():
    """ModelEditor.tokenize listed its prompts and targets: None raised TypeError "'NoneType'
    object is not iterable", naming neither, and a lone str became its characters, one row each
    (prompts "ab", targets "cd": two edits "a" -> "c", "b" -> "d"), found by an argument sweep.
    Both are now a ValueError naming the argument."""
    from dcedit_kernels.model_editor import ModelEditor

    model, tok = tiny_model("llama", seed=0)
    me = ModelEditor(model, tok, ["model.layers.0.mlp.down_proj"], method="mend", rank=3, seed=0)
    for bad, shown in ((None, "NoneType"), (3, "int"), ("ab", "a single str")):
        with pytest.raises(ValueError, match=rf"^prompts must be a sequence of str, got {shown}"):
            me.tokenize(bad, ["c", "d"])
        with pytest.raises(ValueError, match=rf"^targets must be a sequence of str, got {shown}"):
            me.tokenize(["a", "b"], bad)
    assert me.tokenize(("a b", "c"), iter(["d", "e f"]))["input_ids"].shape[0] == 2


def test_run_editors_checks_its_inputs_before_any_editor_runs():
    """ModelEditor.run_editors with a layer missing from `factors` raised KeyError after the editors of
    the layers before it had taken their factors into their running statistics (training mode: the
    editors changed by a call that failed), and so did a layer's factors of another shape; a feats
    or eta_scale of another type raised
    AttributeError or TypeError from inside the loop, and a meta feats NotImplementedError
    ("Cannot copy out of meta tensor") (found by an argument sweep).  Each is now a
    ValueError naming the argument, with every editor as it was."""
    from dcedit_kernels.model_editor import ModelEditor

    model, tok = tiny_model("llama", seed=0)
    layers = ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    me = ModelEditor(model, tok, layers, method="moeditor", n_editors=2, rank=3, seed=0)
    batch = me.tokenize(["The sky is", "Paris is in"], ["green", "Spain"])
    factors, feats, _ = me.capture(batch)
    me.editors.train()
    before = {k: v.clone() for k, v in me.state_tensors().items()}
    cases = [(dict(factors={layers[0]: factors[layers[0]]}), r"^factors has no entry for the edited layers \['model.layers.1"),
             (dict(factors=[factors[n] for n in layers]), r"^factors must be a dict"),
             (dict(factors={**factors, layers[1]: tuple(vars(factors[layers[1]]).values())}), r"^factors\['model.layers.1.mlp.down_proj'\] must be a Factors"),
             # Another layer's factors (μ and η swapped: the widths of a (37, 24) layer): the first
             # editor took its own into its statistics, then forward's "mu must have shape (T, 37)"
             # named neither the layer nor the argument.
             (dict(factors={**factors, layers[1]: Factors(factors[layers[1]].eta, factors[layers[1]].mu,
                                                          factors[layers[1]].edit_offsets)}),
              r"^factors\['model.layers.1.mlp.down_proj'\] must hold that layer's mu \(T, 37\) and eta \(T, 24\), "
              r"got mu \(\d+, 24\) and eta \(\d+, 37\)$"),
             (dict(feats=feats.tolist()), r"^feats must be a torch.Tensor"),
             (dict(feats=feats.to("meta")), r"^feats must hold values .* got a meta tensor"),
             (dict(eta_scale=None), r"^eta_scale must be a finite number"),
             (dict(eta_scale=float("nan")), r"^eta_scale must be a finite number")]
    for change, match in cases:
        with pytest.raises(ValueError, match=match):
            me.run_editors(**dict(dict(factors=factors, feats=feats), **change))
        assert all(torch.equal(v, before[k]) for k, v in me.state_tensors().items())
    assert set(me.run_editors(factors, feats)) == set(layers)


def test_run_editors_refuses_a_consume_flag_that_is_not_a_bool():
    """run_editors and edits_as_applied read consume for its truth: consume="False" took every
    layer's factors out of the caller's dict, silently (found by an argument sweep).  Anything but
    a bool is now a ValueError naming it, with the factors left in place."""
    from dcedit_kernels.model_editor import ModelEditor

    model, tok = tiny_model("llama", seed=0)
    layers = ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    me = ModelEditor(model, tok, layers, method="mend", rank=3, seed=0)
    factors, feats, _ = me.capture(me.tokenize(["The sky is"], ["green"]))
    for run in (me.run_editors, me.edits_as_applied):
        for bad in ("False", 1, None):
            with pytest.raises(ValueError, match=r"^consume must be a bool, got "):
                run(factors, feats, consume=bad)
            assert set(factors) == set(layers)
    me.edits_as_applied(factors, feats, consume=True)
    assert not factors


@pytest.mark.parametrize("method", ["mend", "moeditor"])
def test_training_forward_of_an_editor_built_under_inference_mode_says_why_and_keeps_its_norms(method, gen):
    """An editor built (or loaded) under torch.inference_mode holds inference tensors: eval-mode
    forwards run outside it, but a training-mode forward's running-statistics merge raised torch's
    "Inplace update to inference tensor outside InferenceMode" after it had moved u_mean (MoEditor:
    the gate norm's mean) and before the sums, std and count, leaving the statistics half-merged.
    It refuses, naming the build, before any statistic changes."""
    with torch.inference_mode():
        ed = small_editor(method, seed=1)
    mu, eta, offsets, feats = editor_inputs(gen)
    before = {k: v.clone() for k, v in ed.named_buffers()}
    why = r"inference tensors \(the editor was built or loaded under torch\.inference_mode\(\)\).*'[a-z_]+'"
    with pytest.raises(RuntimeError, match=why):
        ed.train()(mu, eta, offsets, edit_feats=feats)
    assert all(torch.equal(before[k], v) for k, v in ed.named_buffers())
    with torch.inference_mode():  # where the statistics can be updated, they are
        ed(mu, eta, offsets, edit_feats=feats)
    assert float(ed.norm.k) > 0


@pytest.mark.parametrize("method", EDITOR_KINDS)
@pytest.mark.parametrize("training", [False, True])
def test_an_editor_forward_without_values_to_read_says_why(method, training, gen):
    """An editor's forward reads its factors (it drops MEND's all-zero token rows, so the edit's
    shape depends on their values): on meta tensors (an editor built on "meta" with meta factors),
    under FakeTensorMode and under torch.export it failed inside torch with "Tensor.item() cannot
    be called on meta tensors", DataDependentOutputException and GuardOnDataDependentSymNode,
    naming nothing.  A ValueError says why, before the running norms take anything; the ops run
    on such tensors (test_ops), and torch.compile still compiles the forward (test_compile)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    mu, eta, offsets, feats = editor_inputs(gen)
    kw = dict(edit_feats=feats) if method == "moeditor" else {}
    why = r"^mu and eta must hold values: an editor's forward reads them \(it drops MEND's all-zero token rows"
    with pytest.raises(ValueError, match=why + r".*got meta tensors"):
        small_editor(method).to("meta").train(training)(mu.to("meta"), eta.to("meta"), offsets.to("meta"),
                                                        **{k: v.to("meta") for k, v in kw.items()})
    editor = small_editor(method).train(training)
    before = {k: v.clone() for k, v in editor.state_dict().items()}
    with FakeTensorMode() as mode, pytest.raises(ValueError, match=why + r".*got fake tensors"):
        editor(*(mode.from_tensor(t) for t in (mu, eta, offsets)), **{k: mode.from_tensor(v) for k, v in kw.items()})

    class Dense(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.editor = editor

        def forward(self, mu, eta, offsets, *feats):
            return self.editor(mu, eta, offsets, edit_feats=feats[0] if feats else None).dense()

    # torch 2.5.1 and 2.6.0 have no torch.compiler.is_exporting (2.7.1 on have): the export fails in torch there
    # (GuardOnDataDependentSymNode at the read), without the ValueError (README).
    exported = pytest.raises(ValueError, match=why + r".*under torch\.export") if hasattr(
        torch.compiler, "is_exporting") else pytest.raises(RuntimeError, match="data-dependent")
    with exported:
        torch.export.export(Dense(), (mu, eta, offsets, *kw.values()), strict=False)
    assert all(torch.equal(before[k], v) for k, v in editor.state_dict().items())
