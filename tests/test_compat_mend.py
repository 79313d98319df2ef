"""dcedit_kernels.compat.mend: an original MEND checkpoint gives MEND's shifts and edits.

The oracle below re-implements MEND's formulas in plain torch, straight from MEND's definition
(GradientTransform in eval mode + IDMLP of LRLinear layers + the einsum and edit_lrs of
MEND.edit), independently of GroupedEditor and the ops: fp32 cast, zero-row drop,
(x - mean)/(std + 1e-7), pre = (u @ (v @ h.T)).T + bias, pre·scale[mode] + shift[mode],
h ← clamp(pre, 0) + h, shift = einsum("bi,bj->ji") (Linear) or "bi,bj->ij" (GPT-2 Conv1D),
p_new = p + edit_lrs[idx] · shift.
"""

import math
from functools import partial

import pytest
import torch
from helpers import TOL, ragged_offsets, randn, rel_err

from dcedit_kernels import GroupedEdit, GroupedEditor, ops
from dcedit_kernels.compat import mend as compat_mend

# Inner parameters in MEND's order: two shapes shared by two weights each (modes 0 and 1,
# interleaved in the list), a square weight, and an odd-sized one.  With rank 12 the (5, 5)
# and (4, 3) editors get mid = d (MEND's min(rank, d)), the others mid = 12 < d = 16.
INNER = [
    "transformer.h.0.mlp.c_fc.weight",
    "transformer.h.0.mlp.c_proj.weight",
    "transformer.h.1.attn.c_proj.weight",
    "transformer.h.1.mlp.c_fc.weight",
    "transformer.h.1.mlp.c_proj.weight",
    "transformer.h.2.mlp.odd.weight",
]
SHAPES = {  # name -> (in_features, out_features)
    INNER[0]: (6, 10),
    INNER[1]: (10, 6),
    INNER[2]: (5, 5),
    INNER[3]: (6, 10),
    INNER[4]: (10, 6),
    INNER[5]: (4, 3),
}
RANK = 12


# ------------------------------------------------------------------ a random MEND checkpoint
def editor_layout(inner, shapes, shared):
    """{editor key: ((in, out), n_modes or None)} as MEND builds its ModuleDict."""
    if not shared:
        return {n.replace(".", "#"): (tuple(shapes[n]), None) for n in inner}
    members = {}
    for n in inner:
        members.setdefault(str(tuple(shapes[n])), []).append(n)
    return {k: (tuple(shapes[v[0]]), len(v)) for k, v in members.items()}


def make_mend_state_dict(gen, inner=INNER, shapes=SHAPES, shared=True, n_hidden=1, dtype=torch.float32,
                         prefix="mend.", lrs_key="edit_lrs", rank=RANK):
    """Random weights everywhere MEND has them: non-trivial u, modes, statistics and edit_lrs."""
    sd = {}
    for key, ((i, o), n_modes) in editor_layout(inner, shapes, shared).items():
        d = i + o
        mid = min(rank, d)
        for k in range(n_hidden + 1):
            base = f"{prefix}{key}.mlp.layers.{k}."
            sd[base + "u"] = randn((d, mid), gen, dtype) * 0.5
            sd[base + "v"] = randn((mid, d), gen, dtype) / math.sqrt(d)
            sd[base + "bias"] = randn((d,), gen, dtype) * 0.3
            if n_modes is not None:
                sd[base + "mode_scale.weight"] = 1 + 0.3 * randn((n_modes, d), gen, dtype)
                sd[base + "mode_shift.weight"] = 0.3 * randn((n_modes, d), gen, dtype)
        count = 37.0
        for side, dim in (("u", i), ("v", o)):
            std = 0.5 + torch.rand(dim, generator=gen, dtype=torch.float64).to(dtype)
            sd[f"{prefix}{key}.{side}_mean"] = 0.2 * randn((dim,), gen, dtype)
            sd[f"{prefix}{key}.{side}_std"] = std
            sd[f"{prefix}{key}.{side}_s"] = std.square() * (count - 1)
        sd[f"{prefix}{key}.k"] = torch.tensor([count], dtype=dtype)
    # Both signs and distinct magnitudes, so a wrong name -> edit_lr mapping shows.
    lrs = (torch.rand(len(inner), generator=gen, dtype=torch.float64) + 0.1) * 1e-2
    lrs[::2] *= -1
    sd[lrs_key] = lrs.to(dtype)
    sd["model_config"] = {"n_embd": 10}  # MEND stores the model's config object: not a tensor
    return sd


# ------------------------------------------------------------------ MEND's formulas (oracle)
def mend_transform(sd, key, mu, eta, mode, norm=True, prefix="mend."):
    """MEND's GradientTransform.forward in eval mode (combine=True, IDMLP)."""
    x = mu.reshape(-1, mu.shape[-1]).to(torch.float32)
    g = eta.reshape(-1, eta.shape[-1]).to(torch.float32)
    keep = (x != 0).any(-1) * (g != 0).any(-1)
    x, g = x[keep], g[keep]
    if norm:
        x = (x - sd[f"{prefix}{key}.u_mean"]) / (sd[f"{prefix}{key}.u_std"] + 1e-7)
        g = (g - sd[f"{prefix}{key}.v_mean"]) / (sd[f"{prefix}{key}.v_std"] + 1e-7)
    h = torch.cat((x, g), -1)
    k = 0
    while f"{prefix}{key}.mlp.layers.{k}.u" in sd:
        p = f"{prefix}{key}.mlp.layers.{k}."
        pre = (sd[p + "u"] @ (sd[p + "v"] @ h.T)).T + sd[p + "bias"]
        if mode is not None:
            pre = pre * sd[p + "mode_scale.weight"][mode] + sd[p + "mode_shift.weight"][mode]
        h = pre.clamp(min=0) + h
        k += 1
    return h[:, : mu.shape[-1]], h[:, mu.shape[-1]:]


def mend_edit(sd, name, weight, mu, eta, shared=True, conv1d=False, norm=True, inner=INNER, shapes=SHAPES,
              prefix="mend.", lrs_key="edit_lrs"):
    """(shift, edited weight) exactly as MEND.edit computes them for one inner parameter."""
    shape = tuple(shapes[name])
    if shared:
        key = str(shape)
        mode = [n for n in inner if tuple(shapes[n]) == shape].index(name)
    else:
        key, mode = name.replace(".", "#"), None
    x_t, g_t = mend_transform(sd, key, mu, eta, mode, norm, prefix)
    shift = torch.einsum("bi,bj->ij" if conv1d else "bi,bj->ji", x_t, g_t)
    lr = sd[lrs_key][inner.index(name)]
    return shift, weight + lr * shift


