"""Placement and count policies: positions, counts, seeds, resume, loss weights, defaults."""

import collections

import numpy as np
import pytest
import scipy.stats
import seqio
import tensorflow as tf

from pause_flax.data import pipeline
from pause_flax.data import policies
from pause_flax.data import preprocessors as prep
from pause_flax.data import tasks
from pause_flax.vocab import PauseVocabulary

PAUSE = 999
BYTES = seqio.ByteVocabulary()


def _dataset(rows, key="targets"):
  return tf.data.Dataset.from_generator(
      lambda: ({key: np.asarray(r, np.int32)} for r in rows),
      output_signature={key: tf.TensorSpec([None], tf.int32)})


def _insert(rows, seed=0, key="targets", length=None, features=None, **kwargs):
  with seqio.utils.map_seed_manager(seed):
    ds = prep.insert_pauses(_dataset(rows, key), features,
                            None if length is None else {key: length},
                            pause_id=None if features else PAUSE, feature_key=key, **kwargs)
  return [x[key].tolist() for x in ds.as_numpy_iterator()]


def _pauses(out):
  return [i for i, t in enumerate(out) if t == PAUSE]


# -- the paper's defaults, bit for bit ------------------------------------------

# inject_pauses' output before the policies existed (computed with that code).
GOLDEN_ROWS = [list(range(1, 31)), list(range(1, 17)), list(range(5, 45))]
GOLDEN_FRACTION = [[4, 16, 23], [1, 14], [1, 9, 10]]          # seed 7, fraction 0.1
GOLDEN_FIXED = [[4, 5, 16, 22, 23], [1, 9, 13], [6, 16, 17, 18, 22]]  # seed 7, M=5, L<=24


def test_default_placement_is_the_papers_injection_bit_for_bit():
  assert [_pauses(o) for o in _insert(GOLDEN_ROWS, seed=7)] == GOLDEN_FRACTION
  assert [_pauses(o) for o in _insert(GOLDEN_ROWS, seed=7, placement="uniform", count=0.1)
          ] == GOLDEN_FRACTION
  assert [_pauses(o) for o in _insert(GOLDEN_ROWS, seed=7, length=24, count=5)
          ] == GOLDEN_FIXED
  with seqio.utils.map_seed_manager(7):
    old = prep.inject_pauses(_dataset(GOLDEN_ROWS), pause_id=PAUSE)
  assert [_pauses(x["targets"].tolist()) for x in old.as_numpy_iterator()] == GOLDEN_FRACTION


def test_paper_pairs_register_the_papers_variants(user_task):
  lm, qa = user_task("user_lm", False), user_task("user_qa", True)
  assert tasks.pause_variant(lm, placement="uniform", count=0.1) == tasks.pause_variant(lm)
  assert tasks.pause_variant(lm, count=policies.Fixed(3)) == "user_lm_pause_n3"
  assert tasks.pause_variant(qa, form="finetune", placement="append") == "user_qa_pause"
  assert tasks.pause_variant(qa, form="finetune", count=4) == "user_qa_pause4"
  step = seqio.get_mixture_or_task("user_qa_pause4").preprocessors[-1]
  assert step.func is prep.append_pauses and step.keywords["num_pauses"] == 4
  assert tasks.variant_spec("user_qa_pause4").placement is None


def test_count_plumbing_keeps_the_positions():
  """A degenerate range draws the same slots as the fixed count (same seed)."""
  fixed = _insert(GOLDEN_ROWS, seed=3, count=4)
  assert _insert(GOLDEN_ROWS, seed=3, count=(4, 4)) == fixed
  # Append through the general path (a range) truncates like append_pauses.
  rows = [list(range(1, 40)), list(range(1, 5))]
  for truncate in ("left", "right"):
    general = _insert(rows, key="inputs", length=12,
                      placement=policies.Append(truncate), count=(3, 3))
    with seqio.utils.map_seed_manager(0):
      paper = prep.append_pauses(_dataset(rows, "inputs"), None, {"inputs": 12},
                                 num_pauses=3, pause_id=PAUSE, truncate=truncate)
    assert general == [x["inputs"].tolist() for x in paper.as_numpy_iterator()]


# -- placements -----------------------------------------------------------------


