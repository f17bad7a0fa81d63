"""Mixture pipelines: proportions, pair content and offsets, exact resume, determinism, process
slices, VLA steps, instruction policy, corrupt shards and the RAM budget."""

import json
import logging
import os
import shutil

import numpy as np
import pytest
from PIL import Image

import oxe_schemas
from lapa_jax.data import oxe, pipelines, video


@pytest.fixture(scope='session')
def data_dir(tmp_path_factory):
  return oxe_schemas.session_data_dir(tmp_path_factory)


IMAGE_SIZE = 16


def make_config(data_dir, mixture, **overrides):
  config = pipelines.default_config()
  config.data_dir = data_dir
  config.mixture = mixture
  config.shuffle_buffer = 300
  config.ram_budget_gb = 0.5
  config.update(overrides)
  return config


def channel(images, index):
  """Mean of one colour channel per image: (batch, ..., height, width, 3) -> (batch, ...)."""
  return images[..., index].astype(np.float64).mean(axis=(-1, -2))


def test_mixture_proportions(data_dir):
  config = make_config(data_dir, 'taco_play:1,viola:2,kuka:1', balance='none')
  iterator = pipelines.pair_iterator(config, image_size=IMAGE_SIZE, batch_size=100, seed=3, progress=False)
  names = np.concatenate([next(iterator)['dataset'] for _ in range(50)])
  assert names.size == 5000
  for name, expected in (('taco_play', 0.25), ('viola', 0.5), ('kuka', 0.25)):
    assert abs(np.mean(names == name.encode()) - expected) <= 0.03, name
  iterator.close()
  # Balanced by transitions (Octo's balance_weights): weight x number of standardised steps.
  balanced = pipelines.build_sources(make_config(data_dir, 'taco_play:1,viola:2'), content=pipelines.PAIRS,
                                     process_index=0, process_count=1, progress=False)
  sizes = np.array([s.statistics['num_transitions'] for s in balanced], float) * [1, 2]
  np.testing.assert_allclose([s.probability for s in balanced], sizes / sizes.sum())


def test_pairs_are_inside_one_episode_at_the_fps_offset(data_dir):
  config = make_config(data_dir, 'taco_play:1,viola:1,kuka:1,language_table:1', image_dtype='float32')
  iterator = pipelines.pair_iterator(config, image_size=IMAGE_SIZE, batch_size=64, seed=0, progress=False)
  batch = next(iterator)
  assert batch['video'].shape == (64, 2, 16, 16, 3) and batch['video'].dtype == np.float32
  assert 0.0 <= batch['video'].min() and batch['video'].max() <= 1.0
  video = batch['video'] * 255
  expected = {'taco_play': 9, 'viola': 12, 'kuka': 6, 'language_table': 6}  # 0.6 s at 15, 20, 10, 10 Hz
  for i, name in enumerate(batch['dataset']):
    name = name.decode()
    assert batch['frame_offset'][i] == expected[name]
    green = channel(video[i], 1)  # 8 x step index
    assert abs(green[1] - green[0] - 8 * expected[name]) <= 3
    red = channel(video[i], 0)  # 40 + 10 x episode index, the same in both frames
    assert abs(red[0] - red[1]) <= 3 and round((red[0] - 40) / 10) == batch['episode_index'][i]
    assert abs(channel(video[i], 2)[0] - oxe_schemas.DATASET_BLUE[name]) <= 4
    assert batch['instruction'][i].decode() == oxe_schemas.instruction(name, batch['episode_index'][i])
  iterator.close()
  clamp = pipelines.pair_iterator(make_config(data_dir, 'viola', episode_end='clamp'), image_size=IMAGE_SIZE,
                                  batch_size=64,
                                  progress=False)
  offsets = np.concatenate([next(clamp)['frame_offset'] for _ in range(3)])
  assert offsets.max() == 12 and offsets.min() == 0  # the official loader's clamping at episode ends
  clamp.close()


def test_resume_is_exact_and_runs_are_deterministic(data_dir):
  config = make_config(data_dir, 'taco_play:1,viola:1', shuffle_buffer=150, max_samples_per_episode=5)
  first = pipelines.pair_iterator(config, image_size=IMAGE_SIZE, batch_size=32, seed=5, progress=False)
  for _ in range(3):
    next(first)
  state = json.loads(json.dumps(first.get_state()))  # what a checkpoint stores
  reference = [next(first) for _ in range(6)]  # crosses block boundaries (150 samples per block)
  first.close()
  resumed = pipelines.pair_iterator(config, image_size=IMAGE_SIZE, batch_size=32, seed=5, progress=False)
  resumed.set_state(state)
  for expected in reference:
    got = next(resumed)
    for key in expected:
      np.testing.assert_array_equal(got[key], expected[key], err_msg=key)
  resumed.close()
  again = pipelines.pair_iterator(config, image_size=IMAGE_SIZE, batch_size=32, seed=5, progress=False)
  other = pipelines.pair_iterator(config, image_size=IMAGE_SIZE, batch_size=32, seed=6, progress=False)
  for _ in range(3):
    next(again)
  np.testing.assert_array_equal(next(again)['video'], reference[0]['video'])
  assert not np.array_equal(next(other)['episode_index'], reference[0]['episode_index'])
  with pytest.raises(oxe.DataError, match='seed'):
    other.set_state(state)
  again.close()
  other.close()


