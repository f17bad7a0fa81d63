"""The paper's comparison on Meta-World (MuJoCo): SCRATCH, LAPA and ACTIONVLA with few labelled demos.

    python benchmarks/metaworld_table.py --out /tmp/mw_table                    # MT10, demo sizes, seeds 0,1,2
    python benchmarks/metaworld_table.py --out /tmp/mw --env metaworld:mt3 --seeds 0 --size tiny  # a smoke run

As in the paper, many action-free videos pretrain and few labelled robot demos finetune:
  data        `--video-episodes` expert episodes of the tasks in turn (their frames pretrain LAPA;
              their actions are seen only by ACTIONVLA, the upper bound) and `--robot-episodes`
              labelled demos from other starts for finetuning (default 5 per MT10 task);
  shared      one vision tokenizer and one LAQ on the video frames, the LAQ's labels of the videos;
  per seed    latent pretraining (LAPA), action pretraining (ACTIONVLA), then finetuning of the three
              methods (SCRATCH from nothing) on the few demos with that seed;
  evaluation  `lapa evaluate --env ...` of every finetuned run on the same `--episodes` fixed starts
              per task (Meta-World's task configurations from seed 1000 up), at most `--max-steps`
              control steps (20 Hz) each.
Every step is the README's command, skipped when its output exists, so an interrupted run resumes.
Prints one JSON line per method (success mean and std over seeds, overall and per task), one with the
paper's claims, and one with the seconds each part took; writes metaworld_table.md and .png in --out.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / 'benchmarks'))

from lapa_jax import evaluate, host_memory  # noqa: E402
from lapa_jax.envs import suites, writer  # noqa: E402
from paper_table import (SIZES, _preset_steps, add_schedule_arguments, aggregate, claims, finished, lapa,  # noqa: E402
                         parse_schedule, tasks_of, write_outputs)

METHODS = ('scratch', 'actionvla', 'lapa')


def run_all(args: argparse.Namespace, seconds: dict[str, float]) -> list[str]:
  """Every training run of the comparison; returns the finetuned workdirs. `seconds` gets each part's time."""
  size, out = SIZES[args.size], args.out
  configs = lambda name: str(ROOT / 'configs' / name)
  steps = lambda kind: [f'--config.total_steps={args.steps[kind]}', f'--config.checkpoint_every={args.steps[kind]}',
                        '--config.eval_every=0'] if args.steps[kind] else []
  stages = {'tokenizer': 'tokenizer', 'laq': 'laq', 'pretrain': 'latent_pretrain', 'finetune': 'finetune'}
  total = lambda kind, preset: args.steps[kind] or _preset_steps(stages[kind], preset)
  clock = {'start': time.perf_counter()}

  def lap(part: str) -> None:
    now = time.perf_counter()
    seconds[part] = seconds.get(part, 0.0) + round(now - clock['start'], 1)
    clock['start'] = now

  name = lambda embodiment: writer.dataset_name(embodiment, args.env)
  data = {'videos': f'{out}/data/videos', 'robot': f'{out}/data/robot'}
  for kind, episodes, seed in (('videos', args.video_episodes, 1), ('robot', args.robot_episodes, 0)):
    lapa('world', '--env', args.env, '--embodiment', 'robot', '--episodes', str(episodes), '--out', data[kind],
         '--seed', str(seed), '--image-size', '64', done=f'{data[kind]}/{name("robot")}')
  videos, robot = (f'{data[kind]}/{name("robot")}/1.0.0' for kind in ('videos', 'robot'))
  lap('data')

  tokenizer, laq, labelled = f'{out}/tokenizer', f'{out}/laq', f'{out}/labelled'
  lapa('train', configs(f'tokenizer.py:{size["tokenizer"]}'), '--workdir', tokenizer, f'--config.data.path={videos}',
       *steps('tokenizer'), done=finished(tokenizer, total('tokenizer', size['tokenizer'])))
  lap('tokenizer')
  lapa('train', configs(f'laq.py:{size["laq"]}'), '--workdir', laq, f'--config.data.path={videos}', *args.laq_overrides,
       *steps('laq'), done=finished(laq, total('laq', size['laq'])))
  lap('laq')
  lapa('label', '--laq', laq, '--tokenizer', tokenizer, '--out', labelled, f'--config.data.path={videos}',
       '--config.resize=true', done=f'{labelled}/{name("robot")}/1.0.0')
  labelled = f'{labelled}/{name("robot")}/1.0.0'
  lap('label')

  finetuned = []
  for seed in args.seeds:
    pretrained = {}
    for method in ('lapa', 'actionvla'):
      workdir = f'{out}/seed{seed}/pretrain_{method}'
      lapa('train', configs(f'latent_pretrain.py:{args.size},{method}'), '--workdir', workdir,
           f'--config.data.path={labelled}', f'--config.seed={seed}', *steps('pretrain'),
           done=finished(workdir, total('pretrain', args.size)))
      pretrained[method] = workdir
      lap(f'pretrain_{method}')
    for method in METHODS:
      workdir = f'{out}/seed{seed}/{method}'
      start = [f'--config.init_from={pretrained[method]}'] if method in pretrained else []
      lapa('train', configs(f'finetune.py:{args.size},{method}'), '--workdir', workdir, f'--config.data.path={robot}',
           f'--config.vision_tokenizer={tokenizer}', f'--config.seed={seed}', *start, *steps('finetune'),
           done=finished(workdir, total('finetune', args.size)))
      finetuned.append(workdir)
      lap(f'finetune_{method}')
  return finetuned


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--out', default='/tmp/lapa_metaworld_table')
  parser.add_argument('--env', default='metaworld:mt10', help='metaworld:<mt10|mt3|task,task,...>')
  parser.add_argument('--video-episodes', type=int, default=500, help='action-free episodes (the tasks in turn)')
  parser.add_argument('--robot-episodes', type=int, default=55,
                      help='labelled demos for finetuning, 10%% of them held out (default: 5 per MT10 task)')
  parser.add_argument('--episodes', type=int, default=10, help='closed-loop episodes per task')
  parser.add_argument('--max-steps', type=int, default=60, help='control steps per episode (20 Hz)')
  add_schedule_arguments(parser)
  args = parser.parse_args()
  if suites.parse(args.env).family != 'metaworld':
    parser.error(f'--env {args.env}: expected metaworld:<suite or tasks> (benchmarks/paper_table.py runs the world)')
  parse_schedule(args, 'metaworld_table.py')
  start, seconds = time.perf_counter(), {}
  finetuned = run_all(args, seconds)
  evaluation = time.perf_counter()
  lapa('evaluate', *finetuned, '--env', args.env, '--out', f'{args.out}/eval', '--episodes', str(args.episodes),
       '--max-steps', str(args.max_steps), '--offline-batches', '0', '--gifs', '1')
  seconds['evaluate'] = round(time.perf_counter() - evaluation, 1)
  records = evaluate.read_results(f'{args.out}/eval')
  table = aggregate(records, args.seeds, METHODS)
  write_outputs(args.out, table, args.seeds, tasks_of(records), name='metaworld_table',
                where=suites.parse(args.env).label)
  for method, entry in table.items():
    print(json.dumps({'benchmark': 'metaworld_table', 'env': args.env, 'size': args.size, 'method': method, **entry}))
  print(json.dumps({'benchmark': 'metaworld_table', 'claims': claims(table), 'seeds': args.seeds,
                    'episodes_per_task': args.episodes, 'video_episodes': args.video_episodes,
                    'robot_episodes': args.robot_episodes, 'seconds': round(time.perf_counter() - start, 1),
                    'seconds_per_part': seconds, 'cpu_count': os.cpu_count(),
                    'huge_pages': host_memory.huge_pages_requested()}))
  print((pathlib.Path(args.out) / 'metaworld_table.md').read_text(), file=sys.stderr)


if __name__ == '__main__':
  main()
