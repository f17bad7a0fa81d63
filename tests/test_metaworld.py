"""Meta-World (MuJoCo) as a second world: the adapter's expert, reproducible starts, rendering that
survives closed envs, the RLDS writer, `lapa inspect-data` and a tiny policy in `lapa evaluate`.
Meta-World runs in worker processes (envs/remote.py), as `lapa world` and `lapa evaluate` run it."""

import json
import math

import numpy as np
import pytest
import tensorflow_datasets as tfds

from lapa_jax import evaluate
from lapa_jax.data import inspect, oxe
from lapa_jax.envs import metaworld, remote, suites, writer

MT3 = suites.parse('metaworld:mt3')


def test_actions_map_between_open_x_and_meta_world():
  sim = np.array([0.5, -1.0, 0.25, 1.0], np.float32)          # gripper effort +1: close
  openx = metaworld.to_openx(sim, action_repeat=4, action_scale=0.01)
  np.testing.assert_allclose(openx, [0.02, -0.04, 0.01, 0, 0, 0, 0.0], atol=1e-7)   # metres, 0 = closed
  np.testing.assert_allclose(metaworld.to_metaworld(openx, 4, 0.01), sim, atol=1e-6)
  np.testing.assert_allclose(metaworld.to_metaworld([1, 0, 0, 0, 0, 0, 1.0], 4, 0.01), [1, 0, 0, -1])  # clipped; open
  with pytest.raises(ValueError, match='7-D'):
    metaworld.to_metaworld([0.0] * 4, 4, 0.01)


def test_tasks_and_suites_parse_with_clear_errors():
  assert suites.parse('metaworld:mt10').tasks == metaworld.MT10
  assert suites.parse('metaworld:drawer-open,reach-v3').tasks == ('drawer-open-v3', 'reach-v3')
  with pytest.raises(ValueError, match='did you mean drawer-open-v3'):
    suites.parse('metaworld:drawer-opne')
  with pytest.raises(ValueError, match='metaworld:<suite or tasks>'):
    suites.parse('mujoco:mt10')
  assert metaworld.instruction('drawer-open-v3') == 'open the drawer'
  assert metaworld.configuration('reach-v3', 51) is metaworld.configuration('reach-v3', 51)


def test_the_expert_solves_three_mt10_tasks_from_fixed_starts():
  solved = {}
  for task in MT3.tasks:
    env = MT3.make(task)
    for seed in range(1000, 1004):
      env.reset(seed)
      rng = np.random.default_rng(seed)
      while not env.done:
        env.step(env.expert_action(rng))
      solved.setdefault(task, []).append(env.success)
    env.close()
  rate = np.mean([s for found in solved.values() for s in found])
  assert rate >= 0.9, solved


def test_the_same_seed_gives_the_same_first_frame_and_rollout():
  def rollout(env, seed):
    frames = [env.reset(seed)['image']]
    rng = np.random.default_rng(seed)
    for _ in range(6):
      frames.append(env.step(env.expert_action(rng))[0]['image'])
    return np.stack(frames), env.goal_distance()

  one, two = MT3.make('drawer-open-v3'), MT3.make('drawer-open-v3')
  first, second = rollout(one, 1003), rollout(two, 1003)
  np.testing.assert_array_equal(first[0], second[0])
  assert first[1] == second[1]
  other = rollout(one, 1004)[0]
  assert not np.array_equal(first[0][0], other[0])  # another configuration: the drawer elsewhere
  assert first[0].shape == (7, 64, 64, 3) and first[0].dtype == np.uint8
  assert not np.array_equal(first[0][0], first[0][-1])  # the arm moved
  one.close()
  two.close()


def test_episodes_stepped_together_are_the_episodes_run_alone():
  # The writer runs one episode per worker process at once; the data must not depend on it.
  envs = [MT3.make(task, max_steps=12) for task in ('reach-v3', 'reach-v3', 'drawer-open-v3')]
  seeds = [100_000, 100_001, 100_000]
  together = writer.run_episodes(envs, seeds, noise=0.1)
  for env, seed, episode in zip(envs, seeds, together):
    alone = writer.run_episode(env, seed, noise=0.1)
    assert episode['episode_metadata'] == alone['episode_metadata']
    assert len(episode['steps']) == len(alone['steps']) > 2
    for name in ('action', 'language_instruction', 'is_terminal'):
      assert [np.asarray(step[name]).tolist() for step in episode['steps']] == \
             [np.asarray(step[name]).tolist() for step in alone['steps']]
    np.testing.assert_array_equal(np.stack([step['observation']['image'] for step in episode['steps']]),
                                  np.stack([step['observation']['image'] for step in alone['steps']]))
  assert not np.array_equal(together[0]['steps'][1]['action'], together[1]['steps'][1]['action'])
  with pytest.raises(ValueError, match='an env of its own'):
    writer.run_episodes([envs[0], envs[0]], seeds[:2], noise=0.1)
  for env in envs:
    env.close()


