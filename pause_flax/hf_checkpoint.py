"""Hugging Face Llama-architecture checkpoints <-> pause_flax (import and export).

Import reads a local directory (`config.json` + `*.safetensors`, a sharded
`model.safetensors.index.json` included) and writes a directory that a run can
start from:

  <out>/checkpoints/0/   orbax checkpoint in Checkpointer's layout (params,
                         an empty opt_state, meta with the model config)
  <out>/hf_import.json   the HF config, the TransformerConfig, the tokenizer
  <out>/hf/              copies of config.json and the tokenizer files, for export
  <out>/model.gin        binds the imported architecture and INIT_FROM for a run

The pause row: the checkpoint holds the model's own vocabulary (`vocab_size`
of config.json), so it also finetunes without pauses. A pause-finetuning run's
vocabulary is one larger (PauseVocabulary puts <pause> at that id), and
`checkpointing.load_params` (train's `init_from`) gives the new row a fresh
initialisation. The padding rows past the HF vocabulary (up to a multiple of
`vocab_pad_multiple`) are written as a new model initialises them
(normal(0.02), seeded), never as zeros.

Layouts: HF linear weights are [out, in] and applied as x @ W.T; ours are
[in, out] with heads split out, layers stacked on axis 0. HF Llama already
stores q/k in the half-split rotary layout that `apply_rope` uses (Meta's
interleaved layout was permuted away by HF's own conversion), so q/k need no
permutation. Only safetensors are read (parsed here, never unpickled), so
torch is not needed; bf16 tensors are read through ml_dtypes.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from typing import Any

from absl import logging
import gin
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from pause_flax.hf_files import (IMPORT_INFO, HFFormatError, read_import_info,  # noqa: F401
                                 read_json_object, read_safetensors)
from pause_flax.model import transformer as transformer_lib
from pause_flax.training import checkpointing

SUPPORTED_MODEL_TYPES = ("llama", "mistral")
HF_FILES_DIR = "hf"
# Copied at import, rewritten at export. Only tokenizer.json is required for
# the tokenizer; the others are carried along when present.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
PAUSE_TOKEN = "<pause>"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")

EXPORT_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16,
                 "float16": np.float16}


# -- safetensors (read by pause_flax.hf_files.read_safetensors) ------------------


def _weight_files(hf_dir: str) -> list[str]:
  """The safetensors files of a checkpoint directory (the index's, if sharded)."""
  index = os.path.join(hf_dir, "model.safetensors.index.json")
  if os.path.exists(index):
    weight_map = read_json_object(index).get("weight_map")
    if not isinstance(weight_map, dict):
      raise HFFormatError(f"{index}: has no weight_map object; re-download or re-save the "
                          "checkpoint")
    return [os.path.join(hf_dir, name) for name in sorted(set(weight_map.values()))]
  files = sorted(n for n in os.listdir(hf_dir) if n.endswith(".safetensors"))
  if files:
    return [os.path.join(hf_dir, n) for n in files]
  pickled = sorted(n for n in os.listdir(hf_dir) if n.endswith(PICKLE_SUFFIXES))
  if pickled:
    raise HFFormatError(
        f"{hf_dir} holds only pickled weights ({', '.join(pickled)}); pause_flax never "
        "unpickles a checkpoint (it can run arbitrary code). Convert them to safetensors "
        "first, e.g. with transformers: AutoModelForCausalLM.from_pretrained(dir)"
        ".save_pretrained(out, safe_serialization=True), in an environment you trust.")
  raise FileNotFoundError(f"{hf_dir} has no *.safetensors weights.")


def load_hf_weights(hf_dir: str) -> dict[str, np.ndarray]:
  """All tensors of a (possibly sharded) safetensors checkpoint, memory-mapped."""
  tensors = {}
  for path in _weight_files(hf_dir):
    tensors.update(read_safetensors(path))
  return tensors


# -- configs --------------------------------------------------------------------


def _rope_theta(hf: dict) -> float:
  """rope_theta from transformers 4 (top level, rope_scaling) or 5 (rope_parameters)."""
  params = hf.get("rope_parameters") or {}
  scaling = hf.get("rope_scaling") or {}
  for source, spec in (("rope_parameters", params), ("rope_scaling", scaling)):
    kind = spec.get("rope_type", spec.get("type", "default"))
    if kind != "default":
      raise HFFormatError(f"config.json {source}={spec} uses rope_type {kind!r}; only the "
                          "default (unscaled) rotary embedding is implemented.")
  return float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))


