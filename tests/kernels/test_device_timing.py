"""Device timing (CUDA graphs) when a capture fails: the caller's stream comes back, and no graph is
captured again in the process (torch < 2.12 can abort on a later capture after a failed one).

No GPU here: torch.cuda's stream and graph entry points are replaced by stand-ins that behave as
torch's do on a failing capture (``torch.cuda.graph.__exit__`` raises from ``capture_end`` before it
restores the stream)."""
import contextlib

import pytest
import torch

from tmps.kernels import _common


class FakeStream:
    def __init__(self, name="side"):
        self.name = name

    def wait_stream(self, other):
        pass


@pytest.fixture
def cuda_streams(monkeypatch):
    """torch.cuda's streams as a one-slot 'current stream'; returns the slot and the caller's stream."""
    caller = FakeStream("caller")
    current = [caller]

    @contextlib.contextmanager
    def stream(s):
        saved, current[0] = current[0], s
        try:
            yield
        finally:  # torch.cuda.stream's exit restores the stream, also on an exception
            current[0] = saved

    monkeypatch.setattr(_common, "_graph_timing_off", None)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda: current[0])
    monkeypatch.setattr(torch.cuda, "Stream", FakeStream)
    monkeypatch.setattr(torch.cuda, "stream", stream)
    monkeypatch.setattr(torch.cuda, "set_stream", lambda s: current.__setitem__(0, s))
    monkeypatch.setattr(torch.cuda, "CUDAGraph", object)
    return current, caller


def failing_graph(current):
    class FailingCapture:  # torch.cuda.graph on a failed capture: its capture stream stays current
        def __init__(self, graph):
            pass

        def __enter__(self):
            current[0] = FakeStream("capture")

        def __exit__(self, *exc):
            raise RuntimeError("CUDA error: operation not permitted when stream is capturing")

    return FailingCapture


def test_a_failed_capture_restores_the_stream_and_turns_graph_timing_off(monkeypatch, cuda_streams):
    current, caller = cuda_streams
    monkeypatch.setattr(torch.cuda, "graph", failing_graph(current))
    calls = []
    with pytest.warns(RuntimeWarning, match="fall back to eager"):
        with pytest.raises(RuntimeError, match="capture failed: RuntimeError: CUDA error"):
            _common.device_ms(lambda: calls.append(1), reps=3)
    assert current[0] is caller, "the caller's stream must be current again after a failed capture"
    assert calls == [1] * 4  # the eager warm-up, then the three captured calls

    # no second capture: device timing refuses at once, and the tuners' bench times eagerly instead
    monkeypatch.setattr(torch.cuda, "graph", lambda graph: pytest.fail("captured again after a failed capture"))
    with pytest.raises(RuntimeError, match="off in this process"):
        _common.device_ms(lambda: None)
    monkeypatch.setattr(_common, "eager_ms", lambda fn: 0.5)
    assert _common.decode_bench(lambda: None) == 0.5
    assert current[0] is caller


def test_an_error_in_the_warm_up_is_the_function_s_own(monkeypatch, cuda_streams):
    """A call that fails eagerly (a config that does not compile, say) says so, and graph timing stays on."""
    current, caller = cuda_streams
    monkeypatch.setattr(torch.cuda, "graph", lambda graph: pytest.fail("no capture after a failed warm-up"))

    def broken():
        raise ValueError("bad launch")

    with pytest.raises(ValueError, match="bad launch"):
        _common.device_ms(broken)
    assert _common._graph_timing_off is None and current[0] is caller
