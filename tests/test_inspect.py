"""`lapa inspect-data`: per-dataset report, PNGs, and a non-zero exit naming what cannot be read."""

import json
import os

import pytest
from PIL import Image

import oxe_schemas
from lapa_jax.data import inspect


@pytest.fixture(scope='session')
def data_dir(tmp_path_factory):
  return oxe_schemas.session_data_dir(tmp_path_factory)


def test_mixture_report_and_images(data_dir, tmp_path, capsys):
  out = tmp_path / 'report'
  assert inspect.main(['--data-dir', data_dir, '--mixture', 'taco_play:2,language_table:0.1',
                       '--out', str(out), '--episodes', '3']) == 0
  text = capsys.readouterr().out
  assert 'version 0.1.0' in text and 'version 0.0.1' in text
  assert 'fps 15  frame offset 9 steps' in text and 'fps 10  frame offset 6 steps' in text
  assert "example instruction: 'language_table task 0: pick up the block'" in text  # decoded int32 codes
  assert "'train': 6, 'test': 2" in text and 'observation/rgb_gripper' in text
  for name in ('taco_play', 'language_table'):
    for kind in ('frames', 'pairs', 'actions'):
      assert Image.open(out / f'{name}_{kind}.png').size[0] > 0
  summary = json.loads((out / 'summary.json').read_text())
  assert [d['name'] for d in summary['datasets']] == ['taco_play', 'language_table']
  assert summary['datasets'][0]['frame_offset'] == 9 and summary['failures'] == []


def test_unreadable_datasets_exit_non_zero_with_the_reason(data_dir, tmp_path, capsys):
  broken = tmp_path / 'data'
  oxe_schemas.write(str(broken), 'viola', episodes=2, directory='jaco_play')  # wrong schema
  os.symlink(os.path.join(data_dir, 'kuka'), broken / 'kuka')
  out = str(tmp_path / 'report')
  assert inspect.main(['--data-dir', str(broken), '--mixture', 'kuka,jaco_play,toto', '--out', out]) == 1
  captured = capsys.readouterr()
  assert "jaco_play: " in captured.err and "no step feature 'observation/image'" in captured.err
  assert 'toto' in captured.err and '2 of 3 dataset(s) cannot be read' in captured.err
  assert 'kuka  (' in captured.out  # the readable one is still reported
  assert inspect.main(['--data-dir', str(broken), '--mixture', 'kuka,toto', '--out', out, '--skip-missing']) == 0
