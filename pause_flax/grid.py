r"""The paper's four-way grid in one command, with a filler control and seed statistics.

  python -m pause_flax.grid --gin_file=gin_configs/local/grid.gin \
    --gin.GRID_DIR="'/tmp/pause_grid'"

1. Pretraining: a standard model and a pause model (pauses injected at
   PAUSE_FRACTION) on the same corpus and steps, for every pretraining seed.
2. Finetuning, for every task and every seed pair, from each pretrained model:
     StdPT_StdFT      standard pretraining, standard finetuning (the baseline)
     StdPT_PauseFT    standard pretraining, M_ft pauses after the prefix
     PausePT_StdFT    pause pretraining, standard finetuning
     PausePT_PauseFT  pause pretraining, M_ft pauses
     StdPT_FillerFT   control: an ordinary token (e.g. '.') where the pauses go
   Every finetuned model has a `<pause>` row (an untrained one for the standard
   variants) so that each can be evaluated with any number of pauses.
3. Evaluation on the task's validation split at every M_inf of the sweep
   (pauses, or the filler token for the filler control), greedy decoding.

Both pretrainings run on every pretraining seed p (PRETRAIN_SEEDS), and each
is finetuned on every finetuning seed s (SEEDS), so the intervals can cover
pretraining variance. Every cell writes `cells/<task>/<variant>/pt<p>_seed<s>.json`
when done and is skipped when that file exists, and every run resumes from
its checkpoints, so an interrupted grid finishes only what is missing and
gives the same table as an uninterrupted one. Results: `results.md`, `results.json`,
`loss_curves.png`, `m_inf_<task>.png`.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from typing import Any

from absl import flags
from absl import logging
import gin
import jax

from pause_flax import arms as arms_lib
from pause_flax import cells as cells_lib
from pause_flax import gin_utils
from pause_flax import parallel
from pause_flax import train as train_cli  # gin edges shared with training (make_mesh, ...)
from pause_flax.evaluation import stats
from pause_flax.model import transformer as transformer_lib
from pause_flax.training import loop

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
             pretrain_seeds: Sequence[int] = (0,),
             pause_fraction: float = 0.1,
             m_inf_sweep: Sequence[int] = (0, 1, 2, 5, 10), filler_text: str = ".",
             variants: Sequence[str] = VARIANTS, eval_batch_size: int = 128,
             eval_examples: int | None = None,
             metric: str | Mapping[str, str] | None = None,
             confidence: float = 0.95, keep_checkpoints: bool = False,
             arms: Sequence[arms_lib.Arm] = (),
             mesh: jax.sharding.Mesh | None = None) -> dict:
  """Runs (or completes) the grid and writes its results; returns the results dict.

  Every pretraining seed p (model init and data order of both pretrainings)
  is finetuned with every finetuning seed s; a cell is one (p, s) pair.
  `arms` (pause_flax.arms.Arm) add finetuning rows beyond the paper's, named
  '<pretraining>_<arm name>' (StdPT unless the arm says PausePT), each
  evaluated as it was trained, at its own M.
  """
  from pause_flax.data import tasks as tasks_lib  # pylint: disable=g-import-not-at-top
  from pause_flax.evaluation import evaluator as evaluator_lib  # pylint: disable=g-import-not-at-top
  from pause_flax.evaluation import grid_plots  # pylint: disable=g-import-not-at-top

  unknown = [v for v in variants if v not in VARIANTS]
  if unknown or BASELINE not in variants:
    raise ValueError(f"variants={list(variants)}: choose from {VARIANTS}, the baseline "
                     f"{BASELINE} included.")
  _check_seeds(seeds, pretrain_seeds)
  variants, arms = list(variants), list(arms)
  for arm in arms:
    if "_" in arm.name or row_name(arm) in variants or arm.pretrain not in ("StdPT", "PausePT"):
      raise ValueError(f"Arm {arm.name!r} (pretrain={arm.pretrain!r}): a grid arm's name has "
                       "no '_' and is not one of the paper's rows; pretrain is 'StdPT' or "
                       "'PausePT'.")
  m_ft = (dict(num_pauses) if isinstance(num_pauses, Mapping)
          else {t: num_pauses for t in tasks})
  for task in tasks:
    m = m_ft.get(task)
    if m is None or m < 1 or m not in m_inf_sweep or 0 not in m_inf_sweep:
      raise ValueError(f"NUM_PAUSES={num_pauses} for {task}: M_ft must be >= 1 and the sweep "
                       f"{list(m_inf_sweep)} must contain both 0 and M_ft.")
  _refuse_old_layout(grid_dir)
  mesh = parallel.make_mesh() if mesh is None else mesh
  os.makedirs(grid_dir, exist_ok=True)
  # Each run compiles the same programs: a persistent cache turns repeats into hits.
  jax.config.update("jax_compilation_cache_dir", os.path.join(grid_dir, "xla_cache"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)

  # 1. pretraining: each kind on each pretraining seed -------------------------------
  pretrained = {}
  for kind, fraction in (("StdPT", 0.0), ("PausePT", pause_fraction)):
    if not any(_variant_spec(v)[0] == kind for v in variants + [row_name(a) for a in arms]):
      continue
    for p in pretrain_seeds:
      model_dir = pretrain_dir(grid_dir, kind, p)
      pretrained[kind, p] = model_dir
      if os.path.exists(os.path.join(model_dir, "done.json")):
        continue
      logging.info("Grid: pretraining %s seed %d.", kind, p)
      loop.train(model_dir=model_dir, mixture_or_task_name=pretrain_task,
                 task_feature_lengths=pretrain.feature_lengths
                 or tasks_lib.default_task_feature_lengths(pretrain_task),
                 model_config=model_config, pause_fraction=fraction, seed=p, data_seed=p,
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
    for variant in variants + [row_name(a) for a in arms]:
      pt, ft = _variant_spec(variant)
      arm = next((a for a in arms if row_name(a) == variant), None)
      if arm is None:   # one of the paper's rows: evaluated over the whole M_inf sweep
        ft_task = _finetune_task(task, ft, m_ft[task], filler_ids[0])
        lengths = cells_lib.finetune_lengths(base_lengths, ft, m_ft[task])
        train_kwargs = {}
        key = task if ft != "FillerFT" else ft_task

        def evaluate(model_dir: str, key=key) -> dict:
          if key not in evaluators:
            evaluators[key] = evaluator_lib.Evaluator(
                key, batch_size=eval_batch_size, mesh=mesh, num_examples=eval_examples,
                feature_lengths=base_lengths)
          ckpt = evaluator_lib.load_checkpoint(model_dir, mesh)
          by_m = {}
          for m in m_inf_sweep:
            (result,) = evaluators[key].evaluate(ckpt.model, m).values()
            by_m[str(m)] = {**result.metrics, **result.compute}
          return by_m
      else:   # an Arm: evaluated as it was trained (pause_flax.arms), at its own M
        p_arm = arms_lib.plan(arm.with_count(m_ft[task]), task, filler_ids[0])
        ft_task, train_kwargs = p_arm.train_task, p_arm.train_kwargs
        lengths = {k: v + p_arm.extra_lengths.get(k, 0) for k, v in base_lengths.items()}

        def evaluate(model_dir: str, p_arm=p_arm, lengths=lengths, arm=arm) -> dict:
          key = ("arm", p_arm.eval_task, p_arm.placed_prompts, p_arm.max_pauses_per_token)
          if key not in evaluators:
            evaluators[key] = evaluator_lib.Evaluator(
                p_arm.eval_task, batch_size=eval_batch_size, mesh=mesh,
                num_examples=eval_examples,
                feature_lengths=lengths if p_arm.placed_prompts else base_lengths,
                placed_prompts=p_arm.placed_prompts,
                decode=evaluator_lib.DecodeOptions(
                    max_pauses_per_token=p_arm.max_pauses_per_token))
          ckpt = evaluator_lib.load_checkpoint(model_dir, mesh)
          (result,) = evaluators[key].evaluate(ckpt.model, p_arm.m_inf).values()
          return {str(arm.with_count(m_ft[task]).eval_pauses):
                  {**result.metrics, **result.compute}}

      for p in pretrain_seeds:
        for seed in seeds:
          model_dir = os.path.join(grid_dir, "finetune", task, variant, pair_name(p, seed))

          def train(p=p, seed=seed, model_dir=model_dir, ft_task=ft_task, lengths=lengths,
                    train_kwargs=train_kwargs, pt=pt) -> list[dict]:
            logging.info("Grid: %s %s pretraining seed %d, finetuning seed %d.",
                         task, variant, p, seed)
            return loop.train(
                model_dir=model_dir, mixture_or_task_name=ft_task,
                task_feature_lengths=lengths,
                model_config=model_config, seed=seed, data_seed=seed,
                log_every=max(1, min(100, finetune.steps // 20)), mesh=mesh,
                init_from=pretrained[pt, p], **train_kwargs, **finetune.train_kwargs())

          cells_lib.run_cell(
              cell_path(grid_dir, task, variant, p, seed), model_dir, train=train,
              evaluate=evaluate, keep_checkpoints=keep_checkpoints,
              record={"task": task, "variant": variant, "pretrain_seed": p, "seed": seed,
                      "finetune_task": ft_task})

  results = collect(grid_dir, tasks, variants, seeds, m_ft, m_inf_sweep, metric, confidence,
                    pretrain_seeds=pretrain_seeds, arms=arms)
  cells_lib.write_json(os.path.join(grid_dir, "results.json"), results)
  with open(os.path.join(grid_dir, "results.md"), "w", encoding="utf-8") as f:
    f.write(results_markdown(results))
  grid_plots.write(grid_dir, results)
  return results


def row_name(arm: arms_lib.Arm) -> str:
  """A grid arm's row: '<pretraining>_<arm name>', e.g. 'StdPT_BeforeAnswer'."""
  return f"{arm.pretrain}_{arm.name}"


