"""Per-host seqio shards -> batched numpy -> global jax.Arrays.

Each process reads only its own shard of a Task or Mixture
(`seqio.ShardInfo(process_index, process_count)`), batches
`global_batch // process_count` examples, and the trainer turns every local
batch into one global array per feature with
`jax.make_array_from_process_local_data`. Nothing is replicated.
"""

from __future__ import annotations

import difflib
import threading
from collections.abc import Callable, Mapping

from absl import logging
import jax
import numpy as np

# TensorFlow must not claim accelerator memory: hide GPUs from it before use.
import tensorflow as tf  # pylint: disable=g-import-not-at-top
tf.config.set_visible_devices([], "GPU")

import seqio  # noqa: E402

from pause_flax.data import preprocessors as prep  # noqa: E402
from pause_flax.data import tasks as tasks_lib  # noqa: E402  (registers tasks)

MODEL_FEATURES = ("decoder_input_tokens", "decoder_target_tokens",
                  "decoder_loss_weights", "decoder_segment_ids",
                  "decoder_positions",
                  "decoder_pause_steps")  # adaptive-pause variants only


def registered_names() -> list[str]:
  return sorted(set(seqio.TaskRegistry.names()) | set(seqio.MixtureRegistry.names()))


def check_task_name(name: str) -> None:
  """Raises a one-line error naming close matches for an unknown task."""
  names = registered_names()
  if name in names:
    return
  close = difflib.get_close_matches(name, names, n=5, cutoff=0.5)
  hint = f" Did you mean: {', '.join(close)}?" if close else (
      f" Registered: {', '.join(names[:20])}{' ...' if len(names) > 20 else ''}.")
  raise ValueError(f"MIXTURE_OR_TASK_NAME={name!r} is not a registered seqio Task or "
                   f"Mixture.{hint}")


def task_features(name: str) -> tuple[str, ...]:
  """Token feature names of a Task or Mixture ('inputs', 'targets', ...).

  Supervised-pause features (`pause_targets` and the aligned ones) ride along
  with the tokens and take no length of their own.
  """
  provider = seqio.get_mixture_or_task(name)
  return tuple(k for k in provider.output_features if not prep.is_pause_target_feature(k))


def check_feature_lengths(name: str, feature_lengths: Mapping[str, int],
                          max_len: int | None = None) -> int:
  """Validates TASK_FEATURE_LENGTHS against the task; returns the model length."""
  features = task_features(name)
  missing = [f for f in features if f not in feature_lengths]
  extra = [f for f in feature_lengths if f not in features]
  if missing or extra:
    raise ValueError(
        f"TASK_FEATURE_LENGTHS={dict(feature_lengths)} does not match the features of "
        f"{name!r}, which are {list(features)}: give exactly one length per feature.")
  for key, value in feature_lengths.items():
    if not isinstance(value, int) or value <= 0:
      raise ValueError(f"TASK_FEATURE_LENGTHS[{key!r}]={value!r} must be a positive int.")
  total = sum(feature_lengths.values())
  if max_len is not None and total > max_len:
    raise ValueError(
        f"TASK_FEATURE_LENGTHS={dict(feature_lengths)} gives sequences of {total} tokens, "
        f"longer than the model's max_len={max_len}; shorten the features or raise max_len.")
  return total


