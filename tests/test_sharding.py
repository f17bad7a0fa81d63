"""Mesh parsing, the logical rules on real params, and mesh-independent training (8 CPU devices)."""

import json

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
