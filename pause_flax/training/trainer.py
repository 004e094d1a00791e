"""Train state, the sharded train step, and state creation.

The step is `jax.jit` with explicit in/out shardings and the state donated
(pjit semantics). Parameters and optimizer state are created already sharded:
their shardings come from the model's logical axis names and the rules in
`pause_flax.parallel`. The trainer sees token ids and loss weights and nothing
else about pauses: the optional `pause_id` feeds a metric, and, with
low-confidence pauses (`StepOptions.low_confidence`, DIT), is the id the data
layer's transform inserts before the targets a scoring forward predicts worst.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from pause_flax import parallel
from pause_flax.data import low_confidence as low_confidence_lib
from pause_flax.model import kernels
from pause_flax.model import transformer as transformer_lib
from pause_flax.training import adaptive as adaptive_lib
from pause_flax.training import loss as loss_lib
from pause_flax.training import low_confidence as scorer_lib

Batch = dict[str, jax.Array]


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any          # nested dict of arrays (nnx pure dict)
  opt_state: Any


@dataclasses.dataclass(frozen=True)
class StepOptions:
  """What the step computes besides the model and optimizer."""
  accum_steps: int = 1
  z_loss: float = 0.0
  pause_id: int | None = None        # the pause-input count metric; DIT's pause id
  # Output projection + cross-entropy fused, `loss_chunk_len` positions at a
  # time (loss.fused_cross_entropy_sums); "auto": about
  # loss.auto_chunk_rows(d_model) rows of a batch shard per chunk (256 up to
  # d_model 256, then growing with it); None materialises [B, L, V] logits.
  loss_chunk_len: int | str | None = "auto"
  # Catch Your Breath: the CYB loss over unrolled pause groups (batches carry
  # `decoder_pause_steps`) with the output class `ask_id`; None: cross-entropy.
  adaptive: adaptive_lib.AdaptivePauses | None = None
  ask_id: int | None = None
  # Low-confidence (DIT) pauses: each (micro-)batch is scored by a copy of the
  # parameters and gets pauses before its worst-predicted targets (needs pause_id).
  low_confidence: low_confidence_lib.LowConfidencePauses | None = None


class Trainer:
  """Builds the jitted, sharded init and train-step functions for one model."""

  def __init__(self, model_config: transformer_lib.TransformerConfig,
               optimizer: optax.GradientTransformation, mesh: Mesh, *,
               rules: parallel.LogicalRules = parallel.DEFAULT_RULES,
               schedule: optax.Schedule | None = None,
               options: StepOptions = StepOptions()):
    if options.accum_steps < 1:
      raise ValueError(f"accum_steps={options.accum_steps} must be >= 1.")
    if options.loss_chunk_len is not None:   # None: the plain logits path
      loss_lib.check_chunk_len(options.loss_chunk_len, "StepOptions.loss_chunk_len")
    if options.adaptive is not None and options.ask_id is None:
      raise ValueError("StepOptions.adaptive is set without ask_id: pass the vocabulary's "
                       "ask_id (AdaptivePauseVocabulary.ask_id).")
    if options.low_confidence is not None and options.pause_id is None:
      raise ValueError("StepOptions.low_confidence is set but pause_id is None: low-confidence "
                       "pauses need the id of <pause> (train on a pause vocabulary).")
    if scorer_lib.keeps_scorer(options.low_confidence):
      optimizer = scorer_lib.with_scorer(optimizer)
    # The backend-specific kernels, resolved once for the mesh's platform.
    model_config = kernels.resolve(model_config, kernels.platform(mesh))
    self.model_config = model_config
    self.optimizer = optimizer
    self.mesh = mesh
    self.rules = rules
    self.schedule = schedule
    self.options = options

    abstract_model = nnx.eval_shape(
        lambda: transformer_lib.Transformer(model_config, rngs=nnx.Rngs(0)))
    self.graphdef, abstract_state = nnx.split(abstract_model)
    self.abstract_params = nnx.to_pure_dict(abstract_state)
    self.param_shardings = nnx.to_pure_dict(
        parallel.state_shardings(abstract_state, mesh, rules))
    # {('layers', 0, 'attn', 'q', 'kernel'): ('embed', 'heads', 'kv'), ...}
    self.param_logical_names = {
        tuple(path): parallel.variable_logical_names(v)
        for path, v in nnx.to_flat_state(abstract_state)}
    replicated = NamedSharding(mesh, P())
    self.replicated = replicated
    abstract_opt_state = jax.eval_shape(optimizer.init, self.abstract_params)
    opt_shardings = optax.tree_utils.tree_map_params(
        optimizer, lambda _, s: s, abstract_opt_state, self.param_shardings,
        transform_non_params=lambda _: replicated,
        is_leaf=lambda x: isinstance(x, NamedSharding))
    self.state_shardings = TrainState(step=replicated, params=self.param_shardings,
                                      opt_state=opt_shardings)
    self.abstract_state = TrainState(
        step=jax.ShapeDtypeStruct((), jnp.int32), params=self.abstract_params,
        opt_state=abstract_opt_state)
    self.batch_sharding = parallel.batch_sharding(mesh, rules)

    self.init = jax.jit(self._init, static_argnums=0, out_shardings=self.state_shardings)
    self.train_step = jax.jit(
        self._train_step, in_shardings=(self.state_shardings, self.batch_sharding),
        out_shardings=(self.state_shardings, replicated), donate_argnums=0)
    self._prepare = jax.jit(self._prepare_batch,
                            in_shardings=(self.state_shardings, self.batch_sharding))

  # -- state ---------------------------------------------------------------

  def _init(self, seed: int) -> TrainState:
    model = transformer_lib.Transformer(self.model_config, rngs=nnx.Rngs(seed))
    params = nnx.to_pure_dict(nnx.state(model))
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=self.optimizer.init(params))

  def fresh_state(self, params: Any) -> TrainState:
    """Step 0 with the given parameters and a new optimizer state."""
    params = jax.device_put(params, self.param_shardings)
    opt_state = jax.jit(self.optimizer.init,
                        out_shardings=self.state_shardings.opt_state)(params)
    return TrainState(step=jax.device_put(jnp.zeros((), jnp.int32), self.replicated),
                      params=params, opt_state=opt_state)

  def model(self, params: Any) -> transformer_lib.Transformer:
    """The NNX model over the given parameters (inside or outside jit)."""
    return nnx.merge(self.graphdef, params)

  # -- step ----------------------------------------------------------------

  def _loss_sums(self, params: Any, batch: Batch
                 ) -> tuple[loss_lib.LossSums, dict[str, jax.Array]]:
    """The loss sums and the sums of any extra statistics (adaptive pauses)."""
    model = self.model(params)
    targets, weights = batch["decoder_target_tokens"], batch["decoder_loss_weights"]
    with parallel.activation_sharding(self.mesh, self.rules):
      h_BxLxD = self._hidden(model, batch)
      if self.options.adaptive is not None:
        return adaptive_lib.cyb_loss_sums(
            model.logits(h_BxLxD), targets, weights, batch["decoder_pause_steps"],
            ask_id=self.options.ask_id, options=self.options.adaptive,
            z_loss=self.options.z_loss)
      if self.options.loss_chunk_len is None:
        return loss_lib.cross_entropy_sums(model.logits(h_BxLxD), targets, weights,
                                           self.options.z_loss), {}
      return loss_lib.fused_cross_entropy_sums(
          h_BxLxD, model.output_matrix_VxD(), targets, weights, self.options.z_loss,
          **self._fused_options()), {}

  @staticmethod
  def _hidden(model: transformer_lib.Transformer, batch: Batch) -> jax.Array:
    return model.hidden(batch["decoder_input_tokens"],
                        positions_BxL=batch.get("decoder_positions"),
                        segment_ids_BxL=batch.get("decoder_segment_ids"))

  def _fused_options(self) -> dict:
    """The fused loss's static settings for this model and mesh."""
    return dict(vocab_size=self.model_config.vocab_size, chunk_len=self.options.loss_chunk_len,
                batch_shards=parallel.data_parallel_size(self.mesh, self.rules))

  def _token_losses(self, params: Any, batch: Batch) -> jax.Array:
    """float32 [B, L]: the model's cross-entropy on each target (0 at weight 0)."""
    model = self.model(params)
    targets, weights = batch["decoder_target_tokens"], batch["decoder_loss_weights"]
    with parallel.activation_sharding(self.mesh, self.rules):
      h_BxLxD = self._hidden(model, batch)
      if self.options.loss_chunk_len is None:
        return loss_lib.token_cross_entropy(model.logits(h_BxLxD), targets, weights)
      return loss_lib.fused_token_cross_entropy(
          h_BxLxD, model.output_matrix_VxD(), targets, weights, **self._fused_options())

  def _with_pauses(self, scorer: Any, batch: Batch) -> Batch:
    """The batch with low-confidence pauses, scored by `scorer` parameters."""
    losses_BxL = jax.lax.stop_gradient(self._token_losses(scorer, batch))
    return low_confidence_lib.apply_policy(self.options.low_confidence, batch, losses_BxL,
                                           self.options.pause_id)

  def prepare_batch(self, state: TrainState, batch: Batch) -> Batch:
    """The batch the train step trains on (jitted; the batch itself without a policy).

    With accum_steps > 1 the step transforms each micro-batch on its own; the
    transform is row-wise, so the rows are the same.
    """
    if self.options.low_confidence is None:
      return dict(batch)
    return self._prepare(state, batch)

  def _prepare_batch(self, state: TrainState, batch: Batch) -> Batch:
    scorer = scorer_lib.scorer_params(self.options.low_confidence, state.step, state.params,
                                      state.opt_state)
    return self._with_pauses(scorer, batch)

  def _grads_and_sums(self, params: Any, batch: Batch, scorer: Any = None):
    """Gradient of the summed loss, accumulated over micro-batches.

    The aux is (loss sums, sums of extra statistics). With `scorer`
    (low-confidence pauses), each micro-batch is transformed first and the
    count of pause inputs it trains on is an extra statistic ("pause_inputs").
    """
    grad_fn = jax.grad(lambda p, b: (lambda s: (s[0].loss, s))(self._loss_sums(p, b)),
                       has_aux=True)
    if scorer is not None:
      plain_grad_fn = grad_fn

      def grad_fn(p, b):  # pylint: disable=function-redefined
        b = self._with_pauses(scorer, b)
        g, (s, extra) = plain_grad_fn(p, b)
        pauses = jnp.sum(b["decoder_input_tokens"] == self.options.pause_id)
        return g, (s, {**extra, "pause_inputs": pauses.astype(jnp.float32)})

    accum = self.options.accum_steps
    if accum == 1:
      return grad_fn(params, batch)

    def split(x):
      # Row i*accum + a goes to micro-batch a: every micro-batch stays evenly
      # spread over the devices that hold the batch dimension.
      x = x.reshape((x.shape[0] // accum, accum) + x.shape[1:])
      x = jnp.swapaxes(x, 0, 1)
      return parallel.constrain_with(self.mesh, self.rules, x,
                                     (None, "batch") + (None,) * (x.ndim - 2))

    micro = jax.tree.map(split, batch)

    def body(carry, mb):
      grads, sums = carry
      g, s = grad_fn(params, mb)
      return (jax.tree.map(jnp.add, grads, g), jax.tree.map(jnp.add, sums, s)), None

    zeros_g = jax.tree.map(jnp.zeros_like, params)
    zeros_s = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(
        lambda p, b: grad_fn(p, b)[1], params, jax.tree.map(lambda x: x[0], micro)))
    (grads, sums), _ = jax.lax.scan(body, (zeros_g, zeros_s), micro)
    return grads, sums

  def _train_step(self, state: TrainState, batch: Batch) -> tuple[TrainState, dict]:
    policy = self.options.low_confidence
    scorer = (None if policy is None else
              scorer_lib.scorer_params(policy, state.step, state.params, state.opt_state))
    grads, (sums, extra) = self._grads_and_sums(state.params, batch, scorer)
    denom = jnp.maximum(sums.weight, 1e-8)
    grads = jax.tree.map(lambda g: g / denom, grads)
    updates, opt_state = self.optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    grad_norm = optax.global_norm(grads)
    loss = sums.loss / denom
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    # A non-finite update is never applied: the state stays as it was and the
    # loop decides (stop, or skip up to skip_nonfinite_updates in a row). The
    # state's structure does not depend on that setting.
    keep = lambda new, old: jnp.where(finite, new, old)
    params = jax.tree.map(keep, params, state.params)
    opt_state = jax.tree.map(keep, opt_state, state.opt_state)
    if policy is not None:
      opt_state = scorer_lib.keep_scorer(policy, opt_state, scorer)
    metrics = {
        "loss": loss,
        "cross_entropy": sums.ce / denom,
        "z_loss": sums.z / denom,
        "accuracy": sums.correct / denom,
        "weighted_tokens": sums.weight,
        "grad_norm": grad_norm,
        "param_norm": optax.global_norm(params),
        "finite": finite.astype(jnp.float32),
    }
    if self.options.adaptive is not None:
      # Per scored token: the expected pauses (what CYB-DP budgets) and those
      # greedy decoding would take on this (teacher-forced) batch.
      metrics["expected_pauses"] = extra["expected_pauses"] / denom
      metrics["greedy_pauses"] = extra["greedy_pauses"] / denom
    if self.schedule is not None:
      metrics["learning_rate"] = jnp.asarray(self.schedule(state.step), jnp.float32)
    if policy is not None:
      metrics["pause_inputs"] = extra["pause_inputs"]  # in the batches trained on
    elif self.options.pause_id is not None:
      metrics["pause_inputs"] = jnp.sum(
          batch["decoder_input_tokens"] == self.options.pause_id).astype(jnp.float32)
    new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state)
    return new_state, metrics

  # -- helpers -------------------------------------------------------------

  def flops_per_step(self, batch_size: int, seq_len: int) -> float:
    return transformer_lib.flops_per_token(self.model_config, seq_len) * batch_size * seq_len
