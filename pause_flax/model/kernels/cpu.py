"""XLA:CPU variants of attention, MLP and embedding lookup (TransformerConfig.kernels='cpu').

Each computes the same values and gradients as the plain layer it replaces
(tests/test_model.py compares them); they differ in what XLA:CPU is given to
compile, for these reasons:

- `blocked_causal_attention`: plain causal attention computes the whole L x L
  score matrix and masks the upper half away; a block of queries here only
  multiplies the keys up to its own end, so the masked-out scores, their
  softmax and their gradients are mostly never computed. Accelerators' fused
  attention kernels skip that work themselves; on XLA:CPU the skipping has to
  be written out.
- `mlp`: autodiff keeps act(x W_i), its intermediates and the gated product
  alive from the forward to the backward pass (several [B, L, F] buffers per
  layer); this keeps only the two up-projections and recomputes the rest,
  elementwise, in the backward pass. XLA:CPU maps its temporary memory afresh
  every step, so fewer and smaller buffers are fewer page faults. The weight
  gradients read a transposed copy of the small x ([D, B*L]) instead of having
  XLA:CPU write the large [B*L, F] gradients transposed.
- `rotate`: the rotary rotation takes each head's two halves apart and
  concatenates them back, forward and backward; XLA:CPU runs those
  concatenate fusions at a small fraction of its memory bandwidth. Here the
  half swap (x1, x2) -> (-x2, x1) is a matmul by a constant signed
  permutation, and the rest is elementwise.
- `embed_lookup`: autodiff's scatter-add starts from a zero-filled [V, D]
  buffer that XLA:CPU fills at the start of the step, keeping it live through
  the whole forward pass; here the fill waits for the incoming gradient.
- `after`: XLA:CPU drops optimization barriers before it merges common
  subexpressions and schedules, so a backward-pass recomputation from forward
  values is merged with the forward's own (whose buffers then stay live, which
  is what recomputing avoids), and a large buffer's fill or transpose that
  needs no gradient is hoisted to the start of the step. A data dependence on
  the incoming gradient keeps such work in the backward pass.

Measured effects are in benchmarks/README.md.

Everything here runs under the named scope `SCOPE`, so a compiled program
shows whether a CPU kernel is in it (the memory check's test looks).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from pause_flax.parallel import constrain

SCOPE = "cpu_kernels"


def after(x: jax.Array, dep: jax.Array) -> jax.Array:
  """x, made to depend on `dep` (x + 0 * dep, `dep` broadcast against x)."""
  return x + (0 * dep).astype(x.dtype)


def blocked_causal_attention(q_BxLxNxH: jax.Array, k_BxLxKxH: jax.Array, v_BxLxKxH: jax.Array,
                             segment_ids_BxL: jax.Array | None = None, *,
                             block_len: int | None = None) -> jax.Array:
  """Causal attention computed one block of queries at a time.

  Equals `jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True)`
  (scale 1/sqrt(H), logits and softmax in float32, grouped-query heads, masked
  logits at the same large negative), where `mask` lets a query see only keys
  of its own segment (packed sequences; None: one segment), but a block of
  queries multiplies only the keys up to its own end. Each block's mask is
  built from `segment_ids_BxL`, so no [B, 1, L, L] mask is ever formed.
  `block_len` defaults to max(64, ceil(L / 8)); one block is plain causal
  attention.

  q, k and v are laid out head-major ([B, K, G, L, H], [B, K, L, H]) once, not
  once per block, and the gradient is written out (`_blocked_bwd`): it keeps
  each block's probabilities and reduces dO * O over H for the softmax's
  gradient, where autodiff would reduce dP * P over the keys of every block.
  """
  l = q_BxLxNxH.shape[1]
  c = block_len or max(64, -(-l // 8))
  if segment_ids_BxL is None:
    return _blocked(c, q_BxLxNxH, k_BxLxKxH, v_BxLxKxH)
  return _blocked_segments(c, q_BxLxNxH, k_BxLxKxH, v_BxLxKxH, segment_ids_BxL)


# jax.nn's masked-logit value: finite, so a fully masked row averages its values.
_LARGE_NEGATIVE = -0.7 * float(jnp.finfo(jnp.float32).max)


def _blocks(length: int, block_len: int) -> list[tuple[int, int]]:
  return [(start, min(start + block_len, length)) for start in range(0, length, block_len)]


def _allowed(start: int, end: int, segment_ids_BxL: jax.Array | None) -> jax.Array:
  """[T, S] (or [B, 1, 1, T, S] with segments): which keys a block's queries see."""
  allowed_TxS = jnp.arange(start, end)[:, None] >= jnp.arange(end)[None, :]
  if segment_ids_BxL is None:
    return allowed_TxS
  same_BxTxS = segment_ids_BxL[:, start:end, None] == segment_ids_BxL[:, None, :end]
  return allowed_TxS & same_BxTxS[:, None, None]


