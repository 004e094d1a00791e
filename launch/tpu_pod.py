#!/usr/bin/env python3
"""Launches pause_flax training on a Cloud TPU VM pod slice through gcloud.

Every action is a list of shell lines (gcloud, tar, mkdir) that this script
runs one after another with bash; `--dry-run` prints exactly those lines and
runs nothing. The first line that fails (on any worker) stops the launch with
a non-zero exit status and one line naming the step and the worker. Bad flags
are refused with one line and exit status 2 (`--debug` adds the traceback).
Subcommands:

  create   create the TPU VM (or, with --queued, a queued resource and wait
           until it is ACTIVE)
  install  ship the code and gin files to every worker and install them
  run      start `python -m pause_flax.train` detached on every worker, each
           appending to ~/pause_flax_logs/worker-$(hostname).log; fails when
           training exits with an error within --check-seconds
  logs     copy each worker's log into --logs-dir/worker-<i>.log
  stop     stop the training process on every worker
  delete   delete the TPU VM (or queued resource)
  up       create + install + run

What `install` ships: by default a tarball of this checkout (setup.py,
pause_flax/, gin_configs/, ...) that is copied to every worker with
`gcloud compute tpus tpu-vm scp --worker=all` from a private temporary
directory (made by mktemp -d and removed when the copy ends), unpacked into ~/pause_flax
and installed from there, with jax[tpu], into a Python 3.11 virtualenv
(~/pause_flax_venv, made by uv: TPU VM images ship Python 3.10). With
`--package SPEC` the venv gets SPEC instead (a git URL, a wheel, a PyPI
version) and only gin_configs/ is shipped. Training runs in ~/pause_flax, so gin file paths are
relative to the checkout root, as they are locally.

Arguments after a bare `--` are appended to the training command, e.g.
`-- --gin.TRAIN_STEPS=1000`. Preempted? Recreate the TPU and `run` again
with the same --model-dir: training resumes from its last checkpoint.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Sequence

from common import (DEFAULT_SOURCE_DIR, LaunchError, OneLineArgumentParser,
                    parse_with_train_args, refuse, wants_debug)

# Runtime (OS image) versions recommended for JAX, per TPU generation.
RUNTIME_VERSIONS = {
    "v2": "tpu-ubuntu2204-base",
    "v3": "tpu-ubuntu2204-base",
    "v4": "tpu-ubuntu2204-base",
    "v5p": "v2-alpha-tpuv5",
    "v5litepod": "v2-alpha-tpuv5-lite",
    "v6e": "v2-alpha-tpuv6e",
}
_ACCELERATOR_RE = re.compile(r"^(v2|v3|v4|v5p|v5litepod|v6e)-([0-9]+)$")
_ACCELERATOR_HELP = (
    "v2-N, v3-N, v4-N, v5p-N (N TensorCores, a multiple of 8; 8 per worker) "
    "or v5litepod-N, v6e-N (N chips in 1, 4, 8, 16, ..., 256; 4 per worker "
    "above 8)"
)
_LITE_SIZES = (1, 4, 8, 16, 32, 64, 128, 256)
_NAME_RE = re.compile(r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")
_ZONE_RE = re.compile(r"^[a-z]+(-[a-z]+[0-9]+)-[a-z]$")
_ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

# Where things live on every worker.
REMOTE_DIR = "~/pause_flax"
REMOTE_TARBALL = "~/pause_flax_src.tar.gz"
# The local tarball, inside a private directory (mktemp -d) that its step makes
# and removes; left unquoted in that step so that the shell expands $tmp.
_LOCAL_TARBALL = '"$tmp/pause_flax_src.tar.gz"'
# TPU VM images ship Python 3.10 and pause_flax needs 3.11+: install with uv.
REMOTE_PYTHON_VERSION = "3.11"
REMOTE_VENV = "~/pause_flax_venv"
REMOTE_LOG_DIR = "~/pause_flax_logs"
REMOTE_PID_FILE = f"{REMOTE_LOG_DIR}/train.pid"
# Starts the stderr line a worker prints when its part of a step fails.
FAILURE_MARK = "pause_flax-launch-failed:"

# What a source tarball holds: required entries, then those shipped if present.
_SOURCE_ENTRIES = ("setup.py", "pause_flax", "gin_configs")
_OPTIONAL_SOURCE_ENTRIES = ("README.md", "MANIFEST.in", "pyproject.toml", "setup.cfg")
_GIN_DIR = "gin_configs"

_DEFAULT_SOURCE_DIR = DEFAULT_SOURCE_DIR


def num_workers(accelerator_type: str) -> int:
  """Number of TPU VM hosts ("workers") in a slice of `accelerator_type`."""
  match = _ACCELERATOR_RE.match(accelerator_type)
  if not match:
    raise LaunchError(
        f"--accelerator-type {accelerator_type!r}: unknown accelerator type; use "
        f"{_ACCELERATOR_HELP}"
    )
  generation, size = match.group(1), int(match.group(2))
  if generation in ("v5litepod", "v6e"):
    if size not in _LITE_SIZES:
      raise LaunchError(
          f"--accelerator-type {accelerator_type!r}: {generation} slices have "
          f"{_LITE_SIZES} chips; use one of those sizes"
      )
    return 1 if size <= 8 else size // 4
  if size == 0 or size % 8:
    raise LaunchError(
        f"--accelerator-type {accelerator_type!r}: {generation} sizes count "
        f"TensorCores and are multiples of 8; use e.g. {generation}-8"
    )
  return size // 8


def runtime_version(accelerator_type: str) -> str:
  """Default TPU runtime version for `accelerator_type`."""
  num_workers(accelerator_type)  # Validates.
  return RUNTIME_VERSIONS[accelerator_type.split("-")[0]]


def _gcloud(args: argparse.Namespace, *command: str) -> list[str]:
  argv = ["gcloud", "compute", "tpus", *command, f"--zone={args.zone}"]
  if args.project:
    argv.append(f"--project={args.project}")
  return argv


def _ssh(args: argparse.Namespace, worker: str, remote_command: str) -> list[str]:
  return _gcloud(args, "tpu-vm", "ssh", args.name) + [
      f"--worker={worker}",
      f"--command={remote_command}",
  ]


def _on_worker(what: str, body: str) -> str:
  """`body` under `set -e`; on failure the worker prints one FAILURE_MARK line.

  The launcher looks for that line as well as gcloud's exit status, so a
  failure on any worker of `--worker=all` fails the launch and is named.
  """
  report = (f'echo "{FAILURE_MARK} {what} failed on worker $(hostname) with exit status '
            '$rc" >&2')
  return f"trap 'rc=$?; [ $rc -eq 0 ] || {report}' EXIT; set -e; {body}"


def _join(argv: Sequence[str]) -> str:
  """shlex.join, except that the local tarball's $tmp path stays expandable."""
  return " ".join(a if a == _LOCAL_TARBALL else shlex.quote(a) for a in argv)


