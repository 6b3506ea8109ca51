"""The fused latent decode kernel against float64, beside the torch chain's own error, at e2e's shapes.

    python benchmarks/latent_decode_check.py --device cuda     # gpu_check's c2: the real shapes
    python benchmarks/latent_decode_check.py                   # CPU: reduced shapes, Triton's interpreter

Cases: OPT-1.3B's decode at batch 1 and 16 (32 heads of 64, no RoPE: scores computed inside,
r_k / r_v = 712 / 1328) and Llama-3-8B's at batch 16 (32 / 8 heads of 128, RoPE: fp32 scores
given), over a static cache of 1040 slots whose last 40 are masked, one new token per sequence;
fp32 / fp16 / bf16 and, in 16-bit, a one-pass and a scores-first candidate (fp16 also one whose
combine splits head_dim, and at batch 1 the autotuner's pick). Per case: max|out - ref| / max|ref| of the kernel, and of the torch chain
(``latent_decode_attention_ref`` in the low dtype) on the same rounded inputs, against the float64
reference. Exit status 1 if the kernel exceeds the tolerance anywhere.
"""
from __future__ import annotations

import sys
import time

from _bench_common import cuda_unusable, device_parser, interpret_on_cpu  # benchmarks/ is sys.path[0] when run as a script

# name: (b, heads, kv_heads, head_dim, r_k, r_v, scores given); r_k 0: RoPE, the scores arrive computed
CASES = {
    "opt-1.3b b=1": (1, 32, 32, 64, 712, 1328, False),
    "opt-1.3b b=16": (16, 32, 32, 64, 712, 1328, False),
    "llama-3-8b b=16": (16, 32, 8, 128, 0, 664, True),
}
SMALL_CASES = {  # the same layouts shrunk for the interpreter
    "opt-1.3b b=1": (1, 4, 4, 16, 40, 72, False),
    "opt-1.3b b=16": (2, 4, 4, 16, 40, 72, False),
    "llama-3-8b b=16": (2, 8, 2, 32, 0, 72, True),
}
SLOTS, FILLED = 1040, 1000
SMALL_SLOTS, SMALL_FILLED = 300, 280


def main(argv=None) -> int:
    args = device_parser(__doc__).parse_args(argv)
    interpret_on_cpu(args.device)
    import torch

    from tmps.kernels import latent_decode as ld

    if cuda_unusable("latent_decode_check", args.device):
        return 2
    cases, slots, filled = (CASES, SLOTS, FILLED) if args.device == "cuda" else (SMALL_CASES, SMALL_SLOTS, SMALL_FILLED)
    tol = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 4e-2}  # max|err| / max|ref|, as c2's
    gen = torch.Generator(device=args.device).manual_seed(0)

    def rand(*shape, scale=1.0):
        return torch.randn(*shape, generator=gen, device=args.device, dtype=torch.float64) * scale

    def rel(out, ref):
        return ((out.double() - ref).abs().max() / ref.abs().max()).item() if torch.isfinite(out).all() \
            else float("inf")

    bad = 0
    print(f"{'case':<17} {'dtype':<9} {'config':<12} {'kernel err':>10} {'chain err':>10} {'tol':>7}  result")
    for name, (b, heads, kv_heads, head_dim, r_k, r_v, given) in cases.items():
        q64, ck64 = rand(b, heads, max(r_k, 1)), rand(b, slots, max(r_k, 1))
        s64, cv64 = rand(b, heads, slots, scale=3.0), rand(b, slots, r_v)
        vu64 = rand(kv_heads * head_dim, r_v, scale=r_v**-0.5)
        mask = (torch.arange(slots, device=args.device) < filled).view(1, 1, 1, slots).expand(b, 1, 1, slots)
        common = dict(mask=mask, scaling=head_dim**-0.5, heads=heads, q_len=1, head_dim=head_dim)
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            configs = [("fp32", None)] if dtype == torch.float32 else [("one-pass", ld._CONFIGS[0])]
            if dtype != torch.float32 and not given:  # RoPE scores arrive computed: scores-first is the same pass
                configs.append(("scores-first", ld._SCORES_FIRST_CONFIGS[1]))
            if dtype == torch.float16:  # the combine over 32-wide head_dim tiles
                configs.append(("split-d", ld._SPLIT_D_CONFIGS[0]))
            if dtype == torch.float16 and name == "opt-1.3b b=1":
                configs.append(("autotune", None))
            low = dict(q_latent=None if given else q64.to(dtype), scores=s64.float() if given else None,
                       c_k=None if given else ck64.to(dtype), c_v=cv64.to(dtype), v_up=vu64.to(dtype))
            exact = {k: None if v is None else v.double() for k, v in low.items()}
            ref = ld.latent_decode_attention_ref(**exact, **common)
            chain = rel(ld.latent_decode_attention_ref(**low, **common), ref)  # the torch chain in the dtype
            for label, config in configs:
                t0 = time.perf_counter()
                try:
                    out = ld.latent_decode_attention(**low, **common, config=config)
                    if args.device == "cuda":
                        torch.cuda.synchronize()
                    err = rel(out, ref)
                    ok = err <= tol[dtype]
                    verdict = "ok" if ok else "MISMATCH"
                except Exception as exc:  # noqa: BLE001: report and go on
                    ok, err, verdict = False, float("nan"), f"ERROR {type(exc).__name__}: {exc}"[:200]
                bad += not ok
                print(f"{name:<17} {str(dtype)[6:]:<9} {label:<12} {err:>10.2e} {chain:>10.2e} {tol[dtype]:>7.0e}  "
                      f"{verdict} ({time.perf_counter() - t0:.1f}s)", flush=True)
    print(f"latent decode check: {bad} failing case(s) on {args.device}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
