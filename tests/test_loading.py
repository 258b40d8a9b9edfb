import pytest
from evosparse.pruning.errors import ModelLoadError
from evosparse.pruning.loading import load_model


def test_unreachable_hub_id_fails_fast_with_the_id_in_the_message(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="evosparse-tests/no-such-model"):
        load_model("evosparse-tests/no-such-model", device="cpu")


def test_missing_paths_and_folders_without_config_are_refused(tmp_path):
    with pytest.raises(ModelLoadError, match="not found"):
        load_model(str(tmp_path / "nowhere.gguf"), device="cpu")
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(str(tmp_path), device="cpu")


def test_hf_folder_loads_in_eval_mode_without_cache(tiny_llama_dir):
    model, tokenizer = load_model(str(tiny_llama_dir), device="cpu")
    assert not model.training and model.config.use_cache is False
    assert len(tokenizer) == model.config.vocab_size


def test_the_api_admits_exactly_the_built_in_models_the_loader_knows():
    # jobs/validation.py runs in the API process, which never imports torch, so it keeps the names;
    # the loader (torch) keeps where each one's weights come from. This keeps the two in step.
    from evosparse.jobs.validation import BUILTIN_MODELS as admitted
    from evosparse.pruning.loading import BUILTIN_MODELS as loadable

    assert set(loadable) == set(admitted)


def test_the_cache_folder_is_read_from_evosparse_cache(monkeypatch, tmp_path):
    from evosparse.pruning import config

    monkeypatch.setenv("EVOSPARSE_CACHE", str(tmp_path / "c"))
    assert config.cache_dir() == tmp_path / "c"
    monkeypatch.delenv("EVOSPARSE_CACHE")
    assert config.cache_dir().name == "evosparse"
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    assert config.offline_requested()
