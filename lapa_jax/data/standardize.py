"""Per-dataset standardisation of Open-X episodes to one layout (numpy; no TensorFlow, no JAX).

Every transform maps the raw step fields of one episode, `fields: {step path: (time, ...) array}`
(zlib tensors already decompressed), to

    action  (time', 7) float32  [delta xyz (3), delta rotation (3), gripper], gripper 1 = open, 0 = closed
    proprio (time', proprio_dim) float32, or None when the dataset has no proprioception

where time' <= time (bridge drops its last step: its action is relabelled from the next state).
The caller keeps the first time' steps of the images and instructions. Transforms follow Octo's and
OpenVLA's `oxe_standardization_transforms` (see ../shared/reference/openx_rlds.md, section 2.2);
differences are commented where they are made.
"""

from __future__ import annotations

from typing import Callable, Mapping

import numpy as np

Fields = Mapping[str, np.ndarray]
Transform = Callable[[Fields], 'tuple[np.ndarray, np.ndarray | None]']


# --- gripper conventions ---------------------------------------------------------------------------

def rel2abs_gripper(relative: np.ndarray) -> np.ndarray:
  """Relative gripper commands (+1 close, -1 open, 0 keep; threshold 0.1) -> absolute (1 open, 0 closed).

  Before the first command the gripper is assumed to be in the state opposite to it (an episode
  whose first command is 'close' starts open); with no command at all it is open throughout.
  """
  relative = np.asarray(relative, np.float32).reshape(-1)
  # +1 = open, -1 = closed, 0 = no command at this step.
  command = np.where(relative < -0.1, 1, np.where(relative > 0.1, -1, 0))
  commanded = np.flatnonzero(command)
  start = -command[commanded[0]] if commanded.size else 1
  last_command = np.maximum.accumulate(np.where(command != 0, np.arange(command.size), -1))
  state = np.where(last_command >= 0, command[np.maximum(last_command, 0)], start)
  return ((state + 1) / 2).astype(np.float32)


def binarize_gripper(continuous: np.ndarray) -> np.ndarray:
  """Continuous gripper opening in [0, 1] (bridge) -> 0/1: > 0.95 open, < 0.05 closed.

  A step in between takes the next settled state (the gripper is moving towards it). Unlike Octo,
  which keeps the raw last value when the episode ends mid-motion, that tail is rounded so that the
  output stays binary.
  """
  continuous = np.asarray(continuous, np.float32).reshape(-1)
  is_open = (continuous > 0.95).astype(np.float32)
  settled = (continuous > 0.95) | (continuous < 0.05)
  length = continuous.size
  if length == 0:
    return is_open
  index = np.where(settled, np.arange(length), length)
  next_settled = np.minimum.accumulate(index[::-1])[::-1]
  tail = np.float32(continuous[-1] >= 0.5)
  return np.where(next_settled < length, is_open[np.minimum(next_settled, length - 1)], tail)


def invert_gripper(closedness: np.ndarray) -> np.ndarray:
  """Absolute closedness (1 closed) -> openness (1 open)."""
  return (1.0 - np.asarray(closedness, np.float32)).astype(np.float32)


def quaternion_to_euler(quaternion: np.ndarray) -> np.ndarray:
  """(..., 4) quaternions (x, y, z, w) -> (..., 3) roll, pitch, yaw (radians).

  The formula of tensorflow_graphics' `euler.from_quaternion`, which Octo imports for
  furniture_bench and iamlab_cmu_pickup_insert; written out to avoid that dependency.
  """
  x, y, z, w = np.moveaxis(np.asarray(quaternion, np.float64), -1, 0)
  roll = np.arctan2(2 * (w * x + y * z), 1 - 2 * (x * x + y * y))
  pitch = np.arcsin(np.clip(2 * (w * y - z * x), -1.0, 1.0))
  yaw = np.arctan2(2 * (w * z + x * y), 1 - 2 * (y * y + z * z))
  return np.stack([roll, pitch, yaw], axis=-1).astype(np.float32)


def decode_instruction_codes(codes: np.ndarray) -> np.ndarray:
  """(time, n) int32 UTF-8 byte codes, zero padded (language_table) -> (time,) object array of bytes."""
  codes = np.asarray(codes)
  out = np.empty(codes.shape[0], dtype=object)
  for step, row in enumerate(codes):
    end = np.flatnonzero(row == 0)
    row = row[:end[0]] if end.size else row
    out[step] = bytes(row.astype(np.uint8).tolist())
  return out


def _f32(*parts: np.ndarray) -> np.ndarray:
  """Concatenates (time, k) pieces along the last axis as float32."""
  parts = [np.asarray(part, np.float32).reshape(len(part), -1) for part in parts]
  return np.concatenate(parts, axis=-1)


