"""Experiment tracking and profiling: W&B (offline) and jax.profiler traces of
a tiny run through the gin files, resumed with new tracking settings (safe)."""

import glob
import json
import os
import struct
import sys

import gin
import pytest

from pause_flax import gin_utils
from pause_flax.training import metrics as metrics_lib
from pause_flax.training import profiling

pytestmark = pytest.mark.slow


def train_with_gin(model_dir, steps, *bindings):
  """The CLI's path in-process: smoke_pause.gin, tiny shapes, log every step."""
  import importlib  # pylint: disable=g-import-not-at-top
  cli = importlib.import_module("pause_flax.train")
  gin.clear_config()
  try:
    gin_utils.parse_gin(
        ["gin_configs/local/smoke_pause.gin"],
        [f"MODEL_DIR = '{model_dir}'", f"TRAIN_STEPS = {steps}", "BATCH_SIZE = 8",
         "TASK_FEATURE_LENGTHS = {'targets': 32}", "WARMUP_STEPS = 0", "SAVE_EVERY = 2",
         "CheckpointOptions.async_save = False", "train.log_every = 1",
         "pause_flax.model.transformer.model_config.max_len = 32", *bindings])
    return cli.train(mesh=cli.make_mesh(), optimizer=lambda s: cli.make_optimizer(s),
                     config_str=gin.operative_config_str)
  finally:
    gin.clear_config()


def read_metrics(model_dir):
  return {r["step"]: r for r in metrics_lib.read_metrics(model_dir)}


# -- profiling ----------------------------------------------------------------


class FakeProfiler:
  def __init__(self, monkeypatch):
    self.calls = []
    monkeypatch.setattr(profiling.jax.profiler, "start_trace",
                        lambda log_dir: self.calls.append(("start", log_dir)))
    monkeypatch.setattr(profiling.jax.profiler, "stop_trace",
                        lambda: self.calls.append(("stop",)))

  def run(self, profiler, start_step, train_steps):
    """The loop's calls: `step` before each step, `stop` at the end."""
    for step in range(start_step, train_steps):
      profiler.step(step, None)
      self.calls.append(("step", step + 1))
    profiler.stop()
    return self.calls


def test_profile_window_covers_the_requested_steps(monkeypatch, tmp_path):
  calls = FakeProfiler(monkeypatch).run(profiling.StepProfiler(str(tmp_path), (2, 3)), 0, 8)
  log_dir = str(tmp_path / "profile")
  assert calls == [("step", 1), ("step", 2), ("start", log_dir), ("step", 3), ("step", 4),
                   ("step", 5), ("stop",), ("step", 6), ("step", 7), ("step", 8)]


def test_profile_window_cut_by_the_run_end_is_stopped(monkeypatch, tmp_path):
  calls = FakeProfiler(monkeypatch).run(profiling.StepProfiler(str(tmp_path), (1, 10)), 0, 3)
  assert [c[0] for c in calls] == ["step", "start", "step", "step", "stop"]


@pytest.mark.parametrize("profile_steps, start_step, is_primary", [
    (None, 0, True),     # off
    ((2, 3), 3, True),   # resumed past the window's start
    ((2, 3), 0, False),  # only process 0 traces
])
def test_nothing_is_traced(monkeypatch, tmp_path, profile_steps, start_step, is_primary):
  profiler = profiling.StepProfiler(str(tmp_path), profile_steps, is_primary=is_primary)
  calls = FakeProfiler(monkeypatch).run(profiler, start_step, 8)
  assert [c[0] for c in calls] == ["step"] * (8 - start_step)
  assert not os.path.exists(tmp_path / "profile")


@pytest.mark.parametrize("bad", [(-1, 2), (3, 0), (3,), "10"])
def test_bad_profile_steps_name_the_setting(bad):
  with pytest.raises(ValueError, match=r"train\.profile_steps=.*\(start, count\)"):
    profiling.StepProfiler("/tmp/x", bad)


def traced_steps(xplane_path):
  """The step numbers of the "train" step annotations in an .xplane.pb."""
  from jax.profiler import ProfileData  # pylint: disable=g-import-not-at-top
  steps = set()
  for plane in ProfileData.from_file(xplane_path).planes:
    for line in plane.lines:
      for event in line.events:
        if event.name == "train":
          steps.update(int(v) for k, v in event.stats if k == "step_num")
  return steps


