"""The ``tmps`` command line on a tiny random Llama with a word-level tokenizer, all offline.

Most commands run in-process through ``tmps.cli.main`` (fast); ``python -m tmps`` is checked once
through a subprocess.
"""
from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import subprocess
import sys

import pytest
import torch

import tmps
from tmps.cli import build_parser, main

WORDS = [f"w{i}" for i in range(40)]
SPECIALS = ["[UNK]", "<s>", "</s>"]
SEQ = ["--calib-seq-len", "32", "--calib-tokens", "256"]


def make_tokenizer():
    """A fast word-level tokenizer built offline: one id per word of ``WORDS``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(SPECIALS + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", bos_token="<s>", eos_token="</s>")


def make_text(n_words: int, seed: int) -> str:
    """Words from a sparse random Markov chain, so that the text has structure to learn."""
    gen = torch.Generator().manual_seed(seed)
    nxt = torch.randint(0, len(WORDS), (len(WORDS), 3), generator=gen)
    word, out = 0, []
    for _ in range(n_words):
        out.append(WORDS[word])
        word = int(nxt[word, torch.randint(0, 3, (1,), generator=gen)])
    return " ".join(out)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A folder with ``llama/`` (tiny LlamaForCausalLM + tokenizer), ``gpt2/`` (unsupported) and texts."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("cli")
    tokenizer = make_tokenizer()
    vocab = len(SPECIALS) + len(WORDS)
    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                         bos_token_id=1, eos_token_id=2, pad_token_id=0))
    llama.save_pretrained(root / "llama")
    tokenizer.save_pretrained(root / "llama")
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_embd=32, n_layer=1, n_head=2, n_positions=64))
    gpt2.save_pretrained(root / "gpt2")
    tokenizer.save_pretrained(root / "gpt2")
    (root / "train.txt").write_text(make_text(1200, seed=1))
    (root / "test.txt").write_text(make_text(400, seed=2))
    return root


@pytest.fixture(scope="module")
def compressed(workdir):
    """``tmps compress`` of the tiny Llama, once for the module: (folder, captured stdout)."""
    out = workdir / "kv50"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(["compress", str(workdir / "llama"), "--out", str(out), "--ratio", "0.5",
                   "--calib", str(workdir / "train.txt"), *SEQ, "--quiet"])
    assert rc == 0
    return out, buf.getvalue()


def run_main(argv, capsys):
    rc = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def assert_one_line_error(rc, err, *fragments):
    assert rc == 2
    lines = [line for line in err.strip().splitlines() if "it/s]" not in line]  # transformers' loading bars
    assert len(lines) == 1, err
    assert lines[0].startswith("tmps: error: ")
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


# ----------------------------------------------------------------------------------- compress


def test_compress_writes_a_loadable_model_with_tokenizer(workdir, compressed):
    out, stdout = compressed
    assert (out / "tmps.json").is_file() and (out / "tokenizer").is_dir()
    assert "total" in stdout and f"wrote {out}" in stdout  # the report, then the save
    model = tmps.load(out)
    assert tmps.is_compressed(model)
    assert model.tmps_info["config"]["ratio"] == 0.5
    assert tmps.summary(model.tmps_info)["kv_cache_kept"] < 1.0
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out / "tokenizer")
    ids = tok("w1 w2 w3", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits
    assert torch.isfinite(logits).all()


def test_compress_passes_rank_multiple_through(workdir, compressed, capsys):
    out = workdir / "kv50-m1"
    rc, _, err = run_main(["compress", workdir / "llama", "--out", out, "--ratio", "0.5", "--rank-multiple", "1",
                           "--calib", workdir / "train.txt", *SEQ, "--quiet"], capsys)
    assert rc == 0, err
    assert tmps.load(out).tmps_info["config"]["rank_multiple"] == 1
    assert tmps.load(compressed[0]).tmps_info["config"]["rank_multiple"] == 8  # the default


def test_compress_weights_mode_samples_calibration_from_the_model(workdir, capsys):
    out = workdir / "w-sampled"
    rc, stdout, err = run_main(["compress", workdir / "llama", "--out", out, "--mode", "weights", "--method", "svd",
                                "--ratio", "0.6", "--calib-tokens", "64", "--calib-seq-len", "16", "--quiet"], capsys)
    assert rc == 0, err
    assert tmps.load(out).tmps_info["config"]["mode"] == "weights"


def test_report_prints_the_saved_table(compressed, capsys):
    out, _ = compressed
    rc, stdout, _ = run_main(["report", out], capsys)
    assert rc == 0
    assert "LlamaForCausalLM" in stdout and "mode=kv" in stdout and "total" in stdout
    assert tmps.report(tmps.load(out)) in stdout
    rc, stdout, _ = run_main(["report", out, "--json"], capsys)
    assert rc == 0 and 0 < json.loads(stdout)["kv_cache_kept"] < 1


def test_report_reads_a_save_pretrained_folder(compressed, workdir, capsys):
    out, _ = compressed
    model = tmps.load(out)
    model.save_pretrained(workdir / "pretrained")
    rc, stdout, _ = run_main(["report", workdir / "pretrained"], capsys)
    assert rc == 0 and "saved by save_pretrained" in stdout and "LlamaForCausalLM" in stdout
    assert tmps.report(model) in stdout


# ---------------------------------------------------------------------------------------- eval


def test_eval_compressed_against_dense_writes_json(workdir, compressed, capsys):
    out, _ = compressed
    result_path = workdir / "eval.json"
    rc, stdout, err = run_main(["eval", out, "--text", workdir / "test.txt", "--seq-len", "32", "--max-windows", "4",
                                "--compare-dense", workdir / "llama", "--speed-repeats", "1", "--json", result_path,
                                "--quiet"], capsys)
    assert rc == 0, err
    assert "perplexity" in stdout and "x dense" in stdout
    result = json.loads(result_path.read_text())
    assert result["windows"] == 4 and result["seq_len"] == 32 and result["compressed"]
    for ppl in (result["perplexity"], result["dense"]["perplexity"]):
        assert math.isfinite(ppl) and 1.0 < ppl < 10 * len(WORDS)
    assert result["ppl_vs_dense"] == pytest.approx(result["perplexity"] / result["dense"]["perplexity"])
    assert result["tokens_per_second"] > 0 and 0 < result["kv_cache_kept"] < 1


def test_eval_of_a_dense_folder_matches_tmps_evaluate(workdir, capsys):
    from transformers import AutoModelForCausalLM

    from tmps.evaluate import perplexity_of_text

    rc, _, err = run_main(["eval", workdir / "llama", "--text", workdir / "test.txt", "--seq-len", "32",
                           "--max-windows", "3", "--speed-windows", "0", "--json", workdir / "dense.json", "-q"], capsys)
    assert rc == 0, err
    model = AutoModelForCausalLM.from_pretrained(workdir / "llama").eval()
    expected = perplexity_of_text(model, make_tokenizer(), (workdir / "test.txt").read_text().strip(), seq_len=32,
                                  max_windows=3, progress=False)
    assert json.loads((workdir / "dense.json").read_text())["perplexity"] == pytest.approx(expected, rel=1e-5)


# --------------------------------------------------------------------------------------- sweep


def test_sweep_writes_csv_json_png(workdir, capsys):
    prefix = workdir / "sweep" / "frontier"
    rc, stdout, err = run_main(["sweep", workdir / "llama", "--ratios", "0.75", "0.5", "--methods", "tucker-mps", "svd",
                                "eigen", "--modes", "kv", "weights", "--text", workdir / "train.txt", *SEQ,
                                "--seq-len", "32", "--max-windows", "4", "--out", prefix, "-q"], capsys)
    assert rc == 0, err
    data = json.loads(prefix.with_suffix(".json").read_text())
    rows = data["rows"]
    # dense + (kv: 3 methods, weights: 2 methods, eigen skipped) x 2 ratios
    assert [(r["mode"], r["method"]) for r in rows[:1]] == [("dense", "dense")]
    assert len(rows) == 1 + (3 + 2) * 2
    assert {(r["mode"], r["method"]) for r in rows[1:]} == {
        ("kv", "tucker-mps"), ("kv", "svd"), ("kv", "eigen"), ("weights", "tucker-mps"), ("weights", "svd")}
    assert all(math.isfinite(r["ppl"]) for r in rows)
    assert all(r["kv_cache_kept"] < 1 for r in rows[1:] if r["mode"] == "kv")
    assert all(r["qkv_parameters_kept"] < 1 for r in rows[1:] if r["mode"] == "weights")
    # calibration and evaluation come from disjoint parts of the text
    assert data["meta"]["calibration_windows"] == [8, 32] and data["meta"]["evaluation_windows"] == [4, 32]
    with open(prefix.with_suffix(".csv")) as f:
        table = list(csv.DictReader(f))
    assert len(table) == len(rows) and float(table[0]["ppl"]) == pytest.approx(rows[0]["ppl"])
    png = prefix.with_suffix(".png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000


def test_plot_frontier_draws_rows(tmp_path):
    from tmps.cli import plot_frontier

    rows = [{"mode": "dense", "method": "dense", "ppl": 10.0, "kv_cache_kept": 1.0, "qkv_parameters_kept": 1.0},
            {"mode": "kv", "method": "svd", "ppl": 12.0, "kv_cache_kept": 0.5, "qkv_parameters_kept": 0.9},
            {"mode": "kv", "method": "svd", "ppl": 15.0, "kv_cache_kept": 0.3, "qkv_parameters_kept": 0.8}]
    png = plot_frontier(rows, tmp_path / "f.png").read_bytes()
    assert png.startswith(b"\x89PNG") and int.from_bytes(png[16:20], "big") == 1320  # two panels of 5.5 in


def test_plot_frontier_of_weights_mode_alone_draws_the_parameter_panel_only(tmp_path):
    """Every weights-mode point keeps the whole KV cache: a KV panel would stack them on one vertical line."""
    from tmps.cli import plot_frontier

    rows = [{"mode": "dense", "method": "dense", "ppl": 10.0, "kv_cache_kept": 1.0, "qkv_parameters_kept": 1.0},
            {"mode": "weights", "method": "svd", "ppl": 12.0, "kv_cache_kept": 1.0, "qkv_parameters_kept": 0.75}]
    png = plot_frontier(rows, tmp_path / "f.png").read_bytes()
    assert int.from_bytes(png[16:20], "big") == 660


# -------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("argv, fragments", [
    (["compress", "{root}/missing-model", "--out", "{root}/x"], ["no model at", "Hugging Face model folder"]),
    (["compress", "{root}/nothing.gguf", "--out", "{root}/x"], ["nothing.gguf"]),
    (["compress", "{root}/llama", "--out", "{root}/x", "--calib", "{root}/missing.txt"], ["no calibration text at"]),
    (["eval", "{root}/llama", "--text", "{root}/missing.txt"], ["no text file at"]),
    (["report", "{root}/llama"], ["no tmps.json"]),
    (["compress", "{root}/llama", "--out", "{root}/x", "--ratio", "1.5"], ["--ratio", "outside (0, 1]"]),
    (["compress", "{root}/llama", "--out", "{root}/x", "--ratio", "0.5", "--mps-eps", "0.9"], ["one rank rule"]),
    (["compress", "{root}/llama", "--out", "{root}/x", "--method", "eigen", "--mode", "weights"], ["mode='kv'"]),
    (["compress", "{root}/llama", "--out", "{root}/x", "--device", "cuda:7"], ["--device cuda:7"]),
    (["compress", "{root}/llama", "--out", "{root}/x", "--rank-multiple", "0"], ["--rank-multiple"]),
    (["eval", "{root}/llama", "--text", "{root}/test.txt", "--seq-len", "4096"], ["--seq-len 4096", "128 positions"]),
    (["sweep", "{root}/llama", "--text", "{root}/test.txt", "--out", "{root}/s", "--methods", "lora"], ["--methods"]),
])
def test_user_mistakes_are_one_line_and_exit_2(workdir, capsys, argv, fragments):
    rc, _, err = run_main([a.format(root=workdir) for a in argv], capsys)
    assert_one_line_error(rc, err, *fragments)


def test_unsupported_model_names_the_supported_types(workdir, capsys):
    rc, _, err = run_main(["compress", workdir / "gpt2", "--out", workdir / "g", "--calib-tokens", "32",
                           "--calib-seq-len", "16", "-q"], capsys)
    assert_one_line_error(rc, err, "gpt2", "llama", "opt")
    assert not (workdir / "g").exists()


def test_compressing_a_compressed_folder_is_refused(workdir, compressed, capsys):
    out, _ = compressed
    rc, _, err = run_main(["compress", out, "--out", workdir / "again", "-q"], capsys)
    assert_one_line_error(rc, err, "already compressed")


def test_no_gpu_for_bench_or_compress(workdir, capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    rc, _, err = run_main(["bench", "--device", "cuda"], capsys)
    assert_one_line_error(rc, err, "no CUDA GPU")
    rc, _, err = run_main(["compress", workdir / "llama", "--out", workdir / "c", "--device", "cuda"], capsys)
    assert_one_line_error(rc, err, "--device cpu")


def test_debug_shows_the_traceback(workdir):
    with pytest.raises(FileNotFoundError):
        main(["--debug", "report", str(workdir)])


# ---------------------------------------------------------------------------------------- help


@pytest.mark.parametrize("command", ["compress", "eval", "sweep", "demo", "report", "bench"])
def test_every_command_has_help_with_examples(command, capsys):
    assert main([command, "--help"]) == 0
    text = capsys.readouterr().out
    assert f"usage: tmps {command}" in text and "examples:" in text and f"tmps {command}" in text.split("examples:")[1]


def test_every_subcommand_is_in_the_parser():
    choices = build_parser()._subparsers._group_actions[0].choices
    assert set(choices) == {"compress", "eval", "sweep", "demo", "report", "bench"}


def test_python_dash_m_tmps(workdir):
    """The module entry point, in a fresh interpreter: --help, then a hub name that cannot be had offline."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "tmps", "--help"], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0 and "compress" in proc.stdout and "sweep" in proc.stdout
    proc = subprocess.run([sys.executable, "-m", "tmps", "compress", "no-such-org/no-such-model", "--out",
                           str(workdir / "hub")], capture_output=True, text=True, env=env, timeout=120)
    assert_one_line_error(proc.returncode, proc.stderr, "no-such-org/no-such-model", "hub", "local model folder")


