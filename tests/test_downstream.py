"""Downstream Tasks read through tfds.testing.mock_data, in both forms.

The TFDS builders are the installed ones (their real feature structures);
`mock_data` serves hand-made examples, encoded and decoded by each builder's
own features, from a fake data_dir holding only their metadata.
"""

import os
from unittest import mock

import numpy as np
import pytest
import seqio
import tensorflow as tf
import tensorflow_datasets as tfds

from pause_flax.data import downstream
from pause_flax.data import tasks
from pause_flax.evaluation import metrics
from pause_flax.vocab import PauseVocabulary

VOCAB = seqio.ByteVocabulary()
PAUSE_ID = VOCAB.vocab_size  # PauseVocabulary(ByteVocabulary()).pause_id

_STORY = "Tom has a red ball. He plays in the park."
_SOLUTION = "Tom has 3 apples and buys 4 more.\n3+4=<<3+4=7>>7\n#### 7"
_CHOICES = ["bank", "library", "school", "park", "zoo"]

# TFDS builder name -> examples, as the builder's features encode them.
RAW = {
    "squad": [
        {"id": "a", "title": "Super_Bowl_50",
         "context": "Denver beat Carolina in Super Bowl 50.",
         "question": "Who won Super Bowl 50?",
         "answers": {"text": ["Denver", "Denver Broncos"],
                     "answer_start": [0, 0]}},
        {"id": "b", "title": "Sky", "context": "The sky is blue.",
         "question": "What color is the sky?",
         "answers": {"text": ["blue"], "answer_start": [11]}},
    ],
    "coqa": [
        {"source": "mctest", "story": _STORY,
         "questions": ["What does Tom have?", "What color is it?",
                       "Where does he play?"],
         "answers": {"input_text": ["a ball", "red", "in the park"],
                     "answer_start": [4, 10, 23], "answer_end": [18, 13, 40]}},
    ],
    "gsm8k": [
        {"question": "Tom has 3 apples and buys 4. How many?",
         "answer": _SOLUTION,
         "annotation": "Tom has 3 apples and buys 4 more.\n3+4=<<3+4=7>>7\n",
         "short_answer": "7"},
    ],
    "cos_e": [
        {"id": "q1", "question": "Where do you borrow books?",
         "choices": _CHOICES, "answer": "library",
         "abstractive_explanation": "", "extractive_explanation": ""},
    ],
    "piqa": [
        {"id": "p1", "goal": "Dry wet hands.", "sol1": "Use a towel.",
         "sol2": "Use a bucket of water.", "label": 0},
        {"id": "p2", "goal": "Cool a drink.", "sol1": "Heat it.",
         "sol2": "Add ice.", "label": 1},
    ],
    "hellaswag": [
        {"context": "A man opens a jar.",
         "endings": ["He eats soup.", "He eats pickles.", "He flies.",
                     "He sings."],
         "activity_label": "Cooking", "label": 1, "split_type": "indomain",
         "source_id": "activitynet~v_1"},
    ],
    "lambada": [
        {"passage": "She poured the tea.\nThen  she drank the tea\n"},
        {"passage": "Alone\n"},  # one word: no prefix, dropped
    ],
    "web_questions": [
        {"url": "u1", "question": "what is the capital of france?",
         "answers": ["Paris", "Paris, France"]},
        {"url": "u2", "question": "who knows?", "answers": []},  # dropped
    ],
    "natural_questions_open": [
        {"question": "who wrote hamlet",
         "answer": ["William Shakespeare", "Shakespeare"]},
    ],
}

# Task -> (inputs, targets, answers) of its 'validation' examples.
EXPECTED_GENERATION = {
    "squad": [
        ("context: Denver beat Carolina in Super Bowl 50. question: Who won "
         "Super Bowl 50? answer:", "Denver", ["Denver", "Denver Broncos"]),
        ("context: The sky is blue. question: What color is the sky? answer:",
         "blue", ["blue"]),
    ],
    "coqa": [
        (f"story: {_STORY} question: What does Tom have? answer:", "a ball",
         ["a ball"]),
        (f"story: {_STORY} question: What does Tom have? answer: a ball "
         "question: What color is it? answer:", "red", ["red"]),
        (f"story: {_STORY} question: What does Tom have? answer: a ball "
         "question: What color is it? answer: red question: Where does he "
         "play? answer:", "in the park", ["in the park"]),
    ],
    "gsm8k": [
        ("question: Tom has 3 apples and buys 4. How many? answer:",
         _SOLUTION, [_SOLUTION]),
    ],
    "commonsense_qa": [
        ("question: Where do you borrow books? choices: bank, library, "
         "school, park, zoo answer:", "library", ["library"]),
    ],
    "lambada": [("She poured the tea. Then she drank the", "tea", ["tea"])],
    "web_questions": [
        ("question: what is the capital of france? answer:", "Paris",
         ["Paris", "Paris, France"]),
    ],
    "natural_questions_open": [
        ("question: who wrote hamlet answer:", "William Shakespeare",
         ["William Shakespeare", "Shakespeare"]),
    ],
}

