"""Batch evaluation of VLA checkpoints: held-out metrics, closed-loop success in the built-in world
or on Meta-World, and imagined rollouts of latent-pretrained models.

    lapa evaluate runs/lapa runs/scratch --out eval/                  # each workdir's latest checkpoint
    lapa evaluate 'runs/*' runs/lapa@300 --out eval/ --episodes 20    # globs; @STEP picks a checkpoint
    lapa evaluate --watch runs/lapa --out eval/                       # every new checkpoint as it appears
    lapa evaluate runs/mw_lapa --env metaworld:mt10 --out eval_mw/    # Meta-World, success per task

For every checkpoint (policy.py loads it):
  offline      on held-out steps of the run's own data (config.eval.split): action-token accuracy
               and L1 of the decoded actions per dimension (finetuned runs), or latent-token accuracy
               (latent-pretrained runs), of what the policy generates;
  closed loop  (action policies) `--episodes` episodes per task (a kind of the built-in world, or a
               Meta-World task with --env metaworld:...), the same seeds for every checkpoint; all
               environments step together (Meta-World's in worker processes, in parallel), so the
               policy sees one batch per control step. Per task: success rate with a 95% Wilson
               interval, and progress, 1 - final / initial distance of the task's object to its goal
               (1 on success);
  imagined     (latent policies whose LAQ is at hand) from an episode's first frame, the model's latent
               action is decoded by the LAQ decoder into the frame H steps later, again and again,
               beside the scripted expert's real episode (the paper's latent world-model figure).

Outputs in --out: results.jsonl (one line per checkpoint and task kind, plus one 'offline' line;
lines already there are skipped, so an interrupted evaluation resumes), results.md (a table),
success.png (success per task kind per checkpoint with 95% intervals), gifs/ (the first --gifs
rollouts per task kind, with the instruction written on them), imagined/ (side-by-side GIFs).
Several processes (jax.distributed) split the episodes; process 0 gathers and writes the results.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import math
import os
import pathlib
import sys
import time
from typing import Any, Sequence

import jax
import numpy as np
import tqdm
from jax.experimental import multihost_utils

from lapa_jax import checkpoint
from lapa_jax.envs import remote, suites, world
from lapa_jax.policy import Policy, resize_uint8

RESULTS, TABLE, PLOT = 'results.jsonl', 'results.md', 'success.png'
OFFLINE = 'offline'


@dataclasses.dataclass(frozen=True)
class Checkpoint:
  workdir: str
  step: int
  label: str = ''  # how tables name the run: its directory's name, with parents where that is ambiguous

  @property
  def name(self) -> str:
    return f'{self.label or os.path.basename(os.path.normpath(self.workdir))}@{self.step}'

  @property
  def file_name(self) -> str:
    return self.name.replace(os.sep, '_')


def _labels(workdirs: Sequence[str]) -> dict[str, str]:
  """The shortest trailing part of each path that tells it from the others (seed0/lapa, seed1/lapa)."""
  parts = {workdir: pathlib.PurePath(workdir).parts for workdir in workdirs}
  labels = {}
  for workdir, own in parts.items():
    for depth in range(1, len(own) + 1):
      suffix = own[-depth:]
      if all(other[-depth:] != suffix for path, other in parts.items() if path != workdir):
        break
    labels[workdir] = os.path.join(*suffix)
  return labels


def find_checkpoints(patterns: Sequence[str]) -> list[Checkpoint]:
  """Workdirs (globs allowed) at their latest checkpoint, or WORKDIR@STEP; one-line errors."""
  found = []
  for pattern in patterns:
    path, _, step = pattern.partition('@')
    workdirs = sorted(glob.glob(path)) or [path]
    for workdir in workdirs:
      if not os.path.isfile(os.path.join(workdir, 'config.json')):
        if workdir == path:  # an explicit path, not a glob match that happens to be another file
          raise FileNotFoundError(f'{workdir}: not a training workdir (no config.json)')
        continue
      steps = _steps(workdir)
      if not steps:
        raise FileNotFoundError(f'{workdir}: no checkpoint yet')
      if step and int(step) not in steps:
        raise FileNotFoundError(f'{workdir}: no checkpoint at step {step} (has {steps})')
      found.append(Checkpoint(os.path.abspath(workdir), int(step) if step else steps[-1]))
  labels = _labels(sorted({ckpt.workdir for ckpt in found}))
  return [dataclasses.replace(ckpt, label=labels[ckpt.workdir]) for ckpt in found]


def _steps(workdir: str) -> list[int]:
  with checkpoint.Checkpointer(checkpoint.directory_in(workdir), read_only=True) as checkpoints:
    return sorted(checkpoints.all_steps())


# ------------------------------------------------------------------------------------ closed loop

@dataclasses.dataclass
class Episode:
  kind: str
  seed: int
  instruction: str = ''
  success: bool = False
  steps: int = 0
  start_distance: float = 0.0
  final_distance: float = 0.0
  frames: list | None = None

  @property
  def progress(self) -> float:
    """1 - final / initial distance to the goal; success itself where the task has no distance."""
    if self.success or not (self.start_distance > 0 and math.isfinite(self.final_distance)):
      return float(self.success)
    return float(np.clip(1.0 - self.final_distance / self.start_distance, 0.0, 1.0))


def episode_seeds(kinds: Sequence[str], episodes: int, seed: int) -> list[tuple[str, int]]:
  """(task kind, seed) of every episode: the same list for every checkpoint."""
  return [(kind, seed + index) for kind in kinds for index in range(episodes)]


def rollouts(policy: Policy, specs: Sequence[tuple[str, int]], *, suite: suites.Suite = suites.parse('world'),
             image_size: int = 64, max_steps: int | None = None, record: Sequence[bool] = (),
             progress: bool = True) -> list[Episode]:
  """Runs the episodes `specs` (task, seed) of `suite` together: one policy call per control step for
  all of them. `record[i]` keeps episode i's frames."""
  max_steps = max_steps or suite.max_steps
  envs = [suite.make(kind, image_size=image_size, max_steps=max_steps) for kind, _ in specs]
  try:
    images = [obs['image'] for obs in remote.reset_many([(env, seed) for env, (_, seed) in zip(envs, specs)])]
    episodes = [Episode(kind, seed, env.instruction, start_distance=env.goal_distance(),
                        frames=[image] if index < len(record) and record[index] else None)
                for index, (env, (kind, seed), image) in enumerate(zip(envs, specs, images))]
    active = list(range(len(envs)))
    with tqdm.tqdm(total=max_steps, desc='closed loop', unit='step', disable=not progress or not envs) as bar:
      while active:
        actions = policy.infer({'image': np.stack([images[i] for i in active]),
                                'instruction': [episodes[i].instruction for i in active]})['actions']
        results = remote.step_many([(envs[i], action) for i, action in zip(active, actions)])
        for i, (obs, _, _, info) in zip(active, results):
          images[i] = obs['image']
          episodes[i].steps, episodes[i].success = info['step'], info['success']
          if episodes[i].frames is not None:
            episodes[i].frames.append(obs['image'])
        active = [i for i in active if not envs[i].done]
        bar.update(1)
    for env, episode in zip(envs, episodes):
      episode.final_distance = env.goal_distance()
  finally:
    for env in envs:
      env.close()
  return episodes


