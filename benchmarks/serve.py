"""Serving latency and throughput: `lapa serve` answering the real openpi client over localhost.

    python benchmarks/serve.py [--presets tiny,small] [--clients 1,8] [--requests 40] [--max-batch 8]

For each backbone preset, an untrained policy (`Policy.untrained`: the real program with random
weights; speed does not depend on them) is compiled for every batch size the server can form, served
on a free localhost port, and queried by N concurrent openpi clients (`WebsocketClientPolicy`, one
thread each in this process), each sending `--requests` observations one after another, as a robot
does. Per N: p50/p95 of the clients' round-trip latency, requests/s over all clients, and the mean
batch the server formed. `bare_ms` is one direct `policy.infer` of a single observation: the floor
that serving adds to. Prints one JSON line per preset.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import sys
import threading
import time

import jax
import numpy as np
from openpi_client import websocket_client_policy

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lapa_jax import serve  # noqa: E402
from lapa_jax.policy import Policy  # noqa: E402

INSTRUCTION = 'push the red block to the left'


class BatchCounter:
  """The policy, recording the size of every batch the server hands it."""

  def __init__(self, policy: Policy):
    self.policy, self.metadata, self.batch_sizes = policy, policy.metadata, []

  def check_observation(self, obs: dict) -> dict:
    return self.policy.check_observation(obs)

  def infer(self, obs: dict) -> dict:
    self.batch_sizes.append(len(obs['image']))
    return self.policy.infer(obs)


def images(count: int, size: int) -> list[np.ndarray]:
  rng = np.random.default_rng(0)
  return [rng.integers(0, 256, (size, size, 3), np.uint8) for _ in range(count)]


def bare_latency_ms(policy: Policy, image: np.ndarray, repeats: int) -> float:
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    policy.infer({'image': image, 'instruction': INSTRUCTION})
    times.append(time.perf_counter() - start)
  return 1000 * statistics.median(times)


def measure(port: int, clients: int, requests: int, frames: list[np.ndarray]) -> tuple[list[float], float]:
  """Round-trip latencies (s) of `clients` concurrent clients x `requests`, and the wall time of all."""
  connections = [websocket_client_policy.WebsocketClientPolicy('127.0.0.1', port) for _ in range(clients)]
  for index, connection in enumerate(connections):  # the first request of a connection is not timed
    connection.infer({'image': frames[index], 'instruction': INSTRUCTION})
  latencies: list[list[float]] = [[] for _ in range(clients)]
  barrier = threading.Barrier(clients + 1)

  def run(index: int) -> None:
    barrier.wait()
    for _ in range(requests):
      start = time.perf_counter()
      connections[index].infer({'image': frames[index], 'instruction': INSTRUCTION})
      latencies[index].append(time.perf_counter() - start)
  threads = [threading.Thread(target=run, args=(index,)) for index in range(clients)]
  for thread in threads:
    thread.start()
  barrier.wait()
  start = time.perf_counter()
  for thread in threads:
    thread.join()
  return [latency for row in latencies for latency in row], time.perf_counter() - start


def benchmark_preset(preset: str, args: argparse.Namespace) -> dict:
  policy = Policy.untrained(preset)
  size = int(policy.metadata['image_size'])
  frames = images(max(args.clients), size)
  compile_seconds = serve.warm_up(policy, args.max_batch)
  result = {'benchmark': 'serve', 'preset': preset, 'image_size': size, 'max_batch': args.max_batch,
            'max_wait_ms': args.max_wait_ms, 'requests_per_client': args.requests,
            'compile_seconds': round(compile_seconds, 1),
            'bare_ms': round(bare_latency_ms(policy, frames[0], args.requests), 2), 'clients': []}
  counter = BatchCounter(policy)
  with serve.PolicyServer(counter, '127.0.0.1', 0, max_batch=args.max_batch, max_wait_ms=args.max_wait_ms,
                          max_queue=max(args.clients)) as server:
    for clients in args.clients:
      counter.batch_sizes.clear()
      latencies, seconds = measure(server.port, clients, args.requests, frames)
      timed = counter.batch_sizes[clients:]  # after each connection's untimed first request
      result['clients'].append({
          'clients': clients, 'p50_ms': round(1000 * float(np.percentile(latencies, 50)), 2),
          'p95_ms': round(1000 * float(np.percentile(latencies, 95)), 2),
          'requests_per_second': round(len(latencies) / seconds, 1),
          'mean_batch': round(statistics.mean(timed), 2) if timed else None})
  result.update(device=jax.devices()[0].device_kind, cpu_count=os.cpu_count(),
                load_average_1min=round(os.getloadavg()[0], 2))
  return result


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--presets', default='tiny,small', help='backbone sizes (default tiny,small)')
  parser.add_argument('--clients', default='1,8', help='numbers of concurrent clients (default 1,8)')
  parser.add_argument('--requests', type=int, default=40, help='timed requests per client (default 40)')
  parser.add_argument('--max-batch', type=int, default=8)
  parser.add_argument('--max-wait-ms', type=float, default=5.0)
  args = parser.parse_args()
  args.clients = [int(count) for count in args.clients.split(',')]
  for preset in args.presets.split(','):
    print(json.dumps(benchmark_preset(preset, args)), flush=True)


if __name__ == '__main__':
  main()
