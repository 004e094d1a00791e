"""Supervised pauses: the targets and weights the task asked for, and nothing else changes."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest
import seqio
import tensorflow as tf

from pause_flax.data import preprocessors as prep
from pause_flax.data import synthetic
from pause_flax.data import tasks
from pause_flax.data.feature_converters import (PauseLMFeatureConverter,
                                               PausePrefixLMFeatureConverter)
from pause_flax.training import loss as loss_lib

PAUSE = 999
FILLER = 7


def _dataset(rows):
  def spec(v):
    return tf.TensorSpec([None] if np.ndim(v) else [], tf.int32)
  keys = rows[0].keys()
  return tf.data.Dataset.from_generator(
      lambda: ({k: np.asarray(r[k], np.int32) for k in keys} for r in rows),
      output_signature={k: spec(rows[0][k]) for k in keys})


def _convert(converter, ds, lengths):
  return list(converter(ds, lengths).as_numpy_iterator())


ROWS = [  # prefix tokens 10-99, targets 100-199, hints 200-299
    {"inputs": [11, 12, 13], "targets": [101, 1], "pause_targets": [201, 202, 203]},
    {"inputs": [14, 15], "targets": [102, 103, 1], "pause_targets": [204]},   # fewer hints
    {"inputs": [16], "targets": [104, 1], "pause_targets": np.zeros([0], np.int32)},  # plain
]


def _finetune_ds(rows, m=3, weight=2, pause_id=PAUSE):
  ds = _dataset(rows)
  ds = prep.append_pauses(ds, num_pauses=m, pause_id=pause_id)
  return prep.attach_pause_targets(ds, weight=weight, pause_id=pause_id)


def _expected(row, m, weight, pause_id=PAUSE):
  """By hand: prefix + m pauses + targets; the k-th pause target becomes hint k."""
  seq = list(row["inputs"]) + [pause_id] * m + list(row["targets"])
  targets, weights = list(seq), [0] * (len(row["inputs"]) + m) + [1] * len(row["targets"])
  hints = list(row["pause_targets"])
  for k in range(min(m, len(hints))):
    targets[len(row["inputs"]) + k] = hints[k]
    weights[len(row["inputs"]) + k] = weight
  return targets, weights


@pytest.mark.parametrize("pack", [False, True])
def test_prefix_lm_targets_and_weights_are_exactly_the_tasks(pack):
  lengths = {"inputs": 16, "targets": 8}
  out = _convert(PausePrefixLMFeatureConverter(PAUSE, pack=pack), _finetune_ds(ROWS), lengths)
  # Unpacked: one row per example; packed: all three in one row.
  assert len(out) == (1 if pack else 3)
  rows = []
  for ex in out:
    seg = ex["decoder_segment_ids"] if pack else (ex["decoder_target_tokens"] != 0).astype(int)
    rows += [{k: v[seg == i] for k, v in ex.items()} for i in range(1, seg.max() + 1)]
  for row, got in zip(ROWS, rows):
    targets, weights = _expected(row, 3, 2)
    assert got["decoder_target_tokens"].tolist() == targets
    assert got["decoder_loss_weights"].tolist() == weights
    # Inputs are the plain pause sequence shifted: the model still reads <pause>.
    seq = list(row["inputs"]) + [PAUSE] * 3 + list(row["targets"])
    assert got["decoder_input_tokens"].tolist()[1:] == seq[:-1]


def test_filler_slots_are_supervised_like_pauses():
  out = _convert(PausePrefixLMFeatureConverter(None),
                 _finetune_ds(ROWS[:1], m=2, weight=1, pause_id=FILLER), {"inputs": 5, "targets": 2})
  assert out[0]["decoder_target_tokens"].tolist() == [11, 12, 13, 201, 202, 101, 1]
  assert out[0]["decoder_loss_weights"].tolist() == [0, 0, 0, 1, 1, 1, 1]


@pytest.mark.parametrize("pack", [False, True])
def test_pretraining_form_supervises_injected_pauses(pack):
  rows = [{"targets": list(range(100, 120)), "pause_targets": list(range(200, 210))}] * 4
  with seqio.utils.map_seed_manager(42):   # the same pause positions in both
    ds = prep.inject_pauses(_dataset(rows), num_pauses=4, pause_id=PAUSE)
  ds = prep.attach_pause_targets(ds, weight=1, pause_id=PAUSE, feature_key="targets")
  with seqio.utils.map_seed_manager(42):
    plain = list(PauseLMFeatureConverter(PAUSE, pack=pack)(
        prep.inject_pauses(_dataset(rows), num_pauses=4, pause_id=PAUSE),
        {"targets": 24 if not pack else 48}).as_numpy_iterator())
  out = _convert(PauseLMFeatureConverter(PAUSE, pack=pack), ds, {"targets": 24 if not pack else 48})
  assert len(out) == len(plain)
  for got, ref in zip(out, plain):
    is_pause = ref["decoder_target_tokens"] == PAUSE
    assert is_pause.sum() > 0
    seg = ref["decoder_segment_ids"] if pack else np.ones_like(is_pause, int)
    for s in set(seg[is_pause].tolist()):
      k = np.flatnonzero(is_pause & (seg == s))
      assert got["decoder_target_tokens"][k].tolist() == list(range(200, 200 + len(k)))
      assert got["decoder_loss_weights"][k].tolist() == [1] * len(k)
    np.testing.assert_array_equal(got["decoder_target_tokens"][~is_pause],
                                  ref["decoder_target_tokens"][~is_pause])
    np.testing.assert_array_equal(got["decoder_loss_weights"][~is_pause],
                                  ref["decoder_loss_weights"][~is_pause])
    np.testing.assert_array_equal(got["decoder_input_tokens"], ref["decoder_input_tokens"])


@pytest.mark.parametrize("pack", [False, True])
def test_default_is_bit_for_bit_unchanged(pack):
  """Weight 0 (the paper's) and examples without pause targets give the same batches."""
  lengths = {"inputs": 8, "targets": 4}
  plain = prep.append_pauses(_dataset([{k: r[k] for k in ("inputs", "targets")} for r in ROWS]),
                             num_pauses=3, pause_id=PAUSE)
  ref = _convert(PausePrefixLMFeatureConverter(PAUSE, pack=pack), plain, lengths)
  for ds in (_finetune_ds(ROWS, weight=0),
             prep.append_pauses(_dataset(ROWS), num_pauses=3, pause_id=PAUSE)):  # unattached
    got = _convert(PausePrefixLMFeatureConverter(PAUSE, pack=pack), ds, lengths)
    assert len(got) == len(ref)
    for a, b in zip(got, ref):
      assert a.keys() == b.keys()
      for k in a:
        assert a[k].dtype == b[k].dtype
        np.testing.assert_array_equal(a[k], b[k])


def test_registered_parity_variants():
  sup = tasks.pause_variant("synthetic_parity", form="finetune", num_pauses=20, pause_weight=1)
  plain = tasks.pause_variant("synthetic_parity", form="finetune", num_pauses=20)
  assert sup == "synthetic_parity_pause20_sup" and tasks.variant_spec(sup).pause_weight == 1
  lengths = {"inputs": 41, "targets": 2}

  def first(name):
    ds = seqio.get_mixture_or_task(name).get_dataset(lengths, split="validation", shuffle=False)
    return next(tasks.get_feature_converter(name)(ds, lengths).as_numpy_iterator())

  got, ref = first(sup), first(plain)
  inputs, answer, hints = synthetic.parity_example(20, "validation", 0)
  vocab = tasks.get_vocabulary(sup)
  np.testing.assert_array_equal(got["decoder_input_tokens"], ref["decoder_input_tokens"])
  assert got["decoder_target_tokens"][21:41].tolist() == vocab.encode(hints)
  assert got["decoder_loss_weights"].tolist() == [0] * 21 + [1] * 22
  assert ref["decoder_loss_weights"].tolist() == [0] * 41 + [1, 1]
  assert got["decoder_target_tokens"][41] == vocab.encode(answer)[0]
  assert hints == "".join("1" if inputs[:20].count("1") >= k else "0" for k in range(1, 21))
  with pytest.raises(ValueError, match="pause_targets"):
    tasks.pause_variant("synthetic_count", form="finetune", num_pauses=4, pause_weight=1)


def test_gradient_is_exactly_zero_at_weight_zero_pause_outputs():
  """Hinted rows (weight 1) get a gradient at their pause outputs; plain rows (weight 0) none."""
  lengths = {"inputs": 8, "targets": 4}
  out = _convert(PausePrefixLMFeatureConverter(PAUSE), _finetune_ds(ROWS, weight=1), lengths)
  targets = np.stack([ex["decoder_target_tokens"] for ex in out])
  weights = np.stack([ex["decoder_loss_weights"] for ex in out])
  logits = jax.random.normal(jax.random.PRNGKey(0), targets.shape + (1024,))

  def loss(lg):
    sums = loss_lib.cross_entropy_sums(lg, jnp.asarray(targets), jnp.asarray(weights))
    return sums.loss / sums.weight

  g = np.abs(np.asarray(jax.grad(loss)(logits))).sum(-1)
  plain_pause = (targets == PAUSE)                 # unhinted pause outputs, weight 0
  hinted = (targets >= 200) & (targets < 300)
  assert plain_pause.sum() == 5 and hinted.sum() == 4   # ROWS: 3 + 1 + 0 hints of 3 pauses each
  assert np.all(g[plain_pause] == 0.0) and np.all(g[weights == 0] == 0.0)
  assert np.all(g[hinted] > 0) and np.all(weights[hinted] == 1)


def test_attach_refuses_examples_without_pause_targets():
  with pytest.raises(ValueError, match="pause_targets"):
    prep.attach_pause_targets(_dataset([{"inputs": [1, 2]}]), pause_id=PAUSE)
  with pytest.raises(ValueError, match="weight"):
    prep.attach_pause_targets(_dataset(ROWS), pause_id=PAUSE, weight=-1)