# ------------------------------------------------------------------ gradient factors
def make_factors(gen, in_f, out_f, dtype, device="cpu"):
    """mu (T, in), eta (T, out) over ragged edits (one empty, one all-zero) with zero rows."""
    counts = [3, 0, 4, 2, 5]
    T = sum(counts)
    mu = randn((T, in_f), gen, dtype, device)
    eta = randn((T, out_f), gen, dtype, device)
    mu[1] = 0  # a padding token: μ = 0
    eta[4] = 0  # a token after the last label: η = 0
    eta[7:9] = 0  # the whole fourth edit has zero gradient
    return mu, eta, ragged_offsets(counts, device)


def to_device(sd, device):
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in sd.items()}


def tensors_only(sd):
    return {k: v.contiguous() for k, v in sd.items() if isinstance(v, torch.Tensor)}


def check_edit_matches(view, sd, name, dtype, device, gen, shared, conv1d, norm=True, inner=INNER,
                       shapes=SHAPES, prefix="mend.", lrs_key="edit_lrs", input_dtype=None):
    in_f, out_f = shapes[name]
    mu, eta, offsets = make_factors(gen, in_f, out_f, input_dtype or dtype, device)
    w_shape = (in_f, out_f) if conv1d else (out_f, in_f)
    w0 = randn(w_shape, gen, dtype, device)
    ref_shift, ref_new = mend_edit(sd, name, w0, mu, eta, shared, conv1d, norm, inner, shapes, prefix, lrs_key)
    tol = TOL[dtype]

    shift = view.shift(mu, eta, offsets).detach()
    assert shift.shape == w_shape and shift.dtype == dtype
    assert rel_err(shift, ref_shift) < tol, (name, rel_err(shift, ref_shift))

    edit = view(mu, eta, offsets)
    assert isinstance(edit, GroupedEdit)
    ref_out_in = ref_shift.T if conv1d else ref_shift
    assert rel_err(edit.dense().detach(), ref_out_in) < tol
    assert float(edit.alpha.detach()) == float(sd[lrs_key][inner.index(name)])

    w = w0.clone()
    previous = view.apply_(w, mu, eta, offsets)
    step = (ref_new - w0).abs().max()
    slack = tol * step + 4 * torch.finfo(dtype).eps * w0.abs().max()
    assert (w - ref_new).abs().max() <= slack, (name, float((w - ref_new).abs().max()), float(slack))
    assert rel_err(w - w0, ref_new - w0) < tol * 10
    ops.undo_shift_(w, previous)
    assert torch.equal(w, w0)


# ------------------------------------------------------------------ agreement with MEND
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("conv1d", [False, True], ids=["linear", "conv1d"])
@pytest.mark.parametrize("shared", [True, False], ids=["shared", "separate"])
def test_matches_mend(device, gen, dtype, conv1d, shared):
    sd = to_device(make_mend_state_dict(gen, shared=shared, dtype=dtype), device)
    views = compat_mend.load(sd, INNER, SHAPES, conv1d=conv1d)
    assert list(views) == INNER
    for name in INNER:
        view = views[name]
        assert view.editor.layers[0].u.dtype == dtype and view.editor.layers[0].u.device.type == device
        check_edit_matches(view, sd, name, dtype, device, gen, shared, conv1d)
    if shared:  # weights of one shape share one editor and differ by mode
        assert views[INNER[0]].editor is views[INNER[3]].editor
        assert (views[INNER[0]].mode, views[INNER[3]].mode) == (0, 1)
        assert views[INNER[1]].editor is views[INNER[4]].editor
        assert views[INNER[0]].editor is not views[INNER[1]].editor
    else:
        assert len({id(v.editor) for v in views.values()}) == len(INNER)


@pytest.mark.parametrize("n_hidden", [0, 2])
def test_layer_count_follows_checkpoint(gen, n_hidden):
    sd = make_mend_state_dict(gen, n_hidden=n_hidden)
    views = compat_mend.load(sd, INNER, SHAPES)
    assert len(views[INNER[0]].editor.layers) == n_hidden + 1
    for name in (INNER[0], INNER[3], INNER[5]):
        check_edit_matches(views[name], sd, name, torch.float32, "cpu", gen, True, False)


