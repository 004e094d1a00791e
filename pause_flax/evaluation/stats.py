"""Seed statistics for the experiment grid: spreads and paired intervals.

Every variant is finetuned with the same seeds and evaluated on the same
evaluation set as the StdPT_StdFT baseline, so a variant's difference is
measured per seed (paired) and summarised with a Student-t interval. A
difference is called significant only when its interval excludes zero.
With several pretraining seeds, each finetuning seed is nested in one
pretraining run: `clustered_difference` averages within each pretraining
seed and takes the interval over pretraining seeds, so it covers the
pretraining variance (with the few degrees of freedom that has).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

import numpy as np
from scipy import stats as scipy_stats


@dataclasses.dataclass(frozen=True)
class Summary:
  mean: float
  std: float        # sample standard deviation (ddof=1); 0 for one seed
  n: int


def summarize(values: Sequence[float]) -> Summary:
  v = np.asarray(values, np.float64)
  if v.size == 0:
    raise ValueError("summarize: no values")
  return Summary(float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0, int(v.size))


@dataclasses.dataclass(frozen=True)
class PairedDifference:
  mean: float
  low: float
  high: float
  n: int
  confidence: float

  @property
  def significant(self) -> bool:
    return self.n > 1 and (self.low > 0 or self.high < 0)


def paired_difference(variant: Mapping[int, float], baseline: Mapping[int, float],
                      confidence: float = 0.95) -> PairedDifference:
  """Mean of per-seed differences (variant - baseline) with a t interval.

  Only seeds present in both are paired; with a single seed the interval is
  unbounded (nothing can be called significant from one seed).
  """
  if not 0 < confidence < 1:
    raise ValueError(f"confidence={confidence} must be in (0, 1).")
  seeds = sorted(set(variant) & set(baseline))
  if not seeds:
    raise ValueError("paired_difference: the variant and the baseline share no seed.")
  d = np.asarray([variant[s] - baseline[s] for s in seeds], np.float64)
  mean = float(d.mean())
  if d.size == 1:
    return PairedDifference(mean, -math.inf, math.inf, 1, confidence)
  sem = float(d.std(ddof=1)) / math.sqrt(d.size)
  half = float(scipy_stats.t.ppf(0.5 + confidence / 2, d.size - 1)) * sem
  return PairedDifference(mean, mean - half, mean + half, int(d.size), confidence)


def clustered_difference(variant: Mapping[tuple[int, int], float],
                         baseline: Mapping[tuple[int, int], float],
                         confidence: float = 0.95) -> PairedDifference:
  """Paired difference over clusters: keys are (cluster, seed), e.g.
  (pretraining seed, finetuning seed).

  The per-key differences are averaged within each cluster, and the t
  interval is taken over the cluster means (n = number of clusters).
  """
  by_cluster: dict[int, list[float]] = {}
  for key in sorted(set(variant) & set(baseline)):
    by_cluster.setdefault(key[0], []).append(variant[key] - baseline[key])
  if not by_cluster:
    raise ValueError("clustered_difference: the variant and the baseline share no seed.")
  means = {c: float(np.mean(d)) for c, d in by_cluster.items()}
  return paired_difference(means, {c: 0.0 for c in means}, confidence)
