"""The vision tokenizer stage: train the VQGAN (lapa_jax/models/vqgan.py) on single frames of any RLDS dataset.

    lapa train configs/tokenizer.py:small --workdir W --config.data.path=<dir>/<name>/<version>
    lapa train configs/tokenizer.py:demo --workdir W --config.data.path=<world>/lapa_world_robot/1.0.0

The built-in world needs its own tokenizer (LWM's weights are not bundled); for Open-X the released
LWM VQGAN is imported instead (`lapa convert lwm-vqgan import`). Both give the same workdir layout,
read by `lapa_jax.vision_tokenizer.load_vqgan`: params = the VQGAN tree (encoder/..., quantize/embeddings,
...) plus a 'discriminator' subtree when the adversarial term is on.

Objective, per batch of frames (batch, resolution, resolution, 3):
  reconstruction_weight x L1 or L2 (`loss.reconstruction`) of the reconstruction
  + codebook_weight x codebook loss + commitment loss (commitment_cost x ||z - sg(e)||^2, in the model)
  + adversarial_weight x hinge generator loss of a PatchGAN discriminator, from `loss.adversarial_start`
    steps on (off by default: adversarial_weight 0), which trains on its own hinge loss alongside.
The reconstruction is not clipped to [0, 1] in training (a clipped pixel gets no gradient); the
reported MSE and PSNR are of the clipped one. The perceptual (LPIPS) term of taming/MaskGIT is left
out: it needs pretrained VGG weights, and nothing is downloaded at run time.

Dead codes (used less than `revival.threshold` x the uniform share since the last revival) are
replaced by encoder latents of the latest batch inside the jitted step (lapa_jax/train/revival.py).
Evaluation on the held-out split (the same frames every time) reports MSE, PSNR, code usage and
perplexity, and writes the reconstruction grid (original | reconstruction pairs) and a code-usage
bar chart to <workdir>/images.
"""

from __future__ import annotations

import functools
import math

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from lapa_jax import metrics as metrics_lib
from lapa_jax import sharding
from lapa_jax import vision_tokenizer
from lapa_jax.data import pipelines
from lapa_jax.models import vqgan
from lapa_jax.train import data as data_lib
from lapa_jax.train import laq as laq_stage
from lapa_jax.train import loop
from lapa_jax.train import revival as revival_lib
# The loader of trained and converted tokenizers, for the stages that use one (labelling, finetuning).

CODEBOOK_PATH = ('quantize', 'embeddings')
DISCRIMINATOR = vision_tokenizer.DISCRIMINATOR
RECONSTRUCTION_LOSSES = ('l1', 'l2')
# Shared with the LAQ stage: uint8 -> [0, 1] inside jit, PSNR, perplexity and codes used.
unit_float = laq_stage.unit_float
psnr = laq_stage.psnr
code_usage_metrics = laq_stage.code_usage_metrics


# ----- Data ------------------------------------------------------------------------------------

def make_frames(config: ml_collections.ConfigDict, *, split: str, batch_size: int, process_index: int,
                process_count: int, statistics: dict | None) -> pipelines.MixtureIterator:
  """This process's uint8 frames 'image' (batch_size / process_count, resolution, resolution, 3) of `split`."""
  data = data_lib.for_split(config.data, split)
  return pipelines.frame_iterator(data, image_size=config.model.resolution,
                                  batch_size=data_lib.local_batch_size(batch_size, process_count),
                                  seed=config.seed, process_index=process_index, process_count=process_count,
                                  statistics_by_name=statistics)


# ----- Discriminator ---------------------------------------------------------------------------

class PatchDiscriminator(nn.Module):
  """PatchGAN (pix2pix/taming): stride-2 4x4 convs, LeakyReLU 0.2, then a 4x4 conv to one logit per
  patch. GroupNorm replaces taming's BatchNorm, which would need batch statistics in the state."""
  channels: int = 64
  layers: int = 3

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    """Images (batch, height, width, 3) in [0, 1] -> logits (batch, height / 2^layers, width / 2^layers)."""
    x = nn.leaky_relu(nn.Conv(self.channels, (4, 4), strides=(2, 2))(images * 2.0 - 1.0), 0.2)
    for layer in range(1, self.layers):
      features = self.channels * min(2 ** layer, 8)
      x = nn.Conv(features, (4, 4), strides=(2, 2), use_bias=False)(x)
      x = nn.leaky_relu(nn.GroupNorm(math.gcd(32, features))(x), 0.2)
    return nn.Conv(1, (4, 4))(x)[..., 0]


