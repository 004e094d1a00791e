"""PauseVocabulary: ids, encode/decode, seqio compatibility, errors."""

import pickle

import hypothesis
import hypothesis.strategies as st
import pytest
import seqio
import sentencepiece as spm
import tensorflow as tf

from pause_flax.vocab import PauseVocabulary


@pytest.fixture(scope="module")
def spm_path(tmp_path_factory):
  """A tiny SentencePiece model with T5's special ids (0 pad, 1 eos, 2 unk)."""
  tmp = tmp_path_factory.mktemp("spm")
  corpus = tmp / "corpus.txt"
  corpus.write_text("\n".join(
      f"the model thinks {i} times before it answers {i * 7} questions"
      for i in range(300)))
  spm.SentencePieceTrainer.train(
      input=str(corpus), model_prefix=str(tmp / "tiny"), vocab_size=60,
      pad_id=0, eos_id=1, unk_id=2, bos_id=-1, model_type="unigram",
      minloglevel=2)
  return str(tmp / "tiny.model")


def test_byte_ids():
  vocab = PauseVocabulary(seqio.ByteVocabulary())
  assert vocab.pause_id == 259
  assert vocab.vocab_size == 260
  assert (vocab.eos_id, vocab.unk_id, vocab.pad_id) == (1, 2, 0)


def test_sentencepiece_ids_and_decode(spm_path):
  base = seqio.SentencePieceVocabulary(spm_path)
  vocab = PauseVocabulary(base)
  assert vocab.pause_id == base.vocab_size == vocab.vocab_size - 1
  ids = vocab.encode("the model thinks")
  assert vocab.pause_id not in ids
  with_pauses = [vocab.pause_id] + ids[:2] + [vocab.pause_id] + ids[2:]
  assert vocab.decode(with_pauses) == "the model thinks"
  batch = tf.constant([with_pauses, ids + [vocab.pause_id, 0]])
  decoded = vocab.decode_tf(batch).numpy().tolist()
  assert decoded == [b"the model thinks"] * 2


@hypothesis.settings(max_examples=30, deadline=None)
@hypothesis.given(text=st.text(max_size=40),
                  pauses=st.lists(st.integers(0, 40), max_size=5))
def test_byte_roundtrip_drops_pauses(text, pauses):
  vocab = PauseVocabulary(seqio.ByteVocabulary())
  ids = list(vocab.encode(text))
  assert vocab.pause_id not in ids
  for position in pauses:
    ids.insert(min(position, len(ids)), vocab.pause_id)
  assert vocab.decode(ids) == seqio.ByteVocabulary().decode(
      [i for i in ids if i != vocab.pause_id])
  assert vocab.decode_tf(tf.constant(ids + [1], tf.int32)).numpy() == (
      vocab.decode(ids).encode("utf-8"))


def test_decode_stops_at_eos_and_maps_unknown_ids():
  vocab = PauseVocabulary(seqio.ByteVocabulary(), pause_id=300)
  ids = vocab.encode("ab") + [300, 280] + vocab.encode("c") + [1] + vocab.encode("d")
  assert vocab.vocab_size == 301
  assert vocab.decode(ids) == "abc"  # 280 (no byte) -> UNK, dropped by bytes


def test_equality_hash_pickle(spm_path):
  byte = PauseVocabulary(seqio.ByteVocabulary())
  assert byte == PauseVocabulary(seqio.ByteVocabulary())
  assert byte == PauseVocabulary(seqio.ByteVocabulary(), pause_id=259)
  assert byte != PauseVocabulary(seqio.ByteVocabulary(), pause_id=260)
  assert byte != seqio.ByteVocabulary()
  assert byte != PauseVocabulary(seqio.SentencePieceVocabulary(spm_path))
  assert len({byte, PauseVocabulary(seqio.ByteVocabulary())}) == 1
  sp = PauseVocabulary(seqio.SentencePieceVocabulary(spm_path))
  sp.encode("the")  # loads the model; pickling must not carry it
  restored = pickle.loads(pickle.dumps(sp))
  assert restored == sp and restored.decode(sp.encode("the")) == "the"
  assert seqio.Feature(byte) == seqio.Feature(
      PauseVocabulary(seqio.ByteVocabulary()))


def test_lazy_base_is_not_opened():
  vocab = PauseVocabulary(seqio.SentencePieceVocabulary("/no/such/file.model"))
  assert vocab == PauseVocabulary(
      seqio.SentencePieceVocabulary("/no/such/file.model"))
  with pytest.raises(Exception):
    _ = vocab.pause_id


def test_works_in_a_task():
  vocab = PauseVocabulary(seqio.ByteVocabulary())
  task = seqio.Task(
      "pause_vocab_test_task",
      source=seqio.FunctionDataSource(
          lambda split, shuffle_files: tf.data.Dataset.from_tensors(
              {"targets": "hi"}), splits=["train"]),
      output_features={"targets": seqio.Feature(vocab)},
      preprocessors=[seqio.preprocessors.tokenize,
                     seqio.preprocessors.append_eos])
  ex = next(task.get_dataset({"targets": 8}, shuffle=False).as_numpy_iterator())
  assert ex["targets"].tolist() == vocab.encode("hi") + [1]


def test_errors_name_the_value():
  with pytest.raises(ValueError, match=r"pause_id=100 is already used.*>= 259"):
    _ = PauseVocabulary(seqio.ByteVocabulary(), pause_id=100).pause_id
  with pytest.raises(ValueError, match=r"pause_id=0 is invalid"):
    PauseVocabulary(seqio.ByteVocabulary(), pause_id=0)
  with pytest.raises(TypeError, match="got 'bytes'"):
    PauseVocabulary("bytes")
  with pytest.raises(TypeError, match="already has a pause id"):
    PauseVocabulary(PauseVocabulary(seqio.ByteVocabulary()))