def test_uniform_in_the_prefix_is_uniform_over_slots():
  n, m, examples = 12, 3, 3000
  outs = np.array(_insert([list(range(1, n + 1))] * examples, seed=5, key="inputs",
                          placement="uniform", count=m))
  assert outs.shape == (examples, n + m)
  assert ((outs == PAUSE).sum(axis=1) == m).all()
  assert (np.where(outs == PAUSE, 0, outs) > 0).sum(axis=1).tolist() == [n] * examples
  _, p_value = scipy.stats.chisquare((outs == PAUSE).sum(axis=0))
  assert p_value > 1e-3


def test_uniform_prefix_is_cut_so_every_pause_survives():
  (out,) = _insert([list(range(1, 41))], key="inputs", length=16,
                   placement="uniform", count=4)
  assert len(out) == 16 and out.count(PAUSE) == 4
  assert [t for t in out if t != PAUSE] == list(range(29, 41))   # the end of the prefix


def test_before_marker_last_all_and_absent():
  row = [1, 2, 7, 8, 3, 4, 7, 8, 5]
  marker = policies.BeforeMarker(marker_ids=(7, 8))
  (out,) = _insert([row], key="inputs", placement=marker, count=2)
  assert out == [1, 2, 7, 8, 3, 4, PAUSE, PAUSE, 7, 8, 5]
  every = policies.BeforeMarker(marker_ids=(7, 8), occurrence="all")
  (out,) = _insert([row], key="inputs", placement=every, count=1)
  assert out == [1, 2, PAUSE, 7, 8, 3, 4, PAUSE, 7, 8, 5]
  assert _insert([[1, 7, 3]], key="inputs", placement=marker, count=2) == [[1, 7, 3, PAUSE,
                                                                           PAUSE]]
  skip = policies.BeforeMarker(marker_ids=(7, 8), if_absent="skip")
  assert _insert([[1, 7, 3], []], key="inputs", placement=skip, count=2) == [[1, 7, 3], []]
  error = policies.BeforeMarker(marker_ids=(7, 8), if_absent="error")
  with pytest.raises(tf.errors.InvalidArgumentError, match="not found"):
    _insert([[1, 7, 3]], key="inputs", placement=error, count=2)
  # Pretraining form: lengthened, then the tail is cut back to L.
  (out,) = _insert([row], placement=marker, count=2)
  assert out == [1, 2, 7, 8, 3, 4, PAUSE, PAUSE, 7]


def test_before_marker_encodes_the_marker_and_keeps_it_in_a_cut_prefix():
  vocab = PauseVocabulary(BYTES)
  features = {"inputs": seqio.Feature(vocab)}
  text = "x" * 50 + " Q: 2+2? Answer:"
  (out,) = _insert([BYTES.encode(text)], key="inputs", length=24, features=features,
                   placement="before_marker", count=5)
  ids = [t for t in out if t != vocab.pause_id]
  assert len(out) == 24 and out.count(vocab.pause_id) == 5
  assert vocab.decode(ids).endswith("Answer:")
  first = out.index(vocab.pause_id)
  assert out[first:first + 5] == [vocab.pause_id] * 5
  assert vocab.decode(out[first + 5:]) == "Answer:"


def test_segments_every_k_and_at_sentence_ends():
  (out,) = _insert([list(range(1, 13))], placement=policies.Segments(every=4), count=2)
  # Boundaries after tokens 4 and 8 (not after the last), 2 pauses each; L kept.
  assert out == [1, 2, 3, 4, PAUSE, PAUSE, 5, 6, 7, 8, PAUSE, PAUSE]
  vocab = PauseVocabulary(BYTES)
  features = {"targets": seqio.Feature(vocab)}
  text = "Hi. Yes? No! End."
  (out,) = _insert([BYTES.encode(text)], features=features, placement="segments")
  pause = vocab.pause_id
  pieces = vocab.decode([t if t != pause else BYTES.encode("|")[0] for t in out])
  assert pieces == "Hi.| Yes?| No!| E"   # one pause per boundary, trimmed back to L


def test_placement_checks_are_clear():
  with pytest.raises(ValueError, match="applies to 'inputs'"):
    _insert([[1, 2]], placement="append", count=1)
  with pytest.raises(ValueError, match="per boundary"):
    _insert([[1, 2]], placement="segments", count=0.1)
  with pytest.raises(ValueError, match=r"after='\.\.\.' encodes to 3 tokens"):
    _insert([[1]], features={"targets": seqio.Feature(PauseVocabulary(BYTES))},
            placement=policies.Segments(after=("...",)))
  with pytest.raises(ValueError, match="leaves no room"):
    _insert([[1]], key="inputs", length=8, placement="before_marker", count=(1, 8))
  with pytest.raises(ValueError, match="pause placement 'middle' is invalid"):
    policies.as_placement("middle")
  with pytest.raises(ValueError, match=r"RandomRange\(lo=5, hi=2\) is empty"):
    policies.as_count((5, 2))
  with pytest.raises(ValueError, match="if_absent='never' is invalid"):
    policies.BeforeMarker(if_absent="never")


