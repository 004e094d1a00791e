"""Compile-only memory check: will the train step fit a pod slice?

Compiles `Trainer.train_step` for a target mesh on simulated CPU devices
(`--xla_force_host_platform_device_count`) without allocating or running
anything, and prints XLA's per-device memory analysis beside an analytic
estimate, so a pod slice can be chosen before paying for it:

  python -m pause_flax.memory_check --model=paper_1b --devices=8 \
      --mesh=data=1,fsdp=8,tensor=1 --batch_size=16 --seq_len=2048 \
      --remat=dots --dtype=bfloat16 --device_memory_gib=32 [--accum_steps=N] \
      [--kernels=xla] [--json=out.json]

The program compiled is the accelerator's: `--kernels=xla` (the default) sets
TransformerConfig.kernels='xla', so none of the XLA:CPU-only kernels that
'auto' would pick on these CPU devices (pause_flax/model/kernels/cpu.py) is
in it; `--kernels=auto` or `cpu` sizes a CPU run instead. `--kernels=tpu`
is a TPU target's setting, but its splash attention is a Pallas TPU kernel
that cannot compile for CPU devices (only run interpreted, whose memory says
nothing about a TPU's), so the check compiles XLA's attention in its place
and says so: the attention scores it sizes ([B, N, L, L] per layer) are an
upper bound for splash, which keeps per-tile scores and per-row residuals.

XLA (per device, from `compiled.memory_analysis()`): arguments (the state and
the batch shard), outputs, aliased bytes (the donated state reused for the new
state), temporaries (activations, gradients, gathered weights, ...) and
generated code; total = arguments + outputs - aliased + temporaries + code.
CPU fusion and scheduling differ from TPU/GPU, so treat it as an estimate of
the accelerator's figure (good for the state, rougher for temporaries).

Analytic estimate (bytes per device). P = num_params with the padded
vocabulary, p = param-dtype bytes, a = compute-dtype bytes, T = tensor,
S = fsdp * T, b = batch / (accum * data * fsdp) sequences per micro-batch,
L = seq_len, Y layers, D d_model, N heads, K kv heads, H head dim, F mlp dim
(g = 1 if gated), V padded vocabulary:

  params       p * P / S
  optimizer    2 * p * P / S                 AdamW mu and nu, sharded as params
  gradients    p * P / S                     (x2 with accum_steps > 1: accumulator)
  working      one layer's weights, all-gathered over fsdp (split by T), in
               the compute dtype for forward and backward and its gradient
               before the reduce-scatter, plus the embedding and head:
               (2a + p) * P_layer / T + (a + p) * P_embed / T
  activations  b * L * (Y * A + 12 * V / T)
      A (saved per token per layer, by remat policy):
        full   a * D                                    the layer input
        dots   a * (3D + (N + 2K) H / T + (1 + g) F / T) input, q/k/v, attention
               and MLP projections (dot outputs without batch dimensions)
        none   dots + a * (2D + (2N + K) H / T + (1 + g) F / T)  norm, rotary,
               attention and MLP activation outputs
                    + 4 * (2D + (N + K) H / T)   f32 norm/rotary intermediates
                    + (9 + a) * N * L / T        f32 scores and softmax, probs
                                                 (a) and the boolean mask
      12 * V / T: f32 logits, softmax and logit gradient (outside the remat).
  attention    b * (9 + a) * N / T * L^2     one layer's scores while it runs (or
               is recomputed): f32 scores and their gradient, probs, mask
  batch        3 features * 4 bytes * batch * L / (data * fsdp)

The estimate's state (params + optimizer + batch) is compared with XLA's
arguments, the rest (gradients + working + activations + attention) with its
temporaries.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
from typing import Any

GIB = 2**30
_COUNT_FLAG = "--xla_force_host_platform_device_count"
_FEATURES = ("decoder_input_tokens", "decoder_target_tokens", "decoder_loss_weights")


def parse_mesh(text: str) -> dict[str, int]:
  """'data=1,fsdp=8,tensor=1' -> sizes; omitted axes: data=1, fsdp=-1, tensor=1."""
  sizes = {"data": 1, "fsdp": -1, "tensor": 1}
  for part in filter(None, text.split(",")):
    name, _, value = part.partition("=")
    if name not in sizes or not re.fullmatch(r"-?\d+", value):
      raise ValueError(f"--mesh part {part!r}: expected AXIS=INT with AXIS in data, fsdp, tensor.")
    sizes[name] = int(value)
  return sizes


def cpu_env(devices: int, env: dict[str, str]) -> dict[str, str]:
  """`env` with JAX on CPU and `devices` simulated host devices."""
  flags = re.sub(rf"{_COUNT_FLAG}=\S+", "", env.get("XLA_FLAGS", "")).split()
  return {**env, "JAX_PLATFORMS": "cpu",
          "XLA_FLAGS": " ".join([*flags, f"{_COUNT_FLAG}={devices}"])}


def ensure_cpu_devices(devices: int, argv: list[str]) -> None:
  """Sets the CPU environment before jax loads; re-executes if jax already has."""
  env = cpu_env(devices, dict(os.environ))
  if all(os.environ.get(k) == env[k] for k in ("JAX_PLATFORMS", "XLA_FLAGS")):
    return
  if "jax" in sys.modules:
    os.execve(sys.executable, [sys.executable, "-m", "pause_flax.memory_check", *argv], env)
  os.environ.update(env)


@dataclasses.dataclass(frozen=True)
class Estimate:
  """Analytic bytes per device (see the module docstring)."""
  params: float
  optimizer: float
  gradients: float
  working: float
  activations: float
  attention: float
  batch: float

  @property
  def state(self) -> float:
    return self.params + self.optimizer + self.batch

  @property
  def temporaries(self) -> float:
    return self.gradients + self.working + self.activations + self.attention

  @property
  def total(self) -> float:
    return self.state + self.temporaries


def activation_bytes_per_token(config, tensor: int) -> float:
  """A: bytes saved per token per layer for the backward pass, by remat policy."""
  c = config
  a = _itemsize(c.dtype)
  d, n, k, h, f = c.d_model, c.num_heads, c.resolved_kv_heads, c.resolved_head_dim, c.mlp_dim
  mlp = (2 if c.gated_mlp else 1) * f / tensor
  if c.remat_policy == "full":
    return a * d
  dots = a * (3 * d + (n + 2 * k) * h / tensor + mlp)
  if c.remat_policy == "dots":
    return dots
  return (dots + a * (2 * d + (2 * n + k) * h / tensor + mlp)
          + 4 * (2 * d + (n + k) * h / tensor) + (9 + a) * n * c.max_len / tensor)


def analytic_estimate(config, mesh_shape: dict[str, int], batch_size: int, seq_len: int,
                      accum_steps: int = 1) -> Estimate:
  """Per-device bytes of the train step (formula in the module docstring)."""
  from pause_flax.model import transformer

  c = dataclasses.replace(config, max_len=seq_len)
  data, fsdp, tensor = mesh_shape["data"], mesh_shape["fsdp"], mesh_shape["tensor"]
  p, a = _itemsize(c.param_dtype), _itemsize(c.dtype)
  total = transformer.num_params(c, include_padding=True)
  embed = c.padded_vocab_size * c.d_model * (1 if c.tie_embeddings else 2)
  layer = (total - embed - c.d_model) / c.num_layers
  shards = fsdp * tensor
  micro = batch_size / (accum_steps * data * fsdp)
  tokens = batch_size * seq_len / (data * fsdp)
  return Estimate(
      params=p * total / shards,
      optimizer=2 * p * total / shards,
      gradients=p * total / shards * (2 if accum_steps > 1 else 1),
      working=((2 * a + p) * layer + (a + p) * embed) / tensor,
      activations=micro * seq_len * (c.num_layers * activation_bytes_per_token(c, tensor)
                                     + 12 * c.padded_vocab_size / tensor),
      attention=micro * (9 + a) * c.num_heads / tensor * seq_len**2,
      batch=len(_FEATURES) * 4 * tokens)


def _itemsize(dtype: str) -> int:
  import numpy as np
  import jax.numpy as jnp
  return np.dtype(jnp.dtype(dtype)).itemsize


def lower_step(trainer, batch_size: int, seq_len: int):
  """The train step lowered on abstract, sharded inputs (nothing allocated or run)."""
  import jax
  import jax.numpy as jnp

  state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                       trainer.abstract_state, trainer.state_shardings)
  batch = {k: jax.ShapeDtypeStruct(
      (batch_size, seq_len), jnp.float32 if k == "decoder_loss_weights" else jnp.int32,
      sharding=trainer.batch_sharding) for k in _FEATURES}
  return trainer.train_step.lower(state, batch)


def compile_step(trainer, batch_size: int, seq_len: int):
  """The train step compiled for the trainer's mesh (XLA's memory analysis is on it)."""
  return lower_step(trainer, batch_size, seq_len).compile()


def xla_memory(trainer, batch_size: int, seq_len: int) -> dict[str, int]:
  """Compiles the train step; XLA's per-device bytes."""
  stats = compile_step(trainer, batch_size, seq_len).memory_analysis()
  out = {k: int(getattr(stats, f"{k}_size_in_bytes"))
         for k in ("argument", "output", "alias", "temp", "generated_code")}
  out["total"] = out["argument"] + out["output"] - out["alias"] + out["temp"] + \
      out["generated_code"]
  return out


