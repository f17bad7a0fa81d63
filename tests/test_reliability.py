"""A run survives a crash, a NaN, a changed config and a bad or unwritable checkpoint, and says what
happened in one line (README "What happens when"): exact resume after kill -9 for every training
stage, the non-finite guard, checkpoint/config checks, disk-full saves."""

import dataclasses
import importlib
import json
import os
import random
import resource
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from lapa_jax import checkpoint, cli
from lapa_jax import config as config_lib
from lapa_jax import metrics
from lapa_jax.train import loop, toy

import tiny_runs
from conftest import REPO

TOY = str(REPO / 'configs' / 'toy.py') + ':tiny'
RESUME_OVERRIDES = ('--config.total_steps=14', '--config.checkpoint_every=4', '--config.keep_checkpoints=2',
                    '--config.log_every=1')


def _lines(workdir) -> list[dict]:
  with open(os.path.join(workdir, metrics.METRICS_FILE)) as f:
    return [json.loads(line) for line in f]


def _train(spec: str, workdir, overrides) -> loop.TrainState:
  """`lapa train` in-process on one device (as tests/crash_worker.py runs it)."""
  config = config_lib.load(f'{tiny_runs.CONFIGS}/{spec}', list(overrides))
  stage = importlib.import_module(f'lapa_jax.train.{config.stage}').make_stage(config)
  return loop.train(config, str(workdir), stage, devices=jax.devices()[:1])


def _stage_overrides(stage: str, world: str, pipeline: dict) -> tuple[str, list[str]]:
  if stage == 'laq':
    return 'laq.py:tiny', [f'--config.data.path={world}', '--config.data.eval_split=',
                           '--config.revival.every=6']  # a codebook revival after the crash
  if stage == 'latent_pretrain':
    return 'latent_pretrain.py:tiny', [f'--config.data.path={pipeline["label"]}', '--config.eval.split=']
  return 'finetune.py:tiny', [f'--config.data.path={world}', f'--config.vision_tokenizer={pipeline["tokenizer"][0]}',
                              f'--config.init_from={pipeline["latent_pretrain"][0]}', '--config.eval_every=0']


@pytest.mark.parametrize('stage', ['laq', 'latent_pretrain', 'finetune'])
def test_kill_9_after_a_checkpoint_then_resume_is_bitwise_an_uninterrupted_run(stage, world, pipeline, tmp_path):
  spec, overrides = _stage_overrides(stage, world, pipeline)
  overrides += RESUME_OVERRIDES
  # Steps done when killed. Step N is logged once step N+1 is queued, and the step-8 save may be complete
  # when batch 9 is asked for, so these are the counts that leave logged steps after the last checkpoint.
  kill_at = random.choice([6, 7, 10, 11])
  crashed = tmp_path / 'crashed'
  worker = subprocess.run([sys.executable, str(REPO / 'tests' / 'crash_worker.py'), spec, str(crashed), str(kill_at),
                           '4', *overrides], cwd=REPO, capture_output=True, text=True, timeout=600)
  assert worker.returncode == -9, f'kill_at={kill_at}\n{worker.stderr[-3000:]}'
  last_checkpoint = checkpoint.latest_step(str(crashed))
  logged = [line['step'] for line in _lines(crashed) if 'loss' in line]
  assert last_checkpoint in (4, 8) and max(logged) > last_checkpoint, (kill_at, last_checkpoint, logged)

  resumed = _train(spec, crashed, overrides)
  reference = _train(spec, tmp_path / 'reference', overrides)
  assert int(resumed.step) == int(reference.step) == 14
  for leaf, reference_leaf in zip(jax.tree.leaves(resumed), jax.tree.leaves(reference), strict=True):
    np.testing.assert_array_equal(np.asarray(leaf), np.asarray(reference_leaf), err_msg=f'kill_at={kill_at}')
  assert [line['step'] for line in _lines(crashed) if 'loss' in line] == list(range(1, 15))  # no step twice


class _NanAt:
  """The toy data with every value of batch `index` (0-based) replaced by NaN."""

  def __init__(self, data, index: int):
    self.data, self.index = data, index

  def __iter__(self):
    return self

  def __next__(self):
    batch = next(self.data)
    if self.data.get_state()['position'] - 1 == self.index:
      batch = {name: np.full_like(value, np.nan) for name, value in batch.items()}
    return batch

  def get_state(self):
    return self.data.get_state()

  def set_state(self, state):
    self.data.set_state(state)


def _toy(workdir, *overrides, nan_at: int | None = None) -> loop.TrainState:
  config = config_lib.load(TOY, ['--config.eval_every=0', '--config.log_every=1', *overrides])
  stage = toy.make_stage(config)
  if nan_at is not None:
    stage = dataclasses.replace(stage, train_data=lambda index, count: _NanAt(toy.make_stage(config).train_data(
        index, count), nan_at))
  return loop.train(config, str(workdir), stage)


def test_a_nan_batch_is_skipped_and_counted(tmp_path, capsys):
  state = _toy(tmp_path / 'nan', nan_at=6)
  lines = {line['step']: line for line in _lines(tmp_path / 'nan') if 'loss' in line}
  assert lines[7]['loss'] is None and lines[7]['skipped_steps'] == 1  # the 7th update read batch 6
  assert lines[6]['skipped_steps'] == 0 and lines[20]['skipped_steps'] == 1 and lines[20]['loss'] is not None
  assert all(np.isfinite(np.asarray(leaf)).all() for leaf in jax.tree.leaves(state.params))
  assert 'step 7: 1 step(s) with a non-finite loss or gradient skipped' in capsys.readouterr().err
  # A skipped step changes nothing but the counters: the run equals one whose batch 6 made no update.
  constant = '--config.optim.schedule=constant'  # the same rate at each step, whatever total_steps is
  clean = _toy(tmp_path / 'clean', '--config.total_steps=6', constant)
  skipped = _toy(tmp_path / 'skipped', '--config.total_steps=7', constant, nan_at=6)
  for leaf, clean_leaf in zip(jax.tree.leaves(skipped.params), jax.tree.leaves(clean.params)):
    np.testing.assert_array_equal(np.asarray(leaf), np.asarray(clean_leaf))


