#!/usr/bin/env python3
"""Runs pause_flax training as N CPU processes on 127.0.0.1: a pod in miniature.

Each process gets `JAX_PLATFORMS=cpu`,
`XLA_FLAGS=--xla_force_host_platform_device_count=D` and
`--coordinator_address=127.0.0.1:PORT --num_processes=N --process_id=i`, runs
in the checkout root (so gin file paths are relative to it) and writes
LOG_DIR/process-<i>.log. The launcher waits for all of them; when one fails it
stops the others and exits non-zero. `--dry-run` prints the commands instead.
Arguments after a bare `--` are appended to every training command.

  python launch/local.py --num-processes=2 --devices-per-process=4 \
      --gin-file=gin_configs/local/<smoke>.gin --model-dir=/tmp/run
"""

from __future__ import annotations

import argparse
import os
import shlex
import socket
import subprocess
import sys
import time
from collections.abc import Sequence

from common import (DEFAULT_SOURCE_DIR, LaunchError, OneLineArgumentParser,
                    parse_with_train_args, refuse, wants_debug)

_DEFAULT_SOURCE_DIR = DEFAULT_SOURCE_DIR
_POLL_SECONDS = 0.2
_GRACE_SECONDS = 10.0


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def build_parser() -> argparse.ArgumentParser:
  parser = OneLineArgumentParser(
      description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument("--num-processes", type=int, default=2)
  parser.add_argument("--devices-per-process", type=int, default=4)
  parser.add_argument(
      "--port", type=int, default=0, help="coordinator port (default: a free one)"
  )
  parser.add_argument(
      "--gin-file", action="append", default=[],
      help="gin file (repeatable), relative to --source-dir",
  )
  parser.add_argument("--model-dir", required=True, help="checkpoint and summary directory")
  parser.add_argument(
      "--gin", action="append", default=[], metavar="KEY=VALUE",
      help="gin binding passed as --gin.KEY=VALUE (VALUE is gin syntax: quote strings)",
  )
  parser.add_argument("--log-dir", help="per-process logs (default: MODEL_DIR/logs)")
  parser.add_argument(
      "--python", default=sys.executable, help="interpreter (default: %(default)s)"
  )
  parser.add_argument(
      "--source-dir", default=_DEFAULT_SOURCE_DIR, help="pause_flax checkout to run in"
  )
  parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
  parser.add_argument("--debug", action="store_true", help="show tracebacks of refusals")
  return parser


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
  """Parses and validates flags; everything after a bare `--` goes to training."""
  args = parse_with_train_args(build_parser(), argv)
  if "://" not in args.model_dir:  # Processes run in --source-dir: make it absolute.
    args.model_dir = os.path.abspath(args.model_dir)
  elif not args.log_dir:
    raise LaunchError(f"--model-dir {args.model_dir!r} is not a local path; give a local "
                      "--log-dir")
  args.log_dir = os.path.abspath(args.log_dir or os.path.join(args.model_dir, "logs"))
  if args.num_processes < 1 or args.devices_per_process < 1:
    raise LaunchError("--num-processes and --devices-per-process must be at least 1; "
                      "raise them")
  if not args.gin_file:
    raise LaunchError("give at least one --gin-file")
  for gin_file in args.gin_file:
    if not os.path.isfile(os.path.join(args.source_dir, gin_file)):
      raise LaunchError(f"--gin-file {gin_file!r} not found under {args.source_dir}; "
                        "check the path")
  for binding in args.gin:
    if "=" not in binding:
      raise LaunchError(f"--gin {binding!r} is not KEY=VALUE; write --gin=KEY=VALUE")
  args.port = args.port or _free_port()
  return args


def process_env(args: argparse.Namespace) -> dict[str, str]:
  """Environment variables set for every process (on top of the launcher's)."""
  return {
      "JAX_PLATFORMS": "cpu",
      "XLA_FLAGS": f"--xla_force_host_platform_device_count={args.devices_per_process}",
  }


def process_argv(args: argparse.Namespace, process_id: int) -> list[str]:
  """The training command of process `process_id`."""
  argv = [args.python, "-m", "pause_flax.train"]
  argv += [f"--gin_file={gin_file}" for gin_file in args.gin_file]
  argv.append(f'--gin.MODEL_DIR="{args.model_dir}"')
  argv += [f"--gin.{binding}" for binding in args.gin]
  argv += [
      f"--coordinator_address=127.0.0.1:{args.port}",
      f"--num_processes={args.num_processes}",
      f"--process_id={process_id}",
  ]
  return argv + args.train_args


def log_path(args: argparse.Namespace, process_id: int) -> str:
  return os.path.join(args.log_dir, f"process-{process_id}.log")


def dry_run_lines(args: argparse.Namespace) -> list[str]:
  """A shell rendering of what `run` does (without its stop-on-failure)."""
  env = [f"{k}={shlex.quote(v)}" for k, v in process_env(args).items()]
  lines = [shlex.join(["cd", args.source_dir]), shlex.join(["mkdir", "-p", args.log_dir])]
  for i in range(args.num_processes):
    command = " ".join(env + [shlex.join(process_argv(args, i))])
    lines.append(f"{command} > {shlex.quote(log_path(args, i))} 2>&1 &")
  return lines + ["wait"]


def _stop(processes: list[subprocess.Popen]) -> None:
  for process in processes:
    if process.poll() is None:
      process.terminate()
  deadline = time.monotonic() + _GRACE_SECONDS
  for process in processes:
    try:
      process.wait(timeout=max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
      process.kill()
      process.wait()


def _tail(path: str, lines: int = 20) -> str:
  with open(path, encoding="utf-8", errors="replace") as f:
    return "".join(f.readlines()[-lines:])


def run(args: argparse.Namespace) -> int:
  """Starts all processes, waits; on the first failure stops the rest."""
  os.makedirs(args.log_dir, exist_ok=True)
  env = {**os.environ, **process_env(args)}
  processes = []
  try:
    for i in range(args.num_processes):
      with open(log_path(args, i), "w", encoding="utf-8") as log:
        processes.append(
            subprocess.Popen(
                process_argv(args, i), cwd=args.source_dir, env=env,
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )
        )
    print(f"started {args.num_processes} processes; logs in {args.log_dir}", file=sys.stderr)
    while True:
      codes = [p.poll() for p in processes]
      failed = [i for i, code in enumerate(codes) if code not in (None, 0)]
      if failed:
        _stop(processes)
        for i in failed:
          print(
              f"process {i} failed with exit status {codes[i]}; last lines of "
              f"{log_path(args, i)}:\n{_tail(log_path(args, i))}",
              file=sys.stderr,
          )
        return 1
      if all(code == 0 for code in codes):
        print("all processes finished", file=sys.stderr)
        return 0
      time.sleep(_POLL_SECONDS)
  except KeyboardInterrupt:
    _stop(processes)
    return 130


def main(argv: Sequence[str]) -> int:
  try:
    args = parse_args(argv)
  except LaunchError as e:
    return refuse("local.py", e, wants_debug(argv))
  if args.dry_run:
    print("\n".join(dry_run_lines(args)))
    return 0
  return run(args)


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
