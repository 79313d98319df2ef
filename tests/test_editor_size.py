"""GroupedEditor's sizes against this machine's memory (`editors.editor_size`): sizes that cannot
fit are a ValueError naming them before anything is built; sizes that fit build as before.

Before the check, `GroupedEditor(4, 4, n_layers=10**23)` looped, its memory growing until the
process was killed, and sizes whose tensors each fit but not all together filled the machine.
Every refusal here is asserted with the layers' constructor made to fail (`no_layer_built`), so
that without the check a test fails at once instead of running the machine out of memory."""

import pytest
import torch

from dcedit_kernels.editors import GroupedEditor, editor_size, grouped_editor
from helpers import reset_default_device

NO_CUDA = not torch.cuda.is_available()
# What the CPU's memory is: a container's cgroup limit where it is lower than the RAM.
CPU_WHAT = r"(RAM|its cgroup's memory limit) \+ swap"


@pytest.fixture
def no_layer_built(monkeypatch):
    """GroupedEditor's layers raise AssertionError when one is built (the refusals come before)."""
    class Refused(grouped_editor.LowRankLayer):
        def __init__(self):
            raise AssertionError("a layer was built: the sizes were not refused before building")

    monkeypatch.setattr(grouped_editor, "LowRankLayer", Refused)


def _randint(lo, hi, gen) -> int:
    """An int in [lo, hi], Python ints of any size (torch's randint stops at int64)."""
    return lo + int(torch.randint(0, 2**62, (), generator=gen)) * (hi - lo) // 2**62


def _held(editor) -> int:
    return sum(t.numel() for t in (*editor.parameters(), *editor.buffers()))


def _random_settings(gen) -> dict:
    def pick(n):
        return int(torch.randint(1, n + 1, (), generator=gen))

    routing = ("single", "random", "gate")[pick(3) - 1]
    generator = (None, "token", "sentence")[pick(3) - 1]
    kw = dict(in_features=pick(7), out_features=pick(7), n_editors=1 if routing == "single" else pick(4),
              rank=pick(20), n_layers=pick(3), n_modes=pick(3), routing=routing, generator=generator,
              norm=bool(pick(2) - 1), fusion="add")
    if routing == "gate":
        kw.update(feat_dim=pick(5), gate_norm=bool(pick(2) - 1), top_k=pick(kw["n_editors"]))
    if generator is not None:
        kw["generator_hidden"] = pick(6)
    return kw


def _numel(kw) -> int:
    return editor_size.editor_numel(
        in_features=kw["in_features"], out_features=kw["out_features"], n_editors=kw["n_editors"], rank=kw["rank"],
        n_layers=kw["n_layers"], n_modes=kw["n_modes"], norm=kw["norm"], gate_norm=kw.get("gate_norm", True),
        feat_dim=kw.get("feat_dim"), generator_hidden=kw.get("generator_hidden"))


def test_editor_numel_is_what_the_editor_holds(gen):
    """The count the check weighs is every parameter and buffer the editor then holds (rank above
    in + out features clamped, as the editor clamps it), over random settings of every kind."""
    for _ in range(12):
        kw = _random_settings(gen)
        assert _numel(kw) == _held(GroupedEditor(**kw)), kw


