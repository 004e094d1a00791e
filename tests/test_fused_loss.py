"""The fused output projection + cross-entropy equals the plain logits path."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pause_flax import parallel
from pause_flax.model import transformer
from pause_flax.model.transformer import PAD_LOGIT
from pause_flax.training import loss as loss_lib
from pause_flax.training import optimizer, trainer
from tests.jaxprs import all_eqns

B, L, D, V, VOCAB = 3, 13, 16, 128, 120  # V padded past the real VOCAB


def _inputs(seed: int = 0):
  k = jax.random.split(jax.random.PRNGKey(seed), 4)
  h_BxLxD = jax.random.normal(k[0], (B, L, D))
  head_VxD = 0.5 * jax.random.normal(k[1], (V, D))
  targets_BxL = jax.random.randint(k[2], (B, L), 0, VOCAB)
  # Every other target is the argmax, so the accuracy count is exercised.
  argmax_BxL = jnp.argmax(jnp.einsum("BLD,VD->BLV", h_BxLxD, head_VxD)[..., :VOCAB], axis=-1)
  targets_BxL = jnp.where(jnp.arange(L) % 2 == 0, argmax_BxL, targets_BxL)
  weights_BxL = (jax.random.uniform(k[3], (B, L)) > 0.3).astype(jnp.float32)
  return h_BxLxD, head_VxD, targets_BxL, weights_BxL


def _plain(h_BxLxD, head_VxD, targets_BxL, weights_BxL, z_loss):
  logits_BxLxV = jnp.einsum("BLD,VD->BLV", h_BxLxD, head_VxD)
  logits_BxLxV = jnp.where(jnp.arange(V) < VOCAB, logits_BxLxV, PAD_LOGIT)
  return loss_lib.cross_entropy_sums(logits_BxLxV, targets_BxL, weights_BxL, z_loss)


def _fused(h_BxLxD, head_VxD, targets_BxL, weights_BxL, z_loss, chunk_len, batch_shards=1):
  return loss_lib.fused_cross_entropy_sums(h_BxLxD, head_VxD, targets_BxL, weights_BxL, z_loss,
                                           vocab_size=VOCAB, chunk_len=chunk_len,
                                           batch_shards=batch_shards)


@pytest.mark.parametrize("z_loss", [0.0, 1e-2])
@pytest.mark.parametrize("chunk_len,batch_shards", [(1, 1), (4, 1), (13, 1), (32, 1), (4, 3)])
def test_sums_and_gradients_equal_plain_path(z_loss, chunk_len, batch_shards):
  """Chunk 4 leaves a padded tail chunk; 3 shards group each row alone."""
  h, head, targets, weights = _inputs()
  want = _plain(h, head, targets, weights, z_loss)
  fused = functools.partial(_fused, batch_shards=batch_shards)
  got = jax.jit(fused, static_argnums=(4, 5))(h, head, targets, weights, z_loss, chunk_len)
  for name in loss_lib.LossSums._fields:
    np.testing.assert_allclose(getattr(got, name), getattr(want, name), rtol=1e-5,
                               err_msg=name)
  assert 0 < float(want.correct) < float(want.weight)  # the argmax count is exercised
  argmax_BxL = jnp.argmax(jnp.einsum("BLD,VD->BLV", h, head)[..., :VOCAB], axis=-1)
  assert float(want.correct) == float(jnp.sum(weights * (argmax_BxL == targets)))  # no ties

  grad_plain = jax.grad(lambda *a: _plain(*a, z_loss).loss, (0, 1, 3))
  grad_fused = jax.jit(jax.grad(lambda h, w, t, m: fused(h, w, t, m, z_loss, chunk_len).loss,
                                (0, 1, 3)))
  for name, g, w in zip(("h", "head", "weights"), grad_fused(h, head, targets, weights),
                        grad_plain(h, head, targets, weights)):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6, err_msg=name)


def test_zero_weight_gives_exactly_zero_gradient():
  h, head, targets, weights = _inputs(1)
  grad = jax.grad(lambda h, w: _fused(h, w, targets, weights, 1e-3, 4).loss, (0, 1))
  dh_BxLxD, dhead_VxD = grad(h, head)
  assert np.all(np.asarray(dh_BxLxD)[np.asarray(weights) == 0] == 0)
  assert np.any(np.asarray(dh_BxLxD)[np.asarray(weights) == 1] != 0)
  assert np.all(np.asarray(dhead_VxD)[VOCAB:] == 0)  # padded vocabulary rows
  # No weighted target at all: the gradient vanishes everywhere.
  dh_BxLxD, dhead_VxD = jax.grad(
      lambda h, w: _fused(h, w, targets, jnp.zeros_like(weights), 0.0, 4).loss,
      (0, 1))(h, head)
  assert not np.any(dh_BxLxD) and not np.any(dhead_VxD)


def test_gradient_flows_through_a_transposed_head():
  h, head, targets, weights = _inputs(2)
  matrix_DxV = head.T  # a head held transposed gets its gradient transposed back
  want = jax.grad(lambda m: _plain(h, m.T, targets, weights, 0.0).loss)(matrix_DxV)
  got = jax.grad(lambda m: _fused(h, m.T, targets, weights, 0.0, 5).loss)(matrix_DxV)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


def test_output_matrix_and_its_gradient_are_never_transposed():
  """The products read the [V, D] matrix as stored and d head builds up as [V, D]:
  the only transposes are of the chunked activations (no V axis)."""
  h, head, targets, weights = _inputs(4)
  grad = jax.grad(lambda h, w: _fused(h, w, targets, weights, 1e-3, 4).loss, (0, 1))
  shapes = [tuple(eqn.invars[0].aval.shape)
            for eqn in all_eqns(jax.make_jaxpr(grad)(h, head).jaxpr)
            if eqn.primitive.name == "transpose"]
  assert shapes  # the chunking's own transposes are seen
  assert not [s for s in shapes if V in s], shapes


def test_bfloat16_hidden_states_are_close():
  h, head, targets, weights = _inputs(3)
  h16, head16 = h.astype(jnp.bfloat16), head.astype(jnp.bfloat16)
  want = _plain(h16, head16, targets, weights, 0.0)
  got = _fused(h16, head16, targets, weights, 0.0, 8)
  np.testing.assert_allclose(got.loss, want.loss, rtol=1e-3)
  dh_BxLxD = jax.grad(lambda h: _fused(h, head16, targets, weights, 0.0, 8).loss)(h16)
  assert dh_BxLxD.dtype == jnp.bfloat16


def test_only_the_loss_has_a_gradient():
  h, head, targets, weights = _inputs(4)
  dh_BxLxD = jax.grad(lambda h: _fused(h, head, targets, weights, 0.0, 4).ce)(h)
  assert not np.any(dh_BxLxD)


@pytest.mark.parametrize("bad", [0, -3, "big", 2.5, True])
def test_rejects_bad_chunk_len(bad):
  h, head, targets, weights = _inputs()
  with pytest.raises(ValueError, match="chunk_len"):
    _fused(h, head, targets, weights, 0.0, bad)


def test_auto_chunk_len():
  """'auto' chunks auto_chunk_rows(D) rows of a batch shard; the sums equal a fixed chunk's."""
  rows = loss_lib.AUTO_CHUNK_ROWS
  assert [loss_lib.auto_chunk_rows(d) for d in (16, 256, 257, 384, 512, 768, 2048, 8192)] == [
      rows, rows, 512, 512, 512, 1024, 2048, loss_lib.AUTO_CHUNK_MAX_ROWS]
  assert loss_lib.auto_chunk_len(8, 1, 256, 256) == rows // 8
  assert loss_lib.auto_chunk_len(8, 2, 256, 256) == rows // 4      # per batch shard
  assert loss_lib.auto_chunk_len(4, 1, 512, 384) == 512 // 4       # rows grow with d_model
  assert loss_lib.auto_chunk_len(8, 1, 2048, 2048) == 2048 // 8    # paper_1b per device
  assert loss_lib.auto_chunk_len(1, 1, 100, 64) == 100             # never past the length
  assert loss_lib.auto_chunk_len(4 * rows, 1, 64, 64) == 1         # at least one position
  h, head, targets, weights = _inputs()
  auto = _fused(h, head, targets, weights, 1e-2, "auto")
  fixed = _fused(h, head, targets, weights, 1e-2,
                 loss_lib.auto_chunk_len(B, 1, L, h.shape[-1]))
  for name in loss_lib.LossSums._fields:
    np.testing.assert_array_equal(getattr(auto, name), getattr(fixed, name), err_msg=name)


