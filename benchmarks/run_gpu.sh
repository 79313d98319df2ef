#!/usr/bin/env bash
# One call on the lent GPU machine: build _C with the CUDA sources, run the tests on CUDA, time
# the precision tables (tune.py --tables), run the benchmarks (RESULTS.md) and time the Triton
# launch-config candidates (tune.py --sweep); logs land in $OUT
# (or ./gpu_out).   device tool:  bash benchmarks/run_gpu.sh
#
# Every step runs under `timeout`, within BUDGET seconds in all (the device tool stops a command
# at 600 s), and a failing step is recorded in summary.txt and the next one runs.  Eight files
# come back (the tool's limit): summary.txt, build.log, tests_triton.log, tests_ops.log,
# tests_kernels.log, perf.log, bench.json, RESULTS.md (benchmarks/RESULTS.md with this device's table).
set -uo pipefail
PY=${PYTHON:-python3}
OUT=${OUT:-gpu_out}
BUDGET=${BUDGET:-540}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"

# step NAME MAX_SECONDS LOG COMMAND...: run COMMAND with its output in LOG, for at most
# MAX_SECONDS and never past the budget less RESERVE seconds (kept for a later step); one line
# per step in summary.txt; its exit status in STEP_RC.
RESERVE=0
STEP_RC=0
step() {
    local name=$1 max=$2 log=$3
    shift 3
    local left=$((BUDGET - RESERVE - SECONDS))
    local limit=$((max < left ? max : left))
    if ((limit < 15)); then
        echo "$name: not run (budget of $BUDGET s spent)" | tee -a "$SUMMARY"
        STEP_RC=125
        return 0
    fi
    local t0=$SECONDS
    local before
    before=$(stat -c %s "$log" 2>/dev/null || echo 0)
    # SIGINT, not timeout's SIGTERM: pytest then ends its session as after Ctrl-C, printing the
    # failures so far (a test shard stopped by SIGTERM left a line of dots and F's, no test names)
    # and letting pytest-benchmark write the cases that finished to its JSON (it wrote nothing).
    timeout -s INT -k 10 "$limit" "$@" >> "$log" 2>&1
    local rc=$?
    STEP_RC=$rc
    local note=""
    ((rc == 124 || rc == 137)) && note=" TIMED OUT"
    # The step's own last line (a shared log's last line may be an earlier step's).
    local last
    last=$(tail -c +$((before + 1)) "$log" 2>/dev/null | tail -n 1)
    echo "$name: rc=$rc in $((SECONDS - t0)) s (limit $limit s)$note; $last" | tee -a "$SUMMARY"
    return 0
}

{
    timeout 30 nvidia-smi
    timeout 60 "$PY" -c "import sys, torch, triton; print(sys.version.split()[0], torch.__version__, torch.version.cuda, triton.__version__)"
} > "$OUT/build.log" 2>&1
tail -n 1 "$OUT/build.log" | tee -a "$SUMMARY"

# torch finds the CUDA toolkit through CUDA_HOME, else from nvcc's folder: where `nvcc` on PATH
# is a wrapper script (/usr/local/bin/nvcc on the dev machine), torch guesses /usr/local and the
# link fails with "cannot find -lcudart".  The toolkit's own folder avoids that.
if [ -z "${CUDA_HOME:-}" ]; then
    for dir in /usr/local/cuda /usr/local/cuda-13.0; do
        if [ -x "$dir/bin/nvcc" ]; then export CUDA_HOME=$dir; break; fi
    done
