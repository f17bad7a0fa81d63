"""Open and read RLDS datasets (Open-X layout) from local or gs:// directories, offline; write them.

    builder = open_builder('/data/oxe/bridge_dataset')        # or '.../bridge_dataset/1.0.0'
    image_keys(builder)                                      # ['observation/image_0', ...]
    ds = episodes(builder, 'train', process_index=0, process_count=2)
    write_dataset('/data/mine/1.0.0', name='mine', version='1.0.0', features=..., splits={'train': ...})

Datasets are opened with `tfds.builder_from_directory(<dir>/<name>/<version>)`, never by registered
name: on TFDS >= 4.9.4 the Open-X names are registered builders that fetch their metadata from GCS
and fail offline (tensorflow/datasets#5203). Episodes keep their images encoded (JPEG/PNG bytes) so
that callers can shuffle cheaply and decode only what they use.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Iterable, Mapping

import tensorflow as tf
import tensorflow_datasets as tfds

# The data pipeline runs on the host CPU; TF must not reserve accelerator memory that JAX needs.
try:
  tf.config.set_visible_devices([], 'GPU')
except RuntimeError:  # TF already initialised its devices; nothing left to hide.
  pass

REQUIRED_FILES = ('dataset_info.json', 'features.json')
STEPS = 'steps'


class DataError(ValueError):
  """Bad dataset input (path, split, key, offset); the message is one line naming what was expected."""


def resolve_version_dir(path: str | os.PathLike) -> str:
  """`<dir>/<name>/<version>` for `path`, which is that directory or its parent `<dir>/<name>`.

  For a parent directory the highest version found on disk is used (a version string like '1.0.0').
  """
  path = os.fspath(path).rstrip('/')
  if not tf.io.gfile.isdir(path):
    raise DataError(f'{path}: no such directory (expected an RLDS dataset <dir>/<name>/<version>)')
  names = tf.io.gfile.listdir(path)
  if not any(name in names for name in REQUIRED_FILES):
    versions = [n.rstrip('/') for n in names if tfds.core.Version.is_valid(n.rstrip('/'))]
    versions = [v for v in versions if tf.io.gfile.isdir(os.path.join(path, v))]
    if not versions:
      raise DataError(f'{path}: not a TFDS dataset (no dataset_info.json/features.json and no '
                      'version sub-directory such as 1.0.0)')
    path = os.path.join(path, max(versions, key=tfds.core.Version))
    names = tf.io.gfile.listdir(path)
  for required in REQUIRED_FILES:
    if required not in names:
      raise DataError(f'{path}: missing {required}; a TFDS dataset directory holds '
                      f'{" and ".join(REQUIRED_FILES)} next to its tfrecord shards')
  return path


def open_builder(path: str | os.PathLike) -> tfds.core.DatasetBuilder:
  """A read-only TFDS builder for the RLDS dataset at `path` (`<dir>/<name>[/<version>]`)."""
  version_dir = resolve_version_dir(path)
  try:
    builder = tfds.builder_from_directory(version_dir)
  except Exception as error:  # TFDS raises many types for corrupt metadata; report them alike.
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    raise DataError(f'{version_dir}: cannot read the TFDS metadata: {first_line}') from error
  features = builder.info.features
  if STEPS not in features or not isinstance(features[STEPS], tfds.features.Dataset):
    raise DataError(f'{version_dir}/features.json: not an RLDS dataset (expected a top-level '
                    f"'steps' sequence feature, found {sorted(features.keys())})")
  return builder


def _name(builder: tfds.core.DatasetBuilder) -> str:
  return os.fspath(builder.data_dir)


def check_split(builder: tfds.core.DatasetBuilder, split: str) -> int:
  """Raises DataError unless `split` (e.g. 'train', 'val[:50%]', 'train+val') names episodes.

  Returns the number of episodes in the split.
  """
  available = sorted(builder.info.splits.keys())
  try:
    count = builder.info.splits[split].num_examples
  except (KeyError, ValueError) as error:
    raise DataError(f'{_name(builder)}: unknown or invalid split {split!r} '
                    f'({str(error).splitlines()[0]}); available splits: {", ".join(available)}') from None
  if count <= 0:
    raise DataError(f'{_name(builder)}: split {split!r} has no episodes (empty dataset)')
  return count


def step_features(builder: tfds.core.DatasetBuilder) -> dict[str, tfds.features.FeatureConnector]:
  """Every leaf feature of one step, keyed by its '/'-joined path ('observation/image_0', 'action')."""
  leaves = {}

  def visit(feature, prefix):
    if isinstance(feature, tfds.features.FeaturesDict):
      for key in feature.keys():
        visit(feature[key], f'{prefix}{key}/')
    else:
      leaves[prefix.rstrip('/')] = feature

  visit(builder.info.features[STEPS].feature, '')
  return leaves


def image_keys(builder: tfds.core.DatasetBuilder) -> list[str]:
  """Paths of the 8-bit image features of a step, e.g. ['observation/image_0', 'observation/wrist']."""
  return sorted(key for key, feature in step_features(builder).items()
                if isinstance(feature, tfds.features.Image) and feature.tf_dtype == tf.uint8)


def check_image_key(builder: tfds.core.DatasetBuilder, image_key: str) -> tfds.features.Image:
  """The Image feature at `image_key`; DataError listing the available image keys otherwise."""
  available = image_keys(builder)
  if image_key not in available:
    raise DataError(f'{_name(builder)}: no image feature {image_key!r} in steps; available image keys: '
                    f'{", ".join(available) or "none"}')
  return step_features(builder)[image_key]


def dataset_fps(builder: tfds.core.DatasetBuilder) -> float | None:
  """Steps per second from the dataset's metadata.json ('fps'), None when it does not say.

  Open-X datasets do not record it (see the per-dataset table of the reference); lapa_jax's own
  writers do.
  """
  metadata = builder.info.metadata
  fps = metadata.get('fps') if metadata is not None else None
  return float(fps) if fps is not None else None


def get_path(tree: Mapping[str, Any], path: str):
  """`tree['a']['b']` for path 'a/b' (RLDS step fields are nested dicts). A key may itself contain
  '/' (kuka's 'observation' holds 'clip_function_input/base_pose_tool_reached')."""
  if path in tree:
    return tree[path]
  parts = path.split('/')
  for split_at in range(1, len(parts)):
    head = '/'.join(parts[:split_at])
    if head in tree and isinstance(tree[head], Mapping):
      try:
        return get_path(tree[head], '/'.join(parts[split_at:]))
      except KeyError:
        continue
  raise KeyError(path)


def process_split(split: str, process_index: int = 0, process_count: int = 1):
  """This process's disjoint, contiguous slice of `split` (by episode); all slices cover the split."""
  if not 0 <= process_index < process_count:
    raise DataError(f'process_index {process_index} is not in [0, process_count={process_count})')
  if process_count == 1:
    return split
  return tfds.even_splits(split, n=process_count)[process_index]


def episodes(builder: tfds.core.DatasetBuilder, split: str, *, process_index: int = 0,
             process_count: int = 1, shuffle_files_seed: int | None = None,
             sequential: bool = False) -> tf.data.Dataset:
  """Episodes of this process's slice of `split`, images still ENCODED.

  Each element is {'steps': {field: (time, ...) tensors}, ...episode-level features}: step fields are
  stacked over time (SkipDecoding), images are (time,) tf.string. Episodes come in file order, or in
  a file order shuffled with `shuffle_files_seed`, deterministically. TFDS reads 16 files at once,
  interleaving blocks of 16 episodes; `sequential=True` reads one after the other, so that the
  episodes of a split expression such as 'train[3:6]+train[0:3]' come exactly in its order.
  """
  check_split(builder, split)
  local_split = process_split(split, process_index, process_count)
  if builder.info.splits[local_split].num_examples <= 0:
    raise DataError(f'{_name(builder)}: split {split!r} has no episodes for process {process_index} '
                    f'of {process_count} (more processes than episodes)')
  read_config = tfds.ReadConfig(
      shuffle_seed=shuffle_files_seed,
      shuffle_reshuffle_each_iteration=False,
      # The caller shuffles and caches what it needs; TFDS' automatic cache of small datasets would
      # only hold every decoded-on-read episode in RAM a second time.
      try_autocache=False,
      skip_prefetch=True)
  if sequential:
    read_config = read_config.replace(interleave_cycle_length=1)
  dataset = builder.as_dataset(
      split=local_split,
      shuffle_files=shuffle_files_seed is not None,
      decoders={STEPS: tfds.decode.SkipDecoding()},
      read_config=read_config)
  options = tf.data.Options()
  options.deterministic = True
  return dataset.with_options(options)


SHARD_TEMPLATE = '{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_INDEX}'


def shard_path(version_dir: str, name: str, split: str, index: int) -> str:
  """Where shard `index` of `split` lives: the file name TFDS' SequentialWriter gives it."""
  return os.path.join(version_dir, f'{name}-{split}.tfrecord-{index:05d}')


def write_shard(path: str, features: tfds.features.FeaturesDict, episodes: Iterable[dict]) -> dict[str, int]:
  """Encodes `episodes` with `features` into the tfrecord file `path`, written under a temporary name
  and renamed when complete; returns {'episodes': count, 'bytes': serialised size}."""
  serializer = tfds.core.example_serializer.ExampleSerializer(features.get_serialized_info())
  temporary = f'{path}.incomplete-{os.getpid()}'
  count = size = 0
  with tf.io.TFRecordWriter(temporary) as writer:
    for episode in episodes:
      record = serializer.serialize_example(features.encode_example(episode))
      writer.write(record)
      count += 1
      size += len(record)
  os.replace(temporary, path)
  return {'episodes': count, 'bytes': size}


def write_info(version_dir: str, *, name: str, version: str, features: tfds.features.FeaturesDict,
               shards: Mapping[str, list[dict[str, int]]], description: str = '', metadata: dict | None = None) -> None:
  """dataset_info.json, features.json (and metadata.json) for the shards `write_shard` wrote, per split
  in index order, so that `tfds.builder_from_directory(version_dir)` reads them."""
  info = tfds.core.DatasetInfo(
      builder=tfds.core.DatasetIdentity(name=name, version=tfds.core.Version(version), data_dir=version_dir,
                                        module_name=''),
      description=description, features=features, metadata=tfds.core.MetadataDict(metadata or {}))
  info.set_file_format('tfrecord')
  info.set_splits(tfds.core.SplitDict([
      tfds.core.SplitInfo(
          name=split, shard_lengths=[shard['episodes'] for shard in split_shards],
          num_bytes=sum(shard['bytes'] for shard in split_shards),
          filename_template=tfds.core.ShardedFileTemplate(
              data_dir=version_dir, template=SHARD_TEMPLATE, dataset_name=name, split=split,
              filetype_suffix='tfrecord'))
      for split, split_shards in shards.items()]))
  info.write_to_directory(version_dir)


def write_dataset(version_dir: str | os.PathLike, *, name: str, version: str,
                  features: tfds.features.FeaturesDict, splits: Mapping[str, Iterable[dict]],
                  description: str = '', metadata: dict | Callable[[], dict] | None = None,
                  extra_files: Mapping[str, Any] | Callable[[], Mapping[str, Any]] | None = None,
                  episodes_per_shard: int = 100, progress: bool = True, total: int | None = None,
                  postfix: Callable[[dict], Mapping[str, Any]] | None = None) -> str:
  """Writes episodes as a TFDS/RLDS dataset at `version_dir` (`<data_dir>/<name>/<version>`).

  `features` is a FeaturesDict with a 'steps' Dataset; `splits` maps each split to its episodes,
  {'steps': [step dicts], ...episode fields}, as `features` encodes them (images as arrays or
  already-encoded bytes). They are written in the given order, `episodes_per_shard` per tfrecord
  shard (write_shard), into a temporary directory next to `version_dir` that is renamed when
  complete (and removed on failure). `metadata` (TFDS' metadata.json, read back as
  builder.info.metadata) and `extra_files` ({file name: JSON value}) may be functions called after
  the last episode, for what only the episodes tell (a video's fps). A tqdm bar counts the episodes
  (of `total`), showing `postfix(episode)`.
  """
  import itertools
  import json
  import shutil
  import tempfile

  import tqdm

  version_dir = os.fspath(version_dir).rstrip('/')
  if os.path.exists(version_dir):
    raise DataError(f'{version_dir}: already exists; remove it or choose another output directory')
  parent = os.path.dirname(version_dir)
  if os.path.exists(parent) and not os.path.isdir(parent):
    raise DataError(f'{parent}: exists and is not a directory')
  os.makedirs(parent, exist_ok=True)
  temp_dir = tempfile.mkdtemp(prefix=f'.{os.path.basename(version_dir)}.incomplete-', dir=parent)
  try:
    shards = {}
    with tqdm.tqdm(total=total, desc=f'write {name}', unit='episode', disable=not progress) as bar:

      def counted(episodes):
        for episode in episodes:
          yield episode
          if postfix is not None:
            bar.set_postfix(postfix(episode), refresh=False)
          bar.update(1)

      for split, episodes in splits.items():
        episodes, shards[split] = counted(iter(episodes)), []
        while True:  # one shard after the other, streaming the episodes
          path = shard_path(temp_dir, name, split, len(shards[split]))
          written = write_shard(path, features, itertools.islice(episodes, episodes_per_shard))
          if not written['episodes']:
            os.remove(path)
            break
          shards[split].append(written)
        if not shards[split]:
          raise DataError(f'{version_dir}: split {split!r} has no episodes')
    write_info(temp_dir, name=name, version=version, features=features, shards=shards, description=description,
               metadata=metadata() if callable(metadata) else metadata)
    extra_files = extra_files() if callable(extra_files) else extra_files or {}
    for file_name, content in extra_files.items():
      with open(os.path.join(temp_dir, file_name), 'w') as f:
        json.dump(content, f, indent=2)
    os.rename(temp_dir, version_dir)
  finally:
    shutil.rmtree(temp_dir, ignore_errors=True)
  return version_dir