def _require(args: argparse.Namespace, attribute: str) -> None:
  if not getattr(args, attribute):
    flag = "--" + attribute.replace("_", "-")
    raise LaunchError(f"{args.subcommand} needs {flag}; add {flag}=...")


def create_steps(args: argparse.Namespace) -> list[str]:
  """Creates the TPU VM, or a queued resource and waits until it is ACTIVE."""
  _require(args, "accelerator_type")
  version = args.runtime_version or runtime_version(args.accelerator_type)
  spec = [f"--accelerator-type={args.accelerator_type}"]
  if not args.queued:
    create = _gcloud(args, "tpu-vm", "create", args.name) + spec
    create.append(f"--version={version}")
    return [shlex.join(create + (["--spot"] if args.spot else []))]
  create = _gcloud(args, "queued-resources", "create", args.name) + spec
  create += [f"--runtime-version={version}", f"--node-id={args.name}"]
  describe = _gcloud(args, "queued-resources", "describe", args.name)
  describe.append("--format=value(state.state)")
  wait = (
      f"while true; do state=$({shlex.join(describe)}); "
      'echo "queued resource state: $state"; case "$state" in ACTIVE) break;; '
      'FAILED|SUSPENDED) exit 1;; esac; sleep 30; done'
  )
  return [shlex.join(create + (["--spot"] if args.spot else [])), wait]


def _shipped_entries(args: argparse.Namespace) -> list[str]:
  """Top-level paths of the source checkout that go into the tarball."""
  if args.package:
    required, optional = (_GIN_DIR,), ()
  else:
    required, optional = _SOURCE_ENTRIES, _OPTIONAL_SOURCE_ENTRIES
  for entry in required:
    if not os.path.exists(os.path.join(args.source_dir, entry)):
      raise LaunchError(
          f"--source-dir {args.source_dir!r} has no {entry}; give a pause_flax "
          "checkout"
      )
  present = [e for e in optional if os.path.exists(os.path.join(args.source_dir, e))]
  return list(required) + present


