"""Writes scripted-expert episodes of the built-in world, or of Meta-World tasks, as an RLDS dataset
laid out like Open-X.

    lapa world --embodiment robot|hand --episodes N --out DIR [--seed S] [--image-size 64]
               [--max-steps 80] [--val-fraction 0.1] [--noise 0.3]
    lapa world --env metaworld:mt10 --embodiment robot|video --episodes N --out DIR [...]

gives `DIR/<name>/1.0.0/` (dataset_info.json, features.json, metadata.json, lapa_spec.json, tfrecord
shards, splits `train` and `val`), readable offline with `tfds.builder_from_directory`; <name> is
lapa_world_<embodiment> or metaworld_<suite>_<embodiment> (suite mt10, mt3, or `tasks` for a list).
Each step holds `observation/image` (JPEG, like Open-X), `language_instruction` (step-level, like
Bridge), `is_first/is_last/is_terminal`, `reward`, `discount` and, for the robot only, `action`
float32 (7,) in the Open-X convention (world: `[dx, dy, 0, 0, 0, 0, gripper]` in table units;
Meta-World: `[dx, dy, dz, 0, 0, 0, gripper]` in metres, gripper 1 = open). The world's hand and
Meta-World's video embodiment are video only, like the action-free videos LAPA pretrains on.
`episode_metadata` holds the episode index, the seed that the env's `reset` replays it from, the task
and the expert's success. The control rate is in the description and in `builder.info.metadata['fps']`.
Meta-World episodes take the tasks in turn (episode i is task i % number of tasks).

Step semantics follow the Open-X converted datasets: the action of step t is taken after
observation t; the last step holds the final observation, a zero action, reward 1 if the task
was solved, and is_terminal = success (an unsolved episode is truncated).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import sys

import numpy as np

from lapa_jax.envs import expert, remote, render, suites, world
from lapa_jax.envs.env import TabletopEnv

DATASET_VERSION = '1.0.0'
PAIR_SECONDS = 0.6            # LAQ frame-pair window for both embodiments
SPEC_FILE = 'lapa_spec.json'   # read by lapa_jax.data.oxe.spec_from_metadata
METAWORLD_EMBODIMENTS = ('robot', 'video')
METAWORLD_SEED_BASE = 100_000    # Meta-World data seeds start here; evaluation uses seeds below it


def dataset_name(embodiment: str, env: str = 'world') -> str:
  suite = suites.parse(env)
  if suite.family == 'world':
    render.check_embodiment(embodiment)
    return f'lapa_world_{embodiment}'
  _check_metaworld_embodiment(embodiment)
  return f'metaworld_{suite.name or "tasks"}_{embodiment}'


def _check_metaworld_embodiment(embodiment: str) -> None:
  if embodiment not in METAWORLD_EMBODIMENTS:
    raise ValueError(f'embodiment: Meta-World has {METAWORLD_EMBODIMENTS} (video: frames without actions), '
                     f'got {embodiment!r}')


def episode_seed(seed: int, embodiment: str, index: int) -> int:
  """The reset seed of one world episode; the embodiment is mixed in so that robot and hand datasets
  written with the same --seed show different episodes, like unrelated robot and human videos."""
  entropy = [seed, render.EMBODIMENTS.index(embodiment), index]
  return int(np.random.SeedSequence(entropy).generate_state(1)[0])


def metaworld_seed(seed: int, embodiment: str, index: int) -> int:
  """The reset seed of the `index`-th episode of one Meta-World task (envs/metaworld.py: a fixed task
  configuration): robot and video data, and every --seed, start from configurations of their own,
  none of them an evaluation start (seeds below METAWORLD_SEED_BASE)."""
  if index >= METAWORLD_SEED_BASE // 2:
    raise ValueError(f'episodes: at most {METAWORLD_SEED_BASE // 2} per Meta-World task')
  return METAWORLD_SEED_BASE * (1 + seed) + METAWORLD_SEED_BASE // 2 * (embodiment == 'video') + index


def run_episode(env, seed: int, noise: float, actions: bool = True) -> dict:
  """One expert episode of `env` (any envs.suites environment) from reset(seed), as an RLDS example:
  {'steps': [step dicts], 'episode_metadata': {...}} (the writer adds the episode's index)."""
  return run_episodes([env], [seed], noise, actions)[0]


def run_episodes(envs, seeds, noise: float, actions: bool = True) -> list[dict]:
  """Expert episodes of several envs, each from reset(its seed), reset and stepped together
  (`remote.reset_many`, `step_many`: Meta-World's worker processes run theirs in parallel). Each
  episode is the one run_episode gives: it depends only on its env's task and seed."""
  if len({id(env) for env in envs}) != len(envs):
    raise ValueError('run_episodes: each episode needs an env of its own')
  observations = remote.reset_many(list(zip(envs, seeds)))
  instructions = [env.instruction for env in envs]
  rngs = [np.random.default_rng([seed, 1]) for seed in seeds]   # the expert's noise, apart from the start
  steps, success = [[] for _ in envs], [False] * len(envs)
  running = list(range(len(envs)))
  while running:
    moves = [(i, envs[i].expert_action(rngs[i], noise)) for i in running]
    for i, action in moves:
      steps[i].append({'observation': observations[i], 'action': action})
    results = remote.step_many([(envs[i], action) for i, action in moves])
    for (i, _), (observation, _, _, info) in zip(moves, results):
      observations[i], success[i] = observation, info['success']
    running = [i for (i, _), (_, _, done, _) in zip(moves, results) if not done]
  return [_finish(episode, observation, instruction, solved, env.task, seed, actions)
          for episode, observation, instruction, solved, env, seed
          in zip(steps, observations, instructions, success, envs, seeds)]


def _finish(steps: list[dict], observation, instruction: str, success: bool, task: str, seed: int,
            actions: bool) -> dict:
  """Adds the final step (the last observation, a zero move) and the RLDS step fields."""
  final = np.zeros_like(steps[-1]['action'])
  final[6] = steps[-1]['action'][6]   # a zero move; the gripper stays as it was
  steps.append({'observation': observation, 'action': final})
  last = len(steps) - 1
  for index, step in enumerate(steps):
    step.update(language_instruction=instruction, is_first=index == 0, is_last=index == last,
                is_terminal=index == last and success, reward=float(index == last and success),
                discount=1.0)
    if not actions:   # the expert drives the hand too, but human videos carry no actions
      del step['action']
  return {'steps': steps, 'episode_metadata': {'seed': seed, 'task': task, 'success': success}}


def rollout(embodiment: str, seed: int, image_size: int = 64, max_steps: int = world.MAX_STEPS,
            noise: float = expert.NOISE) -> dict:
  """One expert episode of the built-in world (the hand's without actions)."""
  return run_episode(TabletopEnv(embodiment, image_size, max_steps), seed, noise, actions=embodiment == 'robot')


@dataclasses.dataclass(frozen=True)
class Settings:
  """Everything that decides the dataset's content."""
  embodiment: str
  episodes: int
  seed: int = 0
  image_size: int = 64
  max_steps: int | None = None    # None: the env's own limit (world 80, Meta-World 125 control steps)
  val_fraction: float = 0.1
  noise: float | None = None      # None: the env's expert default (world 0.3, Meta-World 0.1)
  env: str = 'world'

  @functools.cached_property
  def suite(self) -> suites.Suite:
    return suites.parse(self.env)

  @property
  def metaworld(self) -> bool:
    return self.suite.family == 'metaworld'

  @property
  def steps_limit(self) -> int:
    return self.max_steps or self.suite.max_steps

  @property
  def expert_noise(self) -> float:
    if self.noise is not None:
      return self.noise
    if self.metaworld:
      from lapa_jax.envs import metaworld
      return metaworld.NOISE
    return expert.NOISE

  @property
  def actions(self) -> bool:
    return self.embodiment == 'robot'

  @property
  def name(self) -> str:
    return dataset_name(self.embodiment, self.env)

  def check(self) -> None:
    """One-line errors naming the argument, before any work."""
    if self.metaworld:
      _check_metaworld_embodiment(self.embodiment)
      if self.image_size not in (64, 128, 256):
        raise ValueError(f'image_size: Meta-World renders 64, 128 or 256 pixels, got {self.image_size}')
    else:
      render.check_embodiment(self.embodiment)
      render.check_image_size(self.image_size)
    for name in ('episodes', 'seed', 'steps_limit'):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f'{name}: expected an integer, got {value!r}')
    if self.episodes < 2:
      raise ValueError(f'episodes: expected at least 2 (one train and one val episode), got {self.episodes}')
    if self.seed < 0:
      raise ValueError(f'seed: expected a non-negative integer, got {self.seed}')
    if self.steps_limit < 2:
      raise ValueError(f'max_steps: expected at least 2, got {self.steps_limit}')
    if not 0.0 < self.val_fraction < 1.0:
      raise ValueError(f'val_fraction: expected a number in (0, 1), got {self.val_fraction}')
    if not 0.0 <= self.expert_noise <= 10.0:
      raise ValueError(f'noise: expected a number in [0, 10], got {self.expert_noise}')

  @property
  def num_val(self) -> int:
    return min(max(1, round(self.episodes * self.val_fraction)), self.episodes - 1)

  def description(self) -> str:
    if self.metaworld:
      from lapa_jax.envs import metaworld
      kind = ('a Sawyer arm; actions are [dx, dy, dz, 0, 0, 0, gripper]: hand displacement in metres per '
              f'control step (|d| <= {metaworld.ACTION_REPEAT / 100}), gripper 1 = open, 0 = closed'
              if self.actions else 'the Sawyer arm, video only, no actions (like action-free videos)')
      return (f'Meta-World (MuJoCo) tasks {", ".join(self.suite.tasks)}, embodiment {self.embodiment!r}: {kind}. '
              f'Control rate {self.suite.fps:g} Hz (fps = {self.suite.fps:g}; {metaworld.ACTION_REPEAT} simulator '
              f'steps of {metaworld.SIM_FPS} Hz each). Meta-World\'s scripted experts with Gaussian noise '
              f'{self.expert_noise} on their [-1, 1] actions; {self.episodes} episodes from seed {self.seed}, '
              f'camera {metaworld.CAMERA}, images {self.image_size}x{self.image_size} JPEG, at most '
              f'{self.steps_limit} actions per episode.')
    kind = ('a gripper-like robot effector; actions are [dx, dy, 0, 0, 0, 0, gripper] in table units '
            f'per step (|dx|, |dy| <= {world.MAX_STEP}), gripper constant {world.GRIPPER_CLOSED}'
            if self.embodiment == 'robot' else
            'a human hand on a wooden table; video only, no actions (like human videos)')
    return (f'lapa_jax built-in tabletop world, embodiment {self.embodiment!r}: {kind}. '
            f'Control rate {world.FPS} Hz (fps = {world.FPS}). Scripted expert with noise '
            f'{self.expert_noise}; {self.episodes} episodes from seed {self.seed}, images '
            f'{self.image_size}x{self.image_size} JPEG, at most {self.steps_limit} actions per episode. '
            f'Tasks: {", ".join(world.TASK_KINDS)}.')

  def spec(self) -> dict:
    """lapa_spec.json: how lapa_jax's Open-X layer (data/oxe.py spec_from_metadata) reads it."""
    if self.metaworld:
      from lapa_jax.envs import metaworld
      return metaworld.dataset_spec(self.actions)
    spec = {'fps': float(world.FPS), 'image_key': 'observation/image',
            'instruction_key': 'language_instruction',
            'embodiment': 'robot' if self.embodiment == 'robot' else 'human',
            # The hand moves at the robot's speed in this world, so both pair frames 0.6 s apart
            # (not the 2.4 s default for human video) and a latent action means the same motion.
            'frame_offset_seconds': PAIR_SECONDS}
    if self.embodiment == 'robot':
      spec['action_key'] = 'action'
    return spec

  def metadata(self) -> dict:
    common = {'fps': self.suite.fps, 'embodiment': self.embodiment, 'seed': self.seed,
              'image_size': self.image_size, 'max_steps': self.steps_limit, 'noise': self.expert_noise}
    if self.metaworld:
      from lapa_jax.envs import metaworld
      return {**common, 'env': 'metaworld', 'tasks': list(self.suite.tasks), 'camera': metaworld.CAMERA,
              'action_repeat': metaworld.ACTION_REPEAT, 'action_convention': '[dx, dy, dz, 0, 0, 0, gripper]'}
    return {**common, 'env': 'world', 'max_step': world.MAX_STEP, 'action_convention': '[dx, dy, 0, 0, 0, 0, gripper]',
            'task_kinds': list(world.TASK_KINDS)}


