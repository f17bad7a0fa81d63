"""LAQ frame pairs (x_t, x_{t+frame_offset}) from RLDS episodes, as host-local numpy batches.

    pairs = pair_iterator('/data/bridge_dataset', image_key='observation/image_0',
                          frame_offset_seconds=0.6, fps=5, batch_size=32)    # frame_offset = 3
    batch = next(pairs)      # {'video': (32, 2, 64, 64, 3) float32 in [0, 1] (or uint8), 'instruction': (32,)}
    state = pairs.get_state()                                                # save with the checkpoint

Pipeline of one epoch (tf.data, deterministic for a seed):
  episodes (encoded, file order shuffled) -> pairs inside each episode (still encoded bytes)
  -> shuffle buffer of encoded pairs -> skip what a resumed run already consumed
  -> decode both frames, one resize for the pair (decode_frames) -> batch -> [float32] -> prefetch.
Shuffling encoded pairs keeps the buffer ~10x smaller than decoded frames, and skipping before the
decode makes resuming cheap. Epoch e is shuffled with a seed derived from (seed, e), so the data
position is just (epoch, batches consumed in epoch). Batches never cross an epoch boundary: the last
batch_size-1 pairs at most of each (differently shuffled) epoch are dropped.
"""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from lapa_jax.data import rlds

DataError = rlds.DataError
EPISODE_ENDS = ('drop', 'clamp')
IMAGE_DTYPES = ('float32', 'uint8')
# Where Open-X datasets keep the step's instruction string (bridge_dataset, most others).
INSTRUCTION_KEYS = ('language_instruction', 'observation/natural_language_instruction',
                    'observation/language_instruction')
ACTION_KEY = 'action'
RAM_BUDGET_BYTES = 2 << 30  # for the autotuned buffers of one pair pipeline


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


def decode_frames(encoded: tf.Tensor, image_size: tuple[int, int]) -> tf.Tensor:
  """Encoded JPEG/PNG frames, () or (frames,) tf.string -> (..., height, width, 3) uint8 at image_size.

  Frames stored at another size get ONE bilinear antialiased resize together: the two frames of a
  pair share exactly the same geometry, so the resize adds no fake motion. The result is rounded
  to uint8, as the official LAQ loader's PIL images are.
  """
  def decode(one):
    image = tf.io.decode_image(one, channels=3, expand_animations=False)
    image.set_shape([None, None, 3])
    return image

  leading = [] if encoded.shape.rank == 0 else [encoded.shape[0]]
  frames = decode(encoded) if not leading else tf.stack([decode(encoded[i]) for i in range(leading[0])])

  def resized():
    images = tf.image.resize(frames, image_size, method='bilinear', antialias=True)
    return tf.cast(tf.clip_by_value(tf.round(images), 0, 255), tf.uint8)

  stored_size = tf.reduce_all(tf.equal(tf.shape(frames)[-3:-1], image_size))
  frames = tf.cond(stored_size, lambda: frames, resized)
  return tf.ensure_shape(frames, [*leading, *image_size, 3])


def to_float(batch: dict[str, tf.Tensor], key: str) -> dict[str, tf.Tensor]:
  """batch[key] uint8 -> float32 in [0, 1], once per batch: converting each sample before batching
  would copy the four times larger float frames once more."""
  return {**batch, key: tf.image.convert_image_dtype(batch[key], tf.float32)}


def _instruction_key(builder, instruction_key: str | None) -> str | None:
  features = rlds.step_features(builder)
  if instruction_key is not None:
    if instruction_key not in features:
      raise DataError(f'{builder.data_dir}: no step feature {instruction_key!r} for the instruction; '
                           f'step features: {", ".join(sorted(features))}')
    return instruction_key
  for key in INSTRUCTION_KEYS:
    if key in features and features[key].tf_dtype == tf.string:
      return key
  return None


