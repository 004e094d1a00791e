"""Catch Your Breath losses: a model that asks for its own pauses.

After Galashov et al. 2025 ("Catch Your Breath: Adaptive Computation for
Self-Paced Sequence Production", arXiv 2510.13879). The model has one more
output class, ask (the paper's `<don't know>`), in the same softmax as the
vocabulary. When it asks, a `<pause>` is fed as the next input and it answers
again, up to K times. Training sequences are unrolled by the data layer
(`pause_flax.data.adaptive`): every scored position is followed by K pauses,
and the K + 1 outputs of a group (steps k = 0..K) are all trained towards the
same next token y.

Per group, with p_k the softmax at step k over the vocabulary and ask:

  q_k = p_k(ask)                      ask for another pause at step k
  a_k = p_k(y)                        answer y at step k
  S_k = prod_{j<k} q_j                still pausing when step k is reached
  ã_K = a_K / (1 - q_K)               at step K ask is banned: renormalised

  CYB-AP  loss = -log sum_{k<K} gamma^k S_k a_k + gamma^K S_K ã_K
          the log of the expected discounted accuracy of the token the model
          emits: an answer at step k earns gamma^k (the time cost of k pauses).
          K = 0 gives the ordinary cross-entropy (ask left out of the softmax).
  CYB-VA  loss = sum_k h_k (-log ã_k) + beta * KL(h || prior)
          h_k = S_k (1 - q_k) (h_K = S_K) is the stopping-time distribution,
          ã_k = a_k / (1 - q_k) the answer at step k; the prior is geometric
          (halting probability `va_prior_halt` per step, the rest at K).
  CYB-DP  + penalty * max(0, mean_t E[N_t] - budget),  E[N_t] = sum_{k=1..K} S_k
          the expected pauses per scored token, averaged over the (micro-)batch,
          added to either loss (0 budget: a linear cost per expected pause).

The paper's own equations could not be read when this was written (only its
abstract was reachable); these are reconstructions from the abstract's
description, written down in docs/pause_policies.md with what was assumed.

Everything here is a pure function of logits, targets, weights and the step of
each slot; the trainer calls `cyb_loss_sums` in place of the cross-entropy.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from pause_flax.training import loss as loss_lib

LOSSES = ("ap", "va")


@dataclasses.dataclass(frozen=True)
class AdaptivePauses:
  """Catch Your Breath training: `train(adaptive_pauses=AdaptivePauses(...))`.

  Attributes:
    max_pauses: K, the pauses unrolled after every scored position in training
      (each training sequence grows by K slots per scored token).
    loss: 'ap' (anytime prediction) or 'va' (variational, stopping-time prior).
    discount: gamma in (0, 1] of CYB-AP, the value left to a correct answer
      after each pause.
    budget_penalty: CYB-DP's weight (0: no budget term).
    pause_budget: CYB-DP's budget, expected pauses per scored token.
    va_prior_halt: CYB-VA's geometric prior, the probability of halting at each
      step (in (0, 1)).
    va_kl_weight: CYB-VA's beta.
  """
  max_pauses: int = 3
  loss: str = "ap"
  discount: float = 0.9
  budget_penalty: float = 0.0
  pause_budget: float = 0.0
  va_prior_halt: float = 0.5
  va_kl_weight: float = 0.01

  def __post_init__(self):
    k = self.max_pauses
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
      raise ValueError(f"AdaptivePauses.max_pauses={k!r} is invalid: use an integer >= 0.")
    if self.loss not in LOSSES:
      raise ValueError(f"AdaptivePauses.loss={self.loss!r} is invalid: use 'ap' (anytime "
                       "prediction) or 'va' (variational).")
    if not 0 < self.discount <= 1:
      raise ValueError(f"AdaptivePauses.discount={self.discount!r} must lie in (0, 1].")
    for name in ("budget_penalty", "pause_budget", "va_kl_weight"):
      if not getattr(self, name) >= 0:
        raise ValueError(f"AdaptivePauses.{name}={getattr(self, name)!r} must be >= 0.")
    if not 0 < self.va_prior_halt < 1:
      raise ValueError(
          f"AdaptivePauses.va_prior_halt={self.va_prior_halt!r} must lie in (0, 1).")


class StepTerms(NamedTuple):
  """Per-slot log-probabilities a loss needs ([B, N] each, float32)."""
  log_a: jax.Array        # log p(y), ask in the softmax
  log_q: jax.Array        # log p(ask)
  log_not_q: jax.Array    # log (1 - p(ask))
  log_z: jax.Array        # log partition (for the z-loss)
  answer_is_y: jax.Array  # the largest non-ask logit is y's (a tie counts)
  asks: jax.Array         # the ask logit is the largest


def step_terms(logits_BxNxV: jax.Array, targets_BxN: jax.Array, ask_id: int) -> StepTerms:
  """The per-slot terms, in float32, from [B, N, V] logits."""
  logits = logits_BxNxV.astype(jnp.float32)
  is_ask = jnp.arange(logits.shape[-1]) == ask_id
  log_z = jax.nn.logsumexp(logits, axis=-1)
  answer_logits = jnp.where(is_ask, -jnp.inf, logits)
  log_z_answer = jax.nn.logsumexp(answer_logits, axis=-1)
  target_logit = jnp.take_along_axis(logits, targets_BxN[..., None], axis=-1)[..., 0]
  ask_logit = logits[..., ask_id]
  best_answer = jnp.max(answer_logits, axis=-1)
  return StepTerms(log_a=target_logit - log_z, log_q=ask_logit - log_z,
                   log_not_q=log_z_answer - log_z, log_z=log_z,
                   answer_is_y=target_logit >= best_answer,
                   asks=ask_logit > best_answer)


def _groups(x_BxN: jax.Array, k: int, fill) -> jax.Array:
  """[B, N] -> [B, N, K+1]: slot n's value and those of the K slots after it."""
  padded = jnp.pad(x_BxN, [(0, 0), (0, k)], constant_values=fill)
  n = x_BxN.shape[1]
  return jnp.stack([padded[:, i:i + n] for i in range(k + 1)], axis=-1)


