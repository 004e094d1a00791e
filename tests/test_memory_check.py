"""Compile-only memory check: analytic estimate, CLI report, mesh errors."""

import dataclasses
import json
import os
import pathlib
import re
import subprocess
import sys

import pytest

from pause_flax import memory_check
from pause_flax.model import transformer
from pause_flax.model.kernels import cpu as cpu_kernels

REPO = pathlib.Path(__file__).resolve().parents[1]


def run_cli(code: str) -> subprocess.CompletedProcess:
  """Runs `code` in a fresh python whose environment has the wrong device count."""
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
  return subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=600)


def test_parse_mesh_and_env():
  assert memory_check.parse_mesh("fsdp=8") == {"data": 1, "fsdp": 8, "tensor": 1}
  with pytest.raises(ValueError, match="AXIS=INT"):
    memory_check.parse_mesh("model=2")
  flags = "--xla_foo --xla_force_host_platform_device_count=8"
  env = memory_check.cpu_env(32, {"XLA_FLAGS": flags})
  assert env["XLA_FLAGS"] == "--xla_foo --xla_force_host_platform_device_count=32"
  assert env["JAX_PLATFORMS"] == "cpu"


@pytest.mark.parametrize("remat", ["none", "dots", "full"])
def test_analytic_estimate(remat):
  config = transformer.model_config("tiny", remat_policy=remat)
  mesh = {"data": 2, "fsdp": 2, "tensor": 2}
  est = memory_check.analytic_estimate(config, mesh, batch_size=8, seq_len=64)
  assert est.params == transformer.num_params(config, include_padding=True) * 4 / 4
  assert est.optimizer == 2 * est.params
  assert min(dataclasses.astuple(est)) > 0
  accum = memory_check.analytic_estimate(config, mesh, batch_size=8, seq_len=64, accum_steps=2)
  assert accum.gradients == 2 * est.gradients
  assert accum.activations == pytest.approx(est.activations / 2)


def test_remat_policies_order():
  sizes = {p: memory_check.activation_bytes_per_token(
      transformer.model_config("paper_1b", remat_policy=p), tensor=1)
      for p in ("none", "dots", "full")}
  assert sizes["none"] > sizes["dots"] > sizes["full"] > 0


def test_cli_report(tmp_path):
  """jax already imported with 2 devices: the CLI re-executes itself with 4."""
  out = tmp_path / "report.json"
  args = ["--model=tiny", "--devices=4", "--mesh=data=1,fsdp=4,tensor=1", "--batch_size=8",
          "--seq_len=32", "--remat=dots", "--dtype=float32", "--device_memory_gib=1",
          f"--json={out}"]
  proc = run_cli(f"import jax; from pause_flax import memory_check; "
                 f"memory_check.main({args!r})")
  assert proc.returncode == 0, proc.stderr
  assert "| **total** |" in proc.stdout and "FITS in 1 GiB" in proc.stdout
  assert "kernels xla (attention xla): the accelerator's program" in proc.stdout
  report = json.loads(out.read_text())
  assert (report["kernels"], report["attention_impl"]) == ("xla", "xla")
  assert report["devices"] == 4 and report["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1}
  est, xla = report["estimate"], report["xla"]
  assert all(v > 0 for v in est.values())
  assert all(xla[k] > 0 for k in ("argument", "output", "temp", "total"))
  config = transformer.model_config("tiny")
  assert est["params"] == transformer.num_params(config, include_padding=True) * 4 / 4
  state = est["params"] + est["optimizer"]
  assert 0.9 * state <= xla["argument"] <= 1.5 * state


def test_cli_mesh_mismatch():
  proc = run_cli("from pause_flax import memory_check; memory_check.main("
                 "['--model=tiny', '--devices=4', '--mesh=data=1,fsdp=8,tensor=1'])")
  assert proc.returncode == 2
  (line,) = [l for l in proc.stderr.splitlines() if l.startswith("pause_flax.memory_check:")]
  assert "8 devices, but 4 devices are available" in line
  assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("kernels", ["xla", "cpu"])
def test_compiled_program_is_the_accelerators_by_default(kernels):
  """The default (--kernels=xla) compiles the accelerator's program on these CPU
  devices: no CPU-only kernel (all run under cpu.SCOPE) and no optimization
  barrier (the CPU MLP's) in it; kernels='cpu' shows both, so the check can fail."""
  assert memory_check.parse_args([]).kernels == "xla"
  trainer = memory_check.make_trainer("tiny", {"data": 1, "fsdp": -1, "tensor": 1},
                                      batch_size=8, seq_len=256, dtype="float32",
                                      kernels=kernels)
  config = trainer.model_config
  assert (config.kernels, config.attention_impl) == (
      ("xla", "xla") if kernels == "xla" else ("cpu", "blocked"))
  lowered = memory_check.lower_step(trainer, batch_size=8, seq_len=256)
  has_barrier = "optimization_barrier" in lowered.as_text()
  # An op's name carries its named scopes (the HLO's frame table also names
  # source files and functions, so match op names only).
  op_scope = re.compile(r'op_name="[^"]*\b' + cpu_kernels.SCOPE + '/')
  has_cpu_kernels = bool(op_scope.search(lowered.compile().as_text()))
  assert has_barrier == has_cpu_kernels == (kernels == "cpu")


def test_tpu_target_compiles_xla_attention_in_place_of_splash():
  """--kernels=tpu sizes a TPU target's program; splash (a Pallas TPU kernel) cannot
  compile for CPU devices, so XLA's attention stands in, and the report says so."""
  from pause_flax.model.kernels import tpu as tpu_kernels
  assert memory_check.parse_args(["--kernels=tpu"]).kernels == "tpu"
  trainer = memory_check.make_trainer("tiny", {"data": 1, "fsdp": -1, "tensor": 1},
                                      batch_size=8, seq_len=256, dtype="float32",
                                      kernels="tpu")
  config = trainer.model_config
  assert (config.kernels, config.attention_impl) == ("tpu", "xla")
  compiled = memory_check.lower_step(trainer, batch_size=8, seq_len=256).compile().as_text()
  assert tpu_kernels.SCOPE not in compiled and cpu_kernels.SCOPE not in compiled
  report = {"model": "tiny", "num_params": 1, "mesh": {"fsdp": 1}, "devices": 1,
            "batch_size": 8, "seq_len": 256, "remat": "dots", "dtype": "float32",
            "accum_steps": 1, "kernels": "tpu", "attention_impl": "xla",
            "estimate": {k: 1.0 for k in ("params", "optimizer", "batch", "gradients",
                                          "working", "activations", "attention")},
            "xla": {k: 1.0 for k in ("argument", "output", "alias", "temp",
                                     "generated_code", "total")}}
  text = memory_check.format_report(report)
  assert "kernels tpu (attention xla): the TPU program with XLA's attention" in text
