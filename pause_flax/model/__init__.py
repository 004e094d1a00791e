"""pause_flax.model: the decoder-only Transformer (pause-agnostic) and decoding."""

from pause_flax.model.compat import upgrade_params
from pause_flax.model.configs import TransformerConfig, flops_per_token, model_config, num_params
from pause_flax.model.decoding import build_prompt, generate, pad_prompts, score
from pause_flax.model.transformer import (
    KV_LOGICAL_AXES,
    PAD_LOGIT,
    KVCache,
    Transformer,
    init_cache,
    kv_cache_logical_axes,
)

__all__ = [
    "KV_LOGICAL_AXES", "PAD_LOGIT", "KVCache", "Transformer", "TransformerConfig",
    "build_prompt", "flops_per_token", "generate", "init_cache", "kv_cache_logical_axes", "model_config", "num_params",
    "pad_prompts", "score", "upgrade_params",
]
