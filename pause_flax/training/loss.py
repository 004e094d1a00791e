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


def _chunk_terms(logits: jax.Array, targets_GxT: jax.Array, vocab_size: int,
                 v_axis: int) -> tuple[jax.Array, ...]:
  """Padded columns set to PAD_LOGIT; log Z, target logit, target is max ([G, T] each).

  `logits` is [G, T, V] (v_axis 2) or vocabulary-major [V, G, T] (v_axis 0).
  """
  col = jax.lax.broadcasted_iota(jnp.int32, logits.shape, v_axis)
  if vocab_size < logits.shape[v_axis]:
    logits = jnp.where(col < vocab_size, logits, PAD_LOGIT)
  expand = lambda x: jnp.expand_dims(x, v_axis)
  max_GxT = jnp.max(logits, axis=v_axis)
  log_z_GxT = max_GxT + jnp.log(jnp.sum(jnp.exp(logits - expand(max_GxT)), axis=v_axis))
  target_logit_GxT = jnp.take_along_axis(logits, expand(targets_GxT), axis=v_axis).squeeze(v_axis)
  return logits, log_z_GxT, target_logit_GxT, target_logit_GxT >= max_GxT


def _fused_scan(h_BxLxD: jax.Array, head_VxD: jax.Array, targets_BxL: jax.Array,
                weights_BxL: jax.Array, z_loss: float, vocab_size: int, chunk_len: int,
                batch_shards: int, vocab_major: bool, with_grad: bool):
  """Per-position (ce, z, correct) and, `with_grad`, d loss / d (h, head, weights).

  Positions are split into chunks of `chunk_len` (the tail padded with weight
  0); a scan computes each chunk's logits, its terms and the gradient of
  loss = sum(w * (CE + z_loss * log(Z)^2)) w.r.t. the chunk's logits, and folds
  that into d h and d head at once. A chunk's B x chunk_len rows are grouped
  by batch shard ([G, T] with G = `batch_shards`, T = B / G * chunk_len, one
  contraction axis in memory order), and d head is accumulated per group, so a
  batch-sharded step reduces it over devices once, not once per chunk.

  `vocab_major` lays a chunk's logits out as [V, G, T] and accumulates d head
  as [G, V, D], the parameter's own layout: the three matmuls then take their
  large operand (the output matrix or the logits) in the order XLA:CPU
  multiplies fastest, and the gradient needs no transposed copy.
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
  head_DxV = head_VxD.T
  v_axis = 0 if vocab_major else 2
  expand = lambda x: jnp.expand_dims(x, v_axis)
  f32 = jnp.float32

  def body(dhead, x):
    h_GxTxD, targets_GxT, w_GxT = x
    if vocab_major:
      logits = jnp.einsum("VD,GTD->VGT", head_VxD, h_GxTxD, preferred_element_type=f32)
    else:
      logits = jnp.einsum("GTD,DV->GTV", h_GxTxD, head_DxV, preferred_element_type=f32)
    logits, log_z_GxT, target_logit_GxT, correct_GxT = _chunk_terms(
        logits, targets_GxT, vocab_size, v_axis)
    keep_GxT = w_GxT > 0
    ce_GxT = jnp.where(keep_GxT, log_z_GxT - target_logit_GxT, 0.0)
    z_GxT = jnp.where(keep_GxT, jnp.square(log_z_GxT), 0.0)
    terms = (ce_GxT, z_GxT, correct_GxT.astype(f32))
    if not with_grad:
      return dhead, (terms, None)
    # d/d logits of w * (log Z - logit[t] + z_loss * log Z^2): a * softmax - w * onehot.
    a_GxT = w_GxT * (1.0 + 2.0 * z_loss * log_z_GxT)
    col = jax.lax.broadcasted_iota(jnp.int32, logits.shape, v_axis)
    dlogits = jnp.where(
        expand(keep_GxT),
        expand(a_GxT) * jnp.exp(logits - expand(log_z_GxT))
        - jnp.where(col == expand(targets_GxT), expand(w_GxT), 0.0),
        0.0).astype(h_GxTxD.dtype)
    if vocab_major:
      dh = jnp.einsum("DV,VGT->DGT", head_DxV, dlogits, preferred_element_type=f32)
      dhead = dhead + jnp.einsum("VGT,GTD->GVD", dlogits, h_GxTxD, preferred_element_type=f32)
    else:
      dh = jnp.einsum("GTV,DV->GTD", dlogits, head_DxV, preferred_element_type=f32)
      dhead = dhead + jnp.einsum("GTD,GTV->GDV", h_GxTxD, dlogits, preferred_element_type=f32)
    return dhead, (terms, dh.astype(h_GxTxD.dtype))

  dhead0 = None
  if with_grad:
    shape, names = (((g, head_VxD.shape[0], d), ("batch", "vocab", "embed")) if vocab_major
                    else ((g, d, head_VxD.shape[0]), ("batch", "embed", "vocab")))
    dhead0 = constrain(jnp.zeros(shape, f32), names)
  dhead, (terms, dh) = jax.lax.scan(body, dhead0, xs)

  def unchunk(x):  # [K, G, T, ...] -> [B, L, ...]
    x = jnp.swapaxes(x.reshape((k, b, chunk_len) + x.shape[3:]), 0, 1)
    return x.reshape((b, k * chunk_len) + x.shape[3:])[:, :l]

  ce_BxL, z_BxL, correct_BxL = map(unchunk, terms)
  if not with_grad:
    return (ce_BxL, z_BxL, correct_BxL), None
  dw_BxL = (ce_BxL + z_loss * z_BxL).astype(weights_BxL.dtype)
  dhead_VxD = jnp.sum(dhead, axis=0)
  if vocab_major:
    dh = jnp.transpose(dh, (0, 2, 3, 1))  # [K, D, G, T] -> [K, G, T, D]
  else:
    dhead_VxD = dhead_VxD.T
  grads = (unchunk(dh), dhead_VxD.astype(head_dtype), dw_BxL)
  return (ce_BxL, z_BxL, correct_BxL), grads


def _sums(terms, weights_BxL: jax.Array, z_loss: float) -> LossSums:
  ce_BxL, z_BxL, correct_BxL = terms
  w = weights_BxL.astype(jnp.float32)
  ce, z = jnp.sum(w * ce_BxL), jnp.sum(w * z_BxL)
  return LossSums(loss=ce + z_loss * z, ce=ce, z=z, correct=jnp.sum(w * correct_BxL),
                  weight=jnp.sum(w))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7, 8))
def _fused(h_BxLxD, head_VxD, targets_BxL, weights_BxL, z_loss, vocab_size, chunk_len,
           batch_shards, vocab_major):
  terms, _ = _fused_scan(h_BxLxD, head_VxD, targets_BxL, weights_BxL, z_loss, vocab_size,
                         chunk_len, batch_shards, vocab_major, with_grad=False)
  return _sums(terms, weights_BxL, z_loss)


def _fused_fwd(h_BxLxD, head_VxD, targets_BxL, weights_BxL, z_loss, vocab_size, chunk_len,
               batch_shards, vocab_major):
  terms, grads = _fused_scan(h_BxLxD, head_VxD, targets_BxL, weights_BxL, z_loss,
                             vocab_size, chunk_len, batch_shards, vocab_major, with_grad=True)
  return _sums(terms, weights_BxL, z_loss), grads


def _fused_bwd(z_loss, vocab_size, chunk_len, batch_shards, vocab_major, grads, g: LossSums):
  del z_loss, vocab_size, chunk_len, batch_shards, vocab_major
  g_loss = g.loss  # ce, z, correct and weight reach the caller without a gradient
  return tuple(None if x is None else g_loss.astype(x.dtype) * x
               for x in (grads[0], grads[1], None, grads[2]))


_fused.defvjp(_fused_fwd, _fused_bwd)


def fused_token_cross_entropy(h_BxLxD: jax.Array, head_VxD: jax.Array,
                              targets_BxL: jax.Array, weights_BxL: jax.Array, *,
                              vocab_size: int | None = None, chunk_len: int | str = "auto",
                              batch_shards: int = 1, vocab_major: bool = False) -> jax.Array:
  """`token_cross_entropy(h @ head.T, ...)`, a chunk of positions at a time.

  The forward half of `fused_cross_entropy_sums` (same arguments), returning
  the per-target terms instead of their sums; no gradient is defined.
  """
  chunk_len = _chunk_len(chunk_len, h_BxLxD, batch_shards)
  vocab_size = head_VxD.shape[0] if vocab_size is None else vocab_size
  (ce_BxL, _, _), _ = _fused_scan(
      jax.lax.stop_gradient(h_BxLxD), jax.lax.stop_gradient(head_VxD), targets_BxL,
      weights_BxL, 0.0, vocab_size, chunk_len, batch_shards, bool(vocab_major),
      with_grad=False)
  return ce_BxL


def fused_cross_entropy_sums(h_BxLxD: jax.Array, head_VxD: jax.Array, targets_BxL: jax.Array,
                             weights_BxL: jax.Array, z_loss: float = 0.0, *,
                             vocab_size: int | None = None, chunk_len: int | str = "auto",
                             batch_shards: int = 1,
                             vocab_major: bool = False) -> LossSums:
  """`cross_entropy_sums(h @ head.T, ...)` without materialising the [B, L, V] logits.

  `head_VxD` is the output projection stored like an embedding, [padded V, D].

  Columns at or past `vocab_size` (default: all real) get PAD_LOGIT, as the
  model's padded vocabulary does. Under differentiation the gradient is
  computed in the forward pass, one chunk of `chunk_len` positions at a time
  (logits, softmax and their gradient stay chunk-sized; the output matrix is
  multiplied three times per chunk, as the plain path's forward and backward
  do once each; "auto" chunks `auto_chunk_len` positions, about
  `auto_chunk_rows(D)` rows of a batch shard). Only `loss` carries a gradient
  (w.r.t. h, head and weights); ce, z, correct and weight are statistics. `batch_shards` is how many ways the
  batch is sharded (a divisor of B); under `parallel.activation_sharding` the
  per-shard partial d head stays on its devices until one final reduction.
  `vocab_major` lays each chunk's logits out vocabulary-first, the faster
  order on XLA:CPU for an unsharded batch (the Trainer asks
  `kernels.loss_vocab_major`; figures in benchmarks/README.md). The sums and
  gradients are the same either way.
  """
  if batch_shards < 1 or h_BxLxD.shape[0] % batch_shards:
    raise ValueError(f"batch_shards={batch_shards} must divide the batch {h_BxLxD.shape[0]}.")
  chunk_len = _chunk_len(chunk_len, h_BxLxD, batch_shards)
  vocab_size = head_VxD.shape[0] if vocab_size is None else vocab_size
  sums = _fused(h_BxLxD, head_VxD, targets_BxL, weights_BxL, float(z_loss), vocab_size,
                chunk_len, batch_shards, bool(vocab_major))
  return LossSums(loss=sums.loss, ce=jax.lax.stop_gradient(sums.ce),
                  z=jax.lax.stop_gradient(sums.z), correct=jax.lax.stop_gradient(sums.correct),
                  weight=jax.lax.stop_gradient(sums.weight))
