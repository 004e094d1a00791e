"""Decoder-only Transformer in Flax NNX. Pause-agnostic: it sees token ids only.

Architecture: token embedding -> num_layers x [pre-RMSNorm causal self-attention
with rotary positions (grouped-query when num_kv_heads < num_heads), pre-RMSNorm
MLP (GELU/SiLU/ReLU, optionally gated)] -> final RMSNorm -> output projection
(tied to the embedding or untied) over the vocabulary padded to a multiple of
`vocab_pad_multiple`; the padded columns get a large negative logit. No biases.

Layers are stacked (`nnx.vmap` at init, `nnx.scan` at apply), so every block
parameter has a leading `layers` axis and the step compiles one layer, not 24.

Initialisation (GPT-2 style): every weight matrix, embedding and output head
normal(0.02); the residual output projections (attention out, MLP out)
normal(0.02 / sqrt(2 * num_layers)); RMSNorm scales ones.

These are the plain layers. `config.kernels` (resolved for a mesh by
`kernels.resolve`) may swap a backend's variant of attention, the MLP or the
embedding lookup in (pause_flax/model/kernels/); values and parameters are the
same. The config, named shapes and parameter / FLOP counts live in
`configs.py` (re-exported here).

Shape suffixes: B batch, L query length, S key length (= L, or the cache
length when decoding), D d_model, N query heads, K key/value heads, H head
dim, F MLP dim, V padded vocabulary, Y layers.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from pause_flax.model import kernels
from pause_flax.model.configs import (  # re-exported: callers import them from here
    ATTENTION_IMPLS,
    TransformerConfig,
    flops_per_token,
    model_config,
    num_params,
)
from pause_flax.parallel import constrain

# Logit of the padded vocabulary columns: finite, so 0 * log_softmax stays 0.
PAD_LOGIT = -1e9

_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": jax.nn.gelu,
    "silu": jax.nn.silu,
    "relu": jax.nn.relu,
}
_REMAT_POLICIES = {
    "full": None,  # save nothing, recompute the whole layer
    # Save projection/MLP matmul outputs, recompute attention scores.
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


# ---------------------------------------------------------------------------
# KV cache.


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
  """Keys/values of every layer for `S` slots, written left to right.

  One [B, K, S, H] array per layer (head-major, slots before the head dim):
  a step writes its keys in place with one `dynamic_update_slice` per layer,
  and the score and value matmuls read the layer's array as it is (batch and
  head leading, contracting over H or S), so no step copies or transposes a
  layer's cache. Separate per-layer arrays (not one stacked [Y, ...] array)
  keep the attention's read from slicing a layer out, which XLA would copy.

  All rows write the same slots (prompts of different lengths are left-padded
  by the caller, with segment id 0 on the padding); a slot's segment id says
  whom it belongs to, so a query attends only to written slots of its own
  segment at or before its own slot.
  """
  k_BxKxSxH: tuple[jax.Array, ...]  # one per layer
  v_BxKxSxH: tuple[jax.Array, ...]
  segment_ids_BxS: jax.Array  # 0 = padding or not yet written
  index: jax.Array  # int32 scalar: slots written so far (next write position)

  @property
  def length(self) -> int:
    return self.segment_ids_BxS.shape[1]


# Logical axes of each layer's cached keys (and values).
KV_LOGICAL_AXES = ("batch", "heads", "cache_length", "kv")


def kv_cache_logical_axes(num_layers: int) -> KVCache:
  """The logical axis names of a `num_layers` cache, as a KVCache of name tuples."""
  return KVCache(k_BxKxSxH=(KV_LOGICAL_AXES,) * num_layers,
                 v_BxKxSxH=(KV_LOGICAL_AXES,) * num_layers,
                 segment_ids_BxS=("batch", "cache_length"), index=())


def init_cache(config: TransformerConfig, batch_size: int, length: int | None = None,
               dtype: str | None = None) -> KVCache:
  """An empty cache of `length` slots (default config.max_len), compute dtype."""
  c = config
  length = c.max_len if length is None else length
  shape = (batch_size, c.resolved_kv_heads, length, c.resolved_head_dim)
  dtype = jnp.dtype(dtype or c.dtype)
  zeros = lambda: tuple(jnp.zeros(shape, dtype) for _ in range(c.num_layers))
  return KVCache(k_BxKxSxH=zeros(), v_BxKxSxH=zeros(),
                 segment_ids_BxS=jnp.zeros((batch_size, length), jnp.int32),
                 index=jnp.zeros((), jnp.int32))


# ---------------------------------------------------------------------------
# Layers.


def _param(rngs: nnx.Rngs, stddev: float, shape: tuple[int, ...], names: tuple[str, ...],
           dtype: jnp.dtype) -> nnx.Param:
  """A normal(stddev) parameter carrying logical axis names as metadata only."""
  value = nnx.initializers.normal(stddev)(rngs.params(), shape, dtype)
  return nnx.Param(value, out_sharding=names, eager_sharding=False)


class RMSNorm(nnx.Module):
  """x / rms(x) * scale, computed in float32."""

  def __init__(self, config: TransformerConfig):
    self.eps = config.norm_eps
    self.scale = nnx.Param(jnp.ones((config.d_model,), config.param_dtype),
                           out_sharding=("embed",), eager_sharding=False)

  def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
    x = x_BxLxD.astype(jnp.float32)
    y = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + self.eps)
    return (y * self.scale[...].astype(jnp.float32)).astype(x_BxLxD.dtype)


def rope_sin_cos(positions_BxL: jax.Array, head_dim: int,
                 theta: float) -> tuple[jax.Array, jax.Array]:
  """sin and cos of the rotary angles, [B, L, 1, H / 2] float32 each."""
  half = head_dim // 2
  inv_freq = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
  angle_BxLx1xh = positions_BxL.astype(jnp.float32)[:, :, None, None] * inv_freq
  return jnp.sin(angle_BxLx1xh), jnp.cos(angle_BxLx1xh)


def rotate(x_BxLxNxH: jax.Array, sin_BxLx1xh: jax.Array, cos_BxLx1xh: jax.Array) -> jax.Array:
  """The rotary rotation (half-split convention) by given angles, in float32."""
  x1, x2 = jnp.split(x_BxLxNxH.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos_BxLx1xh - x2 * sin_BxLx1xh,
                         x2 * cos_BxLx1xh + x1 * sin_BxLx1xh], axis=-1)
  return out.astype(x_BxLxNxH.dtype)


def apply_rope(x_BxLxNxH: jax.Array, positions_BxL: jax.Array, theta: float) -> jax.Array:
  """Rotary position embedding (half-split convention), in float32."""
  return rotate(x_BxLxNxH, *rope_sin_cos(positions_BxL, x_BxLxNxH.shape[-1], theta))


class Attention(nnx.Module):
  """Causal (grouped-query) self-attention: jax.nn.dot_product_attention (or `attention_impl`'s)."""

  def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs):
    c = config
    self.config = c
    d, n, k, h = c.d_model, c.num_heads, c.resolved_kv_heads, c.resolved_head_dim
    out_std = 0.02 / math.sqrt(2 * c.num_layers)
    self.q_DxNxH = _param(rngs, 0.02, (d, n, h), ("embed", "heads", "kv"), c.param_dtype)
    self.k_DxKxH = _param(rngs, 0.02, (d, k, h), ("embed", "heads", "kv"), c.param_dtype)
    self.v_DxKxH = _param(rngs, 0.02, (d, k, h), ("embed", "heads", "kv"), c.param_dtype)
    self.o_NxHxD = _param(rngs, out_std, (n, h, d), ("heads", "kv", "embed"), c.param_dtype)

  def __call__(self, x_BxLxD: jax.Array, positions_BxL: jax.Array,
               mask_Bx1xLxS: jax.Array | None, kv: tuple[jax.Array, jax.Array] | None,
               index: jax.Array | None, segment_ids_BxL: jax.Array | None = None,
               ) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
    """Returns the attention output and, with a cache `kv`, the updated (k, v).

    Without a cache, attention is causal (query slot i sees keys 0..i) and
    packed segments narrow it: kernels that take `segment_ids_BxL` (blocked,
    splash) read those, the others `mask_Bx1xLxS` (None: no segments, or a
    kernel that reads the ids); with a cache `kv` (this layer's [B, K, S, H]
    keys and values), the mask is the whole rule.
    """
    c = self.config
    dtype = x_BxLxD.dtype
    q_BxLxNxH = jnp.einsum("BLD,DNH->BLNH", x_BxLxD, self.q_DxNxH[...].astype(dtype))
    k_BxLxKxH = jnp.einsum("BLD,DKH->BLKH", x_BxLxD, self.k_DxKxH[...].astype(dtype))
    v_BxLxKxH = jnp.einsum("BLD,DKH->BLKH", x_BxLxD, self.v_DxKxH[...].astype(dtype))
    if c.positions != "learned":
      angles = rope_sin_cos(positions_BxL, c.resolved_head_dim, c.rope_theta)
      rotate_fn = kernels.get(c).rotate or rotate
      q_BxLxNxH = rotate_fn(q_BxLxNxH, *angles)
      k_BxLxKxH = rotate_fn(k_BxLxKxH, *angles)
    q_BxLxNxH = constrain(q_BxLxNxH, ("batch", "length", "heads", "kv"))
    k_BxLxKxH = constrain(k_BxLxKxH, ("batch", "length", "heads", "kv"))
    v_BxLxKxH = constrain(v_BxLxKxH, ("batch", "length", "heads", "kv"))
    if kv is not None:
      # In place: the L new slots are transposed, never the cache.
      start = (0, 0, index, 0)
      k_BxKxSxH = constrain(jax.lax.dynamic_update_slice(
          kv[0], jnp.swapaxes(k_BxLxKxH, 1, 2).astype(kv[0].dtype), start), KV_LOGICAL_AXES)
      v_BxKxSxH = constrain(jax.lax.dynamic_update_slice(
          kv[1], jnp.swapaxes(v_BxLxKxH, 1, 2).astype(kv[1].dtype), start), KV_LOGICAL_AXES)
      kv = (k_BxKxSxH, v_BxKxSxH)
      out_BxLxNxH = cached_attention(q_BxLxNxH, k_BxKxSxH, v_BxKxSxH, mask_Bx1xLxS)
    else:
      impl = kernels.attention_impl(c, x_BxLxD.shape[1])
      if impl == "splash":
        # Compiled for TPU under the TPU kernels, else interpreted (a test path).
        out_BxLxNxH = kernels.tpu.splash_attention(q_BxLxNxH, k_BxLxKxH, v_BxLxKxH,
                                                   segment_ids_BxL,
                                                   interpret=c.kernels != "tpu")
      elif impl == "blocked":
        out_BxLxNxH = kernels.blocked_causal_attention(q_BxLxNxH, k_BxLxKxH, v_BxLxKxH,
                                                       segment_ids_BxL)
      else:
        out_BxLxNxH = jax.nn.dot_product_attention(
            q_BxLxNxH, k_BxLxKxH, v_BxLxKxH, mask=mask_Bx1xLxS, is_causal=True,
            implementation=impl)
    out_BxLxNxH = constrain(out_BxLxNxH, ("batch", "length", "heads", "kv"))
    y_BxLxD = jnp.einsum("BLNH,NHD->BLD", out_BxLxNxH, self.o_NxHxD[...].astype(dtype))
    return y_BxLxD, kv


