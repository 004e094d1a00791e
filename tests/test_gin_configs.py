"""Every gin file under gin_configs/ parses and resolves; the paper runs say what they should.

Nothing is trained or compiled: files are parsed with the CLI's configurables
registered, `train`'s bindings are resolved (REQUIRED macros bound to dummies
when a file leaves them to the command line), and the paper models are built
abstractly.
"""

from __future__ import annotations

import glob
import importlib
import importlib.util
import math
import os

import gin
import jax
import pytest
from flax import nnx

from pause_flax import gin_utils
from pause_flax.model import transformer
from pause_flax.training import optimizer as optimizer_lib

# The CLI entry points register the configurables their gin files bind.
cli = importlib.import_module("pause_flax.train")
importlib.import_module("pause_flax.eval")
grid = importlib.import_module("pause_flax.grid")
control = importlib.import_module("pause_flax.control")

GIN_ROOT = os.path.join(gin_utils.REPO_ROOT, "gin_configs")
GIN_FILES = sorted(os.path.relpath(p, gin_utils.REPO_ROOT)
                   for p in glob.glob(os.path.join(GIN_ROOT, "**", "*.gin"), recursive=True))
PAPER_FILES = {
    "gin_configs/paper/pretrain_std_130m.gin": ("paper_130m", 0.0),
    "gin_configs/paper/pretrain_pause_130m.gin": ("paper_130m", 0.1),
    "gin_configs/paper/pretrain_std_1b.gin": ("paper_1b", 0.0),
    "gin_configs/paper/pretrain_pause_1b.gin": ("paper_1b", 0.1),
}
# train parameter -> (macro, dummy gin value) for macros a file may leave REQUIRED.
DUMMIES = {
    "model_dir": ("MODEL_DIR", "'/tmp/pause_flax_gin_test'"),
    "mixture_or_task_name": ("MIXTURE_OR_TASK_NAME", "'synthetic_lm'"),
    "task_feature_lengths": ("TASK_FEATURE_LENGTHS", "{'targets': 128}"),
    "train_steps": ("TRAIN_STEPS", "10000"),
    "batch_size": ("BATCH_SIZE", "8"),
    "init_from": ("INIT_FROM", "'/tmp/pause_flax_gin_test_init'"),
}
# Files meant to be run as they are: only paths come from the command line.
COMMAND_LINE = {"model_dir", "init_from"}
RUNNABLE_DIRS = ("gin_configs/paper/", "gin_configs/local/")
PAPER_TOKENS = 200e9
PAPER_SEQ_LEN = 2048
PAPER_VOCAB = 32001  # T5's 32k SentencePiece + <pause>


@pytest.fixture(autouse=True)
def clean_gin():
  gin.clear_config()
  for root in gin_utils.DEFAULT_SEARCH_PATHS:
    gin.add_config_file_search_path(root)
  yield
  gin.clear_config()


MODEL_CONFIG = "pause_flax.model.transformer.model_config"


def _parse(path: str) -> dict:
  """Parses `path`; returns train's resolved bindings ({} if the file binds none).

  REQUIRED macros get dummies, and a run fragment without a model gets 'tiny'.
  """
  gin.parse_config_file(os.path.join(gin_utils.REPO_ROOT, path))
  if not gin.get_bindings("train", resolve_references=False):
    return {}
  if not gin.get_bindings(MODEL_CONFIG, resolve_references=False):
    gin.bind_parameter(f"{MODEL_CONFIG}.name", "tiny")
  required = {k for k, v in gin.get_bindings("train").items() if v is gin.REQUIRED}
  if path.startswith(RUNNABLE_DIRS):
    assert required <= COMMAND_LINE, f"{path} leaves {required} to the command line"
  assert required <= DUMMIES.keys(), f"{path}: REQUIRED without a dummy: {required}"
  gin.parse_config([f"{DUMMIES[k][0]} = {DUMMIES[k][1]}" for k in sorted(required)])
  return gin.get_bindings("train")


def test_gin_files_found():
  assert set(PAPER_FILES) <= set(GIN_FILES)


@pytest.mark.parametrize("path", GIN_FILES)
def test_gin_file_parses_and_resolves(path):
  b = _parse(path)
  if gin.get_bindings(MODEL_CONFIG, resolve_references=False):
    assert isinstance(transformer.model_config(), transformer.TransformerConfig)
  if not b:
    return
  assert not [k for k, v in b.items() if v is gin.REQUIRED]
  assert isinstance(b["model_config"], transformer.TransformerConfig)
  # The schedule, optimizer and mesh the CLI would build from this file.
  optimizer_lib.make_schedule(
      b.get("learning_rate", 1e-3), b["train_steps"], b.get("warmup_steps", 0),
      b.get("decay", "cosine"), b.get("end_learning_rate_fraction", 0.1))
  cli.make_optimizer(1e-3)
  assert math.prod(cli.make_mesh().shape.values()) == jax.device_count()


@pytest.mark.parametrize("path", sorted(PAPER_FILES))
def test_paper_pretraining_runs(path):
  model_name, fraction = PAPER_FILES[path]
  b = _parse(path)
  assert gin.query_parameter("%MODEL_NAME") == model_name
  assert b["mixture_or_task_name"] == "c4_en_lm"
  assert dict(b["task_feature_lengths"]) == {"targets": PAPER_SEQ_LEN}
  assert b["model_config"].max_len >= PAPER_SEQ_LEN
  assert b["pause_fraction"] == fraction
  assert b["num_pauses"] == 0
  assert isinstance(b["train_steps"], int) and isinstance(b["batch_size"], int)
  tokens = b["train_steps"] * b["batch_size"] * PAPER_SEQ_LEN
  assert abs(tokens / PAPER_TOKENS - 1) < 0.01, tokens
  assert b["warmup_steps"] < b["train_steps"]
  assert b["model_config"].dtype == "bfloat16"