_REQUIRED_CONFIG_KEYS = ("vocab_size", "num_hidden_layers", "hidden_size",
                         "num_attention_heads", "intermediate_size")


def config_from_hf(hf: dict, max_len: int | None = None) -> transformer_lib.TransformerConfig:
  """The TransformerConfig of a Llama-architecture config.json (HF vocabulary).

  `max_len` caps max_position_embeddings (the longest sequence a run may use).
  Features the model does not implement are refused by name.
  """
  model_type = hf.get("model_type")
  if model_type not in SUPPORTED_MODEL_TYPES:
    raise HFFormatError(f"config.json model_type={model_type!r}; supported: "
                        f"{SUPPORTED_MODEL_TYPES} (Llama architecture).")
  for key in ("attention_bias", "mlp_bias"):
    if hf.get(key):
      raise HFFormatError(f"config.json {key}=true: biases are not implemented.")
  if hf.get("hidden_act", "silu") not in ("silu", "swish"):
    raise HFFormatError(f"config.json hidden_act={hf['hidden_act']!r}; only silu is supported.")
  if hf.get("sliding_window") is not None:
    raise HFFormatError(f"config.json sliding_window={hf['sliding_window']}: sliding-window "
                        "attention is not implemented.")
  if hf.get("partial_rotary_factor", 1.0) != 1.0:
    raise HFFormatError(f"config.json partial_rotary_factor={hf['partial_rotary_factor']}: "
                        "only full rotary embeddings are implemented.")
  missing = [key for key in _REQUIRED_CONFIG_KEYS if not isinstance(hf.get(key), int)]
  if missing:
    raise HFFormatError(f"config.json has no integer {', '.join(missing)}: not a "
                        "complete Llama-architecture config.")
  positions = int(hf.get("max_position_embeddings", 2048))
  if max_len is not None and max_len < 1:
    raise ValueError(f"max_len={max_len} must be >= 1.")
  return transformer_lib.TransformerConfig(
      vocab_size=int(hf["vocab_size"]),
      num_layers=int(hf["num_hidden_layers"]),
      d_model=int(hf["hidden_size"]),
      num_heads=int(hf["num_attention_heads"]),
      num_kv_heads=int(hf.get("num_key_value_heads") or hf["num_attention_heads"]),
      head_dim=int(hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"]),
      mlp_dim=int(hf["intermediate_size"]),
      mlp_activation="silu",
      gated_mlp=True,
      tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
      max_len=min(positions, max_len) if max_len else positions,
      rope_theta=_rope_theta(hf),
      norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
  )


# -- parameters -------------------------------------------------------------------

# (ours under blocks/, HF name under model.layers.<i>., HF [out, in] -> ours)
#
# The MLP's names cross over: ours computes act(x wi) * (x wg) wo, HF Llama's
# down_proj(act(gate_proj(x)) * up_proj(x)). HF's gate_proj (under the
# activation) is our wi; HF's up_proj (the plain factor) is our wg, although
# "g" reads like "gate":
#   ours             HF
#   mlp/wi_DxF   <-  mlp.gate_proj.weight   (goes through act)
#   mlp/wg_DxF   <-  mlp.up_proj.weight     (multiplies act(...))
#   mlp/wo_FxD   <-  mlp.down_proj.weight
_LAYER_WEIGHTS = (
    (("attn", "q_DxNxH"), "self_attn.q_proj.weight", "heads_out"),
    (("attn", "k_DxKxH"), "self_attn.k_proj.weight", "heads_out"),
    (("attn", "v_DxKxH"), "self_attn.v_proj.weight", "heads_out"),
    (("attn", "o_NxHxD"), "self_attn.o_proj.weight", "heads_in"),
    (("mlp", "wi_DxF"), "mlp.gate_proj.weight", "linear"),
    (("mlp", "wg_DxF"), "mlp.up_proj.weight", "linear"),
    (("mlp", "wo_FxD"), "mlp.down_proj.weight", "linear"),
    (("attn_norm", "scale"), "input_layernorm.weight", "vector"),
    (("mlp_norm", "scale"), "post_attention_layernorm.weight", "vector"),
)


def _to_ours(w: np.ndarray, kind: str, head_dim: int) -> np.ndarray:
  w = np.asarray(w, np.float32)
  if kind == "heads_out":  # [N*H, D] -> [D, N, H]
    return w.T.reshape(w.shape[1], -1, head_dim)
  if kind == "heads_in":  # [D, N*H] -> [N, H, D]
    return w.T.reshape(-1, head_dim, w.shape[0])
  return w.T if kind == "linear" else w


def _to_hf(w: np.ndarray, kind: str) -> np.ndarray:
  if kind == "heads_out":  # [D, N, H] -> [N*H, D]
    return w.reshape(w.shape[0], -1).T
  if kind == "heads_in":  # [N, H, D] -> [D, N*H]
    return w.reshape(-1, w.shape[-1]).T
  return w.T if kind == "linear" else w


def params_from_hf(weights: dict[str, np.ndarray], config: transformer_lib.TransformerConfig,
                   seed: int = 0) -> dict[str, Any]:
  """pause_flax parameters (nnx pure dict, param_dtype) from HF tensors.

  Rows (columns of the head) past the HF vocabulary get normal(0.02).
  """
  c = config
  prefix = "model." if "model.embed_tokens.weight" in weights else ""
  dtype = jnp.dtype(c.param_dtype)

  def get(name: str) -> np.ndarray:
    if name not in weights:
      raise HFFormatError(f"The checkpoint has no tensor {name!r} (it has e.g. "
                          f"{sorted(weights)[:5]}).")
    return weights[name]

  def padded(matrix_VxD: np.ndarray) -> np.ndarray:
    if matrix_VxD.shape[0] != c.vocab_size:
      raise HFFormatError(f"Vocabulary tensor of shape {matrix_VxD.shape}; config.json "
                          f"vocab_size={c.vocab_size}.")
    rng = np.random.default_rng(seed)
    extra = rng.normal(0.0, 0.02, (c.padded_vocab_size - c.vocab_size, c.d_model))
    return np.concatenate([np.asarray(matrix_VxD, np.float32), extra.astype(np.float32)])

  blocks: dict[str, dict[str, np.ndarray]] = {}
  for (module, name), hf_name, kind in _LAYER_WEIGHTS:
    stacked = np.stack([
        _to_ours(get(f"{prefix}layers.{i}.{hf_name}"), kind, c.resolved_head_dim)
        for i in range(c.num_layers)])
    blocks.setdefault(module, {})[name] = stacked.astype(dtype)
  params: dict[str, Any] = {
      "blocks": blocks,
      "embedding_VxD": padded(get(f"{prefix}embed_tokens.weight")).astype(dtype),
      "final_norm": {"scale": np.asarray(get(f"{prefix}norm.weight"), dtype)},
  }
  if not c.tie_embeddings:
    params["head_VxD"] = padded(get("lm_head.weight")).astype(dtype)
  return params


def hf_from_params(params: dict[str, Any], config: transformer_lib.TransformerConfig,
                   dtype: str = "float32") -> dict[str, np.ndarray]:
  """HF LlamaForCausalLM tensors from pause_flax parameters (true vocabulary only)."""
  c = config
  if dtype not in EXPORT_DTYPES:
    raise ValueError(f"dtype={dtype!r}; choose from {sorted(EXPORT_DTYPES)}.")
  blocks = params["blocks"]
  out = {}
  for (module, name), hf_name, kind in _LAYER_WEIGHTS:
    stacked = np.asarray(blocks[module][name], np.float32)
    for i in range(c.num_layers):
      out[f"model.layers.{i}.{hf_name}"] = _to_hf(stacked[i], kind)
  out["model.embed_tokens.weight"] = np.asarray(params["embedding_VxD"])[:c.vocab_size]
  out["model.norm.weight"] = np.asarray(params["final_norm"]["scale"])
  if not c.tie_embeddings:
    out["lm_head.weight"] = np.asarray(params["head_VxD"])[:c.vocab_size]
  return {k: np.ascontiguousarray(v.astype(EXPORT_DTYPES[dtype])) for k, v in out.items()}


# -- import -------------------------------------------------------------------------


def _read_json(path: str) -> dict:
  return read_json_object(path)


def _write_json(path: str, value: Any) -> None:
  with open(path, "w") as f:
    json.dump(value, f, indent=2)
    f.write("\n")


_MODEL_GIN = """\
# Written by `python -m pause_flax.convert import`: the model imported from
# {source}.
# Give it after a run file, e.g.
#   --gin_file=runs/import_llama_finetune.gin --gin_file={out}/model.gin
import pause_flax.hf_checkpoint

IMPORTED_MODEL = '{out}'
INIT_FROM = %IMPORTED_MODEL
train.model_config = @pause_flax.hf_checkpoint.imported_model_config()
pause_flax.hf_checkpoint.imported_model_config.path = %IMPORTED_MODEL
"""


def import_checkpoint(hf_dir: str, out: str, *, max_len: int | None = None,
                      seed: int = 0) -> transformer_lib.TransformerConfig:
  """Converts a local HF Llama checkpoint into `out` (see the module docstring)."""
  hf_dir, out = os.path.abspath(hf_dir), os.path.abspath(out)
  config_path = os.path.join(hf_dir, "config.json")
  if not os.path.isdir(hf_dir):
    raise FileNotFoundError(f"{hf_dir} is not a directory; give a local Hugging Face "
                            "checkpoint directory.")
  if not os.path.exists(config_path):
    raise FileNotFoundError(f"{hf_dir} has no config.json; give a Hugging Face checkpoint "
                            "directory (config.json, *.safetensors).")
  if os.path.exists(os.path.join(out, "checkpoints")):
    raise FileExistsError(f"{out} already holds checkpoints; choose an empty directory.")
  hf_config = _read_json(config_path)
  config = config_from_hf(hf_config, max_len)
  params = params_from_hf(load_hf_weights(hf_dir), config, seed)

  files_dir = os.path.join(out, HF_FILES_DIR)
  os.makedirs(files_dir, exist_ok=True)
  for name in ("config.json", "generation_config.json", *TOKENIZER_FILES):
    if os.path.exists(os.path.join(hf_dir, name)):
      shutil.copyfile(os.path.join(hf_dir, name), os.path.join(files_dir, name))
  has_tokenizer = os.path.exists(os.path.join(files_dir, "tokenizer.json"))
  if not has_tokenizer:
    logging.warning("%s has no tokenizer.json: the import has no tokenizer for Tasks, "
                    "and export will write none.", hf_dir)

  ckpt = checkpointing.Checkpointer(
      os.path.join(out, "checkpoints"), checkpointing.CheckpointOptions(async_save=False))
  ckpt.save(0, params, {}, None, {"vocab_size": config.vocab_size,
                                  "model_config": dataclasses.asdict(config),
                                  "hf_source": hf_dir})
  ckpt.close()
  _write_json(os.path.join(out, IMPORT_INFO), {
      "source": hf_dir,
      "hf_config": hf_config,
      "model_config": dataclasses.asdict(config),
      "vocab_size": config.vocab_size,
      "tokenizer": os.path.join(HF_FILES_DIR, "tokenizer.json") if has_tokenizer else None,
  })
  with open(os.path.join(out, "model.gin"), "w") as f:
    f.write(_MODEL_GIN.format(source=hf_dir, out=out))
  logging.info("Imported %s (%s parameters) into %s.", hf_dir,
               f"{transformer_lib.num_params(config):,}", out)
  return config


def imported_vocabulary(path: str):
  """The imported model's vocabulary (`hf_vocab.imported_vocabulary`, kept here by name)."""
  from pause_flax import hf_vocab  # pylint: disable=g-import-not-at-top
  return hf_vocab.imported_vocabulary(path)


@gin.configurable
def imported_model_config(path: str, **overrides) -> transformer_lib.TransformerConfig:
  """The TransformerConfig of an imported model, with overrides (e.g. dtype, max_len)."""
  if overrides.get("positions", "rope") != "rope":
    raise ValueError(f"positions={overrides['positions']!r} for the imported model {path!r}: "
                     "Hugging Face Llama has RoPE only; keep positions='rope'.")
  info = read_import_info(path)
  return transformer_lib.TransformerConfig(**{**info["model_config"], **overrides})


# -- export -------------------------------------------------------------------------

_ARCHITECTURE_FIELDS = ("num_layers", "d_model", "num_heads", "resolved_kv_heads",
                        "resolved_head_dim", "mlp_dim", "gated_mlp", "mlp_activation",
                        "tie_embeddings", "rope_theta", "norm_eps")


def _export_tokenizer(files_dir: str, out: str, base_vocab: int, pause: bool) -> None:
  """Copies the tokenizer files; with `pause`, adds <pause> at id `base_vocab`.

  A tokenizer with fewer ids than the model's rows is first padded with
  `<pause_flax_unused_i>` special tokens so that <pause> lands on its row.
  """
  import tokenizers  # pylint: disable=g-import-not-at-top
  tokenizer_path = os.path.join(files_dir, "tokenizer.json")
  try:
    tokenizer = tokenizers.Tokenizer.from_file(tokenizer_path)
  except Exception as e:  # tokenizers raises a bare Exception naming no file.
    raise HFFormatError(f"{tokenizer_path}: not a tokenizer.json that the tokenizers "
                        f"package reads ({e}); re-import the checkpoint") from e
  size = tokenizer.get_vocab_size(with_added_tokens=True)
  if size > base_vocab:
    raise ValueError(f"The tokenizer has {size} ids, more than the model's {base_vocab}.")
  if pause and tokenizer.token_to_id(PAUSE_TOKEN) is not None:
    raise ValueError(f"The tokenizer already has {PAUSE_TOKEN!r} "
                     f"(id {tokenizer.token_to_id(PAUSE_TOKEN)}).")
  new = ([f"<pause_flax_unused_{i}>" for i in range(size, base_vocab)] + [PAUSE_TOKEN]
         if pause else [])
  if new:
    tokenizer.add_special_tokens(
        [tokenizers.AddedToken(t, special=True, normalized=False) for t in new])
    if tokenizer.token_to_id(PAUSE_TOKEN) != base_vocab:
      raise AssertionError(f"{PAUSE_TOKEN} landed on id {tokenizer.token_to_id(PAUSE_TOKEN)}"
                           f", not {base_vocab}.")
  tokenizer.save(os.path.join(out, "tokenizer.json"))
  config_path = os.path.join(files_dir, "tokenizer_config.json")
  config = _read_json(config_path) if os.path.exists(config_path) else {}
  if pause:
    if "added_tokens_decoder" in config:
      for i, token in enumerate(new, start=size):
        config["added_tokens_decoder"][str(i)] = {
            "content": token, "lstrip": False, "normalized": False, "rstrip": False,
            "single_word": False, "special": True}
    config["additional_special_tokens"] = [
        *config.get("additional_special_tokens", []), PAUSE_TOKEN]
  _write_json(os.path.join(out, "tokenizer_config.json"), config)
  special_path = os.path.join(files_dir, "special_tokens_map.json")
  if os.path.exists(special_path):
    special = _read_json(special_path)
    if pause:
      special["additional_special_tokens"] = [
          *special.get("additional_special_tokens", []), PAUSE_TOKEN]
    _write_json(os.path.join(out, "special_tokens_map.json"), special)


def export_checkpoint(checkpoint: str, out: str, *, imported: str | None = None,
                      step: int | None = None, dtype: str = "float32") -> dict[str, Any]:
  """Writes a pause_flax checkpoint of an imported model as an HF checkpoint.

  Args:
    checkpoint: a run's MODEL_DIR, its checkpoints/ folder, a checkpoints/<step>
      folder, or an import's output directory.
    out: the HF directory to write (config.json, model.safetensors, tokenizer
      files with <pause> as a special token, generation_config.json).
    imported: the import's output directory (its hf_import.json); default: the
      checkpoint path itself.
    step: the step to export; default the newest (or the one named by the path).
    dtype: 'float32', 'bfloat16' or 'float16' for the written weights.

  Returns:
    The written config.json. A vocabulary one larger than the HF model's is a
    pause model: <pause> is id `vocab_size - 1`, and generation_config.json
    suppresses it so that `generate` never emits it.
  """
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  if dtype not in EXPORT_DTYPES:
    raise ValueError(f"dtype={dtype!r}; choose from {sorted(EXPORT_DTYPES)}.")
  imported = checkpoint if imported is None else imported
  info = read_import_info(imported)
  saved = checkpointing.restore_model_params(checkpoint, step=step)  # on one CPU device
  step, config = saved.step, saved.config
  if config.positions != "rope":
    raise ValueError(f"checkpoint={checkpoint!r} has positions={config.positions!r}; "
                     "Hugging Face Llama has RoPE only, so only positions='rope' exports.")
  params = jax.tree.map(np.asarray, saved.params)
  expected = config_from_hf(info["hf_config"])
  for field in _ARCHITECTURE_FIELDS:
    if getattr(config, field) != getattr(expected, field):
      raise ValueError(f"checkpoint={checkpoint!r} has {field}={getattr(config, field)!r} "
                       f"but the imported model {imported!r} has {getattr(expected, field)!r}.")
  base_vocab = info["vocab_size"]
  if config.vocab_size not in (base_vocab, base_vocab + 1):
    raise ValueError(f"checkpoint={checkpoint!r} has vocab_size {config.vocab_size}; the "
                     f"imported model has {base_vocab} (+1 with <pause>).")
  pause = config.vocab_size == base_vocab + 1

  os.makedirs(out, exist_ok=True)
  tensors = hf_from_params(params, config, dtype)
  save_file(tensors, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
  # transformers 5 writes 'dtype', 4 wrote 'torch_dtype': keep the source's key.
  dtype_key = "dtype" if "dtype" in info["hf_config"] else "torch_dtype"
  hf_config = {**info["hf_config"], "vocab_size": config.vocab_size, dtype_key: dtype}
  _write_json(os.path.join(out, "config.json"), hf_config)

  files_dir = os.path.join(imported, HF_FILES_DIR)
  generation_path = os.path.join(files_dir, "generation_config.json")
  generation = (_read_json(generation_path) if os.path.exists(generation_path) else
                {k: hf_config[k] for k in ("bos_token_id", "eos_token_id") if k in hf_config})
  if pause:
    generation["suppress_tokens"] = [*generation.get("suppress_tokens", []), base_vocab]
  _write_json(os.path.join(out, "generation_config.json"), generation)
  if info["tokenizer"] is not None:
    _export_tokenizer(files_dir, out, base_vocab, pause)
  else:
    logging.warning("No tokenizer was imported; %s has none.", out)
  logging.info("Exported step %d of %s (%s) to %s.", step, checkpoint,
               "with <pause>" if pause else "no pause", out)
  return hf_config
