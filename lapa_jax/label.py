"""The labelling job: every step of every episode gets its latent action and the VQGAN tokens of its frame.

    lapa label --laq LAQ_WORKDIR --tokenizer TOKENIZER_WORKDIR --out OUT --config.data.path=<dir>/<name>/<version>
    lapa label --laq W --tokenizer T --out OUT --config.data.data_dir=D --config.data.mixture=lapa_openx

For each dataset it writes `OUT/<name>/<version>/`, an RLDS dataset with the same episodes (the
standardised ones: primary camera, instruction, 7-D action if the data has actions) plus two step
features, `latent_action` (code_seq_len,) int32, the LAQ codes of (x_t, x_{t+H}) (H: the dataset's
LAQ window, clamped to the last step at the end of an episode, as the official labelling does), and
`vision_tokens` (tokens_per_image,) int32, the VQGAN codes of x_t. `lapa_spec.json` describes it
and `lapa_labels.json` records what labelled it; `tfds.builder_from_directory` and `lapa
inspect-data` open it, and the latent-pretraining stage reads it.

Only the LAQ's encoder and quantizer run (no decoder), jitted, the batch sharded over this
process's devices; every process labels its own shards (shard i goes to process i mod count), so
hosts never wait for each other until the end. Each output shard corresponds to one source shard;
it is written under a temporary name and renamed when complete, so a restarted job skips finished
shards. The dataset directory is renamed from `<version>.incomplete` when every shard is done.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
import sys
import time
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm

from lapa_jax import checkpoint
from lapa_jax import config as config_lib
from lapa_jax import sharding
from lapa_jax.data import oxe, pairs, pipelines, rlds
from lapa_jax.laq_infer import load_laq
from lapa_jax.train import data as data_lib
from lapa_jax import vision_tokenizer

LABELS_FILE = 'lapa_labels.json'
INCOMPLETE = '.incomplete'
DONE = '.done.json'  # beside a finished shard: its episode count and bytes


def default_config() -> ml_collections.ConfigDict:
  """`lapa label` settings; any field can be set with --config.<field>=<value>."""
  return ml_collections.ConfigDict(dict(
      data=pipelines.default_config(),  # the datasets to label (path, or mixture + data_dir)
      splits='',                        # comma-separated splits; '' = every split of each dataset
      batch_size=256,                   # frame pairs per jitted call on this process
      mesh_dim='1,-1,1',                # over this process's devices
      resize=False,                     # frames stored at another size than the models': resize, or error
      laq_step=-1, tokenizer_step=-1,   # checkpoint steps (-1: the latest)
  ))


# ----- The models ------------------------------------------------------------------------------

class Labeller:
  """The LAQ encoder + quantizer and the VQGAN encoder, jitted over this process's devices.

  `label(video, images)`: video (batch, 2, S, S, 3) uint8 pairs (x_t, x_{t+H}), images (batch, R, R, 3)
  uint8 frames x_t -> (latent_action (batch, code_seq_len), vision_tokens (batch, tokens)) int32
  device arrays, dispatched asynchronously.
  """

  def __init__(self, laq_workdir: str, tokenizer_workdir: str, *, batch_size: int, mesh_dim: str = '1,-1,1',
               laq_step: int | None = None, tokenizer_step: int | None = None):
    self.mesh = sharding.make_mesh(mesh_dim, jax.local_devices())
    devices = sharding.data_parallel_size(self.mesh)
    if batch_size < 1 or batch_size % devices:
      raise ValueError(f'config field batch_size: {batch_size} is not a positive multiple of the {devices} '
                       f'data-parallel devices of this process')
    self.batch_size = batch_size
    self.laq_workdir, self.tokenizer_workdir = laq_workdir, tokenizer_workdir
    self.laq_config, self.laq, self.laq_params = load_laq(laq_workdir, self.mesh, laq_step)
    if self.laq_config.model.channels != 3:
      raise ValueError(f'{laq_workdir}: the LAQ reads {self.laq_config.model.channels} channels; labelling reads RGB')
    self.vqgan_config, self.vqgan, self.vqgan_params = vision_tokenizer.load_vqgan(
        tokenizer_workdir, tokenizer_step, mesh=self.mesh)
    self.laq_step = checkpoint.latest_step(laq_workdir) if laq_step is None else laq_step
    self.tokenizer_step = checkpoint.latest_step(tokenizer_workdir) if tokenizer_step is None else tokenizer_step
    self._video_sharding = sharding.batch_sharding(self.mesh, 5)
    self._image_sharding = sharding.batch_sharding(self.mesh, 4)
    self._label = jax.jit(self._label_batch)

  @property
  def image_size(self) -> int:
    return int(self.laq_config.model.image_size)

  @property
  def resolution(self) -> int:
    return int(self.vqgan_config.resolution)

  @property
  def code_seq_len(self) -> int:
    return int(self.laq_config.model.code_seq_len)

  @property
  def tokens_per_image(self) -> int:
    return int(self.vqgan_config.tokens_per_image)

  def _label_batch(self, laq_params, vqgan_params, video, images):
    video = video.astype(jnp.float32) / 255.0
    codes = self.laq.apply({'params': laq_params}, video, method=self.laq.codes)
    tokens = self.vqgan.apply({'params': vqgan_params}, images.astype(jnp.float32) / 255.0, method=self.vqgan.encode)
    return codes, tokens.reshape(tokens.shape[0], -1)

  def label(self, video: np.ndarray, images: np.ndarray) -> tuple[jax.Array, jax.Array]:
    with sharding.use_mesh(self.mesh):
      return self._label(self.laq_params, self.vqgan_params, jax.device_put(video, self._video_sharding),
                         jax.device_put(images, self._image_sharding))


# ----- Packing the steps of episodes into batches -------------------------------------------------

@dataclasses.dataclass
class _Pending:
  episode: dict[str, Any]
  codes: np.ndarray      # (steps, code_seq_len), filled as batches return
  tokens: np.ndarray     # (steps, tokens)
  missing: int           # steps not labelled yet


class _Batcher:
  """Packs the steps of consecutive episodes into full batches; keeps one batch in flight, so the
  host decodes and packs the next batch while the devices label this one. Episodes come out in order."""

  def __init__(self, labeller: Labeller):
    self.labeller = labeller
    self.queue: collections.deque[_Pending] = collections.deque()
    self.rows: list[tuple[_Pending, int, int]] = []   # (episode, first step, count) of the next batch
    self.video: list[np.ndarray] = []
    self.images: list[np.ndarray] = []
    self.filled = 0
    self.in_flight = None

  def add(self, episode: dict[str, Any], video: np.ndarray, images: np.ndarray) -> Iterator[dict[str, Any]]:
    """video (steps, 2, S, S, 3) and images (steps, R, R, 3) of one episode; yields finished episodes."""
    steps = len(video)
    pending = _Pending(episode, np.zeros((steps, self.labeller.code_seq_len), np.int32),
                       np.zeros((steps, self.labeller.tokens_per_image), np.int32), steps)
    self.queue.append(pending)
    start = 0
    while start < steps:
      take = min(steps - start, self.labeller.batch_size - self.filled)
      self.rows.append((pending, start, take))
      self.video.append(video[start:start + take])
      self.images.append(images[start:start + take])
      self.filled += take
      start += take
      if self.filled == self.labeller.batch_size:
        yield from self._dispatch()
    yield from self._finished()

  def flush(self) -> Iterator[dict[str, Any]]:
    if self.filled:
      yield from self._dispatch()
    yield from self._collect()
    yield from self._finished()

  def _dispatch(self) -> Iterator[dict[str, Any]]:
    video, images = np.concatenate(self.video), np.concatenate(self.images)
    padding = self.labeller.batch_size - len(video)  # the last batch: one compiled shape for all
    if padding:
      video = np.concatenate([video, np.zeros((padding, *video.shape[1:]), video.dtype)])
      images = np.concatenate([images, np.zeros((padding, *images.shape[1:]), images.dtype)])
    outputs = self.labeller.label(video, images)
    yield from self._collect()
    self.in_flight = (self.rows, outputs)
    self.rows, self.video, self.images, self.filled = [], [], [], 0

  def _collect(self) -> Iterator[dict[str, Any]]:
    if self.in_flight is None:
      return
    rows, (codes, tokens) = self.in_flight
    self.in_flight = None
    codes, tokens = np.asarray(codes), np.asarray(tokens)
    offset = 0
    for pending, start, count in rows:
      pending.codes[start:start + count] = codes[offset:offset + count]
      pending.tokens[start:start + count] = tokens[offset:offset + count]
      pending.missing -= count
      offset += count
    yield from self._finished()

  def _finished(self) -> Iterator[dict[str, Any]]:
    while self.queue and self.queue[0].missing == 0:
      pending = self.queue.popleft()
      yield {**pending.episode, 'latent_action': pending.codes, 'vision_tokens': pending.tokens}


# ----- One dataset ------------------------------------------------------------------------------

def _features(dataset: oxe.Dataset, labeller: Labeller):
  import tensorflow_datasets as tfds

  image = rlds.step_features(dataset.builder)[dataset.spec.image_key]
  step = {
      'observation': tfds.features.FeaturesDict({'image': tfds.features.Image(
          shape=image.shape, dtype=np.uint8, encoding_format=image.encoding_format,
          doc=f'{dataset.spec.image_key} of the source dataset, as stored.')}),
      'language_instruction': tfds.features.Text(doc='The instruction ("" if the source has none).'),
      'latent_action': tfds.features.Tensor(
          shape=(labeller.code_seq_len,), dtype=np.int32, doc='LAQ codes of (x_t, x_{t+H}).'),
      'vision_tokens': tfds.features.Tensor(
          shape=(labeller.tokens_per_image,), dtype=np.int32, doc='VQGAN codes of x_t, row-major.'),
      'is_first': tfds.features.Scalar(np.bool_),
      'is_last': tfds.features.Scalar(np.bool_)}
  if dataset.spec.transform is not None:
    step['action'] = tfds.features.Tensor(
        shape=(7,), dtype=np.float32, doc='Standardised [dxyz, drotation, gripper (1 open)].')
  return tfds.features.FeaturesDict({
      'steps': tfds.features.Dataset(step),
      'episode_metadata': tfds.features.FeaturesDict({
          'source_index': tfds.features.Scalar(np.int64, doc='Index of the episode in the source split.')})})


def _check_image_size(dataset: oxe.Dataset, labeller: Labeller, resize: bool) -> None:
  shape = rlds.step_features(dataset.builder)[dataset.spec.image_key].shape
  wanted = {(labeller.image_size, labeller.image_size): f'the LAQ in {labeller.laq_workdir}',
            (labeller.resolution, labeller.resolution): f'the vision tokenizer in {labeller.tokenizer_workdir}'}
  stored = tuple(shape[:2])
  for size, model in wanted.items():
    if not resize and None not in stored and stored != size:
      raise pipelines.DataError(
          f'{dataset.path}: {dataset.spec.image_key} holds {stored[0]}x{stored[1]} images but {model} reads '
          f'{size[0]}x{size[1]}; pass --config.resize=true to resize them (bilinear, antialiased, as training did)')


def _decoder(labeller: Labeller):
  """tf.data map: the episode's frames decoded once, at the LAQ's and at the tokenizer's size."""
  import tensorflow as tf

  sizes = {'laq_frames': (labeller.image_size,) * 2, 'vqgan_frames': (labeller.resolution,) * 2}

  def decode(fields):
    frames = tf.map_fn(pairs.decode_image, fields['image'], fn_output_signature=tf.TensorSpec([None, None, 3], tf.uint8))
    fields = dict(fields)
    for name, size in sizes.items():
      fields[name] = pairs.resize_frames(frames, size)
    return fields

  return decode


