"""Earlier releases' parameter trees load into today's model."""

import dataclasses

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from pause_flax.model import compat
from pause_flax.model import transformer as tfm

TINY = tfm.model_config("tiny")


def _old_layout(params: dict) -> dict:
  """A tree as the previous release stored it: the untied head [D, V] as head_DxV."""
  old = {k: v for k, v in params.items() if k != "head_VxD"}
  old["head_DxV"] = np.asarray(params["head_VxD"]).T
  return old


def test_upgrade_params_restores_the_model():
  model = tfm.Transformer(TINY, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  params = jax.tree.map(np.asarray, nnx.to_pure_dict(state))
  old = _old_layout(params)
  assert old["head_DxV"].shape == (TINY.d_model, TINY.padded_vocab_size)
  new = compat.upgrade_params(old)
  assert "head_DxV" not in new and isinstance(new["head_VxD"], np.ndarray)
  assert jax.tree.structure(new) == jax.tree.structure(params)
  jax.tree.map(np.testing.assert_array_equal, new, params)
  tokens = jax.random.randint(jax.random.key(1), (2, 6), 0, TINY.vocab_size)
  np.testing.assert_array_equal(nnx.merge(graphdef, new)(tokens), model(tokens))


def test_upgrade_params_reaches_optimizer_moments_and_leaves_new_trees_alone():
  params = nnx.to_pure_dict(nnx.state(tfm.Transformer(TINY, rngs=nnx.Rngs(0))))
  old = _old_layout(params)
  opt_state = optax.adamw(1e-3).init(old)
  upgraded = compat.upgrade_params({"params": old, "opt_state": opt_state})
  adam = upgraded["opt_state"][0]
  assert adam.mu["head_VxD"].shape == (TINY.padded_vocab_size, TINY.d_model)
  assert "head_DxV" not in adam.nu
  tied = nnx.to_pure_dict(nnx.state(tfm.Transformer(
      dataclasses.replace(TINY, tie_embeddings=True), rngs=nnx.Rngs(0))))
  for tree in (params, tied):  # today's layout: the same arrays back
    same = jax.tree.map(lambda a, b: a is b, compat.upgrade_params(tree), tree)
    assert all(jax.tree.leaves(same))
  with pytest.raises(ValueError, match="both head_DxV and head_VxD"):
    compat.upgrade_params({**old, "head_VxD": params["head_VxD"]})


def test_a_checkpoint_of_the_earlier_layout_restores_converted(tmp_path):
  from pause_flax import parallel
  from pause_flax.training import checkpointing
  assert not TINY.tie_embeddings
  params = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(
      tfm.Transformer(TINY, rngs=nnx.Rngs(3)))))
  ckpt = checkpointing.Checkpointer(str(tmp_path / "checkpoints"),
                                    checkpointing.CheckpointOptions(async_save=False))
  ckpt.manager.save(7, args=checkpointing.ocp.args.Composite(**{
      checkpointing.PARAMS: checkpointing.ocp.args.StandardSave(_old_layout(params)),
      checkpointing.META: checkpointing.ocp.args.JsonSave(
          {"step": 7, "model_config": dataclasses.asdict(TINY)})}))
  ckpt.close()
  mesh = parallel.make_mesh(data=1, fsdp=2, tensor=2, devices=jax.devices()[:4])
  saved = checkpointing.restore_model_params(str(tmp_path), mesh=mesh)
  assert saved.step == 7 and "head_DxV" not in saved.params
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(saved.params), params)
  head = saved.params["head_VxD"]
  assert head.sharding.mesh.shape == mesh.shape
