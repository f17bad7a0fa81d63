"""TabletopEnv: the world behind a small gym-like interface, for the writer and rollout evaluators.

    env = TabletopEnv('robot', image_size=64)
    obs = env.reset(seed)                    # {'image': (64, 64, 3) uint8}
    obs, reward, done, info = env.step(env.expert_action(rng))
    env.instruction, info['success'], env.goal_distance()
"""

from __future__ import annotations

import numpy as np

from lapa_jax.envs import expert, render, world


class TabletopEnv:
  """One episode at a time of the tabletop world, seen by one embodiment's camera."""

  def __init__(self, embodiment: str = 'robot', image_size: int = 64,
               max_steps: int = world.MAX_STEPS, num_blocks: tuple[int, int] = (3, 5),
               kinds: tuple[str, ...] = world.TASK_KINDS):
    render.check_embodiment(embodiment)
    render.check_image_size(image_size)
    if isinstance(max_steps, bool) or not isinstance(max_steps, (int, np.integer)) or max_steps < 1:
      raise ValueError(f'max_steps: expected a positive integer, got {max_steps!r}')
    self.embodiment = embodiment
    self.image_size = int(image_size)
    self.max_steps = int(max_steps)
    self.num_blocks = num_blocks
    self.kinds = tuple(kinds)
    self.state: world.WorldState | None = None
    self.done = False

  def _require_state(self) -> world.WorldState:
    if self.state is None:
      raise RuntimeError('TabletopEnv: call reset(seed) first')
    return self.state

  def reset(self, seed: int) -> dict[str, np.ndarray]:
    self.state = world.sample_world(seed, self.num_blocks, self.kinds)
    self.done = False
    return self.observation()

  def observation(self) -> dict[str, np.ndarray]:
    """Named like the RLDS step's `observation` feature."""
    return {'image': self.render()}

  def render(self) -> np.ndarray:
    """The camera image (image_size, image_size, 3) uint8."""
    return render.render(self._require_state(), self.embodiment, self.image_size)

  @property
  def task(self) -> str:
    """The episode's task kind."""
    return self._require_state().task.kind

  @property
  def instruction(self) -> str:
    return world.instruction(self._require_state())

  def step(self, action) -> tuple[dict[str, np.ndarray], float, bool, dict]:
    """Applies [dx, dy, 0, 0, 0, 0, gripper] (or (dx, dy)); the episode ends on success or after
    max_steps. Reward is 1 on success, else 0."""
    state = self._require_state()
    if self.done:
      raise RuntimeError('TabletopEnv: the episode is over; call reset(seed)')
    self.state = world.apply_action(state, action)
    success = world.is_success(self.state)
    self.done = success or self.state.step >= self.max_steps
    info = {'success': success, 'step': self.state.step}
    return self.observation(), float(success), self.done, info

  def goal_distance(self) -> float:
    """How far the task's object is from its goal, table units (world.goal_distance)."""
    return world.goal_distance(self._require_state())

  def close(self) -> None:
    """Nothing to release (the interface of envs.metaworld.MetaWorldEnv)."""

  def expert_action(self, rng: np.random.Generator | None = None,
                    noise: float = expert.NOISE) -> np.ndarray:
    """The scripted expert's next action for the current state, (7,) float32."""
    return expert.expert_action(self._require_state(), rng, noise)
