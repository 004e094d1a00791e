"""Timing of Trainer.train_step on random batches, shared by the benchmark scripts.

Import it after the script has set XLA_FLAGS / JAX_PLATFORMS: it imports jax.
"""

from __future__ import annotations

import time

import jax
import numpy as np


def tokens_per_second(step, batch_size: int, seq_len: int, *, warmup: int, steps: int,
                      repeats: int, seed: int = 0, packed: int = 0) -> tuple[list[float], dict]:
  """(tokens/s of `repeats` windows of `steps` steps, the last step's metrics).

  The first `warmup` steps (compilation included) are not timed.

  `step` is a pause_flax.training.trainer.Trainer; batches are random ids with
  every target weighted, placed with the trainer's batch sharding. `packed` > 1
  packs that many equal documents into each row (segment ids 1..packed,
  positions restarting at each document), as seqio's packing does.
  """
  tokens = np.random.default_rng(seed).integers(
      0, step.model_config.vocab_size, (batch_size, seq_len + 1), dtype=np.int32)
  batch = {
      'decoder_input_tokens': tokens[:, :-1],
      'decoder_target_tokens': tokens[:, 1:],
      'decoder_loss_weights': np.ones((batch_size, seq_len), np.float32),
  }
  if packed > 1:
    document_L = np.arange(seq_len) * packed // seq_len
    starts = np.searchsorted(document_L, np.arange(packed))
    batch['decoder_segment_ids'] = np.broadcast_to(document_L + 1, (batch_size, seq_len)).astype(
        np.int32)
    batch['decoder_positions'] = np.broadcast_to(
        np.arange(seq_len) - starts[document_L], (batch_size, seq_len)).astype(np.int32)
  batch = jax.device_put(batch, step.batch_sharding)
  state = step.init(0)
  for _ in range(warmup):
    state, metrics = step.train_step(state, batch)
  jax.block_until_ready(state)
  rates = []
  for _ in range(repeats):
    start = time.perf_counter()
    for _ in range(steps):
      state, metrics = step.train_step(state, batch)
    jax.block_until_ready(state)
    rates.append(steps * batch_size * seq_len / (time.perf_counter() - start))
  return rates, jax.device_get(metrics)
