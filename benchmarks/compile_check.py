"""Compile every candidate config of the Triton kernels for a GPU target, without a GPU.

    python benchmarks/compile_check.py                 # sm_90 (H100/H200), every kernel
    python benchmarks/compile_check.py --arch 80       # sm_80 (A100)
    python benchmarks/compile_check.py --first         # one config per kernel and dtype (the unit suite's check)
    python benchmarks/compile_check.py --first --no-align-hints   # as before the alignment hints
    python benchmarks/compile_check.py --threads 2     # two compiles at once (the tuners' precompile)

Each kernel launch is captured instead of run (the launcher builds its real arguments from
empty tensors of the given shapes), then compiled ahead of time with ``triton.compile`` for the
target and assembled with the ptxas that ships with Triton. Per config it prints shared memory,
registers per thread, spill stores, 2-byte global loads and stores, tensor-core instructions and
compile time, so a config that does not compile, needs too much shared memory, spills, moves 16-bit
rows one element at a time (rows Triton cannot prove 16-byte aligned) or runs a 16-bit dot on
scalar FMAs is seen before a GPU is lent. Uses Triton internals
(``create_function_from_signature``, ``JITFunction._pack_args``) checked on Triton 3.6 and 3.9;
exit status 3 when this Triton cannot compile ahead of time, 1 when a config fails. The cache is a
fresh temporary one unless ``TRITON_CACHE_DIR`` is set, so every case compiles; the last lines give
the wall time of all compiles, which ``--threads`` runs concurrently.
"""
from __future__ import annotations

import argparse
import atexit
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

os.environ.pop("TRITON_INTERPRET", None)  # compile for the GPU, not the interpreter
# A fresh cache unless one is given: each compile then really compiles (its seconds, the wall time)
FRESH_CACHE = "TRITON_CACHE_DIR" not in os.environ
if FRESH_CACHE:
    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="tmps-compile-check-")
    atexit.register(shutil.rmtree, os.environ["TRITON_CACHE_DIR"], ignore_errors=True)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's runtime default, stated (it warns otherwise)

import torch  # noqa: E402

try:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature
except ImportError as exc:  # no Triton, or internals this script relies on moved: nothing to check
    print(f"compile_check: cannot compile ahead of time with this Triton ({exc})", file=sys.stderr)
    raise SystemExit(3)

from tmps.kernels import fused_projection as fp  # noqa: E402
from tmps.kernels import latent_decode as ld  # noqa: E402
from tmps.kernels import latent_scores as ls  # noqa: E402

SHARED_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}  # bytes per block (opt-in maximum)


class _Capture:
    """Stands in for a ``@triton.jit`` kernel: ``kernel[grid](*args, **kwargs)`` records the call."""

    def __init__(self):
        self.call = None

    def __getitem__(self, grid):
        def record(*args, **kwargs):
            self.call = (args, kwargs)
        return record


def captured_calls(module, names, launch):
    """Run ``launch()`` with each ``module.<name>`` replaced by a recorder; return the recorded
    (args, kwargs) per name (a launcher may launch several kernels, e.g. latent_decode's two)."""
    reals = {name: getattr(module, name) for name in names}
    captures = {name: _Capture() for name in names}
    for name, capture in captures.items():
        setattr(module, name, capture)
    try:
        launch()
    finally:
        for name, real in reals.items():
            setattr(module, name, real)
    return {name: capture.call for name, capture in captures.items()}


def two_byte_accesses(ptx: str) -> int:
    """Global loads and stores of one 16-bit element at a time in ``ptx`` (``ld.global[.nc].b16``,
    ``st.global.b16``, not vectors): what rows whose stride Triton cannot prove 16-byte aligned
    compile to, in place of 16-byte ``cp.async`` copies and vector stores (see ``kernels/_common.aligned``)."""
    ops = re.findall(r"(?:ld|st)\.global[\w.]*", ptx)
    return sum(1 for op in ops if ".v" not in op and op.endswith(("b16", "u16")))


def tensor_core_ops(ptx: str) -> int:
    """Tensor-core matrix instructions in ``ptx``: Hopper's ``wgmma.mma_async`` and the warp-level
    ``mma.sync``. A 16-bit ``tl.dot`` that Triton cannot map onto them (a tile dimension below 16, a
    layout it does not support) compiles to scalar FMAs (an H100 SXM: 989 TFLOP/s of dense fp16
    tensor-core math against 67 of fp32, by its datasheet);
    every dot of these kernels should be a tensor-core one in fp16 / bf16."""
    return len(re.findall(r"\b(?:wgmma\.mma_async|mma\.sync)\.", ptx))


