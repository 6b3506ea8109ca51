"""tmps.compress at full rank: logits against dense, with the Triton kernels forced and counted.

    python benchmarks/full_rank_check.py --device cuda     # gpu_check's c3: the compiled kernels
    python benchmarks/full_rank_check.py                   # CPU: Triton's interpreter, ~80 s

Tiny random Llama (8 / 2 heads, RoPE) and OPT models (hidden 256, 2 layers; also Qwen2, Llama's
layout with random q/k/v biases, by ``--cases qwen2:float32``, Gemma 3, random q/k norms and a
16-token window on its first layer, by ``--cases gemma3:float32``, and Phi-3, Q/K/V fused into one
layer with Phi-4-mini's partial RoPE (24 of 32 features rotated), by ``--cases phi3:float32``), compressed in weights
and kv mode at full rank (``hooi_ranks=[hidden]``, ``ratio=1.0``), so the compressed model must give
the dense logits. With every projection's backend forced to "triton", per case it checks:

- the prefill logits against dense, and the fused Q/K/V kernel called once per layer (kv mode too:
  no in factor, ``z = x``);
- the same prefill through the torch path, against the kernel path;
- (fp32) a prefill and 3 cached greedy steps against dense; in kv mode the latent decode kernel
  called once per layer and step, on Llama the RoPE key-score kernel too (never under partial RoPE,
  which it does not rotate: Phi-3's scores take the torch chain); and in kv mode the same
  steps under ``torch.compile(fullgraph=True)`` (the kernels as custom ops: 4 projection calls per
  layer, the prefill's and the steps').

Exit status 1 if any check fails or a case raises.
"""
from __future__ import annotations

import copy
import sys

from _bench_common import count_kernel_calls, cuda_unusable, device_parser, interpret_on_cpu  # benchmarks/ is sys.path[0] when run as a script

VOCAB, HIDDEN, LAYERS, STEPS = 512, 256, 2, 3
CASES = ("llama:float32", "opt:float32", "llama:float16")
ARCHS = ("llama", "opt", "qwen2", "gemma3", "phi3")
ROPE_ARCHS = ("llama", "qwen2", "gemma3", "phi3")
PARTIAL_ROPE_ARCHS = ("phi3",)  # the key-score kernel rotates whole heads: these keep the torch chain
TOLERANCE = {"float32": 1e-3, "float16": 3e-2, "bfloat16": 1e-1}  # relative Frobenius error of the logits


def parse_args(argv=None):
    p = device_parser(__doc__)
    p.add_argument("--cases", nargs="+", default=list(CASES),
                   help=f"arch:dtype pairs, arch one of {ARCHS}, dtype float32, float16 or bfloat16 (default {CASES})")
    p.add_argument("--modes", nargs="+", choices=("weights", "kv"), default=["weights", "kv"])
    args = p.parse_args(argv)
    for case in args.cases:
        arch, _, dtype = case.partition(":")
        if arch not in ARCHS or dtype not in TOLERANCE:
            p.error(f"--cases: {case!r} is not arch:dtype with arch one of {ARCHS} and dtype one of {tuple(TOLERANCE)}")
    return args


def build(arch: str):
    import torch
    from transformers import (Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM, OPTConfig,
                              OPTForCausalLM, Phi3Config, Phi3ForCausalLM, Qwen2Config, Qwen2ForCausalLM)

    if arch == "gemma3":  # per-head q/k norms: kv mode caches latents of the normalised keys
        model = Gemma3ForCausalLM(Gemma3TextConfig(
            vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=512, num_hidden_layers=LAYERS,
            num_attention_heads=8, num_key_value_heads=2, head_dim=32, query_pre_attn_scalar=32,
            sliding_window=16, layer_types=["sliding_attention", "full_attention"], max_position_embeddings=256,
            attn_implementation="sdpa"))
        with torch.no_grad():  # HF initialises the norms to the identity, which would leave them untested
            for layer in model.model.layers:
                for norm in (layer.self_attn.q_norm, layer.self_attn.k_norm):
                    norm.weight.uniform_(-0.5, 0.5)
        return model
    if arch == "phi3":  # Q/K/V fused in one qkv_proj; Phi-4-mini's partial RoPE
        return Phi3ForCausalLM(Phi3Config(
            vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=512, num_hidden_layers=LAYERS,
            num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=256, partial_rotary_factor=0.75,
            pad_token_id=0, bos_token_id=1, eos_token_id=2, attn_implementation="sdpa"))
    if arch in ROPE_ARCHS:
        config_class, model_class = (LlamaConfig, LlamaForCausalLM) if arch == "llama" else (Qwen2Config, Qwen2ForCausalLM)
        model = model_class(config_class(
            vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=512, num_hidden_layers=LAYERS,
            num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=256, attn_implementation="sdpa"))
        if arch == "qwen2":  # HF initialises the biases to zero, which would leave them untested
            with torch.no_grad():
                for layer in model.model.layers:
                    for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                        proj.bias.normal_(std=0.5)
        return model
    return OPTForCausalLM(OPTConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, ffn_dim=512, num_hidden_layers=LAYERS, num_attention_heads=8,
        max_position_embeddings=256, word_embed_proj_dim=HIDDEN, attn_implementation="sdpa"))


