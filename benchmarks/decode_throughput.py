"""Decoding throughput with and without the KV cache (a benchmark, not a test).

Greedy decoding of a fixed number of new tokens (no EOS, so every step runs)
after random prompts; reports generated tokens per second, compile excluded
(one warm-up call per setting, then the best of --repeats timed calls).

  python benchmarks/decode_throughput.py --model bench_4l --batch_size 4 \
      --prompt_len 32 --new_tokens 128,512
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np
from flax import nnx

from pause_flax.model import decoding, transformer


def _time(fn, repeats: int) -> float:
  jax.block_until_ready(fn())  # compile
  best = float('inf')
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    best = min(best, time.perf_counter() - start)
  return best


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--model', default='bench_4l')
  parser.add_argument('--batch_size', type=int, default=4)
  parser.add_argument('--prompt_len', type=int, default=32)
  parser.add_argument('--new_tokens', default='128,512')
  parser.add_argument('--repeats', type=int, default=1)
  args = parser.parse_args()

  config = transformer.model_config(args.model)
  model = transformer.Transformer(config, rngs=nnx.Rngs(0))
  prompts = np.random.default_rng(0).integers(
      1, config.vocab_size, (args.batch_size, args.prompt_len), dtype=np.int32)
  print(f'model {args.model} ({transformer.num_params(config) / 1e6:.1f}M params), '
        f'batch {args.batch_size}, prompt {args.prompt_len}, backend '
        f'{jax.default_backend()} ({jax.device_count()} devices)')
  print('| new tokens | cache | seconds | tokens/s | speed-up |')
  print('| --- | --- | --- | --- | --- |')
  for new_tokens in (int(n) for n in args.new_tokens.split(',')):
    rates = {}
    for use_cache in (False, True):
      seconds = _time(lambda: decoding.generate(
          model, prompts, max_new_tokens=new_tokens, use_cache=use_cache), args.repeats)
      rates[use_cache] = args.batch_size * new_tokens / seconds
      speedup = f'{rates[True] / rates[False]:.1f}x' if use_cache else ''
      print(f'| {new_tokens} | {"yes" if use_cache else "no"} | {seconds:.2f} | '
            f'{rates[use_cache]:.0f} | {speedup} |', flush=True)


if __name__ == '__main__':
  main()
