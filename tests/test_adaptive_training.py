"""Adaptive pauses (Catch Your Breath): vocabulary, unrolled data, the CYB losses, training."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import seqio

from pause_flax import parallel
from pause_flax.data import adaptive as adaptive_data
from pause_flax.data import pipeline
from pause_flax.data import tasks
from pause_flax.model import transformer
from pause_flax.training import adaptive
from pause_flax.training import checkpointing
from pause_flax.training import loss as loss_lib
from pause_flax.training import optimizer as optimizer_lib
from pause_flax.training import trainer as trainer_lib
from pause_flax.vocab import AdaptivePauseVocabulary, PauseVocabulary

BYTES = seqio.ByteVocabulary()
PAUSE, ASK = 259, 260


# -- vocabulary -------------------------------------------------------------------


def test_vocabulary_has_an_output_only_ask_id_that_never_decodes():
  vocab = AdaptivePauseVocabulary(BYTES)
  assert (vocab.pause_id, vocab.ask_id, vocab.vocab_size) == (PAUSE, ASK, PAUSE + 2)
  ids = vocab.encode("ab") + [PAUSE, ASK] + vocab.encode("c")
  assert vocab.decode(ids) == "abc"
  assert vocab.decode_tf(np.array(ids, np.int32)).numpy().decode() == "abc"
  assert ASK not in vocab.encode("ab\x00\xff")
  assert vocab != PauseVocabulary(BYTES) and PauseVocabulary(BYTES) != vocab
  assert vocab == AdaptivePauseVocabulary(BYTES)


# -- unrolled data ----------------------------------------------------------------


def _first_batch(name, lengths, batch=4):
  ds = pipeline.get_dataset(name, lengths, batch, shuffle=False, num_epochs=1)
  return next(ds.as_numpy_iterator())


@pytest.mark.parametrize("task,lengths", [
    ("synthetic_addition", {"inputs": 24, "targets": 8}),   # prefix LM: targets unrolled
    ("synthetic_lm", {"targets": 16}),                       # LM: every position
])
def test_unrolled_batches_are_the_standard_ones_with_k_pauses_per_scored_position(
    task, lengths):
  k = 2
  name = tasks.adaptive_variant(task, max_pauses=k)
  assert name == f"{task}_cyb2" and adaptive_data.max_pauses(name) == k
  assert adaptive_data.base_task(name) == task
  assert tasks.get_vocabulary(name).ask_id == tasks.get_vocabulary(task).vocab_size + 1
  std, unrolled = _first_batch(task, lengths), _first_batch(name, lengths)
  length = adaptive_data.unrolled_length(lengths, k)
  assert length == sum(lengths.values()) + k * lengths["targets"]
  assert unrolled["decoder_input_tokens"].shape == (4, length)
  for r in range(4):
    steps = unrolled["decoder_pause_steps"][r]
    inputs = unrolled["decoder_input_tokens"][r]
    weights_std = std["decoder_loss_weights"][r]
    scored = int((weights_std > 0).sum())
    # Every pause slot holds <pause>, and follows steps 0, 1, ..., K.
    assert np.all(inputs[steps > 0] == PAUSE)
    assert np.all(inputs[steps == 0] != PAUSE)
    starts = np.flatnonzero((steps == 0) & (unrolled["decoder_loss_weights"][r] > 0))
    assert len(starts) == scored
    for j in starts:
      np.testing.assert_array_equal(steps[j:j + k + 1], np.arange(k + 1))
      for f in ("decoder_target_tokens", "decoder_loss_weights"):
        assert len(set(unrolled[f][r][j:j + k + 1].tolist())) == 1
    # Without the pause slots, exactly the standard features (padding beyond).
    n = std["decoder_input_tokens"].shape[1]
    for f in ("decoder_input_tokens", "decoder_target_tokens", "decoder_loss_weights"):
      np.testing.assert_array_equal(unrolled[f][r][steps == 0][:n], std[f][r])
    assert np.all(steps[n + k * scored:] == 0) and (steps > 0).sum() == k * scored


def test_bad_settings_are_refused():
  with pytest.raises(ValueError, match="max_pauses=-1"):
    tasks.adaptive_variant("synthetic_lm", max_pauses=-1)
  with pytest.raises(ValueError, match="already has pauses"):
    tasks.adaptive_variant("synthetic_addition_pause", max_pauses=2)
  with pytest.raises(ValueError, match="pack=True"):
    tasks.get_feature_converter(tasks.adaptive_variant("synthetic_lm", max_pauses=1),
                                pack=True)
  with pytest.raises(ValueError, match="discount"):
    adaptive.AdaptivePauses(discount=0.0)
  with pytest.raises(ValueError, match="loss='xy'"):
    adaptive.AdaptivePauses(loss="xy")


# -- the losses against a hand computation --------------------------------------------

V = 6            # ids 0..4 ordinary, 5 = ask
ASK_SMALL = 5


def _softmax(x):
  e = np.exp(x - x.max())
  return e / e.sum()


def _one_group(k, seed=0, y=2):
  """[1, K+1] slots of one group (target y) plus a trailing unscored slot."""
  logits = np.random.default_rng(seed).normal(size=(1, k + 2, V)).astype(np.float32) * 2
  targets = np.full((1, k + 2), y, np.int32)
  weights = np.array([[1.0] * (k + 1) + [0.0]], np.float32)
  steps = np.array([list(range(k + 1)) + [0]], np.int32)
  return logits, targets, weights, steps


def _hand_terms(logits, y, k):
  p = [_softmax(logits[0, i].astype(np.float64)) for i in range(k + 1)]
  q = [pi[ASK_SMALL] for pi in p]
  a = [pi[y] for pi in p]
  s = [math.prod(q[:i]) for i in range(k + 1)]
  return p, q, a, s


@pytest.mark.parametrize("k", [0, 1, 3])
def test_cyb_ap_matches_a_hand_computation(k):
  logits, targets, weights, steps = _one_group(k, seed=k)
  gamma = 0.8
  opts = adaptive.AdaptivePauses(max_pauses=k, discount=gamma)
  sums, extra = adaptive.cyb_loss_sums(jnp.asarray(logits), targets, weights, steps,
                                       ask_id=ASK_SMALL, options=opts)
  _, q, a, s = _hand_terms(logits, 2, k)
  value = sum(gamma ** i * s[i] * a[i] for i in range(k)) + gamma ** k * s[k] * a[k] / (1 - q[k])
  np.testing.assert_allclose(float(sums.loss), -math.log(value), rtol=1e-5)
  assert float(sums.weight) == 1.0
  np.testing.assert_allclose(float(extra["expected_pauses"]), sum(s[1:]), rtol=1e-5, atol=1e-7)


def test_k0_is_the_cross_entropy_without_the_ask_class():
  logits, targets, weights, steps = _one_group(0, seed=5)
  sums, _ = adaptive.cyb_loss_sums(jnp.asarray(logits), targets, weights, steps,
                                   ask_id=ASK_SMALL, options=adaptive.AdaptivePauses(0))
  ce = loss_lib.cross_entropy_sums(jnp.asarray(logits[:, :1, :ASK_SMALL]), targets[:, :1],
                                   weights[:, :1])
  np.testing.assert_allclose(float(sums.loss), float(ce.loss), rtol=1e-6)


@pytest.mark.parametrize("budget,penalty", [(0.0, 0.5), (0.1, 2.0), (5.0, 2.0)])
def test_cyb_dp_adds_the_budget_term(budget, penalty):
  k = 2
  logits, targets, weights, steps = _one_group(k, seed=7)
  base = adaptive.AdaptivePauses(max_pauses=k)
  plain, _ = adaptive.cyb_loss_sums(jnp.asarray(logits), targets, weights, steps,
                                    ask_id=ASK_SMALL, options=base)
  dp, extra = adaptive.cyb_loss_sums(
      jnp.asarray(logits), targets, weights, steps, ask_id=ASK_SMALL,
      options=dataclasses.replace(base, budget_penalty=penalty, pause_budget=budget))
  _, _, _, s = _hand_terms(logits, 2, k)
  expected_pauses = s[1] + s[2]
  np.testing.assert_allclose(float(extra["expected_pauses"]), expected_pauses, rtol=1e-5)
  np.testing.assert_allclose(float(dp.loss - plain.loss),
                             penalty * max(0.0, expected_pauses - budget), rtol=1e-4, atol=1e-6)


def test_cyb_va_matches_a_hand_computation():
  k, halt, beta = 2, 0.3, 0.5
  logits, targets, weights, steps = _one_group(k, seed=11)
  opts = adaptive.AdaptivePauses(max_pauses=k, loss="va", va_prior_halt=halt, va_kl_weight=beta)
  sums, _ = adaptive.cyb_loss_sums(jnp.asarray(logits), targets, weights, steps,
                                   ask_id=ASK_SMALL, options=opts)
  _, q, a, s = _hand_terms(logits, 2, k)
  h = [s[0] * (1 - q[0]), s[1] * (1 - q[1]), s[2]]
  prior = [halt, (1 - halt) * halt, (1 - halt) ** 2]
  answer = [a[i] / (1 - q[i]) for i in range(k + 1)]
  value = (sum(h[i] * -math.log(answer[i]) for i in range(k + 1)) +
           beta * sum(h[i] * math.log(h[i] / prior[i]) for i in range(k + 1)))
  np.testing.assert_allclose(float(sums.loss), value, rtol=1e-5)


def test_greedy_statistics_and_zero_weight_groups():
  k = 2
  logits = np.zeros((1, 6, V), np.float32)
  logits[0, 0, ASK_SMALL] = 5.0     # group 1: asks at step 0 ...
  logits[0, 1, 3] = 5.0             # ... answers 3 (its target) at step 1
  logits[0, 3:6, ASK_SMALL] = 5.0   # group 2 asks throughout: answers at step K
  logits[0, 5, 1] = 4.0             # the best answer at step 2 is 1; target is 4
  targets = np.array([[3, 3, 3, 4, 4, 4]], np.int32)
  steps = np.array([[0, 1, 2, 0, 1, 2]], np.int32)
  opts = adaptive.AdaptivePauses(max_pauses=k)
  for w2, correct, pauses in ((1.0, 1.0, 3.0), (0.0, 1.0, 1.0)):
    weights = np.array([[1, 1, 1, w2, w2, w2]], np.float32)
    sums, extra = adaptive.cyb_loss_sums(jnp.asarray(logits), targets, weights, steps,
                                         ask_id=ASK_SMALL, options=opts)
    assert float(sums.correct) == correct and float(extra["greedy_pauses"]) == pauses
  # A weight-0 group has exactly zero gradient.
  grad = jax.grad(lambda x: adaptive.cyb_loss_sums(
      x, targets, weights, steps, ask_id=ASK_SMALL, options=opts)[0].loss)(jnp.asarray(logits))
  assert np.all(np.asarray(grad)[0, 3:] == 0) and np.any(np.asarray(grad)[0, :3] != 0)


# -- training ---------------------------------------------------------------------

CONFIG = dataclasses.replace(transformer.model_config("tiny"), vocab_size=ASK + 1, max_len=64)


def _adaptive_batch(k, batch=8, length=8, seed=0):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(3, 40, size=(batch, length + 1)).astype(np.int32)
  reps = k + 1
  inputs = np.repeat(tokens[:, :-1], reps, axis=1)
  steps = np.tile(np.arange(reps), length)[None].repeat(batch, 0).astype(np.int32)
  inputs[steps > 0] = PAUSE
  targets = np.repeat(tokens[:, 1:], reps, axis=1)
  return {"decoder_input_tokens": inputs, "decoder_target_tokens": targets,
          "decoder_loss_weights": np.ones_like(targets, np.float32),
          "decoder_pause_steps": steps}


def test_a_trainer_with_adaptive_pauses_learns_and_reports_pauses():
  mesh = parallel.make_mesh()
  opts = adaptive.AdaptivePauses(max_pauses=2, budget_penalty=0.1)
  trainer = trainer_lib.Trainer(
      CONFIG, optimizer_lib.make_optimizer(3e-3, weight_decay=0.0), mesh,
      options=trainer_lib.StepOptions(adaptive=opts, ask_id=ASK, accum_steps=2))
  state = trainer.init(0)
  batch = jax.device_put(_adaptive_batch(2), trainer.batch_sharding)
  losses = []
  for _ in range(8):
    state, metrics = trainer.train_step(state, batch)
    losses.append(float(metrics["loss"]))
  assert all(np.isfinite(losses)) and losses[-1] < losses[0]
  assert 0 <= float(metrics["expected_pauses"]) <= 2
  assert 0 <= float(metrics["greedy_pauses"]) <= 2
  assert float(metrics["weighted_tokens"]) == 8 * 8  # one per scored position, not per slot
  with pytest.raises(ValueError, match="ask_id"):
    trainer_lib.Trainer(CONFIG, optimizer_lib.make_optimizer(1e-3), mesh,
                        options=trainer_lib.StepOptions(adaptive=opts))


def test_a_pause_checkpoint_converts_by_adding_the_ask_row(tmp_path):
  mesh = parallel.make_mesh(data=2, fsdp=2, tensor=2)
  pause_cfg = dataclasses.replace(CONFIG, vocab_size=PAUSE + 1)
  tx = lambda: optimizer_lib.make_optimizer(1e-3)
  pause = trainer_lib.Trainer(pause_cfg, tx(), mesh)
  old = pause.init(1).params
  ckpt = checkpointing.Checkpointer(str(tmp_path / "checkpoints"))
  ckpt.save(3, old, pause.init(1).opt_state, None,
            {"model_config": dataclasses.asdict(pause_cfg)})
  ckpt.close()
  cyb = trainer_lib.Trainer(CONFIG, tx(), mesh,
                            options=trainer_lib.StepOptions(adaptive=adaptive.AdaptivePauses(),
                                                            ask_id=ASK))
  new = checkpointing.load_params(str(tmp_path), cyb)
  fresh = cyb.init(0).params
  for name in ("embedding_VxD", "head_VxD"):
    n, o, f = (np.asarray(t[name]) for t in (new, old, fresh))
    np.testing.assert_array_equal(n[:PAUSE + 1], o[:PAUSE + 1])  # the pause row kept
    np.testing.assert_array_equal(n[ASK], f[ASK])                 # ask: a new model's row
  np.testing.assert_array_equal(np.asarray(new["final_norm"]["scale"]),
                                np.asarray(old["final_norm"]["scale"]))
