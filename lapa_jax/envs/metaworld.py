"""Meta-World (MuJoCo) tasks behind TabletopEnv's interface: a real 3-D physics world for the data,
labelling, training and closed-loop evaluation of the built-in one.

    env = MetaWorldEnv('drawer-open-v3', image_size=64)
    obs = env.reset(seed)                    # {'image': (64, 64, 3) uint8}, from a fixed camera
    obs, reward, done, info = env.step(env.expert_action(rng))
    env.instruction, info['success'], env.goal_distance()

Actions follow the Open-X 7-D convention `[dx, dy, dz, 0, 0, 0, gripper]`: (dx, dy, dz) is the hand's
displacement in metres over one control step and gripper is 1 = open, 0 = closed. One control step
is ACTION_REPEAT simulator steps (Meta-World runs at 80 Hz; the policy acts at 20 Hz, a robot-like
rate): the displacement is spread evenly over them (Meta-World moves its mocap by at most 1 cm per
simulator step, so |dx|, |dy|, |dz| <= ACTION_REPEAT cm) and the gripper effort is held.

Starts: seed s is Meta-World's fixed task configuration s % 50 of `metaworld.MT1(task, seed=s // 50)`
(object and goal positions), so the same seed gives the same episode in every run and process
(`env.reset(seed=...)` of Meta-World itself ignores the seed). Evaluation uses seeds from 1000 up,
`lapa world` data seeds from 100000 up (writer.metaworld_seed), so their starts never coincide.

Rendering is headless through mujoco.Renderer (not gymnasium's renderer: closing one of those can
leave the others drawing black frames) with shadows, reflections and multisampling off (~10x
faster). In a process that has loaded TensorFlow, MuJoCo's GL crashes: there, make environments with
`suites.parse('metaworld:...').make(task)`, which runs them in a worker process (envs/remote.py).
MUJOCO_GL must be chosen before mujoco is first imported: `egl` (default here; Debian's
libegl1 + libegl-mesa0) or `osmesa` (libosmesa6). A black frame is an error, never a silent input.
"""

from __future__ import annotations

import functools
import os

import numpy as np

ACTION_REPEAT = 4          # simulator steps (80 Hz) per control step: the policy acts at 20 Hz
SIM_FPS = 80
FPS = SIM_FPS // ACTION_REPEAT
MAX_SIM_STEPS = 500        # Meta-World's own episode limit (max_path_length)
MAX_STEPS = MAX_SIM_STEPS // ACTION_REPEAT
CONFIGURATIONS = 50        # fixed task configurations per MT1 benchmark seed
CAMERA = 'corner3'         # the corner cameras render upside down: frames are turned 180 degrees
NOISE = 0.1                # default expert noise: std of Gaussian noise on Meta-World's [-1, 1] actions
GL_HELP = ('install Debian\'s libegl1 libegl-mesa0 (MUJOCO_GL=egl) or libosmesa6 and set MUJOCO_GL=osmesa '
           '(README "Meta-World")')
PAIR_SECONDS = 0.15        # LAQ frame-pair window: 3 control steps, a few cm of arm motion

MT10 = ('reach-v3', 'push-v3', 'pick-place-v3', 'door-open-v3', 'drawer-open-v3', 'drawer-close-v3',
        'button-press-topdown-v3', 'peg-insert-side-v3', 'window-open-v3', 'window-close-v3')
SUITES = {'mt10': MT10, 'mt3': ('reach-v3', 'drawer-open-v3', 'button-press-topdown-v3')}
INSTRUCTIONS = {
    'reach-v3': 'reach the goal position',
    'push-v3': 'push the puck to the goal',
    'pick-place-v3': 'pick up the puck and place it at the goal',
    'door-open-v3': 'open the door',
    'drawer-open-v3': 'open the drawer',
    'drawer-close-v3': 'close the drawer',
    'button-press-topdown-v3': 'press the button from the top',
    'peg-insert-side-v3': 'insert the peg into the hole from the side',
    'window-open-v3': 'slide the window open',
    'window-close-v3': 'slide the window closed',
}


def dataset_spec(actions: bool) -> dict:
  """lapa_spec.json of `lapa world --env metaworld:...` datasets (also their registry entries)."""
  spec = {'fps': float(FPS), 'image_key': 'observation/image', 'instruction_key': 'language_instruction',
          'embodiment': 'robot', 'frame_offset_seconds': PAIR_SECONDS}
  if actions:
    spec['action_key'] = 'action'  # already Open-X 7-D, gripper 1 = open
  return spec