def make_trainer(model: str, mesh_sizes: dict[str, int], batch_size: int, seq_len: int,
                 remat: str = "dots", dtype: str = "bfloat16", accum_steps: int = 1,
                 kernels: str = "xla"):
  """The Trainer whose step the check compiles, over all jax devices."""
  from pause_flax import parallel
  from pause_flax.model import transformer
  from pause_flax.training import optimizer, trainer as trainer_lib

  mesh = parallel.make_mesh(**mesh_sizes)
  split = accum_steps * parallel.data_parallel_size(mesh)
  if batch_size % split:
    raise ValueError(f"batch_size={batch_size} must be a multiple of accum_steps x "
                     f"data x fsdp = {split}.")
  # Splash (kernels='tpu') cannot compile for these CPU devices: XLA's attention stands in.
  attention = "xla" if kernels == "tpu" else "auto"
  config = transformer.model_config(model, dtype=dtype, remat_policy=remat, max_len=seq_len,
                                    kernels=kernels, attention_impl=attention)
  return trainer_lib.Trainer(config, optimizer.make_optimizer(1e-4), mesh,
                             options=trainer_lib.StepOptions(accum_steps=accum_steps))


def check(model: str, mesh_sizes: dict[str, int], batch_size: int, seq_len: int,
          remat: str = "dots", dtype: str = "bfloat16", accum_steps: int = 1,
          kernels: str = "xla") -> dict[str, Any]:
  """Compiles the step for the mesh over all jax devices; the report as a dict."""
  import jax

  from pause_flax.model import transformer

  trainer = make_trainer(model, mesh_sizes, batch_size, seq_len, remat, dtype, accum_steps,
                         kernels)
  config = trainer.model_config  # kernels resolved for the (CPU) mesh
  shape = dict(trainer.mesh.shape)
  return dict(model=model, mesh=shape, devices=jax.device_count(), batch_size=batch_size,
              seq_len=seq_len, remat=remat, dtype=dtype, accum_steps=accum_steps,
              kernels=config.kernels, attention_impl=config.attention_impl,
              num_params=transformer.num_params(config),
              estimate=dataclasses.asdict(
                  analytic_estimate(config, shape, batch_size, seq_len, accum_steps)),
              xla=xla_memory(trainer, batch_size, seq_len))


