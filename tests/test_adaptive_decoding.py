"""Adaptive-pause decoding: pauses when the model asks, within a budget, KV cache == full pass."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pause_flax.model import adaptive_decoding
from pause_flax.model import decoding
from pause_flax.model import transformer as tfm

PAUSE, ASK = 298, 299
CFG = dataclasses.replace(tfm.model_config('tiny'), vocab_size=ASK + 1, max_len=96)
EOS = 1
T = 6


class ForcedAsk(nnx.Module):
  """A Transformer whose ask logit is overridden by a rule on the position.

  every=k: with prompts of length P, the model asks at offsets o = position - (P - 1)
  with o % (k + 1) < k, so exactly k times before each token when never capped.
  every=None: it always asks. Everything else is the inner model's (cache included).
  """

  def __init__(self, inner: tfm.Transformer, prompt_len: int, every: int | None):
    self.inner = inner
    self.config = inner.config
    self.prompt_len = prompt_len
    self.every = every

  def __call__(self, tokens_BxL, *, positions_BxL=None, segment_ids_BxL=None, cache=None):
    out = self.inner(tokens_BxL, positions_BxL=positions_BxL, segment_ids_BxL=segment_ids_BxL,
                     cache=cache)
    logits = out[0] if cache is not None else out
    if self.every is None:
      ask = jnp.ones(logits.shape[:2], bool)
    else:
      offset = positions_BxL - (self.prompt_len - 1)
      ask = (offset >= 0) & (offset % (self.every + 1) < self.every)
    logits = logits.at[..., ASK].set(jnp.where(ask, 1e4, -1e4))
    return (logits, out[1]) if cache is not None else logits


class AskBias(nnx.Module):
  """A Transformer that asks whenever logit[5] - logit[6] (context-dependent) is high."""

  def __init__(self, inner: tfm.Transformer):
    self.inner = inner
    self.config = inner.config

  def __call__(self, tokens_BxL, *, positions_BxL=None, segment_ids_BxL=None, cache=None):
    out = self.inner(tokens_BxL, positions_BxL=positions_BxL, segment_ids_BxL=segment_ids_BxL,
                     cache=cache)
    logits = out[0] if cache is not None else out
    best = jnp.max(logits[..., :PAUSE], axis=-1)
    logits = logits.at[..., ASK].set(best + 40.0 * (logits[..., 5] - logits[..., 6]))
    return (logits, out[1]) if cache is not None else logits


@pytest.fixture(scope='module')
def inner():
  return tfm.Transformer(CFG, rngs=nnx.Rngs(0))


def _prompts(same_length=True):
  rows = [[0, 5, 17, 42, 9], [0, 11, 250, 3, 8]] if same_length else [
      [0, 5, 17, 42, 9, 77, 31], [0, 11, 250]]
  return decoding.pad_prompts(rows)


def _decode(model, prompts, budget, **kwargs):
  tokens, lengths = prompts
  return adaptive_decoding.generate_adaptive(
      model, tokens, prompt_lengths_B=lengths, max_new_tokens=T, pause_id=PAUSE, ask_id=ASK,
      max_pauses_per_token=budget, return_fed=True, **kwargs)


def _check_fed(out, budget):
  """The fed sequence is every answer token, each after exactly its pauses."""
  for r in range(out.tokens_BxT.shape[0]):
    fed = np.asarray(out.fed_BxS[r, :int(out.num_fed_B[r])]).tolist()
    expected = []
    for token, k in zip(np.asarray(out.tokens_BxT[r]), np.asarray(out.pauses_BxT[r])):
      expected += [PAUSE] * int(k) + [int(token)]
    assert fed == expected
    assert np.all(np.asarray(out.pauses_BxT[r]) <= budget)
    assert not np.isin(np.asarray(out.tokens_BxT[r]), [PAUSE, ASK]).any()


@pytest.mark.parametrize('k', [1, 3])
def test_a_model_forced_to_ask_k_times_gets_exactly_k_pauses_per_token(inner, k):
  prompts = _prompts()
  out = _decode(ForcedAsk(inner, prompt_len=5, every=k), prompts, budget=k + 2)
  np.testing.assert_array_equal(np.asarray(out.pauses_BxT), np.full((2, T), k))
  _check_fed(out, k + 2)
  assert np.all(np.asarray(out.num_fed_B) == T * (k + 1))


@pytest.mark.parametrize('budget', [0, 2])
def test_the_budget_caps_a_model_that_always_asks(inner, budget):
  prompts = _prompts(same_length=False)
  out = _decode(ForcedAsk(inner, prompt_len=0, every=None), prompts, budget=budget)
  np.testing.assert_array_equal(np.asarray(out.pauses_BxT), np.full((2, T), budget))
  _check_fed(out, budget)
  # With the ask class banned the answers are generate's (pause and ask banned) after
  # the same pauses; at budget 0 exactly generate's.
  if budget == 0:
    tokens, lengths = prompts
    ref = decoding.generate(inner, tokens, prompt_lengths_B=lengths, max_new_tokens=T,
                            banned_ids=(PAUSE, ASK))
    np.testing.assert_array_equal(np.asarray(out.tokens_BxT), np.asarray(ref))


def test_kv_cache_equals_a_full_forward_pass_over_tokens_and_pauses(inner):
  model = AskBias(inner)
  prompts = _prompts(same_length=False)
  budget = 3
  out = _decode(model, prompts, budget, eos_id=EOS)
  ref = _decode(model, prompts, budget, eos_id=EOS, use_cache=False)
  for a, b in zip(out, ref):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  _check_fed(out, budget)
  pauses = np.asarray(out.pauses_BxT)
  assert pauses.sum() > 0 and (pauses < budget).any()  # the model chose, not the cap
  # Replay each row through one full forward pass of prompt + everything fed: every
  # step's greedy choice (ask while under budget, else the best answer) is what was fed.
  tokens, lengths = prompts
  for r in range(2):
    prompt = np.asarray(tokens[r, :lengths[r]]).tolist()
    fed = np.asarray(out.fed_BxS[r, :int(out.num_fed_B[r])]).tolist()
    logits = np.asarray(model(jnp.asarray([prompt + fed], jnp.int32),
                              positions_BxL=jnp.arange(len(prompt + fed))[None])[0])
    run = 0
    for j, choice in enumerate(fed):
      row = logits[len(prompt) - 1 + j].copy()
      ask_logit = row[ASK] if run < budget else -np.inf
      row[[PAUSE, ASK]] = -np.inf
      row[ASK] = ask_logit
      assert choice == (PAUSE if np.argmax(row) == ASK else np.argmax(row))
      run = run + 1 if choice == PAUSE else 0


def test_bad_arguments_are_refused(inner):
  tokens, lengths = _prompts()
  call = lambda **kw: adaptive_decoding.generate_adaptive(
      inner, tokens, **{**dict(max_new_tokens=T, pause_id=PAUSE, ask_id=ASK,
                               max_pauses_per_token=2), **kw})
  with pytest.raises(ValueError, match='max_pauses_per_token=-1'):
    call(max_pauses_per_token=-1)
  with pytest.raises(ValueError, match='ask_id=300'):
    call(ask_id=300)
  with pytest.raises(ValueError, match='max_len'):
    call(max_pauses_per_token=40)
