"""Pieces shared by the launchers (standard library only)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

DEFAULT_SOURCE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class LaunchError(ValueError):
  """A bad launcher argument, reported as one line without a traceback."""


class OneLineArgumentParser(argparse.ArgumentParser):
  """An ArgumentParser whose errors are one line (no usage block), exit status 2."""

  def error(self, message: str) -> NoReturn:
    self.exit(2, f"{self.prog}: error: {message}; see --help\n")


def parse_with_train_args(parser: argparse.ArgumentParser,
                          argv: Sequence[str]) -> argparse.Namespace:
  """Parses launcher flags; everything after a bare `--` goes to training.

  Returns the namespace with `train_args` and an absolute `source_dir`.
  """
  argv = list(argv)
  split = argv.index("--") if "--" in argv else len(argv)
  args = parser.parse_args(argv[:split])
  args.train_args = argv[split + 1:]
  args.source_dir = os.path.abspath(args.source_dir)
  return args


def wants_debug(argv: Sequence[str]) -> bool:
  """Whether `--debug` is among the launcher's own flags (before a bare `--`)."""
  argv = list(argv)
  return "--debug" in argv[:argv.index("--") if "--" in argv else len(argv)]


def refuse(prog: str, error: LaunchError, debug: bool) -> int:
  """Prints a refusal as one line (re-raises with --debug); returns exit status 2."""
  if debug:
    raise error
  print(f"{prog}: error: {error}", file=sys.stderr)
  return 2
