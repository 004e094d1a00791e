"""Evaluator: M_inf prompts, decoding vs a manual generate, metrics, rank classification."""

import dataclasses
import json
import os

import jax
import numpy as np
import pytest
import seqio
from flax import nnx

from pause_flax import parallel
from pause_flax.data import synthetic
from pause_flax.data import tasks
from pause_flax.evaluation import evaluator as ev_lib
from pause_flax.evaluation import metrics as metrics_lib
from pause_flax.evaluation import plots
from pause_flax.model import decoding
from pause_flax.model import transformer

VOCAB = seqio.ByteVocabulary()
PAUSE = VOCAB.vocab_size  # PauseVocabulary's pause id: 259
CONFIG = dataclasses.replace(transformer.model_config("tiny"), vocab_size=PAUSE + 1, max_len=128)
N = 8  # examples evaluated, one batch over the 8 devices
RANK_TASK = "test_rank_choice"
# (prompt, options, correct option): 3 questions, 2 to 3 options each.
RANK_DATA = [("2+2=", ["4", "5", "22"], 0), ("sky is", [" blue", " green"], 0),
             ("x>y, y>", ["z", "x", "q"], 1)]


@pytest.fixture(scope="module")
def mesh():
  return parallel.make_mesh()


@pytest.fixture(scope="module")
def model():
  return transformer.Transformer(CONFIG, rngs=nnx.Rngs(3))


@pytest.fixture(scope="module")
def addition(mesh):
  return ev_lib.Evaluator("synthetic_addition", batch_size=8, mesh=mesh, num_examples=N,
                          decode=ev_lib.DecodeOptions(max_new_tokens=8))


def _validation_examples(name, n):
  ds = seqio.get_mixture_or_task(name).get_dataset(
      tasks.default_task_feature_lengths(name), split="validation", shuffle=False)
  return list(ds.take(n).as_numpy_iterator())


def test_standard_task_maps_variants_back():
  assert ev_lib.standard_task("synthetic_addition_pause") == ("synthetic_addition", 10, None)
  assert ev_lib.standard_task("synthetic_addition") == ("synthetic_addition", 0, None)
  name = tasks.pause_variant("synthetic_addition", num_pauses=4, form="finetune")
  assert ev_lib.standard_task(name) == ("synthetic_addition", 4, None)
  with pytest.raises(ValueError, match="pretraining"):
    ev_lib.standard_task("synthetic_lm_pause")


@pytest.mark.parametrize("m", [0, 3])
def test_prompts_end_with_m_pauses_and_predictions_match_generate(addition, model, mesh, m):
  result = addition.evaluate(model, m)["synthetic_addition"]
  examples = _validation_examples("synthetic_addition", N)
  prompts = [decoding.build_prompt([ev_lib.BOS_ID, *ex["inputs"]], m, PAUSE) for ex in examples]
  tokens, lengths = decoding.pad_prompts(prompts)
  out = np.asarray(decoding.generate(model, tokens, prompt_lengths_B=lengths, max_new_tokens=8,
                                     eos_id=VOCAB.eos_id, banned_ids=(PAUSE,), mesh=mesh))
  assert not (out == PAUSE).any()
  predictions = [VOCAB.decode(row.tolist()) for row in out]
  for record, ex, prediction in zip(result.records, examples, predictions):
    inputs = ex["inputs_pretokenized"].decode()
    assert record["inputs"] == inputs
    # M_inf = 0 is the standard prompt; otherwise exactly M pauses end the prefix.
    assert record["prompt"] == inputs + ev_lib.PAUSE_MARK * m
    assert record["prediction"] == prediction
    assert ev_lib.PAUSE_MARK not in record["prediction"]
  targets = [ex["targets_pretokenized"].decode() for ex in examples]
  expected = synthetic.exact_match(targets, [synthetic.postprocess_answer(p) for p in predictions])
  assert result.metrics == expected