def hinge_discriminator_loss(real_logits: jax.Array, fake_logits: jax.Array) -> jax.Array:
  return jnp.mean(nn.relu(1.0 - real_logits)) + jnp.mean(nn.relu(1.0 + fake_logits))


def adversarial_losses(discriminator: PatchDiscriminator, discriminator_params, images: jax.Array,
                       reconstruction: jax.Array) -> dict[str, jax.Array]:
  """The two players' losses, each with gradients for one network only.

  The loop has one optimizer over one params tree and takes one gradient of one scalar, so the two
  objectives are added and the stop-gradients route them: the generator loss sees the
  discriminator's params through stop_gradient (the VQGAN learns to fool a fixed critic), and the
  discriminator loss sees stop_gradient(reconstruction) (the critic learns without pushing the
  VQGAN). The sum's gradient is then the VQGAN's objective for the VQGAN and the discriminator's
  for the discriminator.
  """
  frozen = jax.lax.stop_gradient(discriminator_params)
  generator_loss = -jnp.mean(discriminator.apply({'params': frozen}, reconstruction))
  real_logits = discriminator.apply({'params': discriminator_params}, images)
  fake_logits = discriminator.apply({'params': discriminator_params}, jax.lax.stop_gradient(reconstruction))
  return {'generator_loss': generator_loss,
          'discriminator_loss': hinge_discriminator_loss(real_logits, fake_logits),
          'discriminator_real_logit': jnp.mean(real_logits), 'discriminator_fake_logit': jnp.mean(fake_logits)}


def make_discriminator(config: ml_collections.ConfigDict) -> PatchDiscriminator | None:
  """The discriminator of `config.loss`, or None when the adversarial term is off (weight 0)."""
  if config.loss.adversarial_weight <= 0:
    return None
  return PatchDiscriminator(config.loss.discriminator_channels, config.loss.discriminator_layers)


# ----- Objective -------------------------------------------------------------------------------

def reconstruction_loss(images: jax.Array, reconstruction: jax.Array, kind: str) -> jax.Array:
  """Mean L1 ('l1') or squared ('l2') error of images (batch, height, width, 3)."""
  if kind == 'l1':
    return jnp.mean(jnp.abs(reconstruction - images))
  if kind == 'l2':
    return jnp.mean(jnp.square(reconstruction - images))
  raise ValueError(f'config field loss.reconstruction: expected one of {RECONSTRUCTION_LOSSES}, got {kind!r}')


def latent_pool_size(config: ml_collections.ConfigDict) -> int:
  """Encoder latents kept from each batch for revival: at most revival.pool, at most the batch's."""
  tokens_per_image = vqgan.from_config(config.model).tokens_per_image
  return min(config.revival.pool, config.batch_size * tokens_per_image)


def code_counts(codes: jax.Array, codebook_size: int) -> jax.Array:
  """(codebook_size,) float32 assignments of codes of any shape."""
  return jnp.bincount(codes.reshape(-1), length=codebook_size).astype(jnp.float32)


