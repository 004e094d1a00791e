"""Tests for pause_flax.model.transformer, configs and kernels (fast paths against plain ones)."""

import dataclasses
import functools
import pathlib

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pause_flax import parallel
from pause_flax.model import kernels
from pause_flax.model import transformer as tfm
from pause_flax.model.kernels import cpu as cpu_kernels
from tests.jaxprs import all_eqns

TINY = tfm.model_config("tiny")
LOGICAL = {"batch", "length", "embed", "heads", "kv", "mlp", "vocab", "layers"}


def _tokens(shape, seed=0, vocab=TINY.vocab_size):
  return jax.random.randint(jax.random.key(seed), shape, 0, vocab)


@pytest.fixture(scope="module")
def model():
  return tfm.Transformer(TINY, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def forward():
  return nnx.jit(lambda m, t, **kw: m(t, **kw))


def test_shapes_and_dtypes(model, forward):
  logits = forward(model, _tokens((2, 8)))
  assert logits.shape == (2, 8, TINY.padded_vocab_size)
  assert TINY.padded_vocab_size % 128 == 0 and TINY.padded_vocab_size >= TINY.vocab_size
  assert logits.dtype == jnp.float32
  h = model.hidden(_tokens((2, 8)))
  assert h.shape == (2, 8, TINY.d_model)

  cfg = dataclasses.replace(TINY, dtype="bfloat16")
  m16 = tfm.Transformer(cfg, rngs=nnx.Rngs(0))
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(m16, nnx.Param)))
  assert m16.hidden(_tokens((2, 8))).dtype == jnp.bfloat16
  assert m16(_tokens((2, 8))).dtype == jnp.float32


def test_causal(model, forward):
  tokens = _tokens((2, 10))
  t = 6
  changed = tokens.at[:, t].set((tokens[:, t] + 1) % TINY.vocab_size)
  a, b = forward(model, tokens), forward(model, changed)
  np.testing.assert_array_equal(a[:, :t], b[:, :t])
  assert np.abs(a[:, t:] - b[:, t:]).max() > 1e-4


