"""pause_flax.control: the verdict and tables from cells; the command end to end (slow)."""

import json
import os
import subprocess
import sys

import pytest

from pause_flax import control

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cell(root, task, arm, seed, value):
  path = os.path.join(root, "cells", task, arm, f"seed{seed}.json")
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    json.dump({"m_inf": 0 if arm == "NoPause" else 20, "metrics": {"exact_match": value}}, f)


def _results(root, arms=control.ARMS):
  return control.collect(root, ["synthetic_parity"], arms, [0, 1, 2],
                         {"synthetic_parity": 20}, 0.95, supervised_min=90.0, baseline_max=65.0)


def test_detected_only_when_every_check_passes(tmp_path):
  root = str(tmp_path)
  for s, (base, sup, fill) in enumerate([(50, 100, 51), (48, 99, 49), (52, 97, 50)]):
    _cell(root, "synthetic_parity", "NoPause", s, base)
    _cell(root, "synthetic_parity", "SupervisedPause", s, sup)
    _cell(root, "synthetic_parity", "Filler", s, fill)
  block = _results(root)["tasks"]["synthetic_parity"]
  assert block["detected"] and block["missing"] == ["Pause"]
  assert block["arms"]["SupervisedPause"]["diffs"]["NoPause"]["low"] > 0
  text = control.results_markdown({**_results(root), "steps": 10})
  assert "DETECTED: the pipeline shows" in text and "Not run yet: Pause." in text
  _cell(root, "synthetic_parity", "SupervisedPause", 2, 50)   # one seed fails: mean < 90
  assert not _results(root)["tasks"]["synthetic_parity"]["detected"]


def test_limits_per_task(tmp_path):
  """A {task: limit} mapping sets one task's limit; the others keep the defaults."""
  root = str(tmp_path)
  for task in ("synthetic_parity", "synthetic_3sum"):
    for s in range(3):
      _cell(root, task, "NoPause", s, 66 + s)           # mean 67: above 65, below 70
      _cell(root, task, "SupervisedPause", s, 99)
  out = control.collect(root, ["synthetic_parity", "synthetic_3sum"],
                        ["NoPause", "SupervisedPause"], [0, 1, 2], {"synthetic_parity": 20, "synthetic_3sum": 40}, 0.95,
                        supervised_min=90.0, baseline_max={"synthetic_3sum": 70.0})
  parity, sum3 = out["tasks"]["synthetic_parity"], out["tasks"]["synthetic_3sum"]
  assert not parity["detected"] and not parity["checks"]["NoPause mean <= 65"]
  assert sum3["detected"] and sum3["checks"]["NoPause mean <= 70"]
  assert control.task_limit({"a": 1.0}, "b", 2.0) == 2.0 and control.task_limit(3, "b", 2.0) == 3.0


def test_tasks_without_pause_targets_have_no_supervised_arm():
  assert control.task_arms("synthetic_count", control.ARMS) == ["NoPause", "Filler", "Pause"]
  assert "SupervisedPause" in control.task_arms("synthetic_parity", control.ARMS)


def test_grid_runs_the_controls_first_only_when_bound(monkeypatch):
  import gin  # pylint: disable=g-import-not-at-top
  from pause_flax import grid  # pylint: disable=g-import-not-at-top
  calls = []
  monkeypatch.setattr(control, "run_control_configurable",
                      lambda **kw: calls.append(kw["control_dir"]) or {})
  gin.clear_config()
  try:
    gin.parse_config(["run_grid.grid_dir = '/tmp/g'"])
    assert grid._run_controls_first(None) is None and not calls   # pylint: disable=protected-access
    gin.parse_config(["run_control.tasks = []"])
    assert grid._run_controls_first(None) is None and not calls   # pylint: disable=protected-access
    gin.parse_config(["run_control.tasks = ['synthetic_parity']"])
    assert grid._run_controls_first(None) == {}   # pylint: disable=protected-access
    assert calls == ["/tmp/g/control"]
  finally:
    gin.clear_config()


def _cell_args(tmp_path, calls):
  return dict(cell=str(tmp_path / "cells" / "seed0.json"), model_dir=str(tmp_path / "run"),
              train=lambda: calls.append("train") or [{"loss": 0.5}],
              evaluate=lambda model_dir: {"exact_match": 100.0}, record={"seed": 0})