def compile_call(kernel, call, target, ptxas):
    """Compile a recorded call: (shared bytes, registers, spill store bytes, 2-byte global accesses,
    tensor-core instructions, seconds)."""
    args, kwargs = call
    kwargs = dict(kwargs)
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound_args, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound_args, specialization, options)
    start = time.perf_counter()
    compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target, options=options.__dict__)
    seconds = time.perf_counter() - start
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(compiled.asm["ptx"])
    try:
        report = subprocess.run([ptxas, "-v", f"-arch=sm_{target.arch}a" if target.arch >= 90 else f"-arch=sm_{target.arch}",
                                 f.name, "-o", os.devnull], capture_output=True, text=True).stderr
    finally:
        os.unlink(f.name)
    registers = int(re.findall(r"Used (\d+) registers", report)[0])
    spills = int(re.findall(r"(\d+) bytes spill stores", report)[0])
    ptx = compiled.asm["ptx"]
    return compiled.metadata.shared, registers, spills, two_byte_accesses(ptx), tensor_core_ops(ptx), seconds


def projection_cases(dtype):
    """(label, config, launch) for the fused projection: decode and prefill configs at model-like shapes."""
    llama_8b = ((32, 128, 128, False, False), (8, 128, 128, False, False), (8, 128, 128, False, False))
    shapes = [  # (rows, d_in, r, groups ((n, s, o, has_out, has_bias), ...)): what gpu_check.sh runs
        # weights mode at Llama-3-8B's shape, ratio 0.5 (head_dim 128, 32 / 8 / 8 heads): not run by gpu_check,
        # but a Llama user's layout; first, so that --first compiles a rank of 8 x odd (r = 1224)
        (16, 4096, 1224, llama_8b),
        (4096, 4096, 1224, llama_8b),
        # kernel_microbench.py's subset (hidden 4096, ratio 0.25): the out_factor and weights_model layouts
        (16, 4096, 1024, ((64, 64, 64, True, True),) * 3),
        (4096, 4096, 1024, ((64, 64, 64, True, True),) * 3),
        (16, 4096, 1024, ((64, 64, 64, False, True),) * 3),
        (4096, 4096, 1024, ((64, 64, 64, False, True),) * 3),
        # e2e.py's weights mode at OPT-1.3B's shape, ratio 0.5 (r = 768; 2048 and 4096 prefill rows share a bucket)
        (16, 2048, 768, ((32, 64, 64, False, True),) * 3),
        (4096, 2048, 768, ((32, 64, 64, False, True),) * 3),
    ]
    if dtype == torch.float32:
        configs = {16: [fp._FP32_DECODE_CONFIG], 4096: [fp._FP32_PREFILL_CONFIG]}
    else:
        configs = {16: list(fp._DECODE_CONFIGS), 4096: list(fp._PREFILL_CONFIGS)}
    for rows, d_in, r, groups in shapes:
        for config in configs[rows]:
            def launch(config=config, rows=rows, d_in=d_in, r=r, groups=groups):
                x = torch.empty(rows, d_in, dtype=dtype)
                cores = [torch.empty(n, s, r, dtype=dtype) for n, s, _, _, _ in groups]
                outs = [torch.empty(o, s, dtype=dtype) if has else None for _, s, o, has, _ in groups]
                biases = [torch.empty(n * o, dtype=dtype) if bias else None for n, _, o, _, bias in groups]
                ys = [torch.empty(rows, n * o, dtype=dtype) for n, _, o, _, _ in groups]
                # z given empty: a z-pass config's own z = x @ B would be a (rows x d_in x r) fp16 GEMM
                # on the CPU, minutes per config at prefill sizes, for a launch that is only captured
                fp._launch(x, torch.empty(d_in, r, dtype=dtype), cores, outs, biases, ys, r, groups, config,
                           z=torch.empty(rows, r, dtype=dtype) if config.z_pass else None)
            yield f"projection rows={rows} d_in={d_in} r={r}", config, launch
    # kv mode as tmps.compress builds it (no in factor, z = x): OPT-1.3B's dense Q and its K / V
    # latents at half the cache, ranks rounded to multiples of 8; z-pass configs only
    groups = ((32, 64, 64, False, True), (1, 712, 712, False, True), (1, 1328, 1328, False, True))
    for rows in (16, 4096):
        candidates = [fp._Z_GIVEN[c] for c in configs[rows]] if dtype == torch.float32 else \
            [c for c in configs[rows] if c.z_pass]
        for config in candidates:
            def launch(config=config, rows=rows):
                x = torch.empty(rows, 2048, dtype=dtype)
                cores = [torch.empty(n, s, 2048, dtype=dtype) for n, s, _, _, _ in groups]
                biases = [torch.empty(n * o, dtype=dtype) for n, _, o, _, _ in groups]
                ys = [torch.empty(rows, n * o, dtype=dtype) for n, _, o, _, _ in groups]
                fp._launch(x, None, cores, [None] * 3, biases, ys, 2048, groups, config)
            yield f"projection-no-in-factor rows={rows} d_in=2048 kv=712+1328", config, launch


