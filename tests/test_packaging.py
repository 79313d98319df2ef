"""The source distribution: it carries every build input, builds, and the installed package works
away from the checkout (the C++ kernels registered, the subpackages importable)."""

import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _env():
    """This process's environment without PYTHONPATH (pytest's `pythonpath` puts the checkout on
    sys.path, not in the environment; a caller's PYTHONPATH would shadow the copy under test)."""
    return {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


# A probe's last lines: a C++-served op gives the plain formula.
OP_RUNS = (
    "eta, mu = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64)\n"
    "assert torch.allclose(ops.grouped_outer(eta, mu, torch.tensor([0, 2, 2, 5]), 'add'), eta.T @ mu)\n"
)


def _probe(code: str, cwd, pythonpath) -> None:
    """Run `code` in a fresh interpreter with only `pythonpath` added to its path."""
    run = subprocess.run([sys.executable, "-c", code], cwd=cwd, env={**_env(), "PYTHONPATH": str(pythonpath)},
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]


def _tracked(*prefixes):
    try:
        out = subprocess.run(["git", "ls-files", *prefixes], cwd=ROOT, capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("needs a git checkout")
    return out.stdout.split()


@pytest.fixture(scope="module")
def sdist_build(tmp_path_factory):
    """(an sdist built from a copy of the tracked files (the checkout's own egg-info stays), what
    the build wrote to stderr)."""
    src, dist = tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("dist")
    for name in _tracked():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, src / name)
    run = subprocess.run([sys.executable, "setup.py", "-q", "sdist", "-d", str(dist)], cwd=src, check=True,
                         capture_output=True, text=True)
    (archive,) = dist.glob("*.tar.gz")
    return archive, run.stderr


@pytest.fixture(scope="module")
def sdist(sdist_build):
    return sdist_build[0]


def test_the_build_metadata_uses_nothing_setuptools_deprecates(sdist_build):
    """A deprecation with a due date becomes an error in a later setuptools (the license as a TOML
    table: due 2027-02-18), and `make install` takes the newest one."""
    assert "SetuptoolsDeprecationWarning" not in sdist_build[1], sdist_build[1][-2000:]


def test_sdist_carries_every_build_input(sdist):
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    # csrc/: the headers and CUDA sources too (setuptools adds only the listed .cpp files).
    missing = [n for n in _tracked("csrc", "dcedit_kernels", "setup.py", "pyproject.toml", "README.md", "LICENSE")
               if n not in names]
    assert "LICENSE" in names  # the Apache-2.0 the metadata declares, with its text
    assert not missing


def test_sdist_carries_no_partial_test_suite(sdist):
    """setuptools adds tests/test*.py to an sdist by default, without the conftest.py and helpers.py
    they import (nor python/ and benchmarks/): pytest in the unpacked sdist failed to collect."""
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    assert not [n for n in names if n.startswith("tests/")], sorted(names)


def test_sdist_builds_and_the_installed_package_runs(sdist, tmp_path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-build-isolation", "--no-deps",
                    "--disable-pip-version-check", "--target", str(target), str(sdist)],
                   check=True, capture_output=True, env={"DCEDIT_BUILD_CUDA": "0", **_env()})
    probe = (
        "import torch, dcedit_kernels as d, dcedit_kernels.triton_kernels, dcedit_kernels.data\n"
        "from dcedit_kernels import ops\n"
        f"assert d.__file__.startswith({str(target)!r}), d.__file__\n"
        "assert all(b['CPU'] == 'cpp' for op, b in d.op_backends().items() if op in "
        "('grouped_outer', 'segmented_fisher', 'fisher_mask', 'apply_shift_', 'grouped_lowrank')), d.op_backends()\n"
    )
    _probe(probe + OP_RUNS, cwd=tmp_path, pythonpath=target)  # from an empty folder: not the checkout's copy
    assert [p.name for p in target.glob("dcedit_kernels-*.dist-info/**/LICENSE")] == ["LICENSE"]
    assert (target / "dcedit_kernels" / "py.typed").is_file()  # PEP 561 (test_the_package_ships_its_py_typed_marker)


