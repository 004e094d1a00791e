"""pause_flax vs MaxText: the same model trained on this CPU, alternating runs.

Model (MaxText's default LLAMA2 block, pause_flax's `bench_4l`): 4 decoder
layers, d_model 256, 4 heads of 64, gated SiLU MLP 1024, untied output
projection, vocabulary 32000; sequence length 256, global batch 8 (--batch), float32,
synthetic data, AdamW. Each framework runs in its own process, on one device
and on two simulated host devices with data parallelism (MaxText's best CPU
setting); every round runs all settings, in a rotated order. A run compiles,
runs --warmup steps, then times --steps steps.

MaxText 0.2.5 is installed from PyPI, when missing, into its own virtual
environment outside the repository (--cache_dir, default
~/.cache/pause_flax_bench) with Python >= 3.12 from pyenv: `pip install maxtext`
brings no dependencies, so the CPU requirement list inside its wheel is
installed first, without its CUDA/NVIDIA lines. MaxText's step time is the
"seconds" it logs per step, summed over the timed steps.

MFU = model FLOPs per second (`transformer.flops_per_token`, the same for
both) over the f32 matmul peak (best square jnp.dot), measured before and
after every round; the best measurement is used.

  python benchmarks/vs_maxtext.py --rounds 3 --steps 30

MaxText's venv installs the newest jax its requirements admit; pause_flax runs
under this interpreter's unless --pause_flax_python names another (a Python
3.12 virtualenv with `pip install -e .`), so that both run on the same jax and
XLA. The summary prints each framework's jax version.

--shape checks another shape (keys layers, d_model, heads, kv_heads, head_dim,
mlp, vocab, seq; unnamed keys keep bench_4l's; kv_heads defaults to heads,
head_dim to d_model / heads); --dry_run only builds both frameworks'
configs for it (pause_flax's TransformerConfig and abstract model, MaxText's
pyconfig) and prints them, without training:

  python benchmarks/vs_maxtext.py --dry_run \
      --shape layers=12,d_model=768,heads=12,mlp=3072,vocab=32000,seq=1024
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import zipfile

MAXTEXT_VERSION = '0.2.5'
REQUIREMENTS = 'dependencies/requirements/generated_requirements/decoupled-requirements.txt'
BATCH = 8  # global batch, --batch
# bench_4l (gated SiLU MLP, untied head, float32), sequence length 256.
DEFAULT_SHAPE = dict(layers=4, d_model=256, heads=4, kv_heads=None, head_dim=64, mlp=1024,
                     vocab=32000, seq=256)
SETTINGS = ('maxtext:1', 'maxtext:2', 'pause_flax:1', 'pause_flax:2')
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_args() -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--settings', default=','.join(SETTINGS),
                      help='comma-separated framework:devices')
  parser.add_argument('--rounds', type=int, default=3)
  parser.add_argument('--steps', type=int, default=30, help='timed steps per run')
  parser.add_argument('--warmup', type=int, default=3, help='untimed steps after compiling')
  parser.add_argument('--cache_dir', default=os.path.expanduser('~/.cache/pause_flax_bench'))
  parser.add_argument('--batch', type=int, default=BATCH,
                      help='global batch (split over the devices of a 2-device run)')
  parser.add_argument('--loss_chunk_len', type=_chunk_len, default='auto',
                      help="pause_flax StepOptions.loss_chunk_len: positions, 'auto' (the "
                      'default) or 0 (the plain logits path)')
  parser.add_argument('--shape', default='',
                      help='model shape, KEY=VALUE,... over ' + ', '.join(DEFAULT_SHAPE)
                      + " (default bench_4l's, sequence 256)")
  parser.add_argument('--pause_flax_python', default=sys.executable,
                      help='the interpreter that runs pause_flax (and the matmul peak); e.g. a '
                      "Python 3.12 virtualenv's, for the same jax as MaxText's venv")
  parser.add_argument('--dry_run', action='store_true',
                      help="only build both frameworks' configs for --shape and print them")
  parser.add_argument('--worker', action='store_true', help=argparse.SUPPRESS)
  parser.add_argument('--devices', type=int, default=1, help=argparse.SUPPRESS)
  args = parser.parse_args()
  try:
    args.model_shape = parse_shape(args.shape)
  except ValueError as e:
    parser.error(str(e))
  if args.batch < 1 or args.batch % 2 and any(s.endswith(':2') for s in args.settings.split(',')):
    parser.error(f'--batch={args.batch}: use a positive batch, even for the 2-device settings.')
  found = shutil.which(args.pause_flax_python)
  if not found:
    parser.error(f'--pause_flax_python={args.pause_flax_python}: not an executable; name a '
                 "Python interpreter (e.g. a Python 3.12 virtualenv's bin/python).")
  args.pause_flax_python = found
  return args


def _chunk_len(text: str) -> int | str:
  if text == 'auto':
    return text
  if not text.isdigit():
    raise argparse.ArgumentTypeError(f"{text!r}: use a number of positions, 'auto' or 0")
  return int(text)


def parse_shape(text: str) -> dict[str, int]:
  """KEY=VALUE,... over DEFAULT_SHAPE's keys; the rest keep bench_4l's."""
  shape = dict(DEFAULT_SHAPE)
  named = set()
  for item in filter(None, text.split(',')):
    key, _, value = item.partition('=')
    if key not in shape or not value.isdigit() or int(value) < 1:
      raise ValueError(f'--shape item {item!r}: use KEY=POSITIVE_INT with KEY in '
                       f'{", ".join(DEFAULT_SHAPE)}.')
    shape[key] = int(value)
    named.add(key)
  if 'head_dim' not in named and ({'d_model', 'heads'} & named):
    if shape['d_model'] % shape['heads']:
      raise ValueError(f'd_model={shape["d_model"]} is not divisible by heads={shape["heads"]}; '
                       'give head_dim.')
    shape['head_dim'] = shape['d_model'] // shape['heads']
  if shape['kv_heads'] is None:
    shape['kv_heads'] = shape['heads']
  return shape


def shape_arg(shape: dict[str, int]) -> str:
  return ','.join(f'{k}={v}' for k, v in shape.items())


def maxtext_model(shape: dict[str, int]) -> list[str]:
  """MaxText overrides for the shape (its default LLAMA2 block: gated SiLU, untied head)."""
  return [f'base_num_decoder_layers={shape["layers"]}', f'base_emb_dim={shape["d_model"]}',
          f'base_num_query_heads={shape["heads"]}', f'base_num_kv_heads={shape["kv_heads"]}',
          f'head_dim={shape["head_dim"]}', f'base_mlp_dim={shape["mlp"]}',
          f'vocab_size={shape["vocab"]}', 'dtype=float32', 'weight_dtype=float32',
          f'max_target_length={shape["seq"]}']


def pause_flax_config(shape: dict[str, int]):
  """bench_4l's TransformerConfig with the shape's sizes."""
  from pause_flax.model import transformer
  return transformer.model_config(
      'bench_4l', num_layers=shape['layers'], d_model=shape['d_model'],
      num_heads=shape['heads'], num_kv_heads=shape['kv_heads'], head_dim=shape['head_dim'],
      mlp_dim=shape['mlp'], vocab_size=shape['vocab'], max_len=shape['seq'])


def _maxtext_base_yml(python: str) -> str:
  return subprocess.run(
      [python, '-c', 'import maxtext, os; print(os.path.join(os.path.dirname('
       'maxtext.__file__), "configs", "base.yml"))'],
      check=True, capture_output=True, text=True).stdout.strip()


def _maxtext_env() -> dict[str, str]:
  env = dict(os.environ, DECOUPLE_GCLOUD='TRUE', JAX_PLATFORMS='cpu', JOB_INDEX='0',
             JOB_COMPLETION_INDEX='0', PROCESSES_IN_JOB='1', JAX_PROCESS_COUNT='1',
             JAX_COORDINATOR_ADDRESS='127.0.0.1')
  env.pop('XLA_FLAGS', None)
  return env


def dry_run(args: argparse.Namespace) -> None:
  """Builds both configs for --shape (no training) and prints what each holds."""
  import jax
  from flax import nnx

  from pause_flax.model import transformer
  shape = args.model_shape
  config = pause_flax_config(shape)
  model = nnx.eval_shape(lambda: transformer.Transformer(config, rngs=nnx.Rngs(0)))
  params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  print(f'shape: {shape_arg(shape)}; batch {args.batch}')
  print(f'pause_flax: {config}')
  print(f'pause_flax: {params / 1e6:.2f}M parameter values (padded vocabulary '
        f'{config.padded_vocab_size}), {transformer.flops_per_token(config, shape["seq"]) / 1e6:.1f} '
        'MFLOP/token')
  python = ensure_maxtext(args.cache_dir)
  overrides = maxtext_model(shape)
  code = ('import sys; from maxtext.configs import pyconfig; '
          'c = pyconfig.initialize([""] + sys.argv[1:]); '
          'print({k: getattr(c, k) for k in ("num_decoder_layers", "emb_dim", "num_query_heads", '
          '"num_kv_heads", "head_dim", "mlp_dim", "vocab_size", "max_target_length", '
          '"mlp_activations", "logits_via_embedding", "dtype")})')
  out = subprocess.run([python, '-c', code, _maxtext_base_yml(python), 'run_name=dry_run',
                        'hardware=cpu', 'dataset_type=synthetic', 'enable_checkpointing=false',
                        f'per_device_batch_size={args.batch}', *overrides],
                       env=_maxtext_env(), capture_output=True, text=True)
  if out.returncode:
    sys.stderr.write((out.stdout + out.stderr)[-3000:])
    raise SystemExit(f'MaxText config failed (exit {out.returncode}).')
  print(f'MaxText {MAXTEXT_VERSION}: {" ".join(overrides)}')
  print(f'MaxText {MAXTEXT_VERSION} config: {out.stdout.strip().splitlines()[-1]}')


# ---------------------------------------------------------------------------
# MaxText.


def _find_python312() -> str:
  """A Python >= 3.12 interpreter, from pyenv if there is one."""
  root = os.path.expanduser(os.environ.get('PYENV_ROOT', '~/.pyenv'))
  found = []
  for path in glob.glob(os.path.join(root, 'versions', '*', 'bin', 'python3')):
    m = re.match(r'(\d+)\.(\d+)\.(\d+)$', os.path.basename(os.path.dirname(os.path.dirname(path))))
    if m and (int(m[1]), int(m[2])) >= (3, 12):
      found.append(((int(m[1]), int(m[2]), int(m[3])), path))
  if not found:
    raise SystemExit('MaxText needs Python >= 3.12: install one with pyenv.')
  return min(found)[1]


def ensure_maxtext(cache_dir: str) -> str:
  """The python of a virtual environment that imports maxtext, built if missing."""
  venv = os.path.join(cache_dir, 'maxtext-venv')
  python = os.path.join(venv, 'bin', 'python')
  if os.path.exists(python) and subprocess.run(
      [python, '-c', 'import maxtext'], capture_output=True).returncode == 0:
    return python
  os.makedirs(cache_dir, exist_ok=True)
  if not os.path.exists(python):
    subprocess.run([_find_python312(), '-m', 'venv', venv], check=True)
  wheels = os.path.join(cache_dir, 'wheels')
  subprocess.run([python, '-m', 'pip', 'download', '--no-deps', '-d', wheels,
                  f'maxtext=={MAXTEXT_VERSION}'], check=True)
  wheel = glob.glob(os.path.join(wheels, f'maxtext-{MAXTEXT_VERSION}-*.whl'))[0]
  with zipfile.ZipFile(wheel) as z:
    lines = z.read(REQUIREMENTS).decode().splitlines()
  requirements = os.path.join(cache_dir, 'cpu-requirements.txt')
  with open(requirements, 'w') as f:
    f.writelines(line + '\n' for line in lines
                 if not re.search('cuda|nvidia', line, re.IGNORECASE))
  subprocess.run([python, '-m', 'pip', 'install', '-r', requirements], check=True)
  subprocess.run([python, '-m', 'pip', 'install', '--no-deps', wheel], check=True)
  return python


def run_maxtext(python: str, devices: int, args: argparse.Namespace, run: str) -> float:
  """Tokens/s of one MaxText run: timed steps over the sum of their logged seconds."""
  base_yml = _maxtext_base_yml(python)
  seq = args.model_shape['seq']
  env = _maxtext_env()
  overrides = [f'per_device_batch_size={args.batch // devices}']
  if devices > 1:
    env['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={devices}'
    overrides += [f'ici_data_parallelism={devices}', 'ici_fsdp_parallelism=1']
  steps = args.warmup + args.steps
  cmd = [python, '-m', 'maxtext.trainers.pre_train.train', base_yml, f'run_name={run}',
         f'base_output_directory={os.path.join(args.cache_dir, "out")}', 'hardware=cpu',
         'dataset_type=synthetic', 'enable_checkpointing=false', 'enable_tensorboard=false',
         f'steps={steps}', *maxtext_model(args.model_shape), *overrides]
  out = subprocess.run(cmd, env=env, capture_output=True, text=True)
  seconds = {int(m[1]): float(m[2]) for m in re.finditer(
      r'completed step: (\d+), seconds: ([\d.]+)', out.stdout + out.stderr)}
  timed = [seconds.get(i) for i in range(args.warmup, steps)]
  if out.returncode or None in timed:
    sys.stderr.write((out.stdout + out.stderr)[-5000:])
    raise SystemExit(f'MaxText run failed (exit {out.returncode}).')
  return args.steps * args.batch * seq / sum(timed)


# ---------------------------------------------------------------------------
# pause_flax (a worker process, so that each gets its own device count).


def pause_flax_worker(args: argparse.Namespace) -> None:
  """Prints {"tokens_per_s": ...} for `bench_4l` (or --shape) on a data-parallel mesh."""
  import jax
  import step_timing

  from pause_flax import parallel
  from pause_flax.training import optimizer, trainer

  config = pause_flax_config(args.model_shape)
  seq = args.model_shape['seq']
  mesh = parallel.make_mesh(data=jax.device_count(), fsdp=1, tensor=1)
  options = trainer.StepOptions(loss_chunk_len=args.loss_chunk_len or None)
  step = trainer.Trainer(config, optimizer.make_optimizer(optimizer.make_schedule(1e-4, 10**6)),
                         mesh, options=options)
  (rate,), _ = step_timing.tokens_per_second(step, args.batch, seq, warmup=1 + args.warmup,
                                             steps=args.steps, repeats=1)
  print(json.dumps({'tokens_per_s': rate}))


def _pause_flax_env(xla_flags: str | None) -> dict[str, str]:
  """A CPU environment that imports this checkout's pause_flax (XLA_FLAGS set or dropped)."""
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  env.pop('XLA_FLAGS', None)
  if xla_flags:
    env['XLA_FLAGS'] = xla_flags
  env['PYTHONPATH'] = os.pathsep.join(filter(None, [REPO, env.get('PYTHONPATH')]))
  return env


