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
    'world': ('lapa_jax.envs.writer', 'write built-in tabletop world episodes as an RLDS dataset'),
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


def usage(prog: str, commands: dict, noun: str = 'command') -> str:
  width = max(len(name) for name in commands)
  lines = [f'usage: {prog} <{noun}> [args]', '', f'{noun}s:']
  lines += [f'  {name:<{width}}  {help_}' for name, (_, help_) in commands.items()]
  lines += ['', f"run '{prog} <{noun}> --help' for its arguments"]
  return '\n'.join(lines)


def dispatch(prog: str, commands: dict, argv: list[str], noun: str = 'command') -> int:
  """Runs `commands[argv[0]]`'s module `main(argv[1:])`; prints usage for help or an unknown name."""
  if not argv or argv[0] in ('-h', '--help', 'help'):
    print(usage(prog, commands, noun))
    return 0
  name, rest = argv[0], argv[1:]
  if name not in commands:
    print(f'{prog}: unknown {noun} {name!r}\n\n{usage(prog, commands, noun)}', file=sys.stderr)
    return 2
  return int(importlib.import_module(commands[name][0]).main(rest) or 0)


def main(argv: list[str] | None = None) -> int:
  if argv is None:  # run as the program (not called from Python): it may re-execute itself
    host_memory.reexec_with_huge_pages()
    argv = sys.argv[1:]
  if os.environ.get('LAPA_DISTRIBUTED') == '1':
    # Set by launch/tpu_pod.sh and launch/slurm_gpu.sh: the cluster is auto-detected (TPU, SLURM).
    import jax
    jax.distributed.initialize()
  return dispatch('lapa', COMMANDS, argv)


if __name__ == '__main__':
  sys.exit(main())
