"""A run directory's guards: one run at a time, and no silent change on resume.

`RunLock` holds MODEL_DIR/RUN_LOCK for the run's life (process 0 on a pod). A
second run on the same directory is refused at once; the lock of a dead
process is detected (same host: its pid is gone; another host: no heartbeat
for `stale_after` seconds) and reported before it is taken over.

`compare_configs` reads the operative gin config saved in MODEL_DIR/config.gin
and today's, setting by setting, and sorts each change:
  safe        may change on resume (steps, logging, W&B, profiling,
              checkpointing, evaluation, the mesh): accepted and logged
  overridable accepted only when named in `train.allow_changes` (optimizer
              and schedule settings: the state still fits, the run changes)
  fixed       never on resume (model, data, pause settings): a new MODEL_DIR
docs/reliability.md lists them.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import threading
import time
from collections.abc import Iterable, Sequence

from absl import logging
from gin import config_parser

LOCK_NAME = "RUN_LOCK"
CHANGES_NAME = "resume_changes.jsonl"

# Settings a resume may change, by gin parameter (`configurable.param`, or
# `configurable.*` for all of one configurable's parameters).
SAFE = frozenset({
    "train.train_steps", "train.log_every", "train.peak_flops", "train.model_dir",
    "train.skip_nonfinite_updates", "train.extra_metrics_hook",
    "CheckpointOptions.*", "eval_during_training.*", "make_mesh.*",
    "model_config.kernels", "model_config.attention_impl", "model_config.remat",
    "model_config.remat_policy", "train.wandb", "WandbOptions.*", "train.profile_steps",
})
# Settings a resume never changes: the model, the data and the pause settings.
FIXED = frozenset({
    "model_config.*", "train.mixture_or_task_name", "train.task_feature_lengths",
    "train.batch_size", "train.pause_fraction", "train.num_pauses", "train.pack",
    "train.data_seed", "train.data_shards", "train.rules", "train.init_from",
    "register_tasks.*",
    # Pause policies (PAUSE_PLACEMENT, PAUSE_COUNT, PAUSE_TOKEN) and the
    # parameters of the policy objects gin builds for them.
    "train.pause_placement", "train.pause_count", "train.pause_token",
    "Fixed.*", "Fraction.*", "RandomRange.*", "Curriculum.*", "Uniform.*", "Append.*",
    "BeforeMarker.*", "Segments.*",
    # Low-confidence placement (DIT) and adaptive pauses (Catch Your Breath).
    "train.low_confidence", "LowConfidencePauses.*",
    "train.adaptive_pauses", "AdaptivePauses.*",
})


class ResumeRefused(ValueError):
  """MODEL_DIR holds a run this command may not continue (one-line message)."""


class RunDirInUse(ResumeRefused):
  """Another live process holds MODEL_DIR's lock."""


# -- the lock -----------------------------------------------------------------


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


