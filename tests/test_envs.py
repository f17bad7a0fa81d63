"""The built-in tabletop world: dynamics, tasks, expert, rendering and the RLDS writer."""

import collections
import dataclasses
import json
import os

import numpy as np
import pytest

from lapa_jax.envs import TabletopEnv, render, world, writer

_SKIN = np.array(render._SKIN)


def _free_state(effector=(0.5, 0.5), blocks=((0.85, 0.85), (0.15, 0.85), (0.85, 0.15))):
  """A hand-made state with blocks far from the effector."""
  blocks = np.array(blocks, np.float64)
  return world.WorldState(effector=np.array(effector, np.float64), blocks=blocks,
                          start_blocks=blocks.copy(), colors=np.arange(len(blocks)),
                          task=world.Task('reach_block', 0, ''))


def _gripper_centroid(image):
  """Mean (row, col) of the robot gripper body's pixels."""
  rows, cols = np.nonzero(np.all(image == render._GRIPPER_BODY, axis=-1))
  return rows.mean(), cols.mean()


def test_reset_is_deterministic_for_a_seed():
  first, second, other = TabletopEnv(), TabletopEnv(), TabletopEnv()
  np.testing.assert_array_equal(first.reset(7)['image'], second.reset(7)['image'])
  assert first.instruction == second.instruction
  np.testing.assert_array_equal(first.state.blocks, second.state.blocks)
  other.reset(8)
  assert not np.array_equal(other.state.effector, first.state.effector)


def test_rollout_is_deterministic_for_a_seed():
  one, two = writer.rollout('robot', 3), writer.rollout('robot', 3)
  assert len(one['steps']) == len(two['steps'])
  for a, b in zip(one['steps'], two['steps']):
    np.testing.assert_array_equal(a['action'], b['action'])
    np.testing.assert_array_equal(a['observation']['image'], b['observation']['image'])


def test_expert_solves_most_tasks_of_every_kind():
  solved, lengths = collections.defaultdict(list), []
  for seed in range(40):
    env = TabletopEnv(image_size=32)
    env.reset(seed)
    rng = np.random.default_rng(seed)
    done = False
    while not done:
      _, reward, done, info = env.step(env.expert_action(rng))
    solved[env.state.task.kind].append(info['success'])
    assert reward == float(info['success'])
    lengths.append(info['step'])
  assert set(solved) == set(world.TASK_KINDS)
  rate = np.mean([s for kind in solved.values() for s in kind])
  assert rate >= 0.9, dict(solved)
  assert 15 <= np.mean(lengths) <= 50, 'episodes should be long enough for frame pairs'


def test_actions_move_the_effector_as_the_convention_says():
  state = _free_state()
  right = world.apply_action(state, [0.02, 0, 0, 0, 0, 0, world.GRIPPER_CLOSED])
  np.testing.assert_allclose(right.effector, [0.52, 0.5])
  up = world.apply_action(state, [0.0, 0.02])          # +dy is away from the viewer: up in the image
  np.testing.assert_allclose(up.effector, [0.5, 0.52])
  clipped = world.apply_action(state, [5.0, -5.0, 0, 0, 0, 0, 0])
  np.testing.assert_allclose(clipped.effector, [0.5 + world.MAX_STEP, 0.5 - world.MAX_STEP])
  # In the image: right means larger columns, up means smaller rows.
  size = 128
  row, col = _gripper_centroid(render.render(state, 'robot', size))
  far = dataclasses.replace(state, effector=np.array([0.6, 0.6]))
  far_row, far_col = _gripper_centroid(render.render(far, 'robot', size))
  assert far_col - col == pytest.approx(0.1 * size, abs=1.5)
  assert row - far_row == pytest.approx(0.1 * size, abs=1.5)
  with pytest.raises(ValueError, match='action: expected shape'):
    world.apply_action(state, [0.1, 0.1, 0.1])


def test_pushing_moves_blocks_and_walls_stop_them():
  contact = world.EFFECTOR_RADIUS + world.BLOCK_RADIUS
  state = _free_state(effector=(0.3, 0.5), blocks=((0.3 + contact + 0.01, 0.5), (0.15, 0.15)))
  for _ in range(10):
    state = world.apply_action(state, [world.MAX_STEP, 0.0])
  assert state.blocks[0, 0] > 0.3 + contact + 0.2           # pushed right
  assert state.blocks[0, 1] == pytest.approx(0.5)           # straight push, no drift
  np.testing.assert_array_equal(state.blocks[1], [0.15, 0.15])  # untouched block stays
  for _ in range(30):                                        # against the right wall
    state = world.apply_action(state, [world.MAX_STEP, 0.0])
  assert state.blocks[0, 0] == pytest.approx(1.0 - world.BLOCK_RADIUS)
  assert np.linalg.norm(state.effector - state.blocks[0]) >= contact - 1e-5
  # A pushed block pushes the next one.
  chain = _free_state(effector=(0.2, 0.5), blocks=((0.2 + contact, 0.5), (0.2 + contact + 0.12, 0.5)))
  for _ in range(5):
    chain = world.apply_action(chain, [world.MAX_STEP, 0.0])
  assert chain.blocks[1, 0] > 0.2 + contact + 0.12 + 0.05
  assert np.linalg.norm(chain.blocks[0] - chain.blocks[1]) >= 2 * world.BLOCK_RADIUS - 1e-5


