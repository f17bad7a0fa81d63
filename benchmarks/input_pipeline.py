"""Throughput of the Open-X mixture input pipeline vs decoding the same files, and peak RSS.

    python benchmarks/input_pipeline.py [--data-dir D --mixture a:1,b:1] [--batches 40] [--batch-size 64] [--size 64]

Without --data-dir it writes two synthetic datasets in the real jaco_play and viola schemas with
camera-like 256x256 JPEGs (two cameras per step, 40-44 steps per episode) to a temporary directory.
The pipeline resizes them to --size (default 64, the `small` LAQ's images). A frame already stored
at the target size skips the resize, and the resize is the pipeline's work beyond decoding that this
benchmark exists to measure, so --size 256 on the synthetic data would measure a pipeline that never
resizes (`resized` in the output says which).
It then measures, in one process:
  1. decode-only: every primary-camera frame of the mixture's train splits read with tf.data and
     decoded as fast as the machine allows (parallel map), reported as frames/s and as pairs/s
     (= frames/s / 2, the decode work of one frame pair);
  2. the LAQ frame-pair mixture pipeline (lapa_jax.data.pipelines.pair_iterator) at --size, with
     uint8 and float32 output: steady-state pairs/s (after the first shuffle block, while later
     blocks are read in the background), and its ratio to the decode-only pairs/s (target >= 0.8);
     float32 writes four times the bytes of uint8 (one conversion per batch), so a trainer should
     take uint8 and convert on the accelerator, where it fuses into the first layer;
  3. peak RSS of each phase, each measured in a fresh process (TensorFlow itself takes ~0.5-1 GB).
Rates are wall-clock (pairs_per_s) and per CPU-second of the whole process (pairs_per_cpu_s); on a
machine shared with other jobs the CPU-time ratio is the stable measure of pipeline overhead.
Prints one JSON line per measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, '..', 'tests'))  # the synthetic schema writers
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import tensorflow as tf  # noqa: E402

from lapa_jax.data import mixtures, pipelines, rlds  # noqa: E402

TARGET_RATIO = 0.8
SYNTHETIC_SIZE = 256  # the synthetic frames' height and width


def peak_rss_mb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def emit(**record) -> None:
  print(json.dumps(record), flush=True)


def write_synthetic(root: str, episodes: int) -> str:
  import oxe_schemas

  oxe_schemas.TEXTURE['on'] = True
  oxe_schemas.SHORTEST_EPISODE['steps'] = 40
  for name in ('jaco_play', 'viola'):
    # Both schemas store 224x224 frames; scaled up to camera-like 256x256.
    oxe_schemas.write(root, name, episodes=episodes, scale=SYNTHETIC_SIZE / 224,
                      episodes_per_shard=max(1, episodes // 4))
  return 'jaco_play:1,viola:1'


def decode_only(data_dir: str, mixture: str, frames: int, threads: int) -> tuple[float, float]:
  """Frames per second and per CPU-second of reading + decoding the mixture's primary-camera frames."""
  stream = None
  for dataset, _ in mixtures.resolve(data_dir, mixture):
    key = dataset.spec.image_key
    episodes = rlds.episodes(dataset.builder, 'train')
    part = episodes.map(lambda episode, key=key: rlds.get_path(episode['steps'], key),
                        num_parallel_calls=tf.data.AUTOTUNE).unbatch()
    stream = part if stream is None else stream.concatenate(part)
  decoded = stream.repeat().map(lambda encoded: tf.io.decode_jpeg(encoded, channels=3),
                                num_parallel_calls=threads, deterministic=False)
  iterator = iter(decoded.batch(64).prefetch(2))
  for _ in range(3):  # warm-up
    next(iterator)
  start, cpu = time.perf_counter(), time.process_time()
  for _ in range(frames // 64):
    next(iterator)
  count = (frames // 64) * 64
  return count / (time.perf_counter() - start), count / (time.process_time() - cpu)


def pipeline_rate(config, image_size: int, batch_size: int, batches: int) -> tuple[float, float, dict]:
  """Steady-state pairs/s: measured after the first shuffle block has been delivered, while the
  builder thread keeps reading the next blocks, as it does during training."""
  start = time.perf_counter()
  iterator = pipelines.pair_iterator(config, image_size=image_size, batch_size=batch_size, seed=0, progress=False)
  next(iterator)
  first_batch_s = time.perf_counter() - start
  for _ in range(-(-iterator.mixture.block_size // batch_size) + 2):
    next(iterator)
  start, cpu = time.perf_counter(), time.process_time()
  for _ in range(batches):
    batch = next(iterator)
  elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
  mixture = iterator.mixture
  plan = {'block_size': mixture.block_size, 'decode_threads': mixture.decode_threads,
          'cycle_length': mixture.cycle_length, 'video': list(batch['video'].shape),
          'first_batch_s': round(first_batch_s, 1)}
  iterator.close()
  return batches * batch_size / elapsed, batches * batch_size / cpu, plan


def run_phase(args) -> dict:
  """One measurement in this process (a fresh one per phase, so that peak RSS is the phase's)."""
  threads = os.cpu_count() or 1
  if args.phase == 'decode':
    frames_per_s, frames_per_cpu_s = decode_only(args.data_dir, args.mixture, 2 * args.batches * args.batch_size,
                                                 threads)
    return {'metric': 'decode_only', 'frames_per_s': round(frames_per_s, 1),
            'pairs_per_s': round(frames_per_s / 2, 1), 'pairs_per_cpu_s': round(frames_per_cpu_s / 2, 1),
            'threads': threads, 'peak_rss_mb': round(peak_rss_mb(), 1)}
  config = pipelines.default_config()
  config.update(data_dir=args.data_dir, mixture=args.mixture, ram_budget_gb=args.ram_budget_gb,
                image_dtype=args.phase, statistics_cache_dir=args.statistics_dir)
  rate, per_cpu_s, plan = pipeline_rate(config, args.size, args.batch_size, args.batches)
  return {'metric': 'mixture_pairs', 'image_dtype': args.phase, 'size': args.size, 'mixture': args.mixture,
          'pairs_per_s': round(rate, 1), 'pairs_per_cpu_s': round(per_cpu_s, 1), 'ram_budget_gb': args.ram_budget_gb,
          'peak_rss_mb': round(peak_rss_mb(), 1), **plan}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--data-dir', help='existing data directory (default: write synthetic data)')
  parser.add_argument('--mixture', help='mixture over --data-dir (default with synthetic data: jaco_play,viola)')
  parser.add_argument('--episodes', type=int, default=24, help='episodes per synthetic dataset')
  parser.add_argument('--batches', type=int, default=150, help='batches measured per phase')
  parser.add_argument('--batch-size', type=int, default=64)
  parser.add_argument('--size', type=int, default=64, help='output frames (default 64: the synthetic 256x256 '
                      'frames are resized, as the pipeline does for every frame not stored at this size)')
  parser.add_argument('--ram-budget-gb', type=float, default=2.0)
  parser.add_argument('--phase', choices=('decode', 'uint8', 'float32'), help=argparse.SUPPRESS)
  parser.add_argument('--statistics-dir', help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.phase:
    print(json.dumps(run_phase(args)), flush=True)
    return 0

  with tempfile.TemporaryDirectory() as tmp:
    source_size = None  # unknown for --data-dir (datasets differ)
    if args.data_dir is None:
      source_size = SYNTHETIC_SIZE
      start = time.perf_counter()
      args.mixture = write_synthetic(tmp, args.episodes)
      args.data_dir = tmp
      emit(phase='write_synthetic', datasets=args.mixture, image_size=SYNTHETIC_SIZE,
           seconds=round(time.perf_counter() - start, 1))
    statistics_dir = os.path.join(tmp, 'statistics')
    config = pipelines.default_config()
    config.update(data_dir=args.data_dir, mixture=args.mixture, statistics_cache_dir=statistics_dir)
    pipelines.build_sources(config, content=pipelines.PAIRS, process_index=0, process_count=1,
                            progress=False)  # computes and caches the statistics once, for every phase
    results = {}
    for phase in ('decode', 'uint8', 'float32'):
      command = [sys.executable, os.path.abspath(__file__), '--phase', phase, '--data-dir', args.data_dir,
                 '--mixture', args.mixture, '--batches', str(args.batches), '--batch-size', str(args.batch_size),
                 '--size', str(args.size), '--ram-budget-gb', str(args.ram_budget_gb),
                 '--statistics-dir', statistics_dir]
      done = subprocess.run(command, capture_output=True, text=True)
      if done.returncode:
        print(done.stderr[-3000:], file=sys.stderr)
        return done.returncode
      results[phase] = json.loads(done.stdout.strip().splitlines()[-1])
      if phase != 'decode':
        ratio = results[phase]['pairs_per_s'] / results['decode']['pairs_per_s']
        cpu_ratio = results[phase]['pairs_per_cpu_s'] / results['decode']['pairs_per_cpu_s']
        results[phase].update(ratio_to_decode_only=round(ratio, 3), cpu_ratio_to_decode_only=round(cpu_ratio, 3),
                              target_ratio=TARGET_RATIO, source_size=source_size,
                              resized=None if source_size is None else source_size != args.size)
      emit(**results[phase])
  return 0


if __name__ == '__main__':
  sys.exit(main())
