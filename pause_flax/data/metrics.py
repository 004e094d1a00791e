"""Metric functions and postprocessors for the paper's downstream tasks.

Metric functions have seqio's signatures, so a Task's `metric_fns` can hold
them and `seqio.Evaluator` calls them:

  fn(targets, predictions) -> {name: value}   predictions: decoded text
  fn(targets, scores) -> {name: value}        scores: one log-likelihood per
                                              example (rank classification)

Values are percentages. Postprocessors have seqio's signature
`fn(output, example=None, is_target=False)`: seqio applies them to the decoded
prediction and to the target text (with the preprocessed `example`, whose
non-model features such as 'answers' hold every reference).

Each metric also accepts raw decoded text: the answer extraction (the final
number, the first word) is repeated in the metric and is idempotent.
"""

from __future__ import annotations

import collections
import decimal
import re
import string
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

# --- normalisation and per-pair scores ---------------------------------------

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = frozenset(string.punctuation)


def _text(value: str | bytes) -> str:
  return value.decode("utf-8", errors="replace") if isinstance(
      value, bytes) else str(value)


def normalize_answer(text: str | bytes) -> str:
  """SQuAD's answer normalisation.

  Lowercases, removes ASCII punctuation and the articles a/an/the, and
  collapses whitespace (in that order, as the official SQuAD script does).
  """
  text = "".join(c for c in _text(text).lower() if c not in _PUNCTUATION)
  return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match_score(prediction: str, reference: str) -> float:
  """1.0 if the normalised strings are equal, else 0.0."""
  return float(normalize_answer(prediction) == normalize_answer(reference))


def f1_score(prediction: str, reference: str) -> float:
  """Token-level F1 of the normalised strings (SQuAD's).

  Two answers that both normalise to nothing score 1.0 (as in SQuAD 2.0's
  script); one empty answer scores 0.0.
  """
  pred = normalize_answer(prediction).split()
  ref = normalize_answer(reference).split()
  if not pred or not ref:
    return float(pred == ref)
  same = sum((collections.Counter(pred) & collections.Counter(ref)).values())
  if same == 0:
    return 0.0
  precision, recall = same / len(pred), same / len(ref)
  return 2 * precision * recall / (precision + recall)


def _check_pairs(name: str, targets: Sequence, outputs: Sequence,
                 kind: str = "predictions") -> None:
  if len(targets) != len(outputs):
    raise ValueError(
        f"{name} got {len(targets)} targets but {len(outputs)} {kind}; they "
        "must pair up, one per example.")


def _references(target: Any) -> list[str]:
  """A target's references: a str/bytes is one, a sequence holds several."""
  if isinstance(target, (str, bytes)):
    return [_text(target)]
  references = [_text(t) for t in target]
  if not references:
    raise ValueError(
        "A target has no reference answers; drop such examples (the "
        "downstream tasks do) or give at least one reference.")
  return references


# --- generation metrics ------------------------------------------------------


def squad(targets: Sequence[str | Sequence[str]],
          predictions: Sequence[str]) -> dict[str, float]:
  """SQuAD-style exact match and F1, each the max over a target's references.

  Used for SQuAD, CoQA, CommonsenseQA, WebQuestions and NaturalQuestions.

  Args:
    targets: per example, one reference or a sequence of references.
    predictions: per example, the decoded answer.

  Returns:
    {'em': ..., 'f1': ...} in percent, averaged over examples.
  """
  _check_pairs("squad", targets, predictions)
  if not targets:
    return {"em": 0.0, "f1": 0.0}
  em = f1 = 0.0
  for target, prediction in zip(targets, predictions):
    references, prediction = _references(target), _text(prediction)
    em += max(exact_match_score(prediction, r) for r in references)
    f1 += max(f1_score(prediction, r) for r in references)
  return {"em": 100 * em / len(targets), "f1": 100 * f1 / len(targets)}


def accuracy(targets: Sequence[Any], predictions: Sequence[Any]
             ) -> dict[str, float]:
  """Percentage of predictions equal to their target."""
  _check_pairs("accuracy", targets, predictions)
  if not targets:
    return {"accuracy": 0.0}
  hits = sum(t == p for t, p in zip(targets, predictions))
  return {"accuracy": 100 * hits / len(targets)}


# A number: an optional minus sign (not after a word character, so that
# '5-6' is 5 and 6), an optional '$', digits with optional thousands commas,
# an optional fraction.
_NUMBER = re.compile(
    r"(?:(?<!\w)(-))?\$?((?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+)")
_FINAL_MARK = "####"


def extract_final_number(text: str | bytes) -> str | None:
  """GSM8k's answer: the number after the last '####', else the last number.

  Commas and '$' are dropped and the number is written canonically
  ('$1,000.50' -> '1000.5', '-$3' -> '-3'), so equal values give equal
  strings. None when the text holds no number.
  """
  text = _text(text)
  if _FINAL_MARK in text:
    match = _NUMBER.search(text.rsplit(_FINAL_MARK, 1)[1])
    if match:
      return _canonical(match)
  matches = list(_NUMBER.finditer(text))
  return _canonical(matches[-1]) if matches else None


