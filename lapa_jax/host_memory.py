"""Transparent huge pages for XLA:CPU's per-call temporaries.

XLA:CPU allocates an executable's temporary buffer afresh at every call and frees it afterwards
(275 MB for the `small` LAQ train step at batch 8). glibc serves allocations that large with mmap,
so every step touches ~70,000 fresh 4 KiB pages and spends about a quarter of its CPU time in page
faults (benchmarks/laq_step.py, 2 cores: 24 -> 33 pairs/s). glibc's `hugetlb` tunable asks the kernel
for transparent huge pages on those mappings (512x fewer faults) wherever THP is 'madvise' or
'always'.

glibc reads tunables only when a process starts, so the variable has to be in the environment that
starts Python: the launch scripts (launch/*.sh) export EXPORT_LINE, and `lapa` warns once when a CPU
run lacks it (`warn_if_missing`) instead of silently re-executing itself.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import platform
import sys

TUNABLE = 'glibc.malloc.hugetlb'
OPT_OUT = 'LAPA_HUGE_PAGES'  # '0' silences the warning
# Appends to the user's own tunables rather than replacing them (launch/*.sh export it the same way).
EXPORT_LINE = f'export GLIBC_TUNABLES="${{GLIBC_TUNABLES:+$GLIBC_TUNABLES:}}{TUNABLE}=1"'

_warned = False


def huge_pages_requested() -> bool:
  return f'{TUNABLE}=1' in os.environ.get('GLIBC_TUNABLES', '')


def _accelerator_plugin_installed() -> bool:
  """Whether JAX may find a GPU or TPU: a PJRT plugin (jax[cuda12], jax[rocm]) or libtpu (jax[tpu])."""
  if os.environ.get('TPU_LIBRARY_PATH') or importlib.util.find_spec('libtpu') is not None:
    return True
  # JAX imports plugins from the `jax_plugins` namespace package and from this entry-point group.
  return (importlib.util.find_spec('jax_plugins') is not None
          or bool(importlib.metadata.entry_points(group='jax_plugins')))


def cpu_backend() -> bool:
  """Whether JAX's default backend will be the CPU, decided without starting a backend: that would be
  slow for commands that never compute and must not happen before jax.distributed.initialize().
  JAX_PLATFORMS's first entry is the default; otherwise any accelerator plugin means perhaps not CPU."""
  platforms = os.environ.get('JAX_PLATFORMS', '').strip()
  if platforms:
    return platforms.split(',')[0].strip() == 'cpu'
  return not _accelerator_plugin_installed()


def missing() -> bool:
  """True on Linux/glibc when a CPU run would go without the tunable and the user has not chosen
  (GLIBC_TUNABLES naming glibc.malloc.hugetlb with any value is a choice, as is LAPA_HUGE_PAGES=0)."""
  if sys.platform != 'linux' or platform.libc_ver()[0] != 'glibc' or os.environ.get(OPT_OUT) == '0':
    return False
  return TUNABLE not in os.environ.get('GLIBC_TUNABLES', '') and cpu_backend()


def warn_if_missing(prog: str = 'lapa') -> None:
  """One line on stderr, once per process, when `missing()`: what to export, why, how to silence it."""
  global _warned
  if _warned or not missing():
    return
  _warned = True
  print(f'{prog}: GLIBC_TUNABLES lacks {TUNABLE}=1 (XLA:CPU steps run up to ~1.4x faster on huge pages); '
        f'before starting Python: {EXPORT_LINE} (lapa_jax/host_memory.py; {OPT_OUT}=0 silences this)',
        file=sys.stderr, flush=True)