@pytest.mark.parametrize("shared", [True, False], ids=["shared", "separate"])
def test_without_normalisation(gen, shared):
    """mend.norm=False: statistics ignored (auto when absent, or by norm=False when present)."""
    sd = make_mend_state_dict(gen, shared=shared)
    views = compat_mend.load(sd, INNER, SHAPES, norm=False)
    assert views[INNER[0]].editor.norm is None
    for name in INNER:
        check_edit_matches(views[name], sd, name, torch.float32, "cpu", gen, shared, False, norm=False)
    bare = {k: v for k, v in sd.items() if not k.endswith(compat_mend._NORM_BUFFERS)}
    views = compat_mend.load(bare, INNER, SHAPES)  # no statistics in the dict: norm off
    for name in (INNER[2], INNER[4]):
        check_edit_matches(views[name], bare, name, torch.float32, "cpu", gen, shared, False, norm=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_zero_variance_features(gen, dtype):
    """A feature constant over MEND's training has std 0 (a dead ReLU unit feeding T5's
    DenseReluDense.wo: μ, mean and std all 0 there): MEND divides by std + 1e-7 all the same, so
    where that unit fires at edit time its input is x / 1e-7.  Such a checkpoint loads (the
    statistics are finite) and gives MEND's shift, not one with the zero std replaced."""
    sd = make_mend_state_dict(gen, dtype=dtype)
    for key, (i, o) in (("(6, 10)", (6, 10)), ("(4, 3)", (4, 3))):
        for side, dim in (("u", i), ("v", o)):
            dead = torch.randperm(dim, generator=gen)[: max(1, dim // 3)]
            for b in ("mean", "std", "s"):
                sd[f"mend.{key}.{side}_{b}"][dead] = 0
    views = compat_mend.load(sd, INNER, SHAPES)
    for name in (INNER[0], INNER[3], INNER[5]):
        check_edit_matches(views[name], sd, name, dtype, "cpu", gen, True, False)


def test_half_precision_factors(gen):
    """MEND casts the captured factors to fp32 first; so does the import."""
    sd = make_mend_state_dict(gen)
    views = compat_mend.load(sd, INNER, SHAPES)
    for name in (INNER[0], INNER[2]):
        check_edit_matches(views[name], sd, name, torch.float32, "cpu", gen, True, False,
                           input_dtype=torch.bfloat16)


@pytest.mark.parametrize("stored,asked,kept", [
    (torch.bfloat16, None, torch.float32),  # MEND's compute type, whatever a half checkpoint holds
    (torch.float16, None, torch.float32),
    (torch.float32, torch.float64, torch.float64),  # an explicit dtype wins either way
    (torch.float64, torch.float32, torch.float32),
])
def test_editor_dtype(gen, stored, asked, kept):
    """The editors are kept in `dtype` (default: fp32, float64 for a float64 checkpoint) with the checkpoint's values."""
    sd = make_mend_state_dict(gen, dtype=stored)
    view = compat_mend.load(sd, INNER, SHAPES, dtype=asked)[INNER[3]]
    layer = view.editor.layers[1]
    assert layer.u.dtype == layer.mode_shift.dtype == view.editor.alpha.dtype == view.editor.norm.v_std.dtype == kept
    assert torch.equal(layer.u[0], sd["mend.(6, 10).mlp.layers.1.u"].to(kept))
    assert torch.equal(layer.mode_shift[0], sd["mend.(6, 10).mlp.layers.1.mode_shift.weight"].to(kept))
    assert torch.equal(view.editor.norm.v_std, sd["mend.(6, 10).v_std"].to(kept))
    assert float(view.edit_lr.detach()) == float(sd["edit_lrs"][3].to(kept))


def test_mixed_orientation_by_name(gen):
    sd = make_mend_state_dict(gen)
    views = compat_mend.load(sd, INNER, SHAPES, conv1d=[INNER[1], INNER[2]])
    assert [views[n].conv1d for n in INNER] == [False, True, True, False, False, False]
    for name in INNER[:3]:
        check_edit_matches(views[name], sd, name, torch.float32, "cpu", gen, True, views[name].conv1d)


def test_all_rows_dropped_gives_no_change(gen):
    sd = make_mend_state_dict(gen)
    view = compat_mend.load(sd, INNER, SHAPES)[INNER[0]]
    mu, eta, offsets = make_factors(gen, 6, 10, torch.float32)
    eta.zero_()
    assert torch.equal(view.shift(mu, eta, offsets), torch.zeros(10, 6))
    w = randn((10, 6), gen)
    w0 = w.clone()
    view.apply_(w, mu, eta)  # edit_offsets=None: one edit
    assert torch.equal(w, w0)


def test_statistics_frozen_and_mode_restored(gen):
    sd = make_mend_state_dict(gen)
    view = compat_mend.load(sd, INNER, SHAPES)[INNER[0]]
    assert not view.editor.training
    before = {k: v.clone() for k, v in view.editor.norm.state_dict().items()}
    view.editor.train()
    mu, eta, offsets = make_factors(gen, 6, 10, torch.float32)
    first = view.shift(mu, eta, offsets)
    assert view.editor.training
    after = view.editor.norm.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert torch.equal(view.shift(mu, eta, offsets), first)


def test_differentiable_in_editor_weights(gen):
    """The loaded editors are ordinary parameters: they can be fine-tuned further."""
    sd = make_mend_state_dict(gen)
    view = compat_mend.load(sd, INNER, SHAPES)[INNER[3]]
    mu, eta, offsets = make_factors(gen, 6, 10, torch.float32)
    (view.edit_lr * view.shift(mu, eta, offsets)).square().sum().backward()
    grads = [view.editor.layers[0].u.grad, view.editor.layers[1].mode_scale.grad, view.editor.alpha.grad]
    assert all(g is not None and bool(g.abs().sum() > 0) for g in grads)


def test_input_state_dict_unchanged(gen):
    sd = make_mend_state_dict(gen)
    copy = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in sd.items()}
    views = compat_mend.load(sd, INNER, SHAPES)
    with torch.no_grad():
        views[INNER[0]].editor.layers[0].u.add_(1)
    assert sd.keys() == copy.keys()
    assert all(torch.equal(sd[k], copy[k]) for k in sd if isinstance(sd[k], torch.Tensor))


# ------------------------------------------------------------------ sources: archive, safetensors
def test_archive_and_safetensors_sources(gen, tmp_path):
    from safetensors.torch import save_file

    sd = make_mend_state_dict(gen)
    mu, eta, offsets = make_factors(gen, 10, 6, torch.float32)
    expected = compat_mend.load(sd, INNER, SHAPES)[INNER[4]].shift(mu, eta, offsets)

    archive = {"model": sd, "opt": {"state": {}}, "lr_opt": None, "val_stats": {}, "step": 7}
    assert torch.equal(compat_mend.load(archive, INNER, SHAPES)[INNER[4]].shift(mu, eta, offsets), expected)
    flat = {**sd, "model": {"n_embd": 10}}  # a state dict (it holds tensors) is read as is, whatever its "model"
    assert torch.equal(compat_mend.load(flat, INNER, SHAPES)[INNER[4]].shift(mu, eta, offsets), expected)

    path = tmp_path / "mend.safetensors"
    save_file(tensors_only(sd), str(path))
    for source in (path, str(path)):
        got = compat_mend.load(source, INNER, SHAPES)[INNER[4]].shift(mu, eta, offsets)
        assert torch.equal(got, expected)


@pytest.mark.parametrize("filename", ["mend.pt", "model.PTH", "pytorch_model.bin", "gpt2.2021-10-14.bk"])
def test_pickle_paths_refused(tmp_path, filename):
    path = tmp_path / filename
    torch.save({"edit_lrs": torch.ones(1)}, path)
    # Refused by its name (any case), before safetensors tries it: "not a safetensors file" also says "convert".
    with pytest.raises(ValueError, match=r"(?s)torch\.save \(pickle\) file.*convert"):
        compat_mend.load(path, INNER[:1], SHAPES)


def test_non_safetensors_file_refused(tmp_path):
    path = tmp_path / "gpt2.2021-10-14_12-30-00"  # MEND's own archive names carry no extension
    torch.save({"edit_lrs": torch.ones(1)}, path)
    with pytest.raises(ValueError, match="(?s)not a safetensors file.*convert"):
        compat_mend.load(str(path), INNER[:1], SHAPES)
    with pytest.raises(ValueError, match="no file"):
        compat_mend.load(tmp_path / "missing.safetensors", INNER[:1], SHAPES)


# ------------------------------------------------------------------ GroupedEditor entry point
def test_from_mend_state_dict_delegates(gen, monkeypatch):
    calls = []
    sentinel = object()

    def fake_load(*args, **kwargs):
        calls.append((args, kwargs))
        return sentinel

    monkeypatch.setattr(compat_mend, "load", fake_load)
    sd, shapes = {"edit_lrs": torch.ones(1)}, {"w": (2, 3)}
    assert GroupedEditor.from_mend_state_dict(sd, ["w"], shapes, prefix="outer.mend.") is sentinel
    assert len(calls) == 1
    args, kwargs = calls[0]
    assert args[0] is sd and args[1] == ["w"] and args[2] is shapes and kwargs == {"prefix": "outer.mend."}


@pytest.mark.parametrize("prefix,lrs_key,load", [
    ("editor.mend.", "editor.edit_lrs", GroupedEditor.from_mend_state_dict),  # real call; the default key
    ("mend.", "mend.edit_lrs", partial(compat_mend.load, edit_lrs_key="mend.edit_lrs")),  # not an editor's key
])
def test_from_mend_state_dict_with_prefix(gen, prefix, lrs_key, load):
    """The editors are found under prefix and edit_lrs at lrs_key (by default next to the editors)."""
    sd = make_mend_state_dict(gen, prefix=prefix, lrs_key=lrs_key)
    views = load(sd, INNER, SHAPES, prefix=prefix)
    for name in (INNER[1], INNER[4]):
        check_edit_matches(views[name], sd, name, torch.float32, "cpu", gen, True, False,
                           prefix=prefix, lrs_key=lrs_key)


def test_an_older_mend_archive_under_gtn_loads_with_the_default_prefix(gen):
    """Older MEND archives hold the editors under "gtn." (ROME's and EasyEdit's MEND loaders rename
    "gtn." to "mend." in every archive they load): the default prefix reads them there
    and gives MEND's edits.  It raised "missing key mend.(6, 10).mlp.layers.0.u".  A checkpoint
    with "mend." keys is read under "mend." alone, "gtn." keys beside them ignored."""
    from dcedit_kernels.model_editor import ModelEditor

    old = make_mend_state_dict(gen, prefix="gtn.")
    for load in (compat_mend.load, GroupedEditor.from_mend_state_dict):
        views = load(old, INNER, SHAPES)
        for name in (INNER[0], INNER[4]):
            check_edit_matches(views[name], old, name, torch.float32, "cpu", gen, True, False, prefix="gtn.")
    model, tok, inner, _, sd = tiny_mend(gen, "llama")
    me = ModelEditor.from_mend(model, tok, {k.replace("mend.", "gtn.", 1): v for k, v in sd.items()}, inner)
    want = ModelEditor.from_mend(model, tok, sd, inner).state_tensors()
    got = me.state_tensors()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)

    both = {**make_mend_state_dict(gen), **old}  # the "gtn." editors' values differ from the "mend." ones'
    views = compat_mend.load(both, INNER, SHAPES)
    for name in (INNER[1], INNER[3]):
        check_edit_matches(views[name], both, name, torch.float32, "cpu", gen, True, False)


# ------------------------------------------------------------------ bad checkpoints and arguments
def _drop(key):
    def f(sd):
        del sd[key]
    return f


def _set(key, value):
    def f(sd):
        sd[key] = value(sd) if callable(value) else value
    return f


BAD_CHECKPOINTS = [
    ("missing v", _drop("mend.(6, 10).mlp.layers.1.v"), "mend.(6, 10).mlp.layers.1.v"),
    ("missing mode", _drop("mend.(5, 5).mlp.layers.0.mode_scale.weight"), "mend.(5, 5).mlp.layers.0.mode_scale.weight"),
    ("missing editor", lambda sd: [sd.pop(k) for k in list(sd) if k.startswith("mend.(4, 3).")], "mend.(4, 3)"),
    ("missing layer 0", lambda sd: [sd.pop(k) for k in list(sd) if k.startswith("mend.(5, 5).mlp.layers.0.")],
     "mend.(5, 5).mlp.layers.0.u"),
    ("u too wide", _set("mend.(10, 6).mlp.layers.0.u", torch.zeros(16, 17)), "mend.(10, 6).mlp.layers.0.u"),
    ("u wrong d", _set("mend.(10, 6).mlp.layers.0.u", torch.zeros(15, 12)), "mend.(10, 6).mlp.layers.0.u"),
    ("v shape", _set("mend.(10, 6).mlp.layers.1.v", torch.zeros(12, 15)), "mend.(10, 6).mlp.layers.1.v"),
    ("bias shape", _set("mend.(5, 5).mlp.layers.1.bias", torch.zeros(11)), "mend.(5, 5).mlp.layers.1.bias"),
    ("mode rows", _set("mend.(6, 10).mlp.layers.0.mode_shift.weight", torch.zeros(3, 16)),
     "mend.(6, 10).mlp.layers.0.mode_shift.weight"),
    ("unexpected field", _set("mend.(6, 10).mlp.layers.0.extra", torch.zeros(1)), "mend.(6, 10).mlp.layers.0.extra"),
    ("one-sided layout", _set("mend.(6, 10).mlp1.layers.0.u", torch.zeros(6, 6)), "mend.(6, 10).mlp1.layers.0.u"),
    ("unknown shape", _set("mend.(3, 3).mlp.layers.0.u", torch.zeros(6, 6)), "mend.(3, 3)"),
    ("edit_lrs length", _set("edit_lrs", torch.ones(5)), "edit_lrs"),
    ("edit_lrs missing", _drop("edit_lrs"), "edit_lrs"),
    ("u_std missing", _drop("mend.(4, 3).u_std"), "mend.(4, 3).u_std"),
    ("v_mean shape", _set("mend.(4, 3).v_mean", torch.zeros(4)), "mend.(4, 3).v_mean"),
    ("never trained", _set("mend.(4, 3).u_mean", torch.full((4,), float("nan"))), "mend.(4, 3).u_mean"),
    ("too few tokens", _set("mend.(4, 3).k", torch.ones(1)), "mend.(4, 3).k"),
    ("not a tensor", _set("mend.(4, 3).k", 37.0), "mend.(4, 3).k"),
    ("k shape", _set("mend.(4, 3).k", torch.full((2,), 37.0)), "mend.(4, 3).k"),
    ("k NaN", _set("mend.(4, 3).k", torch.full((1,), float("nan"))), "mend.(4, 3).k"),  # finite statistics
    ("u integer", _set("mend.(10, 6).mlp.layers.0.u", torch.zeros(16, 12, dtype=torch.int32)),
     "mend.(10, 6).mlp.layers.0.u"),
    ("edit_lrs integer", _set("edit_lrs", torch.ones(6, dtype=torch.int64)), "edit_lrs"),
    # The running statistics were copied in cast, as the layers' weights are not (session 54's fuzz).
    ("u_std integer", _set("mend.(4, 3).u_std", torch.ones(4, dtype=torch.int32)), "mend.(4, 3).u_std"),
    ("v_mean bool", _set("mend.(4, 3).v_mean", torch.ones(3, dtype=torch.bool)), "mend.(4, 3).v_mean"),
    ("k integer", _set("mend.(4, 3).k", torch.full((1,), 37, dtype=torch.int64)), "mend.(4, 3).k"),
    ("missing u of layer 0", _drop("mend.(5, 5).mlp.layers.0.u"), "mend.(5, 5).mlp.layers.0.u"),
    ("editor key without a field", _set("mend.(6, 10)", torch.zeros(1)), "unexpected key mend.(6, 10): expected mend.<editor>.<field>"),
    # Only edit_lrs: the missing editor is named in MEND's default (shared, per-shape) layout.
    ("no editors", lambda sd: [sd.pop(k) for k in list(sd) if k.startswith("mend.")], "mend.(6, 10).mlp.layers.0.u"),
]


@pytest.mark.parametrize("mutate,key", [b[1:] for b in BAD_CHECKPOINTS], ids=[b[0] for b in BAD_CHECKPOINTS])
def test_bad_checkpoint_names_the_key(gen, mutate, key):
    sd = make_mend_state_dict(gen)
    mutate(sd)
    with pytest.raises(ValueError) as info:
        compat_mend.load(sd, INNER, SHAPES)
    assert key in str(info.value)
    assert "got Tensor" not in str(info.value)  # a tensor of the wrong dtype is named by its dtype


def test_separate_editor_with_modes_refused(gen):
    sd = make_mend_state_dict(gen, shared=False)
    key = f"mend.{INNER[0].replace('.', '#')}.mlp.layers.0.mode_scale.weight"
    sd[key] = torch.ones(1, 16)
    with pytest.raises(ValueError, match="mode_scale"):
        compat_mend.load(sd, INNER, SHAPES)


@pytest.mark.parametrize("inner,shapes,match", [
    (INNER[:-1], SHAPES, "edit_lrs"),  # MEND's list must be complete (edit_lrs has one per name)
    (INNER + [INNER[0]], SHAPES, "twice"),
    ([], SHAPES, "at least one"),
    ("transformer.h.0.mlp.c_fc.weight", SHAPES, "inner_params must be a list"),  # not its letters
    (INNER, {n: s for n, s in SHAPES.items() if n != INNER[2]}, INNER[2]),
    (INNER, {**SHAPES, INNER[2]: (5,)}, INNER[2]),
    (INNER, {**SHAPES, INNER[2]: (5, 0)}, INNER[2]),
    (INNER, {**SHAPES, INNER[2]: (5.5, 5)}, INNER[2]),  # not cut to 5
    ([0] + INNER[1:], {**SHAPES, 0: (6, 10)}, "inner_params must hold str"),
    (INNER, [("a", (1, 1))], "shapes"),
])
def test_bad_arguments(gen, inner, shapes, match):
    sd = make_mend_state_dict(gen)
    with pytest.raises(ValueError, match=match):
        compat_mend.load(sd, inner, shapes)


@pytest.mark.parametrize("kwargs,match", [
    ({"dtype": "float32"}, "dtype"),  # a str reached nn.Module.to as a device string
    ({"dtype": torch.int32}, "dtype"),
    ({"device": "nope"}, "device"),
    ({"device": 1.5}, "device"),
    ({"norm": "yes"}, "norm"),
    ({"prefix": "mend"}, "prefix"),  # no trailing dot: every editor name came out empty
    ({"prefix": 3}, "prefix"),
    ({"edit_lrs_key": ["edit_lrs"]}, "edit_lrs_key"),
])
def test_bad_options_name_the_argument(gen, kwargs, match):
    sd = make_mend_state_dict(gen)
    with pytest.raises(ValueError, match=match):
        compat_mend.load(sd, INNER, SHAPES, **kwargs)


def test_float64_rows_that_underflow_fp32_are_dropped(gen):
    """MEND rounds the factors to fp32 before dropping all-zero rows: a float64 row below fp32's
    smallest subnormal is a zero row there too."""
    sd = make_mend_state_dict(gen, dtype=torch.float64)
    views = compat_mend.load(sd, INNER, SHAPES)
    for name in (INNER[0], INNER[5]):
        in_f, out_f = SHAPES[name]
        mu, eta, offsets = make_factors(gen, in_f, out_f, torch.float64)
        eta[2] = 1e-50
        mu[5] = -1e-60
        ref_shift, _ = mend_edit(sd, name, randn((out_f, in_f), gen, torch.float64), mu, eta)
        assert rel_err(views[name].shift(mu, eta, offsets).detach(), ref_shift) < TOL[torch.float64]


def test_bad_conv1d_and_source(gen):
    sd = make_mend_state_dict(gen)
    with pytest.raises(ValueError, match="conv1d"):
        compat_mend.load(sd, INNER, SHAPES, conv1d=["not.a.weight"])
    # One name, not its letters; a mapping, not its keys ({name: False} made that weight Conv1D).
    for bad in (INNER[0], {INNER[0]: False}):
        with pytest.raises(ValueError, match="conv1d must be a bool or a collection"):
            compat_mend.load(sd, INNER, SHAPES, conv1d=bad)
    for bad in ([INNER[:2]], [1, "x"]):  # a nested list; a non-name among names (TypeErrors from set/sorted)
        with pytest.raises(ValueError, match="conv1d must hold inner parameter names"):
            compat_mend.load(sd, INNER, SHAPES, conv1d=bad)
    with pytest.raises(ValueError, match="state_dict"):
        compat_mend.load([1, 2], INNER, SHAPES)


def test_apply_checks_weight_and_changes_nothing(gen):
    sd = make_mend_state_dict(gen)
    views = compat_mend.load(sd, INNER, SHAPES, conv1d=[INNER[0]])
    mu, eta, offsets = make_factors(gen, 6, 10, torch.float32)
    linear_shaped = randn((10, 6), gen)  # a Conv1D weight is stored (in, out) = (6, 10)
    kept = linear_shaped.clone()
    with pytest.raises(ValueError, match="weight"):
        views[INNER[0]].apply_(linear_shaped, mu, eta, offsets)
    w = randn((10, 6), gen)
    w0 = w.clone()
    with pytest.raises(ValueError, match="mu"):
        views[INNER[3]].apply_(w, mu[:, :5], eta, offsets)
    with pytest.raises(ValueError, match="edit_offsets"):
        views[INNER[3]].apply_(w, mu, eta, offsets[:-1])
    assert torch.equal(linear_shaped, kept) and torch.equal(w, w0)


@pytest.mark.parametrize("bad", ["weight", "mu", "eta"])
def test_view_refuses_a_non_tensor_argument(gen, bad):
    """A list for a tensor argument is a ValueError naming it (it was an AttributeError without the check)."""
    view = compat_mend.load(make_mend_state_dict(gen), INNER, SHAPES)[INNER[3]]
    mu, eta, _ = make_factors(gen, 6, 10, torch.float32)
    args = {"weight": randn((10, 6), gen), "mu": mu, "eta": eta}
    args[bad] = args[bad].tolist()
    with pytest.raises(ValueError, match=f"{bad} must be a torch.Tensor"):
        view.apply_(args["weight"], args["mu"], args["eta"])


def test_apply_with_a_non_finite_gradient_changes_nothing(gen):
    """MendWeightView.apply_ wrote NaN into the whole weight when one η row was NaN (SPEC: a
    failed edit leaves the model as it was)."""
    sd = make_mend_state_dict(gen)
    views = compat_mend.load(sd, INNER, SHAPES, conv1d=[INNER[0]])
    mu, eta, offsets = make_factors(gen, 6, 10, torch.float32)
    eta[0, 0] = float("inf")
    w = randn((10, 6), gen)
    w0 = w.clone()
    with pytest.raises(FloatingPointError, match="not finite"):
        views[INNER[3]].apply_(w, mu, eta, offsets)
    assert torch.equal(w, w0)


# ------------------------------------------------------------------ which loss feeds the views
def test_loss_reduction_is_mends_batch_mean(gen):
    """MEND's edit() backpropagates the batch's mean NLL over label tokens; ModelEditor with
    compat_mend.LOSS_REDUCTION captures exactly those factors (the model's own mean loss)."""
    from dcedit_kernels.capture import compute_factors
    from dcedit_kernels.model_editor import ModelEditor
    from dcedit_kernels.models import tiny_model

    assert compat_mend.LOSS_REDUCTION == "token"
    model, tok = tiny_model("gpt2", seed=int(torch.randint(0, 100, (1,), generator=gen)), dtype=torch.float64)
    layers = ["transformer.h.1.mlp.c_fc", "transformer.h.1.mlp.c_proj"]
    me = ModelEditor(model, tok, layers, method="mend", rank=3, loss_reduction=compat_mend.LOSS_REDUCTION)
    batch = me.tokenize(["The sky is", "Paris is the capital of", "two plus two"], ["green", "Spain", "is five"])
    ours, _, _ = me.capture(batch)

    def mend_nll(outputs, batch):  # MEND's losses.masked_log_probs(shift=True)["nll"], in float64
        pred, targ = outputs.logits[:, :-1], batch["labels"][:, 1:].clone()
        mask = targ != -100
        targ[~mask] = 0
        log_probs = pred.log_softmax(-1).gather(-1, targ.unsqueeze(-1)).squeeze(-1)
        return -(log_probs * mask).sum() / mask.sum()

    mends, _ = compute_factors(model, batch, layers, loss_fn=mend_nll)
    for name in layers:
        assert torch.equal(ours[name].mu, mends[name].mu)
        assert rel_err(ours[name].eta, mends[name].eta) < 1e-12


# ------------------------------------------------------------------ ModelEditor.from_mend
# Inner parameters of the tiny models, not in model order: two shapes shared by two weights each
# (modes follow this list) and one weight alone.  MEND_RANK makes the smallest editor's mid width
# min(rank, d) = d (GPT-2's 20x20: d = 40; Llama's k_proj 24x12: d = 36), the others' the rank.
TINY_INNER = {
    "gpt2": ["transformer.h.1.mlp.c_fc.weight", "transformer.h.0.mlp.c_proj.weight",
             "transformer.h.1.attn.c_proj.weight", "transformer.h.0.mlp.c_fc.weight",
             "transformer.h.1.mlp.c_proj.weight"],
    "llama": ["model.layers.1.mlp.down_proj.weight", "model.layers.0.mlp.gate_proj.weight",
              "model.layers.1.self_attn.k_proj.weight", "model.layers.0.mlp.up_proj.weight",
              "model.layers.0.mlp.down_proj.weight"],
}
MEND_RANK = {"gpt2": 45, "llama": 40}
TINY_REQUESTS = [("The sky is", "green"), ("Paris is the capital of", "Spain"), ("two plus two", "is five")]


def tiny_mend(gen, arch, inner=None, shared=True, dtype=torch.float64):
    """(model, tokenizer, inner params, their (in, out) shapes, a random MEND checkpoint for them)."""
    from dcedit_kernels.model_editor import ModelEditor
    from dcedit_kernels.models import tiny_model

    model, tok = tiny_model(arch, seed=int(torch.randint(0, 100, (1,), generator=gen)), dtype=dtype)
    inner = inner or TINY_INNER[arch]
    shapes = {n: ModelEditor.shape_of(model.get_submodule(n[: -len(".weight")])) for n in inner}
    sd = make_mend_state_dict(gen, inner, shapes, shared=shared, rank=MEND_RANK[arch])
    return model, tok, inner, shapes, sd


def requests():
    from dcedit_kernels.requests import EditRequest

    return [EditRequest(p, t) for p, t in TINY_REQUESTS]


def check_from_mend_edits(me, sd, inner, shapes, shared, conv1d):
    """me.apply changes each inner parameter exactly as its MendWeightView's apply_ does with the
    factors me captures (and as MEND's formulas do); every other parameter stays; undo is exact."""
    model = me.model
    views = compat_mend.load(sd, inner, shapes, conv1d=conv1d)
    layers = [n[: -len(".weight")] for n in inner]
    assert me.method == "mend" and me.loss_reduction == compat_mend.LOSS_REDUCTION == "token"
    assert me.layers == layers
    assert [me.slots[layer][1] for layer in layers] == [views[n].mode for n in inner]
    reqs = requests()
    factors, _, _ = me.capture(me.tokenize([r.prompt for r in reqs], [r.target for r in reqs]))
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    handle = me.apply(reqs)
    after = {k: v.detach().clone() for k, v in model.named_parameters()}
    for name, layer in zip(inner, layers):
        f = factors[layer]
        expected = before[name].clone()
        views[name].apply_(expected, f.mu, f.eta, f.edit_offsets)
        assert not torch.equal(after[name], before[name]), name
        assert torch.equal(after[name], expected), (name, float((after[name] - expected).abs().max()))
        _, mend_new = mend_edit(sd, name, before[name], f.mu, f.eta, shared, conv1d, True, inner, shapes)
        assert rel_err(after[name] - before[name], mend_new - before[name]) < TOL[torch.float32], name
    assert all(torch.equal(after[k], before[k]) for k in before if k not in inner)
    assert handle.undo()
    assert all(torch.equal(v, before[k]) for k, v in model.named_parameters())
    return after


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_model_editor_from_mend(gen, tmp_path, arch):
    from dcedit_kernels.model_editor import ModelEditor

    model, tok, inner, shapes, sd = tiny_mend(gen, arch)
    rng = torch.get_rng_state()
    me = ModelEditor.from_mend(model, tok, sd, inner)
    assert torch.equal(torch.get_rng_state(), rng)  # building the editors draws no global random numbers
    after = check_from_mend_edits(me, sd, inner, shapes, shared=True, conv1d=arch == "gpt2")

    # save / ModelEditor.load: the same editors, config and edits, bit for bit.
    path = tmp_path / "mend_editor.safetensors"
    me.save(path)
    loaded = ModelEditor.load(path, model, tok)
    assert loaded.config() == me.config() and loaded.slots == me.slots
    ours, theirs = me.state_tensors(), loaded.state_tensors()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    with loaded.edited(requests()):
        assert all(torch.equal(v, after[k]) for k, v in model.named_parameters())
    assert all(torch.equal(v, before[k]) for k, v in model.named_parameters())


def mend_hooked_factors(model, batch, inner):
    """What MEND's hooks hold after edit()'s backward, for each inner parameter: the module's input
    (p.__x__) and the gradient of its output (p.__delta__) over every position of the padded batch,
    under masked_log_probs(...)["nll"] (labels shifted: the mean NLL over the batch's label tokens).
    Plain forward hooks and autograd: no dcedit_kernels capture."""
    held, handles = {}, []
    for name in inner:
        def hook(module, args, output, name=name):
            held[name] = [args[0].detach(), None]
            output.register_hook(lambda g: held[name].__setitem__(1, g.detach()))
        handles.append(model.get_submodule(name[: -len(".weight")]).register_forward_hook(hook))
    try:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    finally:
        for h in handles:
            h.remove()
    pred, targ = logits[:, :-1].double(), batch["labels"][:, 1:].clone()
    mask = targ != -100
    targ[~mask] = 0
    log_probs = pred.log_softmax(-1).gather(-1, targ.unsqueeze(-1)).squeeze(-1)
    (-(log_probs * mask).sum() / mask.sum()).backward()
    model.zero_grad(set_to_none=True)
    return {n: (x.reshape(-1, x.shape[-1]), d.reshape(-1, d.shape[-1])) for n, (x, d) in held.items()}


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_from_mend_apply_is_mends_edit_from_its_own_hooks(gen, arch):
    """from_mend(...).apply against MEND's edit() end to end, with μ/η taken as MEND takes them
    (hooks on the inner modules, every position, MEND's batch-mean NLL) rather than from the
    package's capture: the other from_mend tests feed the views the factors ModelEditor captured,
    so a capture that left out tokens MEND uses (the prompt's, whose η is not zero in the lower
    block) passed them.  p_new = p + edit_lrs[idx] · Σ η̃ μ̃ᵀ, to fp32 rounding (fp32 editors)."""
    from dcedit_kernels.model_editor import ModelEditor

    model, tok, inner, shapes, sd = tiny_mend(gen, arch)
    reqs = requests()
    batch = ModelEditor.from_mend(model, tok, sd, inner).tokenize([r.prompt for r in reqs], [r.target for r in reqs])
    factors = mend_hooked_factors(model, batch, inner)
    # Statistics on the factors' scale, as a trained editor's are: the random ones (~1) drowned the
    # η (1e-5 to 1e-2 here) and the small μ of the down projections.
    scales = {}
    for name in inner:  # one per editor: the weights of a shape share its statistics
        key, (mu, eta) = f"mend.{tuple(shapes[name])}.", factors[name]
        kept = (mu.abs().amax(1) != 0) & (eta.abs().amax(1) != 0)
        scales.setdefault(key, {"u": float(mu[kept].std()), "v": float(eta[kept].std())})
    for key, by_side in scales.items():
        for side, scale in by_side.items():
            for b, power in (("_mean", 1), ("_std", 1), ("_s", 2)):
                sd[key + side + b] = sd[key + side + b] * scale ** power
    me = ModelEditor.from_mend(model, tok, sd, inner)
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    handle = me.apply(reqs)
    after = {k: v.detach().clone() for k, v in model.named_parameters()}
    assert handle.undo()
    conv1d = arch == "gpt2"
    for name in inner:
        mu, eta = factors[name]
        _, mend_new = mend_edit(sd, name, before[name], mu, eta, True, conv1d, True, inner, shapes)
        assert rel_err(after[name] - before[name], mend_new - before[name]) < TOL[torch.float32], name
    assert all(torch.equal(after[k], before[k]) for k in before if k not in inner)


def test_from_mend_separate_editors(gen, tmp_path):
    """mend.shared=False maps when every inner parameter has its own shape; else it is refused."""
    from dcedit_kernels.model_editor import ModelEditor

    inner = ["transformer.h.0.mlp.c_fc.weight", "transformer.h.1.attn.c_proj.weight", "transformer.h.1.mlp.c_proj.weight"]
    model, tok, inner, shapes, sd = tiny_mend(gen, "gpt2", inner, shared=False)
    me = ModelEditor.from_mend(model, tok, sd, inner)
    check_from_mend_edits(me, sd, inner, shapes, shared=False, conv1d=True)

    # h.1 and h.0 c_fc share (20, 37) (so do the c_proj): a ModelEditor has one editor for both.
    _, _, inner, _, sd = tiny_mend(gen, "gpt2", shared=False)
    with pytest.raises(ValueError, match=r"(?s)transformer\.h\.1\.mlp\.c_fc\.weight.*transformer\.h\.0\.mlp\."
                                         r"c_fc\.weight.*shared=False"):
        ModelEditor.from_mend(model, tok, sd, inner)


def test_from_mend_of_a_checkpoint_without_normalisation(gen):
    """MEND trained with mend.norm=False saves no statistics: from_mend builds editors without a
    norm (as the checkpoint has them, not by default), so such a checkpoint loads, with each
    editor's state the checkpoint's (an editor built with a norm could not take that state)."""
    from dcedit_kernels.model_editor import ModelEditor

    model, tok, inner, shapes, sd = tiny_mend(gen, "gpt2")
    bare = {k: v for k, v in sd.items() if not k.endswith(compat_mend._NORM_BUFFERS)}
    me = ModelEditor.from_mend(model, tok, bare, inner)
    assert all(e.norm is None for e in me.editors.values())
    views = compat_mend.load(bare, inner, shapes)
    for name in inner:
        key = "{}x{}".format(*shapes[name])
        ours, theirs = me.editors[key].state_dict(), views[name].editor.state_dict()
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours), name