def test_a_task_without_a_distance_counts_success_as_progress():
  env = suites.parse('metaworld:door-open').make('door-open-v3')  # Meta-World reports obj_to_target 0
  env.reset(1000)
  assert math.isnan(env.goal_distance())
  env.close()
  episode = evaluate.Episode('door-open-v3', 1000, start_distance=math.nan, final_distance=math.nan)
  assert episode.progress == 0.0 and evaluate.summarize([episode])['final_distance'] is None
  episode.success = True
  assert episode.progress == 1.0


def test_frames_are_never_black_after_another_env_is_closed():
  envs = [remote.RemoteEnv(task, workers=1) for task in MT3.tasks]  # one process, as the bug needs
  before = envs[2].reset(1000)['image']
  envs[0].close()
  envs[1].close()
  after = envs[2].render()
  assert after.max() > 0
  np.testing.assert_array_equal(before, after)
  envs[2].close()


@pytest.fixture(scope='module')
def metaworld_data(tmp_path_factory):
  out = tmp_path_factory.mktemp('metaworld')
  robot = writer.write_dataset(str(out), 'robot', episodes=4, env='metaworld:mt3')
  video = writer.write_dataset(str(out), 'video', episodes=3, env='metaworld:mt3', seed=1)
  return robot, video


def test_written_episodes_open_as_rlds_with_open_x_actions(metaworld_data):
  robot, video = metaworld_data
  builder = tfds.builder_from_directory(robot)
  assert builder.info.splits['train'].num_examples == 3 and builder.info.metadata['fps'] == 20
  episodes = list(tfds.as_numpy(builder.as_dataset(split='train')))
  tasks = [e['episode_metadata']['task'].decode() for e in episodes]
  assert tasks == list(MT3.tasks)   # the tasks in turn
  for episode in episodes:
    steps = list(episode['steps'])
    actions = np.stack([step['action'] for step in steps])
    assert actions.shape[1] == 7 and np.all(actions[:, 3:6] == 0) and np.all(np.abs(actions[:, :3]) <= 0.04 + 1e-6)
    assert np.all((actions[:, 6] >= 0) & (actions[:, 6] <= 1))
    assert steps[0]['observation']['image'].shape == (64, 64, 3) and steps[-1]['is_last']
    assert episode['episode_metadata']['seed'] >= writer.METAWORLD_SEED_BASE  # never an evaluation start
  video_builder = tfds.builder_from_directory(video)
  assert 'action' not in video_builder.info.features['steps'].keys()
  assert oxe.open_path(video).spec.transform is None and oxe.open_path(robot).spec.fps == 20
  assert oxe.REGISTRY['metaworld_mt3_robot'].frame_offset(metaworld.PAIR_SECONDS) == 3


def test_written_episodes_go_through_inspect_data(metaworld_data, tmp_path, capsys):
  robot, _ = metaworld_data
  assert inspect.main(['--path', robot, '--out', str(tmp_path)]) == 0
  assert 'fps 20  frame offset 3 steps' in capsys.readouterr().out
  summary, = json.loads((tmp_path / 'summary.json').read_text())['datasets']
  assert summary['name'] == 'metaworld_mt3_robot' and summary['example_instruction'] == 'reach the goal position'
  assert summary['action_statistics']['std'][0] > 0 and summary['action_statistics']['std'][3] == 0
  assert (tmp_path / 'metaworld_mt3_robot_pairs.png').is_file()


def test_a_tiny_policy_runs_closed_loop_on_meta_world(pipeline, tmp_path):
  out = tmp_path / 'eval'
  assert evaluate.main([str(pipeline['finetune'][0]), '--env', 'metaworld:mt3', '--kinds', 'reach,drawer-open',
                        '--episodes', '2', '--max-steps', '6', '--offline-batches', '0', '--gifs', '1',
                        '--out', str(out)]) == 0
  records = [r for r in evaluate.read_results(str(out)) if r['task_kind'] != evaluate.OFFLINE]
  assert {r['task_kind'] for r in records} == {'reach-v3', 'drawer-open-v3'}
  assert all(r['env'] == 'Meta-World mt3' and r['episodes'] == 2 and 0 <= r['progress'] <= 1 for r in records)
  assert 'Meta-World mt3' in (out / 'results.md').read_text()
  assert len(list((out / 'gifs').iterdir())) == 2
  remote.shutdown()


def test_a_broken_gl_backend_is_one_line_naming_the_fix(monkeypatch, tmp_path, capsys):
  remote.shutdown()   # workers read MUJOCO_GL when they start
  monkeypatch.setenv('MUJOCO_GL', 'no-such-backend')
  try:
    assert writer.main(['--env', 'metaworld:reach', '--embodiment', 'robot', '--episodes', '2',
                        '--out', str(tmp_path)]) == 2
  finally:
    remote.shutdown()
  error = capsys.readouterr().err.strip().splitlines()[-1]
  assert error.startswith('lapa world: error: ') and 'MUJOCO_GL' in error and 'libegl1 libegl-mesa0' in error
