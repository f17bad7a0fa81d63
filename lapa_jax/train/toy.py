"""A toy regression stage that proves the generic loop: sharding, resume, eval, images.

A two-layer MLP learns y = tanh(x @ teacher) + noise. Its kernels are annotated `('embed', 'mlp')`
and `('mlp', 'embed')`, so the mesh's fsdp and tp axes both shard it. A running mean of the targets
is the model state (like batch-norm statistics): it is part of the prediction, so a resume that lost
it would not continue identically.
"""

from __future__ import annotations

import functools
import time

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from lapa_jax import sharding
from lapa_jax.metrics import image_grid
from lapa_jax.train.loop import Stage

TARGET_MEAN_DECAY = 0.9


class Regressor(nn.Module):
  """(batch, features) -> (batch, features)."""
  features: int
  hidden: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, inputs: jax.Array, target_mean: jax.Array) -> jax.Array:
    inputs = nn.with_logical_constraint(inputs, ('batch', 'embed'))
    hidden = nn.Dense(
        self.hidden, dtype=self.dtype,
        kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), ('embed', 'mlp')),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ('mlp',)))(inputs)
    hidden = nn.with_logical_constraint(nn.gelu(hidden), ('batch', 'mlp'))
    outputs = nn.Dense(
        self.features, dtype=self.dtype,
        kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), ('mlp', 'embed')),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ('embed',)))(hidden)
    return outputs.astype(jnp.float32) + target_mean


class RegressionData:
  """Host batches {'inputs', 'targets'}: (batch_size // process_count, features) float32.

  Batch `n` is drawn from a generator seeded with (seed, held_out, n) and this process takes its
  rows, so the global batch is the same for any process count and `set_state` continues exactly.
  Held-out batches share the teacher but not the draws.
  `delay_seconds` simulates a slow input pipeline (the preemption test needs a run that lasts).
  """

  def __init__(self, *, features: int, batch_size: int, seed: int, noise: float, held_out: bool = False,
               delay_seconds: float = 0.0, process_index: int = 0, process_count: int = 1):
    if batch_size % process_count:
      raise ValueError(f'config field batch_size: {batch_size} is not divisible by {process_count} processes')
    self.features, self.batch_size, self.seed, self.noise = features, batch_size, seed, noise
    self.held_out = held_out
    self.delay_seconds = delay_seconds
    self.local_batch = batch_size // process_count
    self.offset = process_index * self.local_batch
    self.teacher = np.random.default_rng(seed).normal(size=(features, features)).astype(np.float32)
    self.teacher /= np.sqrt(features)
    self.position = 0

  def batch(self, index: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng([self.seed, int(self.held_out), index])
    inputs = rng.normal(size=(self.batch_size, self.features)).astype(np.float32)
    targets = np.tanh(inputs @ self.teacher) + self.noise * rng.normal(size=inputs.shape).astype(np.float32)
    rows = slice(self.offset, self.offset + self.local_batch)
    return {'inputs': inputs[rows], 'targets': targets[rows].astype(np.float32)}

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self.delay_seconds:
      time.sleep(self.delay_seconds)
    batch = self.batch(self.position)
    self.position += 1
    return batch

  def get_state(self) -> dict:
    return {'position': self.position}

  def set_state(self, state: dict) -> None:
    self.position = int(state['position'])


def make_stage(config: ml_collections.ConfigDict) -> Stage:
  model = Regressor(features=config.model.features, hidden=config.model.hidden, dtype=jnp.dtype(config.dtype))
  data_args = dict(features=config.model.features, batch_size=config.batch_size, seed=config.seed,
                   noise=config.data.noise)

  def init(rng):
    target_mean = jnp.zeros((config.model.features,), jnp.float32)
    params = model.init(rng, jnp.zeros((1, config.model.features), jnp.float32), target_mean)['params']
    return {'params': params, 'model_state': {'target_mean': nn.LogicallyPartitioned(target_mean, ('embed',))}}

  def predict(params, model_state, inputs):
    return model.apply({'params': params}, inputs, model_state['target_mean'])

  def loss_fn(params, model_state, batch, rng, step):
    del rng, step  # Deterministic model.
    # The statistics come from the current batch's targets, as batch norm does in training.
    target_mean = TARGET_MEAN_DECAY * model_state['target_mean'] + (1 - TARGET_MEAN_DECAY) * batch['targets'].mean(0)
    target_mean = jax.lax.stop_gradient(target_mean)
    predictions = predict(params, {'target_mean': target_mean}, batch['inputs'])
    loss = jnp.mean(jnp.square(predictions - batch['targets']))
    return loss, ({'mse': loss}, {'target_mean': target_mean})

  held_out = RegressionData(**data_args, held_out=True, process_index=jax.process_index(),
                            process_count=jax.process_count())

  # Replicated outputs: every process can read them.
  @functools.partial(jax.jit, out_shardings=jax.sharding.PartitionSpec())
  def eval_predictions(params, model_state, batch):
    predictions = predict(params, model_state, batch['inputs'])
    return jnp.mean(jnp.square(predictions - batch['targets'])), predictions, batch['targets']

  def evaluate(state, step, writer):
    batch = sharding.global_batch(jax.sharding.get_mesh(), held_out.batch(0))
    mse, predictions, targets = eval_predictions(state.params, state.model_state, batch)
    # Predictions and targets of the first 8 examples as two grey heat maps (example x feature).
    panels = np.stack([np.asarray(predictions)[:8], np.asarray(targets)[:8]])
    heat = einops.repeat((np.clip(panels, -1, 1) + 1) / 2, 'panel example feature -> panel (example 4) (feature 4) 3')
    writer.write_images(step, {'predictions_targets': image_grid(heat, columns=2)})
    return {'mse': float(mse)}

  return Stage(
      init=init,
      loss_fn=loss_fn,
      train_data=lambda process_index, process_count: RegressionData(
          **data_args, delay_seconds=config.data.delay_seconds,
          process_index=process_index, process_count=process_count),
      evaluate=evaluate,
  )
