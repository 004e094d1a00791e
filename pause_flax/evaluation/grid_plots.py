"""PNG figures of the experiment grid: loss curves and M_inf robustness."""

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
  for kind in ("StdPT", "PausePT"):
    curve = _curve(os.path.join(grid_dir, "pretrain", kind))
    if curve is not None:
      ax.plot(*curve, label=kind)
  ax.set(title="pretraining loss (real targets only)", xlabel="step", ylabel="loss")
  ax.legend()
  for ax, task in zip(axes[0, 1:], tasks):
    for variant in results["tasks"][task]["variants"]:
      curves = [_curve(os.path.join(grid_dir, "finetune", task, variant, f"seed{s}"))
                for s in results["seeds"]]
      curves = [c for c in curves if c is not None]
      if not curves:
        continue
      n = min(len(c[1]) for c in curves)
      ax.plot(curves[0][0][:n], np.mean([c[1][:n] for c in curves], axis=0), label=variant)
    ax.set(title=f"finetuning loss: {task} (mean over seeds)", xlabel="step", ylabel="loss")
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
      mean = [row["sweep"][str(m)]["mean"] for m in sweep]
      std = [row["sweep"][str(m)]["std"] for m in sweep]
      ax.errorbar(sweep, mean, yerr=std, marker="o", capsize=3, label=variant)
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
