"""One of two local processes that agree on a mixture's statistics through lapa_jax.train.data.

    python tests/statistics_worker.py PROCESS_ID PORT DATA_DIR MIXTURE

Counts the dataset passes this process makes (statistics.compute) and prints one JSON line:
{"process": i, "passes": n, "statistics": sha256 of what it got, "error": message of a bad mixture}.
"""

import hashlib
import json
import os
import sys

import jax

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def main(argv):
  process_id, port, data_dir, mixture = int(argv[0]), argv[1], argv[2], argv[3]
  jax.config.update('jax_num_cpu_devices', 1)
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(f'127.0.0.1:{port}', num_processes=2, process_id=process_id)

  from lapa_jax.data import pipelines, statistics
  from lapa_jax.train import data

  passes = []
  compute = statistics.compute
  statistics.compute = lambda *args, **kwargs: passes.append(1) or compute(*args, **kwargs)
  config = pipelines.default_config()
  config.update(data_dir=data_dir, mixture=mixture, statistics_cache_dir=os.path.join(data_dir, 'cache'))
  shared = data.shared_statistics(config, progress=False)
  digest = hashlib.sha256(json.dumps(shared, sort_keys=True).encode()).hexdigest()
  config.mixture = mixture + ',no_such_dataset'
  try:
    data.shared_statistics(config, progress=False)
    error = None
  except pipelines.DataError as caught:
    error = str(caught)
  print(json.dumps({'process': process_id, 'passes': len(passes), 'statistics': digest,
                    'datasets': sorted(shared), 'error': error}), flush=True)
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
