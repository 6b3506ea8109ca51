"""benchmarks/kernel_microbench.py on CPU: the --smoke run, merging a later run into an earlier one."""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(ROOT / "benchmarks"))  # the script imports _bench_common from its folder
    try:
        spec = importlib.util.spec_from_file_location("kernel_microbench", ROOT / "benchmarks" / "kernel_microbench.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    return module


def test_smoke_run_writes_its_table_and_json(tmp_path):
    pytest.importorskip("triton")
    out = tmp_path / "kernels.md"
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "kernel_microbench.py"), "--smoke", "--out", str(out)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "triton matches the reference in all 3 layouts" in out.read_text()
    rows = json.loads((tmp_path / "kernels.json").read_text())["rows"]
    assert [r["layout"] for r in rows] == ["out_factor", "weights_model", "kv_model"]
    assert all(set(r["ms"]) == {"torch_dense", "torch_factored", "triton"} for r in rows)
    assert rows[2]["config"].endswith("z-pass")  # no in factor: the kernel reads x as z


def row(tokens, ms, ms_graph=None, layout="weights_model"):
    out = dict(hidden=4096, layout=layout, ratio=0.25, r=1024, tokens=tokens, ms=ms)
    if ms_graph is not None:
        out["ms_graph"] = ms_graph
    return out


def test_merge_adds_the_later_runs_timings_to_the_same_cases(bench):
    old = {"meta": {"device": "gpu", "mismatches": []},
           "rows": [row(1, {"triton": 0.02, "torch_factored": 0.04}, {"triton": 0.01}), row(4096, {"triton": 0.3})]}
    new = {"meta": {"providers": ["torch_compile"], "mismatches": []},
           "rows": [row(1, {"torch_compile": 0.03, "triton": None}, {"torch_compile": 0.025}),
                    row(16, {"torch_compile": 0.05})]}
    merged = bench.merge_runs(old, new)
    by_tokens = {r["tokens"]: r for r in merged["rows"]}
    assert by_tokens[1]["ms"] == {"triton": 0.02, "torch_factored": 0.04, "torch_compile": 0.03}  # None kept out
    assert by_tokens[1]["ms_graph"] == {"triton": 0.01, "torch_compile": 0.025}
    assert by_tokens[4096]["ms"] == {"triton": 0.3}
    assert by_tokens[16]["ms"] == {"torch_compile": 0.05}  # a case only the later run measured is appended
    assert merged["meta"]["device"] == "gpu" and merged["meta"]["merged_providers"] == [["torch_compile"]]


def test_merge_needs_out(bench, capsys):
    with pytest.raises(SystemExit) as exit_:
        bench.parse_args(["--merge"])
    assert exit_.value.code == 2 and "--merge needs --out" in capsys.readouterr().err


def test_saves_during_a_merged_run_each_fold_into_the_earlier_run_once(bench, tmp_path):
    """The run saves after every row (a run cut short keeps its rows); with --merge each save starts
    from the earlier run as it was, so no row or table is added twice."""
    out = tmp_path / "kernels.md"
    out.write_text("# earlier run\n| earlier row |\n")
    (tmp_path / "kernels.json").write_text(json.dumps({"meta": {"mismatches": []},
                                                       "rows": [row(1, {"triton": 0.02})]}))
    save = bench.writer(bench.parse_args(["--out", str(out), "--merge", "--providers", "torch_compile"]))
    for n in (1, 2):  # a progress save after the first row, then the final one after the second
        rows = [row(1, {"torch_compile": 0.03}), row(4096, {"torch_compile": 0.5})][:n]
        save(["# this run", f"| {n} row(s) |"], {"meta": {"providers": ["torch_compile"], "mismatches": []},
                                                 "rows": rows})
    data = json.loads((tmp_path / "kernels.json").read_text())
    assert [r["tokens"] for r in data["rows"]] == [1, 4096]
    assert data["rows"][0]["ms"] == {"triton": 0.02, "torch_compile": 0.03}
    assert data["meta"]["merged_providers"] == [["torch_compile"]]
    text = out.read_text()
    assert text.count("earlier row") == 1 and "| 2 row(s) |" in text and "| 1 row(s) |" not in text


@pytest.mark.parametrize("layout", ["out_factor", "weights_model", "kv_model"])
@pytest.mark.parametrize("hidden, tokens, ratio", [(4096, 16, 0.25), (2048, 4096, 0.5), (768, 7, 0.125)])
def test_work_counts_the_flops_of_the_torch_chain(bench, monkeypatch, layout, hidden, tokens, ratio):
    """The roofline's flops (``work``) are the unfused chain's: counted by FlopCounterMode on the
    meta device, at the table's own sizes, for free."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from tmps.kernels import fused_projection as fp

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))  # kv_model's ranks come from e2e.py
    case = bench.make_case(hidden, tokens, ratio, layout, torch.float16, "meta", torch)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        fp.fused_factored_projection_ref(case["x"], case["in_factor"], case["cores"], case["out_factors"],
                                         case["biases"])
    assert counter.get_total_flops() == bench.work(case, 2)[0] > 0
