"""The benchmark suite's own arithmetic (benchmarks/measure.py, report.py, write_results.py): what
the GPU table is judged on, checked here on CPU without timing anything real."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import measure  # noqa: E402
import report  # noqa: E402


class _Benchmark:
    def __init__(self):
        self.extra_info = {}
        self.calls = 0

    def pedantic(self, fn, rounds, iterations, warmup_rounds):
        for _ in range(rounds + warmup_rounds):
            fn()
            self.calls += 1


CEILINGS = {"device": "CPU (test)", "copy_GBps": 10.0, "matmul_TFLOPs": 0.1}


def test_disagreement_matches_float64_norms(gen):
    a = (torch.randn(7, 5, generator=gen), [torch.randn(3, generator=gen)])
    b = (a[0] + 1e-3 * torch.randn(7, 5, generator=gen), [a[1][0] * 1.01])
    num = (a[0].double() - b[0].double()).square().sum() + (a[1][0].double() - b[1][0].double()).square().sum()
    den = b[0].double().square().sum() + b[1][0].double().square().sum()
    assert measure.disagreement(a, b) == pytest.approx(float((num / den).sqrt()), rel=1e-12)
    assert measure.disagreement({"x": a[0]}, {"x": a[0].clone()}) == 0.0
    assert measure.disagreement(None, None) is None
    with pytest.raises(AssertionError, match="structure"):
        measure.disagreement(a[0], a[0][:3])


def test_compare_fails_when_the_sides_disagree(gen):
    x = torch.randn(64, 32, generator=gen)
    w = torch.randn(16, 32, generator=gen)
    right = lambda: x @ w.T  # noqa: E731
    eager = lambda: (x.double() @ w.double().T).float()  # noqa: E731
    bench = _Benchmark()
    info = report.compare(bench, "cpu", CEILINGS, right, eager, flops=2.0 * 64 * 32 * 16)
    assert info["fused_vs_eager_rel_err"] < 1e-5 and bench.extra_info["fused_vs_eager_rel_err"] < 1e-5
    with pytest.raises(AssertionError, match="fused and eager results differ"):
        report.compare(_Benchmark(), "cpu", CEILINGS, lambda: x @ w[torch.randperm(16, generator=gen)].T, eager)
    # a pair of callables is compared instead of the sides' return values; False compares nothing
    with pytest.raises(AssertionError, match="fused and eager results differ"):
        report.compare(_Benchmark(), "cpu", CEILINGS, right, eager, check=(lambda: -right(), eager))
    info = report.compare(_Benchmark(), "cpu", CEILINGS, right, lambda: -right(), check=False)
    assert math.isnan(info["fused_vs_eager_rel_err"])


def test_pytest_benchmark_rounds_are_synchronised(monkeypatch):
    """pytest-benchmark's own rounds wait for the device, as time_fns does: on CUDA an unsynced
    round times the launch only."""
    synced = []
    monkeypatch.setattr(report, "sync", lambda device: synced.append(device))
    bench = _Benchmark()
    report.compare(bench, "cpu", CEILINGS, lambda: torch.ones(3), lambda: torch.ones(3), rounds=4)
    assert bench.calls == 5 and synced == ["cpu"] * 5


def test_cuda_helpers_use_the_given_device(monkeypatch):
    """"cuda:1" synchronises and reads the allocator statistics of cuda:1, not the current device."""
    calls = []
    for name in ("synchronize", "memory_allocated", "reset_peak_memory_stats", "max_memory_allocated",
                 "get_device_name"):
        monkeypatch.setattr(torch.cuda, name, lambda *args, _n=name: calls.append((_n, args)) or 0)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    measure.sync("cuda:1")
    measure.peak_extra_bytes(lambda: None, "cuda:1")
    measure.describe_device("cuda:1")
    assert calls and all(args == (torch.device("cuda:1"),) for _, args in calls), calls


def _row(name, **extra):
    info = {"device": "CPU (x86_64, 2 threads)", "fused_ms": 2.0, "eager_ms": 5.0, "speedup": 2.5,
            "fused_peak_MiB": 1.25, "eager_peak_MiB": 7.5, "pct_of_roofline": 40.0, "achieved_GBps": 3.0,
            "achieved_TFLOPs": 0.123456, "copy_GBps_ceiling": 63.2, "matmul_TFLOPs_ceiling": 0.219, **extra}
    return {"name": name, "extra_info": info}


def test_write_results_states_grouped_lowrank_against_dense_matmul():
    """The table states grouped_lowrank's second issue-5 target (>= 60 % of one dense matmul of the same
    FLOPs), judged on a GPU only."""
    import write_results

    def row(device, pct):
        r = _row("test_grouped_lowrank", pct_of_dense_same_flops=pct, dense_same_flops_ms=1.5, target_pct_of_dense=60.0)
        r["extra_info"]["device"] = device
        return {"machine_info": {}, "benchmarks": [r]}

    line = "- grouped_lowrank: {} % of the TFLOP/s of one dense torch.matmul of the same FLOPs (1.50 ms; target ≥ 60 %: {})."
    assert line.format("61.2", "met") in write_results.table(row("NVIDIA H200", 61.234))
    assert line.format("59.9", "not met") in write_results.table(row("NVIDIA H200", 59.94))
    assert line.format("75.0", "GPU target, not judged on CPU") in write_results.table(row("CPU (x, 2 threads)", 75.0))


def test_write_results_states_grouped_outer_memory_target():
    """The table states grouped_outer's memory target (fused peak ≤ 1.5× one fp32 output), judged on a GPU only."""
    import write_results

    def table(device, ratio):
        r = _row("test_grouped_outer_sss", fused_peak_over_output=ratio, target_peak_over_output=1.5)
        r["extra_info"]["device"] = device
        return write_results.table({"machine_info": {}, "benchmarks": [r]})

    line = "- grouped_outer_sss: fused peak {}× one fp32 output (target ≤ 1.5×: {})."
    assert line.format("1.50", "met") in table("NVIDIA H200", 1.5)
    assert line.format("1.51", "not met") in table("NVIDIA H200", 1.51)
    assert line.format("1.04", "GPU target, not judged on CPU") in table("CPU (x, 2 threads)", 1.04)


