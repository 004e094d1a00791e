"""Low-confidence (DIT) pauses: the batch transform, the scored train step, resume."""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from pause_flax import parallel
from pause_flax.data import low_confidence as lc
from pause_flax.model import transformer
from pause_flax.training import checkpointing
from pause_flax.training import loop
from pause_flax.training import low_confidence as scorer_lib
from pause_flax.training import optimizer as optimizer_lib
from pause_flax.training import run_dir
from pause_flax.training import trainer as trainer_lib

PAUSE = 299
INPUTS, TARGETS, WEIGHTS = lc.INPUTS, lc.TARGETS, lc.WEIGHTS
SEGMENTS, POSITIONS = lc.SEGMENTS, lc.POSITIONS


# -- a plain-Python reference ---------------------------------------------------


def reference(batch, losses, pause_id, num_pauses=None, fraction=None):
  """The transform written with lists, one row and one token at a time."""
  out = {k: [] for k in batch}
  for r in range(batch[TARGETS].shape[0]):
    row = {k: batch[k][r].tolist() for k in batch}
    length = len(row[TARGETS])
    seg = row.get(SEGMENTS, [1] * length)
    chosen = set()
    for s in set(seg):
      cands = [j for j in range(length) if seg[j] == s and row[WEIGHTS][j] > 0]
      score = lambda j: np.inf if np.isnan(losses[r][j]) else losses[r][j]
      cands.sort(key=lambda j: (-score(j), j))
      k = num_pauses if num_pauses is not None else int(np.round(fraction * len(cands)))
      chosen |= set(cands[:k])
    new = {k: [] for k in batch}
    added = {}  # segment -> pauses so far
    for j in range(length):
      if j in chosen:
        added[seg[j]] = added.get(seg[j], 0) + 1
        slot = {INPUTS: row[INPUTS][j], TARGETS: pause_id, WEIGHTS: 0, SEGMENTS: seg[j]}
        if POSITIONS in row:
          slot[POSITIONS] = row[POSITIONS][j] + added[seg[j]] - 1
        for k in batch:
          new[k].append(slot[k])
      slot = {INPUTS: pause_id if j in chosen else row[INPUTS][j],
              TARGETS: row[TARGETS][j], WEIGHTS: row[WEIGHTS][j], SEGMENTS: seg[j]}
      if POSITIONS in row:
        slot[POSITIONS] = row[POSITIONS][j] + added.get(seg[j], 0)
      for k in batch:
        new[k].append(slot[k])
    for k in batch:
      out[k].append(new[k][:length])
  return {k: np.asarray(v, batch[k].dtype) for k, v in out.items()}


def lm_batch(rng, b=4, length=16, pad=3):
  """Unpacked rows: inputs are the targets shifted right, `pad` padding slots."""
  tokens = rng.integers(3, 250, size=(b, length)).astype(np.int32)
  tokens[:, length - pad:] = 0
  inputs = np.concatenate([np.zeros((b, 1), np.int32), tokens[:, :-1]], axis=1)
  return {INPUTS: inputs, TARGETS: tokens, WEIGHTS: (tokens > 0).astype(np.int32)}


def packed_batch(rng, b=3, length=24):
  """Packed rows of 2-4 segments, each starting with BOS, the tail padded."""
  out = {k: np.zeros((b, length), np.int32)
         for k in (INPUTS, TARGETS, WEIGHTS, SEGMENTS, POSITIONS)}
  for r in range(b):
    cuts = np.sort(rng.choice(np.arange(3, length - 2), size=rng.integers(2, 4),
                              replace=False))
    start = 0
    for s, end in enumerate(cuts, start=1):
      n = end - start
      toks = rng.integers(3, 250, size=n)
      out[TARGETS][r, start:end] = toks
      out[INPUTS][r, start + 1:end] = toks[:-1]
      out[WEIGHTS][r, start:end] = 1
      out[SEGMENTS][r, start:end] = s
      out[POSITIONS][r, start:end] = np.arange(n)
      start = end
  return out


def run(batch, losses, **kwargs):
  out = lc.insert_low_confidence_pauses(batch, jnp.asarray(losses), PAUSE, **kwargs)
  return {k: np.asarray(v) for k, v in out.items()}


# -- the transform's statistics with known losses ------------------------------


