"""Run-directory guards: the config comparison on resume, the MODEL_DIR lock,
command-line gin refusals (fast: no training)."""

import json
import os
import socket
import subprocess
import sys
import time

import gin
import pytest

from pause_flax import gin_utils
from pause_flax.training import run_dir

SAVED = """
BATCH_SIZE = 16
LEARNING_RATE = 0.003
MODEL_NAME = 'tiny'
PAUSE_FRACTION = 0.1
SAVE_EVERY = 10
SEED = 0
TRAIN_STEPS = 20
CheckpointOptions.save_every = %SAVE_EVERY
model_config.name = %MODEL_NAME
train.batch_size = %BATCH_SIZE
train.learning_rate = %LEARNING_RATE
train.log_every = 25
train.pause_fraction = %PAUSE_FRACTION
train.seed = %SEED
train.data_seed = %SEED
train.train_steps = %TRAIN_STEPS
train.model_config = @pause_flax.model.transformer.model_config()
"""


def changed(**edits):
  text = SAVED
  for key, value in edits.items():
    lines = [l for l in text.splitlines() if not l.startswith(f"{key} = ")]
    text = "\n".join(lines + [f"{key} = {value}"])
  return text


def kinds(today):
  return {c.name: c.kind for c in run_dir.compare_configs(SAVED, today)}


def test_identical_configs_have_no_changes():
  assert run_dir.compare_configs(SAVED, SAVED) == []


@pytest.mark.parametrize("edits, expected", [
    ({"TRAIN_STEPS": 40}, {"TRAIN_STEPS": "safe"}),
    ({"SAVE_EVERY": 5, "train.log_every": 1}, {"SAVE_EVERY": "safe",
                                               "train.log_every": "safe"}),
    ({"LEARNING_RATE": 1e-4}, {"LEARNING_RATE": "overridable"}),
    ({"PAUSE_FRACTION": 0.2}, {"PAUSE_FRACTION": "fixed"}),
    ({"BATCH_SIZE": 8}, {"BATCH_SIZE": "fixed"}),
    ({"SEED": 1}, {"SEED": "fixed"}),            # read by train.data_seed too
    ({"MODEL_NAME": "'bench_4l'"}, {"MODEL_NAME": "fixed"}),
    ({"train.skip_nonfinite_updates": 3}, {"train.skip_nonfinite_updates": "safe"}),
    ({"train.batch_size": 16}, {"train.batch_size": "fixed"}),  # macro replaced by a value
    ({"train.profile_steps": "(10, 5)"}, {"train.profile_steps": "safe"}),
    ({"train.wandb": "@WandbOptions()", "WandbOptions.project": "'pause'"},
     {"train.wandb": "safe", "WandbOptions.project": "safe"}),
])
def test_changes_are_named_as_typed_and_classified(edits, expected):
  assert kinds(changed(**edits)) == expected


POLICY_SAVED = SAVED + """
PAUSE_PLACEMENT = 'segments'
PAUSE_COUNT = @Curriculum()
PAUSE_TOKEN = None
Curriculum.end = 10
Curriculum.stage_examples = 1000
train.pause_placement = %PAUSE_PLACEMENT
train.pause_count = %PAUSE_COUNT
train.pause_token = %PAUSE_TOKEN
"""


@pytest.mark.parametrize("edit, name", [
    ("PAUSE_PLACEMENT = 'before_marker'", "PAUSE_PLACEMENT"),
    ("PAUSE_COUNT = (2, 8)", "PAUSE_COUNT"),
    ("PAUSE_TOKEN = 46", "PAUSE_TOKEN"),
    ("Curriculum.end = 20", "Curriculum.end"),
    ("Curriculum.increment = 2", "Curriculum.increment"),
    ("BeforeMarker.marker = 'Q:'", "BeforeMarker.marker"),
    ("train.pause_count = 4", "train.pause_count"),
])
def test_pause_policies_are_fixed_on_resume(edit, name):
  key = edit.split(" = ")[0]
  lines = [l for l in POLICY_SAVED.splitlines() if not l.startswith(f"{key} = ")]
  changes = {c.name: c.kind for c in run_dir.compare_configs(
      POLICY_SAVED, "\n".join(lines + [edit]))}
  assert changes == {name: "fixed"}


