"""Training data for adaptive pauses (Catch Your Breath): every scored position unrolled.

A model trained with the Catch Your Breath losses (pause_flax.training.adaptive)
answers at step 0, right after a real token, or asks for a pause and answers
again after it, up to K pauses. Training shows it every step: each position
whose output is scored (loss weight > 0) is followed by K `<pause>` inputs,
and the K + 1 outputs of that group all target the same next token:

  standard   inputs  BOS  x1   x2  ...          targets  x1  x2  x3 ...
  unrolled   inputs  BOS  P  P  x1  P  P  x2 ...  (K = 2)
             targets x1   x1 x1 x2  x2 x2 x3 ...
             steps   0    1  2  0   1  2  0  ...   (`decoder_pause_steps`)

Positions with weight 0 (a finetuning prefix, padding) are not unrolled, so a
prefix is read as it is at inference. Each group's pause slots carry the group's
target and weight; `decoder_pause_steps` tells the loss which slot is which step.
A sequence of L positions of which T are scored grows to L + K * T slots: the
model length is the task's total length plus K times its 'targets' length.

`adaptive_variant` registers the variant of a Task (or Mixture) that trains this
way: its vocabulary is an AdaptivePauseVocabulary (pause and ask ids), and
`tasks.get_feature_converter` gives it the converters below. Packing is not
supported (groups are found by slot order).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import seqio
import tensorflow as tf

from pause_flax.data import feature_converters as fc
from pause_flax.data import registry
from pause_flax.vocab import AdaptivePauseVocabulary, PauseVocabulary

PAUSE_STEPS = "decoder_pause_steps"
# The K of a variant, set on the provider itself (as registry does its spec).
_MAX_PAUSES_ATTR = "_pause_flax_adaptive_max_pauses"
_BASE_ATTR = "_pause_flax_adaptive_base"


def _check_max_pauses(max_pauses) -> int:
  if isinstance(max_pauses, bool) or not isinstance(max_pauses, int) or max_pauses < 0:
    raise ValueError(f"max_pauses={max_pauses!r} is invalid: use an integer >= 0 (K, the "
                     "pauses unrolled after each scored position).")
  return max_pauses


def unrolled_length(task_feature_lengths: Mapping[str, int], max_pauses: int) -> int:
  """The model length of an adaptive variant: total + K * the 'targets' length."""
  return (sum(task_feature_lengths.values()) +
          _check_max_pauses(max_pauses) * task_feature_lengths["targets"])


def unroll(features: Mapping[str, tf.Tensor], max_pauses: int, pause_id: int,
           length: int) -> dict[str, tf.Tensor]:
  """One converted example (unpacked, [L] each) -> its unrolled form, padded to `length`."""
  k = _check_max_pauses(max_pauses)
  weights = features["decoder_loss_weights"]
  reps = tf.where(weights > 0, k + 1, 1)
  steps = tf.ragged.range(reps).flat_values
  index = tf.repeat(tf.range(tf.size(weights)), reps)
  inputs = tf.gather(features["decoder_input_tokens"], index)
  out = {
      "decoder_input_tokens": tf.where(steps > 0, tf.cast(pause_id, inputs.dtype), inputs),
      "decoder_target_tokens": tf.gather(features["decoder_target_tokens"], index),
      "decoder_loss_weights": tf.gather(weights, index),
      PAUSE_STEPS: tf.cast(steps, tf.int32),
  }
  pad = length - tf.size(steps)
  with tf.control_dependencies([tf.debugging.assert_non_negative(
      pad, message=f"an unrolled example is longer than {length} slots")]):
    return {key: tf.ensure_shape(tf.pad(v, [[0, pad]]), [length]) for key, v in out.items()}


class _Unrolled:
  """Mixin over a pause feature converter: converts, then unrolls every example."""

  def __init__(self, pause_id: int, max_pauses: int, pack: bool = False, **kwargs):
    if pack:
      raise ValueError("pack=True is not supported for adaptive-pause training (a group of "
                       "pauses is found by slot order): use train.pack=False.")
    self._max_pauses = _check_max_pauses(max_pauses)
    super().__init__(pause_id, pack=False, **kwargs)

  def _convert_features(self, ds: tf.data.Dataset,
                        task_feature_lengths: Mapping[str, int]) -> tf.data.Dataset:
    ds = super()._convert_features(ds, task_feature_lengths)
    length = unrolled_length(task_feature_lengths, self._max_pauses)
    return ds.map(lambda x: unroll(x, self._max_pauses, self.pause_id, length),
                  num_parallel_calls=tf.data.AUTOTUNE)

  def get_model_feature_lengths(self, task_feature_lengths: Mapping[str, int]
                                ) -> dict[str, int]:
    length = unrolled_length(task_feature_lengths, self._max_pauses)
    lengths = {k: length for k in super().get_model_feature_lengths(task_feature_lengths)}
    return {**lengths, PAUSE_STEPS: length}


_STEPS_SPEC = {PAUSE_STEPS: seqio.FeatureConverter.FeatureSpec(dtype=tf.int32)}


class AdaptiveLMFeatureConverter(_Unrolled, fc.PauseLMFeatureConverter):
  """PauseLMFeatureConverter's features, unrolled, plus `decoder_pause_steps`."""
  MODEL_FEATURES = {**fc.PauseLMFeatureConverter.MODEL_FEATURES, **_STEPS_SPEC}


