"""An offline, seeded, procedurally generated corpus and downstream tasks.

Nothing is downloaded or written: every example is a pure function of
(task, split, index), generated in Python and served through
seqio.FunctionDataSource. The downstream tasks are ones where a small,
depth-limited decoder could use extra parallel computation before answering
(the setting where pause tokens help):

  addition      '4821+3907='             -> '8728'   (carries)
  digit_sum     'sum%10 83194027='        -> '4'      (a long reduction)
  pointer       'ptr b>d a>c d>a c>b a*3=' -> 'a'     (follow 3 pointers)

A positive control for supervised pauses (not in the pretraining corpus):

  parity        '01101001011100101101='   -> '1'    (parity of n bits; n = 20)
                pause_targets '11111111111000000000' (k-th: at least k ones)
  3sum          '123 456 789 012 345='    -> '1'   (some triple sums to 0 mod 10
                in every coordinate; Pfau, Merrill & Bowman's Match-3)
                pause_targets per pair (i < j): the digits of -(x_i + x_j) mod 10,
                then the index of the third summand after j, or '-'

The pretraining corpus mixes filler prose with problems of all three formats,
written with their answers, so that pretraining teaches the formats.
Registration lives in pause_flax.data.tasks.
"""

from __future__ import annotations

import functools
import random
import string
from collections.abc import Callable, Mapping, Sequence

import tensorflow as tf

# Examples per split: fixed, so splits are identical on every machine.
LM_SPLIT_SIZES = {"train": 4096, "validation": 256}
DOWNSTREAM_SPLIT_SIZES = {"train": 4096, "validation": 512}

_WORDS = (
    "the a model token pause think before answer number digit sum carry "
    "step reads writes layer attention each then after every small large "
    "question problem result simple careful patient slowly quickly many few "
    "one two three computes counts follows pointer chain list value"
).split()


def _rng(*key: object) -> random.Random:
  # A str seed is hashed with SHA-512: identical on every machine and run.
  return random.Random("pause_flax.synthetic/" + "/".join(map(str, key)))


def _addition(rng: random.Random) -> tuple[str, str]:
  a, b = (rng.randrange(10 ** (d - 1), 10 ** d)
          for d in (rng.randint(3, 6), rng.randint(3, 6)))
  return f"{a}+{b}=", str(a + b)


def _digit_sum(rng: random.Random) -> tuple[str, str]:
  digits = "".join(rng.choice(string.digits) for _ in range(rng.randint(8, 16)))
  return f"sum%10 {digits}=", str(sum(map(int, digits)) % 10)


def _pointer(rng: random.Random) -> tuple[str, str]:
  nodes = rng.sample(string.ascii_lowercase, rng.randint(4, 8))
  succ = dict(zip(nodes, nodes[1:] + nodes[:1]))  # one cycle over all nodes
  edges = [f"{k}>{v}" for k, v in succ.items()]
  rng.shuffle(edges)
  start, steps = rng.choice(nodes), rng.randint(1, 4)
  node = start
  for _ in range(steps):
    node = succ[node]
  return f"ptr {' '.join(edges)} {start}*{steps}=", node


def _sum3(rng: random.Random) -> tuple[str, str]:
  digits = [rng.randrange(10) for _ in range(3)]
  return f"sum3 {''.join(map(str, digits))}=", str(sum(digits) % 10)


def _count(rng: random.Random) -> tuple[str, str]:
  letters = "".join(rng.choice("abcd") for _ in range(rng.randint(8, 20)))
  return f"count a {letters}=", str(letters.count("a"))


# name -> generator of one (inputs, targets) pair.
DOWNSTREAM_GENERATORS: Mapping[str, Callable[[random.Random], tuple[str, str]]] = {
    "addition": _addition,
    "digit_sum": _digit_sum,
    "pointer": _pointer,
    "sum3": _sum3,        # (a + b + c) mod 10: three digits combined in one step
    "count": _count,      # occurrences of 'a' among 8-20 letters
}


def _prose(rng: random.Random) -> str:
  words = [rng.choice(_WORDS) for _ in range(rng.randint(6, 14))]
  return " ".join(words).capitalize() + "."


def lm_document(split: str, index: int) -> str:
  """Pretraining document `index` of `split`: prose and solved problems."""
  rng = _rng("lm", split, index)
  parts = []
  for _ in range(rng.randint(4, 10)):
    if rng.random() < 0.4:
      parts.append(_prose(rng))
    else:
      gen = DOWNSTREAM_GENERATORS[rng.choice(sorted(DOWNSTREAM_GENERATORS))]
      inputs, targets = gen(rng)
      parts.append(inputs + targets)
  return "\n".join(parts)


def downstream_example(task: str, split: str, index: int) -> tuple[str, str]:
  """(inputs, targets) of example `index` of a downstream task's `split`."""
  if task not in DOWNSTREAM_GENERATORS:
    raise ValueError(
        f"Unknown synthetic task {task!r}; choose one of "
        f"{sorted(DOWNSTREAM_GENERATORS)}.")
  return DOWNSTREAM_GENERATORS[task](_rng("task", task, split, index))