def _zeros(length: int, width: int) -> np.ndarray:
  return np.zeros((length, width), np.float32)


# --- transforms, one per action layout -------------------------------------------------------------
# Each reads only the step paths listed next to it in the registry (oxe.py), so that the reader can
# drop every other field before anything is buffered.

def bridge(fields: Fields):
  """Tensor(7) [delta xyz, delta rpy, gripper opening]; actions relabelled from the reached state.

  The movement dims become state[t+1] - state[t] and the last step is dropped (no next state), as
  Octo's `relabel_actions` does. OpenVLA additionally drops step 0; lapa_jax keeps it (after
  relabelling it carries a real movement, and LAQ pairs need every frame).
  """
  action = np.asarray(fields['action'], np.float32)
  state = np.asarray(fields['observation/state'], np.float32)
  gripper = binarize_gripper(action[:, -1])
  movement = state[1:, :6] - state[:-1, :6]
  return _f32(movement, gripper[:-1, None]), state[:-1]


def bridge_oxe(fields: Fields):
  """The Open-X copy of bridge: boolean open_gripper; movement relabelled from the state as above."""
  state = np.asarray(fields['observation/state'], np.float32)
  gripper = np.asarray(fields['action/open_gripper'], np.float32).reshape(-1, 1)
  return _f32(state[1:, :6] - state[:-1, :6], gripper[:-1]), state[:-1]


def rt1(fields: Fields):
  """fractal/kuka/nyu_door: world_vector, rotation_delta, relative gripper_closedness_action."""
  gripper = rel2abs_gripper(fields['action/gripper_closedness_action'][:, 0])
  action = _f32(fields['action/world_vector'], fields['action/rotation_delta'], gripper[:, None])
  return action, None


def fractal(fields: Fields):
  action, _ = rt1(fields)
  return action, _f32(fields['observation/base_pose_tool_reached'], fields['observation/gripper_closed'])


def kuka(fields: Fields):
  """As fractal; the proprio tensors are zlib-compressed on disk (the reader decompresses them)."""
  action, _ = rt1(fields)
  proprio = _f32(fields['observation/clip_function_input/base_pose_tool_reached'],
                 fields['observation/gripper_closed'])
  return action, proprio


def taco_play(fields: Fields):
  """rel_actions_world; its gripper is -1 close / +1 open (CALVIN convention), clipped to 0/1."""
  relative = np.asarray(fields['action/rel_actions_world'], np.float32)
  robot = np.asarray(fields['observation/robot_obs'], np.float32)
  return _f32(relative[:, :6], np.clip(relative[:, -1:], 0, 1)), _f32(robot[:, :6], robot[:, 7:8])


def jaco_play(fields: Fields):
  """Translation only (no rotation in the data) and a relative gripper command."""
  world = fields['action/world_vector']
  gripper = rel2abs_gripper(fields['action/gripper_closedness_action'][:, 0])
  return (_f32(world, _zeros(len(world), 3), gripper[:, None]),
          _f32(fields['observation/end_effector_cartesian_pos']))


def berkeley_autolab_ur5(fields: Fields):
  gripper = rel2abs_gripper(fields['action/gripper_closedness_action'])
  action = _f32(fields['action/world_vector'], fields['action/rotation_delta'], gripper[:, None])
  return action, _f32(fields['observation/robot_state'])[:, 6:14]


def absolute_closedness(fields: Fields):
  """roboturk/viola: absolute gripper_closedness_action (1 closed) -> openness."""
  gripper = invert_gripper(np.clip(fields['action/gripper_closedness_action'], 0, 1))
  return _f32(fields['action/world_vector'], fields['action/rotation_delta'],
              gripper.reshape(len(gripper), 1)), None


def viola(fields: Fields):
  action, _ = absolute_closedness(fields)
  return action, _f32(fields['observation/joint_states'], fields['observation/gripper_states'])


def open_gripper_bool(fields: Fields):
  """toto / OXE bridge: boolean open_gripper."""
  return _f32(fields['action/world_vector'], fields['action/rotation_delta'],
              np.asarray(fields['action/open_gripper'], np.float32).reshape(-1, 1)), None


def toto(fields: Fields):
  action, _ = open_gripper_bool(fields)
  return action, _f32(fields['observation/state'])


def cable_routing(fields: Fields):
  """No gripper action in the data; the cable stays grasped, so closed (0) as Octo sets it."""
  world = fields['action/world_vector']
  return _f32(world, fields['action/rotation_delta'], _zeros(len(world), 1)), _f32(fields['observation/robot_state'])