class _Progress:
  """Episodes done (with an ETA) and frames per second, on one bar."""

  def __init__(self, total: int, name: str, enabled: bool):
    self.bar = tqdm.tqdm(total=total, desc=f'label {name}', unit='episode', disable=not enabled, dynamic_ncols=True)
    self.frames, self.started = 0, time.perf_counter()

  def episode_done(self, steps: int) -> None:
    self.frames += steps
    rate = self.frames / max(time.perf_counter() - self.started, 1e-9)
    self.bar.set_postfix(frames_per_second=f'{rate:.1f}', refresh=False)
    self.bar.update(1)


def _labelled_episodes(reader: oxe.EpisodeReader, segment: oxe.Segment, labeller: Labeller, frame_offset: int,
                       progress: _Progress) -> Iterator[dict[str, Any]]:
  """The episodes of `segment` as the labelled dataset's examples (per-step columns), in order."""
  batcher = _Batcher(labeller)
  raw_episodes = reader.read(segment.split(), decode=_decoder(labeller))
  index = segment.start
  every = reader.spec.subsample
  while True:
    try:
      raw = next(raw_episodes)
    except StopIteration:
      break
    except oxe.READ_ERRORS as error:
      reader.corrupt(segment, index - segment.start, error)
      break
    episode = reader.standardize(raw)
    steps = len(episode['image'])
    laq_frames = raw['laq_frames'][::every][:steps]
    first, second = pairs.pair_indices(steps, frame_offset, 'clamp')
    video = np.stack([laq_frames[first], laq_frames[second]], axis=1)
    example = {'steps': {
        'observation': {'image': list(episode['image'])},
        'language_instruction': list(episode['instruction']),
        'is_first': np.arange(steps) == 0, 'is_last': np.arange(steps) == steps - 1},
        'episode_metadata': {'source_index': index}}
    if episode['action'] is not None:
      example['steps']['action'] = episode['action']
    index += 1
    for finished in batcher.add(example, video, raw['vqgan_frames'][::every][:steps]):
      yield _with_labels(finished, progress)
  for finished in batcher.flush():
    yield _with_labels(finished, progress)