# Parity: a larger train split, so that a run of a few epochs sees fresh strings.
PARITY_SPLIT_SIZES = {"train": 65536, "validation": 512}


def parity_example(n_bits: int, split: str, index: int) -> tuple[str, str, str]:
  """(inputs, targets, pause_targets) of parity example `index`.

  inputs: n random bits then '='; targets: their parity ('0' or '1');
  pause_targets: n threshold hints, the k-th (k = 1..n) '1' when at least k
  bits are 1 (London & Kanade's hints: parity is their alternating sum).
  """
  rng = _rng("parity", n_bits, split, index)
  bits = [rng.randrange(2) for _ in range(n_bits)]
  ones = sum(bits)
  hints = "".join("1" if ones >= k else "0" for k in range(1, n_bits + 1))
  return "".join(map(str, bits)) + "=", str(ones % 2), hints


# 3SUM (Pfau, Merrill & Bowman, "Let's Think Dot by Dot", arXiv 2404.15758;
# their code: JacobPfau/fillerTokens, src/match3.py). One pass of a 1,000-step,
# batch-128 run sees each training example once.
SUM3_SPLIT_SIZES = {"train": 131072, "validation": 512}
_SUM3_MOD = 10


def sum3_num_hints(n_tuples: int, dim: int) -> int:
  """Pause targets per hinted 3SUM example: dim + 1 per pair of tuples."""
  return (dim + 1) * n_tuples * (n_tuples - 1) // 2


def _has_3sum(xs: Sequence[tuple[int, ...]]) -> bool:
  n = len(xs)
  return any(all((a + b + c) % _SUM3_MOD == 0 for a, b, c in zip(xs[i], xs[j], xs[k]))
             for i in range(n) for j in range(i + 1, n) for k in range(j + 1, n))


def _sum3_hints(xs: Sequence[tuple[int, ...]]) -> str:
  """Pfau's parallelizable CoT, one token per pause, in pair order (0,1), (0,2), ...

  Per pair (i, j): the digits of -(x_i + x_j) mod 10 (the tuple that would
  complete the triple), then the index of the first later tuple k > j equal to
  it, or '-' (Pfau reports the third summand's index when one exists).
  """
  out = []
  for i in range(len(xs)):
    for j in range(i + 1, len(xs)):
      need = tuple((-(a + b)) % _SUM3_MOD for a, b in zip(xs[i], xs[j]))
      found = next((k for k in range(j + 1, len(xs)) if xs[k] == need), None)
      out.append("".join(map(str, need)) + ("-" if found is None else str(found)))
  return "".join(out)


