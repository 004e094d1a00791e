"""seqio preprocessors: T5-style LM steps and pause injection / appending.

All are plain `tf.data.Dataset -> tf.data.Dataset` functions that anyone can
put in their own seqio Task (bind arguments with `functools.partial`; seqio
passes `sequence_length` and `output_features` itself). The random one,
`inject_pauses`, draws its randomness from seqio's seeds
(`seqio.map_over_dataset(num_seeds=1)`, one seed per group of examples, with
stateless TF ops), so the same Task seed gives the same pauses, and a run
resumed at example n sees exactly the data it would have seen.

A pretraining Task looks like

  preprocessors=[
      functools.partial(seqio.preprocessors.rekey, key_map={"targets": "text"}),
      seqio.preprocessors.tokenize,
      seqio.preprocessors.append_eos,   # EOS after each document
      reduce_concat_tokens,             # one long stream of tokens ...
      split_tokens_to_targets_length,   # ... cut into length-L chunks
      inject_pauses,                    # the pause variant adds this
  ]
"""

from __future__ import annotations

from collections.abc import Mapping

import seqio
import tensorflow as tf

from pause_flax.data import policies
from pause_flax.vocab import PauseVocabulary

_AUTOTUNE = tf.data.AUTOTUNE


@seqio.map_over_dataset
def lm(x: Mapping[str, tf.Tensor], text_key: str = "text") -> dict[str, tf.Tensor]:
  """Language modelling: the document's text becomes 'targets'."""
  return {"targets": x[text_key]}


def reduce_concat_tokens(dataset: tf.data.Dataset,
                         feature_key: str = "targets",
                         batch_size: int = 128) -> tf.data.Dataset:
  """Concatenates the `feature_key` tokens of up to `batch_size` examples.

  Like T5's `reduce_concat_tokens`, but through a ragged batch, so token id 0
  inside a document survives. Other features are dropped. Append EOS before
  this step (seqio.preprocessors.append_eos) to keep documents apart.
  """
  if batch_size < 1:
    raise ValueError(f"batch_size={batch_size!r} must be a positive integer.")
  dataset = dataset.map(lambda x: x[feature_key], num_parallel_calls=_AUTOTUNE)
  dataset = dataset.ragged_batch(batch_size)
  return dataset.map(lambda t: {feature_key: t.flat_values},
                     num_parallel_calls=_AUTOTUNE)


def split_tokens(dataset: tf.data.Dataset,
                 max_tokens_per_segment: int,
                 feature_key: str = "targets") -> tf.data.Dataset:
  """Splits `feature_key` into consecutive chunks of `max_tokens_per_segment`.

  The last chunk of each example keeps the remainder (it is shorter, never
  padded); other features are dropped.
  """
  if (isinstance(max_tokens_per_segment, bool) or
      not isinstance(max_tokens_per_segment, int) or
      max_tokens_per_segment < 1):
    raise ValueError(
        f"max_tokens_per_segment={max_tokens_per_segment!r} must be a positive "
        "integer.")

  def _split(x):
    tokens = x[feature_key]
    n = tf.size(tokens)
    full, rest = n // max_tokens_per_segment, n % max_tokens_per_segment
    row_lengths = tf.concat(
        [tf.fill([full], max_tokens_per_segment),
         tf.reshape(rest, [1])[:tf.minimum(rest, 1)]], axis=0)
    return tf.RaggedTensor.from_row_lengths(tokens, row_lengths)

  dataset = dataset.map(_split, num_parallel_calls=_AUTOTUNE).unbatch()
  return dataset.map(lambda t: {feature_key: t}, num_parallel_calls=_AUTOTUNE)


def split_tokens_to_targets_length(
    dataset: tf.data.Dataset,
    sequence_length: Mapping[str, int] | None) -> tf.data.Dataset:
  """`split_tokens` into chunks of the Task's 'targets' length."""
  length = (sequence_length or {}).get("targets")
  if length is None:
    raise ValueError(
        f"split_tokens_to_targets_length needs sequence_length['targets'], got "
        f"sequence_length={sequence_length!r}; pass e.g. {{'targets': 2048}} to "
        "get_dataset.")
  return split_tokens(dataset, length, "targets")