def test_run_saved_before_the_policy_macros_resumes_with_them_unset():
  today = SAVED + """
PAUSE_PLACEMENT = None
PAUSE_COUNT = None
PAUSE_TOKEN = None
train.pause_placement = %PAUSE_PLACEMENT
train.pause_count = %PAUSE_COUNT
train.pause_token = %PAUSE_TOKEN
"""
  assert run_dir.compare_configs(SAVED, today) == []
  (change,) = run_dir.compare_configs(SAVED, today.replace(
      "PAUSE_PLACEMENT = None", "PAUSE_PLACEMENT = 'segments'"))
  assert (change.name, change.kind) == ("train.pause_placement", "fixed")


def test_change_shows_old_and_new_values():
  (change,) = run_dir.compare_configs(SAVED, changed(PAUSE_FRACTION=0.2))
  assert str(change) == "PAUSE_FRACTION 0.1 -> 0.2"


def test_fixed_change_is_refused_naming_setting_and_fix():
  changes = run_dir.compare_configs(SAVED, changed(PAUSE_FRACTION=0.2, TRAIN_STEPS=40))
  with pytest.raises(run_dir.ResumeRefused) as e:
    run_dir.check_resume(changes, (), "/runs/a", 20)
  message = str(e.value)
  assert "\n" not in message
  assert "PAUSE_FRACTION 0.1 -> 0.2" in message and "new MODEL_DIR" in message
  # Naming a fixed setting in allow_changes does not let it through.
  with pytest.raises(run_dir.ResumeRefused):
    run_dir.check_resume(changes, ["PAUSE_FRACTION"], "/runs/a", 20)


def test_overridable_change_needs_allow_changes():
  changes = run_dir.compare_configs(SAVED, changed(LEARNING_RATE=1e-4, TRAIN_STEPS=40))
  with pytest.raises(run_dir.ResumeRefused, match=r"allow_changes=\"\['LEARNING_RATE'\]\""):
    run_dir.check_resume(changes, (), "/runs/a", 20)
  accepted = run_dir.check_resume(changes, ["LEARNING_RATE"], "/runs/a", 20)
  assert {c.name for c in accepted} == {"LEARNING_RATE", "TRAIN_STEPS"}


def test_accepted_changes_are_described_as_a_json_line():
  changes = run_dir.compare_configs(SAVED, changed(TRAIN_STEPS=40))
  line = run_dir.describe_accepted(20, changes)
  assert line.endswith("\n") and line.count("\n") == 1
  row = json.loads(line)
  assert row["step"] == 20
  assert row["changes"] == [{"name": "TRAIN_STEPS", "old": "20", "new": "40",
                             "kind": "safe"}]


# -- the lock -------------------------------------------------------------------


def test_second_lock_on_a_live_holder_is_refused(tmp_path):
  with run_dir.RunLock(str(tmp_path)):
    record = json.load(open(tmp_path / run_dir.LOCK_NAME))
    assert record["pid"] == os.getpid() and record["host"] == socket.gethostname()
    with pytest.raises(run_dir.RunDirInUse, match=f"in use by process {os.getpid()}"):
      run_dir.RunLock(str(tmp_path)).acquire()
  assert not (tmp_path / run_dir.LOCK_NAME).exists()


def test_lock_of_a_dead_process_is_reported_and_taken_over(tmp_path, caplog):
  dead = subprocess.Popen([sys.executable, "-c", "pass"])
  dead.wait()
  (tmp_path / run_dir.LOCK_NAME).write_text(json.dumps(
      {"host": socket.gethostname(), "pid": dead.pid, "started": 0, "heartbeat": 0}))
  with caplog.at_level("WARNING"):
    lock = run_dir.RunLock(str(tmp_path)).acquire()
  assert f"process {dead.pid} on this host has ended" in caplog.text
  assert json.load(open(tmp_path / run_dir.LOCK_NAME))["pid"] == os.getpid()
  lock.release()