def _check_seeds(seeds: Sequence[int], pretrain_seeds: Sequence[int]) -> None:
  for macro, values in (("SEEDS", seeds), ("PRETRAIN_SEEDS", pretrain_seeds)):
    if not values or len(set(values)) != len(values):
      raise ValueError(f"{macro}={list(values)}: give one or more distinct seeds.")
  if len(pretrain_seeds) == 1 and len(seeds) < 2:
    raise ValueError(f"SEEDS={list(seeds)}: give at least two distinct seeds (eight or more "
                     "to tell a few points from seed noise), or two or more PRETRAIN_SEEDS.")


def pair_name(pretrain_seed: int, seed: int) -> str:
  """A cell's name: pretraining seed p, finetuning seed s -> 'pt<p>_seed<s>'."""
  return f"pt{pretrain_seed}_seed{seed}"


def pretrain_dir(grid_dir: str, kind: str, pretrain_seed: int) -> str:
  return os.path.join(grid_dir, "pretrain", kind, f"seed{pretrain_seed}")


def cell_path(grid_dir: str, task: str, variant: str, pretrain_seed: int, seed: int) -> str:
  return os.path.join(grid_dir, "cells", task, variant, pair_name(pretrain_seed, seed) + ".json")


def _refuse_old_layout(grid_dir: str) -> None:
  """Grids made before pretraining seeds kept one pretraining per kind in
  pretrain/<kind>; their cells do not say which pretraining they used."""
  for kind in ("StdPT", "PausePT"):
    if os.path.exists(os.path.join(grid_dir, "pretrain", kind, "done.json")):
      raise ValueError(
          f"GRID_DIR={grid_dir!r} holds a grid from before pretraining seeds "
          f"(pretrain/{kind}/done.json); nothing there was changed: give a new GRID_DIR.")


