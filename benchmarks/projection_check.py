"""The fused Q/K/V projection kernel against its float64 reference at model sizes.

    python benchmarks/projection_check.py --device cuda     # gpu_check's c2: the real shapes, compiled
    python benchmarks/projection_check.py                   # CPU: reduced shapes, Triton's interpreter

Layouts: Llama GQA (32 / 8 / 8 heads of 64, no bias), OPT (32 heads of 64 per group, biases) and OPT
with per-head out factors (s = 48 < o = 64), hidden 2048, r = 768 / 640; 1, 7, 129 and 4096 tokens;
fp32 / fp16 / bf16. 16-bit cases run one fixed decode and one fixed prefill config (members of the
autotuner's candidate sets: they keep the compile count down), and one case per dtype goes through
the autotuner itself; fp32 always uses its fixed configs. Per case: max|out - ref| / max|ref| over
the three outputs, the reference computed in float64 on the kernel's own rounded inputs. Exit status
1 if a case exceeds its dtype's tolerance, produces a non-finite value or raises.
"""
from __future__ import annotations

import sys
import time

from _bench_common import cuda_unusable, device_parser, interpret_on_cpu  # benchmarks/ is sys.path[0] when run as a script

# name: hidden d, rank r, ((n_heads, s, o or None) per group: o None, no out factor, s = head_dim), biases
LAYOUTS = {
    "llama_gqa": (2048, 768, ((32, 64, None), (8, 64, None), (8, 64, None)), False),
    "opt": (2048, 768, ((32, 64, None),) * 3, True),
    "opt_out_factor": (2048, 640, ((32, 48, 64),) * 3, True),
}
SMALL_LAYOUTS = {  # the same layouts shrunk for the interpreter (ranks that are not powers of two)
    "llama_gqa": (256, 96, ((8, 16, None), (2, 16, None), (2, 16, None)), False),
    "opt": (256, 96, ((4, 16, None),) * 3, True),
    "opt_out_factor": (256, 80, ((4, 12, 16),) * 3, True),
}
TOKENS, SMALL_TOKENS = (1, 7, 129, 4096), (1, 7, 129)
AUTOTUNED = ("llama_gqa", 7)  # the (layout, tokens) case of each 16-bit dtype that the autotuner configures


def parse_args(argv=None):
    p = device_parser(__doc__)
    p.add_argument("--layouts", nargs="+", choices=tuple(LAYOUTS), default=list(LAYOUTS))
    p.add_argument("--dtypes", nargs="+", choices=("float32", "float16", "bfloat16"),
                   default=["float32", "float16", "bfloat16"])
    return p.parse_args(argv)


def compare(run, reference, tol, sync):
    """(ok, max|out - ref| / max|ref| over the outputs, verdict) of the kernel call ``run()`` against
    ``reference()``; an exception is reported, not raised."""
    try:
        outs = run()
        sync()
        err = 0.0
        for out, ref in zip(outs, reference()):
            if not out.isfinite().all():
                return False, float("inf"), "MISMATCH (non-finite)"
            err = max(err, ((out.double() - ref).abs().max() / ref.abs().max()).item())
        return err <= tol, err, "ok" if err <= tol else "MISMATCH"
    except Exception as exc:  # noqa: BLE001: report and go on
        return False, float("nan"), f"ERROR {type(exc).__name__}: {exc}"[:200]


def main(argv=None) -> int:
    args = parse_args(argv)
    interpret_on_cpu(args.device)
    import torch

    from tmps.kernels import fused_projection as fp

    if cuda_unusable("projection_check", args.device):
        return 2
    layouts, tokens = (LAYOUTS, TOKENS) if args.device == "cuda" else (SMALL_LAYOUTS, SMALL_TOKENS)
    tol = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 4e-2}  # max|err| / max|ref|
    decode = fp.KernelConfig(block_m=16, block_t=128, col_splits=0, block_k=128, block_r=64, num_warps=4,
                             num_stages=3)
    prefill = fp.KernelConfig(block_m=64, block_t=128, col_splits=2, block_k=64, block_r=64, num_warps=8,
                              num_stages=3)
    assert decode in fp._DECODE_CONFIGS and prefill in fp._PREFILL_CONFIGS, "fixed configs left the candidate sets"
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    gen = torch.Generator(device=args.device).manual_seed(0)

    def rand(*shape, scale=1.0):
        return torch.randn(*shape, generator=gen, device=args.device, dtype=torch.float64) * scale

    bad = 0
    print(f"{'layout':<15} {'dtype':<9} {'tokens':>6} {'config':<9} {'rel err':>9} {'tol':>7}  result")
    for name in args.layouts:
        d, r, groups, has_bias = layouts[name]
        x64 = rand(max(tokens), d)
        in64 = rand(d, r, scale=d**-0.5)
        cores64 = [rand(n, s, r, scale=r**-0.5) for n, s, _ in groups]
        outs64 = [None if o is None else rand(o, s, scale=s**-0.5) for _, s, o in groups]
        bias64 = [rand(n * (o or s), scale=0.1) if has_bias else None for n, s, o in groups]
        for dtype in (getattr(torch, dt) for dt in args.dtypes):
            def cast(t):
                return None if t is None else t.to(dtype)

            factors = [cast(in64), [cast(c) for c in cores64], [cast(a) for a in outs64], [cast(b) for b in bias64]]
            exact = [factors[0].double()] + [[None if t is None else t.double() for t in part] for part in factors[1:]]
            for m in tokens:
                x = x64[:m].to(dtype)
                if dtype == torch.float32:
                    config, label = None, "fp32"
                elif (name, m) == AUTOTUNED:
                    config, label = None, "autotune"
                else:
                    config, label = (decode, "decode") if m <= 16 else (prefill, "prefill")
                t0 = time.perf_counter()
                ok, err, verdict = compare(lambda: fp.fused_factored_projection(x, *factors, config=config),
                                           lambda: fp.fused_factored_projection_ref(x.double(), *exact),
                                           tol[dtype], sync)
                bad += not ok
                print(f"{name:<15} {str(dtype)[6:]:<9} {m:>6} {label:<9} {err:>9.2e} {tol[dtype]:>7.0e}  {verdict} "
                      f"({time.perf_counter() - t0:.1f}s)", flush=True)
    print(f"projection check: {bad} failing case(s) on {args.device}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