@pytest.mark.parametrize("bad", [0, "fast", 1.5])
def test_trainer_rejects_bad_loss_chunk_len(bad):
  config = transformer.model_config("tiny")
  mesh = parallel.make_mesh(data=1, fsdp=1, devices=jax.devices()[:1])
  with pytest.raises(ValueError, match=r"StepOptions.loss_chunk_len=.*'auto'"):
    trainer.Trainer(config, optimizer.make_optimizer(1e-2), mesh,
                    options=trainer.StepOptions(loss_chunk_len=bad))


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("data", [1, 2])
def test_trainer_step_equals_plain_logits_path(tie, data):
  config = dataclasses.replace(transformer.model_config("tiny"), vocab_size=250,
                               tie_embeddings=tie, max_len=16)  # padded to 256
  mesh = parallel.make_mesh(data=data, fsdp=1, devices=jax.devices()[:data])
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, 250, (4, 17)).astype(np.int32)
  batch = {"decoder_input_tokens": tokens[:, :-1], "decoder_target_tokens": tokens[:, 1:],
           "decoder_loss_weights": (rng.random((4, 16)) > 0.2).astype(np.float32)}
  results = []
  for chunk_len in (None, 5, "auto"):
    step = trainer.Trainer(
        config, optimizer.make_optimizer(1e-2, eps=1e-3), mesh,
        options=trainer.StepOptions(z_loss=1e-3, loss_chunk_len=chunk_len))
    state = step.init(0)
    for _ in range(2):
      state, metrics = step.train_step(state, jax.device_put(batch, step.batch_sharding))
    results.append((jax.device_get(metrics), jax.device_get(state.params)))
  (metrics_plain, params_plain), *fused = results
  for metrics_fused, params_fused in fused:
    for name in ("loss", "cross_entropy", "z_loss", "accuracy", "grad_norm"):
      np.testing.assert_allclose(metrics_fused[name], metrics_plain[name], rtol=1e-5,
                                 err_msg=name)
    for a, b in zip(jax.tree.leaves(params_plain), jax.tree.leaves(params_fused)):
      np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)


