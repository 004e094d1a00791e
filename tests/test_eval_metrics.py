"""Downstream metric functions and postprocessors on hand-made cases."""

import numpy as np
import pytest

from pause_flax.evaluation import metrics
from pause_flax.evaluation.metrics import RankTarget


@pytest.mark.parametrize("text, expected", [
    ("The  Denver Broncos!", "denver broncos"),
    ("an apple, a pear and THE plum.", "apple pear and plum"),
    ("  theory of\tAnother\nthe", "theory of another"),  # whole words only
    ("U.S.A.", "usa"),
    ("", ""),
    (b"A Bytes answer", "bytes answer"),
])
def test_normalize_answer(text, expected):
  assert metrics.normalize_answer(text) == expected


def test_exact_match_and_f1_scores():
  assert metrics.exact_match_score("The Eiffel tower.", "eiffel Tower") == 1.0
  assert metrics.exact_match_score("Eiffel", "Eiffel Tower") == 0.0
  # 1 of 2 predicted tokens right, 1 of 3 reference tokens ("the" drops).
  assert metrics.f1_score("tall tower", "the Eiffel tower, Paris") == (
      pytest.approx(2 * (1 / 2) * (1 / 3) / (1 / 2 + 1 / 3)))
  # Repeated tokens count as often as both sides have them.
  assert metrics.f1_score("x y y", "y y y z") == pytest.approx(
      2 * (2 / 3) * (2 / 4) / (2 / 3 + 2 / 4))
  assert metrics.f1_score("paris", "london") == 0.0
  assert metrics.f1_score("the", "a") == 1.0  # both empty after normalising
  assert metrics.f1_score("the", "paris") == 0.0


def test_squad_max_over_references():
  targets = [["Denver Broncos", "Broncos", "The Denver Broncos"],
             ["blue"],
             "Saint Bernadette Soubirous"]  # a bare string: one reference
  predictions = ["broncos", "blue sky", "Bernadette"]
  result = metrics.squad(targets, predictions)
  assert result["em"] == pytest.approx(100 / 3)
  # 1.0 (EM with 'Broncos'); 2/3 (p 1/2, r 1); 1/2 (p 1, r 1/3).
  assert result["f1"] == pytest.approx(100 * (1 + 2 / 3 + 1 / 2) / 3)
  # F1 takes the best reference (0.8 for 'x y z' over 2/3 for 'x').
  assert metrics.squad([["x y z", "x"]], ["x y"]) == pytest.approx(
      {"em": 0.0, "f1": 100 * 0.8})
  assert metrics.squad([], []) == {"em": 0.0, "f1": 0.0}


def test_metric_errors():
  with pytest.raises(ValueError, match="2 targets but 1 predictions"):
    metrics.squad([["a"], ["b"]], ["a"])
  with pytest.raises(ValueError, match="no reference answers"):
    metrics.squad([[]], ["a"])
  with pytest.raises(ValueError, match="1 targets but 2 scores"):
    metrics.rank_classification_accuracy([(0, True)], [0.0, 1.0])


@pytest.mark.parametrize("text, expected", [
    ("Natalia sold 48/2 = <<48/2=24>>24 clips.\n#### 72", "72"),
    ("#### 1,000", "1000"),
    ("So she has $1,234.50 left.", "1234.5"),
    ("He paid $5. The answer is 18.", "18"),  # the last number wins
    ("#### 7\nthen 8 more", "7"),  # '####' wins over a later number
    ("12 apples #### unknown", "12"),  # no number after '####'
    ("The temperature fell to -3 degrees", "-3"),
    ("It lost -$4.", "-4"),
    ("from 5-6 apples", "6"),  # a hyphen between numbers is no sign
    ("0.50 and 3.0", "3"),
    ("-0", "0"),
    (".5 cups", "0.5"),
    ("1,2,3", "3"),  # commas between small numbers are a list
    ("100", "100"),
    ("no number here", None),
])
def test_extract_final_number(text, expected):
  assert metrics.extract_final_number(text) == expected


