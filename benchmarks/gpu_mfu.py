"""MFU of paper_130m and paper_1b on one GPU: sequence length 2048, bf16 (a benchmark).

Times `Trainer.train_step` (forward, backward, clipped AdamW; bf16 compute,
f32 parameters and optimizer state, fused output projection + cross-entropy)
on random batches for each model, at the first batch size that fits: a batch
that runs out of memory is halved. After compiling and warming up, --repeats
windows of --steps steps are timed (block_until_ready at each window's end);
the median window gives tokens/s and MFU = model FLOPs/s
(`transformer.flops_per_token`, remat not counted) over the device's dense
bf16 peak (`metrics.peak_flops_per_device`: 989 TFLOP/s for H100/H200, or
--peak), and over the bf16 matmul rate measured on the device itself (an
8192^3 product of random matrices). Attention is cuDNN flash attention on a
GPU (--attention). Results are printed as a table and appended as JSON rows to
--out, so several invocations (one process each) collect into one file.

  python benchmarks/gpu_mfu.py                          # both models, on the GPU
  python benchmarks/gpu_mfu.py --models tiny --seq_len 64 --batch_sizes tiny:4 \\
      --dtype float32 --steps 2 --repeats 2              # a CPU smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import statistics


def parse_args() -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--models', default='paper_130m,paper_1b')
  parser.add_argument('--seq_len', type=int, default=2048)
  parser.add_argument('--batch_sizes', default='paper_130m:16,paper_1b:4',
                      help='model:first batch to try (halved on out-of-memory)')
  parser.add_argument('--dtype', default='bfloat16', help='compute dtype')
  parser.add_argument('--remat', default='none', help="remat_policy: 'none', 'dots', 'full'")
  parser.add_argument('--loss_chunk_len', type=int, default=256,
                      help='positions per fused loss chunk (0: materialise the logits)')
  parser.add_argument('--steps', type=int, default=10, help='steps per timed window')
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument('--warmup', type=int, default=2)
  parser.add_argument('--attention', default='auto',
                      help="attention_impl: 'xla', 'cudnn', 'blocked' (segment ids, no dense "
                           "mask), or 'auto' (cudnn where it applies)")
  parser.add_argument('--packed', type=int, default=0,
                      help='documents packed per row (segment ids; 0 or 1: none)')
  parser.add_argument('--peak', type=float, default=0.0,
                      help='peak FLOP/s per device (0: known chip, else measured)')
  parser.add_argument('--tag', default='', help='label of this setting in the table and JSON')
  parser.add_argument('--out', default='gpu_mfu.json', help='JSON rows, appended to')
  return parser.parse_args()


def measure(name: str, batch_size: int, args: argparse.Namespace) -> dict:
  """Tokens/s and MFU of one model at one batch size (raises on out-of-memory)."""
  import jax
  import step_timing

  from pause_flax import parallel
  from pause_flax.model import kernels, transformer
  from pause_flax.training import optimizer, trainer

  config = transformer.model_config(name, dtype=args.dtype, max_len=args.seq_len,
                                    remat_policy=args.remat, attention_impl=args.attention)
  step = trainer.Trainer(
      config, optimizer.make_optimizer(optimizer.make_schedule(1e-4, 10**6)),
      parallel.make_mesh(), options=trainer.StepOptions(loss_chunk_len=args.loss_chunk_len or None))
  attention = kernels.attention_impl(step.model_config, args.seq_len)  # as resolved for the mesh
  rates, metrics = step_timing.tokens_per_second(step, batch_size, args.seq_len, warmup=args.warmup,
                                        steps=args.steps, repeats=args.repeats,
                                        packed=args.packed)
  from pause_flax.training import metrics as metrics_lib
  peak = metrics_lib.peak_flops_per_device(args.peak or None) * jax.device_count()
  rate = statistics.median(rates)
  model_flops = transformer.flops_per_token(config, args.seq_len) * rate
  memory = jax.devices()[0].memory_stats() or {}
  return {
      'model': name, 'tag': args.tag, 'device': jax.devices()[0].device_kind,
      'devices': jax.device_count(), 'jax': jax.__version__,
      'xla_flags': os.environ.get('XLA_FLAGS', ''),
      'batch_size': batch_size, 'seq_len': args.seq_len, 'dtype': args.dtype,
      'remat': args.remat, 'attention': attention, 'loss_chunk_len': args.loss_chunk_len,
      'packed': args.packed,
      'params': transformer.num_params(config),
      'tokens_per_s': rate, 'tokens_per_s_all': rates,
      'step_ms': 1e3 * batch_size * args.seq_len / rate,
      'model_tflops_per_s': model_flops / 1e12, 'peak_tflops_per_s': peak / 1e12,
      'mfu': model_flops / peak, 'loss': float(metrics['loss']),
      'peak_memory_gib': memory.get('peak_bytes_in_use', 0) / 2**30,
  }


def main() -> None:
  args = parse_args()
  import jax

  first = dict(item.split(':') for item in args.batch_sizes.split(','))
  from pause_flax.training import metrics as metrics_lib
  matmul_rate = (metrics_lib.measure_matmul_peak(8192, repeats=10, dtype=jax.numpy.bfloat16)
                 if jax.default_backend() == 'gpu' else 0.0)
  results = []
  for name in args.models.split(','):
    batch_size = int(first.get(name, 8))
    while True:
      try:
        results.append(measure(name, batch_size, args))
        break
      except Exception as e:  # out of memory: XlaRuntimeError RESOURCE_EXHAUSTED
        if 'RESOURCE_EXHAUSTED' not in str(e) or batch_size == 1:
          raise
        print(f'{name}: batch {batch_size} out of memory, trying {batch_size // 2}', flush=True)
        batch_size //= 2
        jax.clear_caches()
  for r in results:
    r['measured_matmul_tflops_per_s'] = matmul_rate / 1e12
    r['mfu_of_measured'] = (r['model_tflops_per_s'] * 1e12 / (matmul_rate * r['devices'])
                            if matmul_rate else None)
  previous = []
  if os.path.exists(args.out):
    with open(args.out) as f:
      previous = json.load(f)
  with open(args.out, 'w') as f:
    json.dump(previous + results, f, indent=1)
  print('| model | setting | device | batch x length | tokens/s | step (ms) | model TFLOP/s | MFU '
        '| MFU of measured matmul | peak memory (GiB) |')
  print('| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |')
  for r in results:
    of_measured = (f"{100 * r['mfu_of_measured']:.1f}% of {r['measured_matmul_tflops_per_s']:.0f}"
                   if r['mfu_of_measured'] else 'n/a')
    setting = r['tag'] or (f"{r['attention']}, remat {r['remat']}, chunk {r['loss_chunk_len']}"
                           + (f", {r['packed']} documents per row" if r['packed'] > 1 else ''))
    print(f"| {r['model']} | {setting} | {r['device']} | {r['batch_size']} x {r['seq_len']} | "
          f"{r['tokens_per_s']:,.0f} | {r['step_ms']:.1f} | {r['model_tflops_per_s']:.1f} | "
          f"{100 * r['mfu']:.1f}% | {of_measured} | {r['peak_memory_gib']:.1f} |")


if __name__ == '__main__':
  main()
