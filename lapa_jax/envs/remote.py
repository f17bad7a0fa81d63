"""Meta-World environments in worker processes, behind the same interface as in-process ones.

MuJoCo's headless GL (Mesa's llvmpipe through EGL or OSMesa) crashes with a segmentation fault in a
process that has loaded TensorFlow (both bring their own LLVM), and the writer and the evaluator
need TensorFlow. So Meta-World runs in spawned worker processes (a fresh interpreter: no TensorFlow,
no JAX) and `RemoteEnv` forwards each call. Several workers reset and step their environments in
parallel: `reset_many` and `step_many` send every call before they wait for any result.

    env = RemoteEnv('drawer-open-v3', image_size=64)      # a MetaWorldEnv in a worker
    obs = env.reset(seed); obs, reward, done, info = env.step(env.expert_action(rng))
    results = step_many([(env_a, action_a), (env_b, action_b)])
"""

from __future__ import annotations

import atexit
import itertools
import multiprocessing
import os
import threading
from typing import Any, Sequence

import numpy as np

_WORKERS: list['_Worker'] = []
_NEXT_ID = itertools.count()


def _serve(connection) -> None:
  """The worker's loop: (command, env id, args) in, (ok, value) out, until the pipe closes."""
  import warnings

  from lapa_jax.envs import metaworld

  warnings.filterwarnings('ignore', module='metaworld')  # the experts warn about their own gains
  envs: dict[int, metaworld.MetaWorldEnv] = {}
  while True:
    try:
      command, key, args = connection.recv()
    except (EOFError, KeyboardInterrupt):
      break
    try:
      if command == 'make':
        envs[key] = metaworld.MetaWorldEnv(**args)
        value = envs[key].task, envs[key].instruction
      elif command == 'close':
        envs.pop(key).close()
        value = None
      elif command == 'expert_action':
        rng = np.random.default_rng()
        rng.bit_generator.state = args['rng_state']
        value = envs[key].expert_action(rng, args['noise']), rng.bit_generator.state
      else:
        value = getattr(envs[key], command)(*args)
      if command in ('reset', 'step'):
        env = envs[key]
        value = value, {'done': env.done, 'success': env.success, 'steps': env.steps, 'distance': env.goal_distance()}
      connection.send((True, value))
    except Exception as error:  # the caller raises it, with the worker's message
      connection.send((False, error))
  for env in envs.values():
    env.close()


class _Worker:
  """One spawned process hosting many environments; replies come back in the order of the calls."""

  def __init__(self):
    context = multiprocessing.get_context('spawn')
    self.connection, child = context.Pipe()
    os.environ.setdefault('MUJOCO_GL', 'egl')  # the child inherits it, before it imports mujoco
    self.process = context.Process(target=_serve, args=(child,), daemon=True, name='lapa-metaworld')
    self.process.start()
    child.close()
    self.lock = threading.Lock()
    self.envs = 0

  def send(self, command: str, key: int, args: Any) -> None:
    self.connection.send((command, key, args))

  def receive(self) -> Any:
    try:
      ok, value = self.connection.recv()
    except EOFError:
      raise RuntimeError(f'the Meta-World worker process died (exit code {self.process.exitcode})') from None
    if not ok:
      raise value
    return value

  def call(self, command: str, key: int, args: Any = ()) -> Any:
    with self.lock:
      self.send(command, key, args)
      return self.receive()

  def stop(self) -> None:
    self.connection.close()
    self.process.join(timeout=10)
    if self.process.is_alive():
      self.process.kill()


def _worker(workers: int) -> _Worker:
  """The least loaded of up to `workers` processes (started when first needed)."""
  if len(_WORKERS) < workers:
    if not _WORKERS:
      atexit.register(shutdown)
    _WORKERS.append(_Worker())
  return min(_WORKERS[:max(workers, 1)], key=lambda w: w.envs)


