"""Latent action codes and reconstructions of frame pairs with a trained (or converted) LAQ.

    lapa laq-infer --checkpoint WORKDIR --pairs pairs.npz --out codes.npz [--step N] [--batch-size 64]

`pairs.npz` holds `video`: (batch, 2, height, width, channels) float in [0, 1] (x_t, x_{t+H}), or
the official PyTorch layout (batch, channels, 2, height, width), recognised from the model's image
size and channels; uint8 frames are scaled to [0, 1]. `codes.npz` gets `indices`
(batch, code_seq_len) int32, the nearest codes, `latents` (batch, code_seq_len, quant_dim) float32,
the latent actions before quantization, and `recon` (batch, height, width, channels) float32, the
decoder's x_{t+H} from x_t and those codes (no training noise).

WORKDIR is a training workdir or the output of `lapa convert official-laq`: `config.json` plus
`checkpoints/<step>/`. `load_laq` is the reusable part (the labelling job uses it too).
"""

from __future__ import annotations

import argparse
import os

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import tqdm

from lapa_jax import checkpoint
from lapa_jax import config as config_lib
from lapa_jax import sharding
from lapa_jax.models import laq as laq_model

CONFIG_FILE = 'config.json'


def load_config(workdir: str) -> ml_collections.ConfigDict:
  return config_lib.load_workdir(workdir, 'laq', '`lapa train configs/laq.py:...` or `lapa convert official-laq`',
                                 CONFIG_FILE)


def load_laq(workdir: str, mesh: jax.sharding.Mesh, step: int | None = None):
  """(config, model, params) of the LAQ in `workdir`, params sharded by their logical axes on `mesh`."""
  config = load_config(workdir)
  model = laq_model.from_config(config.model, config.dtype)
  image = config.model.image_size
  video = jax.ShapeDtypeStruct((1, 2, image, image, config.model.channels), np.float32)
  with sharding.use_mesh(mesh):
    abstract = jax.eval_shape(lambda rng, v: model.init({'params': rng}, v)['params'], jax.random.key(0), video)
    shardings = nn.unbox(sharding.logical_to_shardings(abstract, mesh))
  target = sharding.abstract_with_shardings(nn.unbox(abstract), shardings)
  checkpoints = checkpoint.Checkpointer(checkpoint.directory_in(workdir), read_only=True)
  try:
    params = checkpoints.restore_params(target, step)
  finally:
    checkpoints.close()
  # The restore is partial (only state.params): a param the checkpoint lacks comes back unfilled.
  missing = [jax.tree_util.keystr(path) for path, leaf in jax.tree_util.tree_leaves_with_path(params)
             if isinstance(leaf, jax.ShapeDtypeStruct)]
  if missing:
    raise ValueError(f'{workdir}: the checkpoint has no value for {len(missing)} params of this model '
                     f'(e.g. {missing[0]}); was it written by another version of the model?')
  return config, model, params


def to_model_layout(video: np.ndarray, image_size: int, channels: int, source: str = 'video') -> np.ndarray:
  """(batch, 2, H, W, C) or the official (batch, C, 2, H, W) -> float32 (batch, 2, H, W, C) in [0, 1]."""
  ours, official = (2, image_size, image_size, channels), (channels, 2, image_size, image_size)
  if video.ndim == 5 and tuple(video.shape[1:]) == ours:
    pass
  elif video.ndim == 5 and tuple(video.shape[1:]) == official:
    video = video.transpose(0, 2, 3, 4, 1)
  else:
    raise ValueError(f'{source}: expected shape (batch, {", ".join(map(str, ours))}) or the official '
                     f'(batch, {", ".join(map(str, official))}), got {video.shape}')
  if video.dtype == np.uint8:
    return video.astype(np.float32) / 255.0
  if not np.issubdtype(video.dtype, np.floating):
    raise ValueError(f'{source}: expected float frames in [0, 1] or uint8, got {video.dtype}')
  low, high = float(np.min(video)), float(np.max(video))
  if not (np.isfinite(low) and np.isfinite(high)) or low < -1e-3 or high > 1 + 1e-3:
    hint = ' (0..255 stored as floats? pass uint8 or divide by 255)' if high > 1.5 else ''
    raise ValueError(f'{source}: float frames must lie in [0, 1]; found values in [{low:.4g}, {high:.4g}]{hint}')
  return np.clip(video.astype(np.float32), 0.0, 1.0)


def infer(model, params, video: np.ndarray, mesh: jax.sharding.Mesh, batch_size: int = 64) -> dict[str, np.ndarray]:
  """Pairs in model layout -> {'indices' (batch, code_seq_len) int32, 'latents' (batch, code_seq_len, quant)
  float32, 'recon' (batch, H, W, C) float32}."""
  devices = sharding.data_parallel_size(mesh)
  batch_size = max(devices, batch_size // devices * devices)
  in_sharding = sharding.batch_sharding(mesh, video.ndim)
  keys = ('indices', 'latents', 'recon')
  forward = jax.jit(lambda p, v: {key: value for key, value in model.apply({'params': p}, v).items() if key in keys})
  chunks = {key: [] for key in keys}
  with sharding.use_mesh(mesh):
    for start in tqdm.trange(0, len(video), batch_size, desc='laq-infer', unit='batch', disable=len(video) <= batch_size):
      chunk = video[start:start + batch_size]
      padded = np.concatenate([chunk, np.zeros((-len(chunk) % devices, *chunk.shape[1:]), chunk.dtype)])
      for key, value in forward(params, jax.device_put(padded, in_sharding)).items():
        chunks[key].append(np.asarray(value)[:len(chunk)])
  return {key: np.concatenate(values).astype(np.int32 if key == 'indices' else np.float32)
          for key, values in chunks.items()}


def write_npz(path: str, **arrays) -> None:
  """Writes `path` atomically (a temporary name, renamed when complete)."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  temporary = path + '.tmp'
  with open(temporary, 'wb') as f:
    np.savez(f, **arrays)
  os.replace(temporary, path)


def main(argv: list[str]) -> int:
  parser = argparse.ArgumentParser(prog='lapa laq-infer', description=__doc__.split('\n\n')[0])
  parser.add_argument('--checkpoint', required=True, help='LAQ workdir (config.json + checkpoints/)')
  parser.add_argument('--pairs', required=True, help='.npz with `video` (batch, 2, H, W, C) in [0, 1]')
  parser.add_argument('--out', required=True, help='.npz to write with `indices` and `recon`')
  parser.add_argument('--step', type=int, default=None, help='checkpoint step (default: the latest)')
  parser.add_argument('--batch-size', type=int, default=64)
  args = parser.parse_args(argv)
  try:
    config = load_config(args.checkpoint)
    with np.load(args.pairs) as pairs:
      if 'video' not in pairs.files:
        raise ValueError(f'{args.pairs}: no array named video (found {", ".join(pairs.files) or "none"})')
      video = to_model_layout(pairs['video'], config.model.image_size, config.model.channels, f'{args.pairs}: video')
  except (FileNotFoundError, ValueError) as error:
    parser.error(str(error))
  mesh = sharding.make_mesh('1,-1,1')
  _, model, params = load_laq(args.checkpoint, mesh, args.step)
  outputs = infer(model, params, video, mesh, args.batch_size)
  write_npz(args.out, **outputs)
  print(f'wrote codes, latent actions and reconstructions of {len(video)} pairs to {args.out}')
  return 0
