"""The VLA stages' parts: sequence masks of both stages, init_from surgery, frozen params, configs."""

import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from lapa_jax import config as config_lib
from lapa_jax import sharding
from lapa_jax.convert import easylm
from lapa_jax.data import sequences
from lapa_jax.data.sequences import ACTION, LATENT, TEXT, VISION
from lapa_jax.models import vla
from lapa_jax.train import backbone, optim, step, warm_start

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / 'configs'
CODEBOOK = 64


def test_latent_and_action_sequences_put_loss_only_where_it_belongs():
  tokenizer = sequences.ByteTokenizer()
  codes = np.arange(16)
  for kind, values in ((LATENT, dict(latent=[2, 0, 7, 2])), (ACTION, dict(action=[5, 0, 9, 1, 1, 1, 255]))):
    example = sequences.vla_sequence(tokenizer, 'push the red block left', codes, codebook_size=CODEBOOK,
                                     prompt='{instruction}', **values)
    loss = example['loss_mask'] > 0
    target_kind = example['target_modality']
    expected = next(iter(values.values()))
    # The latent/action targets are exactly the values, in order, and each has loss.
    np.testing.assert_array_equal(example['targets'][loss & (target_kind == kind)], expected)
    # Text targets with loss are the markers around the values and EOS: never a latent/action position
    # (the official mask also trained the text head to say <unk> at the latent positions).
    text_targets = example['targets'][loss & (target_kind == TEXT)]
    open_marker, close_marker = (tokenizer.encode(m) for m in sequences.MARKERS[kind])
    assert text_targets.tolist() == open_marker + close_marker + [tokenizer.eos_id]
    # No loss on the prompt or the image.
    assert not np.any(loss & (target_kind == VISION))
    first_loss = np.flatnonzero(loss)[0]
    assert np.all(target_kind[first_loss:][loss[first_loss:]] != VISION)
    prompt_end = len(tokenizer.encode('push the red block left')) + 2 + len(tokenizer.encode('<vision>'))
    assert not loss[:prompt_end].any()


def test_placeholder_vision_codes_are_filled_in_the_step():
  tokenizer = sequences.ByteTokenizer()
  examples = [sequences.vla_sequence(tokenizer, text, np.zeros(4, np.int32), codebook_size=CODEBOOK,
                                     action=[1] * 7, prompt='{instruction}') for text in ('a', 'longer text')]
  batch = sequences.pad_batch(examples, 64)
  codes = np.array([[10, 11, 12, 13], [20, 21, 22, 23]])
  tokens = np.asarray(backbone.fill_positions(jnp.asarray(batch['tokens']), jnp.asarray(batch['modality']),
                                              jnp.asarray(codes), VISION))
  for row in range(2):
    vision = np.flatnonzero(batch['modality'][row] == VISION)
    np.testing.assert_array_equal(tokens[row, vision[:4]], codes[row])
    assert tokens[row, vision[4]] == sequences.vision_end_ids(CODEBOOK)[1]  # <eov> untouched
    others = np.ones(64, bool)
    others[vision[:4]] = False
    np.testing.assert_array_equal(tokens[row, others], batch['tokens'][row, others])


def _tiny(latent=0, action=0):
  return vla.VLA(vla.vla_config('tiny', latent_vocab_size=latent, action_vocab_size=action))


def test_init_from_surgery_keeps_the_trunk_bitwise_and_initialises_exactly_the_missing(tmp_path):
  pretrained_model = _tiny(latent=8)
  pretrained = jax.jit(lambda rng: vla.init_params(pretrained_model, rng))(jax.random.key(1))
  pretrained = jax.tree.map(np.asarray, nn.unbox(pretrained))
  easylm.save_params_checkpoint(str(tmp_path / 'pretrained'), pretrained)

  model = _tiny(action=32)
  mesh = sharding.make_mesh('1,2,1', jax.devices()[:2])
  fresh, _ = sharding.create_sharded(lambda rng: vla.init_params(model, rng), mesh, jax.random.key(2))
  with sharding.use_mesh(mesh):
    params, report = warm_start.load_matching(str(tmp_path / 'pretrained'), fresh)
  flat, flat_fresh = traverse_util.flatten_dict(params), traverse_util.flatten_dict(fresh)
  flat_pretrained = traverse_util.flatten_dict(pretrained)
  new = {('transformer', 'ate', 'embedding'), ('action_head', 'kernel')}
  assert set(report.initialised) == {'/'.join(path) for path in new}
  assert set(report.dropped) == {'transformer/dte/embedding', 'delta_head/kernel'}
  assert len(report.loaded) == len(flat) - 2
  for path, value in flat.items():
    expected = flat_fresh[path] if path in new else flat_pretrained[path]
    np.testing.assert_array_equal(np.asarray(value), np.asarray(expected), err_msg='/'.join(path))
    assert value.sharding == flat_fresh[path].sharding  # read straight into the new sharding
  assert 'initialised fresh (2)' in report.summary()

  # A param listed as fresh keeps its init; a shape that differs is an error naming it.
  with sharding.use_mesh(mesh):
    params, report = warm_start.load_matching(str(tmp_path / 'pretrained'), fresh, fresh=('lm_head',))
  np.testing.assert_array_equal(np.asarray(params['lm_head']['kernel']), np.asarray(fresh['lm_head']['kernel']))
  other = vla.VLA(vla.vla_config('tiny', vision_vocab_size=200))
  other_fresh, _ = sharding.create_sharded(lambda rng: vla.init_params(other, rng), mesh, jax.random.key(2))
  with pytest.raises(ValueError, match=r'transformer/vte/embedding \(136, 64\) in the checkpoint, \(200, 64\) here'):
    warm_start.load_matching(str(tmp_path / 'pretrained'), other_fresh)


