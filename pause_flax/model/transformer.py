"""Decoder-only Transformer in Flax NNX. Pause-agnostic: it sees token ids only.

Architecture: token embedding -> num_layers x [pre-RMSNorm causal self-attention
with rotary positions (grouped-query when num_kv_heads < num_heads), pre-RMSNorm
MLP (GELU/SiLU/ReLU, optionally gated)] -> final RMSNorm -> output projection
(tied to the embedding or untied) over the vocabulary padded to a multiple of
`vocab_pad_multiple`; the padded columns get a large negative logit. No biases.

Layers are stacked (`nnx.vmap` at init, `nnx.scan` at apply), so every block
parameter has a leading `layers` axis and the step compiles one layer, not 24.

Initialisation (GPT-2 style): every weight matrix, embedding and output head
normal(0.02); the residual output projections (attention out, MLP out)
normal(0.02 / sqrt(2 * num_layers)); RMSNorm scales ones.

Shape suffixes: B batch, L query length, S key length (= L, or the cache
length when decoding), D d_model, N query heads, K key/value heads, H head
dim, F MLP dim, V padded vocabulary, Y layers.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable

import gin
import jax
import jax.numpy as jnp
from flax import nnx

from pause_flax.parallel import constrain

# Logit of the padded vocabulary columns: finite, so 0 * log_softmax stays 0.
PAD_LOGIT = -1e9
ATTENTION_IMPLS = ('auto', 'xla', 'cudnn', 'blocked')

_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    'gelu': jax.nn.gelu,
    'silu': jax.nn.silu,
    'relu': jax.nn.relu,
}
_REMAT_POLICIES = {
    'full': None,  # save nothing, recompute the whole layer
    # Save projection/MLP matmul outputs, recompute attention scores.
    'dots': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


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
  mlp_activation: str = 'gelu'  # 'gelu' | 'silu' | 'relu'
  gated_mlp: bool = False
  tie_embeddings: bool = False
  max_len: int = 2048
  rope_theta: float = 10000.0
  norm_eps: float = 1e-6
  dtype: str = 'float32'  # compute dtype
  param_dtype: str = 'float32'
  remat_policy: str = 'none'  # 'none' | 'full' | 'dots'
  # Layers the layer scan unrolls per iteration (True: all). Unrolled, the
  # backward pass reads each layer's saved activations in place instead of
  # slicing them out of the stacked scan outputs; compile time grows with it.
  scan_unroll: int | bool = 1
  vocab_pad_multiple: int = 128
  # Attention of the full-sequence (no cache) forward: 'xla' or 'cudnn'
  # (jax.nn.dot_product_attention's; cudnn is flash attention on NVIDIA GPUs,
  # bf16/fp16, head_dim <= 128), 'blocked' (`blocked_causal_attention`: query
  # blocks that skip the keys after them), or 'auto': cudnn where it applies,
  # blocked on CPU, else xla. Cached decoding always uses 'xla'.
  attention_impl: str = 'auto'

  def __post_init__(self):
    for name in ('vocab_size', 'num_layers', 'd_model', 'num_heads', 'mlp_dim',
                 'max_len', 'vocab_pad_multiple'):
      if getattr(self, name) < 1:
        raise ValueError(f'TransformerConfig.{name}={getattr(self, name)} must be >= 1.')
    if self.head_dim is None and self.d_model % self.num_heads:
      raise ValueError(
          f'd_model={self.d_model} is not divisible by num_heads={self.num_heads}; '
          'set head_dim explicitly.')
    if self.resolved_head_dim % 2:
      raise ValueError(f'head_dim={self.resolved_head_dim} must be even for rotary positions.')
    if self.num_heads % self.resolved_kv_heads:
      raise ValueError(
          f'num_heads={self.num_heads} must be a multiple of '
          f'num_kv_heads={self.resolved_kv_heads}.')
    if self.mlp_activation not in _ACTIVATIONS:
      raise ValueError(
          f'mlp_activation={self.mlp_activation!r}; choose from {sorted(_ACTIVATIONS)}.')
    if self.remat_policy not in ('none', *_REMAT_POLICIES):
      raise ValueError(
          f"remat_policy={self.remat_policy!r}; choose from 'none', 'full', 'dots'.")
    if not isinstance(self.scan_unroll, bool) and (
        not isinstance(self.scan_unroll, int) or self.scan_unroll < 1):
      raise ValueError(f'scan_unroll={self.scan_unroll!r} must be True, False or an int >= 1.')
    if self.attention_impl not in ATTENTION_IMPLS:
      raise ValueError(
          f"attention_impl={self.attention_impl!r}; choose one of {ATTENTION_IMPLS}.")
    for name in ('dtype', 'param_dtype'):
      try:
        jnp.dtype(getattr(self, name))
      except TypeError as e:
        raise ValueError(f'TransformerConfig.{name}={getattr(self, name)!r} is not a dtype.') from e

  @property
  def resolved_head_dim(self) -> int:
    return self.head_dim if self.head_dim is not None else self.d_model // self.num_heads

  @property
  def resolved_kv_heads(self) -> int:
    return self.num_kv_heads if self.num_kv_heads is not None else self.num_heads

  def resolved_attention_impl(self, backend: str | None = None, *, seq_len: int = 0) -> str:
    """'xla', 'cudnn' or 'blocked' for a full-sequence forward of `seq_len` positions.

    'auto' picks cudnn on a GPU for bf16/fp16, head_dim <= 128 (a multiple of
    8) and an even length (cuDNN's training kernels refuse odd ones); blocked
    on CPU (about half the time of xla's there for bench_4l's attention,
    forward and backward); else xla.
    """
    if self.attention_impl != 'auto':
      return self.attention_impl
    backend = backend or jax.default_backend()
    if backend == 'cpu':
      return 'blocked'
    fits = (jnp.dtype(self.dtype) in (jnp.bfloat16, jnp.float16)
            and self.resolved_head_dim <= 128 and self.resolved_head_dim % 8 == 0
            and seq_len % 2 == 0)
    return 'cudnn' if backend == 'gpu' and fits else 'xla'

  @property
  def padded_vocab_size(self) -> int:
    m = self.vocab_pad_multiple
    return -(-self.vocab_size // m) * m


_MODEL_CONFIGS: dict[str, dict] = {
    # CPU seconds: tests and smoke runs.
    'tiny': dict(vocab_size=300, num_layers=2, d_model=64, num_heads=4, mlp_dim=128,
                 max_len=256),
    # The paper's models (~32k vocabulary, untied: ~136M and ~1.34B parameters).
    'paper_130m': dict(vocab_size=32000, num_layers=12, d_model=768, num_heads=12,
                       mlp_dim=3072, dtype='bfloat16'),
    'paper_1b': dict(vocab_size=32000, num_layers=24, d_model=2048, num_heads=32,
                     mlp_dim=8192, dtype='bfloat16'),
    # Throughput benchmarks.
    'bench_4l': dict(vocab_size=32000, num_layers=4, d_model=256, num_heads=4,
                     head_dim=64, mlp_dim=1024, mlp_activation='silu', gated_mlp=True,
                     scan_unroll=True),
}


@gin.configurable
def model_config(name: str, **overrides) -> TransformerConfig:
  """A named config ('tiny', 'paper_130m', 'paper_1b', 'bench_4l') with overrides."""
  if name not in _MODEL_CONFIGS:
    raise ValueError(f'Unknown model config {name!r}; choose from {sorted(_MODEL_CONFIGS)}.')
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


# ---------------------------------------------------------------------------
# KV cache.


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
  """Keys/values of every layer for `S` slots, written left to right.

  All rows write the same slots (prompts of different lengths are left-padded
  by the caller, with segment id 0 on the padding); a slot's segment id says
  whom it belongs to, so a query attends only to written slots of its own
  segment at or before its own slot.
  """
  k_YxBxSxKxH: jax.Array
  v_YxBxSxKxH: jax.Array
  segment_ids_BxS: jax.Array  # 0 = padding or not yet written
  index: jax.Array  # int32 scalar: slots written so far (next write position)

  @property
  def length(self) -> int:
    return self.segment_ids_BxS.shape[1]


KV_CACHE_LOGICAL_AXES = KVCache(
    k_YxBxSxKxH=('layers', 'batch', 'cache_length', 'heads', 'kv'),
    v_YxBxSxKxH=('layers', 'batch', 'cache_length', 'heads', 'kv'),
    segment_ids_BxS=('batch', 'cache_length'),
    index=(),
)


def init_cache(config: TransformerConfig, batch_size: int, length: int | None = None,
               dtype: str | None = None) -> KVCache:
  """An empty cache of `length` slots (default config.max_len), compute dtype."""
  c = config
  length = c.max_len if length is None else length
  shape = (c.num_layers, batch_size, length, c.resolved_kv_heads, c.resolved_head_dim)
  dtype = jnp.dtype(dtype or c.dtype)
  return KVCache(k_YxBxSxKxH=jnp.zeros(shape, dtype), v_YxBxSxKxH=jnp.zeros(shape, dtype),
                 segment_ids_BxS=jnp.zeros((batch_size, length), jnp.int32),
                 index=jnp.zeros((), jnp.int32))


# ---------------------------------------------------------------------------
# Layers.


def _param(rngs: nnx.Rngs, stddev: float, shape: tuple[int, ...], names: tuple[str, ...],
           dtype: jnp.dtype) -> nnx.Param:
  """A normal(stddev) parameter carrying logical axis names as metadata only."""
  value = nnx.initializers.normal(stddev)(rngs.params(), shape, dtype)
  return nnx.Param(value, out_sharding=names, eager_sharding=False)


class RMSNorm(nnx.Module):
  """x / rms(x) * scale, computed in float32."""

  def __init__(self, config: TransformerConfig):
    self.eps = config.norm_eps
    self.scale = nnx.Param(jnp.ones((config.d_model,), config.param_dtype),
                           out_sharding=('embed',), eager_sharding=False)

  def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
    x = x_BxLxD.astype(jnp.float32)
    y = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + self.eps)
    return (y * self.scale[...].astype(jnp.float32)).astype(x_BxLxD.dtype)


def apply_rope(x_BxLxNxH: jax.Array, positions_BxL: jax.Array, theta: float) -> jax.Array:
  """Rotary position embedding (half-split convention), in float32."""
  half = x_BxLxNxH.shape[-1] // 2
  inv_freq = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
  angle_BxLx1xh = positions_BxL.astype(jnp.float32)[:, :, None, None] * inv_freq
  sin, cos = jnp.sin(angle_BxLx1xh), jnp.cos(angle_BxLx1xh)
  x1, x2 = jnp.split(x_BxLxNxH.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BxLxNxH.dtype)


def blocked_causal_attention(q_BxLxNxH: jax.Array, k_BxLxKxH: jax.Array, v_BxLxKxH: jax.Array,
                             mask_Bx1xLxL: jax.Array | None = None, *,
                             block_len: int | None = None) -> jax.Array:
  """Causal attention computed one block of queries at a time.

  Equals `jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True)`
  (scale 1/sqrt(H), logits and softmax in float32, grouped-query heads, masked
  logits at the same large negative), but a block of queries multiplies only
  the keys up to its own end: with 8 blocks about 44% of the score matrix,
  its softmax and their gradients are never computed. `block_len` defaults to
  max(64, ceil(L / 8)); one block is plain causal attention.
  """
  b, l, n, h = q_BxLxNxH.shape
  kh = k_BxLxKxH.shape[2]
  c = block_len or max(64, -(-l // 8))
  dtype = q_BxLxNxH.dtype
  q_BxLxKxGxH = q_BxLxNxH.reshape(b, l, kh, n // kh, h)
  k_BxLxKxH, v_BxLxKxH = k_BxLxKxH.astype(dtype), v_BxLxKxH.astype(dtype)
  # jax.nn's masked-logit value: finite, so a fully masked row averages its values.
  large_negative = -0.7 * float(jnp.finfo(jnp.float32).max)
  outs = []
  for start in range(0, l, c):
    end = min(start + c, l)
    logits_BxKxGxTxS = jnp.einsum('BTKGH,BSKH->BKGTS', q_BxLxKxGxH[:, start:end],
                                  k_BxLxKxH[:, :end], preferred_element_type=jnp.float32)
    allowed = (jnp.arange(start, end)[:, None] >= jnp.arange(end)[None, :])  # causal [T, S]
    if mask_Bx1xLxL is not None:
      allowed = allowed & mask_Bx1xLxL[:, :, None, start:end, :end]
    logits_BxKxGxTxS = jnp.where(allowed, logits_BxKxGxTxS * (h ** -0.5), large_negative)
    probs_BxKxGxTxS = jax.nn.softmax(logits_BxKxGxTxS, axis=-1).astype(dtype)
    outs.append(jnp.einsum('BKGTS,BSKH->BTKGH', probs_BxKxGxTxS, v_BxLxKxH[:, :end]))
  return jnp.concatenate(outs, axis=1).reshape(b, l, n, h)


class Attention(nnx.Module):
  """Causal (grouped-query) self-attention: jax.nn.dot_product_attention or, on CPU, blocked."""

  def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs):
    c = config
    self.config = c
    d, n, k, h = c.d_model, c.num_heads, c.resolved_kv_heads, c.resolved_head_dim
    out_std = 0.02 / math.sqrt(2 * c.num_layers)
    self.q_DxNxH = _param(rngs, 0.02, (d, n, h), ('embed', 'heads', 'kv'), c.param_dtype)
    self.k_DxKxH = _param(rngs, 0.02, (d, k, h), ('embed', 'heads', 'kv'), c.param_dtype)
    self.v_DxKxH = _param(rngs, 0.02, (d, k, h), ('embed', 'heads', 'kv'), c.param_dtype)
    self.o_NxHxD = _param(rngs, out_std, (n, h, d), ('heads', 'kv', 'embed'), c.param_dtype)

  def __call__(self, x_BxLxD: jax.Array, positions_BxL: jax.Array,
               mask_Bx1xLxS: jax.Array | None, kv: tuple[jax.Array, jax.Array] | None,
               index: jax.Array | None,
               ) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
    """Returns the attention output and, with a cache `kv`, the updated (k, v).

    Without a cache, attention is causal (query slot i sees keys 0..i) and
    `mask_Bx1xLxS` (None: no segments) only narrows it; with a cache, the mask
    is the whole rule.
    """
    c = self.config
    dtype = x_BxLxD.dtype
    q_BxLxNxH = jnp.einsum('BLD,DNH->BLNH', x_BxLxD, self.q_DxNxH[...].astype(dtype))
    k_BxLxKxH = jnp.einsum('BLD,DKH->BLKH', x_BxLxD, self.k_DxKxH[...].astype(dtype))
    v_BxLxKxH = jnp.einsum('BLD,DKH->BLKH', x_BxLxD, self.v_DxKxH[...].astype(dtype))
    q_BxLxNxH = constrain(apply_rope(q_BxLxNxH, positions_BxL, c.rope_theta),
                          ('batch', 'length', 'heads', 'kv'))
    k_BxLxKxH = constrain(apply_rope(k_BxLxKxH, positions_BxL, c.rope_theta),
                          ('batch', 'length', 'heads', 'kv'))
    v_BxLxKxH = constrain(v_BxLxKxH, ('batch', 'length', 'heads', 'kv'))
    if kv is None:
      k_BxSxKxH, v_BxSxKxH = k_BxLxKxH, v_BxLxKxH
    else:
      names = ('batch', 'cache_length', 'heads', 'kv')
      start = (0, index, 0, 0)
      k_BxSxKxH = constrain(jax.lax.dynamic_update_slice(
          kv[0], k_BxLxKxH.astype(kv[0].dtype), start), names)
      v_BxSxKxH = constrain(jax.lax.dynamic_update_slice(
          kv[1], v_BxLxKxH.astype(kv[1].dtype), start), names)
      kv = (k_BxSxKxH, v_BxSxKxH)
    impl = 'xla' if kv is not None else c.resolved_attention_impl(seq_len=x_BxLxD.shape[1])
    if impl == 'blocked':
      out_BxLxNxH = blocked_causal_attention(q_BxLxNxH, k_BxSxKxH, v_BxSxKxH, mask_Bx1xLxS)
    else:
      out_BxLxNxH = jax.nn.dot_product_attention(
          q_BxLxNxH, k_BxSxKxH.astype(dtype), v_BxSxKxH.astype(dtype), mask=mask_Bx1xLxS,
          is_causal=kv is None, implementation=impl)
    out_BxLxNxH = constrain(out_BxLxNxH, ('batch', 'length', 'heads', 'kv'))
    y_BxLxD = jnp.einsum('BLNH,NHD->BLD', out_BxLxNxH, self.o_NxHxD[...].astype(dtype))
    return y_BxLxD, kv


def _after(x: jax.Array, dep: jax.Array) -> jax.Array:
  """x, made to depend on `dep` (x + 0 * dep, `dep` broadcast against x).

  XLA:CPU drops optimization barriers before it merges common subexpressions
  and schedules, so a backward-pass recomputation from forward values is
  merged with the forward's own (whose buffers then stay live, which is what
  recomputing avoids), and a large buffer's fill or transpose that needs no
  gradient is hoisted to the start of the step. A data dependence on the
  incoming gradient is what keeps such work in the backward pass.
  """
  return x + (0 * dep).astype(x.dtype)


def _mlp_hidden(activation: Callable[[jax.Array], jax.Array], a_BxLxF: jax.Array,
                g_BxLxF: jax.Array | None) -> jax.Array:
  h_BxLxF = activation(a_BxLxF)
  return h_BxLxF if g_BxLxF is None else h_BxLxF * g_BxLxF


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _mlp_recomputing_hidden(activation, x_BxLxD, wi_DxF, wg_DxF, wo_FxD):
  """act(x W_i) [* x W_gate] W_o; the backward recomputes the hidden layer.

  Autodiff keeps act(x W_i), its intermediates and the gated product alive
  from the forward to the backward pass (five [B, L, F] buffers per layer
  with x W_i and x W_gate); this keeps only the two up-projections and
  recomputes the rest from them (elementwise) in the backward pass: on
  bench_4l ~96 MB less temporary memory, which XLA:CPU maps afresh, page by
  page, every step. Its weight gradients read a transposed copy of the small
  x ([D, B*L], made once behind an optimization barrier), so XLA:CPU need not
  write the large [B*L, F] gradients transposed. Same values as the plain
  path; used on CPU only.
  """
  return _mlp_recomputing_fwd(activation, x_BxLxD, wi_DxF, wg_DxF, wo_FxD)[0]


def _mlp_recomputing_fwd(activation, x_BxLxD, wi_DxF, wg_DxF, wo_FxD):
  """(output, residuals); its output alone is the plain MLP that autodiff differentiates."""
  a_BxLxF = x_BxLxD @ wi_DxF
  g_BxLxF = None if wg_DxF is None else x_BxLxD @ wg_DxF
  h_BxLxF = constrain(_mlp_hidden(activation, a_BxLxF, g_BxLxF), ('batch', 'length', 'mlp'))
  return h_BxLxF @ wo_FxD, (x_BxLxD, wi_DxF, wg_DxF, wo_FxD, a_BxLxF, g_BxLxF)


def _mlp_recomputing_bwd(activation, residuals, dy_BxLxD):
  x_BxLxD, wi_DxF, wg_DxF, wo_FxD, a_BxLxF, g_BxLxF = residuals
  d, f = wi_DxF.shape
  dep_BxLx1 = dy_BxLxD[..., :1]  # local to each batch shard: no communication
  a_BxLxF = _after(a_BxLxF, dep_BxLx1)
  if g_BxLxF is not None:
    g_BxLxF = _after(g_BxLxF, dep_BxLx1)
  h_BxLxF, hidden_vjp = jax.vjp(functools.partial(_mlp_hidden, activation), a_BxLxF, g_BxLxF)
  dwo_FxD = h_BxLxF.reshape(-1, f).T @ dy_BxLxD.reshape(-1, d)
  da_BxLxF, dg_BxLxF = hidden_vjp(dy_BxLxD @ wo_FxD.T)
  xt_DxT = jax.lax.optimization_barrier(_after(x_BxLxD, dep_BxLx1).reshape(-1, d).T)
  dwi_DxF = xt_DxT @ da_BxLxF.reshape(-1, f)
  dx_BxLxD = da_BxLxF @ wi_DxF.T
  dwg_DxF = None
  if wg_DxF is not None:
    dwg_DxF = (xt_DxT @ dg_BxLxF.reshape(-1, f)).astype(wg_DxF.dtype)
    dx_BxLxD = dx_BxLxD + dg_BxLxF @ wg_DxF.T
  return (dx_BxLxD.astype(x_BxLxD.dtype), dwi_DxF.astype(wi_DxF.dtype), dwg_DxF,
          dwo_FxD.astype(wo_FxD.dtype))


_mlp_recomputing_hidden.defvjp(_mlp_recomputing_fwd, _mlp_recomputing_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _embed_lookup(num_rows: int, table_VxD: jax.Array, tokens_BxL: jax.Array) -> jax.Array:
  """table[tokens] whose gradient's [V, D] zero fill waits for d x (CPU).

  Autodiff's scatter-add starts from a zero-filled [V, D] constant that
  XLA:CPU fills at the start of the step, keeping 32 MB (bench_4l) live
  through the whole forward pass; here the fill depends on d x (`_after`).
  """
  del num_rows
  return jnp.take(table_VxD, tokens_BxL, axis=0)


def _embed_lookup_fwd(num_rows, table_VxD, tokens_BxL):
  del num_rows
  return jnp.take(table_VxD, tokens_BxL, axis=0), tokens_BxL


def _embed_lookup_bwd(num_rows, tokens_BxL, dx_BxLxD):
  zeros_VxD = jnp.zeros((num_rows, dx_BxLxD.shape[-1]), dx_BxLxD.dtype)
  zeros_VxD = _after(zeros_VxD, dx_BxLxD.reshape(-1)[0])
  return zeros_VxD.at[tokens_BxL].add(dx_BxLxD, mode='drop'), None


_embed_lookup.defvjp(_embed_lookup_fwd, _embed_lookup_bwd)


class Mlp(nnx.Module):
  """act(x W_i) [* x W_gate] W_o (on CPU via `_mlp_recomputing_hidden`)."""

  def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs):
    c = config
    self.activation = _ACTIVATIONS[c.mlp_activation]
    out_std = 0.02 / math.sqrt(2 * c.num_layers)
    self.wi_DxF = _param(rngs, 0.02, (c.d_model, c.mlp_dim), ('embed', 'mlp'), c.param_dtype)
    self.wg_DxF = (_param(rngs, 0.02, (c.d_model, c.mlp_dim), ('embed', 'mlp'), c.param_dtype)
                   if c.gated_mlp else None)
    self.wo_FxD = _param(rngs, out_std, (c.mlp_dim, c.d_model), ('mlp', 'embed'), c.param_dtype)

  def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
    dtype = x_BxLxD.dtype
    wi_DxF = self.wi_DxF[...].astype(dtype)
    wg_DxF = None if self.wg_DxF is None else self.wg_DxF[...].astype(dtype)
    wo_FxD = self.wo_FxD[...].astype(dtype)
    if jax.default_backend() == 'cpu':
      return _mlp_recomputing_hidden(self.activation, x_BxLxD, wi_DxF, wg_DxF, wo_FxD)
    return _mlp_recomputing_fwd(self.activation, x_BxLxD, wi_DxF, wg_DxF, wo_FxD)[0]


class Block(nnx.Module):
  """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

  def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs):
    self.attn_norm = RMSNorm(config)
    self.attn = Attention(config, rngs=rngs)
    self.mlp_norm = RMSNorm(config)
    self.mlp = Mlp(config, rngs=rngs)

  def __call__(self, x_BxLxD: jax.Array, positions_BxL: jax.Array,
               mask_Bx1xLxS: jax.Array | None, kv: tuple[jax.Array, jax.Array] | None,
               index: jax.Array | None,
               ) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
    y_BxLxD, kv = self.attn(self.attn_norm(x_BxLxD), positions_BxL, mask_Bx1xLxS, kv, index)
    x_BxLxD = constrain(x_BxLxD + y_BxLxD, ('batch', 'length', 'embed'))
    x_BxLxD = x_BxLxD + self.mlp(self.mlp_norm(x_BxLxD))
    return constrain(x_BxLxD, ('batch', 'length', 'embed')), kv


