"""M_inf sweeps: a Markdown and JSON table and a PNG plot (matplotlib, Agg).

`write_sweep(dir, task, {M_inf: metrics})` writes `sweep.md`, `sweep.json` and
`sweep.png` (every metric against M_inf, M_ft marked) to `dir`.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Mapping

import tensorflow as tf


def _metric_names(by_m: Mapping[int, Mapping[str, float]]) -> list[str]:
  return sorted({k for metrics in by_m.values() for k in metrics})


def sweep_markdown(task: str, by_m: Mapping[int, Mapping[str, float]],
                   num_pauses_finetune: int | None = None) -> str:
  """One row per M_inf, one column per metric."""
  names = _metric_names(by_m)
  ft = "" if num_pauses_finetune is None else f" (finetuned with M_ft = {num_pauses_finetune})"
  lines = [f"### {task}: metric against M_inf{ft}", "",
           "| M_inf | " + " | ".join(names) + " |",
           "| ---: | " + " | ".join("---:" for _ in names) + " |"]
  for m in sorted(by_m):
    cells = [f"{by_m[m][k]:.2f}" if k in by_m[m] else "" for k in names]
    lines.append(f"| {m} | " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def plot_sweep(task: str, by_m: Mapping[int, Mapping[str, float]],
               num_pauses_finetune: int | None = None) -> bytes:
  """PNG bytes: each metric against M_inf, a dashed line at M_ft."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  ms = sorted(by_m)
  fig, ax = plt.subplots(figsize=(5, 3.5), dpi=120)
  for name in _metric_names(by_m):
    xs = [m for m in ms if name in by_m[m]]
    ax.plot(xs, [by_m[m][name] for m in xs], marker="o", label=name)
  if num_pauses_finetune is not None:
    ax.axvline(num_pauses_finetune, color="gray", linestyle="--", linewidth=1,
               label=f"M_ft = {num_pauses_finetune}")
  ax.set_xlabel("M_inf (pauses at inference)")
  ax.set_ylabel("metric")
  ax.set_title(task)
  ax.set_xticks(ms)
  ax.grid(alpha=0.3)
  ax.legend(fontsize="small")
  fig.tight_layout()
  buf = io.BytesIO()
  fig.savefig(buf, format="png")
  plt.close(fig)
  return buf.getvalue()


def write_sweep(directory: str, task: str, by_m: Mapping[int, Mapping[str, float]], *,
                step: int | None = None, num_pauses_finetune: int | None = None) -> None:
  """Writes sweep.md, sweep.json and sweep.png to `directory`."""
  tf.io.gfile.makedirs(directory)
  with tf.io.gfile.GFile(os.path.join(directory, "sweep.md"), "w") as f:
    f.write(sweep_markdown(task, by_m, num_pauses_finetune))
  rows = [{"num_pauses_inference": m, **by_m[m]} for m in sorted(by_m)]
  with tf.io.gfile.GFile(os.path.join(directory, "sweep.json"), "w") as f:
    f.write(json.dumps({"task": task, "step": step, "num_pauses_finetune": num_pauses_finetune,
                        "rows": rows}, indent=2) + "\n")
  with tf.io.gfile.GFile(os.path.join(directory, "sweep.png"), "wb") as f:
    f.write(plot_sweep(task, by_m, num_pauses_finetune))
