"""Stage 2, latent pretraining: the VLA learns to predict each frame's latent action from
(instruction, image), on videos labelled by `lapa label`.

    lapa train configs/latent_pretrain.py:demo --workdir W --config.data.path=<labelled dir>/<name>/<version>
    lapa train configs/latent_pretrain.py:paper --workdir W --config.data.data_dir=LABELLED \\
        --config.data.mixture=lapa_openx --config.init_from=LWM_WORKDIR --config.text_tokenizer=tokenizer.model

Each step of a labelled dataset becomes LAPA's sequence (data/sequences.py): the prompt with the
instruction, `<vision>` + the step's VQGAN tokens + `<eov>` + `</vision>`, then `<delta>` + its
latent action + `</delta>` and EOS. Loss: 0.99 x cross-entropy of the latent codes + 0.01 x that of
the text targets after the image (markers and EOS); the latent positions are not text targets (the
official mask counted them, with target <unk>: reference §2.6). The vision tokens are the labelled
dataset's, so the vision tokenizer is frozen by construction.

`target='action'` is the ACTIONVLA baseline: the same sequences with the step's true action,
discretised into equal-frequency bins fitted on this data (`action_bins.json` in the workdir), in
place of the latent action.
"""

from __future__ import annotations

import ml_collections

from lapa_jax import label, vision_tokenizer
from lapa_jax.data import actions, pipelines, sequences
from lapa_jax.data.sequences import ACTION, LATENT, TEXT
from lapa_jax.models import vla
from lapa_jax.train import backbone, loop
from lapa_jax.train import data as data_lib

TARGETS = ('latent', 'action')
LAQ_FILE = 'laq.json'  # the LAQ that labelled the data (lapa_labels.json's 'laq' entry)


def _labels(config: ml_collections.ConfigDict) -> dict:
  """The vision codebook and latent code facts every labelled dataset of config.data shares."""
  found, labels = {}, None
  for dataset, _ in pipelines.open_datasets(config.data):
    labels = label.read_labels(dataset.path)
    found[dataset.path] = (labels['vision_tokenizer']['codebook_size'], labels['vision_tokenizer']['tokens_per_image'],
                           labels['laq']['codebook_size'], labels['laq']['code_seq_len'])
  if len(set(found.values())) > 1:
    raise pipelines.DataError('the datasets were labelled by different tokenizers or LAQs: '
                              + '; '.join(f'{path}: {facts}' for path, facts in found.items()))
  vision_codebook, tokens, latent_codebook, code_seq_len = next(iter(found.values()))
  # What labelled the data, for the consumers of this run (policy.py: the tokenizer that makes its
  # vision tokens from camera images, the LAQ that decodes its latent actions into frames).
  used = {vision_tokenizer.USED_FILE: labels['vision_tokenizer'],
          LAQ_FILE: {**labels['laq'], 'frame_offset': labels['frame_offset']}}
  return dict(vision_codebook=vision_codebook, tokens_per_image=tokens, latent_codebook=latent_codebook,
              code_seq_len=code_seq_len, files=used)


def make_stage(config: ml_collections.ConfigDict) -> loop.Stage:
  if config.target not in TARGETS:
    raise ValueError(f'config field target: expected one of {TARGETS}, got {config.target!r}')
  model = vla.VLA(backbone.model_config(config))
  tokenizer = backbone.text_tokenizer(config)
  backbone.check_eval(config)
  facts = _labels(config)
  backbone.check_vision_vocab(config, facts['vision_codebook'], 'the vision tokenizer that labelled the data')
  target = LATENT if config.target == 'latent' else ACTION
  files, bins = dict(facts['files']), None
  if target == LATENT:
    if config.model.latent_vocab_size < facts['latent_codebook']:
      raise ValueError(f'config field model.latent_vocab_size: {config.model.latent_vocab_size} is smaller than '
                       f'the LAQ codebook ({facts["latent_codebook"]}) that labelled the data')
  else:
    bins = actions.from_json(data_lib.broadcast_json(
        lambda: actions.fit(pipelines.dataset_actions(config.data), config.bins.num_bins).to_json(), 'action bins'))
    if config.model.action_vocab_size < bins.vocab_size:
      raise ValueError(f'config field model.action_vocab_size: {config.model.action_vocab_size} is smaller than '
                       f'the {bins.vocab_size} action bins')
    files[actions.BINS_FILE] = bins.to_json()
  statistics = data_lib.shared_statistics(config.data)
  step_keys = ('vision_tokens', 'latent_action') if target == LATENT else ('vision_tokens',)
  weights = ((target, config.loss.target_weight), (TEXT, config.loss.text_weight))
  loss_config = vla.LossConfig(weights=tuple((m, w) for m, w in weights if w > 0), targets_per_sequence=(
      (LATENT, facts['code_seq_len']), (ACTION, 7), (TEXT, config.loss.text_targets)))

  def make_example(batch, row):
    values = ({'latent': batch['latent_action'][row]} if target == LATENT
              else {'action': bins.encode(batch['action'][row])})
    return sequences.vla_sequence(tokenizer, bytes(batch['instruction'][row]).decode('utf-8', 'replace'),
                                  batch['vision_tokens'][row], codebook_size=facts['vision_codebook'],
                                  prompt=config.prompt, **values)

  def token_batches(data, batch_size, process_index, process_count, statistics_by_name):
    steps = pipelines.step_iterator(data, batch_size=batch_size, images=False, actions=target == ACTION,
                                    step_keys=step_keys, seed=config.seed, process_index=process_index,
                                    process_count=process_count, statistics_by_name=statistics_by_name)
    return sequences.TokenBatches(steps, make_example, config.seq_len, pad_id=tokenizer.pad_id)

  def train_data(process_index, process_count):
    return token_batches(config.data, data_lib.local_batch_size(config.batch_size, process_count), process_index,
                         process_count, statistics)

  loss_fn = vla.make_loss_fn(model, loss_config)

  def held_out_metrics(params, model_state, batch):
    return vla.vla_loss(model, params, batch, loss_config)[1]

  evaluate = backbone.held_out_evaluator(config, held_out_metrics, token_batches)
  return loop.Stage(init=backbone.make_init(model), loss_fn=loss_fn, train_data=train_data,
                    evaluate=evaluate, warm_start=backbone.params_warm_start(config), files=files)
