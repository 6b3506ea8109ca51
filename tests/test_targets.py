"""benchmarks/targets.py: issue #4's targets checked against synthetic benchmark JSON."""
import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def targets():
    spec = importlib.util.spec_from_file_location("targets_bench", ROOT / "benchmarks" / "targets.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def kernel_row(hidden, ratio, tokens, triton, factored, dense, compiled=None, roof=70.0):
    ms = {"torch_dense": dense, "torch_factored": factored, "triton": triton}
    if compiled is not None:
        ms["torch_compile"] = compiled
    return dict(hidden=hidden, layout="weights_model", ratio=ratio, r=int(ratio * hidden), tokens=tokens, ms=ms,
                triton_tflops=None, triton_gbps=None, roofline_pct=roof, config="c")


def by_name(targets_list):
    return {t.name: t for t in targets_list}


def test_kernel_targets_take_the_worst_case(targets):
    rows = [kernel_row(4096, 0.25, 1, triton=1.0, factored=2.0, dense=3.0, compiled=1.5),
            kernel_row(4096, 0.25, 16, triton=1.0, factored=1.4, dense=2.5, compiled=1.3),  # 1.4x: misses 1.5x
            kernel_row(4096, 0.25, 4096, triton=1.0, factored=1.2, dense=1.6, compiled=1.05),
            kernel_row(768, 0.25, 1, triton=1.0, factored=2.0, dense=1.1, roof=55.0)]  # hidden < 2048: no dense target
    got = by_name(targets.kernel_targets({"rows": rows}))
    chain = got["kernel vs unfused chain, decode"]
    assert len(chain.cases) == 3 and chain.worst == ("hidden 4096 weights_model ratio 0.25 tokens 16", pytest.approx(1.4))
    assert chain.met is False
    assert got["kernel vs torch.compile, decode"].met is True  # 1.5 and 1.3 (the 768 row has no compile)
    assert got["kernel vs unfused chain, prefill"].met is True and got["kernel vs torch.compile, prefill"].met is True
    dense_decode = got["kernel vs dense cuBLAS QKV, ratio 0.25, hidden >= 2048, decode"]
    assert [v for _, v in dense_decode.cases] == [pytest.approx(3.0), pytest.approx(2.5)] and dense_decode.met
    assert got["kernel vs dense cuBLAS QKV, ratio 0.25, hidden >= 2048, prefill"].met is True  # 1.6x
    assert got["kernel, % of roofline"].met is False  # 55 %


def e2e_record(variant, prefill_ms, decode_tps, prefill_bound=1.3, decode_bound=1.2):
    return dict(shape="opt-1.3b", variant=variant, cells={"prefill": {"1x2048": prefill_ms},
                                                          "decode": {"16": decode_tps}, "graph": {"16": "n/a"}},
                bounds={"prefill": {"1x2048": prefill_bound}, "decode": {"16": decode_bound}})


def test_e2e_targets_cover_the_product_variants_only(targets):
    results = [e2e_record("dense", 10.0, 100.0), e2e_record("kv", 8.0, 115.0),
               e2e_record("weights", 9.0, 99.0), e2e_record("kv-rebuild", 20.0, 10.0)]
    got = by_name(targets.e2e_targets({"results": results}))
    speed = got["end to end: compressed vs dense"]
    assert len(speed.cases) == 4  # kv and weights, prefill and decode; the "n/a" graph cells and kv-rebuild left out
    assert speed.worst == ("opt-1.3b weights decode 16", pytest.approx(0.99)) and speed.met is False
    bound = got["end to end: % of the bound"]
    # % of bound: kv 1.25/1.3, 1.15/1.2; weights (10/9)/1.3 = 85 %, 0.99/1.2 = 82.5 %: the worst
    assert bound.worst == ("opt-1.3b weights decode 16", pytest.approx(100 * 0.99 / 1.2)) and bound.met is True


def test_unmeasured_targets_say_so_and_exit_codes(targets, tmp_path, capsys):
    assert targets.main(["--kernels", str(tmp_path / "none.json"), "--e2e", str(tmp_path / "none2.json")]) == 2
    path = tmp_path / "kernels.json"
    path.write_text(json.dumps({"meta": {"device": "test"}, "rows": [
        kernel_row(4096, 0.5, 1, triton=1.0, factored=2.0, dense=2.0, compiled=1.5)]}))
    out = tmp_path / "targets.md"
    assert targets.main(["--kernels", str(path), "--e2e", str(tmp_path / "missing.json"), "--out", str(out)]) == 0
    text = out.read_text()
    assert "| kernel vs unfused chain, prefill | >= 1.1x | 0 | not measured | | n/a |" in text
    assert "end to end" not in text
    path.write_text(json.dumps({"rows": [kernel_row(4096, 0.5, 1, triton=1.0, factored=1.0, dense=2.0)]}))
    assert targets.main(["--kernels", str(path), "--e2e", str(tmp_path / "missing.json")]) == 3  # missed
    assert "**no**" in capsys.readouterr().out


def test_cuda_graph_timings_get_their_own_targets(targets):
    eager = kernel_row(4096, 0.25, 1, triton=0.5, factored=0.3, dense=0.04)  # host-bound: the kernel loses
    graphed = dict(eager, ms_graph={"torch_dense": 0.037, "torch_factored": 0.030, "triton": 0.015},
                   roofline_pct_graph=65.0)
    got = by_name(targets.kernel_targets({"rows": [graphed]}))
    assert got["kernel vs unfused chain, decode"].met is False  # do_bench: 0.6x
    device = got["kernel vs unfused chain, decode (CUDA graph)"]
    assert device.worst[1] == pytest.approx(2.0) and device.met is True
    assert got["kernel vs dense cuBLAS QKV, ratio 0.25, hidden >= 2048, decode (CUDA graph)"].worst[1] == \
        pytest.approx(0.037 / 0.015)
    assert got["kernel, % of roofline (CUDA graph)"].met is True
    # rows without graph timings add no graph targets
    assert not any("CUDA graph" in name for name in by_name(targets.kernel_targets({"rows": [eager]})))


def test_plain_gemm_rows_stay_out_of_the_kernel_targets(targets):
    fused = kernel_row(4096, 0.25, 1, triton=1.0, factored=2.0, dense=3.0)
    plain = dict(kernel_row(4096, 0.25, 1, triton=1.0, factored=1.1, dense=1.2), layout="kv_model")
    got = by_name(targets.kernel_targets({"rows": [fused, plain]}))
    chain = got["kernel vs unfused chain, decode"]
    assert chain.cases == [("hidden 4096 weights_model ratio 0.25 tokens 1", 2.0)] and chain.met


def test_prefill_timings_that_moved_when_timed_again_are_listed(targets, tmp_path):
    # run 2's case: weights at 1x2048 took 18.69 ms, the same path timed later 11.80
    moved = dict(e2e_record("weights", 18.69, 100.0), again={"prefill": {"1x2048": 11.80}})
    steady = dict(e2e_record("kv", 8.0, 115.0), again={"prefill": {"1x2048": 8.0 * 1.14}})
    untimed = dict(e2e_record("weights-torch", 11.8, 100.0), again={"prefill": {"1x2048": "skipped: time budget"}})
    data = {"results": [e2e_record("dense", 10.0, 100.0), moved, steady, untimed]}
    assert list(targets.unsteady_prefill(data)) == [("opt-1.3b", "weights", "1x2048", 18.69, 11.80)]
    path, out = tmp_path / "e2e.json", tmp_path / "targets.md"
    path.write_text(json.dumps(data))
    targets.main(["--kernels", str(tmp_path / "none.json"), "--e2e", str(path), "--out", str(out)])
    text = out.read_text()
    assert "- opt-1.3b weights 1x2048: 18.69 ms first, 11.80 ms again" in text and "opt-1.3b kv 1x2048" not in text
    # without second timings (runs before e2e.py took them) nothing is listed
    path.write_text(json.dumps({"results": [e2e_record("dense", 10.0, 100.0), e2e_record("weights", 18.69, 100.0)]}))
    targets.main(["--kernels", str(tmp_path / "none.json"), "--e2e", str(path), "--out", str(out)])
    assert "timed again" not in out.read_text()
