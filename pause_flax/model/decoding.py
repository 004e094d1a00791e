"""Batched autoregressive decoding with a KV cache, and scoring of targets.

Pause knowledge here is only the prompt (`build_prompt`: prefix + M_inf pauses)
and the banned ids (pass `banned_ids=(pause_id,)` so a pause is never emitted);
the model stays pause-agnostic. The prompt, pauses included, is prefilled in one
pass; the model's outputs at pause positions are never read, and generation
starts after the last pause.

Prompts of different lengths: callers pass prompts right-padded to [B, P] with
their lengths. Each row is left-aligned internally (rolled right so every prompt
ends at column P - 1); the padding gets segment id 0, so no real token attends
to it, and positions count from each row's first real token, so a row decodes
exactly as it would alone. All rows then write the same cache slot per step.

Outputs have a fixed length (as seqio.Evaluator expects): [B, max_new_tokens];
a row that emitted EOS keeps the EOS and is padded with `pad_id` (0) after it.
Decoding stops early once every row has ended.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from pause_flax import parallel
from pause_flax.model.transformer import Transformer, init_cache


def build_prompt(prefix_ids: Sequence[int], num_pauses: int, pause_id: int) -> list[int]:
  """prefix + M_inf pauses (num_pauses = 0 gives the standard prompt)."""
  if num_pauses < 0:
    raise ValueError(f'num_pauses={num_pauses} must be >= 0.')
  return [*prefix_ids, *[pause_id] * num_pauses]


def pad_prompts(prompts: Sequence[Sequence[int]], length: int | None = None,
                pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Right-pads token lists to [B, length]; returns (prompt_BxP, lengths_B)."""
  lengths = np.array([len(p) for p in prompts], np.int32)
  length = int(lengths.max()) if length is None else length
  if lengths.min() < 1 or lengths.max() > length:
    raise ValueError(f'prompt lengths {lengths.tolist()} must lie in [1, {length}].')
  out = np.full((len(prompts), length), pad_id, np.int32)
  for row, p in enumerate(prompts):
    out[row, :len(p)] = p
  return out, lengths


@dataclasses.dataclass(frozen=True)
class _Options:
  """Static (hashable) decoding options: one compiled program per value."""
  max_new_tokens: int
  eos_id: int | None
  pad_id: int
  banned_ids: tuple[int, ...]
  temperature: float
  top_k: int | None
  use_cache: bool
  return_logits: bool
  mesh: Mesh | None
  rules: parallel.LogicalRules


