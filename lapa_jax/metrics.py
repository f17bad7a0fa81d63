"""Where a run reports: `<workdir>/metrics.jsonl`, TensorBoard events, PNGs, a progress bar.

Only process 0 writes; the other processes get the same object and every call is a no-op there, so
calling code needs no `if process_index == 0`.

    writer = MetricWriter(workdir)
    writer.write_scalars(step, {'loss': 0.1})           # one JSON line + TensorBoard scalars
    writer.write_images(step, {'samples': image_grid(frames)})  # images/samples_00000100.png + TensorBoard
"""

from __future__ import annotations

import json
import math
import os
from typing import Mapping

import einops
import jax
import numpy as np
import tqdm
from PIL import Image

METRICS_FILE = 'metrics.jsonl'
IMAGES_DIR = 'images'
TENSORBOARD_DIR = 'tensorboard'


class MetricWriter:
  """Scalars to `metrics.jsonl` and TensorBoard; images to `images/<name>_<step>.png` and TensorBoard."""

  def __init__(self, workdir: str, *, tensorboard: bool = True, drop_after_step: int | None = None):
    """`drop_after_step`: a resumed run's step; lines of later steps (logged by a run that died after
    its last checkpoint, and about to be logged again) and any half-written line are removed."""
    self.workdir = workdir
    self.active = jax.process_index() == 0
    self._jsonl = None
    self._summary = None
    if not self.active:
      return
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, METRICS_FILE)
    if drop_after_step is not None and os.path.exists(path):
      _drop_lines_after(path, drop_after_step)
    # Appends, so a resumed run continues the same file.
    self._jsonl = open(path, 'a', buffering=1)
    if tensorboard:
      # Imported here: it pulls in TensorFlow, which only the writing process needs.
      from flax.metrics import tensorboard as flax_tensorboard
      self._summary = flax_tensorboard.SummaryWriter(os.path.join(workdir, TENSORBOARD_DIR), auto_flush=False)

  def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
    if not self.active:
      return
    values = {name: float(np.asarray(value)) for name, value in scalars.items()}
    # NaN and inf are not JSON: such a value (the loss of a skipped step) is written as null.
    finite = {name: value if math.isfinite(value) else None for name, value in values.items()}
    self._jsonl.write(json.dumps({'step': int(step), **finite}) + '\n')
    if self._summary is not None:
      for name, value in values.items():
        self._summary.scalar(name, value, int(step))
      self._summary.flush()

  def write_images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
    """`images`: name -> uint8 (height, width, channels) or (height, width) array."""
    if not self.active:
      return
    for name, image in images.items():
      image = np.asarray(image)
      if image.dtype != np.uint8 or image.ndim not in (2, 3):
        raise ValueError(f'image {name!r}: expected uint8 (height, width[, channels]), '
                         f'got {image.dtype} {image.shape}')
      file_name = f"{name.replace('/', '_')}_{int(step):08d}.png"
      save_png(os.path.join(self.workdir, IMAGES_DIR, file_name), image)
      if self._summary is not None:
        self._summary.image(name, image if image.ndim == 3 else image[..., None], int(step))
    if self._summary is not None:
      self._summary.flush()

  def close(self) -> None:
    if self._jsonl is not None:
      self._jsonl.close()
      self._jsonl = None
    if self._summary is not None:
      self._summary.close()
      self._summary = None


def _drop_lines_after(path: str, step: int) -> None:
  kept = []
  with open(path) as f:
    for line in f:
      try:
        if json.loads(line)['step'] <= step:
          kept.append(line if line.endswith('\n') else line + '\n')
      except (ValueError, KeyError, TypeError):
        pass  # a line cut short by the crash
  with open(path + '.tmp', 'w') as f:
    f.writelines(kept)
  os.replace(path + '.tmp', path)


def progress_bar(total: int, initial: int = 0, desc: str = 'train') -> tqdm.tqdm:
  """A step counter with rate and ETA on process 0 (disabled on the others)."""
  return tqdm.tqdm(total=total, initial=initial, desc=desc, unit='step', dynamic_ncols=True,
                   disable=jax.process_index() != 0)


def to_uint8(images: np.ndarray) -> np.ndarray:
  """Floats in [0, 1] (clipped) or uint8 -> uint8."""
  images = np.asarray(images)
  if images.dtype == np.uint8:
    return images
  return np.round(np.clip(images, 0.0, 1.0) * 255).astype(np.uint8)


def image_grid(images: np.ndarray, columns: int | None = None, padding: int = 2) -> np.ndarray:
  """(count, height, width, channels) floats in [0, 1] or uint8 -> one uint8 grid image.

  Tiles fill rows left to right; `columns` defaults to a near-square grid; white `padding` pixels
  separate the tiles.
  """
  images = to_uint8(images)
  if images.ndim != 4:
    raise ValueError(f'image_grid: expected (count, height, width, channels), got shape {images.shape}')
  count = images.shape[0]
  columns = columns or math.ceil(math.sqrt(count))
  rows = math.ceil(count / columns)
  blank = np.full((rows * columns - count, *images.shape[1:]), 255, np.uint8)
  tiles = np.concatenate([images, blank])
  tiles = np.pad(tiles, ((0, 0), (padding, 0), (padding, 0), (0, 0)), constant_values=255)
  grid = einops.rearrange(tiles, '(row column) height width channels -> (row height) (column width) channels',
                          row=rows, column=columns)
  return np.pad(grid, ((0, padding), (0, padding), (0, 0)), constant_values=255)


def save_png(path: str, image: np.ndarray) -> str:
  """Writes a uint8 (height, width[, channels]) image as PNG (atomically)."""
  os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
  image = np.asarray(image)
  if image.ndim == 3 and image.shape[-1] == 1:
    image = image[..., 0]
  with open(path + '.tmp', 'wb') as f:
    Image.fromarray(image).save(f, format='PNG')
  os.replace(path + '.tmp', path)
  return path
