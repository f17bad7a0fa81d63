"""Mixture pipelines over Open-X datasets: LAQ frame pairs and VLA step examples.

    data = pipelines.default_config(); data.data_dir = '/data/oxe'; data.mixture = 'lapa_openx'
    iterator = pipelines.pair_iterator(data, batch_size=64, seed=0, process_index=0, process_count=1)
    batch = next(iterator)  # 'video' (64, 2, 256, 256, 3), 'instruction', 'dataset', 'frame_offset', ...
    state = iterator.get_state()              # JSON; pipelines.pair_iterator(...).set_state(state)

How samples flow (each dataset d, then the mixture):
  1. Episode stream of d: this process's disjoint slice of the split, cut at shard boundaries into
     segments; each epoch visits the segments in an order shuffled by (seed, d, epoch), reading
     `cycle_length` segments round-robin. Episodes keep their images ENCODED; only the fields the
     registry names are kept, then they are standardised (oxe.py, standardize.py).
  2. Sample stream of d: the samples of each episode (pairs (t, t + H_d) or single steps) in an order
     shuffled by the episode and its epoch, optionally at most `max_samples_per_episode` of them.
  3. Blocks: block b holds `block_size` samples (the shuffle buffer, sized from the RAM budget): a
     multinomial draw with the mixture proportions says how many come from each dataset, they are
     taken from the sample streams and the block is permuted - shuffling encoded bytes, before decode.
  4. Decode (tf.data, parallel, deterministic order): JPEG/PNG -> one resize of the stacked pair if
     the stored size differs -> batch -> prefetch.
Everything is a function of (seed, process_index, block index, stream positions), so the data
position is small: the block, the offset inside it and each stream's position at the block start.
Resuming re-reads one block at most. A builder thread prepares block b + 1 while block b is decoded.
"""

from __future__ import annotations

import atexit
import collections
import dataclasses
import logging
import os
import queue
import threading
import weakref
import zlib
from typing import Any, Sequence

import ml_collections
import numpy as np
import tensorflow as tf

from lapa_jax.data import mixtures
from lapa_jax.data import oxe
from lapa_jax.data import pairs
from lapa_jax.data import rlds
from lapa_jax.data import statistics

DataError = oxe.DataError
MODES = ('pairs', 'steps')
INSTRUCTION_POLICIES = ('error', 'empty')
NORMALIZATIONS = ('none', 'bounds_q99', 'normal')
STATE_VERSION = 1
_log = logging.getLogger(__name__)
_RUNS = weakref.WeakSet()  # live pipeline runs, stopped at exit


def default_config() -> ml_collections.ConfigDict:
  """The `data` group of every stage config: a mixture under data_dir, or one dataset at `path`."""
  return ml_collections.ConfigDict(dict(
      data_dir='',                      # holds <name>/<version>/ for every dataset of the mixture
      mixture='',                       # a named mixture (mixtures.NAMED_MIXTURES) or 'name:weight,...'
      path='',                          # or one RLDS dataset <dir>/<name>/<version> (a one-dataset mixture)
      spec_file='',                     # describes the `path` dataset (README "Your own dataset")
      spec=ml_collections.ConfigDict(dict(  # ... or single fields of it, over the file / registry entry
          fps=0.0, image_key='', wrist_image_key='', instruction_key='', embodiment='',
          frame_offset_seconds=0.0, action_key='', action_layout='', gripper_open=1.0, gripper_closed=0.0)),
      split='train',
      skip_missing=False,               # datasets of the mixture missing on disk: error, or a warning
      balance='transitions',            # proportions: weight x transitions | x episodes | 'none'
      frame_offset_seconds=0.6,         # pairs of robot data ...
      human_frame_offset_seconds=2.4,   # ... and of human video, where the spec has no window of its own
      frame_offsets='',                 # overrides in steps of every window, 'name:steps,...' (or 'steps' for all)
      episode_end='drop',               # 'drop': no pair crosses an episode end; 'clamp': official LAQ
      max_samples_per_episode=0,        # 0: every pair/step of an episode; else a random subset
      missing_instruction='',           # 'error' | 'empty'; '' = 'empty' for pairs and frames, 'error' for steps
      action_normalization='none',      # steps: 'none' | 'bounds_q99' (gripper kept) | 'normal'
      on_corrupt='skip',                # corrupted/truncated shard: 'skip' (counted warning) | 'error'
      ram_budget_gb=4.0,                # host RAM the pipeline may use: sets the sizes below
      shuffle_buffer=0,                 # samples per shuffle block; 0: from ram_budget_gb
      decode_threads=0,                 # 0: CPU count (capped by the budget)
      read_threads=0,                   # parse threads shared by the datasets; 0: CPU count
      cycle_length=4,                   # shards read round-robin per dataset (capped by the budget)
      image_dtype='uint8',              # 'uint8' (convert on the accelerator) or 'float32' in [0, 1]
      statistics_cache_dir='',          # where statistics go when the data directory is read-only
  ))


