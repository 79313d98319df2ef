#!/usr/bin/env bash
# One call on the lent GPU machine: build _C with the CUDA sources, run the tests on CUDA, run
# the benchmarks and update RESULTS.md; logs land in $OUT (or ./gpu_out).
#   device tool:  bash benchmarks/run_gpu.sh
set -uo pipefail
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
python -c "import torch, triton; print(torch.__version__, torch.version.cuda, triton.__version__)" | tee "$OUT/versions.txt"
DCEDIT_BUILD_CUDA=1 python setup.py build_ext --inplace > "$OUT/build.log" 2>&1 || { tail -50 "$OUT/build.log"; exit 1; }
python -c "import dcedit_kernels as d; print(d.backends()); print(d.op_backends())" | tee "$OUT/backends.txt"
DCEDIT_TEST_CUDA=1 python -m pytest -q -x tests/test_ops.py tests/test_cpu_kernels.py 2>&1 | tee "$OUT/tests.log" | tail -5
python -m pytest benchmarks/ --benchmark-only -q --benchmark-json="$OUT/bench.json" 2>&1 | tee "$OUT/bench.log" | tail -15
python benchmarks/write_results.py "$OUT/bench.json" --out "$OUT/RESULTS.md"