def own_m_inf(variant: str, num_pauses: int) -> int:
  """The M_inf a variant is evaluated at in the main table: its M_ft (0 for StdFT)."""
  return 0 if _variant_spec(variant)[1] == "StdFT" else num_pauses


def collect(grid_dir: str, tasks: Sequence[str], variants: Sequence[str],
            seeds: Sequence[int], m_ft: Mapping[str, int], m_inf_sweep: Sequence[int],
            metric: str | Mapping[str, str] | None, confidence: float,
            pretrain_seeds: Sequence[int] = (0,),
            arms: Sequence[arms_lib.Arm] = ()) -> dict:
  """Per task: each variant's mean/std over (pretraining, finetuning) seed pairs
  and its paired difference from the baseline.

  With two or more pretraining seeds the interval is over pretraining seeds
  (`stats.clustered_difference`: finetuning seeds averaged within each);
  with one it is over the finetuning seeds of that one pretraining.
  `metric` names the metric to tabulate, for all tasks or per task (default:
  the alphabetically first quality metric the task reports). Arm rows are
  evaluated at their own M only; their sweep holds that M alone.
  """
  pairs = [(p, s) for p in pretrain_seeds for s in seeds]
  clustered = len(pretrain_seeds) > 1
  out = {"seeds": list(seeds), "pretrain_seeds": list(pretrain_seeds),
         "interval_over": "pretraining seeds" if clustered else "finetuning seeds",
         "m_inf_sweep": list(m_inf_sweep), "confidence": confidence, "tasks": {}}
  for task in tasks:
    num_pauses = m_ft[task]
    own_m = {v: own_m_inf(v, num_pauses) for v in variants}
    own_m.update({row_name(a): a.with_count(num_pauses).eval_pauses for a in arms})
    cells = {v: {ps: cells_lib.read_json(cell_path(grid_dir, task, v, *ps)) for ps in pairs}
             for v in own_m}
    first = next(iter(cells[BASELINE].values()))["metrics"]["0"]
    name = metric.get(task) if isinstance(metric, Mapping) else metric
    name = name or sorted(k for k in first if k not in cells_lib.COMPUTE_METRICS)[0]
    if name not in first:
      raise ValueError(f"metric={name!r} is not among {sorted(first)} for {task}.")

    def values(variant: str, m: int) -> dict[tuple[int, int], float]:
      return {ps: cells[variant][ps]["metrics"][str(m)][name] for ps in pairs}

    base = values(BASELINE, 0)
    rows = {}
    for v, m_own in own_m.items():
      own = values(v, m_own)
      summary = stats.summarize(list(own.values()))
      evaluated = [m for m in m_inf_sweep if str(m) in cells[v][pairs[0]]["metrics"]]
      row = {"m_inf": m_own, "mean": summary.mean, "std": summary.std,
             "per_seed": {pair_name(*ps): x for ps, x in own.items()},
             "sweep": {str(m): dataclasses.asdict(stats.summarize(list(values(v, m).values())))
                       for m in evaluated}}
      spent = [cells[v][ps]["metrics"][str(m_own)].get("tokens_processed_per_answer")
               for ps in pairs]
      if all(x is not None for x in spent):
        row["tokens_processed_per_answer"] = sum(spent) / len(spent)
      rates = [cells[v][ps].get("trained_tokens_per_sec") for ps in pairs]
      if all(r is not None for r in rates):  # cells written before the rate was logged lack it
        row["trained_tokens_per_sec"] = sum(rates) / len(rates)
      if v != BASELINE:
        d = (stats.clustered_difference(own, base, confidence) if clustered else
             stats.paired_difference({s: x for (_, s), x in own.items()},
                                     {s: x for (_, s), x in base.items()}, confidence))
        row["diff"] = {"mean": d.mean, "low": d.low, "high": d.high, "n": d.n,
                       "significant": d.significant}
      rows[v] = row
    out["tasks"][task] = {"metric": name, "num_pauses": num_pauses, "variants": rows}
  return out