@dataclasses.dataclass(frozen=True)
class Content:
  """What each sample carries.

  pairs: 'video' (2, S, S, 3) frames (x_t, x_{t+H}) and 'frame_offset'.
  steps: 'image' (S, S, 3) when `images`, the standardised 'action' (7,) when `actions`, and each
  step feature of `step_keys` as stored (e.g. a labelled dataset's 'latent_action', 'vision_tokens').
  Both: 'instruction', 'episode_index', 'dataset_index' (and 'dataset' names).
  """
  mode: str
  images: bool = True
  actions: bool = False
  step_keys: tuple[str, ...] = ()

  def __post_init__(self):
    if self.mode not in MODES:
      raise DataError(f'mode must be one of {MODES}, got {self.mode!r}')
    if self.mode == 'pairs' and (self.actions or self.step_keys or not self.images):
      raise DataError('frame pairs carry images only')

  @property
  def frames(self) -> int:
    return 0 if not self.images else 2 if self.mode == 'pairs' else 1


PAIRS = Content('pairs')


def spec_overrides(config) -> dict[str, Any]:
  """The fields of `config.spec` that are set (non-empty, non-zero; gripper values with an action field)."""
  fields = config.spec.to_dict()
  out = {key: value for key, value in fields.items()
         if key not in ('gripper_open', 'gripper_closed') and value not in ('', 0, 0.0, None)}
  if 'action_key' in out or 'action_layout' in out:
    out.update(gripper_open=fields['gripper_open'], gripper_closed=fields['gripper_closed'])
  return out


def open_datasets(config) -> list[tuple[oxe.Dataset, float]]:
  """(dataset, weight) of `config.mixture` under `config.data_dir`, or the one dataset at `config.path`
  described by its registry entry / lapa_spec.json, then `config.spec_file`, then `config.spec` fields."""
  overrides = spec_overrides(config)
  if config.path and config.mixture:
    raise DataError(f'data.path ({config.path}) and data.mixture ({config.mixture}) are both set; give one')
  if not config.path:
    if config.spec_file or overrides:
      raise DataError('data.spec_file and data.spec.* describe the dataset of data.path; a mixture\'s datasets '
                      f'describe themselves with a {oxe.SPEC_FILE} in their version directory')
    if not config.mixture:
      raise DataError('set data.path to an RLDS dataset <dir>/<name>/<version>, or data.mixture (with data.data_dir) '
                      f'to a mixture ({", ".join(mixtures.NAMED_MIXTURES)} or name:weight,...)')
    if not config.data_dir:
      raise DataError('data.data_dir is empty; set it to the directory holding <name>/<version>/ datasets')
    return mixtures.resolve(config.data_dir, config.mixture, skip_missing=config.skip_missing)
  version_dir = rlds.resolve_version_dir(config.path)
  name = os.path.basename(os.path.dirname(version_dir))
  spec = oxe.read_spec_file(config.spec_file, name) if config.spec_file else None
  if overrides:
    base = spec or oxe.spec_from_metadata(version_dir, name) or oxe.REGISTRY.get(name)
    spec = oxe.override_spec(base, overrides, name, 'data.spec')
  return [(oxe.open_path(version_dir, name=name, spec=spec), 1.0)]


def _seed(*parts: int) -> np.random.Generator:
  return np.random.default_rng([int(part) for part in parts])


def _parse_offsets(text: str) -> dict[str | None, int]:
  """'name:steps,...' -> {name: steps}; a bare 'steps' applies to every dataset (key None)."""
  out = {}
  for item in filter(None, (part.strip() for part in text.split(','))):
    name, _, steps = item.rpartition(':')
    if not steps.strip().isdigit() or int(steps) < 1:
      raise DataError(f'data.frame_offsets entry {item!r}: expected name:steps (or steps) with steps >= 1')
    out[name.strip() or None] = int(steps)
  return out


def frame_offset(config, spec: oxe.DatasetSpec) -> int:
  """The LAQ window H (in steps) of a dataset of `config`: data.frame_offsets if it names the
  dataset (or gives one for all), else data.frame_offset_seconds (human_frame_offset_seconds for
  human videos) at the dataset's frame rate."""
  offsets = _parse_offsets(config.frame_offsets)
  return offsets.get(spec.name) or offsets.get(None) or oxe.default_frame_offset(
      spec, config.frame_offset_seconds, config.human_frame_offset_seconds)


# --- per-dataset streams ---------------------------------------------------------------------------

@dataclasses.dataclass
class Source:
  """One dataset of the mixture, as this process reads it."""
  index: int
  dataset: oxe.Dataset
  reader: oxe.EpisodeReader
  segments: list[oxe.Segment]
  probability: float
  frame_offset: int = 0
  statistics: dict | None = None

  @property
  def name(self) -> str:
    return self.dataset.spec.name

  @property
  def key(self) -> int:
    # Seeds use the name, not the position in the mixture, so adding a dataset leaves others' order.
    return zlib.crc32(self.name.encode())


