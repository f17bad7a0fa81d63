"""Which environments a command runs: `world` (the built-in tabletop world, its task kinds) or
`metaworld:<suite or tasks>` (Meta-World, MuJoCo), behind one interface (reset/step/instruction/
expert_action/goal_distance/close) for `lapa world` and `lapa evaluate`.

    suite = suites.parse('metaworld:mt10')   # or 'world', 'world:reach_block,push_direction',
    env = suite.make('drawer-open-v3')       #    'metaworld:drawer-open,reach'
"""

from __future__ import annotations

import dataclasses

from lapa_jax.envs import world
from lapa_jax.envs.env import TabletopEnv

FAMILIES = ('world', 'metaworld')


@dataclasses.dataclass(frozen=True)
class Suite:
  family: str                 # 'world' | 'metaworld'
  tasks: tuple[str, ...]      # world task kinds, or Meta-World task names
  name: str = ''              # the suite's short name in dataset names: 'mt10', or '' (the world, a task list)

  @property
  def fps(self) -> float:
    if self.family == 'world':
      return float(world.FPS)
    from lapa_jax.envs import metaworld
    return float(metaworld.FPS)

  @property
  def max_steps(self) -> int:
    """The default episode length limit, in control steps."""
    if self.family == 'world':
      return world.MAX_STEPS
    from lapa_jax.envs import metaworld
    return metaworld.MAX_STEPS

  @property
  def label(self) -> str:
    return 'built-in world' if self.family == 'world' else f'Meta-World {self.name or ", ".join(self.tasks)}'

  def make(self, task: str, *, image_size: int = 64, max_steps: int | None = None, embodiment: str = 'robot'):
    """An environment whose episodes are all of `task` (a kind of the world, a Meta-World task in a
    worker process: envs/remote.py says why)."""
    max_steps = max_steps or self.max_steps
    if self.family == 'world':
      return TabletopEnv(embodiment, image_size=image_size, max_steps=max_steps, kinds=(task,))
    from lapa_jax.envs import remote
    return remote.RemoteEnv(task, image_size=image_size, max_steps=max_steps)


def parse(spec: str) -> Suite:
  """'world', 'world:<kinds>', 'metaworld:<mt10|mt3|tasks>' -> Suite; one-line errors."""
  family, _, tasks = spec.strip().partition(':')
  if family == 'world':
    kinds = tuple(k.strip() for k in tasks.split(',') if k.strip()) or world.TASK_KINDS
    if unknown := [k for k in kinds if k not in world.TASK_KINDS]:
      raise ValueError(f'env {spec!r}: unknown task kind(s) {unknown}; expected some of {world.TASK_KINDS}')
    return Suite('world', kinds)
  if family == 'metaworld':
    from lapa_jax.envs import metaworld
    if not tasks:
      raise ValueError(f'env {spec!r}: name a suite ({", ".join(metaworld.SUITES)}) or tasks, e.g. metaworld:mt10')
    name = tasks.strip().lower()
    return Suite('metaworld', metaworld.parse_tasks(tasks), name if name in metaworld.SUITES else '')
  raise ValueError(f'env {spec!r}: expected world[:kinds] or metaworld:<suite or tasks>')
