"""Pause injection / appending and the T5-style LM steps."""

import collections
import functools
import itertools
import math

import hypothesis
import hypothesis.strategies as st
import numpy as np
import pytest
import scipy.stats
import seqio
import tensorflow as tf

from pause_flax.data import preprocessors as prep
from pause_flax.vocab import PauseVocabulary

PAUSE = 999
_SETTINGS = hypothesis.settings(max_examples=15, deadline=None)


def _dataset(rows, key="targets"):
  return tf.data.Dataset.from_generator(
      lambda: ({key: np.asarray(r, np.int32)} for r in rows),
      output_signature={key: tf.TensorSpec([None], tf.int32)})


def _inject(rows, seed, **kwargs):
  with seqio.utils.map_seed_manager(seed):
    ds = prep.inject_pauses(_dataset(rows), pause_id=PAUSE, **kwargs)
  return [x["targets"].tolist() for x in ds.as_numpy_iterator()]


@_SETTINGS
@hypothesis.given(length=st.integers(0, 300), fraction=st.floats(0, 0.99),
                  seed=st.integers(0, 2**30))
def test_inject_invariants(length, fraction, seed):
  tokens = list(range(1, length + 1))
  (out,) = _inject([tokens], seed, fraction=fraction)
  num_pauses = round(fraction * length)  # half-to-even, like tf.round
  pauses = out.count(PAUSE)
  assert len(out) == length
  assert pauses <= num_pauses
  assert [t for t in out if t != PAUSE] == tokens[:length - pauses]
  assert _inject([tokens], seed, fraction=fraction) == [out]


@_SETTINGS
@hypothesis.given(length=st.integers(0, 50), num_pauses=st.integers(0, 80),
                  seed=st.integers(0, 2**30))
def test_inject_fixed_count(length, num_pauses, seed):
  tokens = list(range(1, length + 1))
  (out,) = _inject([tokens], seed, num_pauses=num_pauses)
  pauses = out.count(PAUSE)
  assert len(out) == length and pauses <= num_pauses
  assert [t for t in out if t != PAUSE] == tokens[:length - pauses]


def test_inject_seeds_differ_and_other_features_pass_through():
  tokens = list(range(1, 201))
  a, b = _inject([tokens], 1), _inject([tokens], 2)
  assert a != b  # 20 pauses among 220 slots: equal draws are ~impossible
  ds = tf.data.Dataset.from_tensors(
      {"targets": tf.range(1, 50), "inputs": tf.constant([5, 6])})
  with seqio.utils.map_seed_manager(0):
    ex = next(prep.inject_pauses(ds, pause_id=PAUSE).as_numpy_iterator())
  assert ex["inputs"].tolist() == [5, 6]


def test_inject_takes_one_seqio_seed_like_a_seeded_map():
  """Later seeded preprocessors see the same seqio seeds as after any seeded map."""

  @seqio.map_over_dataset(num_seeds=1)
  def seed_of(x, seed):
    del x
    return seed

  @seqio.map_over_dataset(num_seeds=1)
  def other_seeded_map(x, seed):
    del seed
    return x

  ds = _dataset([[1, 2, 3]])
  with seqio.utils.map_seed_manager(3):
    after_inject = seed_of(prep.inject_pauses(ds, pause_id=PAUSE, num_pauses=1))
  with seqio.utils.map_seed_manager(3):
    after_map = seed_of(other_seeded_map(ds))
  seed = lambda d: np.asarray(next(d.as_numpy_iterator())).tolist()
  assert seed(after_inject) == seed(after_map)


def test_inject_count_matches_hypergeometric_mean():
  """M of L + M slots are pauses; the first L hold L*M/(L+M) on average."""
  length, fraction, n = 100, 0.1, 2000
  m = round(fraction * length)
  outs = _inject([list(range(1, length + 1))] * n, 7, fraction=fraction)
  counts = np.array([o.count(PAUSE) for o in outs])
  total = length + m
  mean = length * m / total
  var = length * (m / total) * (length / total) * (total - length) / (total - 1)
  assert abs(counts.mean() - mean) < 5 * np.sqrt(var / n)


