"""pause_flax.control: the verdict and tables from cells (no training here)."""

import json
import os

from pause_flax import control


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
