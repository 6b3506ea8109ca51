"""Time ``hooi`` and ``tt_svd`` against tensorly on the same float32 tensors, and check their error.

Providers: ``tmps_hooi`` vs ``tensorly_tucker`` (``tucker(x, rank, init="svd")``) and ``tmps_tt_svd``
vs ``tensorly_tt`` (``tensor_train(x, rank)``), tensorly on its pytorch backend. Both HOOIs use the
same stopping rule, ``tol = 1e-4`` on the change of relative error between sweeps (tensorly's
default; ours defaults to the stricter 1e-5), so that equal work targets give equal errors. Tensors are
Gaussian (seed 0) of the shape of a stacked Q/K/V projection, ``3 × d × d``, for ``d = 768``
(OPT-125m, GPT-2) and ``d = 2048`` (OPT-1.3b); the ``d = 2048`` cases are marked ``slow``.

Every benchmark records its relative Frobenius error ``‖X − X̂‖_F / ‖X‖_F`` in ``extra_info``; ours
must be no worse than tensorly's on the same tensor and ranks (to within 0.1 %). Tensorly's error is
computed once per tensor (or taken from its own benchmark, when that ran first).

    pytest benchmarks/bench_decompose.py --benchmark-only              # all, minutes at d = 2048
    pytest benchmarks/bench_decompose.py --benchmark-only -m "not slow"  # d = 768 only
"""
from __future__ import annotations

import platform

import pytest
import torch

from tmps.decompose import hooi, tt_svd

tl = pytest.importorskip("tensorly")
from tensorly.decomposition import tensor_train, tucker  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Ours may be worse than tensorly's error by at most this fraction of it.
ERROR_SLACK = 1e-3
# The HOOI stopping tolerance both libraries get (tensorly's default).
HOOI_TOL = 1e-4

# (id, tensor shape, Tucker ranks, TT internal ranks, rounds, marks). HOOI at d = 768 takes tens of
# seconds on 2 CPU cores and minutes at d = 2048, hence one round; TT-SVD at d = 768 takes ~2 s.
CASES = [
    pytest.param((3, 768, 768), (3, 384, 384), (3, 384), id="3x768x768"),
    pytest.param((3, 2048, 2048), (3, 1024, 1024), (3, 1024), id="3x2048x2048", marks=pytest.mark.slow),
]
TT_ROUNDS = {(3, 768, 768): 3}

_TENSORS: dict[tuple[int, ...], torch.Tensor] = {}
_TENSORLY_ERRORS: dict[tuple, float] = {}


@pytest.fixture(scope="module", autouse=True)
def _tensorly_pytorch_backend():
    """Run tensorly on torch tensors for this module, then restore whatever backend was set."""
    previous = tl.get_backend()
    tl.set_backend("pytorch")
    yield
    tl.set_backend(previous)


def gaussian(shape: tuple[int, ...]) -> torch.Tensor:
    """The float32 Gaussian tensor of ``shape`` (seed 0), built once and shared by all providers."""
    if shape not in _TENSORS:
        gen = torch.Generator().manual_seed(0)
        _TENSORS[shape] = torch.randn(shape, generator=gen, dtype=torch.float32).to(DEVICE)
    return _TENSORS[shape]


def relative_error(approx: torch.Tensor, x: torch.Tensor) -> float:
    """``‖x − approx‖_F / ‖x‖_F``, accumulated in float64."""
    return float(torch.linalg.norm((approx - x).double()) / torch.linalg.norm(x.double()))


def _synchronized(fn):
    """``fn`` followed by a device synchronisation, so the timer sees the whole GPU run."""
    def run():
        out = fn()
        if DEVICE == "cuda":
            torch.cuda.synchronize()
        return out
    return run


def _tensorly_tucker(x, ranks):
    return tucker(x, rank=list(ranks), init="svd", tol=HOOI_TOL)


def _tensorly_tt(x, ranks):
    return tensor_train(x, rank=[1, *ranks, 1])


# provider -> (decompose(x, ranks), reconstruct(result)); the reference provider comes first.
TUCKER_PROVIDERS = {
    "tensorly_tucker": (_tensorly_tucker, lambda res: tl.tucker_to_tensor(res)),
    "tmps_hooi": (lambda x, ranks: hooi(x, list(ranks), tol=HOOI_TOL), lambda res: res.to_tensor()),
}
TT_PROVIDERS = {
    "tensorly_tt": (_tensorly_tt, lambda res: tl.tt_to_tensor(res)),
    "tmps_tt_svd": (lambda x, ranks: tt_svd(x, max_rank=list(ranks)), lambda res: res.to_tensor()),
}


def tensorly_error(kind: str, shape: tuple[int, ...], ranks: tuple[int, ...]) -> float:
    """Tensorly's relative error for ``kind`` ("tucker" or "tt") on ``gaussian(shape)``, cached."""
    key = (kind, shape, ranks)
    if key not in _TENSORLY_ERRORS:
        name = "tensorly_tucker" if kind == "tucker" else "tensorly_tt"
        decompose, reconstruct = (TUCKER_PROVIDERS if kind == "tucker" else TT_PROVIDERS)[name]
        x = gaussian(shape)
        _TENSORLY_ERRORS[key] = relative_error(reconstruct(decompose(x, ranks)), x)
    return _TENSORLY_ERRORS[key]


def _bench(benchmark, kind, providers, provider, shape, ranks, rounds):
    x = gaussian(shape)
    decompose, reconstruct = providers[provider]
    result = benchmark.pedantic(_synchronized(lambda: decompose(x, ranks)), rounds=rounds, iterations=1)
    error = relative_error(reconstruct(result), x)
    if provider.startswith("tensorly"):
        _TENSORLY_ERRORS.setdefault((kind, shape, ranks), error)
    reference = tensorly_error(kind, shape, ranks)
    benchmark.extra_info.update({
        "provider": provider,
        "shape": list(shape),
        "ranks": list(ranks),
        "relative_error": error,
        "tensorly_relative_error": reference,
        "device": torch.cuda.get_device_name() if DEVICE == "cuda" else (platform.processor() or platform.machine()),
        "torch_threads": torch.get_num_threads(),
    })
    assert error <= reference * (1 + ERROR_SLACK), (
        f"{provider} error {error:.6f} exceeds tensorly's {reference:.6f} by more than "
        f"{ERROR_SLACK:.1%} on shape {shape}, ranks {ranks}"
    )


@pytest.mark.parametrize("provider", list(TUCKER_PROVIDERS))
@pytest.mark.parametrize("shape, tucker_ranks, tt_ranks", CASES)
def test_tucker(benchmark, provider, shape, tucker_ranks, tt_ranks):
    benchmark.group = f"tucker {'x'.join(map(str, shape))} ranks {list(tucker_ranks)}"
    _bench(benchmark, "tucker", TUCKER_PROVIDERS, provider, shape, tucker_ranks, rounds=1)


@pytest.mark.parametrize("provider", list(TT_PROVIDERS))
@pytest.mark.parametrize("shape, tucker_ranks, tt_ranks", CASES)
def test_tt(benchmark, provider, shape, tucker_ranks, tt_ranks):
    benchmark.group = f"tt {'x'.join(map(str, shape))} ranks {list(tt_ranks)}"
    _bench(benchmark, "tt", TT_PROVIDERS, provider, shape, tt_ranks, rounds=TT_ROUNDS.get(shape, 1))