def test_the_package_ships_its_py_typed_marker(sdist, tmp_path):
    """PEP 561's `py.typed`: the package is annotated (and names its lazy imports for type checkers,
    `test_type_checkers_see_every_lazy_name`), but without the marker mypy skipped the installed
    package, "module is installed, but missing library stubs or py.typed marker", and typed every
    name imported from it as Any.  The sdist carries it and its build puts it beside the modules (the
    files a wheel or an install gets; `build_py` copies them without compiling the extension)."""
    with tarfile.open(sdist) as tar:
        assert any(n.endswith("/dcedit_kernels/py.typed") for n in tar.getnames())
        # filter: Python 3.12 and 3.13 warn without one; older 3.10 and 3.11 releases take none.
        tar.extractall(tmp_path, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    (src,) = tmp_path.glob("dcedit_kernels-*")
    subprocess.run([sys.executable, "setup.py", "-q", "build_py", "--build-lib", str(tmp_path / "lib")], cwd=src,
                   check=True, capture_output=True, env={"DCEDIT_BUILD_CUDA": "0", **_env()})
    assert (tmp_path / "lib" / "dcedit_kernels" / "py.typed").is_file()


def test_the_package_works_without_its_optional_dependencies():
    """triton (extra "triton"), gguf and accelerate ("models") and matplotlib ("plot") are
    optional: without them the package imports, the CUDA ops fall back to the references and
    the CPU ops still run their C++ kernels."""
    probe = (
        "import sys\n"
        "for name in ('triton', 'gguf', 'accelerate', 'matplotlib'):\n"
        "    sys.modules[name] = None  # import raises ImportError\n"
        "import torch, dcedit_kernels as d\n"
        "import dcedit_kernels.cli, dcedit_kernels.evaluate, dcedit_kernels.train, dcedit_kernels.model_editor\n"
        "from dcedit_kernels import ops\n"
        "assert not d.backends()['triton']\n"
        "assert d.op_backends()['grouped_outer'] == {'CPU': 'cpp', 'CUDA': 'reference'}, d.op_backends()\n"
    )
    _probe(probe + OP_RUNS, cwd=ROOT, pythonpath=ROOT)


def test_a_compiled_extension_that_fails_to_load_is_reported(tmp_path):
    """A `_C` built against another torch fails to import (an undefined symbol): the ops fell
    back to the references without a word.  Now a RuntimeWarning names the loader's error; a
    package with no `_C` at all (the reference path, as designed) still imports silently."""
    package = tmp_path / "site" / "dcedit_kernels"
    shutil.copytree(ROOT / "dcedit_kernels", package, ignore=shutil.ignore_patterns("*.so", "__pycache__"))

    # An editable install's finder (setuptools >= 64) serves dcedit_kernels' submodules from the
    # checkout whatever folder the package came from: _C would load from there (CI's fresh clone).
    only_the_copy = ("import sys\nsys.meta_path[:] = [f for f in sys.meta_path "
                     "if not getattr(f, '__module__', '').startswith('__editable__')]\n")

    def run():  # warnings as errors: a silent import passes, a warning fails it
        return subprocess.run(
            [sys.executable, "-W", "error", "-c", only_the_copy +
             "import dcedit_kernels as d\nassert d.__file__.startswith(sys.argv[1]), d.__file__\n"
             "assert not d.backends()['cpu_cpp'], d.backends()\n", str(package)],
            cwd=tmp_path, env={**_env(), "PYTHONPATH": str(package.parent)}, capture_output=True, text=True)

    assert run().returncode == 0, run().stderr[-2000:]  # no _C: no warning
    (package / "_C.abi3.so").write_bytes(b"not a shared object")  # stands for one of another torch
    failed = run()
    assert failed.returncode != 0, "a _C that fails to load went unreported"
    assert "RuntimeWarning: dcedit_kernels: the compiled kernels" in failed.stderr, failed.stderr[-2000:]
    assert "_C.abi3.so" in failed.stderr  # the loader's own error, naming the file


def test_dcedit_disable_c_leaves_the_compiled_kernels_unloaded():
    """DCEDIT_DISABLE_C=1 set before the import (README) leaves `_C` unloaded: backends() has no
    cpu_cpp and the CPU ops run their references, which still compute the formula."""
    probe = ("import torch, dcedit_kernels as d\nfrom dcedit_kernels import ops\n"
             "assert d._library._C is None and not d.backends()['cpu_cpp'], d.backends()\n"
             "assert d.op_backends()['grouped_outer']['CPU'] == 'reference', d.op_backends()\n")
    run = subprocess.run([sys.executable, "-c", probe + OP_RUNS], cwd=ROOT,
                         env={**_env(), "PYTHONPATH": str(ROOT), "DCEDIT_DISABLE_C": "1"}, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]


def test_import_is_light_and_lists_the_lazy_names():
    """`import dcedit_kernels` loads the ops, not transformers; the pipeline's names load on first
    use and are listed by dir() all the same."""
    probe = (
        "import sys, dcedit_kernels as d\n"
        "assert 'transformers' not in sys.modules\n"
        "assert set(d.__all__) <= set(dir(d)), set(d.__all__) - set(dir(d))\n"
        "assert d.ModelEditor.__name__ == 'ModelEditor'\n"
        "assert all(getattr(d, name) is not None for name in d.__all__)\n"
    )
    _probe(probe, cwd=ROOT, pythonpath=ROOT)


def test_type_checkers_see_every_lazy_name():
    """The `if TYPE_CHECKING:` imports name each lazy name from its module: without them pyright
    typed `from dcedit_kernels import ModelEditor` (and the other six) as Any."""
    import ast

    import dcedit_kernels as d

    tree = ast.parse((ROOT / "dcedit_kernels" / "__init__.py").read_text())
    block = next(n for n in tree.body if isinstance(n, ast.If) and getattr(n.test, "id", None) == "TYPE_CHECKING")
    seen = {a.name: node.module for node in block.body for a in node.names}
    assert seen == d._LAZY


def test_import_and_cpu_calls_leave_triton_unimported():
    """triton serves only CUDA tensors: importing the package, its CLI and the editing pipeline and
    running ops on CPU tensors (forward and backward) must not import it (see ops._dispatch)."""
    probe = (
        "import sys, torch, dcedit_kernels as d, dcedit_kernels.cli, dcedit_kernels.model_editor\n"
        "from dcedit_kernels import ops\n"
        "assert d.op_backends()['grouped_outer']['CUDA'] == 'triton', d.op_backends()  # registered all the same\n"
        "f64 = dict(dtype=torch.float64)\n"
        "x = torch.randn(4, 3, requires_grad=True, **f64)\n"
        "out = ops.lowrank_delta_linear(x, torch.randn(2, 3, **f64), None, torch.tensor([0, 0, 1, 1]),\n"
        "                               torch.randn(2, 3, **f64), torch.randn(2, 2, **f64),\n"
        "                               torch.tensor([0, 1, 2]), 0.5)\n"
        "out.sum().backward()\n"
    )
    check = "assert 'triton' not in sys.modules and 'dcedit_kernels.triton_kernels' not in sys.modules\n"
    _probe(probe + OP_RUNS + check, cwd=ROOT, pythonpath=ROOT)


@pytest.fixture
def setup_py(monkeypatch):
    """setup.py's functions, from a run of it with `setuptools.setup` replaced by a no-op."""
    import runpy

    import setuptools

    monkeypatch.setattr(setuptools, "setup", lambda **kwargs: None)
    monkeypatch.setenv("DCEDIT_BUILD_CUDA", "0")  # its own call of _extension(): the CPU one
    # run_path returns a copy of the module's globals: the functions' own dict, so that a test can
    # replace what they call.
    return runpy.run_path(str(ROOT / "setup.py"), run_name="setup_under_test")["_want_cuda"].__globals__


@pytest.fixture
def cuda_toolchain(monkeypatch, setup_py):
    """A torch built with CUDA 13.0, an nvcc on PATH and the CUDA runtime library, as setup.py sees them."""
    import torch
    from torch.utils import cpp_extension

    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", "/opt/cuda")
    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: "/opt/cuda/bin/nvcc" if name == "nvcc" else None)
    monkeypatch.setitem(setup_py, "_cudart_linkable", lambda: True)
    return setup_py