def install_steps(args: argparse.Namespace) -> list[str]:
  """Builds the tarball, copies it to every worker, unpacks and installs.

  The tarball is written in a private directory (mktemp -d, mode 0700) that the
  same shell line removes when it exits, whether the copy worked or not.
  """
  tar = ["tar", "-czf", _LOCAL_TARBALL, "-C", args.source_dir]
  tar += ["--exclude=__pycache__", "--exclude=*.pyc", *_shipped_entries(args)]
  # scp paths without a leading / are relative to the remote home directory.
  scp = _gcloud(args, "tpu-vm", "scp", _LOCAL_TARBALL, f"{args.name}:{REMOTE_TARBALL[2:]}")
  scp.append("--worker=all")
  ship = (
      'set -e; tmp=$(mktemp -d "${TMPDIR:-/tmp}/pause_flax_src.XXXXXXXX"); '
      f"trap 'rm -rf \"$tmp\"' EXIT; {_join(tar)}; {_join(scp)}"
  )
  package = shlex.quote(args.package) if args.package else REMOTE_DIR
  remote = (
      f"rm -rf {REMOTE_DIR}; mkdir -p {REMOTE_DIR}; "
      f"tar -xzf {REMOTE_TARBALL} -C {REMOTE_DIR}; "
      "python3 -m pip install --user --upgrade uv; "
      f"python3 -m uv venv --allow-existing --python {REMOTE_PYTHON_VERSION} {REMOTE_VENV}; "
      # Reinstalls pause-flax even when its version is unchanged: the code may not be.
      f"python3 -m uv pip install --python {REMOTE_VENV}/bin/python --upgrade "
      f"--reinstall-package pause-flax 'jax[tpu]' {package}"
  )
  return [ship, shlex.join(_ssh(args, "all", _on_worker("install", remote)))]


def train_argv(args: argparse.Namespace) -> list[str]:
  """The training command every worker runs (from REMOTE_DIR)."""
  argv = [f"{REMOTE_VENV}/bin/python", "-m", "pause_flax.train"]
  argv += [f"--gin_file={gin_file}" for gin_file in args.gin_file]
  argv.append(f'--gin.MODEL_DIR="{args.model_dir}"')
  if args.tfds_data_dir:
    argv.append(f'--gin.TFDS_DATA_DIR="{args.tfds_data_dir}"')
  argv += [f"--gin.{binding}" for binding in args.gin]
  return argv + args.train_args


def _validate_run(args: argparse.Namespace) -> None:
  if not args.gin_file:
    raise LaunchError("run needs at least one --gin-file; add --gin-file=gin_configs/...")
  if not args.model_dir:
    raise LaunchError("run needs --model-dir; add --model-dir=gs://BUCKET/...")
  gcs_dirs = (("--model-dir", args.model_dir), ("--tfds-data-dir", args.tfds_data_dir))
  for flag, value in gcs_dirs:
    if value and not value.startswith("gs://"):
      raise LaunchError(
          f"{flag} {value!r} is not on GCS: every worker must read and write the "
          "same directory, and it must outlive the TPU VMs; use gs://BUCKET/..."
      )
    if value and re.search(r"[\s'\"]", value):
      raise LaunchError(f"{flag} {value!r} must not contain spaces or quotes; rename it")
  gin_root = os.path.join(args.source_dir, _GIN_DIR)
  for gin_file in args.gin_file:
    path = os.path.normpath(os.path.join(args.source_dir, gin_file))
    if os.path.isabs(gin_file) or not path.startswith(gin_root + os.sep):
      raise LaunchError(
          f"--gin-file {gin_file!r} must be a path under {_GIN_DIR}/, relative to "
          f"{args.source_dir}: only {_GIN_DIR}/ is shipped to the workers"
      )
    if not os.path.isfile(path):
      raise LaunchError(
          f"--gin-file {gin_file!r} not found under {args.source_dir}; check the path"
      )
  for binding in args.gin:
    if "=" not in binding:
      raise LaunchError(f"--gin {binding!r} is not KEY=VALUE; write --gin=KEY=VALUE")
  for variable in args.env:
    name = variable.split("=", 1)[0]
    if "=" not in variable or not _ENV_NAME_RE.match(name):
      raise LaunchError(
          f"--env {variable!r} is not NAME=VALUE with a shell variable NAME (letters, "
          "digits, _; not starting with a digit); write e.g. --env='XLA_FLAGS=--a=1 --b=2'"
      )
  if args.check_seconds < 0:
    raise LaunchError(f"--check-seconds {args.check_seconds} is negative; use 0 or more")


