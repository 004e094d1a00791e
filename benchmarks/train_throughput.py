"""Training throughput and MFU of the train step (a benchmark, not a test).

Times `pause_flax.training.trainer.Trainer.train_step` (forward, backward,
AdamW update; donated, sharded state) on synthetic random batches, with no data
pipeline. Each model is compiled and warmed up, then --repeats windows of
--steps steps are timed (block_until_ready at the end of each window); the
table gives the median window and the spread. MFU is model FLOPs per second
(`transformer.flops_per_token`, remat not counted) over the measured f32 matmul
peak: the best of square matmuls of a few sizes on device 0. On CPU the
simulated devices share the host's cores, so the peak is the host's, not
multiplied by the device count.

  python benchmarks/train_throughput.py --models tiny,bench_4l --seq_len 256 \
      --batch_size 8 --steps 30 --repeats 5
  python benchmarks/train_throughput.py --devices 2 --data 2   # 2 simulated devices, DP
"""

from __future__ import annotations

import argparse
import os
import statistics


def parse_args() -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--models', default='tiny,bench_4l',
                      help='comma-separated names from transformer.model_config')
  parser.add_argument('--seq_len', type=int, default=256)
  parser.add_argument('--batch_size', type=int, default=8, help='global batch (sequences)')
  parser.add_argument('--dtype', default='float32', help='compute dtype')
  parser.add_argument('--steps', type=int, default=30, help='steps per timed window')
  parser.add_argument('--repeats', type=int, default=5, help='timed windows per model')
  parser.add_argument('--warmup', type=int, default=2, help='untimed steps (compile first)')
  parser.add_argument('--devices', type=int, default=0,
                      help='simulated host devices (XLA_FLAGS); 0 leaves the platform as is')
  parser.add_argument('--data', type=int, default=1, help='mesh data axis')
  parser.add_argument('--fsdp', type=int, default=-1, help='mesh fsdp axis (-1: the rest)')
  parser.add_argument('--tensor', type=int, default=1, help='mesh tensor axis')
  parser.add_argument('--peak_sizes', default='512,1024,2048',
                      help='square matmul sizes for the peak (best of them)')
  return parser.parse_args()


def set_device_count(devices: int) -> None:
  """Simulated host devices; must run before jax is imported."""
  if devices:
    flags = os.environ.get('XLA_FLAGS', '')
    os.environ['XLA_FLAGS'] = (
        f'{flags} --xla_force_host_platform_device_count={devices}').strip()


def benchmark(args: argparse.Namespace) -> None:
  # Imported here, after set_device_count.
  import jax
  import step_timing

  from pause_flax import parallel
  from pause_flax.model import transformer
  from pause_flax.training import metrics, optimizer, trainer

  peaks = {n: metrics.measure_matmul_peak(n, repeats=10)
           for n in map(int, args.peak_sizes.split(','))}
  peak = max(peaks.values())
  mesh = parallel.make_mesh(args.data, args.fsdp, args.tensor)
  tokens_per_step = args.batch_size * args.seq_len
  print(f'backend {jax.default_backend()}, {jax.device_count()} devices, mesh '
        f'{dict(mesh.shape)}, {os.cpu_count()} CPUs; batch {args.batch_size} x '
        f'{args.seq_len} tokens, {args.dtype}; {args.repeats} x {args.steps} steps')
  print('f32 matmul peak: ' + ', '.join(f'{n}: {f / 1e9:.1f}' for n, f in peaks.items())
        + f' GFLOP/s (using {peak / 1e9:.1f})')
  print('| model | params | tokens/s (median) | min-max | step (ms) | model GFLOP/s | MFU |')
  print('| --- | --- | --- | --- | --- | --- | --- |')
  for name in args.models.split(','):
    config = transformer.model_config(name, dtype=args.dtype, max_len=args.seq_len)
    schedule = optimizer.make_schedule(1e-4, 10**6)
    step = trainer.Trainer(config, optimizer.make_optimizer(schedule), mesh)
    rates, _ = step_timing.tokens_per_second(step, args.batch_size, args.seq_len,
                                          warmup=args.warmup, steps=args.steps,
                                          repeats=args.repeats)
    rate = statistics.median(rates)
    flops = transformer.flops_per_token(config, args.seq_len) * rate
    print(f'| {name} | {transformer.num_params(config) / 1e6:.2f}M | {rate:,.0f} | '
          f'{min(rates):,.0f}-{max(rates):,.0f} | {1e3 * tokens_per_step / rate:.1f} | '
          f'{flops / 1e9:.1f} | {100 * flops / peak:.1f}% |', flush=True)


def main() -> None:
  args = parse_args()
  set_device_count(args.devices)
  benchmark(args)


if __name__ == '__main__':
  main()
