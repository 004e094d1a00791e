"""Checkpoints: exact resume after kill -9 and SIGTERM, corrupt fallback, re-meshing."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from pause_flax import parallel
from pause_flax.training import checkpointing
from pause_flax.training import trainer as trainer_lib
from tests import test_trainer as tt

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 24


def cli(model_dir, steps=STEPS, devices=2, extra=()):
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
             JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2")
  cmd = [sys.executable, "-m", "pause_flax.train",
         "--gin_file=gin_configs/local/smoke_pause.gin",
         f"--gin.MODEL_DIR='{model_dir}'", f"--gin.TRAIN_STEPS={steps}",
         "--gin.SAVE_EVERY=4", "--gin.train.log_every=1", "--gin.WARMUP_STEPS=5", "--gin.BATCH_SIZE=4",
         "--gin.TASK_FEATURE_LENGTHS={'targets': 64}",
         "--gin.pause_flax.model.transformer.model_config.max_len=64", *extra]
  return cmd, env


def run(model_dir, **kw):
  cmd, env = cli(model_dir, **kw)
  return subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)


def losses(model_dir):
  with open(os.path.join(model_dir, "metrics.jsonl")) as f:
    rows = [json.loads(l) for l in f]
  return {r["step"]: r["loss"] for r in rows}


def committed_steps(model_dir):
  path = os.path.join(model_dir, "checkpoints")
  return sorted(int(d) for d in os.listdir(path) if d.isdigit()) if os.path.isdir(path) else []


def start_and_signal(model_dir, at_step, sig):
  """Sends `sig` once the run has logged `at_step` and committed a checkpoint."""
  cmd, env = cli(model_dir)
  proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
  path = os.path.join(model_dir, "metrics.jsonl")
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None:
    if (os.path.exists(path) and max(losses(model_dir), default=0) >= at_step
        and committed_steps(model_dir)):
      break
    time.sleep(0.05)
  proc.send_signal(sig)
  _, err = proc.communicate(timeout=300)
  return proc.returncode, err


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  model_dir = str(tmp_path_factory.mktemp("reference"))
  result = run(model_dir)
  assert result.returncode == 0, result.stderr[-3000:]
  ref = losses(model_dir)
  assert sorted(ref) == list(range(1, STEPS + 1))
  assert ref[STEPS] < ref[1]
  return ref


@pytest.mark.slow
@pytest.mark.parametrize("kill_at", [6, 13])
def test_kill_9_then_resume_is_bitwise_identical(reference, tmp_path, kill_at):
  model_dir = str(tmp_path)
  code, _ = start_and_signal(model_dir, kill_at, signal.SIGKILL)
  assert code == -signal.SIGKILL
  killed_at = max(losses(model_dir))
  assert committed_steps(model_dir)[-1] <= killed_at < STEPS
  result = run(model_dir)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "Resumed from" in result.stderr
  got = losses(model_dir)
  assert sorted(got) == list(range(1, STEPS + 1)), "steps missing or repeated"
  assert killed_at < STEPS
  for step in range(1, STEPS + 1):
    assert got[step] == reference[step], (step, got[step], reference[step])


@pytest.mark.slow
def test_sigterm_saves_exits_75_and_resumes(reference, tmp_path):
  model_dir = str(tmp_path)
  code, err = start_and_signal(model_dir, 10, signal.SIGTERM)
  assert code == 75, err[-3000:]
  stopped = max(losses(model_dir))
  assert stopped < STEPS
  steps = checkpointing.Checkpointer(os.path.join(model_dir, "checkpoints")).steps()
  assert steps[-1] == stopped, (steps, stopped)
  result = run(model_dir)
  assert result.returncode == 0, result.stderr[-3000:]
  got = losses(model_dir)
  assert all(got[s] == reference[s] for s in range(1, STEPS + 1))


@pytest.mark.slow
def test_corrupt_newest_checkpoint_falls_back_with_warning(reference, tmp_path):
  model_dir = str(tmp_path)
  code, err = start_and_signal(model_dir, 10, signal.SIGTERM)
  assert code == 75, err[-3000:]
  ckpt_dir = os.path.join(model_dir, "checkpoints")
  stopped = committed_steps(model_dir)[-1]
  newest = os.path.join(ckpt_dir, str(stopped), "params")
  for root, _, files in os.walk(newest):
    for name in files:
      path = os.path.join(root, name)
      if os.path.getsize(path) > 64 and "metadata" not in name:
        with open(path, "r+b") as f:
          f.truncate(os.path.getsize(path) // 2)
  result = run(model_dir)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "damaged" in result.stderr and "falling back" in result.stderr
  assert os.path.isdir(os.path.join(ckpt_dir, f"{stopped}.corrupt"))
  got = losses(model_dir)
  assert all(got[s] == reference[s] for s in range(1, STEPS + 1))


def _trained_state(mesh, steps=2):
  trainer = tt.make_trainer(mesh, eps=1e-3)
  state = trainer.init(0)
  batch = tt.make_batch()
  for _ in range(steps):
    state, _ = trainer.train_step(state, tt.global_batch(trainer, batch))
  return trainer, state, batch


def test_checkpoint_from_8_devices_restores_on_4_and_1(tmp_path):
  trainer8, state8, batch = _trained_state(parallel.make_mesh(data=2, fsdp=2, tensor=2))
  ckpt = checkpointing.Checkpointer(str(tmp_path), checkpointing.CheckpointOptions(
      async_save=True))
  ckpt.save(2, state8.params, state8.opt_state, None, {"model_config": {"vocab_size": 300}})
  ckpt.wait()
  _, ref_metrics = trainer8.train_step(state8, tt.global_batch(trainer8, batch))
  for devices in (4, 1):
    mesh = parallel.make_mesh(fsdp=-1, devices=jax.devices()[:devices])
    trainer = tt.make_trainer(mesh, eps=1e-3)
    restored = ckpt.restore_latest(
        checkpointing.abstract_with_shardings(trainer.abstract_params, trainer.param_shardings),
        checkpointing.abstract_with_shardings(trainer.abstract_state.opt_state,
                                              trainer.state_shardings.opt_state), None)
    step, params, opt_state, _ = restored
    assert step == 2
    leaf = jax.tree.leaves(params)[0]
    assert len(leaf.sharding.device_set) == devices
    state = trainer_lib.TrainState(step=np.int32(step), params=params, opt_state=opt_state)
    _, metrics = trainer.train_step(state, tt.global_batch(trainer, batch))
    np.testing.assert_allclose(metrics["loss"], ref_metrics["loss"], rtol=1e-6)
  ckpt.close()


def test_refuses_to_save_a_non_finite_state(tmp_path):
  trainer, state, _ = _trained_state(parallel.make_mesh(devices=jax.devices()[:1]), steps=0)
  bad = jax.tree.map(lambda x: x * np.nan, state.params)
  ckpt = checkpointing.Checkpointer(str(tmp_path))
  with pytest.raises(FloatingPointError, match="not finite"):
    ckpt.save(1, bad, state.opt_state, None)
  assert ckpt.steps() == []
  ckpt.close()


def test_reading_a_checkpoint_from_outside_its_run(tmp_path):
  import dataclasses
  mesh = parallel.make_mesh(data=2, fsdp=2, tensor=2)
  trainer = tt.make_trainer(mesh)
  state = trainer.init(3)
  ckpt = checkpointing.Checkpointer(str(tmp_path / "run" / "checkpoints"),
                                    checkpointing.CheckpointOptions(async_save=False))
  meta = {"vocab_size": tt.CONFIG.vocab_size, "model_config": dataclasses.asdict(tt.CONFIG)}
  for step in (2, 4):
    ckpt.save(step, state.params, state.opt_state, None, meta)
  ckpt.close()
  run, checkpoints = str(tmp_path / "run"), str(tmp_path / "run" / "checkpoints")
  assert checkpointing.resolve_checkpoint(run) == (checkpoints, None)
  assert checkpointing.resolve_checkpoint(checkpoints) == (checkpoints, None)
  assert checkpointing.resolve_checkpoint(f"{checkpoints}/2") == (checkpoints, 2)
  with pytest.raises(FileNotFoundError, match="does not exist"):
    checkpointing.resolve_checkpoint(str(tmp_path / "nope"))
  step, read = checkpointing.read_checkpoint_meta(run)
  assert step == 4 and read["vocab_size"] == tt.CONFIG.vocab_size
  assert checkpointing.read_checkpoint_meta(f"{checkpoints}/2")[0] == 2
  with pytest.raises(FileNotFoundError, match=r"no step 3 .*steps: \[2, 4\]"):
    checkpointing.read_checkpoint_meta(run, step=3)
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match="no checkpoint in"):
    checkpointing.read_checkpoint_meta(str(tmp_path / "empty"))

  on_mesh = checkpointing.restore_model_params(run, mesh=mesh)
  on_cpu = checkpointing.restore_model_params(f"{checkpoints}/2")
  assert (on_mesh.step, on_cpu.step, on_cpu.config) == (4, 2, tt.CONFIG)
  assert len(jax.tree.leaves(on_mesh.params)[0].sharding.device_set) > 1
  assert len(jax.tree.leaves(on_cpu.params)[0].sharding.device_set) == 1
  for a, b in zip(jax.tree.leaves(on_cpu.params), jax.tree.leaves(state.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert on_cpu.model().embedding_VxD[...].shape == state.params["embedding_VxD"].shape
  other = dataclasses.replace(tt.CONFIG, num_layers=tt.CONFIG.num_layers + 1)
  with pytest.raises(ValueError, match="does not match this model's architecture"):
    checkpointing.restore_model_params(run, model_config=other)


@pytest.mark.parametrize("base", [256, 259])  # padding grows (256 -> 384) or not (384)
def test_standard_vocab_checkpoint_loads_into_pause_vocab(tmp_path, base):
  import dataclasses
  mesh = parallel.make_mesh(data=2, fsdp=2, tensor=2)
  std_cfg = dataclasses.replace(tt.CONFIG, vocab_size=base)
  pause_cfg = dataclasses.replace(tt.CONFIG, vocab_size=base + 1)
  tx = lambda: tt.optimizer_lib.make_optimizer(1e-3)
  std = trainer_lib.Trainer(std_cfg, tx(), mesh)
  std_state = std.init(1)
  ckpt = checkpointing.Checkpointer(str(tmp_path / "checkpoints"))
  ckpt.save(5, std_state.params, std_state.opt_state, None,
            {"model_config": dataclasses.asdict(std_cfg)})
  ckpt.close()
  pause = trainer_lib.Trainer(pause_cfg, tx(), mesh)
  params = checkpointing.load_params(str(tmp_path), pause)
  fresh = pause.init(0).params
  flat_new = dict(jax.tree_util.tree_flatten_with_path(params)[0])
  flat_old = dict(jax.tree_util.tree_flatten_with_path(std_state.params)[0])
  flat_fresh = dict(jax.tree_util.tree_flatten_with_path(fresh)[0])
  saw_vocab = 0
  for path, new in flat_new.items():
    old = np.asarray(flat_old[path])
    new = np.asarray(new)
    names = pause.param_logical_names[tuple(k.key for k in path)]
    if names is None or "vocab" not in names:
      np.testing.assert_array_equal(new, old)
      continue
    saw_vocab += 1
    axis = names.index("vocab")
    np.testing.assert_array_equal(np.take(new, np.arange(base), axis=axis),
                                  np.take(old, np.arange(base), axis=axis))
    np.testing.assert_array_equal(np.take(new, [base], axis=axis),
                                  np.take(np.asarray(flat_fresh[path]), [base], axis=axis))
  assert saw_vocab >= 1
  assert jax.tree.leaves(params)[0].sharding.mesh.shape == mesh.shape


def test_checkpoint_of_another_model_is_refused_not_moved_aside(tmp_path):
  import dataclasses
  mesh = parallel.make_mesh(devices=jax.devices()[:1])
  trainer, state, _ = _trained_state(mesh, steps=0)
  ckpt = checkpointing.Checkpointer(str(tmp_path))
  ckpt.save(3, state.params, state.opt_state, None)
  ckpt.wait()
  other = trainer_lib.Trainer(dataclasses.replace(tt.CONFIG, d_model=32, num_heads=2),
                              tt.optimizer_lib.make_optimizer(1e-3), mesh)
  with pytest.raises(checkpointing.IncompatibleCheckpoint, match="different model"):
    ckpt.restore_latest(
        checkpointing.abstract_with_shardings(other.abstract_params, other.param_shardings),
        checkpointing.abstract_with_shardings(other.abstract_state.opt_state,
                                              other.state_shardings.opt_state), None)
  assert ckpt.steps() == [3]
  ckpt.close()


def _parity_batches(fuse_maps, task="synthetic_parity", lengths=None):
  from pause_flax.data import pipeline  # pylint: disable=g-import-not-at-top
  return pipeline.get_dataset(task, lengths or {"inputs": 21, "targets": 2}, 8, seed=0,
                              fuse_maps=fuse_maps, process_index=0, process_count=1)


@pytest.mark.parametrize("task,lengths", [("synthetic_parity", None),
                                          ("synthetic_lm_pause", {"targets": 64})])
def test_fused_maps_give_the_same_batches(task, lengths):
  """tf.data's map fusion changes the CPU cost only: same examples, same pauses."""
  fused = _parity_batches(True, task, lengths).as_numpy_iterator()
  plain = _parity_batches(False, task, lengths).as_numpy_iterator()
  for _ in range(3):
    a, b = next(fused), next(plain)
    assert sorted(a) == sorted(b)
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])