def results_markdown(results: dict) -> str:
  seeds, pt_seeds = results["seeds"], results.get("pretrain_seeds", [0])
  conf = int(round(100 * results["confidence"]))
  if results.get("interval_over") == "pretraining seeds":
    span = (f"Intervals: paired over the {len(pt_seeds)} pretraining seeds (each the mean over "
            "its finetuning seeds), so they cover pretraining variance.")
  else:
    span = (f"Intervals: paired over the {len(seeds)} finetuning seeds of one pretraining run "
            f"per kind (seed {pt_seeds[0]}); pretraining variance is not covered.")
  lines = [f"# Pause grid: pretraining seeds {pt_seeds} x finetuning seeds {seeds}", "",
           f"Means and stds are over the {len(pt_seeds) * len(seeds)} (pretraining, "
           f"finetuning) seed pairs. {span}", ""]
  for task, block in results["tasks"].items():
    rate = all("trained_tokens_per_sec" in row for row in block["variants"].values())
    spent = all("tokens_processed_per_answer" in row for row in block["variants"].values())
    lines += [f"## {task} ({block['metric']}, M_ft = {block['num_pauses']})", "",
              f"| variant | M_inf | mean ± std | Δ vs {BASELINE} [{conf}% paired CI] |"
              + (" tokens per answer |" if spent else "")
              + (" finetuning trained tok/s |" if rate else ""),
              "| --- | --- | --- | --- |" + (" ---: |" if spent else "")
              + (" ---: |" if rate else "")]
    for v, row in block["variants"].items():
      diff = row.get("diff")
      cell = "—" if diff is None else (
          f"{diff['mean']:+.2f} [{diff['low']:+.2f}, {diff['high']:+.2f}]"
          + (" **significant**" if diff["significant"] else ""))
      lines.append(f"| {v} | {row['m_inf']} | {row['mean']:.2f} ± {row['std']:.2f} | {cell} |"
                   + (f" {row['tokens_processed_per_answer']:.1f} |" if spent else "")
                   + (f" {row['trained_tokens_per_sec']:,.0f} |" if rate else ""))
    sweep = results["m_inf_sweep"]
    lines += ["", "M_inf sweep (mean ± std over seed pairs; arms only at their own M):", "",
              "| variant | " + " | ".join(f"M_inf={m}" for m in sweep) + " |",
              "| --- |" + " --- |" * len(sweep)]
    for v, row in block["variants"].items():
      lines.append(f"| {v} | " + " | ".join(
          f"{row['sweep'][str(m)]['mean']:.2f} ± {row['sweep'][str(m)]['std']:.2f}"
          if str(m) in row["sweep"] else "—" for m in sweep) + " |")
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
