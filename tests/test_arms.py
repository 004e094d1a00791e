"""pause_flax.arms: what each arm trains on and how it is evaluated; the arms
comparison end to end on a tiny budget (slow)."""

import json
import os
import subprocess
import sys

import pytest

from pause_flax import arms
from pause_flax.data import low_confidence
from pause_flax.data import policies
from pause_flax.data import tasks
from pause_flax.training import adaptive

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASK = "synthetic_parity"


def test_paper_arms_keep_the_paper_variants_and_appended_evaluation():
  plan = arms.plan(arms.Arm("Pause", placement="append", count=20), TASK, None)
  assert plan.train_task == tasks.pause_variant(TASK, form="finetune", num_pauses=20)
  assert (plan.eval_task, plan.placed_prompts, plan.m_inf) == (TASK, False, 20)
  assert plan.extra_lengths == {"inputs": 20}
  sup = arms.plan(arms.Arm("S", placement="append", count=20, pause_weight=1), TASK, None)
  assert sup.train_task == tasks.pause_variant(TASK, form="finetune", num_pauses=20,
                                               pause_weight=1)
  filler = arms.plan(arms.Arm("F", placement="append", count=20, token="filler"), TASK, 46)
  assert filler.train_task == tasks.filler_variant(TASK, 46, form="finetune", num_pauses=20)
  assert filler.eval_task == filler.train_task and filler.m_inf == 20
  base = arms.plan(arms.Arm("NoPause"), TASK, None)
  assert (base.train_task, base.eval_task, base.m_inf, base.train_kwargs) == (TASK, TASK, 0, {})


def test_other_placements_are_evaluated_on_their_own_prompts():
  before = arms.Arm("B", placement=policies.BeforeMarker("="), count=20)
  plan = arms.plan(before, TASK, None)
  assert plan.placed_prompts and plan.m_inf == 0
  assert plan.eval_task == tasks.pause_variant(TASK, form="finetune",
                                               placement=policies.BeforeMarker("="),
                                               count=policies.Fixed(20))
  # A curriculum trains on a growing count and is evaluated at its end.
  cur = arms.Arm("C", placement="append", count=policies.Curriculum(12, 100, increment=4))
  plan = arms.plan(cur, TASK, None)
  assert cur.eval_pauses == 12 and plan.m_inf == 12 and plan.eval_task == TASK
  assert "cur0to12by4every100" in plan.train_task and plan.extra_lengths == {"inputs": 12}
  rng = arms.Arm("R", placement="append", count=(2, 6))
  assert rng.eval_pauses == 6 and arms.Arm("R", placement="append", count=(2, 6),
                                           m_inf=4).eval_pauses == 4
  with pytest.raises(ValueError, match="no fixed M; set m_inf"):
    _ = arms.Arm("F", placement="append", count=0.1).eval_pauses


def test_dit_and_adaptive_arms_train_with_their_settings_and_evaluate_without_pauses():
  dit = arms.plan(arms.Arm("D", low_confidence=low_confidence.LowConfidencePauses(
      num_pauses=2)), TASK, None)
  assert dit.train_task == TASK and dit.m_inf == 0 and not dit.placed_prompts
  assert dit.train_kwargs["low_confidence"].num_pauses == 2
  assert dit.extra_lengths == {"targets": 2}   # DIT's pauses go into the answer
  cyb = arms.plan(arms.Arm("A", adaptive=adaptive.AdaptivePauses(max_pauses=3)), TASK, None)
  assert cyb.train_kwargs["adaptive_pauses"].max_pauses == 3
  assert cyb.max_pauses_per_token == 3 and cyb.m_inf == 0


def test_the_comparisons_M_fills_in_a_missing_count_and_bad_arms_are_refused():
  assert arms.Arm("P", placement="append").with_count(8).count == 8
  assert arms.Arm("P", placement="append", count=3).with_count(8).count == 3
  with pytest.raises(ValueError, match="token='word'"):
    arms.Arm("X", placement="append", token="word")
  with pytest.raises(ValueError, match="each place their own pauses"):
    arms.Arm("X", placement="append",
             low_confidence=low_confidence.LowConfidencePauses(num_pauses=1))
  with pytest.raises(ValueError, match="need a placement"):
    arms.Arm("X", count=3)
  with pytest.raises(ValueError, match="token='filler' needs"):
    arms.plan(arms.Arm("F", placement="append", count=2, token="filler"), TASK, None)


