"""Registered tasks, C4 over a fake TFDS data_dir, pause_variant, accessors."""

import functools
import importlib

import numpy as np
import pytest
import seqio
import tensorflow as tf
import tensorflow_datasets as tfds

from pause_flax.data import fake_c4 as fake_c4_lib
from pause_flax.data import feature_converters as fc
from pause_flax.data import registry
from pause_flax.data import tasks
from pause_flax.vocab import PauseVocabulary


@pytest.fixture(scope="module")
def fake_c4(tmp_path_factory):
  """A TFDS data_dir holding a tiny c4/en:3.0.1, and a tiny SentencePiece."""
  tmp = tmp_path_factory.mktemp("c4")
  docs = [f"document {i} says " + "hello world " * (i % 7 + 1) for i in range(40)]

  data_dir = fake_c4_lib.write_c4(str(tmp), docs)
  spm_path = fake_c4_lib.train_sentencepiece(str(tmp), docs * 5, vocab_size=30, name="tiny")
  yield data_dir, spm_path, docs
  tasks.register_c4_tasks()  # Restore the defaults for other tests.


def _examples(name, lengths, split="validation", pack=False, seed=0):
  ds = seqio.get_dataset(name, lengths, tasks.get_feature_converter(name, pack),
                         dataset_split=split, shuffle=False, seed=seed)
  return list(ds.as_numpy_iterator())


def test_names_registered_and_reimport_is_idempotent():
  names = {"c4_en_lm", "c4_en_lm_pause", "synthetic_lm", "synthetic_lm_pause"}
  for task in ("addition", "digit_sum", "pointer"):
    names |= {f"synthetic_{task}", f"synthetic_{task}_pause"}
  names |= {"squad", "squad_pause", "gsm8k_pause"}  # the downstream Tasks too
  assert names <= set(seqio.TaskRegistry.names())
  importlib.reload(tasks)
  tasks.register_c4_tasks()
  tasks.register_synthetic_tasks()
  assert names <= set(seqio.TaskRegistry.names())


@pytest.mark.parametrize("use_spm", [True, False])
def test_c4_through_get_dataset(fake_c4, use_spm):
  data_dir, spm_path, docs = fake_c4
  if use_spm:
    std, pause = tasks.register_c4_tasks(data_dir, spm_path, fraction=0.25)
  else:
    std, pause = tasks.register_c4_tasks(
        data_dir, vocabulary=seqio.ByteVocabulary(), fraction=0.25)
  base = tasks.get_vocabulary(std)
  vocab = tasks.get_vocabulary(pause)
  assert isinstance(vocab, PauseVocabulary) and vocab.base == base
  assert vocab.pause_id == base.vocab_size

  chunks = _examples(std, {"targets": 32}, seed=1)
  stream = [t for ex in chunks
            for t in ex["decoder_target_tokens"][ex["decoder_loss_weights"] > 0]]
  source = tfds.load(tasks.C4_TFDS_NAME, split="validation", data_dir=data_dir)
  texts = [ex["text"].decode() for ex in tfds.as_numpy(source)]
  assert sorted(texts) == sorted(docs[:8])
  expected = [t for d in texts for t in base.encode(d) + [1]]
  assert stream == expected  # concatenated, EOS-separated, split into 32s
  assert all(ex["decoder_target_tokens"].shape == (32,) for ex in chunks)

  paused = _examples(pause, {"targets": 32}, pack=True, seed=1)
  assert set(paused[0]) >= {"decoder_segment_ids", "decoder_positions"}
  targets = np.concatenate([ex["decoder_target_tokens"] for ex in paused])
  weights = np.concatenate([ex["decoder_loss_weights"] for ex in paused])
  assert (targets == vocab.pause_id).sum() > 0
  np.testing.assert_array_equal(weights,
                                (targets != 0) & (targets != vocab.pause_id))
  def tokens(seed):
    return np.concatenate([ex["decoder_target_tokens"] for ex in _examples(
        pause, {"targets": 32}, pack=True, seed=seed)])
  np.testing.assert_array_equal(tokens(1), targets)
  assert not np.array_equal(tokens(2), targets)


def test_c4_settings_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="data_dir='/no/such/dir'"):
    tasks.register_c4_tasks("/no/such/dir")
  missing = str(tmp_path / "missing.model")
  with pytest.raises(FileNotFoundError, match=f"spm_path='{missing}'"):
    tasks.register_c4_tasks(spm_path=missing)