# Task -> (predictions of its 'validation' examples, the metrics they get).
PREDICTIONS = {
    "squad": (["The Denver Broncos!", "blue sky"],
              {"em": 50.0, "f1": 100 * (1 + 2 / 3) / 2}),
    "coqa": (["a ball", "Red.", "park"],
             {"em": 200 / 3, "f1": 100 * (1 + 1 + 2 / 3) / 3}),
    "gsm8k": (["3 + 4 = 7 apples, so $7.00"], {"accuracy": 100.0}),
    "commonsense_qa": (["the Library"], {"em": 100.0, "f1": 100.0}),
    "lambada": (["Tea. And"], {"accuracy": 100.0}),
    "web_questions": (["paris france"], {"em": 100.0, "f1": 100.0}),
    "natural_questions_open": (["Mr Shakespeare"],
                               {"em": 0.0, "f1": 100 * 2 / 3}),
}

# Task -> (prompt, options, label) per original example.
EXPECTED_RANK = {
    "piqa": [
        ("goal: Dry wet hands. solution:",
         ["Use a towel.", "Use a bucket of water."], 0),
        ("goal: Cool a drink. solution:", ["Heat it.", "Add ice."], 1),
    ],
    "hellaswag": [
        ("Cooking: A man opens a jar.",
         ["He eats soup.", "He eats pickles.", "He flies.", "He sings."], 1),
    ],
    "commonsense_qa_rank": [
        ("question: Where do you borrow books? answer:", _CHOICES, 1),
    ],
}


def _as_dataset(self, split, decoders=None, read_config=None,
                shuffle_files=False):
  """Serves RAW[builder], through the builder's own encode/decode."""
  del split, decoders, read_config, shuffle_files
  features = self.info.features
  signature = tf.nest.map_structure(
      lambda t: tf.TensorSpec(t.shape, t.tf_dtype),
      features.get_serialized_info())
  def to_arrays(value, spec):  # Sequence features encode to lists of arrays.
    if isinstance(spec, dict):
      return {k: to_arrays(value[k], s) for k, s in spec.items()}
    if isinstance(value, list):
      value = [np.asarray(v).item() for v in value]
    return np.array(value, dtype=object if spec.dtype == tf.string else
                    spec.dtype.as_numpy_dtype)
  encoded = [to_arrays(features.encode_example(ex), signature)
             for ex in RAW[self.name]]
  dataset = tf.data.Dataset.from_generator(lambda: iter(encoded),
                                           output_signature=signature)
  return dataset.map(features.decode_example)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  """A TFDS data_dir with every downstream builder's metadata, no data."""
  root = str(tmp_path_factory.mktemp("tfds"))
  for spec in downstream.DOWNSTREAM_TASKS.values():
    builder = tfds.builder(spec.tfds_name, data_dir=root)
    builder.info.set_splits(tfds.core.SplitDict([
        tfds.core.SplitInfo(name=s, shard_lengths=[len(RAW[builder.name])],
                            num_bytes=0)
        for s in sorted(set(spec.splits.values()))]))
    os.makedirs(builder.data_dir, exist_ok=True)
    builder.info.write_to_directory(builder.data_dir)
  downstream.register_downstream_tasks(root, vocabulary=VOCAB)
  with tfds.testing.mock_data(as_dataset_fn=_as_dataset, data_dir=root):
    yield root
  downstream.register_downstream_tasks()  # Restore the defaults.


def _task_examples(name, split="validation"):
  task = seqio.get_mixture_or_task(name)
  lengths = tasks.default_task_feature_lengths(name)
  return list(task.get_dataset(lengths, split=split, shuffle=False)
              .as_numpy_iterator())


def _model_examples(name, split="validation"):
  ds = seqio.get_dataset(name, tasks.default_task_feature_lengths(name),
                         tasks.get_feature_converter(name),
                         dataset_split=split, shuffle=False)
  return list(ds.as_numpy_iterator())


