"""Tuned kernel choices kept on disk between processes (opt in: ``TMPS_TUNING_CACHE``).

The autotuners (each kernel's tile configs) and ``backend="auto"`` (kernel or torch chain, per
projection shape) time their candidates on first use, once per shape, and keep the winners in memory
only. A model whose layers keep different ranks has a shape per layer, and decode meets a new one
each time the context passes a power of two, so each new process pays the timing again. With
``TMPS_TUNING_CACHE`` set (a folder, or ``1`` for ``<asset cache>/tuning``, see
:func:`tmps.assets.cache_dir`), the winners are also written to a JSON file there and read back by
later processes, as Triton's ``autotune(cache_results=True)`` does for its own configs.

Off by default: timings depend on what else runs on the GPU, and the benchmarks time the tuning
itself. A file serves one software version: its name hashes the versions of torch, triton and
tmps and the kernels' source, so a changed kernel never reads another's choice. Entries are keyed
by the GPU's name, not its index. Several processes may write one file; each rewrites it whole
(atomically) with what it read plus its own entry, so a race can lose an entry, never corrupt the
file: it is a cache, and a lost entry is timed again.
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import os
import tempfile
import warnings
from pathlib import Path

import torch

ENV = "TMPS_TUNING_CACHE"
FORMAT = 1
_OFF = {"", "0", "false", "no", "off"}
_warned: set = set()


def cache_file() -> Path | None:
    """The JSON file this process reads and writes, or None when ``TMPS_TUNING_CACHE`` is unset or off."""
    setting = os.environ.get(ENV, "").strip()
    if setting.lower() in _OFF:
        return None
    if setting.lower() in {"1", "true", "yes", "on"}:
        from .assets import cache_dir

        folder = cache_dir() / "tuning"
    else:
        folder = Path(setting).expanduser()
    return folder / f"{software_fingerprint()}.json"


_FINGERPRINT: list = []


def software_fingerprint() -> str:
    """16 hex digits of a hash over the versions of torch, triton and tmps and the kernels' source
    files: what decides which config wins, besides the GPU (in each entry's key)."""
    if not _FINGERPRINT:
        from . import __version__

        digest = hashlib.sha256(f"torch {torch.__version__}|tmps {__version__}".encode())
        try:
            import triton

            digest.update(f"|triton {triton.__version__}".encode())
        except ImportError:  # no Triton: only the torch-chain choices exist
            digest.update(b"|no triton")
        spec = importlib.util.find_spec("tmps.kernels")
        if spec is not None and spec.submodule_search_locations:
            for folder in spec.submodule_search_locations:
                for source in sorted(Path(folder).glob("*.py")):
                    digest.update(source.name.encode() + source.read_bytes())
        _FINGERPRINT.append(digest.hexdigest()[:16])
    return _FINGERPRINT[0]


def _encode(part):
    """A JSON-able, process-independent form of one key element: a device by its GPU's name."""
    if isinstance(part, torch.device):
        if part.type == "cuda":
            return torch.cuda.get_device_name(part)
        return part.type
    if isinstance(part, torch.dtype):
        return str(part)
    if isinstance(part, (tuple, list)):
        return [_encode(p) for p in part]
    if part is None or isinstance(part, (bool, int, float, str)):
        return part
    raise TypeError(f"a tuning key holds {type(part).__name__}, which the tuning cache cannot store")


def _encoded_or_none(key) -> str | None:
    """The key as the file's JSON string; None (memory only) for a key the file cannot hold."""
    try:
        return json.dumps(_encode(key))
    except TypeError:
        return None


def _warn_once(what: str, path: Path, error: Exception) -> None:
    if (what, path) not in _warned:
        _warned.add((what, path))
        warnings.warn(f"tmps tuning cache: cannot {what} {path} ({error}); choices stay in memory "
                      f"(unset {ENV} to silence this)", RuntimeWarning, stacklevel=3)


def _read(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except (FileNotFoundError, NotADirectoryError):  # nothing stored yet (a write says why it cannot store)
        return {}
    except (OSError, ValueError) as error:
        _warn_once("read", path, error)
        return {}
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("tables"), dict):
        _warn_once("read", path, ValueError("not a tmps tuning file of this format"))
        return {}
    return data["tables"]


def _write_entry(path: Path, table: str, key: str, value: dict) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tables = _read(path)
        tables.setdefault(table, {})[key] = value
        handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        try:
            with os.fdopen(handle, "w", encoding="utf-8") as out:
                json.dump({"format": FORMAT, "tables": tables}, out, indent=1, sort_keys=True)
            os.replace(temporary, path)
        except BaseException:
            os.unlink(temporary)
            raise
    except OSError as error:
        _warn_once("write", path, error)


class TunedChoices(dict):
    """The winners of one tuner, ``key -> value`` (a frozen dataclass of type ``value_type``): a dict,
    which with ``TMPS_TUNING_CACHE`` set also looks up a key it lacks in that file, and writes each
    new entry there. ``table`` names the tuner in the file."""

    def __init__(self, table: str, value_type: type):
        super().__init__()
        self.table, self.value_type = table, value_type
        self._loaded: dict = {}  # file -> this table's entries as read

    def _entries(self, path: Path) -> dict:
        """This table's entries in ``path``, read once per process."""
        if path not in self._loaded:
            entries = _read(path).get(self.table)
            self._loaded[path] = entries if isinstance(entries, dict) else {}
        return self._loaded[path]

    @staticmethod
    def _location(key) -> tuple[Path | None, str | None]:
        """``(file, key as stored there)``; ``(None, None)`` when the cache is off or cannot hold ``key``."""
        path = cache_file()
        encoded = None if path is None else _encoded_or_none(key)
        return (path, encoded) if encoded is not None else (None, None)

    def _stored(self, key):
        path, encoded = self._location(key)
        if encoded is None:
            return None
        fields = self._entries(path).get(encoded)
        if not isinstance(fields, dict):
            return None
        try:
            value = self.value_type(**fields)
        except (TypeError, ValueError):  # written by another layout of the config: time it again
            return None
        dict.__setitem__(self, key, value)
        return value

    def get(self, key, default=None):
        value = dict.get(self, key)
        if value is None:
            value = self._stored(key)
        return default if value is None else value

    def __contains__(self, key) -> bool:
        return dict.__contains__(self, key) or self._stored(key) is not None

    def __getitem__(self, key):
        value = self.get(key)
        if value is None:
            raise KeyError(key)
        return value

    def __setitem__(self, key, value) -> None:
        dict.__setitem__(self, key, value)
        path, encoded = self._location(key)
        if encoded is not None:
            fields = dataclasses.asdict(value)
            self._entries(path)[encoded] = fields
            _write_entry(path, self.table, encoded, fields)
