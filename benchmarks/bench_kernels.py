"""pytest-benchmark timings of the fused factored projection against the unfused torch chain.

    pytest benchmarks/bench_kernels.py --benchmark-only

On CUDA: torch_factored and triton (fp16) on shapes from real models.  On CPU the kernel only runs
in Triton's interpreter, so there the file times the torch paths and one tiny interpreted Triton call
(a check that the path works, not a kernel timing).  For roofline tables use kernel_microbench.py.
"""

import os
import sys

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA and "triton" not in sys.modules:
    # The interpreter must be on before Triton is imported (see tests/kernels/conftest.py); if it
    # is too late, the interpreted check below skips.
    os.environ["TRITON_INTERPRET"] = "1"

from _bench_common import synced  # noqa: E402  (benchmarks/, on sys.path under pytest)
from tmps.kernels import fused_projection as fp  # noqa: E402

HEAD_DIM = 64
# (name, hidden): OPT-125m, OPT-1.3b / Llama-3.2-1B width, Llama-2-7B width; 3 groups of hidden/64 heads
MODELS = [("opt-125m", 768), ("h2048", 2048), ("llama-7b", 4096)]
needs_cuda = pytest.mark.skipif(not CUDA, reason="Triton kernel timings need a CUDA GPU")


def make_inputs(hidden, tokens, ratio, device, dtype):
    n, r = hidden // HEAD_DIM, int(ratio * hidden)
    gen = torch.Generator().manual_seed(0)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(device=device, dtype=dtype)

    return (rand(tokens, hidden), rand(hidden, r, scale=hidden**-0.5),
            [rand(n, HEAD_DIM, r, scale=r**-0.5) for _ in range(3)],
            [rand(HEAD_DIM, HEAD_DIM, scale=HEAD_DIM**-0.5) for _ in range(3)],
            [rand(n * HEAD_DIM, scale=0.1) for _ in range(3)])


@needs_cuda
@pytest.mark.parametrize("tokens", [1, 512, 4096])
@pytest.mark.parametrize("model, hidden", MODELS, ids=[m for m, _ in MODELS])
@pytest.mark.parametrize("provider", ["torch_factored", "triton"])
def test_cuda(benchmark, provider, model, hidden, tokens):
    args = make_inputs(hidden, tokens, 0.25, "cuda", torch.float16)
    fn = fp.fused_factored_projection if provider == "triton" else fp.fused_factored_projection_ref
    synced(lambda: fn(*args))()  # autotune / warm up outside the timing
    benchmark.extra_info.update(device=torch.cuda.get_device_name(), provider=provider, dtype="fp16")
    benchmark(synced(lambda: fn(*args)))


@pytest.mark.parametrize("provider", ["torch_dense", "torch_factored"])
def test_cpu_torch(benchmark, provider):
    args = make_inputs(768, 16, 0.25, "cpu", torch.float32)
    if provider == "torch_dense":
        weight = torch.randn(3 * 768, 768)
        bias = torch.cat(args[4])
        fn = lambda: torch.nn.functional.linear(args[0], weight, bias)  # noqa: E731
    else:
        fn = lambda: fp.fused_factored_projection_ref(*args)  # noqa: E731
    benchmark.extra_info.update(device="cpu", provider=provider, dtype="fp32")
    benchmark(fn)


@pytest.mark.skipif(CUDA or not fp.triton_available("cpu"), reason="interpreter check, CPU only")
def test_cpu_triton_interpreted(benchmark):
    args = make_inputs(128, 3, 0.25, "cpu", torch.float32)
    benchmark.extra_info.update(device="cpu (Triton interpreter)", provider="triton", dtype="fp32")
    ys = benchmark.pedantic(fp.fused_factored_projection, args=args, rounds=1, iterations=1)
    for y, ref in zip(ys, fp.fused_factored_projection_ref(*args)):
        torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4)
