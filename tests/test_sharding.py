"""Mesh parsing, the logical rules on real params, and mesh-independent training (8 CPU devices)."""

import json

import flax.linen as nn
import jax
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from lapa_jax import config as config_lib
from lapa_jax import sharding
from lapa_jax.train import loop, toy

TOY = 'configs/toy.py:tiny'
STEPS = 6


@pytest.mark.parametrize('mesh_dim, expected', [
    ('1,-1,1', (1, 8, 1)), ('-1,2,2', (2, 2, 2)), ('8,1,1', (8, 1, 1)), ('1,-1,1,1', (1, 8, 1)),
    ('!1,8,1', (1, 8, 1)),
])
def test_parse_mesh_dim(mesh_dim, expected):
  assert sharding.parse_mesh_dim(mesh_dim, 8) == expected


@pytest.mark.parametrize('mesh_dim', [
    '2,8,1',      # too large
    '1,4,1',      # too small
    '3,-1,1',     # 8 not divisible by 3
    '-1,-1,1',    # two -1
    '0,-1,1',     # zero
    'a,b,c',      # not integers
    '1,8',        # too few entries
    '1,-1,1,2',   # LWM string with sequence parallelism
])
def test_parse_mesh_dim_errors_name_device_count(mesh_dim):
  with pytest.raises(ValueError, match=r'8 (devices|are)') as error:
    sharding.parse_mesh_dim(mesh_dim, 8)
  assert mesh_dim in str(error.value) and '\n' not in str(error.value)


def test_make_mesh_uses_given_devices():
  mesh = sharding.make_mesh('1,-1,1', jax.devices()[:2])
  assert dict(mesh.shape) == {'dp': 1, 'fsdp': 2, 'tp': 1}


def test_global_batch_shards_leading_axis():
  mesh = sharding.make_mesh('2,2,2')
  batch = sharding.global_batch(mesh, {'video': np.arange(8 * 3, dtype=np.float32).reshape(8, 3)})
  assert batch['video'].sharding.spec == P(('dp', 'fsdp'), None)
  assert {shard.data.shape for shard in batch['video'].addressable_shards} == {(2, 3)}
  np.testing.assert_array_equal(np.asarray(batch['video']), np.arange(24).reshape(8, 3))


def _train_toy(tmp_path, mesh_dim, devices=None):
  config = config_lib.load(TOY, [f'--config.mesh_dim={mesh_dim}', f'--config.total_steps={STEPS}',
                                 '--config.log_every=1', '--config.eval_every=0', '--config.checkpoint_every=100'])
  workdir = tmp_path / mesh_dim.replace(',', '_')
  state = loop.train(config, str(workdir), toy.make_stage(config), devices=devices)
  with open(workdir / 'metrics.jsonl') as f:
    losses = [line['loss'] for line in map(json.loads, f) if 'loss' in line]
  return state, np.array(losses)


@pytest.fixture(scope='module')
def single_device_losses(tmp_path_factory):
  _, losses = _train_toy(tmp_path_factory.mktemp('one'), '1,1,1', devices=jax.devices()[:1])
  assert len(losses) == STEPS
  return losses


