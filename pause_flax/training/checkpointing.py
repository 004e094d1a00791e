"""Orbax checkpoints: async sharded saves, exact resume, fault tolerance.

A checkpoint at step S lives in `<dir>/<S>/` with four items:
  params     the model parameters (sharded arrays, restorable onto any mesh)
  opt_state  {'step': S, 'opt_state': optimizer state}
  data       one tf.data iterator state per process (`process_<i>/`), so that a
             resumed run continues on exactly the batches it would have seen
  meta       JSON: step, vocabulary size, model config
Orbax writes each checkpoint to a temporary directory and renames it when
complete, so a save killed half-way never shows up as a step.

A checkpoint is moved aside only when it is proven damaged: its own
metadata matches what this run restores (same tree, shapes and dtypes), yet
its files fail to read or hold non-finite values, or one process's iterator
state is missing. It goes to `<dir>/<S>.corrupt` (`.corrupt-2`, ... if that
exists; nothing is ever deleted) and the previous one is used. A checkpoint
that this run's model or optimizer cannot read is intact: the restore stops
with IncompatibleCheckpoint and moves nothing.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable
from typing import Any

from absl import logging
from etils import epath
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

PARAMS, OPT_STATE, DATA, META = "params", "opt_state", "data", "meta"


# -- data iterator state ------------------------------------------------------


class DataIteratorHandler(ocp.CheckpointHandler):
  """Saves/restores an object with save(prefix)/restore(prefix), per process.

  Saving is synchronous (the iterator's position must be taken before the
  next batch is read); the arrays of the same checkpoint are written async.
  """

  def _prefix(self, directory: epath.Path) -> str:
    path = directory / f"process_{jax.process_index()}"
    path.mkdir(parents=True, exist_ok=True)
    return os.fspath(path / "iterator")

  def save(self, directory: epath.Path, args: "DataIteratorSave") -> None:
    args.item.save(self._prefix(directory))

  def restore(self, directory: epath.Path, args: "DataIteratorRestore") -> Any:
    index, count = jax.process_index(), jax.process_count()
    prefix = os.fspath(directory / f"process_{index}" / "iterator")
    if not (directory / f"process_{index}").exists():
      saved = sorted(int(p.name.split("_")[1]) for p in directory.iterdir()
                     if p.name.startswith("process_") and p.name[8:].isdigit())
      if saved and saved == list(range(len(saved))) and len(saved) != count:
        raise IncompatibleCheckpoint(
            f"{directory.parent} was written by {len(saved)} process(es), this run has "
            f"{count}: resume with {len(saved)} processes (the data iterator state is "
            "per process).")
      raise DamagedCheckpoint(f"the data-iterator state of process {index} is missing "
                              f"from {directory}")
    args.item.restore(prefix)
    return args.item

  def metadata(self, directory: epath.Path) -> None:
    return None


@ocp.args.register_with_handler(DataIteratorHandler, for_save=True)
@dataclasses.dataclass
class DataIteratorSave(ocp.args.CheckpointArgs):
  item: Any


@ocp.args.register_with_handler(DataIteratorHandler, for_restore=True)
@dataclasses.dataclass
class DataIteratorRestore(ocp.args.CheckpointArgs):
  item: Any


class IncompatibleCheckpoint(ValueError):
  """The checkpoint is intact but does not fit this run (model, processes)."""


class DamagedCheckpoint(Exception):
  """A checkpoint's own files fail their checks."""


class CheckpointSaveError(RuntimeError):
  """A save failed; the earlier checkpoints are intact (one-line message)."""


# -- helpers ------------------------------------------------------------------


