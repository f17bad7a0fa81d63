"""Toy regression stage (lapa_jax/train/toy.py): proves the generic train loop.

    lapa train configs/toy.py:tiny --workdir workdirs/toy
    lapa train configs/toy.py:default --workdir workdirs/toy --config.mesh_dim=2,2,2

Presets: 'tiny' (tests: a few seconds on a CPU), 'default' (a longer run with a cosine schedule).
"""

import ml_collections

PRESETS = ('tiny', 'default')


def get_config(preset: str = 'default') -> ml_collections.ConfigDict:
  if preset not in PRESETS:
    raise ValueError(f'configs/toy.py: unknown preset {preset!r}; expected one of {PRESETS}')
  config = ml_collections.ConfigDict()
  config.stage = 'toy'
  config.seed = 0
  config.mesh_dim = '1,-1,1'
  config.batch_size = 16
  config.total_steps = 2000
  config.log_every = 50
  config.eval_every = 500
  config.checkpoint_every = 500
  config.keep_checkpoints = 2
  config.on_nonfinite = 'skip'    # a non-finite loss/gradient: 'skip' the step (counted) or 'stop'
  config.dtype = 'float32'

  config.optim = ml_collections.ConfigDict(dict(
      name='adamw', lr=3e-3, b1=0.9, b2=0.99, eps=1e-8, weight_decay=1e-4, clip_norm=1.0,
      warmup_steps=100, schedule='cosine', end_lr_fraction=0.1))
  # Sizes divisible by 8 so every simulated-device mesh splits them evenly.
  config.model = ml_collections.ConfigDict(dict(features=16, hidden=32))
  config.data = ml_collections.ConfigDict(dict(noise=0.01, delay_seconds=0.0))

  if preset == 'tiny':
    config.total_steps = 20
    config.log_every = 5
    config.eval_every = 10
    config.checkpoint_every = 10
    config.optim.warmup_steps = 5
  return config