def test_pauses_land_exactly_before_the_k_worst_targets():
  rng = np.random.default_rng(0)
  batch = lm_batch(rng, pad=4)
  losses = rng.permutation(4 * 16).reshape(4, 16).astype(np.float32)  # distinct
  losses[batch[WEIGHTS] == 0] = 1e6   # padding is never a candidate
  k = 3
  out = run(batch, losses, num_pauses=k)
  for r in range(4):
    real = np.flatnonzero(batch[WEIGHTS][r])
    worst = set(batch[TARGETS][r, real[np.argsort(-losses[r, real])[:k]]].tolist())
    pause_slots = np.flatnonzero(out[TARGETS][r] == PAUSE)
    assert len(pause_slots) == k                       # 4 padding slots leave room
    # The target right after each pause is one of the k worst, and all of them get one.
    assert set(out[TARGETS][r, pause_slots + 1].tolist()) == worst
    assert (out[INPUTS][r, pause_slots + 1] == PAUSE).all()
    # No pause target is weighted; every real target keeps weight 1.
    assert (out[WEIGHTS][r, pause_slots] == 0).all()
    assert (out[WEIGHTS][r] == ((out[TARGETS][r] != PAUSE) & (out[TARGETS][r] > 0))).all()
    # The other tokens keep their order (the padding tail is what is cut).
    kept = out[TARGETS][r][out[TARGETS][r] != PAUSE]
    np.testing.assert_array_equal(kept, batch[TARGETS][r][:16 - k])
    # Still a next-token batch: each input is the previous target.
    np.testing.assert_array_equal(out[INPUTS][r, 1:], out[TARGETS][r, :-1])


def test_only_loss_bearing_targets_get_pauses():
  rng = np.random.default_rng(1)
  batch = lm_batch(rng, pad=3)
  batch[WEIGHTS][:, :6] = 0    # a finetuning prefix: weight 0
  losses = np.zeros((4, 16), np.float32)
  losses[:, :6] = 100.0        # the worst predictions, but in the prefix ...
  losses[:, 13:] = 100.0       # ... and in the padding
  losses[:, 9] = 5.0
  out = run(batch, losses, num_pauses=1)
  np.testing.assert_array_equal(out[TARGETS][:, 9], np.full(4, PAUSE))
  np.testing.assert_array_equal(out[TARGETS][:, :9], batch[TARGETS][:, :9])


def test_ties_go_to_the_earlier_target_and_few_candidates_cap_the_count():
  rng = np.random.default_rng(2)
  batch = lm_batch(rng, b=1, pad=0)
  batch[WEIGHTS][:] = 0
  batch[WEIGHTS][0, [4, 7, 11]] = 1
  losses = np.ones((1, 16), np.float32)
  out = run(batch, losses, num_pauses=2)
  assert np.flatnonzero(out[TARGETS][0] == PAUSE).tolist() == [4, 8]  # 4 and 7, shifted
  out = run(batch, losses, num_pauses=5)   # only 3 candidates
  assert np.flatnonzero(out[TARGETS][0] == PAUSE).tolist() == [4, 8, 13]
  losses[0, 11] = np.nan                   # NaN is the worst
  out = run(batch, losses, num_pauses=1)
  assert np.flatnonzero(out[TARGETS][0] == PAUSE).tolist() == [11]


def test_packed_segments_never_bleed():
  rng = np.random.default_rng(3)
  batch = packed_batch(rng)
  losses = rng.random((3, 24)).astype(np.float32)
  out = run(batch, losses, num_pauses=2)
  for r in range(3):
    last = batch[SEGMENTS][r].max()
    for s in range(1, last + 1):
      where = out[SEGMENTS][r] == s
      if not where.any():
        continue
      # Slots of a segment stay contiguous, positions count from 0 within it.
      slots = np.flatnonzero(where)
      assert (np.diff(slots) == 1).all()
      np.testing.assert_array_equal(out[POSITIONS][r, slots], np.arange(len(slots)))
      # Its real tokens are its own, in order (only the row's tail is cut).
      toks = out[TARGETS][r, slots]
      orig = batch[TARGETS][r, batch[SEGMENTS][r] == s]
      np.testing.assert_array_equal(toks[toks != PAUSE], orig[:len(toks[toks != PAUSE])])
      # A segment's first input is still its BOS (0) or a pause before its first target.
      assert out[INPUTS][r, slots[0]] == 0
      if s < last:  # not trimmed: exactly k pauses before its 2 worst targets
        assert (toks == PAUSE).sum() == 2
        seg_losses = losses[r, batch[SEGMENTS][r] == s]
        worst = set(orig[np.argsort(-seg_losses, kind="stable")[:2]].tolist())
        after = slots[toks == PAUSE] + 1
        assert set(out[TARGETS][r, after].tolist()) == worst
  # Padding stays padding.
  pad = out[SEGMENTS] == 0
  assert (out[TARGETS][pad] == 0).all() and (out[WEIGHTS][pad] == 0).all()