def _import_metaworld():
  """metaworld, with a headless GL backend chosen before mujoco's first import; one-line errors."""
  os.environ.setdefault('MUJOCO_GL', 'egl')
  try:
    import metaworld
    import metaworld.env_dict
    import metaworld.policies
  except ImportError as error:
    raise ImportError(f'Meta-World is not installed ({error}); pip install -e .[metaworld] '
                      '(or pip install -r requirements-metaworld.txt)') from None
  except RuntimeError as error:  # mujoco refuses an unknown MUJOCO_GL when it is imported
    raise OSError(f'{error}; {GL_HELP}') from None
  return metaworld


def task_names() -> tuple[str, ...]:
  """Every Meta-World task with a scripted expert (the 50 of ML45 + its test tasks)."""
  return tuple(sorted(_import_metaworld().policies.ENV_POLICY_MAP))


def canonical_task(name: str) -> str:
  """'drawer-open' or 'drawer-open-v3' -> 'drawer-open-v3'; unknown names are a one-line error."""
  full = name if name.endswith('-v3') else f'{name}-v3'
  known = task_names()
  if full not in known:
    import difflib
    close = difflib.get_close_matches(full, known, n=3)
    raise ValueError(f'unknown Meta-World task {name!r}' + (f'; did you mean {", ".join(close)}?' if close else
                                                           f'; known: {", ".join(known)}'))
  return full


def parse_tasks(spec: str) -> tuple[str, ...]:
  """'mt10', 'mt3' or a comma-separated task list -> Meta-World task names."""
  if spec.strip().lower() in SUITES:
    return SUITES[spec.strip().lower()]
  tasks = tuple(canonical_task(part.strip()) for part in spec.split(',') if part.strip())
  if not tasks:
    raise ValueError(f'metaworld: expected a suite ({", ".join(SUITES)}) or task names, got {spec!r}')
  return tasks


def instruction(task: str) -> str:
  return INSTRUCTIONS.get(task, task.removesuffix('-v3').replace('-', ' '))


@functools.lru_cache(maxsize=64)
def _configurations(task: str, suite_seed: int) -> tuple:
  """The 50 fixed configurations (metaworld Task objects) of `task` for one benchmark seed."""
  return tuple(_import_metaworld().MT1(task, seed=suite_seed).train_tasks)


def configuration(task: str, seed: int):
  """The fixed task configuration that episode seed `seed` starts from."""
  if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**32 * CONFIGURATIONS:
    raise ValueError(f'seed: expected a non-negative integer below 50 * 2**32, got {seed!r}')
  suite_seed, index = divmod(int(seed), CONFIGURATIONS)
  return _configurations(task, suite_seed)[index]


def to_metaworld(action, action_repeat: int, action_scale: float) -> np.ndarray:
  """Open-X [dx, dy, dz, ., ., ., gripper] (metres per control step, 1 = open) -> Meta-World's 4-D
  action for each of the `action_repeat` simulator steps: [-1, 1] mocap moves and gripper effort
  (+1 closes)."""
  action = np.asarray(action, np.float64).reshape(-1)
  if action.shape != (7,) or not np.all(np.isfinite(action)):
    raise ValueError(f'MetaWorldEnv.step: expected a finite 7-D Open-X action, got {action!r}')
  move = np.clip(action[:3] / (action_repeat * action_scale), -1.0, 1.0)
  effort = np.clip(1.0 - 2.0 * action[6], -1.0, 1.0)
  return np.append(move, effort).astype(np.float32)


def to_openx(action, action_repeat: int, action_scale: float) -> np.ndarray:
  """Meta-World's 4-D action held for `action_repeat` simulator steps -> Open-X 7-D, float32."""
  action = np.clip(np.asarray(action, np.float64), -1.0, 1.0)
  openx = np.zeros(7, np.float32)
  openx[:3] = action[:3] * action_repeat * action_scale
  openx[6] = (1.0 - action[3]) / 2.0
  return openx