def test_packing_matches_separate_rows(model, forward):
  seg1, seg2 = _tokens((1, 3), seed=1), _tokens((1, 4), seed=2)
  packed = jnp.concatenate([seg1, seg2, jnp.zeros((1, 1), jnp.int32)], axis=1)
  segment_ids = jnp.array([[1, 1, 1, 2, 2, 2, 2, 0]])
  positions = jnp.array([[0, 1, 2, 0, 1, 2, 3, 0]])
  out = forward(model, packed, positions_BxL=positions, segment_ids_BxL=segment_ids)
  np.testing.assert_allclose(out[:, :3], forward(model, seg1), atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(out[:, 3:7], forward(model, seg2), atol=1e-5, rtol=1e-5)


def test_causal_flag_equals_explicit_mask(model, forward):
  # No segment ids: causality comes from is_causal alone; one segment: from the mask too.
  tokens = _tokens((2, 9))
  np.testing.assert_allclose(
      forward(model, tokens), forward(model, tokens, segment_ids_BxL=jnp.ones((2, 9), jnp.int32)),
      atol=1e-6, rtol=1e-6)


def _resolved(config, platform):
  r = kernels.resolve(config, platform)
  return r.kernels, r.attention_impl


def test_kernels_resolution():
  bf16 = dataclasses.replace(TINY, dtype="bfloat16")
  assert _resolved(bf16, "gpu") == ("xla", "cudnn")
  assert _resolved(bf16, "cpu") == ("cpu", "blocked")
  assert _resolved(TINY, "cpu") == ("cpu", "blocked")
  assert _resolved(bf16, "tpu") == ("tpu", "splash")
  assert _resolved(TINY, "gpu") == ("xla", "xla")  # float32
  assert _resolved(dataclasses.replace(bf16, head_dim=256), "gpu") == ("xla", "xla")
  # Explicit settings are kept: the accelerator's program on CPU, CPU kernels anywhere.
  assert _resolved(dataclasses.replace(TINY, kernels="xla"), "cpu") == ("xla", "xla")
  assert _resolved(dataclasses.replace(bf16, kernels="cpu"), "gpu") == ("cpu", "blocked")
  assert _resolved(dataclasses.replace(bf16, attention_impl="xla"), "gpu") == ("xla", "xla")
  assert _resolved(dataclasses.replace(TINY, attention_impl="cudnn"), "cpu") == ("cpu", "cudnn")
  assert _resolved(dataclasses.replace(TINY, attention_impl="blocked"), "tpu") == ("tpu", "blocked")
  resolved = kernels.resolve(bf16, "gpu")
  assert kernels.resolve(resolved, "cpu") == resolved  # resolving twice changes nothing
  # cuDNN's training kernels take even lengths only; decoding with a cache is always xla.
  assert kernels.attention_impl(resolved, 37) == "xla"
  assert kernels.attention_impl(resolved, 38) == "cudnn"
  assert kernels.attention_impl(resolved, 38, cached=True) == "xla"
  # Unresolved 'auto' runs the plain layers.
  assert kernels.get(TINY) is kernels.BACKENDS["xla"]
  assert kernels.attention_impl(TINY, 38) == "xla"


def test_kernels_resolve_from_the_mesh_platform():
  mesh = parallel.make_mesh(data=2, fsdp=1, devices=jax.devices()[:2])
  assert kernels.platform(mesh) == jax.devices()[0].platform
  assert kernels.resolve(TINY, kernels.platform(mesh)).kernels == (
      {"cpu": "cpu", "tpu": "tpu"}.get(kernels.platform(mesh), "xla"))


def test_no_default_backend_choices_in_the_model():
  """Kernels follow the resolved setting, not the process's default backend."""
  root = pathlib.Path(__file__).parents[1] / "pause_flax"
  files = [*(root / "model").rglob("*.py"), root / "training" / "loss.py"]
  assert len(files) > 5
  for path in files:
    assert "default_backend" not in path.read_text(), path


@pytest.mark.parametrize("length, block_len, kv_heads, packed", [
    (37, 16, 2, False),   # odd length: a ragged last block; grouped-query heads
    (37, 16, 4, True),    # packed segments narrow the causal mask
    (64, None, 1, True),  # the default block (64) is the whole sequence; multi-query
    (300, None, 4, False),  # default: 8 blocks of 38, the last ragged
])
def test_blocked_attention_equals_dot_product_attention(length, block_len, kv_heads, packed):
  """Forward and gradients equal jax.nn.dot_product_attention's (XLA) to float32 rounding."""
  keys = jax.random.split(jax.random.key(0), 4)
  q = jax.random.normal(keys[0], (2, length, 4, 16))
  k = jax.random.normal(keys[1], (2, length, kv_heads, 16))
  v = jax.random.normal(keys[2], (2, length, kv_heads, 16))
  mask = segment_ids = None
  if packed:
    segment_ids = jnp.array([[1] * 20 + [2] * (length - 20), [1] * (length - 5) + [0] * 5])
    mask = tfm._attention_mask(jnp.arange(length), segment_ids, segment_ids)
  probe = jax.random.normal(keys[3], q.shape)

  def xla(q, k, v):
    return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True, implementation="xla")

  def blocked(q, k, v):
    return kernels.blocked_causal_attention(q, k, v, segment_ids, block_len=block_len)

  np.testing.assert_allclose(blocked(q, k, v), xla(q, k, v), atol=2e-6, rtol=1e-5)
  grads = [jax.grad(lambda *a: jnp.sum(f(*a) * probe), (0, 1, 2))(q, k, v)
           for f in (blocked, xla)]
  for name, got, want in zip("qkv", *grads):
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5, err_msg=name)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cpu_rotate_equals_plain_rotation(dtype):
  """kernels.cpu.rotate (the half swap as a matmul) equals the split-and-concatenate
  rotation: values and gradients, to float32 rounding."""
  keys = jax.random.split(jax.random.key(3), 3)
  x = jax.random.normal(keys[0], (2, 11, 3, 16)).astype(dtype)
  positions = jax.random.randint(keys[1], (2, 11), 0, 500)
  angles = tfm.rope_sin_cos(positions, 16, 10000.0)
  probe = jax.random.normal(keys[2], x.shape)
  tol = dict(atol=1e-6, rtol=1e-6) if dtype == "float32" else dict(atol=1e-2, rtol=1e-2)
  got, want = kernels.cpu.rotate(x, *angles), tfm.rotate(x, *angles)
  assert got.dtype == want.dtype == jnp.dtype(dtype)
  np.testing.assert_allclose(got.astype(jnp.float32), want.astype(jnp.float32), **tol)
  grads = [jax.grad(lambda y, f=f: jnp.sum(f(y, *angles).astype(jnp.float32) * probe))(x)
           for f in (kernels.cpu.rotate, tfm.rotate)]
  np.testing.assert_allclose(grads[0].astype(jnp.float32), grads[1].astype(jnp.float32), **tol)
  np.testing.assert_allclose(tfm.apply_rope(x, positions, 10000.0).astype(jnp.float32),
                             want.astype(jnp.float32))