def cached_attention(q_BxLxNxH: jax.Array, k_BxKxSxH: jax.Array, v_BxKxSxH: jax.Array,
                     mask_Bx1xLxS: jax.Array) -> jax.Array:
  """Attention of L queries over a layer's cache laid out [B, K, S, H].

  The same values as `jax.nn.dot_product_attention(q, k, v, mask=mask)` over
  [B, S, K, H] keys (scale 1/sqrt(H), float32 logits and softmax, grouped
  heads, masked logits at the same large negative); both matmuls take the
  cache with its batch and head dims leading, so XLA reads it in place. Only
  the L queries (one per step when decoding) are transposed.
  """
  b, l, n, h = q_BxLxNxH.shape
  kh = k_BxKxSxH.shape[1]
  dtype = q_BxLxNxH.dtype
  q_BxKxGxLxH = jnp.transpose(q_BxLxNxH.reshape(b, l, kh, n // kh, h), (0, 2, 3, 1, 4))
  logits_BxKxGxLxS = jnp.einsum("BKGLH,BKSH->BKGLS", q_BxKxGxLxH, k_BxKxSxH.astype(dtype),
                                preferred_element_type=jnp.float32) * (h ** -0.5)
  large_negative = -0.7 * float(jnp.finfo(jnp.float32).max)  # jax.nn's masked logit
  logits_BxKxGxLxS = jnp.where(mask_Bx1xLxS[:, :, None], logits_BxKxGxLxS, large_negative)
  probs_BxKxGxLxS = jax.nn.softmax(logits_BxKxGxLxS, axis=-1).astype(dtype)
  out_BxKxGxLxH = jnp.einsum("BKGLS,BKSH->BKGLH", probs_BxKxGxLxS, v_BxKxSxH.astype(dtype))
  return jnp.transpose(out_BxKxGxLxH, (0, 3, 1, 2, 4)).reshape(b, l, n, h)


class Mlp(nnx.Module):
  """act(x W_i) [* x W_gate] W_o (or the `kernels` setting's MLP, same values)."""

  def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs):
    c = config
    self.config = c
    self.activation = _ACTIVATIONS[c.mlp_activation]
    out_std = 0.02 / math.sqrt(2 * c.num_layers)
    self.wi_DxF = _param(rngs, 0.02, (c.d_model, c.mlp_dim), ("embed", "mlp"), c.param_dtype)
    self.wg_DxF = (_param(rngs, 0.02, (c.d_model, c.mlp_dim), ("embed", "mlp"), c.param_dtype)
                   if c.gated_mlp else None)
    self.wo_FxD = _param(rngs, out_std, (c.mlp_dim, c.d_model), ("mlp", "embed"), c.param_dtype)

  def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
    dtype = x_BxLxD.dtype
    wi_DxF = self.wi_DxF[...].astype(dtype)
    wg_DxF = None if self.wg_DxF is None else self.wg_DxF[...].astype(dtype)
    wo_FxD = self.wo_FxD[...].astype(dtype)
    fast_mlp = kernels.get(self.config).mlp
    if fast_mlp is not None:
      return fast_mlp(self.activation, x_BxLxD, wi_DxF, wg_DxF, wo_FxD)
    h_BxLxF = self.activation(x_BxLxD @ wi_DxF)
    if wg_DxF is not None:
      h_BxLxF = h_BxLxF * (x_BxLxD @ wg_DxF)
    h_BxLxF = constrain(h_BxLxF, ("batch", "length", "mlp"))
    return h_BxLxF @ wo_FxD


class Block(nnx.Module):
  """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

  def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs):
    self.attn_norm = RMSNorm(config)
    self.attn = Attention(config, rngs=rngs)
    self.mlp_norm = RMSNorm(config)
    self.mlp = Mlp(config, rngs=rngs)

  def __call__(self, x_BxLxD: jax.Array, positions_BxL: jax.Array,
               mask_Bx1xLxS: jax.Array | None, kv: tuple[jax.Array, jax.Array] | None,
               index: jax.Array | None, segment_ids_BxL: jax.Array | None = None,
               ) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
    y_BxLxD, kv = self.attn(self.attn_norm(x_BxLxD), positions_BxL, mask_Bx1xLxS, kv, index,
                            segment_ids_BxL)
    x_BxLxD = constrain(x_BxLxD + y_BxLxD, ("batch", "length", "embed"))
    x_BxLxD = x_BxLxD + self.mlp(self.mlp_norm(x_BxLxD))
    return constrain(x_BxLxD, ("batch", "length", "embed")), kv


def _attention_mask(q_slots_L: jax.Array, q_segment_ids_BxL: jax.Array,
                    k_segment_ids_BxS: jax.Array) -> jax.Array:
  """Causal in slot order and within one segment: [B, 1, L, S] booleans."""
  s = k_segment_ids_BxS.shape[1]
  causal_LxS = jnp.arange(s)[None, :] <= q_slots_L[:, None]
  same_BxLxS = q_segment_ids_BxL[:, :, None] == k_segment_ids_BxS[:, None, :]
  return (causal_LxS[None] & same_BxLxS)[:, None]


class Transformer(nnx.Module):
  """Decoder-only LM over token ids: logits over the padded vocabulary."""

  def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs):
    c = config
    self.config = c
    vp, d = c.padded_vocab_size, c.d_model
    self.embedding_VxD = _param(rngs, 0.02, (vp, d), ("vocab", "embed"), c.param_dtype)
    if c.positions != "rope":   # absent for 'rope': its parameter tree is unchanged
      self.position_embedding_PxD = _param(rngs, 0.02, (c.max_len, d), (None, "embed"),
                                           c.param_dtype)

    @nnx.split_rngs(splits=c.num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def make_blocks(rngs: nnx.Rngs) -> Block:
      return Block(c, rngs=rngs)

    self.blocks = make_blocks(rngs)
    self.final_norm = RMSNorm(c)
    # Stored [V, D] like the embedding (and Hugging Face's lm_head), whatever
    # the kernels; `compat.upgrade_params` converts the earlier [D, V] head_DxV.
    self.head_VxD = (None if c.tie_embeddings
                     else _param(rngs, 0.02, (vp, d), ("vocab", "embed"), c.param_dtype))

  def hidden(self, tokens_BxL: jax.Array, *, positions_BxL: jax.Array | None = None,
             segment_ids_BxL: jax.Array | None = None, cache: KVCache | None = None,
             ) -> jax.Array | tuple[jax.Array, KVCache]:
    """Final-normed hidden states h_BxLxD (and the updated cache, given one).

    Positions default to the slot index (arange(L), offset by the cache index);
    packed inputs pass theirs. Segment ids default to 1 (0 marks padding); a
    token attends only to earlier tokens of its own segment. With a cache the
    L tokens are written at slots [index, index + L) and attend to the cache.
    """
    c = self.config
    b, l = tokens_BxL.shape
    index = jnp.zeros((), jnp.int32) if cache is None else cache.index
    q_slots_L = index + jnp.arange(l, dtype=jnp.int32)
    if positions_BxL is None:
      positions_BxL = jnp.broadcast_to(q_slots_L, (b, l))
    if cache is None:
      # Causality is the attention's own (is_causal, which cuDNN and splash
      # compute blockwise); a dense mask only for packed segments under an
      # attention that cannot read segment ids.
      needs_mask = kernels.attention_impl(c, l) not in kernels.READS_SEGMENT_IDS
      mask_Bx1xLxS = (None if segment_ids_BxL is None or not needs_mask else
                      _attention_mask(q_slots_L, segment_ids_BxL, segment_ids_BxL))
    else:
      if segment_ids_BxL is None:
        segment_ids_BxL = jnp.ones((b, l), jnp.int32)
      k_segment_ids_BxS = jax.lax.dynamic_update_slice(
          cache.segment_ids_BxS, segment_ids_BxL.astype(jnp.int32), (0, index))
      mask_Bx1xLxS = _attention_mask(q_slots_L, segment_ids_BxL, k_segment_ids_BxS)

    dtype = jnp.dtype(c.dtype)
    table_VxD = self.embedding_VxD[...].astype(dtype)
    fast_lookup = kernels.get(c).embed_lookup
    if fast_lookup is not None:
      x_BxLxD = fast_lookup(table_VxD, tokens_BxL)
    else:
      x_BxLxD = jnp.take(table_VxD, tokens_BxL, axis=0)
    if c.positions != "rope":
      # Absolute positions: the slot (offset by the cache index) or the packed position.
      x_BxLxD = x_BxLxD + jnp.take(self.position_embedding_PxD[...].astype(dtype),
                                   positions_BxL, axis=0)
    x_BxLxD = constrain(x_BxLxD, ("batch", "length", "embed"))

    if cache is not None:
      # One layer at a time over the per-layer cache arrays, each updated in
      # place (a scan would slice each layer's cache out and stack it back).
      graphdef, blocks_state = nnx.split(self.blocks)
      ks, vs = [], []
      for i in range(c.num_layers):
        block = nnx.merge(graphdef, jax.tree.map(lambda a, i=i: a[i], blocks_state))
        x_BxLxD, (k_i, v_i) = block(x_BxLxD, positions_BxL, mask_Bx1xLxS,
                                    (cache.k_BxKxSxH[i], cache.v_BxKxSxH[i]), index)
        ks.append(k_i)
        vs.append(v_i)
      return self.final_norm(x_BxLxD), KVCache(
          k_BxKxSxH=tuple(ks), v_BxKxSxH=tuple(vs), segment_ids_BxS=k_segment_ids_BxS,
          index=index + l)

    def layer(block, x_BxLxD):
      x_BxLxD, _ = block(x_BxLxD, positions_BxL, mask_Bx1xLxS, None, None, segment_ids_BxL)
      return x_BxLxD

    if c.remat_policy != "none":
      layer = nnx.remat(layer, policy=_REMAT_POLICIES[c.remat_policy], prevent_cse=False)

    @nnx.scan(in_axes=(0, nnx.Carry), out_axes=nnx.Carry, unroll=c.scan_unroll)
    def run_layers(block, x_BxLxD):
      return layer(block, x_BxLxD)

    return self.final_norm(run_layers(self.blocks, x_BxLxD))

  def output_matrix_VxD(self) -> jax.Array:
    """The [padded V, D] output projection: the untied head or the embedding."""
    return (self.embedding_VxD if self.config.tie_embeddings else self.head_VxD)[...]

  def logits(self, h_BxLxD: jax.Array) -> jax.Array:
    """Float32 logits over the padded vocabulary; padded columns get PAD_LOGIT."""
    c = self.config
    dtype = h_BxLxD.dtype
    logits_BxLxV = jnp.einsum("BLD,VD->BLV", h_BxLxD, self.output_matrix_VxD().astype(dtype),
                              preferred_element_type=jnp.float32)
    if c.padded_vocab_size > c.vocab_size:
      real_V = jnp.arange(c.padded_vocab_size) < c.vocab_size
      logits_BxLxV = jnp.where(real_V, logits_BxLxV, PAD_LOGIT)
    return constrain(logits_BxLxV, ("batch", "length", "vocab"))

  def __call__(self, tokens_BxL: jax.Array, *, positions_BxL: jax.Array | None = None,
               segment_ids_BxL: jax.Array | None = None, cache: KVCache | None = None,
               ) -> jax.Array | tuple[jax.Array, KVCache]:
    """Logits_BxLxV (float32, padded vocab); with a cache, (logits, new cache)."""
    out = self.hidden(tokens_BxL, positions_BxL=positions_BxL,
                      segment_ids_BxL=segment_ids_BxL, cache=cache)
    if cache is None:
      return self.logits(out)
    h_BxLxD, cache = out
    return self.logits(h_BxLxD), cache
