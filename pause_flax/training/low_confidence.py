"""The scoring copy of the parameters for low-confidence (DIT) pauses.

With `LowConfidencePauses.refresh_every` = r > 1, each step scores its batch
with the parameters of the last step that is a multiple of r. That copy lives
in the optimizer state (`with_scorer`), so it is sharded like the parameters,
saved in every checkpoint and restored with it: a run stopped at any step
resumes exactly. With r = 1 the live parameters score and nothing is kept.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from pause_flax.data.low_confidence import LowConfidencePauses


class ScorerState(NamedTuple):
  """The optimizer's state, and the parameters that score batches."""
  inner: Any
  scorer: Any


def _copy(x):
  # A fresh buffer: the step donates its state, so the copy must not alias params.
  return jnp.array(x, copy=True) if isinstance(x, jax.Array) else x


def with_scorer(inner: optax.GradientTransformation) -> optax.GradientTransformation:
  """`inner`, with a copy of the parameters kept alongside its state.

  `update` leaves the copy as it is; the train step refreshes it
  (`scorer_params`, `keep_scorer`).
  """

  def init(params):
    return ScorerState(inner.init(params), jax.tree.map(_copy, params))

  def update(updates, state, params=None):
    updates, inner_state = inner.update(updates, state.inner, params)
    return updates, ScorerState(inner_state, state.scorer)

  return optax.GradientTransformation(init, update)


def keeps_scorer(policy: LowConfidencePauses | None) -> bool:
  """Whether the policy needs a scoring copy in the optimizer state."""
  return policy is not None and policy.refresh_every > 1


def scorer_params(policy: LowConfidencePauses, step: jax.Array, params: Any,
                  opt_state: Any) -> Any:
  """The parameters that score this step's batch: the live ones at a refresh
  step (a multiple of refresh_every), else the kept copy."""
  if not keeps_scorer(policy):
    return params
  refresh = step % policy.refresh_every == 0
  return jax.tree.map(lambda p, s: jnp.where(refresh, p, s), params, opt_state.scorer)


def keep_scorer(policy: LowConfidencePauses, opt_state: Any, scorer: Any) -> Any:
  """The optimizer state holding `scorer` (what this step scored with)."""
  if not keeps_scorer(policy):
    return opt_state
  return opt_state._replace(scorer=scorer)