def test_success_criteria():
  state = dataclasses.replace(_free_state(), task=world.Task('push_direction', 0, 'left'))
  assert not world.is_success(state)
  moved = state.blocks.copy()
  moved[0, 0] -= world.PUSH_DISTANCE + 0.01
  assert world.is_success(dataclasses.replace(state, blocks=moved))
  moved[0, 0] += 2 * (world.PUSH_DISTANCE + 0.01)  # the wrong way
  assert not world.is_success(dataclasses.replace(state, blocks=moved))
  reach = _free_state(effector=(0.85 - world.EFFECTOR_RADIUS - world.BLOCK_RADIUS - 0.005, 0.85))
  assert world.is_success(reach) and not world.is_success(_free_state())
  next_to = dataclasses.replace(_free_state(), task=world.Task('push_to_block', 0, 2))
  assert not world.is_success(next_to)
  close = next_to.blocks.copy()
  close[0] = close[2] + [0.0, 2 * world.BLOCK_RADIUS + 0.02]
  assert world.is_success(dataclasses.replace(next_to, blocks=close))
  corner = dataclasses.replace(_free_state(effector=(0.12, 0.9)),
                               task=world.Task('reach_corner', -1, 'top left'))
  assert world.is_success(corner)
  assert not world.is_success(dataclasses.replace(corner, task=world.Task('reach_corner', -1, 'top right')))


def test_instructions_vary_with_task_and_colour():
  instructions, kinds = set(), set()
  for seed in range(60):
    state = world.sample_world(seed)
    text = world.instruction(state)
    instructions.add(text)
    kinds.add(state.task.kind)
    if state.task.kind != 'reach_corner':
      assert world.COLORS[state.colors[state.task.block]] in text
  assert kinds == set(world.TASK_KINDS)
  assert len(instructions) >= 30
  red_left = dataclasses.replace(_free_state(), task=world.Task('push_direction', 0, 'left'))
  assert world.instruction(red_left) == 'push the red block to the left'   # COLORS[0] is red


def test_embodiments_look_different():
  state = world.sample_world(0)
  robot, hand = render.render(state, 'robot', 64), render.render(state, 'hand', 64)
  assert robot.shape == hand.shape == (64, 64, 3) and robot.dtype == np.uint8
  skin = lambda image: np.all(np.abs(image.astype(int) - _SKIN) <= 2, axis=-1).sum()
  assert skin(hand) > 60 and skin(robot) == 0
  # Different table: compare an empty patch of the two tables.
  assert np.abs(render.table('robot', 64).astype(int) - render.table('hand', 64)).mean() > 40
  # Same blocks in the same places.
  np.testing.assert_array_equal(np.all(robot == render._BLOCK_FILL[state.colors[0]], -1),
                                np.all(hand == render._BLOCK_FILL[state.colors[0]], -1))
  for size in (16, 100, 256):
    assert render.render(state, 'hand', size).shape == (size, size, 3)
  with pytest.raises(ValueError, match='image_size'):
    render.render(state, 'robot', 257)
  with pytest.raises(ValueError, match='embodiment'):
    TabletopEnv('foot')


def test_env_interface_errors():
  env = TabletopEnv(max_steps=2)
  with pytest.raises(RuntimeError, match='reset'):
    env.step([0.0, 0.0])
  env.reset(0)
  env.step([0.0, 0.0])
  _, _, done, info = env.step([0.0, 0.0])
  assert done and not info['success']
  with pytest.raises(RuntimeError, match='episode is over'):
    env.step([0.0, 0.0])


@pytest.fixture(scope='module')
def robot_dataset(tmp_path_factory):
  out = tmp_path_factory.mktemp('world')
  path = writer.write_dataset(str(out), 'robot', episodes=5, seed=1, val_fraction=0.2)
  return out, path


