"""LAQ frame pairs (x_t, x_{t+frame_offset}): the offset rule, the pair indices of an episode and the
decode of a pair. The pipeline that reads them from any dataset or mixture is data/pipelines.py.

    resolve_frame_offset(frame_offset_seconds=0.6, fps=5)      # 3 steps (Bridge)
    pair_indices(length=10, frame_offset=3)                    # (t, t + 3) for t = 0..6
"""

from __future__ import annotations

import math

import numpy as np
import tensorflow as tf

from lapa_jax.data import rlds

DataError = rlds.DataError
EPISODE_ENDS = ('drop', 'clamp')
IMAGE_DTYPES = ('float32', 'uint8')


def resolve_frame_offset(frame_offset: int | None = None, frame_offset_seconds: float | None = None,
                         fps: float | None = None) -> int:
  """The pair offset in steps: `frame_offset`, or round(frame_offset_seconds * fps), at least 1."""
  if frame_offset is not None:
    if frame_offset_seconds is not None:
      raise DataError('give frame_offset (steps) or frame_offset_seconds with fps, not both')
    if isinstance(frame_offset, bool) or not isinstance(frame_offset, (int, np.integer)) or frame_offset < 1:
      raise DataError(f'frame_offset must be a whole number of steps >= 1, got {frame_offset!r}')
    return int(frame_offset)
  if frame_offset_seconds is None or fps is None:
    raise DataError('give frame_offset (steps) or both frame_offset_seconds and fps '
                    '(e.g. 0.6 s at 5 Hz is 3 steps)')
  if frame_offset_seconds <= 0 or fps <= 0:
    raise DataError(f'frame_offset_seconds and fps must be > 0, got {frame_offset_seconds} and {fps}')
  # Round half up (not Python's half-to-even) so that e.g. 0.5 s at 5 Hz is 3 steps, not 2.
  return max(1, math.floor(frame_offset_seconds * fps + 0.5))


def pair_indices(length: int, frame_offset: int, episode_end: str = 'drop') -> tuple[np.ndarray, np.ndarray]:
  """Step indices (first, second), each (pairs,) int64, of every pair of an episode of `length` steps.

  'drop': the pairs (t, t + frame_offset) inside the episode; 'clamp' (the official LAQ loader):
  every step starts a pair, the second index clamped to the last step.
  """
  if episode_end == 'drop':
    first = np.arange(max(0, length - frame_offset))
    return first, first + frame_offset
  first = np.arange(length)
  return first, np.minimum(first + frame_offset, length - 1)


def decode_image(encoded: tf.Tensor) -> tf.Tensor:
  """One encoded JPEG/PNG frame, () tf.string -> (height, width, 3) uint8."""
  image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
  image.set_shape([None, None, 3])
  return image


def resize_frames(frames: tf.Tensor, image_size: tuple[int, int]) -> tf.Tensor:
  """(..., height, width, 3) uint8 frames -> (..., *image_size, 3) uint8, unchanged if already that size.

  Frames of another size get ONE bilinear antialiased resize together: the two frames of a pair
  share exactly the same geometry, so the resize adds no fake motion. The result is rounded to
  uint8, as the official LAQ loader's PIL images are.
  """
  def resized():
    images = tf.image.resize(frames, image_size, method='bilinear', antialias=True)
    return tf.cast(tf.clip_by_value(tf.round(images), 0, 255), tf.uint8)

  stored_size = tf.reduce_all(tf.equal(tf.shape(frames)[-3:-1], image_size))
  return tf.cond(stored_size, lambda: frames, resized)


def decode_frames(encoded: tf.Tensor, image_size: tuple[int, int]) -> tf.Tensor:
  """Encoded frames, () or (frames,) tf.string of static length -> (..., height, width, 3) uint8 at
  image_size (see resize_frames)."""
  leading = [] if encoded.shape.rank == 0 else [encoded.shape[0]]
  frames = decode_image(encoded) if not leading else tf.stack([decode_image(encoded[i]) for i in range(leading[0])])
  return tf.ensure_shape(resize_frames(frames, image_size), [*leading, *image_size, 3])


def to_float(batch: dict[str, tf.Tensor], key: str) -> dict[str, tf.Tensor]:
  """batch[key] uint8 -> float32 in [0, 1], once per batch: converting each sample before batching
  would copy the four times larger float frames once more."""
  return {**batch, key: tf.image.convert_image_dtype(batch[key], tf.float32)}