def abstract_with_shardings(abstract: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs carrying the target shardings (restore onto any mesh)."""
  return jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


@jax.jit
def _all_finite(tree: Any) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def all_finite(tree: Any) -> bool:
  return bool(_all_finite(tree))


def _first_line(error: BaseException) -> str:
  text = str(error)
  return text.splitlines()[0][:300] if text else ""


def _leaf_signatures(tree: Any) -> list[tuple[str, tuple, str]]:
  """(path, shape, dtype) per leaf, with paths spelled the same for a restored
  metadata tree (dicts, lists) and a live one (namedtuples, dataclasses)."""
  def key_name(k) -> str:
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        return str(getattr(k, attr))
    return str(k)
  out = []
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    dtype = getattr(leaf, "dtype", None)
    out.append(("/".join(key_name(k) for k in path), tuple(getattr(leaf, "shape", ())),
                str(np.dtype(dtype)) if dtype is not None else "?"))
  return out


@dataclasses.dataclass(frozen=True)
class CheckpointOptions:
  """When to save and what to keep."""
  save_every: int = 1000          # steps between periodic saves (0: only at the end)
  keep: int = 3                   # the last K checkpoints
  keep_period: int | None = None  # also every P-th step, forever
  async_save: bool = True


class Checkpointer:
  """An orbax CheckpointManager with the train state's items."""

  def __init__(self, directory: str, options: CheckpointOptions = CheckpointOptions()):
    if options.keep < 1:
      raise ValueError(f"KEEP={options.keep} (CheckpointOptions.keep) must be >= 1: the "
                       "newest checkpoint is always kept.")
    if options.save_every < 0:
      raise ValueError(f"SAVE_EVERY={options.save_every} (CheckpointOptions.save_every) "
                       "must be >= 0 (0: save only at the end).")
    self.directory = epath.Path(directory)
    self.options = options
    self._pending: int | None = None  # the step of the newest save started
    self.manager = ocp.CheckpointManager(
        self.directory,
        item_handlers={PARAMS: ocp.StandardCheckpointHandler(),
                       OPT_STATE: ocp.StandardCheckpointHandler(),
                       META: ocp.JsonCheckpointHandler(),
                       DATA: DataIteratorHandler()},
        options=ocp.CheckpointManagerOptions(
            save_interval_steps=options.save_every or 1,
            max_to_keep=options.keep,
            keep_period=options.keep_period,
            enable_async_checkpointing=options.async_save,
            cleanup_tmp_directories=True,
            create=True))

  # -- saving ---------------------------------------------------------------

  def should_save(self, step: int) -> bool:
    return bool(self.options.save_every) and step % self.options.save_every == 0

  def save(self, step: int, params: Any, opt_state: Any, data_iterator: Any,
           meta: dict | None = None) -> None:
    """Saves asynchronously; refuses a state that is not finite.

    An earlier asynchronous save that failed (e.g. a full disk) is reported
    here, before another one starts.
    """
    self.check_for_errors()
    if not all_finite(params) or not all_finite(opt_state):
      raise FloatingPointError(
          f"Refusing to save step {step}: the parameters or optimizer state are not finite.")
    args = {
        PARAMS: ocp.args.StandardSave(params),
        OPT_STATE: ocp.args.StandardSave({"step": np.int64(step), "opt_state": opt_state}),
        META: ocp.args.JsonSave({"step": step, "process_count": jax.process_count(),
                                 **(meta or {})}),
    }
    if data_iterator is not None:
      args[DATA] = DataIteratorSave(data_iterator)
    self._pending = step
    try:
      self.manager.save(step, args=ocp.args.Composite(**args), force=True)
    except Exception as e:  # pylint: disable=broad-except
      self._save_failed(step, e)

  def check_for_errors(self) -> None:
    """Raises CheckpointSaveError if an asynchronous save has failed."""
    try:
      self.manager.check_for_errors()
    except Exception as e:  # pylint: disable=broad-except
      self._save_failed(self._pending, e)

  def _save_failed(self, step: int | None, error: Exception) -> None:
    if jax.process_index() == 0 and step is not None:
      for tmp in self.directory.glob(f"{step}.orbax-checkpoint-tmp*"):
        tmp.rmtree()  # an unfinished write, never a checkpoint
    intact = [s for s in self.steps() if s != step]
    raise CheckpointSaveError(
        f"Saving the checkpoint of step {step} to {self.directory} failed "
        f"({type(error).__name__}: {_first_line(error)}); "
        + (f"the checkpoints up to step {intact[-1]} are intact: fix the cause (e.g. free "
           "disk space) and rerun the same command to resume from there."
           if intact else "no checkpoint was written yet: fix the cause and rerun.")) from error

  def wait(self) -> None:
    try:
      self.manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      self._save_failed(self._pending, e)
    self.check_for_errors()

  def close(self) -> None:
    try:
      self.wait()
    finally:
      self.manager.close()

  # -- restoring ------------------------------------------------------------

  def steps(self) -> list[int]:
    self.manager.reload()
    return sorted(self.manager.all_steps())

  def quarantined(self) -> list[str]:
    """Names of the checkpoints moved aside as damaged (`<S>.corrupt[-N]`)."""
    if not self.directory.exists():
      return []
    return sorted(p.name for p in self.directory.iterdir()
                  if re.fullmatch(r"\d+\.corrupt(-\d+)?", p.name))

  def restore_latest(self, abstract_params: Any, abstract_opt_state: Any,
                     make_data_iterator: Callable[[], Any] | None = None
                     ) -> tuple[int, Any, Any, Any] | None:
    """(step, params, opt_state, data iterator) of the newest intact checkpoint.

    `make_data_iterator()` returns a fresh iterator (an object with
    save/restore(prefix)); the one returned is positioned where the checkpoint
    left off, and one that a damaged checkpoint touched is never reused.
    Damaged checkpoints are moved aside with a warning and the previous one is
    tried; a checkpoint this run cannot read raises IncompatibleCheckpoint.
    """
    for step in reversed(self.steps()):
      damage = self.check_compatible(step, abstract_params, abstract_opt_state)
      iterator = None
      if damage is None:
        try:
          restored = self.manager.restore(step, args=ocp.args.Composite(**{
              PARAMS: ocp.args.StandardRestore(abstract_params),
              OPT_STATE: ocp.args.StandardRestore(
                  {"step": jax.ShapeDtypeStruct((), np.int64),
                   "opt_state": abstract_opt_state})}))
          params, opt = restored[PARAMS], restored[OPT_STATE]
          if not all_finite(params) or not all_finite(opt["opt_state"]):
            damage = DamagedCheckpoint("restored values are not finite")
        except Exception as e:  # pylint: disable=broad-except
          damage = e
      if damage is None and make_data_iterator is not None:
        iterator = make_data_iterator()
        try:
          self.manager.restore(step, args=ocp.args.Composite(
              **{DATA: DataIteratorRestore(iterator)}))
        except IncompatibleCheckpoint:
          raise
        except Exception as e:  # pylint: disable=broad-except
          damage = e
      if damage is not None:
        if iterator is not None and hasattr(iterator, "close"):
          iterator.close()   # never reused; freed without waiting
        self._quarantine(step, damage)
        continue
      if step != self.steps()[-1]:
        logging.warning("Resumed from step %d, an older checkpoint.", step)
      return step, params, opt["opt_state"], iterator
    return None

  def check_compatible(self, step: int, abstract_params: Any,
                       abstract_opt_state: Any = None) -> Exception | None:
    """Raises IncompatibleCheckpoint if `step` holds another model or optimizer
    state; returns the error if its metadata cannot be read (damaged), else None.

    A checkpoint of another architecture is not corrupt: it is never moved
    aside, the run stops and says what differs.
    """
    try:
      saved = self.manager.item_metadata(step)
      saved_params, saved_opt = saved[PARAMS], saved[OPT_STATE]
    except Exception as e:  # pylint: disable=broad-except
      return e
    if saved_params is None or (abstract_opt_state is not None and saved_opt is None):
      return DamagedCheckpoint("its array metadata is missing")
    items = [("model", saved_params, abstract_params)]
    if abstract_opt_state is not None:
      items.append(("optimizer state", saved_opt["opt_state"], abstract_opt_state))
    for what, have, want in items:
      diff = sorted(set(_leaf_signatures(have)) ^ set(_leaf_signatures(want)))
      if diff:
        raise IncompatibleCheckpoint(
            f"The checkpoint at {self.directory / str(step)} holds a different {what} than "
            f"this run configures (first differences: {diff[:4]}). Use a new MODEL_DIR, or "
            "restore the settings the checkpoint was made with.")
    return None

  def _quarantine(self, step: int, error: Exception) -> None:
    src = self.directory / str(step)
    dst = self.directory / f"{step}.corrupt"
    n = 1
    while dst.exists():
      n += 1
      dst = self.directory / f"{step}.corrupt-{n}"
    logging.warning("Checkpoint %s is damaged (%s: %s); moving it to %s and falling "
                    "back to the previous checkpoint.", src, type(error).__name__,
                    _first_line(error), dst)
    if jax.process_index() == 0:
      src.rename(dst)
    self.manager.reload()

  def restore_params(self, step: int | None, abstract_params: Any) -> Any:
    """Parameters only (e.g. to start finetuning from another run)."""
    step = self.steps()[-1] if step is None else step
    restored = self.manager.restore(
        step, args=ocp.args.Composite(**{PARAMS: ocp.args.StandardRestore(abstract_params)}))
    return restored[PARAMS]

  def read_meta(self, step: int | None = None) -> dict:
    step = self.steps()[-1] if step is None else step
    restored = self.manager.restore(step, args=ocp.args.Composite(
        **{META: ocp.args.JsonRestore()}))
    return dict(restored[META])


# -- reading a checkpoint from outside its run (INIT_FROM, evaluation, HF export) --


def resolve_checkpoint(path: str) -> tuple[str, int | None]:
  """(checkpoints directory, step) of a MODEL_DIR, its checkpoints/ folder or `<dir>/<step>`.

  The step is the one the path names, or None (read: the newest).
  """
  p = epath.Path(path)
  if p.name.isdigit() and (p / PARAMS).exists():
    return os.fspath(p.parent), int(p.name)
  if (p / "checkpoints").exists():
    return os.fspath(p / "checkpoints"), None
  if p.exists():
    return os.fspath(p), None
  raise FileNotFoundError(f"Checkpoint path {path!r} does not exist: give a MODEL_DIR, its "
                          "checkpoints/ folder, or a checkpoints/<step> folder.")


def _open(path: str, step: int | None) -> tuple[Checkpointer, int]:
  """A synchronous Checkpointer on `path`'s directory and the step to read."""
  directory, path_step = resolve_checkpoint(path)
  ckpt = Checkpointer(directory, CheckpointOptions(async_save=False))
  steps = ckpt.steps()
  step = path_step if step is None else step
  step = steps[-1] if step is None and steps else step
  if step is None or step not in steps:
    ckpt.close()
    raise FileNotFoundError(f"Checkpoint path {path!r}: " + (
        f"no step {step} in {directory} (steps: {steps})." if steps else
        f"no checkpoint in {directory}."))
  return ckpt, step


def read_checkpoint_meta(path: str, step: int | None = None) -> tuple[int, dict]:
  """(step, meta) of a checkpoint: `step`, the one the path names, or the newest.

  meta is what the run recorded: step, vocab_size, model_config, and for a
  training run task, base_task, num_pauses.
  """
  ckpt, step = _open(path, step)
  try:
    return step, ckpt.read_meta(step)
  finally:
    ckpt.close()


def _vocab_size(meta: dict) -> int:
  """The vocabulary size the checkpointed parameters were built with."""
  return int(meta.get("model_config", {}).get("vocab_size", meta.get("vocab_size")))


@dataclasses.dataclass(frozen=True)
class SavedModel:
  """A model's parameters restored from a checkpoint, with what its run recorded."""
  step: int
  meta: dict
  config: Any     # the TransformerConfig the parameters were restored into
  params: Any     # nnx pure dict of arrays
  graphdef: Any   # nnx GraphDef of the Transformer
  directory: str  # the checkpoints directory

  def model(self):
    """The Transformer holding these parameters."""
    from flax import nnx  # pylint: disable=g-import-not-at-top
    return nnx.merge(self.graphdef, self.params)


def _restore_upgrading(ckpt: Checkpointer, step: int, target: Any, shardings: Any) -> Any:
  """Parameters onto `target`; a checkpoint of an earlier release (its output
  head stored [D, V] as `head_DxV`) is restored in that layout and converted."""
  from pause_flax.model import compat  # pylint: disable=g-import-not-at-top
  saved = ckpt.manager.item_metadata(step)[PARAMS]
  if not (hasattr(saved, "keys") and "head_DxV" in saved.keys()):
    return ckpt.restore_params(step, target)
  old = {k: v for k, v in target.items() if k != "head_VxD"}
  head = target["head_VxD"]
  spec = getattr(head.sharding, "spec", None)
  sharding = (jax.sharding.NamedSharding(head.sharding.mesh, jax.sharding.PartitionSpec(
      *reversed(tuple(spec) + (None,) * (2 - len(spec))))) if spec is not None
              else head.sharding)
  old["head_DxV"] = jax.ShapeDtypeStruct(head.shape[::-1], head.dtype, sharding=sharding)
  upgraded = compat.upgrade_params(ckpt.restore_params(step, old))
  logging.info("Converted %s/%d from the earlier head_DxV layout.", ckpt.directory, step)
  return jax.device_put(upgraded, shardings)


def restore_model_params(path: str, *, step: int | None = None,
                         mesh: jax.sharding.Mesh | None = None, rules: Any = None,
                         model_config: Any = None) -> SavedModel:
  """Restores a checkpoint's model parameters, sharded onto `mesh`.

  Args:
    path: a MODEL_DIR, its checkpoints/ folder, or checkpoints/<step>.
    step: the step to restore; default the one the path names, else the newest.
    mesh: where the parameters go (by their logical axes and `rules`); None:
      one CPU device.
    rules: logical axis rules; default parallel.DEFAULT_RULES.
    model_config: the architecture to restore into; default the model_config
      the checkpoint records. The vocabulary size is the checkpoint's either
      way (a pause run's is one larger than a standard one's).
  """
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from pause_flax import parallel  # pylint: disable=g-import-not-at-top
  from pause_flax.model import transformer as transformer_lib  # pylint: disable=g-import-not-at-top

  ckpt, step = _open(path, step)
  where = f"{ckpt.directory}/{step}"
  try:
    meta = ckpt.read_meta(step)
    if model_config is None:
      if "model_config" not in meta:
        raise ValueError(f"The checkpoint at {where} records no model_config.")
      config = transformer_lib.TransformerConfig(**meta["model_config"])
    else:
      config = dataclasses.replace(model_config, vocab_size=_vocab_size(meta))
    graphdef, state = nnx.split(nnx.eval_shape(
        lambda: transformer_lib.Transformer(config, rngs=nnx.Rngs(0))))
    if mesh is None:
      device = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
      shardings = jax.tree.map(lambda _: device, nnx.to_pure_dict(state))
    else:
      shardings = nnx.to_pure_dict(parallel.state_shardings(
          state, mesh, parallel.DEFAULT_RULES if rules is None else rules))
    target = abstract_with_shardings(nnx.to_pure_dict(state), shardings)
    try:
      params = _restore_upgrading(ckpt, step, target, shardings)
    except Exception as e:
      if model_config is None:
        raise
      raise ValueError(f"The checkpoint at {where} does not match this model's "
                       f"architecture: {str(e).splitlines()[0][:300]}") from e
  finally:
    ckpt.close()
  return SavedModel(step, meta, config, params, graphdef, os.fspath(ckpt.directory))


def load_params(path: str, trainer) -> Any:
  """Parameters of another run, placed on `trainer`'s mesh, for finetuning.

  A checkpoint whose vocabulary is smaller (e.g. made with the standard
  vocabulary, loaded into a pause vocabulary) gets the missing rows of every
  parameter with a `vocab` axis from a fresh initialisation of the new model:
  the pause embedding (and output row) start as a new model's would
  (normal(0.02), as the model initialises the embedding and the output head).
  Any other shape mismatch is an error.
  """
  new_cfg = trainer.model_config
  step, meta = read_checkpoint_meta(path)
  if _vocab_size(meta) > new_cfg.vocab_size:
    raise ValueError(f"init_from={path!r} has vocab_size {_vocab_size(meta)}, larger "
                     f"than this model's {new_cfg.vocab_size}.")
  saved = restore_model_params(path, step=step, mesh=trainer.mesh, rules=trainer.rules,
                               model_config=new_cfg)
  old = saved.params
  if saved.config.vocab_size == new_cfg.vocab_size:
    return jax.device_put(old, trainer.param_shardings)

  fresh = trainer.init(0).params
  old_v = saved.config.vocab_size

  def merge(path_keys, new, prev):
    names = trainer.param_logical_names.get(tuple(k.key for k in path_keys))
    if names is None or "vocab" not in names:
      if new.shape != prev.shape:
        raise ValueError(f"init_from: parameter {path_keys} has shape {prev.shape}, "
                         f"expected {new.shape}.")
      return prev
    axis = names.index("vocab")
    index = [slice(None)] * new.ndim
    index[axis] = slice(0, old_v)
    return new.at[tuple(index)].set(jax.lax.slice_in_dim(prev, 0, old_v, axis=axis))

  merged = jax.jit(lambda n, o: jax.tree_util.tree_map_with_path(merge, n, o),
                   out_shardings=trainer.param_shardings)(fresh, old)
  logging.info("init_from: vocabulary %d -> %d; new rows (the pause id) freshly "
               "initialised.", old_v, new_cfg.vocab_size)
  return merged
