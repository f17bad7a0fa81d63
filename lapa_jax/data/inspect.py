"""`lapa inspect-data`: the first thing to run on a new data directory.

    lapa inspect-data --data-dir /data/oxe --mixture oxe_magic_soup --out /tmp/inspect
    lapa inspect-data --data-dir /data/oxe --dataset taco_play --out /tmp/inspect
    lapa inspect-data --path /data/mine/1.0.0 --propose-spec mine_spec.json --fps 10 --out /tmp/inspect

A dataset outside the registry (your own robot's RLDS export) needs a spec: which camera, wrist
camera and instruction to read, its frame rate, and how its actions map to the 7-D convention.
--propose-spec writes one from the dataset's features (and --fps when the data does not record it);
check it, then give it to any stage as --config.data.spec_file, or save it as lapa_spec.json in the
dataset's version directory so that mixtures find it too.

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


def inspect_dataset(dataset, out: str, *, split: str = 'train', episodes: int = 20,
                    robot_seconds: float = 0.6, human_seconds: float = 2.4) -> dict[str, Any]:
  """Reads a few episodes of the opened `dataset`, prints and draws them; raises DataError when it cannot."""
  from lapa_jax.data import oxe, rlds, statistics

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


WRIST_WORDS = ('wrist', 'hand', 'gripper', 'eye_in_hand')
INSTRUCTION_WORDS = ('instruction', 'language', 'task', 'prompt')
# A guess of what each entry of a stored action means, by its length (the spec says "check it").
LAYOUTS = {2: ['x', 'y'], 3: ['x', 'y', 'z'], 4: ['x', 'y', 'z', 'gripper'], 6: ['x', 'y', 'z', 'roll', 'pitch', 'yaw'],
           7: ['x', 'y', 'z', 'roll', 'pitch', 'yaw', 'gripper']}


def propose_spec(path: str, fps: float | None = None, episodes: int = 5) -> tuple[dict[str, Any], list[str]]:
  """A spec (oxe.spec_from_dict's JSON form) for the dataset at `path` from its features, and notes on
  what to check. The primary camera is the largest image whose name does not say wrist/hand/gripper;
  the instruction a text feature; the action the 'action' tensor, its layout guessed from its length
  and its gripper convention from the values of the first `episodes` episodes (larger = open)."""
  from lapa_jax.data import rlds

  builder = rlds.open_builder(path)
  features = rlds.step_features(builder)
  notes = []
  images = rlds.image_keys(builder)
  if not images:
    raise rlds.DataError(f'{path}: the steps have no uint8 image feature; LAPA needs a camera')
  is_wrist = lambda key: any(word in key.lower() for word in WRIST_WORDS)
  size = lambda key: (features[key].shape[0] or 0) * (features[key].shape[1] or 0)
  scene = [key for key in images if not is_wrist(key)] or images
  image_key = max(scene, key=lambda key: (size(key), [-ord(c) for c in key]))
  wrist = [key for key in images if is_wrist(key) and key != image_key]
  texts = [key for key, feature in features.items() if feature.tf_dtype == tf_string()]
  named = [key for key in texts if any(word in key.lower() for word in INSTRUCTION_WORDS)]
  instruction_key = (named or texts or [None])[0]
  if instruction_key is None:
    notes.append('no text feature: instruction_key is null (the instruction will be empty)')
  fps = fps or rlds.dataset_fps(builder)
  if not fps:
    notes.append('fps is unknown: fill in the control rate (steps per second), or pass --fps')
  spec = {'fps': fps, 'image_key': image_key, 'wrist_image_key': wrist[0] if wrist else None,
          'instruction_key': instruction_key, 'embodiment': 'robot', 'action': None}
  if len(images) > 1:
    notes.append(f'camera {image_key} of {", ".join(images)}: change image_key to use another')
  action = features.get('action')
  if action is None or isinstance(action, type(None)) or getattr(action, 'shape', None) is None or len(action.shape) != 1:
    nested = sorted(key for key in features if key.startswith('action/'))
    spec['embodiment'] = 'human' if not nested else 'robot'
    notes.append('no single action tensor: action is null (video only)' if not nested else
                 f'the action is a dict ({", ".join(nested)}): write one (dims,) action tensor per step, '
                 'or describe it in the registry (lapa_jax/data/oxe.py)')
    return spec, notes
  dims = int(action.shape[0])
  layout = LAYOUTS.get(dims) or ['x', 'y', 'z', 'roll', 'pitch', 'yaw'] + ['ignore'] * (dims - 7) + ['gripper']
  values = np.concatenate([np.asarray(episode['steps']['action']).reshape(-1, dims)[:, layout.index('gripper')]
                           for episode in _raw_episodes(builder, episodes)]) if 'gripper' in layout else None
  spec['action'] = {'key': 'action', 'layout': layout}
  if values is not None and values.size:
    spec['action'].update(gripper_open=float(values.max()), gripper_closed=float(values.min()))
    notes.append(f'gripper: entry {layout.index("gripper")} ranges over [{values.min():g}, {values.max():g}]; '
                 'the spec takes the larger value as open: swap gripper_open and gripper_closed if that is wrong')
  notes.append(f'action layout {layout} is guessed from its {dims} entries: check the order')
  return spec, notes


def tf_string():
  import tensorflow as tf
  return tf.string


def _raw_episodes(builder, count: int):
  from lapa_jax.data import rlds
  split = 'train' if 'train' in builder.info.splits else next(iter(builder.info.splits))
  dataset = rlds.episodes(builder, split).take(count)
  return dataset.as_numpy_iterator()


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog='lapa inspect-data', description=__doc__.split('\n\n')[0])
  parser.add_argument('--data-dir', help='directory holding <name>/<version>/ datasets (with --dataset/--mixture)')
  which = parser.add_mutually_exclusive_group(required=True)
  which.add_argument('--dataset', help='one dataset name')
  which.add_argument('--mixture', help='a named mixture or name:weight,...')
  which.add_argument('--path', help='one dataset directory <dir>/<name>/<version>')
  parser.add_argument('--out', help='where the PNGs and summary.json go (required unless only proposing a spec)')
  parser.add_argument('--spec', help='a spec file describing the --path dataset')
  parser.add_argument('--propose-spec', metavar='FILE', help='write a spec for the --path dataset to FILE')
  parser.add_argument('--fps', type=float, help='control rate of the --path dataset, for --propose-spec')
  parser.add_argument('--split', default='train')
  parser.add_argument('--episodes', type=int, default=20, help='episodes read per dataset (default 20)')
  parser.add_argument('--skip-missing', action='store_true', help='only warn about missing datasets')
  args = parser.parse_args(argv)
  if (args.dataset or args.mixture) and not args.data_dir:
    parser.error('--dataset and --mixture need --data-dir')
  if (args.spec or args.propose_spec or args.fps) and not args.path:
    parser.error('--spec, --propose-spec and --fps describe a --path dataset')
  if not args.out and not args.propose_spec:
    parser.error('--out is required')

  from lapa_jax.data import mixtures, oxe

  spec = None
  if args.propose_spec:
    try:
      proposal, notes = propose_spec(args.path, args.fps)
      _write_json(args.propose_spec, proposal)
    except (oxe.DataError, OSError) as error:
      print(f'lapa inspect-data: {error}', file=sys.stderr)
      return 2
    print(f'wrote the proposed spec {args.propose_spec}:\n{json.dumps(proposal, indent=1)}')
    for note in notes:
      print(f'  check: {note}')
    if not proposal['fps'] or not args.out:
      return 0
    args.spec = args.propose_spec
  try:
    if args.path:
      name = os.path.basename(os.path.dirname(os.path.normpath(args.path)))
      spec = oxe.read_spec_file(args.spec, name) if args.spec else None
      entries = [(args.path, 1.0)]
    else:
      entries = mixtures.parse(args.mixture) if args.mixture else [(args.dataset, 1.0)]
  except oxe.DataError as error:
    print(f'lapa inspect-data: {error}', file=sys.stderr)
    return 2
  summaries, failures = [], []
  for name, weight in entries:
    try:
      dataset = (oxe.open_path(name, spec=spec) if args.path else oxe.open_dataset(args.data_dir, name))
      summary = inspect_dataset(dataset, args.out, split=args.split, episodes=args.episodes)
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
  _write_json(os.path.join(args.out, 'summary.json'),
              {'datasets': summaries, 'failures': [{'name': n, 'reason': r} for n, r in failures]})
  if failures:
    print(f'lapa inspect-data: {len(failures)} of {len(entries)} dataset(s) cannot be read: ' +
          '; '.join(f'{name}: {reason}' for name, reason in failures), file=sys.stderr)
    return 1
  return 0


def _write_json(path: str, value) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path + '.tmp', 'w') as f:
    json.dump(value, f, indent=1)
  os.replace(path + '.tmp', path)


if __name__ == '__main__':
  sys.exit(main())
