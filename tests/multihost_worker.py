"""One of two local processes (4 CPU devices each) that train the toy stage together.

    python tests/multihost_worker.py PROCESS_ID PORT WORKDIR [--config.a=b ...]

Exercises the multi-host paths on loopback: jax.distributed with gloo collectives, per-process data
slices joined by make_array_from_process_local_data, process-0-only writing, a checkpoint written by
both processes, and its restore onto another mesh. Prints 'restored OK' at the end.
"""

import os
import sys

import jax

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(argv):
  process_id, port, workdir, overrides = int(argv[0]), argv[1], argv[2], argv[3:]
  jax.config.update('jax_num_cpu_devices', 4)
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(f'127.0.0.1:{port}', num_processes=2, process_id=process_id)
  assert jax.process_count() == 2 and len(jax.devices()) == 8 and len(jax.local_devices()) == 4

  import numpy as np
  from jax.experimental import multihost_utils

  from lapa_jax import checkpoint
  from lapa_jax import config as config_lib
  from lapa_jax import sharding
  from lapa_jax.train import loop, toy

  config = config_lib.load(os.path.join(REPO, 'configs', 'toy.py') + ':tiny', overrides)
  stage = toy.make_stage(config)
  state = loop.train(config, workdir, stage)

  # Both processes read the checkpoint back onto a differently shaped mesh.
  init_params = lambda: stage.init(jax.random.PRNGKey(0))['params']
  target = checkpoint.restore_target(init_params, sharding.make_mesh('2,2,2'))
  with checkpoint.Checkpointer(checkpoint.directory_in(workdir), read_only=True) as checkpoints:
    params = checkpoints.restore_params(target)
  for saved, restored in zip(jax.tree.leaves(state.params), jax.tree.leaves(params)):
    np.testing.assert_array_equal(multihost_utils.process_allgather(saved, tiled=True),
                                  multihost_utils.process_allgather(restored, tiled=True))
  print('restored OK', flush=True)
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