class GroupLoss(NamedTuple):
  """Per-position results ([B, N]; meaningful where a group starts)."""
  loss: jax.Array             # the CYB-AP or CYB-VA loss, without the budget term
  expected_pauses: jax.Array  # E[N] = sum_{k>=1} S_k
  greedy_pauses: jax.Array    # pauses greedy decoding would take (teacher-forced)
  greedy_correct: jax.Array   # greedy decoding's answer is y
  greedy_ce: jax.Array        # -log of y's probability in the distribution it answers from
  z: jax.Array                # mean over the group's steps of log(Z)^2


def group_losses(terms: StepTerms, options: AdaptivePauses) -> GroupLoss:
  """CYB per position, reading slots n..n+K as the steps 0..K of position n."""
  k = options.max_pauses
  g = lambda x, fill=0.0: _groups(x, k, fill)
  log_a, log_q, log_not_q = g(terms.log_a), g(terms.log_q), g(terms.log_not_q)
  steps = jnp.arange(k + 1)
  last = steps == k
  # log S_k: an exclusive cumulative sum of log q over the steps before k.
  log_s = jnp.cumsum(log_q, axis=-1) - log_q
  log_answer = log_a - log_not_q  # log ã_k: the answer with ask banned
  if options.loss == "ap":
    log_gain = jnp.where(last, log_answer, log_a)
    loss = -jax.nn.logsumexp(steps * math.log(options.discount) + log_s + log_gain, axis=-1)
  else:
    log_h = log_s + jnp.where(last, 0.0, log_not_q)  # stopping-time distribution
    h = jnp.exp(log_h)
    p = options.va_prior_halt
    log_prior = jnp.where(last, k * math.log1p(-p), steps * math.log1p(-p) + math.log(p))
    kl = jnp.sum(h * (log_h - log_prior), axis=-1)
    loss = jnp.sum(h * -log_answer, axis=-1) + options.va_kl_weight * kl
  expected = jnp.sum(jnp.exp(log_s[..., 1:]), axis=-1)
  # Greedy: ask while the ask logit is the largest, never at step K.
  asks = g(terms.asks, False) & ~last
  halted = jnp.cumprod(asks, axis=-1)  # 1 while still pausing
  greedy_pauses = jnp.sum(halted, axis=-1)
  at_halt = steps == greedy_pauses[..., None]
  greedy_correct = jnp.any(at_halt & g(terms.answer_is_y, False), axis=-1)
  greedy_ce = -jnp.sum(jnp.where(at_halt, log_answer, 0.0), axis=-1)
  z = jnp.mean(jnp.square(g(terms.log_z)), axis=-1)
  return GroupLoss(loss, expected, greedy_pauses.astype(jnp.float32),
                   greedy_correct.astype(jnp.float32), greedy_ce, z)


def cyb_loss_sums(logits_BxNxV: jax.Array, targets_BxN: jax.Array, weights_BxN: jax.Array,
                  pause_steps_BxN: jax.Array, *, ask_id: int, options: AdaptivePauses,
                  z_loss: float = 0.0) -> tuple[loss_lib.LossSums, dict[str, jax.Array]]:
  """The CYB loss as the trainer's sums, and sums of the pause statistics.

  Each slot with `pause_steps == 0` and weight > 0 starts a group; the K slots
  after it are its pauses (the data layer builds them so). Sums are over groups
  weighted by their weight: `loss` (with the z-loss and CYB-DP's term),
  `ce` (the greedy answer's cross-entropy), `correct` (the greedy answer is y),
  `weight`; the dict holds the sums of expected and greedy pauses.
  """
  w = jnp.where(pause_steps_BxN == 0, weights_BxN.astype(jnp.float32), 0.0)
  keep = w > 0
  r = group_losses(step_terms(logits_BxNxV, targets_BxN, ask_id), options)
  total = lambda x: jnp.sum(w * jnp.where(keep, x, 0.0))
  weight = jnp.sum(w)
  loss, z, expected = total(r.loss), total(r.z), total(r.expected_pauses)
  loss = loss + z_loss * z
  if options.budget_penalty:
    mean_pauses = expected / jnp.maximum(weight, 1e-8)
    loss = loss + options.budget_penalty * weight * jax.nn.relu(
        mean_pauses - options.pause_budget)
  sums = loss_lib.LossSums(loss=loss, ce=total(r.greedy_ce), z=z,
                           correct=total(r.greedy_correct), weight=weight)
  return sums, {"expected_pauses": expected, "greedy_pauses": total(r.greedy_pauses)}