# ------------------------------------------------------------------------------- named models


def test_named_models_are_the_fetchable_ones():
    from tmps import assets, cli

    assert sorted(cli.NAMED_MODELS) == sorted(assets.REAL_MODELS)


def test_a_named_model_is_fetched_then_loaded(workdir, monkeypatch):
    """``gemma3-270m`` resolves to its fetcher's file, loaded as a GGUF (both stand-ins here: no download)."""
    from transformers import AutoModelForCausalLM

    from tmps import assets, cli

    fetched, loaded = [], []
    monkeypatch.setitem(assets.REAL_MODELS, "gemma3-270m",
                        (lambda: fetched.append(1) or workdir / "g.gguf", "a stand-in"))

    def load_gguf(path, dtype):
        loaded.append((path, dtype))
        return AutoModelForCausalLM.from_pretrained(workdir / "llama"), make_tokenizer()

    monkeypatch.setattr(assets, "load_gguf_model", load_gguf)
    model, tok = cli.load_model("gemma3-270m")
    assert fetched == [1] and loaded == [(workdir / "g.gguf", torch.float32)]
    assert type(model).__name__ == "LlamaForCausalLM" and not model.training and tok is not None


def test_text_windows_start_with_bos_where_the_tokenizer_adds_it(workdir):
    """As Gemma's tokenizer does; the word-level one of these tests adds none and its windows are the text's."""
    from tokenizers import processors
    from transformers import AutoModelForCausalLM

    from tmps import cli

    model = AutoModelForCausalLM.from_pretrained(workdir / "llama")
    plain = make_tokenizer()
    with_bos = make_tokenizer()
    with_bos._tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    text = make_text(100, seed=3)
    ids = plain(text)["input_ids"]
    windows = cli._text_windows(plain, model, text, 16, 3, "evaluation", "--seq-len")
    assert windows.flatten().tolist() == ids[:48]
    windows = cli._text_windows(with_bos, model, text, 16, 3, "evaluation", "--seq-len")
    assert windows[:, 0].tolist() == [1, 1, 1] and windows[:, 1:].tolist() == [ids[k:k + 15] for k in (0, 16, 32)]
