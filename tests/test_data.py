import shutil

import pytest

from fastmem import data
from fastmem.errors import DataError


def test_vendored_data_matches_recorded_checksums():
    conversations = data.load_locomo()
    assert len(conversations) == 10
    assert sum(len(c["qa"]) for c in conversations) == 1986
    assert data.load_wikitext("test").count("\n") > 4000


def _copy_data(tmp_path):
    target = tmp_path / "data"
    shutil.copytree(data.DATA_DIR, target)
    return target


def test_missing_file_is_a_clear_error(tmp_path):
    copy = _copy_data(tmp_path)
    (copy / "wikitext-2" / "test.txt").unlink()
    with pytest.raises(DataError, match="data file missing"):
        data.load_wikitext("test", data_dir=copy)


def test_corrupt_file_is_detected(tmp_path):
    copy = _copy_data(tmp_path)
    with (copy / "locomo" / "locomo10.json").open("ab") as handle:
        handle.write(b" ")
    with pytest.raises(DataError, match="corrupt") as error:
        data.load_locomo(data_dir=copy)
    assert "\n" not in str(error.value)


def test_unknown_split_is_refused():
    with pytest.raises(DataError, match="split"):
        data.load_wikitext("train")


def test_licences_ship_with_the_data():
    for folder in ("locomo", "wikitext-2"):
        assert (data.DATA_DIR / folder / "LICENSE.txt").stat().st_size > 200


def test_locomo_turns_keep_every_turn_in_session_order():
    for conversation in data.load_locomo():
        turns = data.locomo_turns(conversation)
        sessions = [value for key, value in conversation["conversation"].items()
                    if key.startswith("session_") and isinstance(value, list)]
        assert len(turns) == sum(map(len, sessions))
        numbers = [number for _, number, _ in turns]
        assert numbers == sorted(numbers) and numbers[0] == 1
        assert len({dia_id for dia_id, _, _ in turns}) == len(turns)
        first = conversation["conversation"]["session_1"][0]
        assert turns[0][2] == f"{first['speaker']}: {first['text']}"
