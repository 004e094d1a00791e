"""Low-confidence pause placement (DIT): pauses before the worst-predicted targets.

After "Learning to Insert [PAUSE] Tokens for Better Reasoning" (Kim, Kim and
Thorne, Findings of ACL 2025; code xfactlab/acl2025-dit): a scoring pass gives
the current model's loss on every target, and a `<pause>` is inserted before
each of the k targets it predicts worst, so that those targets are predicted
one position later, after the pause. docs/pause_policies.md says what the
paper and its code do and where this module differs.

`insert_low_confidence_pauses` is a pure-JAX batch transform on the model
features the feature converters produce (decoder_input_tokens,
decoder_target_tokens, decoder_loss_weights and, when packed,
decoder_segment_ids and decoder_positions). It runs inside the jitted train
step on global arrays: every row is transformed on its own, so a sharded or
multi-host batch needs nothing special. Only loss-bearing targets (weight > 0)
are candidates, so the finetuning prefix, padding and earlier pauses never get
one. The lengthened row is trimmed back to L at its tail, as the paper's
pretraining recipe does; a pause target has weight 0; ties in the loss go to
the earlier target. Imports jax and numpy only: the model's losses come in as
an array, the data layer never imports the model.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import jax
import jax.numpy as jnp

INPUTS, TARGETS, WEIGHTS = ("decoder_input_tokens", "decoder_target_tokens",
                            "decoder_loss_weights")
SEGMENTS, POSITIONS = "decoder_segment_ids", "decoder_positions"


@dataclasses.dataclass(frozen=True)
class LowConfidencePauses:
  """The low-confidence (DIT) placement setting of a training run.

  num_pauses: pauses per example (per packed segment): before its
    `num_pauses` highest-loss targets (1 is the released DIT code's default).
  fraction: instead of num_pauses, round(fraction * n) pauses per example,
    n its loss-bearing targets (for a full pretraining row, n = L).
  refresh_every: the scoring copy of the parameters is refreshed from the
    live ones every this many steps (1: each step scores with the live
    parameters, as the DIT code does; > 1 keeps a copy in the optimizer state,
    so it is checkpointed and a resumed run stays exact).
  """
  num_pauses: int | None = 1
  fraction: float | None = None
  refresh_every: int = 1

  def __post_init__(self):
    if self.fraction is not None and self.num_pauses is not None:
      raise ValueError(
          f"LowConfidencePauses: num_pauses={self.num_pauses!r} and "
          f"fraction={self.fraction!r} are both set; set one and pass None for the other.")
    if self.fraction is None:
      if (isinstance(self.num_pauses, bool) or not isinstance(self.num_pauses, int)
          or self.num_pauses < 1):
        raise ValueError(f"LowConfidencePauses.num_pauses={self.num_pauses!r} is invalid: "
                         "use an integer >= 1 (or set fraction instead).")
    elif (isinstance(self.fraction, bool) or not isinstance(self.fraction, (int, float))
          or not 0 < self.fraction < 1):
      raise ValueError(f"LowConfidencePauses.fraction={self.fraction!r} is invalid: use a "
                       "number in (0, 1).")
    if (isinstance(self.refresh_every, bool) or not isinstance(self.refresh_every, int)
        or self.refresh_every < 1):
      raise ValueError(f"LowConfidencePauses.refresh_every={self.refresh_every!r} is "
                       "invalid: use an integer >= 1 (steps between scorer refreshes).")


def _segments_BxL(batch: Mapping[str, jax.Array]) -> jax.Array:
  seg = batch.get(SEGMENTS)
  return jnp.ones_like(batch[TARGETS]) if seg is None else seg


def select_worst_targets(losses_BxL: jax.Array, weights_BxL: jax.Array,
                         segment_ids_BxL: jax.Array, *, num_pauses: int | None = None,
                         fraction: float | None = None) -> jax.Array:
  """bool [B, L]: the targets that get a pause before them.

  Per segment (the whole row when unpacked), the `num_pauses` (or
  round(fraction * n), n the segment's loss-bearing targets, rounding half to
  even) loss-bearing targets with the highest loss; equal losses go to the
  earlier target, and a NaN loss counts as the highest.
  """
  if (num_pauses is None) == (fraction is None):
    raise ValueError(f"select_worst_targets: pass exactly one of num_pauses={num_pauses!r} "
                     f"and fraction={fraction!r}.")
  b, l = losses_BxL.shape
  candidate_BxL = weights_BxL > 0
  loss = jnp.where(jnp.isnan(losses_BxL), jnp.inf, losses_BxL.astype(jnp.float32))
  # Sort each row by (segment, -loss, index): a segment's candidates come
  # first, worst first; every key tuple is distinct, so the order is total.
  neg_score = jnp.where(candidate_BxL, -loss, jnp.inf)
  index_BxL = jnp.broadcast_to(jnp.arange(l, dtype=jnp.int32), (b, l))
  seg_s, _, index_s = jax.lax.sort((segment_ids_BxL, neg_score, index_BxL), dimension=1,
                                   num_keys=3)
  start_s = jnp.concatenate([jnp.ones((b, 1), bool), seg_s[:, 1:] != seg_s[:, :-1]], axis=1)
  rank_s = index_BxL - jax.lax.cummax(jnp.where(start_s, index_BxL, 0), axis=1)
  candidate_s = jnp.take_along_axis(candidate_BxL, index_s, axis=1)
  if num_pauses is not None:
    k_s = num_pauses
  else:
    count = jax.vmap(lambda c, s: jax.ops.segment_sum(c, s, num_segments=l + 1))(
        candidate_BxL.astype(jnp.float32), jnp.clip(segment_ids_BxL, 0, l))
    n_s = jnp.take_along_axis(count, jnp.clip(seg_s, 0, l), axis=1)
    k_s = jnp.round(fraction * n_s).astype(jnp.int32)
  chosen_s = candidate_s & (rank_s < k_s)
  # Back to the original order: sort by index.
  _, chosen = jax.lax.sort((index_s, chosen_s), dimension=1, num_keys=1)
  return chosen


def insert_pauses_before(batch: Mapping[str, jax.Array], insert_BxL: jax.Array,
                         pause_id: int) -> dict[str, jax.Array]:
  """The batch with a `<pause>` inserted before every target where `insert_BxL`.

  A pause before target j takes j's slot: its input is j's input, its target
  the pause (weight 0); j moves one slot right with the pause as its input.
  Everything after shifts right and the row is cut back to L. Segment ids
  follow their tokens; positions count the pauses of their own segment.
  Features other than the five model features are dropped.
  """
  targets = batch[TARGETS]
  b, l = targets.shape
  ins_BxL = insert_BxL.astype(jnp.int32)
  count_BxL = jnp.cumsum(ins_BxL, axis=1)       # pauses at or before j
  index = jnp.arange(l, dtype=jnp.int32)
  dest_BxL = index + count_BxL                  # where target j lands
  # Output slot i holds target src[i] (dest[src] == i) or the pause before it.
  src_BxL = jax.vmap(lambda d: jnp.searchsorted(d, index, side="left"))(dest_BxL)
  src_BxL = src_BxL.astype(jnp.int32)
  take = lambda x: jnp.take_along_axis(x, src_BxL, axis=1)
  is_pause = take(dest_BxL) != index
  pause = jnp.asarray(pause_id, targets.dtype)
  inputs = take(batch[INPUTS])
  out = {
      INPUTS: jnp.where(is_pause | (take(ins_BxL) == 0), inputs,
                        jnp.asarray(pause_id, inputs.dtype)),
      TARGETS: jnp.where(is_pause, pause, take(targets)),
      WEIGHTS: jnp.where(is_pause, jnp.zeros((), batch[WEIGHTS].dtype), take(batch[WEIGHTS])),
  }
  if SEGMENTS in batch:
    seg = batch[SEGMENTS]
    out[SEGMENTS] = take(seg)
    if POSITIONS in batch:
      # Pauses inserted at or before j within j's own segment.
      start = jnp.concatenate([jnp.ones((b, 1), bool), seg[:, 1:] != seg[:, :-1]], axis=1)
      before_start = jax.lax.cummax(jnp.where(start, count_BxL - ins_BxL, 0), axis=1)
      shift_BxL = (count_BxL - before_start).astype(batch[POSITIONS].dtype)
      out[POSITIONS] = take(batch[POSITIONS] + shift_BxL) - is_pause.astype(shift_BxL.dtype)
  elif POSITIONS in batch:
    out[POSITIONS] = take(batch[POSITIONS] + count_BxL.astype(batch[POSITIONS].dtype)) - (
        is_pause.astype(batch[POSITIONS].dtype))
  return out


def insert_low_confidence_pauses(batch: Mapping[str, jax.Array], losses_BxL: jax.Array,
                                 pause_id: int, *, num_pauses: int | None = None,
                                 fraction: float | None = None) -> dict[str, jax.Array]:
  """The DIT transform: pauses before each segment's highest-loss targets.

  `losses_BxL` is the scoring model's loss on each target of `batch` (any
  value where the weight is 0). See `select_worst_targets` and
  `insert_pauses_before`.
  """
  chosen = select_worst_targets(losses_BxL, batch[WEIGHTS], _segments_BxL(batch),
                                num_pauses=num_pauses, fraction=fraction)
  return insert_pauses_before(batch, chosen, pause_id)


def apply_policy(policy: LowConfidencePauses, batch: Mapping[str, jax.Array],
                 losses_BxL: jax.Array, pause_id: int) -> dict[str, jax.Array]:
  """`insert_low_confidence_pauses` with a LowConfidencePauses' count."""
  return insert_low_confidence_pauses(batch, losses_BxL, pause_id,
                                      num_pauses=policy.num_pauses,
                                      fraction=policy.fraction)
