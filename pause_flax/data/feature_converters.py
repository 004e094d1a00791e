"""seqio feature converters that give `<pause>` targets zero loss weight.

Both produce the same model features, so pretraining and finetuning batches
look alike to the model and trainer:

  decoder_input_tokens   int32 [L]  targets shifted right (0 = BOS/padding)
  decoder_target_tokens  int32 [L]
  decoder_loss_weights   int32 [L]  1 on real target tokens, 0 on `<pause>`
                                    targets, padding (and the prefix, for
                                    PrefixLM); int32 as in seqio, cast it
  decoder_segment_ids    int32 [L]  only with pack=True
  decoder_positions      int32 [L]  only with pack=True

A pause that is an *input* stays in `decoder_input_tokens`: it is attended
to and feeds the prediction of the next real token. With pause_id=None the
converters serve standard tasks with the same model features.

Supervised pauses: when the examples carry the aligned features of
`preprocessors.attach_pause_targets` (`inputs_pause_targets` /
`inputs_pause_weights`, or `targets_...` for the pretraining form), every
position whose aligned weight is > 0 gets that target id and weight in
`decoder_target_tokens` / `decoder_loss_weights` (packed and padded like the
tokens). Without them (every paper task) the output is unchanged, bit for bit.
"""

from __future__ import annotations

from collections.abc import Mapping

import seqio
import tensorflow as tf

from pause_flax.data import preprocessors as prep

_IDS, _WEIGHTS = prep.pause_target_keys("targets")


def _check_pause_id(pause_id: int | None) -> int | None:
  if pause_id is not None and (isinstance(pause_id, bool) or
                               not isinstance(pause_id, int) or pause_id <= 0):
    raise ValueError(
        f"pause_id={pause_id!r} is invalid: use the positive id of <pause> "
        "(PauseVocabulary.pause_id), or None for a task without pauses.")
  return pause_id


def _zero_pause_targets(features: dict[str, tf.Tensor],
                        pause_id: int | None) -> dict[str, tf.Tensor]:
  if pause_id is None:
    return features
  weights = features["decoder_loss_weights"]
  not_pause = tf.not_equal(features["decoder_target_tokens"], pause_id)
  features["decoder_loss_weights"] = weights * tf.cast(not_pause, weights.dtype)
  return features


def _has_pause_targets(spec: Mapping, keys: tuple[str, ...]) -> bool:
  return any(k in spec for key in keys for k in prep.pause_target_keys(key))


# seqio's packing drops zeros as padding, so the aligned features travel
# through packing / padding shifted by one (0 is padding only).
def _shift_up(x: tf.Tensor) -> tf.Tensor:
  return tf.cast(x, tf.int32) + 1


def _shift_down(x: tf.Tensor) -> tf.Tensor:
  return tf.maximum(x - 1, 0)


def _supervise_pauses(d: dict[str, tf.Tensor],
                      features: Mapping[str, tf.Tensor]) -> dict[str, tf.Tensor]:
  """Overlays the aligned pause targets (weight > 0 only) on targets and weights."""
  if _WEIGHTS not in features:
    return d
  weights = _shift_down(features[_WEIGHTS])
  supervised = weights > 0
  d["decoder_target_tokens"] = tf.where(supervised, _shift_down(features[_IDS]),
                                        d["decoder_target_tokens"])
  d["decoder_loss_weights"] = tf.where(supervised, weights, d["decoder_loss_weights"])
  return d


