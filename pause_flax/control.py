r"""Positive and negative controls: can the pipeline see a pause effect theory predicts?

  python -m pause_flax.control --gin_file=gin_configs/local/positive_control.gin \
    --gin.CONTROL_DIR="'/tmp/pause_control'"

Trains small models from scratch on each task in four arms, every arm on the
same seeds (model init and data order), and evaluates each at its own M:
  NoPause          the prefix alone
  Pause            prefix + M pauses, pause outputs weight 0 (the paper's)
  SupervisedPause  prefix + M pauses whose outputs are trained on the task's
                   `pause_targets` (London & Kanade's hints for parity)
  Filler           prefix + M copies of an ordinary token ('.')
On parity of n bits (synthetic_parity) with threshold hints a two-layer
transformer is expected to reach ~100% only in the SupervisedPause arm; the
second positive control (synthetic_3sum: half its training examples carry
Pfau et al.'s per-pair hints) has its own NoPause limit in the gin files; the
negative control (synthetic_count, no pause_targets) runs the other arms. The
verdict compares SupervisedPause with NoPause and Filler (paired t intervals
over the seeds) and says plainly whether the known effect was detected.
`arms` also takes `pause_flax.arms.Arm`s: any placement x count x token,
low-confidence (DIT) and adaptive (Catch Your Breath) arms, compared with
NoPause the same way, with the tokens each answer cost in the table
(gin_configs/local/policy_arms.gin).
Cells are cached in `cells/<task>/<arm>/seed<k>.json` as in the grid; the
tables go to results.md / results.json and a figure per task to
control_<task>.png (each arm's mean with its seeds as points).
"""

from __future__ import annotations

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
from pause_flax import train as train_cli
from pause_flax.evaluation import stats
from pause_flax.model import transformer as transformer_lib
from pause_flax.training import loop

ARMS = ("NoPause", "SupervisedPause", "Filler", "Pause")  # run in this order
BASELINE = "NoPause"
COMPUTE_METRICS = cells_lib.COMPUTE_METRICS
# The verdict's limits on parity (London & Kanade: ~100% with hints, ~50% without);
# a task may get its own through a {task: limit} mapping.
SUPERVISED_MIN = 90.0
BASELINE_MAX = 65.0


def task_limit(limit: float | Mapping[str, float], task: str, default: float) -> float:
  """`limit` itself, or its entry for `task` (`default` when the mapping has none)."""
  return float(limit.get(task, default)) if isinstance(limit, Mapping) else float(limit)


def preset(name: str, pause_weight: int = 1) -> arms_lib.Arm:
  """The four control arms by name; their count is each task's M (num_pauses)."""
  presets = {"NoPause": arms_lib.Arm("NoPause"),
             "Pause": arms_lib.Arm("Pause", placement="append"),
             "SupervisedPause": arms_lib.Arm("SupervisedPause", placement="append",
                                             pause_weight=pause_weight),
             "Filler": arms_lib.Arm("Filler", placement="append", token="filler")}
  if name not in presets:
    raise ValueError(f"arm={name!r}: choose from {ARMS}, or give an Arm (pause_flax.arms).")
  return presets[name]


def resolve_arms(arms: Sequence[str | arms_lib.Arm], pause_weight: int = 1
                 ) -> list[arms_lib.Arm]:
  """Arm names (the presets) and Arm objects -> Arms, the baseline included."""
  out = [a if isinstance(a, arms_lib.Arm) else preset(a, pause_weight) for a in arms]
  names = [a.name for a in out]
  if BASELINE not in names or len(set(names)) != len(names):
    raise ValueError(f"arms={names}: give distinct names, {BASELINE} (the baseline) included.")
  return out


def task_arms(task: str, arms: Sequence[str | arms_lib.Arm]) -> list[str]:
  """The names of the arms a task supports: supervised ones only with `pause_targets`."""
  import seqio  # pylint: disable=g-import-not-at-top
  from pause_flax.data import preprocessors as prep  # pylint: disable=g-import-not-at-top
  from pause_flax.data import tasks  # pylint: disable=g-import-not-at-top,unused-import  # registers
  features = seqio.get_mixture_or_task(task).output_features
  return [a.name for a in resolve_arms(arms)
          if not a.supervised or prep.PAUSE_TARGETS_KEY in features]


