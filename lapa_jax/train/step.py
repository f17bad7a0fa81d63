"""The train state and the one update step, shared by the train loop, the benchmarks and the tests.

    optimizer = optim.make_optimizer(config.optim, config.total_steps)
    state = init_train_state(stage.init, optimizer, config.seed)
    step = jax.jit(make_train_step(stage.loss_fn, optimizer, schedule, stage.after_update), donate_argnums=(0,))
    state, metrics = step(state, batch)  # metrics: 'loss', 'learning_rate', 'grad_norm', 'param_norm', ...

A step whose loss or gradient norm is not finite changes nothing but `step` and `skipped_steps`: one
bad batch or overflow would otherwise poison the params and Adam moments for the rest of the run.

`loss_fn` and `after_update` follow the stage contract (`loop.Stage`, CONTRACTS.md). Both functions
are pure, so they trace under `jax.jit`, `jax.eval_shape` and `sharding.create_sharded` alike.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax


@flax.struct.dataclass
class TrainState:
  step: jax.Array         # () int32: completed updates
  params: Any
  opt_state: Any          # optax state of the optimizer the step is made with
  model_state: Any        # non-trained state, e.g. codebook usage ({} if none)
  rng: jax.Array          # (2,) uint32 base key; step `s` uses fold_in(rng, s)
  # () int32: steps whose loss or gradients were not finite, so they left the state as it was.
  skipped_steps: jax.Array = dataclasses.field(default_factory=lambda: jnp.zeros((), jnp.int32))


def init_train_state(init_fn: Callable[[jax.Array], dict], optimizer: optax.GradientTransformation,
                     seed: int) -> TrainState:
  """The state before the first update: `init_fn(rng) -> {'params', 'model_state'}` plus optimizer state.

  PRNGKey(seed) splits into the init key and the base key of the steps; checkpoints depend on this
  derivation, so a run resumes with the same per-step keys. Leaves stay as `init_fn` returns them
  (e.g. nn.LogicallyPartitioned): optax maps over the boxed params, so the moments inherit their axes.
  """
  init_rng, train_rng = jax.random.split(jax.random.PRNGKey(seed))
  variables = init_fn(init_rng)
  return TrainState(step=jnp.zeros((), jnp.int32), params=variables['params'],
                    opt_state=optimizer.init(variables['params']), model_state=variables['model_state'],
                    rng=train_rng, skipped_steps=jnp.zeros((), jnp.int32))


def make_train_step(loss_fn: Callable[..., tuple], optimizer: optax.GradientTransformation,
                    schedule: optax.Schedule | None = None,
                    after_update: Callable[[TrainState], tuple[TrainState, dict]] | None = None) -> Callable:
  """`step(state, batch) -> (state, metrics)`: one update, pure, for `jax.jit`.

  `loss_fn(params, model_state, batch, rng, step) -> (loss, (metrics, new_model_state))` gets the key
  `fold_in(state.rng, state.step)`. Metrics are scalars: 'loss', 'learning_rate' (when `schedule` is
  given), 'grad_norm', 'param_norm' (after the update), 'skipped_steps' (so far, this one included),
  then the loss's own metrics and those of `after_update(state) -> (state, extra_metrics)`, which
  runs after the update.
  """

  def step(state: TrainState, batch: Any) -> tuple[TrainState, dict]:
    rng = jax.random.fold_in(state.rng, state.step)

    def loss_of(params):
      return loss_fn(params, state.model_state, batch, rng, state.step)

    (loss, (loss_metrics, model_state)), grads = jax.value_and_grad(loss_of, has_aux=True)(state.params)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {'loss': loss}
    if schedule is not None:
      metrics['learning_rate'] = schedule(state.step)
    metrics.update({'grad_norm': optax.tree.norm(grads), 'param_norm': optax.tree.norm(params)})
    metrics.update(loss_metrics)  # may replace the names above, e.g. a loss that reports its own 'loss'
    finite = jnp.isfinite(loss) & jnp.isfinite(metrics['grad_norm'])
    previous = state.replace(step=state.step + 1, skipped_steps=state.skipped_steps + 1)
    state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, model_state=model_state)
    if after_update is not None:
      state, extra_metrics = after_update(state)
      metrics.update(extra_metrics)
    state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), state, previous)
    metrics['skipped_steps'] = state.skipped_steps
    return state, metrics

  return step
