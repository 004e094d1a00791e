"""Hugging Face Llama import/export, the tokenizer vocabulary, and pause-finetuning an import.

A small Llama is built locally with random weights (transformers + torch on the
CPU) and a tiny BPE tokenizer is trained on a few strings: nothing downloads.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys

import gin
import numpy as np
import pytest
import seqio
import tensorflow as tf

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from pause_flax import gin_utils  # pylint: disable=g-import-not-at-top,wrong-import-position
from pause_flax import hf_checkpoint
from pause_flax import parallel
from pause_flax.data import hf_tasks
from pause_flax.hf_vocab import HfTokenizerVocabulary
from pause_flax.training import checkpointing
from pause_flax.training import optimizer as optimizer_lib
from pause_flax.training import trainer as trainer_lib
from pause_flax.vocab import PauseVocabulary

ROPE_THETA = 50000.0
TEXTS = [f"{a}+{b}={a + b}" for a in range(0, 400, 7) for b in range(3, 90, 11)] + [
    "the quick brown fox", "pause before you answer", "sum%10 83194027=4"]


def _train_tokenizer(directory: str, vocab_size: int = 300) -> str:
  """A byte-level BPE tokenizer.json (+ tokenizer_config.json) in `directory`."""
  tok = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="<unk>"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = tokenizers.decoders.ByteLevel()
  tok.train_from_iterator(TEXTS, tokenizers.trainers.BpeTrainer(
      vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
      initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet()))
  os.makedirs(directory, exist_ok=True)
  path = os.path.join(directory, "tokenizer.json")
  tok.save(path)
  with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
    json.dump({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
               "tokenizer_class": "PreTrainedTokenizerFast"}, f)
  return path


def _llama(directory: str, vocab_size: int, tie: bool, shard: bool, seed: int = 0,
           dtype=None):
  """A random LlamaForCausalLM (GQA 4:2, rope theta 50000) saved to `directory`."""
  torch.manual_seed(seed)
  config = transformers.LlamaConfig(
      vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, rope_theta=ROPE_THETA,
      max_position_embeddings=64, rms_norm_eps=1e-5, tie_word_embeddings=tie,
      initializer_range=0.1, bos_token_id=1, eos_token_id=2)
  model = transformers.LlamaForCausalLM(config).eval()
  if dtype is not None:
    model = model.to(dtype)
  model.save_pretrained(directory, max_shard_size="40KB" if shard else "1GB")
  return model


def _hf_logits(model, tokens: np.ndarray) -> np.ndarray:
  with torch.no_grad():
    return model(torch.tensor(tokens)).logits.float().numpy()


def _trainer(config) -> trainer_lib.Trainer:
  return trainer_lib.Trainer(config, optimizer_lib.make_optimizer(1e-3), parallel.make_mesh())


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
  directory = str(tmp_path_factory.mktemp("tokenizer"))
  _train_tokenizer(directory)
  return directory


@pytest.fixture(scope="module")
def vocab_size(tok_dir):
  return tokenizers.Tokenizer.from_file(
      os.path.join(tok_dir, "tokenizer.json")).get_vocab_size(with_added_tokens=True)


def _import(name: str, tmp_path_factory, tok_dir: str, vocab_size: int):
  """(HF model, HF dir, import dir): the untied one sharded, imported through the CLI."""
  tie = name == "tied"
  root = tmp_path_factory.mktemp(name)
  hf_dir, out = str(root / "hf"), str(root / "imported")
  model = _llama(hf_dir, vocab_size, tie=tie, shard=not tie)
  for name in ("tokenizer.json", "tokenizer_config.json"):
    shutil.copy(os.path.join(tok_dir, name), hf_dir)
  if tie:
    hf_checkpoint.import_checkpoint(hf_dir, out)
  else:
    assert os.path.exists(os.path.join(hf_dir, "model.safetensors.index.json"))
    subprocess.run([sys.executable, "-m", "pause_flax.convert", "import",
                    f"--hf_dir={hf_dir}", f"--out={out}"], check=True,
                   env={**os.environ, "JAX_PLATFORMS": "cpu"})
  return model, hf_dir, out


@pytest.fixture(scope="module")
def imported_untied(tmp_path_factory, tok_dir, vocab_size):
  return _import("untied_sharded", tmp_path_factory, tok_dir, vocab_size)


@pytest.fixture(scope="module")
def imported_tied(tmp_path_factory, tok_dir, vocab_size):
  return _import("tied", tmp_path_factory, tok_dir, vocab_size)


@pytest.fixture(params=["imported_untied", "imported_tied"])
def imported(request):
  return request.getfixturevalue(request.param)


# -- import -------------------------------------------------------------------------


def test_import_matches_transformers_logits(imported, vocab_size):
  model, _, out = imported
  config = hf_checkpoint.imported_model_config(out)
  assert (config.num_kv_heads, config.rope_theta, config.norm_eps) == (2, ROPE_THETA, 1e-5)
  assert config.gated_mlp and config.mlp_activation == "silu"
  tokens = np.random.default_rng(0).integers(0, vocab_size, (2, 40))
  expected = _hf_logits(model, tokens)
  trainer = _trainer(config)
  params = checkpointing.load_params(out, trainer)  # what train(init_from=out) does
  logits = np.asarray(trainer.model(params)(tokens))
  np.testing.assert_allclose(logits[..., :vocab_size], expected, atol=1e-4, rtol=0)
  assert np.abs(expected).max() > 1.0  # not a degenerate comparison
  print(f"import parity ({config.tie_embeddings=}): "
        f"{np.abs(logits[..., :vocab_size] - expected).max():.2e}")


def test_export_without_pause_reloads_in_transformers(imported, tmp_path, vocab_size):
  model, _, out = imported
  hf_checkpoint.export_checkpoint(out, str(tmp_path / "hf"))
  reloaded = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
  tokens = np.random.default_rng(1).integers(0, vocab_size, (2, 24))
  np.testing.assert_allclose(_hf_logits(reloaded, tokens), _hf_logits(model, tokens),
                             atol=1e-6, rtol=0)
  tok = tokenizers.Tokenizer.from_file(str(tmp_path / "hf" / "tokenizer.json"))
  assert tok.token_to_id(hf_checkpoint.PAUSE_TOKEN) is None


def test_bf16_safetensors_are_read_exactly(tmp_path, vocab_size):
  model = _llama(str(tmp_path), vocab_size, tie=False, shard=False, dtype=torch.bfloat16)
  weights = hf_checkpoint.load_hf_weights(str(tmp_path))
  for name, expected in model.state_dict().items():
    np.testing.assert_array_equal(np.asarray(weights[name], np.float32),
                                  expected.float().numpy())


def test_v4_config_keys():
  hf = {"model_type": "llama", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
        "num_hidden_layers": 1, "num_attention_heads": 2, "rope_theta": 1e6,
        "rope_scaling": None, "max_position_embeddings": 4096}
  config = hf_checkpoint.config_from_hf(hf, max_len=512)
  assert (config.rope_theta, config.max_len, config.resolved_kv_heads) == (1e6, 512, 2)
  assert not config.tie_embeddings


# -- errors ---------------------------------------------------------------------------

_BASE = {"model_type": "llama", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
         "num_hidden_layers": 1, "num_attention_heads": 2}


@pytest.mark.parametrize("change,match", [
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "rope_type 'llama3'"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4}}, "rope_type 'yarn'"),
    ({"attention_bias": True}, "attention_bias"),
    ({"mlp_bias": True}, "mlp_bias"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
    ({"model_type": "gpt2"}, "model_type='gpt2'"),
    ({"model_type": "mistral", "sliding_window": 4096}, "sliding_window=4096"),
])
def test_unsupported_configs_are_refused(change, match):
  with pytest.raises(ValueError, match=match):
    hf_checkpoint.config_from_hf({**_BASE, **change})


def test_pickled_weights_are_refused(tmp_path):
  (tmp_path / "config.json").write_text(json.dumps(_BASE))
  (tmp_path / "pytorch_model.bin").write_bytes(b"not opened")
  with pytest.raises(ValueError, match="never unpickles"):
    hf_checkpoint.import_checkpoint(str(tmp_path), str(tmp_path / "out"))


def test_truncated_safetensors_is_refused(tmp_path, vocab_size):
  _llama(str(tmp_path), vocab_size, tie=True, shard=False)
  path = tmp_path / "model.safetensors"
  path.write_bytes(path.read_bytes()[:-100])
  with pytest.raises(ValueError, match="truncated"):
    hf_checkpoint.load_hf_weights(str(tmp_path))


# -- tokenizer vocabulary ---------------------------------------------------------------


def test_tokenizer_vocabulary(tok_dir, vocab_size, tmp_path):
  path = os.path.join(tok_dir, "tokenizer.json")
  vocab = HfTokenizerVocabulary(path)
  tok = tokenizers.Tokenizer.from_file(path)
  assert vocab.vocab_size == vocab_size
  assert (vocab.eos_id, vocab.unk_id, vocab.bos_id, vocab.pad_id) == (2, 0, 1, 0)
  text = "12+34=46 the fox"
  ids = vocab.encode(text)
  assert ids == tok.encode(text, add_special_tokens=False).ids
  assert vocab.decode(ids) == text
  assert vocab.decode(list(ids) + [vocab.eos_id, 5, 6]) == text  # stops at EOS
  assert vocab.encode_tf(tf.constant(text)).numpy().tolist() == ids
  batch = tf.constant([list(ids) + [0, 0], list(ids[:2]) + [2] + [7] * (len(ids) - 1)])
  decoded = [t.decode() for t in vocab.decode_tf(batch).numpy()]
  assert decoded == [text, vocab.decode(ids[:2])]

  # Equality is by content; pickling re-reads the file.
  copy_dir = tmp_path / "copy"
  shutil.copytree(tok_dir, copy_dir)
  assert HfTokenizerVocabulary(str(copy_dir / "tokenizer.json")) == vocab
  assert HfTokenizerVocabulary(path, vocab_size=vocab_size + 5) != vocab
  assert pickle.loads(pickle.dumps(vocab)) == vocab
  other = tmp_path / "other"
  _train_tokenizer(str(other), vocab_size=280)
  assert HfTokenizerVocabulary(str(other / "tokenizer.json")) != vocab

  pause = PauseVocabulary(vocab)
  assert pause.pause_id == vocab_size and pause.vocab_size == vocab_size + 1
  assert pause.decode([ids[0], pause.pause_id, *ids[1:]]) == text
  assert pause.decode_tf(tf.constant([pause.pause_id, *ids])).numpy().decode() == text


def test_tokenizer_vocabulary_errors(tok_dir, tmp_path):
  path = os.path.join(tok_dir, "tokenizer.json")
  with pytest.raises(ValueError, match="smaller than"):
    _ = HfTokenizerVocabulary(path, vocab_size=10).vocab_size
  with pytest.raises(ValueError, match="eos_token='<nope>'"):
    _ = HfTokenizerVocabulary(path, eos_token="<nope>").eos_id
  bare = tmp_path / "tokenizer.json"
  shutil.copy(path, bare)
  with pytest.raises(ValueError, match="No EOS token"):
    _ = HfTokenizerVocabulary(str(bare)).eos_id
  with pytest.raises(FileNotFoundError, match="does not exist"):
    _ = HfTokenizerVocabulary(str(tmp_path / "missing.json")).vocab_size


def test_pause_task_over_the_imported_tokenizer(imported, vocab_size):
  from pause_flax.data import pipeline  # pylint: disable=g-import-not-at-top
  from pause_flax.data import tasks  # pylint: disable=g-import-not-at-top
  _, _, out = imported
  name = tasks.pause_variant(hf_tasks.imported_synthetic_task(out), num_pauses=4,
                             form="finetune")
  vocab = tasks.get_vocabulary(name)
  assert isinstance(vocab, PauseVocabulary) and vocab.pause_id == vocab_size
  assert isinstance(vocab.base, HfTokenizerVocabulary)
  batch = next(pipeline.get_dataset(name, {"inputs": 24, "targets": 8}, 4).as_numpy_iterator())
  for row, weights in zip(batch["decoder_input_tokens"], batch["decoder_loss_weights"]):
    pauses = np.flatnonzero(row == vocab_size)
    assert len(pauses) == 4 and np.all(np.diff(pauses) == 1)
    assert weights[:pauses[-1]].sum() == 0 and weights.sum() > 0


# -- finetune an import through the gin files, then export --------------------------------


def test_pause_finetune_through_gin_then_export(imported_untied, vocab_size, tmp_path):
  import importlib  # pylint: disable=g-import-not-at-top
  cli = importlib.import_module("pause_flax.train")
  _, _, out = imported_untied
  model_dir = str(tmp_path / "run")
  gin.clear_config()
  try:
    gin_utils.parse_gin(
        ["gin_configs/runs/import_llama_finetune.gin", os.path.join(out, "model.gin")],
        [f"MODEL_DIR = '{model_dir}'",
         "MIXTURE_OR_TASK_NAME = @imported_synthetic_task()",
         "TASK_FEATURE_LENGTHS = {'inputs': 24, 'targets': 8}",
         "TRAIN_STEPS = 6", "BATCH_SIZE = 8", "NUM_PAUSES = 4", "LEARNING_RATE = 3e-3",
         "train.log_every = 1"])
    rows = cli.train(mesh=cli.make_mesh(), optimizer=lambda s: cli.make_optimizer(s))
  finally:
    gin.clear_config()
  losses = [r["loss"] for r in rows]
  assert np.all(np.isfinite(losses)) and len(losses) == 6
  assert np.mean(losses[-2:]) < np.mean(losses[:2]), losses
  print("finetune losses:", " ".join(f"{x:.3f}" for x in losses))

  export_dir = str(tmp_path / "hf_pause")
  hf_config = hf_checkpoint.export_checkpoint(model_dir, export_dir, imported=out)
  assert hf_config["vocab_size"] == vocab_size + 1
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(export_dir).eval()
  saved = checkpointing.restore_model_params(model_dir)
  config, params = saved.config, saved.params
  assert config.vocab_size == vocab_size + 1
  tokens = np.random.default_rng(2).integers(0, vocab_size + 1, (2, 24))
  ours = np.asarray(_trainer(config).model(params)(tokens))[..., :vocab_size + 1]
  theirs = _hf_logits(reloaded, tokens)
  np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=0)
  print(f"export parity after finetuning: {np.abs(theirs - ours).max():.2e}")

  hf_tok = transformers.AutoTokenizer.from_pretrained(export_dir)
  assert hf_tok.convert_tokens_to_ids("<pause>") == vocab_size
  ids = hf_tok("12+3=<pause>", add_special_tokens=False)["input_ids"]
  assert ids[-1] == vocab_size
  assert hf_tok.decode(ids, skip_special_tokens=True) == "12+3="
  generation = transformers.GenerationConfig.from_pretrained(export_dir)
  assert generation.suppress_tokens == [vocab_size]


def test_export_refuses_another_architecture(imported, tmp_path):
  _, _, out = imported
  info = hf_checkpoint.read_import_info(out)
  other = tmp_path / "other"
  other.mkdir()
  info["hf_config"] = {**info["hf_config"], "num_hidden_layers": 3}
  (other / hf_checkpoint.IMPORT_INFO).write_text(json.dumps(info))
  with pytest.raises(ValueError, match="num_layers=2"):
    hf_checkpoint.export_checkpoint(out, str(tmp_path / "x"), imported=str(other))
