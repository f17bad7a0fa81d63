"""Rendering speed of the built-in world: frames per second on one core, per embodiment and size.

    python benchmarks/world_render.py [--frames 2000] [--sizes 64,128,256]

Prints one JSON line per (embodiment, image size), then a summary line whose `pass` says whether
every embodiment renders at least 2,000 frames/s at 64x64 (the target of the issue). States come
from expert rollouts so that blocks and effector are where they are in real episodes. Each figure is
the best of three timed passes: the machine may be shared, and the best pass is the least disturbed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import numpy as np

from lapa_jax.envs import expert, render, world

TARGET_FRAMES_PER_SECOND = 2000
TARGET_SIZE = 64


def _states(count: int) -> list[world.WorldState]:
  states, seed = [], 0
  while len(states) < count:
    state = world.sample_world(seed)
    rng = np.random.default_rng(seed)
    for _ in range(world.MAX_STEPS):
      states.append(state)
      state = world.apply_action(state, expert.expert_action(state, rng))
      if world.is_success(state):
        break
    seed += 1
  return states[:count]


def _frames_per_second(states, embodiment: str, image_size: int, passes: int = 3):
  """(frames per CPU second, frames per wall-clock second), best of `passes`."""
  render.render(states[0], embodiment, image_size)   # draws and caches the table
  cpu, wall = float('inf'), float('inf')
  for _ in range(passes):
    cpu_start, wall_start = time.process_time(), time.perf_counter()
    for state in states:
      render.render(state, embodiment, image_size)
    cpu = min(cpu, time.process_time() - cpu_start)
    wall = min(wall, time.perf_counter() - wall_start)
  return len(states) / cpu, len(states) / wall


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--frames', type=int, default=2000, help='frames per timed pass')
  parser.add_argument('--sizes', default='64,128,256', help='comma-separated image sizes')
  args = parser.parse_args()
  sizes = [int(size) for size in args.sizes.split(',')]
  states = _states(args.frames)
  at_target = []
  for embodiment in render.EMBODIMENTS:
    for image_size in sizes:
      rate, wall_rate = _frames_per_second(states, embodiment, image_size)
      if image_size == TARGET_SIZE:
        at_target.append(rate)
      print(json.dumps({'benchmark': 'world_render', 'embodiment': embodiment,
                        'image_size': image_size, 'frames': len(states),
                        'frames_per_second': round(rate, 1),
                        'wall_frames_per_second': round(wall_rate, 1)}), flush=True)
  print(json.dumps({
      'benchmark': 'world_render', 'summary': True, 'target_image_size': TARGET_SIZE,
      'target_frames_per_second': TARGET_FRAMES_PER_SECOND,
      'min_frames_per_second_at_target': round(min(at_target), 1) if at_target else None,
      'pass': bool(at_target) and min(at_target) >= TARGET_FRAMES_PER_SECOND,
      'cpu': platform.processor() or platform.machine(), 'cpu_count': os.cpu_count(),
      'numpy': np.__version__}))


if __name__ == '__main__':
  main()
