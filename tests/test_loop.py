"""The generic loop on the toy stage: preemption and exact resume, CLI and configs, hooks, metrics."""

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from PIL import Image
from tensorboard.backend.event_processing import event_accumulator

from lapa_jax import checkpoint
from lapa_jax import config as config_lib
from lapa_jax import metrics
from lapa_jax import sharding
from lapa_jax.train import loop, optim, toy

from conftest import REPO

TOY = str(REPO / 'configs' / 'toy.py') + ':tiny'


def _metric_lines(workdir):
  with open(os.path.join(workdir, metrics.METRICS_FILE)) as f:
    return [json.loads(line) for line in f]


TRAIN_OVERRIDES = ('--config.total_steps=40', '--config.log_every=2', '--config.checkpoint_every=10',
                   '--config.eval_every=0')


def _lapa_train(workdir, *overrides):
  command = [sys.executable, '-m', 'lapa_jax.cli', 'train', TOY, '--workdir', str(workdir), *TRAIN_OVERRIDES,
             *overrides]
  return subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _final_params(workdir):
  """(latest step, params as numpy) of the checkpoints in `workdir`, read onto one device."""
  config = config_lib.load(TOY)
  init_params = lambda: toy.make_stage(config).init(jax.random.PRNGKey(0))['params']
  target = checkpoint.restore_target(init_params, sharding.make_mesh('1,1,1', jax.devices()[:1]))
  with checkpoint.Checkpointer(checkpoint.directory_in(str(workdir)), read_only=True) as checkpoints:
    return checkpoints.latest_step(), jax.tree.map(np.asarray, checkpoints.restore_params(target))


def test_sigterm_saves_and_resume_matches_uninterrupted_run(tmp_path):
  interrupted, uninterrupted = tmp_path / 'interrupted', tmp_path / 'uninterrupted'
  # A slow input pipeline keeps the first run going long enough to be stopped in the middle.
  slow = _lapa_train(interrupted, '--config.data.delay_seconds=0.1')
  deadline = time.time() + 120
  while time.time() < deadline and slow.poll() is None:
    if os.path.exists(interrupted / metrics.METRICS_FILE) and len(_metric_lines(interrupted)) >= 3:
      break
    time.sleep(0.1)
  slow.send_signal(signal.SIGTERM)
  output = slow.communicate(timeout=120)[0]
  assert slow.returncode == 0, output
  assert 'SIGTERM: saved step' in output, output
  stopped_step, _ = _final_params(interrupted)
  assert 6 <= stopped_step < 40
  assert max(line['step'] for line in _metric_lines(interrupted)) <= stopped_step

  resumed = _lapa_train(interrupted)
  output = resumed.communicate(timeout=180)[0]
  assert resumed.returncode == 0, output
  assert f'resumed from step {stopped_step}' in output
  config = config_lib.load(TOY, TRAIN_OVERRIDES)
  loop.train(config, str(uninterrupted), toy.make_stage(config))

  step, params = _final_params(interrupted)
  reference_step, reference_params = _final_params(uninterrupted)
  assert step == reference_step == 40
  for leaf, reference_leaf in zip(jax.tree.leaves(params), jax.tree.leaves(reference_params)):
    np.testing.assert_array_equal(leaf, reference_leaf)
  final_loss = [line['loss'] for line in _metric_lines(interrupted) if line['step'] == 40 and 'loss' in line]
  reference_loss = [line['loss'] for line in _metric_lines(uninterrupted) if line['step'] == 40 and 'loss' in line]
  assert final_loss == reference_loss and len(final_loss) == 1


def test_overrides_are_typed_and_the_resolved_config_is_written(tmp_path):
  config = config_lib.load(TOY, ['--config.total_steps=4', '--config.optim.lr=1e-2', '--config.mesh_dim=2,2,2',
                                 '--config.optim.schedule=constant', '--config.eval_every=0'])
  assert config.total_steps == 4 and isinstance(config.total_steps, int)
  assert config.optim.lr == 0.01 and isinstance(config.optim.lr, float)
  loop.train(config, str(tmp_path), toy.make_stage(config))
  with open(tmp_path / 'config.json') as f:
    written = json.load(f)
  assert written['mesh_dim'] == '2,2,2' and written['optim']['lr'] == 0.01 and written['total_steps'] == 4
  # Only the last step (the 4th update, count 3) is logged; 5 warmup steps: 3/5 of lr.
  rates = [line['learning_rate'] for line in _metric_lines(tmp_path) if 'learning_rate' in line]
  np.testing.assert_allclose(rates, [0.006], rtol=1e-6)


