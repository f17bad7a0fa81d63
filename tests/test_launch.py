"""The launch scripts: they parse, --dry-run prints exactly what they run, and the command given to
tpu_pod.sh / slurm_gpu.sh reaches `lapa` word for word (fake gcloud, srun and lapa on PATH)."""

import json
import os
import pathlib
import shlex
import signal
import subprocess
import sys
import time

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
LAUNCH = REPO / 'launch'
# Words a careless `$*` would split, glob or expand.
COMMAND = ['lapa', 'train', 'configs/laq.py:paper', '--workdir', '/mnt/my runs/laq', '--config.note=it\'s "x"',
           '$HOME', '*', '--config.mesh_dim=-1,1,1']

# Stand-ins, in the test's own Python: gcloud records its arguments and runs an ssh --command as one
# TPU worker's shell would; srun and lapa record what they were given.
GCLOUD = '''#!{python}
import json, os, subprocess, sys
with open(os.environ['CALLS'], 'a') as f:
  f.write(json.dumps(sys.argv[1:]) + '\\n')
if 'ssh' in sys.argv:
  command = sys.argv[sys.argv.index('--command') + 1]
  sys.exit(subprocess.run(['bash', '-c', command], cwd=os.environ['HOME']).returncode)
'''
RECORDER = '''#!{python}
import json, os, signal, sys, time
record = dict(argv=sys.argv[1:], cwd=os.getcwd(), pid=os.getpid(),
              env={{k: os.environ.get(k) for k in ('LAPA_DISTRIBUTED', 'GLIBC_TUNABLES', 'XLA_PYTHON_CLIENT_MEM_FRACTION')}})
with open(os.environ.get('RECORD') or os.path.expanduser('~/ran.json'), 'w') as f:
  json.dump(record, f)
if sys.argv[1:2] == ['sleep']:  # a long run: SIGTERM ends it as it ends training (after a save)
  signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
  time.sleep(60)
'''


def _script(path: pathlib.Path, text: str) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(text.format(python=sys.executable))
  path.chmod(0o755)


@pytest.fixture
def fakes(tmp_path):
  """An environment whose gcloud, srun and TPU worker (home: tmp_path/home) are stand-ins."""
  home = tmp_path / 'home'
  _script(tmp_path / 'bin' / 'gcloud', GCLOUD)
  _script(tmp_path / 'bin' / 'srun', RECORDER)
  venv = home / 'lapa_jax' / '.venv' / 'bin'
  _script(venv / 'lapa', RECORDER)
  (venv / 'activate').write_text(f'PATH={shlex.quote(str(venv))}:"$PATH"\n')
  env = {k: v for k, v in os.environ.items()
         if k not in ('GLIBC_TUNABLES', 'XLA_FLAGS', 'XLA_PYTHON_CLIENT_MEM_FRACTION', 'LAPA_DISTRIBUTED', 'RECORD')}
  env.update(PATH=f'{tmp_path / "bin"}:{env["PATH"]}', HOME=str(home), CALLS=str(tmp_path / 'calls.jsonl'),
             TPU='x', ZONE='y')
  return env


def launch(script, *args, env, check=True):
  out = subprocess.run(['bash', str(LAUNCH / script), *args], env=env, capture_output=True, text=True, timeout=60)
  if check:
    assert out.returncode == 0, out.stderr
  return out


def calls(env):
  with open(env['CALLS']) as f:
    return [json.loads(line) for line in f]


def test_every_launch_script_parses():
  scripts = sorted(LAUNCH.glob('*.sh'))
  assert {'tpu_pod.sh', 'slurm_gpu.sh', 'demo.sh', 'test.sh'} <= {s.name for s in scripts}
  for script in scripts:
    out = subprocess.run(['bash', '-n', str(script)], capture_output=True, text=True)
    assert out.returncode == 0, f'{script.name}: {out.stderr}'


def test_tpu_run_dry_run_prints_what_runs_and_the_command_survives(fakes):
  dry = launch('tpu_pod.sh', '--dry-run', 'run', '--wait', '--log', 'runs/laq log.txt', *COMMAND, env=fakes)
  assert not os.path.exists(fakes['CALLS'])  # nothing ran
  printed = shlex.split(dry.stdout)
  assert printed[:10] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh', 'x', '--zone', 'y', '--worker=all',
                          '--command'] and len(printed) == 11
  assert 'LAPA_DISTRIBUTED=1 nohup lapa train' in printed[10]

  (pathlib.Path(fakes['HOME']) / 'runs').mkdir()
  launch('tpu_pod.sh', 'run', '--wait', '--log', 'runs/laq log.txt', *COMMAND, env=fakes)
  assert calls(fakes) == [printed[1:]]  # exactly what the dry run printed
  home = pathlib.Path(fakes['HOME'])
  with open(home / 'ran.json') as f:
    ran = json.load(f)
  assert ran['argv'] == COMMAND[1:]  # every word intact: spaces, quotes, $, *
  assert ran['cwd'] == str(home / 'lapa_jax')
  assert ran['env']['LAPA_DISTRIBUTED'] == '1' and ran['env']['GLIBC_TUNABLES'] == 'glibc.malloc.hugetlb=1'
  assert (home / 'runs' / 'laq log.txt').exists() and (home / 'lapa.pid').read_text().strip() == str(ran['pid'])


