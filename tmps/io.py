"""``save`` / ``load``: a compressed model as safetensors + JSON, loadable without the dense checkpoint.

A saved folder holds ``model.safetensors`` (every tensor, tied ones once), ``config.json`` (the
Hugging Face config) and ``tmps.json`` (format version, model class, compression config, the
shapes of every compressed layer's factors, per-layer report, and the SHA-256 of the tensors).
``save`` writes into a temporary folder and renames it into place, so a crash never leaves a
half-written model; ``load`` checks the version and the checksum before building anything.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
import transformers
from safetensors.torch import load_file, save_model

from .models.base import architecture_of
from .projection import FactoredProjection

FORMAT_VERSION = 1
TENSORS, CONFIG, META = "model.safetensors", "config.json", "tmps.json"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _layer_structure(attention) -> dict:
    qkv = attention.qkv
    return {
        "mode": attention.mode,
        # the factors' shapes, under the key files have always used (the factors were buffers until 2026-12)
        "buffers": {name: (list(p.shape) if p is not None else None) for name, p in qkv._parameters.items()},
        "k_up": list(attention.k_up.shape) if attention.k_up is not None else None,
        "v_up": list(attention.v_up.shape) if attention.v_up is not None else None,
        "k_down": list(attention.k_down.shape) if attention.k_down is not None else None,
    }


def structure_of(model) -> list[dict]:
    """Per decoder layer, what :func:`build_compressed_skeleton` needs to rebuild its compressed
    attention: the mode and the shapes of the factors and of the K/V bases."""
    arch = architecture_of(model)
    return [_layer_structure(arch.attention_of(layer)) for layer in arch.decoder_layers(model)]


def build_compressed_skeleton(model, structure: list[dict], dtype: torch.dtype, source: str) -> None:
    """Swap every attention of a dense ``model`` (in place) for compressed attention whose factors have
    the shapes ``structure`` records (:func:`structure_of`), uninitialised: the tensors are loaded next.
    ``source`` names where ``structure`` came from, for the error when its layers are not the model's."""
    from .compressor import assemble_attention

    arch = architecture_of(model)
    layers = arch.decoder_layers(model)
    if len(layers) != len(structure):
        raise ValueError(f"{source}: {len(structure)} compressed layers recorded but the config builds {len(layers)}")
    rotary = arch.rotary_embedding(model)
    for index, layer_meta in enumerate(structure):
        qkv = FactoredProjection.empty(layer_meta["buffers"], dtype)
        up = [torch.empty(s, dtype=dtype) if s is not None else None for s in (layer_meta["k_up"], layer_meta["v_up"])]
        down = layer_meta.get("k_down")  # absent from files written before kv mode took head norms
        attention = assemble_attention(arch, arch.attention_of(layers[index]), layer_meta["mode"], qkv, *up, rotary,
                                       dtype, torch.empty(down, dtype=dtype) if down is not None else None)
        arch.set_attention(layers, index, attention)


