"""Offline Tasks over an imported model's own tokenizer (for finetuning demos and tests).

`imported_synthetic_task` registers one synthetic downstream task (addition,
digit_sum, pointer; pause_flax.data.synthetic) tokenized with the imported
model's tokenizer.json, as a standard Task: a run's NUM_PAUSES turns it into
the pause variant (PauseVocabulary over HfTokenizerVocabulary). Your own Tasks
do the same with `hf_vocab.imported_vocabulary(path)` as their vocabulary.
"""

from __future__ import annotations

import gin
import seqio

from pause_flax import hf_vocab
from pause_flax.data import tasks


def register_synthetic_task(vocabulary: seqio.Vocabulary, task: str = "addition",
                            name: str | None = None) -> str:
  """Registers synthetic `task` over `vocabulary` (replacing any earlier one); its name."""
  return tasks.register_synthetic_downstream_task(name or f"hf_synthetic_{task}", task,
                                                  vocabulary)


@gin.configurable
def imported_synthetic_task(imported: str, task: str = "addition") -> str:
  """Registers synthetic `task` with the tokenizer of the import in `imported`; its name."""
  return register_synthetic_task(hf_vocab.imported_vocabulary(imported), task)
