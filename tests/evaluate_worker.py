"""One of two local processes (1 CPU device each) that run `lapa evaluate` together.

    python tests/evaluate_worker.py PROCESS_ID PORT -- <lapa evaluate arguments>
"""

import os
import sys

import jax

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def main(argv):
  process_id, port, arguments = int(argv[0]), argv[1], argv[3:]
  jax.config.update('jax_num_cpu_devices', 1)
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(f'127.0.0.1:{port}', num_processes=2, process_id=process_id)
  from lapa_jax import evaluate
  return evaluate.main(arguments)


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