def test_lock_from_another_host_is_stale_only_without_heartbeat(tmp_path):
  path = tmp_path / run_dir.LOCK_NAME
  path.write_text(json.dumps({"host": "elsewhere", "pid": 1, "started": 0,
                              "heartbeat": time.time()}))
  with pytest.raises(run_dir.RunDirInUse, match="on elsewhere"):
    run_dir.RunLock(str(tmp_path), stale_after=300).acquire()
  path.write_text(json.dumps({"host": "elsewhere", "pid": 1, "started": 0,
                              "heartbeat": time.time() - 301}))
  run_dir.RunLock(str(tmp_path), stale_after=300).acquire().release()


def test_heartbeat_refreshes_the_lock(tmp_path):
  lock = run_dir.RunLock(str(tmp_path), heartbeat_every=0.05).acquire()
  first = json.load(open(tmp_path / run_dir.LOCK_NAME))["heartbeat"]
  time.sleep(0.3)
  assert json.load(open(tmp_path / run_dir.LOCK_NAME))["heartbeat"] > first
  lock.release()


# -- command-line gin refusals ----------------------------------------------------


@gin.configurable("reliability_probe")
def _probe(rate=1.0, name="x"):
  return rate, name


@pytest.fixture
def clean_gin():
  gin.clear_config()
  yield
  gin.clear_config()


def _parse(tmp_path, bindings, file_text="RATE = 1.0\nreliability_probe.rate = %RATE\n"):
  path = tmp_path / "probe.gin"
  path.write_text(file_text)
  gin_utils.parse_gin([str(path)], bindings)


def test_macro_typo_is_refused_with_a_suggestion(tmp_path, clean_gin):
  with pytest.raises(gin_utils.ConfigError,
                     match=r"--gin.RTAE=2.0: no config uses the macro RTAE; did you mean RATE"):
    _parse(tmp_path, ["RTAE = 2.0"])
  gin.clear_config()
  _parse(tmp_path, ["RATE = 2.0"])  # a used macro is fine
  assert gin.query_parameter("RATE/macro.value") == 2.0


def test_unquoted_string_gets_a_quote_hint(tmp_path, clean_gin):
  with pytest.raises(gin_utils.ConfigError) as e:
    _parse(tmp_path, ["reliability_probe.name = /tmp/run"])
  assert "--gin.reliability_probe.name=/tmp/run" in str(e.value)
  assert "--gin.reliability_probe.name=\"'/tmp/run'\"" in str(e.value)


def test_broken_syntax_names_the_binding(tmp_path, clean_gin):
  with pytest.raises(gin_utils.ConfigError, match=r"^--gin.RATE=\[1,: gin cannot parse"):
    _parse(tmp_path, ["RATE = [1,"])


def test_unknown_parameter_names_the_binding(tmp_path, clean_gin):
  with pytest.raises(gin_utils.ConfigError,
                     match=r"--gin.reliability_probe.bogus=1: .*bogus"):
    _parse(tmp_path, ["reliability_probe.bogus = 1"])


def test_missing_required_macro_says_how_to_set_it(tmp_path, clean_gin):
  with pytest.raises(gin_utils.ConfigError,
                     match=r"^MODEL_DIR is required and not set: pass --gin.MODEL_DIR="):
    _parse(tmp_path, [], "MODEL_DIR = %gin.REQUIRED\nreliability_probe.name = %MODEL_DIR\n")


def test_missing_gin_file_is_named(tmp_path, clean_gin):
  with pytest.raises(gin_utils.ConfigError, match="--gin_file=nope.gin not found"):
    gin_utils.parse_gin(["nope.gin"], [], [str(tmp_path)])


@pytest.mark.parametrize("module, gin_file, macro", [
    ("pause_flax.eval", "gin_configs/runs/eval.gin", "CHECKPOINT_PATH"),
    ("pause_flax.grid", "gin_configs/local/grid.gin", "GRID_DIR"),
])
def test_gin_clis_refuse_in_one_line(module, gin_file, macro):
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2")
  result = subprocess.run([sys.executable, "-m", module, f"--gin_file={gin_file}"],
                          cwd=gin_utils.REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
  assert result.returncode == 2, result.stderr[-2000:]
  assert "Traceback" not in result.stderr
  (line,) = [l for l in result.stderr.splitlines() if l.startswith(f"{module}:")]
  assert f"{macro} is required and not set: pass --gin.{macro}=" in line
