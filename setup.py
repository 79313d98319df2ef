"""Build `dcedit_kernels._C`: the C++ CPU kernels always, the CUDA sources when possible.

DCEDIT_BUILD_CUDA=auto (default) builds csrc/cuda/*.cu when torch was built with CUDA and an nvcc
of the same major version and the CUDA runtime library are found (else it warns and builds the CPU
kernels only: the CUDA ops then run on Triton and the references); 1 forces it (and fails loudly if
impossible); 0 skips it.

CUDA architectures: TORCH_CUDA_ARCH_LIST when set, else the visible GPUs' (torch's own rule),
else DEFAULT_CUDA_ARCHS.
"""

import glob
import os
import re
import shutil
import subprocess
import warnings

import torch
from setuptools import find_packages, setup
from torch.utils import cpp_extension

HERE = os.path.dirname(os.path.abspath(__file__))

# For a build with no GPU visible and no TORCH_CUDA_ARCH_LIST: Turing to Hopper (what nvcc 12 and
# 13 both compile; A100, A10, L4, T4, H100 ...) plus Hopper's PTX, which newer GPUs compile at load
# time.  Built for sm_90 only, the CUDA kernels had no image for any other GPU.
DEFAULT_CUDA_ARCHS = "7.5;8.0;8.6;8.9;9.0+PTX"


def _nvcc_major() -> int | None:
    """The major version of the nvcc torch would use (CUDA_HOME's), None when unknown."""
    nvcc = os.path.join(cpp_extension.CUDA_HOME or "", "bin", "nvcc")
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    found = re.search(r"release (\d+)\.", out)
    return int(found.group(1)) if found else None


def _cudart_linkable() -> bool:
    """Whether the link's `-lcudart` finds a library: in CUDA_HOME's lib64 or lib (torch links from
    one of them) or in the compiler's own search path (a distribution's toolkit in /usr/lib/<triplet>).

    torch takes CUDA_HOME from nvcc's folder: with `nvcc` on PATH a wrapper script in /usr/local/bin
    (a machine here; the toolkit in /usr/local/cuda-13.0), CUDA_HOME was /usr/local, every CUDA
    source compiled, and the link failed with "cannot find -lcudart", stopping the whole install.
    ldconfig's cache is no test: it listed that toolkit's libcudart.so.13, which `-l` does not read.
    """
    if os.name == "nt":  # lib/x64/cudart.lib: left to torch's build
        return True
    home = cpp_extension.CUDA_HOME or ""
    names = ("libcudart.so", "libcudart.a")
    if any(os.path.exists(os.path.join(home, folder, name)) for folder in ("lib64", "lib") for name in names):
        return True
    for name in names:
        try:
            found = subprocess.run([os.environ.get("CXX", "c++"), f"-print-file-name={name}"],
                                   capture_output=True, text=True, timeout=60).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return True  # no compiler to ask: left to torch's build, as before
        if os.path.isabs(found) and os.path.exists(found):
            return True
    return False


def _want_cuda() -> bool:
    choice = os.environ.get("DCEDIT_BUILD_CUDA", "auto").lower()
    if choice not in ("auto", "0", "1"):
        raise ValueError(f"DCEDIT_BUILD_CUDA must be auto, 0 or 1, got {choice!r}")
    # torch's build runs $CUDA_HOME/bin/nvcc, whether or not an nvcc is on PATH (run_gpu.sh sets
    # CUDA_HOME to the toolkit for a machine whose PATH has none, or only a wrapper script).
    home = cpp_extension.CUDA_HOME
    toolkit_nvcc = home is not None and os.access(os.path.join(home, "bin", "nvcc"), os.X_OK)
    possible = home is not None and (toolkit_nvcc or shutil.which("nvcc") is not None)
    torch_has_cuda = torch.version.cuda is not None
    if choice == "1":
        if not (possible and torch_has_cuda):
            raise RuntimeError("DCEDIT_BUILD_CUDA=1 but torch has no CUDA or nvcc is missing")
        return True
    if not (choice == "auto" and possible and torch_has_cuda):
        return False
    # torch refuses an nvcc of another major version than its own CUDA's (an error that would stop
    # the whole install): leave the CUDA sources out instead, as when there is no nvcc.
    nvcc_major, torch_major = _nvcc_major(), int(torch.version.cuda.split(".")[0])
    if nvcc_major is not None and nvcc_major != torch_major:
        warnings.warn(f"dcedit_kernels: nvcc is CUDA {nvcc_major}, torch was built with CUDA {torch.version.cuda}: "
                      "building the CPU kernels only (set CUDA_HOME to a matching toolkit, or DCEDIT_BUILD_CUDA=1 "
                      "to see torch's error)")
        return False
    if not _cudart_linkable():
        warnings.warn(f"dcedit_kernels: no CUDA runtime library (libcudart) under CUDA_HOME={cpp_extension.CUDA_HOME}: "
                      "building the CPU kernels only (set CUDA_HOME to the CUDA toolkit's folder, or "
                      "DCEDIT_BUILD_CUDA=1 to see the linker's error)")
        return False
    return True


