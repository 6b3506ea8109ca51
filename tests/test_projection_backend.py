"""FactoredProjection's backend switch: "auto" takes whichever of the kernel and the torch chain is faster."""
import pytest
import torch

import tmps.kernels_bridge as bridge
from tmps.projection import FactoredProjection, factored_projection_torch


@pytest.fixture(autouse=True)
def _fresh_choices(monkeypatch):
    monkeypatch.setattr(bridge, "_FASTER", {})


def projection(d_in=12, r=5):
    cores = [torch.randn(3, 4, r), torch.randn(1, 6, r)]
    return FactoredProjection(torch.randn(d_in, r), cores, [torch.randn(8, 4), None], [torch.randn(24), None])


def labelled(fn, path):
    fn.path = path
    return fn


def fake_bench(times, log):
    """A bench(fn) -> ms that logs which path it timed and returns ``times[path]``."""
    return lambda fn: log.append(fn.path) or times[fn.path]


@pytest.mark.parametrize("eager,graphed", [("triton", "triton"), ("torch", "triton"), ("torch", "torch")])
def test_faster_path_times_once_and_caches(monkeypatch, eager, graphed):
    timed, device_timed, ran = [], [], []
    eager_ms = {"triton": 1.0, "torch": 2.0} if eager == "triton" else {"triton": 3.0, "torch": 2.0}
    device_ms = {"triton": 0.02, "torch": 0.04} if graphed == "triton" else {"triton": 0.05, "torch": 0.04}
    run_kernel = labelled(lambda: ran.append("triton"), "triton")
    run_torch = labelled(lambda: ran.append("torch"), "torch")
    bench, device_bench = fake_bench(eager_ms, timed), fake_bench(device_ms, device_timed)
    assert bridge.faster_path("key", run_kernel, run_torch, bench, device_bench) == eager
    assert timed == device_timed == ["triton", "torch"] and ran == ["triton", "torch"]  # warmed up once
    assert bridge._FASTER["key"] == bridge.PathChoice(eager, graphed)
    assert bridge.faster_path("key", run_kernel, run_torch, bench, device_bench) == eager
    assert len(timed) == len(device_timed) == 2, "a cached choice must not be timed again"
    # inside a CUDA-graph capture the device-time choice serves
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert bridge.faster_path("key", run_kernel, run_torch, bench, device_bench) == graphed


def test_graphed_choices_give_eager_calls_the_device_time_winner():
    """profile_step runs the static step eagerly under the profiler: it must run the kernels a CUDA
    graph of that step would, not the eager winners (on the H200 the two differed at decode sizes)."""
    run_kernel, run_torch = labelled(lambda: None, "triton"), labelled(lambda: None, "torch")
    eager, device = fake_bench({"triton": 3.0, "torch": 2.0}, []), fake_bench({"triton": 0.02, "torch": 0.04}, [])
    with bridge.graphed_choices():
        assert bridge.faster_path("new key", run_kernel, run_torch, eager, device) == "triton"  # timed here
        assert bridge.faster_path("new key", run_kernel, run_torch, eager, device) == "triton"  # cached
    assert bridge.faster_path("new key", run_kernel, run_torch, eager, device) == "torch"
    assert not bridge._graphed_everywhere


def test_device_timing_failure_falls_back_to_the_eager_choice():
    def no_graphs(fn):
        raise RuntimeError("CUDA graphs are not supported here")

    run_kernel, run_torch = labelled(lambda: None, "triton"), labelled(lambda: None, "torch")
    assert bridge.faster_path("key", run_kernel, run_torch, fake_bench({"triton": 3.0, "torch": 2.0}, []),
                              no_graphs) == "torch"
    assert bridge._FASTER["key"] == bridge.PathChoice("torch", "torch")


def test_default_device_timing_flushes_l2(monkeypatch):
    """Both paths are timed in device time with L2 flushed, as do_bench and the kernels' decode tuners
    flush it: a model step reads each layer's factors from HBM, not from a cache warmed by the timing."""
    from tmps.kernels._common import L2_FLUSH_BYTES

    flushes = []
    monkeypatch.setattr(bridge, "device_ms", lambda fn, **kwargs: flushes.append(kwargs.get("flush_bytes")) or 1.0)
    bridge.faster_path("key", lambda: None, lambda: None, lambda fn: 1.0)
    assert flushes == [L2_FLUSH_BYTES] * 2 and L2_FLUSH_BYTES >= 256 << 20