def wilson_interval(successes: int, trials: int, z: float = 1.96) -> tuple[float, float]:
  """95% Wilson score interval of a success rate (well-behaved at 0 and 1, unlike the normal one)."""
  if trials == 0:
    return 0.0, 1.0
  rate = successes / trials
  centre = (rate + z * z / (2 * trials)) / (1 + z * z / trials)
  half = z * math.sqrt(rate * (1 - rate) / trials + z * z / (4 * trials * trials)) / (1 + z * z / trials)
  return max(0.0, centre - half), min(1.0, centre + half)


def summarize(episodes: Sequence[Episode]) -> dict[str, Any]:
  successes = sum(e.success for e in episodes)
  low, high = wilson_interval(successes, len(episodes))
  distances = [e.final_distance for e in episodes if math.isfinite(e.final_distance)]  # none: the task has none
  return {'episodes': len(episodes), 'success': successes / max(len(episodes), 1), 'success_low': low,
          'success_high': high, 'progress': float(np.mean([e.progress for e in episodes])),
          'final_distance': float(np.mean(distances)) if distances else None,
          'steps': float(np.mean([e.steps for e in episodes]))}


def _gather(episodes: list[Episode], specs: Sequence[tuple[str, int]], mine: Sequence[int]) -> list[Episode]:
  """Every process's episodes (without frames) on every process; each ran the indices `mine` of `specs`."""
  if jax.process_count() == 1:
    return episodes
  table = np.zeros((len(specs), 4), np.float64)
  for index, episode in zip(mine, episodes):
    table[index] = episode.success, episode.steps, episode.start_distance, episode.final_distance
  # As int32 bits: JAX without x64 would round float64 to float32 on the way.
  gathered = multihost_utils.process_allgather(table.view(np.int32)).view(np.float64)  # (processes, episodes, 4)
  table = gathered[np.arange(len(specs)) % jax.process_count(), np.arange(len(specs))]
  return [Episode(kind, seed, success=bool(row[0]), steps=int(row[1]), start_distance=float(row[2]),
                  final_distance=float(row[3])) for (kind, seed), row in zip(specs, table)]


