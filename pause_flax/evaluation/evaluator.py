"""Evaluation: prompts with M_inf pauses, KV-cache decoding or scoring, seqio metrics.

One `Evaluator` reads the validation split of a Task (or each Task of a
Mixture) in its *standard* form, so the prefix is the same whatever pauses
the model was finetuned with, and builds every prompt as

  BOS + prefix + M_inf pauses        (BOS = 0: the feature converters shift
                                      every training sequence right by a 0)

For generation metrics it decodes greedily (or with temperature / top-k) with
the KV cache, the pause banned and EOS ending a row; for score metrics (rank
classification) it scores log p(target | prompt), summed over the target's
tokens. `seqio.Evaluator` itself drives the Task: it caches the examples,
calls our predict/score functions, detokenizes, applies the Task's
postprocess_fn and metric_fns. Batches are global arrays over the mesh, each
process contributing its rows, exactly as the trainer builds them.

Outputs (process 0) go to `<output_dir>/<task>/M<m>/`: metrics.json,
predictions.jsonl and TensorBoard scalars; a sweep over M_inf adds
`<output_dir>/<task>/sweep.{md,json,png}`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

from absl import logging
from etils import epath
import jax
import numpy as np
from jax.experimental import multihost_utils

from pause_flax import parallel
from pause_flax.data import adaptive as adaptive_data
from pause_flax.data import pipeline  # hides accelerators from TF; registers Tasks
from pause_flax.data import tasks as tasks_lib
from pause_flax.model import adaptive_decoding
from pause_flax.model import decoding
from pause_flax.model import transformer as transformer_lib
from pause_flax.training import checkpointing
from pause_flax.vocab import PauseVocabulary

import seqio  # pylint: disable=g-bad-import-order  (after pipeline: TF set up)
import tensorflow as tf  # pylint: disable=g-bad-import-order

BOS_ID = 0
PAUSE_MARK = "<pause>"
PREDICTION = seqio.metrics.ModelOutputType.PREDICTION
SCORE = seqio.metrics.ModelOutputType.SCORE


@dataclasses.dataclass(frozen=True)
class DecodeOptions:
  """How generation tasks decode (`pause_flax.model.decoding.generate`)."""
  max_new_tokens: int | None = None  # default: the task's 'targets' length
  temperature: float = 0.0           # 0: greedy
  top_k: int | None = None
  seed: int = 0
  # Adaptive-pause models (an ask-for-a-pause output row): the most pauses the
  # model may ask for before one token. None: the K it was trained with (`run`
  # reads it from the checkpoint); other models ignore it.
  max_pauses_per_token: int | None = None


@dataclasses.dataclass
class TaskResult:
  """One Task evaluated at one M_inf."""
  task: str
  num_pauses: int
  metrics: dict[str, float]
  records: list[dict[str, Any]]  # one per example, for predictions.jsonl
  # What the answers cost (generation tasks): tokens_processed_per_answer, the
  # mean of prompt (BOS + prefix + pauses) + answer tokens (EOS included) +
  # any pauses the model asked for, i.e. the positions it ran per example.
  compute: dict[str, float] = dataclasses.field(default_factory=dict)


# -- tasks ----------------------------------------------------------------------


def standard_task(name: str) -> tuple[str, int, int | None]:
  """(standard Task or Mixture, its M_ft, filler id or None) of `name`.

  A pause (or filler) variant made by `tasks.pause_variant`, or an adaptive
  variant (`tasks.adaptive_variant`), maps back to the Task it was made from; any other name is its own standard form, M_ft 0.
  """
  pipeline.check_task_name(name)
  spec = tasks_lib.variant_spec(name)
  if spec is None:
    return adaptive_data.base_task(name) or name, 0, None
  if spec.form != "finetune":
    raise ValueError(f"{name!r} is a pretraining (injected-pause) variant of {spec.base!r}; "
                     "evaluate a Task with 'inputs' and 'targets'.")
  return spec.base, spec.num_pauses, spec.pause_token


def _feature_lengths(task: str, lengths: Mapping[str, int] | None) -> dict[str, int]:
  if lengths is not None:
    return dict(lengths)
  try:
    return tasks_lib.default_task_feature_lengths(task)
  except ValueError as e:
    raise ValueError(f"{e} (TASK_FEATURE_LENGTHS in gin)") from None


class _TaskFeatures(seqio.PassThroughFeatureConverter):
  """Hands seqio.Evaluator's cache the Task's own features (the prompt is ours)."""
  TASK_FEATURES = {k: seqio.FeatureConverter.FeatureSpec(dtype=tf.int32)
                   for k in ("inputs", "targets")}
  pack = False


# -- checkpoints ----------------------------------------------------------------


@dataclasses.dataclass
class Checkpoint:
  """A trained model, restored onto a mesh, with what its run recorded."""
  model: transformer_lib.Transformer
  step: int
  meta: dict[str, Any]  # model_config, vocab_size, task, base_task, num_pauses
  model_dir: str        # the run's MODEL_DIR (parent of checkpoints/)


def load_checkpoint(path: str, mesh: jax.sharding.Mesh,
                    rules: parallel.LogicalRules = parallel.DEFAULT_RULES,
                    step: int | None = None) -> Checkpoint:
  """Builds the Transformer recorded in a checkpoint's meta and restores it sharded."""
  saved = checkpointing.restore_model_params(path, step=step, mesh=mesh, rules=rules)
  directory = epath.Path(saved.directory)
  model_dir = directory.parent if directory.name == "checkpoints" else directory
  logging.info("Restored %s step %d (%s parameters).", directory, saved.step,
               f"{transformer_lib.num_params(saved.config):,}")
  return Checkpoint(saved.model(), saved.step, saved.meta, os.fspath(model_dir))


