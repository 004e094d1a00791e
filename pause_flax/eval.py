r"""Evaluation entry point: a checkpoint on a Task's validation split, at any M_inf.

  python -m pause_flax.eval --gin_file=gin_configs/runs/eval.gin \
    --gin.CHECKPOINT_PATH="'/tmp/pause_flax_ft'" \
    --gin.NUM_PAUSES_INFERENCE_SWEEP="[0, 1, 2, 5, 10]"

The Task defaults to the one the checkpoint was finetuned on (standard form:
the prompt is its prefix + M_inf pauses) and M_inf to its M_ft. Writes
metrics.json, predictions.jsonl and TensorBoard scalars to
<MODEL_DIR>/eval/<task>/M<m>/, and for a sweep sweep.{md,json,png} to
<MODEL_DIR>/eval/<task>/. Multi-process flags are the same as pause_flax.train's.
"""

from __future__ import annotations

from collections.abc import Sequence

from absl import flags
import gin

from pause_flax import gin_utils
from pause_flax import train as train_cli  # the mesh, distributed flags and gin flags
from pause_flax.evaluation import evaluator

evaluate = gin.external_configurable(evaluator.run, "evaluate")
DecodeOptions = gin.external_configurable(evaluator.DecodeOptions, "DecodeOptions")


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise flags.Error(f"Unexpected arguments: {argv[1:]}")
  train_cli.initialize_distributed()
  gin_utils.parse_gin_flags()
  evaluate(mesh=train_cli.make_mesh())


def console_main() -> None:
  """Console-script entry (pause-flax-eval)."""
  gin_utils.run(main)


if __name__ == "__main__":
  console_main()
