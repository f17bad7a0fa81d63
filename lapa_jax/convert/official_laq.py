"""Imports the official PyTorch LAQ weights (`laq_openx.pt`-style state dicts) for `variant='official'`.

    lapa convert official-laq laq_openx.pt OUT_DIR                      # the released (paper) model
    lapa convert official-laq laq.npz OUT_DIR --official-config laq_config.json
    lapa convert official-laq laq.pt OUT_DIR --config configs/laq.py:paper --config.model.dim=512

Reads a `torch.save` zip (no PyTorch needed) or an `.npz` of the same state dict; keys may carry the
`module.` prefix that DDP training adds. Loading is strict, unlike the official `strict=False`: every
missing key, unexpected key or shape mismatch is an error that names it. Writes OUT_DIR/config.json
(the resolved LAQ config with `model.variant='official'`) and an orbax checkpoint of the params in
OUT_DIR/checkpoints/0, the layout of a training workdir, so `lapa laq-infer --checkpoint OUT_DIR` and
the labelling job read it like any trained LAQ.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Callable, Mapping

import jax
import ml_collections
import numpy as np

from lapa_jax import checkpoint
from lapa_jax import config as config_lib
from lapa_jax.convert import torch_pickle
from lapa_jax.models.nsvq import CODE_GRID_CNNS

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                              'configs', 'laq.py') + ':paper'
DDP_PREFIX = 'module.'
# The official constructor's arguments (reference §1.7) -> lapa_jax model fields.
OFFICIAL_ARGUMENTS = {'dim': 'dim', 'quant_dim': 'quant_dim', 'codebook_size': 'codebook_size',
                      'image_size': 'image_size', 'patch_size': 'patch_size', 'spatial_depth': 'spatial_depth',
                      'temporal_depth': 'temporal_depth', 'dim_head': 'head_dim', 'heads': 'heads',
                      'channels': 'channels', 'code_seq_len': 'code_seq_len'}

Transform = Callable[[np.ndarray], np.ndarray]


class ConversionError(ValueError):
  pass


def load_state_dict(path: str) -> dict[str, np.ndarray]:
  """A `.pt` (torch.save zip) or `.npz` state dict as {key without 'module.': float32 array}."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{path}: no such checkpoint file')
  if path.endswith('.npz'):
    with np.load(path, allow_pickle=False) as archive:
      state = {key: archive[key] for key in archive.files}
  else:
    state = torch_pickle.load(path)
  if not isinstance(state, dict) or not all(isinstance(v, np.ndarray) for v in state.values()):
    raise ConversionError(f'{path}: expected a state dict of tensors (what LAQ.state_dict() returns)')
  return {key[len(DDP_PREFIX):] if key.startswith(DDP_PREFIX) else key: np.asarray(value, np.float32)
          for key, value in state.items()}


def _transpose(x: np.ndarray) -> np.ndarray:
  return x.T


def _identity(x: np.ndarray) -> np.ndarray:
  return x


class _KeyMap:
  """Official key -> (expected official shape, lapa_jax param path, transform)."""

  def __init__(self):
    self.entries: dict[str, tuple[tuple[int, ...], tuple[str, ...], Transform]] = {}
    # Buffers and parameters the official model holds but never uses: checked, then dropped.
    self.zeros: dict[str, tuple[int, ...]] = {}  # the bias-less LayerNorms' fixed beta buffers
    self.unused: dict[str, tuple[int, ...]] = {}

  def add(self, key, shape, path, transform=_identity):
    self.entries[key] = (tuple(shape), tuple(path), transform)

  def dense(self, key, in_dim, out_dim, path, bias=True):
    self.add(f'{key}.weight', (out_dim, in_dim), (*path, 'kernel'), _transpose)
    if bias:
      self.add(f'{key}.bias', (out_dim,), (*path, 'bias'))

  def layer_norm(self, key, dim, path, *, fixed_zero_beta: bool):
    gamma, beta = ('gamma', 'beta') if fixed_zero_beta else ('weight', 'bias')
    self.add(f'{key}.{gamma}', (dim,), (*path, 'scale'))
    if fixed_zero_beta:
      self.zeros[f'{key}.beta'] = (dim,)
    else:
      self.add(f'{key}.bias', (dim,), (*path, 'bias'))