def _cuda_arch_list() -> str | None:
    """DEFAULT_CUDA_ARCHS where torch would find no architecture (nothing set, no GPU visible),
    else None: torch's choice."""
    if os.environ.get("TORCH_CUDA_ARCH_LIST") or torch.cuda.device_count() > 0:
        return None
    return DEFAULT_CUDA_ARCHS


def _extension():
    rel = lambda pattern: sorted(  # noqa: E731
        os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, pattern))
    )
    sources = rel("csrc/*.cpp") + rel("csrc/cpu/*.cpp")
    # No -std: torch's BuildExtension adds the standard of its own headers (C++17 on torch 2.11,
    # C++20 on 2.13 and 2.15; torch 2.15's headers do not build as C++17).
    cxx = ["-O3", "-fopenmp"]
    # py_limited_api=True makes torch's build define Py_LIMITED_API itself: no define here.
    define_macros = []
    if _want_cuda():
        sources += rel("csrc/cuda/*.cu")
        define_macros.append(("WITH_CUDA", None))
        arch_list = _cuda_arch_list()
        if arch_list is not None:
            os.environ["TORCH_CUDA_ARCH_LIST"] = arch_list  # read by torch's build_ext
        nvcc = ["-O3"]
        return cpp_extension.CUDAExtension(
            "dcedit_kernels._C",
            sources,
            include_dirs=[os.path.join(HERE, "csrc")],
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx, "nvcc": nvcc},
            extra_link_args=["-fopenmp"],
            py_limited_api=True,
        )
    return cpp_extension.CppExtension(
        "dcedit_kernels._C",
        sources,
        include_dirs=[os.path.join(HERE, "csrc")],
        define_macros=define_macros,
        extra_compile_args={"cxx": cxx},
        extra_link_args=["-fopenmp"],
        py_limited_api=True,
    )


class BuildExtension(cpp_extension.BuildExtension):
    """torch's build, with an editable install's objects kept in build/editable.

    pip's editable install (setuptools' editable_wheel) builds in a new temporary folder each time,
    so every `make install` (and so every `make demo` or `make test`) compiled all of csrc again:
    8.8 min on a loaded 2-core machine, 1.3 min of CPU time.  In a folder of its own, torch's ninja
    build recompiles only the sources (and headers, through its depfiles) that changed, or all of them
    when the flags did (another torch or Python: ninja compares the commands)."""

    def finalize_options(self) -> None:
        super().finalize_options()
        if getattr(self, "editable_mode", False):
            self.build_temp = os.path.join(HERE, "build", "editable")


setup(
    license="Apache-2.0",
    packages=find_packages(include=["dcedit_kernels", "dcedit_kernels.*"]),
    # PEP 561's marker: without it mypy skips the installed package ("module is installed, but
    # missing library stubs or py.typed marker") and types every name imported from it as Any.
    # setuptools adds a py.typed by itself from 69 on; the build requires setuptools>=64.
    package_data={"dcedit_kernels": ["py.typed"]},
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension},
    # The wheel's abi3 tag names the oldest Python it loads on: torch's build compiles _C with
    # Py_LIMITED_API=0x030A0000 (3.10, `cpp_extension.min_supported_cpython`; from torch 2.10 on,
    # 0x03090000 on 2.7.1 to 2.9.1, none on 2.5.1 and 2.6.0), which is also pyproject's
    # requires-python.  "cp39" tagged the wheel for a Python it was not built for.
    options={"bdist_wheel": {"py_limited_api": "cp310"}},
)
