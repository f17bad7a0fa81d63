"""LAQ frame pairs on the real Bridge episodes (25 train episodes of 10 steps, 64x64, 5 Hz)."""

import json

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from lapa_jax.data import BatchIterator
from lapa_jax.data import pairs
from lapa_jax.data import rlds

IMAGE_KEY = 'observation/image_0'
STEPS_PER_EPISODE = 10


@pytest.fixture(scope='module')
def reference(bridge_dir):
  """The train episodes read directly with TFDS: frames, instructions, actions, and a frame index."""
  dataset = tfds.builder_from_directory(str(bridge_dir)).as_dataset(
      'train', decoders={'steps': tfds.decode.SkipDecoding()})
  episodes, where = [], {}
  for episode in dataset.as_numpy_iterator():
    steps = episode['steps']
    frames = np.stack([tf.io.decode_jpeg(f).numpy() for f in steps['observation']['image_0']])
    for step, frame in enumerate(frames):
      where[frame.tobytes()] = (len(episodes), step)
    episodes.append({'frames': frames, 'encoded': steps['observation']['image_0'],
                     'instruction': steps['language_instruction'], 'actions': steps['action']})
  assert len(where) == 25 * STEPS_PER_EPISODE  # every frame is unique, so a frame names its step
  return episodes, where


def locate(where, frame: np.ndarray) -> tuple[int, int]:
  """(episode, step) of a decoded, unresized frame in [0, 1]."""
  return where[np.round(frame * 255).astype(np.uint8).tobytes()]


def bridge_pairs(bridge_dir, **kwargs):
  kwargs = {'image_key': IMAGE_KEY, 'frame_offset_seconds': 0.6, 'fps': 5, 'batch_size': 8, **kwargs}
  return pairs.pair_iterator(bridge_dir, **kwargs)


def take(iterator, count):
  return [next(iterator) for _ in range(count)]


def assert_same_batches(first, second):
  assert len(first) == len(second)
  for a, b in zip(first, second):
    assert a.keys() == b.keys()
    for key in a:
      np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_frame_offset_in_steps_or_seconds():
  assert pairs.resolve_frame_offset(frame_offset_seconds=0.6, fps=5) == 3     # Bridge
  assert pairs.resolve_frame_offset(frame_offset_seconds=0.6, fps=3) == 2     # fractal
  assert pairs.resolve_frame_offset(frame_offset_seconds=2.4, fps=12) == 29   # SSv2 human video
  assert pairs.resolve_frame_offset(frame_offset_seconds=0.5, fps=5) == 3     # half rounds up
  assert pairs.resolve_frame_offset(frame_offset_seconds=0.01, fps=5) == 1    # at least one step
  assert pairs.resolve_frame_offset(frame_offset=4) == 4
  for bad in ({}, {'frame_offset': 0}, {'frame_offset': 2.5}, {'frame_offset_seconds': 0.6},
              {'frame_offset': 3, 'frame_offset_seconds': 0.6, 'fps': 5}):
    with pytest.raises(rlds.DataError):
      pairs.resolve_frame_offset(**bad)


@pytest.mark.parametrize('episode_end', ['drop', 'clamp'])
def test_pairs_are_frame_offset_steps_apart(bridge_dir, reference, episode_end):
  episodes, where = reference
  iterator = bridge_pairs(bridge_dir, batch_size=25, repeat=False, episode_end=episode_end,
                          with_actions=True)
  assert isinstance(iterator, BatchIterator) and iterator.frame_offset == 3
  batches = list(iterator)
  starts = []
  for batch in batches:
    assert batch['video'].shape == (25, 2, 64, 64, 3) and batch['video'].dtype == np.float32
    assert batch['actions'].shape == (25, 3, 7) and batch['actions'].dtype == np.float32
    for video, instruction, actions, mask in zip(batch['video'], batch['instruction'], batch['actions'],
                                                 batch['action_mask']):
      episode, step = locate(where, video[0])
      expected_second = step + 3 if episode_end == 'drop' else min(step + 3, STEPS_PER_EPISODE - 1)
      assert locate(where, video[1]) == (episode, expected_second)
      assert instruction == episodes[episode]['instruction'][step]
      np.testing.assert_array_equal(mask, np.arange(step, step + 3) < expected_second)
      expected_actions = np.zeros((3, 7), np.float32)
      expected_actions[mask] = episodes[episode]['actions'][step:expected_second]
      np.testing.assert_array_equal(actions, expected_actions)
      starts.append((episode, step))
  # Every start step of every episode exactly once: 7 per episode when no pair crosses the end.
  last_start = 7 if episode_end == 'drop' else STEPS_PER_EPISODE
  assert sorted(starts) == [(e, t) for e in range(25) for t in range(last_start)]


