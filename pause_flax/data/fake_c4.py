"""An offline stand-in for C4: a TFDS data_dir holding c4/en:3.0.1 and a SentencePiece.

For tests, benchmarks and smoke runs of the C4 Tasks without the real data:

  data_dir = fake_c4.write_c4(tmp, docs)             # tmp/c4/en/3.0.1/...
  spm_path = fake_c4.train_sentencepiece(tmp, docs, vocab_size=1000)
  tasks.register_c4_tasks(data_dir, spm_path)

The dataset has C4's name, version, config and features ('text', 'url'), so
`seqio.TfdsDataSource('c4/en:3.0.1', tfds_data_dir=data_dir)` reads it as it
reads a prepared C4.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import sentencepiece as spm
import tensorflow_datasets as tfds
from tensorflow_datasets.core import registered


def write_c4(data_dir: str, train_docs: Sequence[str],
             validation_docs: Sequence[str] | None = None) -> str:
  """Prepares c4/en:3.0.1 under `data_dir` from documents; returns `data_dir`."""
  splits = {"train": list(train_docs),
            "validation": list(train_docs[:8] if validation_docs is None else validation_docs)}

  with registered.skip_registration():
    class C4(tfds.core.GeneratorBasedBuilder):  # pylint: disable=unused-variable
      VERSION = tfds.core.Version("3.0.1")
      BUILDER_CONFIGS = [tfds.core.BuilderConfig(name="en")]
      code_path = None  # No checksums file to look up next to this code.

      def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
            {"text": tfds.features.Text(), "url": tfds.features.Text()}))

      def _split_generators(self, dl_manager):
        return {name: self._generate_examples(docs) for name, docs in splits.items()}

      def _generate_examples(self, docs):
        for i, text in enumerate(docs):
          yield i, {"text": text, "url": f"https://example.com/{i}"}

    C4(config="en", data_dir=str(data_dir)).download_and_prepare()
  return str(data_dir)


def train_sentencepiece(directory: str, docs: Sequence[str], vocab_size: int,
                        name: str = "spm") -> str:
  """Trains a SentencePiece on `docs` (T5's special ids: pad 0, EOS 1, UNK 2).

  Returns the .model path. `vocab_size` is a soft limit: a small corpus may
  give fewer pieces.
  """
  corpus = os.path.join(directory, f"{name}_corpus.txt")
  with open(corpus, "w", encoding="utf-8") as f:
    f.write("\n".join(docs))
  prefix = os.path.join(directory, name)
  spm.SentencePieceTrainer.train(
      input=corpus, model_prefix=prefix, vocab_size=vocab_size, pad_id=0, eos_id=1,
      unk_id=2, bos_id=-1, hard_vocab_limit=False, minloglevel=2)
  return prefix + ".model"
