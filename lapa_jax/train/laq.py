"""Stage 1: train the latent action quantizer on frame pairs (x_t, x_{t+H}) of any RLDS dataset.

    lapa train configs/laq.py:small --workdir W --config.data.path=<dir>/<name>/<version>
    lapa train configs/laq.py:paper --workdir W --config.data.data_dir=D --config.data.mixture=lapa_openx

Objective: MSE of the reconstruction of x_{t+H} from x_t and the quantized latent action (NSVQ
noise substitution in training). Dead-code revival runs inside the jitted step on the global batch
(see `revive_dead_codes`), so every device and host agrees on the codebook. Evaluation on the
held-out split reports reconstruction MSE/PSNR against the "copy x_t" baseline and code usage, and
writes two pictures: the (x_t, x_{t+H}, reconstruction) grid and the latent action atlas.
"""

from __future__ import annotations

import functools
import math

import einops
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from lapa_jax import metrics as metrics_lib
from lapa_jax import sharding
from lapa_jax.data import pipelines
from lapa_jax.models import laq as laq_model
from lapa_jax.models import nsvq
from lapa_jax.train import data as data_lib
from lapa_jax.train import loop
from lapa_jax.train import revival as revival_lib
from lapa_jax.train.revival import REVIVAL_SOURCES

CODEBOOK_PATH = ('quantizer', 'codebook')


# ----- Data ------------------------------------------------------------------------------------

def make_pairs(config: ml_collections.ConfigDict, *, split: str, batch_size: int, process_index: int,
               process_count: int, statistics: dict | None) -> pipelines.MixtureIterator:
  """This process's uint8 frame pairs of `split`: the datasets, cameras and pair offsets of config.data."""
  data = data_lib.for_split(config.data, split)
  return pipelines.pair_iterator(data, image_size=config.model.image_size,
                                 batch_size=data_lib.local_batch_size(batch_size, process_count),
                                 seed=config.seed, process_index=process_index, process_count=process_count,
                                 statistics_by_name=statistics)


# ----- Objective -------------------------------------------------------------------------------

def unit_float(video: jax.Array) -> jax.Array:
  """Frames as float32 in [0, 1]. The pipeline ships uint8 (a quarter of the bytes to decode, batch
  and copy to the devices) and the conversion happens here, inside the jitted step."""
  if jnp.issubdtype(video.dtype, jnp.integer):
    return video.astype(jnp.float32) / 255.0
  return video


def psnr(mse: jax.Array) -> jax.Array:
  """Peak signal-to-noise ratio in dB of images in [0, 1] from their mean squared error."""
  return -10.0 * jnp.log10(jnp.maximum(mse, 1e-10))


def reconstruction_metrics(video: jax.Array, recon: jax.Array) -> dict[str, jax.Array]:
  """Per-pair MSE and PSNR of the reconstruction and of copying x_t: each (batch,)."""
  target = video[:, 1].astype(jnp.float32)
  mse = jnp.mean(jnp.square(recon - target), axis=(1, 2, 3))
  copy_mse = jnp.mean(jnp.square(video[:, 0].astype(jnp.float32) - target), axis=(1, 2, 3))
  return {'mse': mse, 'psnr': psnr(mse), 'copy_mse': copy_mse, 'copy_psnr': psnr(copy_mse)}


def code_usage_metrics(code_counts: jax.Array) -> dict[str, jax.Array]:
  """code_counts: (codebook_size,) assignments -> perplexity and number of codes used."""
  return {'perplexity': nsvq.perplexity(code_counts), 'unique_codes': jnp.sum(code_counts > 0).astype(jnp.float32)}


def latent_pool_size(config: ml_collections.ConfigDict) -> int:
  return min(config.revival.pool, config.batch_size * config.model.code_seq_len)


def initial_model_state(codebook_size: int, quant_dim: int, pool_size: int) -> dict:
  """The revival state (`revival.initial_state`): code usage, revived count, (pool_size, quant_dim) latents."""
  return revival_lib.initial_state(codebook_size, quant_dim, pool_size)


def make_loss_fn(model: laq_model.LatentActionQuantizer):
  def loss_fn(params, model_state, batch, rng, step):
    del step
    video = unit_float(batch['video'])
    out = model.apply({'params': params}, video, train=True, rngs={'noise': rng})
    per_pair = reconstruction_metrics(video, out['recon'])
    loss = jnp.mean(per_pair['mse'])
    step_metrics = {name: jnp.mean(value) for name, value in per_pair.items() if name != 'mse'}
    step_metrics.update(code_usage_metrics(out['code_counts']))
    pool = model_state['latent_pool']
    latents = jax.lax.stop_gradient(out['latents']).reshape(-1, pool.shape[-1])[:pool.shape[0]]
    new_state = dict(model_state, code_usage=model_state['code_usage'] + out['code_counts'], latent_pool=latents)
    return loss, (step_metrics, new_state)
  return loss_fn