def test_synthetic_pipelines_and_resume():
  lm = _examples("synthetic_lm_pause", {"targets": 64}, seed=3)
  vocab = tasks.get_vocabulary("synthetic_lm_pause")
  assert vocab.pause_id == 259 and tasks.get_vocabulary("synthetic_lm").vocab_size == 259
  assert all(ex["decoder_target_tokens"].shape == (64,) for ex in lm)
  assert sum((ex["decoder_target_tokens"] == 259).sum() for ex in lm) > 0
  ds = seqio.get_dataset(
      "synthetic_lm_pause", {"targets": 64},
      tasks.get_feature_converter("synthetic_lm_pause"),
      dataset_split="validation", shuffle=False, seed=3)
  resumed = list(ds.skip(5).as_numpy_iterator())
  for a, b in zip(resumed, lm[5:]):
    np.testing.assert_array_equal(a["decoder_target_tokens"],
                                  b["decoder_target_tokens"])

  lengths = tasks.default_task_feature_lengths("synthetic_addition_pause")
  assert isinstance(tasks.get_feature_converter("synthetic_addition"),
                    fc.PausePrefixLMFeatureConverter)
  (ex,) = _examples("synthetic_addition_pause", lengths)[:1]
  targets, weights = ex["decoder_target_tokens"], ex["decoder_loss_weights"]
  pauses = np.flatnonzero(targets == 259)
  assert len(pauses) == 10 and (np.diff(pauses) == 1).all()
  assert weights[:pauses[-1] + 1].sum() == 0 and weights[pauses[-1] + 1] == 1
  text = vocab.decode(targets.tolist())
  question, answer = text.split("=")
  assert int(answer) == eval(question)  # pylint: disable=eval-used


def test_downstream_metric_and_postprocessor():
  task = seqio.get_mixture_or_task("synthetic_digit_sum_pause")
  ex = next(task.get_dataset({"inputs": 64, "targets": 16}, split="validation",
                             shuffle=False).as_numpy_iterator())
  target = task.postprocess_fn(ex["targets_pretokenized"], example=ex,
                               is_target=True)
  assert target.isdigit()
  (metric,) = task.predict_metric_fns
  assert metric([target, "1"], [target, "x"]) == {"exact_match": 50.0}


@pytest.fixture()
def user_task():
  vocab = seqio.ByteVocabulary()

  def make(name, with_inputs):
    row = {"targets": "answer"}
    if with_inputs:
      row["inputs"] = "question"
    features = {k: seqio.Feature(vocab, add_eos=k == "targets") for k in row}
    seqio.TaskRegistry.remove(name)
    seqio.TaskRegistry.add(
        name, source=seqio.FunctionDataSource(
            lambda split, shuffle_files, seed=None: tf.data.Dataset.from_tensors(row),
            splits=["train"]),
        output_features=features,
        preprocessors=[seqio.preprocessors.tokenize,
                       seqio.preprocessors.append_eos_after_trim])
    return name

  yield make
  for name in list(seqio.TaskRegistry.names()):
    if name.startswith("user_"):
      seqio.TaskRegistry.remove(name)
  for name in list(seqio.MixtureRegistry.names()):
    if name.startswith("user_"):
      seqio.MixtureRegistry.remove(name)


def test_pause_variant_of_user_task_and_mixture(user_task):
  lm, qa = user_task("user_lm", False), user_task("user_qa", True)
  name = tasks.pause_variant(lm, fraction=0.5)
  assert name == "user_lm_pause_f0.5"
  assert tasks.pause_variant(lm, fraction=0.5) == name  # idempotent
  task = seqio.TaskRegistry.get(name)
  assert isinstance(task.output_features["targets"].vocabulary, PauseVocabulary)
  ex = next(task.get_dataset({"targets": 7}, shuffle=False, seed=0)
            .as_numpy_iterator())
  assert (ex["targets"] == 259).sum() in (1, 2, 3, 4)  # M = round(0.5 * 7) = 4

  ft = tasks.pause_variant(qa, form="finetune", num_pauses=3)
  assert ft == "user_qa_pause3"
  assert isinstance(tasks.get_feature_converter(ft),
                    fc.PausePrefixLMFeatureConverter)
  ex = next(seqio.TaskRegistry.get(ft).get_dataset(
      {"inputs": 6, "targets": 8}, shuffle=False).as_numpy_iterator())
  assert ex["inputs"].tolist() == [b + 3 for b in b"ion"] + [259] * 3

  filler = tasks.filler_variant(qa, 49, form="finetune", num_pauses=2)
  assert filler == "user_qa_filler492"
  ex = next(seqio.TaskRegistry.get(filler).get_dataset(
      {"inputs": 6, "targets": 8}, shuffle=False).as_numpy_iterator())
  assert ex["inputs"].tolist()[-2:] == [49, 49]
  assert tasks.get_vocabulary(filler) == seqio.ByteVocabulary()

  qa2 = user_task("user_qa2", True)
  seqio.MixtureRegistry.add("user_mix", [(qa, 1.0), (qa2, 3.0)])
  mix = tasks.pause_variant("user_mix", form="finetune")
  assert mix == "user_mix_pause"
  mixture = seqio.MixtureRegistry.get(mix)
  assert sorted(t.name for t in mixture.tasks) == ["user_qa2_pause",
                                                   "user_qa_pause"]
  assert mixture.get_rate(seqio.TaskRegistry.get("user_qa2_pause")) == 3.0
  assert isinstance(tasks.get_vocabulary(mix), PauseVocabulary)