def _left_align(prompt_BxP: jax.Array, lengths_B: jax.Array, pad_id: int,
                ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Right-padded prompts -> left-padded (tokens, positions, segment ids)."""
  p = prompt_BxP.shape[1]
  shift_Bx1 = (p - lengths_B)[:, None]
  cols_P = jnp.arange(p, dtype=jnp.int32)
  src_BxP = (cols_P[None] - shift_Bx1) % p
  real_BxP = cols_P[None] >= shift_Bx1
  tokens_BxP = jnp.where(real_BxP, jnp.take_along_axis(prompt_BxP, src_BxP, axis=1), pad_id)
  positions_BxP = jnp.where(real_BxP, cols_P[None] - shift_Bx1, 0)
  return tokens_BxP, positions_BxP, real_BxP.astype(jnp.int32)


def _ban(logits_BxV: jax.Array, banned_ids: tuple[int, ...]) -> jax.Array:
  if not banned_ids:
    return logits_BxV
  return logits_BxV.at[..., jnp.array(banned_ids)].set(-jnp.inf)


def _next_token(logits_BxV: jax.Array, rng: jax.Array, temperature: float,
                top_k: int | None) -> jax.Array:
  """Greedy (temperature 0) or temperature / top-k sampling."""
  if temperature == 0.0:
    return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
  logits_BxV = logits_BxV / temperature
  if top_k is not None:
    kth_Bx1 = jax.lax.top_k(logits_BxV, top_k)[0][:, -1:]
    logits_BxV = jnp.where(logits_BxV < kth_Bx1, -jnp.inf, logits_BxV)
  return jax.random.categorical(rng, logits_BxV, axis=-1).astype(jnp.int32)


def prefill(graphdef: nnx.GraphDef, model: Transformer, tokens_BxP: jax.Array,
            positions_BxP: jax.Array, segments_BxP: jax.Array, lengths_B: jax.Array,
            new: int, use_cache: bool, whole_model: bool = False):
  """Runs left-aligned prompts; returns (last logits [B, V], feed state, feed).

  `feed(params, state, token_B, i)` feeds token_B as the i-th position after
  the prompt (i < new) and returns the next logits and the new state: with the
  KV cache (sized for P + new) one position at a time, else, as the reference
  path, a full forward over a fixed [B, P + new] buffer. `generate` and
  `adaptive_decoding.generate_adaptive` decode through it. By default only the
  positions read are projected to logits (`model.hidden`, `model.logits`);
  `whole_model` calls the model itself instead, for wrappers that change its
  logits.
  """
  b, p = tokens_BxP.shape
  positions_BxN = jnp.concatenate(
      [positions_BxP, lengths_B[:, None] + jnp.arange(new, dtype=jnp.int32)[None]], axis=1)
  segments_BxN = jnp.concatenate([segments_BxP, jnp.ones((b, new), jnp.int32)], axis=1)

  def last_logits(m, tokens_BxL, positions_BxL, segments_BxL, at, cache=None):
    """Logits at position `at` (None: the last), and the cache when given one."""
    kw = dict(positions_BxL=positions_BxL, segment_ids_BxL=segments_BxL)
    if cache is not None:
      kw["cache"] = cache
    out = m(tokens_BxL, **kw) if whole_model else m.hidden(tokens_BxL, **kw)
    x, cache = out if cache is not None else (out, None)
    x = x[:, -1:] if at is None else jax.lax.dynamic_slice_in_dim(x, at, 1, axis=1)
    logits_BxV = (x if whole_model else m.logits(x))[:, 0]
    return logits_BxV, cache

  if use_cache:
    logits_BxV, feed_state = last_logits(model, tokens_BxP, positions_BxP, segments_BxP, None,
                                         init_cache(model.config, b, p + new))
  else:
    feed_state = jnp.concatenate([tokens_BxP, jnp.zeros((b, new), jnp.int32)], axis=1)
    logits_BxV, _ = last_logits(model, tokens_BxP, positions_BxP, segments_BxP, None)

  def feed(params, feed_state, token_B, i):
    m = nnx.merge(graphdef, params)
    if use_cache:
      positions_Bx1 = jax.lax.dynamic_slice_in_dim(positions_BxN, p + i, 1, axis=1)
      return last_logits(m, token_B[:, None], positions_Bx1, jnp.ones((b, 1), jnp.int32), None,
                         feed_state)
    buffer_BxN = jax.lax.dynamic_update_slice(feed_state, token_B[:, None], (0, p + i))
    logits_BxV, _ = last_logits(m, buffer_BxN, positions_BxN, segments_BxN, p + i)
    return logits_BxV, buffer_BxN

  return logits_BxV, feed_state, feed


@functools.partial(jax.jit, static_argnames=('graphdef', 'options'))
def _generate(graphdef: nnx.GraphDef, state: nnx.State, prompt_BxP: jax.Array,
              lengths_B: jax.Array, rng: jax.Array, *, options: _Options):
  o = options
  t = o.max_new_tokens
  with parallel.activation_sharding(o.mesh, o.rules):
    model = nnx.merge(graphdef, state)
    tokens_BxP, positions_BxP, segments_BxP = _left_align(prompt_BxP, lengths_B, o.pad_id)
    tokens_BxP = parallel.constrain(tokens_BxP, ('batch', 'length'))
    b, p = tokens_BxP.shape

    logits_BxV, feed_state, feed = prefill(graphdef, model, tokens_BxP, positions_BxP,
                                           segments_BxP, lengths_B, t, o.use_cache)

    def cond(carry):
      i, _, _, _, _, done_B, _, _ = carry
      return (i < t) & ~jnp.all(done_B)

    def body(carry):
      # The parameters ride in the carry: NNX modules must not close over
      # tracers of an outer trace.
      i, params, logits_BxV, feed_state, out_BxT, done_B, rng, seen_BxTxV = carry
      rng, step_rng = jax.random.split(rng)
      token_B = _next_token(_ban(logits_BxV, o.banned_ids), step_rng, o.temperature, o.top_k)
      token_B = jnp.where(done_B, o.pad_id, token_B)
      out_BxT = out_BxT.at[:, i].set(token_B)
      if o.eos_id is not None:
        done_B = done_B | (token_B == o.eos_id)
      if o.return_logits:
        seen_BxTxV = seen_BxTxV.at[:, i].set(logits_BxV)
      logits_BxV, feed_state = feed(params, feed_state, token_B, i)
      return i + 1, params, logits_BxV, feed_state, out_BxT, done_B, rng, seen_BxTxV

    seen_BxTxV = (jnp.zeros((b, t, logits_BxV.shape[-1]), jnp.float32) if o.return_logits
                  else jnp.zeros((), jnp.float32))
    carry = (jnp.zeros((), jnp.int32), state, logits_BxV, feed_state,
             jnp.full((b, t), o.pad_id, jnp.int32), jnp.zeros((b,), bool), rng, seen_BxTxV)
    *_, out_BxT, _, _, seen_BxTxV = jax.lax.while_loop(cond, body, carry)
  return (out_BxT, seen_BxTxV) if o.return_logits else out_BxT


def check_sampling(model: Transformer, temperature: float, top_k: int | None,
                   rng: jax.Array | None) -> None:
  """The sampling settings `generate` and `generate_adaptive` accept."""
  if temperature < 0 or (temperature > 0 and rng is None):
    raise ValueError(f'temperature={temperature}: use 0 (greedy), or > 0 with an rng key.')
  if top_k is not None and not 1 <= top_k <= model.config.padded_vocab_size:
    raise ValueError(f'top_k={top_k} must lie in [1, padded vocab size].')


def generate(model: Transformer, prompt_BxP: jax.Array, *, max_new_tokens: int,
             prompt_lengths_B: jax.Array | None = None, eos_id: int | None = None,
             banned_ids: Sequence[int] = (), temperature: float = 0.0,
             top_k: int | None = None, rng: jax.Array | None = None, pad_id: int = 0,
             use_cache: bool = True, return_logits: bool = False, mesh: Mesh | None = None,
             rules: parallel.LogicalRules = parallel.DEFAULT_RULES,
             ) -> jax.Array | tuple[jax.Array, jax.Array]:
  """Decodes max_new_tokens after right-padded prompts; returns int32 [B, T].

  Args:
    model: the Transformer.
    prompt_BxP: prompts (prefix + pauses), right-padded; lengths >= 1.
    max_new_tokens: T, the fixed output length.
    prompt_lengths_B: real length of each prompt (default: P for all rows).
    eos_id: a row stops after emitting it (kept in the output, then pad_id).
    banned_ids: ids whose logit is set to -inf before choosing (e.g. the pause).
    temperature: 0 for greedy; otherwise sample softmax(logits / temperature).
    top_k: sample only among the k largest logits.
    rng: PRNG key, required when sampling.
    pad_id: emitted by rows that ended; fills the prompt's padding.
    use_cache: False recomputes the full sequence each step (a reference and
      a benchmark baseline; same tokens, much slower).
    return_logits: also return the model's next-token logits at every step,
      [B, T, V] float32, before banning and temperature (a test hook).
    mesh, rules: shard activations and the cache along batch over this mesh.
  """
  b, p = prompt_BxP.shape
  if max_new_tokens < 1:
    raise ValueError(f'max_new_tokens={max_new_tokens} must be >= 1.')
  if p + max_new_tokens > model.config.max_len:
    raise ValueError(
        f'prompt length {p} + max_new_tokens {max_new_tokens} exceeds the model\'s '
        f'max_len={model.config.max_len}.')
  check_sampling(model, temperature, top_k, rng)
  options = _Options(max_new_tokens=max_new_tokens, eos_id=eos_id, pad_id=pad_id,
                     banned_ids=tuple(int(i) for i in banned_ids),
                     temperature=float(temperature), top_k=top_k, use_cache=use_cache,
                     return_logits=return_logits, mesh=mesh, rules=rules)
  if prompt_lengths_B is None:
    prompt_lengths_B = jnp.full((b,), p, jnp.int32)
  rng = jax.random.key(0) if rng is None else rng
  graphdef, state = nnx.split(model)
  return _generate(graphdef, state, jnp.asarray(prompt_BxP, jnp.int32),
                   jnp.asarray(prompt_lengths_B, jnp.int32), rng, options=options)


@functools.partial(jax.jit, static_argnames=('graphdef', 'banned_ids', 'pad_id', 'mesh',
                                             'rules', 'return_is_greedy'))
def _score(graphdef: nnx.GraphDef, state: nnx.State, prompt_BxP: jax.Array,
           target_BxT: jax.Array, prompt_lengths_B: jax.Array, target_lengths_B: jax.Array,
           *, banned_ids: tuple[int, ...], pad_id: int, mesh: Mesh | None,
           rules: parallel.LogicalRules, return_is_greedy: bool = False,
           ) -> jax.Array | tuple[jax.Array, jax.Array]:
  with parallel.activation_sharding(mesh, rules):
    model = nnx.merge(graphdef, state)
    tokens_BxP, positions_BxP, segments_BxP = _left_align(prompt_BxP, prompt_lengths_B, pad_id)
    b, p = tokens_BxP.shape
    t = target_BxT.shape[1]
    # Inputs: the prompt and all but the last target; outputs from column P-1 on.
    tokens_BxN = jnp.concatenate([tokens_BxP, target_BxT[:, :-1]], axis=1)
    positions_BxN = jnp.concatenate(
        [positions_BxP, prompt_lengths_B[:, None] + jnp.arange(t - 1, dtype=jnp.int32)], axis=1)
    segments_BxN = jnp.concatenate([segments_BxP, jnp.ones((b, t - 1), jnp.int32)], axis=1)
    h_BxNxD = model.hidden(tokens_BxN, positions_BxL=positions_BxN, segment_ids_BxL=segments_BxN)
    logits_BxTxV = _ban(model.logits(h_BxNxD[:, p - 1:]), banned_ids)
    logp_BxTxV = jax.nn.log_softmax(logits_BxTxV, axis=-1)
    logp_BxT = jnp.take_along_axis(logp_BxTxV, target_BxT[..., None], axis=-1)[..., 0]
    keep_BxT = jnp.arange(t)[None] < target_lengths_B[:, None]
    score_B = jnp.sum(jnp.where(keep_BxT, logp_BxT, 0.0), axis=-1)
    if not return_is_greedy:
      return score_B
    greedy_BxT = jnp.argmax(logits_BxTxV, axis=-1) == target_BxT
    return score_B, jnp.all(greedy_BxT | ~keep_BxT, axis=-1)


def score(model: Transformer, prompt_BxP: jax.Array, target_BxT: jax.Array, *,
          prompt_lengths_B: jax.Array | None = None, target_lengths_B: jax.Array | None = None,
          banned_ids: Sequence[int] = (), pad_id: int = 0, mesh: Mesh | None = None,
          rules: parallel.LogicalRules = parallel.DEFAULT_RULES,
          return_is_greedy: bool = False) -> jax.Array | tuple[jax.Array, jax.Array]:
  """Sum of log p(target | prompt) per row, float32 [B], for rank classification.

  Prompts and targets are right-padded with their lengths (default: full
  width). Each target token is scored given the prompt and the target tokens
  before it; with `banned_ids` the distribution is renormalised without them,
  matching what `generate` could emit. `return_is_greedy` also returns, per
  row, whether every target token is the argmax of its (banned) distribution,
  i.e. whether greedy decoding would emit the target (bool [B]).
  """
  b, p = prompt_BxP.shape
  t = target_BxT.shape[1]
  if p + t - 1 > model.config.max_len:
    raise ValueError(f'prompt {p} + target {t} - 1 exceeds max_len={model.config.max_len}.')
  if prompt_lengths_B is None:
    prompt_lengths_B = jnp.full((b,), p, jnp.int32)
  if target_lengths_B is None:
    target_lengths_B = jnp.full((b,), t, jnp.int32)
  graphdef, state = nnx.split(model)
  return _score(graphdef, state, jnp.asarray(prompt_BxP, jnp.int32),
                jnp.asarray(target_BxT, jnp.int32), jnp.asarray(prompt_lengths_B, jnp.int32),
                jnp.asarray(target_lengths_B, jnp.int32),
                banned_ids=tuple(int(i) for i in banned_ids), pad_id=pad_id, mesh=mesh,
                rules=rules, return_is_greedy=return_is_greedy)
