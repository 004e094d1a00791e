"""lm-evaluation-harness adapter: parity with pause_flax's scoring, and offline lm-eval runs."""

import dataclasses
import json
import os
import textwrap
import types

import pytest

# Offline: lm-eval reads the local json files below through `datasets`, which
# reads these at import.
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"
lm_eval = pytest.importorskip("lm_eval")

import jax.numpy as jnp  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position
import seqio  # pylint: disable=g-import-not-at-top,wrong-import-position
from flax import nnx  # pylint: disable=g-import-not-at-top,wrong-import-position

from pause_flax import lm_eval as lm_eval_cli  # pylint: disable=g-import-not-at-top,wrong-import-position
from pause_flax.evaluation import lm_eval_adapter as adapter  # pylint: disable=g-import-not-at-top,wrong-import-position
from pause_flax.model import decoding  # pylint: disable=g-import-not-at-top,wrong-import-position
from pause_flax.model import transformer  # pylint: disable=g-import-not-at-top,wrong-import-position
from pause_flax.training import checkpointing  # pylint: disable=g-import-not-at-top,wrong-import-position

VOCAB = seqio.ByteVocabulary()
PAUSE = VOCAB.vocab_size  # 259
CONFIG = dataclasses.replace(transformer.model_config("tiny"), vocab_size=PAUSE + 1, max_len=64)
M_FT = 3
REQUESTS = [  # (context, continuation): empty context, trailing space, long context
    ("", "hello"), ("2+2=", "4"), ("2+2=", "5"), ("The sky is ", "blue"),
    ("The sky is", " green"), ("x" * 80, " tail"), ("abc", "defghijklmnop"),
    ("Question: 7+1?\nAnswer:", " 8"), ("q", "r"), ("zz", " a b c"), ("1", "1"),
]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  """A tiny pause checkpoint (random weights, byte vocabulary + <pause>), as a
  pause-finetuning run on synthetic_addition with M_ft = 3 records it."""
  model = transformer.Transformer(CONFIG, rngs=nnx.Rngs(7))
  run = tmp_path_factory.mktemp("lm_eval_run")
  ckpt = checkpointing.Checkpointer(str(run / "checkpoints"),
                                    checkpointing.CheckpointOptions(async_save=False))
  meta = {"vocab_size": CONFIG.vocab_size, "model_config": dataclasses.asdict(CONFIG),
          "task": "synthetic_addition_pause3", "base_task": "synthetic_addition",
          "num_pauses": M_FT}
  ckpt.save(5, nnx.to_pure_dict(nnx.state(model)), {}, None, meta)
  ckpt.close()
  return str(run), model


def _reference(model, prompt, target):
  """Unbatched full forward: sum log p(target | prompt), pause renormalised out; is_greedy."""
  tokens = jnp.asarray([[*prompt, *target[:-1]]], jnp.int32)
  logits = np.asarray(model(tokens)[0, len(prompt) - 1:, :CONFIG.vocab_size], np.float64)
  logits[:, PAUSE] = -np.inf
  logp = logits - np.log(np.sum(np.exp(logits - logits.max(-1, keepdims=True)), -1,
                                keepdims=True)) - logits.max(-1, keepdims=True)
  picked = logp[np.arange(len(target)), target]
  return float(picked.sum()), bool((logits.argmax(-1) == np.asarray(target)).all())


def _requests(args):
  return [types.SimpleNamespace(args=a) for a in args]


@pytest.mark.parametrize("m", [0, M_FT])
def test_loglikelihood_matches_pause_flax_scoring(checkpoint, m):
  path, model = checkpoint
  lm = adapter.PauseFlaxLM(checkpoint=path, num_pauses=m, batch_size=8)
  assert (lm.num_pauses, lm.banned_ids, lm.batch_size) == (m, (PAUSE,), 8)
  got = lm.loglikelihood(_requests(REQUESTS))
  for (context, continuation), (logp, greedy) in zip(REQUESTS, got):
    ctx_ids, cont_ids = lm.encode_pair(context, continuation)
    # lm-eval's split: trailing context spaces belong to the continuation.
    assert VOCAB.decode(ctx_ids + cont_ids) == context + continuation
    assert ctx_ids == VOCAB.encode(context.rstrip())
    keep = CONFIG.max_len + 1 - len(cont_ids) - 1 - m  # long contexts lose their left
    prompt = [0, *ctx_ids[max(0, len(ctx_ids) - keep):], *[PAUSE] * m]
    ref, ref_greedy = _reference(model, prompt, cont_ids)
    # The decoding score path, one row, no padding.
    one = float(decoding.score(model, np.asarray([prompt]), np.asarray([cont_ids]),
                               banned_ids=(PAUSE,))[0])
    assert abs(logp - ref) < 1e-4 and abs(logp - one) < 1e-4, (context, continuation)
    assert greedy == ref_greedy
  # Pauses change the scores (the pause rows are live).
  if m:
    std = adapter.PauseFlaxLM(checkpoint=path, num_pauses=0, batch_size=8)
    assert not np.allclose([g[0] for g in got],
                           [g[0] for g in std.loglikelihood(_requests(REQUESTS))])


