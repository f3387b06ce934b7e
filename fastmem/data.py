"""Vendored data sets, checked against recorded checksums (book page "Data and licences").

The repository ships LoCoMo and WikiText-2 under ``data/`` with their licences; ``data/SHA256SUMS``
records each file's checksum, and every loader verifies it before returning anything.
"""

from __future__ import annotations

import hashlib
import json
from functools import lru_cache
from pathlib import Path

from .errors import DataError

DATA_DIR = Path(__file__).resolve().parent.parent / "data"


def data_file(relative: str, data_dir: Path | str = DATA_DIR) -> Path:
    """Path of a vendored file after checking it exists and matches ``SHA256SUMS`` (all chapters)."""
    data_dir = Path(data_dir)
    path = data_dir / relative
    expected = _recorded_checksums(data_dir).get(relative)
    if expected is None:
        raise DataError(f"{relative}: no checksum recorded in {data_dir / 'SHA256SUMS'}")
    if not path.is_file():
        raise DataError(f"data file missing: {path} (restore it with `git checkout -- data/`)")
    stat = path.stat()
    actual = _sha256(path, stat.st_mtime_ns, stat.st_size)
    if actual != expected:
        raise DataError(
            f"data file corrupt: {path} has sha256 {actual[:12]}..., expected {expected[:12]}... "
            "(restore it with `git checkout -- data/`)"
        )
    return path


def load_locomo(data_dir: Path | str = DATA_DIR) -> list[dict]:
    """The ten LoCoMo conversations with their questions (chapters 3 and 4)."""
    return json.loads(data_file("locomo/locomo10.json", data_dir).read_text(encoding="utf-8"))


def locomo_turns(conversation: dict) -> list[tuple[str, int, str]]:
    """One LoCoMo conversation's turns in order, as (dia_id, session number, "Speaker: text") (chapters 3 and 4)."""
    sessions = conversation["conversation"]
    numbers = sorted(int(key.split("_")[1]) for key, value in sessions.items()
                     if key.startswith("session_") and isinstance(value, list))
    return [(turn["dia_id"], number, f"{turn['speaker']}: {turn['text']}")
            for number in numbers for turn in sessions[f"session_{number}"]]


def load_wikitext(split: str = "test", data_dir: Path | str = DATA_DIR) -> str:
    """The raw WikiText-2 text of ``split`` ('test' or 'valid') as one string (chapter 3)."""
    if split not in ("test", "valid"):
        raise DataError(f"WikiText-2 split must be 'test' or 'valid' (the train split is not vendored), got {split!r}")
    return data_file(f"wikitext-2/{split}.txt", data_dir).read_text(encoding="utf-8")


@lru_cache(maxsize=None)
def _recorded_checksums(data_dir: Path) -> dict[str, str]:
    sums = data_dir / "SHA256SUMS"
    if not sums.is_file():
        raise DataError(f"checksum list missing: {sums}")
    pairs = (line.split(maxsplit=1) for line in sums.read_text().splitlines() if line.strip())
    return {name.strip(): digest for digest, name in pairs}


@lru_cache(maxsize=None)
def _sha256(path: Path, mtime_ns: int, size: int) -> str:
    """Checksum of ``path``; the modification time and size key the cache so an edit is seen."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