def test_trace_appears_only_for_the_requested_steps(tmp_path):
  model_dir = tmp_path / "run"
  train_with_gin(model_dir, 2)
  assert not os.path.exists(model_dir / "profile")  # off by default
  # Turned on when resuming (a safe change): steps 3 and 4 of 5.
  train_with_gin(model_dir, 5, "train.profile_steps = (2, 2)")
  (trace,) = glob.glob(str(model_dir / "profile/plugins/profile/*/*.xplane.pb"))
  assert os.path.getsize(trace) > 0
  assert traced_steps(trace) == {3, 4}
  assert sorted(read_metrics(model_dir)) == [1, 2, 3, 4, 5]


# -- Weights & Biases -------------------------------------------------------------------


def test_wandb_is_not_imported_without_a_project(monkeypatch, tmp_path):
  monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` would raise
  logger = metrics_lib.MetricsLogger(str(tmp_path), total_steps=1,
                                     wandb=metrics_lib.WandbOptions(), is_primary=True)
  logger.write(1, {"loss": 1.0})
  logger.close()
  assert not os.path.exists(tmp_path / metrics_lib.WANDB_RUN_ID)


def wandb_records(path):
  """The protobuf records of an offline run's .wandb file (a leveldb-style log:
  7-byte file header, 32 KiB blocks, records of crc32/length/type + data)."""
  from wandb.proto import wandb_internal_pb2  # pylint: disable=g-import-not-at-top
  with open(path, "rb") as f:
    data = f.read()
  ident, magic, _ = struct.unpack("<4sHB", data[:7])
  assert (ident, magic) == (b":W&B", 0xBEE1)
  pos, block, chunks = 7, 32768, []
  while pos + 7 <= len(data):
    if block - pos % block < 7:  # a block's tail too short for a header is padding
      pos += block - pos % block
      continue
    _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
    if kind == 0:
      break
    chunks.append(data[pos + 7:pos + 7 + length])
    pos += 7 + length
    if kind in (1, 4):  # FULL, LAST
      record = wandb_internal_pb2.Record()
      record.ParseFromString(b"".join(chunks))
      chunks = []
      yield record


def read_offline_run(run_dir):
  """(run id, {step: scalars}, config) of one offline run directory."""
  (path,) = glob.glob(os.path.join(run_dir, "run-*.wandb"))
  run_id, history, config = None, {}, {}
  for record in wandb_records(path):
    kind = record.WhichOneof("record_type")
    if kind == "run":
      run_id = record.run.run_id
    elif kind == "history":
      items = {i.key or "/".join(i.nested_key): json.loads(i.value_json)
               for i in record.history.item}
      history[record.history.step.num] = {k: v for k, v in items.items()
                                          if not k.startswith("_")}
    elif kind == "config":
      config.update({i.key or "/".join(i.nested_key): json.loads(i.value_json)
                     for i in record.config.update})
  return run_id, history, config


def test_wandb_offline_logs_scalars_and_config_and_resumes_into_the_same_run(
    monkeypatch, tmp_path):
  pytest.importorskip("wandb")
  wandb_dir = tmp_path / "wandb_files"
  wandb_dir.mkdir()
  monkeypatch.setenv("WANDB_MODE", "offline")
  monkeypatch.setenv("WANDB_DIR", str(wandb_dir))
  monkeypatch.setenv("WANDB_SILENT", "true")
  model_dir = tmp_path / "run"
  project = ["WANDB_PROJECT = 'pause-flax-test'"]
  train_with_gin(model_dir, 3, *project)
  run_id = (model_dir / metrics_lib.WANDB_RUN_ID).read_text().strip()
  train_with_gin(model_dir, 5, *project)  # resumed from the checkpoint at step 3

  runs = sorted(glob.glob(str(wandb_dir / "wandb" / "offline-run-*")))
  assert len(runs) == 2
  (first_id, first, first_config), (second_id, second, second_config) = map(
      read_offline_run, runs)
  assert first_id == second_id == run_id
  # The same scalars as metrics.jsonl.
  rows = read_metrics(model_dir)
  assert sorted(first) == [1, 2, 3] and sorted(second) == [4, 5]
  for step, scalars in [*first.items(), *second.items()]:
    assert scalars == pytest.approx({k: v for k, v in rows[step].items() if k != "step"})
  for key in ("loss", "accuracy", "tokens_per_sec", "mfu"):
    assert key in second[5]
  # The operative gin config: the text of config.gin and its settings.
  assert second_config["gin_config"] == (model_dir / "config.gin").read_text()
  assert first_config["PAUSE_FRACTION"] == 0.1
  assert first_config["TRAIN_STEPS"] == 3 and second_config["TRAIN_STEPS"] == 5
  assert first_config["WandbOptions.project"] == "%WANDB_PROJECT"
  assert first_config["WANDB_PROJECT"] == "pause-flax-test"
  assert not os.path.exists(model_dir / "profile")  # profiling stays off
