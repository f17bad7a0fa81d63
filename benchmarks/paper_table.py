"""The paper's comparison in miniature, on the built-in world: SCRATCH, ACTIONVLA, LAPA, LAPA (hand).

    python benchmarks/paper_table.py --out /tmp/paper_table                 # demo sizes, seeds 0,1,2: 90 min
    python benchmarks/paper_table.py --out /tmp/pt --size tiny --seeds 0,1  # minutes: a smoke run

As in the paper, many action-free videos pretrain and few labelled robot episodes finetune:
  data        `--video-episodes` robot episodes (their actions unused except by ACTIONVLA, the upper
              bound that sees them) and as many human-hand episodes; `--robot-episodes` labelled robot
              episodes (another seed: other layouts and tasks) for finetuning;
  shared      one vision tokenizer (robot + hand frames), one LAQ per video source, their labels;
  per seed    latent pretraining (LAPA on robot videos, LAPA(hand) on hand videos), action pretraining
              (ACTIONVLA), then finetuning of all four methods (SCRATCH from nothing) with that seed;
  evaluation  `lapa evaluate` of every finetuned run on the same `--episodes` seeded episodes per
              task kind.
Every step is the README's command (`lapa ...`), run as a subprocess and skipped when its output
exists, so an interrupted run resumes. Prints one JSON line per method (success mean and std over
seeds, overall and per task kind) and writes `paper_table.md` and `paper_table.png` in --out.
The paper's claims, checked and printed: LAPA > SCRATCH by more than one std, LAPA(hand) > SCRATCH,
ACTIONVLA >= LAPA.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lapa_jax import evaluate, host_memory  # noqa: E402

METHODS = ('scratch', 'actionvla', 'lapa', 'lapa_hand')
LABELS = {'scratch': 'SCRATCH', 'actionvla': 'ACTIONVLA', 'lapa': 'LAPA', 'lapa_hand': 'LAPA (hand)'}
# The tokenizer and LAQ presets of each VLA size (tiny: the test presets, at 32x32 images).
SIZES = {'demo': dict(tokenizer='demo', laq='demo', image_size=64), 'tiny': dict(tokenizer='tiny', laq='tiny', image_size=32)}


def lapa(*args: str, done: str | None = None) -> None:
  """Runs `lapa ARGS` unless `done` (a path it writes) exists; stops the benchmark when it fails."""
  if done and os.path.exists(done):
    return
  command = [sys.executable, '-m', 'lapa_jax.cli', *args]
  print('$ lapa ' + ' '.join(args), file=sys.stderr, flush=True)
  # The steps inherit this environment (GLIBC_TUNABLES included); main() has warned once if it lacks them.
  env = dict(os.environ, **{host_memory.OPT_OUT: '0'})
  if subprocess.run(command, cwd=ROOT, env=env).returncode != 0:
    sys.exit(f'paper_table: failed: lapa {" ".join(args)}')


def finished(workdir: str, total_steps: int) -> str | None:
  """A path that exists once the training run in `workdir` reached `total_steps` (its checkpoint)."""
  return os.path.join(workdir, 'checkpoints', str(total_steps))


def run_all(args: argparse.Namespace) -> list[str]:
  """Every training run of the comparison; returns the finetuned workdirs."""
  size, out = SIZES[args.size], args.out
  configs = lambda name: str(ROOT / 'configs' / name)
  steps = lambda kind: [f'--config.total_steps={args.steps[kind]}', f'--config.checkpoint_every={args.steps[kind]}',
                        '--config.eval_every=0'] if args.steps[kind] else []
  total = lambda kind, default: args.steps[kind] or default
  data = {'videos': f'{out}/data/videos', 'robot': f'{out}/data/robot'}
  world = lambda embodiment, where, episodes, seed: lapa(
      'world', '--embodiment', embodiment, '--episodes', str(episodes), '--out', where, '--seed', str(seed),
      '--image-size', str(size['image_size']), done=f'{where}/lapa_world_{embodiment}')
  world('robot', data['videos'], args.video_episodes, 1)
  world('hand', data['videos'], args.video_episodes, 2)
  world('robot', data['robot'], args.robot_episodes, 0)
  videos = {'robot': f'{data["videos"]}/lapa_world_robot/1.0.0', 'hand': f'{data["videos"]}/lapa_world_hand/1.0.0'}
  robot = f'{data["robot"]}/lapa_world_robot/1.0.0'

  tokenizer = f'{out}/tokenizer'
  lapa('train', configs(f'tokenizer.py:{size["tokenizer"]}'), '--workdir', tokenizer,
       f'--config.data.data_dir={data["videos"]}', '--config.data.mixture=lapa_world_robot,lapa_world_hand',
       *steps('tokenizer'), done=finished(tokenizer, total('tokenizer', _preset_steps('tokenizer', size['tokenizer']))))
  labelled = {}
  for source, path in videos.items():
    laq = f'{out}/laq_{source}'
    lapa('train', configs(f'laq.py:{size["laq"]}'), '--workdir', laq, f'--config.data.path={path}', *args.laq_overrides,
         *steps('laq'), done=finished(laq, total('laq', _preset_steps('laq', size['laq']))))
    lapa('label', '--laq', laq, '--tokenizer', tokenizer, '--out', f'{out}/labelled_{source}',
         f'--config.data.path={path}', '--config.resize=true', done=f'{out}/labelled_{source}/lapa_world_{source}/1.0.0')
    labelled[source] = f'{out}/labelled_{source}/lapa_world_{source}/1.0.0'

  finetuned = []
  for seed in args.seeds:
    pretrained = {}
    for method, source in (('lapa', 'robot'), ('lapa_hand', 'hand'), ('actionvla', 'robot')):
      workdir = f'{out}/seed{seed}/pretrain_{method}'
      lapa('train', configs(f'latent_pretrain.py:{args.size},{method}'), '--workdir', workdir,
           f'--config.data.path={labelled[source]}', f'--config.seed={seed}', *steps('pretrain'),
           done=finished(workdir, total('pretrain', _preset_steps('latent_pretrain', args.size))))
      pretrained[method] = workdir
    for method in METHODS:
      workdir = f'{out}/seed{seed}/{method}'
      start = [f'--config.init_from={pretrained[method]}'] if method in pretrained else []
      lapa('train', configs(f'finetune.py:{args.size},{method}'), '--workdir', workdir, f'--config.data.path={robot}',
           f'--config.vision_tokenizer={tokenizer}', f'--config.seed={seed}', *start, *steps('finetune'),
           done=finished(workdir, total('finetune', _preset_steps('finetune', args.size))))
      finetuned.append(workdir)
  return finetuned


def _preset_steps(stage: str, preset: str) -> int:
  from lapa_jax import config as config_lib
  return int(config_lib.load(f'{ROOT}/configs/{stage}.py:{preset}').total_steps)


def method_of(record: dict) -> tuple[str, int]:
  seed_dir, method = pathlib.Path(record['workdir']).parts[-2:]
  return method, int(seed_dir[len('seed'):])


def tasks_of(records: list[dict]) -> list[str]:
  """The closed-loop tasks of `records`, in the order they were evaluated."""
  return list(dict.fromkeys(r['task_kind'] for r in records if r['task_kind'] != evaluate.OFFLINE))


def aggregate(records: list[dict], seeds: list[int], methods: tuple[str, ...] = METHODS) -> dict[str, dict]:
  """{method: {'success': (mean, std), task: (mean, std), 'seeds': {seed: success}}} over seeds."""
  table = {}
  for method in methods:
    rows = [r for r in records if r['task_kind'] != evaluate.OFFLINE and method_of(r)[0] == method]
    per_seed = {seed: [r for r in rows if method_of(r)[1] == seed] for seed in seeds}
    overall = [np.mean([r['success'] for r in found]) for found in per_seed.values() if found]
    entry = {'seeds': {seed: float(np.mean([r['success'] for r in found])) for seed, found in per_seed.items() if found},
             'success': (float(np.mean(overall)), float(np.std(overall)))}
    for kind in tasks_of(records):
      values = [r['success'] for r in rows if r['task_kind'] == kind]
      if values:
        entry[kind] = (float(np.mean(values)), float(np.std(values)))
    table[method] = entry
  return table


def claims(table: dict[str, dict]) -> dict[str, bool]:
  """The paper's claims that the methods in `table` can check."""
  (lapa_mean, lapa_std), (scratch_mean, scratch_std) = table['lapa']['success'], table['scratch']['success']
  found = {'lapa_above_scratch_by_one_std': bool(lapa_mean - scratch_mean > max(lapa_std, scratch_std)),
           'actionvla_at_least_lapa': bool(table['actionvla']['success'][0] >= lapa_mean)}
  if 'lapa_hand' in table:
    found['lapa_hand_above_scratch'] = bool(table['lapa_hand']['success'][0] > scratch_mean)
  return found


