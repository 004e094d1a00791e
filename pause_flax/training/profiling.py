"""A `jax.profiler` trace of a window of training steps, into MODEL_DIR/profile.

`train.profile_steps = (start, count)` traces the `count` steps that follow the
first `start` steps of the run (steps start+1 .. start+count in metrics.jsonl's
numbering). The trace is written in the TensorBoard profile plugin's layout,
MODEL_DIR/profile/plugins/profile/<time>/<host>.xplane.pb: open it with
`tensorboard --logdir MODEL_DIR` (the Profile tab, from the tensorboard-plugin-profile
package) or xprof. Only process 0 traces. A run resumed past `start` traces nothing.
"""

from __future__ import annotations

import os
from typing import Any

from absl import logging
import jax

PROFILE_DIR = "profile"


class StepProfiler:
  """Starts and stops the trace; the loop calls `step` before each step and
  `stop` when it ends (normally or not)."""

  def __init__(self, model_dir: str, profile_steps: tuple[int, int] | None,
               *, is_primary: bool | None = None):
    self.log_dir = os.path.join(model_dir, PROFILE_DIR)
    self.window = None
    if profile_steps is not None:
      try:
        start, count = (int(v) for v in profile_steps)
      except (TypeError, ValueError):
        start = count = -1
      if start < 0 or count < 1:
        raise ValueError(
            f"train.profile_steps={profile_steps!r} must be (start, count) with start >= 0 "
            "and count >= 1, e.g. --gin.train.profile_steps=\"(10, 5)\".")
      self.window = (start, start + count)
    primary = jax.process_index() == 0 if is_primary is None else is_primary
    if not primary:
      self.window = None
    self.active = False
    self._annotation = None

  def step(self, step: int, state: Any) -> None:
    """Called before step `step` (0-based: `step` steps are done, `state` is
    their result)."""
    self._end_annotation()
    if self.window is None:
      return
    start, end = self.window
    if step == start and not self.active:
      os.makedirs(self.log_dir, exist_ok=True)
      logging.info("Profiling steps %d to %d into %s.", start + 1, end, self.log_dir)
      jax.profiler.start_trace(self.log_dir)
      self.active = True
    elif step == end and self.active:
      jax.block_until_ready(state)  # the traced steps' device work is done
      self.stop()
    if self.active:
      self._annotation = jax.profiler.StepTraceAnnotation("train", step_num=step + 1)
      self._annotation.__enter__()

  def stop(self) -> None:
    """Ends the trace if one runs (at the window's end, or the run's)."""
    self._end_annotation()
    if self.active:
      self.active = False
      jax.profiler.stop_trace()
      logging.info("Profile written to %s.", self.log_dir)

  def _end_annotation(self) -> None:
    if self._annotation is not None:
      self._annotation.__exit__(None, None, None)
      self._annotation = None
