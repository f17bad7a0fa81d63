"""Orbax checkpoints of a whole train state plus the host data position.

A checkpoint at step `s` holds two items: `state` (every array needed to continue: step, params,
optimizer state, model state, rng) and `data` (the JSON position of the host data iterator after
`s` batches). Saves are asynchronous: `save` returns once the arrays are copied off the devices, so
the next (donating) step may run while the files are written.

Restoring takes a target of `jax.ShapeDtypeStruct`s that carry shardings
(`sharding.abstract_with_shardings`); each array is read straight into those shardings, so a state
saved on one mesh restores onto any other mesh or process count.

Every process must call `save` and `restore` (orbax coordinates them); the JSON item is written by
process 0, so the caller passes every process's position (see `train.loop`).
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Any

import flax.linen as nn
import jax
import orbax.checkpoint as ocp

from lapa_jax import sharding

STATE, DATA = 'state', 'data'


def directory_in(workdir: str) -> str:
  """Where a run in `workdir` keeps its checkpoints."""
  return os.path.join(workdir, 'checkpoints')


def restore_target(init_fn, mesh: jax.sharding.Mesh, *args) -> Any:
  """Shapes, dtypes and mesh shardings of `init_fn(*args)`'s (unboxed) output, without computing it.

  `init_fn` may return logically boxed leaves, as `sharding.create_sharded` accepts; the result is the
  restore target for `Checkpointer.restore` / `restore_params`.
  """
  with sharding.use_mesh(mesh):
    abstract = jax.eval_shape(init_fn, *args)
    shardings = nn.unbox(sharding.logical_to_shardings(abstract, mesh))
  # Plain `nn.unbox` would add sharding constraints, which abstract values outside jit cannot take.
  shapes = jax.tree.map(lambda x: x.value if isinstance(x, nn.Partitioned) else x, abstract,
                        is_leaf=lambda x: isinstance(x, nn.Partitioned))
  return sharding.abstract_with_shardings(shapes, shardings)


def latest_step(workdir: str) -> int | None:
  """The newest checkpoint step of the run in `workdir` (None without one)."""
  with Checkpointer(directory_in(workdir), read_only=True) as checkpoints:
    return checkpoints.latest_step()


@contextlib.contextmanager
def quiet_orbax():
  """Silences orbax's absl warnings about expected situations (read-only directories, a checkpoint
  item read without its CheckpointManager's metadata file)."""
  absl_logger = logging.getLogger('absl')
  level = absl_logger.level
  absl_logger.setLevel(logging.ERROR)
  try:
    yield
  finally:
    absl_logger.setLevel(level)


class Checkpointer:
  """`<directory>/<step>/{state,data}`: saves every `save_every` steps, keeps the latest `keep`.

  `read_only=True` opens another run's checkpoints (e.g. a trained LAQ for labelling).
  """

  def __init__(self, directory: str, *, save_every: int = 1, keep: int = 1, read_only: bool = False):
    if read_only and not os.path.isdir(directory):
      raise FileNotFoundError(f'checkpoint directory {directory!r} does not exist')
    if save_every < 1 or keep < 1:
      raise ValueError(f'checkpoints: expected checkpoint_every >= 1 and keep_checkpoints >= 1, '
                       f'got {save_every} and {keep}')
    self.directory = os.path.abspath(directory)
    if read_only:
      options = ocp.CheckpointManagerOptions(read_only=True, save_interval_steps=0, max_to_keep=None, create=False)
    else:
      options = ocp.CheckpointManagerOptions(
          save_decision_policy=ocp.checkpoint_managers.FixedIntervalPolicy(save_every),
          max_to_keep=keep, enable_async_checkpointing=True, create=True)
    # orbax warns "Given directory is read only" whenever it is asked to be read-only: noise on every
    # labelling job or finetuning run that reads another run's checkpoints.
    with quiet_orbax() if read_only else contextlib.nullcontext():
      self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=(STATE, DATA))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def should_save(self, step: int) -> bool:
    """Whether `save(step, ...)` would save (step on the interval and newer than the latest)."""
    return self._manager.should_save(step)

  def save(self, step: int, state: Any, data_state: dict, *, force: bool = False) -> bool:
    """Starts an async save when `step` is on the interval (or `force`); returns whether it saved.

    `state` must hold global jax.Arrays only (made inside jit), which is what the train step returns.
    """
    if step in self._manager.all_steps():
      return False
    return self._manager.save(
        step, args=ocp.args.Composite(**{STATE: ocp.args.StandardSave(state), DATA: ocp.args.JsonSave(data_state)}),
        force=force)

  def restore(self, target: Any, step: int | None = None) -> tuple[Any, dict]:
    """(state, data_state) of `step` (default: the latest) read into `target`'s shapes and shardings."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f'no checkpoint in {self.directory}')
    restored = self._manager.restore(
        step, args=ocp.args.Composite(**{STATE: ocp.args.StandardRestore(target), DATA: ocp.args.JsonRestore()}))
    return restored[STATE], restored[DATA]

  def restore_params(self, params_target: Any, step: int | None = None) -> Any:
    """Only `state.params` of `step` (default: the latest), e.g. a trained model for a later stage."""
    return self.restore_subtree({'params': params_target}, step)['params']

  def restore_subtree(self, target: dict, step: int | None = None) -> dict:
    """The parts of the saved state that `target` names (e.g. {'params': ..., 'model_state': ...})."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f'no checkpoint in {self.directory}')
    restored = self._manager.restore(step, args=ocp.args.Composite(**{STATE: ocp.args.PyTreeRestore(
        item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target), partial_restore=True)}))
    return restored[STATE]

  def wait_until_finished(self) -> None:
    """Blocks until every async save is on disk (call before reading it or exiting)."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