fi
{
    echo "CUDA_HOME=${CUDA_HOME:-unset}"
    # Where the image keeps its toolkit is not documented: the nvcc found, and its version.
    NVCC=$(command -v nvcc || true)
    echo "nvcc on PATH: ${NVCC:-none}${NVCC:+ -> $(readlink -f "$NVCC")}"
    [ -n "${CUDA_HOME:-}" ] && timeout 30 "$CUDA_HOME/bin/nvcc" --version 2>&1 | tail -n 2
} >> "$OUT/build.log" 2>&1
step build 200 "$OUT/build.log" env DCEDIT_BUILD_CUDA=1 "$PY" setup.py build_ext --inplace
if ((STEP_RC != 0)); then
    # Without _C the CPU kernels are lost too: the tests' CPU work would run the slow references, and
    # fisher_mask on CUDA its reference (it has no Triton path).  The CPU-only build: ~15 s.
    step build_cpu_only 120 "$OUT/build.log" env DCEDIT_BUILD_CUDA=0 "$PY" setup.py build_ext --inplace
fi
timeout 60 "$PY" -c "import dcedit_kernels as d; print(d.backends()); print(d.op_backends())" >> "$SUMMARY" 2>&1
CUDA_BACKENDS=$(timeout 60 "$PY" -c "import dcedit_kernels as d
print(', '.join(f'{op} {v[\"CUDA\"]}' for op, v in d.op_backends().items()))" 2>&1 | tail -n 1)

# Tests, seven processes at once (16 cores): Triton compiles each new kernel specialisation on
# the host, one at a time per process (compile_check's 24 took 15 s on the 2-core dev machine;
# the CUDA tests need many more: dtypes x flags x shapes x configs), so test_triton_kernels.py
# runs as five shards, their logs joined into tests_triton.log afterwards.
# Not run: test_cuda_compile.py and test_triton_compile.py (compile-only checks, redundant on a
# GPU), "slow" tests (SmolLM2 from a gguf: no gguf package there), the SmolLM2 tokenizer test
# (gguf too) and test_ops' check of the Triton registrations on CPU tensors (needs the
# interpreter, which DCEDIT_TEST_CUDA=1 turns off; CPU CI runs it).  DCEDIT_TEST_CUDA=1 also drops the
# "cpu" copies of the tests taking conftest's `device`, and the CPU-only test files (metrics, editors,
# training, data: ~1,350 tests, no CUDA in any) are CI's: a shard of them here was the slowest, the one
# every other shard waited for, and held cores the Triton compiles needed (session 68's count).
export DCEDIT_TEST_CUDA=1
# Seven pytest processes on 16 cores: torch's default of one thread per core each would
# oversubscribe the host side (CPU references, Triton compiles) eightfold.
export OMP_NUM_THREADS=2
# The step caps add up to far more than BUDGET: the tests stop early enough to leave
# TESTS_LEAVE seconds for bench_ops and bench_e2e (120 s each) and their merges.
RESERVE=${TESTS_LEAVE:-270}
SHARDS=$(mktemp -d)
# Short tracebacks: after a CUDA error every later test of that process fails, and 1,100 long
# ones could pass the device tool's per-file limit, so that the log would not come back at all.
PYTEST=("$PY" -m pytest -q -rs --tb=short -p no:cacheprovider -m "not slow")
OPS="segment_matmul or grouped_lowrank or grouped_outer or segmented_fisher or lowrank_delta_linear"
step tests_triton_1 220 "$SHARDS/1.log" "${PYTEST[@]}" --durations=10 tests/test_triton_kernels.py \
    -k "segment_matmul or grouped_lowrank" &
# grouped_outer alone: its backward's tests compile ~30 more specialisations (selection pass and
# masked GEMMs for every dtype and fusion).
step tests_triton_2 220 "$SHARDS/2.log" "${PYTEST[@]}" --durations=10 tests/test_triton_kernels.py \
    -k "grouped_outer" &
step tests_triton_3 220 "$SHARDS/3.log" "${PYTEST[@]}" --durations=10 tests/test_triton_kernels.py \
    -k "segmented_fisher or lowrank_delta_linear" &
step tests_triton_4 220 "$SHARDS/4.log" "${PYTEST[@]}" --durations=10 tests/test_triton_kernels.py \
    -k "not ($OPS) and not every_config_candidate" &
# grouped_bilinear's two kernels: 8 forced configs, each compiling the forward's and the three
# backward calls' specialisations.
step tests_triton_5 220 "$SHARDS/5.log" "${PYTEST[@]}" --durations=10 tests/test_triton_kernels.py \
    -k "every_config_candidate and not ($OPS)" &
step tests_ops 220 "$OUT/tests_ops.log" "${PYTEST[@]}" tests/test_ops.py \
    tests/test_compat_mend.py tests/test_capture.py tests/test_multi_device.py \
    tests/test_compile.py tests/test_autocast.py \
    --deselect tests/test_ops.py::test_triton_registrations_take_schema_arguments &
# The CUDA kernels of _C (csrc/cuda: fisher_mask, apply_shift_) bit for bit against the reference:
# test_cpu_kernels.py's tests of those ops on device "cuda" (NaN ranking, threshold rounding, strided
# weights, views, inputs sharing the weight's memory, bad input); its CPU kernels' tests are CI's.
step tests_kernels 120 "$OUT/tests_kernels.log" "${PYTEST[@]}" tests/test_cpu_kernels.py -k cuda &
wait
for i in 1 2 3 4 5; do echo "=== shard $i"; cat "$SHARDS/$i.log"; done > "$OUT/tests_triton.log" 2>&1
rm -rf "$SHARDS"
unset DCEDIT_TEST_CUDA OMP_NUM_THREADS

# In parts, each with its own JSON: pytest-benchmark writes the file only at the end (also when
# its limit's SIGINT stops the part: then with the cases that finished), so a part killed loses
# its own results, not the other's.  After each part the JSON written so far is merged into
# $OUT/bench.json and $OUT/RESULTS.md (eight files come back, no more), so that a run stopped
# from outside (the device tool's limit) keeps the parts that finished.  The parts leave the
# merge its 30 s.
PARTS=$(mktemp -d)
RESERVE=30
# $OUT/RESULTS.md starts as the repo's benchmarks/RESULTS.md, so that it comes back whole: this device's
# section added or replaced, the other devices' sections and the notes kept; copy it over that file.
# (Written from nothing, it held this device's table alone.)
[ -f benchmarks/RESULTS.md ] && cp benchmarks/RESULTS.md "$OUT/RESULTS.md"
NOTE="CUDA backends: $CUDA_BACKENDS"
merge() {
    local RESERVE=0
    step results 30 "$OUT/perf.log" "$PY" benchmarks/write_results.py "$PARTS"/*.json \
        --json-out "$OUT/bench.json" --out "$OUT/RESULTS.md" --note "$NOTE"
}
BENCH=("$PY" -m pytest --benchmark-only -q -p no:cacheprovider)
step bench_ops 120 "$OUT/perf.log" "${BENCH[@]}" benchmarks/test_bench_ops.py --benchmark-json="$PARTS/ops.json"
merge
step bench_e2e 120 "$OUT/perf.log" "${BENCH[@]}" benchmarks/test_bench_end_to_end.py \
    -k "not ft_kl and not training_pass" --benchmark-json="$PARTS/e2e.json"
merge
# The precision tables (a few compiles): they answer the predicted misses (NOTES.md 4, 5).
step tune_tables 60 "$OUT/perf.log" "$PY" -m dcedit_kernels.triton_kernels.tune --tables
# FT+KL over many edits (session 8's case) and the training pass (buckets, session 16's, and the
# reused prefix, session 17's) each on its own: their times on the GPU are not known yet.
step bench_ft_kl 60 "$OUT/perf.log" "${BENCH[@]}" benchmarks/test_bench_end_to_end.py -k ft_kl \
    --benchmark-json="$PARTS/ft_kl.json"
step bench_train 60 "$OUT/perf.log" "${BENCH[@]}" benchmarks/test_bench_end_to_end.py -k training_pass \
    --benchmark-json="$PARTS/train.json"
merge
rm -rf "$PARTS"
RESERVE=0
# Last, with whatever time is left: each launch-config candidate timed (launch.py's choices).
step tune 120 "$OUT/perf.log" "$PY" -m dcedit_kernels.triton_kernels.tune --sweep
echo "total $SECONDS s" | tee -a "$SUMMARY"
