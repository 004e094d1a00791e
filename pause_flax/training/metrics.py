"""Reporting: metrics.jsonl, TensorBoard (clu writers), optional Weights & Biases,
and console progress.

Only process 0 writes files (and logs to W&B); every process may log to its
console. tokens_per_sec counts every input slot (batch x length);
trained_tokens_per_sec counts the targets the loss weighs (pauses, prompts and
padding excluded), summed over the steps of the logging window. MFU is model
FLOPs per second (see `pause_flax.model.transformer.flops_per_token`) over the
devices' peak FLOPs per second.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import os
import secrets
import string
import time
from typing import Any, Mapping

import jax
import numpy as np
from absl import logging

from pause_flax.training import run_dir

# Dense peak FLOP/s per chip for the compute dtype bf16 (vendor figures).
_PEAK_FLOPS_BY_KIND = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v6 lite": 918e12,
    "NVIDIA H100": 989e12,
    "NVIDIA H200": 989e12,
    "NVIDIA A100": 312e12,
}


def measure_matmul_peak(size: int = 1024, repeats: int = 5,
                        dtype: Any = np.float32) -> float:
  """FLOP/s of a square product of random matrices on the default device (best of `repeats`).

  Random, not constant, data: some chips multiply zeros or ones measurably faster.
  """
  ka, kb = jax.random.split(jax.random.key(0))
  a = jax.random.normal(ka, (size, size), dtype)
  b = jax.random.normal(kb, (size, size), dtype)
  f = jax.jit(lambda x, y: x @ y)
  f(a, b).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    t = time.perf_counter()
    f(a, b).block_until_ready()
    best = min(best, time.perf_counter() - t)
  return 2 * size**3 / best


def peak_flops_per_device(override: float | None = None) -> float:
  """The per-device peak used for MFU: an override, a known chip, or measured."""
  if override:
    return float(override)
  kind = jax.devices()[0].device_kind
  for prefix, flops in _PEAK_FLOPS_BY_KIND.items():
    if kind.startswith(prefix):
      return flops
  return measure_matmul_peak()


def _scalar(v: Any) -> float | int:
  v = np.asarray(v)
  return v.item() if v.size == 1 else float(v.mean())


@dataclasses.dataclass(frozen=True)
class WandbOptions:
  """Weights & Biases logging (off while `project` is None; then wandb is never imported).

  The run's id is kept in MODEL_DIR/wandb_run_id, so a resumed run logs into
  the same W&B run. `mode` None follows wandb (WANDB_MODE, e.g. 'offline');
  `dir` None: $WANDB_DIR if set, else MODEL_DIR (when local), for wandb's files.
  """
  project: str | None = None
  entity: str | None = None
  name: str | None = None          # None: MODEL_DIR's base name
  group: str | None = None
  tags: tuple[str, ...] = ()
  mode: str | None = None          # 'online' | 'offline' | 'disabled'
  dir: str | None = None


WANDB_RUN_ID = "wandb_run_id"


def gin_settings(config_text: str) -> dict[str, Any]:
  """{setting as typed on the command line: value} of an operative gin config
  (Python literals as values, references and macros as text)."""
  out = {}
  for name, text in run_dir.parse_config(config_text).items():
    try:
      out[name] = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      out[name] = text
  return out


class WandbWriter:
  """Scalars to one W&B run per MODEL_DIR, the gin settings as its config."""

  def __init__(self, model_dir: str, options: WandbOptions, config_text: str | None):
    import wandb  # pylint: disable=g-import-not-at-top
    id_path = os.path.join(model_dir, WANDB_RUN_ID)
    if os.path.exists(id_path):
      with open(id_path, encoding="utf-8") as f:
        run_id = f.read().strip()
    else:
      run_id = "".join(secrets.choice(string.ascii_lowercase + string.digits)
                       for _ in range(8))  # W&B's own id form
      with open(id_path, "w", encoding="utf-8") as f:
        f.write(run_id + "\n")
    local_dir = options.dir
    if local_dir is None and not os.environ.get("WANDB_DIR") and "://" not in model_dir:
      local_dir = model_dir
    try:
      self.run = wandb.init(
          project=options.project, entity=options.entity, group=options.group,
          name=options.name or os.path.basename(os.path.normpath(model_dir)),
          tags=list(options.tags) or None, mode=options.mode, dir=local_dir,
          id=run_id, resume="allow")
    except Exception as e:  # pylint: disable=broad-except
      raise ValueError(
          f"W&B could not start the run {run_id} of project {options.project!r} "
          f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}): run `wandb "
          "login`, or set WANDB_MODE=offline, or leave WANDB_PROJECT unset.") from e
    if config_text is not None:
      # A resume may have changed safe settings (TRAIN_STEPS, ...): today's win.
      self.run.config.update({**gin_settings(config_text), "gin_config": config_text},
                             allow_val_change=True)
    logging.info("W&B run %s (project %s), id in %s.", run_id, options.project, id_path)

  def write(self, step: int, scalars: Mapping[str, float]) -> None:
    # A resumed run logs again the steps past its checkpoint; W&B keeps the
    # first row of a step (a resume is bitwise, so they are the same values).
    self.run.log(dict(scalars), step=step)

  def close(self) -> None:
    self.run.finish()


class MetricsLogger:
  """Writes one JSON object per logged step plus TensorBoard (and W&B) scalars."""

  def __init__(self, model_dir: str, *, total_steps: int, is_primary: bool | None = None,
               wandb: WandbOptions | None = None, config_text: str | None = None):
    self.is_primary = jax.process_index() == 0 if is_primary is None else is_primary
    self.total_steps = total_steps
    self._jsonl = None
    self._writer = None
    self._wandb = None
    if self.is_primary:
      from clu import metric_writers  # pylint: disable=g-import-not-at-top
      os.makedirs(model_dir, exist_ok=True)
      self._jsonl = open(os.path.join(model_dir, "metrics.jsonl"), "a", encoding="utf-8")
      self._writer = metric_writers.SummaryWriter(os.path.join(model_dir, "tensorboard"))
      if wandb is not None and wandb.project:
        try:
          self._wandb = WandbWriter(model_dir, wandb, config_text)
        except Exception:
          self.close()
          raise
    self._start_time = time.time()
    self._start_step: int | None = None

  def truncate_after(self, step: int) -> None:
    """Drops rows past `step` (a resumed run logs those steps again)."""
    if not self.is_primary:
      return
    path = self._jsonl.name
    self._jsonl.close()
    with open(path, encoding="utf-8") as f:
      lines = [l for l in f if l.strip() and json.loads(l)["step"] <= step]
    with open(path, "w", encoding="utf-8") as f:
      f.writelines(lines)
    self._jsonl = open(path, "a", encoding="utf-8")

  def write(self, step: int, metrics: Mapping[str, Any]) -> dict[str, float]:
    """Logs metrics of `step` (1-based count of completed steps)."""
    row = {"step": int(step)}
    row.update({k: _scalar(v) for k, v in sorted(metrics.items())})
    if self._start_step is None:
      self._start_step = step - 1
      self._start_time = time.time() - float(row.get("step_time", 0.0))
    if self.is_primary:
      self._jsonl.write(json.dumps(row) + "\n")
      self._jsonl.flush()
      scalars = {k: v for k, v in row.items() if k != "step"}
      self._writer.write_scalars(step, scalars)
      if self._wandb is not None:
        self._wandb.write(step, scalars)
    self._console(row)
    return row

  def _console(self, row: Mapping[str, Any]) -> None:
    step = row["step"]
    done = step - (self._start_step or 0)
    elapsed = time.time() - self._start_time
    rate = done / elapsed if elapsed > 0 else 0.0
    eta = (self.total_steps - step) / rate if rate > 0 else float("nan")
    parts = [f"step {step}/{self.total_steps}", f"loss {row.get('loss', float('nan')):.4f}"]
    if "accuracy" in row:
      parts.append(f"acc {row['accuracy']:.3f}")
    if "tokens_per_sec" in row:
      parts.append(f"{row['tokens_per_sec']:,.0f} tok/s")
    if "trained_tokens_per_sec" in row:
      parts.append(f"{row['trained_tokens_per_sec']:,.0f} trained tok/s")
    if "mfu" in row:
      parts.append(f"MFU {100 * row['mfu']:.1f}%")
    parts.append(f"{rate:.2f} steps/s")
    parts.append(f"ETA {_format_seconds(eta)}")
    logging.info(" | ".join(parts))

  def flush(self) -> None:
    if self._writer is not None:
      self._writer.flush()

  def close(self) -> None:
    if self._writer is not None:
      self._writer.close()
    if self._jsonl is not None:
      self._jsonl.close()
    if self._wandb is not None:
      self._wandb.close()
      self._wandb = None


def _format_seconds(seconds: float) -> str:
  if not np.isfinite(seconds):
    return "?"
  seconds = int(seconds)
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def read_metrics(model_dir: str) -> list[dict[str, Any]]:
  """The rows of MODEL_DIR/metrics.jsonl (for tools and tests)."""
  path = os.path.join(model_dir, "metrics.jsonl")
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]