# -- evaluation -------------------------------------------------------------------


def _to_host(x: jax.Array) -> np.ndarray:
  if x.is_fully_addressable:
    return np.asarray(jax.device_get(x))
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def global_batch(rows: np.ndarray, mesh: jax.sharding.Mesh,
                 rules: parallel.LogicalRules = parallel.DEFAULT_RULES) -> jax.Array:
  """A whole global batch (identical on every process) -> one global array.

  Each process contributes its own slice of the rows, as the trainer builds
  its batches; the batch size must divide by the process count.
  """
  per = rows.shape[0] // jax.process_count()
  start = jax.process_index() * per
  spec = parallel.batch_sharding(mesh, rules).spec
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*spec[:rows.ndim]))
  return jax.make_array_from_process_local_data(sharding, rows[start:start + per], rows.shape)


def _pad_rows(rows: list, batch_size: int) -> list:
  """Fills a short last batch with copies of its last row (dropped afterwards)."""
  return rows + [rows[-1]] * (batch_size - len(rows))


def mark_pauses(ids: Sequence[int], vocab: seqio.Vocabulary, pause_id: int) -> str:
  """Decodes ids, writing each pause (or filler) id as `<pause>`."""
  out, run = [], []
  for i in list(ids) + [None]:
    if i is None or i == pause_id:
      if run:
        out.append(vocab.decode(run))
        run = []
      if i is not None:
        out.append(PAUSE_MARK)
    else:
      run.append(int(i))
  return "".join(out)


def _text(value: Any) -> Any:
  if isinstance(value, bytes):
    return value.decode("utf-8", errors="replace")
  if isinstance(value, np.ndarray):
    return [_text(v) for v in value.tolist()]
  if isinstance(value, (list, tuple)):
    return [_text(v) for v in value]
  if isinstance(value, np.generic):
    return value.item()
  return value