def test_fraction_counts_each_examples_loss_bearing_targets():
  rng = np.random.default_rng(4)
  batch = packed_batch(rng, b=4, length=40)
  losses = rng.random((4, 40)).astype(np.float32)
  out = run(batch, losses, fraction=0.25)
  chosen = np.asarray(lc.select_worst_targets(jnp.asarray(losses), batch[WEIGHTS],
                                              batch[SEGMENTS], fraction=0.25))
  for r in range(4):
    for s in range(1, batch[SEGMENTS][r].max() + 1):
      n = int((batch[SEGMENTS][r] == s).sum())
      assert chosen[r][batch[SEGMENTS][r] == s].sum() == np.round(0.25 * n)
  np.testing.assert_array_equal(out[TARGETS], reference(batch, losses, PAUSE,
                                                        fraction=0.25)[TARGETS])


@pytest.mark.parametrize("packed", [False, True])
def test_transform_matches_the_list_reference_on_random_batches(packed):
  rng = np.random.default_rng(5 + packed)
  for trial in range(10):
    batch = packed_batch(rng) if packed else lm_batch(rng, pad=int(rng.integers(0, 5)))
    if not packed:
      batch[WEIGHTS][:, :int(rng.integers(0, 6))] = 0
    # Few distinct values: many ties.
    losses = rng.integers(0, 4, size=batch[TARGETS].shape).astype(np.float32)
    k = int(rng.integers(1, 5))
    got = run(batch, losses, num_pauses=k)
    want = reference(batch, losses, PAUSE, num_pauses=k)
    for key in batch:
      np.testing.assert_array_equal(got[key], want[key], err_msg=f"{trial} {key}")


def test_transform_is_the_same_jitted_on_a_sharded_batch():
  rng = np.random.default_rng(7)
  batch = packed_batch(rng, b=8, length=24)
  losses = rng.random((8, 24)).astype(np.float32)
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]), ("data",))
  sharding = NamedSharding(mesh, P("data"))
  fn = jax.jit(lambda b, l: lc.insert_low_confidence_pauses(b, l, PAUSE, num_pauses=2))
  got = fn({k: jax.device_put(v, sharding) for k, v in batch.items()},
           jax.device_put(losses, sharding))
  assert got[TARGETS].sharding.is_equivalent_to(sharding, 2)
  want = reference(batch, losses, PAUSE, num_pauses=2)
  for key in batch:
    np.testing.assert_array_equal(np.asarray(got[key]), want[key])


@pytest.mark.parametrize("kwargs, needle", [
    ({"num_pauses": 0}, "num_pauses=0"),
    ({"num_pauses": 2, "fraction": 0.1}, "both set"),
    ({"num_pauses": None, "fraction": 1.5}, "fraction=1.5"),
    ({"refresh_every": 0}, "refresh_every=0"),
])
def test_bad_settings_are_named(kwargs, needle):
  with pytest.raises(ValueError) as e:
    lc.LowConfidencePauses(**kwargs)
  assert needle in str(e.value) and "\n" not in str(e.value)


# -- the scoring forward ---------------------------------------------------------


def test_fused_per_token_cross_entropy_equals_the_plain_one():
  from pause_flax.training import loss as loss_lib
  rng = np.random.default_rng(12)
  h = jnp.asarray(rng.normal(size=(4, 10, 8)), jnp.float32)
  head = jnp.asarray(rng.normal(size=(40, 8)), jnp.float32)   # 37 real rows, 3 padded
  targets = jnp.asarray(rng.integers(0, 37, size=(4, 10)), jnp.int32)
  weights = jnp.asarray(rng.integers(0, 2, size=(4, 10)), jnp.int32)
  logits = np.einsum("bld,vd->blv", np.asarray(h, np.float64), np.asarray(head, np.float64))
  logits = logits[..., :37]
  logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
  want = np.where(np.asarray(weights) > 0,
                  logz - np.take_along_axis(logits, np.asarray(targets)[..., None], -1)[..., 0],
                  0)
  fused = loss_lib.fused_token_cross_entropy(h, head, targets, weights, vocab_size=37,
                                             chunk_len=3, batch_shards=2)
  plain = loss_lib.token_cross_entropy(jnp.asarray(logits, jnp.float32), targets, weights)
  np.testing.assert_allclose(np.asarray(fused), want, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(plain), want, rtol=1e-5, atol=1e-5)


