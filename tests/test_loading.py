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