def _running(pid: int) -> bool:
  """Alive and not a zombie (an orphan may wait to be reaped by an init that does not)."""
  try:
    with open(f'/proc/{pid}/status') as f:
      return not any(line.startswith('State:') and 'Z' in line.split()[1] for line in f)
  except FileNotFoundError:
    return False


def test_tpu_run_in_the_background_and_stop(fakes):
  home = pathlib.Path(fakes['HOME'])
  launch('tpu_pod.sh', 'run', 'lapa', 'sleep', env={**fakes, 'GLIBC_TUNABLES': 'glibc.malloc.hugetlb=0'})
  deadline = time.time() + 30
  while not (home / 'ran.json').exists() and time.time() < deadline:
    time.sleep(0.1)
  ran = json.loads((home / 'ran.json').read_text())
  try:
    assert ran['env']['GLIBC_TUNABLES'] == 'glibc.malloc.hugetlb=0'  # the user's choice is kept
    assert (home / 'lapa.pid').read_text().strip() == str(ran['pid'])
    launch('tpu_pod.sh', 'stop', env=fakes)  # returns once the process has ended
    assert not _running(ran['pid']) and not (home / 'lapa.pid').exists()
  finally:
    if _running(ran['pid']):
      os.kill(ran['pid'], signal.SIGKILL)


def test_tpu_setup_dry_run(fakes):
  lines = launch('tpu_pod.sh', '--dry-run', 'setup', env=fakes).stdout.splitlines()
  assert len(lines) == 3 and lines[0].startswith(f'git -C {REPO} ls-files')  # not the ignored .venv
  assert shlex.split(lines[1])[:5] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'scp'] and '--worker=all' in lines[1]
  ssh = shlex.split(lines[2])
  assert ssh[:9] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh', 'x', '--zone', 'y', '--worker=all']
  assert 'jax[tpu]==0.10.2' in ssh[-1]
  assert not os.path.exists(fakes['CALLS'])


def test_slurm_dry_run_prints_the_environment_and_the_srun_line(fakes):
  env = {**fakes, 'GLIBC_TUNABLES': 'glibc.malloc.arena_max=2'}
  lines = launch('slurm_gpu.sh', '--dry-run', *COMMAND, env=env).stdout.splitlines()
  exported = dict(shlex.split(line)[1].split('=', 1) for line in lines[:-1])
  assert all(line.startswith('export ') for line in lines[:-1])
  assert exported['LAPA_DISTRIBUTED'] == '1' and exported['XLA_PYTHON_CLIENT_MEM_FRACTION'] == '0.9'
  assert exported['GLIBC_TUNABLES'] == 'glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1'
  assert shlex.split(lines[-1]) == ['srun', '--kill-on-bad-exit=1', *COMMAND]

  record = pathlib.Path(fakes['HOME']) / 'srun.json'
  launch('slurm_gpu.sh', *COMMAND, env={**env, 'RECORD': str(record)})
  ran = json.loads(record.read_text())
  assert ran['argv'] == ['--kill-on-bad-exit=1', *COMMAND]
  assert {k: ran['env'][k] for k in ('LAPA_DISTRIBUTED', 'GLIBC_TUNABLES')} == {
      k: exported[k] for k in ('LAPA_DISTRIBUTED', 'GLIBC_TUNABLES')}


@pytest.mark.parametrize('script, args, unset', [
    ('tpu_pod.sh', ['--dry-run', 'run', *COMMAND], 'TPU'),
    ('tpu_pod.sh', ['--dry-run', 'run', *COMMAND], 'ZONE'),
    ('tpu_pod.sh', ['--dry-run', 'run'], None),
    ('tpu_pod.sh', ['--dry-run', 'run', '--log'], None),
    ('tpu_pod.sh', ['--dry-run'], None),
    ('tpu_pod.sh', ['start'], None),
    ('slurm_gpu.sh', ['--dry-run'], None),
    ('slurm_gpu.sh', [], None),
])
def test_usage_errors_are_one_line_with_exit_code_2(fakes, script, args, unset):
  env = {k: v for k, v in fakes.items() if k != unset}
  out = launch(script, *args, env=env, check=False)
  assert out.returncode == 2 and out.stdout == ''
  assert len(out.stderr.splitlines()) == 1 and out.stderr.startswith(f'launch/{script}: ')
  assert 'usage:' in out.stderr
  assert not os.path.exists(fakes['CALLS'])
