"""The `lapa` process re-executes itself once with glibc's huge-page tunable (lapa_jax/host_memory.py)."""

import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(sys.platform != 'linux' or platform.libc_ver()[0] != 'glibc', reason='glibc only')

PROGRAM = ('import os; from lapa_jax import host_memory; print("start", flush=True); '
           'host_memory.reexec_with_huge_pages(); print(os.environ.get("GLIBC_TUNABLES"))')


def run(**env):
  environ = {k: v for k, v in os.environ.items() if k not in ('GLIBC_TUNABLES', 'LAPA_HUGE_PAGES')}
  out = subprocess.run([sys.executable, '-c', PROGRAM], env={**environ, **env}, capture_output=True, text=True,
                       check=True)
  return out.stdout.split()


def test_reexecutes_once_with_the_tunable():
  # 'start' twice: the program ran again, and the second run did not re-execute.
  assert run() == ['start', 'start', 'glibc.malloc.hugetlb=1']


def test_keeps_other_tunables_and_respects_the_opt_out():
  assert run(GLIBC_TUNABLES='glibc.malloc.arena_max=2') == ['start', 'start',
                                                            'glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1']
  assert run(GLIBC_TUNABLES='glibc.malloc.hugetlb=0') == ['start', 'glibc.malloc.hugetlb=0']
  assert run(LAPA_HUGE_PAGES='0') == ['start', 'None']
