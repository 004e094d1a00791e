"""Registering seqio Tasks, their pause variants, and what a registered name means.

The Task modules (`tasks`, `downstream`, `hf_tasks`) register through
`add_task` and record the lengths a Task is meant for in `DEFAULT_LENGTHS`;
`pause_variant` makes the pause (or filler) form of any registered Task or
Mixture, and `variant_spec` tells what a variant was made from.
`training_task` turns a run's pause settings (PAUSE_FRACTION, NUM_PAUSES, the
vocabulary of INIT_FROM) into the Task it trains on. `pause_flax.data.tasks`
hands all of these on; users import them from there.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import NamedTuple

import seqio

from pause_flax.data import policies
from pause_flax.data import preprocessors as prep
from pause_flax.vocab import PauseVocabulary

# T5's 32k SentencePiece model: the default base vocabulary of C4 and the
# paper's downstream Tasks.
DEFAULT_SPM_PATH = "gs://t5-data/vocabs/cc_all.32000/sentencepiece.model"
DEFAULT_PAUSE_FRACTION = 0.1
DEFAULT_NUM_PAUSES = 10  # M_ft for finetuning variants.
# pause_token=REPEAT: the M appended positions repeat the prefix's first M
# tokens (`preprocessors.append_prompt_repeat`), the content-filled control.
REPEAT = "repeat"

# {Task or Mixture name: {feature: length}}: the sequence lengths a registered
# Task is meant for. Registration modules write it; pause variants inherit it.
DEFAULT_LENGTHS: dict[str, dict[str, int]] = {}
# pause_variant marks what it registers with this attribute (a VariantSpec),
# on the provider itself so that the mark survives a module reload.
_SPEC_ATTR = "_pause_flax_variant_spec"
# ... and holds the provider it was made from: an id() alone can be reused by a
# provider registered after the first was freed (CPython 3.12 does so), which
# would keep a stale variant.
_BASE_ATTR = "_pause_flax_variant_base"


class VariantSpec(NamedTuple):
  """What `pause_variant` made a variant from (the arguments it resolved)."""
  base: str                 # the Task or Mixture the variant was made from
  provider_id: int          # id() of that provider when the variant was made
  form: str                 # 'pretrain' (injected) or 'finetune' (appended)
  fraction: float | None    # pretraining: the pause fraction, or None
  num_pauses: int | None    # M (a fixed count), or None
  pause_token: int | str | None   # a filler id, REPEAT, or None for <pause>
  pause_weight: int = 0     # loss weight of supervised pause outputs (0: the paper's)
  # The placement (policies.Placement), None for the form's own (uniform in
  # pretraining, appended in finetuning), and a count policy other than a
  # fixed M or a fraction (those are num_pauses / fraction above), else None.
  placement: policies.Placement | None = None
  count: policies.CountPolicy | None = None


def add_task(name: str, **kwargs) -> seqio.Task:
  """Registers a Task (seqio.TaskRegistry.add's arguments), replacing any earlier one."""
  seqio.TaskRegistry.remove(name)
  return seqio.TaskRegistry.add(name, **kwargs)


def variant_spec(task_or_mixture_name: str) -> VariantSpec | None:
  """The VariantSpec of a variant made by `pause_variant`; None for any other name."""
  spec = getattr(seqio.get_mixture_or_task(task_or_mixture_name), _SPEC_ATTR, None)
  return None if spec is None else VariantSpec(*spec)


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
                  num_pauses: int | None, pause_token: int | None,
                  pause_weight: int = 0) -> str:
  if pause_weight:
    name = _variant_name(base, form, fraction, num_pauses, pause_token)
    return f"{name}_sup" if pause_weight == 1 else f"{name}_sup{pause_weight}"
  kind = ("pause" if pause_token is None else
          "repeat" if pause_token == REPEAT else f"filler{pause_token}")
  if form == "finetune":
    return f"{base}_{kind}" if num_pauses == DEFAULT_NUM_PAUSES else (
        f"{base}_{kind}{num_pauses}")
  if num_pauses is not None:
    return f"{base}_{kind}_n{num_pauses}"
  return f"{base}_{kind}" if fraction == DEFAULT_PAUSE_FRACTION else (
      f"{base}_{kind}_f{fraction:g}")