def language_table(fields: Fields):
  """2-D planar push -> [x, y, 0, 0, 0, 0, 1] (no rotation, gripper 'open')."""
  planar = np.asarray(fields['action'], np.float32)
  length = len(planar)
  return (_f32(planar, _zeros(length, 4), np.ones((length, 1), np.float32)),
          _f32(fields['observation/effector_translation']))


def flat_open_is_one(fields: Fields):
  """Tensor(7) already [delta xyz, delta rpy, gripper 1 = open] (fmb, dobbe-like layouts)."""
  return _f32(fields['action'])[:, :7], None


def flat_inverted(fields: Fields):
  """Tensor(7) with gripper 1 = closed (stanford_hydra, dlr_edan_shared_control)."""
  action = _f32(fields['action'])
  return _f32(action[:, :6], invert_gripper(action[:, -1:])), _f32(fields['observation/state'])


def flat_clipped_inverted(fields: Fields):
  """Tensor(7) with gripper in [-1, 1], positive = closed (austin_*, utaustin_mutex)."""
  action = _f32(fields['action'])
  return _f32(action[:, :6], invert_gripper(np.clip(action[:, -1:], 0, 1))), _f32(fields['observation/state'])


def nyu_franka_play(fields: Fields):
  action = _f32(fields['action'])
  return _f32(action[:, -8:-2], np.clip(action[:, -2:-1], 0, 1)), _f32(fields['observation/state'])


def furniture_bench(fields: Fields):
  """Translation, quaternion -> euler, gripper in [-1, 1] positive = closed."""
  action = _f32(fields['action'])
  return (_f32(action[:, :3], quaternion_to_euler(action[:, 3:7]),
               invert_gripper(np.clip(action[:, -1:], 0, 1))), _f32(fields['observation/state']))


def iamlab_pickup_insert(fields: Fields):
  action = _f32(fields['action'])
  return _f32(action[:, :3], quaternion_to_euler(action[:, 3:7]), action[:, 7:8]), _f32(fields['observation/state'])


def drop_last_dim(fields: Fields):
  """ucsd_kitchen, cmu_stretch: an 8-D action whose last entry is a terminate flag."""
  return _f32(fields['action'])[:, :-1], _f32(fields['observation/state'])


def bc_z(fields: Fields):
  return _f32(fields['action/future/xyz_residual'][:, :3], fields['action/future/axis_angle_residual'][:, :3],
              invert_gripper(np.asarray(fields['action/future/target_close'], np.float32)[:, :1])), None


def fanuc(fields: Fields):
  """No gripper action stored; the gripper state (1 closed) stands in for it, as in Octo."""
  state = _f32(fields['observation/state'])
  return _f32(fields['action'], invert_gripper(state[:, 6:7])), state


LAYOUT_NAMES = ('x', 'y', 'z', 'roll', 'pitch', 'yaw', 'gripper', 'ignore')


def from_layout(fields: Fields, *, key: str, layout: tuple[str, ...], gripper_open: float = 1.0,
                gripper_closed: float = 0.0):
  """A dataset described by a spec file: `layout` names each entry of the stored action (`key`).

  Entries named x, y, z, roll, pitch, yaw go to their place in the standard layout, 'ignore' is
  dropped, absent ones are 0; the gripper is mapped linearly so that gripper_open -> 1 (open) and
  gripper_closed -> 0, clipped to [0, 1] (so a {-1, 1} or continuous gripper works as well as {0, 1}).
  """
  stored = _f32(fields[key])
  if stored.shape[1] != len(layout):
    raise ValueError(f'action {key!r} has {stored.shape[1]} entries per step but the spec layout names '
                     f'{len(layout)} ({", ".join(layout)})')
  action = _zeros(len(stored), 7)
  for index, name in enumerate(layout):
    if name == 'gripper':
      opening = (stored[:, index] - gripper_closed) / (gripper_open - gripper_closed)
      action[:, 6] = np.clip(opening, 0.0, 1.0)
    elif name != 'ignore':
      action[:, LAYOUT_NAMES.index(name)] = stored[:, index]
  return action, None


def subsample(action: np.ndarray, every: int) -> np.ndarray:
  """(time, 7) actions at every `every`-th step: each keeps the SUM of the deltas (xyz, rotation)
  of the steps it stands for, and the gripper command of its last one, so that the subsampled
  action still takes the robot from one kept frame to the next. -> (ceil(time / every), 7)."""
  if every == 1:
    return action
  starts = np.arange(0, len(action), every)
  out = np.add.reduceat(action, starts, axis=0) if len(action) else action.copy()
  out[:, 6] = action[np.minimum(starts + every, len(action)) - 1, 6]
  return out.astype(np.float32)