def _switch(monkeypatch, want_cuda, choice):
    """_want_cuda() under DCEDIT_BUILD_CUDA=choice (None: unset), or its exception's name."""
    if choice is None:
        monkeypatch.delenv("DCEDIT_BUILD_CUDA", raising=False)
    else:
        monkeypatch.setenv("DCEDIT_BUILD_CUDA", choice)
    try:
        return want_cuda()
    except Exception as exc:  # noqa: BLE001 - the name is the result
        return type(exc).__name__


@pytest.mark.parametrize("choice, nvcc_major, want", [
    (None, 13, True), ("auto", 13, True), ("AUTO", 13, True),
    ("auto", None, True),  # unknown version: torch's own check decides
    ("auto", 12, False),   # another major version: CPU kernels only, with a warning
    ("1", 12, True),       # forced: torch's error, loudly
    ("0", 13, False), ("2", 13, "ValueError")])
def test_setup_cuda_switch_with_a_cuda_torch(cuda_toolchain, monkeypatch, choice, nvcc_major, want):
    monkeypatch.setitem(cuda_toolchain, "_nvcc_major", lambda: nvcc_major)
    if want is not False or choice != "auto":
        assert _switch(monkeypatch, cuda_toolchain["_want_cuda"], choice) == want
    else:
        with pytest.warns(UserWarning, match="nvcc is CUDA 12, torch was built with CUDA 13.0"):
            assert _switch(monkeypatch, cuda_toolchain["_want_cuda"], choice) is False


