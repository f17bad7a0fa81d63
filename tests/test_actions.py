"""Equal-frequency action bins: bin populations, exact discrete round trips, errors, JSON."""

import json
import os

import numpy as np
import pytest

from lapa_jax.data import actions


def _bin_of(bins, values, dim):
  """(n,) bin index of each value, computed independently of encode (by comparing with the edges)."""
  edges = bins.edges[dim]
  inside = (values[:, None] >= edges[None, :-1]) & (values[:, None] < edges[None, 1:])
  inside[:, -1] |= values >= edges[-1]
  inside[:, 0] |= values < edges[0]
  assert np.all(inside.sum(axis=1) == 1)
  return np.argmax(inside, axis=1)


def test_equal_frequency_on_skewed_data():
  rng = np.random.default_rng(0)
  data = np.stack([rng.exponential(1.0, 20000), rng.normal(0, 3, 20000) ** 3], axis=1).astype(np.float32)
  bins = actions.fit(data, num_bins=50)
  assert bins.num_bins == (50, 50) and bins.vocab_size == 50
  ids = bins.encode(data)
  for dim in range(2):
    counts = np.bincount(ids[:, dim], minlength=50)
    np.testing.assert_array_equal(counts, bins.counts[dim])
    assert counts.min() >= 380 and counts.max() <= 420  # 20000 / 50 = 400 each
    np.testing.assert_array_equal(ids[:, dim], _bin_of(bins, data[:, dim].astype(np.float64), dim))
  # Equal frequency, not equal width: the exponential's bins widen along its tail.
  widths = bins.bin_widths()[0]
  assert widths[-2] > 20 * widths[0]


def test_error_within_bin_width():
  rng = np.random.default_rng(1)
  data = np.stack([rng.uniform(-1, 1, 5000), rng.lognormal(0, 1, 5000), rng.normal(0, 0.01, 5000)], axis=1)
  bins = actions.fit(data, num_bins=32)
  ids = bins.encode(data)
  assert ids.dtype == np.int32 and bins.decode(ids).dtype == np.float32
  decoded = bins.decode(ids).astype(np.float64)
  for dim in range(3):
    index = _bin_of(bins, data[:, dim], dim)
    width = bins.bin_widths()[dim][index]
    error = np.abs(decoded[:, dim] - data[:, dim])
    assert np.all(error <= width * (1 + 1e-6) + 1e-7)
    assert np.all(error <= bins.max_error()[dim] * (1 + 1e-6) + 1e-7)
    # Each value is the median of its bin's training values, so it lies inside the bin.
    medians = [np.median(data[index == b, dim]) for b in range(bins.num_bins[dim])]
    np.testing.assert_allclose(bins.values[dim], medians, rtol=0, atol=0)
    low, high = bins.edges[dim][:-1], bins.edges[dim][1:]
    assert np.all(bins.values[dim] >= low) and np.all(bins.values[dim] <= high)
  # Binning is informative: the decoded values track the data far better than a constant would.
  assert np.mean(np.abs(decoded - data)) < 0.1 * np.mean(np.abs(data - np.median(data, axis=0)))


def test_repeated_values_merge_bins():
  rng = np.random.default_rng(2)
  data = rng.normal(0, 1, (5000, 1))
  data[rng.random(5000) < 0.6] = 0.0
  bins = actions.fit(data, num_bins=64)
  assert 20 < bins.num_bins[0] < 64
  ids = bins.encode(data)[:, 0]
  zero_ids = np.unique(ids[data[:, 0] == 0])
  assert zero_ids.size == 1
  assert bins.counts[0][zero_ids[0]] >= np.sum(data == 0)
  assert bins.decode(bins.encode(np.zeros((3, 1)))).ravel().tolist() == [0.0, 0.0, 0.0]
  assert np.all(np.diff(bins.edges[0]) > 0)


def test_constant_dimension_has_one_bin():
  data = np.stack([np.linspace(0, 1, 1000), np.full(1000, 0.3, np.float32)], axis=1).astype(np.float32)
  bins = actions.fit(data)
  assert bins.num_bins[1] == 1 and bins.counts[1].tolist() == [1000]
  ids = bins.encode(data)
  assert np.all(ids[:, 1] == 0)
  assert np.all(bins.decode(ids)[:, 1] == np.float32(0.3))
  assert np.all(bins.encode(np.array([[0.5, -5.0], [0.5, 5.0]]))[:, 1] == 0)


@pytest.mark.parametrize('low,high', [(0.0, 1.0), (-1.0, 1.0), (0.0, 0.5), (1.0, 2.0)])
def test_binary_gripper_round_trips(low, high):
  rng = np.random.default_rng(3)
  gripper = np.where(rng.random(2000) < 0.8, high, low).astype(np.float32)  # mostly one value
  data = np.stack([rng.normal(size=2000), gripper], axis=1).astype(np.float32)
  bins = actions.fit(data, num_bins=256)
  assert bins.num_bins[1] == 2 and bins.values[1].tolist() == [low, high]
  assert bins.edges[1][1] == (low + high) / 2
  ids = bins.encode(data)[:, 1]
  assert np.array_equal(ids, (gripper == high).astype(np.int32))
  decoded = bins.decode(bins.encode(data))[:, 1]
  np.testing.assert_array_equal(decoded, gripper)
  assert np.sum(decoded == low) == np.sum(gripper == low) > 0


