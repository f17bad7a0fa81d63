"""Stage 3, action finetuning: a latent-pretrained VLA (or a fresh one: the SCRATCH baseline) learns
a robot's actions, discretised into equal-frequency bins, from a small labelled set.

    lapa train configs/finetune.py:demo --workdir W --config.data.path=<robot dataset> \\
        --config.vision_tokenizer=TOKENIZER_WORKDIR --config.init_from=PRETRAIN_WORKDIR
    lapa train configs/finetune.py:demo,scratch --workdir W --config.data.path=... --config.vision_tokenizer=...

Bins: per action dimension, `bins.num_bins` equal-frequency bins fitted on this stage's training
data (data/actions.py: duplicate edges merged, a constant dimension one bin, a binary gripper two
bins whatever its convention), written to `action_bins.json` in the workdir for every consumer;
a bin decodes to the median of its training values.

Sequences: the prompt, `<vision>` + the VQGAN tokens of the current frame + `<eov>` + `</vision>`,
`<action>` + 7 bin ids + `</action>` + EOS; the loss is the cross-entropy of the 7 action tokens.
Images are augmented in the step (random resized crop of 0.9 of the area, colour jitter:
train/augment.py) and tokenized there by the frozen vision tokenizer, whose params live in the
model state (no gradient, no optimizer state) and are saved with the checkpoint (its model fields
in `vision_tokenizer.json`), so the finetuned workdir alone is a complete policy (policy.py).
Evaluation uses the matching centre crop.

With `init_from`, the trunk and the text and vision tables come from that run (train/warm_start.py);
the latent table and head are dropped (this model has none) and the action table and head start
fresh, N(0, 0.02) - unless `init_from` has an action head of the same size (the ACTIONVLA
baseline's), which is kept.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from lapa_jax.data import actions, pipelines, sequences
from lapa_jax.data.sequences import ACTION, VISION
from lapa_jax.models import vla
from lapa_jax.train import augment, backbone, loop
from lapa_jax.train import data as data_lib
from lapa_jax import checkpoint, vision_tokenizer

TOKENIZER_STATE = 'vision_tokenizer'


def make_stage(config: ml_collections.ConfigDict) -> loop.Stage:
  model = vla.VLA(backbone.model_config(config))
  if config.model.latent_vocab_size:
    raise ValueError('config field model.latent_vocab_size: the finetuned model has no latent head; set it to 0')
  tokenizer = backbone.text_tokenizer(config)
  backbone.check_eval(config)
  if (config.method == 'scratch') != (not config.init_from):
    raise ValueError(f'config field init_from: method {config.method!r} ' +
                     ('starts without pretraining; leave init_from empty' if config.method == 'scratch' else
                      'starts from a pretrained run: set init_from to its workdir (or use the scratch method)'))
  if not config.vision_tokenizer:
    raise ValueError('config field vision_tokenizer: set it to the vision tokenizer workdir that tokenized the '
                     'pretraining data (lapa train configs/tokenizer.py, or lapa convert lwm-vqgan)')
  vqgan_config, vqgan, vqgan_params = vision_tokenizer.load_vqgan(config.vision_tokenizer)
  backbone.check_vision_vocab(config, vqgan_config.codebook_size, f'the vision tokenizer {config.vision_tokenizer}')
  bins = actions.from_json(data_lib.broadcast_json(
      lambda: actions.fit(pipelines.dataset_actions(config.data), config.bins.num_bins).to_json(), 'action bins'))
  if config.model.action_vocab_size < bins.vocab_size:
    raise ValueError(f'config field model.action_vocab_size: {config.model.action_vocab_size} is smaller than '
                     f'the {bins.vocab_size} action bins')
  statistics = data_lib.shared_statistics(config.data)
  tokens_per_image = vqgan_config.tokens_per_image
  placeholders = np.zeros(tokens_per_image, np.int32)  # the step writes the codes of the augmented view here
  loss_config = vla.LossConfig(weights=((ACTION, 1.0),), targets_per_sequence=((ACTION, 7),))

  def make_example(batch, row):
    return sequences.vla_sequence(tokenizer, bytes(batch['instruction'][row]).decode('utf-8', 'replace'),
                                  placeholders, codebook_size=vqgan_config.codebook_size,
                                  action=bins.encode(batch['action'][row]), prompt=config.prompt)

  def token_batches(data, batch_size, process_index, process_count, statistics_by_name):
    steps = pipelines.step_iterator(data, image_size=vqgan_config.resolution, batch_size=batch_size,
                                    seed=config.seed, process_index=process_index, process_count=process_count,
                                    statistics_by_name=statistics_by_name)
    return sequences.TokenBatches(steps, make_example, config.seq_len, keep=('image', 'action'),
                                  pad_id=tokenizer.pad_id)

  def train_data(process_index, process_count):
    return token_batches(config.data, data_lib.local_batch_size(config.batch_size, process_count), process_index,
                         process_count, statistics)

  def with_vision_tokens(model_state, batch, images):
    codes = vqgan.apply({'params': model_state[TOKENIZER_STATE]}, images, method=vqgan.encode)
    tokens = backbone.fill_positions(batch['tokens'], batch['modality'], codes.reshape(codes.shape[0], -1), VISION)
    return {**batch, 'tokens': tokens}

  def loss_fn(params, model_state, batch, rng, step):
    del step
    images = augment.augment(rng, batch['image'], config.augment.crop_area, config.augment.color_jitter)
    loss, metrics = vla.vla_loss(model, params, with_vision_tokens(model_state, batch, images), loss_config)
    return loss, (metrics, model_state)

  def held_out_metrics(params, model_state, batch):
    batch = with_vision_tokens(model_state, batch, augment.evaluation_view(batch['image'], config.augment.crop_area))
    _, metrics = vla.vla_loss(model, params, batch, loss_config)
    ids = predicted_action_ids(model, params, batch)
    decoded = jnp.asarray(bins_table(bins))[jnp.arange(7), jnp.minimum(ids, bins.vocab_size - 1)]
    l1 = jnp.mean(jnp.abs(decoded - batch['action']), axis=0)
    return {**metrics, **{f'action_l1_dim{dim}': l1[dim] for dim in range(7)}, 'action_l1': jnp.mean(l1)}

  tokenizer_shapes = jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype), vqgan_params)

  def init(rng):
    # Zeros in the tokenizer's shapes: the real params are filled in by warm_start (fresh runs) or
    # the checkpoint (resumed runs), never traced into the init as constants.
    return {'params': vla.init_params(model, rng),
            'model_state': {TOKENIZER_STATE: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), tokenizer_shapes)}}

  load_params = backbone.params_warm_start(config)

  def warm_start(state):
    if load_params is not None:
      state = load_params(state)
    shardings = jax.tree.map(lambda leaf: leaf.sharding, state.model_state[TOKENIZER_STATE])
    # Through host memory: the params sit on this process's first device, and jax cannot copy
    # between devices of different processes; every process holds the same values.
    return state.replace(model_state={**state.model_state,
                                      TOKENIZER_STATE: jax.device_put(jax.device_get(vqgan_params), shardings)})

  evaluate = backbone.held_out_evaluator(config, held_out_metrics, token_batches)
  used_tokenizer = vision_tokenizer.description(config.vision_tokenizer, vqgan_config,
                                                checkpoint.latest_step(config.vision_tokenizer))
  return loop.Stage(init=init, loss_fn=loss_fn, train_data=train_data, evaluate=evaluate, warm_start=warm_start,
                    files={actions.BINS_FILE: bins.to_json(), vision_tokenizer.USED_FILE: used_tokenizer})


def bins_table(bins: actions.ActionBins) -> np.ndarray:
  """(7, vocab) float32: the value of every bin id per dimension (ids past a dimension's bins repeat its last)."""
  table = np.zeros((bins.dims, bins.vocab_size), np.float32)
  for dim, values in enumerate(bins.values):
    table[dim, :len(values)] = values
    table[dim, len(values):] = values[-1]
  return table


def predicted_action_ids(model: vla.VLA, params, batch) -> jax.Array:
  """Teacher-forced argmax of the action head at the 7 action targets: (batch, 7) int32."""
  hidden, _ = model.apply({'params': params}, batch['tokens'], batch['modality'], batch['attention_mask'])
  positions, _, _ = vla.target_positions((batch['loss_mask'] > 0) & (batch['target_modality'] == ACTION), 7)
  gathered = jnp.take_along_axis(hidden, positions[..., None], axis=1)
  return jnp.argmax(model.apply({'params': params}, gathered, ACTION, method=vla.VLA.head), axis=-1)