def test_write_results_replaces_its_device_section(tmp_path):
    data = {"machine_info": {}, "benchmarks": [_row("test_a", target_speedup=4.0, target_met=False,
                                                     fused_vs_eager_rel_err=3.2e-7),
                                                _row("test_b", fused_vs_eager_rel_err=float("nan"))]}
    (tmp_path / "b.json").write_text(json.dumps(data))
    out = tmp_path / "RESULTS.md"
    # The section's notes above its generated part (from its "Measured …" line) are kept, with its heading.
    notes = "Run on an idle machine.\n\n**Session 28.** A note with `| pipes |` inside a line.\n"
    out.write_text("# Benchmark results\n\nintro\n\n## CPU (x86_64, 2 threads), idle machine\n\n" + notes
                   + "\nMeasured 2026-01-01, torch 0, triton 0. Ceilings measured in the same run: old.\n\n"
                   "| case | old |\n|---|---|\n| old table | 1 |\n\n- old bullet\n\n## NVIDIA H200\n\nkept\n")
    out.chmod(0o644)
    subprocess.run([sys.executable, str(BENCH / "write_results.py"), str(tmp_path / "b.json"), "--out", str(out)],
                   check=True, capture_output=True)
    text = out.read_text()
    assert text.count("## CPU (x86_64, 2 threads)") == 1 and "old table" not in text and "old bullet" not in text
    assert "## CPU (x86_64, 2 threads), idle machine\n\n" + notes + "\nMeasured " in text
    assert "## NVIDIA H200\n\nkept" in text and text.startswith("# Benchmark results\n\nintro")
    assert out.stat().st_mode & 0o777 == 0o644 and [p.name for p in tmp_path.iterdir() if ".tmp" in p.name] == []
    # A section without a generated part is all notes: kept, the table after them.
    out.write_text("# Benchmark results\n\n## CPU (x86_64, 2 threads)\n\nonly notes\n")
    subprocess.run([sys.executable, str(BENCH / "write_results.py"), str(tmp_path / "b.json"), "--out", str(out)],
                   check=True, capture_output=True)
    assert out.read_text().startswith("# Benchmark results\n\n## CPU (x86_64, 2 threads)\n\nonly notes\n\nMeasured ")
    assert ("| a | 2.00 | 5.00 | 2.50× | ≥4× (GPU target, not judged on CPU) | 1.2 | 7.5 | 40.0 | 3.0 | 0.123 "
            "| 3.2e-07 |") in text
    assert "| b | 2.00 | 5.00 | 2.50× |  | 1.2 | 7.5 | 40.0 | 3.0 | 0.123 | n/a |" in text