def _strings(values):
  return [v.decode() for v in values]


def test_names_and_registration_reads_nothing(data_dir):
  names = downstream.register_downstream_tasks()
  assert names == [n for task in downstream.DOWNSTREAM_TASKS
                   for n in (task, f"{task}_pause")]
  assert len(downstream.DOWNSTREAM_TASKS) == 10  # the paper's 9 + CSQA ranked
  with mock.patch.object(tfds, "builder", side_effect=AssertionError("read")), \
      mock.patch.object(tf.io.gfile, "GFile",
                        side_effect=AssertionError("read")):
    downstream.register_downstream_tasks()
  base = tasks.get_vocabulary("squad")
  assert isinstance(base, seqio.SentencePieceVocabulary)
  assert base.sentencepiece_model_file == tasks.DEFAULT_SPM_PATH
  vocab = tasks.get_vocabulary("squad_pause")
  assert isinstance(vocab, PauseVocabulary) and vocab.base == base
  for name, spec in downstream.DOWNSTREAM_TASKS.items():
    m = downstream.PAPER_M_FT[name]
    assert tasks.default_task_feature_lengths(name) == spec.lengths
    assert tasks.default_task_feature_lengths(f"{name}_pause") == {
        **spec.lengths, "inputs": spec.lengths["inputs"] + m}
  assert downstream.M_FT_FROM_PAPER == {"squad", "gsm8k"}
  assert downstream.PAPER_M_FT["squad"] == 50
  assert downstream.PAPER_M_FT["gsm8k"] == 10
  downstream.register_downstream_tasks(data_dir, vocabulary=VOCAB)


@pytest.mark.parametrize("name", sorted(EXPECTED_GENERATION))
def test_generation_task(data_dir, name):
  del data_dir
  examples = _task_examples(name)
  got = [(ex["inputs_pretokenized"].decode(),
          ex["targets_pretokenized"].decode(), _strings(ex["answers"]))
         for ex in examples]
  assert got == EXPECTED_GENERATION[name]
  for ex in examples:
    assert list(ex["inputs"]) == VOCAB.encode(ex["inputs_pretokenized"])
    assert list(ex["targets"]) == VOCAB.encode(
        ex["targets_pretokenized"]) + [VOCAB.eos_id]

  # What seqio.Evaluator does: postprocess targets (with their example) and
  # predictions, then call the Task's metric function.
  task = seqio.get_mixture_or_task(name)
  predictions, expected = PREDICTIONS[name]
  targets = [task.postprocess_fn(ex["targets_pretokenized"].decode(),
                                 example=ex, is_target=True)
             for ex in examples]
  outputs = [task.postprocess_fn(p, example=ex)
             for p, ex in zip(predictions, examples)]
  (metric_fn,) = task.predict_metric_fns
  assert metric_fn(targets, outputs) == pytest.approx(expected)

  _check_pause_form(name, examples)


@pytest.mark.parametrize("name", sorted(EXPECTED_RANK))
def test_rank_classification_task(data_dir, name):
  del data_dir
  expected = [(prompt, option, [i, j], j == label)
              for i, (prompt, options, label) in enumerate(EXPECTED_RANK[name])
              for j, option in enumerate(options)]
  def rows(examples):
    return [(ex["inputs_pretokenized"].decode(),
             ex["targets_pretokenized"].decode(), list(ex["idx"]),
             bool(ex["is_correct"])) for ex in examples]
  examples = _task_examples(name)
  assert rows(examples) == expected
  # Training keeps only the correct option, the finetuning target.
  assert rows(_task_examples(name, "train")) == [r for r in expected if r[3]]
  _check_pause_form(name, examples)

  # Scores favouring the last option: right exactly where it is the label.
  targets = [seqio.get_mixture_or_task(name).postprocess_fn(
      ex["targets_pretokenized"], example=ex, is_target=True)
             for ex in examples]
  scores = [float(ex["idx"][1]) for ex in examples]
  last = [label == len(options) - 1
          for _, options, label in EXPECTED_RANK[name]]
  assert metrics.rank_classification_accuracy(targets, scores) == {
      "accuracy": 100 * np.mean(last)}