def write_outputs(out: str, table: dict[str, dict], seeds: list[int], kinds: list[str], name: str = 'paper_table',
                  where: str = 'built-in world') -> None:
  """NAME.md (mean ± std over seeds per task and overall) and NAME.png (bars with std)."""
  cell = lambda value: f'{value[0]:.2f} ± {value[1]:.2f}'
  short = lambda kind: kind.replace('_', ' ').removesuffix('-v3')
  lines = [f'Closed-loop success on the {where}, mean ± std over seeds {seeds}', '',
           '| method | ' + ' | '.join(map(short, kinds)) + ' | all |', '|---' * (len(kinds) + 2) + '|']
  for method, entry in table.items():
    lines.append(f'| {LABELS[method]} | ' + ' | '.join(cell(entry[k]) if k in entry else '' for k in kinds)
                 + f' | {cell(entry["success"])} |')
  with open(os.path.join(out, f'{name}.md'), 'w') as f:
    f.write('\n'.join(lines) + '\n')
  import matplotlib
  matplotlib.use('Agg')
  from matplotlib import pyplot as plt
  figure, axes = plt.subplots(figsize=(max(7, 0.9 * len(kinds) + 2), 3.6))
  width = 0.8 / len(table)
  groups = kinds + ['all']
  for index, (method, entry) in enumerate(table.items()):
    values = [entry.get(k, (np.nan, 0.0)) for k in kinds] + [entry['success']]
    x = np.arange(len(groups)) + (index - (len(table) - 1) / 2) * width
    axes.bar(x, [v[0] for v in values], width, yerr=[v[1] for v in values], capsize=3, label=LABELS[method])
  axes.set_xticks(np.arange(len(groups)), [short(g) for g in groups], fontsize=8,
                  rotation=30 if len(groups) > 7 else 0, ha='right' if len(groups) > 7 else 'center')
  axes.set_ylim(0, 1)
  axes.set_ylabel(f'success (mean ± std, {len(seeds)} seeds)')
  axes.legend(fontsize=7)
  figure.tight_layout()
  figure.savefig(os.path.join(out, f'{name}.png'), dpi=120)
  plt.close(figure)


