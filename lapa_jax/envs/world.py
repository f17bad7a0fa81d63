"""The tabletop world: state, planar pushing dynamics, language tasks and their success tests.

Coordinates are table units: the table is the square [0, 1] x [0, 1], x to the right, y away from
the viewer (up in the image). The effector and the blocks collide as discs; the effector pushes any
block it touches, blocks push each other, and nothing leaves the table. Everything is deterministic
given the seed of `sample_world`, so a rollout evaluator can replay an episode from its seed.

Actions follow the Open-X 7-D convention `[dx, dy, 0, 0, 0, 0, gripper]`: (dx, dy) is the
effector's displacement in table units for one control step (clipped to +-MAX_STEP per axis), the
rotation entries are zero and the gripper entry is constant (the effector pushes with a closed
gripper; Bridge convention 1 = open, 0 = closed).
"""

from __future__ import annotations

import dataclasses

import numpy as np

FPS = 5                      # control steps per second (like Bridge), for frame offsets in seconds
MAX_STEP = 0.03              # largest |dx| or |dy| per step, table units
ACTION_DIM = 7
GRIPPER_CLOSED = 0.0
EFFECTOR_RADIUS = 0.045
BLOCK_RADIUS = 0.055
MAX_STEPS = 80               # default episode length limit (16 s at 5 Hz)

COLORS = ('red', 'green', 'blue', 'yellow', 'purple', 'orange')
DIRECTIONS = {'left': (-1.0, 0.0), 'right': (1.0, 0.0), 'top': (0.0, 1.0), 'bottom': (0.0, -1.0)}
CORNERS = {'top left': (0.0, 1.0), 'top right': (1.0, 1.0),
           'bottom left': (0.0, 0.0), 'bottom right': (1.0, 0.0)}
TASK_KINDS = ('push_direction', 'reach_block', 'push_to_block', 'push_to_corner', 'reach_corner')

PUSH_DISTANCE = 0.2          # push_direction: how far the block must travel along the direction
REACH_TOLERANCE = 0.015      # reach_block: gap between effector and block
NEXT_TO_GAP = 0.04           # push_to_block: gap between the two blocks
CORNER_BLOCK_GOAL = 0.2      # push_to_corner: block goal is this far from both walls ...
CORNER_BLOCK_TOLERANCE = 0.1  # ... and the block must come this close to it
CORNER_EFFECTOR_GOAL = 0.1   # reach_corner: effector goal is this far from both walls ...
CORNER_EFFECTOR_TOLERANCE = 0.06
BLOCK_AREA = (0.2, 0.8)      # blocks start inside this square so every task stays feasible


@dataclasses.dataclass(frozen=True)
class Task:
  """One language task.

  block: index of the block the task is about (-1 for reach_corner); target: a direction name
  (push_direction), a corner name (push_to_corner, reach_corner), the index of the second block
  (push_to_block) or '' (reach_block).
  """
  kind: str
  block: int
  target: str | int


@dataclasses.dataclass(frozen=True)
class WorldState:
  """The whole world: a few small arrays, copied on every step (pure dynamics).

  effector: (2,) xy; blocks: (num_blocks, 2) xy; start_blocks: (num_blocks, 2) block positions at
  reset (push_direction measures from them); colors: (num_blocks,) indices into COLORS.
  """
  effector: np.ndarray
  blocks: np.ndarray
  start_blocks: np.ndarray
  colors: np.ndarray
  task: Task
  step: int = 0


def corner_point(corner: str, inset: float) -> np.ndarray:
  """The point `inset` away from both walls of a corner."""
  unit = np.array(CORNERS[corner])
  return unit + inset * (1.0 - 2.0 * unit)


def block_goal(state: WorldState) -> np.ndarray | None:
  """Where the task's block should go (None for reach tasks); moves with the other block."""
  task = state.task
  if task.kind == 'push_direction':
    return state.start_blocks[task.block] + (PUSH_DISTANCE + 0.03) * np.array(DIRECTIONS[task.target])
  if task.kind == 'push_to_block':
    return state.blocks[task.target]
  if task.kind == 'push_to_corner':
    return corner_point(task.target, CORNER_BLOCK_GOAL)
  return None


def effector_goal(state: WorldState) -> np.ndarray | None:
  """Where the effector should go for reach tasks (None for push tasks)."""
  task = state.task
  if task.kind == 'reach_block':
    return state.blocks[task.block]
  if task.kind == 'reach_corner':
    return corner_point(task.target, CORNER_EFFECTOR_GOAL)
  return None


def goal_distance(state: WorldState) -> float:
  """How far the task's object (its block, or the effector for reach tasks) is from where it should
  be, in table units: partial progress for evaluations, next to the binary `is_success`."""
  goal = block_goal(state)
  if goal is not None:
    return float(np.linalg.norm(state.blocks[state.task.block] - goal))
  return float(np.linalg.norm(state.effector - effector_goal(state)))


