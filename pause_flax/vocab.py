"""PauseVocabulary: any seqio vocabulary plus one `<pause>` id.

The pause id sits just past the base vocabulary (`pause_id == base.vocab_size`
by default), so no text ever encodes to it and a model's embedding table grows
by exactly one row. Decoding drops it. Everything else (EOS, UNK, PAD, the
tokenizer itself) is the base vocabulary's.

The base vocabulary's size is looked up lazily, on first use of `pause_id`,
so that a Task can be registered with a SentencePiece model on GCS without
touching GCS at import time.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import seqio
import tensorflow as tf


class PauseVocabulary(seqio.Vocabulary):
  """Wraps a seqio vocabulary and adds a `<pause>` token.

  Attributes:
    base: the wrapped vocabulary.
    pause_id: id of `<pause>`; `vocab_size == pause_id + 1`.
  """

  def __init__(self, base: seqio.Vocabulary, pause_id: int | None = None):
    """Wraps `base`.

    Args:
      base: any seqio vocabulary (SentencePiece, bytes, ...). Wrapping a
        PauseVocabulary is refused: a model has one pause id.
      pause_id: defaults to `base.vocab_size`. An explicit id must be at least
        `base.vocab_size` (checked on first use, when the base is loaded): ids
        below it belong to the base.
    """
    if not isinstance(base, seqio.Vocabulary):
      raise TypeError(
          f"PauseVocabulary wraps a seqio.Vocabulary, got {base!r} of type "
          f"{type(base).__name__}.")
    if isinstance(base, PauseVocabulary):
      raise TypeError(
          f"{base} already has a pause id ({base.pause_id}); wrap its .base "
          "instead.")
    if pause_id is not None and (
        isinstance(pause_id, bool) or not isinstance(pause_id, int) or
        pause_id <= 0):
      raise ValueError(
          f"pause_id={pause_id!r} is invalid: use a positive integer (0 is "
          "padding) at least as large as the base vocabulary size, or None for "
          "'the base vocabulary size'.")
    self._base = base
    self._requested_pause_id = pause_id
    self._pause_id: int | None = None
    super().__init__(extra_ids=0)

  @property
  def base(self) -> seqio.Vocabulary:
    return self._base

  @property
  def pause_id(self) -> int:
    if self._pause_id is None:
      base_size = self._base.vocab_size
      pause_id = (base_size if self._requested_pause_id is None
                  else self._requested_pause_id)
      if pause_id < base_size:
        raise ValueError(
            f"pause_id={pause_id} is already used by the base vocabulary "
            f"{self._base} (ids 0..{base_size - 1}); use pause_id >= "
            f"{base_size}, e.g. None for {base_size}.")
      self._pause_id = pause_id
    return self._pause_id

  # The ids a model must embed: the base's, any gap, and the pause.
  @property
  def _base_vocab_size(self) -> int:
    return self.pause_id + 1

  @property
  def bos_id(self) -> int | None:
    return self._base.bos_id

  @property
  def eos_id(self) -> int | None:
    return self._base.eos_id

  @property
  def unk_id(self) -> int | None:
    return self._base.unk_id

  @property
  def pad_id(self) -> int:
    return self._base.pad_id

  def _encode(self, s: str) -> Sequence[int]:
    return self._base.encode(s)

  def _encode_tf(self, s: tf.Tensor) -> tf.Tensor:
    return self._base.encode_tf(s)

  def _decode(self, ids: Iterable[int]) -> str:
    pause_id = self.pause_id
    return self._base.decode([i for i in ids if int(i) != pause_id])

  def _decode_tf(self, ids: tf.Tensor) -> tf.Tensor:
    # Pauses become padding, which every seqio vocabulary decodes to nothing
    # (seqio itself pads out everything after EOS the same way). This keeps
    # batched, dense ids dense.
    ids = tf.convert_to_tensor(ids)
    ids = tf.where(tf.equal(ids, self.pause_id),
                   tf.cast(self.pad_id, ids.dtype), ids)
    return self._base.decode_tf(ids)

  def __eq__(self, other: Any) -> bool:
    if not isinstance(other, PauseVocabulary) or self._base != other._base:
      return False
    return (self._requested_pause_id == other._requested_pause_id or
            self.pause_id == other.pause_id)

  def __hash__(self) -> int:
    # seqio's base vocabularies define __eq__ without __hash__; hash what
    # equality implies without loading any model file.
    return hash((PauseVocabulary, type(self._base).__name__))

  def __str__(self) -> str:
    pause = (self._pause_id if self._pause_id is not None else
             self._requested_pause_id or "base.vocab_size")
    return f"PauseVocabulary(base={self._base}, pause_id={pause})"

  __repr__ = __str__


class AdaptivePauseVocabulary(PauseVocabulary):
  """A PauseVocabulary plus an output-only "ask for a pause" id (Catch Your Breath).

  `ask_id == pause_id + 1` (the `<don't know>` class of Galashov et al. 2025):
  a model over this vocabulary has one more output row, and when its argmax is
  `ask_id` adaptive decoding feeds a `<pause>` instead of emitting a token. No
  text encodes to it, nothing feeds it as an input, and decoding drops it like
  the pause. The model's embedding table grows by one (unused) row too, which
  keeps the input and output vocabularies one size.
  """

  @property
  def ask_id(self) -> int:
    return self.pause_id + 1

  @property
  def _base_vocab_size(self) -> int:
    return self.pause_id + 2

  def _decode(self, ids: Iterable[int]) -> str:
    return super()._decode([i for i in ids if int(i) != self.ask_id])

  def _decode_tf(self, ids: tf.Tensor) -> tf.Tensor:
    ids = tf.convert_to_tensor(ids)
    ids = tf.where(tf.equal(ids, self.ask_id), tf.cast(self.pad_id, ids.dtype), ids)
    return super()._decode_tf(ids)

  def __eq__(self, other: Any) -> bool:
    return isinstance(other, AdaptivePauseVocabulary) and super().__eq__(other)

  def __hash__(self) -> int:
    return hash((AdaptivePauseVocabulary, type(self._base).__name__))

  def __str__(self) -> str:
    return "Adaptive" + super().__str__()

  __repr__ = __str__
