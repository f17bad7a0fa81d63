"""Labelling throughput: `lapa label`'s frames/s against the bare jitted encoders' on the same batches.

    python benchmarks/label.py                                 # built-in world, small LAQ + tokenizer
    python benchmarks/label.py --laq W --tokenizer T --path DATASET_DIR

The job reads shards, decodes frames, runs the LAQ encoder + quantizer and the VQGAN encoder,
and writes the labelled RLDS dataset; the bare figure runs only the jitted encoders on the same
batches, already in device memory. Their ratio says whether the input and output side keeps up
(target >= 0.8). Without --laq/--tokenizer, randomly initialised `small` presets stand in: speed
does not depend on the weights. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import sys
import tempfile
import time

import jax
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lapa_jax import config as config_lib  # noqa: E402
from lapa_jax import label  # noqa: E402
from lapa_jax.convert import easylm  # noqa: E402
from lapa_jax.data import oxe, pairs, pipelines  # noqa: E402
from lapa_jax.envs import writer  # noqa: E402

TARGET_RATIO = 0.8


def random_workdir(config_path: str, directory: str, init) -> str:
  """A workdir (config.json + params checkpoint) of a randomly initialised model of `config_path`."""
  config = config_lib.load(config_path)
  params = init(config)
  easylm.save_params_checkpoint(directory, params)
  config_lib.save(config, directory)
  return directory


def random_laq(directory: str, preset: str) -> str:
  from lapa_jax.models import laq as laq_model

  def init(config):
    model = laq_model.from_config(config.model)
    size = config.model.image_size
    import flax.linen as nn
    return nn.unbox(jax.jit(lambda rng: model.init({'params': rng}, np.zeros((1, 2, size, size, 3), np.float32)))(
        jax.random.key(0))['params'])
  return random_workdir(str(ROOT / 'configs' / f'laq.py:{preset}'), directory, init)


def random_tokenizer(directory: str, preset: str) -> str:
  from lapa_jax.models import vqgan

  def init(config):
    model = vqgan.VQGAN(vqgan.from_config(config.model))
    size = config.model.resolution
    return jax.jit(lambda rng: model.init(rng, np.zeros((1, size, size, 3), np.float32)))(jax.random.key(0))['params']
  return random_workdir(str(ROOT / 'configs' / f'tokenizer.py:{preset}'), directory, init)


def job_batches(labeller: label.Labeller, dataset: oxe.Dataset, frame_offset: int) -> list[tuple[np.ndarray, np.ndarray]]:
  """Every batch the job makes of the train split, as host arrays."""
  reader = oxe.EpisodeReader(dataset)
  video, images = [], []
  for segment in reader.segments('train'):
    for raw in reader.read(segment.split(), decode=label._decoder(labeller)):
      steps = len(reader.standardize(raw)['image'])
      first, second = pairs.pair_indices(steps, frame_offset, 'clamp')
      video.append(np.stack([raw['laq_frames'][first], raw['laq_frames'][second]], axis=1))
      images.append(raw['vqgan_frames'][:steps])
  video, images = np.concatenate(video), np.concatenate(images)
  size = labeller.batch_size
  return [(video[start:start + size], images[start:start + size]) for start in range(0, len(video) - size + 1, size)]


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--laq', help='LAQ workdir (default: a random `small` LAQ)')
  parser.add_argument('--tokenizer', help='tokenizer workdir (default: a random `small` VQGAN)')
  parser.add_argument('--path', help='RLDS dataset to label (default: a new built-in world dataset)')
  parser.add_argument('--episodes', type=int, default=60, help='built-in world episodes (default 60)')
  parser.add_argument('--batch-size', type=int, default=64)
  parser.add_argument('--repeats', type=int, default=3, help='timed passes of each measurement')
  args = parser.parse_args()
  scratch = tempfile.mkdtemp(prefix='lapa_label_bench_')
  path = args.path or writer.write_dataset(os.path.join(scratch, 'world'), 'robot', episodes=args.episodes,
                                           seed=0, image_size=64)
  laq = args.laq or random_laq(os.path.join(scratch, 'laq'), 'small')
  tokenizer = args.tokenizer or random_tokenizer(os.path.join(scratch, 'tokenizer'), 'small')
  labeller = label.Labeller(laq, tokenizer, batch_size=args.batch_size)
  config = label.default_config()
  config.data.path = path
  config.splits = 'train'
  dataset = pipelines.open_datasets(config.data)[0][0]
  frame_offset = pipelines.frame_offset(config.data, dataset.spec)

  batches = job_batches(labeller, dataset, frame_offset)
  on_device = [(jax.device_put(video, labeller._video_sharding), jax.device_put(images, labeller._image_sharding))
               for video, images in batches]
  jax.block_until_ready(labeller.label(*batches[0]))  # compile
  bare = []
  for _ in range(args.repeats):
    start = time.perf_counter()
    outputs = [labeller._label(labeller.laq_params, labeller.vqgan_params, video, images) for video, images in on_device]
    jax.block_until_ready(outputs)
    bare.append(len(batches) * labeller.batch_size / (time.perf_counter() - start))

  frames = sum(len(episode) for episode in _episode_lengths(dataset))
  job = []
  for repeat in range(args.repeats):
    start = time.perf_counter()
    label.label_dataset(dataset, labeller, os.path.join(scratch, f'labelled_{repeat}'), config, progress=False)
    job.append(frames / (time.perf_counter() - start))
  result = {
      'benchmark': 'label', 'dataset': dataset.path, 'frames': frames, 'batch_size': labeller.batch_size,
      'laq_image_size': labeller.image_size, 'tokenizer_resolution': labeller.resolution,
      'bare_frames_per_second': round(statistics.median(bare), 1),
      'job_frames_per_second': round(statistics.median(job), 1),
      'ratio': round(statistics.median(job) / statistics.median(bare), 3), 'target_ratio': TARGET_RATIO,
      'repeats': args.repeats, 'device': jax.devices()[0].device_kind, 'device_count': jax.device_count(),
      'cpu_count': os.cpu_count(), 'load_average_1min': round(os.getloadavg()[0], 2),
  }
  print(json.dumps(result))


def _episode_lengths(dataset: oxe.Dataset):
  reader = oxe.EpisodeReader(dataset)
  for segment in reader.segments('train'):
    for episode in reader.episodes(segment):
      yield episode['image']


if __name__ == '__main__':
  main()
