"""Memory files (fastmem.persistence): exact round trips, atomic writes, one clear line per bad file."""

import json
import struct

import pytest
import torch
from safetensors.torch import save_file

from fastmem import binding as fb
from fastmem import persistence
from fastmem import tasks
from fastmem.attractors import AttractorConfig, AttractorLayer
from fastmem.errors import FastmemError, MemoryFileError

SETTINGS = {"bindings": [{"word": "zorp", "context": "Mars", "label": "red"}], "layer": -1, "rate": 0.1 + 0.2,
            "gate": None, "flags": [True, False], "nested": {"tiny": 1e-300, "big": 2 ** 60}}


def _tensors():
    generator = torch.Generator().manual_seed(0)
    return {"float32": torch.randn(7, 64, generator=generator), "bfloat16": torch.randn(3, 5).to(torch.bfloat16),
            "float64": torch.randn(4, dtype=torch.float64, generator=generator), "passes": torch.tensor(12),
            "mask": torch.tensor([True, False, True]), "empty": torch.zeros(0, 64)}


@pytest.fixture
def saved(tiny_neox, tmp_path):
    """A binding memory file of tiny-gpt-neox (width 64)."""
    _, _, info = tiny_neox
    memory = fb.BindingMemory(*torch.randn(3, 4, info.width).unbind(), [tasks.Binding("w", "c", "red")] * 4,
                              layer=1, value_kind="iterated", model=info)
    return memory.save(tmp_path / "binding.safetensors")


def _bad_file(error_info, path) -> str:
    message = str(error_info.value)
    assert isinstance(error_info.value, FastmemError)
    assert "\n" not in message and str(path) in message
    return message