def test_a_data_iterator_saved_before_map_fusion_resumes_on_its_own_pipeline(tmp_path):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from pause_flax.data import pipeline  # pylint: disable=g-import-not-at-top
  prefix = str(tmp_path / "data")
  old = pipeline.CheckpointableIterator(_parity_batches(False))
  for _ in range(3):
    next(old)
  old.save(prefix)
  expected = [next(old) for _ in range(2)]
  with pytest.raises(tf.errors.NotFoundError, match="Failed to restore dataset iterator"):
    pipeline.CheckpointableIterator(_parity_batches(True)).restore(prefix)
  resumed = pipeline.CheckpointableIterator(_parity_batches(True),
                                            fallback=lambda: _parity_batches(False))
  resumed.restore(prefix)
  for want in expected:
    got = next(resumed)
    for k in want:
      np.testing.assert_array_equal(got[k], want[k])


def test_closing_a_data_iterator_frees_it_off_the_calling_thread():
  import threading  # pylint: disable=g-import-not-at-top
  import weakref  # pylint: disable=g-import-not-at-top
  from pause_flax.data import pipeline  # pylint: disable=g-import-not-at-top
  it = pipeline.CheckpointableIterator(_parity_batches(True))
  next(it)
  ref = weakref.ref(it._iterator)  # pylint: disable=protected-access
  it.close()
  for thread in threading.enumerate():
    if thread.name == "tf-data-release":
      thread.join()
  assert ref() is None