def test_from_mend_takes_the_constructors_runtime_settings(gen):
    """from_mend's capture_batch_size and editor_device are the constructor's: the ModelEditor it
    builds captures in chunks of the given size (the default when not given)."""
    from dcedit_kernels.edit_capture import DEFAULT_CAPTURE_BATCH_SIZE
    from dcedit_kernels.model_editor import ModelEditor

    model, tok, inner, shapes, sd = tiny_mend(gen, "gpt2")
    size = int(torch.randint(1, 9, (1,), generator=gen))
    me = ModelEditor.from_mend(model, tok, sd, inner, capture_batch_size=size, editor_device="cpu")
    assert me.capture_batch_size == size and me.editor_device == torch.device("cpu")
    assert ModelEditor.from_mend(model, tok, sd, inner).capture_batch_size == DEFAULT_CAPTURE_BATCH_SIZE


def test_from_mend_of_a_tied_head_names_the_weight_it_shares_and_takes_allow_tied(gen):
    """An inner parameter that is a tied weight (GPT-2's lm_head.weight, the input embedding's
    Parameter) is a weight of the model under its own name too: from_mend's refusal names the
    weight it shares, not "not the weight of a module".  Its advice works: from_mend takes the
    constructor's allow_tied (it once had no such argument, so following "Pass allow_tied=True" was
    a TypeError), and its edit of the tied head changes the input embedding, the same Parameter,
    until undone."""
    from dcedit_kernels.model_editor import ModelEditor
    from dcedit_kernels.models import tiny_model

    model, tok = tiny_model("gpt2", seed=int(torch.randint(0, 100, (1,), generator=gen)), dtype=torch.float64)
    model.get_output_embeddings().weight = model.get_input_embeddings().weight
    inner = ["lm_head.weight"]
    shapes = {"lm_head.weight": ModelEditor.shape_of(model.get_output_embeddings())}
    sd = make_mend_state_dict(gen, inner, shapes, rank=MEND_RANK["gpt2"])
    with pytest.raises(ValueError, match="'lm_head' shares its weight with transformer.wte.weight.*"
                                         "Pass allow_tied=True to edit it anyway"):
        ModelEditor.from_mend(model, tok, sd, inner)
    me = ModelEditor.from_mend(model, tok, sd, inner, allow_tied=True)
    assert me.allow_tied is True and me.layers == ["lm_head"]
    embedding = model.get_input_embeddings().weight
    before = embedding.detach().clone()
    handle = me.apply(requests())
    assert model.get_output_embeddings().weight is embedding and not torch.equal(embedding, before)
    handle.undo()
    assert torch.equal(embedding, before)


