"""Build `dcedit_kernels._C`: the C++ CPU kernels always, the CUDA sources when possible.

DCEDIT_BUILD_CUDA=auto (default) builds csrc/cuda/*.cu when torch was built with CUDA and nvcc
is found; 1 forces it (and fails loudly if impossible); 0 skips it.
"""

import glob
import os
import shutil

from setuptools import find_packages, setup
from torch.utils import cpp_extension

HERE = os.path.dirname(os.path.abspath(__file__))


def _want_cuda() -> bool:
    choice = os.environ.get("DCEDIT_BUILD_CUDA", "auto").lower()
    if choice not in ("auto", "0", "1"):
        raise ValueError(f"DCEDIT_BUILD_CUDA must be auto, 0 or 1, got {choice!r}")
    possible = cpp_extension.CUDA_HOME is not None and shutil.which("nvcc") is not None
    torch_has_cuda = __import__("torch").version.cuda is not None
    if choice == "1":
        if not (possible and torch_has_cuda):
            raise RuntimeError("DCEDIT_BUILD_CUDA=1 but torch has no CUDA or nvcc is missing")
        return True
    return choice == "auto" and possible and torch_has_cuda


def _extension():
    rel = lambda pattern: sorted(  # noqa: E731
        os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, pattern))
    )
    sources = rel("csrc/*.cpp") + rel("csrc/cpu/*.cpp")
    cxx = ["-O3", "-std=c++17", "-fopenmp"]
    # py_limited_api=True makes torch's build define Py_LIMITED_API itself: no define here.
    define_macros = []
    if _want_cuda():
        sources += rel("csrc/cuda/*.cu")
        define_macros.append(("WITH_CUDA", None))
        nvcc = ["-O3", "-std=c++17", "-gencode=arch=compute_90,code=sm_90"]
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


setup(
    packages=find_packages(include=["dcedit_kernels", "dcedit_kernels.*"]),
    ext_modules=[_extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension},
    options={"bdist_wheel": {"py_limited_api": "cp39"}},
)
