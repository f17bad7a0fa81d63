"""Stage 1: train the latent action quantizer on frame pairs (x_t, x_{t+H}) of any RLDS dataset.

    lapa train configs/laq.py:small --workdir W --config.data.path=<dir>/<name>/<version>

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
import optax
from jax.experimental import multihost_utils

from lapa_jax import metrics as metrics_lib
from lapa_jax import sharding
from lapa_jax.data import pairs, rlds
from lapa_jax.models import laq as laq_model
from lapa_jax.models import nsvq
from lapa_jax.train import loop

CODEBOOK_PATH = ('quantizer', 'codebook')
DEFAULT_FPS = 5.0  # Bridge's rate, for datasets whose metadata records none
# The official schedule (reference §1.5): every 10 steps below 100, every 100 below 1000, every 500
# below 5000; 26 events, the last at step 4500.
OFFICIAL_REVIVAL_PHASES = ((10, 100), (100, 1000), (500, 5000))
OFFICIAL_LAST_REVIVAL = 4500
REVIVAL_SCHEDULES = ('official', 'periodic', 'official+periodic', 'none')
REVIVAL_SOURCES = ('latents', 'codes')


# ----- Data ------------------------------------------------------------------------------------

def resolve_data(data: ml_collections.ConfigDict) -> dict:
  """Checks config.data against the dataset (one-line errors, before any long work) and returns
  the pair_iterator arguments it implies: path, image_key, frame_offset."""
  if not data.path:
    raise ValueError('config field data.path: set it to an RLDS dataset directory <dir>/<name>/<version>, '
                     'e.g. --config.data.path=../shared/data/bridge_debug/bridge_dataset/1.0.0')
  builder = rlds.open_builder(data.path)
  rlds.check_split(builder, data.split)
  if data.eval_split:
    rlds.check_split(builder, data.eval_split)
  image_key = data.image_key
  if not image_key:
    keys = rlds.image_keys(builder)
    if not keys:
      raise rlds.DataError(f'{data.path}: the steps have no image feature to train on')
    image_key = keys[0]
  rlds.check_image_key(builder, image_key)
  if data.frame_offset:
    frame_offset = int(data.frame_offset)
  else:
    fps = float(data.fps) or rlds.dataset_fps(builder) or DEFAULT_FPS
    frame_offset = pairs.resolve_frame_offset(frame_offset_seconds=data.frame_offset_seconds, fps=fps)
  return dict(path=data.path, image_key=image_key, frame_offset=frame_offset)


def make_pairs(config: ml_collections.ConfigDict, resolved: dict, *, split: str, batch_size: int, seed: int,
               process_index: int, process_count: int, repeat: bool) -> pairs.PairIterator:
  if batch_size % process_count:
    raise ValueError(f'batch size {batch_size} is not divisible by the {process_count} processes')
  return pairs.pair_iterator(
      resolved['path'], split=split, image_key=resolved['image_key'], frame_offset=resolved['frame_offset'],
      image_size=config.model.image_size, batch_size=batch_size // process_count, seed=seed,
      process_index=process_index, process_count=process_count, shuffle_buffer=config.data.shuffle_buffer,
      episode_end=config.data.episode_end, repeat=repeat, image_dtype='uint8')


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
  """code_usage: assignments per code since the last revival; codes_revived_total: a running count;
  latent_pool: (pool_size, quant_dim) latent actions of the latest batch, to revive codes from."""
  return {'code_usage': jnp.zeros((codebook_size,), jnp.float32), 'codes_revived_total': jnp.zeros((), jnp.int32),
          'latent_pool': jnp.zeros((pool_size, quant_dim), jnp.float32)}


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

def revival_due(step: jax.Array, revival: ml_collections.ConfigDict) -> jax.Array:
  """Whether a revival happens after `step` completed updates (a traced bool)."""
  if revival.schedule not in REVIVAL_SCHEDULES:
    raise ValueError(f'config field revival.schedule: expected one of {REVIVAL_SCHEDULES}, got {revival.schedule!r}')
  if 'periodic' in revival.schedule and revival.every < 1:
    raise ValueError(f'config field revival.every: schedule {revival.schedule!r} needs every >= 1, got {revival.every}')
  due = jnp.zeros((), bool)
  if revival.schedule in ('official', 'official+periodic'):
    for every, below in OFFICIAL_REVIVAL_PHASES:
      due |= (step % every == 0) & (step < below)
  if revival.schedule == 'periodic':
    due |= step % revival.every == 0
  if revival.schedule == 'official+periodic':
    due |= (step > OFFICIAL_LAST_REVIVAL) & ((step - OFFICIAL_LAST_REVIVAL) % revival.every == 0)
  return due & (step > 0)


def dead_codes(code_usage: jax.Array, threshold: float) -> jax.Array:
  """(codebook_size,) bool: codes with fewer than `threshold` x the uniform share of assignments."""
  uniform_share = jnp.sum(code_usage) / code_usage.shape[0]
  return code_usage < threshold * uniform_share


def latent_replacements(latent_pool: jax.Array, codebook_size: int, rng: jax.Array) -> jax.Array:
  """For every code, a different latent action of the latest batch: (codebook_size, quant_dim).

  A code placed on a real latent is the nearest code of at least that latent, so it is used again.
  """
  rows = jax.random.permutation(rng, latent_pool.shape[0])[:codebook_size]
  return latent_pool[rows]


def copy_replacements(codebook: jax.Array, code_usage: jax.Array, rng: jax.Array, noise: float) -> jax.Array:
  """For every code, a copy of a live code drawn in proportion to its use (busy codes are split),
  plus Gaussian noise of `noise` x that code's RMS: (codebook_size, quant_dim). The official way
  (with 1e-12 noise, which float32 rounds away)."""
  source_rng, noise_rng = jax.random.split(rng)
  logits = jnp.where(code_usage > 0, jnp.log(jnp.maximum(code_usage, 1e-30)), -jnp.inf)
  sources = jax.random.categorical(source_rng, logits, shape=(codebook.shape[0],))
  copies = codebook[sources]
  scale = noise * jnp.sqrt(jnp.mean(jnp.square(copies), axis=-1, keepdims=True))
  return copies + scale * jax.random.normal(noise_rng, copies.shape, copies.dtype)


def _get(tree, path):
  for key in path:
    tree = tree[key]
  return tree


def _set(tree, path, value):
  if not path:
    return value
  return {**tree, path[0]: _set(tree[path[0]], path[1:], value)}


def reset_moment_rows(opt_state, rows: jax.Array):
  """Zeroes the Adam first and second moments of the codebook rows where `rows` (codebook_size,) is True."""
  def reset(moments):
    row_moments = _get(moments, CODEBOOK_PATH)
    return _set(moments, CODEBOOK_PATH, jnp.where(rows[:, None], 0.0, row_moments))
  mu = optax.tree_utils.tree_get(opt_state, 'mu')
  nu = optax.tree_utils.tree_get(opt_state, 'nu')
  return optax.tree_utils.tree_set(opt_state, mu=reset(mu), nu=reset(nu))


def revive_dead_codes(state: loop.TrainState, revival: ml_collections.ConfigDict) -> tuple[loop.TrainState, dict]:
  """Stage.after_update: on scheduled steps, replace codes whose share of the assignments since the
  last revival is below `revival.threshold` x uniform, reset their Adam moments, restart the count.
  Replacements are latent actions of the latest batch (`revival.source='latents'`) or noisy copies
  of used codes ('codes', the official way).

  Everything is computed from replicated values (the global usage counts and latents, the codebook,
  the state rng), so all devices and hosts make the same replacement.
  """
  if revival.source not in REVIVAL_SOURCES:
    raise ValueError(f'config field revival.source: expected one of {REVIVAL_SOURCES}, got {revival.source!r}')
  usage = state.model_state['code_usage']
  codebook = _get(state.params, CODEBOOK_PATH)
  due = revival_due(state.step, revival)
  rng = jax.random.fold_in(jax.random.fold_in(state.rng, state.step), 0x5EED)
  revive = due & dead_codes(usage, revival.threshold) & (jnp.sum(usage) > 0)
  if revival.source == 'latents':
    replacements = latent_replacements(state.model_state['latent_pool'], codebook.shape[0], rng)
  else:
    replacements = copy_replacements(codebook, usage, rng, revival.noise)
  new_codebook = jnp.where(revive[:, None], replacements, codebook)
  opt_state = reset_moment_rows(state.opt_state, revive) if revival.reset_moments else state.opt_state
  revived = jnp.sum(revive).astype(jnp.int32)
  model_state = dict(state.model_state, code_usage=jnp.where(due, jnp.zeros_like(usage), usage),
                     codes_revived_total=state.model_state['codes_revived_total'] + revived)
  state = state.replace(params=_set(state.params, CODEBOOK_PATH, new_codebook), opt_state=opt_state,
                        model_state=model_state)
  return state, {'codes_revived': revived.astype(jnp.float32),
                 'codes_revived_total': model_state['codes_revived_total'].astype(jnp.float32)}


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

  def __init__(self, config: ml_collections.ConfigDict, model: laq_model.LatentActionQuantizer, resolved: dict):
    self.config = config
    self.model = model
    self.resolved = resolved
    self._pairs = None
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
      self._pairs = make_pairs(self.config, self.resolved, split=self.config.data.eval_split,
                               batch_size=self.config.eval.batch_size, seed=self.config.seed,
                               process_index=jax.process_index(), process_count=jax.process_count(),
                               repeat=True)
    self._pairs.set_state({'epoch': 0, 'batches_in_epoch': 0})
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
  resolved = resolve_data(config.data)
  revival_due(jnp.zeros((), jnp.int32), config.revival)  # validates the schedule before any work
  if config.revival.source not in REVIVAL_SOURCES:
    raise ValueError(f'config field revival.source: expected one of {REVIVAL_SOURCES}, got {config.revival.source!r}')
  if latent_pool_size(config) < config.model.codebook_size:
    raise ValueError(f'config field revival.pool: keep at least codebook_size={config.model.codebook_size} latents')
  if config.eval.batch_size < 1 or config.eval.num_batches < 1:
    raise ValueError('config fields eval.batch_size and eval.num_batches: expected positive integers')

  def init(rng):
    image = config.model.image_size
    video = jnp.zeros((1, 2, image, image, config.model.channels), jnp.float32)
    variables = model.init({'params': rng}, video)
    return {'params': variables['params'],
            'model_state': initial_model_state(config.model.codebook_size, config.model.quant_dim,
                                               latent_pool_size(config))}

  def train_data(process_index, process_count):
    return make_pairs(config, resolved, split=config.data.split, batch_size=config.batch_size,
                      seed=config.seed, process_index=process_index, process_count=process_count, repeat=True)

  return loop.Stage(
      init=init, loss_fn=make_loss_fn(model), train_data=train_data,
      after_update=None if config.revival.schedule == 'none' else
      functools.partial(revive_dead_codes, revival=config.revival),
      evaluate=Evaluator(config, model, resolved) if config.data.eval_split else None)