@pytest.mark.parametrize("gated, packed", [(True, False), (False, True)])
def test_cpu_kernels_equal_xla_kernels_in_the_model(gated, packed):
  """The whole CPU path (blocked attention, recomputing MLP, delayed embedding
  gradient) equals the plain layers: logits and every parameter's gradient."""
  cfg = dataclasses.replace(TINY, gated_mlp=gated, mlp_activation="silu" if gated else "gelu")
  cpu = kernels.resolve(dataclasses.replace(cfg, kernels="cpu"), "cpu")
  xla = kernels.resolve(dataclasses.replace(cfg, kernels="xla"), "cpu")
  assert (cpu.kernels, cpu.attention_impl, xla.kernels, xla.attention_impl) == \
      ("cpu", "blocked", "xla", "xla")
  tokens = _tokens((2, 70))
  kwargs = {}
  if packed:
    kwargs["segment_ids_BxL"] = jnp.array([[1] * 30 + [2] * 40, [1] * 65 + [0] * 5])
  probe = jax.random.normal(jax.random.key(5), (2, 70, TINY.padded_vocab_size))

  def loss(model):
    return jnp.sum(model(tokens, **kwargs)[..., :TINY.vocab_size] * probe[..., :TINY.vocab_size])

  results = []
  for c in (cpu, xla):
    model = tfm.Transformer(c, rngs=nnx.Rngs(0))
    results.append((model(tokens, **kwargs), nnx.grad(loss)(model)))
  (logits_cpu, grads_cpu), (logits_xla, grads_xla) = results
  np.testing.assert_allclose(logits_cpu, logits_xla, atol=1e-5, rtol=1e-5)
  grads_cpu, grads_xla = nnx.to_flat_state(grads_cpu), nnx.to_flat_state(grads_xla)
  assert [p for p, _ in grads_cpu] == [p for p, _ in grads_xla]
  for (path, a), (_, b) in zip(grads_cpu, grads_xla):
    # Summation order differs between the kernels: an element that is a small
    # difference of large terms is off by float32 rounding of those terms, so the
    # absolute tolerance scales with the gradient's largest entry (~30 here).
    atol = 1e-6 * max(1.0, float(np.max(np.abs(b[...]))))
    np.testing.assert_allclose(a[...], b[...], atol=atol, rtol=1e-4, err_msg=str(path))
  # Same parameters whatever the kernels: a checkpoint moves between backends.
  shapes = lambda c: jax.tree.map(lambda x: (x.shape, x.dtype), nnx.to_pure_dict(
      nnx.state(nnx.eval_shape(lambda: tfm.Transformer(c, rngs=nnx.Rngs(0))))))
  assert shapes(cpu) == shapes(xla)