# ----- Dead-code revival -----------------------------------------------------------------------
# The generic machinery is lapa_jax/train/revival.py; the LAQ's codebook lives at CODEBOOK_PATH.
# These names stay importable from here (tests, benchmarks/laq_step.py).

revival_due = revival_lib.revival_due
dead_codes = revival_lib.dead_codes
latent_replacements = revival_lib.latent_replacements
copy_replacements = revival_lib.copy_replacements


def reset_moment_rows(opt_state, rows: jax.Array):
  """Zeroes the Adam moments of the LAQ codebook rows where `rows` (codebook_size,) is True."""
  return revival_lib.reset_moment_rows(opt_state, rows, CODEBOOK_PATH)


def revive_dead_codes(state: loop.TrainState, revival: ml_collections.ConfigDict) -> tuple[loop.TrainState, dict]:
  """Stage.after_update: `revival.revive_dead_codes` on the LAQ codebook (replacements are latent
  actions of the latest batch, or noisy copies of used codes: the official way)."""
  return revival_lib.revive_dead_codes(state, revival, CODEBOOK_PATH)


# ----- Evaluation ------------------------------------------------------------------------------

def upscale(images: np.ndarray, min_size: int = 96) -> np.ndarray:
  """Nearest-neighbour upscaling of (..., height, width, channels) so small frames stay legible."""
  factor = max(1, math.ceil(min_size / images.shape[-2]))
  return images.repeat(factor, axis=-3).repeat(factor, axis=-2)


def usage_histogram(indices: np.ndarray, codebook_size: int, bar_height: int = 48, bar_width: int = 6) -> np.ndarray:
  """A bar chart (uint8 RGB) of code usage: one panel per code position, one bar per code."""
  counts = np.stack([np.bincount(indices[:, position], minlength=codebook_size)
                     for position in range(indices.shape[1])])  # (positions, codebook_size)
  heights = np.round(bar_height * counts / max(counts.max(), 1)).astype(int)
  panels = []
  for row in heights:
    panel = np.full((bar_height + 2, codebook_size * (bar_width + 1) + 1, 3), 255, np.uint8)
    for code, height in enumerate(row):
      left = 1 + code * (bar_width + 1)
      panel[bar_height + 1 - height:bar_height + 1, left:left + bar_width] = (40, 90, 200)
    panel[-1] = 0
    panels.append(panel)
  return np.concatenate(panels, axis=0)


def atlas_codes(indices: np.ndarray, codebook_size: int) -> np.ndarray:
  """(frames, positions) codes -> (frames, positions, codebook_size, positions): the frame's own
  codes with position p set to code k, for every (p, k)."""
  frames, positions = indices.shape
  codes = np.broadcast_to(indices[:, None, None, :], (frames, positions, codebook_size, positions)).copy()
  for position in range(positions):
    codes[:, position, :, position] = np.arange(codebook_size)
  return codes