def _remote_quote(token: str) -> str:
  """shlex.quote, but escapes plain double quotes with backslashes.

  The run command is quoted twice (remote shell, then local shell), where
  single quotes nest badly; gin strings are written "like this" and survive
  both levels readably.
  """
  if re.fullmatch(r'[\w@%+=:,./~"-]+', token):
    return token.replace('"', '\\"')
  return shlex.quote(token)


def _assignment(variable: str) -> str:
  """NAME=VALUE as a shell assignment: the value quoted, the name bare."""
  name, value = variable.split("=", 1)
  return f"{name}={shlex.quote(value)}"


def run_steps(args: argparse.Namespace) -> list[str]:
  """Starts training detached on every worker, logging per worker.

  Fails if training exits with an error within --check-seconds (a bad flag,
  an import error), printing the end of that worker's log.
  """
  _validate_run(args)
  env = list(args.env)
  if args.tfds_data_dir:
    env.append(f"TFDS_DATA_DIR={args.tfds_data_dir}")
  command = " ".join([_assignment(variable) for variable in env] + ["nohup"]
                     + [_remote_quote(token) for token in train_argv(args)])
  log = f"{REMOTE_LOG_DIR}/worker-$(hostname).log"
  remote = (
      f"mkdir -p {REMOTE_LOG_DIR}; "
      f"if [ -f {REMOTE_PID_FILE} ] && kill -0 $(cat {REMOTE_PID_FILE}) 2>/dev/null; "
      'then echo "pause_flax.train is already running on $(hostname); '
      'use the stop subcommand first" >&2; exit 1; fi; '
      f"cd {REMOTE_DIR}; "
      f'echo "=== pause_flax run started $(date -u) ===" >> {log}; '
      f"{command} >> {log} 2>&1 < /dev/null & pid=$!; echo $pid > {REMOTE_PID_FILE}"
  )
  if args.check_seconds:
    remote += (
        f"; sleep {args.check_seconds}; if ! kill -0 $pid 2>/dev/null; then status=0; "
        f"wait $pid || status=$?; if [ $status -ne 0 ]; then tail -n 5 {log} >&2; "
        f"rm -f {REMOTE_PID_FILE}; exit $status; fi; fi"
    )
  return [shlex.join(_ssh(args, "all", _on_worker("run", remote)))]


def logs_steps(args: argparse.Namespace) -> list[str]:
  """Copies every worker's log to LOGS_DIR/worker-<i>.log."""
  _require(args, "accelerator_type")
  steps = [shlex.join(["mkdir", "-p", args.logs_dir])]
  for worker in range(num_workers(args.accelerator_type)):
    fetch = _ssh(args, str(worker), f"cat {REMOTE_LOG_DIR}/worker-*.log")
    local = os.path.join(args.logs_dir, f"worker-{worker}.log")
    steps.append(f"{shlex.join(fetch)} > {shlex.quote(local)}")
  return steps


def stop_steps(args: argparse.Namespace) -> list[str]:
  """Stops the training process on every worker."""
  remote = (
      f"if [ -f {REMOTE_PID_FILE} ]; then kill $(cat {REMOTE_PID_FILE}) "
      f"2>/dev/null || true; rm -f {REMOTE_PID_FILE}; fi"
  )
  return [shlex.join(_ssh(args, "all", _on_worker("stop", remote)))]


def delete_steps(args: argparse.Namespace) -> list[str]:
  """Deletes the TPU VM, or the queued resource and its TPU VM."""
  if args.queued:
    delete = _gcloud(args, "queued-resources", "delete", args.name) + ["--force"]
  else:
    delete = _gcloud(args, "tpu-vm", "delete", args.name)
  return [shlex.join(delete + ["--quiet"])]


def up_steps(args: argparse.Namespace) -> list[str]:
  """create + install + run, validating everything before anything runs."""
  _validate_run(args)
  return create_steps(args) + install_steps(args) + run_steps(args)


SUBCOMMANDS = {
    "create": create_steps,
    "install": install_steps,
    "run": run_steps,
    "logs": logs_steps,
    "stop": stop_steps,
    "delete": delete_steps,
    "up": up_steps,
}