def _policy_name(base: str, form: str, placement: policies.Placement,
                 count: policies.CountPolicy, pause_token: int | None,
                 pause_weight: int) -> str:
  """Names of variants beyond the paper's: placement (unless uniform
  pretraining) and count spelled out, 'pt_' marking a non-uniform pretraining form."""
  parts = [base, "pause" if pause_token is None else f"filler{pause_token}"]
  if form == "finetune":
    parts.append(placement.suffix())
  elif not isinstance(placement, policies.Uniform):
    parts += ["pt", placement.suffix()]
  parts.append(count.suffix())
  if pause_weight:
    parts.append("sup" if pause_weight == 1 else f"sup{pause_weight}")
  return "_".join(parts)


def pause_variant(task_or_mixture_name: str, *,
                  fraction: float | None = None,
                  num_pauses: int | None = None,
                  form: str = "pretrain",
                  name: str | None = None,
                  pause_token: int | str | None = None,
                  pause_weight: int = 0,
                  placement: policies.Placement | str | None = None,
                  count: policies.CountPolicy | int | float | None = None) -> str:
  """Registers the pause variant of a registered Task or Mixture.

  form='pretrain' appends `inject_pauses` on 'targets' after all of the
  Task's preprocessors (so after any cache step: pauses are redrawn each
  epoch); `fraction` (default 0.1) or `num_pauses` sets M, not both.
  form='finetune' appends `append_pauses` on 'inputs' (M = `num_pauses`,
  default 10), truncating the prefix so the pauses survive.
  Token vocabularies become PauseVocabulary; a Mixture gets the variant of
  each of its Tasks, at the same rates.

  With `pause_token` set, that ordinary token id (e.g. the id of '.') is
  inserted instead and vocabularies stay as they are: the filler-token
  control. `pause_token=REPEAT` ('repeat'; finetuning, appended, a fixed M)
  appends the prefix's own first M tokens instead ('<name>_repeat<M>'): the
  same extra positions with content. Default names are '<name>_pause' (fraction 0.1 / M = 10),
  '<name>_pause_f0.2', '<name>_pause_n20' (pretrain) or '<name>_pause20'
  (finetune); 'filler<id>' replaces 'pause' for fillers.

  With `pause_weight` > 0 (supervised pauses, '<variant>_sup'), the Task's
  examples must carry `pause_targets` (ids, one per pause): the output that
  would predict the k-th pause (or filler) is trained on `pause_targets[k]`
  with that weight (`preprocessors.attach_pause_targets`). 0 keeps the
  paper's weight 0 at pause outputs.

  Beyond the paper (docs/pause_policies.md): `placement` (a
  policies.Placement or 'uniform', 'append', 'before_marker', 'segments';
  default: the form's) and `count` (a policies.CountPolicy, or an int, a
  float, a pair (lo, hi); instead of `fraction` / `num_pauses`) choose where
  and how many, through `preprocessors.insert_pauses`. Their names spell both
  out: '<name>_pause_r2to8' (uniform pretraining, 2..8 pauses),
  '<name>_pause_pt_seg_sent_n1' (pretraining, 1 pause after each sentence),
  '<name>_pause_before_n10' (finetuning, 10 pauses before "Answer:"). The
  paper's pairs keep the paper's names and preprocessors.

  Returns:
    The variant's name. Calling again with the same arguments is a no-op.
  """
  if form not in ("pretrain", "finetune"):
    raise ValueError(
        f"form={form!r} is invalid: use 'pretrain' (inject pauses into "
        "'targets') or 'finetune' (append pauses to 'inputs').")
  prep.check_one_pause_setting(fraction, num_pauses)
  if isinstance(pause_weight, bool) or not isinstance(pause_weight, int) or pause_weight < 0:
    raise ValueError(f"pause_weight={pause_weight!r} is invalid: use an integer >= 0.")
  if count is not None and (fraction is not None or num_pauses is not None):
    raise ValueError(
        f"Set the pause count ({count!r}) or fraction ({fraction!r}) / num_pauses "
        f"({num_pauses!r}), not both.")
  key = "inputs" if form == "finetune" else "targets"
  if pause_token == REPEAT and (form != "finetune" or pause_weight or fraction is not None
                                or not (placement is None or policies.as_placement(
                                    placement) == policies.default_placement(key))
                                or not (count is None or isinstance(
                                    policies.as_count(count), policies.Fixed))):
    raise ValueError(
        f"pause_token={REPEAT!r} (a repeat of the prompt) is offered in the finetuning form, "
        "appended, with a fixed count and no pause_weight; got "
        f"form={form!r}, placement={placement!r}, count={count!r}, pause_weight={pause_weight}.")
  if isinstance(pause_token, str) and pause_token != REPEAT:
    raise ValueError(f"pause_token={pause_token!r}: give a token id, {REPEAT!r} or None.")
  policy = None   # (placement, count) of a variant beyond the paper's
  if placement is not None or count is not None:
    placement = (policies.default_placement(key) if placement is None
                 else policies.as_placement(placement))
    if count is not None:
      count = policies.as_count(count)
    elif fraction is not None:
      count = policies.Fraction(fraction)
    elif num_pauses is not None:
      count = policies.Fixed(num_pauses)
    else:
      count = placement.default_count
    placement.check(key, count)
    # The paper's pairs are the paper's variants: same name, same preprocessor.
    if placement == policies.default_placement(key) and (
        isinstance(count, policies.Fixed) or
        (isinstance(count, policies.Fraction) and form == "pretrain")):
      fraction = getattr(count, "fraction", None)
      num_pauses = getattr(count, "num_pauses", None)
    else:
      policy = (placement, count)
      fraction = getattr(count, "fraction", None)
      num_pauses = getattr(count, "num_pauses", None)
  if policy is None:
    if form == "finetune":
      if fraction is not None:
        raise ValueError(
            f"fraction={fraction!r} applies to form='pretrain'; finetuning appends a "
            "fixed num_pauses (count=policies.Fraction(f) appends a fraction of the "
            "prefix).")
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
  if policy is None:
    name = name or _variant_name(task_or_mixture_name, form, fraction,
                                 num_pauses, pause_token, pause_weight)
    spec = VariantSpec(task_or_mixture_name, id(provider), form, fraction, num_pauses,
                       pause_token, pause_weight)
  else:
    placement, count = policy
    name = name or _policy_name(task_or_mixture_name, form, placement, count, pause_token,
                                pause_weight)
    own_placement = None if placement == policies.default_placement(key) else placement
    other_count = None if isinstance(count, (policies.Fixed, policies.Fraction)) else count
    spec = VariantSpec(task_or_mixture_name, id(provider), form, fraction, num_pauses,
                       pause_token, pause_weight, own_placement, other_count)
  registered = seqio.maybe_get_mixture_or_task(name) if (
      name in seqio.TaskRegistry.names() or
      name in seqio.MixtureRegistry.names()) else None
  if registered is not None:
    if not hasattr(registered, _SPEC_ATTR):
      raise ValueError(
          f"{name!r} is already registered and is not a pause variant; pass "
          "another name=.")
    if (getattr(registered, _SPEC_ATTR) == spec and
        getattr(registered, _BASE_ATTR, None) is provider):
      return name

  if isinstance(provider, seqio.Mixture):
    settings = (dict(placement=policy[0], count=policy[1]) if policy else
                dict(fraction=fraction, num_pauses=num_pauses))
    tasks = [(pause_variant(t.name, form=form, pause_token=pause_token,
                            pause_weight=pause_weight, **settings),
              provider.get_rate(t)) for t in provider.tasks]
    seqio.MixtureRegistry.remove(name)
    variant = seqio.MixtureRegistry.add(name, tasks)
  else:
    if form == "finetune" and "inputs" not in provider.output_features:
      raise ValueError(
          f"Task {task_or_mixture_name!r} has no 'inputs' feature (features: "
          f"{sorted(provider.output_features)}); form='finetune' puts pauses in "
          "the prefix. Use form='pretrain' for LM tasks.")
    if policy is not None:
      step = functools.partial(prep.insert_pauses, placement=policy[0], count=policy[1],
                               pause_id=pause_token, feature_key=key)
    elif form == "pretrain":
      step = functools.partial(prep.inject_pauses, fraction=fraction,
                               num_pauses=num_pauses, pause_id=pause_token)
    elif pause_token == REPEAT:
      step = functools.partial(prep.append_prompt_repeat, num_tokens=num_pauses)
    else:
      step = functools.partial(prep.append_pauses, num_pauses=num_pauses,
                               pause_id=pause_token)
    features = (provider.output_features if pause_token is not None else
                _pause_features(provider.output_features))
    steps = [step]
    if pause_weight:
      if prep.PAUSE_TARGETS_KEY not in provider.output_features:
        raise ValueError(
            f"pause_weight={pause_weight}: Task {task_or_mixture_name!r} has no "
            f"{prep.PAUSE_TARGETS_KEY!r} feature (the ids each pause should predict); "
            "see docs/supervised_pauses.md.")
      steps.append(functools.partial(prep.attach_pause_targets, weight=pause_weight,
                                     pause_id=pause_token, feature_key=key))
      aligned = seqio.Feature(seqio.PassThroughVocabulary(1), add_eos=False,
                              required=False)
      features = {**features, **{k: aligned for k in prep.pause_target_keys(key)}}
    variant = provider.replace(
        name=name, output_features=features,
        preprocessors=list(provider.preprocessors) + steps)
    seqio.TaskRegistry.remove(name)
    seqio.TaskRegistry.add_provider(name, variant)
  setattr(variant, _SPEC_ATTR, spec)
  setattr(variant, _BASE_ATTR, provider)
  if task_or_mixture_name in DEFAULT_LENGTHS:
    DEFAULT_LENGTHS[name] = DEFAULT_LENGTHS[task_or_mixture_name]
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