def test_setup_cuda_switch_with_this_torch(setup_py, monkeypatch):
    import torch
    from torch.utils import cpp_extension

    nvcc_major = setup_py["_nvcc_major"]()
    cuda_possible = (torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
                     and shutil.which("nvcc") is not None
                     and nvcc_major in (None, int(torch.version.cuda.split(".")[0]))
                     and setup_py["_cudart_linkable"]())
    got = {choice: _switch(monkeypatch, setup_py["_want_cuda"], choice) for choice in (None, "auto", "0", "1", "yes")}
    assert got[None] is cuda_possible and got["auto"] is cuda_possible and got["0"] is False, got
    assert got["yes"] == "ValueError", got
    if torch.version.cuda is None:  # the CPU wheel here: auto builds without CUDA, 1 refuses
        assert got["auto"] is False and got["1"] == "RuntimeError", got


def test_setup_builds_cuda_with_the_toolkits_nvcc_off_path(cuda_toolchain, monkeypatch, tmp_path):
    """CUDA_HOME's bin/nvcc is what torch's build runs: an nvcc missing from PATH (a machine whose
    PATH has none; run_gpu.sh exports CUDA_HOME for it) neither refuses DCEDIT_BUILD_CUDA=1 nor
    silently leaves the CUDA sources out under auto."""
    from torch.utils import cpp_extension

    nvcc = tmp_path / "bin" / "nvcc"
    nvcc.parent.mkdir()
    nvcc.write_text("#!/bin/sh\necho 'Cuda compilation tools, release 13.0, V13.0.88'\n")
    nvcc.chmod(0o755)
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", str(tmp_path))
    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: None)
    for choice in (None, "auto", "1"):
        assert _switch(monkeypatch, cuda_toolchain["_want_cuda"], choice) is True, choice
    nvcc.unlink()  # neither on PATH nor in the toolkit: nothing to build with
    assert _switch(monkeypatch, cuda_toolchain["_want_cuda"], "auto") is False
    assert _switch(monkeypatch, cuda_toolchain["_want_cuda"], "1") == "RuntimeError"


def test_setup_leaves_cuda_out_when_the_link_would_not_find_the_cuda_runtime(cuda_toolchain, monkeypatch):
    """Seen on a machine whose `nvcc` on PATH is a wrapper script in /usr/local/bin: torch took
    CUDA_HOME=/usr/local, compiled every CUDA source and failed the link ("cannot find -lcudart"),
    stopping the install.  auto now warns and builds the CPU kernels; 1 still tries."""
    monkeypatch.setitem(cuda_toolchain, "_nvcc_major", lambda: 13)
    monkeypatch.setitem(cuda_toolchain, "_cudart_linkable", lambda: False)
    with pytest.warns(UserWarning, match=r"no CUDA runtime library \(libcudart\) under CUDA_HOME=/opt/cuda"):
        assert _switch(monkeypatch, cuda_toolchain["_want_cuda"], "auto") is False
    assert _switch(monkeypatch, cuda_toolchain["_want_cuda"], "1") is True


