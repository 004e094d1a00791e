"""What the grid and the pause controls share: a training stage and result cells.

A cell is one finished run's result, written atomically as JSON, so a rerun of
either command skips what is complete and redoes what is not (`run_cell`).
A cell is claimed (a lock in its run directory) while it trains and is
evaluated, so that worker processes (`run_workers`) can share a list of cells.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from absl import logging
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


CELL_LOCK_NAME = "CELL_LOCK"  # in the cell's run directory, beside loop.train's RUN_LOCK


def run_cell(cell: str, model_dir: str, *, train: Callable[[], list[dict]],
             evaluate: Callable[[str], dict], record: Mapping[str, Any],
             keep_checkpoints: bool = False, skip_busy: bool = False) -> dict | None:
  """One cell: train into `model_dir`, evaluate it, write `cell`; skipped when done.

  `train()` returns the logged metric rows (empty when a finished run is
  resumed), `evaluate(model_dir)` the metrics stored under "metrics". The cell
  also keeps the run's last logged loss and trained-token rate (the last
  logging window's: the first holds compilation). Checkpoints are deleted
  once the cell is written unless `keep_checkpoints`.
  The cell is claimed (`model_dir`/CELL_LOCK) from training to the written
  result. A cell another live process holds is refused (run_dir.RunDirInUse),
  or with `skip_busy` (a worker) passed over: None.
  """
  if os.path.exists(cell):
    return read_json(cell)
  from pause_flax.training import metrics as metrics_lib  # pylint: disable=g-import-not-at-top
  from pause_flax.training import run_dir  # pylint: disable=g-import-not-at-top
  os.makedirs(model_dir, exist_ok=True)
  try:
    claim = run_dir.RunLock(model_dir, name=CELL_LOCK_NAME).acquire()
  except run_dir.RunDirInUse as e:
    if skip_busy:
      return None
    raise run_dir.RunDirInUse(
        f"the cell {cell} is being computed by another process ({e}); wait for it to "
        "end, or run the command's workers (run_control.workers) instead of a second "
        "command.") from e
  try:
    if os.path.exists(cell):  # finished by another process before the claim
      return read_json(cell)
    rows = train()
    last = rows[-1] if rows else metrics_lib.read_metrics(model_dir)[-1]
    result = {**record, "final_loss": last["loss"],
              "trained_tokens_per_sec": last.get("trained_tokens_per_sec"),
              "metrics": evaluate(model_dir)}
    write_json(cell, result)
    if not keep_checkpoints:
      shutil.rmtree(os.path.join(model_dir, "checkpoints"), ignore_errors=True)
    return result
  finally:
    claim.release()


# -- worker processes ------------------------------------------------------------

WORKER_ENV = "PAUSE_FLAX_CELL_WORKER"  # set in the worker processes run_workers starts
EXIT_STOPPED = 75  # as loop.EXIT_PREEMPTED: interrupted, state saved, rerun to resume


def in_worker() -> bool:
  """True inside a worker process of `run_workers`."""
  return os.environ.get(WORKER_ENV) == "1"


def check_workers(workers: int, setting: str) -> int:
  """`workers` if this process can run that many cell workers, else ValueError."""
  import jax  # pylint: disable=g-import-not-at-top
  cores = len(os.sched_getaffinity(0))
  if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
    raise ValueError(f"{setting}={workers!r}: use a whole number >= 1 (1 runs the cells "
                     "one after another in this process).")
  if workers > 1 and (jax.process_count() > 1 or jax.default_backend() != "cpu"):
    raise ValueError(f"{setting}={workers}: worker processes are for CPU hosts; on "
                     f"{jax.default_backend()} with {jax.process_count()} process(es) use "
                     f"{setting}=1.")
  if workers > cores:
    raise ValueError(f"{setting}={workers} is more than the {cores} CPU cores this "
                     f"process may use; use at most {cores}.")
  return workers


def run_workers(workers: int, module: str, job: Mapping[str, Any], log_dir: str, *,
                cells: Sequence[str], what: str = "cells") -> None:
  """Runs `python -m module --worker_job=FILE` in `workers` processes and waits.

  FILE holds `job` (pickled keyword arguments) and this process's gin config
  (`gin.config_str()`), which the worker parses before it starts. Worker i is
  pinned to every `workers`-th of this process's CPU cores, starting at the
  i-th, so the workers do not share cores (XLA:CPU sizes its thread pool by
  them); its output is added to `log_dir`/worker<i>.log. The workers share
  `cells` through the cells' claims. Progress (cells written) is logged every
  minute. SIGTERM or Ctrl-C here is passed on to the workers (which save a
  checkpoint and stop), then this process exits with EXIT_STOPPED (75); a
  worker that fails raises RuntimeError naming its log.
  """
  os.makedirs(log_dir, exist_ok=True)
  job_path = os.path.join(log_dir, "job.pkl")
  with open(job_path, "wb") as f:
    pickle.dump({"kwargs": dict(job), "gin_config": gin.config_str()}, f)
  cores = sorted(os.sched_getaffinity(0))
  env = {**os.environ, WORKER_ENV: "1",
         "PYTHONPATH": os.pathsep.join([p for p in sys.path if p] +
                                       [os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
  procs, logs = [], []
  for i in range(workers):
    log_path = os.path.join(log_dir, f"worker{i}.log")
    logs.append(log_path)
    with open(log_path, "a", encoding="utf-8") as log:   # a rerun's workers add to it
      started = time.strftime("%Y-%m-%d %H:%M:%S")
      log.write(f"=== worker {i} of {workers} started {started} ===\n")
      log.flush()
      procs.append(subprocess.Popen(
          [sys.executable, "-m", module, f"--worker_job={job_path}"], stdout=log,
          stderr=subprocess.STDOUT, env=env,
          preexec_fn=lambda share=cores[i::workers]: os.sched_setaffinity(0, share)))
  logging.info("%d worker processes computing %d %s (logs: %s).", workers, len(cells), what,
               log_dir)
  old = None

  def stop(signum, frame):
    del frame
    raise KeyboardInterrupt(signal.Signals(signum).name)

  try:
    if signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None):
      old = signal.signal(signal.SIGTERM, stop)
  except ValueError:  # not the main thread: SIGTERM keeps its handler
    old = None
  try:
    last_report = time.monotonic()
    while any(p.poll() is None for p in procs):
      time.sleep(1.0)
      if time.monotonic() - last_report >= 60:
        last_report = time.monotonic()
        done = sum(os.path.exists(c) for c in cells)
        logging.info("%d of %d %s written (%d workers running).", done, len(cells), what,
                     sum(p.poll() is None for p in procs))
  except KeyboardInterrupt as e:
    stopped = str(e) or "SIGINT"
  else:
    stopped = None
  finally:
    if old is not None:
      signal.signal(signal.SIGTERM, old)
    for p in procs:
      if p.poll() is None:
        p.send_signal(signal.SIGTERM)
    for p in procs:
      try:
        p.wait(timeout=120)
      except subprocess.TimeoutExpired:
        p.kill()
        p.wait()
  if stopped is not None:
    logging.warning("Stopped by %s: the workers saved their runs' checkpoints; rerun the same "
                    "command to resume.", stopped)
    raise SystemExit(EXIT_STOPPED)
  failed = [(i, p.returncode) for i, p in enumerate(procs) if p.returncode != 0]
  if failed:
    i, code = failed[0]
    raise RuntimeError(f"worker {i} of {workers} failed (exit {code}); its log: {logs[i]}")


def worker_job(path: str) -> dict:
  """In a worker: parses the job's gin config and returns its keyword arguments."""
  with open(path, "rb") as f:
    job = pickle.load(f)
  gin.parse_config(job["gin_config"], skip_unknown=True)
  return job["kwargs"]
