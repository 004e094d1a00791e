"""Tests for pause_flax.model.decoding."""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pause_flax import parallel
from pause_flax.model import decoding
from pause_flax.model import transformer as tfm

CFG = tfm.model_config('tiny')
PAUSE = CFG.vocab_size - 1  # the pause id is the last real id, as PauseVocabulary appends it
T = 5


@pytest.fixture(scope='module')
def model():
  return tfm.Transformer(CFG, rngs=nnx.Rngs(0))


@pytest.fixture(scope='module')
def prompts():
  """Two prompts of different lengths, each prefix + M_inf pauses."""
  rows = [decoding.build_prompt([5, 17, 42, 9, 77], 3, PAUSE),
          decoding.build_prompt([11, 250], 2, PAUSE)]
  return decoding.pad_prompts(rows)


def _full_logits(model, tokens):
  return model(jnp.asarray(tokens, jnp.int32)[None])[0]


def test_build_prompt():
  assert decoding.build_prompt([3, 4], 0, PAUSE) == [3, 4]
  assert decoding.build_prompt([3, 4], 2, PAUSE) == [3, 4, PAUSE, PAUSE]
  tokens, lengths = decoding.pad_prompts([[1, 2, 3], [4]])
  np.testing.assert_array_equal(tokens, [[1, 2, 3], [4, 0, 0]])
  np.testing.assert_array_equal(lengths, [3, 1])


@pytest.mark.parametrize('use_cache', [True, False])
def test_step_logits_match_full_forward(model, prompts, use_cache):
  """Every step's next-token logits equal a full forward over the row alone."""
  tokens, lengths = prompts
  out, step_logits = decoding.generate(model, tokens, prompt_lengths_B=lengths,
                                       max_new_tokens=T, use_cache=use_cache,
                                       return_logits=True)
  assert out.shape == (2, T) and out.dtype == jnp.int32
  for row in range(2):
    seq = np.concatenate([tokens[row, :lengths[row]], np.asarray(out[row])])
    full = _full_logits(model, seq)
    want = full[lengths[row] - 1:lengths[row] - 1 + T]
    np.testing.assert_allclose(step_logits[row], want, atol=1e-5, rtol=1e-5)
    np.testing.assert_array_equal(out[row], jnp.argmax(want, axis=-1))


def test_pause_never_emitted_even_when_its_logit_is_largest():
  m = tfm.Transformer(CFG, rngs=nnx.Rngs(1))
  # Residual branches off: h = RMSNorm(embedding), whose dim 0 is positive for
  # every token; the pause column reads dim 0, so the pause logit dominates.
  m.blocks.attn.o_NxHxD[...] = jnp.zeros_like(m.blocks.attn.o_NxHxD[...])
  m.blocks.mlp.wo_FxD[...] = jnp.zeros_like(m.blocks.mlp.wo_FxD[...])
  m.embedding_VxD[...] = m.embedding_VxD[...].at[:, 0].set(1.0)
  m.head_VxD[...] = m.head_VxD[...].at[PAUSE, 0].set(100.0)
  tokens, _ = decoding.pad_prompts([[5, 6, PAUSE], [7, PAUSE, PAUSE]])
  out, step_logits = decoding.generate(m, tokens, max_new_tokens=T, return_logits=True,
                                       banned_ids=(PAUSE,))
  assert (jnp.argmax(step_logits, -1) == PAUSE).all()  # the pause would win unmasked
  assert not (out == PAUSE).any()
  np.testing.assert_array_equal(
      out, jnp.argmax(step_logits.at[..., PAUSE].set(-jnp.inf), -1))
  sampled = decoding.generate(m, tokens, max_new_tokens=T, banned_ids=(PAUSE,),
                              temperature=1.0, top_k=3, rng=jax.random.key(0))
  assert not (sampled == PAUSE).any()


def test_stops_at_eos_per_row(model, prompts):
  tokens, lengths = prompts
  free = np.asarray(decoding.generate(model, tokens, prompt_lengths_B=lengths,
                                      max_new_tokens=T))
  eos = int(free[0, 2])
  want = free.copy()
  for row in range(2):
    hits = np.flatnonzero(free[row] == eos)
    if hits.size:
      want[row, hits[0] + 1:] = 0
  out = decoding.generate(model, tokens, prompt_lengths_B=lengths, max_new_tokens=T,
                          eos_id=eos)
  np.testing.assert_array_equal(out, want)
  assert (np.asarray(out[0, 3:]) == 0).all()


def test_sampling_top1_is_greedy_and_seeded(model, prompts):
  tokens, lengths = prompts
  kw = dict(prompt_lengths_B=lengths, max_new_tokens=T)
  greedy = decoding.generate(model, tokens, **kw)
  top1 = decoding.generate(model, tokens, temperature=0.7, top_k=1, rng=jax.random.key(3), **kw)
  np.testing.assert_array_equal(top1, greedy)
  with pytest.raises(ValueError, match='rng'):
    decoding.generate(model, tokens, temperature=1.0, **kw)


