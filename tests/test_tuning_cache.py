"""Tuned choices on disk (``TMPS_TUNING_CACHE``): what one process times, the next reads back; off by
default; a file of another software version, a corrupt file or an unwritable folder costs a timing,
never a wrong or failed call."""
import json
import warnings

import pytest
import torch

import tmps.kernels_bridge as bridge
from tmps import tuning_cache
from tmps.tuning_cache import TunedChoices

KEY = (torch.device("cpu"), torch.float16, 1, (24, 40), ((2, 12, 24), None, True), None)


def new_process_table():
    """The bridge's table as a fresh process starts with it: empty, nothing read from disk yet."""
    return TunedChoices("faster_path", bridge.PathChoice)


def files(folder):
    return sorted(p.name for p in folder.iterdir())


@pytest.fixture
def cache_folder(tmp_path, monkeypatch):
    monkeypatch.setenv(tuning_cache.ENV, str(tmp_path))
    return tmp_path


def test_a_choice_is_read_back_by_the_next_process(cache_folder):
    table = new_process_table()
    table[KEY] = bridge.PathChoice("triton", "torch")
    assert len(files(cache_folder)) == 1
    later = new_process_table()
    assert dict.get(later, KEY) is None  # not in memory: found on disk
    assert KEY in later and later[KEY] == bridge.PathChoice("triton", "torch")
    assert later.get((torch.device("cpu"), torch.float16, 16) + KEY[3:]) is None  # another key: a miss


def test_off_by_default_and_when_set_off(tmp_path, monkeypatch):
    for setting in (None, "0", "off", ""):
        if setting is None:
            monkeypatch.delenv(tuning_cache.ENV, raising=False)
        else:
            monkeypatch.setenv(tuning_cache.ENV, setting)
        monkeypatch.setenv("HOME", str(tmp_path))
        monkeypatch.setenv("TMPS_CACHE", str(tmp_path / "assets"))
        assert tuning_cache.cache_file() is None
        table = new_process_table()
        table[KEY] = bridge.PathChoice("torch", "torch")
        assert KEY in table and KEY not in new_process_table()
    assert files(tmp_path) == []


def test_one_means_the_asset_cache(tmp_path, monkeypatch):
    monkeypatch.setenv(tuning_cache.ENV, "1")
    monkeypatch.setenv("TMPS_CACHE", str(tmp_path))
    path = tuning_cache.cache_file()
    assert path.parent == tmp_path / "tuning" and path.name == f"{tuning_cache.software_fingerprint()}.json"


def test_another_software_version_reads_another_file(cache_folder, monkeypatch):
    new_process_table()[KEY] = bridge.PathChoice("triton", "triton")
    monkeypatch.setattr(tuning_cache, "_FINGERPRINT", ["another-version"])
    assert KEY not in new_process_table()
    assert len(files(cache_folder)) == 1


def test_kernel_configs_round_trip(cache_folder):
    """Each kernel's winning config, as its tuner stores it, comes back equal (Optional fields too)."""
    from tmps.kernels import fused_projection, latent_decode, latent_scores

    for module, config in ((fused_projection, fused_projection.KernelConfig(block_m=16, col_splits=0, z_pass=True)),
                           (latent_decode, latent_decode.DecodeConfig(chunk=512, scores_first=True)),
                           (latent_scores, latent_scores.ScoresConfig(block_t=32, num_warps=8))):
        table = module._TUNED
        assert isinstance(table, TunedChoices)
        key = (torch.device("cpu"), torch.bfloat16, 3, 7, (True, None))
        table[key] = config
        later = TunedChoices(table.table, type(config))
        assert later.get(key) == config
        dict.pop(table, key)


def test_faster_path_times_once_across_processes(cache_folder, monkeypatch):
    monkeypatch.setattr(bridge, "_FASTER", new_process_table())
    timed = []

    def bench(fn):
        timed.append(fn)
        return fn()

    assert bridge.faster_path(KEY, lambda: 1.0, lambda: 2.0, bench=bench, device_bench=bench) == "triton"
    assert len(timed) == 4  # both paths, eagerly and in device time
    monkeypatch.setattr(bridge, "_FASTER", new_process_table())
    assert bridge.faster_path(KEY, lambda: pytest.fail("ran"), lambda: pytest.fail("ran"), bench=bench) == "triton"
    assert len(timed) == 4


def test_a_corrupt_file_is_a_miss_with_a_warning_then_rewritten(cache_folder):
    path = tuning_cache.cache_file()
    path.write_text("{ not json")
    tuning_cache._warned.clear()
    with pytest.warns(RuntimeWarning, match="cannot read"):
        assert KEY not in new_process_table()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once per file
        new_process_table()[KEY] = bridge.PathChoice("torch", "triton")
    assert json.loads(path.read_text())["format"] == tuning_cache.FORMAT
    assert new_process_table()[KEY] == bridge.PathChoice("torch", "triton")


def test_an_entry_of_another_layout_is_a_miss(cache_folder):
    path = tuning_cache.cache_file()
    encoded = json.dumps(tuning_cache._encode(KEY))
    path.write_text(json.dumps({"format": tuning_cache.FORMAT,
                                "tables": {"faster_path": {encoded: {"eager": "torch", "renamed": "torch"}}}}))
    assert KEY not in new_process_table()


def test_an_unwritable_folder_keeps_choices_in_memory(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv(tuning_cache.ENV, str(blocker / "tuning"))  # a folder under a file: mkdir fails
    tuning_cache._warned.clear()
    table = new_process_table()
    with pytest.warns(RuntimeWarning, match="cannot write"):
        table[KEY] = bridge.PathChoice("triton", "triton")
    assert table[KEY] == bridge.PathChoice("triton", "triton")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once per file, not at every new entry
        table[KEY[:2] + (2,) + KEY[3:]] = bridge.PathChoice("torch", "torch")


def test_keys_hold_no_process_state():
    """A device by its kind (a GPU by its name, not its index), a dtype by its name; nothing else unnamed."""
    assert tuning_cache._encode((torch.device("cpu"), torch.float32, (1, None, True))) == ["cpu", "torch.float32",
                                                                                         [1, None, True]]
    with pytest.raises(TypeError, match="cannot store"):
        tuning_cache._encode(object())


def test_a_key_the_file_cannot_hold_stays_in_memory(cache_folder):
    table, key = new_process_table(), (object(), 1)
    table[key] = bridge.PathChoice("torch", "torch")
    assert table[key] == bridge.PathChoice("torch", "torch") and files(cache_folder) == []


def test_the_file_name_follows_the_kernels_source(tmp_path, monkeypatch):
    """An edited kernel must not read the choices timed for its earlier source."""
    import importlib.util

    sources = tmp_path / "kernels"
    sources.mkdir()
    (sources / "fused_projection.py").write_text("BLOCK = 64\n")
    spec = importlib.util.spec_from_loader("tmps.kernels", loader=None, is_package=True)
    spec.submodule_search_locations = [str(sources)]
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: spec)
    names = []
    for block in (64, 128):
        (sources / "fused_projection.py").write_text(f"BLOCK = {block}\n")
        monkeypatch.setattr(tuning_cache, "_FINGERPRINT", [])
        names.append(tuning_cache.software_fingerprint())
    assert names[0] != names[1]