def format_report(report: dict[str, Any], device_memory_gib: float | None = None) -> str:
  """A markdown table of the report, and the fit verdict given a device size."""
  est, xla = Estimate(**report["estimate"]), report["xla"]
  unit, scale = ("GiB", GIB) if xla["total"] >= GIB else ("MiB", 2**20)
  fmt = lambda x: f"{x / scale:.2f}"
  ratio = lambda e, x: f"{e / x:.2f}" if x else "-"
  mesh = " x ".join(f"{k}={v}" for k, v in report["mesh"].items())
  lines = [
      f"{report['model']} ({report['num_params'] / 1e6:.1f}M params), mesh {mesh} "
      f"({report['devices']} devices), batch {report['batch_size']} x {report['seq_len']}, "
      f"remat {report['remat']}, {report['dtype']}, accum_steps {report['accum_steps']}",
      f"kernels {report['kernels']} (attention {report['attention_impl']}): "
      + {"xla": "the accelerator's program, compiled on simulated CPU devices",
         "tpu": "the TPU program with XLA's attention in place of splash (a Pallas TPU "
                "kernel does not compile for CPU devices): the attention rows are an upper "
                "bound for splash, which keeps per-tile scores"}.get(
                    report["kernels"], "a CPU run's program"),
      "",
      f"| per device ({unit}) | estimate | XLA | estimate / XLA |",
      "| --- | ---: | ---: | ---: |",
      f"| params | {fmt(est.params)} | | |",
      f"| optimizer state | {fmt(est.optimizer)} | | |",
      f"| batch | {fmt(est.batch)} | | |",
      f"| state = arguments | {fmt(est.state)} | {fmt(xla['argument'])} | "
      f"{ratio(est.state, xla['argument'])} |",
      f"| gradients | {fmt(est.gradients)} | | |",
      f"| working weights | {fmt(est.working)} | | |",
      f"| activations | {fmt(est.activations)} | | |",
      f"| attention scores (one layer) | {fmt(est.attention)} | | |",
      f"| temporaries | {fmt(est.temporaries)} | {fmt(xla['temp'])} | "
      f"{ratio(est.temporaries, xla['temp'])} |",
      f"| outputs (aliased) | | {fmt(xla['output'])} ({fmt(xla['alias'])}) | |",
      f"| generated code | | {fmt(xla['generated_code'])} | |",
      f"| **total** | **{fmt(est.total)}** | **{fmt(xla['total'])}** | "
      f"{ratio(est.total, xla['total'])} |",
  ]
  if device_memory_gib:
    need = max(est.total, xla["total"]) / GIB
    headroom = device_memory_gib - need
    verdict = "FITS" if headroom >= 0 else "DOES NOT FIT"
    lines += ["", f"{verdict} in {device_memory_gib:g} GiB per device: needs {need:.2f} GiB "
              f"(the larger of estimate and XLA), headroom {headroom:.2f} GiB "
              f"({100 * headroom / device_memory_gib:.0f}%)."]
  return "\n".join(lines)


