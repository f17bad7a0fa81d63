"""Every stage on 2 processes x 4 CPU devices (jax.distributed, gloo) against 1 process x 8 devices,
and the LAQ on tensor-parallel meshes against 1 device.

One pair of worker processes (tests/stages_worker.py) trains the vision tokenizer, the LAQ, latent
pretraining and finetuning a few steps each, labels the world and evaluates a policy. Meanwhile a
reference process runs the same jobs on 8 devices, reading the same global batches: each batch
joins the two processes' host batches (stages_worker.JoinedSlices). Then:
  - the losses agree step by step;
  - each process read its own episodes (disjoint slices) and the reference read the same ones;
  - each checkpoint written by both processes restores exactly in this one process on another mesh;
  - the labels and the evaluation results are those of one process.
The reference process also trains the LAQ on 1 device and on meshes (1, 2, 4) and (1, 4, 2), whose
tensor-parallel axis splits the heads, patch, quant and (where it divides) mlp axes: the same losses.

Compiling dominates these few steps on a CPU. The subprocesses compile with XLA's backend
optimisation and its new CPU fusion emitters off, which takes about a third of the time (the LAQ
step: 13.5 s -> 4.3 s) and gives the same losses.
"""

import functools
import json
import os
import pathlib
import socket
import subprocess
import sys

import numpy as np
import tensorflow_datasets as tfds

import stages_worker
from conftest import REPO
from lapa_jax import checkpoint, evaluate, metrics, sharding
from lapa_jax.data import rlds
from lapa_jax.train import optim
from lapa_jax.train.step import init_train_state
from tiny_runs import IMAGE_SIZE

STEPS = 3
XLA_FLAGS = '--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false'
LAQ_MESHES = {'laq 1 device': ('1,1,1', 1), 'laq 1,2,4': ('1,2,4', 8), 'laq 1,4,2': ('1,4,2', 8)}


def train_job(root: pathlib.Path, name: str, config: str, *overrides: str, **fields) -> dict:
  # Shuffle blocks of 32 samples (not the presets' 1000): 3 steps read 24 per process, and a
  # pipeline builds its next block ahead, which would cost more than the steps.
  return {'kind': 'train', 'name': name, 'config': config, 'workdir': str(root / name.replace(' ', '_')),
          'overrides': [*overrides, f'--config.total_steps={STEPS}', '--config.log_every=1',
                        '--config.data.shuffle_buffer=32'], **fields}


def plan(pipeline: dict, world: str, root: pathlib.Path) -> list[dict]:
  """The jobs of both runs, writing under `root`; their inputs (trained runs, labels) come from the
  `pipeline` fixture."""
  tokenizer, laq, pretrain = (str(pipeline[name][0]) for name in ('tokenizer', 'laq', 'latent_pretrain'))
  data = f'--config.data.path={world}'
  # Revival every 2 steps: the dead-code replacement must agree across processes too.
  laq_overrides = ('laq.py:tiny', data, '--config.data.eval_split=', '--config.revival.every=2')
  return [
      train_job(root, 'tokenizer', 'tokenizer.py:tiny', data, '--config.data.eval_split=', '--config.revival.every=2'),
      train_job(root, 'laq', *laq_overrides),
      train_job(root, 'latent_pretrain', 'latent_pretrain.py:tiny', f'--config.data.path={pipeline["label"]}',
                '--config.eval.split='),
      train_job(root, 'finetune', 'finetune.py:tiny', data, f'--config.vision_tokenizer={tokenizer}',
                f'--config.init_from={pretrain}', '--config.eval.split='),
      {'kind': 'label', 'name': 'label', 'laq': laq, 'tokenizer': tokenizer, 'out': str(root / 'labelled'),
       'overrides': [f'data.path={world}', 'resize=true', 'batch_size=64']},
      {'kind': 'evaluate', 'name': 'evaluate', 'arguments': [
          str(pipeline['finetune'][0]), '--out', str(root / 'evaluate'), '--episodes', '3', '--max-steps', '8',
          '--kinds', 'reach_corner,push_to_block', '--image-size', str(IMAGE_SIZE), '--offline-batches', '0',
          '--gifs', '0']},
      # The reference process only.
      *(train_job(root, name, *laq_overrides, f'--config.mesh_dim={mesh_dim}', devices=devices)
        for name, (mesh_dim, devices) in LAQ_MESHES.items()),
  ]


def _start(role: str, port: int, jobs: list[dict], plan_path: pathlib.Path) -> subprocess.Popen:
  plan_path.write_text(json.dumps(jobs))
  env = {**os.environ, 'XLA_FLAGS': XLA_FLAGS}  # the device counts are set by the worker
  return subprocess.Popen([sys.executable, os.path.join(REPO, 'tests', 'stages_worker.py'), role, str(port),
                           str(plan_path)], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True)


