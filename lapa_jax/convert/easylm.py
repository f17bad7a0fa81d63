"""EasyLM / LWM / LAPA streaming `params` files <-> lapa_jax checkpoints.

The streaming format (EasyLM `StreamingCheckpointer`, tux's copy in LWM and LAPA) is a msgpack
stream of `(key_tuple, flax.serialization.to_bytes(array))` pairs, one per leaf of
`params['params']`, floats usually stored as bfloat16. LWM-Chat-1M-Jax and LAPA-7B-openx use the
scanned layout (`transformer/h/scan_decoder/...`, layers stacked on axis 0); plain EasyLM files have
one subtree per layer (`transformer/h/0/...`), which is stacked on import.

A lapa_jax checkpoint is a workdir whose `checkpoints/<step>/state` holds `{'params': params}` (what
`lapa_jax.checkpoint.Checkpointer.restore_params` reads). Import checks every tensor against the
target model: unknown, missing and mis-shaped tensors are errors that name them; missing ones may
instead be freshly initialised with `--init-missing` (e.g. the latent-action table and head when
starting from LWM, which the official loader filled with lecun_normal from one fixed key).

  lapa convert easylm import LWM/params OUT --model vla:7b [--init-missing]
  lapa convert easylm export WORKDIR OUT/params [--layout unscanned] [--float-dtype fp32]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
from typing import Any, Callable, Iterable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import msgpack
import numpy as np
from flax import serialization, traverse_util

from lapa_jax import checkpoint
from lapa_jax.models import llama, vla

Key = tuple[str, ...]
SCAN_PREFIX = ('transformer', 'h', 'scan_decoder')
FLOAT_DTYPES = {'bf16': jnp.bfloat16, 'fp16': jnp.float16, 'fp32': jnp.float32}
READ_SIZE = 16 * 2 ** 20


# ------------------------------------------------------------------------------------ stream format

def read_streaming(path: str) -> dict[Key, np.ndarray]:
  """All `(key, array)` pairs of a streaming params file, keys relative to `params['params']`."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f'EasyLM params file {path!r} does not exist')
  flat: dict[Key, np.ndarray] = {}
  with open(path, 'rb') as stream:
    unpacker = msgpack.Unpacker(stream, read_size=READ_SIZE, max_buffer_size=0)
    for index, item in enumerate(unpacker):
      if not (isinstance(item, (list, tuple)) and len(item) == 2 and isinstance(item[0], (list, tuple))):
        raise ValueError(f'{path}: entry {index} is not a (key tuple, tensor bytes) pair; '
                         'expected an EasyLM/LWM streaming params file')
      key = tuple(str(k) for k in item[0])
      # `trainstate_params::` files nest the params under ('params', 'params').
      while key and key[0] == 'params':
        key = key[1:]
      flat[key] = np.asarray(serialization.msgpack_restore(item[1]))
  if not flat:
    raise ValueError(f'{path}: no tensors found; expected an EasyLM/LWM streaming params file')
  return flat


def write_streaming(flat: Mapping[Key, Any], path: str, float_dtype: str = 'bf16') -> None:
  """Writes `(key, array)` pairs in the streaming format; floats cast to `float_dtype` (EasyLM's
  default bf16). Written to `path.tmp` and renamed when complete."""
  if float_dtype not in FLOAT_DTYPES:
    raise ValueError(f'float_dtype {float_dtype!r}: expected one of {sorted(FLOAT_DTYPES)}')
  temporary = path + '.tmp'
  packer = msgpack.Packer()
  with open(temporary, 'wb') as stream:
    for key, value in flat.items():
      value = np.asarray(value)
      if jnp.issubdtype(value.dtype, jnp.floating):
        value = value.astype(FLOAT_DTYPES[float_dtype])
      stream.write(packer.pack((list(key), serialization.to_bytes(value))))
  os.replace(temporary, path)


# ---------------------------------------------------------------------------------- layer layouts

def scan_layers(flat: Mapping[Key, np.ndarray]) -> dict[Key, np.ndarray]:
  """`transformer/h/<i>/...` per-layer tensors -> `transformer/h/scan_decoder/...` stacked on axis 0."""
  per_layer: dict[Key, dict[int, np.ndarray]] = {}
  out: dict[Key, np.ndarray] = {}
  for key, value in flat.items():
    if key[:2] == ('transformer', 'h') and len(key) > 2 and key[2].isdigit():
      per_layer.setdefault(SCAN_PREFIX + key[3:], {})[int(key[2])] = value
    else:
      out[key] = value
  for key, layers in per_layer.items():
    if sorted(layers) != list(range(len(layers))):
      raise ValueError(f"{'/'.join(key)}: layers {sorted(layers)} are not 0..{len(layers) - 1}")
    out[key] = np.stack([layers[i] for i in range(len(layers))])
  return out


