r"""The paper's four-way grid in one command, with a filler control and seed statistics.

  python -m pause_flax.grid --gin_file=gin_configs/local/grid.gin \
    --gin.GRID_DIR="'/tmp/pause_grid'"

1. Pretraining: a standard model and a pause model (pauses injected at
   PAUSE_FRACTION) on the same corpus, steps and seed.
2. Finetuning, for every task and every seed, from each pretrained model:
     StdPT_StdFT      standard pretraining, standard finetuning (the baseline)
     StdPT_PauseFT    standard pretraining, M_ft pauses after the prefix
     PausePT_StdFT    pause pretraining, standard finetuning
     PausePT_PauseFT  pause pretraining, M_ft pauses
     StdPT_FillerFT   control: an ordinary token (e.g. '.') where the pauses go
   Every finetuned model has a `<pause>` row (an untrained one for the standard
   variants) so that each can be evaluated with any number of pauses.
3. Evaluation on the task's validation split at every M_inf of the sweep
   (pauses, or the filler token for the filler control), greedy decoding.

Every cell writes `cells/<task>/<variant>/seed<k>.json` when done and is
skipped when that file exists, and every run resumes from its checkpoints, so
an interrupted grid finishes only what is missing and gives the same table as
an uninterrupted one. Results: `results.md`, `results.json`,
`loss_curves.png`, `m_inf_<task>.png`.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from collections.abc import Mapping, Sequence
from typing import Any

from absl import flags
from absl import logging
import gin
import jax

from pause_flax import cells as cells_lib
from pause_flax import gin_utils
from pause_flax import parallel
from pause_flax import train as train_cli  # gin edges shared with training (make_mesh, ...)
from pause_flax.evaluation import stats
from pause_flax.model import transformer as transformer_lib
from pause_flax.training import loop
from pause_flax.training import metrics as metrics_lib

Stage = cells_lib.Stage  # gin's Stage, and grid.Stage for callers
BASELINE = "StdPT_StdFT"
VARIANTS = ("StdPT_StdFT", "StdPT_PauseFT", "PausePT_StdFT", "PausePT_PauseFT",
            "StdPT_FillerFT")


def _variant_spec(variant: str) -> tuple[str, str]:
  pretrain, finetune = variant.split("_")
  return pretrain, finetune


def _finetune_task(task: str, finetune: str, num_pauses: int, filler_id: int) -> str:
  from pause_flax.data import tasks as tasks_lib  # pylint: disable=g-import-not-at-top
  if finetune == "StdFT":   # pause vocabulary, no pauses: the model has an (unused) pause row
    return tasks_lib.pause_variant(task, form="finetune", num_pauses=0)
  if finetune == "PauseFT":
    return tasks_lib.pause_variant(task, form="finetune", num_pauses=num_pauses)
  return tasks_lib.filler_variant(task, filler_id=filler_id, form="finetune",
                                  num_pauses=num_pauses)


def run_grid(grid_dir: str, *, model_config: transformer_lib.TransformerConfig,
             pretrain_task: str, pretrain: Stage, tasks: Sequence[str], finetune: Stage,
             seeds: Sequence[int], num_pauses: int | Mapping[str, int],
             pause_fraction: float = 0.1,
             m_inf_sweep: Sequence[int] = (0, 1, 2, 5, 10), filler_text: str = ".",
             variants: Sequence[str] = VARIANTS, eval_batch_size: int = 128,
             eval_examples: int | None = None,
             metric: str | Mapping[str, str] | None = None,
             confidence: float = 0.95, keep_checkpoints: bool = False,
             mesh: jax.sharding.Mesh | None = None) -> dict:
  """Runs (or completes) the grid and writes its results; returns the results dict."""
  from pause_flax.data import tasks as tasks_lib  # pylint: disable=g-import-not-at-top
  from pause_flax.evaluation import evaluator as evaluator_lib  # pylint: disable=g-import-not-at-top
  from pause_flax.evaluation import grid_plots  # pylint: disable=g-import-not-at-top

  unknown = [v for v in variants if v not in VARIANTS]
  if unknown or BASELINE not in variants:
    raise ValueError(f"variants={list(variants)}: choose from {VARIANTS}, the baseline "
                     f"{BASELINE} included.")
  if len(seeds) < 2 or len(set(seeds)) != len(seeds):
    raise ValueError(f"seeds={list(seeds)}: give at least two distinct seeds (eight or more "
                     "to tell a few points from seed noise).")
  m_ft = (dict(num_pauses) if isinstance(num_pauses, Mapping)
          else {t: num_pauses for t in tasks})
  for task in tasks:
    m = m_ft.get(task)
    if m is None or m < 1 or m not in m_inf_sweep or 0 not in m_inf_sweep:
      raise ValueError(f"NUM_PAUSES={num_pauses} for {task}: M_ft must be >= 1 and the sweep "
                       f"{list(m_inf_sweep)} must contain both 0 and M_ft.")
  mesh = parallel.make_mesh() if mesh is None else mesh
  os.makedirs(grid_dir, exist_ok=True)
  # Each run compiles the same programs: a persistent cache turns repeats into hits.
  jax.config.update("jax_compilation_cache_dir", os.path.join(grid_dir, "xla_cache"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)

  # 1. pretraining ----------------------------------------------------------------
  pretrained = {}
  for kind, fraction in (("StdPT", 0.0), ("PausePT", pause_fraction)):
    if not any(_variant_spec(v)[0] == kind for v in variants):
      continue
    model_dir = os.path.join(grid_dir, "pretrain", kind)
    pretrained[kind] = model_dir
    if os.path.exists(os.path.join(model_dir, "done.json")):
      continue
    logging.info("Grid: pretraining %s.", kind)
    loop.train(model_dir=model_dir, mixture_or_task_name=pretrain_task,
               task_feature_lengths=pretrain.feature_lengths
               or tasks_lib.default_task_feature_lengths(pretrain_task),
               model_config=model_config, pause_fraction=fraction, seed=0, data_seed=0,
               log_every=max(1, min(100, pretrain.steps // 50)), mesh=mesh,
               **pretrain.train_kwargs())
    cells_lib.write_json(os.path.join(model_dir, "done.json"), {"steps": pretrain.steps})

  # 2 + 3. finetuning and evaluation ------------------------------------------------
  evaluators: dict[str, Any] = {}
  for task in tasks:
    vocab = tasks_lib.get_vocabulary(task)
    filler_ids = vocab.encode(filler_text)
    if len(filler_ids) != 1:
      raise ValueError(f"filler_text={filler_text!r} is {len(filler_ids)} tokens in {task}'s "
                       "vocabulary; choose a single-token filler.")
    base_lengths = dict(finetune.feature_lengths or
                        tasks_lib.default_task_feature_lengths(task))
    for variant in variants:
      pt, ft = _variant_spec(variant)
      ft_task = _finetune_task(task, ft, m_ft[task], filler_ids[0])
      for seed in seeds:
        cell = os.path.join(grid_dir, "cells", task, variant, f"seed{seed}.json")
        if os.path.exists(cell):
          continue
        model_dir = os.path.join(grid_dir, "finetune", task, variant, f"seed{seed}")
        logging.info("Grid: %s %s seed %d.", task, variant, seed)
        rows = loop.train(
            model_dir=model_dir, mixture_or_task_name=ft_task,
            task_feature_lengths=cells_lib.finetune_lengths(base_lengths, ft, m_ft[task]),
            model_config=model_config, seed=seed, data_seed=seed,
            log_every=max(1, min(100, finetune.steps // 20)), mesh=mesh,
            init_from=pretrained[pt], **finetune.train_kwargs())
        key = task if ft != "FillerFT" else ft_task
        if key not in evaluators:
          evaluators[key] = evaluator_lib.Evaluator(
              key, batch_size=eval_batch_size, mesh=mesh, num_examples=eval_examples,
              feature_lengths=base_lengths)
        ckpt = evaluator_lib.load_checkpoint(model_dir, mesh)
        by_m = {}
        for m in m_inf_sweep:
          (result,) = evaluators[key].evaluate(ckpt.model, m).values()
          by_m[str(m)] = result.metrics
        last = rows[-1] if rows else metrics_lib.read_metrics(model_dir)[-1]
        cells_lib.write_json(cell, {"task": task, "variant": variant, "seed": seed,
                           "finetune_task": ft_task, "final_loss": last["loss"],
                           # the last logging window's rate (the first holds compilation)
                           "trained_tokens_per_sec": last.get("trained_tokens_per_sec"),
                           "metrics": by_m})
        if not keep_checkpoints:
          shutil.rmtree(os.path.join(model_dir, "checkpoints"), ignore_errors=True)

  results = collect(grid_dir, tasks, variants, seeds, m_ft, m_inf_sweep, metric, confidence)
  cells_lib.write_json(os.path.join(grid_dir, "results.json"), results)
  with open(os.path.join(grid_dir, "results.md"), "w", encoding="utf-8") as f:
    f.write(results_markdown(results))
  grid_plots.write(grid_dir, results)
  return results


def own_m_inf(variant: str, num_pauses: int) -> int:
  """The M_inf a variant is evaluated at in the main table: its M_ft (0 for StdFT)."""
  return 0 if _variant_spec(variant)[1] == "StdFT" else num_pauses


def collect(grid_dir: str, tasks: Sequence[str], variants: Sequence[str],
            seeds: Sequence[int], m_ft: Mapping[str, int], m_inf_sweep: Sequence[int],
            metric: str | Mapping[str, str] | None, confidence: float) -> dict:
  """Per task: each variant's mean/std over seeds and its paired difference.

  `metric` names the metric to tabulate, for all tasks or per task (default:
  the alphabetically first one the task reports).
  """
  out = {"seeds": list(seeds), "m_inf_sweep": list(m_inf_sweep),
         "confidence": confidence, "tasks": {}}
  for task in tasks:
    num_pauses = m_ft[task]
    cells = {v: {s: cells_lib.read_json(os.path.join(grid_dir, "cells", task, v, f"seed{s}.json"))
                 for s in seeds} for v in variants}
    first = next(iter(cells[BASELINE].values()))["metrics"]["0"]
    name = metric.get(task) if isinstance(metric, Mapping) else metric
    name = name or sorted(first)[0]
    if name not in first:
      raise ValueError(f"metric={name!r} is not among {sorted(first)} for {task}.")

    def values(variant: str, m: int) -> dict[int, float]:
      return {s: cells[variant][s]["metrics"][str(m)][name] for s in seeds}

    base = values(BASELINE, 0)
    rows = {}
    for v in variants:
      own = values(v, own_m_inf(v, num_pauses))
      summary = stats.summarize(list(own.values()))
      row = {"m_inf": own_m_inf(v, num_pauses), "mean": summary.mean, "std": summary.std,
             "per_seed": own,
             "sweep": {str(m): dataclasses.asdict(stats.summarize(list(values(v, m).values())))
                       for m in m_inf_sweep}}
      rates = [cells[v][s].get("trained_tokens_per_sec") for s in seeds]
      if all(r is not None for r in rates):  # cells written before the rate was logged lack it
        row["trained_tokens_per_sec"] = sum(rates) / len(rates)
      if v != BASELINE:
        d = stats.paired_difference(own, base, confidence)
        row["diff"] = {"mean": d.mean, "low": d.low, "high": d.high,
                       "significant": d.significant}
      rows[v] = row
    out["tasks"][task] = {"metric": name, "num_pauses": num_pauses, "variants": rows}
  return out


def results_markdown(results: dict) -> str:
  n = len(results["seeds"])
  conf = int(round(100 * results["confidence"]))
  lines = [f"# Pause grid: {n} finetuning seeds", ""]
  for task, block in results["tasks"].items():
    rate = all("trained_tokens_per_sec" in row for row in block["variants"].values())
    lines += [f"## {task} ({block['metric']}, M_ft = {block['num_pauses']})", "",
              f"| variant | M_inf | mean ± std | Δ vs {BASELINE} [{conf}% paired CI] |"
              + (" finetuning trained tok/s |" if rate else ""),
              "| --- | --- | --- | --- |" + (" ---: |" if rate else "")]
    for v, row in block["variants"].items():
      diff = row.get("diff")
      cell = "—" if diff is None else (
          f"{diff['mean']:+.2f} [{diff['low']:+.2f}, {diff['high']:+.2f}]"
          + (" **significant**" if diff["significant"] else ""))
      lines.append(f"| {v} | {row['m_inf']} | {row['mean']:.2f} ± {row['std']:.2f} | {cell} |"
                   + (f" {row['trained_tokens_per_sec']:,.0f} |" if rate else ""))
    sweep = results["m_inf_sweep"]
    lines += ["", "M_inf sweep (mean ± std over seeds):", "",
              "| variant | " + " | ".join(f"M_inf={m}" for m in sweep) + " |",
              "| --- |" + " --- |" * len(sweep)]
    for v, row in block["variants"].items():
      lines.append(f"| {v} | " + " | ".join(
          f"{row['sweep'][str(m)]['mean']:.2f} ± {row['sweep'][str(m)]['std']:.2f}"
          for m in sweep) + " |")
    lines.append("")
  return "\n".join(lines)


# -- CLI ------------------------------------------------------------------------------

FLAGS = flags.FLAGS
run_grid_configurable = gin.external_configurable(run_grid, "run_grid")


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise flags.Error(f"Unexpected arguments: {argv[1:]}")
  from pause_flax import control  # pylint: disable=g-import-not-at-top,unused-import  # run_control.*
  gin_utils.parse_gin_flags()
  train_cli.register_tasks()
  mesh = train_cli.make_mesh()
  control_results = _run_controls_first(mesh)
  results = run_grid_configurable(mesh=mesh)
  if control_results is not None:
    print(control.results_markdown(control_results))
  print(results_markdown(results))


def _run_controls_first(mesh: jax.sharding.Mesh) -> dict | None:
  """The pause controls (pause_flax.control) in GRID_DIR/control, when gin sets
  run_control.tasks (to a non-empty list)."""
  try:
    if not gin.query_parameter("run_control.tasks"):
      return None  # run_control.tasks = []: skipped
  except ValueError:
    return None
  from pause_flax import control  # pylint: disable=g-import-not-at-top
  grid_dir = gin.query_parameter("run_grid.grid_dir")
  grid_dir = grid_dir.scoped_configurable_fn() if hasattr(grid_dir, "scoped_configurable_fn") else grid_dir
  return control.run_control_configurable(control_dir=os.path.join(grid_dir, "control"),
                                          mesh=mesh)


def console_main() -> None:
  """Console-script entry (pause-flax-grid)."""
  gin_utils.run(main)


if __name__ == "__main__":
  console_main()