def closed_loop(policy: Policy, kinds: Sequence[str], episodes: int, seed: int, *, gifs: int = 0,
                suite: suites.Suite = suites.parse('world'), image_size: int = 64,
                max_steps: int | None = None) -> tuple[dict[str, dict], list[Episode]]:
  """({task: summarize(...)}, this process's recorded episodes) over `episodes` per task of `suite`."""
  specs = episode_seeds(kinds, episodes, seed)
  mine = list(range(jax.process_index(), len(specs), jax.process_count()))
  record = [index % episodes < gifs for index in mine]
  local = rollouts(policy, [specs[i] for i in mine], suite=suite, image_size=image_size, max_steps=max_steps,
                   record=record, progress=jax.process_index() == 0)
  every = _gather(local, specs, mine)
  by_kind = {kind: [e for (k, _), e in zip(specs, every) if k == kind] for kind in kinds}
  return {kind: summarize(found) for kind, found in by_kind.items()}, [e for e in local if e.frames]


# --------------------------------------------------------------------------------------- offline

def offline(policy: Policy, batches: int, batch_size: int) -> dict[str, float]:
  """What the policy generates on held-out steps of its own data, against their labels."""
  from lapa_jax.data import pipelines
  from lapa_jax.train import data as data_lib

  config = policy.config
  if not config.eval.split or batches < 1:
    return {}
  latent = policy.kind == 'latent'
  data = data_lib.for_split(config.data, config.eval.split)
  steps = pipelines.step_iterator(data, image_size=policy.image_size, batch_size=batch_size, actions=not latent,
                                  step_keys=('latent_action',) if latent else (), seed=0, progress=False)
  correct, l1, count = 0.0, np.zeros(7), 0
  try:
    for _ in range(batches):
      batch = next(steps)
      instructions = [bytes(text).decode('utf-8', 'replace') for text in batch['instruction']]
      out = policy.infer({'image': batch['image'], 'instruction': instructions})
      if latent:
        correct += float(np.sum(out['latent_action'] == batch['latent_action']))
      else:
        correct += float(np.sum(out['action_ids'] == policy.bins.encode(batch['action'])))
        l1 += np.abs(out['actions'] - batch['action']).sum(axis=0)
      count += len(instructions)
  finally:
    steps.close()
  if latent:
    return {'latent_accuracy': correct / (count * policy.num_tokens), 'examples': count}
  per_dim = l1 / count
  return {'action_accuracy': correct / (count * 7), 'action_l1': float(per_dim.mean()),
          **{f'action_l1_dim{dim}': float(value) for dim, value in enumerate(per_dim)}, 'examples': count}


# -------------------------------------------------------------------------------------- imagined