def test_packed_segments_form_no_dense_mask_under_blocked_attention():
  """Blocked attention builds each block's mask from the segment ids: neither the
  forward nor the gradient holds an [L, L] array; XLA attention (the control) does."""
  length = 140  # default blocks of 64: no block is the whole sequence
  tokens = _tokens((2, length))
  segment_ids = jnp.array([[1] * 60 + [2] * 80, [1] * 130 + [0] * 10])
  found = {}
  for impl in ("blocked", "xla"):
    c = kernels.resolve(dataclasses.replace(TINY, max_len=length, attention_impl=impl), "cpu")
    model = tfm.Transformer(c, rngs=nnx.Rngs(0))
    loss = lambda m: jnp.sum(m(tokens, segment_ids_BxL=segment_ids)[..., :TINY.vocab_size])
    shapes = {tuple(getattr(v.aval, "shape", ()))
              for eqn in all_eqns(jax.make_jaxpr(nnx.grad(loss))(model).jaxpr)
              for v in eqn.outvars}
    found[impl] = [s for s in shapes if s[-2:] == (length, length)]
  assert found["xla"], "the control should hold the dense [B, 1, L, L] mask"
  assert not found["blocked"], found["blocked"]


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN attention needs an NVIDIA GPU")
@pytest.mark.parametrize("length, packed", [(64, False), (37, False), (38, True), (37, True)])
def test_cudnn_attention_matches_xla(length, packed):
  """'auto' (cuDNN, or XLA at odd lengths) equals 'xla', forward and gradient."""
  cfg = kernels.resolve(dataclasses.replace(TINY, dtype="bfloat16", d_model=128, num_heads=2),
                        "gpu")
  assert kernels.attention_impl(cfg, length) == ("xla" if length % 2 else "cudnn")
  xla = tfm.Transformer(dataclasses.replace(cfg, attention_impl="xla"), rngs=nnx.Rngs(0))
  cudnn = tfm.Transformer(cfg, rngs=nnx.Rngs(0))
  tokens = _tokens((2, length))
  kwargs = {}
  if packed:  # two documents and padding per row
    rows = [(20, 12), (30, length - 30)]
    segment_ids = jnp.array([[1] * a + [2] * b + [0] * (length - a - b) for a, b in rows])
    kwargs = dict(segment_ids_BxL=segment_ids,
                  positions_BxL=jnp.array([list(range(a)) + list(range(length - a))
                                           for a, _ in rows]))
  # Padding attends among itself; compare real tokens (forward and gradient).
  real = (segment_ids > 0)[..., None] if packed else jnp.ones((2, length, 1))
  probe = jax.random.normal(jax.random.key(1), (2, length, cfg.d_model)) * real

  def loss(model):
    return jnp.sum(model.hidden(tokens, **kwargs).astype(jnp.float32) * probe)

  def rel(a, b):
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(a))

  a = xla.hidden(tokens, **kwargs).astype(jnp.float32) * real
  b = cudnn.hidden(tokens, **kwargs).astype(jnp.float32) * real
  assert rel(a, b) < 1e-2
  grads_a = jax.tree.leaves(nnx.grad(loss)(xla))
  grads_b = jax.tree.leaves(nnx.grad(loss)(cudnn))
  assert len(grads_a) == len(grads_b) > 0
  for ga, gb in zip(grads_a, grads_b):  # (the unused output head's gradient is zero in both)
    assert float(jnp.linalg.norm(ga - gb)) <= 2e-2 * float(jnp.linalg.norm(ga)) + 1e-6


def _plain_mlp(activation, x, wi, wg, wo):
  """The plain layer's MLP (tfm.Mlp with kernels='xla')."""
  h = activation(x @ wi)
  return (h if wg is None else h * (x @ wg)) @ wo


