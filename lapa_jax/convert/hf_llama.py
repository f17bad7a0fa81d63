"""Hugging Face LLaMA checkpoints (config.json + safetensors) -> lapa_jax.

HF stores each projection as a PyTorch `Linear` weight `(out, in)` (ours: kernel `(in, out)`), and
its q/k projections are permuted for the rotate-half RoPE (pairs `(x[i], x[i + head_dim/2])`),
whereas LWM and lapa_jax rotate interleaved pairs `(x[2i], x[2i+1])`. Importing undoes that
permutation per head (EasyLM's `inverse_permute`); attention scores are unchanged because q and k
are permuted alike, which is why only the RoPE pairing reveals a missing or wrong permutation.

  lapa convert hf-llama HF_DIR OUT --model llama:7b          # the text model
  lapa convert hf-llama HF_DIR OUT --model vla:7b --init-missing  # as a VLA backbone
"""

from __future__ import annotations

import argparse
import json
import os
import struct
from typing import Any

import jax
import ml_dtypes
import numpy as np

from lapa_jax.convert import easylm
from lapa_jax.models import llama

SAFETENSORS_DTYPES = {'F64': np.float64, 'F32': np.float32, 'F16': np.float16, 'BF16': ml_dtypes.bfloat16,
                      'I64': np.int64, 'I32': np.int32, 'I16': np.int16, 'I8': np.int8, 'U8': np.uint8,
                      'BOOL': np.bool_}


def read_safetensors(path: str) -> dict[str, np.ndarray]:
  """Memory-mapped arrays of one `.safetensors` file.

  Read directly (an 8-byte header size, a JSON header, raw little-endian data) because the numpy
  backend of the `safetensors` package cannot represent bfloat16, the dtype of most LLaMA files.
  """
  with open(path, 'rb') as stream:
    (header_size,) = struct.unpack('<Q', stream.read(8))
    header = json.loads(stream.read(header_size))
  data = np.memmap(path, dtype=np.uint8, mode='r', offset=8 + header_size)
  tensors = {}
  for name, entry in header.items():
    if name == '__metadata__':
      continue
    if entry['dtype'] not in SAFETENSORS_DTYPES:
      raise ValueError(f'{path}: tensor {name} has unsupported dtype {entry["dtype"]}')
    start, end = entry['data_offsets']
    tensors[name] = data[start:end].view(SAFETENSORS_DTYPES[entry['dtype']]).reshape(entry['shape'])
  return tensors


def read_hf_checkpoint(directory: str) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
  """(config.json, tensors) of a HF model directory: one safetensors file or an indexed set of shards."""
  config_path = os.path.join(directory, 'config.json')
  if not os.path.isfile(config_path):
    raise FileNotFoundError(f'{directory}: no config.json (expected a Hugging Face model directory)')
  with open(config_path) as stream:
    config = json.load(stream)
  index_path = os.path.join(directory, 'model.safetensors.index.json')
  if os.path.isfile(index_path):
    with open(index_path) as stream:
      files = sorted(set(json.load(stream)['weight_map'].values()))
  elif os.path.isfile(os.path.join(directory, 'model.safetensors')):
    files = ['model.safetensors']
  else:
    raise FileNotFoundError(f'{directory}: no model.safetensors or model.safetensors.index.json '
                            '(only safetensors checkpoints are read; re-save with safe_serialization=True)')
  tensors = {}
  for name in files:
    tensors.update(read_safetensors(os.path.join(directory, name)))
  return config, tensors