def test_unknown_field_names_the_closest_one():
  with pytest.raises(KeyError, match="did you mean 'optim.lr'"):
    config_lib.load(TOY, ['--config.optim.lrr=1e-3'])
  with pytest.raises(ValueError, match='total_steps'):
    config_lib.load(TOY, ['--config.total_steps=many'])


@pytest.mark.parametrize('argv, message', [
    ([TOY], 'the following arguments are required: --workdir'),
    ([TOY.replace(':tiny', ':huge'), '--workdir', 'w'], "unknown preset 'huge'"),
    ([TOY.replace('toy.py', 'nothing.py'), '--workdir', 'w'], 'does not exist'),
    ([TOY, '--workdir', 'w', '--config.optim.lrr=1'], "did you mean 'optim.lr'"),
    ([TOY, '--workdir', 'w', '--config.stage=nothing'], "'nothing' has no module lapa_jax.train.nothing"),
    ([TOY, '--workdir', 'w', '--config.log_every=0'], 'config field log_every: expected a positive integer'),
])
def test_cli_usage_errors(capsys, argv, message):
  with pytest.raises(SystemExit) as exit_info:
    loop.main(argv)
  assert exit_info.value.code == 2
  assert message in capsys.readouterr().err


def test_non_finite_loss_stops_with_a_clear_error_on_request(tmp_path):
  config = config_lib.load(TOY, ['--config.on_nonfinite=stop', '--config.optim.lr=1e30',
                                 '--config.optim.clip_norm=0.0', '--config.log_every=1',
                                 '--config.optim.warmup_steps=0', '--config.optim.schedule=constant',
                                 '--config.total_steps=4', '--config.eval_every=0'])
  with pytest.raises(FloatingPointError, match=r'step \d: a non-finite loss or gradient'):
    loop.train(config, str(tmp_path), toy.make_stage(config))


def test_after_update_edits_adam_moments_inside_the_step(tmp_path):
  """The pattern LAQ's dead-code revival uses: reset some moments after the update, report a metric."""
  def after_update(state):
    mu, nu = (optax.tree_utils.tree_get(state.opt_state, name) for name in ('mu', 'nu'))
    mu['Dense_1']['bias'] = jnp.zeros_like(mu['Dense_1']['bias'])
    nu['Dense_1']['bias'] = jnp.zeros_like(nu['Dense_1']['bias'])
    opt_state = optax.tree_utils.tree_set(state.opt_state, mu=mu, nu=nu)
    return state.replace(opt_state=opt_state), {'revived': jnp.float32(1.0)}

  config = config_lib.load(TOY, ['--config.total_steps=3', '--config.log_every=1', '--config.eval_every=0'])
  stage = dataclasses.replace(toy.make_stage(config), after_update=after_update)
  state = loop.train(config, str(tmp_path), stage)
  mu = optax.tree_utils.tree_get(state.opt_state, 'mu')
  assert not np.any(np.asarray(mu['Dense_1']['bias'])) and np.any(np.asarray(mu['Dense_1']['kernel']))
  assert [line['revived'] for line in _metric_lines(tmp_path) if 'revived' in line] == [1.0, 1.0, 1.0]


def test_train_writes_metrics_images_tensorboard_and_evaluates(tmp_path):
  config = config_lib.load(TOY)
  loop.train(config, str(tmp_path), toy.make_stage(config))
  lines = _metric_lines(tmp_path)
  assert [line['step'] for line in lines if 'loss' in line] == [5, 10, 15, 20]
  evals = [line['eval/mse'] for line in lines if 'eval/mse' in line]
  assert len(evals) == 2 and evals[1] < evals[0]
  assert all(line['steps_per_second'] > 0 for line in lines if 'loss' in line)
  images = sorted(os.listdir(tmp_path / metrics.IMAGES_DIR))
  assert images == ['predictions_targets_00000010.png', 'predictions_targets_00000020.png']
  events = event_accumulator.EventAccumulator(str(tmp_path / metrics.TENSORBOARD_DIR))
  events.Reload()
  assert [event.step for event in events.Tensors('loss')] == [5, 10, 15, 20]
  assert events.SummaryMetadata('predictions_targets').plugin_data.plugin_name == 'images'
  # Restarting a finished run does no more steps.
  state = loop.train(config, str(tmp_path), toy.make_stage(config))
  assert int(state.step) == 20 and len(_metric_lines(tmp_path)) == len(lines)


