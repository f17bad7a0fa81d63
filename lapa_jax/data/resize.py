"""`lapa resize-dataset IN OUT --size 256`: a copy of an RLDS dataset with its camera images resized.

    lapa resize-dataset /data/oxe/kuka /data/oxe_256 --size 256     # -> /data/oxe_256/kuka/0.1.0

Every uint8 RGB image feature (or those given with --keys) is decoded, resized to SIZE x SIZE
(Lanczos; JPEG's DCT scaling first when it shrinks by 2x or more) and stored as JPEG; every other
field of every episode is copied byte for byte, depth images included. Resizing, not JPEG decoding,
dominates the cost of an input pipeline over raw Open-X (480x640 images), so doing it once offline
is the cheapest speed-up there is (Octo's and OpenVLA's 256x256 copies do the same).

Shards are processed in parallel and each is written under a temporary name and renamed when
complete, into OUT/<name>/<version>.incomplete; a rerun skips the shards already there. The
metadata (features.json with the new image shapes, dataset_info.json with the new sizes) is written
last and the directory renamed to OUT/<name>/<version>.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import copy
import io
import json
import os
import sys
from typing import Sequence

from PIL import Image

RESAMPLE = Image.Resampling.LANCZOS


class ResizeError(ValueError):
  """Bad resize-dataset input; one line naming the path and what was expected."""


def resize_image(encoded: bytes, size: int, quality: int) -> bytes:
  """JPEG bytes of the image `encoded` (JPEG/PNG) resized to size x size."""
  with Image.open(io.BytesIO(encoded)) as image:
    if image.format == 'JPEG':
      image.draft('RGB', (size, size))  # libjpeg decodes at 1/2, 1/4, 1/8 scale when that stays >= size
    image = image.convert('RGB')
    if image.size != (size, size):
      image = image.resize((size, size), RESAMPLE)
  buffer = io.BytesIO()
  image.save(buffer, format='JPEG', quality=quality)
  return buffer.getvalue()


def _image_feature_json(features_json: dict, key: str) -> dict:
  """The JSON node of step image feature `key` ('observation/image') inside features.json."""
  node = features_json['featuresDict']['features']['steps']['sequence']['feature']
  parts = key.split('/')
  while parts:
    children = node['featuresDict']['features']
    for take in range(len(parts), 0, -1):  # keys may contain '/' themselves
      name = '/'.join(parts[:take])
      if name in children:
        node, parts = children[name], parts[take:]
        break
    else:
      raise KeyError(key)
  return node


def resize_shard(source: str, target: str, keys: Sequence[str], size: int, quality: int) -> tuple[int, int]:
  """Writes `target` from shard `source` with the images at `keys` resized; returns (episodes, bytes)."""
  import tensorflow as tf

  tmp = target + '.tmp'
  episodes = num_bytes = 0
  with tf.io.TFRecordWriter(tmp) as writer:
    for record in tf.data.TFRecordDataset(source).as_numpy_iterator():
      example = tf.train.Example.FromString(record)
      for key in keys:
        values = example.features.feature[f'steps/{key}'].bytes_list.value
        resized = [resize_image(value, size, quality) for value in values]
        del values[:]
        values.extend(resized)
      record = example.SerializeToString()
      writer.write(record)
      episodes += 1
      num_bytes += len(record)
  os.replace(tmp, target)
  return episodes, num_bytes


def resize_dataset(source: str, out_dir: str, *, size: int, keys: Sequence[str] | None = None,
                   quality: int = 95, workers: int | None = None, progress: bool = True) -> str:
  """Writes the resized copy of the dataset at `source` to OUT/<name>/<version>; returns that path."""
  import tensorflow_datasets as tfds
  from tqdm import tqdm

  from lapa_jax.data import rlds

  if size < 1 or not 1 <= quality <= 100:
    raise ResizeError(f'--size must be >= 1 and --quality in [1, 100], got {size} and {quality}')
  version_dir = rlds.resolve_version_dir(source)
  builder = rlds.open_builder(version_dir)
  available = rlds.image_keys(builder)
  keys = list(keys) if keys else available
  unknown = [key for key in keys if key not in available]
  if unknown:
    raise ResizeError(f'{version_dir}: no uint8 image feature {", ".join(unknown)}; image keys: {", ".join(available)}')
  name_dir = os.path.basename(os.path.dirname(version_dir))
  target_dir = os.path.join(out_dir, name_dir, os.path.basename(version_dir))
  if os.path.exists(target_dir):
    raise ResizeError(f'{target_dir}: already exists; remove it or choose another OUT')
  work_dir = target_dir + '.incomplete'
  os.makedirs(work_dir, exist_ok=True)

  jobs = []  # (split, source shard, target shard)
  for split, info in builder.info.splits.items():
    for filename in info.filenames:
      jobs.append((split, os.path.join(version_dir, filename), os.path.join(work_dir, filename)))
  done = {job[2]: None for job in jobs if os.path.exists(job[2])}  # from an interrupted run

  def run(job):
    return job, resize_shard(job[1], job[2], keys, size, quality)

  todo = [job for job in jobs if job[2] not in done]
  with concurrent.futures.ThreadPoolExecutor(workers or os.cpu_count()) as pool:
    # Threads suffice: JPEG decode/resize/encode in PIL release the GIL.
    for _ in tqdm(pool.map(run, todo), total=len(todo), desc=f'resize {name_dir}',
                  unit='shard', disable=not progress):
      pass

  # Metadata last: the new image shapes and the new byte counts.
  with open(os.path.join(version_dir, 'features.json')) as f:
    features_json = json.load(f)
  for key in keys:
    node = _image_feature_json(features_json, key)
    node['image']['shape']['dimensions'] = [str(size), str(size), '3']
    node['image']['encodingFormat'] = 'jpeg'
  with open(os.path.join(version_dir, 'dataset_info.json')) as f:
    info_json = json.load(f)
  info_json = copy.deepcopy(info_json)
  for split_json in info_json.get('splits', []):
    files = builder.info.splits[split_json['name']].filenames
    split_json['numBytes'] = str(sum(os.path.getsize(os.path.join(work_dir, f)) for f in files))
  note = f'Images {", ".join(keys)} resized to {size}x{size} JPEG by lapa resize-dataset.'
  info_json['description'] = (info_json.get('description', '') + '\n\n' + note).strip()
  for name in os.listdir(version_dir):  # other metadata (lapa_spec.json, ...) is copied as it is
    path = os.path.join(version_dir, name)
    if os.path.isfile(path) and not name.startswith(('dataset_statistics_', 'features.json', 'dataset_info.json')) \
        and name not in {os.path.basename(job[1]) for job in jobs}:
      with open(path, 'rb') as src, open(os.path.join(work_dir, name), 'wb') as dst:
        dst.write(src.read())
  for name, content in (('features.json', features_json), ('dataset_info.json', info_json)):
    with open(os.path.join(work_dir, name + '.tmp'), 'w') as f:
      json.dump(content, f, indent=2)
    os.replace(os.path.join(work_dir, name + '.tmp'), os.path.join(work_dir, name))
  tfds.builder_from_directory(work_dir)  # fails loudly if the metadata does not load
  os.replace(work_dir, target_dir)
  return target_dir


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog='lapa resize-dataset', description=__doc__.split('\n\n')[0])
  parser.add_argument('source', help='dataset directory <dir>/<name>[/<version>]')
  parser.add_argument('out', help='output data directory; the copy goes to OUT/<name>/<version>')
  parser.add_argument('--size', type=int, default=256, help='output images are SIZE x SIZE (default 256)')
  parser.add_argument('--keys', help='comma-separated image keys (default: every uint8 RGB image)')
  parser.add_argument('--quality', type=int, default=95, help='JPEG quality (default 95)')
  parser.add_argument('--workers', type=int, help='shards processed at once (default: CPU count)')
  args = parser.parse_args(argv)
  from lapa_jax.data import rlds
  try:
    path = resize_dataset(args.source, args.out, size=args.size, quality=args.quality, workers=args.workers,
                          keys=[k for k in (args.keys or '').split(',') if k] or None)
  except (ResizeError, rlds.DataError) as error:
    print(f'lapa resize-dataset: {error}', file=sys.stderr)
    return 2
  print(path)
  return 0


if __name__ == '__main__':
  sys.exit(main())
