"""The evaluator on an adaptive-pause model: adaptive decoding and its pause metrics."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
import seqio
from flax import nnx

from pause_flax import parallel
from pause_flax.data import tasks
from pause_flax.evaluation import evaluator as ev_lib
from pause_flax.model import transformer

PAUSE, ASK = 259, 260  # ByteVocabulary + <pause> + ask
CONFIG = dataclasses.replace(transformer.model_config("tiny"), vocab_size=ASK + 1, max_len=128)
N, T = 8, 6


class AlwaysAsk(nnx.Module):
  """A Transformer whose ask class always wins: every token gets the whole budget."""

  def __init__(self, inner):
    self.inner = inner
    self.config = inner.config

  def __call__(self, tokens_BxL, *, positions_BxL=None, segment_ids_BxL=None, cache=None):
    out = self.inner(tokens_BxL, positions_BxL=positions_BxL, segment_ids_BxL=segment_ids_BxL,
                     cache=cache)
    logits = out[0] if cache is not None else out
    logits = logits.at[..., ASK].set(1e4)
    return (logits, out[1]) if cache is not None else logits


def test_adaptive_model_is_decoded_adaptively_and_its_pauses_reported():
  mesh = parallel.make_mesh()
  inner = transformer.Transformer(CONFIG, rngs=nnx.Rngs(2))
  budget = 2
  ev = ev_lib.Evaluator("synthetic_addition",
                        batch_size=8, mesh=mesh, num_examples=N,
                        decode=ev_lib.DecodeOptions(max_new_tokens=T,
                                                    max_pauses_per_token=budget))
  result = ev.evaluate(AlwaysAsk(inner), 0)["synthetic_addition"]
  assert result.metrics["pauses_per_token"] == budget
  eos = seqio.ByteVocabulary().eos_id
  lengths = [len(r["pauses_per_token"]) for r in result.records]
  assert all(p == [budget] * n for p, n in zip((r["pauses_per_token"] for r in result.records),
                                               lengths))
  assert result.metrics["pauses_per_answer"] == budget * np.mean(lengths)
  # Each answer token is the best non-pause, non-ask token after `budget` pauses: replayed
  # here with full forward passes of the inner model.
  vocab = seqio.ByteVocabulary()
  forward = nnx.jit(lambda m, x: m(x))
  for record in result.records[:3]:
    seq = [ev_lib.BOS_ID, *vocab.encode(record["inputs"])]
    answer = []
    while len(answer) < T and (not answer or answer[-1] != eos):
      seq += [PAUSE] * budget
      padded = np.zeros((1, CONFIG.max_len), np.int32)  # causal: the padding after is unread
      padded[0, :len(seq)] = seq
      logits = np.array(forward(inner, jnp.asarray(padded))[0, len(seq) - 1])
      logits[[PAUSE, ASK]] = -np.inf
      answer.append(int(np.argmax(logits)))
      seq.append(answer[-1])
    assert record["prediction"] == vocab.decode(answer)
    assert len(record["pauses_per_token"]) == len(answer)
  tasks.adaptive_variant("synthetic_addition", max_pauses=2)
  assert ev_lib.standard_task("synthetic_addition_cyb2")[0] == "synthetic_addition"
  no_budget = ev_lib.Evaluator("synthetic_addition", batch_size=8, mesh=mesh, num_examples=N)
  with pytest.raises(ValueError, match="max_pauses_per_token"):
    no_budget.evaluate(inner, 0)


def test_adaptive_metrics_by_hand():
  metrics = ev_lib.adaptive_metrics({0: [0, 2, 1], 1: [3]}, {0: [0, 5, 6], 1: [0, 7]})
  assert metrics == {"pauses_per_token": 6 / 4, "pauses_per_answer": 3.0,
                     "tokens_processed_per_answer": ((3 + 3 + 3) + (2 + 1 + 3)) / 2}