def test_processes_read_disjoint_slices_that_cover_the_data(data_dir):
  config = make_config(data_dir, 'viola:1,kuka:1')
  seen = []
  for process_index in range(2):
    sources = pipelines.build_sources(config, content=pipelines.PAIRS, process_index=process_index,
                                      process_count=2, progress=False)
    indices = {}
    for source in sources:
      stream = pipelines.EpisodeStream(source, seed=0, cycle_length=4)
      count = sum(segment.size for segment in source.segments)
      indices[source.name] = [stream.next()[1] for _ in range(count)]
      assert len(set(indices[source.name])) == count  # one epoch visits each episode once
    seen.append(indices)
  for name in ('viola', 'kuka'):
    first, second = set(seen[0][name]), set(seen[1][name])
    assert not first & second and first | second == set(range(6))
  batches = []
  for process_index in range(2):
    iterator = pipelines.pair_iterator(config, image_size=IMAGE_SIZE, batch_size=32, seed=0, process_index=process_index,
                                       process_count=2, progress=False)
    batches.append({(d, e) for _ in range(5) for b in [next(iterator)]
                    for d, e in zip(b['dataset'].tolist(), b['episode_index'].tolist())})
    iterator.close()
  assert batches[0] and batches[1] and not batches[0] & batches[1]


def test_vla_steps_over_real_bridge_and_synthetic(bridge_dir, data_dir, tmp_path):
  oxe_schemas.copy_bridge(bridge_dir, str(tmp_path))
  for name in ('viola', 'language_table'):
    os.symlink(os.path.join(data_dir, name), os.path.join(tmp_path, name))
  config = make_config(str(tmp_path), 'bridge_dataset:1,viola:1,language_table:1',
                       action_normalization='bounds_q99')
  iterator = pipelines.step_iterator(config, image_size=32, batch_size=48, seed=0, progress=False)
  batch = next(iterator)
  assert batch['image'].shape == (48, 32, 32, 3) and batch['image'].dtype == np.uint8
  assert batch['action'].shape == (48, 7) and batch['action'].dtype == np.float32
  assert np.all(np.abs(batch['action'][:, :6]) <= 1.0)
  assert set(np.unique(batch['action'][:, 6])) <= {0.0, 1.0}
  assert set(batch['dataset'].tolist()) == {b'bridge_dataset', b'viola', b'language_table'}
  assert all(batch['instruction'])
  iterator.close()


@pytest.fixture(scope='module')
def human_videos(tmp_path_factory, data_dir):
  """Frame folders at 12 fps (green = 7 x frame), imported without instructions, next to viola."""
  root = tmp_path_factory.mktemp('human')
  source = root / 'frames'
  for clip in range(2):
    os.makedirs(source / f'{clip}')
    for t in range(36):
      Image.new('RGB', (20, 20), (40 + 10 * clip, 7 * t, 0)).save(source / f'{clip}' / f'{t:05d}.jpg', quality=95)
  out = root / 'data'
  video.import_videos(str(source), str(out), name='humans', fps=12, progress=False)
  os.symlink(os.path.join(data_dir, 'viola'), out / 'viola')
  return str(out)


def test_human_video_pairs_and_instruction_policy(human_videos):
  config = make_config(human_videos, 'viola:1,humans:1', balance='none')
  iterator = pipelines.pair_iterator(config, image_size=IMAGE_SIZE, batch_size=64, seed=0, progress=False)
  batch = next(iterator)
  human = batch['dataset'] == b'humans'
  assert human.any() and np.all(batch['frame_offset'][human] == 29)  # 2.4 s at 12 fps
  assert np.all(batch['instruction'][human] == b'')  # 'empty' is the pair default
  green = channel(batch['video'][human], 1)
  np.testing.assert_allclose(green[:, 1] - green[:, 0], 7 * 29, atol=4)
  iterator.close()
  with pytest.raises(oxe.DataError, match='humans .*no instructions.*missing_instruction'):
    pipelines.pair_iterator(make_config(human_videos, 'viola:1,humans:1', missing_instruction='error'),
                            image_size=IMAGE_SIZE, batch_size=8, progress=False)
  with pytest.raises(oxe.DataError, match='humans .*no actions'):
    pipelines.step_iterator(make_config(human_videos, 'humans', missing_instruction='empty'),
                            image_size=IMAGE_SIZE, batch_size=8, progress=False)


