"""Where pauses go and how many: placement and count policies.

A pause variant is one placement, one count and one token (`<pause>` or a
filler id). The seed paper's recipe is the default: `Uniform()` with
`Fraction(0.1)` in pretraining ('targets'), `Append()` with `Fixed(10)` in
finetuning ('inputs'). `preprocessors.insert_pauses` applies any pair;
`tasks.pause_variant(task, placement=..., count=...)` registers the variant.

Placements (where the pauses of an example go):
  Uniform()        M pauses at uniformly random slots of the lengthened sequence
  Append()         M pauses after the prefix (finetuning form only)
  BeforeMarker()   M pauses directly before a marker, e.g. "Answer:"
  Segments()       M pauses at every segment boundary: every k tokens, or after
                   each sentence-ending token

Counts (M, per example):
  Fixed(m)               M = m
  Fraction(f)            M = round(f * L), L the example's length
  RandomRange(lo, hi)    M uniform in [lo, hi], drawn per example
  Curriculum(...)        M grows with the examples the pipeline has produced

Every random choice is stateless, seeded by seqio's seeds (from the Task seed
and the example's position in the stream: one per example, or one per group
of examples in the grouped uniform injection), and the curriculum's counter is
a `Dataset.enumerate` inside the tf.data graph: both are part of the iterator
state that checkpoints save, so a resumed run continues exactly.

The policies are plain frozen dataclasses; TensorFlow is imported only when
their ops are built, so the entry points can register them with gin cheaply.

Shorthands (for gin and Python): a placement may be given by name
('uniform', 'append', 'before_marker', 'segments', with their defaults); a
count as an int (Fixed), a float (Fraction) or a pair (RandomRange).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
  import tensorflow as tf

# Salt that separates the count's random stream from the positions'.
_COUNT_SALT = 0x5EED


def _check_int(name: str, value, minimum: int) -> None:
  if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
    raise ValueError(f"{name}={value!r} is invalid: use an integer >= {minimum}.")


def _slug(text: str) -> str:
  """A name-safe, lossless spelling of `text` (non-alphanumerics as xHH)."""
  return "".join(c if c.isascii() and c.isalnum() else f"x{ord(c):02x}" for c in text)


# -- counts ---------------------------------------------------------------------


class CountPolicy:
  """How many pauses an example gets (per boundary, for `Segments`)."""

  needs_index = False   # the example's position in the stream (curriculum)

  def suffix(self) -> str:
    """The part of a variant's name that says the count."""
    raise NotImplementedError

  def max_count(self) -> int | None:
    """The largest M it can give (None: depends on the length)."""
    raise NotImplementedError

  def tf_counts(self, length_K: tf.Tensor, index_K: tf.Tensor | None,
                seed: tf.Tensor | None) -> tf.Tensor:
    """int32 [K]: M of K examples of lengths `length_K` (int32), stream
    positions `index_K` (int64; only if `needs_index`), one stateless seed."""
    raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class Fixed(CountPolicy):
  """M = `num_pauses` for every example (the paper's finetuning M_ft)."""
  num_pauses: int

  def __post_init__(self):
    _check_int("num_pauses", self.num_pauses, 0)

  def suffix(self) -> str:
    return f"n{self.num_pauses}"

  def max_count(self) -> int:
    return self.num_pauses

  def tf_counts(self, length_K, index_K, seed):
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    del index_K, seed
    return tf.fill(tf.shape(length_K), tf.constant(self.num_pauses, tf.int32))


@dataclasses.dataclass(frozen=True)
class Fraction(CountPolicy):
  """M = round(`fraction` * L), half to even (the paper's pretraining: 0.1)."""
  fraction: float

  def __post_init__(self):
    if isinstance(self.fraction, bool) or not isinstance(self.fraction, (int, float)) or not (
        0 <= self.fraction < 1):
      raise ValueError(f"fraction={self.fraction!r} is invalid: use a number in [0, 1) "
                       "(the paper uses 0.1).")

  def suffix(self) -> str:
    return f"f{self.fraction:g}"

  def max_count(self) -> None:
    return None

  def tf_counts(self, length_K, index_K, seed):
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    del index_K, seed
    return tf.cast(tf.round(self.fraction * tf.cast(length_K, tf.float64)), tf.int32)