def _resolve_pause_id(pause_id: int | None,
                      output_features: Mapping[str, seqio.Feature] | None,
                      feature_key: str, caller: str) -> int:
  if pause_id is not None:
    return pause_id
  vocab = getattr((output_features or {}).get(feature_key), "vocabulary", None)
  if not isinstance(vocab, PauseVocabulary):
    raise ValueError(
        f"{caller}: feature {feature_key!r} has vocabulary {vocab}, not a "
        "PauseVocabulary; wrap it (pause_flax.vocab.PauseVocabulary) or pass "
        "pause_id explicitly.")
  return vocab.pause_id


def check_one_pause_setting(fraction: float | None, num_pauses: int | None) -> None:
  """The one rule for M: a fraction of L or a fixed number of pauses, never both.

  None means unset. `inject_pauses`, `tasks.pause_variant` and
  `tasks.training_task` (the gin macros) all apply it, with this message.
  """
  if fraction is not None and num_pauses is not None:
    raise ValueError(
        f"Set PAUSE_FRACTION ({fraction!r}, a fraction of the length) or NUM_PAUSES "
        f"({num_pauses!r}, a fixed number of pauses), not both.")


def _check_count(name: str, value) -> None:
  if isinstance(value, bool) or not isinstance(value, int) or value < 0:
    raise ValueError(f"{name}={value!r} is invalid: use an integer >= 0.")