def features(settings: Settings):
  """The RLDS features of the dataset (the robot's steps also carry the action)."""
  # TFDS is imported here so that `lapa --help` and the world itself stay free of TensorFlow.
  import tensorflow_datasets as tfds

  size = settings.image_size
  camera = 'Meta-World corner camera RGB.' if settings.metaworld else 'Top-down camera RGB.'
  step = {
      'observation': tfds.features.FeaturesDict({
          'image': tfds.features.Image(shape=(size, size, 3), dtype=np.uint8, encoding_format='jpeg', doc=camera)}),
      'language_instruction': tfds.features.Text(doc='Language instruction.'),
      'reward': tfds.features.Scalar(np.float32, doc='1 on the last step if the task was solved.'),
      'discount': tfds.features.Scalar(np.float32, doc='Always 1.'),
      'is_first': tfds.features.Scalar(np.bool_),
      'is_last': tfds.features.Scalar(np.bool_),
      'is_terminal': tfds.features.Scalar(np.bool_)}
  if settings.actions:
    step['action'] = tfds.features.Tensor(
        shape=(world.ACTION_DIM,), dtype=np.float32,
        doc='[dx, dy, dz, 0, 0, 0, gripper]: hand displacement in metres per control step, gripper 1 = open.'
        if settings.metaworld else '[dx, dy, 0, 0, 0, 0, gripper]: effector displacement in table units per step.')
  tasks = settings.suite.tasks if settings.metaworld else world.TASK_KINDS
  return tfds.features.FeaturesDict({
      'steps': tfds.features.Dataset(step),
      'episode_metadata': tfds.features.FeaturesDict({
          'episode_id': tfds.features.Scalar(np.int64, doc='Index of the episode in the dataset.'),
          'seed': tfds.features.Scalar(np.int64, doc='The env\'s reset(seed) replays this episode.'),
          'task': tfds.features.Text(doc=f'Task, one of {", ".join(tasks)}.'),
          'success': tfds.features.Scalar(np.bool_, doc='Whether the expert solved the task.'),
      })})