def _rewrite_header(path, change):
    """Rewrite the fastmem metadata of a memory file, keeping its tensors and checksum."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as file:
        metadata, tensors = file.metadata(), {name: file.get_tensor(name) for name in file.keys()}
    header = json.loads(metadata[persistence.METADATA_KEY])
    change(header)
    save_file(tensors, str(path), metadata={persistence.METADATA_KEY: json.dumps(header)})


def test_round_trip_is_bit_exact_for_every_tensor_and_setting(tiny_neox, tmp_path):
    _, _, info = tiny_neox
    tensors = _tensors()
    path = persistence.save_memory(tmp_path / "deep" / "memory.safetensors", "binding", tensors, SETTINGS, info)
    stored = persistence.load_memory(path, "binding")
    assert stored.tensors.keys() == tensors.keys()
    for name, tensor in tensors.items():
        copy = stored.tensors[name]
        assert copy.dtype == tensor.dtype and copy.shape == tensor.shape and torch.equal(copy, tensor), name
    assert stored.settings == SETTINGS and stored.settings["rate"] == 0.1 + 0.2
    assert (stored.kind, stored.model_name, stored.width) == ("binding", "tiny-gpt-neox", 64)
    assert persistence.tensors_sha256(stored.tensors) == persistence.tensors_sha256(tensors)


def test_checksum_covers_names_dtypes_shapes_and_bytes():
    base = {"a": torch.zeros(2, 3), "b": torch.ones(1)}
    digest = persistence.tensors_sha256(base)
    assert digest == persistence.tensors_sha256(dict(reversed(base.items())))
    for changed in ({"c": base["a"], "b": base["b"]}, {"a": base["a"].double(), "b": base["b"]},
                    {"a": base["a"].reshape(3, 2), "b": base["b"]}, {"a": base["a"], "b": base["b"] * 2}):
        assert persistence.tensors_sha256(changed) != digest


def test_writes_are_atomic(tiny_neox, tmp_path, monkeypatch):
    _, _, info = tiny_neox
    path = persistence.save_memory(tmp_path / "memory.safetensors", "binding", {"x": torch.ones(3)}, {}, info)

    def crash(tensors, filename, metadata=None):
        open(filename, "wb").write(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr("safetensors.torch.save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        persistence.save_memory(path, "binding", {"x": torch.zeros(3)}, {}, info)
    assert [p.name for p in tmp_path.iterdir()] == ["memory.safetensors"]
    assert torch.equal(persistence.load_memory(path, "binding").tensors["x"], torch.ones(3))


def test_missing_file(tiny_neox, tmp_path):
    path = tmp_path / "nowhere.safetensors"
    with pytest.raises(MemoryFileError) as error:
        fb.BindingMemory.load(path, tiny_neox[0])
    assert "does not exist" in _bad_file(error, path)


def test_truncated_file(tiny_neox, saved):
    data = saved.read_bytes()
    saved.write_bytes(data[:len(data) // 2])
    with pytest.raises(MemoryFileError) as error:
        fb.BindingMemory.load(saved, tiny_neox[0])
    assert "truncated or corrupted" in _bad_file(error, saved)


def test_corrupted_tensor_bytes_fail_the_checksum(tiny_neox, saved):
    data = bytearray(saved.read_bytes())
    header_length = struct.unpack("<Q", data[:8])[0]
    data[8 + header_length + 10] ^= 0xFF  # one byte inside the first tensor
    saved.write_bytes(bytes(data))
    with pytest.raises(MemoryFileError) as error:
        fb.BindingMemory.load(saved, tiny_neox[0])
    assert "checksum" in _bad_file(error, saved)


def test_plain_safetensors_file_is_not_a_memory(tiny_neox, tmp_path):
    path = tmp_path / "plain.safetensors"
    save_file({"values": torch.zeros(2, 64)}, str(path))
    with pytest.raises(MemoryFileError) as error:
        fb.BindingMemory.load(path, tiny_neox[0])
    assert "not a fastmem memory" in _bad_file(error, path)


def test_memory_of_another_kind_names_its_loader(tiny_neox, tmp_path):
    model, _, _ = tiny_neox
    layer_file = AttractorLayer(model, AttractorConfig(layer=0, n_attractors=2)).save(tmp_path / "layer.safetensors")
    with pytest.raises(MemoryFileError) as error:
        fb.BindingMemory.load(layer_file, model)
    assert "AttractorLayer.load" in _bad_file(error, layer_file)


def test_memory_of_another_width_is_refused(saved, smollm2):
    with pytest.raises(MemoryFileError) as error:
        fb.BindingMemory.load(saved, smollm2[0])
    message = _bad_file(error, saved)
    assert "'tiny-gpt-neox' (width 64)" in message and "'smollm2-135m' (width 576)" in message


def test_memory_of_another_model_of_the_same_width_is_refused(tiny_neox, tiny_t5, tmp_path):
    path = AttractorLayer(tiny_neox[0], AttractorConfig(layer=0, n_attractors=2)).save(tmp_path / "layer.safetensors")
    with pytest.raises(MemoryFileError) as error:
        AttractorLayer.load(path, tiny_t5[0])
    assert "load_model('tiny-gpt-neox')" in _bad_file(error, path)


@pytest.mark.parametrize("version", [0, 2, "1", None])
def test_other_format_version_is_refused(tiny_neox, saved, version):
    _rewrite_header(saved, lambda header: header.update(format_version=version))
    with pytest.raises(MemoryFileError) as error:
        fb.BindingMemory.load(saved, tiny_neox[0])
    assert "format version" in _bad_file(error, saved)


@pytest.mark.parametrize("damage", ["not json", "fields", "settings"])
def test_damaged_metadata_is_one_line(tiny_neox, saved, damage):
    if damage == "not json":
        save_file({"x": torch.ones(1)}, str(saved), metadata={persistence.METADATA_KEY: "{format_version: 1"})
    elif damage == "fields":
        _rewrite_header(saved, lambda header: header.pop("width"))
    else:
        _rewrite_header(saved, lambda header: header["settings"].pop("bindings"))
    with pytest.raises(MemoryFileError) as error:
        fb.BindingMemory.load(saved, tiny_neox[0])
    _bad_file(error, saved)
