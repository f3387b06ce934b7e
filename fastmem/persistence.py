"""Memory files: the one place a memory is written to disk and read back (chapters 2-4).

A memory file is a safetensors file. Its tensors are the memory's tensors; its metadata key
``fastmem`` holds one JSON object:

``format_version``
    :data:`FORMAT_VERSION` when written; a file of another version is refused, not guessed at.
``kind``
    which memory it is, a key of :data:`LOADERS` (``"binding"``, ``"attractor_layer"``, ...).
``model``, ``width``
    ``ModelInfo.name`` and ``ModelInfo.width`` of the model the memory belongs to.
``settings``
    everything besides the tensors that rebuilds the memory, as JSON.
``sha256``
    :func:`tensors_sha256` of the tensors, so that damaged bytes are caught on reading.

Writes go to a temporary file beside the target and are renamed over it, so a crash never
leaves half a file under the target's name. Reading checks everything above and ends any
problem with one :class:`~fastmem.errors.MemoryFileError` line that names the file.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, TypeVar

import torch
from torch import nn

from .errors import MemoryFileError, ParameterError, first_line
from .models import ModelInfo, model_info

FORMAT_VERSION = 1
METADATA_KEY = "fastmem"
# Each kind of memory and how to load it, so that a file of the wrong kind can say where it belongs.
LOADERS = {
    "binding": "fastmem.binding.BindingMemory.load(path, model)",
    "attractor_layer": "fastmem.attractors.AttractorLayer.load(path, model)",
    "latent_adapter": "fastmem.latent.LatentAdapter.load(path, model)",
}
HEADER_FIELDS = {"kind": str, "model": str, "width": int, "settings": dict, "sha256": str}

Built = TypeVar("Built")


@dataclass(frozen=True)
class StoredMemory:
    """What a memory file holds, checked: its tensors and settings, and the model it belongs to (chapters 2-4)."""

    path: Path
    kind: str
    model_name: str
    width: int
    settings: dict
    tensors: dict[str, torch.Tensor]

    def rebuild(self, build: Callable[["StoredMemory"], Built]) -> Built:
        """``build(self)``, reporting a missing or impossible setting as one MemoryFileError line (chapters 2-4)."""
        try:
            return build(self)
        except (KeyError, TypeError, ValueError, ParameterError) as error:
            raise MemoryFileError(
                f"memory file {self.path}: its settings do not rebuild a {self.kind!r} memory "
                f"({type(error).__name__}: {first_line(error)}): save the memory again"
            ) from None


def tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over the tensors' names, dtypes, shapes and bytes, in name order (chapters 2-4)."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(json.dumps([name, str(tensor.dtype), list(tensor.shape)]).encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def save_memory(path: Path | str, kind: str, tensors: dict[str, torch.Tensor], settings: dict,
                info: ModelInfo) -> Path:
    """Write a memory file atomically: tensors, settings and the model they belong to (chapters 2-4).

    ``settings`` must be JSON (numbers, strings, booleans, None, lists, dicts); floats round-trip exactly.
    """
    if kind not in LOADERS:
        raise ValueError(f"unknown memory kind {kind!r}: add it to fastmem.persistence.LOADERS")
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    # Copies, because safetensors refuses tensors that share storage (slices of one tensor).
    tensors = {name: tensor.detach().to("cpu", copy=True).contiguous() for name, tensor in tensors.items()}
    header = {"format_version": FORMAT_VERSION, "kind": kind, "model": info.name, "width": info.width,
              "settings": settings, "sha256": tensors_sha256(tensors)}
    metadata = {METADATA_KEY: json.dumps(header, allow_nan=False)}
    temporary = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        from safetensors.torch import save_file

        save_file(tensors, temporary, metadata=metadata)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    return path


def load_memory(path: Path | str, kind: str, model: nn.Module | None = None) -> StoredMemory:
    """Read and check a memory file of ``kind``, for ``model`` when given (chapters 2-4).

    Raises :class:`MemoryFileError` with one line when the file is missing, truncated or corrupted,
    not a fastmem memory, of another format version or kind, or made with another model or width.
    """
    from safetensors import SafetensorError, safe_open

    path = Path(path).expanduser()
    if not path.is_file():
        raise MemoryFileError(f"memory file {path} does not exist: check the path, or save the memory there first")
    try:
        with safe_open(str(path), framework="pt") as file:
            metadata = file.metadata() or {}
            tensors = {name: file.get_tensor(name) for name in file.keys()}
    except (SafetensorError, OSError) as error:
        raise MemoryFileError(
            f"memory file {path} is truncated or corrupted ({first_line(error)}): save the memory again"
        ) from None
    header = _checked_header(path, metadata, kind)
    if tensors_sha256(tensors) != header["sha256"]:
        raise MemoryFileError(
            f"memory file {path} is corrupted: its tensors do not match the checksum saved with them; save the memory again"
        )
    if model is not None:
        info = model_info(model)
        if (header["model"], header["width"]) != (info.name, info.width):
            raise MemoryFileError(
                f"memory file {path} belongs to model {header['model']!r} (width {header['width']}), not to "
                f"{info.name!r} (width {info.width}): load it into load_model({header['model']!r})"
            )
    return StoredMemory(path, kind, header["model"], header["width"], header["settings"], tensors)


def _checked_header(path: Path, metadata: dict, kind: str) -> dict:
    """The fastmem header of a readable safetensors file, if it is a memory of this format and kind."""
    if METADATA_KEY not in metadata:
        raise MemoryFileError(
            f"{path} is a safetensors file but not a fastmem memory (no {METADATA_KEY!r} metadata): "
            "give a file written by a memory's save(path)"
        )
    corrupted = MemoryFileError(f"memory file {path} has corrupted fastmem metadata: save the memory again")
    try:
        header = json.loads(metadata[METADATA_KEY])
        version = header["format_version"]
    except (ValueError, TypeError, KeyError):
        raise corrupted from None
    if version != FORMAT_VERSION:
        raise MemoryFileError(
            f"memory file {path} is in format version {version!r}, this fastmem reads version {FORMAT_VERSION}: "
            "save the memory again with this fastmem, or load it with the fastmem that wrote it"
        )
    if not all(isinstance(header.get(name), kind_of) for name, kind_of in HEADER_FIELDS.items()):
        raise corrupted
    if header["kind"] != kind:
        raise MemoryFileError(
            f"memory file {path} holds a memory of kind {header['kind']!r}, not {kind!r}: "
            f"load it with {LOADERS.get(header['kind'], 'the loader of that kind')}"
        )
    return header