def test_a_cell_another_live_process_holds_is_skipped_by_a_worker_and_refused_otherwise(
    tmp_path):
  from pause_flax import cells  # pylint: disable=g-import-not-at-top
  from pause_flax.training import run_dir  # pylint: disable=g-import-not-at-top
  calls = []
  args = _cell_args(tmp_path, calls)
  os.makedirs(args["model_dir"])
  holder = run_dir.RunLock(args["model_dir"], name=cells.CELL_LOCK_NAME).acquire()  # alive
  try:
    assert cells.run_cell(**args, skip_busy=True) is None
    with pytest.raises(run_dir.RunDirInUse, match="seed0.json is being computed by another"):
      cells.run_cell(**args)
    assert not calls and not os.path.exists(args["cell"])
  finally:
    holder.release()
  result = cells.run_cell(**args, skip_busy=True)
  assert calls == ["train"] and result["metrics"] == {"exact_match": 100.0}
  assert not os.path.exists(os.path.join(args["model_dir"], cells.CELL_LOCK_NAME))
  assert cells.run_cell(**args) == result and calls == ["train"]   # done: read, not rerun


def test_a_dead_processs_claim_is_taken_over(tmp_path):
  from pause_flax import cells  # pylint: disable=g-import-not-at-top
  calls = []
  args = _cell_args(tmp_path, calls)
  os.makedirs(args["model_dir"])
  gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                        capture_output=True, text=True, check=True)
  with open(os.path.join(args["model_dir"], cells.CELL_LOCK_NAME), "w", encoding="utf-8") as f:
    json.dump({"host": __import__("socket").gethostname(), "pid": int(gone.stdout),
               "started": 0, "heartbeat": 0}, f)
  assert cells.run_cell(**args, skip_busy=True)["metrics"] == {"exact_match": 100.0}
  assert calls == ["train"]


def test_per_task_lengths_must_name_registered_tasks(tmp_path):
  from pause_flax import cells  # pylint: disable=g-import-not-at-top
  with pytest.raises(ValueError, match="run_control.feature_lengths: .*'synthetic_cuont'.*"
                                       "synthetic_count"):
    control.run_control(str(tmp_path), model_config=None,
                        tasks=["synthetic_parity"], stage=cells.Stage(1, 8, 1e-3), seeds=[0, 1, 2],
                        num_pauses=4, feature_lengths={"synthetic_cuont": {"inputs": 8}})


def test_worker_counts_are_checked():
  from pause_flax import cells  # pylint: disable=g-import-not-at-top
  cores = len(os.sched_getaffinity(0))
  assert cells.check_workers(1, "run_control.workers") == 1
  assert cells.check_workers(cores, "run_control.workers") == cores
  for bad in (0, -1, True, 1.5, "2"):
    with pytest.raises(ValueError, match=r"run_control.workers=.*whole number >= 1"):
      cells.check_workers(bad, "run_control.workers")
  with pytest.raises(ValueError, match=f"more than the {cores} CPU cores.*at most {cores}"):
    cells.check_workers(cores + 1, "run_control.workers")


@pytest.mark.slow
def test_control_command_runs_from_its_gin_file_and_writes_table_and_figure(tmp_path):
  """`python -m pause_flax.control` with the shipped gin file (a fresh process:
  nothing else registers its configurables), on a tiny budget."""
  out = str(tmp_path / "control")
  cmd = [sys.executable, "-m", "pause_flax.control",
         "--gin_file=gin_configs/local/positive_control.gin", f"--gin.CONTROL_DIR='{out}'",
         "--gin.run_control.tasks=['synthetic_parity']",
         "--gin.run_control.arms=['NoPause', 'SupervisedPause']",
         "--gin.control/Stage.steps=4", "--gin.control/Stage.warmup_steps=1",
         "--gin.control/Stage.batch_size=8", "--gin.run_control.eval_examples=16",
         "--gin.run_control.eval_batch_size=16"]
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2",
             XLA_FLAGS="--xla_force_host_platform_device_count=1")
  result = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=900)
  assert result.returncode == 0, result.stderr[-3000:]
  table = open(os.path.join(out, "results.md"), encoding="utf-8").read()
  assert "seeds [0, 1, 2]" in table and "| SupervisedPause | 20 |" in table
  assert ("Positive control: DETECTED" in table) or ("Positive control: NOT DETECTED" in table)
  assert os.path.getsize(os.path.join(out, "control_synthetic_parity.png")) > 0
  cells = json.load(open(os.path.join(out, "cells", "synthetic_parity", "SupervisedPause",
                                      "seed2.json"), encoding="utf-8"))
  assert cells["steps"] == 4 and cells["m_inf"] == 20 and "exact_match" in cells["metrics"]
  assert not os.path.exists(os.path.join(out, "runs", "synthetic_parity", "NoPause", "seed0",
                                         "checkpoints"))   # deleted once the cell is written
  # The gin file's two workers computed the six cells between them, each cell once.
  runs = []
  for i in range(2):
    with open(os.path.join(out, "workers", f"worker{i}.log"), encoding="utf-8") as f:
      runs += [line.split("Control: ")[1].strip() for line in f if "Control: " in line]
  assert sorted(runs) == sorted(f"synthetic_parity {a} seed {s}."
                                for a in ("NoPause", "SupervisedPause") for s in range(3))
