"""Writes scripted-expert episodes of the built-in world as an RLDS dataset laid out like Open-X.

    lapa world --embodiment robot|hand --episodes N --out DIR [--seed S] [--image-size 64]
               [--max-steps 80] [--val-fraction 0.1] [--noise 0.3]

gives `DIR/lapa_world_<embodiment>/1.0.0/` (dataset_info.json, features.json, metadata.json,
lapa_spec.json, tfrecord shards, splits `train` and `val`), readable offline with
`tfds.builder_from_directory`. Each step holds `observation/image` (JPEG, like Open-X),
`language_instruction` (step-level, like Bridge), `is_first/is_last/is_terminal`, `reward`,
`discount` and, for the robot only, `action` float32 (7,) `[dx, dy, 0, 0, 0, 0, gripper]`; the hand
embodiment is video only, like human videos. `episode_metadata` holds the episode index, the seed
that `TabletopEnv.reset` replays it from, the task kind and the expert's success. The control rate
(`world.FPS` steps per second) is in the description and in `builder.info.metadata['fps']`.

Step semantics follow the Open-X converted datasets: the action of step t is taken after
observation t; the last step holds the final observation, a zero action, reward 1 if the task
was solved, and is_terminal = success (an unsolved episode is truncated).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

import numpy as np

from lapa_jax.envs import expert, render, world
from lapa_jax.envs.env import TabletopEnv

DATASET_VERSION = '1.0.0'
PAIR_SECONDS = 0.6            # LAQ frame-pair window for both embodiments
SPEC_FILE = 'lapa_spec.json'   # read by lapa_jax.data.oxe.spec_from_metadata


def dataset_name(embodiment: str) -> str:
  render.check_embodiment(embodiment)
  return f'lapa_world_{embodiment}'


def episode_seed(seed: int, embodiment: str, index: int) -> int:
  """The reset seed of one episode; the embodiment is mixed in so that robot and hand datasets
  written with the same --seed show different episodes, like unrelated robot and human videos."""
  entropy = [seed, render.EMBODIMENTS.index(embodiment), index]
  return int(np.random.SeedSequence(entropy).generate_state(1)[0])


def rollout(embodiment: str, seed: int, image_size: int = 64, max_steps: int = world.MAX_STEPS,
            noise: float = expert.NOISE) -> dict:
  """One expert episode as an RLDS example: {'steps': [step dicts], 'episode_metadata': {...}}
  (the writer adds the episode's index to the metadata)."""
  env = TabletopEnv(embodiment, image_size, max_steps)
  observation = env.reset(seed)
  instruction = env.instruction
  rng = np.random.default_rng([seed, 1])   # the expert's noise, apart from the world's layout
  steps, done, success = [], False, False
  while not done:
    action = env.expert_action(rng, noise)
    steps.append({'observation': observation, 'action': action})
    observation, _, done, info = env.step(action)
    success = info['success']
  steps.append({'observation': observation, 'action': world.openx_action(np.zeros(2))})
  last = len(steps) - 1
  for index, step in enumerate(steps):
    step.update(language_instruction=instruction, is_first=index == 0, is_last=index == last,
                is_terminal=index == last and success, reward=float(index == last and success),
                discount=1.0)
    if embodiment == 'hand':   # the expert drives the hand too, but human videos carry no actions
      del step['action']
  return {'steps': steps,
          'episode_metadata': {'seed': seed, 'task': env.state.task.kind, 'success': success}}


@dataclasses.dataclass(frozen=True)
class Settings:
  """Everything that decides the dataset's content."""
  embodiment: str
  episodes: int
  seed: int = 0
  image_size: int = 64
  max_steps: int = world.MAX_STEPS
  val_fraction: float = 0.1
  noise: float = expert.NOISE

  def check(self) -> None:
    """One-line errors naming the argument, before any work."""
    render.check_embodiment(self.embodiment)
    render.check_image_size(self.image_size)
    for name in ('episodes', 'seed', 'max_steps'):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f'{name}: expected an integer, got {value!r}')
    if self.episodes < 2:
      raise ValueError(f'episodes: expected at least 2 (one train and one val episode), got {self.episodes}')
    if self.seed < 0:
      raise ValueError(f'seed: expected a non-negative integer, got {self.seed}')
    if self.max_steps < 2:
      raise ValueError(f'max_steps: expected at least 2, got {self.max_steps}')
    if not 0.0 < self.val_fraction < 1.0:
      raise ValueError(f'val_fraction: expected a number in (0, 1), got {self.val_fraction}')
    if not 0.0 <= self.noise <= 10.0:
      raise ValueError(f'noise: expected a number in [0, 10] (fraction of the largest step), got {self.noise}')

  @property
  def num_val(self) -> int:
    return min(max(1, round(self.episodes * self.val_fraction)), self.episodes - 1)

  def description(self) -> str:
    kind = ('a gripper-like robot effector; actions are [dx, dy, 0, 0, 0, 0, gripper] in table units '
            f'per step (|dx|, |dy| <= {world.MAX_STEP}), gripper constant {world.GRIPPER_CLOSED}'
            if self.embodiment == 'robot' else
            'a human hand on a wooden table; video only, no actions (like human videos)')
    return (f'lapa_jax built-in tabletop world, embodiment {self.embodiment!r}: {kind}. '
            f'Control rate {world.FPS} Hz (fps = {world.FPS}). Scripted expert with noise '
            f'{self.noise}; {self.episodes} episodes from seed {self.seed}, images '
            f'{self.image_size}x{self.image_size} JPEG, at most {self.max_steps} actions per episode. '
            f'Tasks: {", ".join(world.TASK_KINDS)}.')

  def spec(self) -> dict:
    """lapa_spec.json: how lapa_jax's Open-X layer (data/oxe.py spec_from_metadata) reads it."""
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
    return {'fps': world.FPS, 'embodiment': self.embodiment, 'seed': self.seed,
            'image_size': self.image_size, 'max_steps': self.max_steps, 'noise': self.noise,
            'max_step': world.MAX_STEP, 'action_convention': '[dx, dy, 0, 0, 0, 0, gripper]',
            'task_kinds': list(world.TASK_KINDS)}