def test_write_results_names_each_parts_ceilings_where_they_differ(tmp_path):
    """Merged parts each measured their own ceilings (in their own processes), and a row's % roofline
    is against its part's: the header gave the first file's alone.  One pair where they agree."""
    import write_results

    ops = [_row("test_a")]
    e2e = [_row("test_b", copy_GBps_ceiling=6.1, matmul_TFLOPs_ceiling=0.017)]
    assert write_results.ceilings([("ops.json", ops), ("e2e.json", e2e)]) == (
        "Ceilings measured in the same run, by each part (a row's % roofline is against its own part's): "
        "ops.json: copy 63.2 GB/s, matmul 0.219 TFLOP/s; e2e.json: copy 6.1 GB/s, matmul 0.017 TFLOP/s.")
    assert write_results.ceilings([("ops.json", ops), ("more.json", [_row("test_c")])]) == (
        "Ceilings measured in the same run: copy 63.2 GB/s, matmul 0.219 TFLOP/s.")


def test_write_results_judges_the_training_memory_target():
    """The training-step memory line states its verdict (MoEditor's peak ≤ 1.2× MEND's), judged on a GPU
    only, as the other targets' lines do: it gave the ratio and the target but no verdict."""
    import write_results

    def line(device, ratio):
        r = {"name": "test_training_memory_moeditor_vs_mend", "extra_info": {
            "device": device, "mend_step_peak_MiB": 100.0, "moeditor8_step_peak_MiB": 100.0 * ratio, "ratio": ratio,
            "target_ratio": 1.2, "target_met": ratio <= 1.2 and device != "CPU"}}
        return write_results.table({"machine_info": {}, "benchmarks": [r]}).splitlines()[-1]

    assert "ratio 1.20 (GPU target ≤ 1.2: met; the CUDA allocator's peak" in line("NVIDIA H100 80GB HBM3", 1.2)
    assert "ratio 2.45 (GPU target ≤ 1.2: not met;" in line("NVIDIA H100 80GB HBM3", 2.45)
    assert "ratio 0.45 (GPU target ≤ 1.2: GPU target, not judged on CPU; each side" in line("CPU (x, 2 threads)", 0.45)


def test_write_results_reports_missing_gpu_targets():
    """A GPU run whose parts stopped before some issue-5 cases (the budget, a failure) gets a "missing"
    row for each such case and a line for the training-memory case, where the table just lacked them;
    a CPU table (its targets not judged, its parametrisation not the GPU's) reports nothing missing."""
    import write_results

    def table(device):
        r = _row("test_grouped_outer_sss", target_speedup=4.0, target_met=True)
        r["extra_info"]["device"] = device
        return write_results.table({"machine_info": {}, "benchmarks": [r]})

    gpu = table("NVIDIA H100 80GB HBM3")
    assert "| grouped_outer_sss | 2.00 | 5.00 |" in gpu and "| grouped_outer_sss | missing" not in gpu
    for name, target in [("segmented_fisher", "≥10×"), ("grouped_lowrank", "≥2×"), ("fisher_mask[67108864]", "≥3×"),
                         ("lowrank_delta_linear[factors_bf16]", "≥3×"), ("moeditor_edit_three_layers[high]", "≥5×")]:
        assert f"| {name} | missing | missing |  | {target} (no result in this run) |" in gpu, name
    assert "Training-step peak memory, MoEditor (N_g = 8) over MEND (GPU target ≤ 1.2): missing" in gpu
    assert "missing" not in table("CPU (x86_64, 2 threads)")


def test_write_results_gpu_targets_are_the_cases_a_gpu_run_collects():
    """write_results' list of issue-5 target cases names the ids a GPU run collects (DCEDIT_BENCH_DEVICE=cuda),
    every parametrisation of each case with a target included: else a renamed case would read "missing" for
    ever, or a new one would go unreported."""
    import write_results

    env = dict(os.environ, DCEDIT_BENCH_DEVICE="cuda")
    run = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                          str(BENCH)], cwd=BENCH.parent, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    collected = {line.split("::test_", 1)[1] for line in run.stdout.splitlines() if "::test_" in line}
    targets = set(write_results.GPU_SPEEDUP_TARGETS)
    assert targets | {write_results.GPU_MEMORY_TARGET_CASE} <= collected
    with_target = ("grouped_outer_sss[", "segmented_fisher[", "grouped_lowrank[", "fisher_mask[",
                   "lowrank_delta_linear[", "moeditor_edit_three_layers[")
    assert {name for name in collected if (name + "[").startswith(with_target)} == targets


