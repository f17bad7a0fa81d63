"""Transparent huge pages for XLA:CPU's per-call temporaries.

XLA:CPU allocates an executable's temporary buffer afresh at every call and frees it afterwards
(275 MB for the `small` LAQ train step at batch 8). glibc serves allocations that large with mmap,
so every step touches ~70,000 fresh 4 KiB pages and spends about a quarter of its CPU time in page
faults (benchmarks/laq_step.py, 2 cores: 24 -> 33 pairs/s). glibc's `hugetlb` tunable asks the kernel
for transparent huge pages on those mappings (512x fewer faults) wherever THP is 'madvise' or
'always'. Tunables are read when a process starts, so the running program has to re-execute itself.
"""

from __future__ import annotations

import os
import platform
import sys

TUNABLE = 'glibc.malloc.hugetlb'
OPT_OUT = 'LAPA_HUGE_PAGES'  # '0' keeps the process as it is


def reexec_with_huge_pages() -> None:
  """Re-executes this process with `GLIBC_TUNABLES` += glibc.malloc.hugetlb=1, once; call it first
  thing in a main(), before any thread or accelerator exists. No-op off glibc, when the tunable is
  already set (by the user or by the re-executed process), or with LAPA_HUGE_PAGES=0."""
  if sys.platform != 'linux' or platform.libc_ver()[0] != 'glibc' or os.environ.get(OPT_OUT) == '0':
    return
  tunables = os.environ.get('GLIBC_TUNABLES', '')
  if TUNABLE in tunables:
    return
  env = dict(os.environ, GLIBC_TUNABLES=':'.join(filter(None, [tunables, f'{TUNABLE}=1'])))
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, sys.orig_argv, env)


def huge_pages_requested() -> bool:
  return f'{TUNABLE}=1' in os.environ.get('GLIBC_TUNABLES', '')
