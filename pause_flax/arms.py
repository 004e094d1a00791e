"""Arms: one row of a pause comparison, as the grid and the controls run it.

An arm says how a task's training data gets pauses and how the trained model
is evaluated, so that any placement x count x token choice, DIT's
low-confidence pauses and Catch Your Breath's adaptive pauses compare against
the same baseline on the same seeds (docs/pause_policies.md):

  Arm("NoPause")                                         the prefix alone
  Arm("Pause", placement="append", count=20)             the paper's M_ft / M_inf
  Arm("Filler", placement="append", count=20, token="filler")
  Arm("Repeat", placement="append", count=20, token="repeat")   the prompt's first 20 tokens
  Arm("SupervisedPause", placement="append", count=20, pause_weight=1)
  Arm("BeforeAnswer", placement=policies.BeforeMarker("="), count=20)
  Arm("Curriculum", placement="append", count=policies.Curriculum(20, 6400))
  Arm("LowConfidence", low_confidence=LowConfidencePauses(num_pauses=2))
  Arm("Adaptive", adaptive=AdaptivePauses(max_pauses=2))

`plan(arm, task, ...)` resolves an arm into the Task it trains on, the extra
`loop.train` arguments, and how to evaluate it: 'append' arms with pauses or a
filler are evaluated as the paper does (prefix + M_inf appended); other
placements on the variant's own prompts (`Evaluator(placed_prompts=True)`,
the pauses where the policy puts them, with the count fixed at M_inf);
low-confidence arms without pauses in the prompt (DIT inserts them in the
answer in training); adaptive arms by adaptive decoding (the model asks).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import gin

from pause_flax.data import low_confidence as low_confidence_lib
from pause_flax.data import policies
from pause_flax.training import adaptive as adaptive_lib

TOKENS = ("pause", "filler", "repeat")


@gin.register(module=None)  # gin files bind `Arm`: run_control.arms = [@nopause/Arm(), ...]
@dataclasses.dataclass(frozen=True)
class Arm:
  """One row of a comparison (see the module docstring).

  Attributes:
    name: the row's label in tables and cell paths.
    placement: None (no pauses in the data), a placement name ('append',
      'before_marker', 'segments', 'uniform') or a `policies.Placement`.
    count: pauses per example: an int (fixed), a float (a fraction of L), a
      (lo, hi) pair, or a `policies` count (e.g. `Curriculum`); None: the
      comparison's M for the task (its `num_pauses`).
    token: 'pause', 'filler' (the comparison's filler text in place of
      `<pause>`), or 'repeat' (the prompt's own first M tokens: the same
      extra positions with content; appended, a fixed count).
    pause_weight: > 0 trains the pause outputs on the task's `pause_targets`
      (supervised pauses; the task must have them).
    low_confidence: DIT's training (`LowConfidencePauses`); no placement then.
    adaptive: Catch Your Breath's training (`AdaptivePauses`); no placement then.
    m_inf: the pauses at evaluation; default: the count when it is fixed, a
      curriculum's end, a range's upper end; 0 without pauses.
    pretrain: in the grid, the pretrained model the arm finetunes ('StdPT' or
      'PausePT'); the controls train from scratch and ignore it.
  """
  name: str
  placement: Any = None
  count: Any = None
  token: str = "pause"
  pause_weight: int = 0
  low_confidence: low_confidence_lib.LowConfidencePauses | None = None
  adaptive: adaptive_lib.AdaptivePauses | None = None
  m_inf: int | None = None
  pretrain: str = "StdPT"

  def __post_init__(self):
    if not isinstance(self.name, str) or not self.name or "/" in self.name:
      raise ValueError(f"Arm.name={self.name!r}: give a non-empty label without '/'.")
    if self.token not in TOKENS:
      raise ValueError(f"Arm {self.name}: token={self.token!r}; choose from {TOKENS}.")
    special = [k for k in ("low_confidence", "adaptive") if getattr(self, k) is not None]
    if len(special) > 1 or (special and self.placement is not None):
      raise ValueError(f"Arm {self.name}: {special + ['placement'] * (self.placement is not None)}"
                       " each place their own pauses; set one of them.")
    if self.placement is None and (self.count is not None or self.pause_weight or
                                   self.token != "pause"):
      raise ValueError(f"Arm {self.name}: count / token / pause_weight need a placement "
                       "(e.g. placement='append').")
    if self.token == "repeat" and not (
        (self.placement == "append" or isinstance(self.placement, policies.Append))
        and (self.count is None or isinstance(self.count, int)) and not self.pause_weight):
      raise ValueError(f"Arm {self.name}: token='repeat' (a repeat of the prompt) takes "
                       "placement='append', a fixed count and pause_weight=0.")
    if self.m_inf is not None and (isinstance(self.m_inf, bool) or
                                   not isinstance(self.m_inf, int) or self.m_inf < 0):
      raise ValueError(f"Arm {self.name}: m_inf={self.m_inf!r} must be an integer >= 0.")

  def with_count(self, num_pauses: int) -> "Arm":
    """The arm with the comparison's M as its count, when it names none."""
    if self.placement is None or self.count is not None:
      return self
    return dataclasses.replace(self, count=num_pauses)

  @property
  def eval_pauses(self) -> int:
    """M_inf: the pauses the arm is evaluated with (see `m_inf`)."""
    if self.m_inf is not None:
      return self.m_inf
    if self.placement is None:
      return 0
    m = _most(self.count)
    if m is None:
      raise ValueError(f"Arm {self.name}: count={self.count!r} has no fixed M; set m_inf.")
    return m

  @property
  def supervised(self) -> bool:
    return self.pause_weight > 0