# -- counts ---------------------------------------------------------------------


def test_fixed_and_fraction_counts_are_exact():
  rows = [list(range(1, n + 1)) for n in (0, 5, 13, 40)]
  for count, expected in ((policies.Fixed(3), [3, 3, 3, 3]),
                          (policies.Fraction(0.25), [0, 1, 3, 10])):   # half to even
    for placement in ("uniform", policies.BeforeMarker(marker_ids=(3, 4))):
      outs = _insert(rows, key="inputs", placement=placement, count=count)
      assert [o.count(PAUSE) for o in outs] == expected


def test_random_range_stays_in_range_and_covers_it():
  lo, hi, examples = 2, 6, 2000
  for key, placement in (("targets", "uniform"), ("inputs", "append")):
    outs = _insert([list(range(1, 30))] * examples, seed=9, key=key, placement=placement,
                   count=(lo, hi))
    if key == "targets":   # some pauses are trimmed off: count before the trim
      assert all(len(o) == 29 for o in outs)
      assert {o.count(PAUSE) for o in outs} <= set(range(0, hi + 1))
      continue
    counts = collections.Counter(o.count(PAUSE) for o in outs)
    assert set(counts) == set(range(lo, hi + 1))
    _, p_value = scipy.stats.chisquare([counts[m] for m in range(lo, hi + 1)])
    assert p_value > 1e-3


def test_curriculum_follows_its_schedule_across_epochs():
  schedule = policies.Curriculum(start=1, end=4, stage_examples=3)
  assert [schedule.count_at(i) for i in range(12)] == [1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4]
  ds = _dataset([list(range(1, 9)), list(range(1, 6))], "inputs").repeat(7)  # as seqio does
  with seqio.utils.map_seed_manager(0):
    out = prep.insert_pauses(ds, pause_id=PAUSE, feature_key="inputs",
                             placement="append", count=schedule)
  counts = [x["inputs"].tolist().count(PAUSE) for x in out.as_numpy_iterator()]
  assert counts == [schedule.count_at(i) for i in range(14)]
  # Uniform pretraining (grouped draws): with groups of one, the example at
  # position i is exactly the fixed-count injection with M = count_at(i).
  schedule = policies.Curriculum(end=3, stage_examples=5)

  def inject(**kwargs):
    with seqio.utils.map_seed_manager(0):
      out = prep.inject_pauses(_dataset([list(range(1, 9))] * 14), pause_id=PAUSE,
                               group_size=1, **kwargs)
    return [x["targets"].tolist() for x in out.as_numpy_iterator()]

  curriculum = inject(count=schedule)
  for m in range(3):
    fixed = inject(num_pauses=m)
    rows = [i for i in range(14) if schedule.count_at(i) == m]
    assert rows and [curriculum[i] for i in rows] == [fixed[i] for i in rows]


# -- seeds, resume --------------------------------------------------------------

RANDOM_POLICIES = [
    ("targets", "uniform", (1, 9)),
    ("inputs", "uniform", 3),
    ("inputs", "append", (1, 5)),
    ("inputs", policies.Segments(every=3), (0, 2)),
]


@pytest.mark.parametrize("key, placement, count", RANDOM_POLICIES)
def test_same_seed_same_pauses_other_seed_other_pauses(key, placement, count):
  rows = [list(range(1, 25))] * 8
  a = _insert(rows, seed=1, key=key, placement=placement, count=count)
  assert _insert(rows, seed=1, key=key, placement=placement, count=count) == a
  assert _insert(rows, seed=2, key=key, placement=placement, count=count) != a


def _stream_task(name, with_inputs):
  """An endless-ish user Task with distinct examples (so order is visible)."""

  def source(split, shuffle_files, seed=None):
    del split, shuffle_files, seed
    i = tf.data.Dataset.range(1000)
    def row(k):
      text = tf.strings.join(["ex ", tf.strings.as_string(k), ". Then more. Answer:"])
      return {"inputs": text, "targets": tf.strings.as_string(k)} if with_inputs else {
          "targets": tf.strings.join([text, " ", text])}
    return i.map(row)

  keys = ("inputs", "targets") if with_inputs else ("targets",)
  tasks.add_task(
      name, source=seqio.FunctionDataSource(source, splits=["train"]),
      output_features={k: seqio.Feature(BYTES, add_eos=k == "targets") for k in keys},
      preprocessors=[seqio.preprocessors.tokenize, seqio.preprocessors.append_eos_after_trim],
      shuffle_buffer_size=16)
  return name


