"""The generic train loop. A stage gives init, loss and data; this file does everything else.

    lapa train configs/<stage>.py:<preset> --workdir DIR [--config.a.b=value ...]

Read top to bottom: resolved config -> mesh -> optimizer -> sharded state (fresh or restored with its
data position) -> jitted, donating update step -> loop with logging (one step late, so the host never
waits for the step it just dispatched), evaluation, checkpoints and preemption.

Step numbers count completed updates: the checkpoint and the metrics of step `s` describe the state
after `s` updates and the data iterator after `s` batches.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib
import json
import os
import signal
import sys
import threading
import time
from typing import Any, Callable

import jax
import ml_collections
import numpy as np
import tqdm
from jax.experimental import multihost_utils

from lapa_jax import checkpoint
from lapa_jax import config as config_lib
from lapa_jax import metrics
from lapa_jax import sharding
from lapa_jax.train import optim
# TrainState stays importable as loop.TrainState: the stages and tests name it so.
from lapa_jax.train.step import TrainState, init_train_state, make_train_step

# Fields every stage config has (see CONTRACTS.md); checked before any work starts.
REQUIRED_FIELDS = ('stage', 'seed', 'mesh_dim', 'batch_size', 'total_steps', 'log_every', 'eval_every',
                   'checkpoint_every', 'keep_checkpoints', 'on_nonfinite', 'dtype', 'optim', 'model', 'data')
# A step with a non-finite loss or gradient leaves the state as it was (train/step.py); then the run
# goes on counting such steps ('skip'), or stops without saving, keeping its last checkpoint ('stop').
NONFINITE_POLICIES = ('skip', 'stop')


@dataclasses.dataclass(frozen=True)
class Stage:
  """What a training objective provides; see CONTRACTS.md for the exact signatures.

  init(rng) -> {'params', 'model_state'}; leaves may be nn.LogicallyPartitioned. Pure.
  loss_fn(params, model_state, batch, rng, step) -> (loss, (metrics, new_model_state)). Pure; batch
    holds global arrays sharded on the batch axis; metrics are scalars over the global batch.
  train_data(process_index, process_count) -> iterator of host-local numpy batches with
    get_state() / set_state(); non-numeric fields (e.g. instruction strings) stay on the host.
    Each process reads its own slice, so checkpoints keep every process's position.
  after_update(state) -> (state, extra_metrics); runs inside the jitted step after the update.
  evaluate(state, step, writer) -> scalars; runs on every process under sharding.use_mesh(mesh)
    (`jax.sharding.get_mesh()` gives the mesh) every `eval_every` steps and at the end.
  warm_start(state) -> state; fresh runs only, after the sharded init, under the mesh: values that
    come from elsewhere, e.g. a pretrained trunk (train/warm_start.py) or a frozen tokenizer's
    params in model_state. Returns arrays with the shardings it was given.
  files: {name: JSON value} written into the workdir at the start (e.g. the action bins, which
    consumers of the checkpoint need); a resumed run whose file differs stops with an error.
  """
  init: Callable[[jax.Array], dict]
  loss_fn: Callable[..., tuple]
  train_data: Callable[[int, int], Any]
  after_update: Callable[[TrainState], tuple[TrainState, dict]] | None = None
  evaluate: Callable[[TrainState, int, metrics.MetricWriter], dict] | None = None
  warm_start: Callable[[TrainState], TrainState] | None = None
  files: dict[str, Any] = dataclasses.field(default_factory=dict)


def check_config(config: ml_collections.ConfigDict) -> None:
  """One-line errors for a config the loop cannot run, before any work starts."""
  missing = [name for name in REQUIRED_FIELDS if name not in config]
  if missing:
    raise KeyError(f'config: missing field(s) {", ".join(missing)} '
                   f'(every stage config has {", ".join(REQUIRED_FIELDS)})')
  for name in ('batch_size', 'total_steps', 'log_every', 'checkpoint_every', 'keep_checkpoints'):
    if int(config[name]) < 1:
      raise ValueError(f'config field {name}: expected a positive integer, got {config[name]!r}')
  if config.on_nonfinite not in NONFINITE_POLICIES:
    raise ValueError(f'config field on_nonfinite: expected one of {NONFINITE_POLICIES}, got {config.on_nonfinite!r}')


class _Preemption:
  """Turns SIGTERM into a stop at an agreed step.

  One process: a signal handler sets a flag that the loop checks after every step. Several
  processes: JAX's preemption service (started by jax.distributed.initialize) catches the signal and
  agrees on the step at which every process stops, so all of them save the same step.
  """

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True

  def reached(self, step: int) -> bool:
    if jax.process_count() == 1:
      return self.requested
    try:
      return multihost_utils.reached_preemption_sync_point(step)
    except RuntimeError:  # The preemption service is disabled (jax_enable_preemption_service).
      return False


def say(message: str) -> None:
  if jax.process_index() == 0:
    tqdm.tqdm.write(message, file=sys.stderr)


def _data_positions(data) -> dict:
  """Every process's data position keyed by process index: slices differ in size, so processes
  reach their epoch ends at different steps and one position cannot stand for all."""
  local = data.get_state()
  if jax.process_count() == 1:
    return {'0': local}
  encoded = np.frombuffer(json.dumps(local).encode(), np.uint8)
  lengths = multihost_utils.process_allgather(np.array([encoded.size])).reshape(-1)
  padded = np.zeros(int(lengths.max()), np.uint8)
  padded[:encoded.size] = encoded
  rows = multihost_utils.process_allgather(padded)
  return {str(index): json.loads(bytes(row[:length])) for index, (row, length) in enumerate(zip(rows, lengths))}


def _restore_data_position(data, positions: dict) -> None:
  if len(positions) != jax.process_count():
    say(f'warning: the checkpoint holds data positions of {len(positions)} process(es), this run has '
         f'{jax.process_count()}; the data starts from the beginning (the model state is restored)')
    return
  data.set_state(positions[str(jax.process_index())])


def device_fields(local_batch: dict) -> dict:
  """The numeric fields of a host batch; strings and objects never go to the devices."""
  return {name: value for name, value in local_batch.items() if np.asarray(value).dtype.kind in 'biuf'}


def _next_batch(data, config: ml_collections.ConfigDict, step: int) -> dict:
  """The next host batch's numeric fields, checked against the configured batch size."""
  try:
    local_batch = device_fields(next(data))
  except StopIteration:
    raise ValueError(f'{config.stage} data: the iterator ran out after {step} steps, before '
                     f'total_steps {config.total_steps}') from None
  leading = {np.asarray(value).shape[0] for value in local_batch.values()}
  if leading != {config.batch_size // jax.process_count()}:
    raise ValueError(f'{config.stage} data: host batch has leading sizes {sorted(leading)}, expected '
                     f'batch_size {config.batch_size} / {jax.process_count()} process(es)')
  return local_batch


def write_stage_files(files: dict[str, Any], workdir: str) -> None:
  """Writes Stage.files into `workdir`; a file left by an earlier run must hold the same value (all
  are checked before any is written)."""
  for name, value in files.items():
    path = os.path.join(workdir, name)
    if os.path.exists(path):
      with open(path) as f:
        if json.load(f) != json.loads(json.dumps(value)):
          raise ValueError(f'{path} differs from what this run computed (the data or its settings changed); '
                           'resume with the same data, or start a new workdir')
  for name, value in files.items():
    path = os.path.join(workdir, name)
    if os.path.exists(path):
      continue
    os.makedirs(workdir, exist_ok=True)
    with open(path + '.tmp', 'w') as f:
      json.dump(value, f, indent=1)
    os.replace(path + '.tmp', path)


def check_resumable(config: ml_collections.ConfigDict, workdir: str, target: Any,
                    checkpoints: checkpoint.Checkpointer) -> None:
  """One-line error when `target` (this config's state) cannot take the latest checkpoint's arrays,
  naming the array and the config fields changed since the run started; says what else changed."""
  step = checkpoints.latest_step()
  changed = config_changes(config, workdir)
  try:
    saved = checkpoints.saved_shapes(step)
  except (OSError, ValueError):  # unreadable metadata: the restore falls back to an older step
    saved = None
  problems = checkpoint.shape_mismatches(saved, checkpoint.array_shapes(target)) if saved is not None else []
  if problems:
    problems.sort(key=lambda problem: not problem.startswith('params'))  # the model's own arrays first
    more = f' (and {len(problems) - 1} more)' if len(problems) > 1 else ''
    fields = f'; changed since the run started: {", ".join(changed[:6])}' if changed else ''
    raise ValueError(f'{workdir}: cannot resume step {step} with this config: {problems[0]}{more}{fields}; '
                     'resume with its config.json or start a new --workdir')
  if changed:
    say(f'resuming with a changed config: {", ".join(changed)}')


def config_changes(config: ml_collections.ConfigDict, workdir: str) -> list[str]:
  """Fields of `config` that differ from the `config.json` an earlier run wrote into `workdir`."""
  path = os.path.join(workdir, 'config.json')
  if not os.path.isfile(path):
    return []
  with open(path) as f:
    saved = json.load(f)
  return config_lib.differences(saved, json.loads(json.dumps(config.to_dict(), default=str)))


def train(config: ml_collections.ConfigDict, workdir: str, stage: Stage, *, devices=None) -> TrainState:
  """Trains `stage` to `config.total_steps` in `workdir`, resuming from its latest checkpoint.

  `devices` (default: all) is for tests that compare meshes of different sizes in one process.
  Returns the final state; on SIGTERM returns early after checkpointing the current step.
  """
  check_config(config)
  # Random draws then depend only on the key and the shape, not on how the mesh splits them.
  jax.config.update('jax_threefry_partitionable', True)

  # ----- Mesh, optimizer, checkpoints ----------------------------------------------------------
  mesh = sharding.make_mesh(config.mesh_dim, devices)
  data_parallel = sharding.data_parallel_size(mesh)
  if config.batch_size % data_parallel:
    raise ValueError(f'config field batch_size: {config.batch_size} is not divisible by the {data_parallel} '
                     f'data-parallel devices of mesh_dim {config.mesh_dim!r} (dp x fsdp)')
  optimizer = optim.make_optimizer(config.optim, config.total_steps)
  schedule = optim.make_schedule(config.optim, config.total_steps)
  checkpoints = checkpoint.Checkpointer(checkpoint.directory_in(workdir), save_every=config.checkpoint_every,
                                        keep=config.keep_checkpoints)
  init_state = functools.partial(init_train_state, stage.init, optimizer, config.seed)
  target = None
  if checkpoints.latest_step():
    target = checkpoint.restore_target(init_state, mesh)
    check_resumable(config, workdir, target, checkpoints)

  # Only now, with the config known to fit the checkpoint, is anything written into the workdir.
  if jax.process_index() == 0:
    write_stage_files(stage.files, workdir)
    config_lib.save(config, workdir)
  data = stage.train_data(jax.process_index(), jax.process_count())

  # ----- State: created sharded, or restored onto this mesh ------------------------------------
  start_step = 0
  with sharding.use_mesh(mesh):
    if target is not None:
      state_shardings = jax.tree.map(lambda leaf: leaf.sharding, target)
      state, data_state = checkpoints.restore(target)
      start_step = int(state.step)
      _restore_data_position(data, data_state)
      say(f'resumed from step {start_step} in {checkpoints.directory}')
    else:
      state, state_shardings = sharding.create_sharded(init_state, mesh)
      if stage.warm_start is not None:
        state = stage.warm_start(state)
  param_count = sum(leaf.size for leaf in jax.tree.leaves(state.params))
  say(f'{config.stage}: {param_count:,} params; mesh {dict(mesh.shape)}; {jax.process_count()} process(es)')

  # ----- Update step ---------------------------------------------------------------------------
  train_step = make_train_step(stage.loss_fn, optimizer, schedule, stage.after_update)

  def compile_step(batch: dict):
    batch_shardings = jax.tree.map(lambda x: sharding.batch_sharding(mesh, x.ndim), batch)
    return jax.jit(train_step, in_shardings=(state_shardings, batch_shardings),
                   out_shardings=(state_shardings, sharding.replicated(mesh)), donate_argnums=(0,))

  # ----- Logging, evaluation -------------------------------------------------------------------
  # A run killed after its last checkpoint logged steps that the resumed run logs again.
  writer = metrics.MetricWriter(workdir, drop_after_step=start_step)
  bar = metrics.progress_bar(config.total_steps, initial=start_step)
  clock = {'time': time.perf_counter(), 'step': start_step}
  skipped = {'reported': int(state.skipped_steps)}

  def check_skipped(step: int, count: int) -> None:
    """Reports steps the update step skipped for a non-finite loss or gradient; stops on request."""
    if count == skipped['reported']:
      return
    if config.on_nonfinite == 'stop':
      raise FloatingPointError(
          f'step {step}: a non-finite loss or gradient since step {clock["step"]} (on_nonfinite="stop"); '
          f'the run stops, its last checkpoint is step {checkpoints.latest_step() or "none"}')
    say(f'step {step}: {count - skipped["reported"]} step(s) with a non-finite loss or gradient skipped '
        f'({count} in all; see skipped_steps in metrics.jsonl)')
    skipped['reported'] = count

  def save(step: int, *, force: bool = False) -> None:
    if config.on_nonfinite == 'stop':
      check_skipped(step, int(state.skipped_steps))  # never save a state after a non-finite step
    checkpoints.save(step, state, _data_positions(data), force=force)

  def log(step: int, device_metrics: dict) -> None:
    values = {name: float(value) for name, value in jax.device_get(device_metrics).items()}
    check_skipped(step, int(values['skipped_steps']))
    now = time.perf_counter()
    steps_per_second = (step - clock['step']) / max(now - clock['time'], 1e-9)
    clock.update(time=now, step=step)
    values.update(steps_per_second=steps_per_second, examples_per_second=steps_per_second * config.batch_size)
    writer.write_scalars(step, values)
    bar.set_postfix(loss=f"{values['loss']:.4g}", refresh=False)

  def evaluate(step: int, state: TrainState) -> None:
    if stage.evaluate is None:
      return
    results = stage.evaluate(state, step, writer)
    writer.write_scalars(step, {f'eval/{name}': value for name, value in results.items()})
    say(f'step {step}: eval ' + ', '.join(f'{name}={float(value):.5g}' for name, value in results.items()))

  # ----- Train loop ----------------------------------------------------------------------------
  pending = []  # (step, device metrics) of the last log step: read once the next step is queued.

  def flush() -> None:
    while pending:
      log(*pending.pop())

  step, step_fn, preempted = start_step, None, False
  try:
    with sharding.use_mesh(mesh), _Preemption() as preemption:
      while step < config.total_steps:
        batch = sharding.global_batch(mesh, _next_batch(data, config, step))
        step_fn = step_fn or compile_step(batch)
        state, step_metrics = step_fn(state, batch)
        step += 1
        bar.update()
        flush()
        if step % config.log_every == 0 or step == config.total_steps:
          pending.append((step, step_metrics))
        if checkpoints.should_save(step):
          save(step)
        if preemption.reached(step):
          preempted = True
          break
        if config.eval_every > 0 and step % config.eval_every == 0 and step < config.total_steps:
          flush()
          evaluate(step, state)
      flush()
      if step > start_step:
        save(step, force=True)
        if preempted:
          say(f'SIGTERM: saved step {step} in {checkpoints.directory}; exiting')
        else:
          evaluate(step, state)
  finally:
    bar.close()
    checkpoints.close()
    writer.close()
  return state


def main(argv: list[str]) -> int:
  """`lapa train configs/<stage>.py:<preset> --workdir DIR [--config.a.b=value ...]`."""
  overrides, rest = config_lib.split_overrides(argv)
  parser = argparse.ArgumentParser(
      prog='lapa train', description='Train a stage; resumes when WORKDIR holds a checkpoint.',
      epilog='Any config field can be overridden with --config.<field>=<value>, e.g. --config.optim.lr=3e-4. '
             'Multi-host: LAPA_DISTRIBUTED=1 (set by the launch scripts) calls jax.distributed.initialize().')
  parser.add_argument('config', metavar='CONFIG', help='configs/<stage>.py:<preset>, e.g. configs/toy.py:tiny')
  parser.add_argument('--workdir', required=True, help='directory for the config, metrics and checkpoints')
  args = parser.parse_args(rest)
  try:
    config = config_lib.load(args.config, overrides)
    check_config(config)
  except (FileNotFoundError, AttributeError, KeyError, ValueError) as error:
    parser.error(error.args[0] if isinstance(error, KeyError) else str(error))
  module_name = f'lapa_jax.train.{config.stage}'
  try:
    module = importlib.import_module(module_name)
  except ModuleNotFoundError as error:
    if error.name != module_name:
      raise
    parser.error(f'config field stage: {config.stage!r} has no module {module_name}')
  train(config, args.workdir, module.make_stage(config))
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