def test_inject_positions_are_uniform():
  length, m, n = 40, 8, 3000
  outs = np.array(_inject([list(range(1, length + 1))] * n, 11, num_pauses=m))
  per_slot = (outs == PAUSE).sum(axis=0)
  _, p_value = scipy.stats.chisquare(per_slot)  # equal expected per slot
  assert p_value > 1e-3, per_slot


def test_inject_subsets_are_uniform():
  """Joint law, not just per slot: each M-subset of the L + M slots is equally
  likely, so a pattern P of pauses in the kept L slots has probability
  C(M', M - |P|) / C(L + M, M), with M' the M slots that get cut."""
  length, m, n = 3, 2, 3000
  outs = _inject([[1, 2, 3]] * n, 5, num_pauses=m)
  counts = collections.Counter(
      tuple(t == PAUSE for t in out) for out in outs)
  patterns = list(itertools.product([False, True], repeat=length))
  patterns = [p for p in patterns if sum(p) <= m]
  expected = [math.comb(m, m - sum(p)) / math.comb(length + m, m) * n
              for p in patterns]
  assert sum(counts.values()) == n and set(counts) <= set(patterns)
  _, p_value = scipy.stats.chisquare([counts[p] for p in patterns], expected)
  assert p_value > 1e-3, counts


def test_inject_respects_sequence_length_and_vocab():
  vocab = PauseVocabulary(seqio.ByteVocabulary())
  features = {"targets": seqio.Feature(vocab)}
  ds = tf.data.Dataset.from_tensors({"targets": tf.range(3, 103)})
  with seqio.utils.map_seed_manager(0):
    out = prep.inject_pauses(ds, features, {"targets": 50}, fraction=0.2)
  (ex,) = list(out.as_numpy_iterator())
  assert len(ex["targets"]) == 50
  assert 0 < (ex["targets"] == vocab.pause_id).sum() <= 10


@pytest.mark.parametrize("group_size", [1, 3, 64])
def test_inject_groups_of_mixed_examples(group_size):
  """Examples of different lengths (empty ones too) drawn in one group keep
  their own length, their own pause count and every other feature as it was."""
  lengths = [0, 7, 30, 1, 12, 0, 25]
  rows = [{"targets": np.arange(1, n + 1, dtype=np.int32),
           "inputs": np.full([n % 4, 2], n, np.int64), "id": np.int32(i),
           "text": np.bytes_(b"x" * n)} for i, n in enumerate(lengths)]
  spec = {"targets": tf.TensorSpec([None], tf.int32),
          "inputs": tf.TensorSpec([None, 2], tf.int64),
          "id": tf.TensorSpec([], tf.int32), "text": tf.TensorSpec([], tf.string)}
  ds = tf.data.Dataset.from_generator(lambda: iter(rows), output_signature=spec)
  with seqio.utils.map_seed_manager(4):
    out = prep.inject_pauses(ds, pause_id=PAUSE, fraction=0.2, group_size=group_size)
  assert out.element_spec == spec
  got = list(out.as_numpy_iterator())
  assert len(got) == len(rows)
  for row, ex in zip(rows, got):
    n = len(row["targets"])
    tokens = ex["targets"].tolist()
    pauses = tokens.count(PAUSE)
    assert len(tokens) == n and pauses <= round(0.2 * n)
    assert [t for t in tokens if t != PAUSE] == row["targets"].tolist()[:n - pauses]
    for key in ("inputs", "id", "text"):
      np.testing.assert_array_equal(ex[key], row[key])


def test_inject_group_draws_are_independent():
  """Identical examples in one group get different pause patterns."""
  outs = _inject([list(range(1, 101))] * 64, 9, fraction=0.1)
  assert len({tuple(o) for o in outs}) > 60


@pytest.mark.parametrize("kwargs, message", [
    (dict(group_size=0), r"group_size=0 is invalid"),
    (dict(fraction=1.0), r"fraction=1.0 is invalid.*\[0, 1\)"),
    (dict(fraction=-0.1), r"fraction=-0.1 is invalid"),
    (dict(fraction=0.1, num_pauses=3), r"PAUSE_FRACTION \(0.1.*NUM_PAUSES \(3.*not both"),
    (dict(num_pauses=-2), r"num_pauses=-2 is invalid"),
])
def test_inject_errors(kwargs, message):
  with pytest.raises(ValueError, match=message):
    prep.inject_pauses(_dataset([[1]]), pause_id=PAUSE, **kwargs)


