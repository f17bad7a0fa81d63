"""The rows of README "What happens when" not tested elsewhere: each bad input gives one line on
stderr that names the culprit, through the real `lapa` command (errors a user can fix are caught at
the CLI boundary; --debug shows the traceback)."""

import os
import shutil

import numpy as np
import pytest

from lapa_jax import cli
from lapa_jax.data import pipelines
from lapa_jax.envs import writer

from conftest import REPO

LAQ_TINY = str(REPO / 'configs' / 'laq.py') + ':tiny'


@pytest.fixture(autouse=True)
def _no_debug(monkeypatch):
  monkeypatch.setenv('LAPA_DEBUG', '0')


def _lapa(capsys, *argv) -> str:
  """Runs `lapa argv`; returns its one-line error (exit code 1, or argparse's 2 after its usage line)."""
  capsys.readouterr()
  try:
    code = cli.main([str(arg) for arg in argv])
  except SystemExit as exit_:
    code = exit_.code
  err = capsys.readouterr().err.strip()
  assert code in (1, 2), err
  lines = [line for line in err.splitlines() if line.startswith('lapa ') and ' error: ' in line]
  assert len(lines) == 1 and 'Traceback' not in err, err
  return lines[0]


def test_a_corrupted_shard_names_the_file_under_on_corrupt_error(world, tmp_path, capsys):
  data = tmp_path / 'world'
  shutil.copytree(world, data)
  shard = sorted(name for name in os.listdir(data) if '-train.tfrecord' in name)[0]
  os.truncate(data / shard, os.path.getsize(data / shard) // 2)
  error = _lapa(capsys, 'train', LAQ_TINY, '--workdir', tmp_path / 'run', f'--config.data.path={data}',
                '--config.data.on_corrupt=error', '--config.total_steps=2', '--config.data.eval_split=')
  assert f'{shard}: corrupted or truncated tfrecord' in error and 'data.on_corrupt=skip' in error


def test_an_unknown_mixture_name_suggests_the_closest(world, capsys, tmp_path):
  data_dir = os.path.dirname(os.path.dirname(world))
  error = _lapa(capsys, 'train', LAQ_TINY, '--workdir', tmp_path, '--config.data.mixture=lapa_wrld_robot',
                f'--config.data.data_dir={data_dir}')
  assert "missing: lapa_wrld_robot; lapa_wrld_robot: did you mean 'lapa_world_robot'?" in error
  error = _lapa(capsys, 'train', LAQ_TINY, '--workdir', tmp_path, '--config.data.mixture=brige',
                f'--config.data.data_dir={data_dir}')
  assert "did you mean 'bridge'" in error


def test_a_missing_weights_file_is_named(tmp_path, capsys):
  error = _lapa(capsys, 'convert', 'official-laq', tmp_path / 'laq.pt', tmp_path / 'out')
  assert str(tmp_path / 'laq.pt') in error


def test_a_dataset_without_the_configured_camera_lists_the_image_features(world, tmp_path, capsys):
  error = _lapa(capsys, 'train', LAQ_TINY, '--workdir', tmp_path, f'--config.data.path={world}',
                '--config.data.spec.image_key=observation/wrist_image')
  assert "no step feature 'observation/wrist_image'" in error and 'observation/image' in error


def test_float_frames_outside_0_1_are_refused(pipeline, tmp_path, capsys):
  pairs = tmp_path / 'pairs.npz'
  np.savez(pairs, video=np.full((2, 2, 32, 32, 3), 200.0, np.float32))  # uint8 values saved as floats
  error = _lapa(capsys, 'laq-infer', '--checkpoint', pipeline['laq'][0], '--pairs', pairs, '--out', tmp_path / 'o.npz')
  assert 'float frames must lie in [0, 1]; found values in [200, 200] (0..255 stored as floats?' in error
  assert not (tmp_path / 'o.npz').exists()


def test_an_unwritable_output_is_one_line(tmp_path, capsys):
  (tmp_path / 'file').write_text('')
  error = _lapa(capsys, 'world', '--embodiment', 'robot', '--episodes', '2', '--out', tmp_path / 'file' / 'data')
  assert str(tmp_path / 'file') in error


def test_nan_actions_in_finetuning_data_name_the_shard_and_episode(tmp_path, monkeypatch):
  run_episodes = writer.run_episodes

  def episodes_with_nan(envs, seeds, *args, **kwargs):
    episodes = run_episodes(envs, seeds, *args, **kwargs)
    for seed, episode in zip(seeds, episodes):
      if seed == writer.episode_seed(0, 'robot', 1):
        episode['steps'][2]['action'] = np.full_like(episode['steps'][2]['action'], np.nan)
    return episodes

  monkeypatch.setattr(writer, 'run_episodes', episodes_with_nan)
  path = writer.write_dataset(str(tmp_path), 'robot', episodes=4, image_size=32, max_steps=6, val_fraction=0.25)
  config = pipelines.default_config()
  config.path = path
  with pytest.raises(pipelines.DataError, match=r'-train.tfrecord-00000: episode 1 has NaN or inf actions '
                                                r'at 1 step\(s\)'):
    pipelines.dataset_actions(config, progress=False)
