"""The experiment grid: table and statistics, resume after a kill, reproducibility."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from pause_flax import grid

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASK = "synthetic_digit_sum"


def write_cell(root, variant, seed, by_m, pretrain_seed=0, nested=False, **extra):
  path = grid.cell_path(str(root), TASK, variant, pretrain_seed, seed)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  metrics = {str(m): v if nested else {"exact_match": v} for m, v in by_m.items()}
  with open(path, "w") as f:
    json.dump({"metrics": metrics, **extra}, f)


def test_table_reports_spread_and_paired_intervals(tmp_path):
  seeds = [0, 1, 2, 3]
  base = [50.0, 52.0, 48.0, 51.0]
  for s in seeds:
    write_cell(tmp_path, "StdPT_StdFT", s, {0: base[s], 4: base[s] - 10})
    write_cell(tmp_path, "PausePT_PauseFT", s, {0: 5.0, 4: base[s] + 6 + 0.1 * s})
    write_cell(tmp_path, "StdPT_FillerFT", s, {0: 5.0, 4: base[s] + (1 if s % 2 else -1)})
  variants = ["StdPT_StdFT", "PausePT_PauseFT", "StdPT_FillerFT"]
  results = grid.collect(str(tmp_path), [TASK], variants, seeds, {TASK: 4}, [0, 4],
                         None, 0.95)
  rows = results["tasks"][TASK]["variants"]
  assert rows["StdPT_StdFT"]["m_inf"] == 0 and rows["PausePT_PauseFT"]["m_inf"] == 4
  assert rows["StdPT_StdFT"]["mean"] == pytest.approx(50.25)
  assert rows["PausePT_PauseFT"]["diff"]["significant"]
  assert rows["PausePT_PauseFT"]["diff"]["mean"] == pytest.approx(6.15)
  assert not rows["StdPT_FillerFT"]["diff"]["significant"]
  assert rows["StdPT_StdFT"]["sweep"]["4"]["mean"] == pytest.approx(40.25)
  table = grid.results_markdown(results)
  assert "| PausePT_PauseFT | 4 | 56.40 ± " in table and "**significant**" in table
  assert table.count("**significant**") == 1
  assert "trained tok/s" not in table  # cells without the rate: no column


def test_table_shows_each_arms_trained_token_rate(tmp_path):
  seeds = [0, 1]
  for s in seeds:
    write_cell(tmp_path, "StdPT_StdFT", s, {0: 50.0 + s, 4: 40.0},
               trained_tokens_per_sec=1000.0 + 100 * s)
    write_cell(tmp_path, "PausePT_PauseFT", s, {0: 5.0, 4: 55.0 + s},
               trained_tokens_per_sec=800.0)
  results = grid.collect(str(tmp_path), [TASK], ["StdPT_StdFT", "PausePT_PauseFT"], seeds,
                         {TASK: 4}, [0, 4], None, 0.95)
  rows = results["tasks"][TASK]["variants"]
  assert rows["StdPT_StdFT"]["trained_tokens_per_sec"] == pytest.approx(1050.0)
  table = grid.results_markdown(results)
  assert "finetuning trained tok/s |" in table
  assert "| StdPT_StdFT | 0 | 50.50 ± 0.71 | — | 1,050 |" in table
  assert table.split("PausePT_PauseFT | 4 |")[1].splitlines()[0].endswith(" 800 |")


def test_pretraining_seeds_are_clusters_of_the_interval(tmp_path):
  """With two or more pretraining seeds, the interval is over pretraining seeds
  (finetuning seeds averaged within each), not over all seed pairs."""
  variants = ["StdPT_StdFT", "PausePT_PauseFT"]
  # pretraining seed 0: the variant is +4 on both finetuning seeds; seed 1: +1, +3; seed 2: +2.
  deltas = {0: [4.0, 4.0], 1: [1.0, 3.0], 2: [2.0, 2.0]}
  for p, ds in deltas.items():
    for s, d in enumerate(ds):
      base = 50.0 + 10 * p + s
      write_cell(tmp_path, "StdPT_StdFT", s, {0: base, 4: 0.0}, pretrain_seed=p)
      write_cell(tmp_path, "PausePT_PauseFT", s, {0: 0.0, 4: base + d}, pretrain_seed=p)
  results = grid.collect(str(tmp_path), [TASK], variants, [0, 1], {TASK: 4}, [0, 4],
                         None, 0.95, pretrain_seeds=[0, 1, 2])
  diff = results["tasks"][TASK]["variants"]["PausePT_PauseFT"]["diff"]
  assert diff["n"] == 3 and diff["mean"] == pytest.approx(8 / 3)
  # Cluster means 4, 2, 2: sd 1.1547, t(0.975, 2 df) = 4.3027.
  assert diff["high"] - diff["mean"] == pytest.approx(4.302652729911275 * 1.1547005 / 3 ** 0.5)
  assert results["interval_over"] == "pretraining seeds"
  assert results["tasks"][TASK]["variants"]["StdPT_StdFT"]["per_seed"]["pt2_seed1"] == 71.0
  table = grid.results_markdown(results)
  assert "pretraining seeds [0, 1, 2] x finetuning seeds [0, 1]" in table
  assert "paired over the 3 pretraining seeds" in table
  one = grid.collect(str(tmp_path), [TASK], variants, [0, 1], {TASK: 4}, [0, 4], None, 0.95,
                     pretrain_seeds=[1])
  assert one["tasks"][TASK]["variants"]["PausePT_PauseFT"]["diff"]["n"] == 2
  assert "pretraining variance is not covered" in grid.results_markdown(one)


def test_arm_rows_are_compared_at_their_own_M_with_the_compute_they_spent(tmp_path):
  from pause_flax import arms  # pylint: disable=g-import-not-at-top
  before = arms.Arm("BeforeAnswer", placement="before_marker")   # count: the grid's M_ft
  for s in (0, 1, 2):
    write_cell(tmp_path, "StdPT_StdFT", s,
               {0: {"exact_match": 50.0 + s, "tokens_processed_per_answer": 12.0},
                4: {"exact_match": 1.0}}, nested=True)
    write_cell(tmp_path, "StdPT_BeforeAnswer", s,
               {4: {"exact_match": 53.0 + s, "tokens_processed_per_answer": 16.0}}, nested=True)
  results = grid.collect(str(tmp_path), [TASK], ["StdPT_StdFT"], [0, 1, 2], {TASK: 4}, [0, 4],
                         None, 0.95, arms=[before])
  rows = results["tasks"][TASK]["variants"]
  assert results["tasks"][TASK]["metric"] == "exact_match"   # never a compute metric
  arm = rows["StdPT_BeforeAnswer"]
  assert arm["m_inf"] == 4 and arm["diff"]["mean"] == pytest.approx(3.0)
  assert arm["tokens_processed_per_answer"] == 16.0 and list(arm["sweep"]) == ["4"]
  table = grid.results_markdown(results)
  assert "| StdPT_BeforeAnswer | 4 | 54.00 ± 1.00 | +3.00 [+3.00, +3.00]" in table
  assert "tokens per answer |" in table and "| StdPT_BeforeAnswer | — | 54.00 ± 1.00 |" in table
  with pytest.raises(ValueError, match="no '_'"):
    grid.run_grid("/nonexistent", model_config=grid.transformer_lib.model_config("tiny"),
                  pretrain_task="synthetic_lm", pretrain=grid.Stage(1, 8, 1e-3), tasks=[TASK],
                  finetune=grid.Stage(1, 8, 1e-3), num_pauses=4, m_inf_sweep=[0, 4],
                  seeds=[0, 1], arms=[arms.Arm("Before_Answer")])


def test_a_grid_dir_from_before_pretraining_seeds_is_refused_untouched(tmp_path):
  old = tmp_path / "pretrain" / "PausePT"
  old.mkdir(parents=True)
  (old / "done.json").write_text("{}")
  before = sorted(str(p) for p in tmp_path.rglob("*"))
  cfg = grid.transformer_lib.model_config("tiny")
  stage = grid.Stage(steps=1, batch_size=8, learning_rate=1e-3)
  with pytest.raises(ValueError, match=r"from before pretraining seeds .*give a new GRID_DIR"):
    grid.run_grid(str(tmp_path), model_config=cfg, pretrain_task="synthetic_lm",
                  pretrain=stage, tasks=[TASK], finetune=stage, num_pauses=2,
                  m_inf_sweep=[0, 2], seeds=[0, 1])
  assert sorted(str(p) for p in tmp_path.rglob("*")) == before


def test_bad_settings_are_refused():
  cfg = grid.transformer_lib.model_config("tiny")
  stage = grid.Stage(steps=1, batch_size=8, learning_rate=1e-3)
  kw = dict(model_config=cfg, pretrain_task="synthetic_lm", pretrain=stage, tasks=[TASK],
            finetune=stage, num_pauses=2, m_inf_sweep=[0, 2])
  with pytest.raises(ValueError, match="at least two distinct seeds"):
    grid.run_grid("/nonexistent", seeds=[0], **kw)
  with pytest.raises(ValueError, match=r"PRETRAIN_SEEDS=\[1, 1\]: give one or more distinct"):
    grid.run_grid("/nonexistent", seeds=[0], pretrain_seeds=[1, 1], **kw)
  with pytest.raises(ValueError, match="choose from"):
    grid.run_grid("/nonexistent", seeds=[0, 1], variants=["StdPT_StdFT", "Bogus"], **kw)
  with pytest.raises(ValueError, match="must contain both 0 and M_ft"):
    grid.run_grid("/nonexistent", seeds=[0, 1], **{**kw, "m_inf_sweep": [0, 1]})


def cli(grid_dir):
  cmd = [sys.executable, "-m", "pause_flax.grid", "--gin_file=gin_configs/local/grid.gin",
         f"--gin.GRID_DIR='{grid_dir}'", "--gin.SEEDS=[0]", "--gin.PRETRAIN_SEEDS=[0, 1]",
         "--gin.NUM_PAUSES=2",
         "--gin.run_grid.m_inf_sweep=[0, 2]", f"--gin.run_grid.tasks=['{TASK}']",
         "--gin.run_grid.variants=['StdPT_StdFT', 'PausePT_PauseFT', 'StdPT_FillerFT']",
         "--gin.run_grid.eval_examples=32", "--gin.run_grid.eval_batch_size=32",
         "--gin.pretrain/Stage.steps=12", "--gin.pretrain/Stage.warmup_steps=2",
         "--gin.pretrain/Stage.feature_lengths={'targets': 64}",
         "--gin.finetune/Stage.steps=6", "--gin.finetune/Stage.warmup_steps=1",
         "--gin.finetune/Stage.batch_size=8",
         # One arm beyond the paper's rows: DIT's low-confidence pauses, from StdPT.
         "--gin.run_grid.arms=[@dit/Arm()]", "--gin.dit/Arm.name='LowConfidence'",
         "--gin.dit/Arm.low_confidence=@LowConfidencePauses()",
         "--gin.LowConfidencePauses.num_pauses=1",
         "--gin.run_control.tasks=[]"]  # the controls have their own tests (test_control.py)
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1",
             JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2")
  return cmd, env


def cells(grid_dir):
  root = os.path.join(grid_dir, "cells")
  return sorted(os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs
                if f.endswith(".json"))


@pytest.mark.slow
def test_grid_runs_resumes_after_a_kill_and_reproduces_exactly(tmp_path):
  full, killed = str(tmp_path / "full"), str(tmp_path / "killed")
  cmd, env = cli(full)
  result = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=900)
  assert result.returncode == 0, result.stderr[-3000:]
  assert len(cells(full)) == 8
  for name in ("results.md", "results.json", "loss_curves.png", f"m_inf_{TASK}.png"):
    assert os.path.getsize(os.path.join(full, name)) > 0, name
  table = open(os.path.join(full, "results.md")).read()
  assert "pretraining seeds [0, 1] x finetuning seeds [0]" in table
  for kind in ("StdPT", "PausePT"):   # each kind pretrained once per pretraining seed
    for p in (0, 1):
      assert os.path.exists(os.path.join(full, "pretrain", kind, f"seed{p}", "done.json"))
  for variant in ("StdPT_StdFT", "PausePT_PauseFT", "StdPT_FillerFT", "StdPT_LowConfidence"):
    assert f"| {variant} |" in table

  cmd, env = cli(killed)
  proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  deadline = time.time() + 600
  while time.time() < deadline and len(cells(killed)) < 2 and proc.poll() is None:
    time.sleep(0.2)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  done_before = len(cells(killed))
  assert 2 <= done_before < 8
  result = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=900)
  assert result.returncode == 0, result.stderr[-3000:]
  trained = result.stderr.count(f"Grid: {TASK} ")
  assert trained == 8 - done_before, (trained, done_before)
  with open(os.path.join(full, "results.json")) as a, \
       open(os.path.join(killed, "results.json")) as b:
    assert without_timings(json.load(a)) == without_timings(json.load(b))
  # The cells agree to the bit, final finetuning losses included (timings aside).
  for a, b in zip(cells(full), cells(killed)):
    with open(a) as fa, open(b) as fb:
      assert without_timings(json.load(fa)) == without_timings(json.load(fb)), (a, b)


def without_timings(value):
  """A result with its measured rates (trained_tokens_per_sec) left out."""
  if isinstance(value, dict):
    return {k: without_timings(v) for k, v in value.items() if k != "trained_tokens_per_sec"}
  if isinstance(value, list):
    return [without_timings(v) for v in value]
  return value
