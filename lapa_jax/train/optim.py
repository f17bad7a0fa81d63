"""Optimizer and learning-rate schedule from a config's `optim` group (optax only).

    optim = ConfigDict(name='adamw', lr=1e-4, b1=0.9, b2=0.99, eps=1e-8, weight_decay=0.01,
                       clip_norm=1.0, warmup_steps=1000, schedule='cosine', end_lr_fraction=0.1,
                       freeze='')   # optional: comma-separated param path prefixes kept fixed

Frozen params (`freeze`, e.g. 'lm_head,transformer/vte') get no update and no optimizer state at
all: optax.multi_transform gives them `set_to_zero`, whose state is empty, so a 7B model's unused
lm_head (32000 x 4096) costs no Adam moments.

Stages that edit optimizer moments inside the step (LAQ dead-code revival) reach them with
`optax.tree_utils.tree_get(opt_state, 'mu')` / `tree_set(opt_state, mu=..., nu=...)`: the chain holds
exactly one Adam state, whose `mu` and `nu` are trees shaped like the params.
"""

from __future__ import annotations

import jax
import ml_collections
import optax

OPTIMIZERS = ('adam', 'adamw')
SCHEDULES = ('constant', 'cosine')


def make_schedule(optim_config: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
  """Linear warmup from 0 to `lr` over `warmup_steps`, then constant or cosine to `lr * end_lr_fraction`."""
  lr, warmup_steps = float(optim_config.lr), int(optim_config.warmup_steps)
  if optim_config.schedule == 'constant':
    if warmup_steps <= 0:
      return optax.constant_schedule(lr)
    return optax.join_schedules(
        [optax.linear_schedule(0.0, lr, warmup_steps), optax.constant_schedule(lr)], [warmup_steps])
  if optim_config.schedule == 'cosine':
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=lr, warmup_steps=warmup_steps,
        decay_steps=max(total_steps, warmup_steps + 1), end_value=lr * float(optim_config.end_lr_fraction))
  raise ValueError(f'config field optim.schedule: expected one of {SCHEDULES}, got {optim_config.schedule!r}')


def make_optimizer(optim_config: ml_collections.ConfigDict, total_steps: int) -> optax.GradientTransformation:
  """Global-norm clipping (skipped when `clip_norm` is 0) followed by Adam or AdamW on the schedule."""
  schedule = make_schedule(optim_config, total_steps)
  common = dict(learning_rate=schedule, b1=optim_config.b1, b2=optim_config.b2, eps=optim_config.eps)
  if optim_config.name == 'adam':
    optimizer = optax.adam(**common)
  elif optim_config.name == 'adamw':
    optimizer = optax.adamw(**common, weight_decay=optim_config.weight_decay)
  else:
    raise ValueError(f'config field optim.name: expected one of {OPTIMIZERS}, got {optim_config.name!r}')
  if optim_config.clip_norm > 0:
    optimizer = optax.chain(optax.clip_by_global_norm(optim_config.clip_norm), optimizer)
  prefixes = [prefix.strip().strip('/') for prefix in optim_config.get('freeze', '').split(',') if prefix.strip()]
  if not prefixes:
    return optimizer
  return optax.multi_transform({'trained': optimizer, 'frozen': optax.set_to_zero()},
                               lambda params: freeze_labels(params, prefixes))


def param_path(path) -> str:
  """'transformer/wte/embedding' for a tree path of dict keys (boxes' attributes are skipped)."""
  return '/'.join(str(key.key) for key in path if isinstance(key, jax.tree_util.DictKey))


def freeze_labels(params, prefixes: list[str]):
  """'frozen' or 'trained' for every leaf of `params`, by its path; an unmatched prefix is an error."""
  paths = [param_path(path) for path, _ in jax.tree_util.tree_leaves_with_path(params)]
  matches = lambda path, prefix: path == prefix or path.startswith(prefix + '/')
  unused = [prefix for prefix in prefixes if not any(matches(path, prefix) for path in paths)]
  if unused:
    raise ValueError(f'config field optim.freeze: {unused[0]!r} matches no parameter '
                     f'(top-level names: {", ".join(sorted({path.split("/")[0] for path in paths}))})')
  return jax.tree_util.tree_map_with_path(
      lambda path, _: 'frozen' if any(matches(param_path(path), p) for p in prefixes) else 'trained', params)