STAGES = ('tokenizer', 'laq', 'pretrain', 'finetune')


def add_schedule_arguments(parser: argparse.ArgumentParser) -> None:
  """--size, --seeds, --<stage>-steps and --laq-override: what this script and metaworld_table.py share."""
  parser.add_argument('--size', choices=tuple(SIZES), default='demo')
  parser.add_argument('--seeds', default='0,1,2')
  for kind in STAGES:
    parser.add_argument(f'--{kind}-steps', type=int, default=0, help=f'{kind} steps (default: the preset\'s)')
  parser.add_argument('--laq-override', action='append', default=[], dest='laq_overrides',
                      help='--config.x=y for the LAQs, e.g. --laq-override=--config.model.codebook_size=16')


def parse_schedule(args: argparse.Namespace, script: str) -> None:
  """args.seeds as ints, args.steps {stage: steps or 0}; warns once, as `lapa` does, without huge pages."""
  host_memory.warn_if_missing(script)
  args.seeds = [int(seed) for seed in args.seeds.split(',')]
  args.steps = {kind: getattr(args, f'{kind}_steps') for kind in STAGES}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--out', default='/tmp/lapa_paper_table')
  parser.add_argument('--video-episodes', type=int, default=400, help='action-free robot and hand episodes, each')
  parser.add_argument('--robot-episodes', type=int, default=40, help='labelled robot episodes for finetuning')
  parser.add_argument('--episodes', type=int, default=20, help='closed-loop episodes per task kind')
  add_schedule_arguments(parser)
  args = parser.parse_args()
  parse_schedule(args, 'paper_table.py')
  start = time.perf_counter()
  finetuned = run_all(args)
  training_seconds = time.perf_counter() - start
  lapa('evaluate', *finetuned, '--out', f'{args.out}/eval', '--episodes', str(args.episodes),
       '--image-size', str(SIZES[args.size]['image_size']), '--offline-batches', '0', '--gifs', '1')
  records = evaluate.read_results(f'{args.out}/eval')
  table = aggregate(records, args.seeds)
  write_outputs(args.out, table, args.seeds, tasks_of(records))
  for method, entry in table.items():
    print(json.dumps({'benchmark': 'paper_table', 'size': args.size, 'method': method, **entry}))
  print(json.dumps({'benchmark': 'paper_table', 'claims': claims(table), 'seeds': args.seeds,
                    'episodes_per_kind': args.episodes, 'seconds': round(time.perf_counter() - start, 1),
                    'training_seconds': round(training_seconds, 1), 'cpu_count': os.cpu_count(),
                    'huge_pages': host_memory.huge_pages_requested()}))
  print((pathlib.Path(args.out) / 'paper_table.md').read_text(), file=sys.stderr)


if __name__ == '__main__':
  main()
