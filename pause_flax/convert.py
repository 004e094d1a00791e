r"""Hugging Face Llama checkpoints in and out of pause_flax.

  python -m pause_flax.convert import --hf_dir=/models/tinyllama --out=/ckpt/tinyllama \
      [--max_len=2048]
  python -m pause_flax.convert export --checkpoint=/runs/tinyllama_pause \
      --imported=/ckpt/tinyllama --out=/hf/tinyllama_pause [--step=N] [--dtype=bfloat16]

`import` writes an orbax checkpoint, hf_import.json and model.gin into --out
(see pause_flax.hf_checkpoint); finetune from it with
gin_configs/runs/import_llama_finetune.gin. `export` writes an HF directory
that transformers loads (AutoModelForCausalLM / AutoTokenizer), with <pause>
as a special token when the model was pause-finetuned. Runs on the CPU.

Bad input (a missing flag or directory, an unreadable file) is refused with
one line naming the flag and the fix, exit status 2; `--debug` shows the
traceback instead.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import NoReturn

from absl import app
from absl import flags
import jax

flags.DEFINE_string("hf_dir", None, "import: a local HF checkpoint directory (config.json, "
                    "*.safetensors, tokenizer.json).")
flags.DEFINE_integer("max_len", None, "import: cap on max_position_embeddings.")
flags.DEFINE_string("checkpoint", None, "export: a run's MODEL_DIR, checkpoints/ or "
                    "checkpoints/<step>, or an import's --out.")
flags.DEFINE_string("imported", None, "export: the import's --out (default --checkpoint).")
flags.DEFINE_integer("step", None, "export: the step (default the newest).")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16", "float16"],
                  "export: dtype of the written weights.")
flags.DEFINE_string("out", None, "The directory to write.")
flags.DEFINE_integer("seed", 0, "import: seed of the padding rows' initialisation.")
flags.DEFINE_bool("debug", False, "Show the traceback of a refused input.")
FLAGS = flags.FLAGS
COMMANDS = ("import", "export")


def _refuse(message: str) -> NoReturn:
  """Prints one `convert: error:` line and exits with status 2."""
  print(f"convert: error: {' '.join(message.split())}", file=sys.stderr)
  sys.exit(2)


def main(argv: Sequence[str]) -> None:
  if len(argv) != 2 or argv[1] not in COMMANDS:
    _refuse(f"give one command, {' or '.join(COMMANDS)}; got {argv[1:]}")
  needed = ("hf_dir", "out") if argv[1] == "import" else ("checkpoint", "out")
  missing = [f"--{name}" for name in needed if not FLAGS[name].value]
  if missing:
    _refuse(f"{argv[1]} needs {', '.join(missing)}; add {missing[0]}=DIR")
  jax.config.update("jax_platforms", "cpu")
  from pause_flax import hf_checkpoint  # pylint: disable=g-import-not-at-top
  from pause_flax.hf_files import HFFormatError  # pylint: disable=g-import-not-at-top
  # The input flag that a missing or malformed file came from.
  source = ("--hf_dir" if argv[1] == "import" else
            "--checkpoint or --imported" if FLAGS.imported else "--checkpoint")
  try:
    if argv[1] == "import":
      hf_checkpoint.import_checkpoint(FLAGS.hf_dir, FLAGS.out, max_len=FLAGS.max_len,
                                      seed=FLAGS.seed)
    else:
      hf_checkpoint.export_checkpoint(FLAGS.checkpoint, FLAGS.out, imported=FLAGS.imported,
                                      step=FLAGS.step, dtype=FLAGS.dtype)
  except (HFFormatError, FileNotFoundError) as e:
    if FLAGS.debug:
      raise
    _refuse(f"{source}: {e}")
  except FileExistsError as e:
    if FLAGS.debug:
      raise
    _refuse(f"--out: {e}")


if __name__ == "__main__":
  app.run(main)