class PauseLMFeatureConverter(seqio.LMFeatureConverter):
  """Decoder-only LM ('targets' only) with zero weight on `<pause>` targets.

  seqio's LMFeatureConverter is what seqio.DecoderFeatureConverter runs for a
  targets-only task; this adds the pause mask, with or without packing.
  """

  def __init__(self, pause_id: int | None, pack: bool = False, **kwargs):
    self._pause_id = _check_pause_id(pause_id)
    super().__init__(pack=pack, **kwargs)

  @property
  def pause_id(self) -> int | None:
    return self._pause_id

  def _convert_features(self, ds: tf.data.Dataset,
                        task_feature_lengths: Mapping[str, int]) -> tf.data.Dataset:
    if not _has_pause_targets(ds.element_spec, ("targets",)):
      return super()._convert_features(ds, task_feature_lengths)
    length = task_feature_lengths["targets"]

    def shift(x):
      x = dict(x)
      for key in (_IDS, _WEIGHTS):
        x[key] = (_shift_up(x[key]) if key in x else
                  tf.ones_like(x["targets"], tf.int32))
      return x

    # The aligned features are packed / padded exactly like 'targets'.
    return super()._convert_features(
        ds.map(shift, num_parallel_calls=tf.data.AUTOTUNE),
        {**task_feature_lengths, _IDS: length, _WEIGHTS: length})

  def _convert_example(
      self, features: Mapping[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    d = _zero_pause_targets(dict(super()._convert_example(features)), self._pause_id)
    return _supervise_pauses(d, features)


class PausePrefixLMFeatureConverter(seqio.PrefixLMFeatureConverter):
  """Decoder-only prefix LM: 'inputs' (prefix + pauses) then 'targets'.

  The sequence is inputs followed by targets (model length = inputs length +
  targets length), read with purely causal attention. Loss weight is 1 only
  on target tokens: the prefix, its pauses, padding and any pause target get
  0. seqio's `decoder_causal_attention` (the bidirectional-prefix mask) is
  dropped because the model is purely causal, which also keeps the model
  features identical to PauseLMFeatureConverter's.
  """

  MODEL_FEATURES = {
      k: v for k, v in seqio.PrefixLMFeatureConverter.MODEL_FEATURES.items()
      if k != "decoder_causal_attention"
  }

  def __init__(self, pause_id: int | None, pack: bool = False, **kwargs):
    self._pause_id = _check_pause_id(pause_id)
    super().__init__(loss_on_targets_only=True, pack=pack, **kwargs)

  @property
  def pause_id(self) -> int | None:
    return self._pause_id

  def _convert_example(
      self, features: Mapping[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    d = dict(super()._convert_example(features))
    del d["decoder_causal_attention"]
    return _supervise_pauses(_zero_pause_targets(d, self._pause_id), features)

  _supervised = False   # set per call by _convert_features

  def _convert_features(self, ds: tf.data.Dataset,
                        task_feature_lengths: Mapping[str, int]) -> tf.data.Dataset:
    self._supervised = _has_pause_targets(ds.element_spec, ("inputs", "targets"))
    return super()._convert_features(ds, task_feature_lengths)

  def _concat_and_add_masks(
      self, features: Mapping[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    d = dict(super()._concat_and_add_masks(features))
    if self._supervised:
      # inputs' aligned features, then targets' (zeros when absent), padded to
      # the concatenation (seqio adds one padding target to an empty 'targets').
      n = tf.size(d["targets"])
      for i, suffix in enumerate((_IDS, _WEIGHTS)):
        parts = []
        for key in ("inputs", "targets"):
          aligned = prep.pause_target_keys(key)[i]
          size = tf.size(features[key])
          parts.append(tf.cast(features[aligned][:size], tf.int32) if aligned in features
                       else tf.zeros([size], tf.int32))
        v = tf.concat(parts, 0)
        d[suffix] = _shift_up(tf.pad(v, [[0, n - tf.size(v)]]))
    return d

  def _concat_task_feature_lengths(
      self, task_feature_lengths: Mapping[str, int]) -> dict[str, int]:
    lengths = dict(super()._concat_task_feature_lengths(task_feature_lengths))
    if self._supervised:
      lengths[_IDS] = lengths[_WEIGHTS] = lengths["targets"]
    return lengths

  def get_model_feature_lengths(
      self, task_feature_lengths: Mapping[str, int]) -> dict[str, int]:
    lengths = dict(super().get_model_feature_lengths(task_feature_lengths))
    del lengths["decoder_causal_attention"]
    return lengths
