"""Starting a stage from another run's params: parameter surgery between models that share a trunk.

    params, report = load_matching('runs/lwm_7b', state.params, fresh=('action_head',))

The checkpoint of `workdir` (a lapa_jax training run, or the output of `lapa convert easylm|hf-llama`)
is matched to the new model by parameter path: a tensor present in both with the same shape is read
straight into the new param's sharding (so a 7B trunk never sits whole on one device) and cast to
its dtype; a new param the checkpoint lacks keeps its fresh initialisation (N(0, 0.02) for LAPA's
tables and heads, not the official loader's lecun_normal with one shared key); checkpoint tensors
the new model has no place for are left out. Every change is reported. A shape mismatch is an
error naming the param, since silently re-initialising e.g. a 7B trunk would be a disaster.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax import traverse_util

from lapa_jax import checkpoint


@dataclasses.dataclass(frozen=True)
class Report:
  loaded: tuple[str, ...]        # from the checkpoint
  initialised: tuple[str, ...]   # kept fresh: not in the checkpoint, or listed in `fresh`
  dropped: tuple[str, ...]       # in the checkpoint, with no place in the new model
  source: str
  step: int

  def summary(self) -> str:
    lines = [f'init_from {self.source} (step {self.step}): {len(self.loaded)} tensors loaded']
    if self.initialised:
      lines.append(f'  initialised fresh ({len(self.initialised)}): {", ".join(self.initialised)}')
    if self.dropped:
      lines.append(f'  not used from the checkpoint ({len(self.dropped)}): {", ".join(self.dropped)}')
    return '\n'.join(lines)


def _join(path: tuple) -> str:
  return '/'.join(str(key) for key in path)


def checkpoint_params(workdir: str, step: int | None = None) -> tuple[int, dict[tuple, Any]]:
  """(step, {path: array metadata}) of the params saved in `workdir` (latest step by default)."""
  reader = checkpoint.Checkpointer(checkpoint.directory_in(workdir), read_only=True)
  try:
    step = reader.latest_step() if step is None else step
  finally:
    reader.close()
  if step is None:
    raise FileNotFoundError(f'init_from {workdir}: no checkpoint in {checkpoint.directory_in(workdir)}')
  # orbax reads metadata from absolute paths only
  state_path = os.path.abspath(os.path.join(checkpoint.directory_in(workdir), str(step), checkpoint.STATE))
  with checkpoint.quiet_orbax():
    tree = ocp.StandardCheckpointer().metadata(state_path).item_metadata.tree
  if 'params' not in tree:
    raise ValueError(f'init_from {workdir}: its checkpoint has no params')
  return step, traverse_util.flatten_dict(tree['params'])


def _matches(path: str, prefixes: tuple[str, ...]) -> bool:
  return any(path == prefix or path.startswith(prefix.rstrip('/') + '/') for prefix in prefixes)


def load_matching(workdir: str, params: Any, *, fresh: tuple[str, ...] = (), step: int | None = None) -> tuple[Any, Report]:
  """`params` (global arrays, e.g. a fresh sharded init) with every tensor `workdir` has at the same
  path and shape replaced by the saved one, except those under a `fresh` prefix."""
  step, saved = checkpoint_params(workdir, step)
  current = traverse_util.flatten_dict(params)
  loaded, initialised, mismatched = [], [], []
  for path, value in current.items():
    name = _join(path)
    if path not in saved or _matches(name, fresh):
      initialised.append(name)
    elif tuple(saved[path].shape) != tuple(value.shape):
      mismatched.append(f'{name} {tuple(saved[path].shape)} in the checkpoint, {tuple(value.shape)} here')
    else:
      loaded.append(path)
  if mismatched:
    raise ValueError(f'init_from {workdir}: shapes differ for {len(mismatched)} param(s), e.g. {mismatched[0]}; '
                     'the model config must match the checkpoint (or list the param in init_fresh)')
  if not loaded:
    raise ValueError(f'init_from {workdir}: no param of this model is in the checkpoint (is it a checkpoint '
                     f'of another kind of model? it holds e.g. {_join(next(iter(saved)))})')
  target = traverse_util.unflatten_dict({
      path: jax.ShapeDtypeStruct(current[path].shape, current[path].dtype, sharding=current[path].sharding)
      for path in loaded})
  reader = checkpoint.Checkpointer(checkpoint.directory_in(workdir), read_only=True)
  try:
    restored = traverse_util.flatten_dict(reader.restore_params(target, step))
  finally:
    reader.close()
  merged = traverse_util.unflatten_dict({**current, **restored})
  dropped = sorted(_join(path) for path in saved if path not in current)
  return merged, Report(loaded=tuple(_join(path) for path in loaded), initialised=tuple(initialised),
                        dropped=tuple(dropped), source=os.path.abspath(workdir), step=step)