def _draw(gen, lo, hi):
    """A float drawn log-uniformly from [lo, hi]."""
    u = float(torch.rand((), generator=gen, dtype=torch.float64))
    return math.exp(math.log(lo) + (math.log(hi) - math.log(lo)) * u)


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_compare_figures_match_a_float64_oracle(gen, monkeypatch, device):
    """Every figure of a row from synthetic timings, peaks and ceilings: the ratio eager/fused, the
    achieved rates, % of roofline (the floor max(bytes / copy rate, FLOPs / matmul rate) over the fused
    time, compute- and bandwidth-bound alike), the peaks in MiB and over one output, the verdict (judged
    on a GPU only); and the ceilings themselves (bytes read + written per copy, 2·m³ per matmul)."""
    for _ in range(20):
        fused_s, eager_s = _draw(gen, 1e-5, 1.0), _draw(gen, 1e-5, 1.0)
        peaks = {"fused": _draw(gen, 1e3, 1e10), "eager": _draw(gen, 1e3, 1e10)}
        flops, nbytes, out_bytes = _draw(gen, 1e6, 1e13), _draw(gen, 1e5, 1e10), _draw(gen, 1e3, 1e9)
        ceil = {"device": "GPU (test)", "copy_GBps": _draw(gen, 10, 5000), "matmul_TFLOPs": _draw(gen, 0.1, 1000)}
        target = _draw(gen, 0.5, 20)

        def fused():
            return torch.ones(2)

        def eager():
            return torch.ones(2)

        monkeypatch.setattr(report, "time_fns", lambda fns, dev, **kw: [fused_s, eager_s])
        monkeypatch.setattr(report, "peak_extra_bytes", lambda fn, dev: peaks["fused" if fn is fused else "eager"])
        monkeypatch.setattr(report, "sync", lambda dev: None)
        info = report.compare(_Benchmark(), device, ceil, fused, eager, flops=flops, bytes_moved=nbytes,
                              output_bytes=out_bytes, target_speedup=target)
        floor = max(nbytes / (ceil["copy_GBps"] * 1e9), flops / (ceil["matmul_TFLOPs"] * 1e12))
        want = {"fused_ms": fused_s * 1e3, "eager_ms": eager_s * 1e3, "speedup": eager_s / fused_s,
                "achieved_GBps": nbytes / fused_s / 1e9, "achieved_TFLOPs": flops / fused_s / 1e12,
                "pct_of_roofline": 100 * floor / fused_s, "fused_peak_MiB": peaks["fused"] / 2**20,
                "eager_peak_MiB": peaks["eager"] / 2**20, "fused_peak_over_output": peaks["fused"] / out_bytes}
        for key, value in want.items():
            assert info[key] == pytest.approx(value, rel=1e-12), key
        assert info["target_met"] is (device == "cuda" and eager_s / fused_s >= target)
        # no counted floor: n/a, not 0
        info = report.compare(_Benchmark(), device, ceil, fused, eager)
        assert math.isnan(info["pct_of_roofline"]) and math.isnan(info["achieved_GBps"])

    times = iter([_draw(gen, 1e-4, 1e-1), _draw(gen, 1e-4, 1e-1)])
    seen = {}

    def fake_time_fn(fn, dev, **kw):
        out = fn()
        seen["bytes" if out.dim() == 1 else "flops"] = (out, next(times))
        return seen["bytes" if out.dim() == 1 else "flops"][1]

    monkeypatch.setattr(measure, "time_fn", fake_time_fn)
    bw, rate = measure.measure_device_ceilings("cpu")
    out, t = seen["bytes"]
    assert bw == pytest.approx(2 * out.numel() * out.element_size() / t, rel=1e-12)
    out, t = seen["flops"]
    assert out.shape[0] == out.shape[1] and rate == pytest.approx(2.0 * out.shape[0] ** 3 / t, rel=1e-12)


