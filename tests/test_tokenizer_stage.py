"""The vision tokenizer stage: configs, dead-code revival on a crafted state, the adversarial
objective's gradient routing, training the tiny preset on the built-in world, and `load_vqgan` on a
trained and on a converted LWM-format workdir."""

import functools
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lapa_jax import config as config_lib
from lapa_jax import vision_tokenizer
from lapa_jax.convert import lwm_vqgan
from lapa_jax.envs import writer
from lapa_jax.models import vqgan
from lapa_jax.train import loop, optim
from lapa_jax.train import revival as revival_lib
from lapa_jax.train import tokenizer as tokenizer_stage
from lapa_jax.train.step import init_train_state, make_train_step

CONFIG = str(pathlib.Path(__file__).resolve().parents[1] / 'configs' / 'tokenizer.py')


def tiny_config(*overrides):
  return config_lib.load(f'{CONFIG}:tiny', list(overrides))


# Smaller still than the tiny preset (one level, 8x8 images), for the tests that compile a backward pass.
MICRO = ('--config.model.resolution=8', '--config.model.channel_mult=(1,)', '--config.model.hidden_channels=8')


@functools.lru_cache(maxsize=None)
def drawn_params(*overrides):
  """Tiny-preset VQGAN params (with config `overrides`) drawn with numpy in the init's shapes (no init
  to compile)."""
  model = vqgan.VQGAN(vqgan.from_config(tiny_config(*overrides).model))
  rng = np.random.RandomState(0)

  def draw(path, leaf):  # numpy: an eager jnp op per shape would compile once per shape
    name = str(path[-1].key)
    if name == 'kernel':
      return rng.normal(0, np.sqrt(1 / np.prod(leaf.shape[:-1])), leaf.shape).astype(np.float32)
    if name == 'embeddings':
      return rng.normal(0, 1, leaf.shape).astype(np.float32)
    return np.full(leaf.shape, 1.0 if name == 'scale' else 0.0, np.float32)

  return model, jax.tree.map_with_path(draw, vision_tokenizer.abstract_params(model))


def encode_fn(model):
  return jax.jit(lambda params, images: model.apply({'params': params}, images, method=vqgan.VQGAN.encode))


def random_images(count=4, size=16, seed=0):
  return jnp.asarray(np.random.RandomState(seed).uniform(0, 1, (count, size, size, 3)), jnp.float32)


# ----- Configs ---------------------------------------------------------------------------------

def test_presets_describe_the_whole_model():
  lwm = vqgan.from_config(config_lib.load(f'{CONFIG}:lwm').model)
  assert lwm == vqgan.vqgan_config('lwm') and (lwm.tokens_per_side, lwm.codebook_size) == (16, 8192)
  for preset in ('small', 'demo'):
    model = vqgan.from_config(config_lib.load(f'{CONFIG}:{preset}').model)
    assert (model.resolution, model.tokens_per_side) == (64, 8)
  config = tiny_config('--config.model.channel_mult=(1,2,2)')
  assert vqgan.from_config(config.model).channel_mult == (1, 2, 2)
  # A workdir's config.json turns the tuple into a list; from_config reads it back.
  restored = json.loads(json.dumps(config.model.to_dict()))
  assert vqgan.from_config(restored) == vqgan.from_config(config.model)
  with pytest.raises(ValueError, match='missing: embed_dim'):
    vqgan.from_config({k: v for k, v in restored.items() if k != 'embed_dim'})
  assert tiny_config().loss.adversarial_weight == 0 and tokenizer_stage.make_discriminator(tiny_config()) is None
  with pytest.raises(ValueError, match='data.path'):
    tokenizer_stage.make_stage(config_lib.load(f'{CONFIG}:small'))


@pytest.mark.parametrize('override, message', [
    ('--config.loss.reconstruction=l3', "config field loss.reconstruction: expected one of .* got 'l3'"),
    ('--config.dtype=bfloat16', 'config field dtype'),
    ('--config.revival.source=nearest', 'config field revival.source'),
    ('--config.revival.pool=8', 'config field revival.pool'),
])
def test_bad_configs_fail_in_one_line(override, message):
  with pytest.raises(ValueError, match=message) as error:
    tokenizer_stage.check_config(tiny_config(override))
  assert '\n' not in str(error.value)


# ----- Dead-code revival -----------------------------------------------------------------------