def make_loss_fn(model: vqgan.VQGAN, config: ml_collections.ConfigDict,
                 discriminator: PatchDiscriminator | None = None):
  """Stage.loss_fn: see the module docstring. batch['image']: (batch, resolution, resolution, 3) uint8."""
  loss_config = config.loss
  codebook_size = model.config.codebook_size

  def loss_fn(params, model_state, batch, rng, step):
    del rng
    images = unit_float(batch['image'])
    (reconstruction, codes, losses), intermediates = model.apply(
        {'params': vision_tokenizer.vqgan_params(params)}, images, clip_output=False, mutable=['intermediates'])
    recon_loss = reconstruction_loss(images, reconstruction, loss_config.reconstruction)
    loss = (loss_config.reconstruction_weight * recon_loss + loss_config.codebook_weight * losses['codebook_loss']
            + losses['commitment_loss'])
    mse = jnp.mean(jnp.square(jnp.clip(reconstruction, 0.0, 1.0) - images))
    counts = code_counts(codes, codebook_size)
    step_metrics = {'reconstruction_loss': recon_loss, 'mse': mse, 'psnr': psnr(mse), **losses,
                    **code_usage_metrics(counts)}
    if discriminator is not None:
      adversarial = adversarial_losses(discriminator, params[DISCRIMINATOR], images, reconstruction)
      # Before adversarial_start both players sit out: the critic of a blurry early VQGAN teaches nothing.
      active = (step >= loss_config.adversarial_start).astype(jnp.float32)
      loss += active * (loss_config.adversarial_weight * adversarial['generator_loss']
                        + adversarial['discriminator_loss'])
      step_metrics.update(adversarial, adversarial_active=active)
    latents = intermediates['intermediates']['latents'][0]
    pool_size = model_state['latent_pool'].shape[0]
    new_state = dict(model_state, code_usage=model_state['code_usage'] + counts,
                     latent_pool=revival_lib.pool_latents(latents.reshape(-1, latents.shape[-1]), pool_size))
    return loss, (step_metrics, new_state)

  return loss_fn


def revive_dead_codes(state: loop.TrainState, revival: ml_collections.ConfigDict) -> tuple[loop.TrainState, dict]:
  """Stage.after_update: `revival.revive_dead_codes` on the VQGAN codebook."""
  return revival_lib.revive_dead_codes(state, revival, CODEBOOK_PATH)


# ----- Evaluation ------------------------------------------------------------------------------

def reconstruction_grid(images: np.ndarray, reconstructions: np.ndarray, pairs_per_row: int) -> np.ndarray:
  """(count, height, width, 3) originals and reconstructions in [0, 1] -> one uint8 picture of
  (original | reconstruction) pairs, `pairs_per_row` pairs per row, upscaled so small frames stay legible."""
  tiles = np.stack([images, np.clip(reconstructions, 0.0, 1.0)], axis=1)
  tiles = einops.rearrange(tiles, 'n pair h w c -> (n pair) h w c')
  return metrics_lib.image_grid(laq_stage.upscale(tiles), columns=2 * pairs_per_row)


