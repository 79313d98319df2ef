"""The CUDA sources on a machine without a GPU: they must compile, and their selection logic must
agree with the reference.

- Every `csrc/cuda/*.cu` is compiled by nvcc for sm_90 (H100/H200, the GPU machines; a build
  covers more architectures, see setup.py) against the installed torch headers, with the flags
  setup.py and torch's BuildExtension would pass.  A CPU-only torch wheel
  lacks one generated CUDA header; `csrc/cuda/compile_shim` stands in for it here only.
- The radix select of `topk_select.cuh` is replayed on the host from the header's own
  __host__ __device__ pieces (order-preserving keys, prefix tests, the digit pick, the decode) and
  compared with `torch.kthvalue` / `fisher > threshold` on fresh random data with ties, zeros of
  both signs, infinities and NaN, in all four Fisher dtypes.
(setup.py's DCEDIT_BUILD_CUDA switch and architectures: tests/test_packaging.py.)

Only the nvcc checks skip, and only when nvcc is absent.  The compiles run two at a time (the
machine has 2 cores) inside one module fixture; each command and its wall time are printed
(`pytest -s` shows them).
"""

from __future__ import annotations

import concurrent.futures
import inspect
import math
import re
import shutil
import subprocess
import sysconfig
import time
from pathlib import Path

import pytest
import torch
from torch.utils import cpp_extension

ROOT = Path(__file__).resolve().parents[1]
CUDA_DIR = ROOT / "csrc" / "cuda"
SHIM_DIR = CUDA_DIR / "compile_shim"
CU_SOURCES = sorted(CUDA_DIR.glob("*.cu"))
NVCC = shutil.which("nvcc")
SM90 = "-gencode=arch=compute_90,code=sm_90"
COMPILE_TIMEOUT_S = 600

needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc is not installed")


def _torch_cxx_std() -> str:
    """The -std that torch's BuildExtension adds when setup.py passes none (c++17 on torch 2.11,
    c++20 on 2.13 and 2.15, whose headers refuse C++17), read from BuildExtension's source."""
    source = inspect.getsource(cpp_extension.BuildExtension.build_extensions)
    found = re.findall(r"""cpp_flag_prefix\s*\+\s*['"](c\+\+\d+)['"]""", source)
    assert len(set(found)) == 1, f"cannot tell BuildExtension's default C++ standard: {found}"
    return "-std=" + found[0]


CXX_STD = _torch_cxx_std()


def nvcc_base_flags() -> list[str]:
    """The flags of a CUDAExtension build of dcedit_kernels._C, for this torch and Python."""
    includes = [
        *cpp_extension.include_paths(),
        str(SHIM_DIR),
        str(ROOT / "csrc"),
        sysconfig.get_paths()["include"],
    ]
    return [
        CXX_STD,
        SM90,
        *cpp_extension.COMMON_NVCC_FLAGS,
        "--compiler-options",
        "-fPIC",
        "-DTORCH_EXTENSION_NAME=_C",
        "-DTORCH_API_INCLUDE_EXTENSION_H",
        f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
        # setup.py's define_macros
        "-DPy_LIMITED_API=0x03090000",
        "-DWITH_CUDA",
        *(f"-I{p}" for p in includes),
    ]


