"""Trainer: loss mask, sharded == unsharded, accumulation, overfitting."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from pause_flax import parallel
from pause_flax.model import transformer
from pause_flax.training import loss as loss_lib
from pause_flax.training import optimizer as optimizer_lib
from pause_flax.training import trainer as trainer_lib

PAUSE = 299
CONFIG = dataclasses.replace(transformer.model_config("tiny"), vocab_size=300, max_len=32)


def mean_loss(sums: loss_lib.LossSums) -> jax.Array:
  """sum(w * CE) / sum(w), as the train step reports it."""
  return sums.loss / jnp.maximum(sums.weight, 1e-8)


def make_batch(batch_size=8, length=16, seed=0, pause_rate=0.15):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(3, 250, size=(batch_size, length + 1)).astype(np.int32)
  tokens[rng.random(tokens.shape) < pause_rate] = PAUSE
  inputs, targets = tokens[:, :-1], tokens[:, 1:].copy()
  targets[:, -3:] = 0   # padding at the end
  inputs[:, -2:] = 0
  weights = ((targets != PAUSE) & (targets != 0)).astype(np.float32)
  return {"decoder_input_tokens": inputs, "decoder_target_tokens": targets,
          "decoder_loss_weights": weights}


def make_trainer(mesh, accum_steps=1, lr=1e-2, eps=1e-8):
  tx = optimizer_lib.make_optimizer(lr, weight_decay=0.0, clip_norm=None, eps=eps)
  return trainer_lib.Trainer(CONFIG, tx, mesh,
                             options=trainer_lib.StepOptions(accum_steps=accum_steps,
                                                             pause_id=PAUSE))


def global_batch(trainer, batch):
  return {k: jax.device_put(v, trainer.batch_sharding) for k, v in batch.items()}


def test_gradient_is_exactly_zero_at_pause_targets_and_padding():
  batch = make_batch()
  mesh = parallel.make_mesh(devices=jax.devices()[:1])
  trainer = make_trainer(mesh)
  state = trainer.init(0)
  model = trainer.model(state.params)
  logits = model(jnp.asarray(batch["decoder_input_tokens"]))

  def loss_of_logits(lg):
    return mean_loss(loss_lib.cross_entropy_sums(
        lg, jnp.asarray(batch["decoder_target_tokens"]),
        jnp.asarray(batch["decoder_loss_weights"]), z_loss=1e-4))

  g = np.asarray(jax.grad(loss_of_logits)(logits))
  masked = batch["decoder_loss_weights"] == 0
  assert masked.sum() > 0 and (batch["decoder_target_tokens"] == PAUSE).sum() > 0
  assert np.all(g[masked] == 0.0), "a pause/padding target got a gradient"
  assert np.all(np.abs(g[~masked]).sum(-1) > 0), "a real target got no gradient"


def test_loss_is_weighted_mean_of_cross_entropy():
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(2, 5, 7)).astype(np.float32)
  targets = rng.integers(0, 7, size=(2, 5))
  weights = (rng.random((2, 5)) > 0.4).astype(np.float32)
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  ce = -np.take_along_axis(logp, targets[..., None], -1)[..., 0]
  expected = (ce * weights).sum() / weights.sum()
  got = mean_loss(loss_lib.cross_entropy_sums(logits, targets, weights))
  np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_sharded_step_equals_single_device_step():
  # Adam divides by sqrt(v) + eps: with a tiny eps it turns float reduction-order
  # noise of near-zero gradients into full-size updates. eps=1e-3 keeps the
  # comparison about the sharded computation, not that amplification.
  batch = make_batch()
  results = []
  for mesh in (parallel.make_mesh(devices=jax.devices()[:1]),
               parallel.make_mesh(data=2, fsdp=2, tensor=2)):
    trainer = make_trainer(mesh, eps=1e-3)
    state = trainer.init(0)
    for _ in range(2):
      state, metrics = trainer.train_step(state, global_batch(trainer, batch))
    results.append((float(metrics["loss"]), jax.device_get(state.params)))
  (loss1, params1), (loss8, params8) = results
  np.testing.assert_allclose(loss8, loss1, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(params1), jax.tree.leaves(params8)):
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)


def test_params_are_created_sharded():
  mesh = parallel.make_mesh(data=2, fsdp=2, tensor=2)
  trainer = make_trainer(mesh)
  state = trainer.init(0)
  specs = {str(x.sharding.spec) for x in jax.tree.leaves(state.params)}
  assert any("fsdp" in s for s in specs) and any("tensor" in s for s in specs), specs
  leaves = jax.tree.leaves(state.opt_state)
  assert any("fsdp" in str(x.sharding.spec) for x in leaves if x.ndim >= 2)


def test_gradient_accumulation_matches_full_batch():
  batch = make_batch()
  mesh = parallel.make_mesh(data=2, fsdp=1, tensor=1, devices=jax.devices()[:2])
  out = []
  for accum in (1, 2):
    trainer = make_trainer(mesh, accum_steps=accum, eps=1e-3)
    state = trainer.init(0)
    state, metrics = trainer.train_step(state, global_batch(trainer, batch))
    out.append((float(metrics["loss"]), jax.device_get(state.params)))
  np.testing.assert_allclose(out[1][0], out[0][0], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(out[0][1]), jax.tree.leaves(out[1][1])):
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)


def test_metrics_count_pause_inputs_and_weights():
  batch = make_batch()
  mesh = parallel.make_mesh(devices=jax.devices()[:1])
  trainer = make_trainer(mesh)
  _, metrics = trainer.train_step(trainer.init(0), global_batch(trainer, batch))
  assert metrics["pause_inputs"] == (batch["decoder_input_tokens"] == PAUSE).sum()
  assert metrics["weighted_tokens"] == batch["decoder_loss_weights"].sum()
  assert metrics["finite"] == 1.0


def test_tiny_model_overfits_a_fixed_batch():
  batch = make_batch(batch_size=4)
  mesh = parallel.make_mesh(devices=jax.devices()[:1])
  trainer = make_trainer(mesh, lr=1e-2)
  state = trainer.init(0)
  gb = global_batch(trainer, batch)
  first = None
  for _ in range(150):
    state, metrics = trainer.train_step(state, gb)
    first = float(metrics["loss"]) if first is None else first
  assert first > 4.0
  assert float(metrics["loss"]) < 0.2, float(metrics["loss"])
  assert float(metrics["accuracy"]) > 0.95


@pytest.mark.parametrize("decay", optimizer_lib.DECAYS)
def test_schedules_warm_up_then_decay(decay):
  sched = optimizer_lib.make_schedule(1.0, total_steps=100, warmup_steps=10, decay=decay,
                                      end_learning_rate_fraction=0.1)
  assert float(sched(0)) == 0.0
  np.testing.assert_allclose(float(sched(10)), 1.0, rtol=1e-6)
  if decay != "constant":
    assert 0.1 - 1e-6 <= float(sched(100)) < float(sched(50)) < 1.0


def test_weight_decay_skips_vectors():
  params = {"w": jnp.ones((3, 3)), "scale": jnp.ones((3,))}
  # Zero gradients: only weight decay can move a parameter.
  tx = optimizer_lib.make_optimizer(1.0, weight_decay=0.5, clip_norm=None)
  updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
  assert float(jnp.abs(updates["w"]).sum()) > 0
  assert float(jnp.abs(updates["scale"]).sum()) == 0


def test_bad_optimizer_settings_raise():
  with pytest.raises(ValueError, match="decay='poly'"):
    optimizer_lib.make_schedule(1.0, 10, decay="poly")
  with pytest.raises(ValueError, match="WARMUP_STEPS=20"):
    optimizer_lib.make_schedule(1.0, 10, warmup_steps=20)
  with pytest.raises(ValueError, match="clip_norm=0"):
    optimizer_lib.make_optimizer(1.0, clip_norm=0)


def test_trainer_resolves_kernels_for_its_mesh():
  mesh = parallel.make_mesh(devices=jax.devices()[:1])
  platform = mesh.devices.flat[0].platform
  assert make_trainer(mesh).model_config.kernels == ("cpu" if platform == "cpu" else "xla")
  tx = optimizer_lib.make_optimizer(1e-2)
  explicit = trainer_lib.Trainer(dataclasses.replace(CONFIG, kernels="xla"), tx, mesh)
  assert (explicit.model_config.kernels, explicit.model_config.attention_impl) == ("xla", "xla")
