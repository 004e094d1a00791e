"""gin flags in T5X's style (--gin_file, --gin_search_paths, --gin.KEY=VALUE) and
one-line refusals for the command-line tools.

A bad setting is refused with ONE line that names the setting as the user
typed it and the fix, exit status 2 (`--debug` shows the traceback).
"""

from __future__ import annotations

import difflib
import os
import re
import sys
import tokenize
from collections.abc import Callable, Sequence

from absl import app, flags
import gin
from gin import config_parser

FLAGS = flags.FLAGS

# gin_configs/ sits next to the package in the source tree.
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_SEARCH_PATHS = (".", REPO_ROOT, os.path.join(REPO_ROOT, "gin_configs"))

EXIT_BAD_INPUT = 2


class ConfigError(ValueError):
  """Bad input: the CLIs print the message as one line and exit 2."""


def define_gin_flags() -> None:
  if "gin_file" in FLAGS:
    return
  flags.DEFINE_multi_string("gin_file", [], "gin config files, in order.")
  flags.DEFINE_multi_string("gin_bindings", [], "Individual gin bindings "
                            "(--gin.KEY=VALUE is rewritten to these).")
  flags.DEFINE_list("gin_search_paths", list(DEFAULT_SEARCH_PATHS),
                    "Where gin files and their includes are looked up.")
  if "debug" not in FLAGS:
    flags.DEFINE_bool("debug", False, "Show the full traceback of a refused setting.")


def rewrite_gin_args(args: Sequence[str]) -> list[str]:
  """`--gin.KEY=VALUE` -> `--gin_bindings=KEY = VALUE`."""
  out = []
  for arg in args:
    if arg.startswith("--gin."):
      key, sep, value = arg[len("--gin."):].partition("=")
      if not sep:
        raise ConfigError(f"{arg} needs a value: --gin.KEY=VALUE (strings quoted, e.g. "
                          f"--gin.{key}=\"'text'\").")
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
  raise ConfigError(
      f"--gin_file={path} not found in the search paths {list(search_paths)}: give a path "
      "relative to one of them (e.g. gin_configs/local/smoke.gin) or an absolute path.")


def _one_line(text: object) -> str:
  """An error's text on one line, without gin's "In call to configurable" notes."""
  parts = [p.strip() for p in str(text).splitlines() if p.strip()]
  return "; ".join(p for p in parts if not p.startswith("In call to configurable"))


def _as_typed(binding: str) -> str:
  key, _, value = binding.partition("=")
  return f"--gin.{key.strip()}={value.strip()}"


class _References(config_parser.ParserDelegate):
  """Collects the macros a config refers to (`%NAME`)."""

  def __init__(self):
    self.macros: set[str] = set()

  def configurable_reference(self, scoped_name, evaluate):
    return scoped_name

  def macro(self, name):
    self.macros.add(name)
    return name


def _macro_name(binding: str) -> str | None:
  key = binding.partition("=")[0].strip()
  return key if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key) else None


def _check_macros_used(bindings: Sequence[str]) -> None:
  """A command-line macro that no config refers to is a typo: refuse it."""
  delegate = _References()
  for _ in config_parser.ConfigParser(gin.config_str(), delegate):
    pass
  for binding in bindings:
    name = _macro_name(binding)
    if name is None or name in delegate.macros:
      continue
    close = difflib.get_close_matches(name, sorted(delegate.macros), n=1)
    hint = f"did you mean {close[0]}?" if close else (
        f"macros these files use: {', '.join(sorted(delegate.macros)) or 'none'}.")
    raise ConfigError(f"{_as_typed(binding)}: no config uses the macro {name}; {hint}")


def parse_gin(gin_files: Sequence[str], bindings: Sequence[str],
              search_paths: Sequence[str] = DEFAULT_SEARCH_PATHS) -> None:
  """Parses files then bindings; any bad binding, unknown name or unset REQUIRED
  macro raises ConfigError naming it as the user typed it."""
  for root in search_paths:
    gin.add_config_file_search_path(root)
  files = [resolve_gin_file(f, search_paths) for f in gin_files]
  try:
    gin.parse_config_files_and_bindings(files, None, finalize_config=False)
  except (ValueError, SyntaxError, tokenize.TokenError, OSError) as e:
    raise ConfigError(f"--gin_file: {_one_line(e)}") from e
  for binding in bindings:
    try:
      gin.parse_config(binding)
    except (SyntaxError, tokenize.TokenError) as e:
      value = binding.partition("=")[2].strip()
      hint = ""
      if re.fullmatch(r"[\w./~:-]+", value) and not value[:1].isdigit():
        key = binding.partition("=")[0].strip()
        hint = f" Strings need quotes: --gin.{key}=\"'{value}'\"."
      raise ConfigError(f"{_as_typed(binding)}: gin cannot parse the value "
                        f"({_one_line(getattr(e, 'msg', e))}).{hint}") from e
    except ValueError as e:
      raise ConfigError(f"{_as_typed(binding)}: {_one_line(e)}") from e
  try:
    gin.finalize()
  except ValueError as e:
    match = re.search(r"^(\w+)/macro\.value set to `%gin\.REQUIRED`", str(e))
    if match:
      name = match.group(1)
      raise ConfigError(f"{name} is required and not set: pass --gin.{name}=... "
                        f"(e.g. --gin.{name}=\"'/path/to/run'\" for a directory).") from e
    raise ConfigError(_one_line(e)) from e
  _check_macros_used(bindings)


def parse_gin_flags() -> None:
  parse_gin(FLAGS.gin_file, FLAGS.gin_bindings, FLAGS.gin_search_paths)


def refusal_line(program: str, error: BaseException) -> str:
  return f"{program}: {_one_line(error) or type(error).__name__}"


def run(main: Callable[[Sequence[str]], None]) -> None:
  """absl app.run with --gin.KEY=VALUE support and one-line refusals.

  Bad input (ConfigError, ValueError, a missing file, gin's errors) prints one
  line and exits 2; a non-finite loss prints one line and exits 1. `--debug`
  (or PAUSE_FLAX_DEBUG=1) keeps the traceback.
  """
  spec = getattr(sys.modules.get("__main__"), "__spec__", None)
  program = spec.name if spec is not None and spec.name != "__main__" else (
      os.path.basename(sys.argv[0]).removesuffix(".py"))
  debug = "--debug" in sys.argv or os.environ.get("PAUSE_FLAX_DEBUG") == "1"
  try:
    argv = rewrite_gin_args(sys.argv)
  except ConfigError as e:
    print(refusal_line(program, e), file=sys.stderr)
    sys.exit(EXIT_BAD_INPUT)

  def guarded(args):
    try:
      return main(args)
    except (ValueError, FileNotFoundError, NotADirectoryError, PermissionError) as e:
      if debug:
        raise
      print(refusal_line(program, e) + "  (--debug shows the traceback)", file=sys.stderr)
      sys.exit(EXIT_BAD_INPUT)
    except FloatingPointError as e:
      if debug:
        raise
      print(refusal_line(program, e), file=sys.stderr)
      sys.exit(1)

  app.run(guarded, argv=argv)