_GPU_CASES = r"""
import inspect, json
import torch
import conftest, report
assert conftest.ON_GPU
import test_bench_end_to_end as e2e
import test_bench_ops as ops_cases

rec, out = {}, {}
def recorder(benchmark, device, ceilings, fused, eager, **kw):
    fused = inspect.unwrap(fused)  # the edit is a torch.no_grad() function
    closure = {n: c.cell_contents for n, c in zip(fused.__code__.co_freevars, fused.__closure__ or ())}
    tensors = closure.get("args") or tuple(closure[n] for n in ("eta", "mu", "offsets", "delta", "fisher") if n in closure)
    rec.update({k: v for k, v in kw.items() if isinstance(v, (int, float, str))},
               shapes=[list(t.shape) if isinstance(t, torch.Tensor) else None for t in tensors],
               dtypes=[str(t.dtype) for t in tensors if isinstance(t, torch.Tensor)],
               offsets=[t.tolist() for t in tensors if isinstance(t, torch.Tensor) and t.dtype == torch.int32])
    if "facts" in closure:  # the end-to-end edit: (mu, eta, edit offsets) per layer, and the weights
        rec.update(facts=[[list(t.shape) for t in f] + [str(f[0].dtype)] for f in closure["facts"]],
                   weights=[list(w.shape) for w in closure["weights"]])
    return {"fused_ms": 4.0}
report.compare = e2e.compare = recorder
# the GPU's inputs without drawing them: meta tensors (or unfilled ones) of the same shapes and dtypes
ops_cases.rnd = lambda shape, gen, device, dtype=ops_cases.DT: torch.empty(shape, dtype=dtype, device="meta")
class Undrawn:
    def __getattr__(self, name):
        return getattr(torch, name)
    def rand(self, *shape, generator=None, dtype=None):
        return torch.empty(*shape, dtype=dtype)
    randn = rand
ops_cases.torch = e2e.torch = Undrawn()
gen = lambda: torch.Generator().manual_seed(0)
class Bench:
    extra_info = {}
import measure
def timed(fn, device, **kw):  # a case's own extra timing (grouped_lowrank's dense matmul): 1 ms
    closure = {n: c.cell_contents for n, c in zip(fn.__code__.co_freevars, fn.__closure__ or ())}
    out["timed"] = sorted(list(t.shape) for t in closure.values() if isinstance(t, torch.Tensor))
    return 1e-3
measure.time_fn = timed
for name in ("grouped_outer_sss", "segmented_fisher", "grouped_lowrank"):
    rec.clear(); Bench.extra_info = {}
    getattr(ops_cases, "test_" + name)(Bench, "cpu", {}, gen()); out[name] = dict(rec, extra_info=Bench.extra_info)
for n in ops_cases.test_fisher_mask.pytestmark[0].args[1]:
    rec.clear(); ops_cases.test_fisher_mask(None, "cpu", {}, gen(), n); out[f"fisher_mask[{n}]"] = dict(rec)
for ident, dt in ops_cases.FACTOR_DTYPES.items():
    rec.clear(); ops_cases.test_lowrank_delta_linear(None, "cpu", {}, gen(), dt)
    out[f"lowrank_delta_linear[{ident}]"] = dict(rec)

class Editor(torch.nn.Module):  # records what the case builds; the MLP is not needed to count its FLOPs
    def __init__(self, *args, **kw):
        super().__init__(); self.layers = torch.nn.ModuleList(); out["moeditor_args"] = [list(args), kw]
e2e.MoEditor = Editor
rec.clear(); e2e.test_moeditor_edit_three_layers(None, "cpu", {}, "highest")
out["moeditor_edit"] = dict(rec)
print(json.dumps(out))
"""