# The host replay of topk_select.cuh's radix select.  It calls the header's own key, prefix,
# digit and decode functions, so a wrong key order, digit pick or decode fails here even though
# no kernel can run on this machine.  Usage: driver DTYPE VALUES_FILE QUERY...; each query is
# keep:<hex float> or threshold:<hex float>; one output line per query:
# "<k or -1> <threshold as %a> <kept count>".
HOST_DRIVER = r"""
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#define DCEDIT_TOPK_SELECT_LOGIC_ONLY
#include "topk_select.cuh"

using namespace dcedit::cuda;

[[noreturn]] static void fail(const char* what) {
  std::fprintf(stderr, "%s\n", what);
  std::exit(2);
}

template <typename scalar_t>
static double kth_largest(const std::vector<scalar_t>& values, int64_t k) {
  using Bits = KeyOf<scalar_t>;
  RadixPrefix prefix{0ull, 0ull, static_cast<unsigned long long>(k)};
  for (int shift = 8 * int(sizeof(Bits)) - kRadixBits; shift >= 0; shift -= kRadixBits) {
    unsigned long long histogram[kRadixBins] = {};
    for (const scalar_t& v : values) {
      const Bits key = ordered_key(v);
      if (prefix.matches(key)) ++histogram[digit_of(key, shift)];
    }
    // As radix_pick_digit_kernel: thread t holds digit 255 - t, an inclusive scan gives
    // at_or_above, and exactly one digit may satisfy holds_rank.
    unsigned long long at_or_above = 0, above_chosen = 0;
    int chosen = -1;
    for (int digit = kRadixBins - 1; digit >= 0; --digit) {
      at_or_above += histogram[digit];
      if (holds_rank(at_or_above, histogram[digit], prefix.rank)) {
        if (chosen >= 0) fail("two digits hold the rank");
        chosen = digit;
        above_chosen = at_or_above - histogram[digit];
      }
    }
    if (chosen < 0) fail("no digit holds the rank");
    prefix.fix_digit(static_cast<unsigned>(chosen), shift, above_chosen);
  }
  return widen(value_of_ordered_key<scalar_t>(static_cast<Bits>(prefix.bits)));
}

template <typename scalar_t>
static int run(const char* path, int n_queries, char** queries) {
  FILE* f = std::fopen(path, "rb");
  if (f == nullptr) fail("cannot open values");
  std::fseek(f, 0, SEEK_END);
  const long bytes = std::ftell(f);
  std::fseek(f, 0, SEEK_SET);
  std::vector<scalar_t> values(bytes / sizeof(scalar_t));
  if (std::fread(values.data(), sizeof(scalar_t), values.size(), f) != values.size()) fail("short read");
  std::fclose(f);
  const int64_t n = static_cast<int64_t>(values.size());
  for (int q = 0; q < n_queries; ++q) {
    const char* query = queries[q];
    const bool keep_mode = std::strncmp(query, "keep:", 5) == 0;
    const double arg = std::strtod(std::strchr(query, ':') + 1, nullptr);
    int64_t k = -1;
    double t;
    if (keep_mode) {
      k = keep_count(arg, n);
      t = kth_largest(values, k);
    } else {
      t = threshold_in_dtype<scalar_t>(arg);
    }
    long long kept = 0;
    for (const scalar_t& v : values) kept += KeptRule::keeps(keep_mode, widen(v), t) ? 1 : 0;
    std::printf("%lld %a %lld\n", static_cast<long long>(k), t, kept);
  }
  return 0;
}

int main(int argc, char** argv) {
  if (argc < 3) fail("usage: driver DTYPE VALUES_FILE QUERY...");
  const char* dtype = argv[1];
  if (!std::strcmp(dtype, "float64")) return run<double>(argv[2], argc - 3, argv + 3);
  if (!std::strcmp(dtype, "float32")) return run<float>(argv[2], argc - 3, argv + 3);
  if (!std::strcmp(dtype, "float16")) return run<c10::Half>(argv[2], argc - 3, argv + 3);
  if (!std::strcmp(dtype, "bfloat16")) return run<c10::BFloat16>(argv[2], argc - 3, argv + 3);
  fail("unknown dtype");
}
"""


def _run_timed(name: str, cmd: list[str]) -> dict:
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=COMPILE_TIMEOUT_S)
    return {
        "name": name,
        "cmd": cmd,
        "returncode": proc.returncode,
        "stderr": proc.stderr + proc.stdout,
        "seconds": time.perf_counter() - start,
    }


@pytest.fixture(scope="module")
def builds(tmp_path_factory) -> dict:
    """Compile every .cu and the host driver, two at a time; results by name."""
    out = tmp_path_factory.mktemp("nvcc")
    driver_src = out / "topk_select_host_driver.cu"
    driver_src.write_text(HOST_DRIVER)
    jobs = {}
    for source in CU_SOURCES:
        keep_dir = out / source.stem  # --keep leaves the PTX that nvcc made on the way, for free
        keep_dir.mkdir()
        jobs[source.name] = [
            NVCC, "-c", str(source), "-o", str(out / (source.stem + ".o")),
            "--keep", f"--keep-dir={keep_dir}", *nvcc_base_flags(),
        ]
    # The driver only needs the header's logic part: no torch libraries to link.
    jobs["host_driver"] = [
        NVCC, str(driver_src), "-o", str(out / "topk_select_host_driver"), "-O1",
        CXX_STD, *cpp_extension.COMMON_NVCC_FLAGS, f"-I{CUDA_DIR}",
        *(f"-I{p}" for p in cpp_extension.include_paths()),
    ]
    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        results = {r["name"]: r for r in pool.map(lambda item: _run_timed(*item), jobs.items())}
    total = time.perf_counter() - start
    for r in results.values():
        print(f"\n[{r['seconds']:.1f} s, rc={r['returncode']}] {' '.join(r['cmd'])}")
    print(f"\nall nvcc runs: {total:.1f} s wall")
    for source in CU_SOURCES:
        results[source.name]["keep_dir"] = out / source.stem
    results["host_driver"]["binary"] = out / "topk_select_host_driver"
    results["host_driver"]["workdir"] = out
    return results