def test_repeat_arm_appends_the_prompts_own_tokens_in_training_and_evaluation():
  import numpy as np  # pylint: disable=g-import-not-at-top
  import seqio  # pylint: disable=g-import-not-at-top
  plan = arms.plan(arms.Arm("Repeat", placement="append", count=20, token="repeat"), TASK,
                   None)
  assert plan.train_task == f"{TASK}_repeat20" and plan.eval_task == plan.train_task
  assert plan.placed_prompts and plan.m_inf == 0 and plan.extra_lengths == {"inputs": 20}
  # No <pause> row: the vocabulary is the task's own.
  assert tasks.get_vocabulary(plan.train_task).vocab_size == tasks.get_vocabulary(
      TASK).vocab_size
  lengths = {"inputs": 21 + 20, "targets": 2}
  plain = next(seqio.get_mixture_or_task(TASK).get_dataset(
      {"inputs": 21, "targets": 2}, split="validation", shuffle=False).as_numpy_iterator())
  rep = next(seqio.get_mixture_or_task(plan.train_task).get_dataset(
      lengths, split="validation", shuffle=False).as_numpy_iterator())
  prefix = plain["inputs"]
  assert len(prefix) == 21   # 20 bits and '='
  np.testing.assert_array_equal(rep["inputs"], np.concatenate([prefix, prefix[:20]]))
  np.testing.assert_array_equal(rep["targets"], plain["targets"])
  with pytest.raises(ValueError, match="token='repeat'"):
    arms.Arm("R", placement=policies.BeforeMarker("="), count=20, token="repeat")
  with pytest.raises(ValueError, match="token='repeat'"):
    arms.Arm("R", placement="append", count=(2, 6), token="repeat")
  with pytest.raises(ValueError, match="repeat of the prompt"):
    tasks.pause_variant(TASK, form="pretrain", pause_token=tasks.REPEAT)


def test_a_repeat_variant_is_evaluated_on_its_own_prompts_only():
  import jax  # pylint: disable=g-import-not-at-top
  from pause_flax import parallel  # pylint: disable=g-import-not-at-top
  from pause_flax.evaluation import evaluator  # pylint: disable=g-import-not-at-top
  name = tasks.pause_variant(TASK, form="finetune", num_pauses=4, pause_token=tasks.REPEAT)
  mesh = parallel.make_mesh(devices=jax.devices()[:1])
  with pytest.raises(ValueError, match="placed_prompts=True"):
    evaluator.Evaluator(name, batch_size=4, mesh=mesh, num_examples=4)
  ev = evaluator.Evaluator(name, batch_size=4, mesh=mesh, num_examples=4,
                           feature_lengths={"inputs": 25, "targets": 2}, placed_prompts=True)
  assert ev.filler_id is None and ev.task_names == [name]


@pytest.mark.slow
def test_policy_arms_command_runs_and_tabulates_compute_per_answer(tmp_path):
  out = str(tmp_path / "arms")
  cmd = [sys.executable, "-m", "pause_flax.control",
         "--gin_file=gin_configs/local/policy_arms.gin", f"--gin.CONTROL_DIR='{out}'",
         "--gin.run_control.tasks=['synthetic_parity']",
         "--gin.run_control.arms=[@nopause/Arm(), @before/Arm(), @lowconf/Arm(), "
         "@adaptive/Arm(), @repeat/Arm()]",
         "--gin.control/Stage.steps=4", "--gin.control/Stage.warmup_steps=1",
         "--gin.control/Stage.batch_size=8", "--gin.run_control.eval_examples=16",
         "--gin.run_control.eval_batch_size=16"]
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2",
             XLA_FLAGS="--xla_force_host_platform_device_count=1")
  result = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=1200)
  assert result.returncode == 0, result.stderr[-3000:]
  with open(os.path.join(out, "results.json"), encoding="utf-8") as f:
    rows = json.load(f)["tasks"][TASK]["arms"]
  assert sorted(rows) == ["Adaptive", "BeforeAnswer", "LowConfidence", "NoPause", "Repeat"]
  # BOS + 20 bits + '=' + EOS-terminated answer: the baseline's prompt is 22 tokens;
  # BeforeAnswer's holds 20 pauses more.
  assert rows["BeforeAnswer"]["tokens_processed_per_answer"] >= (
      rows["NoPause"]["tokens_processed_per_answer"] + 20 - 2)
  assert rows["BeforeAnswer"]["m_inf"] == 20 and rows["Adaptive"]["m_inf"] == 0
  # The repeat arm's prompts carry the prompt's first 20 tokens again.
  assert rows["Repeat"]["tokens_processed_per_answer"] >= (
      rows["NoPause"]["tokens_processed_per_answer"] + 20 - 2)
  table = open(os.path.join(out, "results.md"), encoding="utf-8").read()
  assert "tokens per answer |" in table and "| LowConfidence | 0 |" in table
