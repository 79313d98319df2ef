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
def sdist(tmp_path_factory):
    """An sdist built from a copy of the tracked files (the checkout's own egg-info stays)."""
    src, dist = tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("dist")
    for name in _tracked():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, src / name)
    subprocess.run([sys.executable, "setup.py", "-q", "sdist", "-d", str(dist)], cwd=src, check=True,
                   capture_output=True)
    (archive,) = dist.glob("*.tar.gz")
    return archive


def test_sdist_carries_every_build_input(sdist):
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    # csrc/: the headers and CUDA sources too (setuptools adds only the listed .cpp files).
    missing = [n for n in _tracked("csrc", "dcedit_kernels", "setup.py", "pyproject.toml", "README.md")
               if n not in names]
    assert not missing


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
