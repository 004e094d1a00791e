"""Finetuning from a pretraining checkpoint, then the eval CLI on the result."""

import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import seqio

from pause_flax import parallel
from pause_flax.data import pipeline
from pause_flax.evaluation import evaluator as ev_lib
from pause_flax.model import transformer
from pause_flax.training import checkpointing
from pause_flax.training import loop
from pause_flax.training import metrics as metrics_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = dataclasses.replace(transformer.model_config("tiny"), max_len=96)
LENGTHS = {"inputs": 64, "targets": 16}
M_FT = 10
BATCH = 8
VOCAB = seqio.ByteVocabulary()


def _train(model_dir, task, steps, **kwargs):
  return loop.train(model_dir=str(model_dir), mixture_or_task_name=task, train_steps=steps,
                    batch_size=BATCH, model_config=CONFIG, mesh=parallel.make_mesh(),
                    checkpoint_options=checkpointing.CheckpointOptions(async_save=False),
                    **kwargs)


def _meta(model_dir):
  ckpt = checkpointing.Checkpointer(os.path.join(model_dir, "checkpoints"))
  try:
    return ckpt.read_meta()
  finally:
    ckpt.close()


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
  """A standard (byte vocabulary, no pause row) pretraining checkpoint."""
  path = tmp_path_factory.mktemp("pretrain_std")
  _train(path, "synthetic_lm", 3, task_feature_lengths={"targets": 96}, log_every=3)
  return str(path)


def test_finetuning_loss_is_on_the_target_only():
  ds = pipeline.get_dataset("synthetic_addition_pause", LENGTHS, BATCH, shuffle=False,
                            num_epochs=1)
  batch = next(ds.as_numpy_iterator())
  examples = seqio.get_mixture_or_task("synthetic_addition").get_dataset(
      LENGTHS, split="train", shuffle=False)
  pause = VOCAB.vocab_size
  for row, ex in zip(range(BATCH), examples.as_numpy_iterator()):
    weights = batch["decoder_loss_weights"][row]
    targets = batch["decoder_target_tokens"][row]
    inputs = batch["decoder_input_tokens"][row]
    assert targets[weights == 1].tolist() == ex["targets"].tolist()  # answer + EOS
    prefix = len(ex["inputs"]) + M_FT
    assert not weights[:prefix].any()  # prefix and pauses
    assert inputs[1:prefix + 1].tolist() == ex["inputs"].tolist() + [pause] * M_FT