def _run_all(processes: dict[str, subprocess.Popen]) -> dict[tuple[str, str], dict]:
  """Waits for every process; {(job name, process role): its RESULT}."""
  try:
    outputs = {role: process.communicate(timeout=900)[0] for role, process in processes.items()}
  finally:
    for process in processes.values():
      process.kill()
  for role, process in processes.items():
    assert process.returncode == 0, f'{role} failed:\n{outputs[role][-5000:]}'
  return {(result['name'], result['process']): result for output in outputs.values()
          for result in (json.loads(line[len('RESULT '):]) for line in output.splitlines()
                         if line.startswith('RESULT '))}


def _losses(job: dict) -> list[float]:
  with open(os.path.join(job['workdir'], metrics.METRICS_FILE)) as f:
    losses = {line['step']: line['loss'] for line in map(json.loads, f) if 'loss' in line}
  assert sorted(losses) == list(range(1, STEPS + 1)), job['name']
  return [losses[step] for step in sorted(losses)]


def _labels(version_dir: str) -> dict[str, list]:
  """{split: per episode (latent_action (time, codes), vision_tokens (time, tokens))} in file order."""
  builder = tfds.builder_from_directory(version_dir)
  return {split: [(episode['steps']['latent_action'], episode['steps']['vision_tokens'])
                  for episode in rlds.episodes(builder, split, sequential=True).as_numpy_iterator()]
          for split in builder.info.splits}


def test_every_stage_on_two_processes_matches_one(pipeline, world, tmp_path):
  jobs = {name: plan(pipeline, world, tmp_path / name) for name in ('two', 'one')}
  two, one = ({job['name']: job for job in jobs[name]} for name in ('two', 'one'))
  with socket.socket() as probe:
    probe.bind(('127.0.0.1', 0))
    port = probe.getsockname()[1]
  # The reference labels are the pipeline fixture's (one process); the reference process runs the rest.
  workers = [job for job in jobs['two'] if job['name'] not in LAQ_MESHES]
  reference = [job for job in jobs['one'] if job['kind'] != 'label']
  results = _run_all({'0': _start('0', port, workers, tmp_path / 'two.json'),
                      '1': _start('1', port, workers, tmp_path / 'two.json'),
                      'reference': _start('reference', port, reference, tmp_path / 'one.json')})

  other_mesh = sharding.make_mesh('2,2,2')  # the workers' mesh was (1, 8, 1)
  for job in (job for job in workers if job['kind'] == 'train'):
    name = job['name']
    np.testing.assert_allclose(_losses(job), _losses(one[name]), rtol=1e-5, err_msg=name)

    episodes = [{tuple(episode) for episode in results[name, role]['episodes']} for role in ('0', '1')]
    assert episodes[0] and episodes[1] and not episodes[0] & episodes[1], name
    # The reference, reading each process's slice in one process, met the same episodes.
    assert episodes == [{tuple(e) for e in part} for part in results[name, 'reference']['episodes']], name

    # The checkpoint of both processes, read in this one process onto another mesh, is what they held.
    config, stage = stages_worker.make_stage(job)
    init_state = functools.partial(init_train_state, stage.init,
                                   optim.make_optimizer(config.optim, config.total_steps), config.seed)
    with checkpoint.Checkpointer(checkpoint.directory_in(job['workdir']), read_only=True) as checkpoints:
      state, positions = checkpoints.restore(checkpoint.restore_target(init_state, other_mesh))
    assert int(state.step) == STEPS and sorted(positions) == ['0', '1'], name
    held = np.load(os.path.join(job['workdir'], 'final_state.npz'))
    restored = stages_worker.state_leaves(state)
    assert sorted(restored) == sorted(held.files), name
    for key, value in restored.items():
      np.testing.assert_array_equal(value, held[key], err_msg=f'{name} {key}')

  # Tensor parallelism: the LAQ on 1 device and split over tp computes the 8-device losses.
  for name in LAQ_MESHES:
    np.testing.assert_allclose(_losses(one[name]), _losses(one['laq']), rtol=1e-5, err_msg=name)

  shards = [set(results['label', role]['shards']) for role in ('0', '1')]
  assert shards[0] and shards[1] and not shards[0] & shards[1]
  written = _labels(os.path.join(two['label']['out'], *pathlib.Path(pipeline['label']).parts[-2:]))
  for split, episodes in _labels(pipeline['label']).items():
    assert len(written[split]) == len(episodes), split
    for (codes, tokens), (expected_codes, expected_tokens) in zip(written[split], episodes):
      np.testing.assert_array_equal(codes, expected_codes)
      np.testing.assert_array_equal(tokens, expected_tokens)

  assert {results['evaluate', role]['returncode'] for role in ('0', '1', 'reference')} == {0}
  strip = lambda records: sorted(json.dumps({k: v for k, v in r.items() if k != 'workdir'}, sort_keys=True)
                                 for r in records)
  assert strip(evaluate.read_results(two['evaluate']['arguments'][2])) == strip(
      evaluate.read_results(one['evaluate']['arguments'][2]))