def test_revival_moves_codes_unused_in_the_window_onto_batch_latents():
  codes, dim = 8, 4
  codebook = jnp.arange(codes * dim, dtype=jnp.float32).reshape(codes, dim)
  params = {'quantize': {'embeddings': codebook}, 'encoder': {'kernel': jnp.ones((3,))}}
  optimizer = optax.adam(1e-3)
  opt_state = optax.tree_utils.tree_set(optimizer.init(params), mu=jax.tree.map(jnp.ones_like, params),
                                        nu=jax.tree.map(jnp.ones_like, params))
  pool = 1000.0 + jnp.broadcast_to(jnp.arange(16, dtype=jnp.float32)[:, None], (16, dim))
  model_state = dict(revival_lib.initial_state(codes, dim, 16), latent_pool=pool,
                     code_usage=jnp.asarray([400, 0, 300, 0, 300, 0, 0, 1], jnp.float32))
  revival = tiny_config().revival  # every 20 steps, threshold 0.03 x the uniform share (1000 / 8)
  state = loop.TrainState(step=jnp.asarray(revival.every, jnp.int32), params=params, opt_state=opt_state,
                          model_state=model_state, rng=jax.random.PRNGKey(0))
  new, metrics = jax.jit(functools.partial(tokenizer_stage.revive_dead_codes, revival=revival))(state)
  new_codebook = np.asarray(new.params['quantize']['embeddings'])
  live, dead = [0, 2, 4], [1, 3, 5, 6, 7]
  np.testing.assert_array_equal(new_codebook[live], np.asarray(codebook)[live])
  rows = new_codebook[dead, 0] - 1000  # distinct latents of the pool, unchanged
  assert len(set(rows)) == len(dead) and set(rows) <= set(range(16))
  assert float(metrics['codes_revived']) == len(dead)
  mu = optax.tree_utils.tree_get(new.opt_state, 'mu')
  assert np.all(np.asarray(mu['quantize']['embeddings'])[dead] == 0)
  assert np.all(np.asarray(mu['quantize']['embeddings'])[live] == 1) and np.all(mu['encoder']['kernel'] == 1)
  np.testing.assert_array_equal(new.model_state['code_usage'], 0)  # a new window starts
  between, metrics = tokenizer_stage.revive_dead_codes(state.replace(step=state.step + 1), revival)
  np.testing.assert_array_equal(between.params['quantize']['embeddings'], codebook)
  assert float(metrics['codes_revived']) == 0


def test_latent_pool_spans_the_batch():
  latents = jnp.arange(12, dtype=jnp.float32)[:, None]
  np.testing.assert_array_equal(revival_lib.pool_latents(latents, 4)[:, 0], [0, 3, 6, 9])
  np.testing.assert_array_equal(revival_lib.pool_latents(latents, 16)[:, 0], np.arange(12))


# ----- The adversarial term --------------------------------------------------------------------

def adversarial_setup(adversarial_start):
  """(config, a micro VQGAN, its loss_fn, params with a discriminator, model_state, a uint8 batch)."""
  config = tiny_config(*MICRO, '--config.loss.adversarial_weight=0.1',
                       f'--config.loss.adversarial_start={adversarial_start}',
                       '--config.loss.discriminator_channels=8', '--config.loss.discriminator_layers=2')
  model, params = drawn_params(*MICRO)
  discriminator = tokenizer_stage.make_discriminator(config)
  images = np.asarray(random_images(8, size=8) * 255, np.uint8)
  critic = jax.jit(discriminator.init)(jax.random.PRNGKey(1), images[:1].astype(np.float32) / 255)['params']
  params = {**params, tokenizer_stage.DISCRIMINATOR: critic}
  model_state = revival_lib.initial_state(config.model.codebook_size, config.model.embed_dim, 8 * 64)
  return config, model, tokenizer_stage.make_loss_fn(model, config, discriminator), params, model_state, images


def split_norms(tree):
  """(norm of the VQGAN's part, norm of the discriminator's part) of a params-shaped tree (numpy)."""
  def norm(part):
    return float(np.sqrt(sum(np.sum(np.square(np.asarray(leaf, np.float64))) for leaf in jax.tree.leaves(part))))
  return norm(vision_tokenizer.vqgan_params(tree)), norm(tree[tokenizer_stage.DISCRIMINATOR])


def test_combined_objective_gives_each_player_its_own_gradient():
  _, _, loss_fn, params, model_state, images = adversarial_setup(adversarial_start=0)

  def terms(params):
    step_metrics = loss_fn(params, model_state, {'image': images}, None, jnp.int32(0))[1][0]
    return jnp.stack([step_metrics['generator_loss'], step_metrics['discriminator_loss']])

  # Both terms' gradients from one (batched) backward pass: rows 0 and 1 of the Jacobian.
  jacobian = jax.device_get(jax.jit(jax.jacrev(terms))(params))
  generator_vqgan, generator_critic = split_norms(jax.tree.map(lambda rows: rows[0], jacobian))
  critic_vqgan, critic_critic = split_norms(jax.tree.map(lambda rows: rows[1], jacobian))
  assert generator_vqgan > 0 and generator_critic == 0  # the VQGAN learns to fool a fixed critic
  assert critic_critic > 0 and critic_vqgan == 0  # the critic learns without pushing the VQGAN


