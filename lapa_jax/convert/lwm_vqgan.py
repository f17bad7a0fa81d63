"""The pickled LWM VQGAN params (`lwm_checkpoints/vqgan`, `lapa_checkpoints/vqgan`) <-> lapa_jax.

LWM stores the VQGAN as `pickle.dump(params)`: a (Frozen)dict tree of numpy or jax arrays with
the names of `lapa_jax.models.vqgan` (`encoder/...`, `decoder/...`, `quantize/embeddings`,
`quant_conv`, `post_quant_conv`). It is read with an allow-list unpickler (numpy arrays, jax
arrays, dicts) so that a file cannot run code, checked against the model's shapes, and written as a
lapa_jax checkpoint; export writes a plain-dict pickle LWM's `VQGAN(path)` loads.

  lapa convert lwm-vqgan import lapa_checkpoints/vqgan OUT [--preset lwm]
  lapa convert lwm-vqgan export WORKDIR OUT/vqgan

OUT is a tokenizer workdir like a trained one (`lapa train configs/tokenizer.py:...`): config.json
(stage 'tokenizer', the preset's VQGAN fields as `model`) and checkpoints/0 with the params, so
`lapa_jax.vision_tokenizer.load_vqgan` reads either. Export takes either, without the discriminator
of adversarial training.
"""

from __future__ import annotations

import argparse
import collections.abc
import os
import pickle
import shutil
from typing import Any

import numpy as np
from flax import traverse_util

from lapa_jax import vision_tokenizer
from lapa_jax.convert import easylm
from lapa_jax.models import vqgan

# (module, name) pairs a params pickle may reference: containers and array reconstruction only.
ALLOWED_GLOBALS = {
    ('builtins', 'dict'), ('builtins', 'list'), ('builtins', 'tuple'), ('collections', 'OrderedDict'),
    ('numpy', 'ndarray'), ('numpy', 'dtype'), ('numpy.core.multiarray', '_reconstruct'),
    ('numpy._core.multiarray', '_reconstruct'), ('numpy.core.multiarray', 'scalar'),
    ('numpy._core.multiarray', 'scalar'), ('flax.core.frozen_dict', 'FrozenDict'),
    ('jax._src.array', '_reconstruct_array'), ('jax._src.api', '_reconstruct_array'),
    ('jax._src.core', 'ShapedArray'), ('ml_dtypes', 'bfloat16'),
}


class _ParamsUnpickler(pickle.Unpickler):
  def find_class(self, module: str, name: str):
    if (module, name) not in ALLOWED_GLOBALS:
      raise pickle.UnpicklingError(f'refusing to load {module}.{name}: a params pickle holds only dicts and arrays')
    return super().find_class(module, name)


def _to_plain(tree: Any) -> Any:
  if isinstance(tree, collections.abc.Mapping):
    return {str(k): _to_plain(v) for k, v in tree.items()}
  return np.asarray(tree)


def read_pickle(path: str) -> dict[str, Any]:
  """The params tree of an LWM VQGAN pickle as nested dicts of numpy arrays."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f'VQGAN params pickle {path!r} does not exist')
  with open(path, 'rb') as stream:
    try:
      tree = _ParamsUnpickler(stream).load()
    except (pickle.UnpicklingError, EOFError) as error:
      raise ValueError(f'{path}: not a VQGAN params pickle ({error})') from None
  if not isinstance(tree, collections.abc.Mapping):
    raise ValueError(f'{path}: expected a dict of params, got {type(tree).__name__}')
  tree = _to_plain(tree)
  return tree['params'] if set(tree) == {'params'} else tree


def write_pickle(params: Any, path: str) -> None:
  """A plain-dict pickle of numpy arrays (what LWM's `pickle.load` expects); via `path.tmp`."""
  temporary = path + '.tmp'
  with open(temporary, 'wb') as stream:
    pickle.dump(_to_plain(params), stream, protocol=4)
  os.replace(temporary, path)


def import_vqgan(path: str, preset: str = 'lwm', **overrides) -> Any:
  """Params of an LWM VQGAN pickle checked against `VQGAN(vqgan_config(preset, **overrides))`."""
  abstract = vision_tokenizer.abstract_params(vqgan.VQGAN(vqgan.vqgan_config(preset, **overrides)))
  flat = traverse_util.flatten_dict(read_pickle(path))
  params, _ = easylm.match_params(flat, abstract, source=path)
  return params


def save_tokenizer_workdir(output: str, params: Any, config: vqgan.VQGANConfig, **fields) -> None:
  """Writes `output` as a tokenizer workdir: checkpoints/0 with `params` and config.json (stage
  'tokenizer', model = `config`, plus `fields`); built under `output.partial` and renamed when complete."""
  if os.path.exists(output):
    raise FileExistsError(f'output {output!r} already exists; choose a new directory')
  staging = output.rstrip('/') + '.partial'
  shutil.rmtree(staging, ignore_errors=True)
  easylm.save_params_checkpoint(staging, params)
  vision_tokenizer.write_config(staging, config, **fields)
  os.replace(staging, output)


def main(argv: list[str]) -> int:
  parser = argparse.ArgumentParser(prog='lapa convert lwm-vqgan', description=__doc__.split('\n\n')[0])
  commands = parser.add_subparsers(dest='command', required=True)
  importer = commands.add_parser('import', help='LWM VQGAN pickle -> lapa_jax checkpoint workdir')
  importer.add_argument('source')
  importer.add_argument('output', help='new workdir to write (its checkpoints/0 holds the params)')
  importer.add_argument('--preset', default='lwm', choices=sorted(vqgan.PRESETS))
  exporter = commands.add_parser('export', help='lapa_jax checkpoint workdir -> LWM VQGAN pickle')
  exporter.add_argument('source', help='workdir with checkpoints/<step>')
  exporter.add_argument('output')
  exporter.add_argument('--step', type=int, default=None)
  args = parser.parse_args(argv)
  try:
    if args.command == 'import':
      save_tokenizer_workdir(args.output, import_vqgan(args.source, args.preset), vqgan.vqgan_config(args.preset),
                             preset=args.preset, converted_from=os.path.abspath(args.source))
    else:
      params = easylm.load_params_checkpoint(args.source, args.step)
      write_pickle(vision_tokenizer.vqgan_params(params), args.output)
  except (FileNotFoundError, FileExistsError, ValueError) as error:
    parser.error(str(error))
  print(f'wrote {args.output}')
  return 0
