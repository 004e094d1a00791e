"""Backend-specific pieces of the model, behind one setting: `TransformerConfig.kernels`.

The layers in `transformer.py` are the plain ones ('xla'): they run on every
backend. A backend may replace some pieces with variants that compute the same
values faster or in less memory there; a `Kernels` record says which:

  attention         what attention_impl='auto' becomes (besides
                    jax.nn.dot_product_attention's 'xla' and 'cudnn', 'blocked'
                    or 'splash')
  mlp               (activation, x_BxLxD, wi_DxF, wg_DxF | None, wo_FxD) -> y_BxLxD
  embed_lookup      (table_VxD, tokens_BxL) -> x_BxLxD
  rotate            (x_BxLxNxH, sin_BxLx1xh, cos_BxLx1xh) -> the rotary rotation of x

'cpu' takes its pieces from `kernels/cpu.py`, 'tpu' its splash attention from
`kernels/tpu.py`. 'auto' is resolved once, by
`resolve`, from the platform of the mesh the step runs on (the Trainer and the
evaluator call it); layers read the resolved value, and a config still at
'auto' runs the plain layers. Parameters are stored the same way whatever the
kernels, so a checkpoint moves freely between backends.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax.numpy as jnp
from jax.sharding import Mesh

from pause_flax.model.configs import TransformerConfig
from pause_flax.model.kernels import cpu, tpu
from pause_flax.model.kernels.cpu import blocked_causal_attention


@dataclasses.dataclass(frozen=True)
class Kernels:
  """What a backend replaces in the plain layers; None keeps the layer's own code."""
  attention: str = "xla"
  mlp: Callable | None = None
  embed_lookup: Callable | None = None
  rotate: Callable | None = None


# Attention implementations that read `segment_ids_BxL` and build each block's
# mask from them; the others take a dense [B, 1, L, L] mask for packed segments.
READS_SEGMENT_IDS = ("blocked", "splash")

BACKENDS: dict[str, Kernels] = {
    "xla": Kernels(),
    "cpu": Kernels(attention="blocked", mlp=cpu.mlp, embed_lookup=cpu.embed_lookup,
                   rotate=cpu.rotate),
    "tpu": Kernels(attention="splash"),
}


def platform(mesh: Mesh) -> str:
  """The platform ('cpu', 'gpu', 'tpu') of the devices the mesh holds."""
  return mesh.devices.flat[0].platform


def resolve(config: TransformerConfig, platform_name: str) -> TransformerConfig:
  """`config` with `kernels` and `attention_impl` chosen for `platform_name`.

  kernels 'auto' becomes 'cpu' on CPU, 'tpu' on TPU, else 'xla'. attention_impl
  'auto' becomes the kernels' choice ('blocked' for 'cpu', 'splash' for
  'tpu'), or on a GPU cuDNN's
  flash attention where it applies (bf16/fp16, head_dim <= 128 and a multiple
  of 8), else 'xla'. Explicit settings are kept.
  """
  kernels = config.kernels
  if kernels == "auto":
    kernels = {"cpu": "cpu", "tpu": "tpu"}.get(platform_name, "xla")
  attention = config.attention_impl
  if attention == "auto":
    attention = BACKENDS[kernels].attention
    head_dim = config.resolved_head_dim
    if (attention == "xla" and platform_name == "gpu"
        and jnp.dtype(config.dtype) in (jnp.bfloat16, jnp.float16)
        and head_dim <= 128 and head_dim % 8 == 0):
      attention = "cudnn"
  return dataclasses.replace(config, kernels=kernels, attention_impl=attention)


def get(config: TransformerConfig) -> Kernels:
  """The pieces `config.kernels` selects (the plain layers while it is 'auto')."""
  return BACKENDS.get(config.kernels, BACKENDS["xla"])


def attention_impl(config: TransformerConfig, seq_len: int, *, cached: bool = False) -> str:
  """'xla', 'cudnn', 'blocked' or 'splash' for one attention call over `seq_len` queries.

  Cached decoding and an unresolved 'auto' take 'xla'; cuDNN's training
  kernels take even lengths only, splash multiples of 128, so other lengths
  fall back to 'xla'.
  """
  impl = config.attention_impl
  if (cached or impl == "auto" or (impl == "cudnn" and seq_len % 2)
      or (impl == "splash" and not tpu.supports(seq_len))):
    return "xla"
  return impl


__all__ = ["BACKENDS", "Kernels", "READS_SEGMENT_IDS", "attention_impl",
           "blocked_causal_attention", "cpu", "get", "platform", "resolve", "tpu"]