def _with_labels(example: dict[str, Any], progress: _Progress) -> dict[str, Any]:
  steps = dict(example['steps'], latent_action=example.pop('latent_action'),
               vision_tokens=example.pop('vision_tokens'))
  progress.episode_done(len(steps['is_first']))
  return {'steps': steps, 'episode_metadata': example['episode_metadata']}


def _splits(dataset: oxe.Dataset, requested: str) -> list[str]:
  available = list(dataset.builder.info.splits.keys())
  if not requested:
    return available
  splits = [split.strip() for split in requested.split(',') if split.strip()]
  unknown = [split for split in splits if split not in available]
  if unknown:
    raise pipelines.DataError(f'{dataset.path}: no split {unknown[0]!r} (config field splits); '
                              f'available: {", ".join(available)}')
  return splits


def label_dataset(dataset: oxe.Dataset, labeller: Labeller, out_dir: str, config: ml_collections.ConfigDict, *,
                  progress: bool = True) -> str:
  """Labels `dataset` into `out_dir/<name>/<version>` (this process's shards; process 0 finishes it)."""
  name, version = dataset.builder.info.name, dataset.version
  final_dir = os.path.join(out_dir, name, version)
  if os.path.isdir(final_dir):
    if jax.process_index() == 0:
      print(f'{final_dir}: already labelled, skipping')
    return final_dir
  _check_image_size(dataset, labeller, config.resize)
  work_dir = final_dir + INCOMPLETE
  os.makedirs(work_dir, exist_ok=True)
  spec = dataset.spec
  frame_offset = pipelines.frame_offset(config.data, spec)
  features = _features(dataset, labeller)
  reader = oxe.EpisodeReader(dataset, on_corrupt=config.data.on_corrupt)
  splits = _splits(dataset, config.splits)
  todo = []
  for split in splits:
    for index, segment in enumerate(oxe.segments(dataset.builder, split)):
      path = rlds.shard_path(work_dir, name, split, index)
      if index % jax.process_count() == jax.process_index() and not os.path.exists(path + DONE):
        todo.append((split, index, segment, path))
  bar = _Progress(sum(segment.size for _, _, segment, _ in todo), name, progress)
  with bar.bar:
    for split, index, segment, path in todo:
      written = rlds.write_shard(path, features, _labelled_episodes(reader, segment, labeller, frame_offset, bar))
      with open(path + DONE + '.tmp', 'w') as f:
        json.dump(written, f)
      os.replace(path + DONE + '.tmp', path + DONE)
  data_lib.barrier(f'label {name}')
  if jax.process_index() == 0:
    _finish(dataset, labeller, work_dir, final_dir, features, splits, frame_offset)
  data_lib.barrier(f'label {name} finished')
  return final_dir


