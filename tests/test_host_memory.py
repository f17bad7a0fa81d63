"""glibc's huge-page tunable is the user's to export: `lapa` warns once on a CPU when it is missing,
and never re-executes itself (lapa_jax/host_memory.py)."""

import os
import platform
import shlex
import subprocess
import sys

import pytest

from lapa_jax import host_memory

pytestmark = pytest.mark.skipif(sys.platform != 'linux' or platform.libc_ver()[0] != 'glibc', reason='glibc only')


@pytest.fixture
def fresh(monkeypatch):
  """A process on a CPU backend that has not warned yet, without the user's tunables or opt-out."""
  for name in ('GLIBC_TUNABLES', host_memory.OPT_OUT):
    monkeypatch.delenv(name, raising=False)
  monkeypatch.setenv('JAX_PLATFORMS', 'cpu')
  monkeypatch.setattr(host_memory, '_warned', False)
  return monkeypatch


@pytest.mark.parametrize('tunables', [None, 'glibc.malloc.arena_max=2'])
def test_warns_once_when_missing(fresh, capsys, tunables):
  if tunables:
    fresh.setenv('GLIBC_TUNABLES', tunables)
  host_memory.warn_if_missing()
  host_memory.warn_if_missing()
  err = capsys.readouterr().err
  assert len(err.splitlines()) == 1, err
  assert host_memory.EXPORT_LINE in err and 'LAPA_HUGE_PAGES=0' in err and err.startswith('lapa: ')


@pytest.mark.parametrize('env', [
    {'GLIBC_TUNABLES': 'glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1'},
    {'GLIBC_TUNABLES': 'glibc.malloc.hugetlb=0'},  # the user's choice
    {'LAPA_HUGE_PAGES': '0'},
    {'JAX_PLATFORMS': 'cuda'},
    {'JAX_PLATFORMS': 'tpu,cpu'},
    {'JAX_PLATFORMS': ''},  # and a GPU/TPU plugin installed (below)
])
def test_silent_when_set_chosen_or_not_on_a_cpu(fresh, capsys, env):
  for name, value in env.items():
    fresh.setenv(name, value)
  fresh.setattr(host_memory, '_accelerator_plugin_installed', lambda: True)
  host_memory.warn_if_missing()
  assert capsys.readouterr().err == ''


@pytest.mark.parametrize('tunables, expected', [(None, 'glibc.malloc.hugetlb=1'),
                                                ('glibc.malloc.arena_max=2',
                                                 'glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1')])
def test_the_export_line_appends_to_the_users_tunables(tunables, expected):
  env = {k: v for k, v in os.environ.items() if k != 'GLIBC_TUNABLES'}
  if tunables:
    env['GLIBC_TUNABLES'] = tunables
  program = 'from lapa_jax import host_memory; print(host_memory.huge_pages_requested())'
  script = f'{host_memory.EXPORT_LINE}; echo "$GLIBC_TUNABLES"; {shlex.quote(sys.executable)} -c {shlex.quote(program)}'
  out = subprocess.run(['bash', '-c', script], env=env, capture_output=True, text=True, check=True)
  assert out.stdout.split() == [expected, 'True']


# The `lapa` program with its sub-command replaced by a report: what ran, in which process, with what.
PROGRAM = ('import os, sys; from lapa_jax import cli; print("start", os.getpid(), flush=True); '
           'cli.dispatch = lambda *args: print("command", os.getpid(), os.environ.get("GLIBC_TUNABLES")); '
           'sys.exit(cli.main())')


@pytest.mark.parametrize('command, warns', [(['train', 'configs/laq.py:tiny'], True), (['world'], False),
                                            (['train', '--help'], False)])
def test_lapa_warns_and_runs_in_the_same_process(command, warns):
  env = {k: v for k, v in os.environ.items() if k not in ('GLIBC_TUNABLES', host_memory.OPT_OUT, 'LAPA_DISTRIBUTED')}
  process = subprocess.Popen([sys.executable, '-c', PROGRAM, *command], env={**env, 'JAX_PLATFORMS': 'cpu'},
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  out, err = process.communicate(timeout=60)
  assert process.returncode == 0, err
  # Started once, ran the command in the same process (a re-execution would print 'start' twice), and
  # with the environment it was given.
  assert out.split() == ['start', str(process.pid), 'command', str(process.pid), 'None']
  assert len(err.splitlines()) == (1 if warns else 0), err
  assert (host_memory.EXPORT_LINE in err) == warns