def shutdown() -> None:
  """Stops every worker process (at exit; tests call it to start afresh)."""
  while _WORKERS:
    _WORKERS.pop().stop()


def default_workers() -> int:
  return max(1, min(4, os.cpu_count() or 1))


class RemoteEnv:
  """A MetaWorldEnv in a worker process. State that callers read often (done, success, steps,
  goal distance) comes back with every reset and step."""

  def __init__(self, task: str, *, workers: int | None = None, **options):
    self._worker = _worker(workers or default_workers())
    self._key = next(_NEXT_ID)
    self.task, self.instruction = self._worker.call('make', self._key, {'task': task, **options})
    self._worker.envs += 1
    self.max_steps = options.get('max_steps')
    self.done, self.success, self.steps, self._distance = False, False, 0, 0.0
    self._closed = False

  def _update(self, value):
    result, state = value
    self.done, self.success, self.steps, self._distance = (state['done'], state['success'], state['steps'],
                                                           state['distance'])
    return result

  def reset(self, seed: int) -> dict[str, np.ndarray]:
    return self._update(self._worker.call('reset', self._key, (seed,)))

  def step(self, action) -> tuple[dict[str, np.ndarray], float, bool, dict]:
    return self._update(self._worker.call('step', self._key, (np.asarray(action, np.float32),)))

  def goal_distance(self) -> float:
    return self._distance

  def render(self) -> np.ndarray:
    return self._worker.call('render', self._key)

  def expert_action(self, rng: np.random.Generator | None = None, noise: float | None = None) -> np.ndarray:
    """As MetaWorldEnv's; the worker draws the noise from (and advances) `rng`."""
    from lapa_jax.envs import metaworld

    noise = metaworld.NOISE if noise is None else noise
    if noise > 0 and rng is None:
      raise ValueError('expert_action: noise > 0 needs an rng (np.random.Generator)')
    state = (rng or np.random.default_rng(0)).bit_generator.state
    action, state = self._worker.call('expert_action', self._key, {'rng_state': state, 'noise': noise})
    if rng is not None:
      rng.bit_generator.state = state
    return action

  def close(self) -> None:
    if not self._closed and self._worker.process.is_alive():
      self._worker.call('close', self._key)
      self._worker.envs -= 1
    self._closed = True


def reset_many(pairs: Sequence[tuple[Any, int]]) -> list[dict[str, np.ndarray]]:
  """env.reset(seed) for every (env, seed), the worker processes resetting theirs in parallel."""
  return _call_many('reset', [(env, (seed,)) for env, seed in pairs])


def step_many(pairs: Sequence[tuple[Any, Any]]) -> list[tuple[dict, float, bool, dict]]:
  """env.step(action) for every (env, action), the worker processes stepping theirs in parallel;
  in-process environments (the built-in world) step in turn."""
  return _call_many('step', [(env, (np.asarray(action, np.float32),) if isinstance(env, RemoteEnv) else (action,))
                             for env, action in pairs])


def _call_many(command: str, calls: Sequence[tuple[Any, tuple]]) -> list[Any]:
  """env.<command>(*args) for every (env, args), each env at most once: every call is sent to the
  worker processes before any reply is awaited; in-process environments run in turn."""
  remote = [(env, args) for env, args in calls if isinstance(env, RemoteEnv)]
  workers = {id(env._worker): env._worker for env, _ in remote}
  for worker in workers.values():
    worker.lock.acquire()
  results, errors = {}, []
  try:
    for env, args in remote:
      env._worker.send(command, env._key, args)
    for env, _ in remote:  # every reply is read, so that no pipe keeps a stale one after an error
      try:
        results[id(env)] = env._update(env._worker.receive())
      except Exception as error:
        errors.append(error)
  finally:
    for worker in workers.values():
      worker.lock.release()
  if errors:
    raise errors[0]
  return [results[id(env)] if isinstance(env, RemoteEnv) else getattr(env, command)(*args) for env, args in calls]