def test_defaults_come_from_the_checkpoint(checkpoint):
  path, model = checkpoint
  lm = adapter.PauseFlaxLM(checkpoint=path, batch_size=3)
  assert lm.num_pauses == M_FT  # the checkpoint's M_ft
  assert lm.batch_size == 8     # rounded up to the 8 data-parallel devices
  assert isinstance(lm.vocab, seqio.ByteVocabulary)
  assert lm.prompt(VOCAB.encode("ab")) == [0, *VOCAB.encode("ab"), PAUSE, PAUSE, PAUSE]
  std = transformer.Transformer(dataclasses.replace(CONFIG, vocab_size=PAUSE),
                                rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="no <pause> row"):
    adapter.PauseFlaxLM(model=std, vocabulary="bytes", num_pauses=1)
  assert adapter.PauseFlaxLM(model=std, vocabulary="bytes").banned_ids == ()
  with pytest.raises(ValueError, match="not a registered"):
    adapter.PauseFlaxLM(model=model, vocabulary="synthetic_lm_spm_missing_task")


def test_loglikelihood_rolling_predicts_every_token_once(checkpoint):
  path, model = checkpoint
  lm = adapter.PauseFlaxLM(checkpoint=path, num_pauses=2, batch_size=8)
  texts = ["short text", "".join(chr(97 + i % 26) for i in range(150))]
  totals = lm.loglikelihood_rolling(_requests([(t,) for t in texts]))
  for text, total in zip(texts, totals):
    windows = lm.rolling_windows(text)
    assert [i for _, target in windows for i in target] == VOCAB.encode(text)
    ref = 0.0
    for prompt, target in windows:
      assert prompt[0] == 0 and prompt[-2:] == [PAUSE, PAUSE] and PAUSE not in prompt[:-2]
      assert len(prompt) + len(target) - 1 <= CONFIG.max_len
      ref += _reference(model, prompt, target)[0]
    assert len(windows) == (1 if len(text) < 60 else 3)
    assert abs(total - ref) < 1e-3


def test_generate_until_matches_decoding_and_never_emits_a_pause(checkpoint):
  path, model = checkpoint
  lm = adapter.PauseFlaxLM(checkpoint=path, num_pauses=M_FT, batch_size=8)
  contexts = ["12+34=", "Q: hi\nA:", "abc"]
  kwargs = {"until": ["q", "\n\n"], "max_gen_toks": 6, "do_sample": False}
  got = lm.generate_until(_requests([(c, dict(kwargs)) for c in contexts]))
  prompts = [lm.prompt(VOCAB.encode(c)) for c in contexts]
  tokens, lengths = decoding.pad_prompts(prompts)
  ids = np.asarray(decoding.generate(model, tokens, prompt_lengths_B=lengths, max_new_tokens=6,
                                     eos_id=VOCAB.eos_id, banned_ids=(PAUSE,)))
  assert not (ids == PAUSE).any()
  for row, text in zip(ids.tolist(), got):
    row = row[:row.index(VOCAB.eos_id)] if VOCAB.eos_id in row else row
    assert text == VOCAB.decode(row).split("q")[0].split("\n\n")[0]


# -- lm-eval end to end, offline --------------------------------------------------

MC_DOCS = [{"question": "2+2=", "choices": ["4", "5", "22"], "label": 0},
           {"question": "The sky is", "choices": [" blue", " green"], "label": 1},
           {"question": "x>y, y>", "choices": ["z", "x", "q"], "label": 2},
           {"question": "abc", "choices": ["d", "e"], "label": 0}]
