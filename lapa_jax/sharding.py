"""Device mesh, logical-axis rules, sharded state creation and global batches.

Models name every param and activation axis with a logical name (`batch`, `embed`, `mlp`, ...). One
rules table maps those names to the physical mesh axes `('dp', 'fsdp', 'tp')`, so changing the
parallelism strategy is a change of `mesh_dim`, never of model code.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec

MESH_AXES = ('dp', 'fsdp', 'tp')

# Logical axis name -> mesh axes. Flax takes the first rule whose mesh axes are still free in a
# given array, so `embed` on an activation whose `batch` already uses `fsdp` stays replicated.
# Every name a model uses must be here (`logical_to_shardings` refuses others): flax would map an
# unknown name to None, silently replicating what was meant to be split.
LOGICAL_RULES: tuple[tuple[str, Any], ...] = (
    ('batch', ('dp', 'fsdp')),
    ('embed', 'fsdp'),
    ('mlp', 'tp'),
    ('heads', 'tp'),
    ('vocab', 'tp'),
    ('length', None),
    ('kv', None),
    ('layers', None),
    # LAQ: the pixels of a patch (channels x patch^2), the other side of the embed x patch kernels
    # of the patch embedding and the pixel head: split like `mlp`.
    ('patch', 'tp'),
    # NSVQ width (project_in embed x quant, project_out quant x embed): like `mlp`; the output
    # channels of its convolutions (quant x quant_out) like `embed`, so a kernel splits both ways.
    ('quant', 'tp'),
    ('quant_out', 'fsdp'),
    # Codebook rows (a few): gathered by index and replaced by dead-code revival every few steps.
    ('codebook', None),
)


def parse_mesh_dim(mesh_dim: str, device_count: int) -> tuple[int, ...]:
  """'1,-1,1' -> (1, device_count, 1). One entry may be -1 and takes the remaining devices.

  A 4-entry LWM string `dp,fsdp,tp,sp` is accepted when sp == 1 (ring attention is not used).
  """
  try:
    dims = [int(d) for d in mesh_dim.lstrip('!').split(',')]
  except ValueError:
    raise ValueError(f"mesh_dim {mesh_dim!r}: expected comma-separated integers like '1,-1,1' "
                     f'({device_count} devices available)') from None
  if len(dims) == 4:
    if dims[3] != 1:
      raise ValueError(f'mesh_dim {mesh_dim!r}: the sp axis (4th entry) must be 1; lapa_jax shards '
                       f'sequences of a few hundred tokens without ring attention ({device_count} devices available)')
    dims = dims[:3]
  if len(dims) != len(MESH_AXES):
    raise ValueError(f'mesh_dim {mesh_dim!r}: expected {len(MESH_AXES)} entries for axes {MESH_AXES} '
                     f'({device_count} devices available)')
  if dims.count(-1) > 1 or any(d == 0 or d < -1 for d in dims):
    raise ValueError(f'mesh_dim {mesh_dim!r}: entries must be positive, with at most one -1 '
                     f'({device_count} devices available)')
  known = int(np.prod([d for d in dims if d != -1]))
  if -1 in dims:
    if device_count % known:
      raise ValueError(f'mesh_dim {mesh_dim!r}: {device_count} devices are not divisible by {known}')
    dims[dims.index(-1)] = device_count // known
  if int(np.prod(dims)) != device_count:
    raise ValueError(f'mesh_dim {mesh_dim!r} asks for {int(np.prod(dims))} devices, '
                     f'but {device_count} are available')
  return tuple(dims)


def make_mesh(mesh_dim: str = '1,-1,1', devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
  """A mesh over all (or the given) devices with axes `('dp', 'fsdp', 'tp')` in Auto mode.

  Auto axis types are what Linen's logical rules and `with_logical_constraint` are written for;
  `jax.make_mesh` defaults to Explicit since jax 0.7.
  """
  devices = list(devices if devices is not None else jax.devices())
  shape = parse_mesh_dim(mesh_dim, len(devices))
  return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


@contextlib.contextmanager
def use_mesh(mesh: jax.sharding.Mesh, rules=LOGICAL_RULES):
  """Context under which init, steps and evaluation run: the mesh and the logical rules."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    yield