def _blocked_fwd(block_len, q_BxLxNxH, k_BxLxKxH, v_BxLxKxH, segment_ids_BxL=None):
  with jax.named_scope(SCOPE):
    b, l, n, h = q_BxLxNxH.shape
    kh = k_BxLxKxH.shape[2]
    dtype = q_BxLxNxH.dtype
    q_BxKxGxLxH = jnp.transpose(q_BxLxNxH.reshape(b, l, kh, n // kh, h), (0, 2, 3, 1, 4))
    k_BxKxLxH = jnp.transpose(k_BxLxKxH.astype(dtype), (0, 2, 1, 3))
    v_BxKxLxH = jnp.transpose(v_BxLxKxH.astype(dtype), (0, 2, 1, 3))
    probs, outs = [], []
    for start, end in _blocks(l, block_len):
      logits_BxKxGxTxS = jnp.einsum("BKGTH,BKSH->BKGTS", q_BxKxGxLxH[:, :, :, start:end],
                                    k_BxKxLxH[:, :, :end], preferred_element_type=jnp.float32)
      logits_BxKxGxTxS = jnp.where(_allowed(start, end, segment_ids_BxL),
                                   logits_BxKxGxTxS * (h ** -0.5), _LARGE_NEGATIVE)
      probs_BxKxGxTxS = jax.nn.softmax(logits_BxKxGxTxS, axis=-1)
      probs.append(probs_BxKxGxTxS)
      outs.append(jnp.einsum("BKGTS,BKSH->BKGTH", probs_BxKxGxTxS.astype(dtype),
                             v_BxKxLxH[:, :, :end]))
    out_BxKxGxLxH = jnp.concatenate(outs, axis=3)
    out_BxLxNxH = jnp.transpose(out_BxKxGxLxH, (0, 3, 1, 2, 4)).reshape(b, l, n, h)
    # Empty arrays carry k's and v's own dtypes to the gradient.
    residuals = (q_BxKxGxLxH, k_BxKxLxH, v_BxKxLxH, probs, out_BxKxGxLxH, segment_ids_BxL,
                 jnp.zeros((0,), k_BxLxKxH.dtype), jnp.zeros((0,), v_BxLxKxH.dtype))
    return out_BxLxNxH, residuals


def _blocked_bwd(block_len, residuals, dout_BxLxNxH):
  """dS = P * (dP - rowsum(dO * O)), block by block; dK, dV summed over the query blocks."""
  with jax.named_scope(SCOPE):
    (q_BxKxGxLxH, k_BxKxLxH, v_BxKxLxH, probs, out_BxKxGxLxH, segment_ids_BxL,
     k_like, v_like) = residuals
    b, kh, g, l, h = q_BxKxGxLxH.shape
    dtype = q_BxKxGxLxH.dtype
    f32 = jnp.float32
    dout_BxKxGxLxH = jnp.transpose(dout_BxLxNxH.reshape(b, l, kh, g, h), (0, 2, 3, 1, 4))
    rowsum_BxKxGxLx1 = jnp.sum(dout_BxKxGxLxH.astype(f32) * out_BxKxGxLxH.astype(f32),
                               axis=-1, keepdims=True)
    dk_BxKxLxH = jnp.zeros(k_BxKxLxH.shape, f32)
    dv_BxKxLxH = jnp.zeros(v_BxKxLxH.shape, f32)
    dqs = []
    for (start, end), probs_BxKxGxTxS in zip(_blocks(l, block_len), probs):
      dout_BxKxGxTxH = dout_BxKxGxLxH[:, :, :, start:end]
      dprobs_BxKxGxTxS = jnp.einsum("BKGTH,BKSH->BKGTS", dout_BxKxGxTxH,
                                    v_BxKxLxH[:, :, :end], preferred_element_type=f32)
      dlogits_BxKxGxTxS = jnp.where(
          _allowed(start, end, segment_ids_BxL),
          probs_BxKxGxTxS * (dprobs_BxKxGxTxS - rowsum_BxKxGxLx1[:, :, :, start:end])
          * (h ** -0.5), 0.0).astype(dtype)
      dqs.append(jnp.einsum("BKGTS,BKSH->BKGTH", dlogits_BxKxGxTxS, k_BxKxLxH[:, :, :end],
                            preferred_element_type=f32))
      dk_BxKxLxH = dk_BxKxLxH.at[:, :, :end].add(jnp.einsum(
          "BKGTS,BKGTH->BKSH", dlogits_BxKxGxTxS, q_BxKxGxLxH[:, :, :, start:end],
          preferred_element_type=f32))
      dv_BxKxLxH = dv_BxKxLxH.at[:, :, :end].add(jnp.einsum(
          "BKGTS,BKGTH->BKSH", probs_BxKxGxTxS.astype(dtype), dout_BxKxGxTxH,
          preferred_element_type=f32))
    dq_BxLxNxH = jnp.transpose(jnp.concatenate(dqs, axis=3), (0, 3, 1, 2, 4)).reshape(
        b, l, kh * g, h)
    return (dq_BxLxNxH.astype(dtype), jnp.transpose(dk_BxKxLxH, (0, 2, 1, 3)).astype(k_like.dtype),
            jnp.transpose(dv_BxKxLxH, (0, 2, 1, 3)).astype(v_like.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _blocked(block_len, q_BxLxNxH, k_BxLxKxH, v_BxLxKxH):
  return _blocked_fwd(block_len, q_BxLxNxH, k_BxLxKxH, v_BxLxKxH)[0]


_blocked.defvjp(_blocked_fwd, _blocked_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _blocked_segments(block_len, q_BxLxNxH, k_BxLxKxH, v_BxLxKxH, segment_ids_BxL):
  return _blocked_fwd(block_len, q_BxLxNxH, k_BxLxKxH, v_BxLxKxH, segment_ids_BxL)[0]


def _blocked_segments_bwd(block_len, residuals, dout_BxLxNxH):
  return (*_blocked_bwd(block_len, residuals, dout_BxLxNxH), None)


_blocked_segments.defvjp(_blocked_fwd, _blocked_segments_bwd)


def rotate(x_BxLxNxH: jax.Array, sin_BxLx1xh: jax.Array, cos_BxLx1xh: jax.Array) -> jax.Array:
  """The rotary rotation (half-split): x * cos + swap(x) * sin, swap a [H, H] matmul."""
  with jax.named_scope(SCOPE):
    h = x_BxLxNxH.shape[-1]
    half = h // 2
    swap_HxH = np.zeros((h, h), np.float32)  # x @ swap = concatenate([-x2, x1])
    swap_HxH[np.arange(half) + half, np.arange(half)] = -1.0
    swap_HxH[np.arange(half), np.arange(half) + half] = 1.0
    x = x_BxLxNxH.astype(jnp.float32)
    cos_BxLx1xH = jnp.concatenate([cos_BxLx1xh, cos_BxLx1xh], axis=-1)
    sin_BxLx1xH = jnp.concatenate([sin_BxLx1xh, sin_BxLx1xh], axis=-1)
    swapped = jnp.einsum("BLNH,HK->BLNK", x, jnp.asarray(swap_HxH))
    return (x * cos_BxLx1xH + swapped * sin_BxLx1xH).astype(x_BxLxNxH.dtype)


def _mlp_hidden(activation: Callable[[jax.Array], jax.Array], a_BxLxF: jax.Array,
                g_BxLxF: jax.Array | None) -> jax.Array:
  h_BxLxF = activation(a_BxLxF)
  return h_BxLxF if g_BxLxF is None else h_BxLxF * g_BxLxF


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def mlp(activation: Callable[[jax.Array], jax.Array], x_BxLxD: jax.Array, wi_DxF: jax.Array,
        wg_DxF: jax.Array | None, wo_FxD: jax.Array) -> jax.Array:
  """act(x W_i) [* x W_gate] W_o; the backward pass recomputes the hidden layer."""
  return _mlp_fwd(activation, x_BxLxD, wi_DxF, wg_DxF, wo_FxD)[0]


def _mlp_fwd(activation, x_BxLxD, wi_DxF, wg_DxF, wo_FxD):
  with jax.named_scope(SCOPE):
    a_BxLxF = x_BxLxD @ wi_DxF
    g_BxLxF = None if wg_DxF is None else x_BxLxD @ wg_DxF
    h_BxLxF = constrain(_mlp_hidden(activation, a_BxLxF, g_BxLxF), ("batch", "length", "mlp"))
    return h_BxLxF @ wo_FxD, (x_BxLxD, wi_DxF, wg_DxF, wo_FxD, a_BxLxF, g_BxLxF)


def _mlp_bwd(activation, residuals, dy_BxLxD):
  with jax.named_scope(SCOPE):
    x_BxLxD, wi_DxF, wg_DxF, wo_FxD, a_BxLxF, g_BxLxF = residuals
    d, f = wi_DxF.shape
    dep_BxLx1 = dy_BxLxD[..., :1]  # local to each batch shard: no communication
    a_BxLxF = after(a_BxLxF, dep_BxLx1)
    if g_BxLxF is not None:
      g_BxLxF = after(g_BxLxF, dep_BxLx1)
    h_BxLxF, hidden_vjp = jax.vjp(functools.partial(_mlp_hidden, activation), a_BxLxF, g_BxLxF)
    dwo_FxD = h_BxLxF.reshape(-1, f).T @ dy_BxLxD.reshape(-1, d)
    da_BxLxF, dg_BxLxF = hidden_vjp(dy_BxLxD @ wo_FxD.T)
    xt_DxT = jax.lax.optimization_barrier(after(x_BxLxD, dep_BxLx1).reshape(-1, d).T)
    dwi_DxF = xt_DxT @ da_BxLxF.reshape(-1, f)
    dx_BxLxD = da_BxLxF @ wi_DxF.T
    dwg_DxF = None
    if wg_DxF is not None:
      dwg_DxF = (xt_DxT @ dg_BxLxF.reshape(-1, f)).astype(wg_DxF.dtype)
      dx_BxLxD = dx_BxLxD + dg_BxLxF @ wg_DxF.T
    return (dx_BxLxD.astype(x_BxLxD.dtype), dwi_DxF.astype(wi_DxF.dtype), dwg_DxF,
            dwo_FxD.astype(wo_FxD.dtype))


mlp.defvjp(_mlp_fwd, _mlp_bwd)


def embed_lookup(table_VxD: jax.Array, tokens_BxL: jax.Array) -> jax.Array:
  """table[tokens] whose gradient's [V, D] zero fill waits for d x."""
  return _embed_lookup(table_VxD.shape[0], table_VxD, tokens_BxL)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _embed_lookup(num_rows: int, table_VxD: jax.Array, tokens_BxL: jax.Array) -> jax.Array:
  del num_rows
  return jnp.take(table_VxD, tokens_BxL, axis=0)


def _embed_lookup_fwd(num_rows, table_VxD, tokens_BxL):
  del num_rows
  with jax.named_scope(SCOPE):
    return jnp.take(table_VxD, tokens_BxL, axis=0), tokens_BxL


def _embed_lookup_bwd(num_rows, tokens_BxL, dx_BxLxD):
  with jax.named_scope(SCOPE):
    zeros_VxD = jnp.zeros((num_rows, dx_BxLxD.shape[-1]), dx_BxLxD.dtype)
    zeros_VxD = after(zeros_VxD, dx_BxLxD.reshape(-1)[0])
    return zeros_VxD.at[tokens_BxL].add(dx_BxLxD, mode="drop"), None


_embed_lookup.defvjp(_embed_lookup_fwd, _embed_lookup_bwd)
