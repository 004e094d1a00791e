"""Greedy decoding: pause_flax against Hugging Face transformers' `generate`, same weights.

A random Llama (transformers.LlamaForCausalLM, float32) is saved locally and
imported with `pause_flax.hf_checkpoint` (config_from_hf + params_from_hf:
what `python -m pause_flax.convert` does); both frameworks then decode the
same random prompts greedily, a fixed number of new tokens (no EOS), on this
CPU. Compile (pause_flax) and a warm-up call (both) are excluded; best of
--repeats timed calls; generated tokens per second of wall time.

Pause inference is priced in: besides the plain prompt of --prompt_len tokens,
pause_flax decodes after prompt + M_inf pauses (`decoding.build_prompt`, the
pause id banned from the output), the prompt the paper's pause-finetuned
models are evaluated with. The HF model has no pause row, so its pause row
feeds the same number of extra prompt tokens (random ids: the same compute).
The greedy tokens of the two frameworks on the plain prompt are compared
(float32; a near-tie in the logits may still flip a token and what follows).

  python benchmarks/decode_vs_hf.py --batch_size 8 --prompt_len 32 --new_tokens 128 \
      --num_pauses 10
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile
import time

import jax
import numpy as np
from flax import nnx


def _best(fn, repeats: int) -> float:
  fn()  # compile / warm up
  best = float('inf')
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    best = min(best, time.perf_counter() - start)
  return best


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--batch_size', type=int, default=8)
  parser.add_argument('--prompt_len', type=int, default=32)
  parser.add_argument('--new_tokens', type=int, default=128)
  parser.add_argument('--num_pauses', type=int, default=10, help='M_inf')
  parser.add_argument('--layers', type=int, default=4)
  parser.add_argument('--d_model', type=int, default=256)
  parser.add_argument('--heads', type=int, default=4)
  parser.add_argument('--kv_heads', type=int, default=2)
  parser.add_argument('--mlp', type=int, default=1024)
  parser.add_argument('--vocab', type=int, default=32000)
  parser.add_argument('--repeats', type=int, default=2)
  args = parser.parse_args()

  import torch
  import transformers

  from pause_flax import hf_checkpoint
  from pause_flax.model import decoding, transformer

  torch.manual_seed(0)
  torch.set_num_threads(os.cpu_count())
  max_len = args.prompt_len + args.num_pauses + args.new_tokens
  hf_config = transformers.LlamaConfig(
      vocab_size=args.vocab, hidden_size=args.d_model, intermediate_size=args.mlp,
      num_hidden_layers=args.layers, num_attention_heads=args.heads,
      num_key_value_heads=args.kv_heads, max_position_embeddings=max_len,
      rms_norm_eps=1e-5, tie_word_embeddings=False, initializer_range=0.02,
      bos_token_id=1, eos_token_id=2)
  hf_model = transformers.LlamaForCausalLM(hf_config).eval()
  with tempfile.TemporaryDirectory() as hf_dir:
    hf_model.save_pretrained(hf_dir)
    config = hf_checkpoint.config_from_hf(hf_checkpoint._read_json(  # pylint: disable=protected-access
        os.path.join(hf_dir, 'config.json')), max_len=max_len)
    params = hf_checkpoint.params_from_hf(hf_checkpoint.load_hf_weights(hf_dir), config)
  rng = np.random.default_rng(0)
  # The pause id: the first row past the HF vocabulary (a pause vocabulary appends
  # it), a fresh normal(0.02) row like the import's padding rows.
  pause_id = args.vocab
  config = dataclasses.replace(config, vocab_size=args.vocab + 1)
  for name in ('embedding_VxD', 'head_VxD'):
    rows = config.padded_vocab_size - params[name].shape[0]
    params[name] = np.concatenate([params[name], rng.normal(
        0.0, 0.02, (rows, config.d_model)).astype(params[name].dtype)])
  graphdef, abstract = nnx.split(nnx.eval_shape(
      lambda: transformer.Transformer(config, rngs=nnx.Rngs(0))))
  model = nnx.merge(graphdef, jax.tree.map(jax.numpy.asarray, params))

  prompts = rng.integers(3, args.vocab, (args.batch_size, args.prompt_len), dtype=np.int32)
  fillers = rng.integers(3, args.vocab, (args.batch_size, args.num_pauses), dtype=np.int32)
  paused = np.concatenate([prompts, np.full_like(fillers, pause_id)], axis=1)
  hf_paused = np.concatenate([prompts, fillers], axis=1)
  b, t = args.batch_size, args.new_tokens

  def ours(tokens):
    return lambda: np.asarray(decoding.generate(model, tokens, max_new_tokens=t,
                                                banned_ids=(pause_id,)))

  def hf(tokens):
    ids = torch.from_numpy(tokens.astype(np.int64))

    def run():
      with torch.no_grad():
        out = hf_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=t,
                                min_new_tokens=t, do_sample=False, eos_token_id=None,
                                pad_token_id=0, use_cache=True)
      return out[:, ids.shape[1]:].numpy()
    return run

  same = np.mean(ours(prompts)() == hf(prompts)())
  print(f'Llama {args.layers} layers, d_model {args.d_model}, {args.heads} heads '
        f'({args.kv_heads} kv), MLP {args.mlp}, vocab {args.vocab}, float32 '
        f'({transformer.num_params(config) / 1e6:.1f}M params); batch {b}, prompt '
        f'{args.prompt_len}, {t} new tokens, greedy; M_inf {args.num_pauses}')
  print(f'jax {jax.__version__} ({jax.default_backend()}), '
        f'flax {__import__("flax").__version__}, transformers {transformers.__version__}, '
        f'torch {torch.__version__} ({torch.get_num_threads()} threads), '
        f'{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}')
  print(f'greedy tokens equal to transformers\' on the plain prompt: {100 * same:.1f}%')
  print('| framework | prompt | seconds | generated tokens/s |')
  print('| --- | --- | ---: | ---: |')
  for name, fn, prompt in (
      ('pause_flax', ours(prompts), f'{args.prompt_len}'),
      ('transformers', hf(prompts), f'{args.prompt_len}'),
      ('pause_flax', ours(paused), f'{args.prompt_len} + {args.num_pauses} pauses'),
      ('transformers', hf(hf_paused), f'{args.prompt_len} + {args.num_pauses} tokens')):
    seconds = _best(fn, args.repeats)
    print(f'| {name} | {prompt} | {seconds:.2f} | {b * t / seconds:,.0f} |', flush=True)
  print(f'load after: {os.getloadavg()[0]:.1f}')


if __name__ == '__main__':
  main()
