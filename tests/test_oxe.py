"""Open-X registry and standardisation on synthetic datasets in the real schemas and on real Bridge."""

import dataclasses
import logging

import numpy as np
import pytest

import oxe_schemas
from lapa_jax.data import mixtures, oxe, pairs
from lapa_jax.data import standardize as std

# H = max(1, round(0.6 s x fps)), from the reference's table.
EXPECTED_OFFSETS = {'fractal20220817_data': 2, 'bridge_dataset': 3, 'berkeley_autolab_ur5': 3,
                    'nyu_door_opening_surprising_effectiveness': 2, 'jaco_play': 6, 'kuka': 6, 'roboturk': 6,
                    'language_table': 6, 'berkeley_cable_routing': 6, 'taco_play': 9, 'viola': 12, 'toto': 18}


@pytest.fixture(scope='session')
def data_dir(tmp_path_factory):
  return oxe_schemas.session_data_dir(tmp_path_factory)


def test_registry_covers_named_mixtures_and_fps_offsets():
  for mixture in mixtures.NAMED_MIXTURES.values():
    for name, weight in mixture:
      assert name in oxe.REGISTRY and weight > 0
  for name, spec in oxe.REGISTRY.items():
    assert spec.fps > 0 and spec.image_key and spec.embodiment in oxe.EMBODIMENTS, name
  for name, offset in EXPECTED_OFFSETS.items():
    assert oxe.REGISTRY[name].frame_offset(0.6) == offset, name
  human = dataclasses.replace(oxe.REGISTRY['viola'], name='video', fps=12, embodiment='human')
  assert oxe.default_frame_offset(human) == 29  # Something-Something v2 at 2.4 s
  assert oxe.default_frame_offset(oxe.REGISTRY['viola']) == 12


@pytest.mark.parametrize('name', sorted(oxe_schemas.SCHEMAS))
def test_standardised_episodes_in_real_schemas(data_dir, name):
  dataset = oxe.open_dataset(data_dir, name, use_wrist=True)
  assert dataset.version == oxe_schemas.VERSIONS.get(name, '0.1.0')
  reader = oxe.EpisodeReader(dataset, use_wrist=True)
  segments = reader.segments('train')
  assert sum(s.size for s in segments) == 6 and len(segments) == 2  # 3 episodes per shard
  episodes = [episode for segment in segments for episode in reader.episodes(segment)]
  for index, episode in enumerate(episodes):
    steps = oxe_schemas.length(index)
    assert episode['image'].shape == (steps,) and episode['image'][0][:2] == b'\xff\xd8'  # JPEG bytes
    assert [bytes(i).decode() for i in set(episode['instruction'])] == [oxe_schemas.instruction(name, index)]
    action = episode['action']
    assert action.shape == (steps, 7) and action.dtype == np.float32
    gripper = np.ones(steps, np.float32) if name == 'language_table' else oxe_schemas.expected_open(steps)
    np.testing.assert_array_equal(action[:, 6], gripper)  # one convention: 1 = open
    t = np.arange(steps, dtype=np.float32)
    np.testing.assert_allclose(action[:, 0], 0.01 * t, atol=1e-6)
    np.testing.assert_allclose(action[:, 1], 0.01 * index, atol=1e-6)
    if name == 'language_table':
      np.testing.assert_array_equal(action[:, 2:6], 0)
    elif name == 'jaco_play':
      np.testing.assert_array_equal(action[:, 3:6], 0)  # no rotation in the data
    else:
      np.testing.assert_allclose(action[:, 3:6], np.broadcast_to([0.1, 0.2, 0.3], (steps, 3)), atol=1e-6)
    if 'wrist_image' in episode:
      assert episode['wrist_image'].shape == (steps,)
  if name == 'kuka':  # zlib-compressed proprio came out decoded
    np.testing.assert_allclose(episodes[0]['proprio'][:, :7], np.arange(7) + np.arange(12)[:, None])
  assert dataset.spec.frame_offset(0.6) == EXPECTED_OFFSETS[name]


def test_real_bridge_dataset(bridge_dir, tmp_path):
  data_dir = str(tmp_path)
  oxe_schemas.copy_bridge(bridge_dir, data_dir)
  for name in ('bridge_dataset', 'bridge_orig'):  # OpenVLA's directory name finds the same data
    dataset = oxe.open_dataset(data_dir, name)
    assert dataset.version == '1.0.0' and dataset.spec.frame_offset(0.6) == 3
  reader = oxe.EpisodeReader(dataset)
  segment = reader.segments('train')[0]
  raw = next(reader.read(segment.split()))
  episode = reader.standardize(raw)
  state = raw['field/observation/state']
  steps = len(raw['image'])
  assert episode['image'].shape == (steps - 1,)  # relabelled actions drop the last step
  np.testing.assert_allclose(episode['action'][:, :6], state[1:, :6] - state[:-1, :6], atol=1e-6)
  assert set(np.unique(episode['action'][:, 6])) <= {0.0, 1.0}
  np.testing.assert_array_equal(episode['action'][:, 6], raw['field/action'][:-1, 6] > 0.5)
  assert episode['instruction'][0] and isinstance(episode['instruction'][0], bytes)