def _attention_mask(q_slots_L: jax.Array, q_segment_ids_BxL: jax.Array,
                    k_segment_ids_BxS: jax.Array) -> jax.Array:
  """Causal in slot order and within one segment: [B, 1, L, S] booleans."""
  s = k_segment_ids_BxS.shape[1]
  causal_LxS = jnp.arange(s)[None, :] <= q_slots_L[:, None]
  same_BxLxS = q_segment_ids_BxL[:, :, None] == k_segment_ids_BxS[:, None, :]
  return (causal_LxS[None] & same_BxLxS)[:, None]


class Transformer(nnx.Module):
  """Decoder-only LM over token ids: logits over the padded vocabulary."""

  def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs):
    c = config
    self.config = c
    vp, d = c.padded_vocab_size, c.d_model
    self.embedding_VxD = _param(rngs, 0.02, (vp, d), ('vocab', 'embed'), c.param_dtype)

    @nnx.split_rngs(splits=c.num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: 'layers'})
    def make_blocks(rngs: nnx.Rngs) -> Block:
      return Block(c, rngs=rngs)

    self.blocks = make_blocks(rngs)
    self.final_norm = RMSNorm(c)
    # Stored [V, D] like the embedding: the fused loss on CPU multiplies and
    # accumulates the output projection vocabulary-major, so its gradient then
    # arrives in the parameter's own layout (no transposed read in AdamW).
    self.head_VxD = (None if c.tie_embeddings
                     else _param(rngs, 0.02, (vp, d), ('vocab', 'embed'), c.param_dtype))

  def hidden(self, tokens_BxL: jax.Array, *, positions_BxL: jax.Array | None = None,
             segment_ids_BxL: jax.Array | None = None, cache: KVCache | None = None,
             ) -> jax.Array | tuple[jax.Array, KVCache]:
    """Final-normed hidden states h_BxLxD (and the updated cache, given one).

    Positions default to the slot index (arange(L), offset by the cache index);
    packed inputs pass theirs. Segment ids default to 1 (0 marks padding); a
    token attends only to earlier tokens of its own segment. With a cache the
    L tokens are written at slots [index, index + L) and attend to the cache.
    """
    c = self.config
    b, l = tokens_BxL.shape
    index = jnp.zeros((), jnp.int32) if cache is None else cache.index
    q_slots_L = index + jnp.arange(l, dtype=jnp.int32)
    if positions_BxL is None:
      positions_BxL = jnp.broadcast_to(q_slots_L, (b, l))
    if cache is None:
      # Causality is the attention's own (is_causal, which cuDNN computes
      # blockwise); a mask only for packed segments.
      kv = None
      mask_Bx1xLxS = (None if segment_ids_BxL is None else
                      _attention_mask(q_slots_L, segment_ids_BxL, segment_ids_BxL))
    else:
      if segment_ids_BxL is None:
        segment_ids_BxL = jnp.ones((b, l), jnp.int32)
      k_segment_ids_BxS = jax.lax.dynamic_update_slice(
          cache.segment_ids_BxS, segment_ids_BxL.astype(jnp.int32), (0, index))
      kv = (cache.k_YxBxSxKxH, cache.v_YxBxSxKxH)
      mask_Bx1xLxS = _attention_mask(q_slots_L, segment_ids_BxL, k_segment_ids_BxS)

    dtype = jnp.dtype(c.dtype)
    table_VxD = self.embedding_VxD[...].astype(dtype)
    if jax.default_backend() == 'cpu':
      x_BxLxD = _embed_lookup(table_VxD.shape[0], table_VxD, tokens_BxL)
    else:
      x_BxLxD = jnp.take(table_VxD, tokens_BxL, axis=0)
    x_BxLxD = constrain(x_BxLxD, ('batch', 'length', 'embed'))

    def layer(block, x_BxLxD, kv):
      return block(x_BxLxD, positions_BxL, mask_Bx1xLxS, kv, index)

    if c.remat_policy != 'none':
      layer = nnx.remat(layer, policy=_REMAT_POLICIES[c.remat_policy], prevent_cse=False)

    @nnx.scan(in_axes=(0, nnx.Carry, 0), out_axes=(nnx.Carry, 0), unroll=c.scan_unroll)
    def run_layers(block, x_BxLxD, kv):
      return layer(block, x_BxLxD, kv)

    x_BxLxD, kv = run_layers(self.blocks, x_BxLxD, kv)
    h_BxLxD = self.final_norm(x_BxLxD)
    if cache is None:
      return h_BxLxD
    return h_BxLxD, KVCache(k_YxBxSxKxH=kv[0], v_YxBxSxKxH=kv[1],
                            segment_ids_BxS=k_segment_ids_BxS, index=index + l)

  def output_matrix_VxD(self) -> jax.Array:
    """The [padded V, D] output projection: the untied head or the embedding."""
    return (self.embedding_VxD if self.config.tie_embeddings else self.head_VxD)[...]

  def logits(self, h_BxLxD: jax.Array) -> jax.Array:
    """Float32 logits over the padded vocabulary; padded columns get PAD_LOGIT."""
    c = self.config
    dtype = h_BxLxD.dtype
    logits_BxLxV = jnp.einsum('BLD,VD->BLV', h_BxLxD, self.output_matrix_VxD().astype(dtype),
                              preferred_element_type=jnp.float32)
    if c.padded_vocab_size > c.vocab_size:
      real_V = jnp.arange(c.padded_vocab_size) < c.vocab_size
      logits_BxLxV = jnp.where(real_V, logits_BxLxV, PAD_LOGIT)
    return constrain(logits_BxLxV, ('batch', 'length', 'vocab'))

  def __call__(self, tokens_BxL: jax.Array, *, positions_BxL: jax.Array | None = None,
               segment_ids_BxL: jax.Array | None = None, cache: KVCache | None = None,
               ) -> jax.Array | tuple[jax.Array, KVCache]:
    """Logits_BxLxV (float32, padded vocab); with a cache, (logits, new cache)."""
    out = self.hidden(tokens_BxL, positions_BxL=positions_BxL,
                      segment_ids_BxL=segment_ids_BxL, cache=cache)
    if cache is None:
      return self.logits(out)
    h_BxLxD, cache = out
    return self.logits(h_BxLxD), cache
