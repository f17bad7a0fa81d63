"""Tiny synthetic RLDS datasets in the real Open-X schemas (../shared/reference/openx_rlds.md, section 2).

Keys, nesting, dtypes, encodings (JPEG images, zlib tensors, float depth images, int32 instruction
codes) and episode-level fields follow the real datasets; image sizes are the real ones times
`scale` so that tests stay fast. Every episode carries ground truth the tests check after
standardisation:
  - episode e of a dataset has `length(e)` steps and the instruction `instruction(name, e)`;
  - the gripper is open for steps t < length // 2 and closed from then on, written in each
    dataset's own raw convention (relative +1 close, CALVIN -1/+1, absolute closedness, ...);
  - the image at step t is flat: red = 40 + 10 * e, green = 8 * t, blue = DATASET_BLUE[name], so a
    decoded pair reveals its episode, its step offset and its dataset despite JPEG noise;
  - world_vector (where present) is [0.01 * t, 0.01 * e, 0.5].
"""

from __future__ import annotations

import io
import os
import shutil
import zlib

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from lapa_jax.data import rlds

F32 = np.float32
DATASET_BLUE = {'fractal20220817_data': 30, 'kuka': 60, 'language_table': 90, 'taco_play': 120,
                'jaco_play': 150, 'berkeley_autolab_ur5': 180, 'viola': 210}
VERSIONS = {'language_table': '0.0.1'}  # the others are 0.1.0


SHORTEST_EPISODE = {'steps': 12}  # benchmarks use longer episodes


def length(episode: int) -> int:
  return SHORTEST_EPISODE['steps'] + 2 * (episode % 3)


def instruction(name: str, episode: int) -> str:
  return f'{name} task {episode}: pick up the block'


def expected_open(steps: int) -> np.ndarray:
  return (np.arange(steps) < steps // 2).astype(F32)


def _size(shape, scale):
  return tuple(max(8, round(d * scale)) for d in shape[:2]) + tuple(shape[2:])


TEXTURE = {'on': False}  # benchmarks switch this on for camera-like JPEG sizes


def _texture(shape, name, episode) -> np.ndarray:
  """A smooth random scene plus sensor noise, fixed per (dataset, episode): 256^2 JPEGs of ~20-30 KB."""
  rng = np.random.default_rng([DATASET_BLUE[name], episode])
  coarse = Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)).resize(
      (shape[1], shape[0]), Image.Resampling.BICUBIC)
  return np.asarray(coarse, np.int16) + rng.integers(-10, 10, shape, dtype=np.int16)


def _jpeg(shape, name, episode, step) -> bytes:
  if TEXTURE['on']:  # the scene drifts 3 pixels per step
    pixels = np.clip(np.roll(_texture(shape, name, episode), 3 * step, axis=1), 0, 255).astype(np.uint8)
  else:
    pixels = np.empty(shape, np.uint8)
    pixels[..., 0] = 40 + 10 * episode
    pixels[..., 1] = 8 * step
    pixels[..., 2] = DATASET_BLUE[name]
  buffer = io.BytesIO()
  Image.fromarray(pixels).save(buffer, format='JPEG', quality=90 if TEXTURE['on'] else 95)
  return buffer.getvalue()


def _image(shape, **kwargs):
  return tfds.features.Image(shape=shape, encoding_format='jpeg', **kwargs)


def _tensor(*shape, dtype=F32, **kwargs):
  return tfds.features.Tensor(shape=shape, dtype=dtype, **kwargs)


def _scalar(dtype=F32):
  return tfds.features.Scalar(dtype=dtype)


def _core(discount: bool = False) -> dict:
  core = {'reward': _scalar(), 'is_first': _scalar(np.bool_), 'is_last': _scalar(np.bool_),
          'is_terminal': _scalar(np.bool_)}
  if discount:
    core['discount'] = _scalar()
  return core


def _core_values(t, steps, discount=False) -> dict:
  values = {'reward': F32(t == steps - 1), 'is_first': t == 0, 'is_last': t == steps - 1,
            'is_terminal': t == steps - 1}
  if discount:
    values['discount'] = F32(1)
  return values


