"""Never lose a run: reruns of `pause_flax.train` into an existing MODEL_DIR.

Each refused rerun leaves the directory byte for byte as it was and prints one
line naming the setting; the same command afterwards continues bitwise as an
uninterrupted run. A constant learning rate keeps the schedule independent of
TRAIN_STEPS, so a 20-step run extended to 30 is comparable to one run of 30.
"""

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys

import pytest

from pause_flax.training import checkpointing

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.slow


def command(model_dir, steps, *extra):
  return [sys.executable, "-m", "pause_flax.train",
          "--gin_file=gin_configs/local/smoke_pause.gin",
          f"--gin.MODEL_DIR='{model_dir}'", f"--gin.TRAIN_STEPS={steps}",
          "--gin.SAVE_EVERY=10", "--gin.train.log_every=1", "--gin.WARMUP_STEPS=0",
          "--gin.train.decay='constant'", "--gin.BATCH_SIZE=4",
          "--gin.TASK_FEATURE_LENGTHS={'targets': 32}",
          "--gin.pause_flax.model.transformer.model_config.max_len=32", *extra]


def run(model_dir, steps, *extra, cmd=None):
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2",
             XLA_FLAGS="--xla_force_host_platform_device_count=1")
  return subprocess.run(cmd or command(model_dir, steps, *extra), env=env, cwd=REPO,
                        capture_output=True, text=True, timeout=600)


def losses(model_dir):
  with open(os.path.join(model_dir, "metrics.jsonl")) as f:
    return {r["step"]: r["loss"] for r in map(json.loads, f)}


def snapshot(path):
  """{relative path: sha256} of every file under `path` (a file: itself)."""
  if os.path.isfile(path):
    return {"": hashlib.sha256(open(path, "rb").read()).hexdigest()}
  out = {}
  for root, _, files in os.walk(path):
    for name in files:
      full = os.path.join(root, name)
      out[os.path.relpath(full, path)] = hashlib.sha256(open(full, "rb").read()).hexdigest()
  return out


def our_lines(stderr):
  return [l for l in stderr.splitlines() if l.startswith("pause_flax.train:")]


def assert_refused(result, *needles):
  assert result.returncode == 2, result.stderr[-3000:]
  assert "Traceback" not in result.stderr, result.stderr[-3000:]
  (line,) = our_lines(result.stderr)
  for needle in needles:
    assert needle in line, line
  return line


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """Losses of one uninterrupted 30-step run."""
  model_dir = str(tmp_path_factory.mktemp("reference"))
  result = run(model_dir, 30)
  assert result.returncode == 0, result.stderr[-3000:]
  return losses(model_dir)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
  """A 20-step run with checkpoints at 10 and 20."""
  model_dir = str(tmp_path_factory.mktemp("base") / "run")
  result = run(model_dir, 20)
  assert result.returncode == 0, result.stderr[-3000:]
  return model_dir


@pytest.fixture
def copy(base, tmp_path):
  model_dir = str(tmp_path / "run")
  shutil.copytree(base, model_dir)
  return model_dir


def assert_continues_like(reference, model_dir, *extra):
  result = run(model_dir, 30, *extra)
  assert result.returncode == 0, result.stderr[-3000:]
  got = losses(model_dir)
  assert sorted(got) == list(range(1, 31))
  for step in range(1, 31):
    assert got[step] == reference[step], (step, got[step], reference[step])
  return result


def test_refused_reruns_leave_the_directory_unchanged_then_resume_bitwise(
    reference, copy, tmp_path):
  before = snapshot(copy)
  refusals = [
      (("--gin.PAUSE_FRACTION=0.2",), ("PAUSE_FRACTION 0.1 -> 0.2", "new MODEL_DIR")),
      (("--gin.BATCH_SIZE=8",), ("BATCH_SIZE 4 -> 8",)),
      (("--gin.LEARNING_RATE=1e-4",), ("LEARNING_RATE 0.003 -> 0.0001", "allow_changes")),
      (("--gin.LERNING_RATE=1e-5",), ("--gin.LERNING_RATE=1e-5", "did you mean LEARNING_RATE")),
      (("--gin.MODEL_DIR=/tmp/x",), ("Strings need quotes", "--gin.MODEL_DIR=\"'/tmp/x'\"")),
  ]
  for extra, needles in refusals:
    assert_refused(run(copy, 30, *extra), *needles)
    assert snapshot(copy) == before, extra
  # The standard-vocabulary smoke file on a pause run (both pad to the same rows).
  cmd = [a if not a.startswith("--gin_file") else "--gin_file=gin_configs/local/smoke.gin"
         for a in command(copy, 30)]
  assert_refused(run(copy, 30, cmd=cmd), "PAUSE_FRACTION 0.1 -> 0.0")
  # TRAIN_STEPS below the reached step.
  assert_refused(run(copy, 10), "TRAIN_STEPS=10 is below step 20", "--gin.TRAIN_STEPS=20")
  assert snapshot(copy) == before
  # TRAIN_STEPS equal to the reached step: nothing to do, nothing written.
  assert run(copy, 20).returncode == 0
  assert snapshot(copy) == before
  # A live run holds the directory (here: this test process's pid on this host).
  lock = os.path.join(copy, "RUN_LOCK")
  with open(lock, "w") as f:
    json.dump({"host": socket.gethostname(), "pid": os.getpid(), "started": 0,
               "heartbeat": 0}, f)
  held = snapshot(copy)
  assert_refused(run(copy, 30), f"in use by process {os.getpid()}")
  assert snapshot(copy) == held
  os.remove(lock)
  # After all that, the same command continues exactly as one uninterrupted run.
  assert_continues_like(reference, copy)
  assert not os.path.exists(lock)