# -- the train step -------------------------------------------------------------

CONFIG = dataclasses.replace(transformer.model_config("tiny"), vocab_size=300, max_len=32)


def make_trainer(policy=None, accum_steps=1, mesh=None):
  mesh = mesh or parallel.make_mesh(devices=jax.devices()[:1])
  tx = optimizer_lib.make_optimizer(1e-2, weight_decay=0.0, clip_norm=None)
  return trainer_lib.Trainer(CONFIG, tx, mesh, options=trainer_lib.StepOptions(
      accum_steps=accum_steps, pause_id=PAUSE, low_confidence=policy))


def on(trainer, batch):
  return {k: jax.device_put(v, trainer.batch_sharding) for k, v in batch.items()}


def scorer_losses(trainer, params, batch):
  """Each target's loss under `params`, from the full logits, in numpy."""
  logits = np.asarray(trainer.model(params)(jnp.asarray(batch[INPUTS])), np.float64)
  logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
  target = np.take_along_axis(logits, batch[TARGETS][..., None], -1)[..., 0]
  return (logz - target).astype(np.float32)


def copy_tree(tree):
  return jax.tree.map(lambda x: np.array(x), tree)


@pytest.mark.slow
def test_step_trains_on_pauses_before_the_scorers_worst_targets():
  batch = lm_batch(np.random.default_rng(8), b=8, length=16, pad=3)
  policy = lc.LowConfidencePauses(num_pauses=2)
  dit, plain = make_trainer(policy), make_trainer()
  state = dit.init(0)
  prepared = {k: np.asarray(v) for k, v in dit.prepare_batch(state, on(dit, batch)).items()}
  # The scorer is the live model: its losses, ranked independently, give the pauses.
  losses = scorer_losses(dit, state.params, batch)
  want = reference(batch, np.where(batch[WEIGHTS] > 0, losses, 0), PAUSE, num_pauses=2)
  for key in batch:
    np.testing.assert_array_equal(prepared[key], want[key], err_msg=key)
  assert ((prepared[TARGETS] == PAUSE).sum(1) == 2).all()
  # The policy's step is the plain step on that batch.
  plain_state = plain.init(0)
  new, metrics = dit.train_step(state, on(dit, batch))
  ref_new, ref_metrics = plain.train_step(plain_state, on(plain, prepared))
  assert metrics["pause_inputs"] == ref_metrics["pause_inputs"] == 16
  np.testing.assert_allclose(metrics["loss"], ref_metrics["loss"], rtol=1e-6)
  for a, b in zip(jax.tree.leaves(new.params), jax.tree.leaves(ref_new.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)


@pytest.mark.slow
def test_micro_batches_are_transformed_like_the_full_batch():
  batch = lm_batch(np.random.default_rng(9), b=8, length=16, pad=3)
  policy = lc.LowConfidencePauses(num_pauses=2)
  full, accum = make_trainer(policy), make_trainer(policy, accum_steps=2)
  s1, m1 = full.train_step(full.init(0), on(full, batch))
  s2, m2 = accum.train_step(accum.init(0), on(accum, batch))
  assert m1["pause_inputs"] == m2["pause_inputs"] == 16
  np.testing.assert_allclose(m1["loss"], m2["loss"], rtol=1e-5)


def test_scorer_is_refreshed_every_r_steps_and_kept_in_between():
  batch = lm_batch(np.random.default_rng(10), b=4, length=16, pad=3)
  trainer = make_trainer(lc.LowConfidencePauses(num_pauses=2, refresh_every=3))
  state = trainer.init(0)
  assert isinstance(state.opt_state, scorer_lib.ScorerState)
  live = {}
  for step in range(5):
    live[step] = copy_tree(state.params)
    state, _ = trainer.train_step(state, on(trainer, batch))
    refreshed = live[3 * (step // 3)]  # what step `step` scored with
    for a, b in zip(jax.tree.leaves(state.opt_state.scorer), jax.tree.leaves(refreshed)):
      np.testing.assert_array_equal(np.asarray(a), b)
  # Step 4 scores with step 3's parameters, not the live ones.
  prepared = trainer.prepare_batch(state, on(trainer, batch))
  losses = scorer_losses(trainer, live[3], batch)
  want = reference(batch, np.where(batch[WEIGHTS] > 0, losses, 0), PAUSE, num_pauses=2)
  np.testing.assert_array_equal(np.asarray(prepared[TARGETS]), want[TARGETS])


def test_without_the_policy_the_trainer_is_as_before():
  trainer = make_trainer()
  plain_tx = optimizer_lib.make_optimizer(1e-2, weight_decay=0.0, clip_norm=None)
  want = jax.tree.structure(jax.eval_shape(plain_tx.init, trainer.abstract_params))
  assert jax.tree.structure(trainer.abstract_state.opt_state) == want
  batch = lm_batch(np.random.default_rng(11), b=4, length=16)
  assert trainer.prepare_batch(trainer.init(0), batch).keys() == batch.keys()
  with pytest.raises(ValueError, match="pause_id is None"):
    trainer_lib.Trainer(CONFIG, plain_tx, parallel.make_mesh(devices=jax.devices()[:1]),
                        options=trainer_lib.StepOptions(
                            low_confidence=lc.LowConfidencePauses()))


# -- a training run: resume, recorded setting -----------------------------------


def train(model_dir, steps, policy, **kwargs):
  config = dataclasses.replace(transformer.model_config("tiny"), max_len=32)
  return loop.train(model_dir=str(model_dir), mixture_or_task_name="synthetic_lm",
                    task_feature_lengths={"targets": 32}, train_steps=steps, batch_size=4,
                    model_config=config, mesh=parallel.make_mesh(devices=jax.devices()[:1]),
                    low_confidence=policy, decay="constant", log_every=1,
                    checkpoint_options=checkpointing.CheckpointOptions(
                        save_every=3, async_save=False), **kwargs)


def losses_of(model_dir):
  with open(os.path.join(model_dir, "metrics.jsonl")) as f:
    return {r["step"]: (r["loss"], r["pause_inputs"]) for r in map(json.loads, f)}


@pytest.mark.slow
def test_resumed_run_equals_an_uninterrupted_one(tmp_path):
  # refresh_every=2 with a checkpoint at step 3: the resume lands between refreshes.
  policy = lc.LowConfidencePauses(num_pauses=3, refresh_every=2)
  train(tmp_path / "whole", 6, policy)
  train(tmp_path / "split", 3, policy)
  train(tmp_path / "split", 6, policy)
  whole, split = losses_of(tmp_path / "whole"), losses_of(tmp_path / "split")
  assert sorted(whole) == sorted(split) == list(range(1, 7))
  assert whole == split
  # The synthetic rows are full: 3 pauses per row, the last ones' inputs may be cut.
  assert all(8 <= p <= 12 for _, p in whole.values()), whole
  # Another setting, or none, on resume is refused before anything is written.
  for other in (lc.LowConfidencePauses(num_pauses=2, refresh_every=2), None):
    with pytest.raises(run_dir.ResumeRefused, match="train.low_confidence"):
      train(tmp_path / "whole", 8, other)
  assert losses_of(tmp_path / "whole") == whole


def test_recorded_setting_cannot_change_on_resume_but_a_new_default_can_appear():
  saved = ("train.low_confidence = @LowConfidencePauses()\n"
           "LowConfidencePauses.num_pauses = 1\nLowConfidencePauses.refresh_every = 1\n")
  changes = run_dir.compare_configs(saved, saved.replace("num_pauses = 1", "num_pauses = 2"))
  assert [(c.name, c.kind) for c in changes] == [("LowConfidencePauses.num_pauses", "fixed")]
  changes = run_dir.compare_configs("train.pack = False\n", "train.pack = False\n"
                                    "train.low_confidence = @LowConfidencePauses()\n")
  assert [(c.name, c.kind) for c in changes] == [("train.low_confidence", "fixed")]
  # A run made before the setting existed resumes: unset -> None is no change.
  assert run_dir.compare_configs("train.pack = False\n",
                                 "train.pack = False\ntrain.low_confidence = None\n") == []
