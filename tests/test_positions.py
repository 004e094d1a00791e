"""TransformerConfig.positions: 'rope' (default, unchanged), 'learned', 'both'."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pause_flax.model import decoding
from pause_flax.model import transformer as tfm

CFG = tfm.model_config('tiny', max_len=32)


def _params(config):
  return nnx.state(tfm.Transformer(config, rngs=nnx.Rngs(0)), nnx.Param)


def test_rope_default_keeps_the_parameter_tree_and_values():
  assert CFG.positions == 'rope'
  rope = jax.tree_util.tree_leaves_with_path(_params(CFG))
  learned = dict(jax.tree_util.tree_leaves_with_path(
      _params(dataclasses.replace(CFG, positions='learned'))))
  assert not any('position' in jax.tree_util.keystr(p) for p, _ in rope)
  assert len(learned) == len(rope) + 1
  table = [v for p, v in learned.items() if 'position_embedding_PxD' in jax.tree_util.keystr(p)]
  assert len(table) == 1 and table[0].shape == (32, CFG.d_model)


def test_invalid_positions_refused():
  with pytest.raises(ValueError, match='positions'):
    dataclasses.replace(CFG, positions='alibi')


@pytest.mark.parametrize('positions', ['learned', 'both'])
def test_cached_decoding_matches_full_forward(positions):
  """The learned table is indexed by absolute position, with or without a KV cache."""
  model = tfm.Transformer(dataclasses.replace(CFG, positions=positions), rngs=nnx.Rngs(1))
  tokens, lengths = decoding.pad_prompts([[5, 17, 42, 9, 77], [11, 250]])
  out, step_logits = decoding.generate(model, tokens, prompt_lengths_B=lengths,
                                       max_new_tokens=4, use_cache=True, return_logits=True)
  for row in range(2):
    seq = np.concatenate([tokens[row, :lengths[row]], np.asarray(out[row])])
    full = model(jnp.asarray(seq, jnp.int32)[None])[0]
    np.testing.assert_allclose(step_logits[row], full[lengths[row] - 1:lengths[row] + 3],
                               atol=1e-5, rtol=1e-5)


def test_learned_positions_change_the_output_with_the_position():
  """Without rotary, only the learned table tells positions apart."""
  model = tfm.Transformer(dataclasses.replace(CFG, positions='learned'), rngs=nnx.Rngs(2))
  x = jnp.asarray([[7, 7, 7, 7]], jnp.int32)
  h = model(x)[0]
  assert not np.allclose(h[1], h[2])


def test_hf_import_refuses_non_rope_positions():
  from pause_flax import hf_checkpoint  # pylint: disable=g-import-not-at-top
  with pytest.raises(ValueError, match="RoPE only"):
    hf_checkpoint.imported_model_config("/nonexistent", positions="learned")