def test_safe_change_on_resume_keeps_the_checkpoints(reference, copy):
  # The fix a non-finite stop recommends: it no longer changes the saved state.
  result = assert_continues_like(reference, copy, "--gin.train.skip_nonfinite_updates=3")
  names = os.listdir(os.path.join(copy, "checkpoints"))
  assert not [n for n in names if "corrupt" in n], names
  assert "train.skip_nonfinite_updates 0 -> 3" in result.stderr
  (row,) = [json.loads(l) for l in open(os.path.join(copy, "resume_changes.jsonl"))]
  assert row["step"] == 20


def _damage(step_dir):
  for root, _, files in os.walk(os.path.join(step_dir, "params")):
    for name in files:
      path = os.path.join(root, name)
      if os.path.getsize(path) > 64 and "metadata" not in name:
        with open(path, "r+b") as f:
          f.truncate(os.path.getsize(path) // 2)


def test_only_checkpoint_damaged_is_moved_aside_and_never_restarts_silently(copy):
  ckpts = os.path.join(copy, "checkpoints")
  shutil.rmtree(os.path.join(ckpts, "10"))
  shutil.copytree(os.path.join(ckpts, "20"), os.path.join(ckpts, "20.corrupt"))
  _damage(os.path.join(ckpts, "20"))
  metrics = snapshot(os.path.join(copy, "metrics.jsonl"))
  line = assert_refused(run(copy, 30), "no intact checkpoint", "20.corrupt-2")
  # The earlier quarantined copy keeps its name; the damaged one gets a new one.
  assert sorted(os.listdir(ckpts)) == ["20.corrupt", "20.corrupt-2"], line
  assert snapshot(os.path.join(copy, "metrics.jsonl")) == metrics
  # Rerunning does not start over from step 0 either.
  assert_refused(run(copy, 30), "no intact checkpoint")
  assert snapshot(os.path.join(copy, "metrics.jsonl")) == metrics


def test_missing_iterator_state_falls_back_to_the_older_checkpoint(reference, copy):
  shutil.rmtree(os.path.join(copy, "checkpoints", "20", "data", "process_0"))
  result = assert_continues_like(reference, copy)
  assert "is damaged" in result.stderr and "falling back" in result.stderr
  assert os.path.isdir(os.path.join(copy, "checkpoints", "20.corrupt"))


def test_model_dir_that_is_a_file_is_refused(tmp_path):
  path = tmp_path / "a_file"
  path.write_text("not a run")
  assert_refused(run(str(path), 5), f"MODEL_DIR='{path}' is a file")
  assert path.read_text() == "not a run"


def test_missing_model_dir_is_named(tmp_path):
  cmd = [a for a in command("unused", 5) if not a.startswith("--gin.MODEL_DIR")]
  assert_refused(run(None, 5, cmd=cmd), "MODEL_DIR is required and not set")


def test_debug_flag_shows_the_traceback(copy):
  result = run(copy, 30, "--gin.PAUSE_FRACTION=0.2", "--debug")
  assert result.returncode != 0 and "Traceback" in result.stderr


def test_failed_async_save_is_reported_and_leaves_no_partial_write(tmp_path, monkeypatch):
  import errno
  import jax
  from pause_flax import parallel
  from tests import test_trainer as tt
  trainer = tt.make_trainer(parallel.make_mesh(devices=jax.devices()[:1]), eps=1e-3)
  state = trainer.init(0)

  class Iterator:
    def save(self, prefix):
      with open(prefix, "w") as f:
        f.write("position")

  ckpt = checkpointing.Checkpointer(str(tmp_path), checkpointing.CheckpointOptions())
  ckpt.save(1, state.params, state.opt_state, Iterator())
  ckpt.wait()

  def full_disk(self, prefix):
    raise OSError(errno.ENOSPC, "No space left on device")
  monkeypatch.setattr(Iterator, "save", full_disk)
  with pytest.raises(checkpointing.CheckpointSaveError) as e:
    ckpt.save(2, state.params, state.opt_state, Iterator())
    ckpt.wait()
  message = str(e.value)
  assert "\n" not in message and "step 2" in message and "No space left" in message
  assert "up to step 1 are intact" in message
  assert sorted(os.listdir(tmp_path)) == ["1"]
  assert ckpt.steps() == [1]
  ckpt.manager.close()