def test_gsm8k_accuracy():
  targets = ["She has 3+4=<<3+4=7>>7.\n#### 7",
             "#### 1,000",
             "#### -2.5",
             "#### 18",
             "#### 5"]
  predictions = ["So 7.00 apples",    # 7.00 == 7
                 "It costs $1,000.",  # commas and $
                 "The change is -2.50",
                 "I think 18 or 19",  # last number: 19
                 "I cannot tell"]     # no number
  assert metrics.gsm8k_accuracy(targets, predictions) == {"accuracy": 60.0}
  # Already extracted numbers (the postprocessor's output) work the same.
  extracted = [metrics.gsm8k_answer(t) for t in targets]
  assert extracted == ["7", "1000", "-2.5", "18", "5"]
  assert metrics.gsm8k_accuracy(
      extracted, [metrics.gsm8k_answer(p) for p in predictions]) == {
          "accuracy": 60.0}
  with pytest.raises(ValueError, match="holds no number"):
    metrics.gsm8k_accuracy(["no answer"], ["1"])


def test_last_word_accuracy():
  targets = ["tea", "Paris", "dog", "cat"]
  predictions = [" tea. And then", "paris,", "\u201cdog\u201d", "cats"]
  assert metrics.last_word_accuracy(targets, predictions) == {
      "accuracy": 75.0}
  assert metrics.lambada_word(b"  Home, she said") == "home"
  assert metrics.lambada_word("") == ""


def test_accuracy():
  assert metrics.accuracy(["a", "b", "c", "d"], ["a", "x", "c", "y"]) == {
      "accuracy": 50.0}
  assert metrics.accuracy([], []) == {"accuracy": 0.0}


def test_rank_classification_accuracy():
  # Example 0: options 0..2, option 1 correct and best.
  # Example 1: options in shuffled order, correct option 0 not best.
  # Example 2: a tie between its two options goes to the one seen first.
  targets = [RankTarget(0, False), RankTarget(0, True), RankTarget(0, False),
             RankTarget(1, False), RankTarget(1, True),
             RankTarget(2, True), RankTarget(2, False)]
  scores = [-3.0, -1.0, -2.0,
            -0.5, -4.0,
            -1.0, -1.0]
  assert metrics.rank_classification_accuracy(targets, scores) == {
      "accuracy": pytest.approx(200 / 3)}
  # Plain (index, is_correct) pairs work too, as do numpy scalars.
  assert metrics.rank_classification_accuracy(
      [(5, np.bool_(True)), (5, False)], np.array([-1.0, -2.0])) == {
          "accuracy": 100.0}
  with pytest.raises(ValueError, match=r"Examples \[3\] have no correct"):
    metrics.rank_classification_accuracy([(3, False), (3, False)], [0, 1])
  assert metrics.rank_classification_accuracy([], []) == {"accuracy": 0.0}


def test_postprocessors():
  example = {"answers": np.array([b"Denver Broncos", b" Broncos "],
                                 dtype=object)}
  assert metrics.qa_answers(b" Broncos\n", example=example) == "Broncos"
  assert metrics.qa_answers("ignored", example=example, is_target=True) == [
      "Denver Broncos", "Broncos"]
  assert metrics.qa_answers("only one", is_target=True) == ["only one"]
  assert metrics.gsm8k_answer("... #### 1,024") == "1024"
  assert metrics.gsm8k_answer("no idea") == ""

  example = {"idx": np.array([4, 2], np.int32), "is_correct": np.bool_(True)}
  target = metrics.rank_classification_target(b"option", example=example,
                                              is_target=True)
  assert target == RankTarget(4, True) and type(target.example_index) is int
  assert metrics.rank_classification_target("text", example=example) == "text"
  with pytest.raises(ValueError, match="'idx' and 'is_correct'"):
    metrics.rank_classification_target("t", example={"idx": [0]},
                                        is_target=True)