def expert_episodes(settings: Settings, indices):
  """The expert episodes `indices` of the dataset, each with its index in episode_metadata. Meta-World
  runs as many episodes at once as there are worker processes (consecutive indices are different
  tasks, so each has its task's env); the built-in world, in-process, runs one at a time."""
  together = remote.default_workers() if settings.metaworld else 1
  indices = list(indices)
  envs = {}
  try:
    for start in range(0, len(indices), together):
      chunk = indices[start:start + together]
      keys, seeds = [], []
      for index in chunk:
        if settings.metaworld:
          task = settings.suite.tasks[index % len(settings.suite.tasks)]
          seeds.append(metaworld_seed(settings.seed, settings.embodiment, index // len(settings.suite.tasks)))
        else:
          task = None
          seeds.append(episode_seed(settings.seed, settings.embodiment, index))
        keys.append((task, sum(key[0] == task for key in keys)))  # a task twice in a chunk: a second env
      for key in keys:   # one env per Meta-World task (a MuJoCo model and a renderer), reused
        if key not in envs:
          envs[key] = (settings.suite.make(key[0], image_size=settings.image_size, max_steps=settings.steps_limit)
                       if settings.metaworld else
                       TabletopEnv(settings.embodiment, settings.image_size, settings.steps_limit))
      episodes = run_episodes([envs[key] for key in keys], seeds, settings.expert_noise, actions=settings.actions)
      for index, episode in zip(chunk, episodes):
        episode['episode_metadata']['episode_id'] = index
        yield episode
  finally:
    for env in envs.values():
      env.close()


def write_dataset(out_dir: str, embodiment: str = 'robot', episodes: int = 100, seed: int = 0,
                  image_size: int = 64, max_steps: int | None = None, val_fraction: float = 0.1,
                  noise: float | None = None, episodes_per_shard: int = 100, env: str = 'world') -> str:
  """Writes the dataset and returns the versioned directory `out_dir/<name>/<version>`.

  It is built in a temporary directory and renamed when complete; an existing dataset at the
  destination is an error, never overwritten.
  """
  settings = Settings(embodiment, episodes, seed, image_size, max_steps, val_fraction, noise, env)
  settings.check()
  if os.path.exists(out_dir) and not os.path.isdir(out_dir):
    raise ValueError(f'out: {out_dir!r} exists and is not a directory')
  from lapa_jax.data import rlds  # TensorFlow, only when writing

  name = settings.name
  num_train = settings.episodes - settings.num_val
  solved = []

  def expert_success(episode: dict) -> dict:
    solved.append(episode['episode_metadata']['success'])
    return {'expert_success': f'{np.mean(solved):.0%}'}

  return rlds.write_dataset(
      os.path.join(out_dir, name, DATASET_VERSION), name=name, version=DATASET_VERSION,
      features=features(settings), description=settings.description(), metadata=settings.metadata(),
      extra_files={SPEC_FILE: settings.spec()}, total=settings.episodes, postfix=expert_success,
      episodes_per_shard=episodes_per_shard,
      splits={'train': expert_episodes(settings, range(num_train)),
              'val': expert_episodes(settings, range(num_train, settings.episodes))})


def _parse_args(argv: list[str]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      prog='lapa world',
      description='Write scripted-expert episodes of the built-in tabletop world or of Meta-World tasks as an '
                  'RLDS dataset DIR/<name>/1.0.0 with train and val splits.')
  parser.add_argument('--env', default='world',
                      help='world (default) or metaworld:<mt10|mt3|task,task,...> (pip install -e .[metaworld])')
  parser.add_argument('--embodiment', required=True, choices=render.EMBODIMENTS + ('video',),
                      help='robot: episodes carry actions; hand (world): a human hand, video only; '
                           'video (Meta-World): the arm, video only')
  parser.add_argument('--episodes', required=True, type=int,
                      help='number of episodes (>= 2); Meta-World takes its tasks in turn')
  parser.add_argument('--out', required=True, help='output data directory')
  parser.add_argument('--seed', type=int, default=0, help='base seed (default 0)')
  parser.add_argument('--image-size', type=int, default=64,
                      help=f'square image side in pixels, world {render.MIN_IMAGE_SIZE}..{render.MAX_IMAGE_SIZE}, '
                           'Meta-World 64, 128 or 256 (default 64)')
  parser.add_argument('--max-steps', type=int, default=None,
                      help=f'most actions per episode (default: world {world.MAX_STEPS}, Meta-World 125)')
  parser.add_argument('--val-fraction', type=float, default=0.1,
                      help='fraction of episodes in the val split (default 0.1, at least 1 episode)')
  parser.add_argument('--noise', type=float, default=None,
                      help='expert action noise: std as a fraction of the largest step (default: world '
                           f'{expert.NOISE}, Meta-World 0.1)')
  return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
  args = _parse_args(sys.argv[1:] if argv is None else argv)
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')   # TensorFlow's start-up INFO lines
  try:
    path = write_dataset(args.out, args.embodiment, args.episodes, args.seed, args.image_size,
                         args.max_steps, args.val_fraction, args.noise, env=args.env)
  except (ImportError, OSError, ValueError) as error:
    print(f'lapa world: error: {error}', file=sys.stderr)
    return 2
  print(path)
  return 0


if __name__ == '__main__':
  sys.exit(main())
