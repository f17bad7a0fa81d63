"""Human videos -> an RLDS dataset without actions (`lapa import-videos`).

    lapa import-videos SRC OUT --name sthsthv2 --instructions labels.json [--fps 12] [--size 256]

SRC is a folder of frame folders (Something-Something v2 style: SRC/<video_id>/<frame>.jpg) or of
video files (SRC/<video_id>.mp4|.webm, decoded with PyAV). The instructions file maps video ids to
text: a CSV with columns id and instruction (or label), a JSON list of {"id", "label"} records (the
SSv2 label files), or a JSON object {id: text}. The dataset is written to OUT/<name>/1.0.0 with a
lapa_spec.json recording its fps (embodiment 'human'), so that mixtures pair its frames 2.4 s apart.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import csv
import io
import json
import os
import re
import sys
from typing import Sequence

import numpy as np
from PIL import Image

VIDEO_SUFFIXES = ('.mp4', '.webm', '.mkv', '.avi', '.mov')
FRAME_SUFFIXES = ('.jpg', '.jpeg', '.png')
SPEC_FILE = 'lapa_spec.json'  # the file oxe.spec_from_metadata reads


class VideoImportError(ValueError):
  """Bad import-videos input; one line naming the file and what was expected."""


# --- reading videos -------------------------------------------------------------------------------

def _natural_key(text: str):
  return [int(part) if part.isdigit() else part for part in re.split(r'(\d+)', text)]


def list_videos(source: str) -> list[tuple[str, str]]:
  """(video_id, path) of every frame folder or video file directly under `source`, sorted by id."""
  if not os.path.isdir(source):
    raise VideoImportError(f'{source}: no such directory (expected a folder of frame folders or video files)')
  videos = []
  for entry in sorted(os.listdir(source), key=_natural_key):
    path = os.path.join(source, entry)
    stem, suffix = os.path.splitext(entry)
    if os.path.isdir(path):
      videos.append((entry, path))
    elif suffix.lower() in VIDEO_SUFFIXES:
      videos.append((stem, path))
  if not videos:
    raise VideoImportError(f'{source}: no frame folders or video files ({", ".join(VIDEO_SUFFIXES)}) found')
  return videos


def read_instructions(path: str) -> dict[str, str]:
  """{video_id: instruction} from a CSV (id, instruction|label), SSv2 JSON list or JSON object."""
  if not os.path.isfile(path):
    raise VideoImportError(f'{path}: no such instructions file')
  if path.lower().endswith('.json'):
    with open(path) as f:
      try:
        data = json.load(f)
      except json.JSONDecodeError as error:
        raise VideoImportError(f'{path}: not valid JSON ({error})') from None
    if isinstance(data, dict):
      return {str(key): str(value) for key, value in data.items()}
    if isinstance(data, list) and all(isinstance(r, dict) and 'id' in r and 'label' in r for r in data):
      return {str(record['id']): str(record['label']) for record in data}
    raise VideoImportError(f'{path}: expected a JSON object {{id: text}} or a list of {{"id", "label"}} records')
  with open(path, newline='') as f:
    reader = csv.DictReader(f)
    columns = reader.fieldnames or []
    text_column = next((c for c in ('instruction', 'label', 'text') if c in columns), None)
    if 'id' not in columns or text_column is None:
      raise VideoImportError(f'{path}: expected CSV columns id and instruction (or label); found {columns}')
    return {row['id']: row[text_column] for row in reader}


def _encode(image: Image.Image, size: int | None) -> bytes:
  if size is not None and image.size != (size, size):
    image = image.resize((size, size), Image.Resampling.LANCZOS)
  buffer = io.BytesIO()
  image.convert('RGB').save(buffer, format='JPEG', quality=95)
  return buffer.getvalue()


def read_frame_folder(path: str, size: int | None) -> list[bytes]:
  """JPEG bytes of the frames in `path`, in natural order (JPEGs kept as they are unless resized)."""
  names = sorted((n for n in os.listdir(path) if n.lower().endswith(FRAME_SUFFIXES)), key=_natural_key)
  frames = []
  for name in names:
    file = os.path.join(path, name)
    if size is None and name.lower().endswith(('.jpg', '.jpeg')):
      with open(file, 'rb') as f:
        frames.append(f.read())
    else:
      with Image.open(file) as image:
        frames.append(_encode(image, size))
  return frames


def read_video_file(path: str, size: int | None, fps: float | None) -> tuple[list[bytes], float]:
  """JPEG frames of a video file and their rate; with `fps`, resampled to it by timestamp."""
  import av  # PyAV: FFmpeg bindings, a maintained PyPI package (pinned in requirements)

  try:
    container = av.open(path)
  except av.FFmpegError as error:
    raise VideoImportError(f'{path}: cannot open the video ({error})') from None
  with container:
    stream = container.streams.video[0]
    stream.thread_type = 'AUTO'
    rate = float(stream.average_rate or 0) or None
    images, times = [], []
    for frame in container.decode(stream):
      images.append(frame.to_image())
      times.append(frame.time if frame.time is not None else len(times) / (rate or 1.0))
  if not images:
    raise VideoImportError(f'{path}: the video has no frames')
  if fps is None:
    if rate is None:
      raise VideoImportError(f'{path}: the video does not record its frame rate; pass --fps')
    return [_encode(image, size) for image in images], rate
  times = np.asarray(times, np.float64) - times[0]
  # The clip spans its last frame's time plus one native frame; resampled frames tile that span.
  span = times[-1] + (1.0 / rate if rate else 0.0)
  targets = np.arange(max(1, int(np.floor(span * fps + 1e-6)))) / fps
  chosen = np.abs(times[None, :] - targets[:, None]).argmin(axis=1)
  return [_encode(images[index], size) for index in chosen], fps


def ordered_map(function, items: Sequence, workers: int):
  """function(item) for each item, in order, computed by `workers` threads at most 2 x workers ahead
  (so that memory stays bounded; JPEG and video decoding release the GIL)."""
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    pending = collections.deque()
    for item in items:
      pending.append(pool.submit(function, item))
      if len(pending) >= 2 * workers:
        yield pending.popleft().result()
    while pending:
      yield pending.popleft().result()


def _episode(video_id: str, path: str, frames: list[bytes], instruction: str | None, fps: float) -> dict:
  steps = []
  for index, frame in enumerate(frames):
    step = {'observation': {'image': frame}, 'is_first': index == 0, 'is_last': index == len(frames) - 1,
            'is_terminal': index == len(frames) - 1}
    if instruction is not None:
      step['language_instruction'] = instruction
    steps.append(step)
  return {'steps': steps, 'episode_metadata': {'video_id': video_id, 'file_path': path,
                                               'fps': np.float32(fps)}}


def video_features(size: int | None, with_instruction: bool):
  import tensorflow_datasets as tfds

  shape = (size, size, 3) if size else (None, None, 3)
  step = {'observation': tfds.features.FeaturesDict({'image': tfds.features.Image(shape=shape, encoding_format='jpeg')}),
          'is_first': tfds.features.Scalar(dtype=np.bool_), 'is_last': tfds.features.Scalar(dtype=np.bool_),
          'is_terminal': tfds.features.Scalar(dtype=np.bool_)}
  if with_instruction:
    step['language_instruction'] = tfds.features.Text()
  return tfds.features.FeaturesDict({
      'steps': tfds.features.Dataset(step),
      'episode_metadata': tfds.features.FeaturesDict({
          'video_id': tfds.features.Text(), 'file_path': tfds.features.Text(),
          'fps': tfds.features.Scalar(dtype=np.float32)}),
  })


def import_videos(source: str, out_dir: str, *, name: str, instructions: str | None = None,
                  fps: float | None = None, size: int | None = None, min_frames: int = 2,
                  skip_unlabeled: bool = False, workers: int | None = None,
                  episodes_per_shard: int = 100, version: str = '1.0.0', progress: bool = True) -> str:
  """Imports the videos under `source` as `out_dir/<name>/<version>`; returns that directory."""
  from lapa_jax.data import rlds  # TensorFlow, only when writing

  videos = list_videos(source)
  labels = read_instructions(instructions) if instructions else None
  if labels is not None:
    unlabeled = [video_id for video_id, _ in videos if video_id not in labels]
    if unlabeled and not skip_unlabeled:
      raise VideoImportError(f'{instructions}: no instruction for {len(unlabeled)} of {len(videos)} videos '
                         f'(e.g. {", ".join(unlabeled[:3])}); pass --skip-unlabeled to leave them out')
    videos = [(video_id, path) for video_id, path in videos if video_id in labels]
  has_files = any(not os.path.isdir(path) for _, path in videos)
  if fps is None and not has_files:
    raise VideoImportError(f'{source}: frame folders carry no timing; pass --fps (SSv2 frames: 12)')
  if fps is not None and fps <= 0:
    raise VideoImportError(f'--fps must be > 0, got {fps}')
  version_dir = os.path.join(out_dir, name, version)
  if os.path.exists(version_dir):
    raise VideoImportError(f'{version_dir}: already exists; remove it or choose another --name/OUT')

  def load(item):
    video_id, path = item
    if os.path.isdir(path):
      return video_id, path, read_frame_folder(path, size), fps
    frames, rate = read_video_file(path, size, fps)
    return video_id, path, frames, rate

  rates = set()
  skipped = []

  def episodes():
    for video_id, path, frames, rate in ordered_map(load, videos, workers or os.cpu_count() or 1):
      if len(frames) < min_frames:
        skipped.append(video_id)
        continue
      rates.add(round(rate, 3))
      if len(rates) > 1:
        raise VideoImportError(f'{path}: {rate:g} fps differs from the other videos ({sorted(rates)}); '
                               'pass --fps to resample every video to one rate')
      yield _episode(video_id, path, frames, labels[video_id] if labels else None, rate)

  def spec() -> dict:  # the fps is known once the videos are read
    return {'embodiment': 'human', 'image_key': 'observation/image',
            'instruction_key': 'language_instruction' if labels else None, 'fps': float(next(iter(rates)))}

  rlds.write_dataset(
      version_dir, name=name, version=version, features=video_features(size, labels is not None),
      splits={'train': episodes()}, episodes_per_shard=episodes_per_shard, progress=progress, total=len(videos),
      description=f'Human videos imported from {os.path.basename(source.rstrip("/"))} by lapa import-videos.',
      # TFDS' metadata.json is where rlds.dataset_fps (builder.info.metadata) finds the rate.
      metadata=lambda: {key: spec()[key] for key in ('fps', 'embodiment')},
      extra_files=lambda: {SPEC_FILE: spec()})
  if skipped:
    print(f'import-videos: skipped {len(skipped)} videos with fewer than {min_frames} frames '
          f'(e.g. {", ".join(skipped[:3])})', file=sys.stderr)
  return version_dir


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog='lapa import-videos', description=__doc__.split('\n\n')[0])
  parser.add_argument('source', help='folder of frame folders or of video files (mp4/webm)')
  parser.add_argument('out', help='output data directory; the dataset goes to OUT/<name>/<version>')
  parser.add_argument('--name', required=True, help='dataset name, e.g. sthsthv2')
  parser.add_argument('--instructions', help='CSV (id,instruction) or JSON (SSv2 labels, or {id: text})')
  parser.add_argument('--fps', type=float, help='frame rate of frame folders; for video files, resample to it')
  parser.add_argument('--size', type=int, help='resize frames to SIZE x SIZE (default: keep)')
  parser.add_argument('--min-frames', type=int, default=2, help='skip shorter videos (default 2)')
  parser.add_argument('--skip-unlabeled', action='store_true', help='leave out videos without an instruction')
  parser.add_argument('--workers', type=int, help='decoding threads (default: CPU count)')
  parser.add_argument('--episodes-per-shard', type=int, default=100)
  args = parser.parse_args(argv)
  from lapa_jax.data import rlds
  try:
    path = import_videos(args.source, args.out, name=args.name, instructions=args.instructions, fps=args.fps,
                         size=args.size, min_frames=args.min_frames, skip_unlabeled=args.skip_unlabeled,
                         workers=args.workers, episodes_per_shard=args.episodes_per_shard)
  except (VideoImportError, rlds.DataError) as error:
    print(f'lapa import-videos: {error}', file=sys.stderr)
    return 2
  print(path)
  return 0


if __name__ == '__main__':
  sys.exit(main())