def test_from_mend_needs_one_rank_and_depth(gen):
    """MEND builds every editor with one rank and depth: a checkpoint mixing them is refused."""
    from dcedit_kernels.model_editor import ModelEditor

    model, tok, inner, shapes, sd = tiny_mend(gen, "gpt2")
    shallow = {k: v for k, v in sd.items() if not k.startswith("mend.(20, 20).mlp.layers.1.")}
    with pytest.raises(ValueError, match=r"shape \(20, 20\) has mid width 40 and 1 layers"):
        ModelEditor.from_mend(model, tok, shallow, inner)
    narrow = dict(sd)
    for k in range(2):  # mid 30 where MEND's min(45, 40) = 40
        narrow[f"mend.(20, 20).mlp.layers.{k}.u"] = sd[f"mend.(20, 20).mlp.layers.{k}.u"][:, :30]
        narrow[f"mend.(20, 20).mlp.layers.{k}.v"] = sd[f"mend.(20, 20).mlp.layers.{k}.v"][:30]
    with pytest.raises(ValueError, match=r"shape \(20, 20\) has mid width 30.*= 40"):
        ModelEditor.from_mend(model, tok, narrow, inner)


@pytest.mark.parametrize("bad,named,match", [
    ("transformer.h.0.mlp.c_fcc.weight", "transformer.h.0.mlp.c_fcc.weight", "close matches"),  # a typo
    ("transformer.h.0.mlp.c_fc.bias", "transformer.h.0.mlp.c_fc.bias", "'<module>.weight'"),  # not a weight
    ("transformer.h.0.mlp.c_fc", "transformer.h.0.mlp.c_fc", "'<module>.weight'"),  # a module name
    ("transformer.wte.weight", "transformer.wte", "Embedding"),  # not a Linear / Conv1D: named by its module
])
def test_from_mend_bad_inner_params(gen, bad, named, match):
    from dcedit_kernels.model_editor import ModelEditor

    model, tok, inner, shapes, sd = tiny_mend(gen, "gpt2")
    with pytest.raises(ValueError, match=match) as info:
        ModelEditor.from_mend(model, tok, sd, [bad] + inner[1:])
    assert str(info.value).startswith(f"inner_params: {named!r}")


