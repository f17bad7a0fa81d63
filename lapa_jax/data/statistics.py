"""Per-dataset statistics of standardised actions and proprio, computed once and cached as JSON.

    stats = statistics.load_or_compute(oxe.open_dataset('/data/oxe', 'taco_play'))
    stats['action']['q99'], stats['num_transitions']

One pass over the split (with a progress bar) gives, for 'action' and 'proprio' (when the dataset
has them), per-dimension mean, std, min, max, q01 and q99, plus the numbers of transitions and
trajectories and the mean encoded size of a primary image (used to size shuffle buffers).

The cache file `dataset_statistics_<hash>.json` lives in the dataset's version directory, or in
`<cache_dir>/<name>/` when that directory is read-only. The hash covers what determines the numbers:
dataset_info.json's name/version/splits (shard lengths and bytes), features.json, the split and the
registry's standardisation (its fields and transform source) - not the absolute path, so moving or
remounting the data does not trigger a recompute (Octo/OpenVLA hash `str(builder.info)`, which holds
the path).
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from typing import Any

import numpy as np
import tensorflow as tf

from lapa_jax.data import oxe

FORMAT = 1
QUANTILES = {'q01': 0.01, 'q99': 0.99}
DEFAULT_CACHE_DIR = os.path.join(os.path.expanduser('~'), '.cache', 'lapa_jax', 'statistics')


def cache_dir_default() -> str:
  return os.environ.get('LAPA_STATISTICS_DIR', DEFAULT_CACHE_DIR)


def _read_json(path: str) -> Any:
  with tf.io.gfile.GFile(path) as f:
    return json.load(f)


def content_hash(dataset: oxe.Dataset, split: str) -> str:
  """sha256 of the dataset's content description and standardisation (not of its location)."""
  info = _read_json(os.path.join(dataset.path, 'dataset_info.json'))
  splits = sorted((s['name'], list(s.get('shardLengths', [])), str(s.get('numBytes', '')))
                  for s in info.get('splits', []))
  payload = {
      'format': FORMAT,
      'dataset_info': {'name': info.get('name'), 'version': info.get('version'),
                       'fileFormat': info.get('fileFormat'), 'splits': splits},
      'features': _read_json(os.path.join(dataset.path, 'features.json')),
      'split': split,
      'standardisation': dataset.spec.description(),
  }
  return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def summarize(values: np.ndarray) -> dict[str, list[float]]:
  values = np.asarray(values, np.float64)
  out = {'mean': values.mean(0), 'std': values.std(0), 'min': values.min(0), 'max': values.max(0)}
  out.update({name: np.quantile(values, q, axis=0) for name, q in QUANTILES.items()})
  return {name: np.asarray(value, np.float64).tolist() for name, value in out.items()}


def compute(dataset: oxe.Dataset, split: str = 'train', *, on_corrupt: str = 'skip',
            progress: bool = True) -> dict[str, Any]:
  """Reads every episode of `split` once and returns the statistics (not cached)."""
  from tqdm import tqdm

  reader = oxe.EpisodeReader(dataset, on_corrupt=on_corrupt)
  segments = reader.segments(split)
  actions, proprios = [], []
  transitions = trajectories = image_bytes = 0
  bar = tqdm(total=sum(s.size for s in segments), desc=f'statistics {dataset.spec.name}', unit='episode',
             disable=not progress)
  with bar:
    for segment in segments:
      for episode in reader.episodes(segment):
        trajectories += 1
        transitions += len(episode['image'])
        image_bytes += sum(len(frame) for frame in episode['image'])
        if episode['action'] is not None:
          actions.append(episode['action'])
        if episode['proprio'] is not None:
          proprios.append(episode['proprio'])
        bar.update(1)
  if transitions == 0:
    raise oxe.DataError(f'{dataset.path}: split {split!r} has no readable steps')
  stats = {'dataset': dataset.spec.name, 'version': dataset.version, 'split': split, 'format': FORMAT,
           'num_transitions': transitions, 'num_trajectories': trajectories,
           'image_bytes_mean': image_bytes / transitions, 'corrupt_shards_skipped': reader.corrupt_segments}
  if actions:
    stats['action'] = summarize(np.concatenate(actions))
  if proprios:
    stats['proprio'] = summarize(np.concatenate(proprios))
  return stats


def _write(path: str, stats: dict) -> None:
  tf.io.gfile.makedirs(os.path.dirname(path))
  tmp = f'{path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}'  # several hosts may write at once
  with tf.io.gfile.GFile(tmp, 'w') as f:
    json.dump(stats, f, indent=1)
  tf.io.gfile.rename(tmp, path, overwrite=True)


def cache_paths(dataset: oxe.Dataset, split: str = 'train', cache_dir: str | None = None) -> list[str]:
  """Where the statistics file may be: next to the data, then in the cache directory."""
  name = f'dataset_statistics_{content_hash(dataset, split)}.json'
  info_name = dataset.builder.info.name
  return [os.path.join(dataset.path, name), os.path.join(cache_dir or cache_dir_default(), info_name, name)]


def load_or_compute(dataset: oxe.Dataset, split: str = 'train', *, cache_dir: str | None = None,
                    recompute: bool = False, on_corrupt: str = 'skip', progress: bool = True) -> dict[str, Any]:
  """Cached statistics of `dataset`, computing and caching them on first use."""
  paths = cache_paths(dataset, split, cache_dir)
  if not recompute:
    for path in paths:
      if tf.io.gfile.exists(path):
        return _read_json(path)
  stats = compute(dataset, split, on_corrupt=on_corrupt, progress=progress)
  stats['hash'] = os.path.basename(paths[0])[len('dataset_statistics_'):-len('.json')]
  try:
    _write(paths[0], stats)
  except (OSError, tf.errors.OpError):  # a read-only data directory (shared storage, gs://)
    _write(paths[1], stats)
  return stats


def cached(dataset: oxe.Dataset, split: str = 'train', cache_dir: str | None = None) -> dict[str, Any] | None:
  """The cached statistics if some file holds them, else None (never reads the data)."""
  for path in cache_paths(dataset, split, cache_dir):
    if tf.io.gfile.exists(path):
      return _read_json(path)
  return None
