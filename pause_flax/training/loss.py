"""Weighted next-token cross-entropy: sum(w * CE) / sum(w), plus optional z-loss.

The weights carry all pause knowledge: a pause target, padding and (for
finetuning) the prefix have weight 0, so their terms contribute exactly zero
to the loss and to its gradient.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class LossSums(NamedTuple):
  """Sums over a (micro-)batch; divide by `weight` for means."""
  loss: jax.Array      # sum(w * (CE + z_loss * log(Z)^2))
  ce: jax.Array        # sum(w * CE)
  z: jax.Array         # sum(w * log(Z)^2)
  correct: jax.Array   # sum(w * [argmax == target])
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
  correct_BxL = (jnp.argmax(logits, axis=-1) == targets_BxL).astype(jnp.float32)
  ce = jnp.sum(w * ce_BxL)
  z = jnp.sum(w * z_BxL)
  return LossSums(loss=ce + z_loss * z, ce=ce, z=z,
                  correct=jnp.sum(w * correct_BxL), weight=jnp.sum(w))


def mean_loss(sums: LossSums) -> jax.Array:
  """sum(w * CE) / sum(w); 0 for a batch with no weighted targets."""
  return sums.loss / jnp.maximum(sums.weight, 1e-8)