def test_score_equals_hand_computed_log_probs(model):
  prompt_rows = [decoding.build_prompt([5, 17, 42], 2, PAUSE), [11, 250]]
  target_rows = [[8, 9, 10], [12]]
  prompts, prompt_lengths = decoding.pad_prompts(prompt_rows)
  targets, target_lengths = decoding.pad_prompts(target_rows)
  scores = decoding.score(model, prompts, targets, prompt_lengths_B=prompt_lengths,
                          target_lengths_B=target_lengths)
  banned = decoding.score(model, prompts, targets, prompt_lengths_B=prompt_lengths,
                          target_lengths_B=target_lengths, banned_ids=(PAUSE,))
  for row, (p, t) in enumerate(zip(prompt_rows, target_rows)):
    logits = np.asarray(_full_logits(model, p + t), np.float64)
    want = want_banned = 0.0
    for i, tok in enumerate(t):
      z = logits[len(p) - 1 + i]
      want += z[tok] - np.log(np.exp(z - z.max()).sum()) - z.max()
      z = np.delete(z, PAUSE)
      want_banned += z[tok] - np.log(np.exp(z - z.max()).sum()) - z.max()
    np.testing.assert_allclose(scores[row], want, rtol=1e-5)
    np.testing.assert_allclose(banned[row], want_banned, rtol=1e-5)


def test_jit(model, prompts):
  tokens, lengths = prompts

  @nnx.jit
  def run(m, tokens, lengths):
    out = decoding.generate(m, tokens, prompt_lengths_B=lengths, max_new_tokens=T)
    return out, decoding.score(m, tokens, out, prompt_lengths_B=lengths)

  out, scores = run(model, jnp.asarray(tokens), jnp.asarray(lengths))
  np.testing.assert_array_equal(
      out, decoding.generate(model, tokens, prompt_lengths_B=lengths, max_new_tokens=T))
  assert scores.shape == (2,) and bool(jnp.isfinite(scores).all())


def test_sharded_decoding_matches_unsharded(model):
  mesh = parallel.make_mesh(data=2, fsdp=2, tensor=2)
  state = nnx.state(model)
  sharded = nnx.merge(nnx.graphdef(model),
                      jax.device_put(state, parallel.state_shardings(state, mesh)))
  tokens, lengths = decoding.pad_prompts([[5, 6, PAUSE], [7], [8, 9], [10, 11, 12, 13]])
  kw = dict(prompt_lengths_B=lengths, max_new_tokens=T)
  np.testing.assert_array_equal(decoding.generate(sharded, tokens, mesh=mesh, **kw),
                                decoding.generate(model, tokens, **kw))


def _while_bodies(hlo: str) -> list[str]:
  """The text of every computation a `while` instruction runs as its body."""
  names = set(re.findall(r'while\(.*?body=%?([\w.\-]+)', hlo))
  blocks = re.split(r'\n(?=\S)', hlo)  # computations start at column 0
  heads = [re.match(r'(?:ENTRY )?%?([\w.\-]+)', b) for b in blocks]
  return [b for b, h in zip(blocks, heads) if h and h.group(1) in names]


def test_decode_step_updates_the_cache_in_place():
  """The compiled decode loop neither copies nor transposes a layer's cache.

  Each layer's [B, K, S, H] keys and values are written with one in-place
  dynamic-update-slice per step and read by the attention matmuls as they
  are; in the loop body every array of a layer cache's size is a loop
  parameter, a bitcast, or such an update.
  """
  cfg = tfm.model_config('tiny', num_kv_heads=2)  # K=2, H=16
  m = tfm.Transformer(cfg, rngs=nnx.Rngs(0))
  b, p, t = 2, 8, 40
  options = decoding._Options(  # pylint: disable=protected-access
      max_new_tokens=t, eos_id=None, pad_id=0, banned_ids=(), temperature=0.0, top_k=None,
      use_cache=True, return_logits=False, mesh=None, rules=parallel.DEFAULT_RULES)
  graphdef, state = nnx.split(m)
  hlo = decoding._generate.lower(  # pylint: disable=protected-access
      graphdef, state, jnp.ones((b, p), jnp.int32), jnp.full((b,), p, jnp.int32),
      jax.random.key(0), options=options).compile().as_text()
  cache_elements = b * 2 * (p + t) * 16
  bodies = _while_bodies(hlo)
  assert bodies
  updates = 0
  for body in bodies:
    for name, dims, op in re.findall(r'%([\w.\-]+) = f32\[([\d,]*)\]\S* ([\w\-]+)\(', body):
      if math.prod(int(d) for d in dims.split(',') if d) != cache_elements:
        continue
      if op == 'fusion' and 'dynamic-update-slice' in name and 'copy' not in name \
          and 'transpose' not in name:
        updates += 1
      else:
        assert op in ('parameter', 'get-tuple-element', 'bitcast'), (name, op)
  assert updates == 2 * cfg.num_layers  # k and v of each layer, once per step
