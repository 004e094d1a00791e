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
"""

from __future__ import annotations

from collections.abc import Mapping

import seqio
import tensorflow as tf


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

  def _convert_example(
      self, features: Mapping[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    return _zero_pause_targets(dict(super()._convert_example(features)),
                               self._pause_id)


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
    return _zero_pause_targets(d, self._pause_id)

  def get_model_feature_lengths(
      self, task_feature_lengths: Mapping[str, int]) -> dict[str, int]:
    lengths = dict(super().get_model_feature_lengths(task_feature_lengths))
    del lengths["decoder_causal_attention"]
    return lengths
