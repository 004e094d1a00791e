"""Throughput of the standard and pause pretraining pipelines (not a test).

Reads the offline synthetic corpus through the full seqio path of
`synthetic_lm` and `synthetic_lm_pause` (tokenize bytes, append EOS,
concatenate, split to L, [inject pauses], feature converter, batch) and
reports examples/s, tokens/s and the pause/standard ratio. Runs alternate
between the two pipelines and the best of `--repeats` is kept, which damps
noise from other processes on the machine.

With --corpus c4 the same comparison runs on the C4 Tasks (`c4_en_lm`,
`c4_en_lm_pause`: SentencePiece tokenization, as for the real C4) over an
offline C4 stand-in written to a temporary folder (`pause_flax.data.fake_c4`:
the synthetic corpus's documents as c4/en:3.0.1, and a SentencePiece of
--spm_vocab pieces trained on them).

With --step it instead times `inject_pauses` alone on in-memory length-L
chunks: CPU microseconds per example of the bare source, of a seeded map that
does nothing (seqio's per-example seeds and one map stage), and of the step.

  python benchmarks/data_pipeline.py --lengths 512,2048
  python benchmarks/data_pipeline.py --lengths 512,2048 --corpus c4
  python benchmarks/data_pipeline.py --lengths 512,2048 --step
"""

import argparse
import os
import tempfile
import time

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import seqio  # noqa: E402

import tensorflow as tf  # noqa: E402

from pause_flax.data import fake_c4  # noqa: E402
from pause_flax.data import preprocessors  # noqa: E402
from pause_flax.data import synthetic  # noqa: E402
from pause_flax.data import tasks  # noqa: E402


def _register_c4(directory: str, spm_vocab: int) -> tuple[str, str]:
  """The C4 Tasks over an offline stand-in; returns (standard, pause) names."""
  docs = [synthetic.lm_document("train", i) for i in range(4000)]
  data_dir = fake_c4.write_c4(directory, docs)
  spm_path = fake_c4.train_sentencepiece(directory, docs, vocab_size=spm_vocab)
  return tasks.register_c4_tasks(data_dir, spm_path)


def _dataset(name: str, length: int, batch_size: int):
  ds = seqio.get_dataset(
      name, {"targets": length}, tasks.get_feature_converter(name),
      dataset_split="train", shuffle=False, num_epochs=None, seed=0)
  return ds.batch(batch_size, drop_remainder=True)


def _time(name: str, length: int, batch_size: int,
          batches: int) -> tuple[float, float]:
  """(wall, CPU) seconds to read `batches` batches, after a warm-up batch."""
  ds = _dataset(name, length, batch_size)
  ds.take(1).reduce(0, lambda n, _: n + 1)
  wall, cpu = time.perf_counter(), time.process_time()
  ds.take(batches).reduce(0, lambda n, _: n + 1)
  return time.perf_counter() - wall, time.process_time() - cpu


def _step_costs(length: int, examples: int,
                repeats: int) -> dict[str, float]:
  """CPU microseconds per example: source alone, + no-op seeded map, + step."""
  def source():
    chunk = {"targets": tf.range(1, length + 1, dtype=tf.int32)}
    return tf.data.Dataset.from_tensors(chunk).repeat(examples)

  noop = seqio.map_over_dataset(num_seeds=1)(lambda x, seed: x)
  pipelines = {
      "source": source,
      "no-op seeded map": lambda: noop(source()),
      "inject_pauses": lambda: preprocessors.inject_pauses(
          source(), pause_id=length + 1),
  }
  best = {name: float("inf") for name in pipelines}
  for _ in range(repeats):
    for name, make in pipelines.items():
      with seqio.utils.map_seed_manager(0):
        ds = make()
      ds.take(1).reduce(0, lambda n, _: n + 1)
      cpu = time.process_time()
      ds.reduce(0, lambda n, _: n + 1)
      best[name] = min(best[name], time.process_time() - cpu)
  return {name: t / examples * 1e6 for name, t in best.items()}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--lengths", default="512,2048")
  parser.add_argument("--tokens", type=int, default=4_000_000,
                      help="tokens read per timed run")
  parser.add_argument("--batch_size", type=int, default=8)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--corpus", default="synthetic", choices=("synthetic", "c4"),
                      help="byte-level synthetic_lm, or the C4 Tasks (SentencePiece) "
                           "over an offline C4 stand-in")
  parser.add_argument("--spm_vocab", type=int, default=8000,
                      help="--corpus c4: SentencePiece pieces")
  parser.add_argument("--step", action="store_true",
                      help="time inject_pauses alone (CPU us per example)")
  args = parser.parse_args()
  if args.step:
    print(f"{'L':>5} {'pipeline':>20} {'CPU us/example':>15}")
    for length in map(int, args.lengths.split(",")):
      costs = _step_costs(length, max(1, args.tokens // length), args.repeats)
      for name, cost in costs.items():
        print(f"{length:>5} {name:>20} {cost:>15.1f}")
    return
  c4_names = None
  if args.corpus == "c4":
    c4_names = _register_c4(tempfile.mkdtemp(prefix="fake_c4_"), args.spm_vocab)
  print(f"{'L':>5} {'pipeline':>20} {'examples/s':>11} {'tokens/s':>11} "
        f"{'ratio':>6} {'examples/CPU-s':>15} {'ratio':>6}")
  for length in map(int, args.lengths.split(",")):
    batches = max(1, args.tokens // (length * args.batch_size))
    names = c4_names or ("synthetic_lm", "synthetic_lm_pause")
    wall = {name: float("inf") for name in names}
    cpu = dict(wall)
    for _ in range(args.repeats):
      for name in names:
        w, c = _time(name, length, args.batch_size, batches)
        wall[name], cpu[name] = min(wall[name], w), min(cpu[name], c)
    examples = batches * args.batch_size
    for name in names:
      print(f"{length:>5} {name:>20} {examples / wall[name]:>11.0f} "
            f"{examples * length / wall[name]:>11.3g} "
            f"{wall[names[0]] / wall[name]:>6.2f} "
            f"{examples / cpu[name]:>15.0f} {cpu[names[0]] / cpu[name]:>6.2f}")


if __name__ == "__main__":
  main()
