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


def mean_loss(sums: LossSums) -> jax.Array:
  """sum(w * CE) / sum(w); 0 for a batch with no weighted targets."""
  return sums.loss / jnp.maximum(sums.weight, 1e-8)


# ---------------------------------------------------------------------------
# Fused output projection + cross-entropy.


def _chunk_terms(h_BxCxD: jax.Array, head_DxV: jax.Array, targets_BxC: jax.Array,
                 vocab_size: int) -> tuple[jax.Array, ...]:
  """Logits of one chunk (padded columns at PAD_LOGIT), log Z, target logit, target is max."""
  logits_BxCxV = jnp.einsum('BCD,DV->BCV', h_BxCxD, head_DxV,
                            preferred_element_type=jnp.float32)
  col_V = jax.lax.broadcasted_iota(jnp.int32, (logits_BxCxV.shape[-1],), 0)
  if vocab_size < logits_BxCxV.shape[-1]:
    logits_BxCxV = jnp.where(col_V < vocab_size, logits_BxCxV, PAD_LOGIT)
  max_BxC = jnp.max(logits_BxCxV, axis=-1)
  log_z_BxC = max_BxC + jnp.log(jnp.sum(jnp.exp(logits_BxCxV - max_BxC[..., None]), axis=-1))
  target_logit_BxC = jnp.take_along_axis(logits_BxCxV, targets_BxC[..., None], axis=-1)[..., 0]
  return logits_BxCxV, log_z_BxC, target_logit_BxC, target_logit_BxC >= max_BxC


