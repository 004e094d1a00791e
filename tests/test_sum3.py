"""synthetic_3sum: Pfau et al.'s 3SUM with a hinted/plain mixture (the second positive control)."""

import itertools

import numpy as np
import pytest
import seqio

from pause_flax.data import synthetic
from pause_flax.data import tasks

N, D = 5, 3


def _tuples(inputs):
  assert inputs.endswith("=")
  return [tuple(map(int, t)) for t in inputs[:-1].split(" ")]


def _brute_force(xs):
  return any(all(sum(c) % 10 == 0 for c in zip(a, b, c))
             for a, b, c in itertools.combinations(xs, 3))


def _cot(xs):
  """The per-pair hints written out independently: -(x_i + x_j) mod 10, then k or '-'."""
  out = ""
  for i, j in itertools.combinations(range(len(xs)), 2):
    need = tuple((10 - (a + b) % 10) % 10 for a, b in zip(xs[i], xs[j]))
    ks = [k for k in range(j + 1, len(xs)) if xs[k] == need]
    out += "".join(str(v) for v in need) + (str(ks[0]) if ks else "-")
  return out


@pytest.mark.parametrize("n,d", [(N, D), (4, 2), (7, 1)])
def test_labels_are_right_and_balanced(n, d):
  examples = [synthetic.sum3_example(n, d, 1.0, "train", i) for i in range(400)]
  labels = [t for _, t, _ in examples]
  assert labels.count("1") == labels.count("0") == 200
  for inputs, target, _ in examples:
    xs = _tuples(inputs)
    assert len(xs) == n and all(len(x) == d for x in xs)
    assert target == ("1" if _brute_force(xs) else "0")


def test_negatives_are_near_misses():
  """Pfau's hard negatives: a planted triple with 1-3 digits resampled (not random strings)."""
  misses = []
  for i in range(1, 400, 2):
    xs = _tuples(synthetic.sum3_example(N, D, 0.0, "validation", i)[0])
    misses.append(min(sum(sum(c) % 10 != 0 for c in zip(a, b, c))
                      for a, b, c in itertools.combinations(xs, 3)))
  assert set(misses) <= {1, 2, 3} and misses.count(1) > len(misses) / 2


def test_hints_are_exactly_the_cot():
  for i in range(300):
    inputs, target, hints = synthetic.sum3_example(N, D, 1.0, "train", i)
    xs = _tuples(inputs)
    assert hints == _cot(xs) and len(hints) == synthetic.sum3_num_hints(N, D) == 40
    # The hints carry the answer: some pair reports a third summand.
    assert target == ("1" if any(hints[p + D] != "-" for p in range(0, 40, D + 1)) else "0")


def test_mixture_fraction_and_unhinted_validation():
  for fraction in (0.0, 0.25, 0.5, 1.0):
    hinted = [bool(synthetic.sum3_example(N, D, fraction, "train", i)[2]) for i in range(3000)]
    assert abs(np.mean(hinted) - fraction) < 0.03
    # Hinted and plain examples are spread over both classes.
    if 0 < fraction < 1:
      assert 0.4 < np.mean([h for i, h in enumerate(hinted) if i % 2 == 0]) / fraction < 1.6
  assert not any(synthetic.sum3_example(N, D, 1.0, "validation", i)[2] for i in range(512))
  # The problems and answers do not depend on the mixture.
  for i in range(50):
    a, b = (synthetic.sum3_example(N, D, f, "train", i) for f in (0.0, 1.0))
    assert a[:2] == b[:2] and a == synthetic.sum3_example(N, D, 0.0, "train", i)
  assert (synthetic.sum3_example(N, D, 0.5, "train", 0)
          != synthetic.sum3_example(N, D, 0.5, "validation", 0))


@pytest.mark.parametrize("kwargs,bad", [
    ({"n_tuples": 2}, "n_tuples=2"), ({"n_tuples": 11}, "n_tuples=11"),
    ({"dim": 0}, "dim=0"), ({"hint_fraction": 1.5}, "hint_fraction=1.5"),
    ({"n_tuples": True}, "n_tuples=True")])
def test_bad_parameters_are_refused(kwargs, bad):
  with pytest.raises(ValueError, match=bad):
    tasks.register_3sum_task(**kwargs)


def test_registered_task_trains_hints_only_on_hinted_examples():
  sup = tasks.pause_variant("synthetic_3sum", form="finetune", num_pauses=40, pause_weight=1)
  assert tasks.default_task_feature_lengths("synthetic_3sum") == {"inputs": 20, "targets": 2}
  assert tasks.register_3sum_task(4, 2, 0.25) == "synthetic_3sum_n4_d2_h25"
  lengths = {"inputs": 60, "targets": 2}
  ds = seqio.get_mixture_or_task(sup).get_dataset(lengths, split="train", shuffle=False)
  vocab = tasks.get_vocabulary(sup)
  got = list(tasks.get_feature_converter(sup)(ds, lengths).take(8).as_numpy_iterator())
  for i, ex in enumerate(got):
    inputs, answer, hints = synthetic.sum3_example(N, D, 0.5, "train", i)
    w = ex["decoder_loss_weights"].tolist()
    assert ex["decoder_target_tokens"][60] == vocab.encode(answer)[0] and w[60:] == [1, 1]
    if hints:
      assert ex["decoder_target_tokens"][20:60].tolist() == vocab.encode(hints)
      assert w[:60] == [0] * 20 + [1] * 40
    else:
      assert w[:60] == [0] * 60
  assert {bool(synthetic.sum3_example(N, D, 0.5, "train", i)[2]) for i in range(8)} == {
      True, False}
