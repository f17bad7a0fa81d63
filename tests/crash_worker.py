"""Trains a stage in-process and kills itself with SIGKILL at a given step: a crash with no chance
to clean up (no final checkpoint, no flushed files), for tests/test_reliability.py.

    python tests/crash_worker.py STAGE_SPEC WORKDIR KILL_AT_BATCH AFTER_CHECKPOINT [--config.a=b ...]

STAGE_SPEC is e.g. laq.py:tiny (under configs/). The process dies when the loop asks for batch
KILL_AT_BATCH (after waiting for checkpoint AFTER_CHECKPOINT to be complete on disk), so the run has
done KILL_AT_BATCH steps and logged some steps after its last checkpoint.
"""

import dataclasses
import importlib
import os
import signal
import sys
import time

import jax

from lapa_jax import checkpoint
from lapa_jax import config as config_lib
from lapa_jax.train import loop

from tiny_runs import CONFIGS


def main(argv):
  spec, workdir, kill_at, after_checkpoint, overrides = argv[0], argv[1], int(argv[2]), int(argv[3]), argv[4:]
  config = config_lib.load(f'{CONFIGS}/{spec}', overrides)
  stage = importlib.import_module(f'lapa_jax.train.{config.stage}').make_stage(config)
  checkpoint_dir = os.path.join(checkpoint.directory_in(workdir), str(after_checkpoint))

  class Dying:
    def __init__(self, data):
      self.data, self.served = data, 0

    def __iter__(self):
      return self

    def __next__(self):
      if self.served == kill_at:
        deadline = time.time() + 60
        while not os.path.isdir(checkpoint_dir) and time.time() < deadline:  # orbax renames when complete
          time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGKILL)
      self.served += 1
      return next(self.data)

    def get_state(self):
      return self.data.get_state()

    def set_state(self, state):
      self.data.set_state(state)

  train_data = stage.train_data
  stage = dataclasses.replace(stage, train_data=lambda index, count: Dying(train_data(index, count)))
  loop.train(config, workdir, stage, devices=jax.devices()[:1])
  sys.exit('crash_worker: the run ended before it was killed')


if __name__ == '__main__':
  main(sys.argv[1:])
