"""Registered seqio Tasks, and pause variants of any Task or Mixture.

The module users import for Tasks: it hands on the registry's names
(`pause_variant`, `filler_variant`, `variant_spec`, `training_task`,
`get_vocabulary`, `default_task_feature_lengths`, `add_task`, ...; they live
in pause_flax.data.registry) and registers the Tasks below.

Importing this module registers (idempotently; re-importing or re-registering
never raises, the newest registration wins):

  c4_en_lm, c4_en_lm_pause        TFDS c4/en:3.0.1, T5's 32k SentencePiece
                                  vocabulary, pause fraction 0.1
  synthetic_lm, synthetic_lm_pause  offline corpus (pause_flax.data.synthetic),
                                  bytes, pause fraction 0.1
  synthetic_<task>, synthetic_<task>_pause  for task in addition, digit_sum,
                                  pointer; M_ft = 10 pauses after the prefix
  synthetic_parity                parity of 20 bits with threshold pause_targets
                                  (the supervised-pause positive control)
  synthetic_3sum                  3SUM of 5 tuples of 3 digits mod 10, half the
                                  training examples with Pfau's per-pair hints
                                  (the second positive control)
  the paper's downstream Tasks    squad, gsm8k, ... (pause_flax.data.downstream)

Standard Tasks use the plain base vocabulary; pause variants wrap it in a
PauseVocabulary (one more id), so a standard checkpoint gains one embedding
row when it is pause-finetuned. Nothing is read at import: the C4 vocabulary
and data are opened on first use. `register_c4_tasks` re-registers C4 with
another data_dir or vocabulary (a gin-configurable edge).
"""

from __future__ import annotations

import functools

import seqio
import tensorflow as tf

from pause_flax.data import adaptive
from pause_flax.data import downstream  # registers the paper's Tasks  # noqa: F401
from pause_flax.data import preprocessors as prep
from pause_flax.data import synthetic
from pause_flax.data.feature_converters import (PauseLMFeatureConverter,
                                               PausePrefixLMFeatureConverter)
# The registry's public names are this module's: users call tasks.pause_variant.
from pause_flax.data.adaptive import adaptive_variant  # noqa: F401
from pause_flax.data.registry import (DEFAULT_LENGTHS, DEFAULT_NUM_PAUSES,  # noqa: F401
                                      DEFAULT_PAUSE_FRACTION, DEFAULT_SPM_PATH, REPEAT,
                                      VariantSpec, add_task,
                                      default_task_feature_lengths, filler_variant,
                                      get_vocabulary, pause_variant, training_task,
                                      variant_spec)
from pause_flax.vocab import PauseVocabulary

C4_TFDS_NAME = "c4/en:3.0.1"


def _lm_preprocessors() -> list:
  return [
      prep.lm,
      functools.partial(seqio.preprocessors.tokenize, copy_pretokenized=False),
      seqio.preprocessors.append_eos,
      prep.reduce_concat_tokens,
      prep.split_tokens_to_targets_length,
  ]


def get_feature_converter(task_or_mixture_name: str, pack: bool = False
                          ) -> seqio.FeatureConverter:
  """LM converter for targets-only tasks, PrefixLM for tasks with 'inputs'.

  Pause targets get loss weight 0 when the vocabulary is a PauseVocabulary;
  a standard task gets the same converters without a pause id. An adaptive
  variant (`adaptive_variant`) gets the converters that unroll its pauses.
  """
  if adaptive.max_pauses(task_or_mixture_name) is not None:
    return adaptive.feature_converter(task_or_mixture_name, pack=pack)
  features = seqio.get_mixture_or_task(task_or_mixture_name).output_features
  vocab = get_vocabulary(task_or_mixture_name)
  pause_id = vocab.pause_id if isinstance(vocab, PauseVocabulary) else None
  if "inputs" in features:
    return PausePrefixLMFeatureConverter(pause_id, pack=pack)
  return PauseLMFeatureConverter(pause_id, pack=pack)


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
  add_task(
      "c4_en_lm",
      source=seqio.TfdsDataSource(C4_TFDS_NAME, tfds_data_dir=data_dir,
                                  splits=("train", "validation"),
                                  read_only=True),
      output_features={"targets": seqio.Feature(vocabulary, add_eos=True)},
      preprocessors=_lm_preprocessors(),
      metric_fns=[])
  DEFAULT_LENGTHS["c4_en_lm"] = {"targets": sequence_length}
  return "c4_en_lm", pause_variant("c4_en_lm", fraction=fraction,
                                   name="c4_en_lm_pause")


def _add_synthetic_task(name: str, dataset_fn, split_sizes: dict[str, int],
                        vocabulary: seqio.Vocabulary, *, pause_targets: bool = False) -> str:
  """Registers an offline inputs -> targets Task (exact match), with hints if `pause_targets`."""
  output_features = {
      "inputs": seqio.Feature(vocabulary, add_eos=False),
      "targets": seqio.Feature(vocabulary, add_eos=True),
  }
  if pause_targets:
    output_features[prep.PAUSE_TARGETS_KEY] = seqio.Feature(
        vocabulary, add_eos=False, required=False)
  add_task(
      name,
      source=seqio.FunctionDataSource(dataset_fn, splits=tuple(split_sizes),
                                      num_input_examples=split_sizes),
      output_features=output_features,
      preprocessors=[seqio.preprocessors.tokenize,
                     seqio.preprocessors.append_eos_after_trim],
      postprocess_fn=synthetic.postprocess_answer,
      metric_fns=[synthetic.exact_match])
  return name