def imagined_rollout(policy: Policy, seed: int, kind: str, chunks: int = 8, image_size: int = 64,
                     suite: suites.Suite = suites.parse('world')) -> tuple[str, list[np.ndarray], list[np.ndarray]]:
  """(instruction, real frames, imagined frames) of one episode: the expert's frames every H steps,
  and from the same first frame, the LAQ decoder applied to the policy's latent actions."""
  from lapa_jax import laq_infer
  from lapa_jax import sharding

  laq = policy.laq
  mesh = sharding.make_mesh('1,1,1', jax.local_devices()[:1])
  laq_config, model, params = laq_infer.load_laq(laq['workdir'], mesh, laq['step'])
  size = int(laq_config.model.image_size)
  decode = jax.jit(lambda p, frame, codes: model.apply({'params': p}, frame, codes, method=model.decode_codes))
  env = suite.make(kind, image_size=image_size)
  try:
    frame = resize_uint8(env.reset(seed)['image'], size)
    real, imagined = [frame], [frame]
    rng = np.random.default_rng(seed)
    for _ in range(chunks):
      for _ in range(int(laq['frame_offset'])):
        if not env.done:
          frame = resize_uint8(env.step(env.expert_action(rng))[0]['image'], size)
      real.append(frame)
      codes = policy.infer({'image': imagined[-1], 'instruction': env.instruction})['latent_action']
      predicted = np.asarray(decode(params, imagined[-1][None].astype(np.float32) / 255.0, codes[None]))[0]
      imagined.append((np.clip(predicted, 0.0, 1.0) * 255).round().astype(np.uint8))
  finally:
    env.close()
  return env.instruction, real, imagined


# ------------------------------------------------------------------------------------ the outputs

def _caption(frames: Sequence[np.ndarray], text: str, scale: int = 3, border: tuple | None = None):
  from PIL import Image, ImageDraw

  pictures = []
  for frame in frames:
    image = Image.fromarray(frame).resize((frame.shape[1] * scale, frame.shape[0] * scale), Image.NEAREST)
    canvas = Image.new('RGB', (image.width, image.height + 16), (255, 255, 255))
    canvas.paste(image, (0, 16))
    ImageDraw.Draw(canvas).text((2, 2), text, fill=(0, 0, 0))
    pictures.append(canvas)
  if border is not None:
    ImageDraw.Draw(pictures[-1]).rectangle([0, 16, pictures[-1].width - 1, pictures[-1].height - 1],
                                           outline=border, width=3)
  return pictures


def write_gif(path: str, pictures: Sequence, frame_ms: int = 120) -> str:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  pictures[0].save(path + '.tmp', format='GIF', save_all=True, append_images=list(pictures[1:]),
                   duration=[frame_ms] * (len(pictures) - 1) + [frame_ms * 8], loop=0)
  os.replace(path + '.tmp', path)
  return path


def rollout_gif(path: str, episode: Episode) -> str:
  """The episode's frames, the instruction above them; the last frame framed green (success) or red."""
  return write_gif(path, _caption(episode.frames, episode.instruction,
                                  border=(0, 170, 0) if episode.success else (200, 0, 0)))


def imagined_gif(path: str, instruction: str, real: Sequence[np.ndarray], imagined: Sequence[np.ndarray]) -> str:
  from PIL import Image, ImageDraw

  left, right = _caption(real, 'real (expert)'), _caption(imagined, 'imagined (LAQ)')
  pictures = []
  for a, b in zip(left, right):
    canvas = Image.new('RGB', (a.width + b.width + 4, a.height + 16), (255, 255, 255))
    canvas.paste(a, (0, 16))
    canvas.paste(b, (a.width + 4, 16))
    ImageDraw.Draw(canvas).text((2, 2), instruction, fill=(0, 0, 0))
    pictures.append(canvas)
  return write_gif(path, pictures, frame_ms=400)