def _oracle(wrong_every=0):
  """A stand-in for decoding.generate that answers from the prompt (checking it)."""
  calls = []

  def generate(model, prompt_BxP, *, prompt_lengths_B, max_new_tokens, eos_id, banned_ids,
               **kwargs):
    del model, kwargs
    calls.append(banned_ids)
    rows = []
    for r, (row, n) in enumerate(zip(np.asarray(prompt_BxP), np.asarray(prompt_lengths_B))):
      ids = row[:n].tolist()
      assert ids[0] == ev_lib.BOS_ID
      prefix = [i for i in ids[1:] if i != PAUSE]
      assert ids[1 + len(prefix):] == [PAUSE] * 2, ids  # M_inf = 2 pauses, at the end
      a, b = VOCAB.decode(prefix).rstrip("=").split("+")
      answer = str(int(a) + int(b) + (1 if wrong_every and r % wrong_every == 0 else 0))
      out = VOCAB.encode(answer) + [eos_id]
      rows.append((out + [0] * max_new_tokens)[:max_new_tokens])
    return jax.numpy.asarray(rows, jax.numpy.int32)

  return generate, calls


@pytest.mark.parametrize("wrong_every,expected", [(0, 100.0), (2, 50.0)])
def test_metric_of_a_model_forced_to_answer(addition, model, monkeypatch, wrong_every, expected):
  generate, calls = _oracle(wrong_every)
  monkeypatch.setattr(ev_lib.decoding, "generate", generate)
  result = addition.evaluate(model, 2)["synthetic_addition"]
  assert result.metrics == {"exact_match": expected}
  assert calls and all(c == (PAUSE,) for c in calls)  # the pause is always banned


def test_pauses_need_a_pause_row(addition, mesh):
  std = transformer.Transformer(dataclasses.replace(CONFIG, vocab_size=PAUSE), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="no <pause> row"):
    addition.evaluate(std, 1)
  with pytest.raises(ValueError, match=">= 0"):
    addition.evaluate(std, -1)


def _register_rank_task():
  rows = [(prompt, option, [q, o], o == label)
          for q, (prompt, options, label) in enumerate(RANK_DATA)
          for o, option in enumerate(options)]

  def dataset_fn(split, shuffle_files=False, seed=None):
    del split, shuffle_files, seed
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    return tf.data.Dataset.from_tensor_slices({
        "inputs": [r[0] for r in rows], "targets": [r[1] for r in rows],
        "idx": np.array([r[2] for r in rows], np.int32),
        "is_correct": np.array([r[3] for r in rows])})

  seqio.TaskRegistry.remove(RANK_TASK)
  seqio.TaskRegistry.add(
      RANK_TASK, source=seqio.FunctionDataSource(dataset_fn, splits=("validation",)),
      output_features={"inputs": seqio.Feature(VOCAB, add_eos=False),
                       "targets": seqio.Feature(VOCAB, add_eos=True)},
      preprocessors=[seqio.preprocessors.tokenize, seqio.preprocessors.append_eos_after_trim],
      postprocess_fn=metrics_lib.rank_classification_target,
      metric_fns=[metrics_lib.rank_classification_accuracy])
  return rows


def _hand_score(model, prompt_ids, target_ids):
  """Sum of log p(target | prompt) from one full forward pass, the pause banned."""
  tokens = np.asarray([prompt_ids + target_ids[:-1]], np.int32)
  logits = np.asarray(model(tokens)[0], np.float64)
  logits[:, PAUSE] = -np.inf
  logp = logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)
  start = len(prompt_ids) - 1
  return sum(logp[start + i, t] for i, t in enumerate(target_ids))