def _relative_gripper(t, steps):
  """+1 = close command at the middle step, 0 = keep (fractal, kuka, jaco, ur5)."""
  return F32(1.0 if t == steps // 2 else 0.0)


def _rt1_action(e, t, steps) -> dict:
  return {'world_vector': np.array([0.01 * t, 0.01 * e, 0.5], F32),
          'rotation_delta': np.array([0.1, 0.2, 0.3], F32),
          'gripper_closedness_action': np.array([_relative_gripper(t, steps)], F32),
          'base_displacement_vector': np.zeros(2, F32),
          'base_displacement_vertical_rotation': np.zeros(1, F32),
          'terminate_episode': np.array([t == steps - 1, t != steps - 1, 0], np.int32)}


def _rt1_action_features() -> dict:
  return {'world_vector': _tensor(3), 'rotation_delta': _tensor(3), 'gripper_closedness_action': _tensor(1),
          'base_displacement_vector': _tensor(2), 'base_displacement_vertical_rotation': _tensor(1),
          'terminate_episode': _tensor(3, dtype=np.int32)}


def _zlib(array) -> bytes:
  return zlib.compress(np.asarray(array, F32).tobytes())


# --- one schema per dataset -------------------------------------------------------------------------
# Each returns (features, make_episode(e) -> example).

def fractal(scale):
  shape = _size((256, 320, 3), scale)
  features = {'steps': tfds.features.Dataset({
      'observation': {'image': _image(shape), 'natural_language_instruction': tfds.features.Text(),
                      'natural_language_embedding': _tensor(512), 'base_pose_tool_reached': _tensor(7),
                      'gripper_closed': _tensor(1)},
      'action': _rt1_action_features(), **_core(discount=True)})}
  # The real top-level 'aspects'/'attributes' have sub-fields the reference does not list; left out.

  def episode(e):
    steps = length(e)
    return {'steps': [{
        'observation': {'image': _jpeg(shape, 'fractal20220817_data', e, t),
                        'natural_language_instruction': instruction('fractal20220817_data', e),
                        'natural_language_embedding': np.zeros(512, F32),
                        'base_pose_tool_reached': np.full(7, t, F32),
                        'gripper_closed': np.array([t >= steps // 2], F32)},
        'action': _rt1_action(e, t, steps), **_core_values(t, steps, discount=True)} for t in range(steps)]}
  return features, episode


def kuka(scale):
  shape = _size((512, 640, 3), scale)
  zlib_tensor = lambda *s: _tensor(*s, encoding=tfds.features.Encoding.ZLIB)
  features = {'steps': tfds.features.Dataset({
      'observation': {'image': _image(shape), 'natural_language_instruction': tfds.features.Text(),
                      'natural_language_embedding': _tensor(512),
                      'clip_function_input/base_pose_tool_reached': zlib_tensor(7),
                      'clip_function_input/workspace_bounds': zlib_tensor(3, 3),
                      'gripper_closed': zlib_tensor(1), 'height_to_bottom': zlib_tensor(1),
                      'task_id': zlib_tensor(1)},
      'action': _rt1_action_features(), **_core()}),
      'success': _scalar(np.bool_)}

  def episode(e):
    steps = length(e)
    return {'success': True, 'steps': [{
        'observation': {'image': _jpeg(shape, 'kuka', e, t),
                        'natural_language_instruction': instruction('kuka', e),
                        'natural_language_embedding': np.zeros(512, F32),
                        'clip_function_input/base_pose_tool_reached': np.arange(7, dtype=F32) + t,
                        'clip_function_input/workspace_bounds': np.eye(3, dtype=F32),
                        'gripper_closed': np.array([t >= steps // 2], F32),
                        'height_to_bottom': np.array([0.1], F32), 'task_id': np.array([e], F32)},
        'action': _rt1_action(e, t, steps), **_core_values(t, steps)} for t in range(steps)]}
  return features, episode


def language_table(scale):
  shape = _size((360, 640, 3), scale)
  features = {'steps': tfds.features.Dataset({
      'observation': {'rgb': _image(shape), 'instruction': _tensor(512, dtype=np.int32),
                      'effector_translation': _tensor(2), 'effector_target_translation': _tensor(2)},
      'action': _tensor(2), **_core()}),
      'episode_id': tfds.features.Text()}

  def episode(e):
    steps = length(e)
    text = instruction('language_table', e).encode()
    codes = np.zeros(512, np.int32)
    codes[:len(text)] = list(text)
    return {'episode_id': f'episode-{e}', 'steps': [{
        'observation': {'rgb': _jpeg(shape, 'language_table', e, t), 'instruction': codes,
                        'effector_translation': np.array([t, e], F32),
                        'effector_target_translation': np.zeros(2, F32)},
        'action': np.array([0.01 * t, 0.01 * e], F32), **_core_values(t, steps)} for t in range(steps)]}
  return features, episode


def taco_play(scale):
  static, gripper = _size((150, 200, 3), scale), _size((84, 84, 3), scale)
  features = {'steps': tfds.features.Dataset({
      'observation': {'rgb_static': _image(static), 'rgb_gripper': _image(gripper),
                      'depth_static': _tensor(*static[:2]), 'depth_gripper': _tensor(*gripper[:2]),
                      'natural_language_instruction': tfds.features.Text(),
                      'natural_language_embedding': _tensor(512),
                      'structured_language_instruction': tfds.features.Text(), 'robot_obs': _tensor(15)},
      'action': {'actions': _tensor(7), 'rel_actions_world': _tensor(7), 'rel_actions_gripper': _tensor(7),
                 'terminate_episode': _scalar()},
      **_core()})}

  def episode(e):
    steps = length(e)

    def rel(t):  # CALVIN gripper: +1 open, -1 close
      return np.array([0.01 * t, 0.01 * e, 0.5, 0.1, 0.2, 0.3, 1.0 if t < steps // 2 else -1.0], F32)
    return {'steps': [{
        'observation': {'rgb_static': _jpeg(static, 'taco_play', e, t),
                        'rgb_gripper': _jpeg(gripper, 'taco_play', e, t),
                        'depth_static': np.zeros(static[:2], F32), 'depth_gripper': np.zeros(gripper[:2], F32),
                        'natural_language_instruction': instruction('taco_play', e),
                        'natural_language_embedding': np.zeros(512, F32),
                        'structured_language_instruction': 'pick_block', 'robot_obs': np.arange(15, dtype=F32)},
        'action': {'actions': rel(t), 'rel_actions_world': rel(t), 'rel_actions_gripper': rel(t),
                   'terminate_episode': F32(t == steps - 1)},
        **_core_values(t, steps)} for t in range(steps)]}
  return features, episode


def jaco_play(scale):
  shape = _size((224, 224, 3), scale)
  features = {'steps': tfds.features.Dataset({
      'observation': {'image': _image(shape), 'image_wrist': _image(shape),
                      'natural_language_instruction': tfds.features.Text(),
                      'natural_language_embedding': _tensor(512), 'end_effector_cartesian_pos': _tensor(7),
                      'end_effector_cartesian_velocity': _tensor(6), 'joint_pos': _tensor(8)},
      'action': {'world_vector': _tensor(3), 'gripper_closedness_action': _tensor(1),
                 'terminate_episode': _tensor(3, dtype=np.int32)},
      **_core()})}

  def episode(e):
    steps = length(e)
    return {'steps': [{
        'observation': {'image': _jpeg(shape, 'jaco_play', e, t), 'image_wrist': _jpeg(shape, 'jaco_play', e, t),
                        'natural_language_instruction': instruction('jaco_play', e),
                        'natural_language_embedding': np.zeros(512, F32),
                        'end_effector_cartesian_pos': np.full(7, t, F32),
                        'end_effector_cartesian_velocity': np.zeros(6, F32), 'joint_pos': np.zeros(8, F32)},
        'action': {'world_vector': np.array([0.01 * t, 0.01 * e, 0.5], F32),
                   'gripper_closedness_action': np.array([_relative_gripper(t, steps)], F32),
                   'terminate_episode': np.array([t == steps - 1, t != steps - 1, 0], np.int32)},
        **_core_values(t, steps)} for t in range(steps)]}
  return features, episode


def berkeley_autolab_ur5(scale):
  shape = _size((480, 640, 3), scale)
  features = {'steps': tfds.features.Dataset({
      'observation': {'image': _image(shape), 'hand_image': _image(shape),
                      'image_with_depth': tfds.features.Image(shape=shape[:2] + (1,), dtype=F32),
                      'natural_language_instruction': tfds.features.Text(),
                      'natural_language_embedding': _tensor(512), 'robot_state': _tensor(15)},
      'action': {'world_vector': _tensor(3), 'rotation_delta': _tensor(3),
                 'gripper_closedness_action': _scalar(), 'terminate_episode': _scalar()},
      **_core()})}

  def episode(e):
    steps = length(e)
    return {'steps': [{
        'observation': {'image': _jpeg(shape, 'berkeley_autolab_ur5', e, t),
                        'hand_image': _jpeg(shape, 'berkeley_autolab_ur5', e, t),
                        'image_with_depth': np.full(shape[:2] + (1,), 0.5, F32),
                        'natural_language_instruction': instruction('berkeley_autolab_ur5', e),
                        'natural_language_embedding': np.zeros(512, F32),
                        'robot_state': np.arange(15, dtype=F32) + t},
        'action': {'world_vector': np.array([0.01 * t, 0.01 * e, 0.5], F32),
                   'rotation_delta': np.array([0.1, 0.2, 0.3], F32),
                   'gripper_closedness_action': _relative_gripper(t, steps),
                   'terminate_episode': F32(t == steps - 1)},
        **_core_values(t, steps)} for t in range(steps)]}
  return features, episode


def viola(scale):
  shape = _size((224, 224, 3), scale)
  features = {'steps': tfds.features.Dataset({
      'observation': {'agentview_rgb': _image(shape), 'eye_in_hand_rgb': _image(shape),
                      'natural_language_instruction': tfds.features.Text(),
                      'natural_language_embedding': _tensor(512), 'joint_states': _tensor(7),
                      'gripper_states': _tensor(1), 'ee_states': _tensor(16)},
      'action': {'world_vector': _tensor(3), 'rotation_delta': _tensor(3),
                 'gripper_closedness_action': _scalar(), 'terminate_episode': _scalar()},
      **_core()})}

  def episode(e):
    steps = length(e)
    return {'steps': [{
        'observation': {'agentview_rgb': _jpeg(shape, 'viola', e, t), 'eye_in_hand_rgb': _jpeg(shape, 'viola', e, t),
                        'natural_language_instruction': instruction('viola', e),
                        'natural_language_embedding': np.zeros(512, F32), 'joint_states': np.full(7, t, F32),
                        'gripper_states': np.array([t >= steps // 2], F32), 'ee_states': np.zeros(16, F32)},
        'action': {'world_vector': np.array([0.01 * t, 0.01 * e, 0.5], F32),
                   'rotation_delta': np.array([0.1, 0.2, 0.3], F32),
                   # absolute closedness: -1 open, +1 closed
                   'gripper_closedness_action': F32(-1.0 if t < steps // 2 else 1.0),
                   'terminate_episode': F32(t == steps - 1)},
        **_core_values(t, steps)} for t in range(steps)]}
  return features, episode


SCHEMAS = {'fractal20220817_data': fractal, 'kuka': kuka, 'language_table': language_table,
           'taco_play': taco_play, 'jaco_play': jaco_play, 'berkeley_autolab_ur5': berkeley_autolab_ur5,
           'viola': viola}


def write(data_dir: str, name: str, *, episodes: int = 6, scale: float = 0.125, episodes_per_shard: int = 3,
          test_episodes: int = 0, directory: str | None = None) -> str:
  """Writes `name` in its real schema under `data_dir/<directory or name>/<version>`; returns that dir."""
  features, make_episode = SCHEMAS[name](scale)
  features = tfds.features.FeaturesDict(features)
  splits = {'train': (make_episode(e) for e in range(episodes))}
  if test_episodes:  # most Open-X originals call their held-out split 'test'
    splits['test'] = (make_episode(episodes + e) for e in range(test_episodes))
  version = VERSIONS.get(name, '0.1.0')
  path = os.path.join(data_dir, directory or name, version)
  return rlds.write_dataset(path, name=name, version=version, features=features, splits=splits,
                            episodes_per_shard=episodes_per_shard, progress=False)


_SESSION_ROOTS: dict[str, str] = {}


def session_data_dir(tmp_path_factory) -> str:
  """A data directory with every schema above, written once per test session (shared by modules)."""
  if 'root' not in _SESSION_ROOTS:
    root = str(tmp_path_factory.mktemp('oxe_data'))
    for name in SCHEMAS:
      write(root, name, test_episodes=2 if name == 'taco_play' else 0)
    _SESSION_ROOTS['root'] = root
  return _SESSION_ROOTS['root']


def copy_bridge(bridge_dir, data_dir: str, name: str = 'bridge_dataset') -> str:
  """Copies the real Bridge fixture into `data_dir/<name>/1.0.0`, so that caches written next to the
  data never land in ../shared."""
  target = os.path.join(data_dir, name, os.path.basename(str(bridge_dir)))
  if not os.path.isdir(target):
    shutil.copytree(str(bridge_dir), target)
    for path in os.listdir(target):
      os.chmod(os.path.join(target, path), 0o644)
  return target
