"""AdamW with warmup + decay schedules and global-norm clipping, from optax."""

from __future__ import annotations

from typing import Any, Callable

import jax
import optax

DECAYS = ("cosine", "linear", "rsqrt", "constant")


def make_schedule(peak_learning_rate: float, total_steps: int, warmup_steps: int = 0,
                  decay: str = "cosine", end_learning_rate_fraction: float = 0.1,
                  ) -> optax.Schedule:
  """Linear warmup from 0 to the peak, then the chosen decay until total_steps.

  rsqrt decays as peak * sqrt(warmup / step) after warmup (T5's inverse square
  root, continuous at the end of warmup), never below the end value.
  """
  if decay not in DECAYS:
    raise ValueError(f"train.decay={decay!r} is not one of {DECAYS}.")
  if peak_learning_rate <= 0:
    raise ValueError(f"LEARNING_RATE={peak_learning_rate} must be > 0.")
  if not 0 <= warmup_steps <= total_steps:
    raise ValueError(
        f"WARMUP_STEPS={warmup_steps} must be between 0 and TRAIN_STEPS={total_steps}.")
  end = peak_learning_rate * end_learning_rate_fraction
  decay_steps = max(total_steps - warmup_steps, 1)
  warmup = optax.linear_schedule(0.0, peak_learning_rate, max(warmup_steps, 1))
  if decay == "cosine":
    tail = optax.cosine_decay_schedule(peak_learning_rate, decay_steps,
                                       alpha=end_learning_rate_fraction)
  elif decay == "linear":
    tail = optax.linear_schedule(peak_learning_rate, end, decay_steps)
  elif decay == "constant":
    tail = optax.constant_schedule(peak_learning_rate)
  else:
    w = max(warmup_steps, 1)

    def tail(count):
      return jax.numpy.maximum(
          peak_learning_rate * jax.lax.rsqrt((count + w) / w), end)
  if warmup_steps == 0:
    return tail
  return optax.join_schedules([warmup, tail], [warmup_steps])


def decay_mask(params: Any) -> Any:
  """True for weights that get weight decay: matrices, not norms or biases.

  Decides by rank (>= 2): norm scales and biases are vectors.
  """
  return jax.tree.map(lambda p: getattr(p, "ndim", 0) >= 2, params)


def make_optimizer(learning_rate: float | optax.Schedule, *, b1: float = 0.9,
                   b2: float = 0.95, eps: float = 1e-8, weight_decay: float = 0.1,
                   clip_norm: float | None = 1.0,
                   mask: Callable[[Any], Any] | None = decay_mask,
                   ) -> optax.GradientTransformation:
  """Global-norm clipping, then AdamW (decoupled weight decay, masked)."""
  if clip_norm is not None and clip_norm <= 0:
    raise ValueError(f"make_optimizer.clip_norm={clip_norm} must be positive, or None to "
                     "disable clipping.")
  parts = []
  if clip_norm is not None:
    parts.append(optax.clip_by_global_norm(clip_norm))
  parts.append(optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps,
                           weight_decay=weight_decay, mask=mask))
  return optax.chain(*parts)