class EpisodeStream:
  """Endless, deterministic episodes of one source, read from `cycle_length` slots in turn.

  Segment counter g stands for segment perm_e[g % S] of epoch e = g // S (S segments, perm_e drawn
  from (seed, dataset, e)); slot j reads counters j, j + k, j + 2k, ... (k slots), a chunk of
  CHUNK_SEGMENTS segments per tf.data pipeline (TFDS reads 'train[a:b]+train[c:d]+...' in order).
  A shard found corrupt is remembered with the number of episodes readable before the damage, so
  later epochs read only those, without the error. state(): {'slots': [[segments done, episodes
  read in the current one], ...], 'turn': next slot, 'truncated': {segment start: readable}}.
  """
  CHUNK_SEGMENTS = 64

  def __init__(self, source: Source, seed: int, cycle_length: int):
    self.source = source
    self.seed = seed
    self.cycle_length = max(1, min(cycle_length, len(source.segments)))
    self._permutations = {}
    self.restore({'slots': [[0, 0] for _ in range(self.cycle_length)], 'turn': 0, 'truncated': {}})

  def state(self) -> dict[str, Any]:
    return {'slots': [list(slot) for slot in self._slots], 'turn': self._turn,
            'truncated': {str(start): size for start, size in self._truncated.items()}}

  def restore(self, state: dict[str, Any]) -> None:
    if len(state['slots']) != self.cycle_length:
      raise DataError(f'{self.source.name}: saved stream has {len(state["slots"])} slots, this one '
                      f'{self.cycle_length} (cycle_length or the RAM budget changed)')
    self._slots = [[int(done), int(read)] for done, read in state['slots']]
    self._turn = int(state['turn'])
    self._truncated = {int(start): int(size) for start, size in state.get('truncated', {}).items()}
    self._iterators = [None] * self.cycle_length

  def segment(self, counter: int) -> oxe.Segment:
    count = len(self.source.segments)
    epoch, position = divmod(counter, count)
    if epoch not in self._permutations:
      if len(self._permutations) > 4:
        self._permutations.clear()
      self._permutations[epoch] = _seed(self.seed, self.source.key, epoch).permutation(count)
    return self.source.segments[self._permutations[epoch][position]]

  def _slot_segment(self, slot: int, done: int) -> oxe.Segment:
    return self.segment(slot + done * self.cycle_length)

  def _size(self, segment: oxe.Segment) -> int:
    return self._truncated.get(segment.start, segment.size)

  def _open(self, slot: int):
    done, read = self._slots[slot]
    parts = []
    for i in range(self.CHUNK_SEGMENTS):
      segment = self._slot_segment(slot, done + i)
      size = self._size(segment)
      skip = read if i == 0 else 0
      if size > skip:
        parts.append(f'{segment.base_split}[{segment.start + skip}:{segment.start + size}]')
    return self.source.reader.read('+'.join(parts))

  def next(self) -> tuple[dict[str, Any], int, int]:
    """The next standardised episode, its index in the base split and its segment counter."""
    empty = 0
    while True:
      slot = self._turn
      done, read = self._slots[slot]
      segment = self._slot_segment(slot, done)
      size = self._size(segment)
      if read >= size:  # a shard that is corrupt from its start: the chunk left it out too
        empty += 1
        if empty > len(self.source.segments) * self.cycle_length:
          raise DataError(f'{self.source.dataset.path}: no readable episode in any shard')
        self._slots[slot] = [done + 1, 0]
        continue
      if self._iterators[slot] is None:
        self._iterators[slot] = self._open(slot)
      try:
        raw = next(self._iterators[slot])
      except StopIteration:  # the chunk is done; the slot position already points past it
        self._iterators[slot] = None
        continue
      except oxe.READ_ERRORS as error:
        self.source.reader.corrupt(segment, read, error)
        self._truncated[segment.start] = read
        self._slots[slot] = [done + 1, 0]
        # Other slots' chunks may hold this segment at its old size: reopen them all.
        self._iterators = [None] * self.cycle_length
        continue
      empty = 0
      read += 1
      self._slots[slot] = [done + 1, 0] if read == size else [done, read]
      self._turn = (slot + 1) % self.cycle_length
      return self.source.reader.standardize(raw), segment.start + read - 1, slot + done * self.cycle_length


