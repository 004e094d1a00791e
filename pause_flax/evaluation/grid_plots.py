"""PNG figures of the experiment grid (loss curves, M_inf robustness) and of the
pause controls (each arm's accuracy over seeds)."""

from __future__ import annotations

import json
import os

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  pylint: disable=g-import-not-at-top
import numpy as np  # noqa: E402


def _curve(model_dir: str) -> tuple[np.ndarray, np.ndarray] | None:
  path = os.path.join(model_dir, "metrics.jsonl")
  if not os.path.exists(path):
    return None
  with open(path, encoding="utf-8") as f:
    rows = [json.loads(line) for line in f if line.strip()]
  return np.array([r["step"] for r in rows]), np.array([r["loss"] for r in rows])


def write(grid_dir: str, results: dict) -> list[str]:
  """Writes loss_curves.png and m_inf_<task>.png; returns their paths."""
  paths = []
  tasks = list(results["tasks"])
  fig, axes = plt.subplots(1, 1 + len(tasks), figsize=(5 * (1 + len(tasks)), 4), squeeze=False)
  ax = axes[0, 0]
  pt_seeds = results.get("pretrain_seeds", [0])
  for kind in ("StdPT", "PausePT"):
    for i, p in enumerate(pt_seeds):
      curve = _curve(os.path.join(grid_dir, "pretrain", kind, f"seed{p}"))
      if curve is not None:
        ax.plot(*curve, label=f"{kind} (pretraining seeds {pt_seeds})" if i == 0 else None,
                color="C0" if kind == "StdPT" else "C1", alpha=0.8)
  ax.set(title="pretraining loss (real targets only)", xlabel="step", ylabel="loss")
  ax.legend()
  pairs = [f"pt{p}_seed{s}" for p in pt_seeds for s in results["seeds"]]
  for ax, task in zip(axes[0, 1:], tasks):
    for variant in results["tasks"][task]["variants"]:
      curves = [_curve(os.path.join(grid_dir, "finetune", task, variant, pair))
                for pair in pairs]
      curves = [c for c in curves if c is not None]
      if not curves:
        continue
      n = min(len(c[1]) for c in curves)
      ax.plot(curves[0][0][:n], np.mean([c[1][:n] for c in curves], axis=0), label=variant)
    ax.set(title=f"finetuning loss: {task} (mean over seed pairs)", xlabel="step",
           ylabel="loss")
    ax.legend(fontsize=8)
  fig.tight_layout()
  path = os.path.join(grid_dir, "loss_curves.png")
  fig.savefig(path, dpi=110)
  plt.close(fig)
  paths.append(path)

  sweep = results["m_inf_sweep"]
  for task, block in results["tasks"].items():
    fig, ax = plt.subplots(figsize=(6, 4))
    for variant, row in block["variants"].items():
      ms = [m for m in sweep if str(m) in row["sweep"]]   # arms: their own M only
      mean = [row["sweep"][str(m)]["mean"] for m in ms]
      std = [row["sweep"][str(m)]["std"] for m in ms]
      ax.errorbar(ms, mean, yerr=std, marker="o", capsize=3, label=variant)
    ax.set(title=f"{task}: {block['metric']} against M_inf (M_ft = {block['num_pauses']})",
           xlabel="M_inf (pauses, or fillers for the filler control, at inference)",
           ylabel=block["metric"])
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = os.path.join(grid_dir, f"m_inf_{task}.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    paths.append(path)
  return paths


def write_control(control_dir: str, results: dict) -> list[str]:
  """Writes control_<task>.png (arms' means as bars, seeds as points, the
  verdict in the title) for every task with finished arms; returns the paths."""
  paths = []
  for task, block in results["tasks"].items():
    if "arms" not in block:
      continue
    arms = list(block["arms"])
    fig, ax = plt.subplots(figsize=(1.6 * len(arms) + 2, 4))
    for i, arm in enumerate(arms):
      row = block["arms"][arm]
      ax.bar(i, row["mean"], color=f"C{i}", alpha=0.6)
      points = list(row["per_seed"].values())
      ax.scatter([i] * len(points), points, color="black", s=14, zorder=3)
    ax.set_xticks(range(len(arms)), [f"{a}\n(M_inf={block['arms'][a]['m_inf']})" for a in arms],
                  fontsize=8)
    verdict = ("" if "detected" not in block else
               " - DETECTED" if block["detected"] else " - NOT DETECTED")
    ax.set(title=f"{task}: {block['metric']}, seeds {results['seeds']}{verdict}",
           ylabel=block["metric"], ylim=(0, 105))
    fig.tight_layout()
    path = os.path.join(control_dir, f"control_{task}.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    paths.append(path)
  return paths
