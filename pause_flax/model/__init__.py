"""pause_flax.model: the decoder-only Transformer (pause-agnostic)."""

from pause_flax.model.transformer import (
    KV_CACHE_LOGICAL_AXES,
    PAD_LOGIT,
    KVCache,
    Transformer,
    TransformerConfig,
    flops_per_token,
    init_cache,
    model_config,
    num_params,
)

__all__ = [
    'KV_CACHE_LOGICAL_AXES', 'PAD_LOGIT', 'KVCache', 'Transformer', 'TransformerConfig',
    'flops_per_token', 'init_cache', 'model_config', 'num_params',
]
