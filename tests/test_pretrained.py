"""``save_pretrained`` / ``from_pretrained`` of compressed models (tmps.pretrained): transformers
rebuilds the compressed attention before it loads the factors, and gives the same logits."""
import copy
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache

import tmps
from tmps.pretrained import QUANT_METHOD

from test_architectures import gemma3, mixed_qwen2, qwen3
from test_compress import VOCAB, assert_unchanged, calib, llama, mistral, opt, qwen2, snapshot
from test_granite import granite
from test_latent_attention import greedy_steps
from test_moe import mixtral, qwen2_moe, qwen3_moe
from test_phi3 import phi3
from test_smollm3 import smollm3

# every supported model type (tmps.models.supported_model_types), Qwen2 with full and sliding layers mixed
BUILDERS = {"llama": llama, "opt": opt, "qwen3": qwen3, "gemma3": gemma3, "mistral": mistral, "qwen2": mixed_qwen2,
            "mixtral": mixtral, "qwen2_moe": qwen2_moe, "qwen3_moe": qwen3_moe, "phi3": phi3, "granite": granite,
            "smollm3": smollm3}


def compressed(build, mode, **kwargs):
    torch.manual_seed(0)
    return tmps.compress(build(), calib(), mode=mode, ratio=0.5, progress=False, **kwargs)


@pytest.mark.parametrize("mode", ["kv", "weights"])
@pytest.mark.parametrize("arch", list(BUILDERS))
def test_from_pretrained_gives_the_compressed_model(tmp_path, arch, mode):
    """Every factor back where it was (Qwen3 and Gemma 3: kv mode's k_down after the key norm; Phi-3:
    its fused qkv_proj replaced; the MoE models: experts as transformers converts them on load), the
    report, and the logits bit for bit, of one forward and of cached greedy steps."""
    model = compressed(BUILDERS[arch], mode)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(loaded) is type(model) and tmps.is_compressed(loaded)
    assert loaded.tmps_info == json.loads(json.dumps(model.tmps_info))
    want, got = model.state_dict(), loaded.state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    ids = torch.randint(0, VOCAB, (2, 9))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
        torch.testing.assert_close(greedy_steps(loaded, ids, 4, DynamicCache(config=loaded.config)),
                                   greedy_steps(model, ids, 4, DynamicCache(config=model.config)), rtol=0, atol=0)
    assert tmps.report(loaded) == tmps.report(model)


def test_config_json_records_the_compression(tmp_path):
    model = compressed(llama, "kv")
    model.save_pretrained(tmp_path)
    recorded = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert recorded["quant_method"] == QUANT_METHOD
    assert recorded["compression"]["mode"] == "kv" and len(recorded["structure"]) == 2
    assert recorded["layers"] == json.loads(json.dumps(model.tmps_info["layers"]))


def test_loaded_model_casts_trains_saves_and_refuses_recompression(tmp_path):
    """transformers marks a model its quantizer loaded as quantized and then refuses .half() and the
    Trainer; the factors are plain floating-point parameters, so tmps lifts that mark."""
    model = compressed(llama, "weights")
    model.save_pretrained(tmp_path / "first")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "first")
    assert not loaded.is_quantized  # marked, transformers' Trainer refuses it (test_trainer_fine_tunes_a_loaded_model)
    assert copy.deepcopy(loaded).half().dtype == torch.float16 and copy.deepcopy(loaded).float().dtype == torch.float32
    assert all(p.requires_grad for p in loaded.model.layers[0].self_attn.qkv.parameters())
    with pytest.raises(ValueError, match="already compressed"):
        tmps.compress(loaded, calib(), progress=False)
    loaded.save_pretrained(tmp_path / "second")  # a loaded model saves again, and tmps.save takes it too
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "second")
    tmps.save(again, tmp_path / "tmps")
    ids = torch.randint(0, VOCAB, (1, 7))
    with torch.no_grad():
        assert torch.equal(tmps.load(tmp_path / "tmps")(ids).logits, model(ids).logits)


def test_dtype_asked_of_from_pretrained_is_the_factors(tmp_path):
    model = compressed(llama, "kv")
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    attention = loaded.model.layers[0].self_attn
    assert {p.dtype for p in attention.parameters()} == {torch.bfloat16}
    ids = torch.randint(0, VOCAB, (1, 7))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits.float(), model(ids).logits, rtol=0.05, atol=0.05)


def test_a_failed_compression_records_nothing():
    model = llama()
    snap = snapshot(model)
    with pytest.raises(ValueError):
        tmps.compress(model, calib(), ratio=1.5, progress=False)
    assert_unchanged(model, snap)
    assert getattr(model.config, "quantization_config", None) is None


def test_a_dense_model_saves_as_before(tmp_path):
    llama().save_pretrained(tmp_path)
    assert "quantization_config" not in json.loads((tmp_path / "config.json").read_text())


def test_a_config_without_the_structure_is_refused(tmp_path):
    model = compressed(llama, "kv")
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["quantization_config"]["structure"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="structure"):
        AutoModelForCausalLM.from_pretrained(tmp_path)


