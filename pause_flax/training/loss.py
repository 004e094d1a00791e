"""Weighted next-token cross-entropy: sum(w * CE) / sum(w), plus optional z-loss.

The weights carry all pause knowledge: a pause target, padding and (for
finetuning) the prefix have weight 0, so their terms contribute exactly zero
to the loss and to its gradient.

Two paths compute the same sums: `cross_entropy_sums` from materialised
logits, and `fused_cross_entropy_sums` from the final hidden states and the
output matrix, a chunk of positions at a time, never holding [B, L, V].
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from pause_flax.model.transformer import PAD_LOGIT
from pause_flax.parallel import constrain


# chunk_len="auto": chunks of about max(AUTO_CHUNK_ROWS, d_model rounded up to a
# power of two) rows of a batch shard, at most AUTO_CHUNK_MAX_ROWS. Each chunk
# adds its [V, D] d head product into the accumulator, so the chunk that pays
# grows with D; benchmarks/README.md has the measurements behind both numbers.
AUTO_CHUNK_ROWS = 256
AUTO_CHUNK_MAX_ROWS = 2048


def auto_chunk_rows(d_model: int) -> int:
  """Rows per chunk for 'auto': max(AUTO_CHUNK_ROWS, next power of two >= d_model), capped."""
  return min(AUTO_CHUNK_MAX_ROWS, max(AUTO_CHUNK_ROWS, 1 << max(0, d_model - 1).bit_length()))


def auto_chunk_len(batch_size: int, batch_shards: int, seq_len: int, d_model: int) -> int:
  """Positions per chunk for ~`auto_chunk_rows(d_model)` rows of a batch shard (1 to seq_len)."""
  rows_per_position = max(1, batch_size // batch_shards)
  return max(1, min(seq_len, auto_chunk_rows(d_model) // rows_per_position))


def check_chunk_len(chunk_len: int | str, name: str = "chunk_len") -> None:
  """Refuses a chunk length that is neither an int >= 1 nor 'auto' (`name` in the message)."""
  if chunk_len != "auto" and (isinstance(chunk_len, bool) or not isinstance(chunk_len, int)
                              or chunk_len < 1):
    raise ValueError(f"{name}={chunk_len!r}: use an int >= 1 or 'auto'.")


def _chunk_len(chunk_len: int | str, h_BxLxD: jax.Array, batch_shards: int) -> int:
  check_chunk_len(chunk_len)
  if chunk_len == "auto":
    b, l, d = h_BxLxD.shape
    return auto_chunk_len(b, batch_shards, l, d)
  return chunk_len


class LossSums(NamedTuple):
  """Sums over a (micro-)batch; divide by `weight` for means."""
  loss: jax.Array      # sum(w * (CE + z_loss * log(Z)^2))
  ce: jax.Array        # sum(w * CE)
  z: jax.Array         # sum(w * log(Z)^2)
  correct: jax.Array   # sum(w * [the target's logit is the largest]); a tie counts
  weight: jax.Array    # sum(w)


def cross_entropy_sums(logits_BxLxV: jax.Array, targets_BxL: jax.Array,
                       weights_BxL: jax.Array, z_loss: float = 0.0) -> LossSums:
  """Sums of the weighted cross-entropy terms, in float32.

  A weight of 0 multiplies the term before summation and `jnp.where` keeps a
  non-finite term from leaking through a zero weight.
  """
  logits = logits_BxLxV.astype(jnp.float32)
  w = weights_BxL.astype(jnp.float32)
  log_z_BxL = jax.nn.logsumexp(logits, axis=-1)
  target_logit_BxL = jnp.take_along_axis(logits, targets_BxL[..., None], axis=-1)[..., 0]
  ce_BxL = log_z_BxL - target_logit_BxL
  z_BxL = jnp.square(log_z_BxL)
  keep = w > 0
  ce_BxL = jnp.where(keep, ce_BxL, 0.0)
  z_BxL = jnp.where(keep, z_BxL, 0.0)
  correct_BxL = (target_logit_BxL >= jnp.max(logits, axis=-1)).astype(jnp.float32)
  ce = jnp.sum(w * ce_BxL)
  z = jnp.sum(w * z_BxL)
  return LossSums(loss=ce + z_loss * z, ce=ce, z=z,
                  correct=jnp.sum(w * correct_BxL), weight=jnp.sum(w))


def token_cross_entropy(logits_BxLxV: jax.Array, targets_BxL: jax.Array,
                        weights_BxL: jax.Array) -> jax.Array:
  """float32 [B, L]: each target's cross-entropy (0 where the weight is 0)."""
  logits = logits_BxLxV.astype(jnp.float32)
  log_z_BxL = jax.nn.logsumexp(logits, axis=-1)
  target_logit_BxL = jnp.take_along_axis(logits, targets_BxL[..., None], axis=-1)[..., 0]
  return jnp.where(weights_BxL > 0, log_z_BxL - target_logit_BxL, 0.0)