def run_pause_flax(devices: int, args: argparse.Namespace) -> float:
  env = _pause_flax_env(f'--xla_force_host_platform_device_count={devices}')
  cmd = [args.pause_flax_python, os.path.abspath(__file__), '--worker', f'--devices={devices}',
         f'--steps={args.steps}', f'--warmup={args.warmup}',
         f'--loss_chunk_len={args.loss_chunk_len}', f'--shape={shape_arg(args.model_shape)}',
         f'--batch={args.batch}']
  out = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO)
  if out.returncode:
    sys.stderr.write(out.stderr[-5000:])
    raise SystemExit(f'pause_flax run failed (exit {out.returncode}).')
  return json.loads(out.stdout.strip().splitlines()[-1])['tokens_per_s']


def jax_version(python: str) -> str:
  """jax.__version__ under `python`."""
  return subprocess.run([python, '-c', 'import jax; print(jax.__version__)'], check=True,
                        capture_output=True, text=True).stdout.strip()


def matmul_peak(python: str) -> float:
  """Best f32 square-matmul FLOP/s on this host (a `python` subprocess: one device)."""
  code = ('from pause_flax.training import metrics; '
          'print(max(metrics.measure_matmul_peak(n, repeats=10) for n in (512, 1024, 2048)))')
  out = subprocess.run([python, '-c', code], env=_pause_flax_env(None), capture_output=True,
                       text=True, cwd=REPO, check=True)
  return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
  args = parse_args()
  if args.worker:
    pause_flax_worker(args)
    return
  sys.path.insert(0, REPO)
  if args.dry_run:
    dry_run(args)
    return
  settings = args.settings.split(',')
  python = ensure_maxtext(args.cache_dir) if any(s.startswith('maxtext') for s in settings) \
      else None
  from pause_flax.model import transformer
  flops = transformer.flops_per_token(pause_flax_config(args.model_shape),
                                      args.model_shape['seq'])
  rates: dict[str, list[float]] = {s: [] for s in settings}
  peaks, loads = [matmul_peak(args.pause_flax_python)], []
  for r in range(args.rounds):
    for setting in settings[r % len(settings):] + settings[:r % len(settings)]:
      framework, devices = setting.split(':')
      loads.append(os.getloadavg()[0])
      rate = (run_maxtext(python, int(devices), args, f'bench_{r}_{devices}')
              if framework == 'maxtext' else run_pause_flax(int(devices), args))
      rates[setting].append(rate)
      print(f'round {r}: {setting} {rate:,.0f} tokens/s (load {loads[-1]:.1f})', flush=True)
    peaks.append(matmul_peak(args.pause_flax_python))
  peak = max(peaks)
  print(f'\n{os.cpu_count()} CPUs, load average {min(loads):.1f}-{max(loads):.1f} during runs; '
        f'f32 matmul peak {peak / 1e9:.0f} GFLOP/s (measurements '
        + ', '.join(f'{p / 1e9:.0f}' for p in peaks) + f'); {flops / 1e6:.1f} MFLOP/token; '
        f'{args.rounds} rounds x {args.steps} steps; shape {shape_arg(args.model_shape)}, '
        f'batch {args.batch}')
  print(f'jax: pause_flax {jax_version(args.pause_flax_python)}'
        + (f', MaxText {jax_version(python)}' if python else ''))
  print('| framework | devices | tokens/s (median) | min-max | MFU |')
  print('| --- | ---: | ---: | ---: | ---: |')
  median = {s: statistics.median(v) for s, v in rates.items()}
  for s, v in rates.items():
    framework, devices = s.split(':')
    print(f'| {framework} | {devices} | {median[s]:,.0f} | {min(v):,.0f}-{max(v):,.0f} | '
          f'{100 * flops * median[s] / peak:.0f}% |')
  best = {f: max((m for s, m in median.items() if s.startswith(f)), default=None)
          for f in ('pause_flax', 'maxtext')}
  if None not in best.values():
    print(f'\npause_flax best / MaxText best: {best["pause_flax"] / best["maxtext"]:.2f}x')
    for r in range(args.rounds):
      round_best = {f: max(v[r] for s, v in rates.items() if s.startswith(f)) for f in best}
      print(f'round {r}: {round_best["pause_flax"] / round_best["maxtext"]:.2f}x')


if __name__ == '__main__':
  main()