def _sum3_tuples(rng: random.Random, n_tuples: int, dim: int,
                 positive: bool) -> list[tuple[int, ...]]:
  """A planted triple (positive) or a corrupted one that no longer sums to 0 (negative).

  As Pfau built them: two random tuples and the negation of their sum, the
  rest uniform, shuffled. A negative resamples min(Geometric(3/4), 3) digits
  of the planted triple and is redrawn while any triple still sums to 0, so
  negatives are near misses rather than random strings.
  """
  while True:
    a, b = ([rng.randrange(_SUM3_MOD) for _ in range(dim)] for _ in range(2))
    triple = [a, b, [(-(x + y)) % _SUM3_MOD for x, y in zip(a, b)]]
    if not positive:
      corruptions = 1
      while corruptions < 3 and rng.random() >= 0.75:
        corruptions += 1
      for cell in rng.sample(range(3 * dim), corruptions):
        triple[cell // dim][cell % dim] = rng.randrange(_SUM3_MOD)
    xs = [tuple(t) for t in triple]
    xs += [tuple(rng.randrange(_SUM3_MOD) for _ in range(dim)) for _ in range(n_tuples - 3)]
    rng.shuffle(xs)
    if positive or not _has_3sum(xs):
      return xs


def check_sum3_params(n_tuples: int, dim: int, hint_fraction: float) -> None:
  """Raises ValueError naming a bad 3SUM parameter."""
  for key, value, low, high in (("n_tuples", n_tuples, 3, 10), ("dim", dim, 1, 16)):
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
      raise ValueError(f"{key}={value!r} is invalid: use an integer in [{low}, {high}].")
  if isinstance(hint_fraction, bool) or not isinstance(hint_fraction, (int, float)) or not (
      0.0 <= hint_fraction <= 1.0):
    raise ValueError(f"hint_fraction={hint_fraction!r} is invalid: use a number in [0, 1].")


def sum3_example(n_tuples: int, dim: int, hint_fraction: float, split: str,
                 index: int) -> tuple[str, str, str]:
  """(inputs, targets, pause_targets) of 3SUM example `index` of `split`.

  inputs: `n_tuples` tuples of `dim` digits, space-separated, then '=';
  targets: '1' when some triple (i < j < k) sums to 0 mod 10 in every
  coordinate, else '0' (even indices positive, odd negative: balanced);
  pause_targets: the hints of `_sum3_hints` on a `hint_fraction` of training
  examples (Pfau's CoT/filler mixture), '' on the rest and on validation.
  The tuples and answer do not depend on `hint_fraction`.
  """
  check_sum3_params(n_tuples, dim, hint_fraction)
  _check_split(split, SUM3_SPLIT_SIZES)
  xs = _sum3_tuples(_rng("3sum", n_tuples, dim, split, index), n_tuples, dim,
                    positive=index % 2 == 0)
  hinted = split == "train" and _rng("3sum-hint", n_tuples, dim, index).random() < hint_fraction
  inputs = " ".join("".join(map(str, x)) for x in xs) + "="
  return inputs, "1" if index % 2 == 0 else "0", _sum3_hints(xs) if hinted else ""


@functools.lru_cache(maxsize=None)
def _sum3_triples(n_tuples: int, dim: int, hint_fraction: float,
                  split: str) -> tuple[tuple[str, ...], ...]:
  n = _check_split(split, SUM3_SPLIT_SIZES)
  return tuple(zip(*(sum3_example(n_tuples, dim, hint_fraction, split, i)
                     for i in range(n))))


def sum3_dataset_fn(n_tuples: int, dim: int, hint_fraction: float, split: str,
                    shuffle_files: bool = False, seed: int | None = None) -> tf.data.Dataset:
  """{'inputs', 'targets', 'pause_targets'} strings of 3SUM, in index order."""
  del shuffle_files, seed
  inputs, targets, hints = _sum3_triples(n_tuples, dim, hint_fraction, split)
  return tf.data.Dataset.from_tensor_slices(
      {"inputs": list(inputs), "targets": list(targets), "pause_targets": list(hints)})


@functools.lru_cache(maxsize=None)
def _parity_triples(n_bits: int, split: str) -> tuple[tuple[str, ...], ...]:
  n = _check_split(split, PARITY_SPLIT_SIZES)
  return tuple(zip(*(parity_example(n_bits, split, i) for i in range(n))))


def parity_dataset_fn(n_bits: int, split: str, shuffle_files: bool = False,
                      seed: int | None = None) -> tf.data.Dataset:
  """{'inputs', 'targets', 'pause_targets'} strings of parity of `n_bits`, in index order."""
  del shuffle_files, seed
  inputs, targets, hints = _parity_triples(n_bits, split)
  return tf.data.Dataset.from_tensor_slices(
      {"inputs": list(inputs), "targets": list(targets), "pause_targets": list(hints)})


def _check_split(split: str, sizes: Mapping[str, int]) -> int:
  if split not in sizes:
    raise ValueError(f"Unknown split {split!r}; choose one of {sorted(sizes)}.")
  return sizes[split]


@functools.lru_cache(maxsize=None)
def _lm_texts(split: str) -> tuple[str, ...]:
  n = _check_split(split, LM_SPLIT_SIZES)
  return tuple(lm_document(split, i) for i in range(n))


@functools.lru_cache(maxsize=None)
def _downstream_pairs(task: str, split: str) -> tuple[tuple[str, ...], ...]:
  n = _check_split(split, DOWNSTREAM_SPLIT_SIZES)
  pairs = [downstream_example(task, split, i) for i in range(n)]
  return tuple(zip(*pairs))


def lm_dataset_fn(split: str, shuffle_files: bool = False,
                  seed: int | None = None) -> tf.data.Dataset:
  """{'text'} documents of the pretraining corpus, always in index order.

  The data are in memory, so there are no files to shuffle: the Task's
  shuffle buffer does the shuffling, seeded by `seed` there.
  """
  del shuffle_files, seed
  return tf.data.Dataset.from_tensor_slices({"text": list(_lm_texts(split))})


def downstream_dataset_fn(task: str, split: str, shuffle_files: bool = False,
                          seed: int | None = None) -> tf.data.Dataset:
  """{'inputs', 'targets'} strings of a downstream task, in index order."""
  del shuffle_files, seed
  inputs, targets = _downstream_pairs(task, split)
  return tf.data.Dataset.from_tensor_slices(
      {"inputs": list(inputs), "targets": list(targets)})


def postprocess_answer(output: str | bytes, example: Mapping | None = None,
                       is_target: bool = False) -> str:
  """Decoded model output (or target) -> the answer string, stripped."""
  del example, is_target
  if isinstance(output, bytes):
    output = output.decode("utf-8", errors="replace")
  return output.strip()


def exact_match(targets: Sequence[str],
                predictions: Sequence[str]) -> dict[str, float]:
  """Percentage of predictions equal to their target (seqio metric_fn)."""
  if len(targets) != len(predictions):
    raise ValueError(
        f"exact_match got {len(targets)} targets but {len(predictions)} "
        "predictions; they must pair up.")
  if not targets:
    return {"exact_match": 0.0}
  hits = sum(t == p for t, p in zip(targets, predictions))
  return {"exact_match": 100.0 * hits / len(targets)}
