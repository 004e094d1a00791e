r"""Pretraining / finetuning entry point, in T5X's style.

  python -m pause_flax.train \
    --gin_file=gin_configs/local/smoke_pause.gin \
    --gin.MODEL_DIR="'/tmp/pause_smoke'" --gin.TRAIN_STEPS=200

Every `--gin.KEY=VALUE` becomes the gin binding `KEY = VALUE`. The operative
gin config, TensorBoard events and metrics.jsonl are written to MODEL_DIR.
Multi-process runs off TPU take --coordinator_address, --num_processes and
--process_id (or the PAUSE_FLAX_* environment variables); TPU VMs need none.
"""

from __future__ import annotations

import logging as pylogging
import os
import sys
from collections.abc import Sequence

from absl import flags
from absl import logging as absl_logging
import gin
import jax

from pause_flax import gin_utils
from pause_flax import parallel
from pause_flax.data import low_confidence
from pause_flax.data import policies
from pause_flax.model import transformer as _transformer  # registers model_config
from pause_flax.training import adaptive
from pause_flax.training import checkpointing
from pause_flax.training import loop
from pause_flax.training import metrics as metrics_lib
from pause_flax.training import optimizer as optimizer_lib

FLAGS = flags.FLAGS
gin_utils.define_gin_flags()
flags.DEFINE_string("coordinator_address", None,
                    "host:port of process 0 for multi-process runs off TPU "
                    "(env PAUSE_FLAX_COORDINATOR).")
flags.DEFINE_integer("num_processes", None,
                     "Processes in a multi-process run (env PAUSE_FLAX_NUM_PROCESSES).")
flags.DEFINE_integer("process_id", None,
                     "This process's index (env PAUSE_FLAX_PROCESS_ID).")
flags.DEFINE_integer("distributed_timeout", 120,
                     "Seconds to wait for all processes to reach the coordinator.")
flags.DEFINE_integer("heartbeat_timeout", 100,
                     "Seconds without a heartbeat after which a process is declared "
                     "dead and every other process stops with an error.")

# gin edges: the library functions stay plain Python.
train = gin.external_configurable(loop.train, "train")
make_mesh = gin.external_configurable(parallel.make_mesh, "make_mesh")
make_optimizer = gin.external_configurable(optimizer_lib.make_optimizer, "make_optimizer")
CheckpointOptions = gin.external_configurable(checkpointing.CheckpointOptions,
                                              "CheckpointOptions")
WandbOptions = gin.external_configurable(metrics_lib.WandbOptions, "WandbOptions")
AdaptivePauses = gin.external_configurable(adaptive.AdaptivePauses, "AdaptivePauses")
LowConfidencePauses = gin.external_configurable(low_confidence.LowConfidencePauses,
                                                "LowConfidencePauses")
# Pause policies: --gin.PAUSE_PLACEMENT="@BeforeMarker()" --gin.BeforeMarker.marker="'A:'".
for _policy in policies.POLICIES:
  gin.external_configurable(_policy, _policy.__name__, module="pause_flax.data.policies")
del _transformer, _policy


@gin.configurable("eval_during_training")
def eval_hook(mesh: jax.sharding.Mesh, *, every: int = 0,
              mixture_or_task_name: str | None = None,
              num_pauses: Sequence[int] | int = 0,
              feature_lengths: dict[str, int] | None = None,
              batch_size: int = 32, num_examples: int | None = None,
              split: str = "validation", max_pauses_per_token: int | None = None):
  """`train`'s eval_hook: the evaluator on the live model every `every` steps (0: off).

  The hook runs at log steps: at the first one at or after each multiple of `every`.
  `max_pauses_per_token` is the per-token pause budget of an adaptive-pause
  model (train.adaptive_pauses); such a model needs it.
  """
  if not every:
    return None
  if not mixture_or_task_name:
    raise ValueError("eval_during_training.every is set: also set "
                     "eval_during_training.mixture_or_task_name.")
  from pause_flax.evaluation import evaluator  # pylint: disable=g-import-not-at-top
  ev = evaluator.Evaluator(mixture_or_task_name, batch_size=batch_size, mesh=mesh,
                           feature_lengths=feature_lengths, split=split,
                           num_examples=num_examples,
                           decode=evaluator.DecodeOptions(
                               max_pauses_per_token=max_pauses_per_token))
  return evaluator.PeriodicEval(every, ev, [num_pauses] if isinstance(num_pauses, int)
                                else num_pauses)