def test_pause_finetuning_from_a_standard_checkpoint_then_eval_cli(pretrained, tmp_path):
  model_dir = tmp_path / "finetune"
  every = 6
  periodic = ev_lib.PeriodicEval(
      every, ev_lib.Evaluator("synthetic_addition", batch_size=BATCH,
                              mesh=parallel.make_mesh(), num_examples=BATCH), [M_FT])
  rows = _train(model_dir, "synthetic_addition", 12, task_feature_lengths=LENGTHS,
                num_pauses=M_FT, init_from=pretrained, learning_rate=3e-3, log_every=1,
                eval_hook=periodic)
  assert _meta(pretrained)["vocab_size"] == VOCAB.vocab_size
  meta = _meta(model_dir)
  assert meta["vocab_size"] == VOCAB.vocab_size + 1  # the pause row was added
  assert (meta["base_task"], meta["num_pauses"]) == ("synthetic_addition", M_FT)
  assert all(r["pause_inputs"] == BATCH * M_FT for r in rows)
  losses = [r["loss"] for r in rows]
  assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.2, losses
  key = f"eval/synthetic_addition/M{M_FT}/exact_match"
  assert [r["step"] for r in rows if key in r] == [6, 12]
  assert key in metrics_lib.read_metrics(str(model_dir))[-1]

  # Defaults from the checkpoint: its Task in standard form, M_inf = M_ft.
  results = ev_lib.run(str(model_dir), num_examples=BATCH, batch_size=BATCH,
                       mesh=parallel.make_mesh())
  assert list(results) == ["synthetic_addition"] and list(results["synthetic_addition"]) == [M_FT]
  assert (model_dir / "eval" / "synthetic_addition" / f"M{M_FT}" / "metrics.json").exists()

  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
             JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2")
  out = tmp_path / "cli_eval"
  proc = subprocess.run(
      [sys.executable, "-m", "pause_flax.eval", "--gin_file=gin_configs/local/eval_smoke.gin",
       f"--gin.CHECKPOINT_PATH='{model_dir}'", f"--gin.EVAL_OUTPUT_DIR='{out}'",
       "--gin.EVAL_NUM_EXAMPLES=8", "--gin.BATCH_SIZE=8",
       "--gin.NUM_PAUSES_INFERENCE_SWEEP=[0, 2]"],
      env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  task_dir = out / "synthetic_addition"
  for m in (0, 2):
    summary = json.loads((task_dir / f"M{m}" / "metrics.json").read_text())
    assert summary["num_pauses_inference"] == m and "exact_match" in summary["metrics"]
    records = [json.loads(l) for l in (task_dir / f"M{m}" / "predictions.jsonl").open()]
    assert len(records) == 8
    assert all(r["prompt"] == r["inputs"] + ev_lib.PAUSE_MARK * m for r in records)
  assert {"sweep.md", "sweep.json", "sweep.png"} <= set(os.listdir(task_dir))


def test_standard_finetuning_of_a_pause_checkpoint_keeps_the_pause_row(tmp_path):
  pretrain = tmp_path / "pretrain_pause"
  _train(pretrain, "synthetic_lm", 2, task_feature_lengths={"targets": 96}, log_every=2,
         pause_fraction=0.1)
  finetune = tmp_path / "finetune_std"
  rows = _train(finetune, "synthetic_addition", 2, task_feature_lengths=LENGTHS,
                init_from=str(pretrain), log_every=2)
  meta = _meta(finetune)
  assert meta["vocab_size"] == VOCAB.vocab_size + 1
  assert (meta["task"], meta["num_pauses"]) == ("synthetic_addition_pause0", 0)
  assert rows[-1]["pause_inputs"] == 0


def test_trained_token_rate_is_weighted_tokens_over_step_time(tmp_path, monkeypatch):
  """metrics.jsonl's trained_tokens_per_sec = the window's summed weighted target
  tokens / the window's time (step_time x steps), beside tokens_per_sec (all slots)."""
  from pause_flax.training import trainer as trainer_lib
  weights = []
  init = trainer_lib.Trainer.__init__

  def recording_init(self, *args, **kwargs):
    init(self, *args, **kwargs)
    step = self.train_step

    def train_step(state, batch):
      state, metrics = step(state, batch)
      weights.append(float(metrics["weighted_tokens"]))
      return state, metrics

    self.train_step = train_step

  monkeypatch.setattr(trainer_lib.Trainer, "__init__", recording_init)
  rows = _train(tmp_path, "synthetic_addition_pause", 4, task_feature_lengths=LENGTHS,
                num_pauses=M_FT, log_every=2)
  assert [r["step"] for r in rows] == [2, 4] and len(weights) == 4
  assert len(set(weights)) > 1  # answers differ in length: the window sum matters
  for row, window in zip(rows, (weights[:2], weights[2:])):
    assert row["weighted_tokens"] == window[-1]
    np.testing.assert_allclose(row["trained_tokens_per_sec"] * row["step_time"] * 2,
                               sum(window), rtol=1e-6)
    np.testing.assert_allclose(row["tokens_per_sec"] * row["step_time"], BATCH * 80, rtol=1e-6)
  rows_on_disk = metrics_lib.read_metrics(str(tmp_path))
  assert rows_on_disk[-1]["trained_tokens_per_sec"] == rows[-1]["trained_tokens_per_sec"]
