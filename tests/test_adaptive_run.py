"""End to end: a Catch Your Breath run trains, checkpoints, and evaluates adaptively."""

import dataclasses

import pytest

from pause_flax import parallel
from pause_flax.evaluation import evaluator
from pause_flax.model import transformer
from pause_flax.training import adaptive
from pause_flax.training import checkpointing
from pause_flax.training import loop

CONFIG = dataclasses.replace(transformer.model_config("tiny"), max_len=64)
LENGTHS = {"inputs": 24, "targets": 8}


@pytest.mark.slow
def test_train_then_evaluate_an_adaptive_run(tmp_path):
  mesh = parallel.make_mesh()
  run = str(tmp_path / "cyb")
  common = dict(model_dir=run, mixture_or_task_name="synthetic_addition",
                task_feature_lengths=LENGTHS, batch_size=8, model_config=CONFIG, mesh=mesh,
                log_every=2, adaptive_pauses=adaptive.AdaptivePauses(max_pauses=2))
  with pytest.raises(ValueError, match="NUM_PAUSES=4"):
    loop.train(train_steps=2, num_pauses=4, **common)
  with pytest.raises(ValueError, match="max_len=64"):
    loop.train(train_steps=2, **{**common, "adaptive_pauses": adaptive.AdaptivePauses(5)})
  rows = loop.train(train_steps=2, **common)
  assert {"expected_pauses", "greedy_pauses", "loss"} <= set(rows[-1])
  _, meta = checkpointing.read_checkpoint_meta(run)
  assert meta["task"] == "synthetic_addition_cyb2" and meta["vocab_size"] == 261
  assert meta["adaptive_pauses"]["max_pauses"] == 2
  results = evaluator.run(run, feature_lengths=LENGTHS, batch_size=8, num_examples=8,
                          mesh=mesh)
  metrics = results["synthetic_addition"][0]
  assert {"exact_match", "pauses_per_token", "tokens_processed_per_answer"} <= set(metrics)
  assert 0 <= metrics["pauses_per_token"] <= 2  # the budget defaults to the trained K
