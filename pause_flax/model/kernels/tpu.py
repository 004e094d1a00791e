"""TPU variants (TransformerConfig.kernels='tpu'): splash attention for training.

`splash_attention` is causal, grouped-query self-attention over packed
segments computed by the Pallas TPU kernel
`jax.experimental.pallas.ops.tpu.splash_attention`: it walks the score matrix
in [block_q, block_kv] tiles, skips the tiles the causal mask empties, and
keeps only per-row log-sum-exp residuals for the backward pass, where XLA's
attention materialises [B, N, L, L] scores (and their gradient) per layer.

It equals `jax.nn.dot_product_attention(q, k, v, mask=same_segment,
is_causal=True)` (scale 1/sqrt(H), the same large negative for masked logits);
tests/test_kernels_tpu.py compares values and gradients in Pallas interpret
mode on CPU. The model runs the kernel compiled for TPU under kernels='tpu'
(what 'auto' resolves to on a TPU mesh) and interpreted otherwise
(attention_impl='splash' with other kernels: correct and slow, a test path).

Sharding: a Pallas call has no partitioning rule, so under an active mesh
(`parallel.activation_sharding`) the kernel runs inside `shard_map` over the
batch and head axes of the logical rules; each device attends over its whole
sequence (the length is not sharded).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from pause_flax import parallel

SCOPE = "tpu_kernels"
BLOCK_CHOICES = (512, 256, 128)  # tile edges tried, largest first (multiples of 128 lanes)


def block_len(seq_len: int) -> int | None:
  """The splash tile edge for `seq_len`, or None when no tile divides it."""
  return next((b for b in BLOCK_CHOICES if seq_len % b == 0), None)


def supports(seq_len: int) -> bool:
  """Whether splash attention takes `seq_len` (a multiple of 128)."""
  return block_len(seq_len) is not None


@functools.lru_cache(maxsize=64)
def _kernel(num_heads: int, seq_len: int, interpret: bool):
  from jax.experimental.pallas.ops.tpu.splash_attention import (  # pylint: disable=g-import-not-at-top
      splash_attention_kernel as splash, splash_attention_mask as mask_lib)
  b = block_len(seq_len)
  sizes = splash.BlockSizes(block_q=b, block_kv=b, block_kv_compute=b, block_q_dkv=b,
                            block_kv_dkv=b, block_kv_dkv_compute=b, block_q_dq=b,
                            block_kv_dq=b)
  mask = mask_lib.MultiHeadMask([mask_lib.CausalMask((seq_len, seq_len))] * num_heads)
  # Concrete mask tables (constants of every program), even when first built under a trace.
  with jax.ensure_compile_time_eval():
    return splash.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1,
                                  interpret=interpret)


def _local_attention(q_BxNxLxH, k_BxKxLxH, v_BxKxLxH, segment_ids_BxL, interpret):
  from jax.experimental.pallas.ops.tpu.splash_attention import (  # pylint: disable=g-import-not-at-top
      splash_attention_kernel as splash)
  kernel = _kernel(q_BxNxLxH.shape[1], q_BxNxLxH.shape[2], interpret)
  if segment_ids_BxL is None:
    return jax.vmap(lambda q, k, v: kernel(q, k, v))(q_BxNxLxH, k_BxKxLxH, v_BxKxLxH)
  segments = splash.SegmentIds(q=segment_ids_BxL, kv=segment_ids_BxL)
  return jax.vmap(kernel)(q_BxNxLxH, k_BxKxLxH, v_BxKxLxH, segments)


def splash_attention(q_BxLxNxH: jax.Array, k_BxLxKxH: jax.Array, v_BxLxKxH: jax.Array,
                     segment_ids_BxL: jax.Array | None = None, *,
                     interpret: bool = False) -> jax.Array:
  """Causal grouped-query attention within segments, by the splash kernel.

  A query attends to keys at or before its slot with the same segment id
  (None: one segment per row). L must be a multiple of 128 (`supports`).
  `interpret` runs the kernel in Pallas interpret mode (any backend).
  """
  with jax.named_scope(SCOPE):
    b, l, n, h = q_BxLxNxH.shape
    kh = k_BxLxKxH.shape[2]
    if not supports(l):
      raise ValueError(f"splash attention needs a length that is a multiple of 128, got {l}.")
    mesh, rules = parallel.active_mesh()
    dtype = q_BxLxNxH.dtype
    # Head-major, as the kernel takes them; splash does not scale the logits.
    q_BxNxLxH = jnp.swapaxes(q_BxLxNxH * jnp.asarray(h ** -0.5, dtype), 1, 2)
    k_BxKxLxH = jnp.swapaxes(k_BxLxKxH.astype(dtype), 1, 2)
    v_BxKxLxH = jnp.swapaxes(v_BxLxKxH.astype(dtype), 1, 2)
    if segment_ids_BxL is None:
      local = lambda q, k, v: _local_attention(q, k, v, None, interpret)
      args = (q_BxNxLxH, k_BxKxLxH, v_BxKxLxH)
    else:
      local = functools.partial(_local_attention, interpret=interpret)
      args = (q_BxNxLxH, k_BxKxLxH, v_BxKxLxH, segment_ids_BxL.astype(jnp.int32))
    if mesh is not None and mesh.size > 1:
      batch = parallel.logical_to_spec(("batch",), rules, mesh)[0]
      heads = parallel.logical_to_spec(("heads",), rules, mesh)[0]
      head_shards = 1
      for axis in (heads,) if isinstance(heads, str) else (heads or ()):
        head_shards *= mesh.shape[axis]
      if n % head_shards or kh % head_shards:
        heads = None  # grouped heads must split evenly: keep every head on each device
      qkv_spec = P(batch, heads, None, None)
      in_specs = (qkv_spec,) * 3 + (P(batch, None),) * (len(args) - 3)
      local = jax.shard_map(local, mesh=mesh, in_specs=in_specs, out_specs=qkv_spec,
                            check_vma=False)
    out_BxNxLxH = local(*args)
    return jnp.swapaxes(out_BxNxLxH, 1, 2)