def test_inject_needs_a_pause_id():
  features = {"targets": seqio.Feature(seqio.ByteVocabulary())}
  with pytest.raises(ValueError, match="not a PauseVocabulary"):
    prep.inject_pauses(_dataset([[1]]), features)


def _append(rows, **kwargs):
  ds = prep.append_pauses(_dataset(rows, "inputs"), pause_id=PAUSE, **kwargs)
  return [x["inputs"].tolist() for x in ds.as_numpy_iterator()]


def test_append_pauses():
  rows = [[1, 2, 3, 4, 5, 6], [7, 8]]
  assert _append(rows, num_pauses=2) == [[1, 2, 3, 4, 5, 6, PAUSE, PAUSE],
                                         [7, 8, PAUSE, PAUSE]]
  assert _append(rows, num_pauses=2, sequence_length={"inputs": 5}) == [
      [4, 5, 6, PAUSE, PAUSE], [7, 8, PAUSE, PAUSE]]
  assert _append(rows, num_pauses=2, sequence_length={"inputs": 5},
                 truncate="right") == [[1, 2, 3, PAUSE, PAUSE],
                                       [7, 8, PAUSE, PAUSE]]
  ds = _dataset(rows, "inputs")
  assert prep.append_pauses(ds, num_pauses=0, pause_id=PAUSE) is ds


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_pauses=5, sequence_length={"inputs": 5}),
     r"num_pauses=5 leaves no room .* length 5: use num_pauses < 5"),
    (dict(num_pauses=-1), r"num_pauses=-1 is invalid"),
    (dict(num_pauses=2, truncate="middle"), r"truncate='middle' is invalid"),
])
def test_append_errors(kwargs, message):
  with pytest.raises(ValueError, match=message):
    prep.append_pauses(_dataset([[1]], "inputs"), pause_id=PAUSE, **kwargs)


@_SETTINGS
@hypothesis.given(
    docs=st.lists(st.lists(st.integers(3, 300), max_size=30), min_size=1,
                  max_size=12),
    length=st.integers(1, 20), batch_size=st.integers(1, 5))
def test_concat_and_split(docs, length, batch_size):
  features = {"targets": seqio.Feature(seqio.ByteVocabulary(), add_eos=True)}
  ds = seqio.preprocessors.append_eos(_dataset(docs), features)
  ds = prep.reduce_concat_tokens(ds, batch_size=batch_size)
  ds = prep.split_tokens_to_targets_length(ds, {"targets": length})
  chunks = [x["targets"].tolist() for x in ds.as_numpy_iterator()]
  stream = [t for d in docs for t in d + [1]]
  assert [t for c in chunks for t in c] == stream
  assert all(0 < len(c) <= length for c in chunks)
  assert sum(len(c) < length for c in chunks) <= -(-len(docs) // batch_size)


def test_lm_and_split_errors():
  ds = tf.data.Dataset.from_tensors({"text": "doc", "url": "u"})
  assert list(prep.lm(ds).as_numpy_iterator()) == [{"targets": b"doc"}]
  with pytest.raises(ValueError, match=r"sequence_length=None"):
    prep.split_tokens_to_targets_length(_dataset([[1]]), None)
  with pytest.raises(ValueError, match=r"max_tokens_per_segment=0"):
    prep.split_tokens(_dataset([[1]]), 0)


def test_usable_in_a_task():
  """append_pauses inside a Task: pauses survive the Task's trimming."""
  vocab = PauseVocabulary(seqio.ByteVocabulary())
  task = seqio.Task(
      "prep_test_append_task",
      source=seqio.FunctionDataSource(
          lambda split, shuffle_files: tf.data.Dataset.from_tensors(
              {"inputs": "a long prefix", "targets": "x"}), splits=["train"]),
      output_features={"inputs": seqio.Feature(vocab, add_eos=False),
                       "targets": seqio.Feature(vocab)},
      preprocessors=[seqio.preprocessors.tokenize,
                     seqio.preprocessors.append_eos_after_trim,
                     functools.partial(prep.append_pauses, num_pauses=3)])
  ex = next(task.get_dataset({"inputs": 8, "targets": 4},
                             shuffle=False).as_numpy_iterator())
  assert ex["inputs"].tolist() == vocab.encode("refix") + [vocab.pause_id] * 3
