"""Every benchmark at its CPU preset, each in its own process, collected into one report.

    python benchmarks/run_all.py                      # all but the slow ones: ~10 min on 2 cores
    python benchmarks/run_all.py --include-slow       # + laq_quality (~11 min: 644 s in REPORT.md)
    python benchmarks/run_all.py --only world_render,decode --timeout 300 --out /tmp/report

Runs each benchmark in benchmarks/ with the arguments of RUNS (the CPU settings of its docstring),
collects the JSON lines it prints and writes REPORT.md and REPORT.json into --out: the machine, the
date, each run's exact command, time and load average, its headline figures with their ratio to the
recorded references (the official PyTorch LAQ, HF transformers' LLaMA, decode-only input, the issues'
targets), and every JSON line. A benchmark that fails or times out is reported with its last stderr
line; the report is written anyway. paper_table.py takes 90 minutes on 2 cores and runs only when
--only names it.

This script imports no JAX and does no work of its own while a benchmark runs, so it neither slows
the benchmarks nor takes long to start.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import importlib.util
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

# backbone_step times HF transformers in the same run where it is installed (launch/test.sh installs it):
# the ratio to it is fair on a shared machine, where the recorded 221 tokens/s is not.
HF = ['--hf'] if importlib.util.find_spec('torch') and importlib.util.find_spec('transformers') else []
# (benchmark file, arguments, rough minutes on 2 quiet cores, when it runs: 'always', 'slow' (with
# --include-slow) or 'named' (only when --only names it)). `{scratch}` is a temporary directory removed
# afterwards. The minutes (estimates; world_render's, decode's and paper_table's measured) set the
# default timeouts.
RUNS = [
    ('world_render', [], 1, 'always'),
    ('decode', ['--preset', 'small'], 2, 'always'),
    ('backbone_step', ['--preset', 'small', *HF], 4, 'always'),
    ('laq_step', ['--preset', 'small'], 1, 'always'),
    ('laq_step', ['--preset', 'paper'], 3, 'always'),
    ('input_pipeline', [], 2, 'always'),
    ('label', [], 3, 'always'),
    ('serve', [], 3, 'always'),
    ('compile_7b', [], 5, 'always'),
    ('laq_quality', ['--workdir', '{scratch}/laq_quality'], 11, 'slow'),
    ('paper_table', ['--out', '{scratch}/paper_table'], 90, 'named'),
]


def _number(value):
  return round(value, 3) if isinstance(value, float) else value


def figures(name: str, record: dict) -> list[dict]:
  """The headline figures of one JSON line: figure, value, reference (words) and value / reference."""
  def row(figure, value, reference=None, reference_value=None):
    ratio = value / reference_value if value is not None and reference_value else None
    return dict(figure=figure, value=_number(value), reference=reference, ratio=_number(ratio))

  get = record.get
  if name == 'laq_step':
    official = get('official_pytorch_pairs_per_second')
    return [row(f"LAQ train step `{get('preset')}`, batch {get('batch')}, pairs/s", get('pairs_per_second'),
                f'official PyTorch LAQ {official} pairs/s (2-core CPU)' if official else None, official)]
  if name == 'backbone_step' and get('benchmark') == 'backbone_step':
    rows = [row(f"{get('model')} step `{get('preset')}` {get('batch')}x{get('length')} {get('dtype')}, tokens/s",
                get('tokens_per_second'), 'HF LLaMA 221 tokens/s (2-core CPU)', 221.0)]
    if get('vs_hf_same_run'):  # HF's tokens/s on this machine, from the ratio the benchmark printed
      hf = get('tokens_per_second') / get('vs_hf_same_run')
      rows.append(row(f"{get('model')} step, tokens/s", get('tokens_per_second'),
                      f'HF transformers in the same run: {hf:.1f} tokens/s', hf))
    return rows
  if name == 'decode' and get('benchmark') == 'decode_step':
    return [row(f"one cached step / one full forward ({get('layers')} layers)", get('step_fraction'),
                f"target <= {get('target_fraction')}", get('target_fraction'))]
  if name == 'decode' and get('benchmark') == 'decode_generate':
    return [row(f"generate {get('tokens')} {get('target')} tokens, cached, ms", get('cached_ms'),
                f"recomputing the sequence: {get('recompute_ms')} ms", get('recompute_ms'))]
  if name == 'input_pipeline' and get('metric') == 'mixture_pairs':
    # The decode-only rates (the previous line) from the ratios this line carries.
    decode, decode_cpu = (get('pairs_per_s') / get('ratio_to_decode_only'),
                          get('pairs_per_cpu_s') / get('cpu_ratio_to_decode_only'))
    return [row(f"pair pipeline {get('image_dtype')} at {get('size')}px (resized: {get('resized')}), pairs/s",
                get('pairs_per_s'), f"decoding the same files: {decode:.1f} pairs/s (target ratio "
                f"{get('target_ratio')})", decode),
            row(f"pair pipeline {get('image_dtype')}, pairs per CPU-second", get('pairs_per_cpu_s'),
                f'decoding the same files: {decode_cpu:.1f} per CPU-second', decode_cpu)]
  if name == 'label':
    return [row('labelling job, frames/s', get('job_frames_per_second'),
                f"bare jitted encoders {get('bare_frames_per_second')} frames/s (target ratio {get('target_ratio')})",
                get('bare_frames_per_second'))]
  if name == 'serve':
    return [row(f"serve `{get('preset')}`, {c['clients']} client(s): p50 ms ({c['requests_per_second']} requests/s)",
                c['p50_ms'], f"bare `infer` {get('bare_ms')} ms", get('bare_ms')) for c in get('clients', [])]
  if name == 'world_render' and get('summary'):
    return [row(f"world render at {get('target_image_size')}px, slowest embodiment, frames per CPU-second",
                get('min_frames_per_second_at_target'), f"target {get('target_frames_per_second')}",
                get('target_frames_per_second'))]
  if name == 'compile_7b':
    return [row(f"7B step on {get('devices')} devices ({get('mesh')}), GiB per device",
                get('per_device_gib', {}).get('total'), f"target <= {get('target_gib')} GiB", get('target_gib')),
            row('7B step, compile seconds on this CPU', get('compile_seconds'))]
  if name == 'laq_quality':
    per_position = get('perplexity_per_position') or [None]
    return [row(f"LAQ `demo` action purity after {get('steps')} steps", get('action_purity'), 'target 0.7', 0.7),
            row('LAQ `demo` latent actions before the codebook: linear probe sector accuracy',
                get('latent_probe_sector_accuracy'), 'the codes\' action purity', get('action_purity')),
            row('LAQ `demo` lowest per-position perplexity', min(per_position),
                f"target 3/4 of {get('codebook_size')} codes", 0.75 * (get('codebook_size') or 0)),
            row('LAQ `demo` reconstruction PSNR, dB', get('psnr'), f"copying x_t: {_number(get('copy_psnr'))} dB",
                get('copy_psnr'))]
  if name == 'paper_table' and get('method'):
    return [row(f"built-in world success, {get('method')} ({get('size')})", get('success', [None])[0])]
  return []


def read_figures(name: str, record: dict) -> list[dict]:
  """figures(), but a line whose format changed becomes a note in the report instead of ending the run."""
  try:
    return figures(name, record)
  except (KeyError, TypeError, ValueError, ZeroDivisionError) as error:
    return [dict(figure=f'(a figure could not be read: {error!r})', value=None, reference=None, ratio=None)]


def why_not_run(name: str, minutes: int, when: str, only: list[str] | None, include_slow: bool) -> str | None:
  if only:
    return None if name in only else 'not run: not in --only'
  if when == 'slow' and not include_slow:
    return f'not run: slow (~{minutes} min), --include-slow runs it'
  if when == 'named':
    return f'not run: long (~{minutes} min), --only {name} runs it'
  return None


def _command(name: str, arguments: list[str]) -> list[str]:
  return [sys.executable, os.path.join(HERE, f'{name}.py'), *arguments]


def run(name: str, arguments: list[str], timeout: float, env: dict) -> dict:
  """One benchmark as a subprocess: status, seconds, its JSON lines and its last stderr line."""
  command = _command(name, arguments)
  load_before = os.getloadavg()[0]
  start = time.perf_counter()
  # A session of its own, so that a timeout also ends the processes the benchmark started.
  process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, start_new_session=True)
  try:
    stdout, stderr = process.communicate(timeout=timeout)
    status = 'ok' if process.returncode == 0 else f'failed (exit {process.returncode})'
  except subprocess.TimeoutExpired:
    os.killpg(process.pid, signal.SIGKILL)
    stdout, stderr = process.communicate()
    status = f'timed out after {timeout:.0f} s'
  records = []
  for line in stdout.splitlines():
    try:
      records.append(json.loads(line))
    except ValueError:
      continue  # not one of the benchmark's JSON lines
  if status == 'ok' and not records:
    status = 'failed (no JSON output)'
  last_stderr = next((line.strip() for line in reversed(stderr.splitlines()) if line.strip()), '')
  return dict(name=name, command=_shell(command), status=status,
              seconds=round(time.perf_counter() - start, 1), load_before=round(load_before, 2),
              records=records, last_stderr=last_stderr if status != 'ok' else '',
              figures=[figure for record in records for figure in read_figures(name, record)])


def _shell(command: list[str]) -> str:
  """The command as one would type it in the repository root."""
  return shlex.join(os.path.relpath(part, ROOT) if os.path.isabs(part) and part.startswith(ROOT) else part
                    for part in command)


def _version(package: str) -> str | None:
  try:
    return importlib.metadata.version(package)
  except importlib.metadata.PackageNotFoundError:
    return None


def machine() -> dict:
  cpu = platform.processor() or platform.machine()
  try:
    with open('/proc/cpuinfo') as cpuinfo:
      cpu = next((line.split(':', 1)[1].strip() for line in cpuinfo if line.startswith('model name')), cpu)
  except OSError:
    pass
  # Without importing JAX: which backends could run is what is installed plus JAX_PLATFORMS.
  plugins = [name for name in ('jax-cuda12-plugin', 'jax-cuda13-plugin', 'libtpu') if _version(name)]
  return dict(cpu=cpu, cpu_count=os.cpu_count(), usable_cpus=len(os.sched_getaffinity(0)),
              load_average=[round(load, 2) for load in os.getloadavg()], python=platform.python_version(),
              jax=_version('jax'), jaxlib=_version('jaxlib'), accelerator_plugins=plugins,
              jax_platforms=os.environ.get('JAX_PLATFORMS'), platform=platform.platform())


def git_revision() -> str:
  def git(*args):
    return subprocess.run(['git', *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()
  revision = git('rev-parse', '--short', 'HEAD') or 'unknown'
  return revision + (' + uncommitted changes' if git('status', '--porcelain', '--untracked-files=no') else '')


def markdown(report: dict) -> str:
  m = report['machine']
  lines = ['# lapa_jax benchmark report', '']
  if report['partial']:
    lines += ['**Partial run** (not every benchmark ran; see "Runs"): not the full report.', '']
  devices = sorted({str(r['device']) for run in report['runs'] for r in run.get('records', []) if 'device' in r})
  lines += [
      f"- Date: {report['date']}; commit {report['revision']}",
      f"- Machine: {m['cpu']}, {m['cpu_count']} cores ({m['usable_cpus']} usable), load average "
      f"{' / '.join(map(str, m['load_average']))} (1 / 5 / 15 min) at the start; {m['platform']}",
      f"- Python {m['python']}, jax {m['jax']}, jaxlib {m['jaxlib']}; JAX_PLATFORMS={m['jax_platforms'] or 'unset'}; "
      f"accelerator plugins: {', '.join(m['accelerator_plugins']) or 'none'}; "
      f"devices the benchmarks reported: {', '.join(devices) or 'none reported'}",
      f"- Command: `{report['command']}` ({report['seconds']:.0f} s in all); the benchmarks ran with "
      f"GLIBC_TUNABLES={report['glibc_tunables']}",
      '', '## Headline figures', '',
      'Ratio = value / reference. The official PyTorch LAQ and HF LLaMA figures were measured on a 2-core CPU',
      'machine of the CI kind: on another machine the ratio compares machines as much as code. For a target',
      'written "<=", a ratio <= 1 meets it.', '',
      '| Benchmark | Figure | Value | Reference | Ratio |', '|---|---|---|---|---|']
  for run in report['runs']:
    for f in run.get('figures', []):
      ratio = '' if f['ratio'] is None else f"{f['ratio']:.3g}"
      lines.append(f"| {run['name']} | {f['figure']} | {f['value']} | {f['reference'] or ''} | {ratio} |")
  lines += ['', '## Runs', '', 'Load before: the 1-minute load average when the benchmark started; above the core '
            'count, the machine was shared.', '',
            '| Benchmark | Status | Seconds | Load before | Command |', '|---|---|---|---|---|']
  for run in report['runs']:
    status = run['status'] + (f": {run['last_stderr']}" if run.get('last_stderr') else '')
    lines.append(f"| {run['name']} | {status.replace('|', '/')} | {run.get('seconds', '')} | "
                 f"{run.get('load_before', '')} | `{run['command']}` |")
  lines += ['', '## JSON lines', '']
  for run in report['runs']:
    if run.get('records'):
      lines += [f"### {run['name']}", '', f"`{run['command']}`", '', '```json',
                *(json.dumps(record) for record in run['records']), '```', '']
  return '\n'.join(lines).rstrip() + '\n'


def write(path: str, text: str) -> None:
  """Written under a temporary name and renamed, so a report on disk is always complete."""
  with open(path + '.tmp', 'w') as file:
    file.write(text)
  os.replace(path + '.tmp', path)


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  names = sorted({name for name, *_ in RUNS})
  parser.add_argument('--only', help=f"comma-separated benchmarks, of {','.join(names)}")
  parser.add_argument('--include-slow', action='store_true', help='also laq_quality (~11 min)')
  parser.add_argument('--out', default=HERE, help='directory of REPORT.md and REPORT.json (default benchmarks/)')
  parser.add_argument('--timeout', type=float, help="seconds per benchmark (default: 3 x its rough minutes "
                      "in RUNS, at least 10 minutes)")
  args = parser.parse_args()
  only = args.only.split(',') if args.only else None
  unknown = sorted(set(only or []) - set(names))
  if unknown:
    parser.error(f"--only: unknown benchmark(s) {', '.join(unknown)}; expected some of {', '.join(names)}")

  env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get('PYTHONPATH')])))
  env.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')  # keeps TensorFlow's start-up noise out of "last stderr line"
  # Huge pages for XLA:CPU's temporaries, as launch/*.sh give `lapa` (lapa_jax/host_memory.py); glibc reads
  # the variable only at process start, so it is set for the benchmarks here. A value already set is kept.
  if 'glibc.malloc.hugetlb' not in env.get('GLIBC_TUNABLES', ''):
    env['GLIBC_TUNABLES'] = ':'.join(filter(None, [env.get('GLIBC_TUNABLES'), 'glibc.malloc.hugetlb=1']))
  report = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
                command=_shell([sys.executable, os.path.abspath(__file__), *sys.argv[1:]]),
                revision=git_revision(), machine=machine(), glibc_tunables=env['GLIBC_TUNABLES'], runs=[])
  plan = [(name, arguments, minutes, when, why_not_run(name, minutes, when, only, args.include_slow))
          for name, arguments, minutes, when in RUNS]
  count, start = sum(reason is None for *_, reason in plan), time.perf_counter()
  with tempfile.TemporaryDirectory(prefix='lapa_run_all_') as scratch:
    for name, arguments, minutes, _, reason in plan:
      if reason:  # its command as RUNS has it: {scratch} stands for a temporary directory
        report['runs'].append(dict(name=name, command=_shell(_command(name, arguments)), status=reason))
        continue
      arguments = [argument.replace('{scratch}', scratch) for argument in arguments]
      done = sum('records' in run for run in report['runs'])
      print(f'[{done + 1}/{count}] {name} {shlex.join(arguments)} (~{minutes} min on 2 cores) ...', flush=True)
      result = run(name, arguments, args.timeout or max(600, 3 * 60 * minutes), env)
      report['runs'].append(result)
      print(f"    {result['status']} in {result['seconds']:.0f} s, {len(result['records'])} JSON line(s)"
            + (f": {result['last_stderr']}" if result['last_stderr'] else '')
            + f'; {time.perf_counter() - start:.0f} s in all', flush=True)
  report['seconds'] = round(time.perf_counter() - start, 1)
  # The full report is at least the default set: one with fewer is labelled partial.
  report['partial'] = any(when == 'always' and reason for *_, when, reason in plan)
  os.makedirs(args.out, exist_ok=True)
  write(os.path.join(args.out, 'REPORT.json'), json.dumps(report, indent=1) + '\n')
  write(os.path.join(args.out, 'REPORT.md'), markdown(report))
  print(f"wrote {os.path.join(args.out, 'REPORT.md')} and REPORT.json", flush=True)
  return 0 if all(run['status'] == 'ok' or run['status'].startswith('not run') for run in report['runs']) else 1


if __name__ == '__main__':
  sys.exit(main())