@pytest.mark.parametrize("with_inputs, placement, count", [
    (False, None, policies.Curriculum(end=6, stage_examples=5)),
    (True, "before_marker", (1, 6)),
    (True, "segments", policies.Curriculum(start=1, end=3, stage_examples=4)),
])
def test_resumed_iterator_continues_exactly(tmp_path, user_task, with_inputs, placement, count):
  del user_task  # cleans up user_ Tasks
  base = _stream_task("user_stream_qa" if with_inputs else "user_stream_lm", with_inputs)
  name = tasks.pause_variant(base, form="finetune" if with_inputs else "pretrain",
                             placement=placement, count=count)
  lengths = {"inputs": 40, "targets": 8} if with_inputs else {"targets": 48}

  def batches():
    return pipeline.CheckpointableIterator(
        pipeline.get_dataset(name, lengths, 4, seed=3, process_index=0, process_count=1))

  whole = batches()
  expected = [next(whole) for _ in range(7)]
  first = batches()
  for _ in range(3):
    next(first)
  first.save(str(tmp_path / "it"))
  resumed = batches()
  resumed.restore(str(tmp_path / "it"))
  for want in expected[3:]:
    got = next(resumed)
    for k in want:
      np.testing.assert_array_equal(got[k], want[k])
  pause = tasks.get_vocabulary(name).pause_id
  assert any((b["decoder_input_tokens"] == pause).any() for b in expected)


# -- loss weights, supervised pauses, training_task -----------------------------


@pytest.mark.parametrize("with_inputs, placement, count", [
    (False, None, (2, 8)),
    (False, "segments", 2),
    (False, "before_marker", 3),
    (True, "before_marker", 4),
    (True, "uniform", 3),
])
def test_no_pause_target_is_ever_weighted(user_task, with_inputs, placement, count):
  del user_task
  base = _stream_task("user_stream_qa" if with_inputs else "user_stream_lm", with_inputs)
  name = tasks.pause_variant(base, form="finetune" if with_inputs else "pretrain",
                             placement=placement, count=count)
  lengths = {"inputs": 40, "targets": 8} if with_inputs else {"targets": 48}
  ds = pipeline.get_dataset(name, lengths, 8, seed=0, process_index=0, process_count=1)
  pause = tasks.get_vocabulary(name).pause_id
  seen = 0
  for batch in ds.take(3).as_numpy_iterator():
    at_pause = batch["decoder_target_tokens"] == pause
    seen += at_pause.sum()
    assert (batch["decoder_loss_weights"][at_pause] == 0).all()
    assert (batch["decoder_loss_weights"][~at_pause & (batch["decoder_target_tokens"] > 0)]
            ).any()
  assert seen > 0


def test_supervised_pauses_follow_any_placement():
  parity = tasks.register_parity_task(n_bits=6)
  name = tasks.pause_variant(parity, form="finetune", placement=policies.Segments(every=2),
                             count=1, pause_weight=1)
  assert name == "synthetic_parity_n6_pause_seg2_n1_sup"
  ex = next(seqio.get_mixture_or_task(name).get_dataset(
      {"inputs": 12, "targets": 2}, shuffle=False, seed=0).as_numpy_iterator())
  pause = tasks.get_vocabulary(name).pause_id
  ids, weights = prep.pause_target_keys("inputs")
  is_pause = ex["inputs"] == pause
  assert is_pause.sum() == 3   # after bits 2, 4 and 6 (inputs: 6 bits, then '=')
  assert (ex[weights][is_pause] == 1).all() and (ex[weights][~is_pause] == 0).all()
  assert (ex[ids][is_pause] > 0).all()