def inject_pauses(dataset: tf.data.Dataset,
                  output_features: Mapping[str, seqio.Feature] | None = None,
                  sequence_length: Mapping[str, int] | None = None,
                  *,
                  fraction: float | None = None,
                  num_pauses: int | None = None,
                  pause_id: int | None = None,
                  feature_key: str = "targets",
                  group_size: int = 64,
                  count: policies.CountPolicy | None = None) -> tf.data.Dataset:
  """Inserts pauses at uniformly random positions, keeping the length.

  For an example whose `feature_key` has length L, M pauses are inserted at
  M distinct positions drawn uniformly among the L + M slots of the
  lengthened sequence; the real tokens fill the other slots in order, and the
  result is trimmed back to L (the tail is cut), as in Goyal et al. (2024).
  About M * L / (L + M) pauses survive on average, each slot equally likely.

  L is the example's own length (a shorter last chunk gets proportionally
  fewer pauses), after trimming to `sequence_length[feature_key]` when seqio
  passes one, so that L is what the model sees.

  Args:
    dataset: examples with an int32 rank-1 `feature_key`.
    output_features: supplied by seqio; used to find the pause id when
      `pause_id` is None.
    sequence_length: supplied by seqio; trims `feature_key` first.
    fraction: M = round(fraction * L), rounding half to even; in [0, 1);
      0.1 (the paper's) when neither it nor `num_pauses` is set.
    num_pauses: a fixed M instead of `fraction`; setting both is an error.
    pause_id: the id inserted; default: the feature's PauseVocabulary's.
      Pass an ordinary token id for a filler-token control.
    feature_key: the feature to lengthen and trim.
    group_size: examples drawn together (one seqio seed and one set of ops
      per group, for speed); each example's pauses are still independent and
      uniform. The output depends on it, like on the seed.
    count: any count policy (policies.RandomRange, Curriculum, ...) instead
      of `fraction` / `num_pauses`; setting it with either is an error.

  Returns:
    The dataset with pauses in `feature_key`; other features untouched.
  """
  check_one_pause_setting(fraction, num_pauses)
  if count is not None:
    if fraction is not None or num_pauses is not None:
      raise ValueError(f"inject_pauses: set count ({count!r}) or fraction / num_pauses, "
                       "not both.")
    count = policies.as_count(count)
  elif num_pauses is not None:
    _check_count("num_pauses", num_pauses)
    count = policies.Fixed(num_pauses)
  else:
    fraction = 0.1 if fraction is None else fraction
    if not 0 <= fraction < 1:
      raise ValueError(
          f"fraction={fraction!r} is invalid: use a number in [0, 1) (the paper "
          "uses 0.1), or set num_pauses.")
    count = policies.Fraction(fraction)
  pause_id = _resolve_pause_id(pause_id, output_features, feature_key,
                               "inject_pauses")
  max_length = (sequence_length or {}).get(feature_key)

  if group_size < 1:
    raise ValueError(f"group_size={group_size!r} is invalid: use an integer >= 1.")
  spec = dataset.element_spec
  if not isinstance(spec, Mapping) or feature_key not in spec:
    raise ValueError(f"inject_pauses: examples need a {feature_key!r} feature; got {spec}.")
  # Features padded by padded_batch (a dimension of unknown size) get their
  # shape recorded and are cut back after unbatching.
  ragged = [k for k, v in spec.items() if not v.shape.is_fully_defined()]
  for k in ragged:
    if spec[k].shape.rank is None:
      raise ValueError(f"inject_pauses: feature {k!r} has an unknown rank ({spec[k]}); "
                       "give its examples a known rank (e.g. tf.ensure_shape).")

  def _record(x):
    x = dict(x)
    if max_length is not None:
      x[feature_key] = x[feature_key][:max_length]
    shapes = {_SHAPE_KEY + k: tf.shape(x[k]) for k in ragged}
    # One spare element per axis: TensorFlow crashes unbatching a dimension
    # of size 0 (an empty example); the spare is cut off again.
    return {**x, **{k: tf.pad(x[k], [[0, 1]] * spec[k].shape.rank) for k in ragged}, **shapes}

  @seqio.map_over_dataset(num_seeds=1)
  def _inject(x, seed):
    tokens_KxL = x[feature_key]
    length_K = x[_SHAPE_KEY + feature_key][:, 0] if feature_key in ragged else tf.fill(
        tf.shape(tokens_KxL)[:1], tf.shape(tokens_KxL)[1])
    m_K = count.tf_counts(length_K, x.get(_INDEX_KEY), seed)
    # One spare slot past every row's L + M, so that the M-th smallest key
    # below exists even for an empty row.
    width = tf.shape(tokens_KxL)[1] + tf.reduce_max(tf.concat([m_K, [0]], 0)) + 1
    # Each row's M pause slots: the M smallest of L + M uniformly random
    # 64-bit keys (a uniformly random M-subset; ties have probability ~2^-50).
    # Negated keys, so that top_k finds the smallest.
    neg_keys_KxW = -tf.random.stateless_uniform(
        tf.stack([tf.shape(tokens_KxL)[0], width]), seed=seed, dtype=tf.int64,
        minval=0, maxval=tf.int64.max)
    slot_W = tf.range(width)
    valid_KxW = slot_W[None, :] < (length_K + m_K)[:, None]
    neg_keys_KxW = tf.where(valid_KxW, neg_keys_KxW, tf.int64.min)
    largest_KxM = tf.math.top_k(neg_keys_KxW, k=tf.maximum(tf.reduce_max(m_K), 1)).values
    mth_K = tf.gather(largest_KxM, tf.maximum(m_K - 1, 0), batch_dims=1)
    is_pause_KxW = valid_KxW & (neg_keys_KxW >= mth_K[:, None]) & (m_K[:, None] > 0)
    # Only the first L slots are kept; the (i+1)-th real slot holds token i.
    is_pause_KxL = is_pause_KxW[:, :tf.shape(tokens_KxL)[1]]
    source_KxL = tf.cumsum(tf.cast(~is_pause_KxL, tf.int32), axis=1, exclusive=True)
    out = tf.where(is_pause_KxL, tf.cast(pause_id, tokens_KxL.dtype),
                   tf.gather(tokens_KxL, source_KxL, batch_dims=1))
    return {**x, feature_key: out}

  def _restore(x):
    out = {k: v for k, v in x.items() if not k.startswith(_SHAPE_KEY)}
    for k in ragged:
      shape = x[_SHAPE_KEY + k]
      out[k] = tf.ensure_shape(tf.slice(out[k], tf.zeros_like(shape), shape), spec[k].shape)
    return out

  # Grouped so that each op runs once per group_size examples, not per example.
  if count.needs_index:
    dataset = _with_index(dataset)
  dataset = dataset.map(_record, num_parallel_calls=_AUTOTUNE)
  dataset = _inject(dataset.padded_batch(group_size)).unbatch()
  return dataset.map(_restore, num_parallel_calls=_AUTOTUNE)