class SampleStream:
  """Samples of one source's episodes, each episode's samples in its own shuffled order."""

  def __init__(self, source: Source, *, content: Content, seed: int, cycle_length: int, episode_end: str,
               max_samples_per_episode: int):
    self.source = source
    self.content = content
    self.seed = seed
    self.episode_end = episode_end
    self.max_samples = max_samples_per_episode
    self.episodes = EpisodeStream(source, seed, cycle_length)
    self.total_episodes = sum(segment.size for segment in source.segments)
    self._episode = None
    self._order = np.zeros(0, np.int64)
    self._taken = 0
    self._episode_state = None
    self._skip = 0

  def state(self) -> dict[str, Any]:
    if self._episode is None or self._taken >= len(self._order):
      return {'episode': self.episodes.state(), 'taken': self._skip}
    return {'episode': self._episode_state, 'taken': self._taken}

  def restore(self, state: dict[str, Any]) -> None:
    self.episodes.restore(state['episode'])
    self._episode, self._order, self._taken = None, np.zeros(0, np.int64), 0
    self._skip = int(state['taken'])

  def _samples(self, length: int) -> tuple[np.ndarray, np.ndarray | None]:
    """Step indices (first, second) of the samples of an episode: its pairs, or its steps (None)."""
    if self.content.mode == 'steps':
      return np.arange(length), None
    return pairs.pair_indices(length, self.source.frame_offset, self.episode_end)

  def _load_next_episode(self) -> None:
    empty = 0
    while True:
      self._episode_state = self.episodes.state()
      episode, index, counter = self.episodes.next()
      first, second = self._samples(len(episode['image']))
      if first.size:
        break
      empty += 1
      if empty > self.total_episodes:
        raise DataError(f'{self.source.name}: no episode has more than frame_offset '
                        f'{self.source.frame_offset} steps; lower the offset or use episode_end="clamp"')
    # Seeded by the episode and its epoch (via the counter): another subset each epoch.
    order = _seed(self.seed, self.source.key, counter, index).permutation(first)
    if self.max_samples:
      order = order[:self.max_samples]
    self._episode, self._index, self._order, self._second = episode, index, order, second
    self._taken, self._skip = self._skip, 0

  def take(self, count: int) -> dict[str, np.ndarray]:
    """The next `count` samples as columns (see Content): 'frames' ((count, 2) pairs x_t, x_t+H, or
    (count,) steps; encoded bytes), 'instruction', 'episode_index', and 'frame_offset' (pairs) or
    'action' and the step keys (steps)."""
    content = self.content
    parts = []
    taken = 0
    while taken < count:
      if self._episode is None or self._taken >= len(self._order):
        self._load_next_episode()
        continue
      chosen = self._order[self._taken:self._taken + count - taken]
      self._taken += len(chosen)
      taken += len(chosen)
      episode = self._episode
      part = {'instruction': episode['instruction'][chosen],
              'episode_index': np.full(len(chosen), self._index, np.int64)}
      if content.mode == 'pairs':
        second = self._second[chosen]  # first == arange, so a start is its own position
        part['frames'] = np.stack([episode['image'][chosen], episode['image'][second]], axis=1)
        part['frame_offset'] = (second - chosen).astype(np.int32)
      else:
        if content.images:
          part['frames'] = episode['image'][chosen]
        if content.actions:
          part['action'] = episode['action'][chosen]
        for key in content.step_keys:
          part[key] = episode[key][chosen]
      parts.append(part)
    return concat(parts)


