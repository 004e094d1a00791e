"""A seqio vocabulary over a Hugging Face `tokenizer.json` (the `tokenizers` package).

Lets a Task use an imported model's own tokenizer; wrap it in PauseVocabulary
for pause variants (the pause id then lands at `vocab_size`, the first row past
the model's embedding). Encoding adds no special tokens (no BOS): seqio's
preprocessors add EOS where a Feature asks for it.

seqio reserves id 0 for padding: decoding drops it, and the feature converters
give it loss weight 0. That is Llama/Mistral's `<unk>`, but a real token in some
tokenizers (Llama 3's '!'), which such a Task can neither train on nor decode.

The TensorFlow paths (`encode_tf`, `decode_tf`) call the Rust tokenizer through
`tf.numpy_function`: they run inside tf.data but are not graph-pure (they
cannot be serialised into a SavedModel and hold the GIL while they run).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import seqio
import tensorflow as tf

from pause_flax.hf_files import HFFormatError, parse_json_object, read_import_info

TOKENIZER_CONFIG = "tokenizer_config.json"


def _token_content(token: Any) -> str | None:
  """tokenizer_config.json writes special tokens as str or {'content': str}."""
  if isinstance(token, dict):
    return token.get("content")
  return token


class HfTokenizerVocabulary(seqio.Vocabulary):
  """A `tokenizers.Tokenizer` read from a tokenizer.json, as a seqio vocabulary.

  Special tokens (EOS, UNK, PAD, BOS) are given by name or read from the
  `tokenizer_config.json` beside the file; the file is read on first use
  (any tf.io.gfile path), so registering a Task touches nothing.
  Two instances are equal when the files' contents and the settings are.
  """

  def __init__(self, path: str, *, vocab_size: int | None = None,
               eos_token: str | None = None, unk_token: str | None = None,
               pad_token: str | None = None, bos_token: str | None = None):
    """Args:

      path: a tokenizer.json.
      vocab_size: the ids the model embeds, when its embedding is larger than
        the tokenizer (config.json's vocab_size > the tokenizer's count); the
        pause id of a wrapping PauseVocabulary follows it. Default: the
        tokenizer's count, added tokens included.
      eos_token, unk_token, pad_token, bos_token: token strings; None reads
        them from tokenizer_config.json (EOS is required there or here; UNK
        also falls back to the BPE/WordPiece model's own; PAD defaults to id 0).
    """
    if not isinstance(path, str) or not path:
      raise ValueError(f"path={path!r} must name a tokenizer.json.")
    if vocab_size is not None and (isinstance(vocab_size, bool) or
                                   not isinstance(vocab_size, int) or vocab_size < 1):
      raise ValueError(f"vocab_size={vocab_size!r} must be a positive integer or None.")
    self._path = path
    self._requested_size = vocab_size
    self._requested = {"eos": eos_token, "unk": unk_token, "pad": pad_token,
                       "bos": bos_token}
    self._loaded: dict[str, Any] | None = None
    super().__init__(extra_ids=0)

  # -- loading --------------------------------------------------------------

  def _load(self) -> dict[str, Any]:
    if self._loaded is not None:
      return self._loaded
    import tokenizers  # pylint: disable=g-import-not-at-top
    if not tf.io.gfile.exists(self._path):
      raise FileNotFoundError(f"tokenizer.json {self._path!r} does not exist.")
    with tf.io.gfile.GFile(self._path, "rb") as f:
      content = f.read()
    try:
      tokenizer = tokenizers.Tokenizer.from_str(content.decode("utf-8"))
    except Exception as e:  # tokenizers raises a bare Exception naming no file.
      raise HFFormatError(f"{self._path}: not a tokenizer.json that the tokenizers "
                          f"package reads ({e}); fix or re-download it") from e
    config_path = os.path.join(os.path.dirname(self._path), TOKENIZER_CONFIG)
    config = {}
    if tf.io.gfile.exists(config_path):
      with tf.io.gfile.GFile(config_path, "rb") as f:
        config = parse_json_object(f.read(), config_path)
    model_unk = json.loads(tokenizer.model.__getstate__()).get("unk_token")
    size = tokenizer.get_vocab_size(with_added_tokens=True)
    if self._requested_size is not None and self._requested_size < size:
      raise ValueError(
          f"vocab_size={self._requested_size} is smaller than the {size} ids of "
          f"{self._path!r}.")
    ids = {}
    for kind, requested in self._requested.items():
      token = requested or _token_content(config.get(f"{kind}_token"))
      if token is None and kind == "unk":
        token = model_unk
      if token is None:
        ids[kind] = None
        continue
      token_id = tokenizer.token_to_id(token)
      if token_id is None:
        raise ValueError(f"{kind}_token={token!r} is not a token of {self._path!r}.")
      ids[kind] = token_id
    if ids["eos"] is None:
      raise ValueError(
          f"No EOS token for {self._path!r}: pass eos_token= (e.g. '</s>') or put "
          f"eos_token in {config_path}.")
    self._loaded = {"tokenizer": tokenizer, "size": self._requested_size or size,
                    "ids": ids, "digest": hashlib.sha256(content).hexdigest()}
    return self._loaded

  @property
  def tokenizer(self):
    """The `tokenizers.Tokenizer`."""
    return self._load()["tokenizer"]

  @property
  def path(self) -> str:
    return self._path

  # -- seqio.Vocabulary -----------------------------------------------------

  @property
  def _base_vocab_size(self) -> int:
    return self._load()["size"]

  @property
  def eos_id(self) -> int:
    return self._load()["ids"]["eos"]

  @property
  def unk_id(self) -> int | None:
    return self._load()["ids"]["unk"]

  @property
  def bos_id(self) -> int | None:
    return self._load()["ids"]["bos"]

  @property
  def pad_id(self) -> int:
    pad = self._load()["ids"]["pad"]
    return seqio.PAD_ID if pad is None else pad

  def _encode(self, s: str) -> Sequence[int]:
    return self.tokenizer.encode(s, add_special_tokens=False).ids

  def _decode(self, ids: Iterable[int]) -> str:
    size, pad = self._base_vocab_size, self.pad_id
    real = self.tokenizer.get_vocab_size(with_added_tokens=True)
    keep = [i for i in map(int, ids) if i not in (pad, seqio.PAD_ID) and i < min(size, real)]
    return self.tokenizer.decode(keep, skip_special_tokens=True)

  def _encode_tf(self, s: tf.Tensor) -> tf.Tensor:
    def encode(text: bytes | np.ndarray) -> np.ndarray:  # bytes, or 0-d in eager mode
      text = text.item() if isinstance(text, np.ndarray) else text
      return np.asarray(self._encode(text.decode("utf-8")), np.int32)

    ids = tf.numpy_function(encode, [s], tf.int32, stateful=False)
    ids.set_shape([None])
    return ids

  def _decode_tf(self, ids: tf.Tensor) -> tf.Tensor:
    ids = tf.convert_to_tensor(ids)

    def decode(batch: np.ndarray) -> np.ndarray:
      rows = batch.reshape(-1, batch.shape[-1])
      out = np.array([self._decode(row).encode("utf-8") for row in rows], dtype=object)
      return out.reshape(batch.shape[:-1])

    text = tf.numpy_function(decode, [ids], tf.string, stateful=False)
    text.set_shape(ids.shape[:-1])
    return text

  # -- identity -------------------------------------------------------------

  def _key(self) -> tuple:
    return (self._load()["digest"], self._base_vocab_size,
            tuple(sorted(self._load()["ids"].items())))

  def __eq__(self, other: Any) -> bool:
    if not isinstance(other, HfTokenizerVocabulary):
      return False
    return self is other or self._key() == other._key()

  def __hash__(self) -> int:
    return hash((HfTokenizerVocabulary, self._load()["digest"]))

  def __getstate__(self) -> dict[str, Any]:
    state = dict(self.__dict__)
    state["_loaded"] = None  # re-read from the path after unpickling
    return state

  def __str__(self) -> str:
    return f"HfTokenizerVocabulary({self._path!r})"

  __repr__ = __str__


# -- an imported model's vocabulary -------------------------------------------------

def imported_vocabulary(path: str) -> HfTokenizerVocabulary:
  """HfTokenizerVocabulary of an imported model (wrap it in PauseVocabulary for pauses)."""
  info = read_import_info(path)
  if info["tokenizer"] is None:
    raise FileNotFoundError(f"{info['source']} had no tokenizer.json when {path} was "
                            "imported; build a vocabulary from your own tokenizer file.")
  return HfTokenizerVocabulary(os.path.join(path, info["tokenizer"]),
                               vocab_size=info["vocab_size"])
