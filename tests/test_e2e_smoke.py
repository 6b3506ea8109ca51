"""benchmarks/e2e.py on CPU: the --smoke run, its exit codes, and the cost model behind the bounds."""
import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def e2e():
    spec = importlib.util.spec_from_file_location("e2e_bench", ROOT / "benchmarks" / "e2e.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _cells(results):
    return [(r["variant"], kind, key, value) for r in results for kind, cells in r["cells"].items()
            for key, value in cells.items()]


@pytest.mark.parametrize("factors", ["auto", "random"])
def test_smoke_run_measures_every_variant(e2e, tmp_path, factors):
    out = tmp_path / "e2e.md"
    assert e2e.main(["--smoke", "--factors", factors, "--kv-graphs", "--out", str(out)]) == 0
    text = out.read_text()
    assert "random weights, timing only" in text
    results = json.loads((tmp_path / "e2e.json").read_text())["results"]
    assert [r["variant"] for r in results] == [v for v in e2e.VARIANTS if v not in e2e.GPU_ONLY_VARIANTS]
    expected = "calibrated" if factors == "auto" else "random"
    assert [r["factors"] for r in results] == ["dense"] + [expected] * 4
    kinds = {r["variant"]: set(r["cells"]) for r in results}
    assert kinds["kv-rebuild"] == {"decode", "graph"} and kinds["kv"] == {"prefill", "decode", "graph"}
    for variant, kind, key, value in _cells(results):
        assert isinstance(value, float) and value > 0, (variant, kind, key, value)
    # the static-cache step (what the GPU captures in a CUDA graph) decodes the same greedy tokens
    notes = [n for r in results for n in r["notes"] if "static-cache" in n]
    assert len(notes) == 2 * len(results) and all("for 6/6 steps" in n for n in notes)
    # every variant with prefill cells times them again at its end, each against its first timing
    again = {r["variant"]: n for r in results for n in r["notes"] if n.startswith("prefill timed again")}
    assert set(again) == {r["variant"] for r in results if "prefill" in r["cells"]}
    by_variant = {r["variant"]: r for r in results}
    for variant, note in again.items():
        first = by_variant[variant]["cells"]["prefill"]
        assert [f"{key} " in note and f"(first {ms:.2f})" in note for key, ms in first.items()] == [True] * len(first)
        again_ms = by_variant[variant]["again"]["prefill"]
        assert set(again_ms) == set(first) and all(isinstance(ms, float) and ms > 0 for ms in again_ms.values())


def test_a_compile_variant_times_the_compiled_model(e2e, tmp_path):
    """The opt-in *-compile variants wrap the compressed model in torch.compile (aot_eager under
    --smoke: the plumbing, not inductor's speed); tests/test_compile.py checks the compiled logits."""
    out = tmp_path / "e2e.md"
    assert e2e.main(["--smoke", "--factors", "random", "--no-graphs", "--variants", "weights-compile",
                     "--out", str(out)]) == 0
    (record,) = json.loads((tmp_path / "e2e.json").read_text())["results"]
    assert "torch.compile(backend='aot_eager')" in record["notes"]
    assert set(record["cells"]) == {"prefill", "decode"}
    assert all(isinstance(v, float) and v > 0 for cells in record["cells"].values() for v in cells.values())


def test_kv_graphs_are_not_applicable_by_default(e2e, tmp_path):
    out = tmp_path / "e2e.md"
    assert e2e.main(["--smoke", "--factors", "random", "--variants", "kv", "--out", str(out)]) == 0
    assert "n/a (dynamic cache)" in out.read_text()


def test_without_cuda_exits_2(e2e, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert e2e.main(["--shapes", "opt-1.3b"]) == 2
    assert "no CUDA device" in capsys.readouterr().err


def test_weight_count_matches_the_model(e2e):
    from transformers import OPTForCausalLM

    for name, shape in [("tiny", e2e.SMOKE_SHAPE["tiny"]), ("opt-6.7b", e2e.SHAPES["opt-6.7b"])]:
        cfg = e2e.opt_config(shape, smoke=name == "tiny")
        with torch.device("meta"):
            model = OPTForCausalLM(cfg)
        params = sum(p.numel() for n, p in model.named_parameters() if "embed_positions" not in n)
        assert e2e.cost_model(cfg, None)["weights_dense"] == params


@pytest.mark.parametrize("mode", ["kv", "weights"])
def test_bounds_follow_the_compressed_shapes(e2e, mode):
    cfg = e2e.opt_config(e2e.SMOKE_SHAPE["tiny"], smoke=True)
    model = e2e.build_model(cfg, torch.float32, "cpu", seed=0)
    e2e.random_factors(model, mode, 0.5, align=1)  # 1: the tiny widths' ranks near 0.5 of the cache
    dense, cost = e2e.cost_model(cfg, None), e2e.cost_model(cfg, model.tmps_info)
    # compressed weights = every parameter and buffer the model reads (learned positions aside)
    held = sum(t.numel() for n, t in list(model.named_parameters()) + list(model.named_buffers())
               if "embed_positions" not in n)
    assert cost["weights"] == held
    assert e2e.prefill_flops(dense, 2, 16, True) == e2e.prefill_flops(dense, 2, 16, False)
    if mode == "kv":
        assert math.isclose(cost["kv_kept"], 0.5, abs_tol=0.02)
        # latents halve the cache: the decode bound grows with the batch (more of each step is cache)
        bounds = [e2e.decode_bytes(dense, b, 1024, True) / e2e.decode_bytes(cost, b, 1024, False) for b in (1, 64)]
        assert 1 < bounds[0] < bounds[1] < 2
    else:
        assert cost["kv_kept"] == 1.0
        assert e2e.prefill_flops(cost, 2, 16, False) < e2e.prefill_flops(dense, 2, 16, True)


def test_random_factors_align_their_ranks_like_compress(e2e):
    cfg = e2e.opt_config(e2e.SMOKE_SHAPE["tiny"], smoke=True)
    for align in (8, 1):
        for mode in ("kv", "weights"):
            model = e2e.build_model(cfg, torch.float32, "cpu", seed=0)
            e2e.random_factors(model, mode, 0.5, align=align)
            ranks = [r for layer in model.tmps_info["layers"] for v in layer["ranks"].values()
                     for r in (v if isinstance(v, list) else [v])]
            if align == 8:
                assert ranks and all(r % 8 == 0 for r in ranks), (mode, ranks)
            elif mode == "kv":  # the raw uniform ranks: 0.35 / 0.65 of half of 2 x 64
                assert ranks == [22, 42] * cfg.num_hidden_layers


def test_a_run_stopped_by_sigterm_keeps_the_cells_it_finished(tmp_path):
    """gpu_check runs e2e under timeout(1), whose SIGTERM would kill Python before any last write: the
    tables are saved after every cell, and SIGTERM becomes an exit that writes them once more."""
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "e2e.md"
    proc = subprocess.Popen([sys.executable, str(ROOT / "benchmarks" / "e2e.py"), "--smoke", "--factors", "random",
                             "--no-graphs", "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    json_path, deadline = tmp_path / "e2e.json", time.time() + 240
    try:
        while time.time() < deadline and proc.poll() is None:  # until a cell of a compressed variant is saved
            if json_path.exists():
                results = json.loads(json_path.read_text())["results"]
                if len(results) >= 2 and results[1]["cells"]:
                    break
            time.sleep(0.05)
        assert proc.poll() is None, "the smoke run ended before it could be stopped:\n" + proc.stdout.read()
        proc.send_signal(signal.SIGTERM)
        output = proc.communicate(timeout=60)[0]
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, output
    results = json.loads(json_path.read_text())["results"]
    assert results[0]["variant"] == "dense" and set(results[0]["cells"]) == {"prefill", "decode"}
    assert all(isinstance(v, float) for v in results[0]["cells"]["prefill"].values())
    assert results[1]["cells"] and "| dense |" in out.read_text()


def test_the_budget_counts_from_the_process_start(e2e, tmp_path):
    """--budget-s is what the timeout around the run allows: imports count, so a budget they already
    used up measures nothing (and says so)."""
    out = tmp_path / "e2e.md"
    e2e._PROCESS_T0 -= 3600  # as if an hour had gone to imports
    try:
        assert e2e.main(["--smoke", "--factors", "random", "--budget-s", "60", "--out", str(out)]) == 0
    finally:
        e2e._PROCESS_T0 += 3600
    results = json.loads((tmp_path / "e2e.json").read_text())["results"]
    assert results and all(r["factors"] == "skipped: time budget" for r in results)


def test_the_graph_path_times_replays_after_an_untimed_one_and_keeps_the_eager_tokens(e2e, monkeypatch):
    """decode_static's CUDA-graph bookkeeping on the CPU: a stand-in 'graph' whose replay runs the
    step. The warm-up, the untimed first replay and the timed ones must decode the tokens the eager
    static step does, and a failed capture earlier in the process stops further captures."""
    from tmps.kernels import _common

    class Replays:  # what capture_graph returns: its replay runs the captured step
        def __init__(self, step):
            self.replay, self.count = self._counted(step), 0

        def _counted(self, step):
            def replay():
                self.count += 1
                step()
            return replay

    graphs = []

    def capture_graph(step, reps):  # as the real one: one eager warm-up call, then the recorded graph
        step()
        graphs.append(Replays(step))
        return graphs[-1]

    monkeypatch.setattr(_common, "capture_graph", capture_graph)
    cfg = e2e.opt_config(e2e.SMOKE_SHAPE["tiny"], True)
    model = e2e.build_model(cfg, torch.float32, "cpu", 0)
    _, eager_tokens = e2e.decode_static(model, 2, 16, 4, "cpu", 0, graph=False)
    _, graph_tokens = e2e.decode_static(model, 2, 16, 4, "cpu", 0, graph=True)
    assert graphs[0].count == 1 + 4  # the untimed replay, then the timed ones
    assert torch.equal(graph_tokens, eager_tokens) and graph_tokens.shape == (2, e2e.WARM_STEPS + 4)
    monkeypatch.setattr(_common, "_graph_timing_off", "RuntimeError: capture failed")
    with pytest.raises(RuntimeError, match="capture failed earlier"):
        e2e.decode_static(model, 2, 16, 4, "cpu", 0, graph=True)
    assert len(graphs) == 1


@pytest.mark.parametrize("variant", ["dense", "kv", "weights"])
def test_the_captured_decode_step_never_waits_for_the_device(e2e, variant):
    """What e2e.py captures in a CUDA graph must not read a tensor's value on the host (.item(),
    ``if tensor``, nonzero, ...): a capture fails on such a sync. Checked on the CPU, torch path,
    by the ops the step dispatches; the first probe proves the check sees a sync."""
    from torch.utils._python_dispatch import TorchDispatchMode

    syncing = {"_local_scalar_dense", "is_nonzero", "nonzero", "equal", "allclose", "masked_select", "unique"}

    class HostReads(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket.__name__ in syncing:
                self.seen.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    with HostReads() as probe:
        bool(torch.ones(()) > 0)
    assert probe.seen, "the check must see a host read"
    cfg = e2e.opt_config(e2e.SMOKE_SHAPE["tiny"], True)
    model = e2e.build_model(cfg, torch.float32, "cpu", 0)
    if variant != "dense":
        e2e.random_factors(model, variant, e2e.RATIO)
    step, _, _ = e2e.static_decoder(model, 2, 16, 4, "cpu", 0)
    step()  # the warm-up's first step (may fill lazily built state)
    with HostReads() as reads:
        step()
    assert reads.seen == [], f"the {variant} decode step reads tensor values on the host: {reads.seen}"


def test_the_forced_kernel_variants_decode_like_dense_under_the_interpreter(tmp_path):
    """kv-triton and weights-triton (the kernels forced: on a GPU, the CUDA-graph cells' path) run
    under Triton's interpreter through the same steps, the static-cache one with its expanded additive
    mask included; --smoke fails a cell whose static decode's greedy tokens leave the eager ones."""
    import os
    import subprocess
    import sys

    pytest.importorskip("triton")
    out = tmp_path / "e2e.md"
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "e2e.py"), "--smoke", "--factors", "random",
                          "--kv-graphs", "--variants", "kv-triton", "weights-triton", "--out", str(out)],
                         capture_output=True, text=True, timeout=600, env={**os.environ, "TRITON_INTERPRET": "1"})
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    results = json.loads((tmp_path / "e2e.json").read_text())["results"]
    assert [r["variant"] for r in results] == ["kv-triton", "weights-triton"]
    for variant, kind, key, value in _cells(results):
        assert isinstance(value, float) and value > 0, (variant, kind, key, value)
    notes = [n for r in results for n in r["notes"] if "static-cache" in n]
    assert len(notes) == 4 and all("for 6/6 steps" in n for n in notes)