def test_sizes_past_this_machines_memory_are_refused_before_anything_is_built(gen, no_layer_built):
    """A layer count whose Python objects alone exceed the CPU's memory (at least 4 KiB a layer),
    and editors, gates (feat_dim) or ψ (generator_hidden) whose tensors exceed it, past int64 too:
    a ValueError naming the sizes, before any layer is built.  It looped or filled the memory."""
    memory = editor_size.device_memory(torch.device("cpu"))
    if memory is None:
        pytest.skip("this platform does not tell its memory (no os.sysconf)")
    layers = (_randint(memory // 4096 + 1, 2**63 - 1, gen), _randint(2**63, 10**30, gen))
    for n_layers in layers:
        for device in ("cpu", "meta"):  # on "meta" too, where the tensors take nothing
            with torch.device(device), pytest.raises(
                    ValueError, match=rf"n_layers={n_layers}(, |:).*layers would need at least .* of Python objects, "
                                      r"more than the CPU's .* \(" + CPU_WHAT + r"\); lower n_layers$"):
                GroupedEditor(4, 3, n_layers=n_layers, routing="single")
    # (G, d, r) float32 factors past the memory: G d r 4 bytes > memory
    n_editors = _randint(memory // (4 * 2112 * 32) + 1, 2**40, gen)
    for kwargs in (dict(in_features=1536, out_features=576, rank=32, n_editors=n_editors, routing="random"),
                   dict(in_features=4, out_features=3, n_editors=2, feat_dim=_randint(memory // 8 + 1, 10**29, gen)),
                   dict(in_features=4, out_features=3, routing="single", generator="token",
                        generator_hidden=_randint(memory // 8 + 1, 10**29, gen))):
        named = ", ".join(f"{k}={v}" for k, v in kwargs.items() if k not in ("routing", "generator"))
        with pytest.raises(ValueError, match=r"^in_features=.*" + named.split(", ")[-1] + r".*: the editor would "
                                             r"hold .* parameters and buffers, .* in torch.float32 on cpu, more than "
                                             r"the CPU's .* \(" + CPU_WHAT + r"\); lower these sizes$"):
            GroupedEditor(**kwargs)


def test_the_sum_of_tensors_that_each_fit_is_weighed(gen, monkeypatch):
    """The memory is weighed against all the editor holds, in the default dtype's bytes, not tensor
    by tensor (torch refuses a single CPU tensor past RAM + swap, never a sum): with the CPU's memory
    set just below an editor's bytes it is refused, at its bytes it builds.  The layer count's
    Python objects are weighed alone, at 4 KiB a layer."""
    kw = _random_settings(gen)
    numel = _numel(kw)
    monkeypatch.setattr(editor_size, "LAYER_HOST_BYTES", 0)  # the tensors alone first
    for dtype in (torch.float32, torch.float64):
        nbytes = numel * dtype.itemsize
        previous = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            monkeypatch.setattr(editor_size, "device_memory", lambda device: nbytes - 1)
            with pytest.raises(ValueError, match=rf"parameters and buffers, .* in {dtype} on cpu, more than"):
                GroupedEditor(**kw)
            monkeypatch.setattr(editor_size, "device_memory", lambda device: nbytes)
            assert _held(GroupedEditor(**kw)) == numel
        finally:
            torch.set_default_dtype(previous)
    monkeypatch.setattr(editor_size, "LAYER_HOST_BYTES", 4096)
    monkeypatch.setattr(editor_size, "device_memory", lambda device: 4096 * kw["n_layers"] - 1)
    with pytest.raises(ValueError, match=r"layers? would need at least .* of Python objects"):
        GroupedEditor(**kw)


def test_a_meta_editor_is_not_bounded_by_memory_it_does_not_take(gen):
    """On "meta" (a skeleton, filled later on a device that may be larger than this machine) the
    tensors take no memory, and sizes past this machine's build (only the layers' Python objects
    are weighed there, in the test above)."""
    memory = editor_size.device_memory(torch.device("cpu"))
    n_editors = (memory or 2**40) // (4 * 2112 * 32) + int(torch.randint(1, 1000, (), generator=gen))
    with torch.device("meta"):
        editor = GroupedEditor(1536, 576, n_editors=n_editors, rank=32, routing="random")
        assert all(p.is_meta for p in editor.parameters())
        assert _held(editor) * 4 > (memory or 0)


@pytest.mark.skipif(NO_CUDA, reason="needs CUDA")
def test_an_editor_built_on_a_gpu_is_weighed_against_the_gpus_memory(gen, no_layer_built):
    """Built on a GPU (its default device), the tensors are weighed against that GPU's memory."""
    total = torch.cuda.get_device_properties(0).total_memory
    n_editors = total // (4 * 2112 * 32) + int(torch.randint(1, 1000, (), generator=gen))
    torch.set_default_device("cuda")
    try:
        with pytest.raises(ValueError, match=r"torch.float32 on cuda:0, more than cuda:0's .*; lower these sizes$"):
            GroupedEditor(1536, 576, n_editors=n_editors, rank=32, routing="random")
    finally:
        reset_default_device()


def _cgroup_files(tmp_path, monkeypatch, v2=None, v1=None):
    """CGROUP_LIMIT_FILES made two files under tmp_path holding `v2` and `v1` (None: no such file)."""
    paths = (tmp_path / "memory.max", tmp_path / "memory.limit_in_bytes")
    for path, text in zip(paths, (v2, v1)):
        if text is None:
            path.unlink(missing_ok=True)
        else:
            path.write_text(text + "\n")
    monkeypatch.setattr(editor_size, "CGROUP_LIMIT_FILES", tuple(str(p) for p in paths))


def test_a_cgroup_memory_limit_below_the_ram_bounds_the_cpu(gen, tmp_path, monkeypatch, no_layer_built):
    """In a container whose cgroup (v2's memory.max, else v1's memory.limit_in_bytes) limits the
    memory below the RAM, the CPU's memory is that limit plus swap, and an editor between it and
    RAM + swap is refused naming the limit: past it the OOM killer ends the process, where before
    the check let it be built.  "max", v1's unlimited (2**63 − 1 rounded to a page), unreadable text
    and limits above the RAM leave RAM + swap."""
    ram = editor_size.cpu_memory()[0]
    if ram is None:
        pytest.skip("this platform does not tell its memory (no os.sysconf)")
    swap = editor_size._swap_bytes()
    ram -= swap
    limit = _randint(2**20, ram - 2**20, gen)
    for v2, v1 in ((str(limit), None), (None, str(limit)), ("max\n", str(limit)), ("junk", str(limit))):
        _cgroup_files(tmp_path, monkeypatch, v2, v1)
        assert editor_size.cpu_memory() == ((limit + swap, "its cgroup's memory limit + swap") if v2 != "max\n"
                                            else (ram + swap, "RAM + swap")), (v2, v1)
    for v2, v1 in (("max", None), (None, "9223372036854771712"), (str(ram + _randint(0, 2**40, gen)), None),
                   (None, None), ("0", None)):
        _cgroup_files(tmp_path, monkeypatch, v2, v1)
        assert editor_size.cpu_memory() == (ram + swap, "RAM + swap"), (v2, v1)
    _cgroup_files(tmp_path, monkeypatch, str(limit))
    # float32 editors between limit + swap and RAM + swap: 4 (a n + b) bytes for n editors
    numel = [editor_size.editor_numel(1536, 576, n, 32, 1, 1, False, None, True, None) for n in (1, 2)]
    a, b = numel[1] - numel[0], 2 * numel[0] - numel[1]
    n_editors = _randint((limit + swap) // (4 * a) + 1, (ram + swap - 4 * b) // (4 * a), gen)
    with pytest.raises(ValueError, match=rf"^in_features=1536, out_features=576, n_editors={n_editors}, .*: the editor "
                                         r"would hold .* more than the CPU's .* \(its cgroup's memory limit \+ "
                                         r"swap\); lower these sizes$"):
        GroupedEditor(1536, 576, rank=32, n_editors=n_editors, n_layers=1, routing="random")
