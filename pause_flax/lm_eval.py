"""`python -m pause_flax.lm_eval`: lm-eval's command line with `--model pause_flax`.

lm-eval 0.4.x finds models only in its registry, filled when `lm_eval.models`
is imported; it has no plugin entry point for models. This wrapper registers
`pause_flax` (lazily: the adapter, pause_flax.evaluation.lm_eval_adapter, is
imported only when the model is built) and hands every argument to lm-eval's
own `cli_evaluate`, so all of lm-eval's options work:

  python -m pause_flax.lm_eval --model pause_flax \\
    --model_args checkpoint=/tmp/run,num_pauses=10 --tasks piqa --batch_size 32

From Python, `import pause_flax.evaluation.lm_eval_adapter` registers the model
for `lm_eval.simple_evaluate(model="pause_flax", ...)`, or pass a
`PauseFlaxLM(...)` instance as `model=`. Needs `pip install -e ".[lm_eval]"`.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

MODEL_NAME = "pause_flax"
TARGET = "pause_flax.evaluation.lm_eval_adapter:PauseFlaxLM"


def register() -> None:
  """Registers `pause_flax` with lm-eval (lm-eval's own models stay available)."""
  import lm_eval.models  # pylint: disable=g-import-not-at-top,unused-import
  from lm_eval.api.registry import model_registry  # pylint: disable=g-import-not-at-top
  if MODEL_NAME not in model_registry:
    model_registry.register(MODEL_NAME, target=TARGET)


def main(argv: Sequence[str] | None = None) -> None:
  try:
    import lm_eval  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    sys.exit('lm-eval is not installed: pip install -e ".[lm_eval]" '
             '(or pip install "lm-eval>=0.4,<0.5").')
  register()
  from lm_eval.__main__ import cli_evaluate  # pylint: disable=g-import-not-at-top
  if argv is not None:
    sys.argv = [sys.argv[0], *argv]
  cli_evaluate()


def console_main() -> None:
  """Console-script entry (pause-flax-lm-eval)."""
  main()


if __name__ == "__main__":
  main()