def test_model_editor_load_points_to_from_mend(gen, tmp_path):
    """ModelEditor.load of a pickle or of a (converted) MEND checkpoint says what to do instead."""
    from safetensors.torch import save_file

    from dcedit_kernels.model_editor import ModelEditor

    model, tok, inner, shapes, sd = tiny_mend(gen, "gpt2")
    for filename in ("mend.pt", "gpt2.2021-10-14_12-30-00"):  # MEND's own archives have no suffix
        path = tmp_path / filename
        torch.save({"model": tensors_only(sd)}, path)
        with pytest.raises(ValueError, match=r"(?s)not a safetensors file.*convert.*ModelEditor\.from_mend"):
            ModelEditor.load(path, model, tok)
    with pytest.raises(ValueError, match="pickle"):
        ModelEditor.load(tmp_path / "mend.pt", model, tok)

    path = tmp_path / "mend.safetensors"  # what the hint's conversion writes
    save_file(tensors_only(sd), str(path))
    with pytest.raises(ValueError, match=r"not a ModelEditor checkpoint.*ModelEditor\.from_mend"):
        ModelEditor.load(path, model, tok)
    me = ModelEditor.from_mend(model, tok, path, inner)  # the safetensors path is read as compat.mend reads it
    assert me.state_tensors().keys() == ModelEditor.from_mend(model, tok, sd, inner).state_tensors().keys()
    with pytest.raises(ValueError, match="convert"):
        ModelEditor.from_mend(model, tok, tmp_path / "mend.pt", inner)