def test_plain_mlp_is_the_model_layer():
  cfg = dataclasses.replace(TINY, kernels="xla", gated_mlp=True, mlp_activation="silu")
  mlp = tfm.Mlp(cfg, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(0), (2, 5, cfg.d_model))
  np.testing.assert_allclose(
      mlp(x), _plain_mlp(jax.nn.silu, x, mlp.wi_DxF[...], mlp.wg_DxF[...], mlp.wo_FxD[...]),
      rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("activation,gated", [("silu", True), ("gelu", False)])
def test_cpu_mlp_equals_plain_mlp(dtype, activation, gated):
  """The CPU MLP (hidden layer recomputed in the backward) = the plain one, values and VJP."""
  act = tfm._ACTIVATIONS[activation]
  kx, ki, kg, ko, kd = jax.random.split(jax.random.key(3), 5)
  x = jax.random.normal(kx, (2, 5, 16), dtype)
  wi = jax.random.normal(ki, (16, 48), dtype) / 4
  wg = jax.random.normal(kg, (16, 48), dtype) / 4 if gated else None
  wo = jax.random.normal(ko, (48, 16), dtype) / 7
  dy = jax.random.normal(kd, (2, 5, 16), dtype)
  mlp = functools.partial(cpu_kernels.mlp, act)
  np.testing.assert_array_equal(mlp(x, wi, wg, wo), _plain_mlp(act, x, wi, wg, wo))
  got = jax.jit(lambda *a: jax.vjp(mlp, *a)[1](dy))(x, wi, wg, wo)
  want = jax.vjp(functools.partial(_plain_mlp, act), x, wi, wg, wo)[1](dy)
  assert (got[2] is None) == (want[2] is None) == (not gated)
  for g, r in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    assert g.dtype == r.dtype and g.shape == r.shape
    g, r = np.asarray(g, np.float32), np.asarray(r, np.float32)
    if dtype == "float32":
      np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5)
    else:
      # bfloat16 sums are rounded at the scale of their largest terms, and a compiler may
      # order them differently (jax 0.12's does): a gradient near 0 can differ by a couple
      # of bf16 steps (2**-7 relative) of the leaf's largest value.
      np.testing.assert_allclose(g, r, rtol=2e-2, atol=2 * 2.0**-7 * np.abs(r).max())


def _grad_temp_bytes(f, *args) -> int:
  argnums = tuple(range(len(args) - 1))  # the last argument is not differentiated
  return jax.jit(jax.grad(f, argnums)).lower(*args).compile().memory_analysis().temp_size_in_bytes


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="an XLA:CPU scheduling property")
def test_cpu_mlp_keeps_fewer_buffers_for_the_backward():
  """Two stacked MLPs: the first one's saved hidden layers live through the
  second's forward and backward; recomputing keeps >= 3 fewer [B*L, F] there."""
  x = jnp.ones((4, 128, 64))
  p = (jnp.ones((64, 256)), jnp.ones((64, 256)), jnp.ones((256, 64)))

  def temp(mlp):
    return _grad_temp_bytes(lambda x, p1, p2, _: jnp.sum(mlp(mlp(x, *p1), *p2) ** 2),
                            x, p, p, 0)

  plain = temp(functools.partial(_plain_mlp, jax.nn.silu))
  recomputing = temp(functools.partial(cpu_kernels.mlp, jax.nn.silu))
  hidden_bytes = 4 * 128 * 256 * 4
  assert recomputing <= plain - 3 * hidden_bytes, (plain, recomputing)


def test_cpu_embed_lookup_gradient_equals_take():
  table = jax.random.normal(jax.random.key(0), (50, 8))
  tokens = jnp.array([[3, 7, 3, 49], [0, 7, 7, 12]])
  dx = jax.random.normal(jax.random.key(1), (2, 4, 8))
  np.testing.assert_array_equal(cpu_kernels.embed_lookup(table, tokens),
                                jnp.take(table, tokens, axis=0))
  got = jax.vjp(lambda t: cpu_kernels.embed_lookup(t, tokens), table)[1](dx)[0]
  want = jax.vjp(lambda t: jnp.take(t, tokens, axis=0), table)[1](dx)[0]
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
  assert float(jnp.abs(got[jnp.array([1, 2, 4])]).max()) == 0.0  # rows no token reads


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="an XLA:CPU scheduling property")
def test_cpu_embed_lookup_gradient_fill_is_not_live_through_the_forward():
  """The [V, D] gradient's zero fill waits for d x, so its memory reuses the
  layers' freed buffers instead of adding to the peak."""
  table, w = jnp.ones((4096, 64)), jnp.ones((64, 512))
  tokens = jnp.zeros((4, 128), jnp.int32)

  def temp(lookup):
    def f(table, w, tokens):
      x = lookup(table, tokens)
      for _ in range(3):
        x = jnp.tanh(x @ w) @ w.T
      return jnp.sum(x ** 2)
    return _grad_temp_bytes(f, table, w, tokens)

  plain = temp(lambda t, i: jnp.take(t, i, axis=0))
  delayed = temp(cpu_kernels.embed_lookup)
  assert delayed <= plain - 0.9 * table.nbytes, (plain, delayed)


