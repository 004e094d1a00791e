"""benchmarks/step_timing.py's packed batches: the segments the GPU benchmark times."""

import dataclasses
import os
import sys

import jax
import numpy as np

from pause_flax import parallel
from pause_flax.model import transformer
from pause_flax.training import optimizer, trainer

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "benchmarks"))
import step_timing  # noqa: E402


def _loss(attention: str, packed: int) -> float:
  config = dataclasses.replace(transformer.model_config("tiny"), max_len=48,
                               attention_impl=attention)
  step = trainer.Trainer(config, optimizer.make_optimizer(1e-2), parallel.make_mesh(
      data=1, fsdp=1, devices=jax.devices()[:1]))
  _, metrics = step_timing.tokens_per_second(step, 2, 48, warmup=1, steps=1, repeats=1,
                                             packed=packed)
  return float(metrics["loss"])


def test_packed_rows_restart_positions_at_each_document():
  seen = {}

  class Step:  # what tokens_per_second reads of a Trainer, recording the batch
    model_config = transformer.model_config("tiny")
    batch_sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])

    def init(self, seed):
      return 0

    def train_step(self, state, batch):
      seen.update(jax.device_get(batch))
      return state, {}

  step_timing.tokens_per_second(Step(), 2, 10, warmup=1, steps=1, repeats=1, packed=3)
  np.testing.assert_array_equal(seen["decoder_segment_ids"][1], [1, 1, 1, 1, 2, 2, 2, 3, 3, 3])
  np.testing.assert_array_equal(seen["decoder_positions"][1], [0, 1, 2, 3, 0, 1, 2, 0, 1, 2])
  seen.clear()
  step_timing.tokens_per_second(Step(), 2, 10, warmup=1, steps=1, repeats=1)
  assert "decoder_segment_ids" not in seen and "decoder_positions" not in seen


def test_packed_step_is_the_same_for_blocked_and_xla_attention_and_differs_unpacked():
  blocked, xla = _loss("blocked", 4), _loss("xla", 4)
  np.testing.assert_allclose(blocked, xla, rtol=1e-5)
  assert abs(_loss("blocked", 0) - blocked) > 1e-4  # the segments are in effect
