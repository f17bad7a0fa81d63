"""Stage 3, action finetuning (lapa_jax/train/finetune.py): learn the robot's binned actions.

    lapa train configs/finetune.py:demo --workdir W --config.data.path=<robot RLDS dataset> \
        --config.vision_tokenizer=TOKENIZER --config.init_from=PRETRAIN_WORKDIR
    lapa train configs/finetune.py:demo,scratch --workdir W --config.data.path=... --config.vision_tokenizer=...
    lapa train configs/finetune.py:paper --workdir W --config.data.path=... --config.vision_tokenizer=LWM_VQGAN \
        --config.init_from=PRETRAIN_WORKDIR --config.text_tokenizer=lwm/tokenizer.model

The argument is `<size>[,<method>]`; sizes as in configs/latent_pretrain.py (`paper`: batch 128,
AdamW lr 2e-5 constant, 2000 steps, as LAPA's real-robot finetuning).
Methods (the paper's comparison; each names the pretraining it starts from):
  lapa       init_from a latent-pretrained run on robot videos (the default)
  lapa_hand  init_from a latent-pretrained run on human-hand videos
  actionvla  init_from an action-pretrained run (its action head is kept when its size matches)
  scratch    no pretraining: init_from must stay empty

`vision_tokenizer` must be the tokenizer that labelled the pretraining data (for scratch: any
tokenizer of the robot's images). The robot dataset needs actions; images are augmented (random
resized crop of 0.9 of the area, colour jitter) and tokenized inside the train step.
"""

import ml_collections

from lapa_jax.train import backbone

METHODS = ('lapa', 'lapa_hand', 'actionvla', 'scratch')


def get_config(arg: str = 'paper') -> ml_collections.ConfigDict:
  size, _, method = arg.partition(',')
  method = method or 'lapa'
  if method not in METHODS:
    raise ValueError(f'configs/finetune.py: unknown method {method!r}; expected one of {METHODS}')
  config = backbone.base_config('finetune', size)
  config.method = method
  config.vision_tokenizer = ''    # workdir of the vision tokenizer (lapa train configs/tokenizer.py or lapa convert)
  config.batch_size = 128
  config.total_steps = 2000
  config.eval_every = 500
  config.checkpoint_every = 500
  config.bins = ml_collections.ConfigDict(dict(num_bins=256))
  config.model.action_vocab_size = config.bins.num_bins
  config.augment = ml_collections.ConfigDict(dict(crop_area=0.9, color_jitter=True))
  # Text and images are never targets here: no optimizer state for their heads.
  config.optim.freeze = 'lm_head,vision_head'

  if size == 'small':
    config.update(batch_size=64, total_steps=3000, eval_every=500, checkpoint_every=500)
  elif size == 'demo':
    config.update(batch_size=32, total_steps=600, eval_every=300, checkpoint_every=300)
  elif size == 'tiny':
    config.update(batch_size=16, total_steps=60, eval_every=0, checkpoint_every=60, log_every=10)
    config.optim.update(lr=3e-3, warmup_steps=5)
    config.eval.update(batch_size=16, num_batches=1)
  return config