@pytest.mark.skipif(os.name == "nt", reason="the check is for the Unix linker's -lcudart")
def test_setup_finds_the_cuda_runtime_where_the_link_looks(setup_py, monkeypatch, tmp_path):
    from torch.utils import cpp_extension

    home = tmp_path / "cuda"
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", str(home))
    # A compiler that finds nothing by itself, as `c++ -print-file-name=libcudart.so` answers then.
    compiler = tmp_path / "cxx"
    compiler.write_text('#!/bin/sh\necho "${1#-print-file-name=}"\n')
    compiler.chmod(0o755)
    monkeypatch.setenv("CXX", str(compiler))
    linkable = setup_py["_cudart_linkable"]
    assert linkable() is False
    (home / "lib").mkdir(parents=True)
    (home / "lib" / "libcudart.so.13").touch()  # the runtime's soname alone: `-lcudart` misses it
    assert linkable() is False
    for folder, name in (("lib", "libcudart.so"), ("lib64", "libcudart.so"), ("lib64", "libcudart.a")):
        (home / folder).mkdir(exist_ok=True)
        (home / folder / name).touch()
        assert linkable() is True, (folder, name)
        (home / folder / name).unlink()
    # In the compiler's own search path (a distribution's toolkit in /usr/lib/<triplet>).
    found = tmp_path / "usr-lib" / "libcudart.so"
    found.parent.mkdir()
    found.touch()
    compiler.write_text(f'#!/bin/sh\necho "{found}"\n')
    assert linkable() is True
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    assert linkable() is True  # nothing to ask: left to torch's build


def test_setup_reads_nvccs_major_version(setup_py, monkeypatch, tmp_path):
    from torch.utils import cpp_extension

    nvcc = tmp_path / "bin" / "nvcc"
    nvcc.parent.mkdir()
    nvcc.write_text("#!/bin/sh\necho 'Cuda compilation tools, release 12.4, V12.4.131'\n")
    nvcc.chmod(0o755)
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", str(tmp_path))
    assert setup_py["_nvcc_major"]() == 12
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", str(tmp_path / "missing"))
    assert setup_py["_nvcc_major"]() is None


def test_setup_builds_cuda_for_every_common_gpu_when_none_is_visible(cuda_toolchain, monkeypatch):
    """Was sm_90 only: on an A100, L4 or T4 the CUDA kernels had no image.  Now torch's rule
    (TORCH_CUDA_ARCH_LIST, else the visible GPUs), else Turing to Hopper plus Hopper's PTX."""
    import torch
    from torch.utils import cpp_extension

    arch_list = cuda_toolchain["_cuda_arch_list"]
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert arch_list() == cuda_toolchain["DEFAULT_CUDA_ARCHS"]
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", cuda_toolchain["DEFAULT_CUDA_ARCHS"])
    flags = cpp_extension._get_cuda_arch_flags()  # torch accepts every entry
    for sm in ("75", "80", "86", "89", "90"):
        assert f"-gencode=arch=compute_{sm},code=sm_{sm}" in flags
    assert "-gencode=arch=compute_90,code=compute_90" in flags
    assert arch_list() is None  # the user's list
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert arch_list() is None  # the visible GPUs'

    # The extension passes no -gencode of its own (which would make torch add none) and sets the list.
    made = {}
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    monkeypatch.setitem(cuda_toolchain, "_nvcc_major", lambda: 13)
    monkeypatch.setenv("DCEDIT_BUILD_CUDA", "auto")
    monkeypatch.setattr(cpp_extension, "CUDAExtension", lambda *args, **kwargs: made.update(kwargs))
    cuda_toolchain["_extension"]()
    assert not any("arch" in flag for flag in made["extra_compile_args"]["nvcc"])
    assert os.environ["TORCH_CUDA_ARCH_LIST"] == cuda_toolchain["DEFAULT_CUDA_ARCHS"]