def test_image_grid_places_tiles_row_by_row(tmp_path):
  images = np.zeros((5, 4, 6, 3), np.float32)
  for index in range(5):
    images[index] = index / 4
  grid = metrics.image_grid(images, columns=3, padding=1)
  assert grid.shape == (2 * 5 + 1, 3 * 7 + 1, 3) and grid.dtype == np.uint8
  assert grid[1, 1, 0] == 0 and grid[1, 8, 0] == 64 and grid[6, 8, 0] == 255  # Tiles 0, 1, 4.
  assert grid[6, 1, 0] == 191 and np.all(grid[6:, 15:] == 255)  # Tile 3, then blank.
  path = metrics.save_png(str(tmp_path / 'grid.png'), grid)
  np.testing.assert_array_equal(np.asarray(Image.open(path)), grid)


def test_schedules():
  optim_config = config_lib.load(TOY).optim
  optim_config.unlock()
  optim_config.update(lr=1.0, warmup_steps=10, end_lr_fraction=0.1)
  cosine = optim.make_schedule(optim_config, total_steps=110)
  np.testing.assert_allclose([cosine(0), cosine(5), cosine(10), cosine(60), cosine(110)],
                             [0.0, 0.5, 1.0, 0.55, 0.1], rtol=1e-5, atol=1e-7)
  optim_config.schedule = 'constant'
  constant = optim.make_schedule(optim_config, total_steps=110)
  np.testing.assert_allclose([constant(5), constant(10), constant(100)], [0.5, 1.0, 1.0], rtol=1e-6)
  optim_config.schedule = 'linear'
  with pytest.raises(ValueError, match='optim.schedule'):
    optim.make_schedule(optim_config, total_steps=110)
  optim_config.schedule, optim_config.name = 'constant', 'sgd'
  with pytest.raises(ValueError, match='optim.name'):
    optim.make_optimizer(optim_config, total_steps=110)


def _free_port():
  with socket.socket() as probe:
    probe.bind(('127.0.0.1', 0))
    return probe.getsockname()[1]


def test_two_processes_train_like_one_and_stop_together_on_sigterm(tmp_path):
  """2 local processes x 4 CPU devices (gloo): same losses as one process; SIGTERM to one stops both."""
  overrides = ['--config.mesh_dim=1,8,1', '--config.total_steps=60', '--config.log_every=2', '--config.eval_every=0']
  env = {name: value for name, value in os.environ.items() if name != 'XLA_FLAGS'}
  port, workdir = _free_port(), tmp_path / 'two'
  workers = [subprocess.Popen([sys.executable, os.path.join(REPO, 'tests', 'multihost_worker.py'), str(index),
                               str(port), str(workdir), *overrides, '--config.data.delay_seconds=0.1'],
                              cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for index in range(2)]
  deadline = time.time() + 120
  while time.time() < deadline and workers[0].poll() is None:
    if os.path.exists(workdir / metrics.METRICS_FILE) and len(_metric_lines(workdir)) >= 3:
      break
    time.sleep(0.1)
  workers[0].send_signal(signal.SIGTERM)
  outputs = [worker.communicate(timeout=120)[0] for worker in workers]
  for worker, output in zip(workers, outputs):
    assert worker.returncode == 0 and 'restored OK' in output, output
  with checkpoint.Checkpointer(checkpoint.directory_in(str(workdir)), read_only=True) as checkpoints:
    stopped_step = checkpoints.latest_step()
  assert 6 <= stopped_step < 60 and 'SIGTERM: saved step' in outputs[0]

  config = config_lib.load(TOY, overrides)
  loop.train(config, str(tmp_path / 'one'), toy.make_stage(config))
  one = {line['step']: line['loss'] for line in _metric_lines(tmp_path / 'one') if 'loss' in line}
  two = {line['step']: line['loss'] for line in _metric_lines(workdir) if 'loss' in line}
  assert len(two) >= 3
  np.testing.assert_allclose([two[step] for step in two], [one[step] for step in two], rtol=1e-5)