def run_control(control_dir: str, *, model_config: transformer_lib.TransformerConfig,
                tasks: Sequence[str], stage: cells_lib.Stage, seeds: Sequence[int],
                num_pauses: int | Mapping[str, int], pause_weight: int = 1,
                arms: Sequence[str | arms_lib.Arm] = ARMS, filler_text: str = ".",
                eval_batch_size: int = 128, eval_examples: int | None = None,
                confidence: float = 0.95,
                supervised_min: float | Mapping[str, float] = SUPERVISED_MIN,
                baseline_max: float | Mapping[str, float] = BASELINE_MAX,
                keep_checkpoints: bool = False, workers: int = 1,
                feature_lengths: Mapping[str, Mapping[str, int]] | None = None,
                mesh: jax.sharding.Mesh | None = None) -> dict:
  """Runs (or completes) the control and writes results.md / results.json.

  `supervised_min` / `baseline_max` (the verdict's limits, in percent) are one
  number for every task or a {task: limit} mapping; tasks it leaves out get
  SUPERVISED_MIN / BASELINE_MAX.
  `workers` > 1 (CPU hosts) computes the cells in that many processes, each on
  its own share of the CPU cores (cells_lib.run_workers), then writes the
  tables here. On a few cores the runs of a small model are faster side by side
  than one after another; results equal a one-process run's up to XLA:CPU's
  thread-count-dependent rounding (docs/supervised_pauses.md).
  `feature_lengths` ({task: {feature: length}}) replaces a task's default
  lengths (before the room each arm adds for its pauses), e.g. to cut padding.
  """
  # A worker gets these same arguments (all but the mesh, which it makes itself).
  job = {k: v for k, v in locals().items() if k != "mesh"}
  from pause_flax.data import tasks as tasks_lib  # pylint: disable=g-import-not-at-top
  from pause_flax.evaluation import evaluator as evaluator_lib  # pylint: disable=g-import-not-at-top

  arm_list = resolve_arms(arms, pause_weight)
  if len(seeds) < 3 or len(set(seeds)) != len(seeds):
    raise ValueError(f"seeds={list(seeds)}: give at least three distinct seeds.")
  m = dict(num_pauses) if isinstance(num_pauses, Mapping) else {t: num_pauses for t in tasks}
  feature_lengths = {t: dict(v) for t, v in (feature_lengths or {}).items()}
  from pause_flax.data import pipeline  # pylint: disable=g-import-not-at-top
  for name in feature_lengths:  # entries for tasks not run today are kept, typos refused
    try:
      pipeline.check_task_name(name)
    except ValueError as e:
      raise ValueError(f"run_control.feature_lengths: {e}") from None
  worker = cells_lib.in_worker()
  if not worker and cells_lib.check_workers(workers, "run_control.workers") > 1:
    os.makedirs(control_dir, exist_ok=True)
    cells_lib.run_workers(
        workers, "pause_flax.control", job, os.path.join(control_dir, "workers"),
        cells=[cell_path(control_dir, t, a, s) for t in tasks
               for a in task_arms(t, arm_list) for s in seeds])
  mesh = parallel.make_mesh() if mesh is None else mesh
  os.makedirs(control_dir, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", os.path.join(control_dir, "xla_cache"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)

  for task in tasks:
    filler_ids = tasks_lib.get_vocabulary(task).encode(filler_text)
    if len(filler_ids) != 1:
      raise ValueError(f"filler_text={filler_text!r} is not one token in {task}'s vocabulary.")
    base_lengths = feature_lengths.get(task) or dict(
        tasks_lib.default_task_feature_lengths(task))
    supported = task_arms(task, arm_list)
    for arm in (a.with_count(m[task]) for a in arm_list if a.name in supported):
      p = arms_lib.plan(arm, task, filler_ids[0])
      lengths = {k: v + p.extra_lengths.get(k, 0) for k, v in base_lengths.items()}
      evaluator = None

      def evaluate(model_dir: str, p=p, lengths=lengths) -> dict:
        nonlocal evaluator
        if evaluator is None:
          evaluator = evaluator_lib.Evaluator(
              p.eval_task, batch_size=eval_batch_size, mesh=mesh, num_examples=eval_examples,
              feature_lengths=lengths if p.placed_prompts else base_lengths,
              placed_prompts=p.placed_prompts,
              decode=evaluator_lib.DecodeOptions(max_pauses_per_token=p.max_pauses_per_token))
        ckpt = evaluator_lib.load_checkpoint(model_dir, mesh)
        (result,) = evaluator.evaluate(ckpt.model, p.m_inf).values()
        return {**result.metrics, **result.compute}

      for seed in seeds:
        model_dir = os.path.join(control_dir, "runs", task, arm.name, f"seed{seed}")

        def train(seed=seed, model_dir=model_dir, p=p, lengths=lengths, arm=arm) -> list[dict]:
          logging.info("Control: %s %s seed %d.", task, arm.name, seed)
          return loop.train(model_dir=model_dir, mixture_or_task_name=p.train_task,
                            task_feature_lengths=lengths, model_config=model_config,
                            seed=seed, data_seed=seed,
                            log_every=max(1, min(100, stage.steps // 20)), mesh=mesh,
                            **p.train_kwargs, **stage.train_kwargs())

        cells_lib.run_cell(
            cell_path(control_dir, task, arm.name, seed), model_dir,
            train=train, evaluate=evaluate, keep_checkpoints=keep_checkpoints,
            record={"task": task, "arm": arm.name, "seed": seed, "train_task": p.train_task,
                    "m_inf": arm.eval_pauses, "steps": stage.steps}, skip_busy=worker)
      if not worker:
        # Tables so far (arms still missing seeds are listed as such).
        write_results(control_dir, tasks, arm_list, seeds, m, confidence, stage.steps,
                      supervised_min=supervised_min, baseline_max=baseline_max)
  if worker:
    return {}
  return write_results(control_dir, tasks, arm_list, seeds, m, confidence, stage.steps,
                       supervised_min=supervised_min, baseline_max=baseline_max)


def cell_path(control_dir: str, task: str, arm: str, seed: int) -> str:
  return os.path.join(control_dir, "cells", task, arm, f"seed{seed}.json")


def write_results(control_dir: str, tasks, arms, seeds, m, confidence, steps,
                  **limits) -> dict:
  """results.json, results.md and control_<task>.png from the cells written so far."""
  from pause_flax.evaluation import grid_plots  # pylint: disable=g-import-not-at-top
  results = collect(control_dir, tasks, arms, seeds, m, confidence, **limits)
  results["steps"] = steps
  cells_lib.write_json(os.path.join(control_dir, "results.json"), results)
  with open(os.path.join(control_dir, "results.md"), "w", encoding="utf-8") as f:
    f.write(results_markdown(results))
  grid_plots.write_control(control_dir, results)
  return results


def collect(control_dir: str, tasks: Sequence[str], arms: Sequence[str | arms_lib.Arm],
            seeds: Sequence[int], num_pauses: Mapping[str, int], confidence: float,
            *, supervised_min: float | Mapping[str, float],
            baseline_max: float | Mapping[str, float]) -> dict:
  """Per task and arm: mean/std over seeds, per-seed values, paired differences, verdict."""
  out: dict[str, Any] = {"seeds": list(seeds), "confidence": confidence, "tasks": {}}
  for task in tasks:
    paths = {a: {s: cell_path(control_dir, task, a, s) for s in seeds}
             for a in task_arms(task, arms)}
    complete = [a for a in paths if all(os.path.exists(p) for p in paths[a].values())]
    missing = [a for a in paths if a not in complete]
    if BASELINE not in complete:
      out["tasks"][task] = {"missing": missing}
      continue
    done = {a: {s: cells_lib.read_json(p) for s, p in paths[a].items()}
            for a in complete}
    name = sorted(k for k in done[BASELINE][seeds[0]]["metrics"]
                  if k not in COMPUTE_METRICS)[0]
    values = {a: {s: c["metrics"][name] for s, c in by_seed.items()}
              for a, by_seed in done.items()}
    rows = {}
    for a, per_seed in values.items():
      summary = stats.summarize(list(per_seed.values()))
      rows[a] = {"mean": summary.mean, "std": summary.std, "per_seed": per_seed,
                 "m_inf": done[a][seeds[0]]["m_inf"], "diffs": {}}
      for key in COMPUTE_METRICS:  # what answering cost, averaged over the seeds
        spent = [c["metrics"].get(key) for c in done[a].values()]
        if all(x is not None for x in spent):
          rows[a][key] = sum(spent) / len(spent)
      for other in (BASELINE, "Filler"):
        if other != a and other in values:
          d = stats.paired_difference(per_seed, values[other], confidence)
          rows[a]["diffs"][other] = {"mean": d.mean, "low": d.low, "high": d.high,
                                     "significant": d.significant}
    block = {"metric": name, "num_pauses": num_pauses[task], "arms": rows,
             "missing": missing}
    if "SupervisedPause" in rows:
      sup = rows["SupervisedPause"]
      sup_min = task_limit(supervised_min, task, SUPERVISED_MIN)
      base_max = task_limit(baseline_max, task, BASELINE_MAX)
      checks = {
          f"SupervisedPause mean >= {sup_min:g}": sup["mean"] >= sup_min,
          f"NoPause mean <= {base_max:g}": rows[BASELINE]["mean"] <= base_max,
          "SupervisedPause - NoPause interval above 0": sup["diffs"][BASELINE]["low"] > 0,
      }
      if "Filler" in sup["diffs"]:
        checks["SupervisedPause - Filler interval above 0"] = sup["diffs"]["Filler"]["low"] > 0
      block["checks"] = checks
      block["detected"] = all(checks.values())
    out["tasks"][task] = block
  return out


def results_markdown(results: dict) -> str:
  seeds = results["seeds"]
  conf = int(round(100 * results["confidence"]))
  lines = [f"# Pause controls: {results.get('steps', '?')} training steps per run, "
           f"seeds {seeds} (model init and data order)", ""]
  for task, block in results["tasks"].items():
    if "arms" not in block:
      lines += [f"## {task}", "", f"Not run yet: {', '.join(block['missing'])}.", ""]
      continue
    lines += [f"## {task} ({block['metric']}, M = {block['num_pauses']})", ""]
    if "detected" in block:
      verdict = ("DETECTED: the pipeline shows the known supervised-pause effect."
                 if block["detected"] else
                 "NOT DETECTED: the pipeline does not show the known effect at this budget.")
      lines += [f"**Positive control: {verdict}**", ""]
      lines += [f"- {k}: {'yes' if v else 'no'}" for k, v in block["checks"].items()] + [""]
    spent = all("tokens_processed_per_answer" in r for r in block["arms"].values())
    lines += ["| arm | M_inf | mean ± std | per seed | "
              f"Δ vs NoPause [{conf}% paired CI] | Δ vs Filler [{conf}% paired CI] |"
              + (" tokens per answer |" if spent else ""),
              "| --- | --- | --- | --- | --- | --- |" + (" ---: |" if spent else "")]
    for a, row in block["arms"].items():
      def fmt(other):
        d = row["diffs"].get(other)
        if d is None:
          return "—"
        return (f"{d['mean']:+.1f} [{d['low']:+.1f}, {d['high']:+.1f}]"
                + (" **significant**" if d["significant"] else ""))
      per_seed = ", ".join(f"{row['per_seed'][s]:.1f}" for s in seeds)
      lines.append(f"| {a} | {row['m_inf']} | {row['mean']:.1f} ± {row['std']:.1f} | "
                   f"{per_seed} | {fmt(BASELINE)} | {fmt('Filler')} |"
                   + (f" {row['tokens_processed_per_answer']:.1f} |" if spent else ""))
    if block["missing"]:
      lines += ["", f"Not run yet: {', '.join(block['missing'])}."]
    lines.append("")
  return "\n".join(lines)


# -- CLI ------------------------------------------------------------------------------

run_control_configurable = gin.external_configurable(run_control, "run_control")


_WORKER_JOB = flags.DEFINE_string(
    "worker_job", None, "Internal: the job file of a run_control.workers process.")


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise flags.Error(f"Unexpected arguments: {argv[1:]}")
  if _WORKER_JOB.value:
    # A worker of run_control.workers: the parent's settings, its cells only.
    job = cells_lib.worker_job(_WORKER_JOB.value)
    train_cli.register_tasks()
    run_control(**job, mesh=train_cli.make_mesh())
    return
  gin_utils.parse_gin_flags()
  train_cli.register_tasks()
  results = run_control_configurable(mesh=train_cli.make_mesh())
  print(results_markdown(results))


if __name__ == "__main__":
  gin_utils.run(main)