def fit_spec_to_shape(spec: PartitionSpec, shape: Sequence[int], mesh: jax.sharding.Mesh) -> PartitionSpec:
  """`spec` with each dimension that its mesh axes do not divide evenly replicated instead.

  jax cannot place an array whose dimension is not a multiple of its shard count (IndivisibleError),
  and flax's rules do not look at shapes: e.g. the LAQ's GEGLU width int(8/3 x dim) (170 for the
  tiny preset, 2730 for the paper's) under `mlp` -> `tp` = 4. Such a dimension stays whole; the
  array's other dimensions keep their split.
  """
  entries = tuple(spec) + (None,) * (len(shape) - len(spec))
  fitted = []
  for size, axes in zip(shape, entries):
    names = (axes,) if isinstance(axes, str) else tuple(axes or ())
    shards = int(np.prod([mesh.shape[name] for name in names]))
    fitted.append(axes if size % shards == 0 else None)
  return PartitionSpec(*fitted)


def unknown_logical_names(names: Sequence[str | None], rules=LOGICAL_RULES) -> list[str]:
  """The names of `names` (one logical name or None per axis) that `rules` does not map."""
  known = {name for name, _ in rules}
  return [name for name in names if name is not None and name not in known]


def logical_to_shardings(boxed_tree, mesh: jax.sharding.Mesh, rules=LOGICAL_RULES):
  """NamedShardings for a tree whose leaves may be `nn.LogicallyPartitioned` (from eval_shape).

  Leaf by leaf, so the result has exactly the tree's structure: the optimizer state of a frozen
  param is a box around optax's empty `MaskedNode`, which must stay an empty node (not a sharding)
  for the result to line up with the unboxed tree. A dimension its mesh axes do not divide is
  replicated (`fit_spec_to_shape`); a logical name missing from `rules` is an error.
  """
  def sharding_of(path, leaf):
    if isinstance(leaf, nn.Partitioned) and not jax.tree.leaves(leaf.value):
      return leaf.value
    if not isinstance(leaf, nn.Partitioned):
      return NamedSharding(mesh, PartitionSpec())
    unknown = unknown_logical_names(leaf.names, rules)
    if unknown:
      raise ValueError(f'{jax.tree_util.keystr(path)}: logical axis name {unknown[0]!r} is not in the rules '
                       f'table (lapa_jax/sharding.py LOGICAL_RULES); add it with its mesh axes (or None)')
    spec = nn.logical_to_mesh_axes(leaf.names, rules)
    return NamedSharding(mesh, fit_spec_to_shape(spec, leaf.value.shape, mesh))
  return jax.tree_util.tree_map_with_path(sharding_of, boxed_tree,
                                          is_leaf=lambda leaf: isinstance(leaf, nn.Partitioned))


def create_sharded(init_fn: Callable[..., Any], mesh: jax.sharding.Mesh, *args, rules=LOGICAL_RULES):
  """Runs `init_fn(*args)` so that every output leaf is created already sharded.

  `init_fn` may return logically boxed leaves (`nn.with_logical_partitioning`); the result is
  unboxed. Returns `(tree, shardings)`; no device ever holds a full unsharded copy.
  """
  with use_mesh(mesh, rules):
    abstract = jax.eval_shape(init_fn, *args)
    shardings = nn.unbox(logical_to_shardings(abstract, mesh, rules))
    tree = jax.jit(lambda *a: nn.unbox(init_fn(*a)), out_shardings=shardings)(*args)
  return tree, shardings


def abstract_with_shardings(tree, shardings):
  """`jax.ShapeDtypeStruct`s carrying target shardings: the restore target for orbax."""
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings)


def batch_sharding(mesh: jax.sharding.Mesh, ndim: int = 1) -> NamedSharding:
  """Leading axis over the data-parallel axes ('dp', 'fsdp'); the rest replicated."""
  return NamedSharding(mesh, PartitionSpec(('dp', 'fsdp'), *([None] * (ndim - 1))))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def global_batch(mesh: jax.sharding.Mesh, local_batch):
  """Host-local numpy batch (this process's slice) -> global jax.Arrays sharded on the batch axis."""
  def put(x):
    x = np.asarray(x)
    return jax.make_array_from_process_local_data(batch_sharding(mesh, x.ndim), x)
  return jax.tree.map(put, local_batch)


def data_parallel_size(mesh: jax.sharding.Mesh) -> int:
  return mesh.shape['dp'] * mesh.shape['fsdp']