def test_adversarial_training_step_updates_the_discriminator_from_adversarial_start():
  config, _, loss_fn, params, model_state, images = adversarial_setup(adversarial_start=1)
  optimizer = optim.make_optimizer(config.optim, config.total_steps)
  step = jax.jit(make_train_step(loss_fn, optimizer))
  state = jax.jit(lambda: init_train_state(lambda rng: {'params': params, 'model_state': model_state},
                                           optimizer, config.seed))()
  initial = jax.device_get(state.params)
  first, first_metrics = step(state, {'image': images})  # step 0 < adversarial_start: the critic waits
  first_params = jax.device_get(first.params)
  second, second_metrics = step(first, {'image': images})
  assert float(first_metrics['adversarial_active']) == 0 and float(second_metrics['adversarial_active']) == 1
  assert split_norms(jax.tree.map(np.subtract, first_params, initial))[1] == 0
  vqgan_change, critic_change = split_norms(jax.tree.map(np.subtract, jax.device_get(second.params), first_params))
  assert vqgan_change > 0 and critic_change > 0
  assert {'generator_loss', 'discriminator_loss', 'reconstruction_loss', 'perplexity'} <= set(second_metrics)


# ----- Training and loading --------------------------------------------------------------------

@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  """The tiny preset trained on a small world dataset: (config, workdir, final state)."""
  world = writer.write_dataset(str(tmp_path_factory.mktemp('world')), 'robot', episodes=12, seed=0, image_size=16)
  config = tiny_config(f'--config.data.path={world}', '--config.log_every=4')
  workdir = tmp_path_factory.mktemp('tokenizer')
  # One device: 8 simulated devices on a 2-core machine only add overhead to a model this small.
  state = loop.train(config, str(workdir), tokenizer_stage.make_stage(config), devices=jax.devices()[:1])
  return config, workdir, state


def test_tiny_preset_learns_the_world_and_draws_reconstructions(trained):
  config, workdir, state = trained
  assert int(state.step) == config.total_steps
  assert tokenizer_stage.DISCRIMINATOR not in state.params  # the adversarial term is off by default
  lines = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  train_lines = [line for line in lines if 'reconstruction_loss' in line]
  assert train_lines[-1]['reconstruction_loss'] < 0.3 * train_lines[0]['reconstruction_loss'], train_lines
  assert train_lines[-1]['perplexity'] > 1 and {'psnr', 'codebook_loss', 'commitment_loss', 'unique_codes',
                                                'codes_revived'} <= set(train_lines[-1])
  evaluation = [line for line in lines if 'eval/mse' in line][-1]
  assert evaluation['eval/perplexity'] > 1 and evaluation['eval/psnr'] > 18
  images = sorted(path.name for path in (workdir / 'images').iterdir())
  assert f'reconstructions_{config.total_steps:08d}.png' in images
  assert f'code_usage_{config.total_steps:08d}.png' in images


def test_load_vqgan_reads_a_trained_workdir(trained):
  config, workdir, state = trained
  vqgan_config, model, params = vision_tokenizer.load_vqgan(str(workdir), config.total_steps)
  assert vqgan_config == vqgan.from_config(config.model)
  images = random_images(seed=1)
  encode = encode_fn(model)
  np.testing.assert_array_equal(encode(params, images), encode(vision_tokenizer.vqgan_params(state.params), images))


def test_load_vqgan_reads_a_converted_lwm_pickle(tmp_path):
  model, params = drawn_params()
  lwm_vqgan.write_pickle(params, str(tmp_path / 'vqgan'))
  workdir = tmp_path / 'converted'
  assert lwm_vqgan.main(['import', str(tmp_path / 'vqgan'), str(workdir), '--preset', 'tiny']) == 0
  assert json.loads((workdir / 'config.json').read_text())['stage'] == 'tokenizer'
  vqgan_config, _, loaded = vision_tokenizer.load_vqgan(str(workdir))
  assert vqgan_config == model.config
  images = random_images(seed=2)
  encode = encode_fn(model)
  np.testing.assert_array_equal(encode(loaded, images), encode(params, images))


def test_bad_workdirs_fail_in_one_line(tmp_path):
  cases = {'empty': ({}, FileNotFoundError, 'config.json: missing'),
           'laq': ({'stage': 'laq', 'model': {}}, ValueError, "stage is 'laq', not a tokenizer workdir"),
           'fresh': ({'stage': 'tokenizer', 'model': tiny_config().model.to_dict()}, FileNotFoundError,
                     'checkpoint')}
  for name, (contents, kind, message) in cases.items():
    (tmp_path / name).mkdir()
    if contents:
      (tmp_path / name / 'config.json').write_text(json.dumps(contents))
    with pytest.raises(kind, match=message) as error:
      vision_tokenizer.load_vqgan(str(tmp_path / name))
    assert '\n' not in str(error.value)