def test_corrupt_shard_is_skipped_or_stops(data_dir, tmp_path, caplog):
  shutil.copytree(os.path.join(data_dir, 'viola'), tmp_path / 'viola')
  shard = tmp_path / 'viola' / '0.1.0' / 'viola-train.tfrecord-00001'
  content = shard.read_bytes()
  shard.write_bytes(content[:len(content) // 2])
  config = make_config(str(tmp_path), 'viola', balance='none')
  with caplog.at_level(logging.WARNING):
    iterator = pipelines.pair_iterator(config, image_size=IMAGE_SIZE, batch_size=16, progress=False)
    episodes = {e for _ in range(4) for e in next(iterator)['episode_index'].tolist()}
  assert episodes and episodes <= {0, 1, 2, 3}  # shard 1 (episodes 3-5) breaks off early
  assert iterator.mixture.sources[0].reader.corrupt_segments >= 1 and 'viola-train.tfrecord-00001' in caplog.text
  iterator.close()
  config.on_corrupt = 'error'
  iterator = pipelines.pair_iterator(config, image_size=IMAGE_SIZE, batch_size=16, progress=False)
  with pytest.raises(oxe.DataError, match='viola-train.tfrecord-00001: corrupted or truncated'):
    for _ in range(20):
      next(iterator)
  iterator.close()


def test_ram_budget_sets_buffer_sizes_and_threads(data_dir):
  def built(budget):
    config = make_config(data_dir, 'viola', shuffle_buffer=0, ram_budget_gb=budget, image_dtype='float32',
                         decode_threads=64, cycle_length=64, episode_end='clamp')
    return pipelines.pair_iterator(config, image_size=64, batch_size=16, progress=False)

  small, large = built(0.02), built(2.0)
  small, large = small.mixture, large.mixture
  # A block never holds more than an epoch: here 6 episodes of 12 steps, every step a pair ('clamp').
  assert small.block_size == large.block_size == 6 * oxe_schemas.length(0)
  # Camera-sized frames of a large dataset: the block grows with the budget.
  def plan(budget):
    config = make_config(data_dir, 'viola', ram_budget_gb=budget, image_dtype='float32', shuffle_buffer=0)
    return pipelines._plan(config, small.sources, content=pipelines.PAIRS, image_size=64, batch_size=16,
                           frame_bytes=[50_000.0], epoch_samples=10**9)
  assert 16 <= plan(0.05)['block_size'] < plan(2.0)['block_size'] < 10**9
  assert small.decode_threads < large.decode_threads
  assert small.cycle_length < large.cycle_length
  with pytest.raises(oxe.DataError, match='ram_budget_gb=0.001 is too small'):
    built(0.001)


def test_statistics_are_computed_once_by_process_0_of_two(data_dir, tmp_path):
  import socket
  import subprocess
  import sys

  # Without statistics that earlier tests cached beside the data, so that process 0 has to compute them.
  uncached = shutil.ignore_patterns('dataset_statistics_*')
  shutil.copytree(os.path.join(data_dir, 'viola'), tmp_path / 'viola', ignore=uncached)
  shutil.copytree(os.path.join(data_dir, 'kuka'), tmp_path / 'kuka', ignore=uncached)
  with socket.socket() as probe:
    probe.bind(('127.0.0.1', 0))
    port = probe.getsockname()[1]
  env = {name: value for name, value in os.environ.items() if name != 'XLA_FLAGS'}
  worker = os.path.join(os.path.dirname(__file__), 'statistics_worker.py')
  processes = [subprocess.Popen([sys.executable, worker, str(index), str(port), str(tmp_path), 'viola,kuka'],
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
               for index in range(2)]
  outputs = [process.communicate(timeout=180)[0] for process in processes]
  results = [json.loads(output.strip().splitlines()[-1]) for output in outputs]
  assert [result['passes'] for result in results] == [2, 0], outputs  # one pass per dataset, on process 0
  assert results[0]['statistics'] == results[1]['statistics'] and results[0]['datasets'] == ['kuka', 'viola']
  # A bad mixture fails on every process with process 0's message, instead of leaving one waiting.
  assert 'no_such_dataset' in results[0]['error'] and 'no_such_dataset' in results[1]['error']
