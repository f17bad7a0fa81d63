"""Image augmentation for training and the evaluation crop that matches it (jax.numpy, jitted).

    images = augment(rng, batch['images'])       # (batch, height, width, 3) uint8 -> float32 in [0, 1]
    images = evaluation_view(batch['images'])    # the same geometry, centred, no jitter

`random_resized_crop` is the official LAPA training augmentation (albumentations RandomResizedCrop,
scale=[0.9, 0.9], ratio=[1, 1]): a crop covering `area` of the image at a uniformly random integer
position, resized back bilinearly. `center_crop` is its deterministic counterpart for evaluation
(the official code evaluated on a mismatched 230x256 crop). The crop keeps the image's aspect
ratio (square for square images), and resizes only the crop itself, so no pixel from outside it
bleeds in, as with albumentations' crop-then-resize.

`area` and `jitter` must be Python values (static under jit); rngs and jitter strengths may be traced.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

# Rec. 601 luma (torchvision's greyscale) and the RGB <-> YIQ transform whose chroma plane (I, Q)
# a hue shift rotates; the inverse is computed in float64 so that a zero rotation is the identity.
_LUMA = np.array([0.299, 0.587, 0.114])
_RGB_TO_YIQ = np.array([_LUMA, [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
_YIQ_TO_RGB = np.linalg.inv(_RGB_TO_YIQ)
# RGB -> YIQ -> rotate (I, Q) by an angle -> RGB is _HUE_FIXED + cos(angle) _HUE_COS + sin(angle) _HUE_SIN.
_HUE_FIXED = (_YIQ_TO_RGB[:, :1] @ _RGB_TO_YIQ[:1]).astype(np.float32)
_HUE_COS = (_YIQ_TO_RGB[:, 1:] @ _RGB_TO_YIQ[1:]).astype(np.float32)
_HUE_SIN = (_YIQ_TO_RGB[:, 1:] @ np.array([[0.0, -1.0], [1.0, 0.0]]) @ _RGB_TO_YIQ[1:]).astype(np.float32)


def to_float(images: Array) -> Array:
  """(batch, height, width, 3) uint8 in [0, 255] or float in [0, 1] -> float32 in [0, 1]."""
  images = jnp.asarray(images)
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f'augment: expected images of shape (batch, height, width, 3), got {images.shape}')
  if images.dtype == jnp.uint8:
    return images.astype(jnp.float32) / 255.0
  return images.astype(jnp.float32)


def crop_size(height: int, width: int, area: float) -> tuple[int, int]:
  """(crop_height, crop_width) of a crop covering `area` of a (height, width) image."""
  if not 0.0 < area <= 1.0:
    raise ValueError(f'augment: area must be in (0, 1], got {area}')
  side = math.sqrt(area)
  return max(1, round(side * height)), max(1, round(side * width))


def _resize_matrix(crop: int, size: int) -> np.ndarray:
  """(size, crop) weights of a half-pixel-centred bilinear resize from `crop` to `size` samples."""
  # Clamping the sample positions to the crop's pixel centres is how jax.image.resize and cv2 treat
  # the border: no weight falls outside the crop.
  position = np.clip((np.arange(size) + 0.5) * crop / size - 0.5, 0, crop - 1)
  below = np.minimum(np.floor(position).astype(int), crop - 1)
  above = np.minimum(below + 1, crop - 1)
  fraction = position - below
  weights = np.zeros((size, crop))
  np.add.at(weights, (np.arange(size), below), 1 - fraction)
  np.add.at(weights, (np.arange(size), above), fraction)
  return weights.astype(np.float32)


def _crop_and_resize(images: Array, tops: Array, lefts: Array, area: float) -> Array:
  """Crops each image at (tops[b], lefts[b]) and resizes the crop back to (height, width)."""
  _, height, width, channels = images.shape
  crop_height, crop_width = crop_size(height, width, area)
  crops = jax.vmap(lambda image, top, left: jax.lax.dynamic_slice(
      image, (top, left, 0), (crop_height, crop_width, channels)))(images, tops, lefts)
  # Two static matrices rather than jax.image.resize: the same bilinear result, a fraction of the
  # compile time, and HIGHEST precision so that TPUs and GPUs do not resample in bfloat16/tf32.
  return jnp.einsum('hy,byxc,wx->bhwc', _resize_matrix(crop_height, height), crops,
                    _resize_matrix(crop_width, width), precision=jax.lax.Precision.HIGHEST)


def _random_crop(uniforms: Array, images: Array, area: float) -> Array:
  """Crop at offsets floor(uniforms (batch, 2) in [0, 1) * number of positions) on each axis."""
  _, height, width, _ = images.shape
  crop_height, crop_width = crop_size(height, width, area)
  positions = jnp.array([height - crop_height + 1, width - crop_width + 1])
  offsets = jnp.minimum(jnp.floor(uniforms * positions).astype(jnp.int32), positions - 1)
  return _crop_and_resize(images, offsets[:, 0], offsets[:, 1], area)


def _grey(images: Array) -> Array:
  """(batch, height, width, 3) -> (batch, height, width, 1) luma."""
  return jnp.sum(images * jnp.asarray(_LUMA, images.dtype), axis=-1, keepdims=True)


def _jitter(signed: Array, images: Array, brightness, contrast, saturation, hue) -> Array:
  """Colour jitter with factors 1 + strength * signed[:, k] (k = 0, 1, 2), hue turn hue * signed[:, 3]."""
  scale = lambda column, strength: (1.0 + strength * signed[:, column])[:, None, None, None]
  images = jnp.clip(images * scale(0, brightness), 0.0, 1.0)
  mean = jnp.mean(_grey(images), axis=(1, 2, 3), keepdims=True)
  images = jnp.clip(mean + scale(1, contrast) * (images - mean), 0.0, 1.0)
  grey = _grey(images)
  images = jnp.clip(grey + scale(2, saturation) * (images - grey), 0.0, 1.0)
  angle = (2 * jnp.pi * hue * signed[:, 3])[:, None, None]
  transform = _HUE_FIXED + jnp.cos(angle) * _HUE_COS + jnp.sin(angle) * _HUE_SIN  # (batch, 3, 3)
  # Three channels: a broadcast sum, not a matmul that TPUs would run in bfloat16.
  return jnp.clip(jnp.sum(transform[:, None, None] * images[..., None, :], axis=-1), 0.0, 1.0)


# Each function draws its randomness in one call: every jax.random call adds compile time.

@functools.partial(jax.jit, static_argnames=('area',))
def random_resized_crop(rng: Array, images: Array, area: float = 0.9) -> Array:
  """(batch, height, width, 3) -> float32 same shape: per example, a random crop of `area`, resized."""
  images = to_float(images)
  return _random_crop(jax.random.uniform(rng, (images.shape[0], 2)), images, area)


@functools.partial(jax.jit, static_argnames=('area',))
def center_crop(images: Array, area: float = 0.9) -> Array:
  """(batch, height, width, 3) -> float32 same shape: the centred crop of `area`, resized back."""
  images = to_float(images)
  batch, height, width, _ = images.shape
  crop_height, crop_width = crop_size(height, width, area)
  tops = jnp.full((batch,), (height - crop_height) // 2, jnp.int32)
  lefts = jnp.full((batch,), (width - crop_width) // 2, jnp.int32)
  return _crop_and_resize(images, tops, lefts, area)


@jax.jit
def color_jitter(rng: Array, images: Array, brightness: float = 0.2, contrast: float = 0.2,
                 saturation: float = 0.2, hue: float = 0.02) -> Array:
  """(batch, height, width, 3) -> float32 in [0, 1]: per example, brightness x U[1-b, 1+b], contrast
  and saturation blends (with the mean luma, with greyscale) by U[1-c, 1+c] and U[1-s, 1+s], and a
  hue rotation by U[-h, h] of a full turn (in YIQ), clipped to [0, 1] after each step."""
  images = to_float(images)
  signed = jax.random.uniform(rng, (images.shape[0], 4), minval=-1.0, maxval=1.0)
  return _jitter(signed, images, brightness, contrast, saturation, hue)


@functools.partial(jax.jit, static_argnames=('area', 'jitter'))
def augment(rng: Array, images: Array, area: float = 0.9, jitter: bool = True) -> Array:
  """Training view: a random resized crop, then (when `jitter`) `color_jitter` with its defaults."""
  images = to_float(images)
  uniforms = jax.random.uniform(rng, (images.shape[0], 6))
  images = _random_crop(uniforms[:, :2], images, area)
  return _jitter(2 * uniforms[:, 2:] - 1, images, 0.2, 0.2, 0.2, 0.02) if jitter else images


def evaluation_view(images: Array, area: float = 0.9) -> Array:
  """Evaluation view matching `augment`'s geometry: `center_crop` (jitted), no jitter."""
  return center_crop(images, area)