def scores_cases(dtype):
    """(label, config, launch) for the RoPE latent-scores kernel at Llama-3-8B and SmolLM2 decode shapes."""
    # r_k as tmps.compress rounds it (multiples of 8): Llama-3-8B's uniform 0.5, and a SmolLM2 layer of the
    # demo's allocation (120 = 8 x 15: rows Triton cannot see are 16-byte aligned without the hint)
    shapes = {"llama-3-8b": (1, 8, 4, 128, 4096, 352), "smollm2": (1, 3, 3, 64, 1024, 120)}
    configs = [ls._FP32_CONFIG] if dtype == torch.float32 else list(ls._CONFIGS)
    for name, (b, kv, m, hd, total, r) in shapes.items():
        for config in configs:
            def launch(config=config, b=b, kv=kv, m=m, hd=hd, total=total, r=r):
                ls._launch(torch.empty(b, kv, m, hd, dtype=dtype), torch.empty(b, total, r, dtype=dtype),
                           torch.empty(kv * hd, r, dtype=dtype), torch.empty(total, hd, dtype=dtype),
                           torch.empty(total, hd, dtype=dtype), torch.empty(b, kv, m, total), config)
            yield f"latent scores {name}", config, launch


def decode_cases(dtype):
    """(label, config, launch) for the fused latent decode attention (both kernels) at e2e's shapes:
    OPT-1.3B kv 0.5 (no RoPE: absorbed queries, r_k 712 / r_v 1328) at batch 1 and 16, and the RoPE
    path (fp32 scores given) at Llama-3-8B's 32 / 8 heads of 128 and SmolLM2's 9 / 3 heads of 64."""
    shapes = {  # name: (b, heads, kv_heads, head_dim, T, r_k, r_v, scores given)
        "opt-1.3b b=1": (1, 32, 32, 64, 1040, 712, 1328, False),
        "opt-1.3b b=16": (16, 32, 32, 64, 1040, 712, 1328, False),
        "llama-3-8b b=16": (16, 32, 8, 128, 1040, 0, 512, True),
        "smollm2 b=1": (1, 9, 3, 64, 1040, 0, 96, True),
    }
    for name, (b, heads, kv_heads, head_dim, total, r_k, r_v, given) in shapes.items():
        configs = [ld._FP32_CONFIG] if dtype == torch.float32 else list(ld._candidates(given))
        for config in configs:
            def launch(config=config, b=b, heads=heads, kv_heads=kv_heads, head_dim=head_dim, total=total,
                       r_k=r_k, r_v=r_v, given=given):
                q_latent = None if given else torch.empty(b, heads, r_k, dtype=dtype)
                scores = torch.empty(b, heads, total) if given else None
                c_k = None if given else torch.empty(b, total, r_k, dtype=dtype)
                mask = torch.empty(b, 1, 1, total, dtype=torch.bool)
                out = torch.empty(b, 1, heads, head_dim, dtype=dtype)
                ld._launch(q_latent, scores, c_k, torch.empty(b, total, r_v, dtype=dtype),
                           torch.empty(kv_heads * head_dim, r_v, dtype=dtype), mask, 0.125, heads, 1, out, config)
            yield f"latent-decode {name}", config, launch


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90: H100/H200)")
    p.add_argument("--kernels", nargs="+", choices=("projection", "scores", "decode"),
                   default=["projection", "scores", "decode"])
    p.add_argument("--dtypes", nargs="+", choices=("float16", "bfloat16", "float32"),
                   default=["float16", "bfloat16", "float32"])
    p.add_argument("--first", action="store_true",
                   help="only the first case of each kernel (with and without an in factor) and dtype (CI)")
    p.add_argument("--no-align-hints", action="store_true",
                   help="compile without the kernels' alignment hints (kernels/_common.aligned), as before them: "
                        "the 2-byte accesses they remove")
    p.add_argument("--threads", type=int, default=1,
                   help="compile this many cases at once (as the tuners do, kernels/_common.precompile); the last "
                        "line gives the wall time")
    args = p.parse_args(argv)
    if args.threads < 1:
        p.error("--threads must be positive")
    if args.no_align_hints:
        for module in (fp, ld, ls):
            module.alignment = lambda *sizes: 1
    target = GPUTarget("cuda", args.arch, 32)
    bindir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    ptxas = next((os.path.join(bindir, n) for n in ("ptxas-blackwell", "ptxas") if os.path.exists(os.path.join(bindir, n))),
                 None)
    if ptxas is None:
        print(f"compile_check: no ptxas under {bindir}", file=sys.stderr)
        return 3
    limit = SHARED_LIMIT.get(args.arch)
    print(f"triton {triton.__version__}, target sm_{args.arch}; columns: shared bytes, registers, spill bytes, "
          "2-byte global loads and stores, tensor-core instructions, compile s")
    failures = narrow_cases = scalar_cases = 0
    sources = {"projection": (projection_cases, fp, ("_fused_factored_projection_kernel",)),
               "scores": (scores_cases, ls, ("_latent_rope_scores_kernel",)),
               "decode": (decode_cases, ld, ("_partials_kernel", "_combine_kernel"))}
    jobs = []  # (name, dtype name, config, kernel, recorded call): captured first, compiled after
    for kernel_name in args.kernels:
        cases, module, attrs = sources[kernel_name]
        for dtype_name in args.dtypes:
            dtype = getattr(torch, dtype_name)
            families = set()
            for label, config, launch in cases(dtype):
                family = label.split()[0]
                if args.first and family in families:
                    continue
                families.add(family)
                try:
                    calls = captured_calls(module, attrs, launch)
                except Exception as exc:  # noqa: BLE001
                    failures += 1
                    print(f"{label} {dtype_name} {config}: FAILED to build the launch: {type(exc).__name__}: {exc}")
                    continue
                for attr in attrs:
                    name = f"{label} {attr.strip('_').removesuffix('_kernel')}" if len(attrs) > 1 else label
                    jobs.append((name, dtype_name, config, getattr(module, attr), calls[attr]))

    def compiled(job):
        try:
            return compile_call(job[3], job[4], target, ptxas)
        except Exception as exc:  # noqa: BLE001: report every failing config, then exit 1
            return exc

    start = time.perf_counter()
    with ThreadPoolExecutor(args.threads) as pool:
        for (name, dtype_name, config, _, _), result in zip(jobs, pool.map(compiled, jobs)):  # in order
            if isinstance(result, Exception):
                failures += 1
                print(f"{name} {dtype_name} {config}: FAILED {type(result).__name__}: {str(result)[:500]}", flush=True)
                continue
            shared, registers, spills, narrow, mma, seconds = result
            verdict = "ok" if limit is None or shared <= limit else f"TOO MUCH SHARED MEMORY (> {limit})"
            failures += verdict != "ok"
            narrow_cases += narrow > 0
            scalar = dtype_name != "float32" and mma == 0
            scalar_cases += scalar
            verdict += ", NO TENSOR-CORE DOT" if scalar else ""
            print(f"{name} {dtype_name} {config}: {shared} {registers} {spills} {narrow} {mma} {seconds:.1f}  {verdict}",
                  flush=True)
    wall = time.perf_counter() - start
    cache = "a fresh Triton cache" if FRESH_CACHE else "the given TRITON_CACHE_DIR (its hits are not compiled)"
    print(f"compile_check: {len(jobs)} compiles in {wall:.1f} s of wall time on {args.threads} thread(s), "
          f"{os.cpu_count()} CPU(s), {cache}")
    print(f"compile_check: {narrow_cases} case(s) with 2-byte global loads or stores")
    print(f"compile_check: {scalar_cases} 16-bit case(s) without a tensor-core instruction")
    print(f"compile_check: {failures} failing config(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