def test_rank_classification_picks_the_argmax_of_summed_log_probs(model, mesh):
  rows = _register_rank_task()
  evaluator = ev_lib.Evaluator(RANK_TASK, batch_size=8, mesh=mesh,
                               feature_lengths={"inputs": 16, "targets": 8})
  result = evaluator.evaluate(model, 1)[RANK_TASK]
  scores = {}
  for (prompt, option, (q, o), _), record in zip(rows, result.records):
    assert record["prompt"] == prompt + ev_lib.PAUSE_MARK
    want = _hand_score(model, [ev_lib.BOS_ID, *VOCAB.encode(prompt), PAUSE],
                       VOCAB.encode(option) + [VOCAB.eos_id])
    np.testing.assert_allclose(record["score"], want, rtol=1e-4, atol=1e-4)
    scores.setdefault(q, {})[o] = want
  chosen = {q: max(s, key=s.get) for q, s in scores.items()}
  accuracy = 100 * np.mean([chosen[q] == label for q, (_, _, label) in enumerate(RANK_DATA)])
  assert result.metrics == {"accuracy": pytest.approx(accuracy)}


def test_outputs_and_sweep_files(addition, model, tmp_path):
  by_m = {}
  for m in (0, 2):
    result = addition.evaluate(model, m)["synthetic_addition"]
    path = ev_lib.write_result(str(tmp_path), result, step=7)
    assert path == os.path.join(tmp_path, "synthetic_addition", f"M{m}")
    with open(os.path.join(path, "metrics.json")) as f:
      summary = json.load(f)
    assert summary["metrics"] == result.metrics and summary["num_pauses_inference"] == m
    with open(os.path.join(path, "predictions.jsonl")) as f:
      lines = [json.loads(l) for l in f]
    assert len(lines) == N and {"inputs", "prompt", "prediction", "targets"} <= set(lines[0])
    assert os.listdir(os.path.join(path, "tensorboard"))
    by_m[m] = result.metrics
  plots.write_sweep(str(tmp_path / "synthetic_addition"), "synthetic_addition", by_m, step=7,
                    num_pauses_finetune=2)
  table = (tmp_path / "synthetic_addition" / "sweep.md").read_text()
  assert "| 0 |" in table and "| 2 |" in table and "exact_match" in table
  rows = json.loads((tmp_path / "synthetic_addition" / "sweep.json").read_text())["rows"]
  assert [r["num_pauses_inference"] for r in rows] == [0, 2]
  assert (tmp_path / "synthetic_addition" / "sweep.png").read_bytes()[:4] == b"\x89PNG"


def test_placed_prompts_are_the_variants_own_inputs_and_compute_is_counted(mesh, model):
  """placed_prompts: the pauses sit where the placement put them (before '='),
  nothing is appended, and tokens_processed_per_answer counts prompt + answer."""
  from pause_flax.data import policies  # pylint: disable=g-import-not-at-top
  name = tasks.pause_variant("synthetic_addition", form="finetune",
                             placement=policies.BeforeMarker("="), count=3)
  lengths = dict(tasks.default_task_feature_lengths("synthetic_addition"))
  lengths["inputs"] += 3
  placed = ev_lib.Evaluator(name, batch_size=8, mesh=mesh, num_examples=N, placed_prompts=True,
                            feature_lengths=lengths,
                            decode=ev_lib.DecodeOptions(max_new_tokens=8))
  (result,) = placed.evaluate(model, 0).values()
  for record in result.records:
    assert record["prompt"].endswith("<pause><pause><pause>=")
    assert record["prompt"].replace("<pause>", "") == record["inputs"]
  prompts = [len(r["inputs"]) + 1 + 3 for r in result.records]   # BOS + prefix + 3 pauses
  # Each answer is 1..8 tokens (EOS included, or max_new_tokens without one).
  assert np.mean(prompts) + 1 <= result.compute["tokens_processed_per_answer"] <= (
      np.mean(prompts) + 8)
  with pytest.raises(ValueError, match="places the pauses; evaluate with 0"):
    placed.evaluate(model, 2)
  with pytest.raises(ValueError, match="needs a pause variant"):
    ev_lib.Evaluator("synthetic_addition", batch_size=8, mesh=mesh, placed_prompts=True)
