"""The paper's nine downstream Tasks, from TFDS, in standard and pause form.

Importing this module registers (see `register_downstream_tasks`), for each
name below, '<name>' and '<name>_pause' (M_ft pauses appended to the prefix,
through `registry.pause_variant(form='finetune')`):

  name                    TFDS                     how            metric
  squad                   squad/v1.1:3.0.0         generation     EM, F1
  coqa                    coqa:1.0.0               generation     F1 (and EM)
  gsm8k                   gsm8k:1.0.0              generation     final number
  commonsense_qa          cos_e:0.0.1              generation     EM
  piqa                    piqa:1.0.0               rank classif.  accuracy
  hellaswag               hellaswag:1.1.0          rank classif.  accuracy
  lambada                 lambada:1.0.0            generation     last word
  web_questions           web_questions:1.0.0      generation     EM (and F1)
  natural_questions_open  natural_questions_open:1.0.0  generation  EM (and F1)
  commonsense_qa_rank     cos_e:0.0.1              rank classif.  accuracy
                          (an extra: CommonsenseQA scored by its five options)

CommonsenseQA is not in the TFDS catalog; `cos_e` (CoS-E v1.11) holds all of
its train and dev questions, with their choices and answers. Every Task has
the splits 'train' and 'validation'; 'validation' is the split evaluated on
(CoQA's, GSM8k's, LAMBADA's and WebQuestions' TFDS 'test'; LAMBADA's TFDS
'train' is its development set).

Generation Tasks: 'inputs' is the prefix, ending with the question and
'answer:' (the prefix is cut from the left, so the question survives),
'targets' the answer (the first reference, for training), and the non-model
feature 'answers' every reference, which the postprocessor hands to the
metric. Rank-classification Tasks give one example per (prompt, option):
'inputs' the prompt, 'targets' the option, 'idx' [example, option],
'is_correct'; their 'train' split keeps only the correct option (the
finetuning target), other splits keep every option for scoring.

Nothing is read at import: the TFDS builders and the vocabulary are opened on
first use. Data come from a TFDS data_dir prepared beforehand (docs/downstream.md).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence

import seqio
import tensorflow as tf

from pause_flax.data import registry
from pause_flax.data import metrics

# M_ft per task. Goyal et al. (2024) report the best M_ft for GSM8k (10) and
# SQuAD (50); the others are this framework's default, 10 (the paper chose
# M_ft from {10, 50} per task without naming the rest).
PAPER_M_FT: dict[str, int] = {
    "squad": 50,
    "coqa": 10,
    "gsm8k": 10,
    "commonsense_qa": 10,
    "piqa": 10,
    "hellaswag": 10,
    "lambada": 10,
    "web_questions": 10,
    "natural_questions_open": 10,
    "commonsense_qa_rank": 10,
}
M_FT_FROM_PAPER = frozenset({"squad", "gsm8k"})

_TRAIN_SPLITS = ("train",)


# --- preprocessors -----------------------------------------------------------


def _join(*parts) -> tf.Tensor:
  return tf.strings.join(list(parts), separator=" ")


def _first(answers: tf.Tensor) -> tf.Tensor:
  """The first answer, '' when there is none (filter_unanswered drops it)."""
  return tf.strings.reduce_join(answers[:1])


def filter_unanswered(dataset: tf.data.Dataset) -> tf.data.Dataset:
  """Drops examples whose 'answers' is empty (no target to train on)."""
  return dataset.filter(lambda x: tf.size(x["answers"]) > 0)


@seqio.map_over_dataset
def squad(x: Mapping[str, tf.Tensor]) -> dict[str, tf.Tensor]:
  """SQuAD v1.1: 'context: C question: Q answer:' -> the first answer."""
  answers = x["answers"]["text"]
  return {
      "inputs": _join("context:", x["context"], "question:", x["question"],
                      "answer:"),
      "targets": _first(answers),
      "answers": answers,
  }


def coqa(dataset: tf.data.Dataset) -> tf.data.Dataset:
  """CoQA: one example per turn, the conversation so far in the prefix.

  Turn i: 'story: S question: q_1 answer: a_1 ... question: q_i answer:' ->
  a_i. Only as many turns as there are both questions and answers.
  """

  def turns(x):
    questions = x["questions"]
    answers = x["answers"]["input_text"]
    n = tf.minimum(tf.size(questions), tf.size(answers))
    questions, answers = questions[:n], answers[:n]
    qa = tf.strings.join([" question: ", questions, " answer: ", answers])
    history = tf.strings.reduce_join(tf.gather(qa, tf.ragged.range(tf.range(n))),
                                     axis=1)
    inputs = tf.strings.join(
        ["story: ", x["story"], history, " question: ", questions, " answer:"])
    return tf.data.Dataset.from_tensor_slices({
        "inputs": inputs,
        "targets": answers,
        "answers": answers[:, None],
    })

  return dataset.flat_map(turns)


@seqio.map_over_dataset
def gsm8k(x: Mapping[str, tf.Tensor]) -> dict[str, tf.Tensor]:
  """GSM8k: 'question: Q answer:' -> the full solution, ending '#### N'."""
  return {
      "inputs": _join("question:", x["question"], "answer:"),
      "targets": x["answer"],
      "answers": x["answer"][None],
  }


def _csqa_choices(x: Mapping[str, tf.Tensor]) -> tf.Tensor:
  return tf.strings.reduce_join(x["choices"], separator=", ")


@seqio.map_over_dataset
def commonsense_qa(x: Mapping[str, tf.Tensor]) -> dict[str, tf.Tensor]:
  """CommonsenseQA: 'question: Q choices: c1, ..., c5 answer:' -> answer."""
  return {
      "inputs": _join("question:", x["question"], "choices:", _csqa_choices(x),
                      "answer:"),
      "targets": x["answer"],
      "answers": x["answer"][None],
  }


@seqio.map_over_dataset
def commonsense_qa_options(x: Mapping[str, tf.Tensor]) -> dict[str, tf.Tensor]:
  """CommonsenseQA for rank classification: the five choices as options.

  The label is the answer's position among the choices (-1, no correct
  option, if it is not one of them).
  """
  match = tf.equal(x["choices"], x["answer"])
  label = tf.where(tf.reduce_any(match),
                   tf.cast(tf.argmax(tf.cast(match, tf.int32)), tf.int32), -1)
  return {
      "inputs": _join("question:", x["question"], "answer:"),
      "options": x["choices"],
      "label": label,
      "split": x["split"],
  }


@seqio.map_over_dataset
def piqa(x: Mapping[str, tf.Tensor]) -> dict[str, tf.Tensor]:
  """PIQA: 'goal: G solution:' with options sol1, sol2."""
  return {
      "inputs": _join("goal:", x["goal"], "solution:"),
      "options": tf.stack([x["sol1"], x["sol2"]]),
      "label": tf.cast(x["label"], tf.int32),
      "split": x["split"],
  }


@seqio.map_over_dataset
def hellaswag(x: Mapping[str, tf.Tensor]) -> dict[str, tf.Tensor]:
  """HellaSwag: 'activity: context' with the endings as options."""
  return {
      "inputs": tf.strings.join([x["activity_label"], ": ", x["context"]]),
      "options": x["endings"],
      "label": tf.cast(x["label"], tf.int32),
      "split": x["split"],
  }


def lambada(dataset: tf.data.Dataset) -> tf.data.Dataset:
  """LAMBADA: the passage without its last word -> that word.

  Whitespace inside the prefix is collapsed to single spaces; passages of
  fewer than two words are dropped.
  """

  def split_last(x):
    words = tf.strings.split(x["passage"])
    return {
        "inputs": tf.strings.reduce_join(words[:-1], separator=" "),
        "targets": words[-1],
        "answers": words[-1:],
    }

  dataset = dataset.filter(
      lambda x: tf.size(tf.strings.split(x["passage"])) >= 2)
  return dataset.map(split_last, num_parallel_calls=tf.data.AUTOTUNE)


def _open_qa(question: tf.Tensor, answers: tf.Tensor) -> dict[str, tf.Tensor]:
  return {
      "inputs": _join("question:", question, "answer:"),
      "targets": _first(answers),
      "answers": answers,
  }


@seqio.map_over_dataset
def web_questions(x: Mapping[str, tf.Tensor]) -> dict[str, tf.Tensor]:
  """WebQuestions: 'question: Q answer:' -> the first answer."""
  return _open_qa(x["question"], x["answers"])


@seqio.map_over_dataset
def natural_questions_open(x: Mapping[str, tf.Tensor]) -> dict[str, tf.Tensor]:
  """NaturalQuestions (open): 'question: Q answer:' -> the first answer."""
  return _open_qa(x["question"], x["answer"])


def rank_classification(dataset: tf.data.Dataset,
                        train_splits: Sequence[str] = _TRAIN_SPLITS
                        ) -> tf.data.Dataset:
  """{'inputs', 'options', 'label', 'split'} -> one example per option.

  Each output example has 'inputs' (the prompt), 'targets' (the option),
  'idx' int32 [example index, option index], 'is_correct' (option ==
  label) and 'split'. Examples of `train_splits` keep only their correct
  option (the finetuning target); others keep all, to be scored (see
  `metrics.rank_classification_accuracy`). Example indices count the
  examples of this dataset (shard) in order.
  """
  train_splits = tf.constant(list(train_splits), tf.string)

  def expand(index, x):
    options = x["options"]
    n = tf.size(options)
    option_index = tf.range(n, dtype=tf.int32)
    is_correct = tf.equal(option_index, x["label"])
    train = tf.reduce_any(tf.equal(x["split"], train_splits))
    keep = tf.logical_or(is_correct, tf.logical_not(train))
    examples = {
        "inputs": tf.fill([n], x["inputs"]),
        "targets": options,
        "idx": tf.stack(
            [tf.fill([n], tf.cast(index, tf.int32)), option_index], axis=1),
        "is_correct": is_correct,
        "split": tf.fill([n], x["split"]),
    }
    return tf.data.Dataset.from_tensor_slices(
        {k: tf.boolean_mask(v, keep) for k, v in examples.items()})

  return dataset.enumerate().flat_map(expand)


def trim_inputs_left(dataset: tf.data.Dataset,
                     sequence_length: Mapping[str, int] | None = None
                     ) -> tf.data.Dataset:
  """Keeps the last `sequence_length['inputs']` tokens of 'inputs'.

  The prefix ends with the question, so a long context loses its start, not
  the question; `preprocessors.append_pauses` cuts the same side.
  """
  length = (sequence_length or {}).get("inputs")
  if length is None:
    return dataset
  return dataset.map(lambda x: {**x, "inputs": x["inputs"][-length:]},
                     num_parallel_calls=tf.data.AUTOTUNE)


class SplitTaggedTfdsSource(seqio.TfdsDataSource):
  """A TfdsDataSource that adds the canonical split name as feature 'split'.

  Rank classification keeps every option for evaluation but only the correct
  one for training; seqio gives preprocessors no split, so the data carry it.
  """

  def get_dataset(self, split: str | None = None, shuffle: bool = True,
                  seed: int | None = None,
                  shard_info: seqio.ShardInfo | None = None,
                  **kwargs) -> tf.data.Dataset:
    split = split or "train"
    dataset = super().get_dataset(split, shuffle, seed, shard_info, **kwargs)
    return dataset.map(lambda x: {**x, "split": tf.constant(split)},
                       num_parallel_calls=tf.data.AUTOTUNE)


# --- registration ------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DownstreamTask:
  """How one downstream task is read, formatted, scored and sized."""
  tfds_name: str
  splits: Mapping[str, str]  # canonical split -> TFDS split
  formatter: Callable[[tf.data.Dataset], tf.data.Dataset]
  metric_fns: tuple[Callable, ...]
  postprocess_fn: Callable
  lengths: Mapping[str, int]  # default task feature lengths
  rank_classification: bool = False


_TRAIN_VALIDATION = {"train": "train", "validation": "validation"}
_TRAIN_TEST = {"train": "train", "validation": "test"}
_COS_E = "cos_e:0.0.1"

DOWNSTREAM_TASKS: Mapping[str, DownstreamTask] = {
    "squad": DownstreamTask(
        "squad/v1.1:3.0.0", _TRAIN_VALIDATION, squad, (metrics.squad,),
        metrics.qa_answers, {"inputs": 512, "targets": 32}),
    "coqa": DownstreamTask(
        "coqa:1.0.0", _TRAIN_TEST, coqa, (metrics.squad,),
        metrics.qa_answers, {"inputs": 1024, "targets": 32}),
    "gsm8k": DownstreamTask(
        "gsm8k:1.0.0", _TRAIN_TEST, gsm8k, (metrics.gsm8k_accuracy,),
        metrics.gsm8k_answer, {"inputs": 256, "targets": 256}),
    "commonsense_qa": DownstreamTask(
        _COS_E, _TRAIN_VALIDATION, commonsense_qa, (metrics.squad,),
        metrics.qa_answers, {"inputs": 128, "targets": 16}),
    "piqa": DownstreamTask(
        "piqa:1.0.0", _TRAIN_VALIDATION, piqa,
        (metrics.rank_classification_accuracy,),
        metrics.rank_classification_target, {"inputs": 128, "targets": 128},
        rank_classification=True),
    "hellaswag": DownstreamTask(
        "hellaswag:1.1.0", _TRAIN_VALIDATION, hellaswag,
        (metrics.rank_classification_accuracy,),
        metrics.rank_classification_target, {"inputs": 128, "targets": 64},
        rank_classification=True),
    "lambada": DownstreamTask(
        "lambada:1.0.0", _TRAIN_TEST, lambada, (metrics.last_word_accuracy,),
        metrics.lambada_word, {"inputs": 256, "targets": 8}),
    "web_questions": DownstreamTask(
        "web_questions:1.0.0", _TRAIN_TEST, web_questions, (metrics.squad,),
        metrics.qa_answers, {"inputs": 64, "targets": 32}),
    "natural_questions_open": DownstreamTask(
        "natural_questions_open:1.0.0", _TRAIN_VALIDATION,
        natural_questions_open, (metrics.squad,), metrics.qa_answers,
        {"inputs": 64, "targets": 32}),
    "commonsense_qa_rank": DownstreamTask(
        _COS_E, _TRAIN_VALIDATION, commonsense_qa_options,
        (metrics.rank_classification_accuracy,),
        metrics.rank_classification_target, {"inputs": 64, "targets": 16},
        rank_classification=True),
}


def _resolve_num_pauses(num_pauses: int | Mapping[str, int]) -> dict[str, int]:
  if isinstance(num_pauses, Mapping):
    unknown = sorted(set(num_pauses) - set(DOWNSTREAM_TASKS))
    if unknown:
      raise ValueError(
          f"num_pauses names unknown tasks {unknown}; known: "
          f"{sorted(DOWNSTREAM_TASKS)}.")
    resolved = {**PAPER_M_FT, **num_pauses}
  else:
    resolved = dict.fromkeys(DOWNSTREAM_TASKS, num_pauses)
  for name, m in resolved.items():
    if isinstance(m, bool) or not isinstance(m, int) or m < 0:
      raise ValueError(
          f"num_pauses for {name!r} is {m!r}; use an integer >= 0.")
  return resolved


def register_downstream_tasks(
    data_dir: str | None = None,
    vocabulary: seqio.Vocabulary | None = None,
    num_pauses: int | Mapping[str, int] = PAPER_M_FT) -> list[str]:
  """Registers '<name>' and '<name>_pause' for every downstream task.

  Re-registering (e.g. with another data_dir, vocabulary or M) replaces the
  earlier Tasks. Reads nothing.

  Args:
    data_dir: TFDS data_dir holding the prepared datasets (read only); None
      means TFDS's default. An explicit directory must exist.
    vocabulary: the base vocabulary; default T5's 32k SentencePiece, as the
      C4 tasks use (loaded on first use). Pause forms wrap it in a
      PauseVocabulary.
    num_pauses: M_ft of the pause forms: one int for all tasks, or a mapping
      {task: M} over PAPER_M_FT.

  Returns:
    The registered names, standard then pause form for each task.
  """
  if data_dir is not None and not tf.io.gfile.isdir(data_dir):
    raise FileNotFoundError(
        f"Downstream data_dir={data_dir!r} does not exist; point it at a TFDS "
        "data_dir holding the prepared datasets (docs/downstream.md), or pass "
        "None for TFDS's default.")
  resolved = _resolve_num_pauses(num_pauses)
  vocabulary = vocabulary or seqio.SentencePieceVocabulary(
      registry.DEFAULT_SPM_PATH)
  features = {
      "inputs": seqio.Feature(vocabulary, add_eos=False),
      "targets": seqio.Feature(vocabulary, add_eos=True),
  }
  names = []
  for name, spec in DOWNSTREAM_TASKS.items():
    source_cls = (SplitTaggedTfdsSource if spec.rank_classification else
                  seqio.TfdsDataSource)
    steps = [spec.formatter]
    steps.append(rank_classification if spec.rank_classification else
                 filter_unanswered)
    registry.add_task(
        name,
        source=source_cls(spec.tfds_name, tfds_data_dir=data_dir,
                          splits=dict(spec.splits), read_only=True),
        output_features=features,
        preprocessors=steps + [
            seqio.preprocessors.tokenize,
            trim_inputs_left,
            seqio.preprocessors.append_eos_after_trim,
        ],
        postprocess_fn=spec.postprocess_fn,
        metric_fns=list(spec.metric_fns))
    m = resolved[name]
    pause_name = registry.pause_variant(name, form="finetune", num_pauses=m,
                                        name=f"{name}_pause")
    # The pause form sees the same prefix as the standard one, plus M pauses.
    lengths = registry.DEFAULT_LENGTHS
    lengths[name] = dict(spec.lengths)
    lengths[pause_name] = {**spec.lengths,
                           "inputs": spec.lengths["inputs"] + m}
    names += [name, pause_name]
  return names


register_downstream_tasks()