@dataclasses.dataclass(frozen=True)
class Plan:
  """What running an arm on one task takes."""
  train_task: str                  # the Task `loop.train` reads
  train_kwargs: dict               # low_confidence / adaptive_pauses for `loop.train`
  extra_lengths: dict              # room for pauses: feature -> tokens added to its length
  eval_task: str                   # the name an Evaluator is built on
  placed_prompts: bool             # Evaluator(placed_prompts=...)
  m_inf: int                       # Evaluator.evaluate(model, m_inf)
  max_pauses_per_token: int | None = None   # adaptive arms' decoding budget


def plan(arm: Arm, task: str, filler_id: int | None) -> Plan:
  """Resolves `arm` on `task` (a Task with 'inputs' and 'targets')."""
  from pause_flax.data import tasks as tasks_lib  # pylint: disable=g-import-not-at-top
  if arm.adaptive is not None:
    return Plan(task, {"adaptive_pauses": arm.adaptive}, {}, task, False, 0,
                arm.adaptive.max_pauses)
  if arm.low_confidence is not None:
    # DIT puts its pauses into the answer ('targets'): room for them there.
    room = arm.low_confidence.num_pauses or 0
    return Plan(task, {"low_confidence": arm.low_confidence}, {"targets": room}, task,
                False, 0)
  if arm.placement is None:
    return Plan(task, {}, {}, task, False, 0)
  if arm.token == "filler" and filler_id is None:
    raise ValueError(f"Arm {arm.name}: token='filler' needs the comparison's filler text.")
  placement = policies.as_placement(arm.placement)
  m = arm.eval_pauses
  if arm.token == "repeat":
    # Trained and evaluated on the same variant: its prompts carry the repeat.
    train = tasks_lib.pause_variant(task, form="finetune", placement=placement,
                                    count=arm.count, pause_token=tasks_lib.REPEAT)
    return Plan(train, {}, {"inputs": m}, train, True, 0)
  token = filler_id if arm.token == "filler" else None
  train = tasks_lib.pause_variant(task, form="finetune", placement=placement, count=arm.count,
                                  pause_token=token, pause_weight=arm.pause_weight)
  room = {"inputs": max(m, _most(arm.count) or 0)}
  if placement == policies.default_placement("inputs"):
    # The paper's prompt: prefix + M_inf appended (pauses, or the filler).
    evaluate = (task if token is None else
                tasks_lib.pause_variant(task, form="finetune", num_pauses=m, pause_token=token))
    return Plan(train, {}, room, evaluate, False, m)
  evaluate = tasks_lib.pause_variant(task, form="finetune", placement=placement,
                                     count=policies.Fixed(m), pause_token=token)
  return Plan(train, {}, room, evaluate, True, 0)


def _most(count) -> int | None:
  """The most pauses a count gives an example (a fixed count, a curriculum's
  end, a range's upper end); None for a fraction."""
  count = policies.as_count(count)
  for attr in ("num_pauses", "end", "hi"):
    if isinstance(getattr(count, attr, None), int):
      return getattr(count, attr)
  return None
