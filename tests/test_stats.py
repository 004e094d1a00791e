"""Paired confidence intervals for the grid."""

import math

import numpy as np
import pytest
from scipy import stats as scipy_stats

from pause_flax.evaluation import stats


def test_summary_mean_and_sample_std():
  s = stats.summarize([1.0, 2.0, 3.0, 4.0])
  assert s.mean == 2.5 and s.n == 4
  np.testing.assert_allclose(s.std, np.std([1, 2, 3, 4], ddof=1))
  assert stats.summarize([7.0]).std == 0.0


def test_paired_interval_matches_a_paired_t_test():
  rng = np.random.default_rng(0)
  base = {s: float(v) for s, v in enumerate(rng.normal(50, 5, size=8))}
  var = {s: base[s] + float(d) for s, d in enumerate(rng.normal(1.0, 0.5, size=8))}
  diff = stats.paired_difference(var, base)
  d = np.array([var[s] - base[s] for s in range(8)])
  half = scipy_stats.t.ppf(0.975, 7) * d.std(ddof=1) / math.sqrt(8)
  np.testing.assert_allclose([diff.low, diff.high], [d.mean() - half, d.mean() + half])
  # The interval excludes zero exactly when a two-sided paired t-test rejects at 5%.
  p = scipy_stats.ttest_rel(list(var.values()), list(base.values())).pvalue
  assert diff.significant == (p < 0.05)
  assert diff.significant


def test_seed_noise_is_not_significant():
  base = {0: 50.0, 1: 52.0, 2: 48.0, 3: 51.0}
  var = {0: 51.0, 1: 50.0, 2: 49.0, 3: 52.0}
  assert not stats.paired_difference(var, base).significant


def test_only_shared_seeds_are_paired_and_one_seed_is_never_significant():
  diff = stats.paired_difference({0: 10.0, 5: 99.0}, {0: 0.0, 1: 3.0})
  assert diff.n == 1 and diff.mean == 10.0 and not diff.significant
  with pytest.raises(ValueError, match="share no seed"):
    stats.paired_difference({1: 1.0}, {2: 1.0})
  with pytest.raises(ValueError, match="confidence=1.5"):
    stats.paired_difference({1: 1.0}, {1: 1.0}, confidence=1.5)
