"""Stage 1, the latent action quantizer (lapa_jax/train/laq.py).

    lapa train configs/laq.py:small --workdir W --config.data.path=<rlds dir>/<name>/<version>
    lapa train configs/laq.py:paper --workdir W --config.data.path=... --config.mesh_dim=1,-1,1

Presets:
  paper  the published model and recipe (reference §1.7): dim 1024, 8 spatial + 8 temporal + 8
         decoder layers, 16 heads x 64, 256x256 images, patch 32, NSVQ 32-d, 8 codes x 4 positions,
         Adam 1e-4 b=(0.9, 0.99), clip 0.5, constant lr, 100k steps. The official run used 64 pairs
         per GPU on an unstated number of GPUs; batch_size here is the global batch.
  small  the same architecture shrunk for one accelerator or a CPU: dim 256, 2+2+2 layers, 8 x 32
         heads, 64x64 images, patch 8, same quantizer.
  tiny   for tests: trains a few hundred steps on the built-in world in a couple of minutes on CPU.
  demo   for the built-in world (launch/demo.sh, benchmarks/laq_quality.py): 64x64, one code of 16 (the paper
         found a larger codebook helps more than a longer code sequence on the visually simple Language
         Table), the decoder predicting the change x_{t+H} - x_t, 1600 steps, ~8 min on 2 CPU cores.
"""

import ml_collections

from lapa_jax.data import pipelines

PRESETS = ('paper', 'small', 'tiny', 'demo')


def get_config(preset: str = 'small') -> ml_collections.ConfigDict:
  if preset not in PRESETS:
    raise ValueError(f'configs/laq.py: unknown preset {preset!r}; expected one of {PRESETS}')
  config = ml_collections.ConfigDict()
  config.stage = 'laq'
  config.seed = 0
  config.mesh_dim = '1,-1,1'
  config.batch_size = 64
  config.total_steps = 100_000
  config.log_every = 50
  config.eval_every = 5000
  config.checkpoint_every = 5000
  config.keep_checkpoints = 3
  config.on_nonfinite = 'skip'    # a non-finite loss/gradient: 'skip' the step (counted) or 'stop'
  config.dtype = 'float32'

  config.optim = ml_collections.ConfigDict(dict(
      name='adam', lr=1e-4, b1=0.9, b2=0.99, eps=1e-8, weight_decay=0.0, clip_norm=0.5,
      warmup_steps=0, schedule='constant', end_lr_fraction=1.0))

  config.model = ml_collections.ConfigDict(dict(
      variant='lapa',          # 'lapa' (the paper's model) or 'official' (the released code, for its weights)
      dim=1024, heads=16, head_dim=64, ff_mult=4.0,
      spatial_depth=8, temporal_depth=8, decoder_depth=8,
      image_size=256, patch_size=32, channels=3,
      quant_dim=32, codebook_size=8, code_seq_len=4,
      predict_change=False,    # the decoder predicts x_{t+H} - x_t (not in the paper; models/laq.py says why)
      remat=False))            # rematerialise each transformer layer (saves accelerator memory)

  # Dead-code revival: a code whose share of the assignments since the last revival is below
  # `threshold` x the uniform share (1 / codebook_size) is replaced and its Adam moments are reset.
  config.revival = ml_collections.ConfigDict(dict(
      schedule='official',     # 'official' (steps 10..90, 100..900, 1000..4500: 26 events), 'periodic'
                               # (every `every` steps), 'official+periodic' (then every `every` steps), 'none'
      every=0, threshold=0.1,
      source='latents',        # 'latents': latent actions of the latest batch (up to `pool` kept);
                               # 'codes': a used code (drawn in proportion to use) plus `noise` x its RMS
      pool=256, noise=0.01, reset_moments=True))

  # The datasets: data.path (one RLDS dataset) or data.mixture under data.data_dir; cameras, frame
  # rates (pair offset frame_offset_seconds x fps) and instruction keys come from the registry
  # (lapa_jax/data/oxe.py), a dataset's lapa_spec.json, data.spec_file or data.spec.*.
  config.data = pipelines.default_config()
  config.data.eval_split = 'val'   # held-out split for evaluation ('' turns evaluation off)

  config.eval = ml_collections.ConfigDict(dict(
      batch_size=64,           # global; a multiple of the data-parallel device count
      num_batches=4,           # held-out batches per evaluation (the same pairs every time)
      grid_pairs=8,            # rows of the (x_t, x_{t+H}, reconstruction) picture
      atlas_frames=2))         # frames x_t of the latent action atlas (each code forced at each position)

  if preset == 'small':
    config.model.update(dim=256, heads=8, head_dim=32, spatial_depth=2, temporal_depth=2, decoder_depth=2,
                        image_size=64, patch_size=8)
    config.batch_size = 32
    config.total_steps = 20_000
    config.eval_every = 1000
    config.checkpoint_every = 1000
  elif preset == 'tiny':
    config.model.update(dim=64, heads=4, head_dim=16, spatial_depth=1, temporal_depth=1, decoder_depth=1,
                        image_size=32, patch_size=4, quant_dim=16)
    config.batch_size = 16
    config.total_steps = 500
    config.log_every = 25
    config.eval_every = 0
    config.checkpoint_every = 500
    config.keep_checkpoints = 1
    config.optim.update(lr=3e-3, warmup_steps=20)
    config.revival.update(schedule='periodic', every=20)
    config.data.update(shuffle_buffer=1000, ram_budget_gb=1.0)
    config.eval.update(batch_size=32, num_batches=2, grid_pairs=4, atlas_frames=1)
  elif preset == 'demo':
    # One code of 16 that the decoder adds to x_t: on the world, 8 codes x 4 positions predicting
    # x_{t+H} directly leave the codes unused at this budget (benchmarks/laq_quality.py: action purity
    # 0.14 at 800 steps, 0.37 at 1600 steps with lr 3e-3 and predict_change; this preset 0.56).
    config.model.update(dim=128, heads=4, head_dim=32, spatial_depth=2, temporal_depth=2, decoder_depth=2,
                        image_size=64, patch_size=8, quant_dim=16, codebook_size=16, code_seq_len=1,
                        predict_change=True)
    config.batch_size = 32
    config.total_steps = 1600
    config.log_every = 50
    config.eval_every = 800
    config.checkpoint_every = 800
    config.keep_checkpoints = 2
    config.optim.update(lr=3e-3, warmup_steps=100, schedule='cosine', end_lr_fraction=0.1)
    config.revival.update(schedule='official+periodic', every=500)
    config.data.shuffle_buffer = 5000
  return config
