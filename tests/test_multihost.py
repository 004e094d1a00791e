"""Two CPU processes on 127.0.0.1 (jax.distributed, gloo) standing in for a pod."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 8
COMMON = ["--gin", "TRAIN_STEPS=%d" % STEPS, "--gin", "BATCH_SIZE=8",
          "--gin", "TASK_FEATURE_LENGTHS={'targets': 64}", "--gin", "WARMUP_STEPS=2",
          "--gin", "pause_flax.model.transformer.model_config.max_len=64",
          "--gin", "train.log_every=1", "--gin", "SAVE_EVERY=2"]

pytestmark = pytest.mark.slow


def env(devices):
  return dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
              JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2")


def launch(model_dir, num_processes, devices, *extra_gin, train_args=()):
  cmd = [sys.executable, "launch/local.py", f"--num-processes={num_processes}",
         f"--devices-per-process={devices}", "--gin-file=gin_configs/local/smoke_pause.gin",
         f"--model-dir={model_dir}", *COMMON, *extra_gin]
  if train_args:
    cmd += ["--", *train_args]
  return cmd


def losses(model_dir):
  with open(os.path.join(model_dir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  steps = [r["step"] for r in rows]
  assert len(steps) == len(set(steps)), f"a step was logged twice: {steps}"
  return {r["step"]: r["loss"] for r in rows}


def single_process(model_dir, devices, *extra):
  cmd = [sys.executable, "-m", "pause_flax.train",
         "--gin_file=gin_configs/local/smoke_pause.gin", f"--gin.MODEL_DIR='{model_dir}'"]
  cmd += ["--gin." + COMMON[i + 1] for i in range(0, len(COMMON), 2)]
  cmd += list(extra)
  return subprocess.run(cmd, env=env(devices), cwd=REPO, capture_output=True, text=True,
                        timeout=600)


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
  model_dir = str(tmp_path_factory.mktemp("two"))
  result = subprocess.run(launch(model_dir, 2, 2), cwd=REPO, capture_output=True,
                          text=True, timeout=600)
  assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
  return model_dir


def test_two_processes_equal_one_process_with_four_devices(two_process_run, tmp_path):
  # data_shards=2 makes one process read the same two seqio shards, side by side,
  # that the two processes read: the same global batches.
  result = single_process(str(tmp_path), 4, "--gin.train.data_shards=2")
  assert result.returncode == 0, result.stderr[-3000:]
  one, two = losses(str(tmp_path)), losses(two_process_run)
  assert sorted(two) == list(range(1, STEPS + 1))
  for step in one:
    assert abs(one[step] - two[step]) <= 1e-5 * abs(one[step]), (step, one[step], two[step])
  # Only process 0 writes metrics; both wrote their data-iterator state.
  ckpt = os.path.join(two_process_run, "checkpoints", str(STEPS), "data")
  assert sorted(d for d in os.listdir(ckpt) if d.startswith("process_")) == [
      "process_0", "process_1"]


def test_two_process_kill_9_and_resume_is_bitwise_identical(two_process_run, tmp_path):
  model_dir = str(tmp_path)
  proc = subprocess.Popen(launch(model_dir, 2, 2), cwd=REPO, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL, start_new_session=True)
  ckpt_dir = os.path.join(model_dir, "checkpoints")
  deadline = time.time() + 300
  while time.time() < deadline:
    done = os.path.isdir(ckpt_dir) and [d for d in os.listdir(ckpt_dir) if d.isdigit()]
    if done and os.path.exists(os.path.join(model_dir, "metrics.jsonl")) and \
        max(losses(model_dir)) >= 5:
      break
    time.sleep(0.05)
  os.killpg(proc.pid, signal.SIGKILL)   # the launcher and both trainers
  proc.wait()
  killed_at = max(losses(model_dir))
  assert killed_at < STEPS
  result = subprocess.run(launch(model_dir, 2, 2), cwd=REPO, capture_output=True,
                          text=True, timeout=600)
  assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
  got, ref = losses(model_dir), losses(two_process_run)
  assert sorted(got) == list(range(1, STEPS + 1))
  assert all(got[s] == ref[s] for s in ref), (got, ref)


def test_killing_one_process_stops_the_other(tmp_path):
  port = 47000 + os.getpid() % 1000
  procs = []
  for pid in range(2):
    cmd = [sys.executable, "-m", "pause_flax.train",
           "--gin_file=gin_configs/local/smoke_pause.gin",
           f"--gin.MODEL_DIR='{tmp_path}'", "--gin.TRAIN_STEPS=100000",
           "--gin.BATCH_SIZE=8", "--gin.train.log_every=1",
           f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
           f"--process_id={pid}", "--heartbeat_timeout=10"]
    procs.append(subprocess.Popen(cmd, env=env(2), cwd=REPO, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE, text=True))
  metrics = os.path.join(tmp_path, "metrics.jsonl")
  deadline = time.time() + 300
  while time.time() < deadline and not (os.path.exists(metrics) and os.path.getsize(metrics)):
    assert all(p.poll() is None for p in procs), procs[0].stderr.read()[-3000:]
    time.sleep(0.1)
  procs[1].kill()
  killed = time.time()
  try:
    procs[0].wait(timeout=120)
  except subprocess.TimeoutExpired:
    procs[0].kill()
    pytest.fail("the surviving process hung after its peer died")
  assert procs[0].returncode != 0
  assert time.time() - killed < 120