def _failure(result: dict) -> str:
    return (
        f"nvcc failed (rc={result['returncode']}, {result['seconds']:.1f} s):\n"
        f"{' '.join(result['cmd'])}\n{result['stderr'][-20000:]}"
    )


def test_cuda_sources_present():
    names = {p.name for p in CU_SOURCES}
    assert {"fisher_mask.cu", "apply_shift.cu"} <= names, names
    assert (SHIM_DIR / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h").is_file()


@needs_nvcc
@pytest.mark.parametrize("source", [p.name for p in CU_SOURCES])
def test_cu_compiles_for_sm90(builds, source):
    result = builds[source]
    assert result["returncode"] == 0, _failure(result)
    obj = Path(result["cmd"][result["cmd"].index("-o") + 1])
    assert obj.is_file() and obj.stat().st_size > 0


@needs_nvcc
def test_apply_shift_rounds_product_and_sum_separately(builds):
    """The reference computes alpha·d and weight + alpha·d as two torch ops (two roundings); a
    fused multiply-add would round once and change the last bit of the edited weight."""
    result = builds["apply_shift.cu"]
    assert result["returncode"] == 0, _failure(result)
    ptx = "\n".join(p.read_text() for p in result["keep_dir"].glob("*.ptx"))
    kernels = re.findall(r"\.entry \S*apply_shift_kernel.*?\n}\n", ptx, re.S)
    assert len(kernels) == 4, f"expected one apply_shift_kernel per weight dtype, found {len(kernels)}"
    for body in kernels:
        assert "fma." not in body
        assert re.search(r"\bmul\.rn\.f(32|64)", body) and re.search(r"\badd\.rn\.f(32|64)", body)


# ------------------------------------------------------------------------------------------------
# Host replay of the radix select
# ------------------------------------------------------------------------------------------------

DTYPES = {
    "float64": torch.float64,
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


def _fisher_like(n: int, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """Fisher-like values (squares) with heavy ties, exact zeros of both signs, an inf, NaN in
    some draws, and a few negative values, since the op does not assume a sign."""
    x = torch.randn(n, generator=gen, dtype=torch.float64).square()
    coarse = torch.rand(n, generator=gen, dtype=torch.float64) < 0.4
    x[coarse] = torch.round(x[coarse] * 4) / 4  # ties
    zero = torch.rand(n, generator=gen, dtype=torch.float64) < 0.2
    x[zero] = 0.0
    negzero = torch.rand(n, generator=gen, dtype=torch.float64) < 0.1
    x[negzero] = -0.0
    neg = torch.rand(n, generator=gen, dtype=torch.float64) < 0.05
    x[neg] = -x[neg] - 1.0
    if n > 4:
        x[int(torch.randint(n, (1,), generator=gen))] = math.inf
        if bool(torch.rand(1, generator=gen) < 0.5):
            x[int(torch.randint(n, (1,), generator=gen))] = math.nan
    return x.to(dtype)


def _next_up(value: float, dtype: torch.dtype) -> float:
    """The next representable value above `value` in `dtype` (finite, non-negative input)."""
    t = torch.tensor([value], dtype=dtype)
    int_dtype = {8: torch.int64, 4: torch.int32, 2: torch.int16}[t.element_size()]
    return float((t.view(int_dtype) + 1).view(dtype))


def _kth_largest_reference(fisher: torch.Tensor, keep: float) -> torch.Tensor:
    from dcedit_kernels.reference.fisher_mask import fisher_threshold_for_keep

    return fisher_threshold_for_keep(fisher, keep)


def _same_value(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == b


@needs_nvcc
@pytest.mark.parametrize("dtype_name", list(DTYPES))
def test_radix_select_logic_matches_reference(builds, dtype_name, gen):
    driver = builds["host_driver"]
    assert driver["returncode"] == 0, _failure(driver)
    dtype = DTYPES[dtype_name]
    for n in (1, 2, 7, 300, 4099):
        fisher = _fisher_like(n, dtype, gen)
        values_file = driver["workdir"] / f"values_{dtype_name}_{n}.bin"
        fisher.contiguous().view(torch.uint8).numpy().tofile(values_file)

        keeps = [1.0, 1e-9, 0.5, *torch.rand(4, generator=gen, dtype=torch.float64).clamp_min(1e-6).tolist()]
        finite = fisher[torch.isfinite(fisher)].double()
        picks = finite[torch.randint(finite.numel(), (3,), generator=gen)].tolist() if finite.numel() else [0.0]
        thresholds = [-math.inf, 0.0, -0.0, math.nan]
        for v in picks:
            v = abs(v)
            # on a value, just around it, and half-way to the next value of the dtype, where
            # rounding the threshold to the dtype decides the answer
            mid = (v + _next_up(v, dtype)) / 2
            thresholds += [v, v * (1 + 1e-12), v * (1 - 1e-12), mid, math.nextafter(mid, math.inf)]
        queries = [f"keep:{k.hex()}" for k in keeps] + [f"threshold:{float(t).hex()}" for t in thresholds]
        proc = subprocess.run(
            [str(driver["binary"]), dtype_name, str(values_file), *queries],
            capture_output=True, text=True, timeout=60,
        )
        assert proc.returncode == 0, proc.stderr
        lines = proc.stdout.splitlines()
        assert len(lines) == len(queries), proc.stdout
        for query, line in zip(queries, lines):
            k_text, t_text, count_text = line.split()
            t, count = float.fromhex(t_text), int(count_text)
            mode, arg = query.split(":")
            arg = float.fromhex(arg)
            where = f"{dtype_name} n={n} {mode}={arg!r}"
            if mode == "keep":
                assert int(k_text) == min(max(math.ceil(arg * n), 1), n), where
                expected_t = _kth_largest_reference(fisher, arg)
                assert _same_value(t, float(expected_t)), f"{where}: t={t!r}, kthvalue={float(expected_t)!r}"
                assert count == int((fisher >= expected_t).sum()), where
            else:
                assert count == int((fisher > arg).sum()), f"{where}: kept {count}"


_IMPL = re.compile(r'm\.impl\("(\w+)",\s*&([\w:]+)\)')


def _split_top_level(params: str) -> list[str]:
    """Split a C++ parameter list at the commas outside <...>."""
    parts, depth, start = [], 0, 0
    for k, ch in enumerate(params):
        depth += ch == "<"
        depth -= ch == ">"
        if ch == "," and depth == 0:
            parts.append(params[start:k])
            start = k + 1
    parts.append(params[start:])
    return [p for p in (" ".join(part.split()) for part in parts) if p]


def _kernel_signatures(folder: Path, pattern: str) -> dict[str, tuple]:
    """op -> (return type, parameter types without names) of the kernels a folder registers."""
    found = {}
    for path in sorted(folder.glob(pattern)):
        text = path.read_text()
        for op, func in _IMPL.findall(text):
            name = func.split("::")[-1]
            match = re.search(r"^([\w:<>, ]+?)\s+" + name + r"\(([^)]*)\)\s*\{", text, re.M)
            assert match, f"{path.name}: no definition of {name}"
            params = tuple(re.sub(r"\s*\b\w+$", "", p) for p in _split_top_level(match.group(2)))
            found[op] = (" ".join(match.group(1).split()), params)
    return found


def test_cpu_and_cuda_kernels_share_their_cpp_signatures():
    """An op's CPU and CUDA kernels must have one C++ signature: a `_C` built with both aborts
    the whole process at import otherwise (c10::Error "Mismatch in kernel C++ signatures",
    seen with torch 2.11 + CUDA 13 when apply_shift_'s CPU kernel took `const at::Tensor&`
    weight and the CUDA one `at::Tensor&`).  The CPU wheel here cannot link the CUDA build, so
    the signatures are compared from the sources."""
    cpu = _kernel_signatures(ROOT / "csrc" / "cpu", "*.cpp")
    cuda = _kernel_signatures(CUDA_DIR, "*.cu")
    both = sorted(set(cpu) & set(cuda))
    assert both == ["apply_shift_", "fisher_mask"], (sorted(cpu), sorted(cuda))
    for op in both:
        assert cpu[op] == cuda[op], f"{op}: CPU {cpu[op]} vs CUDA {cuda[op]}"