class RunLock:
  """MODEL_DIR/RUN_LOCK: a JSON record (host, pid, start, heartbeat) kept fresh
  by a daemon thread; created with O_EXCL so two starts cannot both win."""

  def __init__(self, model_dir: str, *, heartbeat_every: float = 30.0,
               stale_after: float = 300.0, name: str = LOCK_NAME):
    self.path = os.path.join(model_dir, name)
    self.heartbeat_every = heartbeat_every
    self.stale_after = stale_after
    self._record = {"host": socket.gethostname(), "pid": os.getpid(),
                    "started": time.time(), "heartbeat": time.time()}
    self._stop = threading.Event()
    self._thread: threading.Thread | None = None

  def _read(self) -> dict | None:
    try:
      with open(self.path, encoding="utf-8") as f:
        return json.load(f)
    except FileNotFoundError:
      return None
    except (OSError, ValueError):
      return {}  # half-written or unreadable: judged by the file's age

  def _holder_is_dead(self, holder: dict) -> str | None:
    """Why the lock is stale, or None if its holder may be alive."""
    if holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int):
      if not _pid_alive(holder["pid"]):
        return f"process {holder['pid']} on this host has ended"
      return None
    try:
      beat = float(holder.get("heartbeat") or os.path.getmtime(self.path))
    except (OSError, TypeError, ValueError):
      return None
    age = time.time() - beat
    if age > self.stale_after:
      return f"no heartbeat from {holder.get('host', '?')} for {age:.0f}s"
    return None

  def _write_new(self) -> bool:
    try:
      fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
      return False
    with os.fdopen(fd, "w", encoding="utf-8") as f:
      json.dump(self._record, f)
    return True

  def acquire(self) -> "RunLock":
    if not self._write_new():
      holder = self._read()
      if holder is None:  # released between our two looks
        return self.acquire()
      stale = self._holder_is_dead(holder)
      if stale is None:
        since = time.strftime("%Y-%m-%d %H:%M:%S",
                              time.localtime(float(holder.get("started", 0))))
        raise RunDirInUse(
            f"MODEL_DIR={os.path.dirname(self.path)!r} is in use by process "
            f"{holder.get('pid', '?')} on {holder.get('host', '?')} (since {since}): wait "
            f"for it to end or use another MODEL_DIR (if that process is gone, delete "
            f"{self.path}).")
      logging.warning("Taking over the stale lock %s (%s; held by process %s on %s).",
                      self.path, stale, holder.get("pid", "?"), holder.get("host", "?"))
      os.remove(self.path)
      if not self._write_new():
        raise RunDirInUse(f"MODEL_DIR={os.path.dirname(self.path)!r}: another run took "
                          "the lock first; use another MODEL_DIR.")
    self._thread = threading.Thread(target=self._beat, daemon=True, name="run-lock")
    self._thread.start()
    return self

  def _beat(self) -> None:
    while not self._stop.wait(self.heartbeat_every):
      self._record["heartbeat"] = time.time()
      tmp = f"{self.path}.{os.getpid()}.tmp"
      try:
        with open(tmp, "w", encoding="utf-8") as f:
          json.dump(self._record, f)
        os.replace(tmp, self.path)
      except OSError as e:
        logging.warning("Could not refresh %s: %s", self.path, e)

  def release(self) -> None:
    self._stop.set()
    if self._thread is not None:
      self._thread.join()
      self._thread = None
    holder = self._read()
    if holder and holder.get("pid") == os.getpid() and (
        holder.get("host") == socket.gethostname()):
      os.remove(self.path)

  def __enter__(self):
    return self.acquire()

  def __exit__(self, *exc):
    self.release()


# -- comparing configs --------------------------------------------------------


class _AsText(config_parser.ParserDelegate):
  """Parses a config without evaluating it: references and macros stay text."""

  def configurable_reference(self, scoped_name, evaluate):
    return f"@{scoped_name}()" if evaluate else f"@{scoped_name}"

  def macro(self, name):
    return f"%{name}"


def parse_config(text: str) -> dict[str, str]:
  """{setting: value as text}: `NAME` for a macro, `[scope/]configurable.param`
  for a parameter (the configurable's short name, as gin prints it)."""
  out = {}
  for statement in config_parser.ConfigParser(text, _AsText()):
    if not isinstance(statement, config_parser.BindingStatement):
      continue
    selector = statement.selector.rsplit(".", 1)[-1] if statement.arg_name else (
        statement.selector)
    name = f"{selector}.{statement.arg_name}" if statement.arg_name else selector
    if statement.scope:
      name = f"{statement.scope}/{name}"
    out[name] = repr(statement.value) if not isinstance(statement.value, str) or (
        not statement.value.startswith(("%", "@"))) else statement.value
  return out


@dataclasses.dataclass(frozen=True)
class Change:
  name: str        # as the user types it: a macro (PAUSE_FRACTION) or train.log_every
  old: str | None  # None: not set before
  new: str | None  # None: not set now
  kind: str        # 'safe' | 'overridable' | 'fixed'

  def __str__(self) -> str:
    return f"{self.name} {self.old if self.old is not None else '(unset)'} -> " + (
        f"{self.new if self.new is not None else '(unset)'}")