def rel(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def greedy(model, ids, steps=STEPS):
    """(batch, 1 + steps, vocab): the last logits of a prefill of ``ids`` and of ``steps`` cached greedy steps."""
    import torch
    from transformers import DynamicCache

    from tmps.compat import cache_keyword

    kw = {cache_keyword(model): DynamicCache()}
    logits = [model(ids, **kw, use_cache=True).logits[:, -1]]
    for _ in range(steps):
        nxt = logits[-1].argmax(-1, keepdim=True)
        logits.append(model(nxt, **kw, use_cache=True).logits[:, -1])
    return torch.stack(logits, 1)


def check_case(dense, mode, ids, calib, tol, calls, want, want_steps, arch):
    """(ok, findings) of one compressed copy of ``dense`` in ``mode`` against the dense outputs."""
    import torch

    import tmps

    full_rank = {"weights": {"hooi_ranks": [HIDDEN]}, "kv": {"ratio": 1.0}}[mode]
    model = tmps.compress(copy.deepcopy(dense), calib, mode=mode, progress=False, **full_rank)
    tmps.set_paths(model, backend="triton")  # the kernels, whatever "auto" would time faster at this size
    calls.update(dict.fromkeys(calls, 0))
    with torch.no_grad():
        got = model(ids).logits
    err = rel(got, want)
    launches = calls["projection"]
    findings = [f"logits rel err {err:.2e} (tol {tol:g}), fused kernel calls {launches}"]
    ok = err < tol and launches == LAYERS
    tmps.set_paths(model, backend="torch")
    with torch.no_grad():
        err_torch = rel(got, model(ids).logits)
    tmps.set_paths(model, backend="triton")
    findings.append(f"triton vs torch path rel {err_torch:.2e}")
    ok &= err_torch < tol
    if want_steps is None:
        return ok, findings
    calls.update(dict.fromkeys(calls, 0))
    with torch.no_grad():
        err_steps = rel(greedy(model, ids), want_steps)
    findings.append(f"prefill + {STEPS} cached steps rel {err_steps:.2e}")
    ok &= err_steps < tol
    if mode == "kv":  # decode over the latents: the fused latent decode, and with RoPE the key-score kernel
        if arch in ROPE_ARCHS:
            findings.append(f"latent score kernel calls {calls['scores']}")
            ok &= calls["scores"] == (0 if arch in PARTIAL_ROPE_ARCHS else STEPS * LAYERS)
        findings.append(f"latent decode kernel calls {calls['decode']}")
        ok &= calls["decode"] == STEPS * LAYERS
        torch._dynamo.reset()  # the same steps in one graph each, the kernels as custom ops
        calls.update(dict.fromkeys(calls, 0))
        with torch.no_grad():
            err_compiled = rel(greedy(torch.compile(model, backend="aot_eager", fullgraph=True), ids), want_steps)
        launches = calls["projection"]
        findings.append(f"torch.compile(fullgraph) rel {err_compiled:.2e}, fused kernel calls {launches}")
        ok &= err_compiled < tol and launches == (1 + STEPS) * LAYERS
    return ok, findings


def main(argv=None) -> int:
    args = parse_args(argv)
    interpret_on_cpu(args.device)
    import torch

    if cuda_unusable("full_rank_check", args.device):
        return 2
    calls = count_kernel_calls()
    torch.manual_seed(0)
    bad = 0
    for case in args.cases:
        arch, _, dtype_name = case.partition(":")
        dtype, tol = getattr(torch, dtype_name), TOLERANCE[dtype_name]
        dense = build(arch).to(args.device, dtype).eval()
        # More calibration tokens than HIDDEN: the Fisher metric weighs each token's input by its loss
        # gradient (a sequence's last token has none), and with 4 x 64 = HIDDEN tokens weights mode's
        # input moment fell short of full rank, which r_in = HIDDEN then keeps only in part
        calib = torch.randint(0, VOCAB, (8, 64), device=args.device)
        ids = torch.randint(0, VOCAB, (2, 33), device=args.device)
        with torch.no_grad():
            want = dense(ids).logits
            want_steps = greedy(dense, ids) if dtype == torch.float32 else None
        for mode in args.modes:
            try:
                ok, findings = check_case(dense, mode, ids, calib, tol, calls, want, want_steps, arch)
                verdict = "ok" if ok else "MISMATCH"
            except Exception as exc:  # noqa: BLE001: report and go on
                ok, findings, verdict = False, [f"{type(exc).__name__}: {exc}"[:300]], "ERROR"
            bad += not ok
            print(f"{arch:<6} {dtype_name:<8} {mode:<8} {verdict:<8} " + "; ".join(findings), flush=True)
    print(f"full-rank check: {bad} failing case(s) on {args.device}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
