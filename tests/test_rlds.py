"""lapa_jax.data.rlds on the real Bridge episodes (25 train / 25 val, 10 steps, 64x64 JPEG), and its writer."""

import json
import os
import pathlib

import numpy as np
import pytest

from lapa_jax.data import rlds


def copy_dataset(source: pathlib.Path, target: pathlib.Path) -> pathlib.Path:
  """A writable copy of a TFDS version dir: metadata copied, tfrecord shards linked (no big copies)."""
  target.mkdir(parents=True)
  for path in source.iterdir():
    if path.suffix == '.json':
      (target / path.name).write_text(path.read_text())
    else:
      (target / path.name).symlink_to(path)
  return target


def first_frames(dataset) -> list[bytes]:
  """Each episode's first encoded frame: a unique id (episode_id and file_path repeat in Bridge)."""
  return [bytes(episode['steps']['observation']['image_0'][0]) for episode in dataset.as_numpy_iterator()]


def assert_one_line_error(excinfo, *fragments):
  message = str(excinfo.value)
  assert '\n' not in message, message
  for fragment in fragments:
    assert fragment in message, message


def test_open_versioned_dir_and_its_parent(bridge_dir):
  builder = rlds.open_builder(bridge_dir)
  assert builder.info.splits['train'].num_examples == 25
  assert rlds.open_builder(bridge_dir.parent).data_dir == builder.data_dir


def test_parent_dir_picks_highest_version_and_renamed_dirs_open(bridge_dir, tmp_path):
  for version in ('0.9.0', '0.10.0'):
    copy_dataset(bridge_dir, tmp_path / 'bridge' / version)
  builder = rlds.open_builder(tmp_path / 'bridge')
  # Version order, not string order ('0.9.0' > '0.10.0' as strings).
  assert pathlib.Path(builder.data_dir).name == '0.10.0'
  assert builder.info.splits['val'].num_examples == 25


def test_image_keys_and_encoded_episodes(bridge_dir):
  builder = rlds.open_builder(bridge_dir)
  assert rlds.image_keys(builder) == [f'observation/image_{i}' for i in range(4)]
  episode = next(rlds.episodes(builder, 'train').as_numpy_iterator())
  frames = episode['steps']['observation']['image_0']
  assert frames.shape == (10,) and frames[0][:2] == b'\xff\xd8'  # still JPEG bytes
  assert episode['steps']['action'].shape == (10, 7)
  assert rlds.check_split(builder, 'train+val') == 50


@pytest.mark.parametrize('process_count', [2, 3])
def test_process_slices_are_disjoint_and_cover_the_split(bridge_dir, process_count):
  builder = rlds.open_builder(bridge_dir)
  everything = first_frames(rlds.episodes(builder, 'train'))
  assert len(set(everything)) == 25
  slices = [first_frames(rlds.episodes(builder, 'train', process_index=i, process_count=process_count))
            for i in range(process_count)]
  assert sum(len(s) for s in slices) == 25
  assert set().union(*map(set, slices)) == set(everything)


def test_shuffled_file_order_is_deterministic(bridge_dir, tmp_path):
  # Four shards (the two real files, each linked twice) so that file order can change at all.
  target = copy_dataset(bridge_dir, tmp_path / 'four_shards' / '1.0.0')
  info = json.loads((target / 'dataset_info.json').read_text())
  info['splits'] = [dict(info['splits'][0], name='train', shardLengths=['25'] * 4)]
  (target / 'dataset_info.json').write_text(json.dumps(info))
  for shard in range(4):
    (target / f'bridge_dataset-train.tfrecord-{shard:05d}-of-00004').symlink_to(
        bridge_dir / f'bridge_dataset-{("train", "val")[shard % 2]}.tfrecord-00000-of-00001')
  builder = rlds.open_builder(target)
  orders = {seed: first_frames(rlds.episodes(builder, 'train', shuffle_files_seed=seed)) for seed in range(4)}
  assert first_frames(rlds.episodes(builder, 'train', shuffle_files_seed=2)) == orders[2]
  assert len({tuple(order) for order in orders.values()}) > 1


def test_missing_metadata_files(bridge_dir, tmp_path):
  for missing in ('features.json', 'dataset_info.json'):
    target = copy_dataset(bridge_dir, tmp_path / missing / 'bridge_dataset' / '1.0.0')
    (target / missing).unlink()
    with pytest.raises(rlds.DataError) as excinfo:
      rlds.open_builder(target)
    assert_one_line_error(excinfo, str(target), f'missing {missing}')


