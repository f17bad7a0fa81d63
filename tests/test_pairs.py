"""LAQ frame pairs on the real Bridge episodes (25 train episodes of 10 steps, 64x64, 5 Hz), read as a
one-dataset mixture (`data.path`) through the one pipeline every stage uses."""

import json

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from lapa_jax.data import BatchIterator
from lapa_jax.data import pairs, pipelines, rlds

IMAGE_KEY = 'observation/image_0'
STEPS_PER_EPISODE = 10
STANDARD_STEPS = 9  # the registry's bridge standardisation relabels actions from the next state
PAIRS_PER_EPISODE = STANDARD_STEPS - 3


@pytest.fixture(scope='module')
def reference(bridge_dir):
  """The train episodes read directly with TFDS: frames, instructions, and a frame index."""
  dataset = tfds.builder_from_directory(str(bridge_dir)).as_dataset(
      'train', decoders={'steps': tfds.decode.SkipDecoding()})
  episodes, where = [], {}
  for episode in dataset.as_numpy_iterator():
    steps = episode['steps']
    frames = np.stack([tf.io.decode_jpeg(f).numpy() for f in steps['observation'][IMAGE_KEY.split('/')[1]]])
    for step, frame in enumerate(frames):
      where[frame.tobytes()] = (len(episodes), step)
    episodes.append({'frames': frames, 'instruction': steps['language_instruction']})
  assert len(where) == 25 * STEPS_PER_EPISODE  # every frame is unique, so a frame names its step
  return episodes, where


def bridge_config(bridge_dir, **overrides):
  config = pipelines.default_config()
  config.update({'path': str(bridge_dir), 'ram_budget_gb': 0.5, 'shuffle_buffer': 25 * PAIRS_PER_EPISODE,
                 **overrides})
  return config


def bridge_pairs(bridge_dir, batch_size=8, image_size=64, seed=0, process_index=0, process_count=1, **overrides):
  return pipelines.pair_iterator(bridge_config(bridge_dir, **overrides), image_size=image_size,
                                 batch_size=batch_size, seed=seed, process_index=process_index,
                                 process_count=process_count, progress=False)


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
def test_pairs_are_0_6_seconds_apart_on_the_registry_camera(bridge_dir, reference, episode_end):
  episodes, where = reference
  per_episode = PAIRS_PER_EPISODE if episode_end == 'drop' else STANDARD_STEPS
  iterator = bridge_pairs(bridge_dir, batch_size=25, episode_end=episode_end, shuffle_buffer=25 * per_episode)
  assert isinstance(iterator, BatchIterator)
  starts = []
  for batch in take(iterator, per_episode):  # exactly the first epoch
    assert batch['video'].shape == (25, 2, 64, 64, 3) and batch['video'].dtype == np.uint8
    for video, instruction, offset in zip(batch['video'], batch['instruction'], batch['frame_offset']):
      episode, step = where[video[0].tobytes()]
      expected_second = step + 3 if episode_end == 'drop' else min(step + 3, STANDARD_STEPS - 1)
      assert where[video[1].tobytes()] == (episode, expected_second) and offset == expected_second - step
      assert instruction == episodes[episode]['instruction'][step]
      starts.append((episode, step))
  assert sorted(starts) == [(e, t) for e in range(25) for t in range(per_episode)]


def test_resize_is_one_bilinear_antialiased_resize_per_pair(bridge_dir, reference):
  episodes, where = reference
  batch = next(bridge_pairs(bridge_dir, image_size=32, batch_size=4, image_dtype='float32'))
  assert batch['video'].shape == (4, 2, 32, 32, 3)
  # Recompute each pair from its episode, rounded to uint8 like the official loader's PIL images.
  resized = {(e, t): np.round(tf.image.resize(episode['frames'][t], (32, 32), 'bilinear', antialias=True).numpy()) / 255
             for e, episode in enumerate(episodes) for t in range(STEPS_PER_EPISODE)}
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
  floats = take(bridge_pairs(bridge_dir, seed=3, image_dtype='float32'), 3)
  for integers, as_float in zip(first, floats):
    np.testing.assert_array_equal(integers['video'], np.round(as_float['video'] * 255))
  with pytest.raises(pipelines.DataError, match='image_dtype must be one of'):
    bridge_pairs(bridge_dir, image_dtype='float16')