_SHAPE_KEY = "__inject_pauses_shape__/"
# The example's position in the stream (a Dataset.enumerate counter, so part of
# the iterator state a checkpoint saves); only for counts that need it.
_INDEX_KEY = _SHAPE_KEY + "__index__"


def _with_index(dataset: tf.data.Dataset) -> tf.data.Dataset:
  return dataset.enumerate().map(lambda i, x: {**x, _INDEX_KEY: i},
                                 num_parallel_calls=_AUTOTUNE)


def _prefix_room(name: str, count: int, sequence_length: Mapping[str, int] | None,
                 feature_key: str, truncate: str) -> int | None:
  """The prefix tokens kept so that `count` appended ones survive the trim to L
  (None: no length given, nothing cut); checks `count` and `truncate`."""
  _check_count(name, count)
  if truncate not in ("left", "right"):
    raise ValueError(
        f"truncate={truncate!r} is invalid: use 'left' (keep the end of the "
        "prefix) or 'right' (keep its start).")
  max_length = (sequence_length or {}).get(feature_key)
  if max_length is not None and count and count >= max_length:
    raise ValueError(
        f"{name}={count} leaves no room for the prefix in {feature_key!r} of length "
        f"{max_length}: use {name} < {max_length} or a longer "
        f"sequence_length[{feature_key!r}].")
  return None if max_length is None else max_length - count


def _cut_prefix(prefix: tf.Tensor, keep: int | None, truncate: str) -> tf.Tensor:
  if keep is None:
    return prefix
  return prefix[-keep:] if truncate == "left" else prefix[:keep]


def append_pauses(dataset: tf.data.Dataset,
                  output_features: Mapping[str, seqio.Feature] | None = None,
                  sequence_length: Mapping[str, int] | None = None,
                  *,
                  num_pauses: int = 10,
                  pause_id: int | None = None,
                  feature_key: str = "inputs",
                  truncate: str = "left") -> tf.data.Dataset:
  """Appends `num_pauses` pauses to `feature_key` (the finetuning prefix).

  When seqio passes a length L = `sequence_length[feature_key]`, the prefix is
  first cut to L - M tokens so that the M pauses survive the Task's own
  trimming to L. `truncate='left'` (the default) drops the oldest tokens and
  keeps the end of the prefix, next to the answer; 'right' keeps the start.
  M = 0 returns the dataset unchanged.

  Args:
    dataset: examples with an int32 rank-1 `feature_key`.
    output_features: supplied by seqio; used to find the pause id.
    sequence_length: supplied by seqio; L for `feature_key` (None: no cut).
    num_pauses: M >= 0; M must be below L.
    pause_id: the id appended; default: the feature's PauseVocabulary's. Pass
      an ordinary token id for a filler-token control.
    feature_key: the prefix feature.
    truncate: 'left' or 'right', the side the prefix loses tokens from.
  """
  keep = _prefix_room("num_pauses", num_pauses, sequence_length, feature_key, truncate)
  if num_pauses == 0:
    return dataset
  pause_id = _resolve_pause_id(pause_id, output_features, feature_key,
                               "append_pauses")

  @seqio.map_over_dataset
  def _append(x):
    prefix = _cut_prefix(x[feature_key], keep, truncate)
    pauses = tf.fill([num_pauses], tf.cast(pause_id, prefix.dtype))
    return {**x, feature_key: tf.concat([prefix, pauses], axis=0)}

  return _append(dataset)


