"""Registered seqio Tasks, and pause variants of any Task or Mixture.

Importing this module registers (idempotently; re-importing or re-registering
never raises, the newest registration wins):

  c4_en_lm, c4_en_lm_pause        TFDS c4/en:3.0.1, T5's 32k SentencePiece
                                  vocabulary, pause fraction 0.1
  synthetic_lm, synthetic_lm_pause  offline corpus (pause_flax.data.synthetic),
                                  bytes, pause fraction 0.1
  synthetic_<task>, synthetic_<task>_pause  for task in addition, digit_sum,
                                  pointer; M_ft = 10 pauses after the prefix

Standard Tasks use the plain base vocabulary; pause variants wrap it in a
PauseVocabulary (one more id), so a standard checkpoint gains one embedding
row when it is pause-finetuned. Nothing is read at import: the C4 vocabulary
and data are opened on first use. `register_c4_tasks` re-registers C4 with
another data_dir or vocabulary (a gin-configurable edge).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping

import seqio
import tensorflow as tf

from pause_flax.data import preprocessors as prep
from pause_flax.data import synthetic
from pause_flax.data.feature_converters import (PauseLMFeatureConverter,
                                               PausePrefixLMFeatureConverter)
from pause_flax.vocab import PauseVocabulary

DEFAULT_SPM_PATH = "gs://t5-data/vocabs/cc_all.32000/sentencepiece.model"
C4_TFDS_NAME = "c4/en:3.0.1"
DEFAULT_PAUSE_FRACTION = 0.1
DEFAULT_NUM_PAUSES = 10  # M_ft for finetuning variants.

_DEFAULT_LENGTHS: dict[str, dict[str, int]] = {}
# pause_variant marks what it registers with this attribute (its arguments),
# on the provider itself so that the mark survives a module reload.
_SPEC_ATTR = "_pause_flax_variant_spec"


def _add_task(name: str, **kwargs) -> seqio.Task:
  """Registers a Task this module owns, replacing any earlier registration."""
  seqio.TaskRegistry.remove(name)
  return seqio.TaskRegistry.add(name, **kwargs)


def _lm_preprocessors() -> list:
  return [
      prep.lm,
      functools.partial(seqio.preprocessors.tokenize, copy_pretokenized=False),
      seqio.preprocessors.append_eos,
      prep.reduce_concat_tokens,
      prep.split_tokens_to_targets_length,
  ]


def _pause_features(features: Mapping[str, seqio.Feature]
                    ) -> dict[str, seqio.Feature]:
  """The features with every token vocabulary wrapped in a PauseVocabulary."""
  out = {}
  for key, feature in features.items():
    vocab = getattr(feature, "vocabulary", None)
    if isinstance(vocab, seqio.Vocabulary) and not isinstance(
        vocab, (PauseVocabulary, seqio.PassThroughVocabulary)):
      feature = dataclasses.replace(feature, vocabulary=PauseVocabulary(vocab))
    out[key] = feature
  return out


def _variant_name(base: str, form: str, fraction: float | None,
                  num_pauses: int | None, pause_token: int | None) -> str:
  kind = "pause" if pause_token is None else f"filler{pause_token}"
  if form == "finetune":
    return f"{base}_{kind}" if num_pauses == DEFAULT_NUM_PAUSES else (
        f"{base}_{kind}{num_pauses}")
  if num_pauses is not None:
    return f"{base}_{kind}_n{num_pauses}"
  return f"{base}_{kind}" if fraction == DEFAULT_PAUSE_FRACTION else (
      f"{base}_{kind}_f{fraction:g}")


def pause_variant(task_or_mixture_name: str, *,
                  fraction: float | None = None,
                  num_pauses: int | None = None,
                  form: str = "pretrain",
                  name: str | None = None,
                  pause_token: int | None = None) -> str:
  """Registers the pause variant of a registered Task or Mixture.

  form='pretrain' appends `inject_pauses` on 'targets' after all of the
  Task's preprocessors (so after any cache step: pauses are redrawn each
  epoch); `fraction` (default 0.1) or `num_pauses` sets M.
  form='finetune' appends `append_pauses` on 'inputs' (M = `num_pauses`,
  default 10), truncating the prefix so the pauses survive.
  Token vocabularies become PauseVocabulary; a Mixture gets the variant of
  each of its Tasks, at the same rates.

  With `pause_token` set, that ordinary token id (e.g. the id of '.') is
  inserted instead and vocabularies stay as they are: the filler-token
  control. Default names are '<name>_pause' (fraction 0.1 / M = 10),
  '<name>_pause_f0.2', '<name>_pause_n20' (pretrain) or '<name>_pause20'
  (finetune); 'filler<id>' replaces 'pause' for fillers.

  Returns:
    The variant's name. Calling again with the same arguments is a no-op.
  """
  if form not in ("pretrain", "finetune"):
    raise ValueError(
        f"form={form!r} is invalid: use 'pretrain' (inject pauses into "
        "'targets') or 'finetune' (append pauses to 'inputs').")
  if fraction is not None and num_pauses is not None:
    raise ValueError(
        f"Set fraction ({fraction!r}) or num_pauses ({num_pauses!r}), not both.")
  if form == "finetune":
    if fraction is not None:
      raise ValueError(
          f"fraction={fraction!r} applies to form='pretrain'; finetuning "
          "appends a fixed num_pauses.")
    num_pauses = DEFAULT_NUM_PAUSES if num_pauses is None else num_pauses
  elif num_pauses is None and fraction is None:
    fraction = DEFAULT_PAUSE_FRACTION
  if num_pauses is not None and (isinstance(num_pauses, bool) or
                                 not isinstance(num_pauses, int) or
                                 num_pauses < 0):
    raise ValueError(f"num_pauses={num_pauses!r} is invalid: use an integer >= 0.")
  if fraction is not None and not 0 <= fraction < 1:
    raise ValueError(f"fraction={fraction!r} is invalid: use a number in [0, 1).")

  provider = seqio.get_mixture_or_task(task_or_mixture_name)
  name = name or _variant_name(task_or_mixture_name, form, fraction,
                               num_pauses, pause_token)
  spec = (task_or_mixture_name, id(provider), form, fraction, num_pauses,
          pause_token)
  registered = seqio.maybe_get_mixture_or_task(name) if (
      name in seqio.TaskRegistry.names() or
      name in seqio.MixtureRegistry.names()) else None
  if registered is not None:
    if not hasattr(registered, _SPEC_ATTR):
      raise ValueError(
          f"{name!r} is already registered and is not a pause variant; pass "
          "another name=.")
    if getattr(registered, _SPEC_ATTR) == spec:
      return name

  if isinstance(provider, seqio.Mixture):
    tasks = [(pause_variant(t.name, fraction=fraction, num_pauses=num_pauses,
                            form=form, pause_token=pause_token),
              provider.get_rate(t)) for t in provider.tasks]
    seqio.MixtureRegistry.remove(name)
    variant = seqio.MixtureRegistry.add(name, tasks)
  else:
    if form == "pretrain":
      step = functools.partial(prep.inject_pauses, fraction=fraction,
                               num_pauses=num_pauses, pause_id=pause_token)
    else:
      if "inputs" not in provider.output_features:
        raise ValueError(
            f"Task {task_or_mixture_name!r} has no 'inputs' feature (features: "
            f"{sorted(provider.output_features)}); form='finetune' appends "
            "pauses to the prefix. Use form='pretrain' for LM tasks.")
      step = functools.partial(prep.append_pauses, num_pauses=num_pauses,
                               pause_id=pause_token)
    features = (provider.output_features if pause_token is not None else
                _pause_features(provider.output_features))
    variant = provider.replace(
        name=name, output_features=features,
        preprocessors=list(provider.preprocessors) + [step])
    seqio.TaskRegistry.remove(name)
    seqio.TaskRegistry.add_provider(name, variant)
  setattr(variant, _SPEC_ATTR, spec)
  if task_or_mixture_name in _DEFAULT_LENGTHS:
    _DEFAULT_LENGTHS[name] = _DEFAULT_LENGTHS[task_or_mixture_name]
  return name


def filler_variant(task_or_mixture_name: str, filler_id: int, **kwargs) -> str:
  """`pause_variant` with an ordinary token id in place of `<pause>`."""
  return pause_variant(task_or_mixture_name, pause_token=filler_id, **kwargs)


def get_vocabulary(task_or_mixture_name: str) -> seqio.Vocabulary:
  """The 'targets' vocabulary: a PauseVocabulary for pause variants."""
  features = seqio.get_mixture_or_task(task_or_mixture_name).output_features
  if "targets" not in features:
    raise ValueError(
        f"{task_or_mixture_name!r} has no 'targets' feature (features: "
        f"{sorted(features)}).")
  return features["targets"].vocabulary


def get_feature_converter(task_or_mixture_name: str, pack: bool = False
                          ) -> seqio.FeatureConverter:
  """LM converter for targets-only tasks, PrefixLM for tasks with 'inputs'.

  Pause targets get loss weight 0 when the vocabulary is a PauseVocabulary;
  a standard task gets the same converters without a pause id.
  """
  features = seqio.get_mixture_or_task(task_or_mixture_name).output_features
  vocab = get_vocabulary(task_or_mixture_name)
  pause_id = vocab.pause_id if isinstance(vocab, PauseVocabulary) else None
  if "inputs" in features:
    return PausePrefixLMFeatureConverter(pause_id, pack=pack)
  return PauseLMFeatureConverter(pause_id, pack=pack)


def default_task_feature_lengths(task_or_mixture_name: str) -> dict[str, int]:
  """The sequence lengths a registered task is meant for (a starting point)."""
  if task_or_mixture_name not in _DEFAULT_LENGTHS:
    raise ValueError(
        f"No default lengths for {task_or_mixture_name!r}; known: "
        f"{sorted(_DEFAULT_LENGTHS)}. Pass task_feature_lengths explicitly.")
  return dict(_DEFAULT_LENGTHS[task_or_mixture_name])


def register_c4_tasks(data_dir: str | None = None,
                      spm_path: str = DEFAULT_SPM_PATH,
                      *,
                      vocabulary: seqio.Vocabulary | None = None,
                      fraction: float = DEFAULT_PAUSE_FRACTION,
                      sequence_length: int = 2048) -> tuple[str, str]:
  """Registers 'c4_en_lm' and 'c4_en_lm_pause' over TFDS c4/en:3.0.1.

  Args:
    data_dir: TFDS data_dir holding a prepared c4/en/3.0.1 (read only); None
      means TFDS's default. An explicit directory must exist.
    spm_path: SentencePiece model (any tf.io.gfile path); T5's 32k vocabulary
      by default. Opened on first use, not here; an explicit non-default path
      must exist.
    vocabulary: a vocabulary to use instead of `spm_path` (e.g. bytes).
    fraction: pause fraction of 'c4_en_lm_pause'.
    sequence_length: the default 'targets' length L of both tasks.

  Returns:
    ('c4_en_lm', 'c4_en_lm_pause').
  """
  if data_dir is not None and not tf.io.gfile.isdir(data_dir):
    raise FileNotFoundError(
        f"C4 data_dir={data_dir!r} does not exist; point it at a TFDS data_dir "
        f"holding {C4_TFDS_NAME} (prepared, e.g. with tfds build), or pass None "
        "for TFDS's default.")
  if vocabulary is None:
    if spm_path != DEFAULT_SPM_PATH and not tf.io.gfile.exists(spm_path):
      raise FileNotFoundError(
          f"SentencePiece model spm_path={spm_path!r} does not exist; pass the "
          "path of a sentencepiece .model file, or vocabulary=.")
    vocabulary = seqio.SentencePieceVocabulary(spm_path)
  _add_task(
      "c4_en_lm",
      source=seqio.TfdsDataSource(C4_TFDS_NAME, tfds_data_dir=data_dir,
                                  splits=("train", "validation"),
                                  read_only=True),
      output_features={"targets": seqio.Feature(vocabulary, add_eos=True)},
      preprocessors=_lm_preprocessors(),
      metric_fns=[])
  _DEFAULT_LENGTHS["c4_en_lm"] = {"targets": sequence_length}
  return "c4_en_lm", pause_variant("c4_en_lm", fraction=fraction,
                                   name="c4_en_lm_pause")


def register_synthetic_downstream_task(name: str, task: str,
                                       vocabulary: seqio.Vocabulary) -> str:
  """Registers synthetic downstream `task` (inputs -> targets, exact match) as `name`."""
  if task not in synthetic.DOWNSTREAM_GENERATORS:
    raise ValueError(f"task={task!r}; choose from {sorted(synthetic.DOWNSTREAM_GENERATORS)}.")
  _add_task(
      name,
      source=seqio.FunctionDataSource(
          functools.partial(synthetic.downstream_dataset_fn, task),
          splits=tuple(synthetic.DOWNSTREAM_SPLIT_SIZES),
          num_input_examples=synthetic.DOWNSTREAM_SPLIT_SIZES),
      output_features={
          "inputs": seqio.Feature(vocabulary, add_eos=False),
          "targets": seqio.Feature(vocabulary, add_eos=True),
      },
      preprocessors=[seqio.preprocessors.tokenize,
                     seqio.preprocessors.append_eos_after_trim],
      postprocess_fn=synthetic.postprocess_answer,
      metric_fns=[synthetic.exact_match])
  return name


def register_synthetic_tasks(sequence_length: int = 512) -> list[str]:
  """Registers the offline synthetic tasks; returns their names."""
  vocab = seqio.ByteVocabulary()
  names = ["synthetic_lm"]
  _add_task(
      "synthetic_lm",
      source=seqio.FunctionDataSource(
          synthetic.lm_dataset_fn, splits=tuple(synthetic.LM_SPLIT_SIZES),
          num_input_examples=synthetic.LM_SPLIT_SIZES),
      output_features={"targets": seqio.Feature(vocab, add_eos=True)},
      preprocessors=_lm_preprocessors(),
      metric_fns=[])
  _DEFAULT_LENGTHS["synthetic_lm"] = {"targets": sequence_length}
  names.append(pause_variant("synthetic_lm", name="synthetic_lm_pause"))
  for task in synthetic.DOWNSTREAM_GENERATORS:
    name = register_synthetic_downstream_task(f"synthetic_{task}", task, vocab)
    _DEFAULT_LENGTHS[name] = {"inputs": 64, "targets": 16}
    names += [name, pause_variant(name, form="finetune",
                                  name=f"{name}_pause")]
  return names


register_c4_tasks()
register_synthetic_tasks()

# The paper's downstream Tasks (squad, gsm8k, ...) register on import; the
# module imports this one, so this stays the last line.
from pause_flax.data import downstream as _downstream  # pylint: disable=g-import-not-at-top,unused-import
