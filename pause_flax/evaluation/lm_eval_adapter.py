"""lm-evaluation-harness (lm-eval 0.4.x) adapter: `--model pause_flax`.

`PauseFlaxLM` evaluates any pause_flax checkpoint with lm-eval's tasks. It is
registered with lm-eval as `pause_flax` when this module is imported;
`python -m pause_flax.lm_eval ...` (pause_flax/lm_eval.py) registers it lazily
and runs lm-eval's own command line. Needs the `lm_eval` extra
(`pip install -e ".[lm_eval]"`); nothing in pause_flax imports this module.

Every request is scored or decoded exactly as `pause_flax.eval` does it:

  prompt = BOS + context tokens + M_inf pauses     (BOS = 0, as in training)

then the continuation. The model's outputs at the pause positions are never
read (scoring starts at the last pause), and the pause logit is masked, both
when scoring (the distribution is renormalised without it, so `is_greedy`
means "greedy decoding would emit this") and when generating (it can never be
emitted). M_inf = 0 gives the standard prompt. Scoring and generation are
`pause_flax.model.decoding.score` / `generate`, over global batches built as
the evaluator builds them (`evaluator.global_batch`: every process
contributes its rows of each batch, the batch split over the mesh's
data-parallel axes).

- loglikelihood: (sum log p(continuation | prompt), is_greedy) per request. The
  context and continuation are tokenized as lm-eval's own causal models do it
  (trailing spaces of the context move to the continuation; the continuation
  is the tail of the tokenized context + continuation). A context too long for
  the model loses tokens from its left (BOS and the pauses stay).
- loglikelihood_rolling: lm-eval's rolling windows (`get_rolling_token_windows`,
  disjoint), each window scored as BOS + its context + M_inf pauses, then its
  tokens; the window length leaves room for BOS and the pauses in the model's
  max_len. Every token is predicted once; the result is the sum.
- generate_until: greedy (or sampled with `do_sample`/`temperature`/`top_k`)
  KV-cache decoding of at most `max_gen_toks` tokens, stopping at EOS; the text
  is cut at the first of the `until` strings (decoding itself stops only at EOS
  or after max_gen_toks).
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from lm_eval import utils as lm_utils
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from pause_flax import parallel
from pause_flax.data import registry as data_registry
from pause_flax.evaluation import evaluator as ev_lib
from pause_flax.model import decoding
from pause_flax.model import transformer as transformer_lib
from pause_flax.vocab import PauseVocabulary

import seqio  # pylint: disable=g-bad-import-order  (after evaluator: TF set up)

MODEL_NAME = "pause_flax"
BOS_ID = ev_lib.BOS_ID
DEFAULT_BATCH_SIZE = 32   # for batch_size='auto'
DEFAULT_MAX_GEN_TOKS = 256

log = logging.getLogger(__name__)


def make_vocabulary(spec: str | seqio.Vocabulary) -> seqio.Vocabulary:
  """A base vocabulary from `vocabulary=`: a seqio.Vocabulary, 'bytes', a
  SentencePiece model path (*.model), or a registered Task or Mixture name (its
  'targets' vocabulary). A PauseVocabulary is unwrapped to its base."""
  if isinstance(spec, seqio.Vocabulary):
    vocab = spec
  elif spec in ("bytes", "byte"):
    vocab = seqio.ByteVocabulary()
  elif spec.endswith(".model"):
    vocab = seqio.SentencePieceVocabulary(spec)
  else:
    ev_lib.pipeline.check_task_name(spec)
    vocab = data_registry.get_vocabulary(spec)
  return vocab.base if isinstance(vocab, PauseVocabulary) else vocab


def _task_settings(name: str) -> tuple[str, int, int | None]:
  """(standard task, its M, filler id) of a task name; pretraining variants too."""
  try:
    settings = ev_lib.standard_task(name)
  except ValueError:  # a pretraining (injected-pause) variant: its base Task
    spec = data_registry.variant_spec(name)
    if spec is None:
      raise
    settings = spec.base, 0, spec.pause_token
  if settings[2] == data_registry.REPEAT:
    raise ValueError(f"task={name!r} repeats each prompt (a control arm's variant); the "
                     f"lm-eval adapter appends one token id: name {settings[0]!r} instead.")
  return settings


def _round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


@register_model(MODEL_NAME)
class PauseFlaxLM(LM):
  """A pause_flax model as an lm-eval `LM` (model args: see __init__)."""

  def __init__(self, checkpoint: str | None = None, num_pauses: int | None = None,
               step: int | None = None, task: str | None = None,
               vocabulary: str | seqio.Vocabulary | None = None,
               batch_size: int | str = DEFAULT_BATCH_SIZE, max_batch_size: int | None = None,
               max_gen_toks: int = DEFAULT_MAX_GEN_TOKS, seed: int = 0,
               length_multiple: int = 16, device: str | None = None, *,
               model: transformer_lib.Transformer | None = None,
               mesh: jax.sharding.Mesh | None = None,
               rules: parallel.LogicalRules = parallel.DEFAULT_RULES):
    """Restores a checkpoint (or wraps a live `model`) for lm-eval.

    Args:
      checkpoint: a MODEL_DIR, its checkpoints/ folder or checkpoints/<step>
        (as `pause_flax.eval`'s CHECKPOINT_PATH).
      num_pauses: M_inf, pauses appended to every context; default: the
        checkpoint's M_ft (0 for a standard or pretraining run).
      step: the checkpoint step (default: the one the path names, else the newest).
      task: the Task whose vocabulary (and filler token) to use; default the
        task the checkpoint was trained on.
      vocabulary: overrides the task's vocabulary: 'bytes', a SentencePiece
        *.model path, a Task name, or a seqio.Vocabulary.
      batch_size: the global batch (rounded up to a multiple of the mesh's
        data-parallel size and the process count); 'auto' gives
        max_batch_size or 32. lm-eval's CLI passes its --batch_size here.
      max_batch_size: only used with batch_size='auto'.
      max_gen_toks: generate_until's default when a task gives none.
      seed: for sampled generation.
      length_multiple: prompt and target widths are padded up to a multiple
        of this, so that few shapes compile.
      device: ignored (lm-eval passes --device; JAX picks the devices).
      model, mesh, rules: from Python: a live Transformer instead of a
        checkpoint (then `vocabulary` is required), and the mesh (default:
        all devices, parallel.make_mesh()).
    """
    super().__init__()
    del device
    self.mesh = parallel.make_mesh() if mesh is None else mesh
    self.rules = rules
    meta: dict[str, Any] = {}
    if model is None:
      if checkpoint is None:
        raise ValueError("pause_flax needs checkpoint=PATH (a MODEL_DIR, its checkpoints/ "
                         "folder or checkpoints/<step>).")
      ckpt = ev_lib.load_checkpoint(str(checkpoint), self.mesh, rules,
                                    None if step is None else int(step))
      model, meta = ckpt.model, ckpt.meta
    elif checkpoint is not None:
      raise ValueError("Give checkpoint= or model=, not both.")
    self.model = model
    self.max_len = model.config.max_len

    task = task or meta.get("base_task") or meta.get("task")
    std_task, task_m, filler_id = _task_settings(task) if task else (None, 0, None)
    if vocabulary is None and std_task is None:
      raise ValueError("The checkpoint records no task: pass vocabulary= (bytes, a "
                       "SentencePiece .model, or a Task name) or task=.")
    self.vocab = make_vocabulary(vocabulary if vocabulary is not None else std_task)
    base_size = self.vocab.vocab_size
    if model.config.vocab_size not in (base_size, base_size + 1):
      raise ValueError(
          f"The model's vocabulary has {model.config.vocab_size} ids, but {self.vocab} has "
          f"{base_size} (+1 for <pause>): pass the vocabulary= the model was trained with.")
    self.pause_id = PauseVocabulary(self.vocab).pause_id
    has_pause = model.config.vocab_size > self.pause_id
    self.banned_ids = (self.pause_id,) if has_pause else ()
    self.appended_id = self.pause_id if filler_id is None else filler_id
    if num_pauses is None:
      num_pauses = task_m or int(meta.get("num_pauses", 0) or 0)
    if isinstance(num_pauses, bool) or not isinstance(num_pauses, int) or num_pauses < 0:
      raise ValueError(f"num_pauses={num_pauses!r} must be an integer >= 0.")
    if num_pauses and not has_pause and filler_id is None:
      raise ValueError(
          f"num_pauses={num_pauses}, but the model's vocabulary ({model.config.vocab_size} "
          f"ids) has no <pause> row (id {self.pause_id}): a standard model takes num_pauses=0.")
    if num_pauses + 2 > self.max_len:
      raise ValueError(f"num_pauses={num_pauses} leaves no room in max_len={self.max_len}.")
    self.num_pauses = num_pauses

    if batch_size == "auto" or str(batch_size).startswith("auto"):
      batch_size = max_batch_size or DEFAULT_BATCH_SIZE
    batch_size = int(batch_size)
    if batch_size < 1:
      raise ValueError(f"batch_size={batch_size} must be >= 1.")
    multiple = int(np.lcm(parallel.data_parallel_size(self.mesh, rules), jax.process_count()))
    self.batch_size = _round_up(batch_size, multiple)
    if self.batch_size != batch_size:
      log.info("pause_flax: batch_size %d rounded up to %d (a multiple of the data-parallel "
               "size and process count %d).", batch_size, self.batch_size, multiple)
    self.max_gen_toks = int(max_gen_toks)
    self.seed = int(seed)
    self.length_multiple = max(1, int(length_multiple))
    log.info("pause_flax: %s, max_len %d, M_inf=%d pauses (id %d)%s, batch %d.",
             checkpoint or "live model", self.max_len, self.num_pauses, self.appended_id,
             ", pause logit masked" if self.banned_ids else "", self.batch_size)

  # -- prompts ------------------------------------------------------------------

  def tok_encode(self, text: str) -> list[int]:
    return list(self.vocab.encode(text)) if text else []

  def tok_decode(self, ids: Sequence[int]) -> str:
    ids = [int(i) for i in ids]
    if self.vocab.eos_id is not None and self.vocab.eos_id in ids:
      ids = ids[:ids.index(self.vocab.eos_id)]
    return self.vocab.decode([i for i in ids if i != self.appended_id])

  def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids), as lm-eval's causal models split them."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
      continuation = context[-n_spaces:] + continuation
      context = context[:-n_spaces]
    if not context:
      return [], self.tok_encode(continuation)
    whole = self.tok_encode(context + continuation)
    context_ids = self.tok_encode(context)
    return context_ids, whole[len(context_ids):]

  def prompt(self, context_ids: Sequence[int], room: int | None = None) -> list[int]:
    """BOS + context + M_inf pauses, the context cut from the left to fit `room`."""
    room = self.max_len if room is None else room
    keep = room - 1 - self.num_pauses
    if keep < 0:
      raise ValueError(f"BOS + {self.num_pauses} pauses do not fit in {room} tokens.")
    context_ids = list(context_ids)[max(0, len(context_ids) - keep):]
    return decoding.build_prompt([BOS_ID, *context_ids], self.num_pauses, self.appended_id)

  # -- batched scoring and generation -----------------------------------------

  def _width(self, n: int, cap: int) -> int:
    return min(_round_up(n, self.length_multiple), max(cap, n))

  def _global(self, rows: np.ndarray) -> jax.Array:
    return ev_lib.global_batch(rows, self.mesh, self.rules)

  def _score_batches(self, rows, todo: list[int]) -> list[list[int]]:
    """Row indices in batches of at most batch_size whose longest prompt and
    longest target fit together in max_len (longest prompts first)."""
    todo = sorted(todo, key=lambda i: (-len(rows[i][0]), -len(rows[i][1]), i))
    batches, chunk, p_max, t_max = [], [], 0, 0
    for i in todo:
      p, t = max(p_max, len(rows[i][0])), max(t_max, len(rows[i][1]))
      if chunk and (len(chunk) == self.batch_size or p + t - 1 > self.max_len):
        batches.append(chunk)
        chunk, p, t = [], len(rows[i][0]), len(rows[i][1])
      chunk.append(i)
      p_max, t_max = p, t
    return batches + [chunk] if chunk else batches

  def score_rows(self, rows: Sequence[tuple[Sequence[int], Sequence[int]]],
                 ) -> list[tuple[float, bool]]:
    """(sum log p(target | prompt), is_greedy) of (prompt ids, target ids) rows.

    Prompts are complete (BOS, context, pauses); rows are sorted by length and
    scored in global batches with `decoding.score`, the pause masked.
    """
    out: list[tuple[float, bool] | None] = [None] * len(rows)
    todo = []
    for i, (prompt, target) in enumerate(rows):
      if not target:
        out[i] = (0.0, True)
      elif len(prompt) + len(target) - 1 > self.max_len:
        raise ValueError(f"prompt {len(prompt)} + continuation {len(target)} tokens exceed "
                         f"max_len={self.max_len} + 1.")
      else:
        todo.append(i)
    for chunk in self._score_batches(rows, todo):
      prompts = ev_lib._pad_rows([rows[i][0] for i in chunk], self.batch_size)  # pylint: disable=protected-access
      targets = ev_lib._pad_rows([rows[i][1] for i in chunk], self.batch_size)  # pylint: disable=protected-access
      t_max = max(map(len, targets))
      t = self._width(t_max, self.max_len + 1 - max(map(len, prompts)))
      p = self._width(max(map(len, prompts)), self.max_len + 1 - t)
      tokens, prompt_lengths = decoding.pad_prompts(prompts, p)
      target, target_lengths = decoding.pad_prompts(targets, t)
      scores_B, greedy_B = decoding.score(
          self.model, self._global(tokens), self._global(target),
          prompt_lengths_B=self._global(prompt_lengths),
          target_lengths_B=self._global(target_lengths), banned_ids=self.banned_ids,
          mesh=self.mesh, rules=self.rules, return_is_greedy=True)
      scores_B, greedy_B = ev_lib._to_host(scores_B), ev_lib._to_host(greedy_B)  # pylint: disable=protected-access
      for r, i in enumerate(chunk):
        out[i] = (float(scores_B[r]), bool(greedy_B[r]))
    return out  # type: ignore[return-value]

  def generate_rows(self, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                    temperature: float = 0.0, top_k: int | None = None,
                    seed: int | None = None) -> list[list[int]]:
    """Generated ids (up to EOS, exclusive) of complete prompts, in global batches."""
    out: list[list[int]] = [[] for _ in prompts]
    order = sorted(range(len(prompts)), key=lambda i: (-len(prompts[i]), i))
    rng = jax.random.key(self.seed if seed is None else seed)
    for start in range(0, len(order), self.batch_size):
      chunk = order[start:start + self.batch_size]
      rows = ev_lib._pad_rows([prompts[i] for i in chunk], self.batch_size)  # pylint: disable=protected-access
      width = self._width(max(map(len, rows)), self.max_len - max_new_tokens)
      tokens, lengths = decoding.pad_prompts(rows, width)
      rng, batch_rng = jax.random.split(rng)
      ids_BxT = decoding.generate(
          self.model, self._global(tokens), prompt_lengths_B=self._global(lengths),
          max_new_tokens=max_new_tokens, eos_id=self.vocab.eos_id,
          banned_ids=self.banned_ids, temperature=temperature, top_k=top_k, rng=batch_rng,
          mesh=self.mesh, rules=self.rules)
      ids_BxT = ev_lib._to_host(ids_BxT)  # pylint: disable=protected-access
      for r, i in enumerate(chunk):
        ids = ids_BxT[r].tolist()
        eos = self.vocab.eos_id
        out[i] = ids[:ids.index(eos)] if eos is not None and eos in ids else ids
    return out

  # -- lm-eval's interface -------------------------------------------------------

  def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
    del disable_tqdm
    rows = []
    for context, continuation in (req.args for req in requests):
      context_ids, continuation_ids = self.encode_pair(context, continuation)
      rows.append((self.prompt(context_ids, self.max_len + 1 - len(continuation_ids)),
                   continuation_ids))
    results = self.score_rows(rows)
    for req, result in zip(requests, results):
      self.cache_hook.add_partial("loglikelihood", req.args, result)
    return results

  def rolling_windows(self, text: str) -> list[tuple[list[int], list[int]]]:
    """(prompt, target) windows that predict every token of `text` once."""
    window = self.max_len - 1 - self.num_pauses
    windows = map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
        token_list=self.tok_encode(text), prefix_token=BOS_ID, max_seq_len=window,
        context_len=1))
    out = []
    for first, (context_ids, target_ids) in enumerate(windows):
      context_ids = context_ids[1:] if first == 0 else context_ids  # drop the prefix BOS
      out.append((self.prompt(context_ids), target_ids))
    return out

  def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
    del disable_tqdm
    rows, owner = [], []
    for n, (text,) in enumerate(req.args for req in requests):
      for row in self.rolling_windows(text):
        rows.append(row)
        owner.append(n)
    totals = [0.0] * len(requests)
    for n, (logp, _) in zip(owner, self.score_rows(rows)):
      totals[n] += logp
    for req, total in zip(requests, totals):
      self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
    return totals

  def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
    del disable_tqdm
    groups: dict[tuple, list[int]] = collections.defaultdict(list)
    settings = []
    for n, (_, gen_kwargs) in enumerate(req.args for req in requests):
      kwargs = dict(gen_kwargs or {})
      until = kwargs.pop("until", None) or []
      until = [until] if isinstance(until, str) else list(until)
      max_new = int(kwargs.pop("max_gen_toks", None) or self.max_gen_toks)
      do_sample = bool(kwargs.pop("do_sample", False))
      temperature = float(kwargs.pop("temperature", 0.0) or 0.0) if do_sample else 0.0
      if do_sample and temperature == 0.0:
        temperature = 1.0
      top_k = kwargs.pop("top_k", None) if do_sample else None
      kwargs.pop("top_p", None)
      if kwargs:
        log.warning("pause_flax: ignoring generation arguments %s.", sorted(kwargs))
      room = self.max_len - self.num_pauses - 2  # BOS, >= 1 context token
      if max_new > room:
        log.warning("pause_flax: max_gen_toks=%d cut to %d (max_len %d, %d pauses).",
                    max_new, room, self.max_len, self.num_pauses)
        max_new = room
      settings.append(until)
      groups[(max_new, temperature, None if top_k is None else int(top_k))].append(n)
    results = [""] * len(requests)
    for (max_new, temperature, top_k), members in groups.items():
      prompts = [self.prompt(self.tok_encode(requests[n].args[0]), self.max_len - max_new)
                 for n in members]
      for n, ids in zip(members, self.generate_rows(prompts, max_new, temperature, top_k)):
        text = self.tok_decode(ids)
        for stop in settings[n]:
          if stop:
            text = text.split(stop)[0]
        results[n] = text
        self.cache_hook.add_partial("generate_until", requests[n].args, text)
    return results