def append_prompt_repeat(dataset: tf.data.Dataset,
                         output_features: Mapping[str, seqio.Feature] | None = None,
                         sequence_length: Mapping[str, int] | None = None,
                         *,
                         num_tokens: int = 10,
                         feature_key: str = "inputs",
                         truncate: str = "left") -> tf.data.Dataset:
  """Appends the prefix's own first `num_tokens` tokens to it (the repeat control).

  The control for appended pauses that gives the model the same extra
  positions filled with content instead of a constant: prefix p_1..p_n becomes
  p_1..p_n p_1..p_M, wrapping around while M > n (an empty prefix stays
  empty). The prefix is first cut as `append_pauses` cuts it, so the M
  repeated tokens survive the Task's trimming to L; the repeat copies the
  prefix that is kept.
  """
  del output_features
  keep = _prefix_room("num_tokens", num_tokens, sequence_length, feature_key, truncate)
  if num_tokens == 0:
    return dataset

  @seqio.map_over_dataset
  def _repeat(x):
    prefix = _cut_prefix(x[feature_key], keep, truncate)
    n = tf.size(prefix)
    copies = tf.math.floordiv(num_tokens + n - 1, tf.maximum(n, 1))
    repeat = tf.tile(prefix, [copies])[:num_tokens]
    return {**x, feature_key: tf.concat([prefix, repeat], axis=0)}

  return _repeat(dataset)


def insert_pauses(dataset: tf.data.Dataset,
                  output_features: Mapping[str, seqio.Feature] | None = None,
                  sequence_length: Mapping[str, int] | None = None,
                  *,
                  placement: policies.Placement | str | None = None,
                  count: policies.CountPolicy | int | float | None = None,
                  pause_id: int | None = None,
                  feature_key: str = "targets",
                  truncate: str = "left") -> tf.data.Dataset:
  """Inserts pauses by a placement and a count policy (pause_flax.data.policies).

  The form follows `feature_key`. 'targets' (pretraining): the example, cut to
  `sequence_length[feature_key]` when seqio passes one, is lengthened by its
  pauses and trimmed back to its length L (the tail is cut), as
  `inject_pauses` does. 'inputs' (finetuning): when the example gets M pauses
  in all (Uniform, Append, BeforeMarker's last occurrence) the prefix is
  first cut to the length minus M from the `truncate` side ('left': the
  oldest tokens go), as `append_pauses` does, so all M survive; with M per
  boundary (Segments, occurrence='all') real tokens are dropped from that
  side together with the pauses just before them until the rest fits.

  The paper's pairs run the paper's code, bit for bit: Uniform in 'targets'
  is `inject_pauses`, Append with a fixed count is `append_pauses`. Every
  other pair is drawn per example from seqio's per-example seed (and, for a
  Curriculum, the example's position in the stream).

  Args:
    dataset: examples with an int32 rank-1 `feature_key`.
    output_features: supplied by seqio; the pause id and the vocabulary that
      encodes markers / sentence ends.
    sequence_length: supplied by seqio; the feature's length.
    placement: a Placement or its name; default: the form's (Uniform for
      'targets', Append for 'inputs').
    count: a CountPolicy or a shorthand (int, float, (lo, hi)); default: the
      placement's (Fraction(0.1) for Uniform, 10 for Append and BeforeMarker,
      1 per boundary for Segments).
    pause_id: the id inserted; default: the feature's PauseVocabulary's. Pass
      an ordinary token id for a filler-token control.
    feature_key: 'targets' or 'inputs'.
    truncate: for 'inputs', the side the prefix loses tokens from
      ('left' or 'right'); Append's own `truncate` wins for Append.
  """
  placement = (policies.default_placement(feature_key) if placement is None
               else policies.as_placement(placement))
  count = placement.default_count if count is None else policies.as_count(count)
  placement.check(feature_key, count)
  if isinstance(placement, policies.Append):
    truncate = placement.truncate
  if truncate not in ("left", "right"):
    raise ValueError(f"truncate={truncate!r} is invalid: use 'left' (keep the end of the "
                     "prefix) or 'right' (keep its start).")
  if isinstance(placement, policies.Uniform) and feature_key == "targets":
    return inject_pauses(dataset, output_features, sequence_length, count=count,
                         pause_id=pause_id, feature_key=feature_key)
  if isinstance(placement, policies.Append) and isinstance(count, policies.Fixed):
    return append_pauses(dataset, output_features, sequence_length,
                         num_pauses=count.num_pauses, pause_id=pause_id,
                         feature_key=feature_key, truncate=truncate)
  pause_id = _resolve_pause_id(pause_id, output_features, feature_key, "insert_pauses")
  max_length = (sequence_length or {}).get(feature_key)
  is_prefix = feature_key == "inputs"
  biggest = count.max_count()
  if is_prefix and placement.total_is_count and max_length is not None and (
      biggest is not None and biggest >= max_length):
    raise ValueError(
        f"count {count} gives up to {biggest} pauses, which leaves no room for the prefix "
        f"in {feature_key!r} of length {max_length}: use counts below {max_length} or a "
        f"longer sequence_length[{feature_key!r}].")
  spec = dataset.element_spec
  if not isinstance(spec, Mapping) or feature_key not in spec:
    raise ValueError(f"insert_pauses: examples need a {feature_key!r} feature; got {spec}.")
  ids = placement.resolve(getattr((output_features or {}).get(feature_key), "vocabulary",
                                  None))

  @seqio.map_over_dataset(num_seeds=1)
  def _insert(x, seed):
    x = dict(x)
    index = x.pop(_INDEX_KEY, None)
    tokens = x[feature_key]
    if max_length is not None and not is_prefix:
      tokens = tokens[:max_length]
    n = tf.size(tokens)
    seen = n if max_length is None else tf.minimum(n, max_length)
    count_seed, place_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    m = count.tf_counts(tf.reshape(seen, [1]),
                        None if index is None else tf.reshape(index, [1]), count_seed)[0]
    if is_prefix and max_length is not None and placement.total_is_count:
      # As append_pauses: the prefix is cut first, so that all M pauses fit.
      keep = tf.maximum(max_length - m, 0)
      tokens = (tokens[tf.maximum(tf.size(tokens) - keep, 0):] if truncate == "left"
                else tokens[:keep])
    before = placement.pauses_before(tokens, m, place_seed, ids)
    if is_prefix and max_length is not None:
      tokens, before = _fit_prefix(tokens, before, max_length, truncate)
    out = _interleave(tokens, before, tf.cast(pause_id, tokens.dtype))
    if not is_prefix:
      out = out[:n]
    elif max_length is not None:
      out = out[-max_length:] if truncate == "left" else out[:max_length]
    x[feature_key] = out
    return x

  if count.needs_index:
    dataset = _with_index(dataset)
  return _insert(dataset)