def llama_config_from_hf(hf_config: dict[str, Any], **overrides) -> llama.LLaMAConfig:
  """The LLaMAConfig of a HF `LlamaConfig` dict; features lapa_jax's decoder lacks are errors."""
  def field(name, default=None):
    if name not in hf_config and default is None:
      raise ValueError(f'config.json: missing field {name!r}')
    return hf_config.get(name, default)

  if hf_config.get('model_type', 'llama') != 'llama':
    raise ValueError(f"config.json: model_type {hf_config['model_type']!r}, expected 'llama'")
  heads = field('num_attention_heads')
  if hf_config.get('num_key_value_heads', heads) != heads:
    raise ValueError('config.json: grouped-query attention (num_key_value_heads != num_attention_heads) '
                     'is not supported')
  for flag in ('attention_bias', 'mlp_bias'):
    if hf_config.get(flag):
      raise ValueError(f'config.json: {flag}=true is not supported (LLaMA has bias-free projections)')
  if hf_config.get('hidden_act', 'silu') != 'silu':
    raise ValueError(f"config.json: hidden_act {hf_config['hidden_act']!r}, expected 'silu'")
  rope = hf_config.get('rope_parameters') or {}  # transformers >= 5; older files: rope_theta/rope_scaling
  rope_type = rope.get('rope_type') or (hf_config.get('rope_scaling') or {}).get('rope_type', 'default')
  if rope_type != 'default':
    raise ValueError(f'config.json: rope type {rope_type!r} is not supported (only plain RoPE)')
  hidden = field('hidden_size')
  if hf_config.get('head_dim', hidden // heads) != hidden // heads:
    raise ValueError(f"config.json: head_dim {hf_config['head_dim']} != hidden_size / num_attention_heads")
  return llama.LLaMAConfig(
      vocab_size=field('vocab_size'), hidden_size=hidden, intermediate_size=field('intermediate_size'),
      num_layers=field('num_hidden_layers'), num_heads=heads, rms_norm_eps=float(field('rms_norm_eps', 1e-6)),
      rope_theta=float(rope.get('rope_theta', hf_config.get('rope_theta', 10000.0))), **overrides)


def rotate_half_to_interleaved(kernel: np.ndarray, num_heads: int) -> np.ndarray:
  """Reorders the output features of a q/k kernel `(in, heads * head_dim)` within each head.

  HF feature `c * head_dim/2 + i` (component c of pair i in rotate-half order) becomes feature
  `2i + c`, its place in interleaved order.
  """
  width = kernel.shape[0]
  half = kernel.shape[1] // num_heads // 2
  return kernel.reshape(width, num_heads, 2, half).transpose(0, 1, 3, 2).reshape(kernel.shape)


def convert_hf_tensors(tensors: dict[str, np.ndarray], config: llama.LLaMAConfig, *, source: str = 'checkpoint',
                       tie_word_embeddings: bool = False, permute_rope: bool = True) -> dict[easylm.Key, np.ndarray]:
  """HF names -> flat lapa_jax keys (`transformer/h/scan_decoder/...` stacked over layers).

  `permute_rope=False` skips the q/k reordering; it exists so the parity test can show it matters.
  """
  remaining = dict(tensors)

  def take(name):
    if name not in remaining:
      raise ValueError(f'{source}: missing tensor {name}')
    return np.asarray(remaining.pop(name))

  flat = {('transformer', 'wte', 'embedding'): take('model.embed_tokens.weight'),
          ('transformer', 'ln_f', 'kernel'): take('model.norm.weight')}
  if 'lm_head.weight' in remaining or not tie_word_embeddings:
    flat[('lm_head', 'kernel')] = take('lm_head.weight').T
  else:
    flat[('lm_head', 'kernel')] = flat[('transformer', 'wte', 'embedding')].T
  layer_names = {('attention', 'wq'): 'self_attn.q_proj', ('attention', 'wk'): 'self_attn.k_proj',
                 ('attention', 'wv'): 'self_attn.v_proj', ('attention', 'wo'): 'self_attn.o_proj',
                 ('feed_forward', 'w1'): 'mlp.gate_proj', ('feed_forward', 'w3'): 'mlp.up_proj',
                 ('feed_forward', 'w2'): 'mlp.down_proj'}
  for (group, name), hf_name in layer_names.items():
    kernels = [take(f'model.layers.{i}.{hf_name}.weight').T for i in range(config.num_layers)]
    if permute_rope and name in ('wq', 'wk'):
      kernels = [rotate_half_to_interleaved(k, config.num_heads) for k in kernels]
    flat[easylm.SCAN_PREFIX + (group, name, 'kernel')] = np.stack(kernels)
  for norm, hf_name in (('attention_norm', 'input_layernorm'), ('ffn_norm', 'post_attention_layernorm')):
    flat[easylm.SCAN_PREFIX + (norm, 'kernel')] = np.stack(
        [take(f'model.layers.{i}.{hf_name}.weight') for i in range(config.num_layers)])
  # Rotary caches that old checkpoints saved are recomputed here.
  unknown = sorted(n for n in remaining if not n.endswith('rotary_emb.inv_freq'))
  if unknown:
    raise ValueError(f'{source}: unknown tensors: {", ".join(unknown)}')
  return flat


def import_hf(directory: str, model_spec: str | None = None, *, init_missing: bool = False, seed: int = 0,
              dtype: Any = 'float32', permute_rope: bool = True) -> tuple[llama.LLaMAConfig, Any, list[str]]:
  """(LLaMAConfig of config.json, params, filled-in names). Without `model_spec` the params are those
  of `LLaMAForCausalLM(config)`; with one (e.g. 'vla:7b') they are checked against that model, whose
  RoPE theta and norm epsilon must match the file's."""
  hf_config, tensors = read_hf_checkpoint(directory)
  config = llama_config_from_hf(hf_config)
  flat = convert_hf_tensors(tensors, config, source=directory, permute_rope=permute_rope,
                            tie_word_embeddings=bool(hf_config.get('tie_word_embeddings', False)))
  if model_spec is None:
    model = llama.LLaMAForCausalLM(config)
    init_fn = lambda rng: model.init(rng, np.zeros((1, 8), np.int32))['params']
  else:
    model, init_fn = easylm.model_from_spec(model_spec)
    target = model.config if isinstance(model.config, llama.LLaMAConfig) else model.config.llama
    for name in ('rope_theta', 'rms_norm_eps'):
      if getattr(target, name) != getattr(config, name):
        raise ValueError(f'{directory}: config.json {name} = {getattr(config, name)} but model {model_spec!r} '
                         f'uses {getattr(target, name)}; pass it in the spec, e.g. {model_spec},{name}=...')
  rng = jax.random.key(seed)
  fill = (lambda: jax.jit(init_fn)(rng)) if init_missing else None
  params, filled = easylm.match_params(flat, jax.eval_shape(init_fn, rng), source=directory,
                                       fill_missing=fill, dtype=dtype)
  return config, params, filled


def main(argv: list[str]) -> int:
  parser = argparse.ArgumentParser(prog='lapa convert hf-llama', description=__doc__.split('\n\n')[0])
  parser.add_argument('source', help='Hugging Face model directory (config.json + safetensors)')
  parser.add_argument('output', help='new workdir to write (its checkpoints/0 holds the params)')
  parser.add_argument('--model', default=None,
                      help="target model spec, e.g. 'llama:7b' or 'vla:7b' (default: the text model of config.json)")
  parser.add_argument('--init-missing', action='store_true', help='initialise tensors the checkpoint lacks')
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--dtype', choices=['float32', 'bfloat16'], default='float32')
  args = parser.parse_args(argv)
  try:
    config, params, filled = import_hf(args.source, args.model, init_missing=args.init_missing, seed=args.seed,
                                       dtype=args.dtype)
    easylm.print_names('initialised (not in the checkpoint)', filled)
    easylm.save_params_checkpoint(args.output, params)
  except (FileNotFoundError, FileExistsError, ValueError) as error:
    parser.error(str(error))
  print(f'wrote {args.output} ({config})')
  return 0