def is_success(state: WorldState) -> bool:
  task = state.task
  block = state.blocks[task.block] if task.block >= 0 else None
  if task.kind == 'push_direction':
    moved = block - state.start_blocks[task.block]
    return float(moved @ np.array(DIRECTIONS[task.target])) >= PUSH_DISTANCE
  if task.kind == 'reach_block':
    return float(np.linalg.norm(state.effector - block)) <= EFFECTOR_RADIUS + BLOCK_RADIUS + REACH_TOLERANCE
  if task.kind == 'push_to_block':
    return float(np.linalg.norm(block - state.blocks[task.target])) <= 2 * BLOCK_RADIUS + NEXT_TO_GAP
  if task.kind == 'push_to_corner':
    goal = corner_point(task.target, CORNER_BLOCK_GOAL)
    return float(np.linalg.norm(block - goal)) <= CORNER_BLOCK_TOLERANCE
  if task.kind == 'reach_corner':
    goal = corner_point(task.target, CORNER_EFFECTOR_GOAL)
    return float(np.linalg.norm(state.effector - goal)) <= CORNER_EFFECTOR_TOLERANCE
  raise ValueError(f'unknown task kind {task.kind!r}; expected one of {TASK_KINDS}')


def instruction(state: WorldState) -> str:
  """The language instruction, e.g. 'push the red block to the left'."""
  task = state.task
  color = COLORS[state.colors[task.block]]
  if task.kind == 'push_direction':
    return f'push the {color} block to the {task.target}'
  if task.kind == 'reach_block':
    return f'move to the {color} block'
  if task.kind == 'push_to_block':
    return f'push the {color} block next to the {COLORS[state.colors[task.target]]} block'
  if task.kind == 'push_to_corner':
    return f'push the {color} block to the {task.target} corner'
  if task.kind == 'reach_corner':
    return f'move to the {task.target} corner'
  raise ValueError(f'unknown task kind {task.kind!r}; expected one of {TASK_KINDS}')


def planar_action(action) -> np.ndarray:
  """(dx, dy) from an Open-X 7-D action or a bare (2,) one, clipped to +-MAX_STEP."""
  action = np.asarray(action, dtype=np.float64).reshape(-1)
  if action.shape not in ((2,), (ACTION_DIM,)):
    raise ValueError(f'action: expected shape (2,) or ({ACTION_DIM},) [dx, dy, 0, 0, 0, 0, gripper], '
                     f'got {action.shape}')
  if not np.all(np.isfinite(action)):
    raise ValueError(f'action: expected finite values, got {action.tolist()}')
  return np.clip(action[:2], -MAX_STEP, MAX_STEP)


def openx_action(planar: np.ndarray) -> np.ndarray:
  """(dx, dy) -> the stored 7-D action [dx, dy, 0, 0, 0, 0, gripper] float32."""
  action = np.zeros(ACTION_DIM, np.float32)
  action[:2] = planar
  action[6] = GRIPPER_CLOSED
  return action


def _separate_blocks(blocks: np.ndarray, iterations: int = 4) -> np.ndarray:
  """Keeps blocks on the table and pushes overlapping ones apart (each takes half the overlap)."""
  blocks = np.clip(blocks, BLOCK_RADIUS, 1.0 - BLOCK_RADIUS)
  for _ in range(iterations):
    delta = blocks[:, None, :] - blocks[None, :, :]                  # (n, n, 2)
    dist = np.linalg.norm(delta, axis=-1)
    np.fill_diagonal(dist, np.inf)
    overlap = np.maximum(2 * BLOCK_RADIUS - dist, 0.0)
    if not overlap.any():
      break
    direction = delta / np.maximum(dist, 1e-9)[..., None]
    blocks = blocks + 0.5 * (overlap[..., None] * direction).sum(axis=1)
    blocks = np.clip(blocks, BLOCK_RADIUS, 1.0 - BLOCK_RADIUS)
  return blocks


def _push_out(points: np.ndarray, center: np.ndarray, min_dist: float, fallback: np.ndarray):
  """Moves each point that is closer than min_dist to center onto the circle of that radius."""
  delta = points - center
  dist = np.linalg.norm(delta, axis=-1, keepdims=True)
  # A point exactly at the center leaves along the motion direction.
  direction = np.where(dist > 1e-9, delta / np.maximum(dist, 1e-9), fallback)
  return np.where(dist < min_dist, center + direction * min_dist, points)


