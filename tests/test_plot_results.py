"""benchmarks/plot_results.py: the speed-ups it plots, from kernel_microbench's and e2e's JSON."""
import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))  # the script imports targets from its folder
try:
    _spec = importlib.util.spec_from_file_location("plot_results_bench", BENCHMARKS / "plot_results.py")
    plot_results = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(plot_results)
finally:
    sys.path.remove(str(BENCHMARKS))

KERNELS = {"meta": {"device": "GPU", "dtype": "float16"}, "rows": [
    {"hidden": 2048, "layout": "out_factor", "ratio": 0.25, "tokens": 16,
     "ms": {"torch_dense": 0.04, "torch_factored": 0.06, "torch_compile": None, "triton": 0.05},
     "ms_graph": {"torch_dense": 0.03, "torch_factored": 0.04, "triton": 0.02}},
    {"hidden": 2048, "layout": "out_factor", "ratio": 0.25, "tokens": 1,  # no graph timing: eager for auto
     "ms": {"torch_dense": 0.04, "torch_factored": 0.08, "triton": 0.02}},
    {"hidden": 768, "layout": "kv_model", "ratio": 0.5, "tokens": 4096,
     "ms": {"torch_dense": 0.3, "triton": None}},  # ours failed: no point
]}
E2E = {"env": {"device": "GPU", "dtype": "float16"}, "results": [
    {"shape": "opt-1.3b", "variant": "dense", "cells": {"prefill": {"1x2048": 10.0}, "decode": {"1": 100.0}}},
    {"shape": "opt-1.3b", "variant": "kv", "cells": {"prefill": {"1x2048": 8.0}, "decode": {"1": 120.0}},
     "bounds": {"decode": {"1": 1.2}}},
    {"shape": "opt-1.3b", "variant": "kv-rebuild", "cells": {"decode": {"1": 50.0}}},  # a diagnostic
]}


def test_kernel_speedups_per_panel_and_baseline():
    series = plot_results.kernel_series(KERNELS)
    assert set(series) == {("out_factor", 2048)}
    panel = series[("out_factor", 2048)]
    assert panel[("torch_dense", 0.25)] == [(1, pytest.approx(2.0)), (16, pytest.approx(1.5))]
    assert panel[("torch_factored", 0.25)] == [(1, pytest.approx(4.0)), (16, pytest.approx(2.0))]
    assert ("torch_compile", 0.25) not in panel  # not timed


def test_kernel_timing_choice():
    eager = plot_results.kernel_series(KERNELS, "eager")[("out_factor", 2048)]
    assert eager[("torch_dense", 0.25)] == [(1, pytest.approx(2.0)), (16, pytest.approx(0.8))]
    graph = plot_results.kernel_series(KERNELS, "graph")[("out_factor", 2048)]
    assert graph[("torch_dense", 0.25)] == [(16, pytest.approx(1.5))]


def test_e2e_speedups_against_dense():
    bars = plot_results.e2e_bars(E2E)
    assert list(bars) == [("opt-1.3b", "kv")]
    assert bars[("opt-1.3b", "kv")] == [("prefill 1x2048", pytest.approx(1.25), None),
                                        ("decode b=1", pytest.approx(1.2), 1.2)]


def test_writes_both_pictures(tmp_path):
    pytest.importorskip("matplotlib")
    (tmp_path / "kernels.json").write_text(json.dumps(KERNELS))
    (tmp_path / "e2e.json").write_text(json.dumps(E2E))
    rc = plot_results.main(["--kernels", str(tmp_path / "kernels.json"), "--e2e", str(tmp_path / "e2e.json"),
                            "--out-dir", str(tmp_path / "out")])
    assert rc == 0
    for name in ("kernels.png", "e2e.png"):
        assert (tmp_path / "out" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_refuses_nothing_to_plot(tmp_path, capsys):
    assert plot_results.main([]) == 2
    (tmp_path / "kernels.json").write_text(json.dumps({"rows": []}))
    assert plot_results.main(["--kernels", str(tmp_path / "kernels.json")]) == 2
    assert "holds no timed kernel rows" in capsys.readouterr().err