@pytest.mark.parametrize("arch", ["bart", "t5"])
def test_from_mend_warns_for_an_encoder_decoder_other_than_t5(gen, arch):
    """MEND's qa runs shift the loss for every seq2seq model but T5 (`shift_targets`: "t5" not in
    the name) and feed BART the target with its first token replaced by </s> as decoder input;
    apply() captures under the model's own convention (labels shifted right, loss unshifted),
    which is MEND's T5 one.  A tiny BART's decoder fc1 gradient then had cosine 0.40 with MEND's:
    from_mend said nothing.  T5's factors are MEND's (to 7e-16), so it stays silent."""
    import warnings

    from dcedit_kernels.model_editor import ModelEditor
    from dcedit_kernels.models import tiny_model

    model, tok = tiny_model(arch, seed=int(torch.randint(0, 100, (1,), generator=gen)))
    inner = [n for n, _ in model.named_parameters()
             if n.endswith(("decoder.layers.1.fc1.weight", "decoder.block.1.layer.2.DenseReluDense.wi.weight"))]
    assert len(inner) == 1
    shapes = {n: ModelEditor.shape_of(model.get_submodule(n[: -len(".weight")])) for n in inner}
    sd = make_mend_state_dict(gen, inner, shapes, rank=8)
    if arch == "bart":
        with pytest.warns(UserWarning, match=r"(?s)encoder-decoder.*T5.*MEND's"):
            ModelEditor.from_mend(model, tok, sd, inner)
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            ModelEditor.from_mend(model, tok, sd, inner)


