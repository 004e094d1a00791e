"""gin flags in T5X's style: --gin_file, --gin_search_paths, --gin.KEY=VALUE."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

from absl import app, flags
import gin

FLAGS = flags.FLAGS

# gin_configs/ sits next to the package in the source tree.
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_SEARCH_PATHS = (".", REPO_ROOT, os.path.join(REPO_ROOT, "gin_configs"))


def define_gin_flags() -> None:
  if "gin_file" in FLAGS:
    return
  flags.DEFINE_multi_string("gin_file", [], "gin config files, in order.")
  flags.DEFINE_multi_string("gin_bindings", [], "Individual gin bindings "
                            "(--gin.KEY=VALUE is rewritten to these).")
  flags.DEFINE_list("gin_search_paths", list(DEFAULT_SEARCH_PATHS),
                    "Where gin files and their includes are looked up.")


def rewrite_gin_args(args: Sequence[str]) -> list[str]:
  """`--gin.KEY=VALUE` -> `--gin_bindings=KEY = VALUE`."""
  out = []
  for arg in args:
    if arg.startswith("--gin."):
      key, sep, value = arg[len("--gin."):].partition("=")
      if not sep:
        raise app.UsageError(f"{arg!r} needs a value: --gin.KEY=VALUE.")
      out.append(f"--gin_bindings={key} = {value}")
    else:
      out.append(arg)
  return out


def resolve_gin_file(path: str, search_paths: Sequence[str]) -> str:
  if os.path.isabs(path) and os.path.exists(path):
    return path
  for root in search_paths:
    candidate = os.path.join(root, path)
    if os.path.exists(candidate):
      return candidate
  raise FileNotFoundError(
      f"--gin_file={path!r} not found in the search paths {list(search_paths)}; give a "
      "path relative to one of them (e.g. gin_configs/local/smoke.gin) or an absolute path.")


def parse_gin(gin_files: Sequence[str], bindings: Sequence[str],
              search_paths: Sequence[str] = DEFAULT_SEARCH_PATHS) -> None:
  """Parses files then bindings; unknown configurables fail loudly."""
  for root in search_paths:
    gin.add_config_file_search_path(root)
  files = [resolve_gin_file(f, search_paths) for f in gin_files]
  gin.parse_config_files_and_bindings(files, list(bindings), finalize_config=True)


def parse_gin_flags() -> None:
  parse_gin(FLAGS.gin_file, FLAGS.gin_bindings, FLAGS.gin_search_paths)


def run(main: Callable[[Sequence[str]], None]) -> None:
  """absl app.run with --gin.KEY=VALUE support."""
  import sys
  app.run(main, argv=rewrite_gin_args(sys.argv))
