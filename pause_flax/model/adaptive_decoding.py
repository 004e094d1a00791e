"""Adaptive-pause decoding (Catch Your Breath): a `<pause>` whenever the model asks.

The model has an output class `ask_id` ("ask for a pause", the paper's
`<don't know>`). Decoding is `decoding.generate`'s (the same prompt handling,
KV cache and sampling), except that at every step each row either

  - asks (its chosen id is `ask_id`): `<pause>` is fed as the next input and the
    row chooses again, its output position unchanged; or
  - answers: the token is emitted and fed, as `generate` does.

A row asks at most `max_pauses_per_token` times for one token; after that the
ask class is banned until it answers. `<pause>` and `ask_id` are never emitted
(both banned as answers; pass other `banned_ids` as for `generate`). Every step
feeds one token per row into the same cache slot, so rows that pause and rows
that answer stay aligned; a row's positions count every token fed to it,
pauses included, as in training.

Returns the emitted tokens [B, T] (EOS kept, then `pad_id`, as `generate`) and
the pauses taken before each of them [B, T] (0 after a row ended). The fed
sequence, the tokens and pauses in order, can be returned too, for checking
the cached result against a full forward pass over it.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from pause_flax import parallel
from pause_flax.model import decoding
from pause_flax.model.transformer import Transformer


class AdaptiveOutput(NamedTuple):
  tokens_BxT: jax.Array   # emitted tokens (never pause or ask)
  pauses_BxT: jax.Array   # pauses fed before each emitted token
  fed_BxS: jax.Array | None = None  # every token fed after the prompt, in order (pad after)
  num_fed_B: jax.Array | None = None  # how many of fed_BxS each row used while decoding


@dataclasses.dataclass(frozen=True)
class _Options:
  max_new_tokens: int
  max_pauses_per_token: int
  pause_id: int
  ask_id: int
  eos_id: int | None
  pad_id: int
  banned_ids: tuple[int, ...]
  temperature: float
  top_k: int | None
  use_cache: bool
  return_fed: bool
  mesh: Mesh | None
  rules: parallel.LogicalRules

  @property
  def max_steps(self) -> int:
    return self.max_new_tokens * (self.max_pauses_per_token + 1)


@functools.partial(jax.jit, static_argnames=('graphdef', 'options'))
def _generate(graphdef: nnx.GraphDef, state: nnx.State, prompt_BxP: jax.Array,
              lengths_B: jax.Array, rng: jax.Array, *, options: _Options) -> AdaptiveOutput:
  o = options
  t, s = o.max_new_tokens, o.max_steps
  answer_banned = tuple(sorted({*o.banned_ids, o.pause_id, o.ask_id}))
  with parallel.activation_sharding(o.mesh, o.rules):
    model = nnx.merge(graphdef, state)
    tokens_BxP, positions_BxP, segments_BxP = decoding._left_align(  # pylint: disable=protected-access
        prompt_BxP, lengths_B, o.pad_id)
    tokens_BxP = parallel.constrain(tokens_BxP, ('batch', 'length'))
    b, p = tokens_BxP.shape
    logits_BxV, feed_state, feed = decoding.prefill(graphdef, model, tokens_BxP, positions_BxP,
                                                    segments_BxP, lengths_B, s, o.use_cache,
                                                    whole_model=True)

    def cond(carry):
      j, done_B = carry[0], carry[6]
      return (j < s) & ~jnp.all(done_B)

    def body(carry):
      j, params, logits_BxV, feed_state, out_BxT, pauses_BxT, done_B, i_B, k_B, rng, fed = carry
      rng, step_rng = jax.random.split(rng)
      # Asking is allowed while this token's pauses are under the budget.
      may_ask_B = k_B < o.max_pauses_per_token
      ask_logit_B = jnp.where(may_ask_B, logits_BxV[:, o.ask_id], -jnp.inf)
      logits_BxV = decoding._ban(logits_BxV, answer_banned)  # pylint: disable=protected-access
      logits_BxV = logits_BxV.at[:, o.ask_id].set(ask_logit_B)
      choice_B = decoding._next_token(  # pylint: disable=protected-access
          logits_BxV, step_rng, o.temperature, o.top_k)
      asks_B = (choice_B == o.ask_id) & ~done_B
      answers_B = ~asks_B & ~done_B
      token_B = jnp.where(done_B, o.pad_id, choice_B)
      rows = jnp.arange(b)
      col_B = jnp.minimum(i_B, t - 1)
      out_BxT = out_BxT.at[rows, col_B].set(jnp.where(answers_B, token_B, out_BxT[rows, col_B]))
      pauses_BxT = pauses_BxT.at[rows, col_B].set(
          jnp.where(answers_B, k_B, pauses_BxT[rows, col_B]))
      fed_B = jnp.where(asks_B, o.pause_id, token_B)
      if o.return_fed:
        fed = fed.at[:, j].set(jnp.where(done_B, o.pad_id, fed_B))
      i_B = i_B + answers_B
      k_B = jnp.where(answers_B, 0, k_B + asks_B)
      ended_B = answers_B & (i_B >= t)
      if o.eos_id is not None:
        ended_B = ended_B | (answers_B & (token_B == o.eos_id))
      done_B = done_B | ended_B
      logits_BxV, feed_state = feed(params, feed_state, fed_B, j)
      return (j + 1, params, logits_BxV, feed_state, out_BxT, pauses_BxT, done_B, i_B, k_B,
              rng, fed)

    zeros_B = jnp.zeros((b,), jnp.int32)
    fed = jnp.full((b, s), o.pad_id, jnp.int32) if o.return_fed else jnp.zeros((), jnp.int32)
    carry = (jnp.zeros((), jnp.int32), state, logits_BxV, feed_state,
             jnp.full((b, t), o.pad_id, jnp.int32), jnp.zeros((b, t), jnp.int32),
             jnp.zeros((b,), bool), zeros_B, zeros_B, rng, fed)
    carry = jax.lax.while_loop(cond, body, carry)
  out_BxT, pauses_BxT, i_B, k_B, fed = carry[4], carry[5], carry[7], carry[8], carry[10]
  if not o.return_fed:
    return AdaptiveOutput(out_BxT, pauses_BxT)
  return AdaptiveOutput(out_BxT, pauses_BxT, fed,
                        i_B + jnp.sum(pauses_BxT, axis=1) + k_B)


def generate_adaptive(model: Transformer, prompt_BxP: jax.Array, *, max_new_tokens: int,
                      pause_id: int, ask_id: int, max_pauses_per_token: int,
                      prompt_lengths_B: jax.Array | None = None, eos_id: int | None = None,
                      banned_ids: Sequence[int] = (), temperature: float = 0.0,
                      top_k: int | None = None, rng: jax.Array | None = None, pad_id: int = 0,
                      use_cache: bool = True, return_fed: bool = False,
                      mesh: Mesh | None = None,
                      rules: parallel.LogicalRules = parallel.DEFAULT_RULES) -> AdaptiveOutput:
  """Decodes max_new_tokens after right-padded prompts, pausing whenever the model asks.

  Args mirror `decoding.generate`'s, plus:
    pause_id: the `<pause>` fed when the model asks.
    ask_id: the model's ask-for-a-pause output class.
    max_pauses_per_token: the per-token budget; 0 decodes like `generate` with
      the ask class banned.
    return_fed: also return every token fed after the prompt (a test hook).
  The cache holds P + max_new_tokens * (max_pauses_per_token + 1) slots.
  """
  b, p = prompt_BxP.shape
  if max_new_tokens < 1:
    raise ValueError(f'max_new_tokens={max_new_tokens} must be >= 1.')
  if (isinstance(max_pauses_per_token, bool) or not isinstance(max_pauses_per_token, int)
      or max_pauses_per_token < 0):
    raise ValueError(f'max_pauses_per_token={max_pauses_per_token!r} must be an integer >= 0.')
  vocab_size = model.config.vocab_size
  for label, i in (('pause_id', pause_id), ('ask_id', ask_id)):
    if not 0 < i < vocab_size:
      raise ValueError(f'{label}={i} is not an id of the model\'s vocabulary '
                       f'(vocab_size {vocab_size}).')
  if pause_id == ask_id:
    raise ValueError(f'pause_id and ask_id are both {ask_id}: the ask class is its own id.')
  steps = max_new_tokens * (max_pauses_per_token + 1)
  if p + steps > model.config.max_len:
    raise ValueError(
        f'prompt length {p} + max_new_tokens {max_new_tokens} x (max_pauses_per_token '
        f'{max_pauses_per_token} + 1) exceeds the model\'s max_len={model.config.max_len}.')
  decoding.check_sampling(model, temperature, top_k, rng)
  options = _Options(max_new_tokens=max_new_tokens, max_pauses_per_token=max_pauses_per_token,
                     pause_id=int(pause_id), ask_id=int(ask_id), eos_id=eos_id, pad_id=pad_id,
                     banned_ids=tuple(int(i) for i in banned_ids),
                     temperature=float(temperature), top_k=top_k, use_cache=use_cache,
                     return_fed=return_fed, mesh=mesh, rules=rules)
  if prompt_lengths_B is None:
    prompt_lengths_B = jnp.full((b,), p, jnp.int32)
  rng = jax.random.key(0) if rng is None else rng
  graphdef, state = nnx.split(model)
  return _generate(graphdef, state, jnp.asarray(prompt_BxP, jnp.int32),
                   jnp.asarray(prompt_lengths_B, jnp.int32), rng, options=options)