@pytest.mark.parametrize("size", ["130m", "1b"])
def test_paper_std_and_pause_runs_share_the_recipe(size):
  runs = {}
  for kind in ("std", "pause"):
    gin.clear_config()
    runs[kind] = _parse(f"gin_configs/paper/pretrain_{kind}_{size}.gin")
  assert {k for k in runs["std"] if runs["std"][k] != runs["pause"][k]} == {"pause_fraction"}


@pytest.mark.parametrize("name,expected", [("paper_130m", 136e6), ("paper_1b", 1.34e9)])
def test_paper_models_build_at_the_paper_size(name, expected):
  gin.parse_config_file(os.path.join(GIN_ROOT, "models", f"{name}.gin"))
  config = transformer.model_config(vocab_size=PAPER_VOCAB)
  model = nnx.eval_shape(lambda: transformer.Transformer(config, rngs=nnx.Rngs(0)))
  built = sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  assert built == transformer.num_params(config, include_padding=True)
  assert abs(transformer.num_params(config) / expected - 1) < 0.02


GRID_FILES = ["gin_configs/local/grid.gin", "gin_configs/local/grid_gpu.gin",
              "gin_configs/paper/grid_130m.gin", "gin_configs/paper/grid_1b.gin"]


@pytest.mark.parametrize("path", GRID_FILES)
def test_grid_files_bind_a_complete_grid(path):
  gin.parse_config_file(os.path.join(gin_utils.REPO_ROOT, path))
  gin.parse_config(["GRID_DIR = '/tmp/pause_flax_gin_test_grid'"])
  b = gin.get_bindings("run_grid")
  assert isinstance(b["model_config"], transformer.TransformerConfig)
  assert len(set(b["seeds"])) == len(b["seeds"])
  assert len(set(b["pretrain_seeds"])) == len(b["pretrain_seeds"])
  assert b["pause_fraction"] == 0.1 and 0 in b["m_inf_sweep"]
  m_ft = b["num_pauses"]
  m_ft = m_ft if isinstance(m_ft, dict) else {t: m_ft for t in b["tasks"]}
  assert all(m_ft[t] in b["m_inf_sweep"] for t in b["tasks"])
  if path.startswith("gin_configs/paper/"):
    assert len(b["tasks"]) == 9 and m_ft["squad"] == 50 and m_ft["gsm8k"] == 10
    p = b["pretrain"]
    tokens = p.steps * p.batch_size * p.feature_lengths["targets"]
    assert abs(tokens / PAPER_TOKENS - 1) < 0.01
    assert set(b["metric"]) == set(b["tasks"])
    assert len(b["seeds"]) >= 5 and b["pretrain_seeds"] == [0]   # the paper: 5 finetunings
  else:   # the offline grids: intervals over >= 3 pretraining seeds, >= 9 seed pairs
    assert len(b["pretrain_seeds"]) >= 3 and len(b["seeds"]) * len(b["pretrain_seeds"]) >= 9


@pytest.mark.parametrize("path", ["gin_configs/local/positive_control.gin",
                                  "gin_configs/local/grid.gin"])
def test_control_bindings(path):
  """The controls: parity first, >= 3 seeds; the standalone command also runs 3SUM (a
  pause per hint) and the negative control."""
  from pause_flax.data import synthetic  # pylint: disable=g-import-not-at-top
  gin.parse_config_file(os.path.join(gin_utils.REPO_ROOT, path))
  gin.parse_config(["CONTROL_DIR = '/tmp/c'", "GRID_DIR = '/tmp/g'"])
  b = gin.get_bindings("run_control")
  assert b["tasks"][0] == "synthetic_parity"
  assert len(set(b["seeds"])) >= 3 and b["num_pauses"]["synthetic_parity"] == 20
  if path.endswith("grid.gin"):   # the grid runs the cheap, sharp positive control only
    assert b["tasks"] == ["synthetic_parity"]
    return
  assert "synthetic_count" in b["tasks"]   # the negative control
  assert "synthetic_3sum" in b["tasks"] and b["baseline_max"] == {"synthetic_3sum": 70.0}
  assert b["num_pauses"]["synthetic_3sum"] == synthetic.sum3_num_hints(5, 3)


def test_pause_policy_macros_reach_train():
  """PAUSE_PLACEMENT / PAUSE_COUNT / PAUSE_TOKEN: None by default (the paper's
  recipe), and the policy objects are configurable from the command line."""
  from pause_flax.data import policies  # pylint: disable=g-import-not-at-top
  b = _parse("gin_configs/local/smoke_pause.gin")
  assert (b["pause_placement"], b["pause_count"], b["pause_token"]) == (None, None, None)
  gin.parse_config(["PAUSE_PLACEMENT = @BeforeMarker()", "BeforeMarker.marker = 'Q:'",
                    "PAUSE_COUNT = @Curriculum()", "Curriculum.end = 8",
                    "Curriculum.stage_examples = 64", "PAUSE_TOKEN = 46",
                    "PAUSE_FRACTION = 0.0"])
  b = gin.get_bindings("train")
  assert b["pause_placement"] == policies.BeforeMarker(marker="Q:")
  assert b["pause_count"] == policies.Curriculum(end=8, stage_examples=64)
  assert b["pause_token"] == 46
  gin.parse_config(["PAUSE_PLACEMENT = 'segments'", "PAUSE_COUNT = (2, 8)"])
  b = gin.get_bindings("train")
  assert policies.as_placement(b["pause_placement"]) == policies.Segments()
  assert policies.as_count(b["pause_count"]) == policies.RandomRange(2, 8)