def test_trainer_step_cpu_kernels_equal_xla_kernels():
  """The CPU model kernels under the fused loss: two steps equal kernels='xla''s."""
  config = dataclasses.replace(transformer.model_config("tiny"), vocab_size=250, max_len=16,
                               gated_mlp=True, mlp_activation="silu")
  mesh = parallel.make_mesh(data=1, fsdp=1, devices=jax.devices()[:1])
  rng = np.random.default_rng(1)
  tokens = rng.integers(0, 250, (4, 17)).astype(np.int32)
  batch = {"decoder_input_tokens": tokens[:, :-1], "decoder_target_tokens": tokens[:, 1:],
           "decoder_loss_weights": (rng.random((4, 16)) > 0.2).astype(np.float32)}
  results = {}
  for name in ("cpu", "xla"):
    step = trainer.Trainer(
        dataclasses.replace(config, kernels=name), optimizer.make_optimizer(1e-2, eps=1e-3),
        mesh, options=trainer.StepOptions(z_loss=1e-3, loss_chunk_len=5))
    assert step.model_config.kernels == name
    state = step.init(0)
    for _ in range(2):
      state, metrics = step.train_step(state, jax.device_put(batch, step.batch_sharding))
    results[name] = (jax.device_get(metrics), jax.device_get(state.params))
  (metrics_cpu, params_cpu), (metrics_xla, params_xla) = results["cpu"], results["xla"]
  for name in ("loss", "cross_entropy", "z_loss", "accuracy", "grad_norm"):
    np.testing.assert_allclose(metrics_cpu[name], metrics_xla[name], rtol=1e-5, err_msg=name)
  for a, b in zip(jax.tree.leaves(params_xla), jax.tree.leaves(params_cpu), strict=True):
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)