def test_pause_variant_errors(user_task):
  lm = user_task("user_lm", False)
  with pytest.raises(ValueError, match=r"form='both' is invalid"):
    tasks.pause_variant(lm, form="both")
  with pytest.raises(ValueError, match=r"fraction=1.5 is invalid"):
    tasks.pause_variant(lm, fraction=1.5)
  with pytest.raises(ValueError, match=r"num_pauses=-1 is invalid"):
    tasks.pause_variant(lm, num_pauses=-1)
  with pytest.raises(ValueError, match=r"PAUSE_FRACTION \(0.1.*NUM_PAUSES \(3.*not both"):
    tasks.pause_variant(lm, fraction=0.1, num_pauses=3)
  with pytest.raises(ValueError, match=r"'user_lm' has no 'inputs' feature"):
    tasks.pause_variant(lm, form="finetune")
  with pytest.raises(ValueError, match=r"'synthetic_lm' is already registered"):
    tasks.pause_variant(lm, name="synthetic_lm")
  with pytest.raises(ValueError, match=r"No default lengths for 'user_lm'"):
    tasks.default_task_feature_lengths(lm)
  with pytest.raises(ValueError, match=r"'nope_task'"):
    tasks.get_vocabulary("nope_task")


def test_variant_spec(user_task):
  qa = user_task("user_qa", True)
  assert tasks.variant_spec(qa) is None
  name = tasks.filler_variant(qa, 7, form="finetune", num_pauses=3)
  spec = tasks.variant_spec(name)
  assert (spec.base, spec.form, spec.fraction, spec.num_pauses, spec.pause_token) == (
      qa, "finetune", None, 3, 7)
  assert tasks.variant_spec(tasks.pause_variant(qa, fraction=0.2)).fraction == 0.2


def test_pause_variant_follows_a_reregistered_base(user_task, monkeypatch):
  # A base re-registered under its name gets a fresh variant even when the new
  # provider reuses the freed one's id() (CPython 3.12 often does; forced here).
  monkeypatch.setattr(registry, "id", lambda obj: 0, raising=False)
  qa = user_task("user_qa", True)
  ft = tasks.pause_variant(qa, form="finetune", num_pauses=3)
  assert seqio.TaskRegistry.get(ft).source is seqio.TaskRegistry.get(qa).source
  user_task("user_qa", True)  # Same name, new provider (and source).
  assert tasks.pause_variant(qa, form="finetune", num_pauses=3) == ft
  assert seqio.TaskRegistry.get(ft).source is seqio.TaskRegistry.get(qa).source


def test_training_task_one_rule_for_the_pause_settings(user_task):
  lm, qa = user_task("user_lm", False), user_task("user_qa", True)
  assert tasks.training_task(lm) == lm
  assert tasks.training_task(lm, pause_fraction=0.1) == "user_lm_pause"
  assert tasks.training_task(qa, num_pauses=4) == "user_qa_pause4"
  with pytest.raises(ValueError, match=r"PAUSE_FRACTION \(0.1.*NUM_PAUSES \(4.*not both"):
    tasks.training_task(qa, pause_fraction=0.1, num_pauses=4)
  # A pause-pretrained INIT_FROM (one more vocabulary row) keeps its pause row.
  size = tasks.get_vocabulary(qa).vocab_size
  assert tasks.training_task(qa, init_vocab_size=size) == qa
  assert tasks.training_task(qa, init_vocab_size=size + 1) == "user_qa_pause0"
  assert tasks.training_task(lm, init_vocab_size=size + 1) == "user_lm_pause_n0"
  assert isinstance(tasks.get_vocabulary("user_qa_pause0"), PauseVocabulary)