def _finish(dataset, labeller, work_dir, final_dir, features, splits, frame_offset) -> None:
  name, version = dataset.builder.info.name, dataset.version
  shards = {}
  for split in splits:
    shards[split] = []
    for index in range(len(oxe.segments(dataset.builder, split))):
      path = rlds.shard_path(work_dir, name, split, index)
      with open(path + DONE) as f:
        shards[split].append(json.load(f))
  for split, split_shards in list(shards.items()):  # a shard that was corrupt from its first episode
    for index, shard in enumerate(split_shards):
      if not shard['episodes']:
        raise pipelines.DataError(f'{dataset.path}: shard {index} of split {split} has no readable episode; '
                                  'remove it from the source (or its split from config field splits)')
  spec = oxe.spec_to_dict(dataclasses.replace(
      dataset.spec, subsample=1, fps=dataset.spec.effective_fps, image_key='observation/image',
      instruction_key='language_instruction' if dataset.spec.instruction_key else None, wrist_image_key=None,
      transform=None, fields=(), action_layout=None))
  spec['action'] = {'key': 'action'} if dataset.spec.transform is not None else None
  labels = {
      'source': {'path': dataset.path, 'name': name, 'version': version},
      'frame_offset': frame_offset, 'episode_end': 'clamp',
      'laq': {'workdir': os.path.abspath(labeller.laq_workdir), 'step': labeller.laq_step,
              'image_size': labeller.image_size, 'codebook_size': int(labeller.laq_config.model.codebook_size),
              'code_seq_len': labeller.code_seq_len},
      'vision_tokenizer': {'workdir': os.path.abspath(labeller.tokenizer_workdir), 'step': labeller.tokenizer_step,
                           'resolution': labeller.resolution, 'codebook_size': int(labeller.vqgan_config.codebook_size),
                           'tokens_per_image': labeller.tokens_per_image},
  }
  rlds.write_info(work_dir, name=name, version=version, features=features, shards=shards,
                  description=f'{name} {version} with LAQ latent actions and VQGAN tokens (lapa label).',
                  metadata={'fps': spec['fps']})
  for file_name, content in ((oxe.SPEC_FILE, spec), (LABELS_FILE, labels)):
    with open(os.path.join(work_dir, file_name), 'w') as f:
      json.dump(content, f, indent=2)
  for file_name in os.listdir(work_dir):  # progress records, and shards a crash left half-written
    if file_name.endswith(DONE) or '.incomplete-' in file_name:
      os.remove(os.path.join(work_dir, file_name))
  os.rename(work_dir, final_dir)