def test_grouped_query_attention_equals_repeated_kv_heads():
  gqa_cfg = dataclasses.replace(TINY, num_kv_heads=2)
  gqa = tfm.Transformer(gqa_cfg, rngs=nnx.Rngs(1))
  assert gqa.blocks.attn.k_DxKxH.shape == (TINY.num_layers, TINY.d_model, 2, 16)
  assert tfm.num_params(gqa_cfg) < tfm.num_params(TINY)
  # The same weights with each k/v head repeated for its group of query heads.
  pure = nnx.to_pure_dict(nnx.state(gqa))
  for name in ("k_DxKxH", "v_DxKxH"):
    pure["blocks"]["attn"][name] = jnp.repeat(pure["blocks"]["attn"][name], 2, axis=2)
  mha = tfm.Transformer(TINY, rngs=nnx.Rngs(2))
  mha_state = nnx.state(mha)
  nnx.replace_by_pure_dict(mha_state, pure)
  nnx.update(mha, mha_state)
  tokens = _tokens((2, 7))
  np.testing.assert_allclose(gqa(tokens), mha(tokens), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("tie", [False, True])
def test_padded_vocab_never_wins(tie):
  cfg = dataclasses.replace(TINY, tie_embeddings=tie)
  m = tfm.Transformer(cfg, rngs=nnx.Rngs(0))
  if tie:
    m.embedding_VxD[...] = m.embedding_VxD[...].at[cfg.vocab_size:].set(100.0)
  else:
    m.head_VxD[...] = m.head_VxD[...].at[cfg.vocab_size:].set(100.0)
  logits = m(_tokens((2, 5)))
  assert (jnp.argmax(logits, -1) < cfg.vocab_size).all()
  assert (logits[..., cfg.vocab_size:] == tfm.PAD_LOGIT).all()
  probs = jax.nn.softmax(logits, -1)
  assert float(probs[..., cfg.vocab_size:].max()) == 0.0


def test_tiny_param_count(model):
  counted = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  assert counted == tfm.num_params(TINY, include_padding=True)
  pad_rows = TINY.padded_vocab_size - TINY.vocab_size
  assert tfm.num_params(TINY) == counted - 2 * pad_rows * TINY.d_model
  tied = dataclasses.replace(TINY, tie_embeddings=True, gated_mlp=True)
  m = tfm.Transformer(tied, rngs=nnx.Rngs(0))
  counted = sum(x.size for x in jax.tree.leaves(nnx.state(m, nnx.Param)))
  assert counted == tfm.num_params(tied, include_padding=True)


@pytest.mark.parametrize("name,paper", [("paper_130m", 136e6), ("paper_1b", 1.34e9)])
def test_paper_param_counts_abstract(name, paper):
  cfg = tfm.model_config(name)
  abstract = nnx.eval_shape(lambda: tfm.Transformer(cfg, rngs=nnx.Rngs(0)))
  counted = sum(x.size for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
  assert counted == tfm.num_params(cfg, include_padding=True)
  assert cfg.padded_vocab_size == cfg.vocab_size == 32000 and not cfg.tie_embeddings
  assert abs(tfm.num_params(cfg) - paper) / paper < 0.03


def test_flops_per_token_formula():
  cfg = tfm.model_config("paper_1b")
  d, v = cfg.d_model, cfg.padded_vocab_size
  # Matmul weights = all params - embedding table - norm scales (the head stays).
  n_matmul = (tfm.num_params(cfg, include_padding=True) - v * d
              - (2 * cfg.num_layers + 1) * d)
  attention = 12 * cfg.num_layers * cfg.num_heads * cfg.resolved_head_dim * 2048
  assert tfm.flops_per_token(cfg, 2048) == 6 * n_matmul + attention


def test_every_param_has_logical_names(model):
  def check(path, var):
    names = var.get_metadata().get("out_sharding")
    assert names is not None and len(names) == var.ndim, (path, names, var.shape)
    assert set(names) <= LOGICAL, (path, names)
    assert (path[0] == "blocks") == (names[0] == "layers"), (path, names)

  params = nnx.state(model, nnx.Param)
  jax.tree.map_with_path(lambda p, v: check(tuple(k.key for k in p), v), params,
                         is_leaf=lambda x: isinstance(x, nnx.Variable))


def test_sharded_forward_matches_unsharded(model, forward):
  mesh = parallel.make_mesh(data=2, fsdp=2, tensor=2)
  graphdef, abstract_state = nnx.split(nnx.eval_shape(lambda: tfm.Transformer(
      TINY, rngs=nnx.Rngs(0))))
  shardings = parallel.state_shardings(abstract_state, mesh)
  state = jax.jit(lambda: nnx.state(tfm.Transformer(TINY, rngs=nnx.Rngs(0))),
                  out_shardings=shardings)()
  emb = state["embedding_VxD"][...]
  assert emb.sharding.spec == jax.sharding.PartitionSpec("tensor", "fsdp")
  assert state["blocks"]["mlp"]["wi_DxF"][...].sharding.spec == \
      jax.sharding.PartitionSpec(None, "fsdp", "tensor")

  tokens = _tokens((4, 16))
  tokens = jax.device_put(tokens, parallel.batch_sharding(mesh))

  @jax.jit
  def sharded_forward(state, tokens):
    return nnx.merge(graphdef, state)(tokens)

  with parallel.activation_sharding(mesh):
    out = sharded_forward(state, tokens)
  np.testing.assert_allclose(out, forward(model, tokens), atol=1e-5, rtol=1e-5)


def test_remat_policies_identical():
  tokens = _tokens((2, 8))
  results = {}
  for policy in ("none", "full", "dots"):
    m = tfm.Transformer(dataclasses.replace(TINY, remat_policy=policy), rngs=nnx.Rngs(3))
    loss, grads = nnx.value_and_grad(lambda m: jnp.mean(m(tokens)[..., :TINY.vocab_size]))(m)
    results[policy] = (loss, grads)
  for policy in ("full", "dots"):
    np.testing.assert_allclose(results[policy][0], results["none"][0], rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5),
                 results[policy][1], results["none"][1])


def test_bad_config_fails_clearly():
  with pytest.raises(ValueError, match="num_kv_heads"):
    dataclasses.replace(TINY, num_kv_heads=3)
  with pytest.raises(ValueError, match="remat_policy"):
    dataclasses.replace(TINY, remat_policy="some")
  with pytest.raises(ValueError, match="attention_impl='flash'; choose one of"):
    dataclasses.replace(TINY, attention_impl="flash")
  with pytest.raises(ValueError, match="kernels='mps'; choose one of"):
    dataclasses.replace(TINY, kernels="mps")
  with pytest.raises(ValueError, match="Unknown model config"):
    tfm.model_config("paper_7b")


@pytest.mark.parametrize("name", ["tiny", "paper_130m", "paper_1b", "bench_4l"])
def test_model_gin_files(name):
  path = pathlib.Path(__file__).parents[1] / "gin_configs" / "models" / f"{name}.gin"
  gin.clear_config()
  try:
    gin.parse_config_file(str(path))
    cfg = tfm.model_config()
  finally:
    gin.clear_config()
  assert cfg == tfm.model_config(name)
  if name == "bench_4l":
    assert (cfg.num_layers, cfg.d_model, cfg.num_heads, cfg.resolved_head_dim, cfg.mlp_dim,
            cfg.mlp_activation, cfg.gated_mlp, cfg.tie_embeddings, cfg.vocab_size) == \
        (4, 256, 4, 64, 1024, "silu", True, False, 32000)


def test_configs_are_reexported_from_transformer():
  from pause_flax.model import configs
  assert tfm.TransformerConfig is configs.TransformerConfig
  assert tfm.num_params is configs.num_params
  assert tfm.flops_per_token is configs.flops_per_token
  assert tfm.model_config is configs.model_config
