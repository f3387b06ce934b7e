"""LoCoMo's official answer scoring (chapters 3 and 4), on cases worked by hand from its evaluation.py."""

import numpy as np
import pytest

from fastmem.errors import ParameterError
from fastmem.evaluation import answer_f1, locomo_f1, locomo_tokens, token_f1


def test_normalisation_stems_and_drops_articles_commas_and_and():
    assert locomo_tokens("The Hiking, and a Running!") == ["hike", "run"]
    assert locomo_tokens("") == []


def test_token_f1_on_known_cases():
    assert token_f1("He went hiking", "hike") == pytest.approx(2 * (1 / 3) * 1 / (1 / 3 + 1))
    assert token_f1("hikes", "hiking") == 1.0  # stems agree: the unstemmed score would be 0
    assert token_f1("", "anything") == 0.0 and token_f1("something", "") == 0.0


def test_categories_follow_the_official_scorer():
    assert locomo_f1("Rome, Paris", "Paris, Rome", 1) == 1.0
    assert locomo_f1("Rome", "Paris, Rome", 1) == 0.5
    assert locomo_f1("7 May 2023", "7 May 2023; or a week earlier", 3) == 1.0
    assert locomo_f1("Not mentioned in the conversation", "anything", 5) == 1.0
    assert locomo_f1("Paris", "anything", 5) == 0.0


def test_answer_f1_refuses_unequal_lengths():
    questions = [{"answer": "hike", "category": 4}]
    np.testing.assert_array_equal(answer_f1(["hiking"], questions), [1.0])
    with pytest.raises(ParameterError):
        answer_f1(["a", "b"], questions)
