"""The training loop: data -> sharded steps -> metrics (and checkpoints).

Plain Python arguments; `pause_flax.train` binds them with gin.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import threading
import time
from collections.abc import Mapping, Sequence

from absl import logging
import jax
import numpy as np

from pause_flax import parallel
from pause_flax.data import low_confidence as low_confidence_lib
from pause_flax.model import transformer as transformer_lib
from pause_flax.training import adaptive as adaptive_lib
from pause_flax.training import checkpointing
from pause_flax.training import metrics as metrics_lib
from pause_flax.training import optimizer as optimizer_lib
from pause_flax.training import profiling
from pause_flax.training import run_dir
from pause_flax.training import trainer as trainer_lib


def _validate_run(model_dir: str | None, batch_size: int, train_steps: int,
                  accum_steps: int, log_every: int, mesh: jax.sharding.Mesh,
                  rules: parallel.LogicalRules) -> None:
  """Checks that fail before any compile or data read, each naming the fix."""
  if not model_dir:
    raise ValueError("MODEL_DIR is not set: pass --gin.MODEL_DIR=\"'/path/to/run'\".")
  _check_model_dir(model_dir)
  if not isinstance(train_steps, int) or train_steps < 1:
    raise ValueError(f"TRAIN_STEPS={train_steps!r} must be a positive integer.")
  if not isinstance(batch_size, int) or batch_size < 1:
    raise ValueError(f"BATCH_SIZE={batch_size!r} must be a positive integer.")
  dp = parallel.data_parallel_size(mesh, rules)
  if batch_size % dp:
    raise ValueError(
        f"BATCH_SIZE={batch_size} is not divisible by the data-parallel size {dp} "
        f"(mesh {dict(mesh.shape)}): use a multiple of {dp}.")
  if batch_size % jax.process_count():
    raise ValueError(
        f"BATCH_SIZE={batch_size} is not divisible by the {jax.process_count()} processes.")
  if accum_steps < 1 or batch_size % accum_steps or (batch_size // accum_steps) % dp:
    raise ValueError(
        f"ACCUM_STEPS={accum_steps} must be >= 1 and split BATCH_SIZE={batch_size} into "
        f"micro-batches that are themselves multiples of the data-parallel size {dp}.")
  if log_every < 1:
    raise ValueError(f"train.log_every={log_every} must be >= 1.")


def train(*, model_dir: str,
          mixture_or_task_name: str,
          task_feature_lengths: Mapping[str, int],
          train_steps: int,
          batch_size: int,
          model_config: transformer_lib.TransformerConfig,
          pause_fraction: float = 0.0,
          num_pauses: int = 0,
          pause_placement=None,
          pause_count=None,
          pause_token: int | None = None,
          low_confidence: low_confidence_lib.LowConfidencePauses | None = None,
          pack: bool = False,
          learning_rate: float = 1e-3,
          warmup_steps: int = 0,
          decay: str = "cosine",
          end_learning_rate_fraction: float = 0.1,
          accum_steps: int = 1,
          z_loss: float = 0.0,
          seed: int = 0,
          data_seed: int = 0,
          data_shards: int | None = None,
          log_every: int = 10,
          mesh: jax.sharding.Mesh | None = None,
          rules: parallel.LogicalRules = parallel.DEFAULT_RULES,
          peak_flops: float | None = None,
          checkpoint_options: checkpointing.CheckpointOptions = (
              checkpointing.CheckpointOptions()),
          init_from: str | None = None,
          skip_nonfinite_updates: int = 0,
          allow_changes: Sequence[str] = (),
          wandb: metrics_lib.WandbOptions | None = None,
          profile_steps: tuple[int, int] | None = None,
          adaptive_pauses: adaptive_lib.AdaptivePauses | None = None,
          optimizer=None,
          config_str=None,
          extra_metrics_hook=None,
          eval_hook=None) -> list[dict]:
  """Trains a model on a Task or Mixture; returns the logged metric rows.

  `pause_fraction > 0` trains on the pretraining-form pause variant of the
  task (pauses injected, 10% is the paper's choice); `num_pauses > 0` on the
  finetuning form (M pauses appended to the prefix). `pause_placement`,
  `pause_count` and `pause_token` (PAUSE_PLACEMENT, PAUSE_COUNT, PAUSE_TOKEN)
  choose other pause policies (pause_flax.data.policies objects or their
  shorthands; docs/pause_policies.md). `optimizer` maps a
  schedule to an optax transformation (default: `make_optimizer`);
  `config_str()` returns the text written to MODEL_DIR/config.gin.
  At log steps, `extra_metrics_hook(step, state)` and `eval_hook(step,
  model)` (the live model, e.g. `evaluator.PeriodicEval`) return metrics to
  log. The task read is `tasks.training_task`'s: a pause-pretrained INIT_FROM
  finetuned with num_pauses=0 trains on the task's pause form with 0 pauses, so
  its vocabulary keeps the pause row.
  `low_confidence` (a LowConfidencePauses, DIT) scores each batch with a copy
  of the parameters and inserts pauses before the targets it predicts worst
  (docs/pause_policies.md); the task is read in its pause form (0 pauses unless
  PAUSE_FRACTION / NUM_PAUSES add more) so the vocabulary has the pause row.
  `data_shards` (default: the process count) fixes how the data source is
  split; keeping it fixed gives the same global batches on any number of
  processes that divides it.
  `adaptive_pauses` (Catch Your Breath) trains the task's adaptive variant: an
  ask-for-a-pause output class, K pauses unrolled after every scored position,
  and the CYB loss in place of the cross-entropy (docs/pause_policies.md).
  `wandb` (project set) also logs the metrics and the gin config to Weights &
  Biases; `profile_steps=(start, count)` traces steps start+1..start+count
  into MODEL_DIR/profile (see `profiling.StepProfiler`).
  """
  mesh = parallel.make_mesh() if mesh is None else mesh
  _validate_run(model_dir, batch_size, train_steps, accum_steps, log_every, mesh, rules)
  if low_confidence is not None and not isinstance(
      low_confidence, low_confidence_lib.LowConfidencePauses):
    raise ValueError(f"train.low_confidence={low_confidence!r} is invalid: use "
                     "@LowConfidencePauses() (or None for the paper's placement only).")
  profiler = profiling.StepProfiler(model_dir, profile_steps)

  from pause_flax.data import pipeline  # seqio/TF: only once a run starts
  from pause_flax.data import tasks as tasks_lib

  pipeline.check_task_name(mixture_or_task_name)
  if adaptive_pauses is not None and low_confidence is not None:
    raise ValueError("train.adaptive_pauses and train.low_confidence are both set: each "
                     "places its own pauses; set one of them.")
  if adaptive_pauses is None:
    # The data layer turns the pause settings into the Task; the loop only reads
    # INIT_FROM's vocabulary size for it.
    task_name = tasks_lib.training_task(
        mixture_or_task_name, pause_fraction=pause_fraction, num_pauses=num_pauses,
        init_vocab_size=_init_from_vocab_size(init_from) if init_from else None,
        pause_placement=pause_placement, pause_count=pause_count, pause_token=pause_token,
        pause_row=low_confidence is not None)
    seq_len = pipeline.check_feature_lengths(task_name, task_feature_lengths,
                                             model_config.max_len)
  else:
    policy = {"PAUSE_PLACEMENT": pause_placement, "PAUSE_COUNT": pause_count,
              "PAUSE_TOKEN": pause_token}
    policy = {k: v for k, v in policy.items() if v is not None}
    if policy:
      raise ValueError(f"train.adaptive_pauses is set with {policy}: adaptive pauses place "
                       "their own; leave PAUSE_PLACEMENT, PAUSE_COUNT and PAUSE_TOKEN unset.")
    task_name, seq_len = _adaptive_task(mixture_or_task_name, task_feature_lengths,
                                        adaptive_pauses, pause_fraction, num_pauses, pack,
                                        model_config.max_len)
  vocab = tasks_lib.get_vocabulary(task_name)
  if model_config.vocab_size != vocab.vocab_size:
    # The model's vocabulary is the task's (pause id included).
    model_config = dataclasses.replace(model_config, vocab_size=vocab.vocab_size)
  pause_id = getattr(vocab, "pause_id", None)

  schedule = optimizer_lib.make_schedule(learning_rate, train_steps, warmup_steps, decay,
                           end_learning_rate_fraction)
  tx = optimizer(schedule) if optimizer is not None else optimizer_lib.make_optimizer(schedule)
  trainer = trainer_lib.Trainer(
      model_config, tx, mesh, rules=rules, schedule=schedule,
      options=trainer_lib.StepOptions(
          accum_steps=accum_steps, z_loss=z_loss, pause_id=pause_id,
          adaptive=adaptive_pauses,
          ask_id=None if adaptive_pauses is None else vocab.ask_id,
          low_confidence=low_confidence))

  def dataset(fuse_maps: bool = True):
    return pipeline.get_dataset(task_name, task_feature_lengths, batch_size, seed=data_seed,
                                shuffle=True, pack=pack, data_shards=data_shards,
                                fuse_maps=fuse_maps)

  ds = dataset()
  flops_per_step = trainer.flops_per_step(batch_size, seq_len)
  peak = metrics_lib.peak_flops_per_device(peak_flops) * jax.device_count()
  logging.info("Task %s, feature lengths %s, batch %d, mesh %s, %s parameters.",
               task_name, dict(task_feature_lengths), batch_size, dict(mesh.shape),
               f"{transformer_lib.num_params(model_config):,}")
  meta = {"vocab_size": model_config.vocab_size, "task": task_name,
          "base_task": mixture_or_task_name, "num_pauses": num_pauses,
          "model_config": dataclasses.asdict(model_config),
          "data": _data_settings(task_name, task_feature_lengths, batch_size, pack,
                                 data_seed, data_shards, low_confidence)}
  if adaptive_pauses is not None:
    meta["adaptive_pauses"] = dataclasses.asdict(adaptive_pauses)
  config_text = config_str() if config_str is not None else None

  # The lock comes first: opening the checkpoint manager cleans up unfinished
  # writes, which must never touch another live run's save.
  lock = _lock(model_dir)
  ckpt = logger = data_iter = None
  try:
    ckpt = checkpointing.Checkpointer(os.path.join(model_dir, "checkpoints"),
                                      checkpoint_options)
    accepted = _check_resume(ckpt, model_dir, config_text, meta["data"], train_steps,
                             allow_changes)
    state, data_iter = _initial_state(
        trainer, ckpt, lambda: pipeline.CheckpointableIterator(
            ds, fallback=lambda: dataset(fuse_maps=False)), seed, init_from,
        model_dir)
    start_step = int(state.step)
    if start_step >= train_steps:
      logging.info("MODEL_DIR %s is already at step %d = TRAIN_STEPS: nothing to train.",
                   model_dir, start_step)
      return []
    # The resume is accepted: only now is anything in MODEL_DIR rewritten.
    if jax.process_index() == 0:
      if config_text is not None:
        with open_for_write(os.path.join(model_dir, "config.gin")) as f:
          f.write(config_text)
      if accepted:
        history = _read_text(os.path.join(model_dir, run_dir.CHANGES_NAME)) or ""
        with open_for_write(os.path.join(model_dir, run_dir.CHANGES_NAME)) as f:
          f.write(history + run_dir.describe_accepted(start_step, accepted))
    logger = metrics_lib.MetricsLogger(model_dir, total_steps=train_steps, wandb=wandb,
                                       config_text=config_text)
    logger.truncate_after(start_step)
    return _train_loop(trainer, ckpt, data_iter, state, logger, meta, batch_size=batch_size,
                       seq_len=seq_len, train_steps=train_steps, log_every=log_every,
                       flops_per_step=flops_per_step, peak=peak,
                       skip_nonfinite_updates=skip_nonfinite_updates,
                       extra_metrics_hook=extra_metrics_hook, eval_hook=eval_hook,
                       profiler=profiler)
  finally:
    try:
      if ckpt is not None:
        ckpt.close()
    finally:
      if logger is not None:
        logger.close()
      if lock is not None:
        lock.release()
      if data_iter is not None:
        data_iter.close()


def _adaptive_task(name: str, task_feature_lengths: Mapping[str, int],
                   options: adaptive_lib.AdaptivePauses, pause_fraction: float,
                   num_pauses: int, pack: bool, max_len: int) -> tuple[str, int]:
  """The adaptive variant a Catch Your Breath run reads, and its unrolled length."""
  from pause_flax.data import adaptive as adaptive_data  # pylint: disable=g-import-not-at-top
  from pause_flax.data import pipeline  # pylint: disable=g-import-not-at-top
  if pause_fraction or num_pauses:
    raise ValueError(
        f"train.adaptive_pauses is set with PAUSE_FRACTION={pause_fraction} / NUM_PAUSES="
        f"{num_pauses}: adaptive pauses place their own, set both to 0.")
  if pack:
    raise ValueError("train.adaptive_pauses does not support train.pack=True (groups of "
                     "pauses are found by slot order): set train.pack=False.")
  task_name = adaptive_data.adaptive_variant(name, max_pauses=options.max_pauses)
  pipeline.check_feature_lengths(task_name, task_feature_lengths)
  seq_len = adaptive_data.unrolled_length(task_feature_lengths, options.max_pauses)
  if seq_len > max_len:
    raise ValueError(
        f"TASK_FEATURE_LENGTHS={dict(task_feature_lengths)} unrolled with "
        f"AdaptivePauses.max_pauses={options.max_pauses} gives {seq_len} slots (total + K x "
        f"targets), beyond the model's max_len={max_len}: shorten the features, lower "
        "max_pauses or raise max_len.")
  return task_name, seq_len


def _train_loop(trainer, ckpt, data_iter, state, logger, meta, *, batch_size, seq_len,
                train_steps, log_every, flops_per_step, peak, skip_nonfinite_updates,
                extra_metrics_hook, eval_hook, profiler) -> list[dict]:
  """Steps from `state.step` to `train_steps`: metrics at log steps, checkpoints."""
  from pause_flax.data import pipeline  # pylint: disable=g-import-not-at-top
  start_step = int(state.step)
  stop = _StopSignal()
  rows = []
  finite_flags = []
  nonfinite = _NonFiniteGuard(skip_nonfinite_updates)
  window_start, window_steps = time.perf_counter(), 0
  window_weights = []  # each step's weighted target tokens, summed at the log step
  try:
    for step in range(start_step, train_steps):
      profiler.step(step, state)
      batch = pipeline.to_global(next(data_iter), trainer.batch_sharding, batch_size)
      state, step_metrics = trainer.train_step(state, batch)
      finite_flags.append(step_metrics["finite"])
      window_weights.append(step_metrics["weighted_tokens"])
      window_steps += 1
      done = step + 1
      if done % log_every == 0 or done == train_steps:
        nonfinite.check(finite_flags, done)
        finite_flags = []
        ckpt.check_for_errors()
        metrics = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
        metrics.pop("finite")
        step_time = (time.perf_counter() - window_start) / window_steps
        # Trained (loss-weighted target) tokens per second over the same window.
        trained_tokens = float(sum(jax.device_get(window_weights)))
        metrics["trained_tokens_per_sec"] = trained_tokens / (step_time * window_steps)
        window_start, window_steps, window_weights = time.perf_counter(), 0, []
        metrics["step_time"] = step_time
        metrics["tokens_per_sec"] = batch_size * seq_len / step_time
        metrics["mfu"] = flops_per_step / step_time / peak
        if extra_metrics_hook is not None:
          metrics.update(extra_metrics_hook(done, state))
        if eval_hook is not None:
          metrics.update(eval_hook(done, trainer.model(state.params)))
          window_start = time.perf_counter()  # evaluation time is not step time
        rows.append(logger.write(done, metrics))
      preempted = stop.requested()
      if ckpt.should_save(done) or done == train_steps or preempted:
        nonfinite.check(finite_flags, done)
        finite_flags = []
        ckpt.save(done, state.params, state.opt_state, data_iter, meta)
      if preempted:
        ckpt.wait()
        logging.warning("Stopped by %s at step %d; checkpoint saved. Rerun the same "
                        "command to resume.", stop.signal_name, done)
        raise Preempted(done)
  finally:
    profiler.stop()
    stop.restore()
  return rows


class Preempted(Exception):
  """SIGTERM/SIGINT: a checkpoint at `step` was saved; the CLI exits 75."""

  def __init__(self, step: int):
    super().__init__(f"preempted at step {step}")
    self.step = step


EXIT_PREEMPTED = 75  # EX_TEMPFAIL: interrupted, state saved, rerun to resume


class _StopSignal:
  """SIGTERM/SIGINT set a flag; all processes agree on it before acting."""

  def __init__(self):
    self.signal_name = None
    self._old = {}
    if threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._old[sig] = signal.signal(sig, self._handle)

  def _handle(self, signum, frame):
    del frame
    if self.signal_name is not None and signum == signal.SIGINT:
      raise KeyboardInterrupt  # a second Ctrl-C stops at once
    self.signal_name = signal.Signals(signum).name

  def requested(self) -> bool:
    local = self.signal_name is not None
    if jax.process_count() == 1:
      return local
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    flags = multihost_utils.process_allgather(np.asarray(local, np.int32))
    if flags.any() and self.signal_name is None:
      self.signal_name = "a signal on another process"
    return bool(flags.any())

  def restore(self):
    for sig, handler in self._old.items():
      signal.signal(sig, handler)


class _NonFiniteGuard:
  """Counts non-finite steps in a row (their updates were not applied) and
  stops the run once there are more than `skip` of them."""

  def __init__(self, skip: int):
    self.skip = skip
    self.in_a_row = 0

  def check(self, flags, step: int) -> None:
    if not flags:
      return
    values = np.asarray(jax.device_get(flags)) > 0
    longest = run = self.in_a_row
    for ok in values:
      run = 0 if ok else run + 1
      longest = max(longest, run)
    self.in_a_row = run
    if values.all():
      return
    if longest > self.skip:
      raise FloatingPointError(
          f"Non-finite loss or gradient norm before step {step} (the update was not "
          "applied; the run stops without saving). Lower LEARNING_RATE, enable "
          "train.z_loss, or rerun with --gin.train.skip_nonfinite_updates=N to skip up to "
          "N such updates in a row (safe to change on resume).")
    logging.warning("%d non-finite update(s) skipped before step %d.",
                    int((~values).sum()), step)


def _data_settings(task_name: str, task_feature_lengths: Mapping[str, int],
                   batch_size: int, pack: bool, data_seed: int,
                   data_shards: int | None,
                   low_confidence: low_confidence_lib.LowConfidencePauses | None = None
                   ) -> dict:
  """What fixes the batches a run sees (saved in each checkpoint's meta).

  The low-confidence setting is recorded only when set, so the meta of a run
  without it is as before.
  """
  settings = {"task": task_name, "task_feature_lengths": dict(task_feature_lengths),
              "batch_size": batch_size, "pack": bool(pack), "data_seed": data_seed,
              "data_shards": data_shards or jax.process_count()}
  if low_confidence is not None:
    settings["low_confidence"] = dataclasses.asdict(low_confidence)
  return settings


# How _data_settings' keys are set in gin.
_DATA_SETTING_NAMES = {
    "task": ("MIXTURE_OR_TASK_NAME / PAUSE_FRACTION / NUM_PAUSES / PAUSE_PLACEMENT / "
             "PAUSE_COUNT / PAUSE_TOKEN"),
    "task_feature_lengths": "TASK_FEATURE_LENGTHS", "batch_size": "BATCH_SIZE",
    "pack": "train.pack", "data_seed": "SEED (train.data_seed)",
    "data_shards": "train.data_shards", "low_confidence": "train.low_confidence"}
# Settings recorded only when set: present on one side only is a change too.
_OPTIONAL_DATA_SETTINGS = ("low_confidence",)


def _check_model_dir(model_dir: str) -> None:
  if "://" in model_dir:
    return
  if os.path.exists(model_dir) and not os.path.isdir(model_dir):
    raise run_dir.ResumeRefused(f"MODEL_DIR={model_dir!r} is a file: give a directory "
                                "(new, or holding a run).")
  parent = os.path.abspath(model_dir)
  while not os.path.exists(parent):
    parent = os.path.dirname(parent)
  if not os.access(parent, os.W_OK | os.X_OK):
    raise run_dir.ResumeRefused(f"MODEL_DIR={model_dir!r} is not writable ({parent!r} "
                                "refuses writes): choose a directory you can write.")


def _lock(model_dir: str) -> run_dir.RunLock | None:
  """Process 0 locks MODEL_DIR; every process stops if it could not."""
  lock, error = None, None
  if jax.process_index() == 0:
    if "://" in model_dir:
      logging.warning("MODEL_DIR %s is not a local path: it is not locked against a "
                      "second run.", model_dir)
    else:
      tf_gfile_makedirs(model_dir)
      try:
        lock = run_dir.RunLock(model_dir).acquire()
      except run_dir.RunDirInUse as e:
        error = e
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    failed = multihost_utils.process_allgather(np.asarray(error is not None, np.int32))
    if failed.any() and error is None:
      error = run_dir.RunDirInUse(f"MODEL_DIR={model_dir!r} is in use by another run "
                                  "(process 0 could not lock it).")
  if error is not None:
    raise error
  return lock


def _check_resume(ckpt: checkpointing.Checkpointer, model_dir: str,
                  config_text: str | None, data: dict, train_steps: int,
                  allow_changes: Sequence[str]) -> list[run_dir.Change]:
  """Refuses, before anything in MODEL_DIR is written, a command that may not
  continue the run there; returns the accepted setting changes."""
  steps = ckpt.steps()
  if not steps:
    _refuse_if_all_damaged(ckpt, model_dir)
    return []
  accepted = []
  saved = _read_text(os.path.join(model_dir, "config.gin"))
  if config_text is not None and saved is not None:
    accepted = run_dir.check_resume(run_dir.compare_configs(saved, config_text),
                                    allow_changes, model_dir, steps[-1])
  try:
    saved_data = ckpt.read_meta(steps[-1]).get("data") or {}
  except Exception:  # pylint: disable=broad-except
    saved_data = {}  # unreadable meta: the restore decides whether it is damaged
  differ = [k for k in saved_data if k in data and saved_data[k] != data[k]]
  if saved_data:
    differ += [k for k in _OPTIONAL_DATA_SETTINGS
               if (k in saved_data) != (k in data)]
  if differ:
    raise run_dir.ResumeRefused(
        f"MODEL_DIR={model_dir!r} holds a run at step {steps[-1]} whose data differ: "
        + "; ".join(f"{_DATA_SETTING_NAMES.get(k, k)} {saved_data.get(k)!r} -> "
                    f"{data.get(k)!r}" for k in differ)
        + ". The data cannot change on resume: use a new MODEL_DIR or the saved settings.")
  if train_steps < steps[-1]:
    raise run_dir.ResumeRefused(
        f"TRAIN_STEPS={train_steps} is below step {steps[-1]}, which MODEL_DIR={model_dir!r}"
        f" has reached: pass --gin.TRAIN_STEPS={steps[-1]} or more to continue it, or "
        "use a new MODEL_DIR.")
  return accepted


def _refuse_if_all_damaged(ckpt: checkpointing.Checkpointer, model_dir: str) -> None:
  """A run whose every checkpoint was moved aside does not restart by itself."""
  moved = ckpt.quarantined()
  if moved:
    raise run_dir.ResumeRefused(
        f"MODEL_DIR={model_dir!r} has no intact checkpoint (damaged ones were moved to "
        f"{', '.join(moved)} in {ckpt.directory}); it will not start over on its own: use a "
        "new MODEL_DIR, or move those folders out of checkpoints/ to restart from step 0.")


def _initial_state(trainer: trainer_lib.Trainer, ckpt: checkpointing.Checkpointer,
                   make_data_iterator, seed: int, init_from: str | None, model_dir: str
                   ) -> tuple[trainer_lib.TrainState, object]:
  """Resume from MODEL_DIR if it has an intact checkpoint, else init (or load
  params); returns the state and the data iterator positioned to match."""
  restored = ckpt.restore_latest(
      checkpointing.abstract_with_shardings(trainer.abstract_params,
                                            trainer.param_shardings),
      checkpointing.abstract_with_shardings(trainer.abstract_state.opt_state,
                                            trainer.state_shardings.opt_state),
      make_data_iterator)
  if restored is not None:
    step, params, opt_state, data_iter = restored
    logging.info("Resumed from %s at step %d.", ckpt.directory, step)
    return trainer_lib.TrainState(step=jax.device_put(np.int32(step), trainer.replicated),
                                  params=params, opt_state=opt_state), data_iter
  _refuse_if_all_damaged(ckpt, model_dir)
  if not init_from:
    return trainer.init(seed), make_data_iterator()
  params = checkpointing.load_params(init_from, trainer)
  logging.info("Initialised parameters from %s (optimizer state fresh).", init_from)
  return trainer.fresh_state(params), make_data_iterator()


def _init_from_vocab_size(init_from: str) -> int:
  """The vocabulary size INIT_FROM's checkpoint records."""
  return int(checkpointing.read_checkpoint_meta(init_from)[1]["vocab_size"])


def _read_text(path: str) -> str | None:
  """A file's text (local or remote, e.g. gs://), or None if there is none."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  if not tf.io.gfile.exists(path):
    return None
  with tf.io.gfile.GFile(path, "r") as f:
    return f.read()


def tf_gfile_makedirs(path: str) -> None:
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tf.io.gfile.makedirs(path)


def open_for_write(path: str):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  return tf.io.gfile.GFile(path, "w")



