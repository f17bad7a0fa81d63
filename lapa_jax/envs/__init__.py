"""The built-in tabletop world: a few coloured blocks, an effector and language tasks.

world.py (state, dynamics, tasks, success), render.py (numpy images of the robot and hand
embodiments), expert.py (scripted expert), env.py (TabletopEnv), writer.py (RLDS datasets,
`lapa world`); metaworld.py puts Meta-World (MuJoCo) tasks behind the same interface and suites.py
chooses between the two (`--env world|metaworld:mt10`). Nothing here imports JAX; only writer.py
imports TensorFlow (lazily), only metaworld.py imports MuJoCo (when an env is made).
"""

from lapa_jax.envs.env import TabletopEnv
from lapa_jax.envs.render import EMBODIMENTS
from lapa_jax.envs.world import ACTION_DIM, FPS, TASK_KINDS

__all__ = ['ACTION_DIM', 'EMBODIMENTS', 'FPS', 'TASK_KINDS', 'TabletopEnv']
