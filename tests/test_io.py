"""save/load: identical logits, atomic writes, and clear refusals of truncated, corrupt or newer files."""
import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM

import tmps

VOCAB = 64


def small_llama():
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def small_opt():
    cfg = OPTConfig(vocab_size=VOCAB, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                    max_position_embeddings=64, word_embed_proj_dim=32)
    return OPTForCausalLM(cfg).eval()


@pytest.fixture
def saved(tmp_path):
    model = tmps.compress(small_llama(), torch.randint(0, VOCAB, (4, 16)), ratio=0.5, progress=False)
    path = tmps.save(model, tmp_path / "model")
    return model, path


@pytest.mark.parametrize("make", [small_llama, small_opt])
@pytest.mark.parametrize("mode", ["kv", "weights"])
def test_roundtrip_identical_logits_and_report(tmp_path, make, mode):
    model = tmps.compress(make(), torch.randint(0, VOCAB, (4, 16)), mode=mode, ratio=0.5, progress=False)
    loaded = tmps.load(tmps.save(model, tmp_path / "m"))
    ids = torch.randint(0, VOCAB, (2, 10))
    assert torch.equal(loaded(ids).logits, model(ids).logits)
    assert tmps.report(loaded) == tmps.report(model)


def test_save_replaces_existing_folder_and_leaves_no_temporaries(saved, tmp_path):
    model, path = saved
    tmps.save(model, path)  # again, over the existing folder
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    meta = json.loads((path / "tmps.json").read_text())
    assert meta["format_version"] == 1 and len(meta["sha256"]) == 64


def test_truncated_tensors_refused(saved):
    _, path = saved
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        tmps.load(path)


def test_flipped_byte_refused(saved):
    _, path = saved
    data = bytearray((path / "model.safetensors").read_bytes())
    data[-10] ^= 0xFF
    (path / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="checksum"):
        tmps.load(path)


def test_newer_format_refused(saved):
    _, path = saved
    meta = json.loads((path / "tmps.json").read_text())
    meta["format_version"] = 99
    (path / "tmps.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="newer than this tmps reads"):
        tmps.load(path)


def test_corrupt_metadata_and_missing_files_refused(saved, tmp_path):
    _, path = saved
    (path / "tmps.json").write_text("{not json")
    with pytest.raises(ValueError, match="corrupt"):
        tmps.load(path)
    (path / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json is missing"):
        tmps.load(path)
    with pytest.raises(FileNotFoundError, match="no saved tmps model"):
        tmps.load(tmp_path / "nothing-here")


def test_saving_a_dense_model_is_refused(tmp_path):
    with pytest.raises(ValueError, match="not compressed"):
        tmps.save(small_llama(), tmp_path / "dense")
    assert not (tmp_path / "dense").exists()


def test_two_compressed_models_and_a_dense_one_do_not_interfere():
    """No state shared between modules: interleaved calls give each model's own outputs."""
    dense = small_llama()
    a = tmps.compress(small_llama(), torch.randint(0, VOCAB, (4, 16)), ratio=0.5, progress=False)
    b = tmps.compress(small_opt(), torch.randint(0, VOCAB, (4, 16)), mode="weights", ratio=0.4, progress=False)
    ids = torch.randint(0, VOCAB, (2, 9))
    alone = [m(ids).logits for m in (a, b, dense)]
    for _ in range(2):
        for m, ref in zip((b, dense, a), (alone[1], alone[2], alone[0])):
            assert torch.equal(m(ids).logits, ref)


def test_compression_is_bit_identical_across_runs():
    calib = torch.randint(0, VOCAB, (4, 16))
    states = []
    for _ in range(2):
        torch.manual_seed(1)
        model = tmps.compress(small_llama(), calib, mode="weights", ratio=0.5, progress=False)
        states.append(model.state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
