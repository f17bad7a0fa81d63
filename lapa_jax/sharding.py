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
LOGICAL_RULES: tuple[tuple[str, Any], ...] = (
    ('batch', ('dp', 'fsdp')),
    ('embed', 'fsdp'),
    ('mlp', 'tp'),
    ('heads', 'tp'),
    ('vocab', 'tp'),
    ('length', None),
    ('kv', None),
    ('layers', None),
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


def logical_to_shardings(boxed_tree, mesh: jax.sharding.Mesh, rules=LOGICAL_RULES):
  """NamedShardings for a tree whose leaves may be `nn.LogicallyPartitioned` (from eval_shape).

  Leaf by leaf, so the result has exactly the tree's structure: the optimizer state of a frozen
  param is a box around optax's empty `MaskedNode`, which must stay an empty node (not a sharding)
  for the result to line up with the unboxed tree.
  """
  def sharding_of(leaf):
    if isinstance(leaf, nn.Partitioned) and not jax.tree.leaves(leaf.value):
      return leaf.value
    spec = leaf.get_partition_spec() if isinstance(leaf, nn.Partitioned) else PartitionSpec()
    return nn.logical_to_mesh_sharding(spec, mesh, rules)
  return jax.tree.map(sharding_of, boxed_tree, is_leaf=lambda leaf: isinstance(leaf, nn.Partitioned))


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