class MetaWorldEnv:
  """One Meta-World task, one episode at a time, seen from a fixed camera."""

  def __init__(self, task: str, image_size: int = 64, max_steps: int = MAX_STEPS,
               action_repeat: int = ACTION_REPEAT, camera: str = CAMERA):
    self.task = canonical_task(task)
    if image_size not in (64, 128, 256):
      raise ValueError(f'image_size: expected 64, 128 or 256, got {image_size!r}')
    if isinstance(action_repeat, bool) or not isinstance(action_repeat, int) or action_repeat < 1:
      raise ValueError(f'action_repeat: expected a positive integer, got {action_repeat!r}')
    if not isinstance(max_steps, int) or not 1 <= max_steps * action_repeat <= MAX_SIM_STEPS:
      raise ValueError(f'max_steps: expected 1..{MAX_SIM_STEPS // action_repeat} control steps '
                       f'(Meta-World stops after {MAX_SIM_STEPS} simulator steps), got {max_steps!r}')
    metaworld = _import_metaworld()
    import mujoco

    self.image_size, self.max_steps, self.action_repeat, self.camera = image_size, max_steps, action_repeat, camera
    self._env = metaworld.env_dict.ALL_V3_ENVIRONMENTS[self.task]()  # render_mode None: no gymnasium renderer
    self._expert = metaworld.policies.ENV_POLICY_MAP[self.task]()
    self._env.model.vis.quality.offsamples = 0  # multisampling off: read when the renderer is made
    try:
      self._renderer = mujoco.Renderer(self._env.model, image_size, image_size)
    except Exception as error:  # no GL library, no device: the backend's own words, and the fix
      raise OSError(f'MuJoCo cannot render headless with MUJOCO_GL={os.environ.get("MUJOCO_GL")!r} ({error}); '
                    f'{GL_HELP}') from None
    self._renderer.scene.flags[mujoco.mjtRndFlag.mjRND_SHADOW] = 0
    self._renderer.scene.flags[mujoco.mjtRndFlag.mjRND_REFLECTION] = 0
    self._obs = None
    self.steps, self.done, self.success = 0, False, False
    self._distance, self._measured = 0.0, False

  @property
  def instruction(self) -> str:
    return instruction(self.task)

  def _require_reset(self) -> None:
    if self._obs is None:
      raise RuntimeError('MetaWorldEnv: call reset(seed) first')

  def reset(self, seed: int) -> dict[str, np.ndarray]:
    self._env.set_task(configuration(self.task, seed))
    self._obs, _ = self._env.reset()
    _, info = self._env.evaluate_state(self._obs, np.zeros(4, np.float32))
    self.steps, self.done, self.success = 0, False, False
    # A few tasks (door-open, hammer, assembly, box-close, disassemble) report no distance (always 0).
    self._measured = float(info['obj_to_target']) > 0
    self._distance = float(info['obj_to_target'])
    return self.observation()

  def observation(self) -> dict[str, np.ndarray]:
    """Named like the RLDS step's `observation` feature."""
    return {'image': self.render()}

  def render(self) -> np.ndarray:
    """The camera image (image_size, image_size, 3) uint8."""
    self._require_reset()
    self._renderer.update_scene(self._env.data, camera=self.camera)
    frame = self._renderer.render()[::-1, ::-1]  # the corner cameras see the world upside down
    if frame.max() == 0:
      raise OSError(f'MetaWorldEnv({self.task}): MuJoCo rendered a black frame (MUJOCO_GL='
                    f'{os.environ.get("MUJOCO_GL")!r}): headless GL is broken here; {GL_HELP}')
    return np.ascontiguousarray(frame)

  def step(self, action) -> tuple[dict[str, np.ndarray], float, bool, dict]:
    """Applies an Open-X 7-D action for one control step (action_repeat simulator steps); the episode
    ends on success or after max_steps. Reward is 1 on success, else 0."""
    self._require_reset()
    if self.done:
      raise RuntimeError('MetaWorldEnv: the episode is over; call reset(seed)')
    sim_action = to_metaworld(action, self.action_repeat, self._env.action_scale)
    for _ in range(self.action_repeat):
      self._obs, _, _, _, info = self._env.step(sim_action)
      self.success = self.success or bool(info['success'])
      self._distance = float(info['obj_to_target'])
    self.steps += 1
    self.done = self.success or self.steps >= self.max_steps
    return self.observation(), float(self.success), self.done, {'success': self.success, 'step': self.steps}

  def goal_distance(self) -> float:
    """How far the task's object (the hand for reach) is from its goal, metres (Meta-World's
    obj_to_target); NaN for the tasks whose Meta-World reward reports no distance."""
    self._require_reset()
    return self._distance if self._measured else float('nan')

  def expert_action(self, rng: np.random.Generator | None = None, noise: float = NOISE) -> np.ndarray:
    """Meta-World's scripted expert's action for the current state, held for the control step, with
    Gaussian noise of std `noise` on its [-1, 1] action; Open-X 7-D float32."""
    self._require_reset()
    action = np.asarray(self._expert.get_action(self._obs), np.float64)
    if noise > 0:
      if rng is None:
        raise ValueError('expert_action: noise > 0 needs an rng (np.random.Generator)')
      action = action + rng.normal(0.0, noise, size=4)
    return to_openx(action, self.action_repeat, self._env.action_scale)

  def close(self) -> None:
    self._renderer.close()
