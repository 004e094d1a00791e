"""What the grid and the pause controls share: a training stage and result cells.

A cell is one finished run's result, written atomically as JSON, so a rerun of
either command skips what is complete and redoes what is not (`run_cell`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Callable, Mapping
from typing import Any

import gin


# Cell metrics that measure compute, not quality (the evaluator's
# TaskResult.compute and an adaptive model's pause counts): tabulated beside the
# quality metric, never chosen as it.
COMPUTE_METRICS = ("tokens_processed_per_answer", "pauses_per_token", "pauses_per_answer")


@gin.register(module=None)  # gin files of the grid and the controls bind `Stage`
@dataclasses.dataclass(frozen=True)
class Stage:
  """How one training stage runs (pretraining or finetuning)."""
  steps: int
  batch_size: int
  learning_rate: float
  warmup_steps: int = 0
  feature_lengths: Mapping[str, int] | None = None  # default: the task's
  z_loss: float = 0.0
  accum_steps: int = 1

  def train_kwargs(self) -> dict:
    return dict(train_steps=self.steps, batch_size=self.batch_size,
                learning_rate=self.learning_rate, warmup_steps=self.warmup_steps,
                z_loss=self.z_loss, accum_steps=self.accum_steps)


def finetune_lengths(base: Mapping[str, int], finetune: str, num_pauses: int
                     ) -> dict[str, int]:
  """The prefix keeps its full length; pauses (or fillers) get room of their own."""
  lengths = dict(base)
  if finetune != "StdFT":
    lengths["inputs"] += num_pauses
  return lengths


def read_json(path: str) -> Any:
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def write_json(path: str, value: Any) -> None:
  """Writes atomically: a cell is either complete or absent."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(value, f, indent=2, sort_keys=True)
  os.replace(tmp, path)


def run_cell(cell: str, model_dir: str, *, train: Callable[[], list[dict]],
             evaluate: Callable[[str], dict], record: Mapping[str, Any],
             keep_checkpoints: bool = False) -> dict:
  """One cell: train into `model_dir`, evaluate it, write `cell`; skipped when done.

  `train()` returns the logged metric rows (empty when a finished run is
  resumed), `evaluate(model_dir)` the metrics stored under "metrics". The cell
  also keeps the run's last logged loss and trained-token rate (the last
  logging window's: the first holds compilation). Checkpoints are deleted
  once the cell is written unless `keep_checkpoints`.
  """
  if os.path.exists(cell):
    return read_json(cell)
  from pause_flax.training import metrics as metrics_lib  # pylint: disable=g-import-not-at-top
  rows = train()
  last = rows[-1] if rows else metrics_lib.read_metrics(model_dir)[-1]
  result = {**record, "final_loss": last["loss"],
            "trained_tokens_per_sec": last.get("trained_tokens_per_sec"),
            "metrics": evaluate(model_dir)}
  write_json(cell, result)
  if not keep_checkpoints:
    shutil.rmtree(os.path.join(model_dir, "checkpoints"), ignore_errors=True)
  return result