def test_resize_is_one_bilinear_antialiased_resize_per_pair(bridge_dir, reference):
  episodes, _ = reference
  by_encoded = {bytes(encoded): (e, t) for e, episode in enumerate(episodes)
                for t, encoded in enumerate(episode['encoded'])}
  batch = next(bridge_pairs(bridge_dir, image_size=(32, 48), batch_size=4))
  assert batch['video'].shape == (4, 2, 32, 48, 3)
  # Recompute each pair from its episode: the first frame equals one of the resized reference frames.
  # Rounded to uint8 like the official loader's PIL images, then scaled to [0, 1].
  resized = {(e, t): np.round(tf.image.resize(episode['frames'][t], (32, 48), 'bilinear', antialias=True).numpy()) / 255
             for e, episode in enumerate(episodes) for t in range(STEPS_PER_EPISODE)}
  assert len(by_encoded) == len(resized)
  for video in batch['video']:
    assert 0.0 <= video.min() and video.max() <= 1.0
    matches = [key for key, frame in resized.items() if np.abs(frame - video[0]).max() < 1e-5]
    assert len(matches) == 1
    episode, step = matches[0]
    np.testing.assert_allclose(video[1], resized[episode, step + 3], atol=1e-5)


def test_deterministic_for_a_seed(bridge_dir):
  first = take(bridge_pairs(bridge_dir, seed=3), 3)
  assert_same_batches(first, take(bridge_pairs(bridge_dir, seed=3), 3))
  other = take(bridge_pairs(bridge_dir, seed=4), 3)
  assert not np.array_equal(first[0]['video'], other[0]['video'])
  # uint8 output: the same frames, a quarter of the bytes.
  small = take(bridge_pairs(bridge_dir, seed=3, image_dtype='uint8'), 3)
  for floats, integers in zip(first, small):
    assert integers['video'].dtype == np.uint8
    np.testing.assert_array_equal(integers['video'], np.round(floats['video'] * 255))
  with pytest.raises(pairs.DataError, match="image_dtype must be one of"):
    bridge_pairs(bridge_dir, image_dtype='float16')


def test_processes_read_disjoint_pairs_that_cover_the_split(bridge_dir, reference):
  _, where = reference
  starts = []
  for process_index in range(2):
    iterator = bridge_pairs(bridge_dir, batch_size=7, repeat=False, process_index=process_index,
                            process_count=2)
    starts.append({locate(where, video[0]) for batch in iterator for video in batch['video']})
  assert not starts[0] & starts[1]
  assert {episode for episode, _ in starts[0]}.isdisjoint({episode for episode, _ in starts[1]})
  assert sorted(starts[0] | starts[1]) == [(e, t) for e in range(25) for t in range(7)]