def apply_action(state: WorldState, action) -> WorldState:
  """One control step: move the effector by (dx, dy), push the blocks it touches."""
  move = planar_action(action)
  effector = np.clip(state.effector + move, EFFECTOR_RADIUS, 1.0 - EFFECTOR_RADIUS)
  norm = np.linalg.norm(move)
  heading = move / norm if norm > 0 else np.array([0.0, 1.0])
  contact = EFFECTOR_RADIUS + BLOCK_RADIUS
  blocks = _push_out(state.blocks, effector, contact, heading)
  blocks = _separate_blocks(blocks)
  # A block held by a wall or another block stops the effector instead of overlapping it.
  for block in blocks:
    effector = _push_out(effector[None], block, contact - 1e-6, -heading)[0]
  effector = np.clip(effector, EFFECTOR_RADIUS, 1.0 - EFFECTOR_RADIUS)
  return dataclasses.replace(state, effector=effector, blocks=blocks, step=state.step + 1)


def _sample_positions(rng: np.random.Generator, count: int) -> np.ndarray | None:
  low, high = BLOCK_AREA
  positions = []
  for _ in range(200):
    candidate = rng.uniform(low, high, size=2)
    if all(np.linalg.norm(candidate - p) >= 2 * BLOCK_RADIUS + 0.06 for p in positions):
      positions.append(candidate)
      if len(positions) == count:
        return np.array(positions)
  return None


def _feasible_tasks(blocks: np.ndarray, effector: np.ndarray, kind: str) -> list[Task]:
  """The tasks of one kind that make a reasonably long, solvable episode from this layout."""
  tasks = []
  behind = EFFECTOR_RADIUS + BLOCK_RADIUS + 0.02
  for index, block in enumerate(blocks):
    if kind == 'push_direction':
      for name, unit in DIRECTIONS.items():
        goal, start = block + (PUSH_DISTANCE + 0.05) * np.array(unit), block - behind * np.array(unit)
        if np.all((goal > 0.1) & (goal < 0.9)) and np.all((start > 0.05) & (start < 0.95)):
          tasks.append(Task(kind, index, name))
    elif kind == 'reach_block':
      if np.linalg.norm(effector - block) >= 0.5:
        tasks.append(Task(kind, index, ''))
    elif kind == 'push_to_block':
      for other, other_block in enumerate(blocks):
        if other != index and np.linalg.norm(block - other_block) >= 0.3:
          tasks.append(Task(kind, index, other))
    elif kind == 'push_to_corner':
      for name in CORNERS:
        if np.linalg.norm(block - corner_point(name, CORNER_BLOCK_GOAL)) >= 0.3:
          tasks.append(Task(kind, index, name))
  if kind == 'reach_corner':
    for name in CORNERS:
      if np.linalg.norm(effector - corner_point(name, CORNER_EFFECTOR_GOAL)) >= 0.5:
        tasks.append(Task(kind, -1, name))
  return tasks


def sample_world(seed: int, num_blocks: tuple[int, int] = (3, 5),
                 kinds: tuple[str, ...] = TASK_KINDS) -> WorldState:
  """A random layout (num_blocks low..high blocks of distinct colours) and a feasible task of a
  kind drawn from `kinds`, fixed by the seed."""
  low, high = num_blocks
  if not 1 <= low <= high <= len(COLORS):
    raise ValueError(f'num_blocks: expected 1 <= low <= high <= {len(COLORS)}, got {num_blocks}')
  if not kinds:
    raise ValueError(f'kinds: expected some of {TASK_KINDS}, got none')
  if unknown := [k for k in kinds if k not in TASK_KINDS]:
    raise ValueError(f'kinds: unknown task kind(s) {unknown}; expected some of {TASK_KINDS}')
  if 'push_to_block' in kinds and high < 2:
    raise ValueError('num_blocks: push_to_block needs at least 2 blocks')
  rng = np.random.default_rng(seed)
  for _ in range(1000):   # rejection sampling; a few tries are enough for the default settings
    count = int(rng.integers(low, high + 1))
    blocks = _sample_positions(rng, count)
    if blocks is None:
      continue
    effector = rng.uniform(0.1, 0.9, size=2)
    if np.min(np.linalg.norm(blocks - effector, axis=-1)) < EFFECTOR_RADIUS + BLOCK_RADIUS + 0.05:
      continue
    tasks = _feasible_tasks(blocks, effector, kinds[int(rng.integers(len(kinds)))])
    if not tasks:
      continue
    task = tasks[int(rng.integers(len(tasks)))]
    colors = rng.choice(len(COLORS), size=count, replace=False)
    return WorldState(effector=effector, blocks=blocks, start_blocks=blocks.copy(), colors=colors,
                      task=task)
  raise RuntimeError(f'sample_world: no feasible layout for num_blocks={num_blocks}, kinds={kinds}')