def default_task_feature_lengths(task_or_mixture_name: str) -> dict[str, int]:
  """The sequence lengths a registered task is meant for (a starting point)."""
  if task_or_mixture_name not in DEFAULT_LENGTHS:
    raise ValueError(
        f"No default lengths for {task_or_mixture_name!r}; known: "
        f"{sorted(DEFAULT_LENGTHS)}. Pass task_feature_lengths explicitly.")
  return dict(DEFAULT_LENGTHS[task_or_mixture_name])


def training_task(task_or_mixture_name: str, *, pause_fraction: float = 0.0,
                  num_pauses: int = 0, init_vocab_size: int | None = None,
                  pause_placement: policies.Placement | str | None = None,
                  pause_count: policies.CountPolicy | int | float | None = None,
                  pause_token: int | None = None,
                  pause_row: bool = False) -> str:
  """The Task or Mixture a training run reads, from the run's pause settings.

  `pause_fraction > 0` (PAUSE_FRACTION): the pretraining form, pauses injected
  (0.1 is the paper's choice). `num_pauses > 0` (NUM_PAUSES): the finetuning
  form, M pauses appended to the prefix. Setting both is an error. With
  neither, a run that starts from a checkpoint whose vocabulary is larger than
  the task's (`init_vocab_size`, e.g. a pause-pretrained INIT_FROM) trains on
  the pause form with 0 pauses, so that its vocabulary keeps the pause row;
  so does a run that inserts pauses itself (`pause_row`, e.g. low-confidence
  pauses). Registers the variant it returns; a standard run gets its own name back.

  Pause policies (PAUSE_PLACEMENT, PAUSE_COUNT, PAUSE_TOKEN; see
  docs/pause_policies.md): `pause_placement` (a policies.Placement or its
  name) and `pause_count` (a policies.CountPolicy or a shorthand: int, float,
  (lo, hi); instead of PAUSE_FRACTION / NUM_PAUSES, not with them) choose
  where and how many; `pause_token` inserts that ordinary token id instead of
  `<pause>` (the filler control). With any of them set, pauses go into the
  prefix ('inputs') of a task that has one and into 'targets' of an LM task,
  with PAUSE_FRACTION / NUM_PAUSES (when set) as the count, else the
  placement's default count.
  """
  prep.check_one_pause_setting(pause_fraction or None, num_pauses or None)
  if pause_placement is None and pause_count is None and pause_token is None:
    if pause_fraction:
      return pause_variant(task_or_mixture_name, fraction=pause_fraction, form="pretrain")
    if num_pauses:
      return pause_variant(task_or_mixture_name, num_pauses=num_pauses, form="finetune")
    if (pause_row and not isinstance(get_vocabulary(task_or_mixture_name), PauseVocabulary)
        ) or (init_vocab_size is not None and (
            init_vocab_size > get_vocabulary(task_or_mixture_name).vocab_size)):
      features = seqio.get_mixture_or_task(task_or_mixture_name).output_features
      form = "finetune" if "inputs" in features else "pretrain"
      return pause_variant(task_or_mixture_name, num_pauses=0, form=form)
    return task_or_mixture_name
  if pause_count is not None and (pause_fraction or num_pauses):
    raise ValueError(
        f"Set PAUSE_COUNT ({pause_count!r}) or PAUSE_FRACTION ({pause_fraction!r}) / "
        f"NUM_PAUSES ({num_pauses!r}), not both: set the one you do not use to 0.")
  features = seqio.get_mixture_or_task(task_or_mixture_name).output_features
  form = "finetune" if "inputs" in features else "pretrain"
  count = pause_count
  if count is None and pause_fraction:
    count = policies.Fraction(pause_fraction)
  elif count is None and num_pauses:
    count = policies.Fixed(num_pauses)
  if count is None and pause_placement is None:
    count = policies.default_placement("inputs" if form == "finetune" else "targets"
                                       ).default_count
  return pause_variant(task_or_mixture_name, form=form, placement=pause_placement,
                       count=count, pause_token=pause_token)