def _canonical(match: re.Match) -> str:
  value = decimal.Decimal((match.group(1) or "") +
                          match.group(2).replace(",", ""))
  return "0" if value == 0 else format(value.normalize(), "f")


def gsm8k_accuracy(targets: Sequence[str], predictions: Sequence[str]
                   ) -> dict[str, float]:
  """Percentage of predictions whose final number equals the target's.

  Targets and predictions may be full solutions ('... #### 72') or the
  extracted numbers; values are compared exactly ('72.0' == '72'). A
  prediction without a number is wrong.
  """
  _check_pairs("gsm8k_accuracy", targets, predictions)
  if not targets:
    return {"accuracy": 0.0}
  hits = 0
  for target, prediction in zip(targets, predictions):
    reference = extract_final_number(target)
    if reference is None:
      raise ValueError(
          f"GSM8k target {_text(target)!r} holds no number; targets must be "
          "solutions ending in '#### N' or the numbers themselves.")
    predicted = extract_final_number(prediction)
    hits += predicted is not None and (
        decimal.Decimal(predicted) == decimal.Decimal(reference))
  return {"accuracy": 100 * hits / len(targets)}


_WORD_EDGES = string.punctuation + "\u201c\u201d\u2018\u2019"


def first_word(text: str | bytes) -> str:
  """The first whitespace-separated word, lowercased, edge punctuation off."""
  words = _text(text).split()
  return words[0].strip(_WORD_EDGES).lower() if words else ""


def last_word_accuracy(targets: Sequence[str], predictions: Sequence[str]
                       ) -> dict[str, float]:
  """LAMBADA: percentage of predictions whose first word is the target word.

  The model continues the passage; its first word is compared with the
  missing last word, case-insensitively and without surrounding punctuation.
  """
  _check_pairs("last_word_accuracy", targets, predictions)
  return accuracy([first_word(t) for t in targets],
                  [first_word(p) for p in predictions])


# --- rank classification -----------------------------------------------------


class RankTarget(NamedTuple):
  """What rank classification needs of one (prompt, option) example."""
  example_index: int
  is_correct: bool


def rank_classification_accuracy(targets: Sequence[RankTarget],
                                 scores: Sequence[float]) -> dict[str, float]:
  """Percentage of examples whose best-scoring option is a correct one.

  Args:
    targets: per (prompt, option) example, its RankTarget (or a pair
      (example_index, is_correct)); the options of one original example share
      `example_index`, in any order.
    scores: per (prompt, option) example, log p(option | prompt), as
      seqio.Evaluator passes the score_fn's output. Ties go to the option
      seen first.

  Returns:
    {'accuracy': ...} over original examples.
  """
  _check_pairs("rank_classification_accuracy", targets, scores, "scores")
  best: dict[int, tuple[float, bool]] = {}
  has_correct: dict[int, bool] = {}
  for (index, is_correct), score in zip(targets, scores):
    index, is_correct, score = int(index), bool(is_correct), float(score)
    if index not in best or score > best[index][0]:
      best[index] = (score, is_correct)
    has_correct[index] = has_correct.get(index, False) or is_correct
  missing = sorted(i for i, ok in has_correct.items() if not ok)
  if missing:
    raise ValueError(
        f"Examples {missing[:10]} have no correct option (unlabelled data, "
        "e.g. a test split?); rank classification needs one.")
  if not best:
    return {"accuracy": 0.0}
  hits = sum(is_correct for _, is_correct in best.values())
  return {"accuracy": 100 * hits / len(best)}


# --- postprocessors (seqio: fn(output, example=None, is_target=False)) -------


def qa_answers(output: str | bytes, example: Mapping | None = None,
               is_target: bool = False) -> str | list[str]:
  """A prediction stays text; a target becomes all of its references.

  The references come from the example's 'answers' feature (seqio passes the
  preprocessed example); without one the target text is the only reference.
  """
  if is_target and example is not None and "answers" in example:
    return [_text(a).strip() for a in example["answers"]]
  if is_target:
    return [_text(output).strip()]
  return _text(output).strip()


def gsm8k_answer(output: str | bytes, example: Mapping | None = None,
                 is_target: bool = False) -> str:
  """The final number of a solution ('' when it has none)."""
  del example, is_target
  return extract_final_number(output) or ""


def lambada_word(output: str | bytes, example: Mapping | None = None,
                 is_target: bool = False) -> str:
  """The first word of the text (for a target: the missing word itself)."""
  del example, is_target
  return first_word(output)


def rank_classification_target(output: Any, example: Mapping | None = None,
                               is_target: bool = False) -> Any:
  """A target becomes RankTarget(example's idx[0], is_correct).

  Predictions (unused by score metrics) pass through unchanged.
  """
  if not is_target:
    return output
  if example is None or "idx" not in example or "is_correct" not in example:
    raise ValueError(
        "rank_classification_target needs the preprocessed example with "
        f"'idx' and 'is_correct' features, got {sorted(example or {})}.")
  return RankTarget(int(example["idx"][0]), bool(example["is_correct"]))