@pytest.mark.parametrize("editable", [True, False])
def test_an_editable_build_keeps_its_objects_for_the_next_install(setup_py, tmp_path, editable):
    """pip's editable install builds in a new temporary folder each time (setuptools' editable_wheel
    sets it as build_temp): the build's objects go to build/editable instead, so that torch's ninja
    build recompiles only what changed.  A wheel or sdist build keeps setuptools' own folder."""
    from setuptools import Distribution

    build_ext = setup_py["BuildExtension"](Distribution({"name": "dcedit_kernels"}))
    build_ext.editable_mode = editable
    build_ext.build_temp = str(tmp_path / "pip-temporary")
    build_ext.finalize_options()
    want = ROOT / "build" / "editable" if editable else tmp_path / "pip-temporary"
    assert Path(build_ext.build_temp) == want
    assert build_ext.use_ninja == setup_py["cpp_extension"].is_ninja_available()


def test_the_version_is_the_same_in_pyproject_and_the_package():
    """The version is written twice, in pyproject.toml (the distribution's) and `__version__` (what
    `dcedit --version` prints and the editor cache keys on): a release that bumped one only would
    ship metadata saying one version and a package saying another."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11 on

    import dcedit_kernels

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["version"] == dcedit_kernels.__version__


def test_the_torch_minimum_is_the_same_in_the_build_the_dependencies_and_the_readme():
    """torch>=2.4 was declared while 2.4.1 ran a compiled, edited model with stale edits and had no
    torch.library.register_vmap (grouped_lowrank calls it unguarded): the minimum went to 2.5, in
    the build's requirements and the install's alike (a build against one torch and an install
    beside another would both resolve), and the README's versions paragraph names it."""
    import re

    tomllib = pytest.importorskip("tomllib")
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    pins = [r for r in (*data["build-system"]["requires"], *data["project"]["dependencies"])
            if re.match(r"torch\b", r)]
    assert pins == ["torch>=2.5", "torch>=2.5"]
    assert "the declared minimum (torch>=2.5;" in " ".join((ROOT / "README.md").read_text().split())


def test_the_wheels_abi3_tag_is_the_python_the_extension_is_built_for():
    """bdist_wheel tagged the wheel cp39-abi3 while torch's build defines Py_LIMITED_API for 3.10
    and pyproject requires Python 3.10: a wheel index offered it to Python 3.9, where pip then
    refused it for requires-python.  The tag, the limited API and requires-python now agree."""
    import re

    tomllib = pytest.importorskip("tomllib")
    from torch.utils import cpp_extension

    tag = re.search(r'"py_limited_api":\s*"cp3(\d+)"', (ROOT / "setup.py").read_text())
    assert tag is not None
    minor = int(tag.group(1))
    # The limited API torch's build defines must not be newer than the tag (a wheel tagged for a Python
    # older than its API would be offered to a Python that cannot load it).  It is 3.10 from torch
    # 2.10 on (the tag's), 3.9 on 2.7.1, 2.8.0 and 2.9.1 (an older API, which 3.10 loads; equality
    # failed there); torch 2.5.1 and 2.6.0 have no min_supported_cpython (nor define Py_LIMITED_API):
    # only the tag and requires-python to compare there.
    if hasattr(cpp_extension, "min_supported_cpython"):
        assert int(cpp_extension.min_supported_cpython, 16) <= 0x03000000 | minor << 16
    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    assert requires == f">=3.{minor}"


def test_the_tests_load_with_warnings_as_errors():
    """`pytest -W error::FutureWarning` (the warnings-hygiene check: which warnings do the tests
    meet?) stopped before the first test: conftest's probe of transformers'
    `AttentionMaskConverter._make_causal_mask`, which transformers 5 deprecates with a FutureWarning
    on each call, raised it while pytest loaded conftest.py.  The probe is the harness's own, not a
    test's: it keeps the warning to itself."""
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-W", "error::DeprecationWarning",
         "-W", "error::FutureWarning", "-W", "error::UserWarning",
         "tests/test_packaging.py::test_the_version_is_the_same_in_pyproject_and_the_package"],
        cwd=ROOT, env=_env(), capture_output=True, text=True)
    assert run.returncode == 0, (run.stdout + run.stderr)[-2000:]
