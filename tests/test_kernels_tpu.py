"""Splash attention (kernels='tpu') against XLA's attention, in Pallas interpret mode on CPU."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pause_flax import parallel
from pause_flax.model import kernels
from pause_flax.model import transformer as tfm
from pause_flax.model.kernels import tpu as tpu_kernels

TINY = tfm.model_config("tiny")


def test_tpu_resolution():
  bf16 = dataclasses.replace(TINY, dtype="bfloat16")
  resolved = kernels.resolve(bf16, "tpu")
  assert (resolved.kernels, resolved.attention_impl) == ("tpu", "splash")
  assert kernels.get(resolved) is kernels.BACKENDS["tpu"]
  assert kernels.attention_impl(resolved, 256) == "splash"
  # Lengths that are not a multiple of 128, and cached decoding, take XLA's attention.
  assert kernels.attention_impl(resolved, 200) == "xla"
  assert kernels.attention_impl(resolved, 256, cached=True) == "xla"
  assert tpu_kernels.block_len(1024) == 512 and tpu_kernels.block_len(384) == 128


@pytest.mark.parametrize("kv_heads, packed", [(2, True), (4, False)])
def test_splash_attention_equals_dot_product_attention(kv_heads, packed):
  """Causal, grouped-query, packed: forward and gradients equal XLA's."""
  b, l, n, h = 2, 256, 4, 64
  keys = jax.random.split(jax.random.key(0), 4)
  q = jax.random.normal(keys[0], (b, l, n, h))
  k = jax.random.normal(keys[1], (b, l, kv_heads, h))
  v = jax.random.normal(keys[2], (b, l, kv_heads, h))
  probe = jax.random.normal(keys[3], q.shape)
  segment_ids = mask = None
  if packed:  # two documents, then padding (segment 0)
    segment_ids = jnp.array([[1] * 100 + [2] * 156, [1] * 200 + [0] * 56])
    mask = tfm._attention_mask(jnp.arange(l), segment_ids, segment_ids)

  def xla(q, k, v):
    return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True, implementation="xla")

  def splash(q, k, v):
    return tpu_kernels.splash_attention(q, k, v, segment_ids, interpret=True)

  np.testing.assert_allclose(jax.jit(splash)(q, k, v), xla(q, k, v), atol=2e-6, rtol=1e-5)
  grads = [jax.jit(jax.grad(lambda *a: jnp.sum(f(*a) * probe), (0, 1, 2)))(q, k, v)
           for f in (splash, xla)]
  for name, got, want in zip("qkv", *grads):
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5, err_msg=name)


def test_splash_in_the_sharded_model_equals_xla():
  """attention_impl='splash' (interpreted, inside shard_map over batch and heads on a
  data=2 x fsdp=2 x tensor=2 mesh) equals 'xla': logits and every parameter's gradient."""
  cfg = dataclasses.replace(TINY, kernels="xla", num_kv_heads=2)
  splash_cfg = dataclasses.replace(cfg, attention_impl="splash")
  xla_cfg = dataclasses.replace(cfg, attention_impl="xla")
  assert kernels.attention_impl(splash_cfg, 128) == "splash"
  mesh = parallel.make_mesh(data=2, fsdp=2, tensor=2)
  tokens = jax.random.randint(jax.random.key(1), (4, 128), 0, TINY.vocab_size)
  segment_ids = jnp.array([[1] * 60 + [2] * 68, [1] * 128, [1] * 100 + [0] * 28,
                           [1] * 10 + [2] * 10 + [3] * 108])
  probe = jax.random.normal(jax.random.key(5), (4, 128, TINY.padded_vocab_size))

  def loss(model):
    logits = model(tokens, segment_ids_BxL=segment_ids)
    return jnp.sum(logits[..., :TINY.vocab_size] * probe[..., :TINY.vocab_size])

  @nnx.jit
  def run(model):
    with parallel.activation_sharding(mesh):
      return model(tokens, segment_ids_BxL=segment_ids), nnx.grad(loss)(model)

  (logits_s, grads_s), (logits_x, grads_x) = [
      run(tfm.Transformer(c, rngs=nnx.Rngs(0))) for c in (splash_cfg, xla_cfg)]
  np.testing.assert_allclose(logits_s, logits_x, atol=1e-5, rtol=1e-5)
  # Splash's online softmax rounds differently: within 1e-5 of each gradient's largest entry.
  for (path, a), (_, b) in zip(nnx.to_flat_state(grads_s), nnx.to_flat_state(grads_x)):
    np.testing.assert_allclose(a[...], b[...], atol=1e-5 * float(jnp.abs(b[...]).max()),
                               rtol=1e-4, err_msg=str(path))