def test_deepcopy_keeps_the_record():
    model = compressed(llama, "kv")
    assert copy.deepcopy(model).config.quantization_config.structure == model.config.quantization_config.structure


def test_a_model_loaded_from_gguf_saves_once_compressed(tmp_path):
    """transformers dequantizes a GGUF file on load and keeps its loader on the model, which refuses
    save_pretrained (the dense model cannot be saved so either). Once compressed, the model holds
    floating-point tensors only, so tmps drops that loader (as loaded here: SmolLM2's GGUF is too big
    for the unit suite: `python benchmarks/pretrained_check.py` runs the real one)."""
    from transformers.quantizers.quantizer_gguf import GgufHfQuantizer
    from transformers.utils.quantization_config import GgufConfig

    dense = llama()
    dense.hf_quantizer, dense.is_quantized = GgufHfQuantizer(GgufConfig()), True
    dense.config.quantization_config = GgufConfig()
    with pytest.raises(ValueError, match="not serializable"):
        dense.save_pretrained(tmp_path / "dense")
    model = tmps.compress(dense, calib(), mode="kv", ratio=0.5, progress=False)
    model.save_pretrained(tmp_path / "compressed")
    ids = torch.randint(0, VOCAB, (1, 7))
    with torch.no_grad():
        assert torch.equal(AutoModelForCausalLM.from_pretrained(tmp_path / "compressed")(ids).logits, model(ids).logits)


def test_without_import_tmps_transformers_warns_and_lists_the_missing_weights(tmp_path):
    """transformers does not refuse a quantization type it does not know: it warns, naming "tmps",
    and loads a dense model whose Q/K/V weights its load report lists as MISSING (randomly
    initialised). Documented in the README; this test notices if that behaviour changes."""
    import subprocess
    import sys

    compressed(llama, "kv").save_pretrained(tmp_path)
    run = subprocess.run([sys.executable, "-c", "import sys; from transformers import AutoModelForCausalLM; "
                          "AutoModelForCausalLM.from_pretrained(sys.argv[1])", str(tmp_path)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-500:]
    assert "Unknown quantization type, got tmps" in run.stderr
    assert "q_proj.weight" in run.stderr and "MISSING" in run.stderr


@pytest.mark.parametrize("tied", [False, True])
def test_a_tmps_save_folder_loads_with_from_pretrained(tmp_path, tied):
    """tmps.save (and so `tmps compress --out`) writes the same config.json and tensor names."""
    model = tmps.compress(llama(tie_word_embeddings=tied), calib(), mode="kv", ratio=0.5, progress=False)
    tmps.save(model, tmp_path / "saved")
    ids = torch.randint(0, VOCAB, (1, 7))
    with torch.no_grad():
        assert torch.equal(AutoModelForCausalLM.from_pretrained(tmp_path / "saved")(ids).logits, model(ids).logits)


def test_trainer_fine_tunes_a_loaded_model(tmp_path):
    """Two steps of transformers' Trainer move every factor of a model loaded with from_pretrained
    (device_map="cpu"); it raised "You cannot perform fine-tuning on purely quantized models" while
    the model was marked quantized."""
    from transformers import Trainer, TrainingArguments

    compressed(llama, "weights").save_pretrained(tmp_path / "model")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "model", device_map="cpu")
    before = {name: p.detach().clone() for name, p in loaded.named_parameters()}
    rows = torch.randint(0, VOCAB, (8, 12))
    args = TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=2, per_device_train_batch_size=4,
                             learning_rate=1e-3, report_to=[], save_strategy="no", logging_strategy="no", use_cpu=True)
    Trainer(model=loaded, args=args, train_dataset=[{"input_ids": r, "labels": r} for r in rows]).train()
    factors = {name for name, _ in loaded.named_parameters() if ".qkv." in name}
    assert factors and all(not torch.equal(loaded.get_parameter(name), before[name]) for name in factors)


def test_tmps_load_reads_a_save_pretrained_folder(tmp_path):
    model = compressed(opt, "kv")
    model.save_pretrained(tmp_path)
    loaded = tmps.load(tmp_path)
    ids = torch.randint(0, VOCAB, (1, 7))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    assert not loaded.training and tmps.is_compressed(loaded)


def test_a_sharded_checkpoint_loads(tmp_path):
    model = compressed(llama, "kv")
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    assert len(list(tmp_path.glob("model-*-of-*.safetensors"))) > 1
    ids = torch.randint(0, VOCAB, (1, 7))
    with torch.no_grad():
        assert torch.equal(AutoModelForCausalLM.from_pretrained(tmp_path)(ids).logits, model(ids).logits)


def test_a_config_with_other_layers_than_the_record_is_refused(tmp_path):
    model = compressed(llama, "kv")
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["num_hidden_layers"] = 1
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="2 compressed layers recorded but the config builds 1"):
        AutoModelForCausalLM.from_pretrained(tmp_path)
