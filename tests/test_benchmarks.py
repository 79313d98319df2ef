"""The benchmark suite's own arithmetic (benchmarks/measure.py, report.py, write_results.py): what
the GPU table is judged on, checked here on CPU without timing anything real."""

import json
import math
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


def test_write_results_replaces_its_device_section(tmp_path):
    data = {"machine_info": {}, "benchmarks": [_row("test_a", target_speedup=4.0, target_met=False,
                                                     fused_vs_eager_rel_err=3.2e-7),
                                                _row("test_b", fused_vs_eager_rel_err=float("nan"))]}
    (tmp_path / "b.json").write_text(json.dumps(data))
    out = tmp_path / "RESULTS.md"
    out.write_text("# Benchmark results\n\nintro\n\n## CPU (x86_64, 2 threads), idle machine\n\nold table\n\n"
                   "## NVIDIA H200\n\nkept\n")
    subprocess.run([sys.executable, str(BENCH / "write_results.py"), str(tmp_path / "b.json"), "--out", str(out)],
                   check=True, capture_output=True)
    text = out.read_text()
    assert text.count("## CPU (x86_64, 2 threads)") == 1 and "old table" not in text
    assert "## NVIDIA H200\n\nkept" in text and text.startswith("# Benchmark results\n\nintro")
    assert ("| a | 2.00 | 5.00 | 2.50× | ≥4× (GPU target, not judged on CPU) | 1.2 | 7.5 | 40.0 | 3.0 | 0.123 "
            "| 3.2e-07 |") in text
    assert "| b | 2.00 | 5.00 | 2.50× |  | 1.2 | 7.5 | 40.0 | 3.0 | 0.123 | n/a |" in text