def official_key_map(model: ml_collections.ConfigDict) -> _KeyMap:
  """Every key of the official state dict for this model config, and where it goes."""
  dim, heads, head_dim = model.dim, model.heads, model.head_dim
  inner = heads * head_dim
  ff_hidden = int(model.ff_mult * 2 / 3 * dim)
  patch_dim = model.channels * model.patch_size ** 2
  quant = model.quant_dim
  keys = _KeyMap()

  keys.dense('spatial_rel_pos_bias.net.0.0', 2, dim, ('position_bias', 'hidden_0'))
  keys.dense('spatial_rel_pos_bias.net.1.0', dim, dim, ('position_bias', 'hidden_1'))
  keys.dense('spatial_rel_pos_bias.net.2', dim, heads, ('position_bias', 'to_heads'))
  keys.layer_norm('to_patch_emb_first_frame.1', patch_dim, ('patch_norm_in',), fixed_zero_beta=False)
  keys.dense('to_patch_emb_first_frame.2', patch_dim, dim, ('patch_dense',))
  keys.layer_norm('to_patch_emb_first_frame.3', dim, ('patch_norm_out',), fixed_zero_beta=False)

  def attention(key, path, num_null_kv, is_cross):
    keys.layer_norm(f'{key}.norm', dim, (*path, 'norm'), fixed_zero_beta=True)
    if is_cross:
      keys.layer_norm(f'{key}.context_norm', dim, (*path, 'context_norm'), fixed_zero_beta=True)
      # null_kv (heads, 2 * n, head_dim) interleaves keys (even rows) and values (odd rows).
      null_shape = (heads, 2 * num_null_kv, head_dim)
      keys.add(f'{key}.null_kv', null_shape, (*path, 'null_keys'), lambda x: x[:, 0::2].transpose(1, 0, 2))
      keys.entries[f'{key}.null_kv#values'] = (null_shape, (*path, 'null_values'),
                                               lambda x: x[:, 1::2].transpose(1, 0, 2))
    else:
      # Self-attention never uses its context norm and has an empty null_kv.
      keys.unused[f'{key}.context_norm.gamma'] = (dim,)
      keys.unused[f'{key}.context_norm.beta'] = (dim,)
      keys.unused[f'{key}.null_kv'] = (heads, 0, head_dim)
    keys.add(f'{key}.q_scale', (head_dim,), (*path, 'query_scale'))
    keys.add(f'{key}.k_scale', (head_dim,), (*path, 'key_scale'))
    keys.add(f'{key}.to_q.weight', (inner, dim), (*path, 'query', 'kernel'), lambda x: x.T.reshape(dim, heads, head_dim))
    # to_kv's output is (keys, values), each laid out (heads, head_dim).
    keys.add(f'{key}.to_kv.weight', (2 * inner, dim), (*path, 'key_value', 'kernel'),
             lambda x: x.T.reshape(dim, 2, heads, head_dim))
    keys.add(f'{key}.to_out.weight', (dim, inner), (*path, 'out', 'kernel'), lambda x: x.T.reshape(heads, head_dim, dim))

  def transformer(key, name, depth, cross_attention):
    for index in range(depth):
      layer, path = f'{key}.layers.{index}', (name, f'layer_{index}')
      # Depthwise Conv3d (dim, 1, t, h, w) -> (t, h, w, dim).
      keys.add(f'{layer}.0.dsconv.weight', (dim, 1, 3, 3, 3), (*path, 'peg', 'kernel'),
               lambda x: x[:, 0].transpose(1, 2, 3, 0))
      keys.add(f'{layer}.0.dsconv.bias', (dim,), (*path, 'peg', 'bias'))
      attention(f'{layer}.1', (*path, 'self_attention'), 0, is_cross=False)
      if cross_attention:
        attention(f'{layer}.2', (*path, 'cross_attention'), 2, is_cross=True)
      keys.layer_norm(f'{layer}.3.0', dim, (*path, 'feed_forward', 'norm'), fixed_zero_beta=False)
      # The GEGLU input projection's output is (value, gate), each ff_hidden wide.
      keys.add(f'{layer}.3.1.weight', (2 * ff_hidden, dim), (*path, 'feed_forward', 'wi', 'kernel'),
               lambda x: x.T.reshape(dim, 2, ff_hidden))
      keys.dense(f'{layer}.3.4', ff_hidden, dim, (*path, 'feed_forward', 'wo'), bias=False)
    keys.layer_norm(f'{key}.norm_out', dim, (name, 'norm_out'), fixed_zero_beta=True)

  transformer('enc_spatial_transformer', 'encoder_space', model.spatial_depth, False)
  transformer('enc_temporal_transformer', 'encoder_time', model.temporal_depth, False)
  transformer('dec_spatial_transformer', 'decoder', model.decoder_depth, True)

  keys.add('vq.codebooks', (model.codebook_size, quant), ('quantizer', 'codebook'))
  keys.dense('vq.project_in', dim, quant, ('quantizer', 'project_in'))
  keys.dense('vq.project_out', quant, dim, ('quantizer', 'project_out'))
  for index, ((kernel_h, kernel_w), _, _) in enumerate(CODE_GRID_CNNS[model.code_seq_len]):
    # Conv2d (out, in, h, w) -> (h, w, in, out); the official Sequential puts a ReLU between convs.
    conv = f'vq.cnn_encoder.{2 * index}'
    keys.add(f'{conv}.weight', (quant, quant, kernel_h, kernel_w), ('quantizer', f'convs_{index}', 'kernel'),
             lambda x: x.transpose(2, 3, 1, 0))
    keys.add(f'{conv}.bias', (quant,), ('quantizer', f'convs_{index}', 'bias'))
  keys.dense('to_pixels_first_frame.0', dim, patch_dim, ('to_pixels',))
  return keys


