"""The vision tokenizer stage: the VQGAN that turns frames into codes (lapa_jax/train/tokenizer.py).

    lapa world --embodiment robot --episodes 200 --out W/data --seed 0
    lapa train configs/tokenizer.py:demo --workdir W/tokenizer --config.data.path=W/data/lapa_world_robot/1.0.0
    lapa train configs/tokenizer.py:small --workdir W/tokenizer --config.data.path=<rlds dir>/<name>/<version>
    lapa train configs/tokenizer.py:lwm --workdir W/tokenizer --config.data.data_dir=D --config.data.mixture=...

For Open-X, import LWM's released tokenizer instead of training one; the workdir has the same layout
(config.json with stage 'tokenizer' + checkpoints/), so later stages load either with
`lapa_jax.vision_tokenizer.load_vqgan`:

    lapa convert lwm-vqgan import lapa_checkpoints/vqgan W/tokenizer --preset lwm

`model` holds every VQGANConfig field (lapa_jax/models/vqgan.py), so a workdir's config.json fully
describes the model. Presets:
  lwm    LWM's tokenizer architecture: 256x256 images -> 16x16 codes of 8192 x 64, widths 128 x
         (1, 2, 2, 4, 6), 2 ResnetBlocks per level. Only the weights of LWM's tokenizer are released, not
         its training recipe; the one here is taming-transformers' without the perceptual term: L1 +
         codebook + 0.25 commitment, hinge PatchGAN (weight 0.1) from step 20k, Adam 1e-4 b=(0.5, 0.9).
  small  the built-in 64x64 world: 8x8 codes of 1024 x 32, widths 64 x (1, 2, 2, 4), 20k steps.
  demo   the built-in world in 4-5 minutes on a 2-core CPU (for launch/demo.sh): 64x64 -> 8x8
         codes of 1024 x 8, widths 16 x (1, 1, 2, 2), 1 ResnetBlock per level, 600 steps of 16
         frames at lr 4e-3, revival every 10 steps (held-out PSNR ~26 dB; the arm and the blocks are
         clear, similar colours such as red/orange are sometimes confused).
  tiny   for tests (80 steps in seconds, after ~15 s of compiling): 16x16 -> 8x8 codes of 32 x 8.
The world presets use the L2 reconstruction loss: the world's small coloured blocks are a few
percent of the pixels, and L2 weighs their large errors over the background's small ones (with L1,
300 demo steps reconstruct every block in the same brown; L2 gains 1-1.5 dB on coloured pixels).
"""

import ml_collections

from lapa_jax.data import pipelines
from lapa_jax.models import vqgan

PRESETS = ('lwm', 'small', 'demo', 'tiny')


def get_config(preset: str = 'small') -> ml_collections.ConfigDict:
  if preset not in PRESETS:
    raise ValueError(f'configs/tokenizer.py: unknown preset {preset!r}; expected one of {PRESETS}')
  config = ml_collections.ConfigDict()
  config.stage = 'tokenizer'
  config.seed = 0
  config.mesh_dim = '1,-1,1'
  config.batch_size = 64
  config.total_steps = 100_000
  config.log_every = 50
  config.eval_every = 5000
  config.checkpoint_every = 5000
  config.keep_checkpoints = 3
  config.on_nonfinite = 'skip'    # a non-finite loss/gradient: 'skip' the step (counted) or 'stop'
  config.dtype = 'float32'         # the VQGAN computes in float32

  config.optim = ml_collections.ConfigDict(dict(
      name='adam', lr=1e-4, b1=0.5, b2=0.9, eps=1e-8, weight_decay=0.0, clip_norm=1.0,
      warmup_steps=1000, schedule='constant', end_lr_fraction=1.0))

  config.model = ml_collections.ConfigDict(vqgan.config_fields(vqgan.vqgan_config(preset)))

  config.loss = ml_collections.ConfigDict(dict(
      reconstruction='l1',             # 'l1' (taming, sharper) or 'l2'
      reconstruction_weight=1.0,
      codebook_weight=1.0,             # the commitment loss is weighted by model.commitment_cost
      adversarial_weight=0.0,          # hinge PatchGAN generator loss; 0 = no discriminator at all
      adversarial_start=0,             # steps before the adversarial term (and the discriminator) start
      discriminator_channels=64,       # width of the first of discriminator_layers stride-2 convs
      discriminator_layers=3))

  # Dead-code revival (lapa_jax/train/revival.py): a code with fewer than `threshold` x the uniform
  # share of the assignments since the last revival is moved onto an encoder latent of the latest
  # batch, and its Adam moments are reset.
  config.revival = ml_collections.ConfigDict(dict(
      schedule='periodic',     # 'periodic' (every `every` steps), 'official', 'official+periodic', 'none'
      every=100, threshold=0.03,
      source='latents',        # 'latents' (up to `pool` kept from each batch) or 'codes' (noisy copies of used codes)
      pool=16384, noise=0.01, reset_moments=True))

  # The datasets, as for every stage (lapa_jax/data/pipelines.py); single frames of each step.
  config.data = pipelines.default_config()
  config.data.eval_split = 'val'   # held-out split for evaluation ('' turns evaluation off)

  config.eval = ml_collections.ConfigDict(dict(
      batch_size=64,           # global; a multiple of the data-parallel device count
      num_batches=4,           # held-out batches per evaluation (the same frames every time)
      grid_images=16,          # (original | reconstruction) pairs in the picture
      grid_pairs_per_row=4))

  if preset == 'lwm':
    config.loss.update(adversarial_weight=0.1, adversarial_start=20_000)
  elif preset == 'small':
    config.batch_size = 32
    config.total_steps = 20_000
    config.eval_every = 1000
    config.checkpoint_every = 1000
    config.optim.update(lr=3e-4, b1=0.9, b2=0.99, warmup_steps=200)
    config.loss.reconstruction = 'l2'
    config.revival.update(every=50)
    config.data.shuffle_buffer = 5000
  elif preset == 'demo':
    config.batch_size = 16
    config.total_steps = 600
    config.log_every = 25
    config.eval_every = 300
    config.checkpoint_every = 300
    config.keep_checkpoints = 1
    config.optim.update(lr=4e-3, b1=0.9, b2=0.99, warmup_steps=50, schedule='cosine', end_lr_fraction=0.1)
    config.loss.reconstruction = 'l2'
    config.revival.update(every=10)
    config.data.shuffle_buffer = 5000
    config.eval.update(batch_size=32, num_batches=2)
  elif preset == 'tiny':
    config.batch_size = 16
    config.total_steps = 80
    config.log_every = 10
    config.eval_every = 40
    config.checkpoint_every = 80
    config.keep_checkpoints = 1
    config.optim.update(lr=3e-3, b1=0.9, b2=0.99, warmup_steps=10)
    config.revival.update(every=20)
    config.data.update(shuffle_buffer=1000, ram_budget_gb=1.0)
    config.eval.update(batch_size=16, num_batches=2, grid_images=8)
  return config