def test_features_that_do_not_match_the_registry_name_the_key(tmp_path):
  oxe_schemas.write(str(tmp_path), 'viola', episodes=2, directory='jaco_play')
  with pytest.raises(oxe.DataError, match=r"jaco_play .*no step feature 'observation/image' \(primary image"):
    oxe.open_dataset(str(tmp_path), 'jaco_play')
  with pytest.raises(oxe.MissingDataset, match='toto'):
    oxe.open_dataset(str(tmp_path), 'toto')
  with pytest.raises(oxe.DataError, match='not in the Open-X registry'):
    oxe_schemas.write(str(tmp_path), 'viola', episodes=2, directory='my_robot')
    oxe.open_dataset(str(tmp_path), 'my_robot')


def test_time_subsampling_sums_the_skipped_deltas_at_the_subsampled_rate(data_dir, tmp_path):
  oxe_schemas.write(str(tmp_path), 'viola', episodes=2, directory='viola_half')
  oxe.register(dataclasses.replace(oxe.REGISTRY['viola'], name='viola_half', subsample=2))
  try:
    dataset = oxe.open_dataset(str(tmp_path), 'viola_half')
    assert dataset.spec.effective_fps == 10 and dataset.spec.frame_offset(0.6) == 6
    reader = oxe.EpisodeReader(dataset)
    episode = next(reader.episodes(reader.segments('train')[0]))
    assert len(episode['image']) == len(episode['action']) == 6
    # world_vector x is 0.01 t: kept step 2j carries the moves of steps 2j and 2j + 1 ...
    np.testing.assert_allclose(episode['action'][:, 0], 0.01 * (4 * np.arange(6) + 1), atol=1e-6)
    # ... and the gripper command of the last of them.
    np.testing.assert_array_equal(episode['action'][:, 6], oxe_schemas.expected_open(12)[1::2])
    odd = std.subsample(np.arange(35, dtype=np.float32).reshape(5, 7), 2)  # a last window of one step
    np.testing.assert_array_equal(odd[:, 0], [7, 35, 28])
    np.testing.assert_array_equal(odd[:, 6], [13, 27, 34])
  finally:
    del oxe.REGISTRY['viola_half']


def test_gripper_conversions():
  # relative: +1 close, -1 open, 0 keep -> absolute 1 open; before the first command: its opposite
  np.testing.assert_array_equal(std.rel2abs_gripper([0, 0, 1, 0, -1, 0]), [1, 1, 0, 0, 1, 1])
  np.testing.assert_array_equal(std.rel2abs_gripper([0, -1, 0, 1]), [0, 1, 1, 0])
  np.testing.assert_array_equal(std.rel2abs_gripper([0, 0.05, 0]), [1, 1, 1])
  # continuous bridge gripper: in-between steps take the next settled state
  np.testing.assert_array_equal(std.binarize_gripper([1.0, 0.5, 0.0, 0.02, 0.6, 0.99]), [1, 0, 0, 0, 1, 1])
  np.testing.assert_allclose(std.quaternion_to_euler([0, 0, 0, 1]), [0, 0, 0], atol=1e-7)
  half = np.sqrt(0.5)
  np.testing.assert_allclose(std.quaternion_to_euler([0, 0, half, half]), [0, 0, np.pi / 2], atol=1e-6)
  codes = np.zeros((2, 8), np.int32)
  codes[:, :3] = list(b'abc')
  assert std.decode_instruction_codes(codes).tolist() == [b'abc', b'abc']


def test_mixture_parsing_and_missing_datasets(data_dir, caplog):
  assert mixtures.parse('bridge') == [('bridge_dataset', 1.0)]
  assert len(mixtures.parse('oxe_magic_soup')) == 25
  assert mixtures.parse('viola:2, kuka') == [('viola', 2.0), ('kuka', 1.0)]
  assert mixtures.parse([('viola', 1), 'kuka:0.5']) == [('viola', 1.0), ('kuka', 0.5)]
  for bad in ('viola:x', 'viola:0', 'viola,viola', ''):
    with pytest.raises(oxe.DataError):
      mixtures.parse(bad)
  with pytest.raises(oxe.DataError, match='missing: toto, roboturk'):
    mixtures.resolve(data_dir, 'viola:1,toto:1,roboturk:1')
  with caplog.at_level(logging.WARNING):
    opened = mixtures.resolve(data_dir, 'viola:1,toto:1', skip_missing=True)
  assert [d.spec.name for d, _ in opened] == ['viola'] and 'toto' in caplog.text
  with pytest.raises(oxe.DataError, match='none left'):
    mixtures.resolve(data_dir, 'toto', skip_missing=True)
  np.testing.assert_allclose(mixtures.proportions([1, 2], [30, 10]), [0.6, 0.4])
  assert mixtures.allocate(10, [0.7, 0.2, 0.1]) == [7, 2, 1] and mixtures.allocate(2, [0.5] * 3) == [1, 1, 1]
  assert mixtures.allocate(10, [0.96, 0.02, 0.02]) == [8, 1, 1]


def test_pair_offset_rounding_is_shared_with_pairs():
  spec = dataclasses.replace(oxe.REGISTRY['viola'], fps=5)
  assert spec.frame_offset(0.5) == pairs.resolve_frame_offset(frame_offset_seconds=0.5, fps=5) == 3