def read_labels(version_dir: str) -> dict[str, Any]:
  """The lapa_labels.json of a labelled dataset; a one-line error for an unlabelled one."""
  path = os.path.join(version_dir, LABELS_FILE)
  if not os.path.isfile(path):
    raise pipelines.DataError(f'{version_dir}: no {LABELS_FILE}; label the dataset first (lapa label)')
  with open(path) as f:
    return json.load(f)


def main(argv: list[str]) -> int:
  overrides, rest = config_lib.split_overrides(argv)
  parser = argparse.ArgumentParser(
      prog='lapa label', description='Latent actions (LAQ) and vision tokens (VQGAN) for every step of a '
      'dataset or mixture, written as new RLDS datasets OUT/<name>/<version>; resumable per shard.',
      epilog='Settings (lapa_jax/label.py default_config) are set with --config.<field>=<value>, e.g. '
             '--config.data.path=DIR, --config.batch_size=512, --config.resize=true.')
  parser.add_argument('--laq', required=True, help='LAQ workdir (lapa train configs/laq.py, or lapa convert official-laq)')
  parser.add_argument('--tokenizer', required=True, help='vision tokenizer workdir (lapa train configs/tokenizer.py, '
                      'or lapa convert lwm-vqgan)')
  parser.add_argument('--out', required=True, help='directory for the labelled datasets')
  args = parser.parse_args(rest)
  try:
    config = default_config()
    for item in overrides:
      dotted, _, text = item[len('--config.'):].partition('=')
      config_lib.override(config, dotted, text)
    opened = pipelines.open_datasets(config.data)
    labeller = Labeller(args.laq, args.tokenizer, batch_size=config.batch_size, mesh_dim=config.mesh_dim,
                        laq_step=None if config.laq_step < 0 else config.laq_step,
                        tokenizer_step=None if config.tokenizer_step < 0 else config.tokenizer_step)
    for dataset, _ in opened:
      print(label_dataset(dataset, labeller, args.out, config))
  except (FileNotFoundError, KeyError, ValueError) as error:
    print(f'lapa label: error: {error.args[0] if isinstance(error, KeyError) else error}', file=sys.stderr)
    return 2
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
