"""Shared test setup: 8 simulated CPU devices, the ../shared fixtures, quiet TensorFlow."""

import atexit
import os
import pathlib
import shutil
import tempfile

# Must happen before jax is imported anywhere: tests of sharding need 8 devices on a CPU.
os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# One persistent XLA compilation cache for the session and the processes it starts: the tests compile
# the same small programs again and again (a resumed run and its uninterrupted reference, each worker),
# and on a CPU compiling is most of their time (a tiny LAQ run: 57 s cold, 7 s from the cache). A new
# directory per session, so nothing carries over from another version.
if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
  os.environ['JAX_COMPILATION_CACHE_DIR'] = tempfile.mkdtemp(prefix='lapa_jax_test_xla_cache_')
  atexit.register(shutil.rmtree, os.environ['JAX_COMPILATION_CACHE_DIR'], ignore_errors=True)

import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = pathlib.Path(os.environ.get('LAPA_SHARED', REPO.parent / 'shared'))
BRIDGE_DIR = SHARED / 'data' / 'bridge_debug' / 'bridge_dataset' / '1.0.0'
OFFICIAL_LAQ_DIR = SHARED / 'fixtures' / 'official_laq'


@pytest.fixture(scope='session')
def bridge_dir() -> pathlib.Path:
  if not BRIDGE_DIR.is_dir():
    pytest.skip(f'real Bridge episodes not found at {BRIDGE_DIR}')
  return BRIDGE_DIR


@pytest.fixture(scope='session')
def official_laq_dir() -> pathlib.Path:
  if not OFFICIAL_LAQ_DIR.is_dir():
    pytest.skip(f'official LAQ fixtures not found at {OFFICIAL_LAQ_DIR}')
  return OFFICIAL_LAQ_DIR


@pytest.fixture(scope='session')
def world(tmp_path_factory) -> str:
  """24 built-in world robot episodes at 32x32 (tests/tiny_runs.py)."""
  import tiny_runs
  return tiny_runs.write_world(tmp_path_factory.mktemp('world'))


@pytest.fixture(scope='session')
def pipeline(world, tmp_path_factory) -> dict:
  """Every stage of LAPA once at tiny sizes, shared by the test files that need trained runs."""
  import tiny_runs
  return tiny_runs.run_pipeline(world, tmp_path_factory.mktemp('pipeline'))