def test_few_distinct_values_round_trip_exactly():
  values = np.array([-1.0, 0.0, 1.0])
  data = values[np.r_[np.zeros(995, int), 1, 2, 2, 2, 2]][:, None]  # one value dominates
  bins = actions.fit(data, num_bins=256)
  assert bins.num_bins == (3,) and bins.counts[0].tolist() == [995, 1, 4]
  np.testing.assert_array_equal(bins.decode(bins.encode(data)), data)


def test_out_of_range_values_clamp():
  data = np.random.default_rng(4).uniform(-1, 1, (1000, 2))
  bins = actions.fit(data, num_bins=16)
  ids = bins.encode(np.array([[-100.0, 100.0], [data[:, 0].min(), data[:, 1].max()], [1e9, -1e9]]))
  assert ids[0].tolist() == [0, 15] and ids[1].tolist() == [0, 15] and ids[2].tolist() == [15, 0]
  assert bins.encode(np.zeros((4, 3, 2))).shape == (4, 3, 2)


def test_save_load_round_trip(tmp_path):
  rng = np.random.default_rng(5)
  data = np.stack([rng.normal(size=3000), rng.exponential(size=3000), rng.integers(0, 2, 3000)], axis=1)
  bins = actions.fit(data, num_bins=40)
  path = bins.save(os.path.join(tmp_path, actions.BINS_FILE))
  assert not os.path.exists(path + '.tmp')
  payload = json.load(open(path))
  assert payload['format'] == 1 and payload['num_bins_requested'] == 40 and len(payload['counts']) == 3
  loaded = actions.load(path)
  assert loaded.num_bins == bins.num_bins == (40, 40, 2) and loaded.num_bins_requested == 40
  for name in ('edges', 'values', 'counts'):
    for original, restored in zip(getattr(bins, name), getattr(loaded, name)):
      np.testing.assert_array_equal(original, restored)
  probe = rng.normal(size=(100, 3)) * 3
  np.testing.assert_array_equal(loaded.encode(probe), bins.encode(probe))
  np.testing.assert_array_equal(loaded.decode(bins.encode(probe)), bins.decode(bins.encode(probe)))


def test_load_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match='does not exist'):
    actions.load(os.path.join(tmp_path, 'missing.json'))
  path = os.path.join(tmp_path, 'bad.json')
  for text, message in [('not json', 'not an action bins JSON'), ('{"format": 2}', 'format 1, got 2'),
                        ('{"format": 1, "edges": []}', 'lacks'),
                        ('{"format": 1, "num_bins_requested": 4, "edges": [[0, 1]], "values": [[0.5, 1]],'
                         ' "counts": [[1, 1]]}', 'dimension 0 has 2 edges for 2 values'),
                        ('{"format": 1, "num_bins_requested": 4, "edges": [[1, 0]], "values": [[0.5]],'
                         ' "counts": [[1]]}', 'decreasing edges')]:
    with open(path, 'w') as f:
      f.write(text)
    with pytest.raises(ValueError, match=message):
      actions.load(path)


def test_bad_inputs_raise():
  good = np.random.default_rng(6).normal(size=(100, 7))
  nan = good.copy()
  nan[[3, 10], 6] = np.nan
  nan[5, 2] = np.inf
  with pytest.raises(ValueError, match=r'3 of 100 action rows .*\[2, 6\]'):
    actions.fit(nan)
  with pytest.raises(ValueError, match='non-empty'):
    actions.fit(np.zeros((0, 7)))
  with pytest.raises(ValueError, match='non-empty'):
    actions.fit(np.zeros(7))
  with pytest.raises(ValueError, match='num_bins'):
    actions.fit(good, num_bins=1)
  bins = actions.fit(good, num_bins=8)
  with pytest.raises(ValueError, match='id 8 out of range for dimension 3'):
    bins.decode(np.array([[0, 0, 0, 8, 0, 0, 0]]))
  with pytest.raises(ValueError, match='id -1 out of range for dimension 0'):
    bins.decode(np.array([[-1, 0, 0, 0, 0, 0, 0]]))
  with pytest.raises(ValueError, match='integer ids'):
    bins.decode(np.zeros((1, 7)))
  with pytest.raises(ValueError, match=r'shape \(\.\.\., 7\)'):
    bins.encode(np.zeros((2, 6)))
  with pytest.raises(ValueError, match=r'dimension\(s\) \[1\]'):
    bins.encode(np.array([[0, np.nan, 0, 0, 0, 0, 0]]))