def test_frozen_params_do_not_change_and_have_no_optimizer_moments():
  model = _tiny(latent=8)
  optim_config = config_lib.load(f'{CONFIGS}/latent_pretrain.py:tiny').optim
  assert optim_config.freeze == 'vision_head'
  with optim_config.unlocked():
    optim_config.freeze = 'vision_head,transformer/vte'
  optimizer = optim.make_optimizer(optim_config, 10)
  state = jax.jit(lambda: step.init_train_state(
      lambda rng: {'params': nn.unbox(vla.init_params(model, rng)), 'model_state': {}}, optimizer, 0))()
  tokenizer = sequences.ByteTokenizer()
  rng = np.random.RandomState(0)
  batch = sequences.pad_batch([sequences.vla_sequence(tokenizer, 'go', rng.randint(0, 130, 8), codebook_size=130,
                                                      latent=rng.randint(0, 8, 4), prompt='{instruction}')
                               for _ in range(4)], 64)
  train_step = jax.jit(step.make_train_step(vla.make_loss_fn(model), optimizer))
  before = jax.tree.map(np.asarray, state.params)
  for _ in range(3):
    state, metrics = train_step(state, batch)
  frozen = (('vision_head', 'kernel'), ('transformer', 'vte', 'embedding'))
  flat_before, flat_after = traverse_util.flatten_dict(before), traverse_util.flatten_dict(state.params)
  for path in flat_before:
    if path in frozen:
      np.testing.assert_array_equal(np.asarray(flat_after[path]), flat_before[path], err_msg='/'.join(path))
    elif path[0] in ('transformer', 'delta_head', 'lm_head') and path != ('transformer', 'ate', 'embedding'):
      assert not np.array_equal(np.asarray(flat_after[path]), flat_before[path]), '/'.join(path)
  # Adam keeps two moments per trained param and nothing for the frozen ones.
  trained = sum(v.size for p, v in flat_before.items() if p not in frozen)
  moments = sum(leaf.size for leaf in jax.tree.leaves(state.opt_state) if np.ndim(leaf) > 0)
  assert moments == 2 * trained
  assert np.isfinite(float(metrics['loss']))
  with optim_config.unlocked():
    optim_config.freeze = 'vision_heads'
  with pytest.raises(ValueError, match="optim.freeze: 'vision_heads' matches no parameter"):
    optim.make_optimizer(optim_config, 10).init(state.params)


@pytest.mark.parametrize('arg', ['paper', '1b', 'demo', 'demo,actionvla', 'tiny,lapa_hand'])
def test_latent_pretrain_presets(arg):
  config = config_lib.load(f'{CONFIGS}/latent_pretrain.py:{arg}')
  model_config = backbone.model_config(config)
  if arg == 'paper':
    assert (config.batch_size, config.seq_len, config.total_steps, config.dtype) == (256, 384, 70_000, 'bfloat16')
    assert (config.optim.lr, config.optim.b2, config.optim.clip_norm, config.optim.schedule) == (2e-5, 0.95, 1.0, 'constant')
    assert (model_config.llama.hidden_size, model_config.llama.num_layers, model_config.vision_vocab_size) == (4096, 32, 8448)
    assert config.loss.target_weight == 0.99 and config.loss.text_weight == 0.01
    abstract = jax.eval_shape(lambda rng: vla.init_params(vla.VLA(model_config), rng), jax.random.key(0))
    count = sum(leaf.size for leaf in jax.tree.leaves(nn.unbox(abstract)))
    assert 6.7e9 < count < 7.0e9  # LWM-7B: LLaMA-2-7B + 8448 vision rows in and out + 8 latent codes
  if 'actionvla' in arg:
    assert config.target == 'action' and model_config.action_vocab_size == 256 and model_config.latent_vocab_size == 0
  else:
    # The demo's latent vocabulary is the demo LAQ's codebook; the others keep the paper's 8.
    laq_preset = 'demo' if arg.startswith('demo') else 'paper'
    laq_codebook = config_lib.load(f'{CONFIGS}/laq.py:{laq_preset}').model.codebook_size
    assert config.target == 'latent' and model_config.latent_vocab_size == laq_codebook
  with pytest.raises(ValueError, match='unknown method'):
    config_lib.load(f'{CONFIGS}/latent_pretrain.py:demo,vpt')


def test_finetune_presets():
  paper = config_lib.load(f'{CONFIGS}/finetune.py:paper')
  assert (paper.batch_size, paper.total_steps, paper.optim.lr, paper.bins.num_bins) == (128, 2000, 2e-5, 256)
  assert paper.augment.crop_area == 0.9 and paper.model.latent_vocab_size == 0
  assert config_lib.load(f'{CONFIGS}/finetune.py:demo,scratch').method == 'scratch'
