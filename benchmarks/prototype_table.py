"""The prototype's Tucker-MPS table, measured, with truncated SVD at the same parameter count.

For each matrix and each prototype configuration ``(mps_eps, hooi_ranks)`` in
``(0.99, [6, 6, 8])``, ``(0.95, [5, 5, 6])``, ``(0.90, [4, 4, 5])`` it runs :func:`tucker_mps` and
prints one markdown row: the Tucker ranks kept (requested ranks are clipped to the MPS ranks), the
MPS ranks, the 3-way shape, parameters kept, compression ratio (kept / dense parameters), and the
relative Frobenius error ``‖W − Ŵ‖_F / ‖W‖_F``. For fairness each row also gives plain truncated
SVD with ``rank = max(1, kept // (m + n))``: no more parameters than the Tucker-MPS keeps, except
that the rank is at least 1.

Matrices: a Gaussian 768 × 768 (seed 0), and SmolLM2-135M-Instruct's layer-0 ``q_proj`` weight
(576 × 576, from ``tmps.assets.load_smollm2``), skipped with a note if it cannot be loaded.

A second table times ours against tensorly (pytorch backend) once each on a Gaussian
3 × 768 × 768 tensor: ``hooi`` vs ``tucker(init="svd")`` with ranks [3, 384, 384], and ``tt_svd`` vs
``tensor_train`` with internal ranks [3, 384].

    python benchmarks/prototype_table.py [--out results/prototype_table.md] [--no-timing]
"""
from __future__ import annotations

import argparse
import datetime
import platform
import sys
import time
from pathlib import Path

import torch

from tmps.decompose import hooi, tt_svd, tucker_mps

CONFIGS = [(0.99, [6, 6, 8]), (0.95, [5, 5, 6]), (0.90, [4, 4, 5])]
TIMING_SHAPE = (3, 768, 768)
TIMING_TUCKER_RANKS = [3, 384, 384]
TIMING_TT_RANKS = [3, 384]


def relative_error(approx: torch.Tensor, exact: torch.Tensor) -> float:
    """``‖exact − approx‖_F / ‖exact‖_F``, accumulated in float64."""
    return float(torch.linalg.norm((approx - exact).double()) / torch.linalg.norm(exact.double()))


def truncated_svd_error(matrix: torch.Tensor, rank: int) -> float:
    """Relative Frobenius error of the best rank-``rank`` approximation (Eckart-Young), from the spectrum."""
    s = torch.linalg.svdvals(matrix.double())
    return float(torch.sqrt(s[rank:].pow(2).sum() / s.pow(2).sum()))