def features(settings: Settings):
  """The RLDS features of the dataset (the robot's steps also carry the action)."""
  # TFDS is imported here so that `lapa --help` and the world itself stay free of TensorFlow.
  import tensorflow_datasets as tfds

  size = settings.image_size
  step = {
      'observation': tfds.features.FeaturesDict({
          'image': tfds.features.Image(shape=(size, size, 3), dtype=np.uint8, encoding_format='jpeg',
                                       doc='Top-down camera RGB.')}),
      'language_instruction': tfds.features.Text(doc='Language instruction.'),
      'reward': tfds.features.Scalar(np.float32, doc='1 on the last step if the task was solved.'),
      'discount': tfds.features.Scalar(np.float32, doc='Always 1.'),
      'is_first': tfds.features.Scalar(np.bool_),
      'is_last': tfds.features.Scalar(np.bool_),
      'is_terminal': tfds.features.Scalar(np.bool_)}
  if settings.embodiment == 'robot':
    step['action'] = tfds.features.Tensor(
        shape=(world.ACTION_DIM,), dtype=np.float32,
        doc='[dx, dy, 0, 0, 0, 0, gripper]: effector displacement in table units per step.')
  return tfds.features.FeaturesDict({
      'steps': tfds.features.Dataset(step),
      'episode_metadata': tfds.features.FeaturesDict({
          'episode_id': tfds.features.Scalar(np.int64, doc='Index of the episode in the dataset.'),
          'seed': tfds.features.Scalar(np.int64, doc='TabletopEnv.reset(seed) replays this episode.'),
          'task': tfds.features.Text(doc=f'Task kind, one of {", ".join(world.TASK_KINDS)}.'),
          'success': tfds.features.Scalar(np.bool_, doc='Whether the expert solved the task.'),
      })})


def expert_episodes(settings: Settings, indices):
  """The expert episodes `indices` of the dataset, each with its index in episode_metadata."""
  for index in indices:
    seed = episode_seed(settings.seed, settings.embodiment, index)
    episode = rollout(settings.embodiment, seed, settings.image_size, settings.max_steps, settings.noise)
    episode['episode_metadata']['episode_id'] = index
    yield episode


def write_dataset(out_dir: str, embodiment: str = 'robot', episodes: int = 100, seed: int = 0,
                  image_size: int = 64, max_steps: int = world.MAX_STEPS,
                  val_fraction: float = 0.1, noise: float = expert.NOISE, episodes_per_shard: int = 100) -> str:
  """Writes the dataset and returns the versioned directory `out_dir/<name>/<version>`.

  It is built in a temporary directory and renamed when complete; an existing dataset at the
  destination is an error, never overwritten.
  """
  settings = Settings(embodiment, episodes, seed, image_size, max_steps, val_fraction, noise)
  settings.check()
  if os.path.exists(out_dir) and not os.path.isdir(out_dir):
    raise ValueError(f'out: {out_dir!r} exists and is not a directory')
  from lapa_jax.data import rlds  # TensorFlow, only when writing

  name = dataset_name(embodiment)
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
      description='Write built-in tabletop world episodes (scripted expert) as an RLDS dataset '
                  'DIR/lapa_world_<embodiment>/1.0.0 with train and val splits.')
  parser.add_argument('--embodiment', required=True, choices=render.EMBODIMENTS,
                      help='robot: gripper, episodes carry actions; hand: human hand, video only')
  parser.add_argument('--episodes', required=True, type=int, help='number of episodes (>= 2)')
  parser.add_argument('--out', required=True, help='output data directory')
  parser.add_argument('--seed', type=int, default=0, help='base seed (default 0)')
  parser.add_argument('--image-size', type=int, default=64,
                      help=f'square image side in pixels, {render.MIN_IMAGE_SIZE}..'
                           f'{render.MAX_IMAGE_SIZE} (default 64)')
  parser.add_argument('--max-steps', type=int, default=world.MAX_STEPS,
                      help=f'most actions per episode (default {world.MAX_STEPS})')
  parser.add_argument('--val-fraction', type=float, default=0.1,
                      help='fraction of episodes in the val split (default 0.1, at least 1 episode)')
  parser.add_argument('--noise', type=float, default=expert.NOISE,
                      help='expert action noise, std as a fraction of the largest step '
                           f'(default {expert.NOISE})')
  return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
  args = _parse_args(sys.argv[1:] if argv is None else argv)
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')   # TensorFlow's start-up INFO lines
  try:
    path = write_dataset(args.out, args.embodiment, args.episodes, args.seed, args.image_size,
                         args.max_steps, args.val_fraction, args.noise)
  except ValueError as error:
    print(f'lapa world: error: {error}', file=sys.stderr)
    return 2
  print(path)
  return 0


if __name__ == '__main__':
  sys.exit(main())
