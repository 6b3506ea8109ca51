"""Device launches of one static-cache decode step: dense, kv mode on the torch path, kv mode with the kernels.

    python benchmarks/decode_launches.py              # CPU: the kernels in Triton's interpreter
    python benchmarks/decode_launches.py --device cuda

At decode sizes every launch costs a few microseconds whatever its work, so the count is what a
CUDA-graph replay of a step pays beyond its bytes. Models: 2-layer OPT and Llama (RoPE, GQA) with
random weights, sdpa attention, kv mode at ratio 0.5 (``tmps.compress`` on random token ids); one
greedy step after a 9-token prefill into a ``StaticCache``. Counted: the aten ops that launch a
device kernel (views and allocations left out, :data:`NO_KERNEL`) plus the Triton launches of
``tmps.kernels``; inside a Triton launch nothing is recorded (under the interpreter a launch runs
torch ops of its own that the GPU does not). ``tests/kernels/test_latent_decode.py`` asserts the
ordering this prints: kv with the kernels below dense, the torch path above.
"""
from __future__ import annotations

import contextlib
import copy
import importlib
import sys

# Ops that launch no device kernel: views, allocations, dtype queries, the CPU scalar of a where().
NO_KERNEL = ("view", "expand", "permute", "transpose", "slice", "alias", "t.default", "select", "unsqueeze",
             "squeeze", "detach", "as_strided", "empty", "reshape", "_unsafe_view", "lift_fresh", "scalar_tensor",
             "promote_types", "unbind", "split")
TRITON_KERNELS = [("fused_projection", "_fused_factored_projection_kernel"), ("latent_decode", "_partials_kernel"),
                  ("latent_decode", "_combine_kernel"), ("latent_scores", "_latent_rope_scores_kernel")]
VARIANTS = (("dense", None), ("kv torch", "torch"), ("kv triton", "triton"))
LAYERS = 2


def recorder():
    """A TorchDispatchMode recording the aten ops run inside it (``.ops``) and, within
    :func:`counting_kernels`, the Triton launches (``.triton``)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Record(TorchDispatchMode):
        paused = False  # set while a Triton kernel runs

        def __init__(self):
            super().__init__()
            self.ops, self.triton = [], 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if not self.paused:
                self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

        def kernel_ops(self, no_kernel=NO_KERNEL):
            return [op for op in self.ops if not any(name in op for name in no_kernel)]

        def launches(self, no_kernel=NO_KERNEL):
            return len(self.kernel_ops(no_kernel)) + self.triton

    return Record()


@contextlib.contextmanager
def counting_kernels(record):
    """Every Triton kernel of tmps.kernels stands in for itself: ``kernel[grid](...)`` counts one launch
    in ``record.triton`` and pauses the recording while it runs."""

    class Counted:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            def launch(*a, **k):
                record.triton += 1
                record.paused = True
                try:
                    return self.kernel[grid](*a, **k)
                finally:
                    record.paused = False
            return launch

    with replaced_kernels(Counted):
        yield record


@contextlib.contextmanager
def replaced_kernels(stand_in):
    """Every Triton kernel of tmps.kernels (:data:`TRITON_KERNELS`) is ``stand_in(kernel)`` inside the
    block, and itself again after it (the launchers look each up at every launch)."""
    modules = [importlib.import_module(f"tmps.kernels.{name}") for name, _ in TRITON_KERNELS]
    real = [getattr(module, attr) for module, (_, attr) in zip(modules, TRITON_KERNELS)]
    for module, (_, attr), kernel in zip(modules, TRITON_KERNELS, real):
        setattr(module, attr, stand_in(kernel))
    try:
        yield
    finally:
        for module, (_, attr), kernel in zip(modules, TRITON_KERNELS, real):
            setattr(module, attr, kernel)


def tiny_model(arch: str):
    """A ``LAYERS``-layer dense model (eval, sdpa) with random weights."""
    from transformers import LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM

    if arch == "opt":
        cfg = OPTConfig(vocab_size=64, hidden_size=32, ffn_dim=64, num_hidden_layers=LAYERS, num_attention_heads=4,
                        max_position_embeddings=64, word_embed_proj_dim=32, attn_implementation="sdpa")
        return OPTForCausalLM(cfg).eval()
    cfg = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=LAYERS, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, attn_implementation="sdpa")
    return LlamaForCausalLM(cfg).eval()


def step_launches(arch: str, device: str, seed: int = 0) -> dict:
    """``{variant: launches}`` of one static-cache decode step for ``dense``, ``kv torch``, ``kv triton``."""
    import torch
    from transformers import StaticCache

    import tmps
    from tmps.compat import cache_keyword

    torch.manual_seed(seed)
    dense = tiny_model(arch)
    kv = tmps.compress(copy.deepcopy(dense), torch.randint(0, 64, (4, 16)), mode="kv", ratio=0.5, progress=False)
    dense, kv = dense.to(device), kv.to(device)
    ids = torch.randint(0, 64, (2, 9), device=device)
    launches = {}
    for name, backend in VARIANTS:
        model = dense if backend is None else kv
        if backend is not None:
            tmps.set_paths(model, backend=backend)
        kw = {cache_keyword(model): StaticCache(config=model.config, max_cache_len=32)}
        with torch.no_grad():
            nxt = model(ids, **kw, use_cache=True).logits[:, -1:].argmax(-1)
            with counting_kernels(recorder()) as record, record:
                model(nxt, **kw, use_cache=True)
        launches[name] = record.launches()
    return launches


def main(argv=None) -> int:
    from _bench_common import device_parser, interpret_on_cpu  # here: tests load this file by its path

    args = device_parser(__doc__).parse_args(argv)
    interpret_on_cpu(args.device)
    import torch
    import transformers

    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {args.device}; "
          "launches of one static-cache decode step of a 2-layer model")
    print("| model | " + " | ".join(name for name, _ in VARIANTS) + " |")
    print("|---|" + "---|" * len(VARIANTS))
    for arch in ("opt", "llama"):
        launches = step_launches(arch, args.device)
        print(f"| {arch} | " + " | ".join(str(launches[name]) for name, _ in VARIANTS) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