def test_no_timing_during_graph_capture(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    timed = []
    choice = bridge.faster_path("key", lambda: None, lambda: None, lambda fn: timed.append(1) or 1.0,
                                lambda fn: timed.append(1) or 1.0)
    assert choice == "triton" and timed == [] and "key" not in bridge._FASTER


@pytest.mark.parametrize("kernel_ms,torch_ms,kernel_runs", [(1.0, 2.0, True), (3.0, 2.0, False)])
@torch.no_grad()  # inference: trainable factors keep the kernels out of calls that record gradients
def test_auto_backend_follows_the_faster_path(monkeypatch, kernel_ms, torch_ms, kernel_runs):
    """On a (pretended) GPU, "auto" runs the kernel only where it timed faster; outputs are the chain's."""
    module = projection()
    calls = []

    def fake_kernel(launcher, x):
        calls.append(x.shape[:-1])
        return factored_projection_torch(x, launcher.in_factor, list(zip(launcher.cores, launcher.out_factors,
                                                                         launcher.biases)))

    monkeypatch.setattr(bridge, "kernel_preferred_on", lambda device: True)
    monkeypatch.setattr(bridge, "run_fused_projection", fake_kernel)
    timings = {}

    def bench(fn):
        before = len(calls)
        fn()
        which = "triton" if len(calls) > before else "torch"
        timings[which] = timings.get(which, 0) + 1
        return kernel_ms if which == "triton" else torch_ms

    monkeypatch.setattr(bridge, "_median_ms", bench)
    monkeypatch.setattr(bridge, "device_ms", lambda fn, **kw: 1.0)  # not capturing here: the eager timing decides
    x = torch.randn(2, 7, 12)
    for _ in range(3):
        calls.clear()
        ys = module(x)
        for y, ref in zip(ys, factored_projection_torch(x, module.in_factor, module.groups)):
            torch.testing.assert_close(y, ref)
    assert timings == {"triton": 1, "torch": 1}  # timed on the first call only
    assert bool(calls) == kernel_runs
    # Another row count is timed anew: 2 x 7 and 14 x 1 rows share one, decode sizes are timed per
    # row count (batch 16 against batch 1), prefill sizes per token bucket
    module(torch.randn(14, 12))
    assert timings == {"triton": 1, "torch": 1}
    module(torch.randn(1, 12))
    assert timings == {"triton": 2, "torch": 2}
    module(torch.randn(300, 12))
    module(torch.randn(290, 12))
    assert timings == {"triton": 3, "torch": 3}


def test_forced_backends_are_not_timed(monkeypatch):
    module = projection()
    monkeypatch.setattr(bridge, "kernel_preferred_on", lambda device: True)
    monkeypatch.setattr(bridge, "_median_ms", lambda fn: pytest.fail("a forced backend was timed"))
    monkeypatch.setattr(bridge, "device_ms", lambda fn, **kw: pytest.fail("a forced backend was timed"))
    module.backend = "torch"
    module(torch.randn(3, 12))
    assert bridge._FASTER == {}


@torch.no_grad()  # inference: trainable factors keep the kernels out of calls that record gradients
def test_auto_considers_the_kernel_for_kv_layouts_but_not_whole_projection_out_factors(monkeypatch):
    """kv mode's projection (no in factor) is timed at decode sizes; the svd baseline's (d_p, r) out
    factors are larger than the kernel's per-head tiles, so "auto" keeps the chain without timing."""
    monkeypatch.setattr(bridge, "kernel_preferred_on", lambda device: True)
    asked = []
    monkeypatch.setattr(bridge, "faster_path", lambda key, *a, **k: asked.append(key) or "torch")
    kv = FactoredProjection(None, [torch.randn(3, 4, 12), torch.randn(1, 5, 12)], [None, None], [None, None])
    svd = FactoredProjection(None, [torch.randn(1, 6, 12)], [torch.randn(300, 6)], [None])
    assert kv.kernel_fits() and not svd.kernel_fits()
    x = torch.randn(2, 12)
    kv(x)
    assert len(asked) == 1 and asked[0][3] is None  # keyed without an in factor shape
    svd(x)
    assert len(asked) == 1
    kv(torch.randn(64, 12))  # prefill-sized: the chain (cuBLAS) without timing, for a plain grouped GEMM
    assert len(asked) == 1
    projection()(torch.randn(64, 12))  # with an in factor, prefill sizes are timed as before
    assert len(asked) == 2


@torch.no_grad()  # inference: trainable factors keep the kernels out of calls that record gradients
def test_forcing_the_kernel_on_factors_it_cannot_tile_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(bridge, "triton_path_available", lambda device: True)
    svd = FactoredProjection(None, [torch.randn(1, 6, 12)], [torch.randn(300, 6)], [None])
    svd.backend = "triton"
    with pytest.raises(ValueError, match=r"out factors of shapes \[\(300, 6\)\].*backend='auto' or 'torch'"):
        svd(torch.randn(2, 12))


@torch.no_grad()  # inference: trainable factors keep the kernels out of calls that record gradients
def test_the_kernel_launcher_is_built_once_and_rebuilt_when_factors_are_replaced(monkeypatch):
    """Decode calls are host-bound: the module keeps its FusedProjection until a factor is replaced
    (``.to()``, ``load_state_dict(assign=True)``), and does not keep one holding copies."""
    built, ran = [], []

    class FakeLauncher:
        def __init__(self, in_factor, cores, out_factors, biases, like):
            built.append(1)
            self.dtype, self.device, self.copied = like.dtype, like.device, in_factor is not None and \
                not in_factor.is_contiguous()
            self.factors = (in_factor, list(zip(cores, out_factors, biases)))

    def run(launcher, x):
        ran.append(launcher)
        return factored_projection_torch(x, *launcher.factors)

    monkeypatch.setattr(bridge, "triton_path_available", lambda device: True)
    monkeypatch.setattr(bridge, "fused_projection_launcher", FakeLauncher)
    monkeypatch.setattr(bridge, "run_fused_projection", run)
    module = projection()
    module.backend = "triton"
    x = torch.randn(2, 12)
    for _ in range(3):
        module(x)
    assert len(built) == 1 and len(ran) == 3 and ran[0] is ran[2]
    module.double()  # new factor tensors: a new launcher, for the new dtype
    ys = module(x.double())
    assert len(built) == 2 and ran[-1].dtype == torch.float64
    for y, ref in zip(ys, factored_projection_torch(x.double(), module.in_factor, module.groups)):
        torch.testing.assert_close(y, ref)
    state = {k: v.clone() * 2 for k, v in module.state_dict().items()}
    module.load_state_dict(state, assign=True)
    module(x.double())
    assert len(built) == 3
    module.load_state_dict(state)  # in place: the same tensors, the same launcher
    module(x.double())
    assert len(built) == 3
    module.in_factor = torch.nn.Parameter(module.in_factor.T.contiguous().T)  # a non-contiguous factor: never cached
    module(x.double()), module(x.double())
    assert len(built) == 5


@torch.no_grad()  # inference: trainable factors keep the kernels out of calls that record gradients
def test_moving_the_module_releases_the_cached_launcher(monkeypatch):
    """The cache holds the factors it was built from: .to() / .half() must not keep the old ones alive."""
    import gc
    import weakref

    monkeypatch.setattr(bridge, "triton_path_available", lambda device: True)
    monkeypatch.setattr(bridge, "fused_projection_launcher",
                        lambda *factors, like: type("L", (), {"dtype": like.dtype, "device": like.device,
                                                               "copied": False, "factors": factors})())
    monkeypatch.setattr(bridge, "run_fused_projection",
                        lambda launcher, x: factored_projection_torch(x, launcher.factors[0],
                                                                      list(zip(*launcher.factors[1:]))))
    module = projection()
    module.backend = "triton"
    module(torch.randn(2, 12))
    # .double() swaps the parameters' data in place; what could keep the float32 copies alive is the
    # launcher (a real one holds tensors derived from them)
    old = weakref.ref(module.__dict__["_kernel_cache"].launcher)
    module.double()
    gc.collect()
    assert old() is None, "the cached launcher (and the float32 factors it holds) outlived .double()"


def test_gradients_flow_through_the_torch_chain_not_the_kernel(monkeypatch):
    """The kernel has no backward: where a call records gradients (x requiring grad, or a factor made
    trainable) "auto" takes the torch chain, so x's gradient is the chain's; under no_grad the kernel
    serves as before; a forced "triton" refuses to drop the gradients."""
    module = projection()
    monkeypatch.setattr(bridge, "kernel_preferred_on", lambda device: True)
    monkeypatch.setattr(bridge, "triton_path_available", lambda device: True)
    monkeypatch.setattr(bridge, "faster_path", lambda *a, **k: "triton")
    ran = []

    def fake_kernel(launcher, x):  # the kernel's outputs carry no graph, as the real one's
        ran.append(1)
        with torch.no_grad():
            return factored_projection_torch(x, launcher.in_factor,
                                             list(zip(launcher.cores, launcher.out_factors, launcher.biases)))

    monkeypatch.setattr(bridge, "run_fused_projection", fake_kernel)
    x = torch.randn(2, 5, 12, requires_grad=True)
    sum(y.square().sum() for y in module(x)).backward()
    want = x.detach().clone().requires_grad_()
    sum(y.square().sum() for y in factored_projection_torch(want, module.in_factor, module.groups)).backward()
    assert ran == [] and torch.allclose(x.grad, want.grad)
    with torch.no_grad():
        module(x)
    assert ran == [1]
    module.in_factor.requires_grad_()  # fine-tuning the factors themselves
    module(torch.randn(2, 5, 12))[0].sum().backward()
    assert ran == [1] and module.in_factor.grad is not None
    module.backend = "triton"
    with pytest.raises(RuntimeError, match="no backward pass.*backend='auto'"):
        module(x)