def test_a_safetensors_file_saved_over_while_it_loads_gives_one_files_tensors(tmp_path, monkeypatch):
    """compat.mend read a safetensors state_dict with load_file, which parses the header of the file
    it opens and then maps the path again for the tensors (UntypedStorage.from_file): a save over
    the path in between gave tensors read at the first file's offsets from the second file's bytes,
    neither file's, without a word.  It reads as the editors' loads do (`read_safetensors`: one held
    open, read again when the path names another file after): the tensors of the file now there."""
    import os

    from safetensors.torch import save_file

    path, other = tmp_path / "mend.safetensors", tmp_path / "other.safetensors"
    save_file({"w": torch.arange(8.0)}, str(path))
    # Another header length (its metadata): the first file's offsets fall elsewhere in its bytes.
    save_file({"w": torch.arange(8.0) + 100}, str(other), metadata={"note": "x" * 13})
    original = torch.UntypedStorage.from_file

    def saved_over_meanwhile(*args, **kwargs):
        if other.exists():
            os.replace(other, path)
        return original(*args, **kwargs)

    monkeypatch.setattr(torch.UntypedStorage, "from_file", saved_over_meanwhile)
    state = compat_mend._read_state_dict(path)
    assert not other.exists()  # the save did land during the load
    assert torch.equal(state["w"], torch.arange(8.0) + 100)
