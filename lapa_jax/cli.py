"""The `lapa` command: one sub-command per arrow of the data flow (see README.md).

Each sub-command lives in its own module as `main(argv) -> int`; this file only dispatches, so
`lapa --help` stays fast and a broken optional dependency breaks only its own command.
"""

from __future__ import annotations

import importlib
import os
import sys

COMMANDS = {
    # name: (module, one-line help)
    'world': ('lapa_jax.envs.writer', 'write built-in tabletop world episodes as an RLDS dataset'),
    'train': ('lapa_jax.train.loop', 'train a stage: lapa train configs/<stage>.py:<preset> --workdir DIR'),
    'import-videos': ('lapa_jax.data.video', 'human videos (frame folders or mp4/webm) + instructions -> RLDS'),
    'resize-dataset': ('lapa_jax.data.resize', 'copy an RLDS dataset with its images resized: IN OUT --size 256'),
    'inspect-data': ('lapa_jax.data.inspect', 'check a data directory: versions, keys, fps, offsets, stats, PNGs'),
}


def usage() -> str:
  width = max(len(n) for n in COMMANDS)
  lines = ['usage: lapa <command> [args]', '', 'commands:']
  lines += [f'  {name:<{width}}  {help_}' for name, (_, help_) in COMMANDS.items()]
  lines += ['', "run 'lapa <command> --help' for a command's arguments"]
  return '\n'.join(lines)


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  if not argv or argv[0] in ('-h', '--help', 'help'):
    print(usage())
    return 0
  name, rest = argv[0], argv[1:]
  if name not in COMMANDS:
    print(f"lapa: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
    return 2
  if os.environ.get('LAPA_DISTRIBUTED') == '1':
    # Set by launch/tpu_pod.sh and launch/slurm_gpu.sh: the cluster is auto-detected (TPU, SLURM).
    import jax
    jax.distributed.initialize()
  module = importlib.import_module(COMMANDS[name][0])
  return int(module.main(rest) or 0)


if __name__ == '__main__':
  sys.exit(main())