def save(model, path) -> Path:
    """Write a compressed ``model`` (or its ``torch.compile`` wrapper) to the folder ``path`` (created;
    replaced atomically if it exists)."""
    from .compressor import unwrap_compiled

    model = unwrap_compiled(model)
    info = getattr(model, "tmps_info", None)
    if info is None:
        raise ValueError("this model is not compressed by tmps; call tmps.compress(model) first "
                         "(a dense model is saved with model.save_pretrained)")
    structure = structure_of(model)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    backup = None
    try:
        save_model(model, str(tmp / TENSORS))
        (tmp / CONFIG).write_text(model.config.to_json_string())
        meta = {
            "format_version": FORMAT_VERSION,
            "tmps_version": __import__("tmps").__version__,
            "model_class": type(model).__name__,
            "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
            "compression": info["config"],
            "layers": info["layers"],
            "structure": structure,
            "sha256": _sha256(tmp / TENSORS),
        }
        (tmp / META).write_text(json.dumps(meta, indent=1))
        if path.exists():
            backup = Path(tempfile.mkdtemp(prefix=f".{path.name}.old.", dir=path.parent))
            os.replace(path, backup / "old")
            os.replace(tmp, path)
            shutil.rmtree(backup, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        # A failure between the two renames must not leave the previous model in the hidden backup.
        if backup is not None and (backup / "old").exists() and not path.exists():
            os.replace(backup / "old", path)
        if backup is not None:
            shutil.rmtree(backup, ignore_errors=True)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _read_meta(path: Path) -> dict:
    if not path.is_dir():
        raise FileNotFoundError(f"no saved tmps model at {path} (expected a folder written by tmps.save)")
    for name in (TENSORS, CONFIG, META):
        if not (path / name).is_file():
            raise FileNotFoundError(f"{path} is not a complete tmps model: {name} is missing")
    try:
        meta = json.loads((path / META).read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path / META} is corrupt ({exc}); save the model again") from exc
    version = meta.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ValueError(f"{path} was written in tmps format {version!r}, newer than this tmps reads "
                         f"({FORMAT_VERSION}); upgrade tmps")
    if _sha256(path / TENSORS) != meta.get("sha256"):
        raise ValueError(f"{path / TENSORS} does not match its recorded checksum: the file is truncated or corrupt")
    return meta


def recorded_compression(path: Path) -> dict | None:
    """``{"model_class", "dtype", "compression", "layers", "structure", ...}`` where ``path`` holds a
    compressed model saved with transformers' ``save_pretrained`` (its config.json records the
    compression, :mod:`tmps.pretrained`), else None."""
    try:
        config = json.loads((Path(path) / CONFIG).read_text())
    except (OSError, ValueError):
        return None
    recorded = config.get("quantization_config")
    if not isinstance(recorded, dict) or recorded.get("quant_method") != "tmps":
        return None
    return {"model_class": (config.get("architectures") or [None])[0],
            "dtype": config.get("dtype", config.get("torch_dtype")), **recorded}


def _from_pretrained(path: Path, recorded: dict, device):
    name = recorded["model_class"]
    model_class = getattr(transformers, name, None) if name else None
    if model_class is None:
        raise ValueError(f"{path / CONFIG} names no model class of the installed transformers ({name!r})")
    return model_class.from_pretrained(path).eval().to(device)


def load(path, device: str | torch.device = "cpu"):
    """Rebuild a model saved by :func:`save`: dense skeleton from its config, compressed layers, then the
    tensors. A folder written by ``save_pretrained`` instead (no tmps.json) loads through transformers'
    ``from_pretrained`` (:mod:`tmps.pretrained`)."""
    path = Path(path)
    recorded = None if (path / META).is_file() or not path.is_dir() else recorded_compression(path)
    if recorded is not None:
        return _from_pretrained(path, recorded, device)
    meta = _read_meta(path)
    config = transformers.AutoConfig.from_pretrained(path)
    model_class = getattr(transformers, meta["model_class"], None)
    if model_class is None:
        raise ValueError(f"{meta['model_class']} is not a class of the installed transformers")
    dtype = getattr(torch, meta["dtype"])
    model = model_class(config).to(dtype).eval()
    build_compressed_skeleton(model, meta["structure"], dtype, str(path))
    state = load_file(str(path / TENSORS))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if getattr(config, "tie_word_embeddings", False) and hasattr(model, "tie_weights"):
        # safetensors stores a tied tensor once, under either name: tie, then accept the other as missing.
        model.tie_weights()
        missing = [k for k in missing if not k.endswith(("lm_head.weight", "embed_tokens.weight"))]
    if missing or unexpected:
        raise ValueError(f"{path}: tensors do not match the recorded structure (missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]})")
    model.tmps_info = {"config": meta["compression"], "layers": meta["layers"]}
    return model.to(device)