class AdaptivePrefixLMFeatureConverter(_Unrolled, fc.PausePrefixLMFeatureConverter):
  """PausePrefixLMFeatureConverter's features, unrolled at the targets only."""
  MODEL_FEATURES = {**fc.PausePrefixLMFeatureConverter.MODEL_FEATURES, **_STEPS_SPEC}


def max_pauses(task_or_mixture_name: str) -> int | None:
  """K of a variant made by `adaptive_variant`; None for any other name."""
  return getattr(seqio.get_mixture_or_task(task_or_mixture_name), _MAX_PAUSES_ATTR, None)


def base_task(task_or_mixture_name: str) -> str | None:
  """The Task or Mixture an adaptive variant was made from; None for any other name."""
  base = getattr(seqio.get_mixture_or_task(task_or_mixture_name), _BASE_ATTR, None)
  return None if base is None else base.name


def feature_converter(task_or_mixture_name: str, pack: bool = False) -> seqio.FeatureConverter:
  """The unrolling converter of an adaptive variant (LM or prefix LM by its features)."""
  k = max_pauses(task_or_mixture_name)
  if k is None:
    raise ValueError(f"{task_or_mixture_name!r} is not an adaptive-pause variant; make one "
                     "with adaptive_variant().")
  features = seqio.get_mixture_or_task(task_or_mixture_name).output_features
  pause_id = registry.get_vocabulary(task_or_mixture_name).pause_id
  cls = (AdaptivePrefixLMFeatureConverter if "inputs" in features
         else AdaptiveLMFeatureConverter)
  return cls(pause_id, k, pack=pack)


def _adaptive_features(name: str, features: Mapping[str, seqio.Feature]
                       ) -> dict[str, seqio.Feature]:
  out = {}
  for key, feature in features.items():
    vocab = getattr(feature, "vocabulary", None)
    if isinstance(vocab, PauseVocabulary):
      raise ValueError(f"{name!r} already has pauses (feature {key!r}: {vocab}); make the "
                       "adaptive variant of its standard form (the Task it was made from).")
    if isinstance(vocab, seqio.Vocabulary) and not isinstance(
        vocab, seqio.PassThroughVocabulary):
      feature = dataclasses.replace(feature, vocabulary=AdaptivePauseVocabulary(vocab))
    out[key] = feature
  return out


def adaptive_variant(task_or_mixture_name: str, *, max_pauses: int,
                     name: str | None = None) -> str:
  """Registers the adaptive-pause variant of a standard Task or Mixture; returns its name.

  The variant reads the same examples; its token vocabularies become
  AdaptivePauseVocabulary (the base, `<pause>` and the ask id) and its feature
  converter unrolls K = `max_pauses` pauses after every scored position.
  The default name is '<name>_cyb<K>'. Calling again is a no-op.
  """
  k = _check_max_pauses(max_pauses)
  provider = seqio.get_mixture_or_task(task_or_mixture_name)
  name = name or f"{task_or_mixture_name}_cyb{k}"
  registered = (seqio.maybe_get_mixture_or_task(name)
                if name in seqio.TaskRegistry.names() or name in seqio.MixtureRegistry.names()
                else None)
  if registered is not None:
    if getattr(registered, _MAX_PAUSES_ATTR, None) is None:
      raise ValueError(f"{name!r} is already registered and is not an adaptive variant; "
                       "pass another name=.")
    if (getattr(registered, _MAX_PAUSES_ATTR) == k and
        getattr(registered, _BASE_ATTR, None) is provider):
      return name
  if isinstance(provider, seqio.Mixture):
    tasks = [(adaptive_variant(t.name, max_pauses=k), provider.get_rate(t))
             for t in provider.tasks]
    seqio.MixtureRegistry.remove(name)
    variant = seqio.MixtureRegistry.add(name, tasks)
  else:
    variant = provider.replace(
        name=name, output_features=_adaptive_features(task_or_mixture_name,
                                                      provider.output_features))
    seqio.TaskRegistry.remove(name)
    seqio.TaskRegistry.add_provider(name, variant)
  setattr(variant, _MAX_PAUSES_ATTR, k)
  setattr(variant, _BASE_ATTR, provider)
  if task_or_mixture_name in registry.DEFAULT_LENGTHS:
    registry.DEFAULT_LENGTHS[name] = registry.DEFAULT_LENGTHS[task_or_mixture_name]
  return name
