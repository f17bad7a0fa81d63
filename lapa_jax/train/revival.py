"""Dead-code revival for any vector-quantized codebook in a train state (the LAQ's, the VQGAN's).

    model_state = revival.initial_state(codebook_size, code_dim, pool_size)   # in Stage.init
    new_state = dict(model_state, code_usage=model_state['code_usage'] + counts,
                     latent_pool=revival.pool_latents(latents, pool_size))  # in Stage.loss_fn
    after_update = functools.partial(revival.revive_dead_codes, revival=config.revival,
                                     codebook_path=('quantize', 'embeddings'))

A code whose share of the assignments since the last revival is below `revival.threshold` x the
uniform share (1 / codebook_size) is replaced on scheduled steps, its Adam moments are reset and
the usage window restarts. Replacements are latents of the latest batch ('latents') or noisy copies
of used codes ('codes', the official LAQ's way).

The `revival` config group: schedule ('official', 'periodic', 'official+periodic', 'none'), every,
threshold, source ('latents' or 'codes'), pool (latents kept for replacements), noise (of 'codes'),
reset_moments. Everything runs inside the jitted step from replicated values (the global usage
counts and latents, the codebook, the state rng), so every device and host makes the same change.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import optax

from lapa_jax.train.step import TrainState

# The official LAQ schedule (reference §1.5): every 10 steps below 100, every 100 below 1000, every
# 500 below 5000; 26 events, the last at step 4500.
OFFICIAL_REVIVAL_PHASES = ((10, 100), (100, 1000), (500, 5000))
OFFICIAL_LAST_REVIVAL = 4500
REVIVAL_SCHEDULES = ('official', 'periodic', 'official+periodic', 'none')
REVIVAL_SOURCES = ('latents', 'codes')
# Folded into the step key so that revival draws differ from the loss's draws of the same step.
REVIVAL_KEY = 0x5EED


def check_config(revival: ml_collections.ConfigDict, codebook_size: int, pool_size: int) -> None:
  """One-line errors for a `revival` group that cannot work, before any long work starts."""
  revival_due(jnp.zeros((), jnp.int32), revival)  # validates the schedule
  if revival.source not in REVIVAL_SOURCES:
    raise ValueError(f'config field revival.source: expected one of {REVIVAL_SOURCES}, got {revival.source!r}')
  if revival.schedule != 'none' and revival.source == 'latents' and pool_size < codebook_size:
    raise ValueError(f'config field revival.pool: keep at least codebook_size={codebook_size} latents '
                     f'(the batch gives {pool_size})')


def initial_state(codebook_size: int, code_dim: int, pool_size: int) -> dict:
  """code_usage: assignments per code since the last revival; codes_revived_total: a running count;
  latent_pool: (pool_size, code_dim) latents of the latest batch, to revive codes from."""
  return {'code_usage': jnp.zeros((codebook_size,), jnp.float32), 'codes_revived_total': jnp.zeros((), jnp.int32),
          'latent_pool': jnp.zeros((pool_size, code_dim), jnp.float32)}


def revival_due(step: jax.Array, revival: ml_collections.ConfigDict) -> jax.Array:
  """Whether a revival happens after `step` completed updates (a traced bool)."""
  if revival.schedule not in REVIVAL_SCHEDULES:
    raise ValueError(f'config field revival.schedule: expected one of {REVIVAL_SCHEDULES}, got {revival.schedule!r}')
  if 'periodic' in revival.schedule and revival.every < 1:
    raise ValueError(f'config field revival.every: schedule {revival.schedule!r} needs every >= 1, got {revival.every}')
  due = jnp.zeros((), bool)
  if revival.schedule in ('official', 'official+periodic'):
    for every, below in OFFICIAL_REVIVAL_PHASES:
      due |= (step % every == 0) & (step < below)
  if revival.schedule == 'periodic':
    due |= step % revival.every == 0
  if revival.schedule == 'official+periodic':
    due |= (step > OFFICIAL_LAST_REVIVAL) & ((step - OFFICIAL_LAST_REVIVAL) % revival.every == 0)
  return due & (step > 0)


def dead_codes(code_usage: jax.Array, threshold: float) -> jax.Array:
  """(codebook_size,) bool: codes with fewer than `threshold` x the uniform share of assignments."""
  uniform_share = jnp.sum(code_usage) / code_usage.shape[0]
  return code_usage < threshold * uniform_share


def latent_replacements(latent_pool: jax.Array, codebook_size: int, rng: jax.Array) -> jax.Array:
  """For every code, a different latent of the latest batch: (codebook_size, code_dim).

  A code placed on a real latent is the nearest code of at least that latent, so it is used again.
  """
  rows = jax.random.permutation(rng, latent_pool.shape[0])[:codebook_size]
  return latent_pool[rows]


def copy_replacements(codebook: jax.Array, code_usage: jax.Array, rng: jax.Array, noise: float) -> jax.Array:
  """For every code, a copy of a live code drawn in proportion to its use (busy codes are split),
  plus Gaussian noise of `noise` x that code's RMS: (codebook_size, code_dim). The official way
  (with 1e-12 noise, which float32 rounds away)."""
  source_rng, noise_rng = jax.random.split(rng)
  logits = jnp.where(code_usage > 0, jnp.log(jnp.maximum(code_usage, 1e-30)), -jnp.inf)
  sources = jax.random.categorical(source_rng, logits, shape=(codebook.shape[0],))
  copies = codebook[sources]
  scale = noise * jnp.sqrt(jnp.mean(jnp.square(copies), axis=-1, keepdims=True))
  return copies + scale * jax.random.normal(noise_rng, copies.shape, copies.dtype)


def pool_latents(latents: jax.Array, pool_size: int) -> jax.Array:
  """(count, code_dim) latents of a batch -> (pool_size, code_dim), evenly strided so the pool
  spans the whole batch rather than its first examples; gradients stopped."""
  latents = jax.lax.stop_gradient(latents)
  stride = max(1, latents.shape[0] // pool_size)
  return latents[::stride][:pool_size].astype(jnp.float32)


def get_path(tree: Any, path: Sequence[str]) -> Any:
  for key in path:
    tree = tree[key]
  return tree


def set_path(tree: Any, path: Sequence[str], value: Any) -> Any:
  """A copy of the nested dict `tree` with the leaf at `path` replaced (the rest shared)."""
  if not path:
    return value
  return {**tree, path[0]: set_path(tree[path[0]], path[1:], value)}


def reset_moment_rows(opt_state: Any, rows: jax.Array, codebook_path: Sequence[str]) -> Any:
  """Zeroes the Adam first and second moments of the codebook rows where `rows` (codebook_size,) is True."""
  def reset(moments):
    row_moments = get_path(moments, codebook_path)
    return set_path(moments, codebook_path, jnp.where(rows[:, None], 0.0, row_moments))
  mu = optax.tree_utils.tree_get(opt_state, 'mu')
  nu = optax.tree_utils.tree_get(opt_state, 'nu')
  return optax.tree_utils.tree_set(opt_state, mu=reset(mu), nu=reset(nu))


def revive_dead_codes(state: TrainState, revival: ml_collections.ConfigDict,
                      codebook_path: Sequence[str]) -> tuple[TrainState, dict]:
  """Stage.after_update: on scheduled steps, replace the dead codes of the codebook at
  `codebook_path` in `state.params` (see the module docstring); model_state as `initial_state`."""
  if revival.source not in REVIVAL_SOURCES:
    raise ValueError(f'config field revival.source: expected one of {REVIVAL_SOURCES}, got {revival.source!r}')
  usage = state.model_state['code_usage']
  codebook = get_path(state.params, codebook_path)
  due = revival_due(state.step, revival)
  rng = jax.random.fold_in(jax.random.fold_in(state.rng, state.step), REVIVAL_KEY)
  revive = due & dead_codes(usage, revival.threshold) & (jnp.sum(usage) > 0)
  if revival.source == 'latents':
    replacements = latent_replacements(state.model_state['latent_pool'], codebook.shape[0], rng)
  else:
    replacements = copy_replacements(codebook, usage, rng, revival.noise)
  new_codebook = jnp.where(revive[:, None], replacements.astype(codebook.dtype), codebook)
  opt_state = reset_moment_rows(state.opt_state, revive, codebook_path) if revival.reset_moments else state.opt_state
  revived = jnp.sum(revive).astype(jnp.int32)
  model_state = dict(state.model_state, code_usage=jnp.where(due, jnp.zeros_like(usage), usage),
                     codes_revived_total=state.model_state['codes_revived_total'] + revived)
  state = state.replace(params=set_path(state.params, codebook_path, new_codebook), opt_state=opt_state,
                        model_state=model_state)
  return state, {'codes_revived': revived.astype(jnp.float32),
                 'codes_revived_total': model_state['codes_revived_total'].astype(jnp.float32)}