def _fused_scan(h_BxLxD: jax.Array, head_DxV: jax.Array, targets_BxL: jax.Array,
                weights_BxL: jax.Array, z_loss: float, vocab_size: int, chunk_len: int,
                batch_shards: int, with_grad: bool):
  """Per-position (ce, z, correct) and, `with_grad`, d loss / d (h, head, weights).

  Positions are split into chunks of `chunk_len` (the tail padded with weight
  0); a scan computes each chunk's [B, chunk_len, V] logits, its terms and the
  gradient of loss = sum(w * (CE + z_loss * log(Z)^2)) w.r.t. the chunk's
  logits, and folds that into d h and d head at once. d head is accumulated
  per group of B / `batch_shards` rows (G groups, sharded like the batch), so a
  batch-sharded step reduces it over devices once, not once per chunk.
  """
  b, l, d = h_BxLxD.shape
  g = batch_shards
  k = -(-l // chunk_len)
  pad = k * chunk_len - l

  def chunks(x):  # [B, L, ...] -> [K, B, chunk_len, ...]
    x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
    return jnp.swapaxes(x.reshape((b, k, chunk_len) + x.shape[2:]), 0, 1)

  w_BxL = weights_BxL.astype(jnp.float32)
  xs = (chunks(h_BxLxD), chunks(targets_BxL), chunks(w_BxL))
  head_dtype = head_DxV.dtype
  head_DxV = head_DxV.astype(h_BxLxD.dtype)

  def body(dhead_GxDxV, x):
    h_BxCxD, targets_BxC, w_BxC = x
    logits_BxCxV, log_z_BxC, target_logit_BxC, correct_BxC = _chunk_terms(
        h_BxCxD, head_DxV, targets_BxC, vocab_size)
    keep_BxC = w_BxC > 0
    ce_BxC = jnp.where(keep_BxC, log_z_BxC - target_logit_BxC, 0.0)
    z_BxC = jnp.where(keep_BxC, jnp.square(log_z_BxC), 0.0)
    terms = (ce_BxC, z_BxC, correct_BxC.astype(jnp.float32))
    if not with_grad:
      return dhead_GxDxV, (terms, None)
    # d/d logits of w * (log Z - logit[t] + z_loss * log Z^2): a * softmax - w * onehot.
    a_BxC = w_BxC * (1.0 + 2.0 * z_loss * log_z_BxC)
    col_V = jax.lax.broadcasted_iota(jnp.int32, (logits_BxCxV.shape[-1],), 0)
    dlogits_BxCxV = jnp.where(
        keep_BxC[..., None],
        a_BxC[..., None] * jnp.exp(logits_BxCxV - log_z_BxC[..., None])
        - jnp.where(col_V == targets_BxC[..., None], w_BxC[..., None], 0.0),
        0.0).astype(h_BxCxD.dtype)
    dh_BxCxD = jnp.einsum('BCV,DV->BCD', dlogits_BxCxV, head_DxV,
                          preferred_element_type=jnp.float32).astype(h_BxCxD.dtype)
    # Rows grouped by batch shard, (b, C) merged into one contraction axis T in
    # memory order: contracting (b, C) as two axes let XLA permute them to
    # (C, b), a copy of the whole [B, C, V] chunk gradient.
    grouped = lambda x: x.reshape((g, (b // g) * x.shape[1], x.shape[2]))
    dhead_GxDxV = dhead_GxDxV + jnp.einsum('GTD,GTV->GDV', grouped(h_BxCxD),
                                           grouped(dlogits_BxCxV),
                                           preferred_element_type=jnp.float32)
    return dhead_GxDxV, (terms, dh_BxCxD)

  dhead0_GxDxV = (constrain(jnp.zeros((g,) + head_DxV.shape, jnp.float32),
                            ('batch', 'embed', 'vocab')) if with_grad else None)
  dhead_GxDxV, (terms, dh_KxBxCxD) = jax.lax.scan(body, dhead0_GxDxV, xs)

  def unchunk(x):  # [K, B, chunk_len, ...] -> [B, L, ...]
    x = jnp.swapaxes(x, 0, 1)
    return x.reshape((b, k * chunk_len) + x.shape[3:])[:, :l]

  ce_BxL, z_BxL, correct_BxL = map(unchunk, terms)
  if not with_grad:
    return (ce_BxL, z_BxL, correct_BxL), None
  dw_BxL = (ce_BxL + z_loss * z_BxL).astype(weights_BxL.dtype)
  grads = (unchunk(dh_KxBxCxD), jnp.sum(dhead_GxDxV, axis=0).astype(head_dtype), dw_BxL)
  return (ce_BxL, z_BxL, correct_BxL), grads


def _sums(terms, weights_BxL: jax.Array, z_loss: float) -> LossSums:
  ce_BxL, z_BxL, correct_BxL = terms
  w = weights_BxL.astype(jnp.float32)
  ce, z = jnp.sum(w * ce_BxL), jnp.sum(w * z_BxL)
  return LossSums(loss=ce + z_loss * z, ce=ce, z=z, correct=jnp.sum(w * correct_BxL),
                  weight=jnp.sum(w))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _fused(h_BxLxD, head_DxV, targets_BxL, weights_BxL, z_loss, vocab_size, chunk_len,
           batch_shards):
  terms, _ = _fused_scan(h_BxLxD, head_DxV, targets_BxL, weights_BxL, z_loss, vocab_size,
                         chunk_len, batch_shards, with_grad=False)
  return _sums(terms, weights_BxL, z_loss)


def _fused_fwd(h_BxLxD, head_DxV, targets_BxL, weights_BxL, z_loss, vocab_size, chunk_len,
               batch_shards):
  terms, grads = _fused_scan(h_BxLxD, head_DxV, targets_BxL, weights_BxL, z_loss,
                             vocab_size, chunk_len, batch_shards, with_grad=True)
  return _sums(terms, weights_BxL, z_loss), grads


def _fused_bwd(z_loss, vocab_size, chunk_len, batch_shards, grads, g: LossSums):
  del z_loss, vocab_size, chunk_len, batch_shards
  g_loss = g.loss  # ce, z, correct and weight reach the caller without a gradient
  return tuple(None if x is None else g_loss.astype(x.dtype) * x
               for x in (grads[0], grads[1], None, grads[2]))


_fused.defvjp(_fused_fwd, _fused_bwd)


def fused_cross_entropy_sums(h_BxLxD: jax.Array, head_DxV: jax.Array, targets_BxL: jax.Array,
                             weights_BxL: jax.Array, z_loss: float = 0.0, *,
                             vocab_size: int | None = None, chunk_len: int = 32,
                             batch_shards: int = 1) -> LossSums:
  """`cross_entropy_sums(h @ head, ...)` without materialising the [B, L, V] logits.

  Columns at or past `vocab_size` (default: all real) get PAD_LOGIT, as the
  model's padded vocabulary does. Under differentiation the gradient is
  computed in the forward pass, one chunk of `chunk_len` positions at a time
  (logits, softmax and their gradient stay chunk-sized; the output matrix is
  multiplied three times per chunk, as the plain path's forward and backward
  do once each). Only `loss` carries a gradient (w.r.t. h, head and weights);
  ce, z, correct and weight are statistics. `batch_shards` is how many ways the
  batch is sharded (a divisor of B); under `parallel.activation_sharding` the
  per-shard partial d head stays on its devices until one final reduction.
  """
  if chunk_len < 1:
    raise ValueError(f'chunk_len={chunk_len} must be >= 1.')
  if batch_shards < 1 or h_BxLxD.shape[0] % batch_shards:
    raise ValueError(f'batch_shards={batch_shards} must divide the batch {h_BxLxD.shape[0]}.')
  vocab_size = head_DxV.shape[-1] if vocab_size is None else vocab_size
  sums = _fused(h_BxLxD, head_DxV, targets_BxL, weights_BxL, float(z_loss), vocab_size,
                chunk_len, batch_shards)
  return LossSums(loss=sums.loss, ce=jax.lax.stop_gradient(sums.ce),
                  z=jax.lax.stop_gradient(sums.z), correct=jax.lax.stop_gradient(sums.correct),
                  weight=jax.lax.stop_gradient(sums.weight))