def test_not_a_dataset_directory(tmp_path):
  with pytest.raises(rlds.DataError) as excinfo:
    rlds.open_builder(tmp_path)
  assert_one_line_error(excinfo, 'not a TFDS dataset')
  with pytest.raises(rlds.DataError) as excinfo:
    rlds.open_builder(tmp_path / 'nowhere')
  assert_one_line_error(excinfo, 'no such directory')


def test_unknown_split_and_empty_dataset(bridge_dir, tmp_path):
  builder = rlds.open_builder(bridge_dir)
  with pytest.raises(rlds.DataError) as excinfo:
    rlds.check_split(builder, 'test')
  assert_one_line_error(excinfo, "'test'", 'available splits: train, val')
  with pytest.raises(rlds.DataError) as excinfo:
    rlds.episodes(builder, 'train', process_index=29, process_count=30)
  assert_one_line_error(excinfo, 'no episodes for process 29 of 30')

  target = copy_dataset(bridge_dir, tmp_path / 'empty' / '1.0.0')
  info = json.loads((target / 'dataset_info.json').read_text())
  for split in info['splits']:
    split['shardLengths'] = []
  (target / 'dataset_info.json').write_text(json.dumps(info))
  with pytest.raises(rlds.DataError) as excinfo:
    rlds.episodes(rlds.open_builder(target), 'train')
  assert_one_line_error(excinfo, 'no episodes')


def test_wrong_image_key_lists_available_keys(bridge_dir):
  builder = rlds.open_builder(bridge_dir)
  with pytest.raises(rlds.DataError) as excinfo:
    rlds.check_image_key(builder, 'observation/image')
  assert_one_line_error(excinfo, "'observation/image'", 'observation/image_0, observation/image_1')
  with pytest.raises(rlds.DataError):  # a step feature, but not an image
    rlds.check_image_key(builder, 'observation/state')


def test_get_path_finds_keys_that_contain_slashes():
  steps = {'observation': {'clip_function_input/base_pose_tool_reached': 1, 'image': 2}, 'action': 3}
  assert rlds.get_path(steps, 'observation/clip_function_input/base_pose_tool_reached') == 1
  assert rlds.get_path(steps, 'observation/image') == 2 and rlds.get_path(steps, 'action') == 3
  with pytest.raises(KeyError):
    rlds.get_path(steps, 'observation/clip_function_input/missing')


def test_write_dataset_keeps_order_and_leaves_nothing_on_failure(tmp_path):
  import tensorflow_datasets as tfds
  features = tfds.features.FeaturesDict({
      'steps': tfds.features.Dataset({'is_first': tfds.features.Scalar(np.bool_)}),
      'index': tfds.features.Scalar(np.int64)})
  episodes = lambda indices: ({'steps': [{'is_first': True}], 'index': i} for i in indices)
  path = rlds.write_dataset(tmp_path / 'toy' / '1.0.0', name='toy', version='1.0.0', features=features,
                            splits={'train': episodes(range(5)), 'val': episodes([7])}, episodes_per_shard=2,
                            metadata=lambda: {'fps': 3.0}, extra_files={'note.json': {'a': 1}}, progress=False)
  builder = rlds.open_builder(tmp_path / 'toy')
  assert builder.info.name == 'toy' and rlds.dataset_fps(builder) == 3.0
  assert builder.info.splits['train'].shard_lengths == [2, 2, 1]
  assert [int(e['index']) for e in tfds.as_numpy(builder.as_dataset('train[1:]+val'))] == [1, 2, 3, 4, 7]
  assert (tmp_path / 'toy' / '1.0.0' / 'note.json').exists()
  with pytest.raises(rlds.DataError, match='already exists'):
    rlds.write_dataset(path, name='toy', version='1.0.0', features=features, splits={}, progress=False)
  with pytest.raises(rlds.DataError, match="split 'train' has no episodes"):
    rlds.write_dataset(tmp_path / 'empty' / '1.0.0', name='empty', version='1.0.0', features=features,
                       splits={'train': episodes([])}, progress=False)
  assert os.listdir(tmp_path / 'empty') == []