def register_synthetic_downstream_task(name: str, task: str,
                                       vocabulary: seqio.Vocabulary) -> str:
  """Registers synthetic downstream `task` (inputs -> targets, exact match) as `name`."""
  if task not in synthetic.DOWNSTREAM_GENERATORS:
    raise ValueError(f"task={task!r}; choose from {sorted(synthetic.DOWNSTREAM_GENERATORS)}.")
  return _add_synthetic_task(
      name, functools.partial(synthetic.downstream_dataset_fn, task),
      synthetic.DOWNSTREAM_SPLIT_SIZES, vocabulary)


def register_parity_task(n_bits: int = 20, name: str | None = None) -> str:
  """Registers parity of `n_bits` bits ('synthetic_parity' for 20, else '..._n<bits>').

  Examples carry threshold `pause_targets` (see synthetic.parity_example), so
  `pause_variant(name, form='finetune', num_pauses=n_bits, pause_weight=1)`
  gives the supervised-pause form; without pause_weight they are ignored.
  """
  if isinstance(n_bits, bool) or not isinstance(n_bits, int) or n_bits < 1:
    raise ValueError(f"n_bits={n_bits!r} is invalid: use an integer >= 1.")
  name = name or ("synthetic_parity" if n_bits == 20 else f"synthetic_parity_n{n_bits}")
  _add_synthetic_task(name, functools.partial(synthetic.parity_dataset_fn, n_bits),
                      synthetic.PARITY_SPLIT_SIZES, seqio.ByteVocabulary(),
                      pause_targets=True)
  DEFAULT_LENGTHS[name] = {"inputs": n_bits + 1, "targets": 2}
  return name


def register_3sum_task(n_tuples: int = 5, dim: int = 3, hint_fraction: float = 0.5,
                       name: str | None = None) -> str:
  """Registers 3SUM with Pfau, Merrill & Bowman's hinted/plain mixture.

  'synthetic_3sum' for the defaults, else 'synthetic_3sum_n<n>_d<dim>_h<percent>'.
  A `hint_fraction` of training examples carry per-pair `pause_targets`
  (synthetic.sum3_example; `synthetic.sum3_num_hints(n_tuples, dim)` of them),
  the rest and all validation examples none. `pause_variant(name,
  form='finetune', num_pauses=sum3_num_hints(...), pause_weight=1)` trains the
  hinted examples' pause outputs; plain examples keep weight-0 pauses.
  Defaults: Pfau's d = 3 and half-hinted mixture, n scaled from their 10 down
  to 5 for a two-layer d_model-64 model on CPU (docs/supervised_pauses.md).
  """
  synthetic.check_sum3_params(n_tuples, dim, hint_fraction)
  name = name or ("synthetic_3sum" if (n_tuples, dim, hint_fraction) == (5, 3, 0.5) else
                  f"synthetic_3sum_n{n_tuples}_d{dim}_h{round(100 * hint_fraction)}")
  _add_synthetic_task(
      name, functools.partial(synthetic.sum3_dataset_fn, n_tuples, dim, float(hint_fraction)),
      synthetic.SUM3_SPLIT_SIZES, seqio.ByteVocabulary(), pause_targets=True)
  DEFAULT_LENGTHS[name] = {"inputs": n_tuples * (dim + 1), "targets": 2}
  return name


def register_synthetic_tasks(sequence_length: int = 512) -> list[str]:
  """Registers the offline synthetic tasks; returns their names."""
  vocab = seqio.ByteVocabulary()
  names = ["synthetic_lm"]
  add_task(
      "synthetic_lm",
      source=seqio.FunctionDataSource(
          synthetic.lm_dataset_fn, splits=tuple(synthetic.LM_SPLIT_SIZES),
          num_input_examples=synthetic.LM_SPLIT_SIZES),
      output_features={"targets": seqio.Feature(vocab, add_eos=True)},
      preprocessors=_lm_preprocessors(),
      metric_fns=[])
  DEFAULT_LENGTHS["synthetic_lm"] = {"targets": sequence_length}
  names.append(pause_variant("synthetic_lm", name="synthetic_lm_pause"))
  for task in synthetic.DOWNSTREAM_GENERATORS:
    name = register_synthetic_downstream_task(f"synthetic_{task}", task, vocab)
    DEFAULT_LENGTHS[name] = {"inputs": 64, "targets": 16}
    names += [name, pause_variant(name, form="finetune",
                                  name=f"{name}_pause")]
  names += [register_parity_task(), register_3sum_task()]
  return names


register_c4_tasks()
register_synthetic_tasks()