def convert_state_dict(state: Mapping[str, np.ndarray], model: ml_collections.ConfigDict, source: str = 'state dict'):
  """Official state dict (without 'module.') -> lapa_jax params (nested dict of float32 numpy arrays)."""
  if model.variant != 'official':
    raise ConversionError(f'model.variant={model.variant!r}: official weights need variant "official"')
  if model.decoder_depth != model.spatial_depth:
    raise ConversionError('the official model has decoder_depth == spatial_depth; '
                          f'got {model.decoder_depth} and {model.spatial_depth}')
  keys = official_key_map(model)
  expected = {key.split('#')[0] for key in keys.entries} | set(keys.zeros) | set(keys.unused)
  missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
  if missing or unexpected:
    parts = [f'missing keys: {", ".join(missing)}'] if missing else []
    parts += [f'unexpected keys: {", ".join(unexpected)}'] if unexpected else []
    raise ConversionError(f'{source}: {"; ".join(parts)} (is the config that of this checkpoint?)')

  shapes = {key.split('#')[0]: shape for key, (shape, _, _) in keys.entries.items()}
  shapes.update(keys.zeros)
  shapes.update(keys.unused)
  mismatched = [f'{key} has shape {tuple(state[key].shape)}, the config expects {shape}'
                for key, shape in sorted(shapes.items()) if tuple(state[key].shape) != shape]
  if mismatched:
    raise ConversionError(f'{source}: {"; ".join(mismatched)}')
  nonzero = [key for key in keys.zeros if np.any(state[key])]
  if nonzero:
    raise ConversionError(f'{source}: the fixed LayerNorm beta buffers must be zero: {", ".join(nonzero)}')

  params: dict = {}
  for key, (_, path, transform) in keys.entries.items():
    node = params
    for name in path[:-1]:
      node = node.setdefault(name, {})
    node[path[-1]] = np.ascontiguousarray(transform(state[key.split('#')[0]]), dtype=np.float32)
  return params


def official_model_overrides(path: str) -> list[str]:
  """The official constructor arguments in a JSON file -> `--config.model.*` overrides."""
  with open(path) as f:
    arguments = json.load(f)
  unknown = sorted(set(arguments) - set(OFFICIAL_ARGUMENTS))
  if unknown:
    raise ConversionError(f'{path}: unknown official LAQ arguments {", ".join(unknown)}; '
                          f'expected some of {", ".join(OFFICIAL_ARGUMENTS)}')
  overrides = [f'--config.model.{OFFICIAL_ARGUMENTS[name]}={value}' for name, value in arguments.items()]
  if 'spatial_depth' in arguments:  # the official decoder is as deep as the spatial encoder
    overrides.append(f'--config.model.decoder_depth={arguments["spatial_depth"]}')
  return overrides


def load_config(config_spec: str = DEFAULT_CONFIG, overrides=(), official_config: str | None = None):
  """A LAQ config with `model.variant='official'`, from a config file, overrides and/or official JSON."""
  overrides = list(overrides) + ['--config.model.variant=official']
  if official_config:
    overrides = official_model_overrides(official_config) + overrides
  return config_lib.load(config_spec, overrides)


def save_checkpoint(out_dir: str, config: ml_collections.ConfigDict, params) -> str:
  """Writes OUT_DIR/config.json and the params as step 0 of OUT_DIR/checkpoints (a workdir's layout)."""
  config_lib.save(config, out_dir)
  state = {'params': jax.tree.map(jax.numpy.asarray, params)}
  with checkpoint.Checkpointer(checkpoint.directory_in(out_dir)) as checkpoints:
    checkpoints.save(0, state, {}, force=True)
  return out_dir


def main(argv: list[str]) -> int:
  overrides, rest = config_lib.split_overrides(argv)
  parser = argparse.ArgumentParser(
      prog='lapa convert official-laq',
      description='Import official PyTorch LAQ weights (.pt without PyTorch, or .npz) as a lapa_jax checkpoint '
                  "for model.variant='official'.",
      epilog='Model fields can be overridden with --config.model.<field>=<value>.')
  parser.add_argument('checkpoint', metavar='IN', help='laq_openx.pt-style state dict (.pt or .npz)')
  parser.add_argument('out_dir', metavar='OUT_DIR', help='directory for config.json and checkpoints/')
  parser.add_argument('--config', default=DEFAULT_CONFIG, help='LAQ config (default: configs/laq.py:paper)')
  parser.add_argument('--official-config', help="JSON of the official constructor's arguments "
                                                '(dim, quant_dim, heads, dim_head, ...)')
  args = parser.parse_args(rest)
  try:
    config = load_config(args.config, overrides, args.official_config)
    params = convert_state_dict(load_state_dict(args.checkpoint), config.model, args.checkpoint)
  except (ConversionError, FileNotFoundError, KeyError, ValueError) as error:
    parser.error(error.args[0] if isinstance(error, KeyError) else str(error))
  save_checkpoint(args.out_dir, config, params)
  count = sum(leaf.size for leaf in jax.tree.leaves(params))
  print(f'wrote {count:,} params to {args.out_dir}')
  return 0