# ---------------------------------------------------------------------------
# Fused output projection + cross-entropy.


def _chunk_terms(logits_GxTxV: jax.Array, targets_GxT: jax.Array,
                 vocab_size: int) -> tuple[jax.Array, ...]:
  """Padded columns set to PAD_LOGIT; log Z, target logit, target is max ([G, T] each)."""
  if vocab_size < logits_GxTxV.shape[-1]:
    col_GxTxV = jax.lax.broadcasted_iota(jnp.int32, logits_GxTxV.shape, 2)
    logits_GxTxV = jnp.where(col_GxTxV < vocab_size, logits_GxTxV, PAD_LOGIT)
  max_GxT = jnp.max(logits_GxTxV, axis=-1)
  log_z_GxT = max_GxT + jnp.log(jnp.sum(jnp.exp(logits_GxTxV - max_GxT[..., None]), axis=-1))
  target_logit_GxT = jnp.take_along_axis(logits_GxTxV, targets_GxT[..., None], axis=-1)[..., 0]
  return logits_GxTxV, log_z_GxT, target_logit_GxT, target_logit_GxT >= max_GxT


def _fused_scan(h_BxLxD: jax.Array, head_VxD: jax.Array, targets_BxL: jax.Array,
                weights_BxL: jax.Array, z_loss: float, vocab_size: int, chunk_len: int,
                batch_shards: int, with_grad: bool):
  """Per-position (ce, z, correct) and, `with_grad`, d loss / d (h, head, weights).

  Positions are split into chunks of `chunk_len` (the tail padded with weight
  0); a scan computes each chunk's logits, its terms and the gradient of
  loss = sum(w * (CE + z_loss * log(Z)^2)) w.r.t. the chunk's logits, and folds
  that into d h and d head at once. A chunk's B x chunk_len rows are grouped
  by batch shard ([G, T] with G = `batch_shards`, T = B / G * chunk_len, one
  contraction axis in memory order), and d head is accumulated per group, so a
  batch-sharded step reduces it over devices once, not once per chunk.

  The three products read the output matrix in its own [V, D] layout and d
  head is accumulated as [G, V, D], so neither the matrix nor its gradient is
  ever transposed (on XLA:CPU such a transpose is a copy of the whole matrix).
  """
  b, l, d = h_BxLxD.shape
  g = batch_shards
  k = -(-l // chunk_len)
  pad = k * chunk_len - l
  t = (b // g) * chunk_len

  def chunks(x):  # [B, L, ...] -> [K, G, T, ...]: rows of a shard in (b, position) order
    x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
    x = jnp.swapaxes(x.reshape((b, k, chunk_len) + x.shape[2:]), 0, 1)
    return x.reshape((k, g, t) + x.shape[3:])

  w_BxL = weights_BxL.astype(jnp.float32)
  xs = (chunks(h_BxLxD), chunks(targets_BxL), chunks(w_BxL))
  head_dtype = head_VxD.dtype
  head_VxD = head_VxD.astype(h_BxLxD.dtype)
  f32 = jnp.float32

  def body(dhead_GxVxD, x):
    h_GxTxD, targets_GxT, w_GxT = x
    logits_GxTxV = jnp.einsum("GTD,VD->GTV", h_GxTxD, head_VxD, preferred_element_type=f32)
    logits_GxTxV, log_z_GxT, target_logit_GxT, correct_GxT = _chunk_terms(
        logits_GxTxV, targets_GxT, vocab_size)
    keep_GxT = w_GxT > 0
    ce_GxT = jnp.where(keep_GxT, log_z_GxT - target_logit_GxT, 0.0)
    z_GxT = jnp.where(keep_GxT, jnp.square(log_z_GxT), 0.0)
    terms = (ce_GxT, z_GxT, correct_GxT.astype(f32))
    if not with_grad:
      return dhead_GxVxD, (terms, None)
    # d/d logits of w * (log Z - logit[t] + z_loss * log Z^2): a * softmax - w * onehot.
    a_GxT = w_GxT * (1.0 + 2.0 * z_loss * log_z_GxT)
    col_GxTxV = jax.lax.broadcasted_iota(jnp.int32, logits_GxTxV.shape, 2)
    dlogits_GxTxV = jnp.where(
        keep_GxT[..., None],
        a_GxT[..., None] * jnp.exp(logits_GxTxV - log_z_GxT[..., None])
        - jnp.where(col_GxTxV == targets_GxT[..., None], w_GxT[..., None], 0.0),
        0.0).astype(h_GxTxD.dtype)
    dh_GxTxD = jnp.einsum("GTV,VD->GTD", dlogits_GxTxV, head_VxD, preferred_element_type=f32)
    dhead_GxVxD = dhead_GxVxD + jnp.einsum("GTV,GTD->GVD", dlogits_GxTxV, h_GxTxD,
                                           preferred_element_type=f32)
    return dhead_GxVxD, (terms, dh_GxTxD.astype(h_GxTxD.dtype))

  dhead0 = None
  if with_grad:
    dhead0 = constrain(jnp.zeros((g, head_VxD.shape[0], d), f32), ("batch", "vocab", "embed"))
  dhead_GxVxD, (terms, dh) = jax.lax.scan(body, dhead0, xs)

  def unchunk(x):  # [K, G, T, ...] -> [B, L, ...]
    x = jnp.swapaxes(x.reshape((k, b, chunk_len) + x.shape[3:]), 0, 1)
    return x.reshape((b, k * chunk_len) + x.shape[3:])[:, :l]

  ce_BxL, z_BxL, correct_BxL = map(unchunk, terms)
  if not with_grad:
    return (ce_BxL, z_BxL, correct_BxL), None
  dw_BxL = (ce_BxL + z_loss * z_BxL).astype(weights_BxL.dtype)
  dhead_VxD = jnp.sum(dhead_GxVxD, axis=0)
  grads = (unchunk(dh), dhead_VxD.astype(head_dtype), dw_BxL)
  return (ce_BxL, z_BxL, correct_BxL), grads


def _sums(terms, weights_BxL: jax.Array, z_loss: float) -> LossSums:
  ce_BxL, z_BxL, correct_BxL = terms
  w = weights_BxL.astype(jnp.float32)
  ce, z = jnp.sum(w * ce_BxL), jnp.sum(w * z_BxL)
  return LossSums(loss=ce + z_loss * z, ce=ce, z=z, correct=jnp.sum(w * correct_BxL),
                  weight=jnp.sum(w))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _fused(h_BxLxD, head_VxD, targets_BxL, weights_BxL, z_loss, vocab_size, chunk_len,
           batch_shards):
  terms, _ = _fused_scan(h_BxLxD, head_VxD, targets_BxL, weights_BxL, z_loss, vocab_size,
                         chunk_len, batch_shards, with_grad=False)
  return _sums(terms, weights_BxL, z_loss)


def _fused_fwd(h_BxLxD, head_VxD, targets_BxL, weights_BxL, z_loss, vocab_size, chunk_len,
               batch_shards):
  terms, grads = _fused_scan(h_BxLxD, head_VxD, targets_BxL, weights_BxL, z_loss,
                             vocab_size, chunk_len, batch_shards, with_grad=True)
  return _sums(terms, weights_BxL, z_loss), grads


def _fused_bwd(z_loss, vocab_size, chunk_len, batch_shards, grads, g: LossSums):
  del z_loss, vocab_size, chunk_len, batch_shards
  g_loss = g.loss  # ce, z, correct and weight reach the caller without a gradient
  return tuple(None if x is None else g_loss.astype(x.dtype) * x
               for x in (grads[0], grads[1], None, grads[2]))


_fused.defvjp(_fused_fwd, _fused_bwd)


def fused_token_cross_entropy(h_BxLxD: jax.Array, head_VxD: jax.Array,
                              targets_BxL: jax.Array, weights_BxL: jax.Array, *,
                              vocab_size: int | None = None, chunk_len: int | str = "auto",
                              batch_shards: int = 1) -> jax.Array:
  """`token_cross_entropy(h @ head.T, ...)`, a chunk of positions at a time.

  The forward half of `fused_cross_entropy_sums` (same arguments), returning
  the per-target terms instead of their sums; no gradient is defined.
  """
  chunk_len = _chunk_len(chunk_len, h_BxLxD, batch_shards)
  vocab_size = head_VxD.shape[0] if vocab_size is None else vocab_size
  (ce_BxL, _, _), _ = _fused_scan(
      jax.lax.stop_gradient(h_BxLxD), jax.lax.stop_gradient(head_VxD), targets_BxL,
      weights_BxL, 0.0, vocab_size, chunk_len, batch_shards, with_grad=False)
  return ce_BxL


def fused_cross_entropy_sums(h_BxLxD: jax.Array, head_VxD: jax.Array, targets_BxL: jax.Array,
                             weights_BxL: jax.Array, z_loss: float = 0.0, *,
                             vocab_size: int | None = None, chunk_len: int | str = "auto",
                             batch_shards: int = 1) -> LossSums:
  """`cross_entropy_sums(h @ head.T, ...)` without materialising the [B, L, V] logits.

  `head_VxD` is the output projection stored like an embedding, [padded V, D].

  Columns at or past `vocab_size` (default: all real) get PAD_LOGIT, as the
  model's padded vocabulary does. Under differentiation the gradient is
  computed in the forward pass, one chunk of `chunk_len` positions at a time
  (logits, softmax and their gradient stay chunk-sized; the output matrix is
  multiplied three times per chunk, as the plain path's forward and backward
  do once each; "auto" chunks `auto_chunk_len` positions, about
  `auto_chunk_rows(D)` rows of a batch shard). Only `loss` carries a gradient
  (w.r.t. h, head and weights); ce, z, correct and weight are statistics.
  `batch_shards` is how many ways the batch is sharded (a divisor of B); under
  `parallel.activation_sharding` the per-shard partial d head stays on its
  devices until one final reduction.
  """
  if batch_shards < 1 or h_BxLxD.shape[0] % batch_shards:
    raise ValueError(f"batch_shards={batch_shards} must divide the batch {h_BxLxD.shape[0]}.")
  chunk_len = _chunk_len(chunk_len, h_BxLxD, batch_shards)
  vocab_size = head_VxD.shape[0] if vocab_size is None else vocab_size
  sums = _fused(h_BxLxD, head_VxD, targets_BxL, weights_BxL, float(z_loss), vocab_size,
                chunk_len, batch_shards)
  return LossSums(loss=sums.loss, ce=jax.lax.stop_gradient(sums.ce),
                  z=jax.lax.stop_gradient(sums.z), correct=jax.lax.stop_gradient(sums.correct),
                  weight=jax.lax.stop_gradient(sums.weight))