class Evaluator:
  """Evaluates a model on one Task or Mixture (its standard form) at any M_inf.

  The examples are read and cached once (by `seqio.Evaluator`, one per Task);
  `evaluate` can then run any model at any number of pauses.
  """

  def __init__(self, mixture_or_task_name: str, *, batch_size: int,
               mesh: jax.sharding.Mesh,
               rules: parallel.LogicalRules = parallel.DEFAULT_RULES,
               feature_lengths: Mapping[str, int] | None = None,
               split: str = "validation", num_examples: int | None = None,
               decode: DecodeOptions = DecodeOptions(), placed_prompts: bool = False):
    name, _, token = standard_task(mixture_or_task_name)
    if token == tasks_lib.REPEAT and not placed_prompts:
      raise ValueError(f"{mixture_or_task_name!r} repeats each prompt: evaluate it with "
                       "placed_prompts=True (its prompts carry the repeat, M_inf = 0).")
    self.filler_id = None if token == tasks_lib.REPEAT else token
    # placed_prompts: the prompt is the pause variant's own 'inputs', pauses where
    # its placement policy put them (e.g. before a marker), not the standard
    # prefix + M_inf appended pauses; evaluate() then appends none (M_inf = 0).
    self.placed_prompts = placed_prompts
    if placed_prompts:
      if name == mixture_or_task_name:
        raise ValueError(f"placed_prompts=True needs a pause variant (tasks.pause_variant); "
                         f"{mixture_or_task_name!r} is a standard Task.")
      name = mixture_or_task_name
    dp = parallel.data_parallel_size(mesh, rules)
    if batch_size < 1 or batch_size % dp or batch_size % jax.process_count():
      raise ValueError(f"Eval BATCH_SIZE={batch_size} must be a positive multiple of the "
                       f"data-parallel size {dp} and of the {jax.process_count()} processes.")
    if decode.temperature < 0 or (decode.top_k is not None and decode.top_k < 1):
      raise ValueError(f"{decode}: temperature must be >= 0 and top_k >= 1.")
    if decode.max_pauses_per_token is not None and decode.max_pauses_per_token < 0:
      raise ValueError(f"DecodeOptions.max_pauses_per_token={decode.max_pauses_per_token} "
                       "must be >= 0 (or None: the K the model was trained with).")
    self.name = name
    self.batch_size = batch_size
    self.mesh = mesh
    self.rules = rules
    self.decode = decode
    self._tasks: dict[str, tuple[seqio.Task, seqio.Evaluator, dict[str, int]]] = {}
    for task in seqio.get_subtasks(seqio.get_mixture_or_task(name)):
      if "inputs" not in task.output_features:
        raise ValueError(f"Task {task.name!r} has no 'inputs' (prefix) feature: evaluation "
                         "needs a Task with 'inputs' and 'targets'.")
      lengths = _feature_lengths(task.name, feature_lengths)
      evaluator = seqio.Evaluator(
          task.name, _TaskFeatures(), eval_split=split,
          sequence_length=lengths, num_examples=num_examples,
          async_compute_metrics=False)
      if evaluator.eval_tasks:
        self._tasks[task.name] = (task, evaluator, lengths)
    if not self._tasks:
      raise ValueError(f"{name!r} has no Task with a {split!r} split and metric_fns.")

  @property
  def task_names(self) -> list[str]:
    return list(self._tasks)

  def evaluate(self, model: transformer_lib.Transformer, num_pauses: int,
               step: int | None = None) -> dict[str, TaskResult]:
    """Metrics and per-example records of every Task at M_inf = num_pauses."""
    if isinstance(num_pauses, bool) or not isinstance(num_pauses, int) or num_pauses < 0:
      raise ValueError(f"NUM_PAUSES_INFERENCE={num_pauses!r} must be an integer >= 0.")
    if self.placed_prompts and num_pauses:
      raise ValueError(f"NUM_PAUSES_INFERENCE={num_pauses}: with placed_prompts the variant "
                       f"{self.name!r} places the pauses; evaluate with 0.")
    return {name: self._evaluate_task(name, model, num_pauses, step) for name in self._tasks}

  # -- one task ---------------------------------------------------------------

  def _pause_ids(self, vocab: seqio.Vocabulary, model: transformer_lib.Transformer,
                 num_pauses: int) -> tuple[int, tuple[int, ...]]:
    """(the id appended to prompts, the ids decoding must never emit)."""
    if isinstance(vocab, PauseVocabulary):  # a placed-prompt variant's own vocabulary
      vocab = vocab.base
    pause_id = PauseVocabulary(vocab).pause_id
    has_pause = model.config.vocab_size > pause_id
    banned = (pause_id,) if has_pause else ()
    if _ask_id(vocab, model) is not None:
      banned += (_ask_id(vocab, model),)
    if self.filler_id is not None:
      return self.filler_id, banned
    if num_pauses and not has_pause:
      raise ValueError(
          f"M_inf={num_pauses} pauses, but the model's vocabulary ({model.config.vocab_size} "
          f"ids) has no <pause> row (id {pause_id}): a standard model evaluates with M_inf=0.")
    return pause_id, banned

  def _evaluate_task(self, name: str, model: transformer_lib.Transformer, num_pauses: int,
                     step: int | None) -> TaskResult:
    task, evaluator, lengths = self._tasks[name]
    vocab = task.output_features["targets"].vocabulary
    pause_id, banned = self._pause_ids(vocab, model, num_pauses)
    ask_id = _ask_id(vocab, model)
    budget = self.decode.max_pauses_per_token
    if ask_id is not None and budget is None:
      raise ValueError(
          f"The model has an ask-for-a-pause row (id {ask_id}): set "
          "DecodeOptions.max_pauses_per_token (evaluate.decode), its per-token pause budget.")
    prompts: dict[int, list[int]] = {}
    pauses: dict[int, list[int]] = {}  # adaptive models: pauses before each answer token
    answered: dict[int, int] = {}      # positions each answer ran (tokens and their pauses)

    def examples(ds: tf.data.Dataset) -> tuple[list[int], list[list[int]], list[np.ndarray]]:
      indices, rows, targets = [], [], []
      for index, ex in ds.as_numpy_iterator():
        prefix = [BOS_ID, *ex["inputs"][-lengths["inputs"]:].tolist()]
        prompts[int(index)] = decoding.build_prompt(prefix, num_pauses, pause_id)
        indices.append(int(index))
        rows.append(prompts[int(index)])
        targets.append(ex["targets"])
      return indices, rows, targets

    def batches(rows: list, width: int):
      """Global [B, width] arrays (and lengths) per batch; yields (start, arrays)."""
      started = time.perf_counter()
      n = len(rows)
      every = max(1, -(-n // self.batch_size) // 10)
      for b, start in enumerate(range(0, n, self.batch_size)):
        chunk = _pad_rows(rows[start:start + self.batch_size], self.batch_size)
        tokens, lengths_b = decoding.pad_prompts(chunk, width)
        yield start, self._global(tokens), self._global(lengths_b)
        if b % every == 0 or start + self.batch_size >= n:
          done = min(n, start + self.batch_size)
          logging.info("%s M_inf=%d: %d/%d examples (%.1f/s)", name, num_pauses, done, n,
                       done / max(time.perf_counter() - started, 1e-9))

    def predict_fn(ds: tf.data.Dataset, model_feature_shapes=None):
      del model_feature_shapes
      indices, rows, _ = examples(ds)
      if not rows:
        return []
      width = max(map(len, rows))
      max_new = self.decode.max_new_tokens or lengths["targets"]
      self._check_length(width + max_new * (1 + (budget or 0) * (ask_id is not None)),
                         model, name, num_pauses)
      rng = jax.random.key(self.decode.seed)
      out = []
      for start, tokens, lens in batches(rows, width):
        rng, batch_rng = jax.random.split(rng)
        kwargs = dict(prompt_lengths_B=lens, max_new_tokens=max_new, eos_id=vocab.eos_id,
                      banned_ids=banned, temperature=self.decode.temperature,
                      top_k=self.decode.top_k, rng=batch_rng, mesh=self.mesh,
                      rules=self.rules)
        if ask_id is None:
          tokens_BxT = _to_host(decoding.generate(model, tokens, **kwargs))
          for r in range(min(self.batch_size, len(rows) - start)):
            answered[indices[start + r]] = _answer_length(tokens_BxT[r], vocab.eos_id)
        else:
          result = adaptive_decoding.generate_adaptive(
              model, tokens, pause_id=pause_id, ask_id=ask_id, max_pauses_per_token=budget,
              **kwargs)
          tokens_BxT, pauses_BxT = _to_host(result.tokens_BxT), _to_host(result.pauses_BxT)
          for r in range(min(self.batch_size, len(rows) - start)):
            n = _answer_length(tokens_BxT[r], vocab.eos_id)
            pauses[indices[start + r]] = pauses_BxT[r, :n].tolist()
            answered[indices[start + r]] = n + sum(pauses[indices[start + r]])
        out += [(indices[start + r], tokens_BxT[r].tolist())
                for r in range(min(self.batch_size, len(rows) - start))]
      return out

    def score_fn(ds: tf.data.Dataset, model_feature_shapes=None):
      del model_feature_shapes
      indices, rows, targets = examples(ds)
      if not rows:
        return []
      width = max(map(len, rows))
      target_width = max(len(t) for t in targets)
      self._check_length(width + target_width - 1, model, name, num_pauses)
      out = []
      for start, tokens, lens in batches(rows, width):
        chunk = _pad_rows(targets[start:start + self.batch_size], self.batch_size)
        target, target_lens = decoding.pad_prompts(chunk, target_width)
        scores_B = decoding.score(
            model, tokens, self._global(target), prompt_lengths_B=lens,
            target_lengths_B=self._global(target_lens), banned_ids=banned,
            mesh=self.mesh, rules=self.rules)
        scores_B = _to_host(scores_B)
        out += [(indices[start + r], float(scores_B[r]))
                for r in range(min(self.batch_size, len(rows) - start))]
      return out

    metrics, outputs = evaluator.evaluate(compute_metrics=True, step=step,
                                          predict_fn=predict_fn, score_fn=score_fn)
    metrics = {k: float(v) for k, v in metrics.result()[name].items()}
    if pauses:
      metrics.update(adaptive_metrics(pauses, prompts))
    records = self._records(task, evaluator, outputs[name], prompts, vocab, pause_id)
    for record in records if pauses else []:
      record["pauses_per_token"] = pauses[record["index"]]
    compute = {}
    if answered:
      compute["tokens_processed_per_answer"] = float(
          np.mean([len(prompts[i]) + n for i, n in answered.items()]))
    logging.info("%s M_inf=%d: %s", name, num_pauses, metrics)
    return TaskResult(name, num_pauses, metrics, records, compute)

  def _records(self, task: seqio.Task, evaluator: seqio.Evaluator, outputs: Mapping,
               prompts: Mapping[int, list[int]], vocab: seqio.Vocabulary,
               pause_id: int) -> list[dict[str, Any]]:
    """inputs, prompt (pauses as `<pause>`), prediction and targets per example."""
    records = []
    predictions = outputs.get(PREDICTION)
    scores = outputs.get(SCORE)
    dataset = evaluator.cached_task_datasets[task.name]
    for i, ex in enumerate(dataset.as_numpy_iterator()):
      record = {
          "index": i,
          "inputs": _text(ex["inputs_pretokenized"]) if "inputs_pretokenized" in ex else (
              vocab.decode(ex["inputs"].tolist())),
          "prompt": mark_pauses(prompts[i][1:], vocab, pause_id),
          "targets": _text(ex["targets_pretokenized"]) if "targets_pretokenized" in ex else (
              vocab.decode(ex["targets"].tolist())),
      }
      if predictions is not None:
        text = vocab.decode(list(predictions[i]))
        record["prediction"] = text
        if task.postprocess_fn is not None:
          record["postprocessed"] = _text(task.postprocess_fn(text, example=ex,
                                                               is_target=False))
      if scores is not None:
        record["score"] = float(scores[i])
        record.update({k: _text(ex[k]) for k in ("idx", "is_correct") if k in ex})
      records.append(record)
    return records

  def _global(self, rows: np.ndarray) -> jax.Array:
    return global_batch(rows, self.mesh, self.rules)

  @staticmethod
  def _check_length(length: int, model: transformer_lib.Transformer, task: str,
                    num_pauses: int) -> None:
    if length > model.config.max_len:
      raise ValueError(
          f"{task} at M_inf={num_pauses}: BOS + prefix + pauses + targets is {length} tokens, "
          f"beyond the model's max_len={model.config.max_len}; shorten EVAL_FEATURE_LENGTHS "
          "or use fewer pauses.")


def _ask_id(vocab: seqio.Vocabulary, model: transformer_lib.Transformer) -> int | None:
  """The ask-for-a-pause id of an adaptive-pause model (one row past the pause), else None."""
  if isinstance(vocab, PauseVocabulary):
    vocab = vocab.base
  ask_id = PauseVocabulary(vocab).pause_id + 1
  return ask_id if model.config.vocab_size > ask_id else None


def _answer_length(tokens: np.ndarray, eos_id: int | None) -> int:
  """Tokens a row answered: up to and including its EOS, else all of them."""
  if eos_id is not None:
    hits = np.flatnonzero(tokens == eos_id)
    if hits.size:
      return int(hits[0]) + 1
  return len(tokens)


def adaptive_metrics(pauses: Mapping[int, Sequence[int]],
                     prompts: Mapping[int, Sequence[int]]) -> dict[str, float]:
  """The compute an adaptive-pause model spent, from the pauses before each answer token.

  pauses_per_token: pauses over answer tokens (EOS included), all examples;
  pauses_per_answer: mean pauses per example; tokens_processed_per_answer: mean
  of prompt (BOS + prefix + M_inf pauses) + answer tokens + their pauses, the
  positions the model ran for one example.
  """
  total_pauses = sum(sum(p) for p in pauses.values())
  total_tokens = sum(len(p) for p in pauses.values())
  processed = [len(prompts[i]) + len(p) + sum(p) for i, p in pauses.items()]
  return {"pauses_per_token": total_pauses / max(total_tokens, 1),
          "pauses_per_answer": total_pauses / len(pauses),
          "tokens_processed_per_answer": float(np.mean(processed))}


# -- outputs ------------------------------------------------------------------------


def result_dir(output_dir: str, task: str, num_pauses: int) -> str:
  return os.path.join(output_dir, task, f"M{num_pauses}")


def write_result(output_dir: str, result: TaskResult, *, step: int | None,
                 checkpoint: str | None = None) -> str:
  """metrics.json, predictions.jsonl and TensorBoard scalars; returns the folder."""
  path = result_dir(output_dir, result.task, result.num_pauses)
  if jax.process_index() != 0:
    return path
  from clu import metric_writers  # pylint: disable=g-import-not-at-top
  tf.io.gfile.makedirs(path)
  summary = {"task": result.task, "num_pauses_inference": result.num_pauses, "step": step,
             "checkpoint": checkpoint, "num_examples": len(result.records),
             "metrics": result.metrics, "compute": result.compute}
  with tf.io.gfile.GFile(os.path.join(path, "metrics.json"), "w") as f:
    f.write(json.dumps(summary, indent=2) + "\n")
  with tf.io.gfile.GFile(os.path.join(path, "predictions.jsonl"), "w") as f:
    for record in result.records:
      f.write(json.dumps(record, ensure_ascii=False) + "\n")
  writer = metric_writers.SummaryWriter(os.path.join(path, "tensorboard"))
  writer.write_scalars(step or 0, result.metrics)
  writer.close()
  return path


def run(checkpoint_path: str, *,
        mixture_or_task_name: str | None = None,
        feature_lengths: Mapping[str, int] | None = None,
        num_pauses: int | None = None,
        num_pauses_sweep: Sequence[int] | None = None,
        batch_size: int = 32,
        split: str = "validation",
        num_examples: int | None = None,
        decode: DecodeOptions = DecodeOptions(),
        output_dir: str | None = None,
        step: int | None = None,
        mesh: jax.sharding.Mesh | None = None,
        rules: parallel.LogicalRules = parallel.DEFAULT_RULES,
        ) -> dict[str, dict[int, dict[str, float]]]:
  """Evaluates a checkpoint; returns {task: {M_inf: metrics}} and writes the files.

  The Task defaults to the one the checkpoint was finetuned on (its standard
  form), M_inf to the M of a named pause variant or else the M_ft the
  checkpoint was finetuned with; `num_pauses_sweep` evaluates
  each M_inf in turn and writes the sweep table and plot. `output_dir`
  defaults to <MODEL_DIR>/eval.
  """
  from pause_flax.evaluation import plots  # pylint: disable=g-import-not-at-top
  mesh = parallel.make_mesh() if mesh is None else mesh
  sweep = None if num_pauses_sweep is None else [int(m) for m in num_pauses_sweep]
  if sweep is not None and (not sweep or min(sweep) < 0 or len(set(sweep)) != len(sweep)):
    raise ValueError(f"NUM_PAUSES_INFERENCE_SWEEP={num_pauses_sweep!r} must list distinct "
                     "integers >= 0.")
  ckpt = load_checkpoint(checkpoint_path, mesh, rules, step)
  name = mixture_or_task_name or ckpt.meta.get("base_task")
  if name is None:
    raise ValueError("The checkpoint does not record its finetuning task: set "
                     "MIXTURE_OR_TASK_NAME.")
  if num_pauses is None:  # a pause variant's own M, else the checkpoint's M_ft
    num_pauses = standard_task(name)[1] or ckpt.meta.get("num_pauses", 0)
  if decode.max_pauses_per_token is None and "adaptive_pauses" in ckpt.meta:
    # An adaptive-pause run: by default the budget is the K it was trained with.
    decode = dataclasses.replace(
        decode, max_pauses_per_token=int(ckpt.meta["adaptive_pauses"]["max_pauses"]))
  evaluator = Evaluator(name, batch_size=batch_size, mesh=mesh, rules=rules,
                        feature_lengths=feature_lengths, split=split,
                        num_examples=num_examples, decode=decode)
  output_dir = output_dir or os.path.join(ckpt.model_dir, "eval")
  results: dict[str, dict[int, dict[str, float]]] = {t: {} for t in evaluator.task_names}
  for m in sweep if sweep is not None else [num_pauses]:
    for task, result in evaluator.evaluate(ckpt.model, m, step=ckpt.step).items():
      results[task][m] = result.metrics
      path = write_result(output_dir, result, step=ckpt.step, checkpoint=checkpoint_path)
      logging.info("Wrote %s", path)
  if sweep is not None and jax.process_index() == 0:
    for task, by_m in results.items():
      plots.write_sweep(os.path.join(output_dir, task), task, by_m, step=ckpt.step,
                        num_pauses_finetune=ckpt.meta.get("num_pauses"))
  return results


class PeriodicEval:
  """`loop.train`'s eval_hook: evaluates the live model every `every` steps.

  Called at log steps, it evaluates at the first one at or after each
  multiple of `every`, and returns {'eval/<task>/M<m>/<metric>': value} for
  the training logger (metrics.jsonl and TensorBoard); {} otherwise.
  """

  def __init__(self, every: int, evaluator: Evaluator, num_pauses: Sequence[int]):
    if every < 1:
      raise ValueError(f"eval every={every} must be >= 1.")
    self.every = every
    self.evaluator = evaluator
    self.num_pauses = list(num_pauses)
    self._last = 0  # step // every at the last evaluation

  def __call__(self, step: int, model: transformer_lib.Transformer) -> dict[str, float]:
    if step // self.every <= self._last:
      return {}
    self._last = step // self.every
    out = {}
    for m in self.num_pauses:
      for task, result in self.evaluator.evaluate(model, m, step=step).items():
        out.update({f"eval/{task}/M{m}/{k}": v for k, v in result.metrics.items()})
    return out
