"""The tuners compile their candidates all at once before timing them (kernels/_common.precompile).

No GPU here: a stand-in kernel plays Triton's JIT. Its ``warmup`` submits its compile to the active
``triton.AsyncCompileMode`` as ``JITFunction`` does, so the pool threads, the wait at the mode's
exit and the filled cache are Triton's own mechanism; its ``[grid](...)`` launch runs a cached
kernel or compiles one on the spot, as a launch does."""
import inspect
import threading

import pytest

from tmps.kernels import _common

triton = pytest.importorskip("triton")
if not hasattr(triton, "AsyncCompileMode"):
    pytest.skip("Triton < 3.6 has no AsyncCompileMode: the tuners compile as they go", allow_module_level=True)


class StandInKernel:
    """compile(key) -> a compiled kernel; ``cache`` is its JIT cache; ``log`` says what ran where."""

    def __init__(self):
        self.cache, self.log = {}, []

    def _compile(self, key):
        self.log.append(("compile", key, threading.current_thread().name))
        return f"binary {key}"

    def warmup(self, key, *, grid):
        mode = triton.runtime._async_compile.active_mode.get()
        assert mode is not None, "warmups outside an AsyncCompileMode would compile one by one"
        # Triton 3.9's submit also takes the cleanup of a failed compile (3.6's does not)
        cleanup = (lambda future_kernel: None,) if "cleanup_fn" in inspect.signature(mode.submit).parameters else ()
        return mode.submit(key, lambda: self._compile(key), lambda binary: self.cache.__setitem__(key, binary),
                           *cleanup)

    def __getitem__(self, grid):
        def run(key):
            if key not in self.cache:
                self.cache[key] = self._compile(key)
            self.log.append(("run", key))
        return run


def test_candidates_are_compiled_on_the_pool_before_any_is_timed(monkeypatch):
    monkeypatch.setattr(_common, "COMPILE_THREADS", 4)
    kernel = StandInKernel()
    times = {"a": 3.0, "b": 1.0, "c": 2.0}

    def bench(fn):
        kernel.log.append(("bench",))
        fn()
        return times[kernel.log[-1][1]]

    best = _common.autotune(["a", "b", "c"], lambda config: _common.launch(kernel, (1,), config), bench)
    assert best == "b"
    compiles = [entry for entry in kernel.log if entry[0] == "compile"]
    assert sorted(key for _, key, _ in compiles) == ["a", "b", "c"]
    assert all(thread.startswith("tmps-compile") for _, _, thread in compiles), compiles
    assert kernel.log[:3] == compiles, "every compile comes before the first timing"
    assert [entry[0] for entry in kernel.log[3:]] == ["bench", "run"] * 3  # no compile left for the timed runs
    assert not _common._compile_only.get()


def test_a_candidate_that_fails_to_precompile_is_still_timed(monkeypatch):
    """Precompiling is best effort: what failed there is repeated by the timed run, which raises what
    it raised before or, as here, runs."""
    monkeypatch.setattr(_common, "COMPILE_THREADS", 4)
    kernel = StandInKernel()

    def run(config):
        if config == "b" and _common._compile_only.get():
            raise ValueError("only while compiling")
        _common.launch(kernel, (1,), config)

    assert _common.autotune(["a", "b"], run, lambda fn: fn() or 1.0) == "a"
    assert ("run", "b") in kernel.log and ("compile", "b", "MainThread") in kernel.log  # b compiled when timed


def test_one_thread_or_one_candidate_compiles_as_it_goes(monkeypatch):
    kernel = StandInKernel()
    monkeypatch.setattr(_common, "COMPILE_THREADS", 1)
    _common.autotune(["a", "b"], lambda config: _common.launch(kernel, (1,), config), lambda fn: fn() or 1.0)
    monkeypatch.setattr(_common, "COMPILE_THREADS", 4)
    _common.autotune(["c"], lambda config: _common.launch(kernel, (1,), config), lambda fn: fn() or 1.0)
    assert [thread for entry in kernel.log if entry[0] == "compile" for thread in entry[2:]] == ["MainThread"] * 3