def get_dataset(name: str, feature_lengths: Mapping[str, int], global_batch_size: int, *,
                split: str = "train", shuffle: bool = True, seed: int | None = 0,
                pack: bool = False, num_epochs: int | None = None,
                use_cached: bool = False, data_shards: int | None = None,
                process_index: int | None = None, process_count: int | None = None,
                fuse_maps: bool = True) -> tf.data.Dataset:
  """This process's batched tf.data pipeline of model features.

  The source is split into `data_shards` seqio shards (default: one per
  process); process p reads shards [p*k, (p+1)*k) with k = data_shards /
  process_count and puts their rows side by side, so that the global batch
  is the same whatever the number of processes reading it.
  `num_epochs=None` repeats forever (training); pass 1 for evaluation.
  `fuse_maps` lets tf.data merge the preprocessors' and feature converter's
  consecutive maps into one (the same examples for less CPU per example);
  False builds the pipeline of data-iterator checkpoints saved before it
  (`CheckpointableIterator`'s fallback).
  """
  check_task_name(name)
  process_count = jax.process_count() if process_count is None else process_count
  process_index = jax.process_index() if process_index is None else process_index
  data_shards = process_count if data_shards is None else data_shards
  if global_batch_size % process_count:
    raise ValueError(
        f"BATCH_SIZE={global_batch_size} is not divisible by the {process_count} processes; "
        f"use a multiple of {process_count}.")
  if data_shards % process_count or global_batch_size % data_shards:
    raise ValueError(
        f"data_shards={data_shards} must be a multiple of the {process_count} processes "
        f"and divide BATCH_SIZE={global_batch_size}.")
  per_process = data_shards // process_count
  converter = tasks_lib.get_feature_converter(name, pack=pack)
  shard_batch = global_batch_size // data_shards

  def shard(index: int) -> tf.data.Dataset:
    ds = seqio.get_dataset(
        name, task_feature_lengths=dict(feature_lengths), dataset_split=split,
        shuffle=shuffle, num_epochs=num_epochs, feature_converter=converter,
        shard_info=seqio.ShardInfo(index=index, num_shards=data_shards),
        use_cached=use_cached, seed=seed)
    keep = [k for k in MODEL_FEATURES if k in ds.element_spec]
    ds = ds.map(lambda ex: {k: ex[k] for k in keep}, num_parallel_calls=tf.data.AUTOTUNE)
    return ds.batch(shard_batch, drop_remainder=num_epochs is None)

  shards = [shard(process_index * per_process + j) for j in range(per_process)]
  if len(shards) == 1:
    ds = shards[0]
  else:
    ds = tf.data.Dataset.zip(tuple(shards)).map(
        lambda *parts: {k: tf.concat([p[k] for p in parts], axis=0) for k in parts[0]})
  ds = ds.prefetch(tf.data.AUTOTUNE)
  if fuse_maps:
    options = tf.data.Options()
    options.experimental_optimization.map_fusion = True
    ds = ds.with_options(options)
  return ds


def to_global(batch: Mapping[str, np.ndarray], sharding: jax.sharding.Sharding,
              global_batch_size: int) -> dict[str, jax.Array]:
  """One global array per feature from this process's rows."""
  out = {}
  for key, local in batch.items():
    global_shape = (global_batch_size,) + tuple(local.shape[1:])
    out[key] = jax.make_array_from_process_local_data(sharding, np.asarray(local),
                                                      global_shape)
  return out


class CheckpointableIterator:
  """A tf.data iterator of numpy batches whose position can be saved.

  The state (shuffle buffers, file offsets, the repeat count) is written with
  `tf.train.Checkpoint`, one file set per process, so that a resumed run
  continues on exactly the batches it would have seen.

  A saved state restores only into the same dataset graph. `fallback()`, when
  given, builds the same examples as the graph that older checkpoints saved
  (`get_dataset(..., fuse_maps=False)`): a checkpoint the dataset cannot read
  is restored into it instead, and the run goes on on that graph.
  """

  def __init__(self, ds: tf.data.Dataset,
               fallback: Callable[[], tf.data.Dataset] | None = None):
    self._fallback = fallback
    self._use(ds)

  def _use(self, ds: tf.data.Dataset) -> None:
    self._iterator = iter(ds)
    self._checkpoint = tf.train.Checkpoint(iterator=self._iterator)

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    batch = next(self._iterator)
    return {k: v.numpy() for k, v in batch.items()}

  def save(self, prefix: str) -> None:
    self._checkpoint.write(prefix)

  def close(self) -> None:
    """Lets go of the tf.data iterator without waiting for it to be freed.

    Freeing a tf.data iterator joins its autotuning thread, which sleeps up to
    a minute between rounds; a daemon thread does that waiting instead, so a
    run that ends (e.g. one cell of a grid) does not stall the next. The
    iterator is unusable afterwards.
    """
    refs = [self._iterator, self._checkpoint]
    self._iterator = self._checkpoint = self._fallback = None
    threading.Thread(target=refs.clear, daemon=True, name="tf-data-release").start()

  def restore(self, prefix: str) -> None:
    try:
      self._checkpoint.read(prefix).assert_consumed()
    except tf.errors.NotFoundError as e:
      if self._fallback is None or "Failed to restore dataset iterator" not in str(e):
        raise
      logging.info("The data iterator's checkpoint %s was saved by the unfused pipeline: "
                   "resuming on that pipeline (the same examples).", prefix)
      self._use(self._fallback())
      self._fallback = None
      self._checkpoint.read(prefix).assert_consumed()
