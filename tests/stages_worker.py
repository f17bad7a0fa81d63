"""Runs every LAPA stage a few steps as one of two local processes (4 CPU devices each), or as
their one-process reference (8 CPU devices) that reads the same global batches.

    python tests/stages_worker.py PROCESS_ID PORT PLAN_JSON   (PROCESS_ID 0 or 1, jax.distributed + gloo)
    python tests/stages_worker.py reference - PLAN_JSON       (1 process x 8 devices)

PLAN_JSON lists jobs, run in order in one process (starting JAX and TensorFlow costs seconds):
  {"kind": "train", "name", "config": "laq.py:tiny", "workdir", "overrides": [...], "devices": n (optional,
   the reference only: the first n devices)}
  {"kind": "label", "name", "laq", "tokenizer", "out", "overrides": ["data.path=...", ...]}
  {"kind": "evaluate", "name", "arguments": [<lapa evaluate arguments>]}
Each job prints one line `RESULT {"name", "process", "seconds", ...}`: for training, the episodes
(dataset, episode index) this process read (the reference: those of each process's slice); for
labelling, the shards this process wrote. Process 0 also writes each trained state, gathered, to
<workdir>/final_state.npz (keys: `state_leaves` paths), so that test_multihost_stages.py can check
that the checkpoint restores it exactly in one process on another mesh.
"""

import dataclasses
import importlib
import json
import os
import pathlib
import sys
import time

import jax
import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = REPO / 'configs'


class EpisodeRecorder:
  """A data iterator that notes the (dataset, episode index) of every sample it hands out."""

  def __init__(self, iterator, seen: set):
    self.iterator, self.seen = iterator, seen

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    batch = next(self.iterator)
    self.seen.update(zip(np.asarray(batch['dataset']).astype(str).tolist(),
                         np.asarray(batch['episode_index']).tolist()))
    return batch

  def get_state(self):
    return self.iterator.get_state()

  def set_state(self, state) -> None:
    self.iterator.set_state(state)


# Data iterators of finished jobs: kept until exit, so that dropping them does not wait for their threads.
FINISHED = []


def stop_reading(opened: list) -> None:
  """Stops the reader threads of finished jobs' pipelines without waiting for them: closing one
  waits seconds, idle, for TensorFlow to tear its readers down; they wind down in the background
  while the next job compiles (and are gone when the exit joins them)."""
  from lapa_jax.data import pipelines
  for run in list(pipelines._RUNS):
    run.stopped.set()
  FINISHED.extend(opened)


def recording(train_data, seen: set, opened: list):
  """Stage.train_data whose iterators record the episodes they read into `seen` and are listed in
  `opened` (for `stop_reading`)."""
  def make(process_index: int, process_count: int):
    data = train_data(process_index, process_count)
    if hasattr(data, 'steps'):  # sequences.TokenBatches: the step iterator below it knows the episodes
      data.steps = EpisodeRecorder(data.steps, seen)
    else:
      data = EpisodeRecorder(data, seen)
    opened.append(data)
    return data
  return make


class JoinedSlices:
  """The global batches that `count` processes make together, read in one process: row block p of
  every batch is process p's host batch (what make_array_from_process_local_data assembles)."""

  def __init__(self, slices: list):
    self.slices = slices

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    parts = [next(data) for data in self.slices]
    return {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}

  def get_state(self):
    return {str(index): data.get_state() for index, data in enumerate(self.slices)}

  def set_state(self, state) -> None:
    for index, data in enumerate(self.slices):
      data.set_state(state[str(index)])


def make_stage(job: dict):
  """(config, stage) of a training job."""
  from lapa_jax import config as config_lib
  config = config_lib.load(f'{CONFIGS}/{job["config"]}', list(job['overrides']))
  return config, importlib.import_module(f'lapa_jax.train.{config.stage}').make_stage(config)


def as_processes(stage, count: int, seen_by_process: list[set], opened: list):
  """`stage` read in one process the way `count` processes read it together (JoinedSlices)."""
  slices = [recording(stage.train_data, seen_by_process[index], opened) for index in range(count)]
  return dataclasses.replace(stage, train_data=lambda process_index, process_count: JoinedSlices(
      [make(index, count) for index, make in enumerate(slices)]))


def state_leaves(state) -> dict[str, np.ndarray]:
  """{key path: global value} of every array of a (possibly multi-process) train state."""
  from jax.experimental import multihost_utils
  leaves = jax.tree_util.tree_leaves_with_path(state)
  values = multihost_utils.process_allgather([leaf for _, leaf in leaves], tiled=True)
  return {jax.tree_util.keystr(path): np.asarray(value) for (path, _), value in zip(leaves, values)}


def run_train(job: dict) -> dict:
  """Trains the job's stage; as 2 processes: records this process's episodes and saves the final
  state; as the reference: reads both processes' slices (JoinedSlices) and records each's episodes."""
  from lapa_jax.train import loop
  config, stage = make_stage(job)
  opened = []
  if jax.process_count() == 1:
    seen = [set(), set()]
    devices = jax.devices()[:job['devices']] if 'devices' in job else None
    loop.train(config, job['workdir'], as_processes(stage, 2, seen, opened), devices=devices)
  else:
    seen = set()
    state = loop.train(config, job['workdir'],
                       dataclasses.replace(stage, train_data=recording(stage.train_data, seen, opened)))
  stop_reading(opened)
  if jax.process_count() == 1:
    return {'episodes': [sorted(episodes) for episodes in seen]}
  leaves = state_leaves(state)
  if jax.process_index() == 0:
    np.savez(os.path.join(job['workdir'], 'final_state.npz'), **leaves)
  return {'episodes': sorted(seen)}


def run_label(job: dict) -> dict:
  from lapa_jax import label
  from lapa_jax import config as config_lib
  from lapa_jax.data import pipelines, rlds
  config = label.default_config()
  for item in job['overrides']:
    dotted, _, text = item.partition('=')
    config_lib.override(config, dotted, text)
  labeller = label.Labeller(job['laq'], job['tokenizer'], batch_size=config.batch_size)
  written = []  # the shard files this process writes
  write_shard = rlds.write_shard
  rlds.write_shard = lambda path, *args: written.append(os.path.basename(path)) or write_shard(path, *args)
  try:
    for dataset, _ in pipelines.open_datasets(config.data):
      label.label_dataset(dataset, labeller, job['out'], config, progress=False)
  finally:
    rlds.write_shard = write_shard
  return {'shards': written}


def run_evaluate(job: dict) -> dict:
  from lapa_jax import evaluate
  return {'returncode': evaluate.main(list(job['arguments']))}


def main(argv):
  role, port, plan = argv[0], argv[1], argv[2]
  if role == 'reference':  # one process, 8 devices: the same mesh shape as the two processes together
    jax.config.update('jax_num_cpu_devices', 8)
  else:
    jax.config.update('jax_num_cpu_devices', 4)
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    jax.distributed.initialize(f'127.0.0.1:{port}', num_processes=2, process_id=int(role))
    assert jax.process_count() == 2 and len(jax.local_devices()) == 4
  assert len(jax.devices()) == 8
  runners = {'train': run_train, 'label': run_label, 'evaluate': run_evaluate}
  with open(plan) as f:
    jobs = json.load(f)
  for job in jobs:
    start = time.perf_counter()
    result = runners[job['kind']](job)
    print('RESULT ' + json.dumps({'name': job['name'], 'process': role, **result,
                                  'seconds': round(time.perf_counter() - start, 1)}), flush=True)
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