def _check_pause_form(name, std_examples):
  """The pause form: prefix, then M pauses, then the target; loss on targets."""
  m = downstream.PAPER_M_FT[name]
  assert tasks.get_vocabulary(f"{name}_pause").pause_id == PAUSE_ID
  converted = _model_examples(f"{name}_pause")
  assert len(converted) == len(std_examples)
  for std, ex in zip(std_examples, converted):
    prefix = list(std["inputs"]) + [PAUSE_ID] * m
    sequence = prefix + list(std["targets"])
    n = len(sequence)
    np.testing.assert_array_equal(ex["decoder_target_tokens"][:n], sequence)
    assert not ex["decoder_target_tokens"][n:].any()
    np.testing.assert_array_equal(
        ex["decoder_loss_weights"],
        [0] * len(prefix) + [1] * len(std["targets"]) +
        [0] * (len(ex["decoder_loss_weights"]) - n))


def test_standard_form_has_no_pauses(data_dir):
  del data_dir
  (ex, _) = _model_examples("squad")
  (std, _) = _task_examples("squad")
  sequence = list(std["inputs"]) + list(std["targets"])
  n = len(sequence)
  np.testing.assert_array_equal(ex["decoder_target_tokens"][:n], sequence)
  np.testing.assert_array_equal(
      ex["decoder_loss_weights"][:n],
      [0] * len(std["inputs"]) + [1] * len(std["targets"]))
  assert not ex["decoder_loss_weights"][n:].any()


def test_seqio_evaluator_predict_and_score(data_dir):
  del data_dir
  def evaluate(name, **fns):
    evaluator = seqio.Evaluator(
        name, tasks.get_feature_converter(name),
        sequence_length=tasks.default_task_feature_lengths(name))
    results, _ = evaluator.evaluate(compute_metrics=True, **fns)
    return results.result()[name]

  # The Evaluator passes enumerated (index, model features) examples.
  answers = ["Denver Broncos", "green"]
  def predict(ds):  # fixed-length outputs, EOS then padding, as decoding's
    return [(i, np.pad(VOCAB.encode(answers[i]) + [VOCAB.eos_id],
                       (0, 20 - len(answers[i]))))
            for i, _ in ds.as_numpy_iterator()]
  assert evaluate("squad_pause", predict_fn=predict) == pytest.approx(
      {"em": 50.0, "f1": 50.0})

  def score(ds):  # prefers the shorter option; p2's tie goes to the first
    return [(i, -float((ex["decoder_loss_weights"] > 0).sum()))
            for i, ex in ds.as_numpy_iterator()]
  assert evaluate("piqa_pause", score_fn=score) == {"accuracy": 50.0}


def test_settings_errors():
  with pytest.raises(FileNotFoundError, match="data_dir='/no/such/dir'"):
    downstream.register_downstream_tasks("/no/such/dir")
  with pytest.raises(ValueError, match=r"unknown tasks \['sqad'\]"):
    downstream.register_downstream_tasks(num_pauses={"sqad": 5})
  with pytest.raises(ValueError, match="num_pauses for 'squad' is -1"):
    downstream.register_downstream_tasks(num_pauses={"squad": -1})


def test_num_pauses_is_a_setting(data_dir):
  names = downstream.register_downstream_tasks(
      data_dir, vocabulary=VOCAB, num_pauses={"squad": 3})
  assert "squad_pause" in names
  assert tasks.default_task_feature_lengths("squad_pause")["inputs"] == 515
  (ex,) = _task_examples("squad_pause")[:1]
  assert list(ex["inputs"][-4:]) == [ord(":") + 3] + [PAUSE_ID] * 3
  assert tasks.pause_variant("gsm8k", form="finetune", num_pauses=20) == (
      "gsm8k_pause20")
  downstream.register_downstream_tasks(data_dir, vocabulary=VOCAB, num_pauses=0)
  assert _task_examples("lambada_pause")[0]["inputs_pretokenized"] == (
      b"She poured the tea. Then she drank the")
  downstream.register_downstream_tasks(data_dir, vocabulary=VOCAB)


def test_inputs_are_cut_from_the_left(data_dir):
  """A long prefix loses its start, so the question and the pauses survive."""
  del data_dir
  text = EXPECTED_GENERATION["squad"][0][0]
  def first_inputs(name, length):
    task = seqio.get_mixture_or_task(name)
    ds = task.get_dataset({"inputs": length, "targets": 8},
                          split="validation", shuffle=False)
    return list(next(ds.as_numpy_iterator())["inputs"])
  assert VOCAB.decode(first_inputs("squad", 20)) == text[-20:]
  paused = first_inputs("squad_pause", 60)
  assert VOCAB.decode(paused[:10]) == text[-10:]
  assert paused[10:] == [PAUSE_ID] * 50