def test_training_task_policies_and_old_macros(user_task):
  lm, qa = user_task("user_lm", False), user_task("user_qa", True)
  assert tasks.training_task(lm, pause_fraction=0.1) == "user_lm_pause"
  assert tasks.training_task(qa, num_pauses=4) == "user_qa_pause4"
  assert tasks.training_task(qa, num_pauses=10, pause_placement="before_marker"
                             ) == "user_qa_pause_before_n10"
  assert tasks.training_task(lm, pause_placement="segments") == "user_lm_pause_pt_seg_sent_n1"
  assert tasks.training_task(lm, pause_count=(2, 8)) == "user_lm_pause_r2to8"
  assert tasks.training_task(qa, pause_count=policies.Curriculum(end=8, stage_examples=100)
                             ) == "user_qa_pause_append_cur0to8by1every100"
  assert tasks.training_task(qa, num_pauses=3, pause_token=46) == "user_qa_filler463"
  with pytest.raises(ValueError, match=r"PAUSE_COUNT \(\(2, 8\)\).*NUM_PAUSES \(10\).*not both"):
    tasks.training_task(qa, num_pauses=10, pause_count=(2, 8))
  spec = tasks.variant_spec("user_qa_pause_append_cur0to8by1every100")
  assert spec.form == "finetune" and spec.count == policies.Curriculum(end=8,
                                                                       stage_examples=100)


def test_mixture_variant_gives_each_task_the_policies(user_task):
  lm, other = user_task("user_lm", False), user_task("user_lm2", False)
  seqio.MixtureRegistry.remove("user_mix")
  seqio.MixtureRegistry.add("user_mix", [(lm, 1.0), (other, 3.0)])
  try:
    name = tasks.pause_variant("user_mix", placement="segments", count=(1, 2))
    assert name == "user_mix_pause_pt_seg_sent_r1to2"
    mixture = seqio.get_mixture_or_task(name)
    assert sorted(t.name for t in mixture.tasks) == ["user_lm2_pause_pt_seg_sent_r1to2",
                                                     "user_lm_pause_pt_seg_sent_r1to2"]
    assert mixture.get_rate(seqio.get_mixture_or_task("user_lm2_pause_pt_seg_sent_r1to2")) == 3
    assert tasks.variant_spec(name).placement == policies.Segments()
  finally:
    seqio.MixtureRegistry.remove("user_mix")
    seqio.MixtureRegistry.remove("user_mix_pause_pt_seg_sent_r1to2")


@pytest.fixture
def user_task():
  vocab = seqio.ByteVocabulary()

  def make(name, with_inputs):
    row = {"targets": "answer"}
    if with_inputs:
      row["inputs"] = "question"
    features = {k: seqio.Feature(vocab, add_eos=k == "targets") for k in row}
    tasks.add_task(
        name, source=seqio.FunctionDataSource(
            lambda split, shuffle_files, seed=None: tf.data.Dataset.from_tensors(row),
            splits=["train"]),
        output_features=features,
        preprocessors=[seqio.preprocessors.tokenize, seqio.preprocessors.append_eos_after_trim])
    return name

  yield make
  for name in list(seqio.TaskRegistry.names()):
    if name.startswith("user_"):
      seqio.TaskRegistry.remove(name)


def test_names_are_deterministic_and_distinct():
  kinds = [policies.Uniform(), policies.Append(), policies.Append("right"),
           policies.BeforeMarker(), policies.BeforeMarker("Q:"), policies.BeforeMarker(
               occurrence="all"), policies.BeforeMarker(marker_ids=(5, 6)),
           policies.Segments(), policies.Segments(every=64), policies.Segments(after=(";",))]
  suffixes = [k.suffix() for k in kinds]
  assert len(set(suffixes)) == len(suffixes)
  assert policies.BeforeMarker("Answer :").suffix() != policies.BeforeMarker("Answer:").suffix()
  counts = [policies.Fixed(3), policies.Fraction(0.3), policies.RandomRange(3, 3),
            policies.Curriculum(end=3, stage_examples=3)]
  assert len({c.suffix() for c in counts}) == len(counts)


def test_adaptive_pauses_refuse_a_placement_policy(tmp_path):
  from pause_flax.model import transformer  # pylint: disable=g-import-not-at-top
  from pause_flax.training import adaptive, loop  # pylint: disable=g-import-not-at-top
  with pytest.raises(ValueError, match=r"adaptive_pauses is set with \{'PAUSE_PLACEMENT'"):
    loop.train(model_dir=str(tmp_path / "run"), mixture_or_task_name="synthetic_count",
               task_feature_lengths={"inputs": 24, "targets": 4}, train_steps=1, batch_size=8,
               model_config=transformer.model_config("tiny"),
               adaptive_pauses=adaptive.AdaptivePauses(max_pauses=1),
               pause_placement="before_marker")