def gaussian_matrix() -> tuple[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return "Gaussian 768×768 (seed 0)", torch.randn(768, 768, generator=gen)


def smollm2_q_proj() -> tuple[str, torch.Tensor]:
    """SmolLM2-135M-Instruct layer 0 ``q_proj.weight`` (576 × 576), float32."""
    from tmps.assets import load_smollm2

    model, _ = load_smollm2(dtype=torch.float32)
    weight = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    m, n = weight.shape
    return f"SmolLM2-135M L0 q_proj {m}×{n}", weight


def _fmt_ranks(ranks) -> str:
    return "[" + ", ".join(str(int(r)) for r in ranks) + "]"


def prototype_rows(name: str, matrix: torch.Tensor) -> list[list[str]]:
    """One row per configuration in ``CONFIGS`` for ``matrix``."""
    m, n = matrix.shape
    rows = []
    for eps, asked in CONFIGS:
        result = tucker_mps(matrix, mps_eps=eps, hooi_ranks=asked)
        kept = result.num_parameters()
        ranks = _fmt_ranks(result.ranks)
        if list(result.ranks) != asked:
            ranks = f"{_fmt_ranks(asked)} → {ranks}"
        svd_rank = max(1, kept // (m + n))
        rows.append([
            name, f"{eps:.2f}", ranks, _fmt_ranks(result.mps_ranks),
            "×".join(map(str, result.tensor_shape)), f"{kept:,}", f"{result.compression_ratio():.5f}",
            f"{relative_error(result.to_matrix(), matrix):.4f}",
            str(svd_rank), f"{svd_rank * (m + n):,}", f"{truncated_svd_error(matrix, svd_rank):.4f}",
        ])
    return rows


def timing_rows() -> list[list[str]]:
    """Ours vs tensorly, one run each, on a Gaussian ``TIMING_SHAPE`` float32 tensor."""
    import tensorly as tl
    from tensorly.decomposition import tensor_train, tucker

    tl.set_backend("pytorch")
    x = torch.randn(TIMING_SHAPE, generator=torch.Generator().manual_seed(0))

    def timed(fn):
        start = time.perf_counter()
        out = fn()
        return out, time.perf_counter() - start

    shape = "×".join(map(str, TIMING_SHAPE))
    rows = []
    ours, t_ours = timed(lambda: hooi(x, TIMING_TUCKER_RANKS))
    ref, t_ref = timed(lambda: tucker(x, rank=TIMING_TUCKER_RANKS, init="svd"))
    rows.append(["Tucker: hooi vs tucker(init='svd')", shape, _fmt_ranks(TIMING_TUCKER_RANKS),
                 f"{t_ours:.2f}", f"{t_ref:.2f}", f"{t_ours / t_ref:.2f}",
                 f"{relative_error(ours.to_tensor(), x):.5f}", f"{relative_error(tl.tucker_to_tensor(ref), x):.5f}"])
    ours, t_ours = timed(lambda: tt_svd(x, max_rank=TIMING_TT_RANKS))
    ref, t_ref = timed(lambda: tensor_train(x, rank=[1, *TIMING_TT_RANKS, 1]))
    rows.append(["TT: tt_svd vs tensor_train", shape, _fmt_ranks(TIMING_TT_RANKS),
                 f"{t_ours:.2f}", f"{t_ref:.2f}", f"{t_ours / t_ref:.2f}",
                 f"{relative_error(ours.to_tensor(), x):.5f}", f"{relative_error(tl.tt_to_tensor(ref), x):.5f}"])
    return rows


def markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="also write the tables to this markdown file")
    parser.add_argument("--no-timing", action="store_true", help="skip the ours-vs-tensorly timing table")
    args = parser.parse_args(argv)

    host = (f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads, float32, {datetime.date.today().isoformat()}")
    sections = [f"Host: {host}"]

    rows, notes = prototype_rows(*gaussian_matrix()), []
    try:
        rows += prototype_rows(*smollm2_q_proj())
    except Exception as err:  # noqa: BLE001 - a missing module, network or GGUF error only drops a row
        note = f"SmolLM2 q_proj rows skipped: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        print(note, file=sys.stderr)
        notes.append(note)
    header = ["matrix", "mps_eps", "Tucker ranks", "MPS ranks", "tensor shape", "params kept",
              "compression ratio", "rel. Frobenius error", "SVD rank", "SVD params", "SVD error"]
    sections.append("## Tucker-MPS (prototype configurations) vs truncated SVD at the same parameter count\n\n"
                    + markdown(header, rows)
                    + "\n\nCompression ratio = parameters kept / dense parameters; SVD rank = "
                      "max(1, params kept // (m + n)), so SVD keeps at most as many parameters unless clamped to rank 1. Requested Tucker ranks are clipped to the MPS ranks."
                    + "".join(f"\n\nNote: {n}" for n in notes))

    if not args.no_timing:
        header = ["decomposition", "tensor", "ranks", "tmps (s)", "tensorly (s)", "tmps / tensorly",
                  "tmps error", "tensorly error"]
        sections.append("## Ours vs tensorly, one run each (Gaussian, seed 0)\n\n" + markdown(header, timing_rows()))

    text = "\n\n".join(sections) + "\n"
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text, encoding="utf-8")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