def unscan_layers(flat: Mapping[Key, np.ndarray]) -> dict[Key, np.ndarray]:
  """The inverse of `scan_layers`: EasyLM's unscanned `transformer/h/<i>/...` layout."""
  out: dict[Key, np.ndarray] = {}
  for key, value in flat.items():
    if key[:3] == SCAN_PREFIX:
      for layer in range(value.shape[0]):
        out[('transformer', 'h', str(layer)) + key[3:]] = value[layer]
    else:
      out[key] = value
  return out


# ------------------------------------------------------------------------------ matching a model

def model_from_spec(spec: str) -> tuple[nn.Module, Callable[[jax.Array], Any]]:
  """`vla:<preset>[,field=value...]` or `llama:<preset>[,field=value...]` -> (module, boxed init fn).

  Fields: `vision_vocab_size`, `latent_vocab_size`, `action_vocab_size` (VLA) and any LLaMAConfig
  field, e.g. `vla:7b,action_vocab_size=256`.
  """
  match = re.fullmatch(r'(vla|llama):(\w+)((?:,\w+=[^,]+)*)', spec)
  if not match:
    raise ValueError(f"model spec {spec!r}: expected 'vla:<preset>[,field=value...]' or 'llama:<preset>[,...]'")
  kind, preset, rest = match.groups()
  fields = dict(item.split('=', 1) for item in rest.split(',')[1:])
  vla_fields = {k: int(fields.pop(k)) for k in list(fields) if k.endswith('_vocab_size') and kind == 'vla'}
  llama_fields = {}
  for name, text in fields.items():
    if name not in llama.LLaMAConfig.__dataclass_fields__ or name == 'scan_layers':
      # lapa_jax checkpoints always hold the scanned layout (llama.unscan_params converts at run time).
      raise ValueError(f'model spec {spec!r}: unknown field {name!r}')
    default = llama.LLaMAConfig.__dataclass_fields__[name].default
    llama_fields[name] = type(default)(text) if default is not None else text
  tokens = jnp.zeros((1, 8), jnp.int32)
  if kind == 'vla':
    model = vla.VLA(vla.vla_config(preset, llama_overrides=llama_fields, **vla_fields))
    return model, lambda rng: vla.init_params(model, rng)
  model = llama.LLaMAForCausalLM(llama.llama_config(preset, **llama_fields))
  return model, lambda rng: model.init(rng, tokens)['params']


def match_params(flat: Mapping[Key, np.ndarray], abstract: Any, *, source: str,
                 fill_missing: Callable[[], Any] | None = None, dtype: Any = None) -> tuple[Any, list[str]]:
  """Arranges `flat` tensors as the tree of `abstract` (shapes, e.g. from `jax.eval_shape`).

  Unknown or mis-shaped tensors are errors naming them; so are missing ones, unless `fill_missing`
  gives a full params tree to take them from. Values keep their stored dtype unless `dtype` is
  given. Returns (params, names of the filled-in tensors).
  """
  expected = {k: v for k, v in traverse_util.flatten_dict(nn.unbox(abstract)).items()}
  unknown = sorted('/'.join(k) for k in flat if k not in expected)
  missing = sorted('/'.join(k) for k in expected if k not in flat)
  misshaped = sorted(f"{'/'.join(k)} {tuple(flat[k].shape)} (expected {tuple(v.shape)})"
                     for k, v in expected.items() if k in flat and tuple(flat[k].shape) != tuple(v.shape))
  problems = []
  if unknown:
    problems.append(f'unknown tensors: {", ".join(unknown)}')
  if misshaped:
    problems.append(f'mis-shaped tensors: {", ".join(misshaped)}')
  if missing and fill_missing is None:
    problems.append(f'missing tensors: {", ".join(missing)} (pass --init-missing to initialise them)')
  if problems:
    raise ValueError(f'{source}: ' + '; '.join(problems))
  filled = traverse_util.flatten_dict(nn.unbox(fill_missing())) if missing else {}
  out = {}
  for key in expected:
    value = flat[key] if key in flat else np.asarray(filled[key])
    out[key] = np.asarray(value, jnp.dtype(dtype)) if dtype is not None else np.asarray(value)
  return traverse_util.unflatten_dict(out), missing


# ------------------------------------------------------------------------- lapa_jax checkpoints

