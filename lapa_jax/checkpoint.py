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

Orbax writes a step into a temporary directory and renames it when complete, so a failed save (a full
disk) leaves the previous steps as they were. A step that is complete but unreadable (a file truncated
by hand or by a broken copy) is skipped with a warning when the latest step is asked for, and a
training run moves it aside into `checkpoints_unreadable/` so that the step can be saved again.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import sys
import traceback
from typing import Any, Callable

import flax.linen as nn
import jax
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

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


def short_reason(error: BaseException) -> str:
  """The first line of the innermost cause of a (TensorStore) error: what is wrong, without its spec."""
  while error.__cause__ is not None:
    error = error.__cause__
  lines = [line.strip() for line in str(error).splitlines() if line.strip()]
  if not lines:
    return type(error).__name__
  # TensorStore appends the (long) spec of the store after the reason ("... File too large"), and
  # sometimes the OS's error code after the spec.
  reason = lines[0].split(' [tensorstore_spec')[0]
  code = re.search(r"\[os_error_code='?\d+'?\]", lines[0])
  if code and code.group(0) not in reason:
    reason += ' ' + code.group(0)
  return reason if len(reason) <= 300 else f'{reason[:120]} ... {reason[-160:]}'


def array_shapes(tree: Any) -> dict[str, tuple]:
  """'params/Dense_0/kernel' -> (shape, dtype) of every array leaf of a (restore target or metadata) tree."""
  def name(path) -> str:
    return '/'.join(str(getattr(key, 'key', getattr(key, 'name', getattr(key, 'idx', key)))) for key in path)
  return {name(path): (tuple(leaf.shape), str(leaf.dtype))
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree) if hasattr(leaf, 'shape')}


def shape_mismatches(saved: dict[str, tuple], expected: dict[str, tuple]) -> list[str]:
  """What differs between two `array_shapes` results, one short phrase per array."""
  problems = []
  for name in sorted(set(saved) | set(expected)):
    if name not in saved:
      problems.append(f'{name} is not in the checkpoint')
    elif name not in expected:
      problems.append(f'{name} is in the checkpoint but not in this model')
    elif saved[name][0] != expected[name][0]:
      problems.append(f'{name} is {saved[name][0]} in the checkpoint, {expected[name][0]} now')
  return problems


class CheckpointWriteError(OSError):
  """A checkpoint could not be written (e.g. a full disk); the earlier steps are intact."""


class _DropOrbaxErrors(logging.Filter):
  """Orbax logs a failed save or read with tracebacks from several threads (and asyncio logs its
  unretrieved tasks when they are collected); the Checkpointer reports the failure once, in one
  line. LAPA_DEBUG=1 (`lapa --debug`) keeps the tracebacks."""

  def filter(self, record: logging.LogRecord) -> bool:
    if record.levelno < logging.ERROR or os.environ.get('LAPA_DEBUG') == '1':
      return True
    trace = ''.join(traceback.format_tb(record.exc_info[2])) if record.exc_info else ''
    return not any('/orbax/' in text for text in (record.pathname, record.getMessage(), trace))


for _name in ('absl', 'asyncio'):
  logging.getLogger(_name).addFilter(_DropOrbaxErrors())


def _drop_late_read_callbacks(previous_hook):
  """When one array of a step fails to read, orbax's event loop closes while TensorStore still reads
  the others; each of those reads then reports 'Event loop is closed' from a TensorStore thread
  (a traceback per array), although nothing waits for it any more. The read error itself is
  reported once, by `Checkpointer._read`."""
  def hook(unraisable) -> None:
    frames = traceback.extract_tb(unraisable.exc_traceback)
    late = (unraisable.exc_type is RuntimeError and str(unraisable.exc_value) == 'Event loop is closed'
            and bool(frames) and frames[0].name == 'call_soon_threadsafe')
    if not late or os.environ.get('LAPA_DEBUG') == '1':
      previous_hook(unraisable)
  return hook


sys.unraisablehook = _drop_late_read_callbacks(sys.unraisablehook)


