"""Stage 2, latent pretraining (lapa_jax/train/latent_pretrain.py): predict each frame's latent action.

    lapa train configs/latent_pretrain.py:demo --workdir W --config.data.path=<labelled>/lapa_world_robot/1.0.0
    lapa train configs/latent_pretrain.py:paper --workdir W --config.data.data_dir=LABELLED \
        --config.data.mixture=lapa_openx --config.init_from=LWM_7B --config.text_tokenizer=lwm/tokenizer.model

The argument is `<size>[,<method>]`.
Sizes:
  paper  LAPA's run (reference §4): LWM-7B (init_from: `lapa convert easylm import lwm/params LWM_7B
         --model vla:7b --init-missing`), batch 256, sequences of 384, AdamW lr 2e-5 constant, b2 0.95,
         clip 1.0, no weight decay, bf16 compute with fp32 params, FSDP over every device, 70k steps.
  1b     the same recipe on a 1B LLaMA (EasyLM's shape).
  small  the built-in world on one accelerator: 6 layers x 384, byte tokens, batch 64.
  demo   the built-in world on a CPU (launch/demo.sh): 2 layers x 128, batch 32, ~5 min on 2 cores.
  tiny   tests: seconds.
Methods (the paper's comparison):
  lapa       latent actions of the robot videos (the default)
  lapa_hand  latent actions of human-hand videos only (the LAQ and the labels come from hand videos;
             the config is LAPA's, its data is the labelled hand dataset)
  actionvla  the true actions of the same robot episodes instead of latent actions (an upper bound:
             it sees action labels), binned like the finetuning data

`lapa label` writes the labelled datasets this stage reads (`vision_tokens`, `latent_action`).
"""

import ml_collections

from lapa_jax.train import backbone

METHODS = ('lapa', 'lapa_hand', 'actionvla')


def get_config(arg: str = 'paper') -> ml_collections.ConfigDict:
  size, _, method = arg.partition(',')
  method = method or 'lapa'
  if method not in METHODS:
    raise ValueError(f'configs/latent_pretrain.py: unknown method {method!r}; expected one of {METHODS}')
  config = backbone.base_config('latent_pretrain', size)
  config.method = method
  config.target = 'action' if method == 'actionvla' else 'latent'
  config.batch_size = 256
  config.total_steps = 70_000
  config.eval_every = 5000
  config.checkpoint_every = 5000
  # 0.99 x the latent (or action) tokens + 0.01 x the text targets after the image (reference §2.6).
  config.loss = ml_collections.ConfigDict(dict(target_weight=0.99, text_weight=0.01, text_targets=32))
  config.bins = ml_collections.ConfigDict(dict(num_bins=256))  # actionvla: equal-frequency action bins
  config.optim.freeze = 'vision_head'  # images are never targets: no moments for a 8448 x 4096 head
  if config.target == 'latent':
    config.model.latent_vocab_size = 8   # the LAQ's codebook (8 codes x 4 positions)
  else:
    config.model.action_vocab_size = config.bins.num_bins

  if size == 'small':
    config.update(batch_size=64, total_steps=10_000, eval_every=1000, checkpoint_every=1000)
  elif size == 'demo':
    config.update(batch_size=32, total_steps=600, eval_every=300, checkpoint_every=300)
    if config.target == 'latent':
      config.model.latent_vocab_size = 16  # configs/laq.py:demo's codebook (one code of 16)
  elif size == 'tiny':
    config.update(batch_size=16, total_steps=60, eval_every=0, checkpoint_every=60, log_every=10)
    config.optim.update(lr=3e-3, warmup_steps=5)
    config.eval.update(batch_size=16, num_batches=1)
  return config
