"""Train-step throughput of the LAQ (frame pairs per second), fp32, on whatever JAX runs on.

    export GLIBC_TUNABLES=glibc.malloc.hugetlb=1          # huge pages on a CPU (lapa_jax/host_memory.py)
    python benchmarks/laq_step.py --preset small          # batch 8, the official PyTorch LAQ: 23.4 pairs/s
    python benchmarks/laq_step.py --preset paper          # batch 4, the official PyTorch LAQ: 0.46 pairs/s
    env -u GLIBC_TUNABLES LAPA_HUGE_PAGES=0 python benchmarks/laq_step.py --preset small   # without them

The step is the one `lapa train` runs (`lapa_jax.train.step.make_train_step`): the stage's loss
(NSVQ noise substitution), gradients, the config's optimizer (Adam, clip 0.5) and dead-code
revival, jitted with donated state, on random uint8 pairs as the stage's pipeline ships them (the
input pipeline is benchmarked separately).
The official figures are for the identical model configuration and batch on a 2-core CPU machine
of the kind CI runs on. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import pathlib
import statistics
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lapa_jax import config as config_lib  # noqa: E402
from lapa_jax import host_memory  # noqa: E402
from lapa_jax.models import laq as laq_model  # noqa: E402
from lapa_jax.train import laq as laq_stage  # noqa: E402
from lapa_jax.train import optim  # noqa: E402
from lapa_jax.train.step import init_train_state, make_train_step  # noqa: E402

# Official PyTorch LAQ, fp32 train step, 2-core CPU (pairs/s), and the batch it was measured at.
OFFICIAL = {'small': (23.4, 8), 'paper': (0.46, 4)}
TARGET_RATIO = {'small': 1.5, 'paper': 1.3}


def make_step(config):
  """(init() -> TrainState, step(state, batch) -> (state, metrics)), both jitted; the step donates the state."""
  model = laq_model.from_config(config.model, config.dtype)
  optimizer = optim.make_optimizer(config.optim, config.total_steps)

  def init_variables(rng):
    image = config.model.image_size
    params = model.init({'params': rng}, jnp.zeros((1, 2, image, image, config.model.channels)))['params']
    return {'params': nn.unbox(params),
            'model_state': laq_stage.initial_model_state(config.model.codebook_size, config.model.quant_dim,
                                                         laq_stage.latent_pool_size(config))}

  step = make_train_step(laq_stage.make_loss_fn(model), optimizer,
                         after_update=functools.partial(laq_stage.revive_dead_codes, revival=config.revival))
  return (jax.jit(lambda: init_train_state(init_variables, optimizer, config.seed)),
          jax.jit(step, donate_argnums=(0,)))


def main() -> None:
  host_memory.warn_if_missing('laq_step.py')  # as `lapa` does; the JSON line records `huge_pages`
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--preset', choices=sorted(OFFICIAL), default='small')
  parser.add_argument('--batch', type=int, default=None, help='default: the batch of the official figure')
  parser.add_argument('--steps', type=int, default=None, help='timed steps (default 20 small, 3 paper)')
  parser.add_argument('--variant', choices=laq_model.VARIANTS, default='lapa')
  args = parser.parse_args()
  official, official_batch = OFFICIAL[args.preset]
  batch = args.batch or official_batch
  steps = args.steps or (20 if args.preset == 'small' else 3)
  config = config_lib.load(str(ROOT / 'configs' / 'laq.py') + f':{args.preset}',
                           [f'--config.batch_size={batch}', f'--config.model.variant={args.variant}'])
  init, step = make_step(config)
  image = config.model.image_size
  video = jax.random.randint(jax.random.PRNGKey(0), (batch, 2, image, image, config.model.channels), 0, 256,
                             jnp.int32).astype(jnp.uint8)
  frames = {'video': video}

  start = time.perf_counter()
  state = init()
  state, metrics = step(state, frames)
  metrics['loss'].block_until_ready()
  compile_seconds = time.perf_counter() - start
  state, metrics = step(state, frames)  # one more warm-up step
  metrics['loss'].block_until_ready()

  times, cpu_times = [], []
  for _ in range(steps):
    start, cpu_start = time.perf_counter(), time.process_time()
    state, metrics = step(state, frames)
    metrics['loss'].block_until_ready()
    times.append(time.perf_counter() - start)
    cpu_times.append(time.process_time() - cpu_start)
  median = statistics.median(times)
  pairs_per_second = batch / median
  result = {
      'benchmark': 'laq_step', 'preset': args.preset, 'variant': args.variant, 'batch': batch, 'dtype': 'float32',
      'params': sum(x.size for x in jax.tree.leaves(state.params)),
      'pairs_per_second': round(pairs_per_second, 3), 'pairs_per_second_best_step': round(batch / min(times), 3),
      'step_seconds_median': round(median, 4), 'step_cpu_seconds_median': round(statistics.median(cpu_times), 4),
      'steps': steps, 'compile_seconds': round(compile_seconds, 1), 'loss': float(metrics['loss']),
      'official_pytorch_pairs_per_second': official if batch == official_batch else None,
      'target_pairs_per_second': round(official * TARGET_RATIO[args.preset], 3) if batch == official_batch else None,
      'ratio_to_official': round(pairs_per_second / official, 3) if batch == official_batch else None,
      'device': jax.devices()[0].device_kind, 'device_count': jax.device_count(), 'cpu_count': os.cpu_count(),
      'load_average_1min': round(os.getloadavg()[0], 2), 'xla_flags': os.environ.get('XLA_FLAGS', ''),
      'huge_pages': host_memory.huge_pages_requested(),
  }
  print(json.dumps(result))


if __name__ == '__main__':
  main()