def _interleave(tokens: tf.Tensor, before: tf.Tensor, pause: tf.Tensor) -> tf.Tensor:
  """`before[i]` pauses, then token i, for each i; then `before[n]` pauses."""
  n = tf.size(tokens)
  total = n + tf.reduce_sum(before)
  position = tf.range(n) + tf.cumsum(before[:n])
  return tf.tensor_scatter_nd_update(tf.fill([total], pause), position[:, None], tokens)


def _fit_prefix(tokens: tf.Tensor, before: tf.Tensor, max_length: int,
                truncate: str) -> tuple[tf.Tensor, tf.Tensor]:
  """Drops real tokens from the `truncate` side, each with the pauses just
  before it, until the rest fits `max_length`; pauses at the end always stay."""
  n = tf.size(tokens)
  if truncate == "left":
    # Cost of keeping tokens d.. (and the pauses from before token d on).
    cost = n - tf.range(n + 1) + tf.cumsum(before, reverse=True)
    fits = cost <= max_length
    drop = tf.where(tf.reduce_any(fits), tf.cast(tf.argmax(fits), tf.int32), n)
    return tokens[drop:], before[drop:]
  # Cost of keeping tokens ..keep-1 (their pauses and the end's).
  cost = tf.range(n + 1) + tf.concat([[0], tf.cumsum(before[:n])], 0) + before[n]
  fits = cost <= max_length
  keep = tf.reduce_sum(tf.cast(fits, tf.int32)) - 1          # cost is nondecreasing
  keep = tf.maximum(keep, 0)
  return tokens[:keep], tf.concat([before[:keep], before[n:]], 0)


