"""The `lapa` command: one sub-command per arrow of the data flow (see README.md).

Each sub-command lives in its own module as `main(argv) -> int`; this file only dispatches, so
`lapa --help` stays fast and a broken optional dependency breaks only its own command.
"""

from __future__ import annotations

import importlib
import os
import sys

from lapa_jax import host_memory

COMMANDS = {
    # name: (module, one-line help)
    'world': ('lapa_jax.envs.writer', 'write built-in world or Meta-World expert episodes as an RLDS dataset'),
    'inspect-data': ('lapa_jax.data.inspect', 'check a data directory: versions, keys, fps, offsets, stats, PNGs'),
    'import-videos': ('lapa_jax.data.video', 'human videos (frame folders or mp4/webm) + instructions -> RLDS'),
    'resize-dataset': ('lapa_jax.data.resize', 'copy an RLDS dataset with its images resized: IN OUT --size 256'),
    'train': ('lapa_jax.train.loop', 'train a stage: lapa train configs/<stage>.py:<preset> --workdir DIR'),
    'laq-infer': ('lapa_jax.laq_infer', 'latent action codes and reconstructions of frame pairs (.npz)'),
    'label': ('lapa_jax.label', 'latent actions + vision tokens of every step of a dataset/mixture -> new RLDS'),
    'evaluate': ('lapa_jax.evaluate', 'held-out metrics, closed-loop success, imagined rollouts of checkpoints'),
    'serve': ('lapa_jax.serve', 'serve a finetuned policy over openpi\'s websocket protocol: lapa serve WORKDIR --port 8000'),
    'convert': ('lapa_jax.convert.cli', 'import released weights: lapa convert <source> ... (official-laq, easylm, ...)'),
}

# The commands whose time goes into XLA computations (where huge pages matter on a CPU).
XLA_COMMANDS = ('train', 'label', 'evaluate', 'laq-infer', 'serve')


def usage(prog: str, commands: dict, noun: str = 'command') -> str:
  width = max(len(name) for name in commands)
  lines = [f'usage: {prog} <{noun}> [args]', '', f'{noun}s:']
  lines += [f'  {name:<{width}}  {help_}' for name, (_, help_) in commands.items()]
  lines += ['', f"run '{prog} <{noun}> --help' for its arguments"]
  return '\n'.join(lines)


# Errors a user can fix (a path, a value, a file, the disk): one line at the CLI boundary, with the
# traceback only under --debug (or LAPA_DEBUG=1).
USER_ERRORS = (ValueError, KeyError, OSError, FloatingPointError)


def dispatch(prog: str, commands: dict, argv: list[str], noun: str = 'command') -> int:
  """Runs `commands[argv[0]]`'s module `main(argv[1:])`; prints usage for help or an unknown name."""
  if '--debug' in argv:  # anywhere on the line; nested dispatchers (lapa convert ...) see it here
    os.environ['LAPA_DEBUG'] = '1'
    argv = [arg for arg in argv if arg != '--debug']
  if not argv or argv[0] in ('-h', '--help', 'help'):
    print(usage(prog, commands, noun))
    return 0
  name, rest = argv[0], argv[1:]
  if name not in commands:
    print(f'{prog}: unknown {noun} {name!r}\n\n{usage(prog, commands, noun)}', file=sys.stderr)
    return 2
  module = importlib.import_module(commands[name][0])
  try:
    return int(module.main(rest) or 0)
  except Exception as error:  # noqa: BLE001 (filtered just below)
    if os.environ.get('LAPA_DEBUG') == '1' or not _user_error(error):
      raise
    print(f'{prog} {name}: error: {_one_line(error)} (--debug shows the traceback)', file=sys.stderr)
    return 1


def _user_error(error: Exception) -> bool:
  # TensorFlow's data errors (a corrupt or missing file) are not imported here: tf is slow to import.
  return isinstance(error, USER_ERRORS) or type(error).__module__.startswith('tensorflow')


def _one_line(error: Exception) -> str:
  message = error.args[0] if isinstance(error, KeyError) and error.args else str(error)
  lines = [line.strip() for line in str(message).splitlines() if line.strip()]
  return lines[0] if lines else type(error).__name__


def main(argv: list[str] | None = None) -> int:
  if argv is None:  # run as the program: its environment is the user's to fix, so say what helps
    argv = sys.argv[1:]
    command = next((arg for arg in argv if not arg.startswith('-')), '')  # past options such as --debug
    if command in XLA_COMMANDS and not {'-h', '--help'} & set(argv):
      host_memory.warn_if_missing()
  if os.environ.get('LAPA_DISTRIBUTED') == '1':
    # Set by launch/tpu_pod.sh and launch/slurm_gpu.sh: the cluster is auto-detected (TPU, SLURM).
    import jax
    jax.distributed.initialize()
  return dispatch('lapa', COMMANDS, argv)


if __name__ == '__main__':
  sys.exit(main())