class Evaluator:
  """Stage.evaluate: the same held-out pairs every time; scalars, the grid and the atlas."""

  def __init__(self, config: ml_collections.ConfigDict, model: laq_model.LatentActionQuantizer):
    self.config = config
    self.model = model
    self._pairs = self._start = None
    self._forward = jax.jit(self._evaluate_batch)
    self._decode = jax.jit(functools.partial(model.apply, method=model.decode_codes))

  def _evaluate_batch(self, params, video):
    video = unit_float(video)
    out = self.model.apply({'params': params}, video)
    per_pair = reconstruction_metrics(video, out['recon'])
    # The same x_t decoded with another pair's codes: if this is no worse, the decoder ignores the codes.
    other_codes = jnp.roll(out['indices'], 1, axis=0)
    other = self.model.apply({'params': params}, video[:, 0], other_codes, method=self.model.decode_codes)
    per_pair['mse_with_other_codes'] = reconstruction_metrics(video, other)['mse']
    return {name: jnp.sum(value) for name, value in per_pair.items()}, out['indices'], out['recon']

  def _batches(self):
    if self._pairs is None:
      self._pairs = make_pairs(self.config, split=self.config.data.eval_split, batch_size=self.config.eval.batch_size,
                               process_index=jax.process_index(), process_count=jax.process_count(),
                               statistics=None)
      self._start = self._pairs.get_state()
    self._pairs.set_state(self._start)
    return [next(self._pairs)['video'] for _ in range(self.config.eval.num_batches)]

  def __call__(self, state: loop.TrainState, step: int, writer: metrics_lib.MetricWriter) -> dict:
    mesh = jax.sharding.get_mesh()
    sums = {}
    all_indices, grid_rows, atlas_frames = [], [], None
    for local_video in self._batches():
      video = sharding.global_batch(mesh, {'video': local_video})['video']
      batch_sums, batch_indices, recon = self._forward(state.params, video)
      for name, value in batch_sums.items():
        sums[name] = sums.get(name, 0.0) + float(value)
      indices = np.asarray(multihost_utils.process_allgather(batch_indices, tiled=True))
      all_indices.append(indices)
      if sum(len(r) for r in grid_rows) < self.config.eval.grid_pairs:
        recon = np.asarray(multihost_utils.process_allgather(recon, tiled=True))
        full_video = np.asarray(unit_float(multihost_utils.process_allgather(video, tiled=True)))
        grid_rows.append(np.stack([full_video[:, 0], full_video[:, 1], np.clip(recon, 0, 1)], axis=1))
        if atlas_frames is None:
          atlas_frames = (full_video[:self.config.eval.atlas_frames, 0], indices[:self.config.eval.atlas_frames])
    indices = np.concatenate(all_indices)
    count = len(indices)
    results = {name: total / count for name, total in sums.items()}
    # PSNR of the mean error (a dataset-level figure), next to the mean of per-pair PSNRs.
    results['psnr_of_mean_mse'] = float(psnr(results['mse']))
    results['copy_psnr_of_mean_mse'] = float(psnr(results['copy_mse']))
    codebook_size = self.model.codebook_size
    counts = np.bincount(indices.reshape(-1), minlength=codebook_size)
    results.update({name: float(value) for name, value in code_usage_metrics(jnp.asarray(counts, jnp.float32)).items()})
    for position in range(indices.shape[1]):
      position_counts = np.bincount(indices[:, position], minlength=codebook_size)
      results[f'perplexity_position_{position}'] = float(nsvq.perplexity(jnp.asarray(position_counts, jnp.float32)))

    pictures = np.concatenate(grid_rows)[:self.config.eval.grid_pairs]
    images = {'reconstructions': metrics_lib.image_grid(
                  upscale(einops.rearrange(pictures, 'n k h w c -> (n k) h w c')), columns=3),
              'code_usage': usage_histogram(indices, codebook_size)}
    images['latent_action_atlas'] = self.atlas(state.params, *atlas_frames)
    writer.write_images(step, images)
    return results

  def atlas(self, params, first_frames: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """Rows: (frame, code position); columns: x_t, then the decoder's x_{t+H} for codes 0..K-1 forced
    at that position (the frame's own codes elsewhere)."""
    codebook_size = self.model.codebook_size
    frames, positions = indices.shape
    codes = atlas_codes(indices, codebook_size).reshape(-1, positions)
    repeated = np.repeat(first_frames, positions * codebook_size, axis=0)
    replicated = sharding.replicated(jax.sharding.get_mesh())
    predictions = np.asarray(self._decode({'params': params}, jax.device_put(repeated, replicated),
                                          jax.device_put(codes, replicated)))
    predictions = predictions.reshape(frames, positions, codebook_size, *predictions.shape[1:])
    firsts = np.broadcast_to(first_frames[:, None, None], (frames, positions, 1, *first_frames.shape[1:]))
    tiles = np.concatenate([firsts, np.clip(predictions, 0, 1)], axis=2)
    return metrics_lib.image_grid(upscale(einops.rearrange(tiles, 'f p k h w c -> (f p k) h w c')),
                                  columns=codebook_size + 1)


# ----- The stage -------------------------------------------------------------------------------

def make_stage(config: ml_collections.ConfigDict) -> loop.Stage:
  model = laq_model.from_config(config.model, config.dtype)
  revival_due(jnp.zeros((), jnp.int32), config.revival)  # validates the schedule before any work
  if config.revival.source not in REVIVAL_SOURCES:
    raise ValueError(f'config field revival.source: expected one of {REVIVAL_SOURCES}, got {config.revival.source!r}')
  if latent_pool_size(config) < config.model.codebook_size:
    raise ValueError(f'config field revival.pool: the pool keeps min(revival.pool, batch_size x model.code_seq_len) = '
                     f'{latent_pool_size(config)} latents, fewer than model.codebook_size={config.model.codebook_size}; '
                     'raise batch_size or lower model.codebook_size')
  if config.eval.batch_size < 1 or config.eval.num_batches < 1:
    raise ValueError('config fields eval.batch_size and eval.num_batches: expected positive integers')
  statistics = data_lib.shared_statistics(config.data)

  def init(rng):
    image = config.model.image_size
    video = jnp.zeros((1, 2, image, image, config.model.channels), jnp.float32)
    variables = model.init({'params': rng}, video)
    return {'params': variables['params'],
            'model_state': initial_model_state(config.model.codebook_size, config.model.quant_dim,
                                               latent_pool_size(config))}

  def train_data(process_index, process_count):
    return make_pairs(config, split=config.data.split, batch_size=config.batch_size, process_index=process_index,
                      process_count=process_count, statistics=statistics)

  return loop.Stage(
      init=init, loss_fn=make_loss_fn(model), train_data=train_data,
      after_update=None if config.revival.schedule == 'none' else
      functools.partial(revive_dead_codes, revival=config.revival),
      evaluate=Evaluator(config, model) if config.data.eval_split else None)
