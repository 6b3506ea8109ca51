"""Small helpers the benchmark scripts and pytest-benchmark suites share (imported as a sibling module).

Nothing is imported at module level beyond the standard library: some scripts must set
TRITON_INTERPRET before torch or Triton load.
"""
import os
import sys


def synced(fn):
    """``fn`` followed by a CUDA synchronize when a GPU is present, so a timer sees the kernels finish."""
    import torch

    def run():
        out = fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return out

    return run


def write_lines(path: str, lines: list) -> None:
    """Write a markdown table (or any lines) to ``path``, creating its folder."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def cuda_missing(script: str) -> bool:
    """True, after saying so on stderr, when torch sees no CUDA device (the caller then exits 2)."""
    import torch

    if torch.cuda.is_available():
        return False
    print(f"{script}: no CUDA device; this benchmark needs a GPU (run with --smoke for a CPU check of the script)",
          file=sys.stderr)
    return True