@dataclasses.dataclass(frozen=True)
class RandomRange(CountPolicy):
  """M drawn uniformly from {lo, ..., hi} for each example."""
  lo: int
  hi: int

  def __post_init__(self):
    _check_int("lo", self.lo, 0)
    _check_int("hi", self.hi, 0)
    if self.hi < self.lo:
      raise ValueError(f"RandomRange(lo={self.lo}, hi={self.hi}) is empty: use lo <= hi.")

  def suffix(self) -> str:
    return f"r{self.lo}to{self.hi}"

  def max_count(self) -> int:
    return self.hi

  def tf_counts(self, length_K, index_K, seed):
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    del index_K
    seed = tf.random.experimental.stateless_fold_in(seed, _COUNT_SALT)
    return self.lo + tf.random.stateless_uniform(
        tf.shape(length_K), seed=seed, minval=0, maxval=self.hi - self.lo + 1,
        dtype=tf.int32)


@dataclasses.dataclass(frozen=True)
class Curriculum(CountPolicy):
  """M grows in stages with training progress (Coconut's curriculum).

  The example at position i of the stream (0-based: the i-th example this
  Task's pipeline produces, on this data shard, across epochs) gets
  M = min(end, start + increment * (i // stage_examples)). For unpacked data
  on one shard, examples produced = steps x BATCH_SIZE, so a stage of S steps
  is stage_examples = S * BATCH_SIZE (S * BATCH_SIZE / data_shards per shard).
  The count is set before the Task's shuffle buffer, so training sees it up to
  a buffer's worth of examples later (docs/pause_policies.md).
  """
  end: int
  stage_examples: int
  start: int = 0
  increment: int = 1

  def __post_init__(self):
    _check_int("start", self.start, 0)
    _check_int("end", self.end, self.start)
    _check_int("stage_examples", self.stage_examples, 1)
    _check_int("increment", self.increment, 1)

  needs_index = True

  def suffix(self) -> str:
    return (f"cur{self.start}to{self.end}by{self.increment}"
            f"every{self.stage_examples}")

  def max_count(self) -> int:
    return self.end

  def count_at(self, examples_seen: int) -> int:
    """M of the example at stream position `examples_seen` (Python)."""
    return min(self.end, self.start + self.increment * (examples_seen // self.stage_examples))

  def tf_counts(self, length_K, index_K, seed):
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    del length_K, seed
    stage_K = index_K // self.stage_examples
    m_K = tf.minimum(tf.cast(self.end, tf.int64),
                     self.start + self.increment * stage_K)
    return tf.cast(m_K, tf.int32)


def as_count(spec) -> CountPolicy:
  """A CountPolicy from itself or a shorthand: int (Fixed), float (Fraction),
  a pair [lo, hi] (RandomRange)."""
  if isinstance(spec, CountPolicy):
    return spec
  if isinstance(spec, bool):
    pass
  elif isinstance(spec, int):
    return Fixed(spec)
  elif isinstance(spec, float):
    return Fraction(spec)
  elif isinstance(spec, Sequence) and not isinstance(spec, str) and len(spec) == 2:
    return RandomRange(*spec)
  raise ValueError(
      f"pause count {spec!r} is invalid: use an int (a fixed M), a float in [0, 1) (a "
      "fraction of L), a pair (lo, hi) (a random M per example), or a policy "
      "(policies.Fixed / Fraction / RandomRange / Curriculum).")


# -- placements -----------------------------------------------------------------


class Placement:
  """Where the pauses of an example go (`pauses_before`: how many before each token)."""

  default_count: CountPolicy
  forms = ("targets", "inputs")   # the features it may be applied to

  @property
  def total_is_count(self) -> bool:
    """Whether an example gets M pauses in all (not M per boundary or marker)."""
    return False

  def suffix(self) -> str:
    raise NotImplementedError

  def check(self, feature_key: str, count: CountPolicy) -> None:
    """Raises a clear ValueError for a combination that makes no sense."""
    if feature_key not in self.forms:
      raise ValueError(
          f"placement {self.suffix()!r} applies to {' or '.join(map(repr, self.forms))}, "
          f"not {feature_key!r}.")

  def resolve(self, vocabulary) -> tuple:
    """Token ids it needs from the feature's vocabulary (checked once)."""
    del vocabulary
    return ()

  def pauses_before(self, tokens: tf.Tensor, m: tf.Tensor, seed: tf.Tensor,
                    ids: tuple) -> tf.Tensor:
    """int32 [n + 1]: pauses before each of the n tokens, then at the end."""
    raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class Uniform(Placement):
  """M pauses at M uniformly random slots of the L + M slots (the paper's pretraining)."""
  default_count = Fraction(0.1)

  @property
  def total_is_count(self) -> bool:
    return True

  def suffix(self) -> str:
    return "uniform"

  def pauses_before(self, tokens, m, seed, ids):
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    del ids
    n = tf.size(tokens)
    keys = tf.random.stateless_uniform(tf.reshape(n + m, [1]), seed=seed, dtype=tf.int64,
                                       minval=0, maxval=tf.int64.max)
    # The m smallest keys: a uniformly random m-subset of the n + m slots. A
    # pause at slot s with j pauses before it precedes real token s - j.
    slots = tf.sort(tf.math.top_k(-keys, k=m).indices)
    return tf.math.bincount(slots - tf.range(m), minlength=n + 1, maxlength=n + 1,
                            dtype=tf.int32)


@dataclasses.dataclass(frozen=True)
class Append(Placement):
  """M pauses after the prefix (the paper's finetuning and inference).

  `truncate`: the side a too-long prefix loses tokens from ('left' keeps its
  end, next to the answer), so that the pauses survive.
  """
  truncate: str = "left"
  default_count = Fixed(10)
  forms = ("inputs",)

  @property
  def total_is_count(self) -> bool:
    return True

  def __post_init__(self):
    if self.truncate not in ("left", "right"):
      raise ValueError(f"truncate={self.truncate!r} is invalid: use 'left' (keep the end of "
                       "the prefix) or 'right' (keep its start).")

  def suffix(self) -> str:
    return "append" if self.truncate == "left" else "append_right"

  def pauses_before(self, tokens, m, seed, ids):
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    del seed, ids
    return tf.one_hot(tf.size(tokens), tf.size(tokens) + 1, on_value=m, off_value=0,
                      dtype=tf.int32)


IF_ABSENT = ("end", "skip", "error")


@dataclasses.dataclass(frozen=True)
class BeforeMarker(Placement):
  """M pauses directly before a marker (arXiv 2509.24884: before the final "Answer:").

  The marker is matched as the token sequence `vocabulary.encode(marker)`, or
  `marker_ids` when given (SentencePiece may spell a word differently inside a
  text; pass the ids you see there). occurrence='last' puts the pauses before
  its last occurrence, 'all' before every one (M each).
  If the marker is absent: `if_absent`='end' puts the pauses at the end of the
  feature (for a prefix: directly before the answer, i.e. `Append`; in
  'targets' they are trimmed off), 'skip' leaves the example without pauses,
  'error' stops the pipeline naming the marker.
  """
  marker: str = "Answer:"
  occurrence: str = "last"
  if_absent: str = "end"
  marker_ids: tuple[int, ...] | None = None
  default_count = Fixed(10)

  @property
  def total_is_count(self) -> bool:
    return self.occurrence == "last"

  def __post_init__(self):
    if self.occurrence not in ("last", "all"):
      raise ValueError(f"occurrence={self.occurrence!r} is invalid: use 'last' or 'all'.")
    if self.if_absent not in IF_ABSENT:
      raise ValueError(f"if_absent={self.if_absent!r} is invalid: use one of {IF_ABSENT}.")
    if self.marker_ids is not None:
      object.__setattr__(self, "marker_ids", tuple(self.marker_ids))
      if not self.marker_ids or any(isinstance(i, bool) or not isinstance(i, int) or i < 0
                                    for i in self.marker_ids):
        raise ValueError(f"marker_ids={self.marker_ids!r} is invalid: use a non-empty "
                         "sequence of token ids >= 0.")
    elif not isinstance(self.marker, str) or not self.marker:
      raise ValueError(f"marker={self.marker!r} is invalid: use a non-empty string.")

  def suffix(self) -> str:
    what = ("ids" + "_".join(map(str, self.marker_ids)) if self.marker_ids is not None
            else "" if self.marker == "Answer:" else _slug(self.marker))
    parts = ["before"] + [p for p in (what,) if p]
    if self.occurrence != "last":
      parts.append(self.occurrence)
    if self.if_absent != "end":
      parts.append(f"if{self.if_absent}")
    return "_".join(parts)

  def resolve(self, vocabulary) -> tuple:
    if self.marker_ids is not None:
      return self.marker_ids
    if vocabulary is None:
      raise ValueError(f"BeforeMarker(marker={self.marker!r}) needs the feature's "
                       "vocabulary to encode the marker; or pass marker_ids.")
    ids = tuple(int(i) for i in vocabulary.encode(self.marker))
    if not ids:
      raise ValueError(f"marker={self.marker!r} encodes to no tokens; pass marker_ids.")
    return ids

  def pauses_before(self, tokens, m, seed, ids):
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    del seed
    n = tf.size(tokens)
    k = len(ids)
    padded = tf.concat([tokens, tf.fill([k], tf.constant(-1, tokens.dtype))], 0)
    match = tf.ones([n], tf.bool)
    for j, token in enumerate(ids):
      match &= tf.equal(padded[j:j + n], tf.cast(token, tokens.dtype))
    found = tf.reduce_any(match)
    if self.occurrence == "last":
      last = tf.cast(tf.reduce_max(tf.concat([tf.where(match)[:, 0], [-1]], 0)), tf.int32)
      at = tf.one_hot(last, n + 1, on_value=m, off_value=0, dtype=tf.int32)
    else:
      at = m * tf.cast(tf.concat([match, [False]], 0), tf.int32)
    if self.if_absent == "error":
      check = tf.debugging.Assert(found, [f"BeforeMarker: marker {self.marker!r} (ids "
                                          f"{list(ids)}) not found in an example; use "
                                          "if_absent='end' or 'skip'."])
      with tf.control_dependencies([check]):
        at = tf.identity(at)
    absent = (tf.one_hot(n, n + 1, on_value=m, off_value=0, dtype=tf.int32)
              if self.if_absent == "end" else tf.zeros([n + 1], tf.int32))
    return tf.where(found, at, absent)


SENTENCE_ENDS = (".", "?", "!")


@dataclasses.dataclass(frozen=True)
class Segments(Placement):
  """M pauses at every segment boundary (Pause-Tuning, arXiv 2502.20405).

  Boundaries lie between tokens, inside the feature (never before its first
  token or after its last): after every `every`-th token when `every` is set,
  else after every token of `after` (strings that each encode to one token;
  sentence ends '.', '?', '!' by default) or of `after_ids`. The count is per
  boundary (a fraction of L is refused).
  """
  every: int | None = None
  after: tuple[str, ...] = SENTENCE_ENDS
  after_ids: tuple[int, ...] | None = None
  default_count = Fixed(1)

  def __post_init__(self):
    if self.every is not None:
      _check_int("every", self.every, 1)
    object.__setattr__(self, "after", tuple(self.after))
    if self.after_ids is not None:
      object.__setattr__(self, "after_ids", tuple(self.after_ids))
    if self.every is None and not (self.after_ids or self.after):
      raise ValueError("Segments needs every=k, or after= / after_ids= (the tokens that "
                       "end a segment).")

  def suffix(self) -> str:
    if self.every is not None:
      return f"seg{self.every}"
    if self.after_ids is not None:
      return "seg_after" + "_".join(map(str, self.after_ids))
    if self.after == SENTENCE_ENDS:
      return "seg_sent"
    return "seg_after_" + "_".join(_slug(a) for a in self.after)

  def check(self, feature_key, count):
    super().check(feature_key, count)
    if isinstance(count, Fraction):
      raise ValueError(
          f"Segments counts pauses per boundary; {count} (a fraction of L) does not "
          "apply: use a fixed count, a RandomRange or a Curriculum.")

  def resolve(self, vocabulary) -> tuple:
    if self.every is not None:
      return ()
    if self.after_ids is not None:
      return self.after_ids
    if vocabulary is None:
      raise ValueError("Segments(after=...) needs the feature's vocabulary; or pass "
                       "after_ids.")
    ids = []
    for text in self.after:
      encoded = list(vocabulary.encode(text))
      if len(encoded) != 1:
        raise ValueError(f"Segments: after={text!r} encodes to {len(encoded)} tokens "
                         f"{encoded}; use strings of one token each, or after_ids.")
      ids.append(int(encoded[0]))
    return tuple(ids)

  def pauses_before(self, tokens, m, seed, ids):
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    del seed
    n = tf.size(tokens)
    if self.every is not None:
      i = tf.range(n + 1)
      boundary = tf.equal(i % self.every, 0)
    else:
      ends = tf.reduce_any(tf.equal(tokens[:, None], tf.constant(ids, tokens.dtype)[None, :]),
                           axis=1)
      boundary = tf.concat([[False], ends], 0)          # before token j+1
    inside = (tf.range(n + 1) > 0) & (tf.range(n + 1) < n)
    return m * tf.cast(boundary & inside, tf.int32)


PLACEMENTS = {"uniform": Uniform, "append": Append, "before_marker": BeforeMarker,
              "segments": Segments}


def as_placement(spec) -> Placement:
  """A Placement from itself or a name ('uniform', 'append', 'before_marker', 'segments')."""
  if isinstance(spec, Placement):
    return spec
  if isinstance(spec, str) and spec in PLACEMENTS:
    return PLACEMENTS[spec]()
  raise ValueError(f"pause placement {spec!r} is invalid: use one of {sorted(PLACEMENTS)} "
                   "or a policy object (policies.Uniform / Append / BeforeMarker / Segments).")


def default_placement(feature_key: str) -> Placement:
  """The paper's placement of a form: uniform in 'targets', appended to 'inputs'."""
  return Append() if feature_key == "inputs" else Uniform()


# Every policy class, for registration with gin at the entry points.
POLICIES = (Fixed, Fraction, RandomRange, Curriculum, Uniform, Append, BeforeMarker, Segments)