def _matches(param: str, patterns: Iterable[str]) -> bool:
  param = param.split("/")[-1]
  configurable = param.split(".")[0]
  return param in patterns or f"{configurable}.*" in patterns


def _kind(params: Sequence[str]) -> str:
  if any(_matches(p, FIXED) for p in params):
    return "fixed"
  if params and all(_matches(p, SAFE) for p in params):
    return "safe"
  return "overridable"


def _resolve(config: dict[str, str], value: str | None) -> str | None:
  """`value` with macros (`%NAME`) replaced by their values in `config`."""
  seen = set()
  while isinstance(value, str) and value.startswith("%") and value not in seen:
    seen.add(value)
    value = config.get(value[1:])
  return value


def compare_configs(saved: str, today: str) -> list[Change]:
  """Every setting whose value differs between two operative gin configs.

  A setting the saved config lacks (it did not exist when the run was made)
  is no change while today's value, macros resolved, is None (the feature
  off, as the run had it)."""
  old, new = parse_config(saved), parse_config(today)
  users = {}  # macro -> the parameters that read it, in either config
  for config in (old, new):
    for name, value in config.items():
      if isinstance(value, str) and value.startswith("%"):
        users.setdefault(value[1:], set()).add(name)
  changes = []
  for name in sorted(old.keys() | new.keys()):
    a, b = old.get(name), new.get(name)
    if a == b or name.split("/")[-1] == "train.allow_changes":
      continue  # the override itself is not a setting of the run
    if a is None and _resolve(new, b) == "None":
      continue  # a setting added since the run was made, at its default (off)
    is_macro = "." not in name.split("/")[-1]
    if is_macro and (a is None or b is None):
      continue  # a macro no longer (or newly) read: its readers' change is reported
    params = sorted(users.get(name, ())) if is_macro else [name]
    changes.append(Change(name, a, b, _kind(params)))
  return changes


def check_resume(changes: Sequence[Change], allowed: Sequence[str], model_dir: str,
                 step: int) -> list[Change]:
  """Raises ResumeRefused naming each change that may not happen; returns the
  accepted ones (safe, or overridable and named in `allowed`)."""
  allowed = set(allowed or ())
  fixed = [c for c in changes if c.kind == "fixed"]
  not_allowed = [c for c in changes if c.kind == "overridable" and c.name not in allowed]
  where = f"MODEL_DIR={model_dir!r} holds a run at step {step} made with other settings"
  if fixed:
    raise ResumeRefused(
        f"{where}: {'; '.join(map(str, fixed + not_allowed))}. "
        f"{', '.join(c.name for c in fixed)} cannot change on resume: use a new MODEL_DIR "
        f"(INIT_FROM={model_dir!r} starts from this run's parameters) or rerun with the "
        "saved settings (MODEL_DIR/config.gin); see docs/reliability.md.")
  if not_allowed:
    names = ", ".join(f"'{c.name}'" for c in not_allowed)
    raise ResumeRefused(
        f"{where}: {'; '.join(map(str, not_allowed))}. To continue with the new values, "
        f"accept them explicitly with --gin.train.allow_changes=\"[{names}]\", or use a new "
        "MODEL_DIR; see docs/reliability.md.")
  unknown = allowed - {c.name for c in changes}
  if unknown:
    logging.info("train.allow_changes names %s, which did not change.", sorted(unknown))
  return list(changes)


def describe_accepted(step: int, changes: Sequence[Change]) -> str:
  """Logs accepted changes; returns their line for MODEL_DIR/resume_changes.jsonl."""
  logging.warning("Resuming at step %d with changed settings: %s.", step,
                  "; ".join(map(str, changes)))
  return json.dumps({"time": time.time(), "step": step,
                     "changes": [dataclasses.asdict(c) for c in changes]}) + "\n"