# -- supervised pauses ----------------------------------------------------------

PAUSE_TARGETS_KEY = "pause_targets"   # rank-1 ids: what to predict in place of each pause
PAUSE_WEIGHT_KEY = "pause_weight"     # optional scalar per example: their loss weight


def pause_target_keys(feature_key: str) -> tuple[str, str]:
  """Names of the aligned features `attach_pause_targets` writes for `feature_key`."""
  return f"{feature_key}_pause_targets", f"{feature_key}_pause_weights"


def is_pause_target_feature(key: str) -> bool:
  """Whether `key` is `pause_targets`, `pause_weight` or an aligned feature."""
  return key in (PAUSE_TARGETS_KEY, PAUSE_WEIGHT_KEY) or key.endswith(
      ("_pause_targets", "_pause_weights"))


def attach_pause_targets(dataset: tf.data.Dataset,
                         output_features: Mapping[str, seqio.Feature] | None = None,
                         sequence_length: Mapping[str, int] | None = None,
                         *,
                         weight: int = 1,
                         pause_id: int | None = None,
                         feature_key: str = "inputs") -> tf.data.Dataset:
  """Supervised pauses: gives the k-th pause of `feature_key` the k-th pause target.

  Each example carries `pause_targets` (int ids, one per pause, in order; any
  length, empty for a plain example) and optionally a scalar `pause_weight`
  (else `weight`). Run it after `append_pauses` / `inject_pauses`: every
  occurrence of `pause_id` in `feature_key` is a pause slot, the k-th gets
  `pause_targets[k]` with that weight, slots past the list get weight 0.
  Writes the aligned features `<feature_key>_pause_targets` and
  `<feature_key>_pause_weights` (same length as `feature_key`, 0 elsewhere) and
  drops `pause_targets` / `pause_weight`. The feature converters then train
  the output that would predict pause k (the output at the token just before
  it: the prefix's last token for the first appended pause, pause k-1 for the
  others) on `pause_targets[k]` instead of giving it weight 0. Inputs are
  untouched: the model still reads `<pause>`. Weight 0 is the paper's
  behaviour, bit for bit.

  Args:
    dataset: examples with `feature_key` and `pause_targets`.
    output_features: supplied by seqio; used to find the pause id.
    sequence_length: unused (the pause steps already fixed the length).
    weight: loss weight of a supervised pause output (integer >= 0; seqio's
      loss weights are int32).
    pause_id: the pause (or filler) id to look for; default: the feature's
      PauseVocabulary's. A filler must not also occur in the text.
    feature_key: 'inputs' (finetuning form) or 'targets' (pretraining form).
  """
  del sequence_length
  _check_count("weight", weight)
  pause_id = _resolve_pause_id(pause_id, output_features, feature_key,
                               "attach_pause_targets")
  spec = dataset.element_spec
  if not isinstance(spec, Mapping) or PAUSE_TARGETS_KEY not in spec or feature_key not in spec:
    raise ValueError(
        f"attach_pause_targets: examples need {feature_key!r} and {PAUSE_TARGETS_KEY!r} "
        f"(the ids each pause should predict); got {spec}.")
  ids_key, weights_key = pause_target_keys(feature_key)

  @seqio.map_over_dataset
  def _attach(x):
    x = dict(x)
    hints = tf.cast(x.pop(PAUSE_TARGETS_KEY), tf.int32)
    w = tf.cast(x.pop(PAUSE_WEIGHT_KEY, weight), tf.int32)
    tokens = x[feature_key]
    is_pause = tf.equal(tokens, tf.cast(pause_id, tokens.dtype))
    k = tf.cumsum(tf.cast(is_pause, tf.int32)) - 1        # index of each pause
    supervised = is_pause & (k < tf.size(hints))
    padded = tf.concat([hints, [0]], 0)                    # gather never out of range
    ids = tf.gather(padded, tf.clip_by_value(k, 0, tf.size(hints)))
    x[ids_key] = tf.where(supervised, ids, 0)
    x[weights_key] = tf.where(supervised, w, 0)
    return x

  return _attach(dataset)
