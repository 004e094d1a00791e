"""Model hyper-parameters: `TransformerConfig`, the named shapes, parameter and FLOP counts.

The model reads nothing but a `TransformerConfig`. `model_config` builds one of
the named shapes ('tiny', 'paper_130m', 'paper_1b', 'bench_4l') with overrides;
gin files bind it as `pause_flax.model.transformer.model_config`, its name from
before this module existed.
"""

from __future__ import annotations

import dataclasses

import gin
import jax.numpy as jnp

MLP_ACTIVATIONS = ("gelu", "silu", "relu")
REMAT_POLICIES = ("none", "full", "dots")
# Backend-specific kernels (pause_flax.model.kernels): 'auto' is resolved from
# the platform of the mesh the step runs on.
KERNELS = ("auto", "xla", "cpu", "tpu")
ATTENTION_IMPLS = ("auto", "xla", "cudnn", "blocked", "splash")
# How the model knows positions: rotary q/k ('rope'), a learned absolute
# embedding added to the token embedding ('learned'), or both.
POSITIONS = ("rope", "learned", "both")


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
  """Hyper-parameters of the decoder; the model reads nothing else."""
  vocab_size: int  # true vocabulary size incl. the pause id
  num_layers: int
  d_model: int
  num_heads: int
  mlp_dim: int
  head_dim: int | None = None  # default d_model // num_heads
  num_kv_heads: int | None = None  # default num_heads; fewer = grouped-query
  mlp_activation: str = "gelu"  # 'gelu' | 'silu' | 'relu'
  gated_mlp: bool = False
  tie_embeddings: bool = False
  max_len: int = 2048
  rope_theta: float = 10000.0
  norm_eps: float = 1e-6
  dtype: str = "float32"  # compute dtype
  param_dtype: str = "float32"
  remat_policy: str = "none"  # 'none' | 'full' | 'dots'
  # Layers the layer scan unrolls per iteration (True: all). Unrolled, the
  # backward pass reads each layer's saved activations in place instead of
  # slicing them out of the stacked scan outputs; compile time grows with it.
  scan_unroll: int | bool = 1
  vocab_pad_multiple: int = 128
  # Backend-specific kernels: 'xla' (the plain layers), 'cpu' (XLA:CPU
  # variants of attention, MLP, embedding gradient and fused-loss layout; same
  # values), 'tpu' (splash attention), or 'auto': 'cpu' on a CPU mesh, 'tpu' on
  # a TPU mesh, else 'xla' (`kernels.resolve`,
  # once, for the mesh the model runs on). The parameters are the same either way.
  kernels: str = "auto"
  # Attention of the full-sequence (no cache) forward: 'xla' or 'cudnn'
  # (jax.nn.dot_product_attention's; cudnn is flash attention on NVIDIA GPUs,
  # bf16/fp16, head_dim <= 128, even lengths), 'blocked' (query blocks that
  # skip the keys after them, `kernels.cpu.blocked_causal_attention`),
  # 'splash' (the Pallas TPU kernel, `kernels.tpu.splash_attention`; lengths
  # that are multiples of 128, else xla; interpreted off a TPU), or 'auto':
  # blocked with kernels='cpu', splash with kernels='tpu', cudnn on a GPU mesh
  # where it applies, else xla. Cached decoding always uses 'xla'.
  attention_impl: str = "auto"
  # 'rope' (the default; parameters as before), 'learned' (a [max_len, D]
  # absolute embedding indexed by the absolute position, no rotary) or 'both'.
  positions: str = "rope"

  def __post_init__(self):
    for name in ("vocab_size", "num_layers", "d_model", "num_heads", "mlp_dim",
                 "max_len", "vocab_pad_multiple"):
      if getattr(self, name) < 1:
        raise ValueError(f"TransformerConfig.{name}={getattr(self, name)} must be >= 1.")
    if self.head_dim is None and self.d_model % self.num_heads:
      raise ValueError(
          f"d_model={self.d_model} is not divisible by num_heads={self.num_heads}; "
          "set head_dim explicitly.")
    if self.resolved_head_dim % 2:
      raise ValueError(f"head_dim={self.resolved_head_dim} must be even for rotary positions.")
    if self.num_heads % self.resolved_kv_heads:
      raise ValueError(
          f"num_heads={self.num_heads} must be a multiple of "
          f"num_kv_heads={self.resolved_kv_heads}.")
    if self.mlp_activation not in MLP_ACTIVATIONS:
      raise ValueError(
          f"mlp_activation={self.mlp_activation!r}; choose from {sorted(MLP_ACTIVATIONS)}.")
    if self.remat_policy not in REMAT_POLICIES:
      raise ValueError(
          f"remat_policy={self.remat_policy!r}; choose from 'none', 'full', 'dots'.")
    if not isinstance(self.scan_unroll, bool) and (
        not isinstance(self.scan_unroll, int) or self.scan_unroll < 1):
      raise ValueError(f"scan_unroll={self.scan_unroll!r} must be True, False or an int >= 1.")
    if self.kernels not in KERNELS:
      raise ValueError(f"kernels={self.kernels!r}; choose one of {KERNELS}.")
    if self.attention_impl not in ATTENTION_IMPLS:
      raise ValueError(
          f"attention_impl={self.attention_impl!r}; choose one of {ATTENTION_IMPLS}.")
    if self.positions not in POSITIONS:
      raise ValueError(f"positions={self.positions!r}; choose one of {POSITIONS}.")
    for name in ("dtype", "param_dtype"):
      try:
        jnp.dtype(getattr(self, name))
      except TypeError as e:
        raise ValueError(f"TransformerConfig.{name}={getattr(self, name)!r} is not a dtype.") from e

  @property
  def resolved_head_dim(self) -> int:
    return self.head_dim if self.head_dim is not None else self.d_model // self.num_heads

  @property
  def resolved_kv_heads(self) -> int:
    return self.num_kv_heads if self.num_kv_heads is not None else self.num_heads

  @property
  def padded_vocab_size(self) -> int:
    m = self.vocab_pad_multiple
    return -(-self.vocab_size // m) * m


_MODEL_CONFIGS: dict[str, dict] = {
    # CPU seconds: tests and smoke runs.
    "tiny": dict(vocab_size=300, num_layers=2, d_model=64, num_heads=4, mlp_dim=128,
                 max_len=256),
    # The paper's models (~32k vocabulary, untied: ~136M and ~1.34B parameters).
    "paper_130m": dict(vocab_size=32000, num_layers=12, d_model=768, num_heads=12,
                       mlp_dim=3072, dtype="bfloat16"),
    "paper_1b": dict(vocab_size=32000, num_layers=24, d_model=2048, num_heads=32,
                     mlp_dim=8192, dtype="bfloat16"),
    # Throughput benchmarks.
    "bench_4l": dict(vocab_size=32000, num_layers=4, d_model=256, num_heads=4,
                     head_dim=64, mlp_dim=1024, mlp_activation="silu", gated_mlp=True,
                     scan_unroll=True),
}


# Registered under its gin name from before the move, which gin files and
# --gin.pause_flax.model.transformer.model_config.* flags use.
@gin.configurable(module="pause_flax.model.transformer")
def model_config(name: str, **overrides) -> TransformerConfig:
  """A named config ('tiny', 'paper_130m', 'paper_1b', 'bench_4l') with overrides."""
  if name not in _MODEL_CONFIGS:
    raise ValueError(f"Unknown model config {name!r}; choose from {sorted(_MODEL_CONFIGS)}.")
  return TransformerConfig(**{**_MODEL_CONFIGS[name], **overrides})


def num_params(config: TransformerConfig, include_padding: bool = False) -> int:
  """Parameter count (no biases anywhere).

    embedding  V * D                 (+ V * D for an untied output head)
    per layer  D * H * (N + 2K)      q, k, v projections
               N * H * D             attention output
               D * F * (1 + gated)   MLP in (and gate)
               F * D                 MLP out
               2 * D                 two RMSNorm scales
    final      D                     final RMSNorm scale

  V is the true vocabulary, or the padded one with `include_padding` (the
  padded rows exist as arrays but are never used).
  """
  c = config
  v = c.padded_vocab_size if include_padding else c.vocab_size
  d, h, n, k, f = c.d_model, c.resolved_head_dim, c.num_heads, c.resolved_kv_heads, c.mlp_dim
  per_layer = d * h * (n + 2 * k) + n * h * d + d * f * (2 if c.gated_mlp else 1) + f * d + 2 * d
  embed = v * d * (1 if c.tie_embeddings else 2)
  return embed + c.num_layers * per_layer + d


def flops_per_token(config: TransformerConfig, seq_len: int) -> float:
  """Training FLOPs per token (forward + backward), PaLM appendix B style.

    6 * N_matmul + 12 * num_layers * num_heads * head_dim * seq_len

  N_matmul counts the weights that take part in a matmul: the layers' q, k, v,
  output and MLP matrices plus the output projection (D * padded V, computed
  whether tied or not); the embedding lookup and norms are excluded. The second
  term is the attention scores and weighted values (QK^T and AV, 2 FLOPs per
  multiply-add, x3 for forward + backward), counted over the full sequence as
  PaLM does (no causal halving). Rematerialisation is not counted (model FLOPs,
  not hardware FLOPs), as MFU requires.
  """
  c = config
  d, h, n, k, f = c.d_model, c.resolved_head_dim, c.num_heads, c.resolved_kv_heads, c.mlp_dim
  per_layer = d * h * (n + 2 * k) + n * h * d + d * f * (2 if c.gated_mlp else 1) + f * d
  n_matmul = c.num_layers * per_layer + d * c.padded_vocab_size
  return 6.0 * n_matmul + 12.0 * c.num_layers * n * h * seq_len