def read_results(out: str) -> list[dict]:
  path = os.path.join(out, RESULTS)
  if not os.path.isfile(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def append_result(out: str, record: dict) -> None:
  with open(os.path.join(out, RESULTS), 'a') as f:
    f.write(json.dumps(record) + '\n')


def _environments(closed: Sequence[dict]) -> dict[str, list[str]]:
  """{env label: its tasks in the order first evaluated}; records from before --env are the world's."""
  found = {}
  for r in closed:
    tasks = found.setdefault(r.get('env', 'built-in world'), [])
    if r['task_kind'] not in tasks:
      tasks.append(r['task_kind'])
  return found


def write_table(out: str, records: Sequence[dict]) -> str:
  """results.md: success (progress) per task per checkpoint, one table per environment, and the
  offline metrics."""
  closed = [r for r in records if r['task_kind'] != OFFLINE]
  names = list(dict.fromkeys(r['checkpoint'] for r in records))
  lines = ['# Evaluation', '']
  for env, kinds in _environments(closed).items():
    lines += [f'Closed-loop success [95% interval] (progress), {env}', '',
              '| checkpoint | ' + ' | '.join(kinds) + ' | mean |', '|---' * (len(kinds) + 2) + '|']
    for name in names:
      row = {r['task_kind']: r for r in closed if r['checkpoint'] == name and r.get('env', 'built-in world') == env}
      if not row:
        continue
      cells = [f"{row[k]['success']:.2f} [{row[k]['success_low']:.2f}, {row[k]['success_high']:.2f}] "
               f"({row[k]['progress']:.2f})" if k in row else '' for k in kinds]
      mean = np.mean([row[k]['success'] for k in kinds if k in row])
      lines.append(f'| {name} | ' + ' | '.join(cells) + f' | {mean:.2f} |')
    lines.append('')
  offline_rows = [r for r in records if r['task_kind'] == OFFLINE and r.get('examples')]
  if offline_rows:
    lines += ['', 'Held-out data (generated tokens against the labels)', '',
              '| checkpoint | action accuracy | action L1 | latent accuracy | examples |', '|---|---|---|---|---|']
    fmt = lambda r, key: f'{r[key]:.3f}' if key in r else ''
    for r in offline_rows:
      lines.append(f"| {r['checkpoint']} | {fmt(r, 'action_accuracy')} | {fmt(r, 'action_l1')} | "
                   f"{fmt(r, 'latent_accuracy')} | {r.get('examples', '')} |")
  path = os.path.join(out, TABLE)
  with open(path, 'w') as f:
    f.write('\n'.join(lines) + '\n')
  return path


def plot_success(out: str, records: Sequence[dict]) -> str | None:
  """success.png: bars of success per task kind, one colour per checkpoint, 95% Wilson intervals."""
  closed = [r for r in records if r['task_kind'] != OFFLINE]
  if not closed:
    return None
  import matplotlib
  matplotlib.use('Agg')
  from matplotlib import pyplot as plt

  kinds = [k for tasks in _environments(closed).values() for k in tasks]
  names = list(dict.fromkeys(r['checkpoint'] for r in closed))
  width = 0.8 / len(names)
  figure, axes = plt.subplots(figsize=(max(6, 1.6 * len(kinds) + 2), 3.6))
  for index, name in enumerate(names):
    rows = {r['task_kind']: r for r in closed if r['checkpoint'] == name}
    x = np.arange(len(kinds)) + (index - (len(names) - 1) / 2) * width
    rate = np.array([rows[k]['success'] if k in rows else np.nan for k in kinds])
    low = np.array([rows[k]['success_low'] if k in rows else np.nan for k in kinds])
    high = np.array([rows[k]['success_high'] if k in rows else np.nan for k in kinds])
    axes.bar(x, rate, width, yerr=[rate - low, high - rate], capsize=3, label=name)
  axes.set_xticks(np.arange(len(kinds)), [k.replace('_', ' ').removesuffix('-v3') for k in kinds],
                  rotation=30 if len(kinds) > 6 else 0, ha='right' if len(kinds) > 6 else 'center', fontsize=8)
  axes.set_ylim(0, 1)
  axes.set_ylabel('success rate (95% interval)')
  axes.legend(fontsize=7)
  figure.tight_layout()
  path = os.path.join(out, PLOT)
  figure.savefig(path, dpi=120)
  plt.close(figure)
  return path


# ---------------------------------------------------------------------------------------- driver

@dataclasses.dataclass(frozen=True)
class Settings:
  kinds: tuple[str, ...] = ()                 # the tasks of `env` to run (default: all of them)
  episodes: int = 10
  seed: int = 1000
  gifs: int = 1
  image_size: int = 64
  max_steps: int | None = None                # None: the env's own limit
  offline_batches: int = 4
  batch_size: int = 32
  imagined: int = 2
  env: str = 'world'

  @property
  def suite(self) -> suites.Suite:
    return suites.parse(self.env)

  @property
  def tasks(self) -> tuple[str, ...]:
    return self.kinds or self.suite.tasks


def evaluate_checkpoint(ckpt: Checkpoint, out: str, settings: Settings, done: set, **policy_options) -> list[dict]:
  """Evaluates what `done` ({(workdir, step, task kind)}) lacks; returns the new result records."""
  kinds = [k for k in settings.tasks if (ckpt.workdir, ckpt.step, k) not in done]
  wants_offline = (ckpt.workdir, ckpt.step, OFFLINE) not in done
  if not kinds and not wants_offline:
    return []
  lead = jax.process_index() == 0
  policy = Policy.from_checkpoint(ckpt.workdir, step=ckpt.step, **policy_options)
  base = {'checkpoint': ckpt.name, 'workdir': ckpt.workdir, 'step': ckpt.step, 'kind': policy.kind}
  records = []
  if wants_offline:
    found = offline(policy, settings.offline_batches, settings.batch_size) if lead else {}
    records.append({**base, 'task_kind': OFFLINE, **found})
  if policy.kind == 'action' and kinds:
    summaries, recorded = closed_loop(policy, kinds, settings.episodes, settings.seed, gifs=settings.gifs,
                                      suite=settings.suite, image_size=settings.image_size,
                                      max_steps=settings.max_steps)
    for episode in recorded:
      rollout_gif(os.path.join(out, 'gifs', f'{ckpt.file_name}_{episode.kind}_{episode.seed}.gif'), episode)
    records += [{**base, 'task_kind': kind, 'env': settings.suite.label,
                 'seeds': [settings.seed, settings.seed + settings.episodes - 1], **summary}
                for kind, summary in summaries.items()]
  elif policy.kind == 'latent' and settings.imagined:
    if policy.laq and os.path.isdir(policy.laq['workdir']):
      for index in range(settings.imagined):
        # Every process loads the LAQ (orbax restores are collective); process 0 writes.
        kind = settings.tasks[index % len(settings.tasks)]
        instruction, real, imagined = imagined_rollout(policy, settings.seed + index, kind,
                                                       image_size=settings.image_size, suite=settings.suite)
        if lead:
          imagined_gif(os.path.join(out, 'imagined', f'{ckpt.file_name}_{kind}_{settings.seed + index}.gif'),
                       instruction, real, imagined)
    elif lead:
      print(f'lapa evaluate: {ckpt.name}: its LAQ ({(policy.laq or {}).get("workdir")}) is not here; '
            'no imagined rollouts', file=sys.stderr)
  return records


def run(checkpoints: Sequence[Checkpoint], out: str, settings: Settings, **policy_options) -> list[dict]:
  """Evaluates `checkpoints` into `out` (skipping finished work); returns every record in `out`."""
  os.makedirs(out, exist_ok=True)
  records = read_results(out)
  done = {(r['workdir'], r['step'], r['task_kind']) for r in records}
  for ckpt in checkpoints:
    new = evaluate_checkpoint(ckpt, out, settings, done, **policy_options)
    if jax.process_index() == 0:
      for record in new:
        append_result(out, record)
        done.add((record['workdir'], record['step'], record['task_kind']))
      records += new
      write_table(out, records)
      plot_success(out, records)
      for record in new:
        if record['task_kind'] != OFFLINE:
          print(f"{record['checkpoint']:>24} {record['task_kind']:>15}: success {record['success']:.2f} "
                f"[{record['success_low']:.2f}, {record['success_high']:.2f}], progress {record['progress']:.2f}")
  return records


def watch(workdir: str, out: str, settings: Settings, *, poll_seconds: float, timeout_seconds: float,
          **policy_options) -> None:
  """Evaluates each new checkpoint of a training run until its last step (config total_steps) is
  done, or no new checkpoint came for `timeout_seconds`."""
  with open(os.path.join(workdir, 'config.json')) as f:
    total_steps = json.load(f).get('total_steps')
  seen, last_new = set(), time.time()
  while True:
    steps = [s for s in _steps(workdir) if s not in seen] if os.path.isdir(checkpoint.directory_in(workdir)) else []
    for step in steps:
      run([Checkpoint(os.path.abspath(workdir), step)], out, settings, **policy_options)
      seen.add(step)
      last_new = time.time()
    if total_steps in seen or time.time() - last_new > timeout_seconds:
      return
    time.sleep(poll_seconds)


def main(argv: list[str]) -> int:
  parser = argparse.ArgumentParser(
      prog='lapa evaluate', description='Held-out metrics, closed-loop success in the built-in world or on '
      'Meta-World, and imagined rollouts of VLA checkpoints; results.jsonl/.md, success.png and GIFs in --out '
      '(resumable).')
  parser.add_argument('checkpoints', nargs='*', help='workdirs (globs allowed), WORKDIR@STEP for one checkpoint')
  parser.add_argument('--watch', metavar='WORKDIR', help='evaluate each new checkpoint of this run as it appears')
  parser.add_argument('--out', required=True, help='output directory')
  parser.add_argument('--env', default='world',
                      help='world (default) or metaworld:<mt10|mt3|task,task,...> (pip install -e .[metaworld])')
  parser.add_argument('--episodes', type=int, default=10, help='closed-loop episodes per task (default 10)')
  parser.add_argument('--kinds', default='', help="tasks of --env, comma-separated (default: all the env's)")
  parser.add_argument('--seed', type=int, default=1000, help='seed of the first episode of each kind')
  parser.add_argument('--gifs', type=int, default=1, help='rollout GIFs per checkpoint and task kind')
  parser.add_argument('--max-steps', type=int, default=None,
                      help=f'episode length limit (default: world {world.MAX_STEPS}, Meta-World 125 control steps)')
  parser.add_argument('--image-size', type=int, default=64, help='camera images of the env (as `lapa world`)')
  parser.add_argument('--offline-batches', type=int, default=4, help='held-out batches (0: none)')
  parser.add_argument('--imagined', type=int, default=2, help='imagined rollouts per latent checkpoint')
  parser.add_argument('--temperature', type=float, default=0.0, help='0: greedy (default); > 0 samples')
  parser.add_argument('--top-k', type=int, default=0, help='sample from the k likeliest ids (with --temperature)')
  parser.add_argument('--poll', type=float, default=30.0, help='--watch: seconds between looks')
  parser.add_argument('--watch-timeout', type=float, default=3600.0,
                      help='--watch: stop after this many seconds without a new checkpoint')
  args = parser.parse_args(argv)
  try:
    suite = suites.parse(args.env)
    if args.kinds.strip():  # a subset, named as the env names its tasks
      kinds = suites.parse(f'{suite.family}:{args.kinds}').tasks
      if unknown := [k for k in kinds if k not in suite.tasks]:
        raise ValueError(f'--kinds: {unknown} not among {args.env} tasks {suite.tasks}')
    else:
      kinds = suite.tasks
    if args.episodes < 1:
      raise ValueError(f'--episodes: expected a positive number, got {args.episodes}')
    if not args.checkpoints and not args.watch:
      raise ValueError('give checkpoints to evaluate, or --watch WORKDIR')
    settings = Settings(kinds=kinds, episodes=args.episodes, seed=args.seed, gifs=args.gifs, max_steps=args.max_steps,
                        image_size=args.image_size, offline_batches=args.offline_batches, imagined=args.imagined,
                        env=args.env)
    options = dict(temperature=args.temperature, top_k=args.top_k)
    if args.checkpoints:
      run(find_checkpoints(args.checkpoints), args.out, settings, **options)
    if args.watch:
      watch(args.watch, args.out, settings, poll_seconds=args.poll, timeout_seconds=args.watch_timeout, **options)
  except (ImportError, KeyError, OSError, ValueError) as error:
    print(f'lapa evaluate: error: {error.args[0] if isinstance(error, KeyError) else error}', file=sys.stderr)
    return 2
  if jax.process_index() == 0:
    print(f'results: {os.path.join(args.out, TABLE)}, {os.path.join(args.out, PLOT)}, GIFs in {args.out}/gifs')
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