class Evaluator:
  """Stage.evaluate: the same held-out frames every time; scalars, the grid and the usage chart."""

  def __init__(self, config: ml_collections.ConfigDict, model: vqgan.VQGAN):
    self.config = config
    self.model = model
    self._frames = self._start = None
    self._forward = jax.jit(self._evaluate_batch)

  def _evaluate_batch(self, params, images):
    images = unit_float(images)
    reconstruction, codes, _ = self.model.apply({'params': vision_tokenizer.vqgan_params(params)}, images)
    mse = jnp.mean(jnp.square(reconstruction - images), axis=(1, 2, 3))
    return {'mse': jnp.sum(mse), 'psnr': jnp.sum(psnr(mse))}, codes, reconstruction

  def _batches(self):
    if self._frames is None:
      self._frames = make_frames(self.config, split=self.config.data.eval_split,
                                 batch_size=self.config.eval.batch_size, process_index=jax.process_index(),
                                 process_count=jax.process_count(), statistics=None)
      self._start = self._frames.get_state()
    self._frames.set_state(self._start)
    return [next(self._frames)['image'] for _ in range(self.config.eval.num_batches)]

  def __call__(self, state: loop.TrainState, step: int, writer: metrics_lib.MetricWriter) -> dict:
    mesh = jax.sharding.get_mesh()
    sums, all_codes, originals, reconstructions = {}, [], [], []
    for local_images in self._batches():
      images = sharding.global_batch(mesh, {'image': local_images})['image']
      batch_sums, codes, reconstruction = self._forward(state.params, images)
      for name, value in batch_sums.items():
        sums[name] = sums.get(name, 0.0) + float(value)
      all_codes.append(np.asarray(multihost_utils.process_allgather(codes, tiled=True)))
      if sum(len(batch) for batch in originals) < self.config.eval.grid_images:
        originals.append(np.asarray(unit_float(multihost_utils.process_allgather(images, tiled=True))))
        reconstructions.append(np.asarray(multihost_utils.process_allgather(reconstruction, tiled=True)))
    codes = np.concatenate(all_codes)
    results = {name: total / len(codes) for name, total in sums.items()}
    # PSNR of the mean error (a dataset-level figure), next to the mean of per-image PSNRs.
    results['psnr_of_mean_mse'] = float(psnr(results['mse']))
    codebook_size = self.model.config.codebook_size
    counts = np.bincount(codes.reshape(-1), minlength=codebook_size)
    results.update({name: float(value) for name, value in code_usage_metrics(jnp.asarray(counts, jnp.float32)).items()})
    results['codebook_fraction_used'] = results['unique_codes'] / codebook_size

    count = self.config.eval.grid_images
    grid = reconstruction_grid(np.concatenate(originals)[:count], np.concatenate(reconstructions)[:count],
                               self.config.eval.grid_pairs_per_row)
    # One bar per code (narrower for big codebooks), over every held-out frame's codes.
    usage = laq_stage.usage_histogram(codes.reshape(-1, 1), codebook_size,
                                      bar_width=max(1, min(6, 1024 // codebook_size)))
    writer.write_images(step, {'reconstructions': grid, 'code_usage': usage})
    return results


# ----- The stage -------------------------------------------------------------------------------

def check_config(config: ml_collections.ConfigDict) -> None:
  """One-line errors for tokenizer fields the run cannot use, before any long work starts."""
  if config.dtype != 'float32':
    raise ValueError(f"config field dtype: the VQGAN computes in float32 only, got {config.dtype!r}")
  if config.loss.reconstruction not in RECONSTRUCTION_LOSSES:
    raise ValueError(f'config field loss.reconstruction: expected one of {RECONSTRUCTION_LOSSES}, '
                     f'got {config.loss.reconstruction!r}')
  if config.loss.adversarial_weight > 0 and (config.loss.discriminator_layers < 1
                                             or config.loss.discriminator_channels < 1):
    raise ValueError('config fields loss.discriminator_layers and loss.discriminator_channels: expected '
                     'positive integers when loss.adversarial_weight > 0')
  revival_lib.check_config(config.revival, config.model.codebook_size, latent_pool_size(config))
  if config.eval.batch_size < 1 or config.eval.num_batches < 1 or config.eval.grid_pairs_per_row < 1:
    raise ValueError('config fields eval.batch_size, eval.num_batches and eval.grid_pairs_per_row: '
                     'expected positive integers')


def make_stage(config: ml_collections.ConfigDict) -> loop.Stage:
  model = vqgan.VQGAN(vqgan.from_config(config.model))
  check_config(config)
  discriminator = make_discriminator(config)
  statistics = data_lib.shared_statistics(config.data)

  def init(rng):
    model_rng, discriminator_rng = jax.random.split(rng)
    resolution = config.model.resolution
    images = jnp.zeros((1, resolution, resolution, config.model.channels), jnp.float32)
    params = dict(model.init(model_rng, images)['params'])
    if discriminator is not None:
      params[DISCRIMINATOR] = discriminator.init(discriminator_rng, images)['params']
    return {'params': params,
            'model_state': revival_lib.initial_state(config.model.codebook_size, config.model.embed_dim,
                                                     latent_pool_size(config))}

  def train_data(process_index, process_count):
    return make_frames(config, split=config.data.split, batch_size=config.batch_size, process_index=process_index,
                       process_count=process_count, statistics=statistics)

  return loop.Stage(
      init=init, loss_fn=make_loss_fn(model, config, discriminator), train_data=train_data,
      after_update=None if config.revival.schedule == 'none' else
      functools.partial(revive_dead_codes, revival=config.revival),
      evaluate=Evaluator(config, model) if config.data.eval_split else None)