def build_parser() -> argparse.ArgumentParser:
  """The launcher's argument parser; every subcommand takes every flag."""
  common = OneLineArgumentParser(add_help=False)
  common.add_argument("--name", required=True, help="TPU VM (and queued resource) name")
  common.add_argument("--zone", required=True, help="e.g. us-central2-b")
  common.add_argument("--project", help="GCP project (default: gcloud's)")
  common.add_argument("--accelerator-type", help=_ACCELERATOR_HELP)
  common.add_argument(
      "--runtime-version",
      help="TPU runtime version (default: recommended for the generation, "
      + ", ".join(f"{g}: {v}" for g, v in RUNTIME_VERSIONS.items())
      + ")",
  )
  common.add_argument("--queued", action="store_true", help="use a queued resource")
  common.add_argument("--spot", action="store_true", help="Spot (preemptible) capacity")
  common.add_argument(
      "--package",
      help="pip spec to install on the workers instead of a tarball of this checkout",
  )
  common.add_argument(
      "--source-dir",
      default=_DEFAULT_SOURCE_DIR,
      help="pause_flax checkout to ship (default: %(default)s)",
  )
  common.add_argument(
      "--gin-file", action="append", default=[],
      help="gin file under gin_configs/ (repeatable)",
  )
  common.add_argument("--model-dir", help="gs:// directory for checkpoints and summaries")
  common.add_argument(
      "--tfds-data-dir",
      help="gs:// TFDS data_dir holding c4/en:3.0.1 (sets the TFDS_DATA_DIR gin "
      "macro and environment variable)",
  )
  common.add_argument(
      "--gin", action="append", default=[], metavar="KEY=VALUE",
      help="gin binding passed as --gin.KEY=VALUE (VALUE is gin syntax: quote strings)",
  )
  common.add_argument(
      "--env", action="append", default=[], metavar="NAME=VALUE",
      help="environment variable for the training processes (repeatable)",
  )
  common.add_argument(
      "--logs-dir", default="pause_flax_logs",
      help="local folder for `logs` (default: %(default)s)",
  )
  common.add_argument(
      "--check-seconds", type=int, default=30,
      help="run: fail if training exits with an error within this many seconds "
      "(0: do not wait; default: %(default)s)",
  )
  common.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
  common.add_argument("--debug", action="store_true", help="show tracebacks of refusals")
  parser = OneLineArgumentParser(
      description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  subparsers = parser.add_subparsers(dest="subcommand", required=True)
  for name, steps in SUBCOMMANDS.items():
    subparsers.add_parser(name, parents=[common], help=steps.__doc__)
  return parser


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
  """Parses launcher flags; everything after a bare `--` goes to training."""
  args = parse_with_train_args(build_parser(), argv)
  if not _NAME_RE.match(args.name):
    raise LaunchError(
        f"--name {args.name!r}: use lowercase letters, digits and hyphens, starting "
        "with a letter (at most 63 characters)"
    )
  if not _ZONE_RE.match(args.zone):
    raise LaunchError(
        f"--zone {args.zone!r} is not a zone; use e.g. us-central2-b (a region plus "
        "a letter; `gcloud compute tpus locations list` lists them)"
    )
  if args.accelerator_type:
    num_workers(args.accelerator_type)  # Validates early, for every subcommand.
  return args


def run_step(step: str) -> tuple[int, list[str]]:
  """Runs one shell line, passing its stderr through as it comes.

  Returns its exit status and the FAILURE_MARK lines that workers printed.
  """
  process = subprocess.Popen(["bash", "-c", step], stderr=subprocess.PIPE)
  marks, pending = [], b""
  while chunk := os.read(process.stderr.fileno(), 65536):
    sys.stderr.buffer.write(chunk)
    sys.stderr.buffer.flush()
    *lines, pending = (pending + chunk).split(b"\n")
    marks += [line.decode(errors="replace").strip() for line in lines
              if line.startswith(FAILURE_MARK.encode())]
  if pending.startswith(FAILURE_MARK.encode()):
    marks.append(pending.decode(errors="replace").strip())
  process.stderr.close()
  return process.wait(), marks


def main(argv: Sequence[str]) -> int:
  try:
    args = parse_args(argv)
    steps = SUBCOMMANDS[args.subcommand](args)
  except LaunchError as e:
    return refuse("tpu_pod.py", e, wants_debug(argv))
  for i, step in enumerate(steps, 1):
    if args.dry_run:
      print(step)
      continue
    print(f"+ {step}", file=sys.stderr, flush=True)
    returncode, marks = run_step(step)
    if returncode or marks:
      where = "; ".join(mark[len(FAILURE_MARK):].strip() for mark in marks)
      print(f"tpu_pod.py: error: {args.subcommand} step {i} of {len(steps)} failed "
            f"(exit status {returncode}{'; ' + where if where else ''}); fix the cause "
            "shown above and rerun", file=sys.stderr)
      return returncode or 1
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
