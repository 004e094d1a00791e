"""Pieces shared by the launchers (standard library only)."""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence

DEFAULT_SOURCE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class LaunchError(ValueError):
  """A bad launcher argument, reported without a traceback."""


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
