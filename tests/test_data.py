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
    for folder in ("locomo", "probes", "wikitext-2"):
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


CONVERSATION = {
    "sample_id": "conv-x",
    "conversation": {
        "session_1_date_time": "1 May 2023",
        "session_1": [{"speaker": "Ann", "dia_id": "D1:1", "text": "I moved to Lisbon."},
                      {"speaker": "Bob", "dia_id": "D1:2", "text": "I adopted a dog called Rex."}],
        "session_2": [{"speaker": "Ann", "dia_id": "D2:1", "text": "I paint on weekends."}],
    },
    "qa": [
        {"question": "Where did Ann move?", "answer": "Lisbon", "evidence": ["D1:1"], "category": 4},
        {"question": "What does Ann do?", "answer": "paint", "evidence": ["D9:9", " D2:1"], "category": 1},
        {"question": "Who is Rex?", "answer": "a dog", "evidence": ["D:1:2", "D7:1"], "category": 4},
        {"question": "Did Bob move?", "adversarial_answer": "yes", "evidence": ["D1:2"], "category": 5},
    ],
}


def test_one_rule_for_missing_locomo_evidence():
    questions = data.locomo_questions(CONVERSATION, data.locomo_turns(CONVERSATION))
    # one missing and one valid id: kept, with the valid turn and the count of missing ids; all missing: excluded
    assert [q["question"] for q in questions] == ["Where did Ann move?", "What does Ann do?", "Did Bob move?"]
    assert [(q["evidence"], q["missing_evidence"]) for q in questions] == [([0], 0), ([2], 1), ([1], 0)]
    assert [q["lag"] for q in questions] == [3, 1, 2]
    assert questions[2]["answer"] == data.ADVERSARIAL_ANSWER
    complete = data.locomo_questions(CONVERSATION, data.locomo_turns(CONVERSATION), complete_evidence=True)
    assert [q["question"] for q in complete] == ["Where did Ann move?", "Did Bob move?"]
    # a conversation cut short: evidence after the cut is missing
    (cut,) = data.locomo_conversations([CONVERSATION], max_turns=2)
    assert cut.turns == ["Ann: I moved to Lisbon.", "Bob: I adopted a dog called Rex."] and cut.session_ends() == [2]
    assert [(q["question"], q["missing_evidence"]) for q in cut.questions] == [("Where did Ann move?", 0),
                                                                               ("Did Bob move?", 0)]


def test_both_chapters_question_sets():
    locomo = data.load_locomo()
    convs = data.locomo_conversations(locomo)
    assert sum(len(c.questions) for c in convs) == 1977
    assert sum(q["missing_evidence"] > 0 for c in convs for q in c.questions) == 4
    # chapter 4: the test and training samples of params/default/04.yaml
    test_q = data.sample_questions(convs[7:], 60, seed=1234)
    assert len(test_q) == 60 and test_q[0]["question"] == "What places give Deborah peace?"
    assert len(data.sample_questions(convs[:7], 112, seed=4321)) == 112
    # chapter 3: single-hop items with all their evidence, in the prompt
    items = data.locomo_items(locomo, 10_000, categories=(4,), seed=0)
    assert len(items) == 840 and all(q["missing_evidence"] == 0 and q["category"] == 4 for q in items)
    assert data.locomo_items(locomo, 36, seed=0) == items[:36]


def test_recall_probes_load_in_order():
    probes = data.load_recall_probes()
    assert len(probes) == 64 and probes[0].facts.startswith("Mira's cat is named Pepper.")
    assert probes[7].topic == "the life cycle of stars"  # the eight written by hand come first
    assert len({p.facts for p in probes}) == len(probes)
    assert all(len(p.questions) == 3 and all(q.endswith("?") and a for q, a in p.questions) for p in probes)
    assert probes[0].questions[0] == ("What is the name of Mira's cat?", "Pepper")


def test_corrupt_probe_file_is_detected(tmp_path):
    copy = _copy_data(tmp_path)
    path = copy / "probes" / "long_recall.json"
    path.write_text(path.read_text().replace("Pepper", "Salt"))
    with pytest.raises(DataError, match="corrupt"):
        data.load_recall_probes(data_dir=copy)


def test_unrelated_texts_are_reproducible_plain_sentences_of_the_asked_lengths():
    texts = data.unrelated_texts(30, 20, seed=3)
    assert len(texts) == 50 and texts == data.unrelated_texts(30, 20, seed=3)
    assert texts != data.unrelated_texts(30, 20, seed=4)
    assert all(6 <= len(t.split()) <= 40 for t in texts)
    assert all(":" in t.split()[0] for t in texts[:30])  # a turn starts with its speaker
    assert not any("<unk>" in t or "@-@" in t or " ," in t for t in texts[30:])
    with pytest.raises(DataError):
        data.unrelated_texts(10**6, 0)