def test_gpu_cases_measure_issue5_shapes_and_counts():
    """The cases as a GPU run builds them (DCEDIT_BENCH_DEVICE=cuda, inputs as meta tensors, compare()
    recorded): issue 5's shapes (bf16, GPT-2 XL's MLP 1600 → 6400; G 8, T 4096 ragged; 125 edits of
    ~24 tokens; d 8000, r 1920; 10M and 2^26 entries; 2048 rows, 8 groups of 512 tokens; three such
    layers, MoEditor N_g 8), each target, and the FLOPs and least bytes (inputs read and outputs written,
    each in its dtype) the rates and % of roofline are computed from, counted here from the SPEC's math."""
    env = dict(os.environ, DCEDIT_BENCH_DEVICE="cuda",
               PYTHONPATH=os.pathsep.join([str(BENCH), str(BENCH.parent), os.environ.get("PYTHONPATH", "")]))
    run = subprocess.run([sys.executable, "-c", _GPU_CASES], cwd=BENCH, env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    got = json.loads(run.stdout.strip().splitlines()[-1])
    o, i, bf, f32 = 6400, 1600, 2, 4

    def check(case, shapes, flops, nbytes, target, output=None, dtype="torch.bfloat16"):
        c = got[case]
        assert c["shapes"][:len(shapes)] == shapes, case
        assert c["dtypes"][0] == dtype, case
        assert c.get("flops", 0) == pytest.approx(flops, rel=1e-9), case
        assert c["bytes_moved"] == pytest.approx(nbytes, rel=1e-3), case  # offsets, bias and row ids aside
        assert c["target_speedup"] == target, case
        if output is not None:
            assert c["output_bytes"] == output, case

    T, G = 4096, 8
    offsets = got["grouped_outer_sss"]["offsets"][0]
    assert len(offsets) == G + 1 and offsets[0] == 0 and offsets[-1] == T and len(set(offsets)) < G + 1  # ragged
    check("grouped_outer_sss", [[T, o], [T, i]], 2 * T * o * i, T * (o + i) * bf + o * i * f32, 4.0, o * i * f32)
    assert got["grouped_outer_sss"]["extra_info"]["target_peak_over_output"] == 1.5  # and ≤ 1.5× one fp32 output
    edits = got["segmented_fisher"]["offsets"][0]
    E, Tf = len(edits) - 1, edits[-1]
    assert E == 125 and 22 <= Tf / E <= 26
    check("segmented_fisher", [[Tf, o], [Tf, i]], 2 * Tf * o * i + 2 * E * o * i, Tf * (o + i) * bf + o * i * f32,
          10.0, o * i * f32)
    d, r = i + o, 1920
    check("grouped_lowrank", [[T, d], [G + 1], [G, d, r], [G, r, d], [G, d], [G, d], [G, d]], 2 * (2 * T * d * r),
          (T * d + 2 * G * d * r + 3 * G * d) * bf + T * d * f32, 2.0)
    # and its second target: >= 60 % of the TFLOP/s of one dense torch.matmul with the same FLOPs, in the same run
    assert got["timed"] == [[T, d], [d, 2 * r]]  # 2·T·d·2r FLOPs
    info = got["grouped_lowrank"]["extra_info"]
    assert info["pct_of_dense_same_flops"] == pytest.approx(25.0) and info["target_pct_of_dense"] == 60.0
    for n in (10_000_000, 2**26):
        check(f"fisher_mask[{n}]", [[n], [n]], 0, 3 * n * f32, 3.0, n * f32, dtype="torch.float32")
    N, per = 2048, 512
    for ident, fb in (("factors_bf16", bf), ("factors_fp32", f32)):
        case = f"lowrank_delta_linear[{ident}]"
        assert got[case]["offsets"][0] == [g * per for g in range(G + 1)]
        check(case, [[N, i], [o, i], [o], [N], [G * per, i], [G * per, o]], 2 * N * o * i + 2 * N * per * (i + o),
              (N * i + o * i + N * o) * bf + G * per * (i + o) * fb, 3.0)
    assert got[case]["dtypes"][4] == "torch.float32"
    # one MoEditor edit of three such layers, 125 edits each: the editor MLP (2 residual low-rank layers of
    # 2 GEMMs, 2·d·r per token each) on every token, then the fused shift and the Fisher (2·o·i per token each)
    args, kw = got["moeditor_args"]
    assert args == [i, o] and kw["n_editors"] == 8 and kw["rank"] == r and kw["n_modes"] == 3
    c = got["moeditor_edit"]
    assert c["weights"] == [[o, i]] * 3 and c["target_speedup"] == 5.0
    tokens = [f[0][0] for f in c["facts"]]
    assert all(f[:3] == [[t, i], [t, o], [126]] and f[3] == "torch.bfloat16" for f, t in zip(c["facts"], tokens))
    assert c["flops"] == pytest.approx(sum(4 * 2 * t * d * r + 2 * 2 * t * o * i for t in tokens), rel=1e-3)


_STUB_PYTHON = r"""#!/usr/bin/env bash
# run_gpu.sh's python, stubbed: the build, tests and tune answer at once; a benchmark part writes one row
# to its --benchmark-json, except the end-to-end part, killed before it wrote any; the merges are real (with
# torch and triton modules that hold a version only: write_results imports them for the table's header).
case "$1" in
    -c) echo "stub $2" | head -c 60; echo ;;
    setup.py) if [ "${DCEDIT_BUILD_CUDA:-}" = 1 ] && [ -n "${FAIL_CUDA_BUILD:-}" ]; then echo "nvcc failed"; exit 1; fi
              echo "built with DCEDIT_BUILD_CUDA=${DCEDIT_BUILD_CUDA:-unset}" ;;
    benchmarks/write_results.py) PYTHONPATH="$VERSIONS_ONLY" exec "$REAL_PYTHON" "$@" ;;
    -m)
        json=""
        for a in "$@"; do case "$a" in --benchmark-json=*) json=${a#--benchmark-json=} ;; esac; done
        case "$json" in
            "") echo "1 passed" ;;
            *e2e.json) echo "killed"; exit 137 ;;
            *) part=$(basename "$json" .json)
               printf '{"machine_info": {}, "benchmarks": [{"name": "test_%s_case", "extra_info": %s}]}' \
                   "$part" "$ROW" > "$json"; echo "1 passed" ;;
        esac ;;
    *) echo "ok" ;;
esac
"""


def _stubbed_run_env(tmp_path, stub_script: str, row: dict, out, **extra) -> dict:
    """run_gpu.sh's environment with its python replaced by `stub_script` (which prints `row` as its
    benchmark) and stub torch/triton versions."""
    stub = tmp_path / "python"
    stub.write_text(stub_script)
    stub.chmod(0o755)
    (tmp_path / "versions").mkdir()
    for name in ("torch", "triton"):
        (tmp_path / "versions" / f"{name}.py").write_text('__version__ = "stub"\n')
    return dict(os.environ, PYTHON=str(stub), REAL_PYTHON=sys.executable, OUT=str(out), ROW=json.dumps(row),
                VERSIONS_ONLY=str(tmp_path / "versions"), **extra)


@pytest.mark.parametrize("cuda_build", ["builds", "fails"])
def test_run_gpu_sh_with_stubbed_steps(tmp_path, cuda_build):
    """benchmarks/run_gpu.sh on CPU with its python stubbed (the device call's shell logic, not its
    figures): every step gets its line in summary.txt, what comes back is the eight files under $OUT, a
    benchmark part that dies without its JSON costs only its own rows, and $OUT/RESULTS.md is the repo's
    benchmarks/RESULTS.md with this device's section added (the other devices' sections and notes kept),
    so that it can be copied over that file.  A failed CUDA build is followed by the CPU-only one (without
    _C the CPU kernels were lost too), and the rest runs as after a good one."""
    row = _row("x", target_speedup=4.0, target_met=True, fused_vs_eager_rel_err=1e-3)["extra_info"]
    row["device"] = "NVIDIA H200 (stub)"
    out = tmp_path / "out"
    fail = {"FAIL_CUDA_BUILD": "1"} if cuda_build == "fails" else {}
    env = _stubbed_run_env(tmp_path, _STUB_PYTHON, row, out, **fail)
    run = subprocess.run(["bash", str(BENCH / "run_gpu.sh")], cwd=BENCH.parent, env=env, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    summary = (out / "summary.txt").read_text()
    steps = ["build", "tests_triton_1", "tests_triton_2", "tests_triton_3", "tests_triton_4", "tests_triton_5",
             "tests_ops", "tests_kernels", "bench_ops", "bench_e2e", "tune_tables", "bench_ft_kl", "bench_train", "tune"]
    for name in steps:
        assert f"\n{name}: rc=" in summary, (name, summary)
    build = (out / "build.log").read_text()
    assert "nvcc on PATH: " in build
    if cuda_build == "fails":
        assert "\nbuild: rc=1 " in summary and "\nbuild_cpu_only: rc=0 " in summary, summary
        assert "nvcc failed" in build and "built with DCEDIT_BUILD_CUDA=0" in build
    else:
        assert "\nbuild: rc=0 " in summary and "build_cpu_only" not in summary, summary
    assert "bench_e2e: rc=137" in summary and summary.count("results: rc=0") == 3, summary
    # each merge's line says what the table holds (it ended "; " with the table's blank last line)
    assert summary.count(f"; wrote {out / 'RESULTS.md'}: ") == 3, summary
    assert f"; wrote {out / 'RESULTS.md'}: 1 result on NVIDIA H200 (stub); " in summary  # the ops part alone
    assert "; wrote " + str(out / "RESULTS.md") + ": 3 results on NVIDIA H200 (stub); no result for grouped_outer_sss, " in summary
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["summary.txt", "build.log", "tests_triton.log", "tests_ops.log", "tests_kernels.log", "perf.log", "bench.json",
         "RESULTS.md"])
    merged = json.loads((out / "bench.json").read_text())
    assert sorted(b["name"] for b in merged["benchmarks"]) == ["test_ft_kl_case", "test_ops_case", "test_train_case"]
    results, repo = (out / "RESULTS.md").read_text(), (BENCH / "RESULTS.md").read_text()
    assert results.count("## NVIDIA H200 (stub)") == 1 and "| ops_case | 2.00 | 5.00 | 2.50× | ≥4× (met) |" in results
    assert "torch stub, triton stub" in results
    for heading in [line for line in repo.splitlines() if line.startswith("## ")]:
        assert heading in results, heading
    assert results.startswith(repo.split("\n## ")[0])


_SIGINT_PYTHON = r"""#!/usr/bin/env bash
# run_gpu.sh's python, stubbed: the end-to-end benchmark part is a real pytest session ($CASES) whose
# third case hangs; every other step answers at once (the merges are real, as in _STUB_PYTHON).
case "$1" in
    -c) echo "stub" ;;
    benchmarks/write_results.py) PYTHONPATH="$VERSIONS_ONLY" exec "$REAL_PYTHON" "$@" ;;
    -m)
        for a in "$@"; do case "$a" in --benchmark-json=*) json=${a#--benchmark-json=} ;; esac; done
        case "${json:-}" in
            # pytest-benchmark alone: with the installed plugins autoloaded (hypothesis's among them) the
            # part, stopped at 12 s on the loaded 2-core machine, printed its summary 3 s after the SIGINT
            # and was then still garbage-collecting at exit when timeout's 10 s grace ran out (rc=137).
            *e2e.json) PYTEST_DISABLE_PLUGIN_AUTOLOAD=1 exec "$REAL_PYTHON" -m pytest -q --tb=short \
                           -p no:cacheprovider -p pytest_benchmark.plugin -c "$CASES/pytest.ini" \
                           --benchmark-only --benchmark-json="$json" "$CASES/test_part.py" ;;
            *) echo "1 passed" ;;
        esac ;;
    *) echo "ok" ;;
esac
"""

_PART = """
import json, os, time

def test_done(benchmark):
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    benchmark.extra_info.update(json.loads(os.environ["ROW"]))

def test_fails(benchmark):
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    assert 1 == 2

def test_hangs(benchmark):
    time.sleep(600)
"""


def test_run_gpu_sh_stops_a_step_with_sigint_keeping_its_finished_cases(tmp_path):
    """A step past its limit gets SIGINT, as from Ctrl-C: pytest ends its session, names the failures so
    far in the log and lets pytest-benchmark write the cases that finished (SIGTERM killed it: a test shard's
    log held dots and F's without names, a benchmark part's JSON nothing).  Here the end-to-end part (a real
    pytest session) hangs in its third case: its first case's row reaches bench.json and RESULTS.md."""
    cases = tmp_path / "cases"
    cases.mkdir()
    (cases / "pytest.ini").write_text("[pytest]\n")
    (cases / "test_part.py").write_text(_PART)
    # py-cpuinfo's probe (pytest-benchmark's machine info) took over 8 s on this loaded 2-core machine
    (cases / "conftest.py").write_text("def pytest_benchmark_generate_machine_info(config):\n    return {}\n")
    row = _row("x", target_speedup=4.0, target_met=True)["extra_info"]
    row["device"] = "NVIDIA H100 (stub)"
    out = tmp_path / "out"
    # a budget that leaves the end-to-end part 15-20 s and skips the tests (TESTS_LEAVE past it)
    env = _stubbed_run_env(tmp_path, _SIGINT_PYTHON, row, out, CASES=str(cases), BUDGET="50", TESTS_LEAVE="1000")
    run = subprocess.run(["bash", str(BENCH / "run_gpu.sh")], cwd=BENCH.parent, env=env, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    summary = (out / "summary.txt").read_text()
    assert "bench_e2e: rc=124" in summary and "TIMED OUT" in summary, summary
    perf = (out / "perf.log").read_text()
    assert "test_fails" in perf and "assert 1 == 2" in perf, perf[-3000:]
    merged = json.loads((out / "bench.json").read_text())
    assert "test_done" in [b["name"] for b in merged["benchmarks"]]
    assert "| done | 2.00 | 5.00 | 2.50× | ≥4× (met) |" in (out / "RESULTS.md").read_text()