@pytest.mark.parametrize('interrupt_after', [10, 21])  # mid-epoch, and at the epoch end (175 // 8 = 21)
def test_resume_from_state_yields_the_same_batches(bridge_dir, interrupt_after):
  uninterrupted = take(bridge_pairs(bridge_dir, seed=1, with_actions=True), 30)
  interrupted = bridge_pairs(bridge_dir, seed=1, with_actions=True)
  take(interrupted, interrupt_after)
  state = json.loads(json.dumps(interrupted.get_state()))  # as a checkpoint stores it
  assert state['epoch'] == 0 and state['batches_in_epoch'] == interrupt_after
  resumed = bridge_pairs(bridge_dir, seed=1, with_actions=True)
  resumed.set_state(state)
  assert_same_batches(take(resumed, 30 - interrupt_after), uninterrupted[interrupt_after:])
  assert resumed.get_state()['epoch'] == 1  # crossed into the next, differently shuffled epoch

  with pytest.raises(rlds.DataError, match='batch_size'):
    bridge_pairs(bridge_dir, seed=1, batch_size=4).set_state(state)


def test_bad_inputs_fail_early_with_one_line(bridge_dir, tmp_path):
  cases = [
      ({'frame_offset_seconds': None, 'fps': None, 'frame_offset': 10}, 'not shorter than any episode'),
      ({'frame_offset_seconds': None, 'fps': None, 'frame_offset': 9, 'batch_size': 26},
       'fewer than batch_size 26'),
      ({'image_key': 'observation/image'}, 'available image keys: observation/image_0'),
      ({'split': 'test'}, 'available splits: train, val'),
      ({'episode_end': 'wrap'}, "'drop', 'clamp'"),
  ]
  for kwargs, fragment in cases:
    with pytest.raises(rlds.DataError) as excinfo:
      bridge_pairs(bridge_dir, **kwargs)
    assert fragment in str(excinfo.value) and '\n' not in str(excinfo.value), str(excinfo.value)
  # One step shorter than the episodes still works: one pair per episode.
  assert next(bridge_pairs(bridge_dir, frame_offset_seconds=None, frame_offset=9, batch_size=25))

  broken = tmp_path / 'bridge_dataset' / '1.0.0'
  broken.mkdir(parents=True)
  (broken / 'dataset_info.json').write_text((bridge_dir / 'dataset_info.json').read_text())
  with pytest.raises(rlds.DataError, match='missing features.json'):
    bridge_pairs(tmp_path / 'bridge_dataset')


def test_built_in_world_pairs(tmp_path):
  writer = pytest.importorskip('lapa_jax.envs.writer')
  if not hasattr(writer, 'write_dataset'):
    pytest.skip('lapa_jax.envs.writer.write_dataset is not available yet')
  robot_dir = writer.write_dataset(str(tmp_path / 'world'), 'robot', episodes=6, seed=0, image_size=32,
                                   max_steps=20)
  builder = rlds.open_builder(robot_dir)
  assert rlds.image_keys(builder) == ['observation/image'] and rlds.dataset_fps(builder) == 5
  # The default image key, and fps from the dataset's metadata: 0.6 s at 5 Hz is 3 steps.
  iterator = pairs.pair_iterator(tmp_path / 'world' / 'lapa_world_robot', frame_offset_seconds=0.6,
                                 image_size=32, batch_size=4, with_actions=True)
  assert iterator.frame_offset == 3
  batch = next(iterator)
  assert batch['video'].shape == (4, 2, 32, 32, 3)
  assert batch['actions'].shape == (4, 3, 7)
  np.testing.assert_array_equal(batch['actions'][..., 2:6], 0)  # [dx, dy, 0, 0, 0, 0, gripper]
  assert all(instruction for instruction in batch['instruction'])
  assert np.abs(batch['video'][:, 0] - batch['video'][:, 1]).max() > 0  # the world moves

  hand_dir = writer.write_dataset(str(tmp_path / 'world'), 'hand', episodes=6, seed=1, image_size=32,
                                  max_steps=20)
  assert next(pairs.pair_iterator(hand_dir, frame_offset=2, batch_size=4))['video'].shape == (4, 2, 64, 64, 3)
  with pytest.raises(rlds.DataError, match="no 'action' feature"):
    pairs.pair_iterator(hand_dir, frame_offset=2, batch_size=4, with_actions=True)
