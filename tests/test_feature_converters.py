"""Loss weights: zero at pause targets, padding and (PrefixLM) the prefix."""

import hypothesis
import hypothesis.strategies as st
import numpy as np
import pytest
import tensorflow as tf

from pause_flax.data.feature_converters import (PauseLMFeatureConverter,
                                               PausePrefixLMFeatureConverter)

PAUSE = 999
_MODEL_FEATURES = {"decoder_input_tokens", "decoder_target_tokens",
                   "decoder_loss_weights"}
_PACKED = {"decoder_segment_ids", "decoder_positions"}

# Prefix tokens are in [10, 100), target tokens in [100, 200), so a target
# position can be told from a prefix one by its token.
_prefix = st.lists(st.one_of(st.integers(10, 99), st.just(PAUSE)), max_size=8)
_targets = st.lists(st.one_of(st.integers(100, 199), st.just(PAUSE)),
                    min_size=1, max_size=8)


def _dataset(rows):
  keys = rows[0].keys()
  return tf.data.Dataset.from_generator(
      lambda: ({k: np.asarray(r[k], np.int32) for k in keys} for r in rows),
      output_signature={k: tf.TensorSpec([None], tf.int32) for k in keys})


def _check_shift(ex, pack):
  targets, inputs = ex["decoder_target_tokens"], ex["decoder_input_tokens"]
  segments = ex["decoder_segment_ids"] if pack else (targets != 0).astype(int)
  for i in range(1, len(targets)):
    if segments[i] and segments[i] == segments[i - 1]:
      assert inputs[i] == targets[i - 1]  # pause inputs stay inputs


@hypothesis.settings(max_examples=10, deadline=None)
@hypothesis.given(rows=st.lists(_targets, min_size=1, max_size=4),
                  pack=st.booleans())
def test_lm_weights(rows, pack):
  converter = PauseLMFeatureConverter(PAUSE, pack=pack)
  out = converter(_dataset([{"targets": r} for r in rows]), {"targets": 12})
  examples = list(out.as_numpy_iterator())
  for ex in examples:
    assert set(ex) == _MODEL_FEATURES | (_PACKED if pack else set())
    assert ex["decoder_loss_weights"].dtype == np.int32
    targets = ex["decoder_target_tokens"]
    np.testing.assert_array_equal(ex["decoder_loss_weights"],
                                  (targets != 0) & (targets != PAUSE))
    _check_shift(ex, pack)
  assert sum(int((ex["decoder_target_tokens"] == PAUSE).sum())
             for ex in examples) == sum(r.count(PAUSE) for r in rows)


@hypothesis.settings(max_examples=10, deadline=None)
@hypothesis.given(rows=st.lists(st.tuples(_prefix, _targets), min_size=1,
                                max_size=4), pack=st.booleans())
def test_prefix_lm_weights(rows, pack):
  converter = PausePrefixLMFeatureConverter(PAUSE, pack=pack)
  lengths = {"inputs": 8, "targets": 8}
  assert converter.get_model_feature_lengths(lengths) == {
      k: 16 for k in _MODEL_FEATURES | (_PACKED if pack else set())}
  ds = _dataset([{"inputs": p, "targets": t} for p, t in rows])
  examples = list(converter(ds, lengths).as_numpy_iterator())
  for ex in examples:
    assert set(ex) == _MODEL_FEATURES | (_PACKED if pack else set())
    targets = ex["decoder_target_tokens"]
    np.testing.assert_array_equal(ex["decoder_loss_weights"],
                                  (targets >= 100) & (targets < 200))
    _check_shift(ex, pack)
  if not pack:
    for (prefix, target), ex in zip(rows, examples):
      n = len(prefix) + len(target)
      assert ex["decoder_target_tokens"][:n].tolist() == prefix + target


def test_lm_example_and_standard_task():
  ds = _dataset([{"targets": [5, PAUSE, 6, 1]}])
  ex = next(PauseLMFeatureConverter(PAUSE)(ds, {"targets": 6})
            .as_numpy_iterator())
  assert ex["decoder_input_tokens"].tolist() == [0, 5, PAUSE, 6, 1, 0]
  assert ex["decoder_loss_weights"].tolist() == [1, 0, 1, 1, 0, 0]
  ex = next(PauseLMFeatureConverter(None)(ds, {"targets": 6})
            .as_numpy_iterator())
  assert ex["decoder_loss_weights"].tolist() == [1, 1, 1, 1, 0, 0]


def test_invalid_pause_id():
  with pytest.raises(ValueError, match=r"pause_id=0 is invalid"):
    PauseLMFeatureConverter(0)
  with pytest.raises(ValueError, match=r"pause_id='259' is invalid"):
    PausePrefixLMFeatureConverter("259")
