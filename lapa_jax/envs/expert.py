"""A scripted expert for the tabletop world, with Gaussian action noise.

Reach tasks: head straight for the goal. Push tasks: walk around the block to the point behind it
(seen from the goal) without touching it, then push towards the goal while steering the contact
point back onto the block-goal line. The expert reads the true world state; noise makes the
demonstrations imperfect and varied, like human teleoperation.
"""

from __future__ import annotations

import numpy as np

from lapa_jax.envs import world

NOISE = 0.3    # default action noise: standard deviation as a fraction of MAX_STEP

_CONTACT = world.EFFECTOR_RADIUS + world.BLOCK_RADIUS
_BEHIND = _CONTACT + 0.02     # distance of the pre-push point behind the block's centre
_CLEARANCE = _CONTACT + 0.03  # lateral distance kept while walking around a block
_ALIGNED = 0.5 * world.BLOCK_RADIUS


def _toward(position: np.ndarray, goal: np.ndarray) -> np.ndarray:
  delta = goal - position
  dist = float(np.linalg.norm(delta))
  return delta if dist <= world.MAX_STEP else delta * (world.MAX_STEP / dist)


def _push(effector: np.ndarray, block: np.ndarray, goal: np.ndarray) -> np.ndarray:
  """(dx, dy) that brings the block towards the goal."""
  to_goal = goal - block
  unit = to_goal / max(float(np.linalg.norm(to_goal)), 1e-9)
  perpendicular = np.array([-unit[1], unit[0]])
  along, lateral = float((effector - block) @ unit), float((effector - block) @ perpendicular)
  side = 1.0 if lateral >= 0 else -1.0
  if along < -0.8 * _CONTACT and abs(lateral) < _ALIGNED:
    # Behind the block on the line to the goal: push, and steer the lateral error away.
    return world.MAX_STEP * unit - 0.5 * lateral * perpendicular
  if along > -0.5 * _BEHIND:
    if abs(lateral) < _CLEARANCE:  # beside or in front: step out sideways first
      return _toward(effector, block + along * unit + side * _CLEARANCE * perpendicular)
    return _toward(effector, block - _BEHIND * unit + side * _CLEARANCE * perpendicular)
  return _toward(effector, block - _BEHIND * unit)


def expert_action(state: world.WorldState, rng: np.random.Generator | None = None,
                  noise: float = NOISE) -> np.ndarray:
  """The expert's next action, Open-X 7-D float32 [dx, dy, 0, 0, 0, 0, gripper]."""
  goal = world.effector_goal(state)
  if goal is not None:
    planar = _toward(state.effector, goal)
  else:
    planar = _push(state.effector, state.blocks[state.task.block], world.block_goal(state))
  if noise > 0:
    if rng is None:
      raise ValueError('expert_action: noise > 0 needs an rng (np.random.Generator)')
    planar = planar + rng.normal(0.0, noise * world.MAX_STEP, size=2)
  return world.openx_action(np.clip(planar, -world.MAX_STEP, world.MAX_STEP))