def save_params_checkpoint(workdir: str, params: Any) -> None:
  """Writes `{'params': params}` as step 0 of `workdir/checkpoints`; built in `workdir.tmp`, then renamed."""
  if os.path.exists(workdir):
    raise FileExistsError(f'output {workdir!r} already exists; choose a new directory')
  temporary = workdir.rstrip('/') + '.tmp'
  shutil.rmtree(temporary, ignore_errors=True)
  state = {'params': jax.tree.map(jnp.asarray, params)}
  with checkpoint.Checkpointer(checkpoint.directory_in(temporary)) as writer:
    writer.save(0, state, {}, force=True)
  os.replace(temporary, workdir)


def load_params_checkpoint(workdir: str, step: int | None = None) -> Any:
  """`state.params` of a lapa_jax checkpoint (the latest step by default), as stored, on one device."""
  reader = checkpoint.Checkpointer(checkpoint.directory_in(workdir), read_only=True)
  step = reader.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f'no checkpoint in {checkpoint.directory_in(workdir)}')
  state_path = os.path.join(checkpoint.directory_in(workdir), str(step), 'state')
  import orbax.checkpoint as ocp  # Only for the metadata: the shapes to restore into.
  tree = ocp.StandardCheckpointer().metadata(state_path).item_metadata.tree
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), tree['params'])
  params = reader.restore_params(target, step)
  reader.close()
  return params


def flatten(params: Any) -> dict[Key, np.ndarray]:
  return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(nn.unbox(params)).items()}


# -------------------------------------------------------------------------------------- commands

def import_easylm(path: str, model_spec: str, *, init_missing: bool = False, seed: int = 0,
                  dtype: Any = None) -> tuple[Any, list[str]]:
  """Params of a streaming file (scanned or unscanned layout) arranged for the model of `model_spec`."""
  _, init_fn = model_from_spec(model_spec)
  rng = jax.random.key(seed)
  flat = scan_layers(read_streaming(path))
  fill = (lambda: jax.jit(init_fn)(rng)) if init_missing else None
  return match_params(flat, jax.eval_shape(init_fn, rng), source=path, fill_missing=fill, dtype=dtype)


def export_easylm(params: Any, path: str, *, layout: str = 'scanned', float_dtype: str = 'bf16') -> None:
  """lapa_jax params -> a streaming file LWM/LAPA code loads with `params::<path>`."""
  if layout not in ('scanned', 'unscanned'):
    raise ValueError(f"layout {layout!r}: expected 'scanned' or 'unscanned'")
  flat = flatten(params)
  write_streaming(unscan_layers(flat) if layout == 'unscanned' else flat, path, float_dtype)


def print_names(title: str, names: Iterable[str]) -> None:
  names = list(names)
  if names:
    print(f'{title} ({len(names)}): ' + ', '.join(names))


def main(argv: list[str]) -> int:
  parser = argparse.ArgumentParser(prog='lapa convert easylm', description=__doc__.split('\n\n')[0])
  commands = parser.add_subparsers(dest='command', required=True)
  importer = commands.add_parser('import', help='streaming params file -> lapa_jax checkpoint workdir')
  importer.add_argument('source', help='EasyLM/LWM/LAPA streaming params file')
  importer.add_argument('output', help='new workdir to write (its checkpoints/0 holds the params)')
  importer.add_argument('--model', required=True, help="target model, e.g. 'vla:7b' or 'vla:7b,action_vocab_size=256'")
  importer.add_argument('--init-missing', action='store_true', help='initialise tensors the file lacks')
  importer.add_argument('--seed', type=int, default=0, help='seed of --init-missing')
  importer.add_argument('--dtype', choices=['keep', 'float32', 'bfloat16'], default='keep',
                        help='stored dtype (keep: as in the file; restores cast to the model dtype)')
  exporter = commands.add_parser('export', help='lapa_jax checkpoint workdir -> streaming params file')
  exporter.add_argument('source', help='workdir with checkpoints/<step>')
  exporter.add_argument('output', help='streaming params file to write')
  exporter.add_argument('--step', type=int, default=None)
  exporter.add_argument('--layout', choices=['scanned', 'unscanned'], default='scanned')
  exporter.add_argument('--float-dtype', choices=sorted(FLOAT_DTYPES), default='bf16')
  args = parser.parse_args(argv)
  try:
    if args.command == 'import':
      params, filled = import_easylm(args.source, args.model, init_missing=args.init_missing, seed=args.seed,
                                     dtype=None if args.dtype == 'keep' else args.dtype)
      print_names('initialised (not in the file)', filled)
      save_params_checkpoint(args.output, params)
    else:
      export_easylm(load_params_checkpoint(args.source, args.step), args.output, layout=args.layout,
                    float_dtype=args.float_dtype)
  except (FileNotFoundError, FileExistsError, ValueError) as error:
    parser.error(str(error))
  print(f'wrote {args.output}')
  return 0