def _warn(message: str) -> None:
  if jax.process_index() == 0:
    print(message, file=sys.stderr, flush=True)


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
    self._read_only = read_only
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
    self._saving = None  # the step of the last save started

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def saved_shapes(self, step: int) -> dict[str, tuple]:
    """`array_shapes` of the state saved at `step`, from its metadata (no array is read)."""
    path = epath.Path(self.directory) / str(step) / STATE
    with quiet_orbax():
      return array_shapes(ocp.StandardCheckpointHandler().metadata(path))

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
    with self._reporting_write_errors():  # also an earlier async save's error, which surfaces here
      saved = self._manager.save(
          step, args=ocp.args.Composite(**{STATE: ocp.args.StandardSave(state), DATA: ocp.args.JsonSave(data_state)}),
          force=force)
    if saved:
      self._saving = step
    return saved

  @contextlib.contextmanager
  def _reporting_write_errors(self):
    try:
      yield
    except Exception as error:  # noqa: BLE001 (orbax raises whatever TensorStore or the OS raised)
      if isinstance(error, CheckpointWriteError) or self._saving is None:
        raise
      failed, self._saving = self._saving, None
      self._manager.reload()  # the steps on disk, not the manager's cached list
      intact = [step for step in self._manager.all_steps() if step < failed]
      previous = f'step {max(intact)} is intact' if intact else 'no earlier checkpoint exists'
      raise CheckpointWriteError(f'checkpoint step {failed} could not be written in {self.directory} '
                                 f'({short_reason(error)}); {previous}') from error

  def restore(self, target: Any, step: int | None = None) -> tuple[Any, dict]:
    """(state, data_state) of `step` (default: the latest readable) read into `target`'s shapes and shardings."""
    restored = self._read(step, lambda step: self._manager.restore(
        step, args=ocp.args.Composite(**{STATE: ocp.args.StandardRestore(target), DATA: ocp.args.JsonRestore()})))
    return restored[STATE], restored[DATA]

  def restore_params(self, params_target: Any, step: int | None = None) -> Any:
    """Only `state.params` of `step` (default: the latest), e.g. a trained model for a later stage."""
    return self.restore_subtree({'params': params_target}, step)['params']

  def restore_subtree(self, target: dict, step: int | None = None) -> dict:
    """The parts of the saved state that `target` names (e.g. {'params': ..., 'model_state': ...})."""
    restored = self._read(step, lambda step: self._manager.restore(step, args=ocp.args.Composite(**{
        STATE: ocp.args.PyTreeRestore(item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                                      partial_restore=True)})))
    return restored[STATE]

  def _read(self, step: int | None, read: Callable[[int], Any]) -> Any:
    """`read(step)`; without a step, of the latest step that reads, warning about each newer one that
    does not (and, when writing, moving it aside so the run can save that step again)."""
    if step is not None:
      with quiet_orbax():
        try:
          return read(step)
        except Exception as error:  # orbax wraps TensorStore's read errors in a plain Exception
          raise ValueError(f'checkpoint {self.directory}/{step} is unreadable: {short_reason(error)}') from None
    steps = sorted(self.all_steps(), reverse=True)
    if not steps:
      raise FileNotFoundError(f'no checkpoint in {self.directory}')
    unreadable = []
    for candidate in steps:
      try:
        with quiet_orbax():
          restored = read(candidate)
      except Exception as error:  # shapes were checked before (check_resumable): a read error
        unreadable.append(candidate)
        _warn(f'warning: checkpoint {self.directory}/{candidate} is unreadable ({short_reason(error)}); '
              + ('trying the previous step' if candidate != steps[-1] else 'no older step is left'))
        continue
      if unreadable and not self._read_only:
        self._set_aside(unreadable)
      return restored
    raise ValueError(f'no readable checkpoint in {self.directory} (steps {", ".join(map(str, steps))} are unreadable)')

  def _set_aside(self, steps: list[int]) -> None:
    aside = os.path.join(os.path.dirname(self.directory), os.path.basename(self.directory) + '_unreadable')
    if jax.process_index() == 0:
      os.makedirs(aside, exist_ok=True)
      for step in steps:
        shutil.move(os.path.join(self.directory, str(step)), os.path.join(aside, str(step)))
      _warn(f'warning: moved unreadable step(s) {", ".join(map(str, steps))} to {aside}')
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices('checkpoint-set-aside')
    self._manager.reload()

  def wait_until_finished(self) -> None:
    """Blocks until every async save is on disk (call before reading it or exiting)."""
    with self._reporting_write_errors():
      self._manager.wait_until_finished()

  def close(self) -> None:
    try:
      self.wait_until_finished()
    finally:
      self._manager.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
