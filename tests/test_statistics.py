"""Action/proprio statistics: values, and a cache keyed by content, not by path."""

import dataclasses
import os
import shutil

import numpy as np
import pytest

import oxe_schemas
from lapa_jax.data import oxe, statistics


@pytest.fixture
def viola_dir(tmp_path_factory):
  """A private copy of the synthetic viola dataset (the cache files are written next to it)."""
  root = tmp_path_factory.mktemp('stats')
  source = os.path.join(oxe_schemas.session_data_dir(tmp_path_factory), 'viola')
  shutil.copytree(source, os.path.join(root, 'data', 'viola'))
  return str(root)


def test_statistics_values(viola_dir):
  dataset = oxe.open_dataset(os.path.join(viola_dir, 'data'), 'viola')
  stats = statistics.load_or_compute(dataset, progress=False)
  lengths = [oxe_schemas.length(e) for e in range(6)]
  assert stats['num_trajectories'] == 6 and stats['num_transitions'] == sum(lengths)
  world_x = np.concatenate([0.01 * np.arange(n) for n in lengths])
  gripper = np.concatenate([oxe_schemas.expected_open(n) for n in lengths])
  action = stats['action']
  assert len(action['mean']) == 7 and set(action) == {'mean', 'std', 'min', 'max', 'q01', 'q99'}
  np.testing.assert_allclose(action['mean'][0], world_x.mean(), rtol=1e-5)
  np.testing.assert_allclose(action['std'][0], world_x.std(), rtol=1e-4)
  np.testing.assert_allclose([action['q01'][0], action['q99'][0]], np.quantile(world_x, [0.01, 0.99]), rtol=1e-5)
  np.testing.assert_allclose(action['mean'][6], gripper.mean(), rtol=1e-6)
  assert (action['min'][6], action['max'][6]) == (0.0, 1.0)
  assert len(stats['proprio']['mean']) == 8  # joint_states (7) + gripper_states (1)
  assert stats['image_bytes_mean'] > 0


def test_cache_is_keyed_by_content_not_path(viola_dir, monkeypatch):
  first = oxe.open_dataset(os.path.join(viola_dir, 'data'), 'viola')
  stats = statistics.load_or_compute(first, progress=False)
  cache_file = [n for n in os.listdir(first.path) if n.startswith('dataset_statistics_')]
  assert cache_file == [f'dataset_statistics_{stats["hash"]}.json']
  # Moved elsewhere: same hash, so the file found next to the data is used without reading it.
  shutil.move(os.path.join(viola_dir, 'data'), os.path.join(viola_dir, 'moved'))
  moved = oxe.open_dataset(os.path.join(viola_dir, 'moved'), 'viola')
  assert statistics.content_hash(moved, 'train') == stats['hash']
  monkeypatch.setattr(statistics, 'compute', lambda *a, **k: pytest.fail('statistics were recomputed'))
  assert statistics.load_or_compute(moved, progress=False) == stats
  monkeypatch.undo()
  # Another standardisation or another split is another hash.
  changed = dataclasses.replace(moved, spec=dataclasses.replace(moved.spec, subsample=2))
  assert statistics.content_hash(changed, 'train') != stats['hash']
  assert statistics.content_hash(moved, 'val') != stats['hash']


def test_read_only_data_goes_to_the_cache_dir(bridge_dir, tmp_path, monkeypatch):
  data_dir = str(tmp_path / 'data')
  oxe_schemas.copy_bridge(bridge_dir, data_dir)
  dataset = oxe.open_dataset(data_dir, 'bridge_dataset')
  write = statistics._write

  def read_only(path, stats):  # a data directory we may not write to (shared storage, gs://)
    if path.startswith(dataset.path):
      raise PermissionError(path)
    write(path, stats)

  monkeypatch.setattr(statistics, '_write', read_only)
  cache_dir = str(tmp_path / 'cache')
  stats = statistics.load_or_compute(dataset, cache_dir=cache_dir, progress=False)
  assert stats['num_trajectories'] == 25
  assert stats['num_transitions'] == 25 * 9  # bridge drops the last of its 10 steps
  assert os.listdir(os.path.join(cache_dir, 'bridge_dataset')) == [f'dataset_statistics_{stats["hash"]}.json']
  assert statistics.cached(dataset, cache_dir=cache_dir) == stats
  assert not any(n.startswith('dataset_statistics_') for n in os.listdir(dataset.path))