def _action_dim(builder) -> int:
  features = rlds.step_features(builder)
  if ACTION_KEY not in features:
    nested = sorted(key for key in features if key.startswith(ACTION_KEY + '/'))
    if nested:
      raise DataError(f'{builder.data_dir}: action is a dict ({", ".join(nested)}); with_actions needs '
                      'a single action tensor per step (standardise the dataset first)')
    raise DataError(f'{builder.data_dir}: steps have no {ACTION_KEY!r} feature, so with_actions=True '
                    'is impossible (a video-only dataset?)')
  shape = features[ACTION_KEY].shape
  if any(dim is None for dim in shape):
    raise DataError(f'{builder.data_dir}: action shape {shape} is not fixed')
  return int(np.prod(shape, dtype=np.int64))


def _epoch_seed(seed: int, epoch: int) -> int:
  # Mixing (seed, epoch) rather than adding them keeps runs with seeds s and s+1 from replaying
  # each other's epochs shifted by one.
  return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])


class PairIterator:
  """Iterator of host-local batches of frame pairs; `get_state()`/`set_state()` for exact resume.

  Batches: 'video' (batch, 2, height, width, 3) float32 in [0, 1] (or uint8 with image_dtype='uint8')
  holding (x_t, x_{t+frame_offset});
  'instruction' (batch,) bytes, the instruction at step t; with_actions also 'actions'
  (batch, frame_offset, action_dim) float32, the actions of steps t .. t+frame_offset-1, and
  'action_mask' (batch, frame_offset) bool, False for the zero padding that episode_end='clamp'
  needs where the second frame was clamped to the episode's last step.
  """

  def __init__(self, builder: tfds.core.DatasetBuilder, *, split: str, image_key: str,
               frame_offset: int, image_size: tuple[int, int], batch_size: int, seed: int,
               process_index: int, process_count: int, shuffle_buffer: int, episode_end: str,
               repeat: bool, with_actions: bool, instruction_key: str | None,
               image_dtype: str = 'float32'):
    self.builder = builder
    self.split = split
    self.image_key = image_key
    self.frame_offset = frame_offset
    self.image_size = image_size
    self.batch_size = batch_size
    self.seed = seed
    self.process_index = process_index
    self.process_count = process_count
    self.shuffle_buffer = shuffle_buffer
    self.episode_end = episode_end
    self.repeat = repeat
    self.with_actions = with_actions
    self.instruction_key = instruction_key
    self.image_dtype = image_dtype
    self.action_dim = _action_dim(builder) if with_actions else None
    self._epoch = 0
    self._batches_in_epoch = 0
    self._batches = None  # numpy iterator over the current epoch, built on demand
    self._exhausted = False

  # --- data position -------------------------------------------------------------------------
  def get_state(self) -> dict[str, Any]:
    return {'epoch': self._epoch, 'batches_in_epoch': self._batches_in_epoch, 'seed': self.seed,
            'batch_size': self.batch_size, 'frame_offset': self.frame_offset, 'split': self.split,
            'process_index': self.process_index, 'process_count': self.process_count}

  def set_state(self, state: dict[str, Any]) -> None:
    for key in ('seed', 'batch_size', 'frame_offset', 'split', 'process_index', 'process_count'):
      if key in state and state[key] != getattr(self, key):
        raise DataError(f'data state was saved with {key}={state[key]!r} but this iterator has '
                        f'{key}={getattr(self, key)!r}; the saved position does not apply')
    self._epoch = int(state['epoch'])
    self._batches_in_epoch = int(state['batches_in_epoch'])
    self._batches = None
    self._exhausted = False

  # --- iteration -----------------------------------------------------------------------------
  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    while not self._exhausted:
      if self._batches is None:
        self._batches = self.epoch_dataset(self._epoch, self._batches_in_epoch).as_numpy_iterator()
      try:
        batch = next(self._batches)
      except StopIteration:
        if self._batches_in_epoch == 0:  # guards against looping forever; check_pairs() reports it first
          raise DataError(f'{self.builder.data_dir}: epoch {self._epoch} yielded no batch') from None
        self._batches = None
        if not self.repeat:
          self._exhausted = True
          break
        self._epoch += 1
        self._batches_in_epoch = 0
        continue
      self._batches_in_epoch += 1
      return batch
    raise StopIteration

  # --- the tf.data pipeline --------------------------------------------------------------------
  def _episode_pairs(self, episode) -> dict[str, tf.Tensor]:
    """All pairs of one episode, frames still encoded: 'frames' (pairs, 2) string, ..."""
    steps = episode[rlds.STEPS]
    frames = rlds.get_path(steps, self.image_key)
    length = tf.shape(frames, out_type=tf.int64)[0]
    first, second = tf.numpy_function(  # once per episode: negligible next to the image work
        lambda steps: pair_indices(int(steps), self.frame_offset, self.episode_end), [length],
        [tf.int64, tf.int64], stateful=False)
    first.set_shape([None])
    second.set_shape([None])
    pairs = {'frames': tf.stack([tf.gather(frames, first), tf.gather(frames, second)], axis=1)}
    if self.instruction_key is None:
      pairs['instruction'] = tf.fill(tf.shape(first), '')
    else:
      pairs['instruction'] = tf.gather(rlds.get_path(steps, self.instruction_key), first)
    if self.with_actions:
      actions = tf.reshape(tf.cast(steps[ACTION_KEY], tf.float32), [length, self.action_dim])
      index = first[:, None] + tf.range(self.frame_offset, dtype=tf.int64)[None, :]  # (pairs, frame_offset)
      mask = index < second[:, None]
      gathered = tf.gather(actions, tf.minimum(index, length - 1))
      pairs['actions'] = gathered * tf.cast(mask, tf.float32)[..., None]
      pairs['action_mask'] = mask
    return pairs

  def _decode(self, pair: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    out = {key: value for key, value in pair.items() if key != 'frames'}
    out['video'] = decode_frames(pair['frames'], self.image_size)  # (2, height, width, 3) uint8
    return out

  def episode_pairs(self, shuffle_files_seed: int | None = None) -> tf.data.Dataset:
    """This process's encoded pairs in episode order ('frames' (2,) string, 'instruction', ...)."""
    dataset = rlds.episodes(self.builder, self.split, process_index=self.process_index,
                            process_count=self.process_count, shuffle_files_seed=shuffle_files_seed)
    dataset = dataset.map(self._episode_pairs, num_parallel_calls=tf.data.AUTOTUNE)
    return dataset.unbatch()

  def epoch_dataset(self, epoch: int, skip_batches: int = 0) -> tf.data.Dataset:
    """Batches of epoch `epoch` after the first `skip_batches` (skipped before any decoding)."""
    epoch_seed = _epoch_seed(self.seed, epoch)
    dataset = self.episode_pairs(shuffle_files_seed=epoch_seed)
    dataset = dataset.shuffle(self.shuffle_buffer, seed=epoch_seed, reshuffle_each_iteration=False)
    dataset = dataset.skip(skip_batches * self.batch_size)
    dataset = dataset.map(self._decode, num_parallel_calls=tf.data.AUTOTUNE)
    dataset = dataset.batch(self.batch_size, drop_remainder=True)
    if self.image_dtype == 'float32':
      dataset = dataset.map(lambda batch: to_float(batch, 'video'))
    options = tf.data.Options()
    options.deterministic = True
    # tf.data's autotuner may otherwise buffer up to half the host's RAM when the consumer is slow
    # (seen: 9 GB on a busy 2-core host); two batches in flight are enough to hide the decode.
    options.autotune.ram_budget = RAM_BUDGET_BYTES
    return dataset.with_options(options).prefetch(2)

  def check_pairs(self) -> None:
    """DataError unless some episode is longer than frame_offset and an epoch fills one batch.

    Reads episode lengths only until both hold, i.e. a few episodes on any usable dataset.
    """
    dataset = rlds.episodes(self.builder, self.split, process_index=self.process_index,
                            process_count=self.process_count)

    lengths = dataset.map(lambda episode: tf.shape(rlds.get_path(episode[rlds.STEPS], self.image_key))[0])
    longest, pair_count = 0, 0
    for length in lengths.as_numpy_iterator():
      longest = max(longest, int(length))
      pair_count += len(pair_indices(int(length), self.frame_offset, self.episode_end)[0])
      if longest > self.frame_offset and pair_count >= self.batch_size:
        return
    where = f'{self.builder.data_dir} split {self.split!r}'
    if self.process_count > 1:
      where += f' (process {self.process_index} of {self.process_count})'
    if longest <= self.frame_offset:
      raise DataError(f'{where}: frame_offset {self.frame_offset} is not shorter than any episode '
                      f'(longest: {longest} steps); pairs need episodes of more than {self.frame_offset} steps')
    raise DataError(f'{where}: only {pair_count} pairs at frame_offset {self.frame_offset} '
                    f'(episode_end={self.episode_end!r}), fewer than batch_size {self.batch_size}')


def pair_iterator(path: str | os.PathLike, *, split: str = 'train', image_key: str = 'observation/image',
                  frame_offset: int | None = None, frame_offset_seconds: float | None = None,
                  fps: float | None = None, image_size: int | tuple[int, int] = 64, batch_size: int,
                  seed: int = 0, process_index: int = 0, process_count: int = 1,
                  shuffle_buffer: int = 10_000, episode_end: str = 'drop', repeat: bool = True,
                  with_actions: bool = False, instruction_key: str | None = None,
                  image_dtype: str = 'float32') -> PairIterator:
  """Batches of LAQ frame pairs from the RLDS dataset at `path` (`<dir>/<name>[/<version>]`).

  frame_offset is in steps, or given as frame_offset_seconds at `fps` steps per second (rounded,
  >= 1); fps defaults to the dataset's metadata.json 'fps' where it has one (lapa world datasets).
  episode_end: 'drop' (no pair crosses the end of an episode) or 'clamp' (every step starts a pair;
  the second index is clamped to the last step, as the official LAQ loader does). `batch_size` is
  this process's (local) batch. Each of `process_count` processes reads a disjoint slice of the
  split's episodes. instruction_key: the step's instruction string (default: found automatically;
  empty strings when the dataset has none). image_dtype: 'float32' in [0, 1] or 'uint8' (a quarter
  of the bytes; convert on the accelerator). Every argument is checked before any long work.
  """
  if episode_end not in EPISODE_ENDS:
    raise DataError(f'episode_end must be one of {EPISODE_ENDS}, got {episode_end!r}')
  if image_dtype not in IMAGE_DTYPES:
    raise DataError(f'image_dtype must be one of {IMAGE_DTYPES}, got {image_dtype!r}')
  if isinstance(image_size, (int, np.integer)):
    image_size = (int(image_size), int(image_size))
  image_size = tuple(int(size) for size in image_size)
  if len(image_size) != 2 or min(image_size) < 1:
    raise DataError(f'image_size must be a positive int or (height, width), got {image_size!r}')
  if batch_size < 1 or shuffle_buffer < 1:
    raise DataError(f'batch_size and shuffle_buffer must be >= 1, got {batch_size} and {shuffle_buffer}')
  rlds.process_split(split, process_index, process_count)  # validates the process index early
  builder = rlds.open_builder(path)
  if frame_offset is None and fps is None:
    fps = rlds.dataset_fps(builder)
  offset = resolve_frame_offset(frame_offset, frame_offset_seconds, fps)
  rlds.check_split(builder, split)
  rlds.check_image_key(builder, image_key)
  iterator = PairIterator(
      builder, split=split, image_key=image_key, frame_offset=offset, image_size=image_size,
      batch_size=batch_size, seed=seed, process_index=process_index, process_count=process_count,
      shuffle_buffer=shuffle_buffer, episode_end=episode_end, repeat=repeat, with_actions=with_actions,
      instruction_key=_instruction_key(builder, instruction_key), image_dtype=image_dtype)
  iterator.check_pairs()
  return iterator