@gin.configurable("register_tasks")
def register_tasks(tfds_data_dir: str | None = None, spm_path: str | None = None) -> None:
  """Re-registers C4 and the downstream tasks over a TFDS data_dir / vocabulary.

  With neither set, the tasks registered at import (TFDS's default data_dir,
  i.e. $TFDS_DATA_DIR, and T5's 32k SentencePiece model) are used as they are.
  """
  if tfds_data_dir is None and spm_path is None:
    return
  import seqio  # pylint: disable=g-import-not-at-top
  from pause_flax.data import downstream  # pylint: disable=g-import-not-at-top
  from pause_flax.data import tasks  # pylint: disable=g-import-not-at-top
  spm_path = spm_path or tasks.DEFAULT_SPM_PATH
  tasks.register_c4_tasks(tfds_data_dir, spm_path)
  downstream.register_downstream_tasks(
      data_dir=tfds_data_dir, vocabulary=seqio.SentencePieceVocabulary(spm_path))


def initialize_distributed() -> None:
  """jax.distributed from flags or env; on TPU VMs autodetected."""
  address = FLAGS.coordinator_address or os.environ.get("PAUSE_FLAX_COORDINATOR")
  num = FLAGS.num_processes or os.environ.get("PAUSE_FLAX_NUM_PROCESSES")
  pid = FLAGS.process_id
  if pid is None and os.environ.get("PAUSE_FLAX_PROCESS_ID") is not None:
    pid = int(os.environ["PAUSE_FLAX_PROCESS_ID"])
  if address or num:
    if not (address and num and pid is not None):
      raise ValueError(
          "A multi-process run needs --coordinator_address, --num_processes and "
          f"--process_id together; got {address!r}, {num!r}, {pid!r}.")
    try:
      jax.distributed.initialize(coordinator_address=address, num_processes=int(num),
                                 process_id=int(pid),
                                 initialization_timeout=FLAGS.distributed_timeout,
                                 heartbeat_timeout_seconds=FLAGS.heartbeat_timeout)
    except Exception as e:  # pylint: disable=broad-except
      raise RuntimeError(
          f"Process {pid} of {num} could not join the coordinator at {address} within "
          f"{FLAGS.distributed_timeout}s ({type(e).__name__}). Check that process 0 runs, "
          "that the address is reachable from here, and that every process was given the "
          "same --num_processes.") from e
  elif _on_cloud_tpu():
    jax.distributed.initialize()  # discovers the slice from the TPU metadata


def _on_cloud_tpu() -> bool:
  import importlib.util  # pylint: disable=g-import-not-at-top
  if os.environ.get("JAX_PLATFORMS", "") not in ("", "tpu"):
    return False
  return (importlib.util.find_spec("libtpu") is not None
          or bool(os.environ.get("TPU_WORKER_HOSTNAMES")))


class _QuietLibraries(pylogging.Filter):
  """Keeps orbax's per-save INFO chatter out of the console (warnings pass)."""

  def filter(self, record: pylogging.LogRecord) -> bool:
    return record.levelno >= pylogging.WARNING or "orbax" not in record.pathname


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise flags.Error(f"Unexpected arguments: {argv[1:]}")
  absl_logging.get_absl_handler().addFilter(_QuietLibraries())
  initialize_distributed()
  gin_utils.parse_gin_flags()
  register_tasks()
  mesh = make_mesh()
  try:
    train(mesh=mesh, optimizer=lambda schedule: make_optimizer(schedule),
          config_str=gin.operative_config_str, eval_hook=eval_hook(mesh))
  except loop.Preempted:
    sys.exit(loop.EXIT_PREEMPTED)


def console_main() -> None:
  """Console-script entry (pause-flax-train)."""
  gin_utils.run(main)


if __name__ == "__main__":
  console_main()