def test_processes_read_disjoint_episodes_that_cover_the_split(bridge_dir, reference):
  _, where = reference
  starts = []
  for process_index in range(2):
    # Process 0 holds 13 episodes, process 1 holds 12: read one epoch of each.
    episodes = 13 - process_index
    iterator = bridge_pairs(bridge_dir, batch_size=PAIRS_PER_EPISODE, process_index=process_index,
                            process_count=2, shuffle_buffer=episodes * PAIRS_PER_EPISODE)
    starts.append({where[video[0].tobytes()] for batch in take(iterator, episodes) for video in batch['video']})
  assert {episode for episode, _ in starts[0]}.isdisjoint({episode for episode, _ in starts[1]})
  assert sorted(starts[0] | starts[1]) == [(e, t) for e in range(25) for t in range(PAIRS_PER_EPISODE)]


@pytest.mark.parametrize('interrupt_after', [10, 21])
def test_resume_from_state_yields_the_same_batches(bridge_dir, interrupt_after):
  uninterrupted = take(bridge_pairs(bridge_dir, seed=1), 30)
  interrupted = bridge_pairs(bridge_dir, seed=1)
  take(interrupted, interrupt_after)
  state = json.loads(json.dumps(interrupted.get_state()))  # as a checkpoint stores it
  resumed = bridge_pairs(bridge_dir, seed=1)
  resumed.set_state(state)
  assert_same_batches(take(resumed, 30 - interrupt_after), uninterrupted[interrupt_after:])
  with pytest.raises(pipelines.DataError, match='batch_size'):
    bridge_pairs(bridge_dir, seed=1, batch_size=4).set_state(state)


def test_bad_inputs_fail_early_with_one_line(bridge_dir, tmp_path):
  cases = [
      ({'spec': {'image_key': 'observation/image'}}, 'observation/image'),
      ({'split': 'test'}, 'available: train, val'),
      ({'episode_end': 'wrap'}, "'drop', 'clamp'"),
      ({'mixture': 'bridge'}, 'give one'),
      ({'path': '', 'mixture': ''}, 'set data.path'),
      ({'path': str(tmp_path / 'missing')}, 'no such directory'),
  ]
  for overrides, fragment in cases:
    spec = overrides.pop('spec', {})
    config = bridge_config(bridge_dir, **overrides)
    config.spec.update(spec)
    with pytest.raises(rlds.DataError) as excinfo:
      pipelines.pair_iterator(config, image_size=64, batch_size=8, progress=False)
    assert fragment in str(excinfo.value) and '\n' not in str(excinfo.value), str(excinfo.value)

  broken = tmp_path / 'bridge_dataset' / '1.0.0'
  broken.mkdir(parents=True)
  (broken / 'dataset_info.json').write_text((bridge_dir / 'dataset_info.json').read_text())
  with pytest.raises(rlds.DataError, match='missing features.json'):
    bridge_pairs(tmp_path / 'bridge_dataset')


def test_built_in_world_pairs(tmp_path):
  from lapa_jax.envs import writer
  robot_dir = writer.write_dataset(str(tmp_path / 'world'), 'robot', episodes=6, seed=0, image_size=32,
                                   max_steps=20)
  # fps and the 0.6 s window come from the dataset's lapa_spec.json: 3 steps at 5 Hz.
  config = pipelines.default_config()
  config.update(path=robot_dir, ram_budget_gb=0.5, shuffle_buffer=64)
  batch = next(pipelines.pair_iterator(config, image_size=32, batch_size=4, progress=False))
  assert batch['video'].shape == (4, 2, 32, 32, 3) and set(batch['frame_offset']) == {3}
  assert all(instruction for instruction in batch['instruction'])
  assert np.abs(batch['video'][:, 0].astype(int) - batch['video'][:, 1]).max() > 0  # the world moves

  hand_dir = writer.write_dataset(str(tmp_path / 'world'), 'hand', episodes=6, seed=1, image_size=32,
                                  max_steps=20)
  config.update(path=hand_dir)
  assert next(pipelines.pair_iterator(config, image_size=64, batch_size=4, progress=False))['video'].shape == (
      4, 2, 64, 64, 3)
  with pytest.raises(rlds.DataError, match='has no actions'):
    pipelines.step_iterator(config, image_size=32, batch_size=4, progress=False)