def parse_args(argv: list[str]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(prog="python -m pause_flax.memory_check",
                                   description=__doc__.splitlines()[0])
  parser.add_argument("--model", default="paper_1b", help="name for transformer.model_config")
  parser.add_argument("--devices", type=int, default=8, help="simulated CPU devices")
  parser.add_argument("--mesh", default="data=1,fsdp=-1,tensor=1",
                      help="AXIS=SIZE,... over data, fsdp, tensor (-1: the rest)")
  parser.add_argument("--batch_size", type=int, default=16, help="global batch (sequences)")
  parser.add_argument("--seq_len", type=int, default=2048)
  parser.add_argument("--remat", default="dots", choices=("none", "dots", "full"))
  parser.add_argument("--dtype", default="bfloat16", help="compute dtype")
  parser.add_argument("--accum_steps", type=int, default=1)
  parser.add_argument("--kernels", default="xla", choices=("xla", "tpu", "cpu", "auto"),
                      help="TransformerConfig.kernels: xla (the accelerator's program), tpu "
                           "(a TPU target's, XLA's attention standing in for splash), or the "
                           "CPU kernels ('auto' resolves to cpu on these devices)")
  parser.add_argument("--device_memory_gib", type=float, default=None,
                      help="accelerator memory per device, for a FITS / DOES NOT FIT verdict")
  parser.add_argument("--json", default=None, help="also write the report here")
  return parser.parse_args(argv)


def _refuse(error: Exception) -> None:
  """Bad input: one line, exit 2 (like the other CLIs; argparse's own errors exit 2 too)."""
  print(f"pause_flax.memory_check: {' '.join(str(error).split())}", file=sys.stderr)
  sys.exit(2)


def main(argv: list[str] | None = None) -> None:
  argv = sys.argv[1:] if argv is None else argv
  args = parse_args(argv)
  try:
    mesh_sizes = parse_mesh(args.mesh)
  except ValueError as e:
    _refuse(e)
  ensure_cpu_devices(args.devices, argv)
  from pause_flax import parallel
  try:
    parallel.resolve_mesh_shape(**mesh_sizes, num_devices=args.devices)
    report = check(args.model, mesh_sizes, args.batch_size, args.seq_len, args.remat,
                   args.dtype, args.accum_steps, args.kernels)
  except ValueError as e:
    _refuse(e)
  print(format_report(report, args.device_memory_gib))
  if args.json:
    with open(args.json, "w") as f:
      json.dump({**report, "device_memory_gib": args.device_memory_gib}, f, indent=2)


if __name__ == "__main__":
  main()