def test_writer_robot_dataset_opens_like_openx(robot_dataset):
  import tensorflow_datasets as tfds
  out, path = robot_dataset
  assert path == os.path.join(str(out), 'lapa_world_robot', '1.0.0')
  assert os.listdir(out) == ['lapa_world_robot']          # no temporary directory left behind
  builder = tfds.builder_from_directory(path)
  assert builder.info.splits['train'].num_examples == 4
  assert builder.info.splits['val'].num_examples == 1
  assert builder.info.metadata['fps'] == world.FPS
  assert f'{world.FPS} Hz' in builder.info.description
  steps = builder.info.features['steps']
  assert set(steps.keys()) == {'observation', 'action', 'language_instruction', 'is_first',
                               'is_last', 'is_terminal', 'reward', 'discount'}
  with open(os.path.join(path, 'features.json')) as f:
    assert '"encodingFormat": "jpeg"' in json.dumps(json.load(f))
  with open(os.path.join(path, 'lapa_spec.json')) as f:
    assert json.load(f) == {'fps': world.FPS, 'image_key': 'observation/image', 'embodiment': 'robot',
                            'instruction_key': 'language_instruction', 'action_key': 'action',
                            'frame_offset_seconds': 0.6}
  episodes = list(tfds.as_numpy(builder.as_dataset('train')))
  assert len(episodes) == 4
  for episode in episodes:
    steps = list(episode['steps'])
    metadata = episode['episode_metadata']
    actions = np.stack([s['action'] for s in steps])
    assert actions.shape[1] == 7 and actions.dtype == np.float32
    np.testing.assert_array_equal(actions[:, 2:], 0.0)      # [dx, dy, 0, 0, 0, 0, gripper=0]
    assert [s['is_first'] for s in steps] == [True] + [False] * (len(steps) - 1)
    assert [s['is_last'] for s in steps] == [False] * (len(steps) - 1) + [True]
    assert steps[-1]['is_terminal'] == metadata['success'] == (steps[-1]['reward'] == 1.0)
    assert len({s['language_instruction'] for s in steps}) == 1
    assert steps[0]['observation']['image'].shape == (64, 64, 3)
    # The stored seed replays the episode: same instruction, same first frame (up to JPEG), and
    # the stored actions reach the same outcome.
    env = TabletopEnv('robot')
    first = env.reset(int(metadata['seed']))['image']
    assert env.instruction == steps[0]['language_instruction'].decode()
    assert np.abs(first.astype(int) - steps[0]['observation']['image']).mean() < 6
    for step in steps[:-1]:
      _, _, done, info = env.step(step['action'])
    assert done and info['success'] == metadata['success']


def test_writer_hand_dataset_has_no_action(tmp_path):
  import tensorflow_datasets as tfds
  path = writer.write_dataset(str(tmp_path), 'hand', episodes=2, seed=0, image_size=32)
  builder = tfds.builder_from_directory(path)
  assert builder.info.name == 'lapa_world_hand'
  assert 'action' not in builder.info.features['steps'].keys()
  assert builder.info.features['steps']['observation']['image'].shape == (32, 32, 3)
  assert builder.info.splits['train'].num_examples == builder.info.splits['val'].num_examples == 1
  with open(os.path.join(path, 'lapa_spec.json')) as f:
    spec = json.load(f)
  assert spec['embodiment'] == 'human' and 'action_key' not in spec
  # The hand moves at the robot's speed: its pairs span 0.6 s like the robot's, not human video's 2.4 s.
  from lapa_jax.data import oxe
  spec = oxe.spec_from_metadata(path, 'lapa_world_hand')
  assert spec.embodiment == 'human' and oxe.default_frame_offset(spec) == 3
  # Robot and hand datasets written with the same seed show different episodes.
  assert writer.episode_seed(0, 'hand', 0) != writer.episode_seed(0, 'robot', 0)


@pytest.mark.parametrize('kwargs, message', [
    (dict(episodes=1), 'episodes: expected at least 2'),
    (dict(image_size=300), 'image_size: expected an integer in'),
    (dict(embodiment='foot'), 'embodiment: expected one of'),
    (dict(val_fraction=1.0), 'val_fraction'),
    (dict(seed=-3), 'seed: expected a non-negative'),
    (dict(max_steps=1), 'max_steps'),
])
def test_writer_bad_arguments(tmp_path, kwargs, message):
  arguments = dict(embodiment='robot', episodes=4) | kwargs
  with pytest.raises(ValueError, match=message):
    writer.write_dataset(str(tmp_path / 'out'), **arguments)
  assert not (tmp_path / 'out').exists()                   # rejected before any work


def test_writer_refuses_to_overwrite_and_cli_reports_errors(robot_dataset, capsys):
  out, _ = robot_dataset
  assert writer.main(['--embodiment', 'robot', '--episodes', '3', '--out', str(out)]) == 2
  assert 'already exists' in capsys.readouterr().err
  assert writer.main(['--embodiment', 'hand', '--episodes', '3', '--out', str(out),
                      '--image-size', '8']) == 2
  assert 'image_size' in capsys.readouterr().err
  with pytest.raises(SystemExit):
    writer.main(['--embodiment', 'octopus', '--episodes', '3', '--out', str(out)])