def concat(parts: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
  return {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}


# --- the mixture iterator --------------------------------------------------------------------------

class Mixture:
  """The fixed part of a mixture pipeline - its sources, sizes, block building and decoding - shared
  by a MixtureIterator and its builder thread (which must not keep the iterator alive)."""

  def __init__(self, sources: list[Source], *, content: Content, batch_size: int, seed: int, process_index: int,
               process_count: int, image_size: int, image_dtype: str, block_size: int, decode_threads: int,
               cycle_length: int, episode_end: str, max_samples_per_episode: int,
               action_normalization: str, autotune_ram_budget: int,
               step_key_specs: dict[str, tuple[tuple[int, ...], np.dtype]]):
    self.sources = sources
    self.content = content
    self.mode = content.mode
    self.batch_size = batch_size
    self.seed = seed
    self.process_index = process_index
    self.process_count = process_count
    self.image_size = image_size
    self.image_dtype = image_dtype
    self.block_size = block_size
    self.decode_threads = decode_threads
    self.cycle_length = cycle_length
    self.episode_end = episode_end
    self.max_samples_per_episode = max_samples_per_episode
    self.action_normalization = action_normalization
    self.autotune_ram_budget = autotune_ram_budget
    self.step_key_specs = step_key_specs
    self.probabilities = np.array([source.probability for source in sources])
    self.names = np.array([source.name.encode() for source in sources], dtype=object)
    self._normalizers = [self._normalizer(source) for source in sources]

  def new_streams(self) -> list[SampleStream]:
    return [SampleStream(source, content=self.content, seed=self.seed, cycle_length=self.cycle_length,
                         episode_end=self.episode_end, max_samples_per_episode=self.max_samples_per_episode)
            for source in self.sources]

  def build_block(self, block: int, streams: list[SampleStream]) -> dict[str, np.ndarray]:
    """Block `block` as columns: per-dataset counts from a multinomial draw, then one permutation."""
    counts = _seed(self.seed, self.process_index, block, 0).multinomial(self.block_size, self.probabilities)
    parts = []
    for source, stream, count in zip(self.sources, streams, counts):
      if count:
        part = stream.take(int(count))
        part['dataset_index'] = np.full(count, source.index, np.int32)
        parts.append(part)
    order = _seed(self.seed, self.process_index, block, 1).permutation(self.block_size)
    return {key: value[order] for key, value in concat(parts).items()}

  def _normalizer(self, source: Source):
    if not self.content.actions or self.action_normalization == 'none':
      return None
    action = source.statistics['action']
    mask = np.ones(7, bool)
    mask[-1] = False  # the gripper stays 0/1
    if self.action_normalization == 'normal':
      mean, std = np.asarray(action['mean'], np.float32), np.asarray(action['std'], np.float32)
      return lambda a: np.where(mask, (a - mean) / (std + 1e-8), a)
    low, high = np.asarray(action['q01'], np.float32), np.asarray(action['q99'], np.float32)
    scaled = lambda a: np.clip(2 * (a - low) / (high - low + 1e-8) - 1, -1, 1)
    return lambda a: np.where(mask & (high > low), scaled(a), np.where(mask, 0.0, a)).astype(np.float32)

  def encode_batch(self, columns: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The encoded batch handed to tf.data (actions normalised per dataset when configured)."""
    if self.content.actions:
      actions = columns['action'].astype(np.float32)
      for index, normalize in enumerate(self._normalizers):
        rows = columns['dataset_index'] == index
        if normalize is not None and rows.any():
          actions[rows] = normalize(actions[rows])
      columns = {**columns, 'action': actions}
    return columns

  def signature(self) -> dict[str, tf.TensorSpec]:
    batch = self.batch_size
    spec = {'instruction': tf.TensorSpec((batch,), tf.string),
            'episode_index': tf.TensorSpec((batch,), tf.int64),
            'dataset_index': tf.TensorSpec((batch,), tf.int32)}
    if self.content.images:
      spec['frames'] = tf.TensorSpec((batch, 2) if self.mode == 'pairs' else (batch,), tf.string)
    if self.mode == 'pairs':
      spec['frame_offset'] = tf.TensorSpec((batch,), tf.int32)
    if self.content.actions:
      spec['action'] = tf.TensorSpec((batch, 7), tf.float32)
    for key, (shape, dtype) in self.step_key_specs.items():
      spec[key] = tf.TensorSpec((batch, *shape), tf.as_dtype(dtype))
    return spec

  @property
  def image_name(self) -> str:
    return 'video' if self.mode == 'pairs' else 'image'

  def decode(self, example: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    """One encoded sample -> uint8 frames at image_size (resized only if stored at another size)."""
    if self.content.images:
      example[self.image_name] = pairs.decode_frames(example.pop('frames'), (self.image_size, self.image_size))
    return example


class MixtureIterator:
  """BatchIterator over a mixture; see the module docstring. Batches (local batch B):

  pairs: 'video' (B, 2, S, S, 3) uint8 (or float32 in [0, 1]), 'frame_offset' (B,) int32
  steps: 'image' (B, S, S, 3), 'action' (B, 7) float32 (standardised, optionally normalised) and the
         step keys (B, ...) as stored, as far as the Content asks for them
  both:  'instruction' (B,) bytes, 'dataset' (B,) bytes (name), 'dataset_index' (B,) int32,
         'episode_index' (B,) int64 (index of the episode in its dataset's split)
  """

  def __init__(self, mixture: Mixture):
    self.mixture = mixture
    # The position of the next sample to deliver.
    self._position = {'block': 0, 'offset': 0, 'streams': [s.state() for s in mixture.new_streams()]}
    self._run = None

  # --- data position -------------------------------------------------------------------------
  def _fingerprint(self) -> dict[str, Any]:
    m = self.mixture
    return {'version': STATE_VERSION, 'mode': m.mode, 'seed': m.seed, 'images': m.content.images, 'batch_size': m.batch_size,
            'block_size': m.block_size, 'process_index': m.process_index,
            'process_count': m.process_count, 'datasets': [source.name for source in m.sources],
            'frame_offsets': [source.frame_offset for source in m.sources]}

  def get_state(self) -> dict[str, Any]:
    return {**self._fingerprint(), 'position': self._position}

  def set_state(self, state: dict[str, Any]) -> None:
    for key, value in self._fingerprint().items():
      if state.get(key) != value:
        raise DataError(f'data state was saved with {key}={state.get(key)!r} but this pipeline has '
                        f'{key}={value!r}; the saved position does not apply')
    self.close()
    self._position = state['position']

  # --- iteration -----------------------------------------------------------------------------
  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self._run is None:
      self._run = _Run(self.mixture, self._position)
    batch, position = self._run.next()
    self._position = position
    return batch

  def close(self) -> None:
    if self._run is not None:
      self._run.stop()
      self._run = None

  def __del__(self):
    self.close()


class _Run:
  """One pass of the pipeline from a position: a builder thread makes blocks, a generator cuts them
  into encoded batches (recording the position after each), tf.data decodes them."""

  def __init__(self, mixture: Mixture, position: dict[str, Any]):
    self.mixture = mixture
    self.stopped = threading.Event()
    self.blocks = queue.Queue(maxsize=1)   # at most one block waits while one is being cut
    self.positions = collections.deque()
    self.start_offset = int(position['offset'])  # samples of the first block already delivered
    self.error = None
    self.builder = threading.Thread(target=self._build, args=(position,), daemon=True,
                                    name='lapa-mixture-builder')
    self.builder.start()
    _RUNS.add(self)
    dataset = tf.data.Dataset.from_generator(self._batches, output_signature=mixture.signature())
    dataset = dataset.unbatch().map(mixture.decode, num_parallel_calls=mixture.decode_threads, deterministic=True)
    dataset = dataset.batch(mixture.batch_size, drop_remainder=True)
    if mixture.image_dtype == 'float32' and mixture.content.images:
      dataset = dataset.map(lambda batch: pairs.to_float(batch, mixture.image_name))
    dataset = dataset.prefetch(2)
    options = tf.data.Options()
    options.deterministic = True
    options.autotune.ram_budget = mixture.autotune_ram_budget
    self.iterator = iter(dataset.with_options(options))

  def _put(self, item) -> bool:
    while not self.stopped.is_set():
      try:
        self.blocks.put(item, timeout=0.1)
        return True
      except queue.Full:
        continue
    return False

  def _build(self, position: dict[str, Any]) -> None:
    try:
      streams = self.mixture.new_streams()
      for stream, state in zip(streams, position['streams']):
        stream.restore(state)
      block, start_states = position['block'], position['streams']
      while not self.stopped.is_set():
        samples = self.mixture.build_block(block, streams)
        end_states = [stream.state() for stream in streams]
        if not self._put((block, samples, start_states, end_states)):
          return
        block, start_states = block + 1, end_states
    except BaseException as error:  # handed to the consumer thread, which raises it
      self._put(error)

  def _batches(self):
    mixture = self.mixture
    batch_size = mixture.batch_size
    current = None  # (block index, columns, stream states at its start, at its end)
    offset = self.start_offset
    pending, pending_size = [], 0
    while not self.stopped.is_set():
      if current is None or offset >= mixture.block_size:
        try:
          item = self.blocks.get(timeout=0.1)
        except queue.Empty:
          continue
        if isinstance(item, BaseException):
          self.error = item
          return
        if current is not None:
          offset = 0
        current = item
        continue
      take = min(batch_size - pending_size, mixture.block_size - offset)
      pending.append({key: value[offset:offset + take] for key, value in current[1].items()})
      pending_size += take
      offset += take
      if pending_size == batch_size:
        block, _, start_states, end_states = current
        if offset >= mixture.block_size:
          position = {'block': block + 1, 'offset': 0, 'streams': end_states}
        else:
          position = {'block': block, 'offset': offset, 'streams': start_states}
        self.positions.append(position)
        yield mixture.encode_batch(concat(pending))
        pending, pending_size = [], 0

  def next(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    try:
      batch = next(self.iterator)
    except (StopIteration, tf.errors.OutOfRangeError):
      if self.error is not None:
        raise self.error
      raise DataError('the mixture pipeline stopped unexpectedly') from None
    out = {key: value.numpy() for key, value in batch.items()}
    out['dataset'] = self.mixture.names[out['dataset_index']]
    return out, self.positions.popleft()

  def stop(self) -> None:
    self.stopped.set()
    self.iterator = None  # lets tf.data cancel the generator and the decode threads
    if self.builder is not threading.current_thread():
      self.builder.join(timeout=30)


@atexit.register
def _stop_runs() -> None:
  # A builder thread still inside TensorFlow when the interpreter exits aborts the process.
  for run in list(_RUNS):
    run.stop()


# --- construction ----------------------------------------------------------------------------------

def _plan(config, sources: list[Source], *, content: Content, image_size: int, batch_size: int,
          frame_bytes: list[float], epoch_samples: int) -> dict:
  """Buffer sizes and thread counts that keep the pipeline's buffers inside config.ram_budget_gb.

  Shares of the budget: decoded batches (four: two prefetched, one being assembled, one held by
  the caller; plus a uint8 one before the float conversion), decode threads 1/12 (each holds one
  sample in float32 while resizing), readers 1/6 (cycle_length x 3 episodes per dataset, every
  field as stored), tf.data autotuning 1/10, a reserve of 1/5 for allocator slack and copies, and
  the rest two shuffle blocks (one being cut into batches, the next being built), but no more
  than this process's samples of one epoch (`epoch_samples`): a block holding a small dataset many
  times over shuffles no better and only delays the first batch. The block size depends only on
  the config and the data - never on the machine - so a saved position stays valid on other hosts.
  TensorFlow's own memory (~0.5-1 GB) is not part of the budget.
  """
  budget = float(config.ram_budget_gb) * 2**30
  frames = content.frames
  pixels = batch_size * frames * image_size**2 * 3  # values in one batch of frames
  decoded_batches = 4 * pixels * (4 if config.image_dtype == 'float32' else 1)
  if config.image_dtype == 'float32':
    decoded_batches += pixels  # the uint8 batch before the conversion
  if decoded_batches > budget / 3:
    raise DataError(f'ram_budget_gb={config.ram_budget_gb} is too small for batches of {batch_size} x '
                    f'{frames} x {image_size}^2 {config.image_dtype} images; need at least '
                    f'{3 * decoded_batches / 2**30:.2f} GB')
  cpus = os.cpu_count() or 1
  decode_threads = min(config.decode_threads or cpus,
                       max(1, int(budget / 12 / max(1, frames * image_size**2 * 3 * 4))))
  episode_bytes = sum(oxe.episode_bytes(source.dataset, config.split) for source in sources)
  cycle = max(1, min(config.cycle_length, int(budget / 6 / max(1.0, 3 * episode_bytes))))
  probabilities = np.array([source.probability for source in sources])
  # + the other columns (instruction, step keys) and Python object overhead
  sample_bytes = float(np.dot(probabilities, frame_bytes)) * frames + 2000
  shuffle_share = budget * (1 - 1 / 12 - 1 / 6 - 1 / 10 - 1 / 5) - decoded_batches
  block = int(config.shuffle_buffer) or min(int(shuffle_share / (2 * sample_bytes)), max(batch_size, epoch_samples))
  if block < batch_size:
    raise DataError(f'ram_budget_gb={config.ram_budget_gb} leaves room for a shuffle block of {block} '
                    f'samples, fewer than batch_size {batch_size}; raise ram_budget_gb')
  return {'block_size': block, 'decode_threads': decode_threads, 'cycle_length': cycle,
          'read_threads': mixtures.allocate(config.read_threads or cpus, probabilities),
          'autotune_ram_budget': int(budget / 10), 'sample_bytes': sample_bytes}


def _probe(reader: oxe.EpisodeReader, segment: oxe.Segment) -> tuple[float, int]:
  """(mean encoded size of the primary image, steps) of the first readable episode of `segment`."""
  for episode in reader.episodes(segment):
    return float(np.mean([len(frame) for frame in episode['image']])), len(episode['image'])
  return 0.0, 0


def _epoch_samples(source: Source, content: Content, steps_per_episode: float, episode_end: str) -> int:
  """About how many samples one epoch of this process's slice of `source` holds."""
  dropped = source.frame_offset if content.mode == 'pairs' and episode_end == 'drop' else 0
  per_episode = steps_per_episode - dropped
  return int(sum(segment.size for segment in source.segments) * max(1.0, per_episode))


def _check_fields(config) -> None:
  for field, allowed in (('episode_end', pairs.EPISODE_ENDS), ('balance', mixtures.BALANCES),
                         ('on_corrupt', oxe.CORRUPT_POLICIES), ('action_normalization', NORMALIZATIONS),
                         ('image_dtype', pairs.IMAGE_DTYPES)):
    if config[field] not in allowed:
      raise DataError(f'data.{field} must be one of {allowed}, got {config[field]!r}')


def _needs_statistics(config, dataset_count: int) -> bool:
  return (config.balance == 'transitions' and dataset_count > 1) or config.action_normalization != 'none'


def dataset_statistics(config, *, progress: bool = True) -> dict[str, dict]:
  """{dataset name: statistics} that a pipeline over `config` needs (statistics.py; cached on disk).

  Multi-host runs call this on process 0 only and hand the result to every process's
  `build_sources(statistics=...)`, so that each dataset is read once, not once per host
  (lapa_jax.train.data does that).
  """
  _check_fields(config)
  opened = open_datasets(config)
  if not _needs_statistics(config, len(opened)):
    return {}
  return {dataset.spec.name: statistics.load_or_compute(
              dataset, config.split.split('[')[0], cache_dir=config.statistics_cache_dir or None,
              on_corrupt=config.on_corrupt, progress=progress)
          for dataset, _ in opened}


def dataset_actions(config, *, progress: bool = True) -> np.ndarray:
  """Every standardised action (steps, 7) float32 of config.split over the datasets of `config`, in
  file order: what equal-frequency action bins are fitted on (data/actions.py)."""
  import tqdm

  _check_fields(config)
  if config.action_normalization != 'none':
    raise DataError('data.action_normalization must be "none" where actions are binned: equal-frequency '
                    'bins already adapt to each dimension\'s scale')
  chunks = []
  for dataset, _ in open_datasets(config):
    if dataset.spec.transform is None:
      raise DataError(f'{dataset.spec.name} ({dataset.path}) has no actions to fit action bins on')
    reader = oxe.EpisodeReader(dataset, on_corrupt=config.on_corrupt)
    segments = reader.segments(config.split)
    with tqdm.tqdm(total=sum(s.size for s in segments), desc=f'actions {dataset.spec.name}', unit='episode',
                   disable=not progress) as bar:
      for segment in segments:
        for index, episode in enumerate(reader.episodes(segment)):
          finite = np.isfinite(episode['action'])
          if not finite.all():
            raise DataError(f'{segment.filename}: episode {index} has NaN or inf actions at {int((~finite).any(-1).sum())} '
                            f'step(s) (dimension(s) {np.flatnonzero(~finite.all(0)).tolist()} of the standardised 7); '
                            'fix or drop that episode before finetuning on it')
          chunks.append(episode['action'])
          bar.update(1)
  if not chunks:
    raise DataError(f'{config.path or config.mixture}: split {config.split!r} has no readable actions')
  return np.concatenate(chunks).astype(np.float32)


def build_sources(config, *, content: Content, process_index: int, process_count: int,
                  statistics_by_name: dict[str, dict] | None = None, progress: bool = True) -> list[Source]:
  """Opens and checks the datasets (see open_datasets); every check runs before any long work.

  `statistics_by_name` (dataset_statistics' result) saves reading the statistics here.
  """
  _check_fields(config)
  policy = config.missing_instruction or ('error' if content.mode == 'steps' and content.actions else 'empty')
  if policy not in INSTRUCTION_POLICIES:
    raise DataError(f'data.missing_instruction must be one of {INSTRUCTION_POLICIES}, got {policy!r}')
  offsets = _parse_offsets(config.frame_offsets)
  opened = open_datasets(config)
  unknown = set(offsets) - {dataset.spec.name for dataset, _ in opened} - {None}
  if unknown:
    raise DataError(f'data.frame_offsets names datasets not in the mixture: {", ".join(sorted(unknown))}')
  for dataset, _ in opened:
    spec = dataset.spec
    if spec.instruction_key is None and policy == 'error':
      raise DataError(f'{spec.name} ({dataset.path}) has no instructions but this pipeline is '
                      'language-conditioned; set data.missing_instruction="empty" to use empty strings')
    if content.actions and spec.transform is None:
      raise DataError(f'{spec.name} ({dataset.path}) has no actions, which this stage needs '
                      '(video without actions serves the LAQ and latent pretraining)')
  sources = []
  for index, (dataset, weight) in enumerate(opened):
    spec = dataset.spec
    reader = oxe.EpisodeReader(dataset, on_corrupt=config.on_corrupt, step_keys=content.step_keys)
    segments = reader.segments(config.split, process_index, process_count)
    sources.append(Source(index=index, dataset=dataset, reader=reader, segments=segments, probability=weight,
                          frame_offset=frame_offset(config, spec) if content.mode == 'pairs' else 0))
  if _needs_statistics(config, len(sources)):
    for source in sources:
      if statistics_by_name is not None and source.name in statistics_by_name:
        source.statistics = statistics_by_name[source.name]
      else:
        source.statistics = statistics.load_or_compute(
            source.dataset, config.split.split('[')[0], cache_dir=config.statistics_cache_dir or None,
            on_corrupt=config.on_corrupt, progress=progress)
      if config.action_normalization != 'none' and 'action' not in source.statistics:
        raise DataError(f'{source.name}: no action statistics to normalise with')
  if config.balance == 'transitions' and len(sources) > 1:
    sizes = [source.statistics['num_transitions'] for source in sources]
  elif config.balance == 'episodes':
    sizes = [source.dataset.builder.info.splits[config.split.split('[')[0]].num_examples for source in sources]
  else:
    sizes = None
  for source, probability in zip(sources, mixtures.proportions([s.probability for s in sources], sizes)):
    source.probability = float(probability)
  return sources


def _step_key_specs(sources: list[Source], step_keys: Sequence[str]) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
  """Shape and dtype of each step key, the same in every dataset of the mixture."""
  specs = {}
  for key in step_keys:
    found = {}
    for source in sources:
      feature = rlds.step_features(source.dataset.builder)[key]
      found[source.name] = (tuple(feature.shape), np.dtype(feature.np_dtype))
    if len(set(found.values())) > 1:
      raise DataError(f'step feature {key!r} differs between the datasets: '
                      + ', '.join(f'{name} {shape} {dtype}' for name, (shape, dtype) in found.items()))
    specs[key] = next(iter(found.values()))
  return specs


def mixture_iterator(config, *, content: Content, image_size: int, batch_size: int, seed: int = 0,
                     process_index: int = 0, process_count: int = 1,
                     statistics_by_name: dict[str, dict] | None = None, progress: bool = True) -> MixtureIterator:
  """A MixtureIterator over the datasets of `config` (see default_config) for one process."""
  if batch_size < 1:
    raise DataError(f'batch_size must be >= 1, got {batch_size}')
  if content.images and image_size < 1:
    raise DataError(f'image_size must be >= 1, got {image_size}')
  sources = build_sources(config, content=content, process_index=process_index, process_count=process_count,
                          statistics_by_name=statistics_by_name, progress=progress)
  frame_bytes, epoch_samples = [], 0
  for source in sources:
    if source.statistics:
      image_bytes = source.statistics['image_bytes_mean']
      steps = source.statistics['num_transitions'] / max(1, source.statistics['num_trajectories'])
    else:
      image_bytes, steps = _probe(source.reader, source.segments[0])
    frame_bytes.append(image_bytes if content.images else 0.0)
    epoch_samples += _epoch_samples(source, content, steps, config.episode_end)
  plan = _plan(config, sources, content=content, image_size=image_size, batch_size=batch_size,
               frame_bytes=frame_bytes, epoch_samples=epoch_samples)
  for source, threads in zip(sources, plan['read_threads']):
    source.reader.read_threads = threads
  _log.info('data %s: %s; plan %s', config.path or config.mixture,
            ', '.join(f'{s.name} p={s.probability:.3f} H={s.frame_offset}' for s in sources), plan)
  return MixtureIterator(Mixture(
      sources, content=content, batch_size=batch_size, seed=seed, process_index=process_index,
      process_count=process_count, image_size=int(image_size), image_dtype=config.image_dtype,
      block_size=plan['block_size'], decode_threads=plan['decode_threads'], cycle_length=plan['cycle_length'],
      episode_end=config.episode_end, max_samples_per_episode=int(config.max_samples_per_episode),
      action_normalization=config.action_normalization, autotune_ram_budget=plan['autotune_ram_budget'],
      step_key_specs=_step_key_specs(sources, content.step_keys)))


def pair_iterator(config, *, image_size: int, batch_size: int, **kwargs) -> MixtureIterator:
  """LAQ frame pairs: (x_t, x_{t+H_d}), H_d from each dataset's fps. kwargs: see mixture_iterator."""
  return mixture_iterator(config, content=PAIRS, image_size=image_size, batch_size=batch_size, **kwargs)


def frame_iterator(config, *, image_size: int, batch_size: int, **kwargs) -> MixtureIterator:
  """Single frames ('image') with their instructions, e.g. for the vision tokenizer; no actions needed."""
  return mixture_iterator(config, content=Content('steps'), image_size=image_size, batch_size=batch_size,
                          **kwargs)


def step_iterator(config, *, image_size: int = 0, batch_size: int, images: bool = True,
                  actions: bool = True, step_keys: Sequence[str] = (), **kwargs) -> MixtureIterator:
  """VLA step examples: current image (if `images`), instruction, standardised action (if `actions`)
  and step features such as a labelled dataset's 'latent_action' and 'vision_tokens'."""
  content = Content('steps', images=images, actions=actions, step_keys=tuple(step_keys))
  return mixture_iterator(config, content=content, image_size=image_size, batch_size=batch_size, **kwargs)