def test_on_nonfinite_stop_keeps_the_last_good_checkpoint(tmp_path):
  with pytest.raises(FloatingPointError, match=r'on_nonfinite="stop"\); the run stops, its last checkpoint is step 5'):
    _toy(tmp_path, '--config.on_nonfinite=stop', '--config.checkpoint_every=5', nan_at=6)
  assert checkpoint.latest_step(str(tmp_path)) == 5


def _cli(capsys, *argv) -> tuple[int, str]:
  code = cli.main(list(argv))
  return code, capsys.readouterr().err


def test_resume_with_a_changed_shape_is_one_line_and_writes_nothing(tmp_path, capsys):
  _toy(tmp_path, '--config.total_steps=4')
  saved_config = (tmp_path / 'config.json').read_bytes()
  capsys.readouterr()
  code, err = _cli(capsys, 'train', TOY, '--workdir', str(tmp_path), '--config.model.hidden=64')
  assert code == 1 and len(err.strip().splitlines()) == 1, err
  assert 'cannot resume step 4' in err and 'params/Dense_0/bias is (32,) in the checkpoint, (64,) now' in err
  assert 'model.hidden: 32 -> 64' in err
  assert (tmp_path / 'config.json').read_bytes() == saved_config


def _truncate_array_files(step_dir) -> None:
  """Cuts every array data file of a checkpoint step in half, as an interrupted copy would."""
  for root, _, names in os.walk(step_dir / 'state'):
    if os.path.basename(root) == 'd':
      for name in names:
        os.truncate(os.path.join(root, name), os.path.getsize(os.path.join(root, name)) // 2)


def test_a_truncated_checkpoint_falls_back_to_the_previous_step(tmp_path):
  _toy(tmp_path, '--config.checkpoint_every=10', '--config.keep_checkpoints=2')
  _truncate_array_files(tmp_path / 'checkpoints' / '20')
  # As a user runs it: TensorStore's reads of the other arrays end after orbax's event loop closed,
  # and their tracebacks would reach stderr after the warning (not within a pytest test's hook).
  resumed = subprocess.run([sys.executable, '-m', 'lapa_jax.cli', 'train', TOY, '--workdir', str(tmp_path),
                            '--config.eval_every=0', '--config.checkpoint_every=10', '--config.keep_checkpoints=2',
                            '--config.total_steps=25'], cwd=REPO, capture_output=True, text=True, timeout=300)
  assert resumed.returncode == 0, resumed.stderr
  assert f'checkpoint {tmp_path}/checkpoints/20 is unreadable (' in resumed.stderr, resumed.stderr
  assert 'resumed from step 10' in resumed.stderr
  assert 'Traceback' not in resumed.stderr and 'Event loop is closed' not in resumed.stderr, resumed.stderr
  assert (tmp_path / 'checkpoints_unreadable' / '20').is_dir() and checkpoint.latest_step(str(tmp_path)) == 25


def test_a_full_disk_while_checkpointing_keeps_the_previous_checkpoint(tmp_path):
  # A real write error: once step 10 is on disk, the process may not grow any file past 64 KiB (as
  # a full disk stops it), and step 20's arrays (~600 KiB) fail to write. Python ignores SIGXFSZ.
  run = subprocess.Popen([sys.executable, '-m', 'lapa_jax.cli', 'train', TOY, '--workdir', str(tmp_path),
                          '--config.total_steps=40', '--config.checkpoint_every=10', '--config.log_every=10',
                          '--config.eval_every=0', '--config.data.delay_seconds=0.1', '--config.model.hidden=2048'],
                         cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 120
  while not (tmp_path / 'checkpoints' / '10').is_dir() and time.time() < deadline:
    time.sleep(0.05)
  resource.prlimit(run.pid, resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))
  err = run.communicate(timeout=300)[1]
  assert run.returncode == 1, err
  # One line says it all: no traceback (TensorStore's late callbacks included), no orbax warning.
  messages = [line for line in err.splitlines() if line.startswith('lapa train: error:')]
  assert len(messages) == 1, err
  assert 'Traceback' not in err and 'WARNING:absl' not in err, err
  message = messages[0]
  assert message.startswith('lapa train: error: checkpoint step 20 could not be written'), err
  assert 'File too large' in message and 'step 10 is intact' in message
  assert checkpoint.latest_step(str(tmp_path)) == 10


def test_errors_a_user_can_fix_are_one_line_unless_debug(tmp_path, capsys, monkeypatch):
  monkeypatch.setenv('LAPA_DEBUG', '0')  # --debug sets it for nested commands; restored afterwards
  empty = tmp_path / 'empty'
  empty.mkdir()
  capsys.readouterr()
  argv = ('train', str(REPO / 'configs' / 'laq.py') + ':tiny', '--workdir', str(tmp_path / 'run'),
          f'--config.data.path={empty}')
  code, err = _cli(capsys, *argv)
  assert code == 1 and len(err.strip().splitlines()) == 1 and str(empty) in err, err
  with pytest.raises(Exception):
    cli.main([*argv, '--debug'])
