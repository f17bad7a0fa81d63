"""`lapa inspect-data`: the first thing to run on a new data directory.

    lapa inspect-data --data-dir /data/oxe --mixture oxe_magic_soup --out /tmp/inspect
    lapa inspect-data --data-dir /data/oxe --dataset taco_play --out /tmp/inspect

For each dataset it prints the version found on disk, episodes per split, image keys, the registry's
cameras and instruction key, fps and the LAQ frame offset, action statistics (cached ones, else from
the first --episodes episodes) and an example instruction; it writes <name>_frames.png (standardised
frames of a few episodes), <name>_pairs.png (frame pairs x_t | x_t+H) and <name>_actions.png (a
histogram per action dimension) to --out, plus summary.json. It exits non-zero, naming the dataset
and the reason, when any dataset cannot be read.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageDraw

THUMBNAIL = 96


def _decode(encoded: bytes) -> Image.Image:
  with Image.open(io.BytesIO(encoded)) as image:
    return image.convert('RGB').resize((THUMBNAIL, THUMBNAIL), Image.Resampling.BILINEAR)


def grid(rows: Sequence[Sequence[Image.Image]]) -> Image.Image:
  """Thumbnails in rows (ragged rows are padded with black)."""
  columns = max(len(row) for row in rows)
  canvas = Image.new('RGB', (columns * (THUMBNAIL + 2), len(rows) * (THUMBNAIL + 2)))
  for r, row in enumerate(rows):
    for c, image in enumerate(row):
      canvas.paste(image, (c * (THUMBNAIL + 2), r * (THUMBNAIL + 2)))
  return canvas


def histograms(actions: np.ndarray, bins: int = 30) -> Image.Image:
  """One bar chart per action dimension (time, dims), with its range written under it."""
  width, height = 220, 130
  dims = actions.shape[1]
  canvas = Image.new('RGB', (width * dims, height), 'white')
  draw = ImageDraw.Draw(canvas)
  for dim in range(dims):
    values = actions[:, dim]
    counts, edges = np.histogram(values, bins=bins)
    left = dim * width + 10
    scale = (height - 40) / max(1, counts.max())
    bar = (width - 20) / bins
    for i, count in enumerate(counts):
      top = height - 30 - count * scale
      draw.rectangle([left + i * bar, top, left + (i + 1) * bar - 1, height - 30], fill=(60, 110, 200))
    draw.text((left, height - 26), f'dim {dim}: [{edges[0]:.3g}, {edges[-1]:.3g}]', fill='black')
    draw.text((left, 2), f'mean {values.mean():.3g} std {values.std():.3g}', fill='black')
  return canvas


def inspect_dataset(data_dir: str, name: str, out: str, *, split: str = 'train', episodes: int = 20,
                    robot_seconds: float = 0.6, human_seconds: float = 2.4) -> dict[str, Any]:
  """Reads a few episodes of `name`, prints and draws them; raises DataError when it cannot."""
  from lapa_jax.data import oxe, rlds, statistics

  dataset = oxe.open_dataset(data_dir, name)
  spec = dataset.spec
  builder = dataset.builder
  offset = oxe.default_frame_offset(spec, robot_seconds, human_seconds)
  rlds.check_split(builder, split)
  reader = oxe.EpisodeReader(dataset, on_corrupt='error')
  sample, actions = [], []
  for segment in reader.segments(split):
    for episode in reader.episodes(segment):
      sample.append(episode)
      if episode['action'] is not None:
        actions.append(episode['action'])
      if len(sample) >= episodes:
        break
    if len(sample) >= episodes:
      break
  if not sample:
    raise oxe.DataError(f'{dataset.path}: split {split!r} yielded no episode')
  stats = statistics.cached(dataset, split)
  stats_source = 'cached, full split'
  if stats is None and actions:
    stats = {'action': statistics.summarize(np.concatenate(actions))}
    stats_source = f'first {len(sample)} episodes'
  instruction = next((bytes(e['instruction'][0]).decode('utf-8', 'replace') for e in sample
                      if len(e['instruction']) and e['instruction'][0]), '')
  summary = {
      'name': spec.name, 'path': dataset.path, 'version': dataset.version,
      'episodes': {s: info.num_examples for s, info in builder.info.splits.items()},
      'image_keys': rlds.image_keys(builder), 'primary_image': spec.image_key,
      'wrist_image': spec.wrist_image_key, 'instruction_key': spec.instruction_key,
      'embodiment': spec.embodiment, 'fps': spec.effective_fps, 'frame_offset': offset,
      'registry_source': spec.source, 'example_instruction': instruction,
      'sampled_episodes': len(sample), 'mean_steps': float(np.mean([len(e['image']) for e in sample])),
      'action_statistics': stats.get('action') if stats else None, 'statistics_source': stats_source,
  }
  os.makedirs(out, exist_ok=True)
  rows = []
  for episode in sample[:4]:
    steps = np.unique(np.linspace(0, len(episode['image']) - 1, 8).round().astype(int))
    rows.append([_decode(episode['image'][t]) for t in steps])
  grid(rows).save(os.path.join(out, f'{spec.name}_frames.png'))
  pair_rows = []
  for episode in sample[:4]:
    length = len(episode['image'])
    if length > offset:
      starts = np.unique(np.linspace(0, length - offset - 1, 3).round().astype(int))
      pair_rows.append([image for t in starts for image in (_decode(episode['image'][t]),
                                                            _decode(episode['image'][t + offset]))])
  if pair_rows:
    grid(pair_rows).save(os.path.join(out, f'{spec.name}_pairs.png'))
  if actions:
    histograms(np.concatenate(actions)).save(os.path.join(out, f'{spec.name}_actions.png'))
  return summary


def _print(summary: dict[str, Any]) -> None:
  print(f"{summary['name']}  ({summary['path']})")
  print(f"  version {summary['version']}; episodes {summary['episodes']}; image keys {summary['image_keys']}")
  print(f"  primary {summary['primary_image']}  wrist {summary['wrist_image']}  instruction "
        f"{summary['instruction_key']}  ({summary['embodiment']}, keys from {summary['registry_source']})")
  print(f"  fps {summary['fps']:g}  frame offset {summary['frame_offset']} steps  "
        f"mean steps {summary['mean_steps']:.1f} (over {summary['sampled_episodes']} episodes)")
  stats = summary['action_statistics']
  if stats:
    print(f"  action ({summary['statistics_source']}):")
    for key in ('mean', 'std', 'q01', 'q99'):
      print(f"    {key:<4} " + ' '.join(f'{v:8.3g}' for v in stats[key]))
  else:
    print('  no actions')
  print(f"  example instruction: {summary['example_instruction']!r}")


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog='lapa inspect-data', description=__doc__.split('\n\n')[0])
  parser.add_argument('--data-dir', required=True, help='directory holding <name>/<version>/ datasets')
  which = parser.add_mutually_exclusive_group(required=True)
  which.add_argument('--dataset', help='one dataset name')
  which.add_argument('--mixture', help='a named mixture or name:weight,...')
  parser.add_argument('--out', required=True, help='where the PNGs and summary.json go')
  parser.add_argument('--split', default='train')
  parser.add_argument('--episodes', type=int, default=20, help='episodes read per dataset (default 20)')
  parser.add_argument('--skip-missing', action='store_true', help='only warn about missing datasets')
  args = parser.parse_args(argv)

  from lapa_jax.data import mixtures, oxe

  try:
    entries = mixtures.parse(args.mixture) if args.mixture else [(args.dataset, 1.0)]
  except oxe.DataError as error:
    print(f'lapa inspect-data: {error}', file=sys.stderr)
    return 2
  summaries, failures = [], []
  for name, weight in entries:
    try:
      summary = inspect_dataset(args.data_dir, name, args.out, split=args.split, episodes=args.episodes)
    except oxe.MissingDataset as error:
      if args.skip_missing:
        print(f'{name}: missing (skipped): {error}\n')
        continue
      failures.append((name, str(error)))
      print(f'{name}: CANNOT READ: {error}\n')
      continue
    except oxe.DataError as error:
      failures.append((name, str(error)))
      print(f'{name}: CANNOT READ: {error}\n')
      continue
    summary['weight'] = weight
    summaries.append(summary)
    _print(summary)
    print()
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, 'summary.json'), 'w') as f:
    json.dump({'datasets': summaries, 'failures': [{'name': n, 'reason': r} for n, r in failures]}, f, indent=1)
  if failures:
    print(f'lapa inspect-data: {len(failures)} of {len(entries)} dataset(s) cannot be read: ' +
          '; '.join(f'{name}: {reason}' for name, reason in failures), file=sys.stderr)
    return 1
  return 0


if __name__ == '__main__':
  sys.exit(main())