@pytest.mark.parametrize('mesh_dim', ['1,8,1', '2,2,2', '8,1,1'])
def test_losses_do_not_depend_on_mesh(tmp_path, single_device_losses, mesh_dim):
  state, losses = _train_toy(tmp_path, mesh_dim)
  np.testing.assert_allclose(losses, single_device_losses, rtol=1e-5)

  # Params, their Adam moments and the model state carry the specs of the rules table:
  # embed -> fsdp, mlp -> tp.
  mu = optax.tree_utils.tree_get(state.opt_state, 'mu')
  expected = {('Dense_0', 'kernel'): P('fsdp', 'tp'), ('Dense_0', 'bias'): P('tp'),
              ('Dense_1', 'kernel'): P('tp', 'fsdp'), ('Dense_1', 'bias'): P('fsdp')}
  for (layer, name), spec in expected.items():
    for tree in (state.params, mu):
      array = tree[layer][name]
      assert array.sharding.spec == spec, (layer, name)
      mesh_shape = array.sharding.mesh.shape
      shard_shape = tuple(size // mesh_shape[axis] for size, axis in zip(array.shape, spec))
      assert array.addressable_shards[0].data.shape == shard_shape
  assert state.model_state['target_mean'].sharding.spec == P('fsdp')
  assert state.step.sharding.is_fully_replicated and int(state.step) == STEPS


# ----- The rules table covers every logical name the models use -----------------------------------

def _model_inits():
  """{model: init() -> params (logically boxed)} of every model at its tiny size."""
  import jax.numpy as jnp
  from lapa_jax.models import laq, vla, vqgan
  from lapa_jax.train import tokenizer

  def laq_init(variant):
    model = laq.from_config(config_lib.load('configs/laq.py:tiny', [f'--config.model.variant={variant}']).model)
    return lambda: model.init(jax.random.key(0), jnp.zeros((1, 2, model.image_size, model.image_size, 3)))

  vqgan_model = vqgan.VQGAN(vqgan.vqgan_config('tiny'))
  images = jnp.zeros((1, 16, 16, 3))
  discriminator = tokenizer.PatchDiscriminator(channels=8, layers=2)
  vla_config = vla.vla_config('tiny', action_vocab_size=256)
  toy_stage = toy.make_stage(config_lib.load(TOY))
  return {
      'laq lapa': laq_init('lapa'), 'laq official': laq_init('official'),
      'vqgan': lambda: vqgan_model.init(jax.random.key(0), images),
      'discriminator': lambda: discriminator.init(jax.random.key(0), images),
      'vla scanned': lambda: vla.init_params(vla.VLA(vla_config), jax.random.key(0)),
      'vla unscanned': lambda: vla.init_params(
          vla.VLA(vla_config.replace(llama=vla_config.llama.replace(scan_layers=False))), jax.random.key(0)),
      'toy': lambda: toy_stage.init(jax.random.key(0)),
  }


def test_every_logical_name_of_every_model_is_in_the_rules():
  """Flax maps a name missing from the table to None: the axis would be silently replicated."""
  from lapa_jax.models import layers, llama
  used, missing = set(), []
  for model, init in _model_inits().items():
    boxes = jax.tree.leaves(jax.eval_shape(init), is_leaf=lambda leaf: isinstance(leaf, nn.Partitioned))
    for box in (box for box in boxes if isinstance(box, nn.Partitioned)):
      used.update(name for name in box.names if name)
      missing += [(model, name) for name in sharding.unknown_logical_names(box.names)]
  activations = (layers.VIDEO_AXES, llama.HIDDEN_AXES, llama.HEADS_AXES, llama.MLP_AXES)
  missing += [('activations', name) for axes in activations for name in sharding.unknown_logical_names(axes)]
  assert not missing, f'logical names missing from sharding.LOGICAL_RULES: {sorted(set(missing))}'
  assert {'patch', 'quant', 'quant_out', 'codebook', 'embed', 'mlp', 'heads', 'vocab', 'layers'} <= used


def test_an_unknown_logical_name_is_an_error():
  boxed = {'w': nn.LogicallyPartitioned(jax.ShapeDtypeStruct((4, 8), np.float32), ('embed', 'nonsense'))}
  with pytest.raises(ValueError, match=r"\['w'\].*'nonsense'.*LOGICAL_RULES"):
    sharding.logical_to_shardings(boxed, sharding.make_mesh('1,2,4'))


def test_dimensions_the_mesh_does_not_divide_stay_whole():
  mesh = sharding.make_mesh('2,2,2')
  assert sharding.fit_spec_to_shape(P('fsdp', 'tp'), (4, 170), mesh) == P('fsdp', 'tp')
  assert sharding.fit_spec_to_shape(P('fsdp', 'tp'), (3, 170), mesh) == P(None, 'tp')
  assert sharding.fit_spec_to_shape(P(('dp', 'fsdp'), None), (6, 5), mesh) == P(None, None)
  boxed = {'w': nn.LogicallyPartitioned(jax.ShapeDtypeStruct((64, 2, 170), np.float32), ('embed', None, 'mlp'))}
  assert sharding.logical_to_shardings(boxed, sharding.make_mesh('1,2,4'))['w'].spec == P('fsdp', None, None)


def test_the_laq_splits_over_tensor_parallelism():
  """(embed, heads, kv) attention, (patch, embed) patch embedding, (quant, quant_out) NSVQ
  convolution and (codebook, quant) codebook split over tp; the GEGLU width 170 of the tiny preset
  splits over tp = 2 but stays whole for tp = 4. (test_multihost_stages.py trains on these meshes.)"""
  import jax.numpy as jnp
  from flax import traverse_util
  from lapa_jax.models import laq
  model = laq.from_config(config_lib.load('configs/laq.py:tiny').model)
  abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 2, 32, 32, 3)))['params'])
  expected = {'encoder_space/layer_0/self_attention/query/kernel': P('fsdp', 'tp', None),
              'patch_dense/kernel': P('tp', 'fsdp'), 'to_pixels/kernel': P('fsdp', 'tp'),
              'quantizer/convs_0/kernel': P(None, None, 'tp', 'fsdp'), 'quantizer/codebook': P(None, 'tp')}
  geglu = 'encoder_space/layer_0/feed_forward/wi/kernel'  # (embed, (value, gate), mlp)
  for mesh_dim, geglu_spec in (('1,2,4', P('fsdp', None, None)), ('1,4,2', P('fsdp', None, 'tp'))):
    shardings = traverse_util.flatten_dict(
        nn.unbox(sharding.logical_to_shardings(abstract, sharding.make_mesh(mesh_dim))), sep='/')
    for name, spec in {**expected, geglu: geglu_spec}.items():
      assert shardings[name].spec == spec, (mesh_dim, name)