GEN_DOCS = [{"question": "1+1=", "answer": "2"}, {"question": "ab", "answer": "c"},
            {"question": "hello", "answer": " world"}]


def _write_tasks(root):
  root.mkdir(exist_ok=True)
  for name, docs in (("mc", MC_DOCS), ("gen", GEN_DOCS)):
    with open(root / f"{name}.jsonl", "w", encoding="utf-8") as f:
      f.writelines(json.dumps(d) + "\n" for d in docs)
  (root / "pf_toy_mc.yaml").write_text(textwrap.dedent(f"""\
      task: pf_toy_mc
      dataset_path: json
      dataset_kwargs:
        data_files:
          test: {root / 'mc.jsonl'}
      test_split: test
      output_type: multiple_choice
      doc_to_text: "{{{{question}}}}"
      doc_to_choice: "{{{{choices}}}}"
      doc_to_target: label
      metric_list:
        - metric: acc
      """))
  (root / "pf_toy_gen.yaml").write_text(textwrap.dedent(f"""\
      task: pf_toy_gen
      dataset_path: json
      dataset_kwargs:
        data_files:
          test: {root / 'gen.jsonl'}
      test_split: test
      output_type: generate_until
      doc_to_text: "{{{{question}}}}"
      doc_to_target: "{{{{answer}}}}"
      generation_kwargs:
        until: ["\\n"]
        max_gen_toks: 5
        do_sample: false
      metric_list:
        - metric: exact_match
      """))
  return str(root)


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
  return _write_tasks(tmp_path_factory.mktemp("lm_eval_tasks"))


def test_simple_evaluate_offline_multiple_choice_and_generation(checkpoint, task_dir):
  from lm_eval.tasks import TaskManager  # pylint: disable=g-import-not-at-top
  path, model = checkpoint
  results = lm_eval.simple_evaluate(
      model="pause_flax", model_args={"checkpoint": path, "num_pauses": 2},
      tasks=["pf_toy_mc", "pf_toy_gen"], task_manager=TaskManager(include_path=task_dir),
      batch_size=8, log_samples=True)
  # Multiple choice: lm-eval's accuracy from our scores is the argmax of the reference's.
  lm = adapter.PauseFlaxLM(checkpoint=path, num_pauses=2)
  expected = []
  for doc in MC_DOCS:
    scores = []
    for choice in doc["choices"]:
      ctx, cont = lm.encode_pair(doc["question"], " " + choice)  # target_delimiter " "
      scores.append(_reference(model, [0, *ctx, PAUSE, PAUSE], cont)[0])
    expected.append(float(np.argmax(scores) == doc["label"]))
  assert results["results"]["pf_toy_mc"]["acc,none"] == pytest.approx(np.mean(expected))
  samples = results["samples"]["pf_toy_mc"]
  assert len(samples) == len(MC_DOCS)
  # Generation: the responses are lm.generate_until's, and exact_match scores them.
  gen = lm.generate_until(_requests([(d["question"], {"until": ["\n"], "max_gen_toks": 5})
                                     for d in GEN_DOCS]))
  responses = {s["doc"]["question"]: s["filtered_resps"][0] for s in
               results["samples"]["pf_toy_gen"]}
  assert [responses[d["question"]] for d in GEN_DOCS] == gen
  assert results["results"]["pf_toy_gen"]["exact_match,none"] == pytest.approx(
      np.mean([g == d["answer"] for g, d in zip(gen, GEN_DOCS)]))


def test_command_line_wrapper_registers_the_model(checkpoint, task_dir, tmp_path):
  path, _ = checkpoint
  out = tmp_path / "out"
  lm_eval_cli.main(["--model", "pause_flax", "--model_args",
                    f"checkpoint={path},num_pauses=1", "--tasks", "pf_toy_mc",
                    "--include_path", task_dir, "--batch_size", "8",
                    "--output_path", str(out)])
  files = [os.path.join(d, f) for d, _, fs in os.walk(out) for f in fs
           if f.startswith("results") and f.endswith(".json")]
  assert len(files) == 1, files
  with open(files[0], encoding="utf-8") as f:
    saved = json.load(f)
  assert saved["config"]["model"] == "pause_flax"
  assert 0.0 <= saved["results"]["pf_toy_mc"]["acc,none"] <= 1.0
